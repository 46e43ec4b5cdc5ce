//! Status lines of the `clone` core reproduce the kernel's, taken from the fixtures in
//! `tests/fixtures/kernel-dm-clone/*.txt` (embedded here and cross-checked against the files).

use vhost_clone::target::clone::{
    CloneStatus, MetadataMode, RegionLocks, RegionMap, Scheduler, SchedulerConfig,
};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/kernel-dm-clone"
);

struct Dev {
    len: u64,
    region: u64,
    md_used: u64,
    md_total: u64,
    no_discard_passdown: bool,
    map: RegionMap,
    locks: RegionLocks<u32>,
    sched: Scheduler,
}

impl Dev {
    /// A table `0 <len> clone meta dest src <region> 1 no_hydration` (threshold 1, batch 1).
    fn new(len: u64, region: u64, md_used: u64, md_total: u64) -> Self {
        let nr = len.div_ceil(region);
        Dev {
            len,
            region,
            md_used,
            md_total,
            no_discard_passdown: false,
            map: RegionMap::new_empty(nr).unwrap(),
            locks: RegionLocks::new(),
            sched: Scheduler::new(
                nr,
                SchedulerConfig {
                    background: false,
                    ..SchedulerConfig::default()
                },
            )
            .unwrap(),
        }
    }

    fn status(&self) -> String {
        CloneStatus {
            used_md_blocks: self.md_used,
            total_md_blocks: self.md_total,
            region_sectors: self.region,
            hydrated: self.map.hydrated_count(),
            nr_regions: self.map.nr_regions(),
            hydrating: self.locks.hydrating(),
            no_hydration: !self.sched.is_enabled(),
            no_discard_passdown: self.no_discard_passdown,
            hydration_threshold: self.sched.threshold(),
            hydration_batch_size: self.sched.batch_size(),
            mode: MetadataMode::Rw,
        }
        .dmsetup_line(0, self.len)
    }
}

fn fixture_lines(name: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{name}.txt")).ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("FIX_STATUS"))
            .filter_map(|l| l.split_once(" :: ").map(|(_, s)| s.to_owned()))
            .collect(),
    )
}

fn check(fixture: &str, got: &str, expected: &str) {
    assert_eq!(got, expected);
    let lines = fixture_lines(fixture).expect("the fixture's provenance text is in tests/fixtures");
    assert!(
        lines.iter().any(|l| l == expected),
        "{expected:?} not in fixture {fixture}"
    );
}

#[test]
fn status_fresh_1g_4k() {
    let d = Dev::new(2_097_152, 8, 14, 1024);
    check(
        "fresh-1g-4k",
        &d.status(),
        "0 2097152 clone 8 14/1024 8 0/262144 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw",
    );
}

#[test]
fn status_hydrated_then_written_sequence() {
    let d = Dev::new(262_144, 16, 6, 2048);
    let f = "hydrated-then-written";
    check(f, &d.status(), "0 262144 clone 8 6/2048 16 0/16384 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw");
    d.sched.set_threshold(64).unwrap();
    d.sched.set_batch_size(16).unwrap();
    check(f, &d.status(), "0 262144 clone 8 6/2048 16 0/16384 0 1 no_hydration 4 hydration_threshold 64 hydration_batch_size 16 rw");
    d.sched.enable();
    d.map.mark_range(0..2560);
    let mut batches = Vec::new();
    while let Some(b) = d.sched.next_batch(&d.map, &d.locks) {
        assert!(b.len() <= 16);
        batches.push(b);
    }
    assert_eq!(batches.len(), 4, "threshold 64 / batch 16");
    assert_eq!(batches[0].regions, 2560..2576);
    check(f, &d.status(), "0 262144 clone 8 6/2048 16 2560/16384 64 0 4 hydration_threshold 64 hydration_batch_size 16 rw");
    // land the copies, hydrate the rest
    for b in batches {
        d.map.mark_range(b.regions.clone());
        for r in b.regions.clone() {
            d.locks.finish_copy(r);
        }
        d.sched.copy_done(b.len());
    }
    d.map.mark_range(0..12608);
    let mut n = 0;
    while let Some(b) = d.sched.next_batch(&d.map, &d.locks) {
        assert_eq!(b.regions.start, 12608 + 16 * n);
        n += 1;
    }
    assert_eq!(n, 4);
    let hydrating_line = d.status();
    assert!(
        hydrating_line.contains(" 12608/16384 64 0 4 "),
        "{hydrating_line}"
    );
    check(f, &hydrating_line, "0 262144 clone 8 6/2048 16 12608/16384 64 0 4 hydration_threshold 64 hydration_batch_size 16 rw");
}

#[test]
fn status_complete_and_reload() {
    let f = "hydrated-then-written";
    let d = Dev::new(262_144, 16, 6, 2048);
    d.sched.set_threshold(64).unwrap();
    d.sched.set_batch_size(16).unwrap();
    d.sched.enable();
    d.map.mark_range(0..16384);
    d.map.take_dirty();
    assert!(d.map.release_if_complete());
    check(f, &d.status(), "0 262144 clone 8 6/2048 16 16384/16384 0 0 4 hydration_threshold 64 hydration_batch_size 16 rw");
    // reload from the (fully set) metadata with the original table: settings are not persistent
    let words = d.map.snapshot();
    let mut r = Dev::new(262_144, 16, 6, 2048);
    r.map = RegionMap::from_words(16384, words).unwrap();
    check(f, &r.status(), "0 262144 clone 8 6/2048 16 16384/16384 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw");
}

#[test]
fn status_multilevel_64g() {
    let f = "multilevel-64g-4k";
    let d = Dev::new(134_217_728, 8, 525, 16384);
    check(f, &d.status(), "0 134217728 clone 8 525/16384 8 0/16777216 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw");
    // 30 regions written, then an aligned 1024-region discard
    for r in (0..30u64).map(|i| i * 500_009) {
        d.map.mark_hydrated(r);
    }
    check(f, &d.status(), "0 134217728 clone 8 525/16384 8 30/16777216 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw");
    assert_eq!(d.map.mark_range(16_000_000..16_001_024), 1024);
    check(f, &d.status(), "0 134217728 clone 8 525/16384 8 1054/16777216 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw");
}

#[test]
fn status_features_and_fail() {
    let mut d = Dev::new(2_097_152, 8, 14, 1024);
    d.no_discard_passdown = true;
    assert!(d.status().ends_with(
        " 2 no_hydration no_discard_passdown 4 hydration_threshold 1 hydration_batch_size 1 rw"
    ));
    d.sched.enable();
    assert!(d
        .status()
        .ends_with(" 1 no_discard_passdown 4 hydration_threshold 1 hydration_batch_size 1 rw"));
    let s = CloneStatus {
        used_md_blocks: 1,
        total_md_blocks: 1,
        region_sectors: 8,
        hydrated: 0,
        nr_regions: 1,
        hydrating: 0,
        no_hydration: false,
        no_discard_passdown: false,
        hydration_threshold: 1,
        hydration_batch_size: 1,
        mode: MetadataMode::Fail,
    };
    assert_eq!(s.dmsetup_line(0, 8), "0 8 clone Fail");
}
