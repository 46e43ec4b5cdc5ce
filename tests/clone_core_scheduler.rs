//! Scheduler order, batching, threshold, busy regions, disabled mode and the failure cut-off.

use rand::{Rng, SeedableRng};
use vhost_clone::target::clone::{
    Batch, BatchKind, Event, RegionLocks, RegionMap, RegionState, Scheduler, SchedulerConfig,
};

fn sched(n: u64, threshold: u64, batch: u64, background: bool) -> Scheduler {
    Scheduler::new(
        n,
        SchedulerConfig {
            hydration_threshold: threshold,
            hydration_batch_size: batch,
            background,
            max_hints: 8,
            max_failures: 4,
            ..SchedulerConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn urgent_before_hinted_before_sweep() {
    let map = RegionMap::new_empty(64).unwrap();
    let locks: RegionLocks<()> = RegionLocks::new();
    let s = sched(64, 64, 1, true);
    s.hint(20, &map);
    s.hint(21, &map);
    s.push_urgent(40);
    s.push_urgent(41);
    let kinds: Vec<(u64, BatchKind)> = std::iter::from_fn(|| s.next_batch(&map, &locks))
        .take(6)
        .map(|b| (b.regions.start, b.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (40, BatchKind::Urgent),
            (41, BatchKind::Urgent),
            (20, BatchKind::Hinted),
            (21, BatchKind::Hinted),
            (0, BatchKind::Background),
            (1, BatchKind::Background),
        ]
    );
}

#[test]
fn batches_contiguous_bounded_and_skip_busy_and_hydrated() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let n = rng.gen_range(1..300u64);
        let map = RegionMap::new_empty(n).unwrap();
        let locks: RegionLocks<()> = RegionLocks::new();
        for r in 0..n {
            match rng.gen_range(0..6) {
                0 => {
                    map.mark_hydrated(r);
                }
                1 => assert!(locks.start_overwrite(r)),
                _ => {}
            }
        }
        let batch = rng.gen_range(1..9);
        let s = sched(n, u64::MAX, batch, true);
        let mut covered = std::collections::BTreeSet::new();
        while let Some(Batch { regions, kind }) = s.next_batch(&map, &locks) {
            assert_eq!(kind, BatchKind::Background);
            assert!(!regions.is_empty() && regions.end - regions.start <= batch);
            for r in regions {
                assert!(covered.insert(r), "region {r} scheduled twice");
                assert_eq!(locks.state(r), RegionState::Hydrating { waiters: 0 });
            }
        }
        // every unhydrated, non-overwriting region was scheduled exactly once
        for r in 0..n {
            let expect =
                !map.is_hydrated(r) && !matches!(locks.state(r), RegionState::Overwriting { .. });
            assert_eq!(covered.contains(&r), expect, "region {r}");
        }
    }
}

#[test]
fn threshold_respected_and_runtime_changes() {
    let map = RegionMap::new_empty(1000).unwrap();
    let locks: RegionLocks<()> = RegionLocks::new();
    let s = sched(1000, 10, 4, true);
    let mut lens = Vec::new();
    while let Some(b) = s.next_batch(&map, &locks) {
        lens.push(b.len());
    }
    assert_eq!(lens, vec![4, 4, 2]);
    assert_eq!(s.in_flight(), 10);
    assert_eq!(locks.hydrating(), 10);
    s.copy_done(4);
    s.set_threshold(20).unwrap();
    s.set_batch_size(16).unwrap();
    assert_eq!(s.next_batch(&map, &locks).unwrap().regions, 10..24);
    assert!(s.next_batch(&map, &locks).is_none());
    assert!(s.set_threshold(0).is_err());
    assert!(s.set_batch_size(0).is_err());
}

#[test]
fn sweep_wraps_and_ends_when_all_hydrated() {
    let map = RegionMap::new_empty(10).unwrap();
    let locks: RegionLocks<()> = RegionLocks::new();
    let s = sched(10, 100, 4, true);
    map.mark_range(0..3);
    assert_eq!(s.next_batch(&map, &locks).unwrap().regions, 3..7);
    // region 1 unhydrated again is impossible, but a later region being busy: sweep continues after it
    assert!(locks.start_overwrite(7));
    assert_eq!(s.next_batch(&map, &locks).unwrap().regions, 8..10);
    assert!(s.next_batch(&map, &locks).is_none());
    locks.finish_overwrite(7);
    assert_eq!(s.next_batch(&map, &locks).unwrap().regions, 7..8, "wrapped");
    map.mark_range(0..10);
    assert!(s.next_batch(&map, &locks).is_none());
}

#[test]
fn disabled_runs_only_urgent_and_hinted_and_hints_are_bounded() {
    let map = RegionMap::new_empty(100).unwrap();
    let locks: RegionLocks<()> = RegionLocks::new();
    let s = sched(100, 100, 1, false);
    for r in 0..20 {
        s.hint(r, &map);
    }
    assert_eq!(s.queued(), (0, 8), "bounded: oldest hints dropped");
    map.mark_hydrated(50);
    assert!(!s.hint(50, &map), "hydrated regions are not hinted");
    s.push_urgent(90);
    let got: Vec<_> = std::iter::from_fn(|| s.next_batch(&map, &locks)).collect();
    assert_eq!(got.len(), 9);
    assert_eq!(got[0].kind, BatchKind::Urgent);
    assert_eq!(got[1].regions, 12..13);
    assert!(got[1..].iter().all(|b| b.kind == BatchKind::Hinted));
    s.enable();
    assert_eq!(
        s.next_batch(&map, &locks).unwrap().kind,
        BatchKind::Background
    );
    s.disable();
    assert!(s.next_batch(&map, &locks).is_none());
}

#[test]
fn failure_cutoff_stops_background_but_not_urgent() {
    let map = RegionMap::new_empty(100).unwrap();
    let locks: RegionLocks<()> = RegionLocks::new();
    let s = sched(100, 100, 1, true);
    let mut events = Vec::new();
    for i in 0..4 {
        let b = s.next_batch(&map, &locks).unwrap();
        for r in b.regions.clone() {
            locks.finish_copy(r); // failed: not marked
        }
        s.copy_done(b.len());
        if i == 1 {
            s.copy_succeeded(); // progress resets the consecutive count
        }
        events.extend(s.copy_failed(&format!("EIO reading source at region {}", b.regions.start)));
    }
    assert!(events.is_empty(), "3 consecutive < 4");
    let b = s.next_batch(&map, &locks).unwrap();
    locks.finish_copy(b.regions.start);
    s.copy_done(1);
    let ev = s.copy_failed("EIO reading source at region 0").unwrap();
    assert_eq!(
        ev,
        Event::HydrationStopped {
            failures: 4,
            last_error: "EIO reading source at region 0".into()
        }
    );
    assert_eq!(
        s.failures().stop_reason().unwrap(),
        "hydration stopped after 4 failures: EIO reading source at region 0"
    );
    assert!(s.is_halted());
    s.hint(5, &map);
    assert!(
        s.next_batch(&map, &locks).is_none(),
        "background and hints stopped"
    );
    s.push_urgent(60);
    assert_eq!(s.next_batch(&map, &locks).unwrap().kind, BatchKind::Urgent);
    s.enable();
    assert!(!s.is_halted());
    assert_eq!(s.failures().stats().consecutive, 0);
    assert!(s.next_batch(&map, &locks).is_some());
}
