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
