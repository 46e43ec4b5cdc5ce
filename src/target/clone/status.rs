//! dm-clone's status line (dm-clone-metadata.md §10.3), exactly as the kernel prints it, and a JSON status.

use std::fmt;

use super::events::MetadataMode;

/// dm-clone's metadata block size in sectors (constant).
pub const MD_BLOCK_SECTORS: u64 = 8;

/// The fields of dm-clone's status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneStatus {
    pub used_md_blocks: u64,
    pub total_md_blocks: u64,
    pub region_sectors: u64,
    pub hydrated: u64,
    pub nr_regions: u64,
    pub hydrating: u64,
    /// Background hydration currently disabled (`no_hydration` feature shown).
    pub no_hydration: bool,
    pub no_discard_passdown: bool,
    pub hydration_threshold: u64,
    pub hydration_batch_size: u64,
    pub mode: MetadataMode,
}

impl fmt::Display for CloneStatus {
    /// `<md block size> <used>/<total> <region size> <hydrated>/<nr_regions> <hydrating> <#features>
    /// <features…> 4 hydration_threshold <n> hydration_batch_size <n> <rw|ro>`, or `Fail`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mode == MetadataMode::Fail {
            return f.write_str("Fail");
        }
        write!(
            f,
            "{} {}/{} {} {}/{} {} ",
            MD_BLOCK_SECTORS,
            self.used_md_blocks,
            self.total_md_blocks,
            self.region_sectors,
            self.hydrated,
            self.nr_regions,
            self.hydrating
        )?;
        let features: Vec<&str> = [
            (self.no_hydration, "no_hydration"),
            (self.no_discard_passdown, "no_discard_passdown"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        write!(f, "{}", features.len())?;
        for feat in features {
            write!(f, " {feat}")?;
        }
        write!(
            f,
            " 4 hydration_threshold {} hydration_batch_size {} {}",
            self.hydration_threshold,
            self.hydration_batch_size,
            self.mode.as_status_str()
        )
    }
}

impl CloneStatus {
    /// The full `dmsetup status` line: `<start> <len> clone <status>`.
    pub fn dmsetup_line(&self, start: u64, len: u64) -> String {
        format!("{start} {len} clone {self}")
    }
}

/// Hydration state for the JSON status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HydrationState {
    Running,
    Disabled,
    Stopped,
    Complete,
}

/// `vhost-clone status --json`. Rates are measured by the caller.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatusJson {
    pub hydrated_regions: u64,
    pub nr_regions: u64,
    pub hydrating_regions: u64,
    pub progress_percent: f64,
    pub region_sectors: u64,
    pub hydration_threshold: u64,
    pub hydration_batch_size: u64,
    pub state: HydrationState,
    pub mode: MetadataMode,
    pub discard_passdown: bool,
    pub used_md_blocks: u64,
    pub total_md_blocks: u64,
    /// Regions per second, if measured.
    pub hydration_rate_regions_per_sec: Option<f64>,
    /// Bytes per second derived from the region rate.
    pub hydration_rate_bytes_per_sec: Option<f64>,
    /// Seconds until complete at the current rate.
    pub eta_seconds: Option<f64>,
    pub failures_total: u64,
    pub failures_consecutive: u64,
    pub last_error: Option<String>,
    pub in_core_bitmap_bytes: u64,
}

/// Percentage with two decimals of precision semantics left to the formatter; 100 for an empty target.
pub fn progress_percent(hydrated: u64, nr_regions: u64) -> f64 {
    if nr_regions == 0 {
        return 100.0;
    }
    // f64 is exact for region counts (<= 2^31).
    let h = u32::try_from(hydrated.min(nr_regions)).map_or(f64::MAX, f64::from);
    let n = u32::try_from(nr_regions).map_or(f64::MAX, f64::from);
    (h / n * 100.0).clamp(0.0, 100.0)
}

/// Seconds left at `rate` regions/s; `None` without a positive rate, `Some(0)` when done.
pub fn eta_seconds(hydrated: u64, nr_regions: u64, rate: Option<f64>) -> Option<f64> {
    let left = nr_regions.saturating_sub(hydrated);
    if left == 0 {
        return Some(0.0);
    }
    let rate = rate.filter(|r| r.is_finite() && *r > 0.0)?;
    let left = u32::try_from(left).map_or(f64::MAX, f64::from);
    Some(left / rate)
}

impl StatusJson {
    /// Build from the status-line fields plus caller-measured data.
    pub fn new(
        status: &CloneStatus,
        state: HydrationState,
        rate_regions_per_sec: Option<f64>,
        failures: &super::failures::FailureStats,
        in_core_bitmap_bytes: u64,
    ) -> Self {
        let region_bytes =
            u32::try_from(status.region_sectors.saturating_mul(512)).map_or(f64::MAX, f64::from);
        Self {
            hydrated_regions: status.hydrated,
            nr_regions: status.nr_regions,
            hydrating_regions: status.hydrating,
            progress_percent: progress_percent(status.hydrated, status.nr_regions),
            region_sectors: status.region_sectors,
            hydration_threshold: status.hydration_threshold,
            hydration_batch_size: status.hydration_batch_size,
            state,
            mode: status.mode,
            discard_passdown: !status.no_discard_passdown,
            used_md_blocks: status.used_md_blocks,
            total_md_blocks: status.total_md_blocks,
            hydration_rate_regions_per_sec: rate_regions_per_sec,
            hydration_rate_bytes_per_sec: rate_regions_per_sec.map(|r| r * region_bytes),
            eta_seconds: eta_seconds(status.hydrated, status.nr_regions, rate_regions_per_sec),
            failures_total: failures.total,
            failures_consecutive: failures.consecutive,
            last_error: failures.last_error.clone(),
            in_core_bitmap_bytes,
        }
    }

    /// Pretty JSON.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CloneStatus {
        CloneStatus {
            used_md_blocks: 14,
            total_md_blocks: 1024,
            region_sectors: 8,
            hydrated: 0,
            nr_regions: 262_144,
            hydrating: 0,
            no_hydration: true,
            no_discard_passdown: false,
            hydration_threshold: 1,
            hydration_batch_size: 1,
            mode: MetadataMode::Rw,
        }
    }

    #[test]
    fn formats_kernel_line() {
        assert_eq!(
            base().dmsetup_line(0, 2_097_152),
            "0 2097152 clone 8 14/1024 8 0/262144 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw"
        );
        let s = CloneStatus {
            no_hydration: true,
            no_discard_passdown: true,
            mode: MetadataMode::Ro,
            ..base()
        };
        assert_eq!(
            s.to_string(),
            "8 14/1024 8 0/262144 0 2 no_hydration no_discard_passdown 4 hydration_threshold 1 hydration_batch_size 1 ro"
        );
        let f = CloneStatus {
            mode: MetadataMode::Fail,
            ..base()
        };
        assert_eq!(f.dmsetup_line(0, 8), "0 8 clone Fail");
    }

    #[test]
    fn json_progress_and_eta() {
        assert_eq!(progress_percent(1, 4), 25.0);
        assert_eq!(progress_percent(0, 0), 100.0);
        assert_eq!(eta_seconds(10, 110, Some(50.0)), Some(2.0));
        assert_eq!(eta_seconds(10, 110, None), None);
        assert_eq!(eta_seconds(110, 110, None), Some(0.0));
        let s = CloneStatus {
            hydrated: 65_536,
            ..base()
        };
        let j = StatusJson::new(
            &s,
            HydrationState::Disabled,
            Some(1000.0),
            &crate::target::clone::failures::FailureTracker::default().stats(),
            4096,
        );
        assert_eq!(j.progress_percent, 25.0);
        assert_eq!(j.eta_seconds, Some(196.608));
        assert_eq!(j.hydration_rate_bytes_per_sec, Some(4_096_000.0));
        let v: serde_json::Value = serde_json::from_str(&j.to_json_pretty()).unwrap();
        assert_eq!(v["state"], "disabled");
        assert_eq!(v["mode"], "rw");
    }
}
