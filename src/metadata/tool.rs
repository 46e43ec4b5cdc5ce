//! The `metadata {format,check,dump}` tool functions used by the CLI.

use std::fmt::Write as _;
use std::path::Path;

use super::check::{check_device, CheckReport};
use super::clone_metadata::CloneMetadata;
use super::error::{step, MetadataError};
use super::load::load;
use crate::pdata::{FileDevice, MemDevice};

/// Formats `path` (block 0 must be zero) and returns a short report.
pub fn format_cmd(
    path: &Path,
    region_size: u64,
    target_size: u64,
) -> Result<String, MetadataError> {
    let md = CloneMetadata::format(path, region_size, target_size)?;
    Ok(format!(
        "formatted {}: region_size {} sectors, target_size {} sectors, {} regions, {}/{} metadata blocks used",
        path.display(),
        md.region_size(),
        md.target_size(),
        md.nr_regions(),
        md.used_blocks(),
        md.total_blocks()
    ))
}

/// Checks the metadata at `path` read-only.
pub fn check_cmd(path: &Path) -> Result<CheckReport, MetadataError> {
    let dev = FileDevice::open(path, false).map_err(step("open metadata device"))?;
    check_device(&dev)
}

/// Opens and checks an arbitrary byte image as an in-memory device (fuzzing entry point).
pub fn check_image(bytes: &[u8]) -> Result<CheckReport, MetadataError> {
    let dev = MemDevice::from_bytes(bytes.to_vec());
    let report = check_device(&dev)?;
    CloneMetadata::open_dev(Box::new(dev), None)?;
    Ok(report)
}

/// Hydrated regions as ranges "a-b,c,...", the style of the fixtures' `.expect` files.
pub fn ranges_string(words: &[u64], nr_regions: u64) -> String {
    let mut out = String::new();
    let mut run: Option<(u64, u64)> = None;
    let flush = |out: &mut String, (a, b): (u64, u64)| {
        if !out.is_empty() {
            out.push(',');
        }
        if a == b {
            let _ = write!(out, "{a}");
        } else {
            let _ = write!(out, "{a}-{b}");
        }
    };
    for (wi, w) in words.iter().enumerate() {
        let mut w = *w;
        while w != 0 {
            let r = wi as u64 * 64 + u64::from(w.trailing_zeros());
            w &= w - 1;
            if r >= nr_regions {
                break;
            }
            run = match run {
                Some((a, b)) if b + 1 == r => Some((a, r)),
                Some(prev) => {
                    flush(&mut out, prev);
                    Some((r, r))
                }
                None => Some((r, r)),
            };
        }
    }
    if let Some(prev) = run {
        flush(&mut out, prev);
    }
    out
}

#[derive(serde::Serialize)]
struct Dump<'a> {
    superblock: &'a super::superblock::Superblock,
    nr_blocks: u64,
    nr_allocated: u64,
    free: u64,
    index: &'a [crate::pdata::space_map::index::IndexEntry],
    bitset_btree_depth: usize,
    array_blocks: usize,
    nr_regions: u64,
    hydrated: u64,
    ranges: String,
}

/// Dumps the superblock, space-map figures and hydration state, as text or JSON.
pub fn dump_cmd(path: &Path, json: bool) -> Result<String, MetadataError> {
    let dev = FileDevice::open(path, false).map_err(step("open metadata device"))?;
    let l = load(&dev, None)?;
    let nr_words = usize::try_from(l.geo.nr_words).unwrap_or(usize::MAX);
    let words = l.words.get(..nr_words).unwrap_or(&[]);
    let d = Dump {
        superblock: &l.sb,
        nr_blocks: l.sm.nr_blocks(),
        nr_allocated: l.sm.root_nr_allocated(),
        free: l.sm.nr_blocks().saturating_sub(l.sm.root_nr_allocated()),
        index: l.sm.index_entries(),
        bitset_btree_depth: l.tree.depth(),
        array_blocks: l.array_blocks.len(),
        nr_regions: l.geo.nr_regions,
        hydrated: words.iter().map(|w| u64::from(w.count_ones())).sum(),
        ranges: ranges_string(words, l.geo.nr_regions),
    };
    if json {
        return serde_json::to_string_pretty(&d)
            .map_err(|e| MetadataError::Array(format!("json: {e}")));
    }
    let sb = d.superblock;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "superblock: magic {:#x} version {} flags {}",
        sb.magic, sb.version, sb.flags
    );
    let _ = writeln!(s, "region_size: {} sectors", sb.region_size);
    let _ = writeln!(s, "target_size: {} sectors", sb.target_size);
    let _ = writeln!(
        s,
        "bitset_root: {} (btree depth {}, {} array blocks)",
        sb.bitset_root, d.bitset_btree_depth, d.array_blocks
    );
    let _ = writeln!(
        s,
        "space map: nr_blocks {} nr_allocated {} free {} index {} overflow root {}",
        d.nr_blocks, d.nr_allocated, d.free, sb.sm_root.bitmap_root, sb.sm_root.ref_count_root
    );
    for (i, e) in d.index.iter().enumerate() {
        let _ = writeln!(
            s,
            "  bitmap {i}: block {} nr_free {} none_free_before {}",
            e.blocknr, e.nr_free, e.none_free_before
        );
    }
    let _ = writeln!(s, "nr_regions: {}", d.nr_regions);
    let _ = writeln!(s, "hydrated: {}", d.hydrated);
    let _ = write!(s, "ranges: {}", d.ranges);
    Ok(s)
}
