//! dm-style tables: what the served disk *is*.
//!
//! Two targets, with device mapper's own argument syntax:
//! - `linear <device> <offset>`
//! - `clone <metadata dev> <destination dev> <source dev> <region size>
//!   [<#feature args> [<feature arg>]* [<#core args> [<core arg>]*]]`
//!
//! Either may be preceded by dm's `<start> <length>` (start must be 0: one target
//! per table). Without a length, the length is resolved when the devices are opened
//! (the device size minus the offset for `linear`, the source size for `clone`).

use std::fmt;
use std::path::PathBuf;

/// dm-clone's limits on the region size, in 512-byte sectors.
pub const MIN_REGION_SECTORS: u64 = 8;
/// See [`MIN_REGION_SECTORS`].
pub const MAX_REGION_SECTORS: u64 = 2_097_152;

/// A parsed table line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// Length in sectors, if the line gave one.
    pub len: Option<u64>,
    /// The target and its arguments.
    pub target: TargetSpec,
}

/// The target of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    /// `linear <device> <offset>`.
    Linear(LinearSpec),
    /// `clone ...`, exactly dm-clone's constructor.
    Clone(CloneSpec),
}

/// Arguments of a `linear` target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    /// File or block device.
    pub device: PathBuf,
    /// Offset into the device, in sectors.
    pub offset: u64,
}

/// Arguments of a `clone` target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneSpec {
    /// Metadata device (dm-clone format).
    pub metadata: PathBuf,
    /// Destination device: becomes the clone.
    pub destination: PathBuf,
    /// Source device: read-only, never written.
    pub source: PathBuf,
    /// Region size in sectors.
    pub region_sectors: u64,
    /// Feature `no_hydration`: start with background hydration disabled.
    pub no_hydration: bool,
    /// Feature `no_discard_passdown`: do not pass discards to the destination.
    pub no_discard_passdown: bool,
    /// Core arg `hydration_threshold` (regions in flight); dm-clone's default is 1.
    pub hydration_threshold: u32,
    /// Core arg `hydration_batch_size` (regions per copy); dm-clone's default is 1.
    pub hydration_batch_size: u32,
}

/// dm-clone's default for both core args.
pub const DEFAULT_HYDRATION_THRESHOLD: u32 = 1;
/// See [`DEFAULT_HYDRATION_THRESHOLD`].
pub const DEFAULT_HYDRATION_BATCH_SIZE: u32 = 1;

/// Why a table line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("empty table")]
    Empty,
    #[error("unknown target type '{0}' (expected 'linear' or 'clone')")]
    UnknownTarget(String),
    #[error("table start must be 0 (one target per table), got '{0}'")]
    NonZeroStart(String),
    #[error("invalid {what} '{value}': expected a non-negative integer")]
    BadNumber { what: &'static str, value: String },
    #[error("the table length must be greater than 0")]
    ZeroLength,
    #[error("{target}: missing argument <{what}>")]
    Missing {
        target: &'static str,
        what: &'static str,
    },
    #[error("{target}: unexpected extra arguments: {rest}")]
    Extra { target: &'static str, rest: String },
    #[error(
        "invalid region size {0}: must be a power of two between {MIN_REGION_SECTORS} and {MAX_REGION_SECTORS} sectors"
    )]
    RegionSize(u64),
    #[error("clone: {count} feature args announced but only {available} given")]
    FeatureCount { count: u64, available: usize },
    #[error("clone: unknown feature '{0}' (expected no_hydration or no_discard_passdown)")]
    UnknownFeature(String),
    #[error("clone: the number of core args must be even, got {0}")]
    OddCoreArgs(u64),
    #[error("clone: {count} core args announced but only {available} given")]
    CoreCount { count: u64, available: usize },
    #[error(
        "clone: unknown core arg '{0}' (expected hydration_threshold or hydration_batch_size)"
    )]
    UnknownCoreArg(String),
    #[error("clone: invalid value '{value}' for {key}: expected an integer from 1 to {max}")]
    CoreValue {
        key: &'static str,
        value: String,
        max: u32,
    },
}

fn number(what: &'static str, value: &str) -> Result<u64, TableError> {
    value.parse::<u64>().map_err(|_| TableError::BadNumber {
        what,
        value: value.to_string(),
    })
}

fn next<'a>(
    it: &mut impl Iterator<Item = &'a str>,
    target: &'static str,
    what: &'static str,
) -> Result<&'a str, TableError> {
    it.next().ok_or(TableError::Missing { target, what })
}

/// Parse a core-arg value the way dm-clone does: an unsigned int, not zero.
pub fn parse_core_value(key: &'static str, value: &str) -> Result<u32, TableError> {
    match value.parse::<u32>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(TableError::CoreValue {
            key,
            value: value.to_string(),
            max: u32::MAX,
        }),
    }
}

/// Validate a region size as dm-clone does.
pub fn check_region_size(sectors: u64) -> Result<(), TableError> {
    if sectors.is_power_of_two() && (MIN_REGION_SECTORS..=MAX_REGION_SECTORS).contains(&sectors) {
        Ok(())
    } else {
        Err(TableError::RegionSize(sectors))
    }
}

impl Table {
    /// Parse one table line (`#` starts a comment; blank lines are ignored).
    pub fn parse(line: &str) -> Result<Table, TableError> {
        let words: Vec<&str> = line
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(str::split_whitespace)
            .collect();
        let first = *words.first().ok_or(TableError::Empty)?;
        let (len, rest) = if first.bytes().all(|b| b.is_ascii_digit()) {
            if first.parse::<u64>() != Ok(0) {
                return Err(TableError::NonZeroStart(first.to_string()));
            }
            let len_word = words.get(1).ok_or(TableError::Missing {
                target: "table",
                what: "length",
            })?;
            let len = number("table length", len_word)?;
            if len == 0 {
                return Err(TableError::ZeroLength);
            }
            (Some(len), words.get(2..).unwrap_or(&[]))
        } else {
            (None, &words[..])
        };
        let (kind, args) = rest.split_first().ok_or(TableError::Missing {
            target: "table",
            what: "target type",
        })?;
        let target = match *kind {
            "linear" => TargetSpec::Linear(parse_linear(args)?),
            "clone" => TargetSpec::Clone(parse_clone(args)?),
            other => return Err(TableError::UnknownTarget(other.to_string())),
        };
        Ok(Table { len, target })
    }

    /// The line as given: with `0 LEN` when the length is known.
    pub fn to_line(&self) -> String {
        match self.len {
            Some(len) => self.to_dm_line(len),
            None => self.target.to_string(),
        }
    }

    /// The dm table line for a resolved length: `0 LEN <target> <args>`.
    pub fn to_dm_line(&self, len: u64) -> String {
        format!("0 {len} {}", self.target)
    }
}

fn parse_linear(args: &[&str]) -> Result<LinearSpec, TableError> {
    let mut it = args.iter().copied();
    let device = PathBuf::from(next(&mut it, "linear", "device")?);
    let offset = number("linear offset", next(&mut it, "linear", "offset")?)?;
    let rest: Vec<&str> = it.collect();
    if !rest.is_empty() {
        return Err(TableError::Extra {
            target: "linear",
            rest: rest.join(" "),
        });
    }
    Ok(LinearSpec { device, offset })
}

fn parse_clone(args: &[&str]) -> Result<CloneSpec, TableError> {
    let mut it = args.iter().copied().peekable();
    let metadata = PathBuf::from(next(&mut it, "clone", "metadata dev")?);
    let destination = PathBuf::from(next(&mut it, "clone", "destination dev")?);
    let source = PathBuf::from(next(&mut it, "clone", "source dev")?);
    let region_sectors = number("region size", next(&mut it, "clone", "region size")?)?;
    check_region_size(region_sectors)?;
    let mut spec = CloneSpec {
        metadata,
        destination,
        source,
        region_sectors,
        no_hydration: false,
        no_discard_passdown: false,
        hydration_threshold: DEFAULT_HYDRATION_THRESHOLD,
        hydration_batch_size: DEFAULT_HYDRATION_BATCH_SIZE,
    };
    let rest: Vec<&str> = it.collect();
    let mut rest = rest.as_slice();
    if let Some((count_word, tail)) = rest.split_first() {
        let count = number("#feature args", count_word)?;
        let n = usize::try_from(count)
            .ok()
            .filter(|n| *n <= tail.len())
            .ok_or(TableError::FeatureCount {
                count,
                available: tail.len(),
            })?;
        let (features, tail) = tail.split_at(n);
        for feature in features {
            match *feature {
                "no_hydration" => spec.no_hydration = true,
                "no_discard_passdown" => spec.no_discard_passdown = true,
                other => return Err(TableError::UnknownFeature(other.to_string())),
            }
        }
        rest = tail;
    }
    if let Some((count_word, tail)) = rest.split_first() {
        let count = number("#core args", count_word)?;
        if count % 2 != 0 {
            return Err(TableError::OddCoreArgs(count));
        }
        let n = usize::try_from(count)
            .ok()
            .filter(|n| *n <= tail.len())
            .ok_or(TableError::CoreCount {
                count,
                available: tail.len(),
            })?;
        let (core, tail) = tail.split_at(n);
        for pair in core.chunks_exact(2) {
            if let [key, value] = pair {
                match *key {
                    "hydration_threshold" => {
                        spec.hydration_threshold = parse_core_value("hydration_threshold", value)?
                    }
                    "hydration_batch_size" => {
                        spec.hydration_batch_size = parse_core_value("hydration_batch_size", value)?
                    }
                    other => return Err(TableError::UnknownCoreArg(other.to_string())),
                }
            }
        }
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(TableError::Extra {
            target: "clone",
            rest: rest.join(" "),
        });
    }
    Ok(spec)
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::Linear(l) => write!(f, "linear {} {}", l.device.display(), l.offset),
            TargetSpec::Clone(c) => write!(f, "{c}"),
        }
    }
}

impl fmt::Display for CloneSpec {
    /// The constructor line as dm-clone's table readback shows it: features only
    /// when set, core args only when not the defaults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "clone {} {} {} {}",
            self.metadata.display(),
            self.destination.display(),
            self.source.display(),
            self.region_sectors
        )?;
        let mut features = Vec::new();
        if self.no_hydration {
            features.push("no_hydration");
        }
        if self.no_discard_passdown {
            features.push("no_discard_passdown");
        }
        let mut core = Vec::new();
        if self.hydration_threshold != DEFAULT_HYDRATION_THRESHOLD {
            core.push(format!("hydration_threshold {}", self.hydration_threshold));
        }
        if self.hydration_batch_size != DEFAULT_HYDRATION_BATCH_SIZE {
            core.push(format!(
                "hydration_batch_size {}",
                self.hydration_batch_size
            ));
        }
        if !features.is_empty() || !core.is_empty() {
            write!(f, " {}", features.len())?;
            for feature in &features {
                write!(f, " {feature}")?;
            }
        }
        if !core.is_empty() {
            write!(f, " {}", core.len() * 2)?;
            for c in &core {
                write!(f, " {c}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_short_and_dm_forms() {
        let t = Table::parse("linear /dev/sdb 2048").unwrap();
        assert_eq!(t.len, None);
        assert_eq!(
            t.target,
            TargetSpec::Linear(LinearSpec {
                device: "/dev/sdb".into(),
                offset: 2048
            })
        );
        let t = Table::parse("0 1000 linear img.raw 0").unwrap();
        assert_eq!(t.len, Some(1000));
        assert_eq!(t.to_dm_line(1000), "0 1000 linear img.raw 0");
    }

    #[test]
    fn clone_full_constructor() {
        let line = "0 2097152 clone /m /d /s 8 2 no_hydration no_discard_passdown 4 hydration_threshold 64 hydration_batch_size 16";
        let t = Table::parse(line).unwrap();
        let TargetSpec::Clone(c) = &t.target else {
            panic!("not clone")
        };
        assert!(c.no_hydration && c.no_discard_passdown);
        assert_eq!((c.hydration_threshold, c.hydration_batch_size), (64, 16));
        assert_eq!(t.to_dm_line(2097152), line);
        assert_eq!(Table::parse(&t.to_dm_line(2097152)).unwrap(), t);
    }

    #[test]
    fn clone_minimal_and_features_only() {
        let t = Table::parse("clone m d s 8").unwrap();
        assert_eq!(t.to_dm_line(64), "0 64 clone m d s 8");
        let t = Table::parse("clone m d s 8 1 no_hydration").unwrap();
        assert_eq!(t.to_dm_line(64), "0 64 clone m d s 8 1 no_hydration");
        let t = Table::parse("clone m d s 8 0 2 hydration_batch_size 4").unwrap();
        assert_eq!(
            t.to_dm_line(64),
            "0 64 clone m d s 8 0 2 hydration_batch_size 4"
        );
    }

    #[test]
    fn rejects_bad_lines() {
        use TableError::*;
        let cases: &[(&str, TableError)] = &[
            ("", Empty),
            ("# only a comment", Empty),
            ("striped a b", UnknownTarget("striped".into())),
            ("5 10 linear a 0", NonZeroStart("5".into())),
            ("0 0 linear a 0", ZeroLength),
            (
                "linear a",
                Missing {
                    target: "linear",
                    what: "offset",
                },
            ),
            (
                "linear a 0 x",
                Extra {
                    target: "linear",
                    rest: "x".into(),
                },
            ),
            (
                "linear a -1",
                BadNumber {
                    what: "linear offset",
                    value: "-1".into(),
                },
            ),
            ("clone m d s 12", RegionSize(12)),
            ("clone m d s 4", RegionSize(4)),
            ("clone m d s 4194304", RegionSize(4194304)),
            (
                "clone m d s 8 2 no_hydration",
                FeatureCount {
                    count: 2,
                    available: 1,
                },
            ),
            ("clone m d s 8 1 fast", UnknownFeature("fast".into())),
            ("clone m d s 8 0 3 a b c", OddCoreArgs(3)),
            (
                "clone m d s 8 0 2 hydration_threshold",
                CoreCount {
                    count: 2,
                    available: 1,
                },
            ),
            ("clone m d s 8 0 2 speed 3", UnknownCoreArg("speed".into())),
            (
                "clone m d s 8 0 2 hydration_threshold 0",
                CoreValue {
                    key: "hydration_threshold",
                    value: "0".into(),
                    max: u32::MAX,
                },
            ),
            (
                "clone m d s 8 0 0 extra",
                Extra {
                    target: "clone",
                    rest: "extra".into(),
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(Table::parse(line).as_ref().err(), Some(want), "{line}");
        }
    }
}
