use super::*;

fn cfg(threshold: u64, batch: u64, background: bool) -> SchedulerConfig {
    SchedulerConfig {
        hydration_threshold: threshold,
        hydration_batch_size: batch,
        background,
        ..SchedulerConfig::default()
    }
}

#[test]
fn order_urgent_hinted_sweep() {
    let map = RegionMap::new_empty(100).unwrap();
    let locks: RegionLocks<u32> = RegionLocks::new();
    let s = Scheduler::new(100, cfg(100, 4, true)).unwrap();
    assert!(s.hint(50, &map));
    assert!(!s.hint(50, &map), "deduplicated");
    assert!(s.push_urgent(80));
    let b = s.next_batch(&map, &locks).unwrap();
    assert_eq!(
        b,
        Batch {
            regions: 80..84,
            kind: BatchKind::Urgent
        }
    );
    let b = s.next_batch(&map, &locks).unwrap();
    assert_eq!(
        b,
        Batch {
            regions: 50..54,
            kind: BatchKind::Hinted
        }
    );
    let b = s.next_batch(&map, &locks).unwrap();
    assert_eq!(
        b,
        Batch {
            regions: 0..4,
            kind: BatchKind::Background
        }
    );
    assert_eq!(s.in_flight(), 12);
}

#[test]
fn threshold_backoff_and_disable() {
    let map = RegionMap::new_empty(100).unwrap();
    let locks: RegionLocks<u32> = RegionLocks::new();
    let s = Scheduler::new(100, cfg(3, 2, false)).unwrap();
    assert!(s.next_batch(&map, &locks).is_none(), "disabled: no sweep");
    s.hint(10, &map);
    assert_eq!(s.next_batch(&map, &locks).unwrap().regions, 10..12);
    s.enable();
    assert_eq!(
        s.next_batch(&map, &locks).unwrap().regions,
        0..1,
        "room 1 left"
    );
    assert!(s.next_batch(&map, &locks).is_none(), "threshold reached");
    s.push_urgent(40);
    assert_eq!(s.next_batch(&map, &locks).unwrap().kind, BatchKind::Urgent);
    s.copy_done(4);
    s.guest_io_started();
    assert!(
        s.next_batch(&map, &locks).is_none(),
        "back-off while guest I/O in flight"
    );
    s.guest_io_finished();
    assert_eq!(s.next_batch(&map, &locks).unwrap().regions, 1..3);
}

#[test]
fn sweep_shrinks_while_the_guest_is_busy() {
    let map = RegionMap::new_empty(1000).unwrap();
    let locks: RegionLocks<u32> = RegionLocks::new();
    let config = SchedulerConfig {
        busy_threshold: 8,
        busy_batch_size: 2,
        ..cfg(100, 50, true)
    };
    let s = Scheduler::new(1000, config).unwrap();
    let t0 = Instant::now();
    let full = s.next_batch_at(&map, &locks, t0).unwrap();
    assert_eq!(full.regions, 0..50, "no guest I/O yet: full batch");
    s.copy_done(50);
    s.guest_io_started();
    s.guest_io_finished();
    let now = Instant::now();
    for start in [50u64, 52, 54, 56] {
        let b = s.next_batch_at(&map, &locks, now).unwrap();
        assert_eq!(b.regions, start..start + 2, "busy guest: small batches");
    }
    assert!(
        s.next_batch_at(&map, &locks, now).is_none(),
        "busy guest: at most 8 regions in flight"
    );
    s.push_urgent(900);
    let urgent = s.next_batch_at(&map, &locks, now).unwrap();
    assert_eq!(
        (urgent.regions, urgent.kind),
        (900..950, BatchKind::Urgent),
        "a copy a guest request waits for ignores the caps"
    );
    s.copy_done(58);
    let later = now + GUEST_BUSY_WINDOW + Duration::from_millis(1);
    let b = s.next_batch_at(&map, &locks, later).unwrap();
    assert_eq!(b.regions, 58..108, "guest quiet again: full batch");
}
