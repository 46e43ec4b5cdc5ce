use super::*;

#[test]
fn copy_then_waiters_resumed() {
    let map = RegionMap::new_empty(10).unwrap();
    let locks: RegionLocks<u32> = RegionLocks::new();
    assert_eq!(locks.admit_write(3, 1, &map), Admit::QueuedNeedsCopy);
    assert_eq!(locks.admit_write(3, 2, &map), Admit::Queued);
    assert_eq!(locks.state(3), RegionState::Pending { waiters: 2 });
    assert!(locks.try_start_copy(3, &map));
    assert!(!locks.try_start_copy(3, &map));
    assert_eq!(locks.hydrating(), 1);
    assert_eq!(locks.add_waiter(3, 9), Ok(()));
    assert_eq!(locks.add_waiter(4, 7), Err(7));
    map.mark_hydrated(3);
    assert_eq!(locks.finish_copy(3), vec![1, 2, 9]);
    assert_eq!(locks.hydrating(), 0);
    assert_eq!(locks.admit_write(3, 5, &map), Admit::Proceed(5));
    assert!(
        !locks.try_start_copy(3, &map),
        "hydrated regions are never copied"
    );
}

#[test]
fn overwrite_blocks_copy_and_waits_for_copy() {
    let map = RegionMap::new_empty(10).unwrap();
    let locks: RegionLocks<u32> = RegionLocks::new();
    assert_eq!(locks.admit_overwrite(1, 1), Admit::Proceed(1));
    assert!(locks.start_overwrite(1));
    assert!(!locks.try_start_copy(1, &map));
    assert_eq!(locks.admit_write(1, 8, &map), Admit::Queued);
    assert!(locks.finish_overwrite(1).is_empty());
    map.mark_hydrated(1);
    assert_eq!(locks.finish_overwrite(1), vec![8]);
    assert_eq!(locks.state(1), RegionState::Idle);

    assert!(locks.try_start_copy(2, &map));
    assert!(!locks.start_overwrite(2));
    assert_eq!(locks.admit_overwrite(2, 4), Admit::Queued);
    assert_eq!(locks.finish_copy(2), vec![4]);
}

#[test]
fn overwrite_takes_over_pending() {
    let map = RegionMap::new_empty(10).unwrap();
    let locks: RegionLocks<u32> = RegionLocks::new();
    assert_eq!(locks.admit_write(5, 1, &map), Admit::QueuedNeedsCopy);
    assert_eq!(locks.admit_overwrite(5, 2), Admit::Proceed(2));
    assert!(!locks.try_start_copy(5, &map));
    map.mark_hydrated(5);
    assert_eq!(locks.finish_overwrite(5), vec![1]);
    assert_eq!(locks.admit_write(5, 1, &map), Admit::Proceed(1));
}

#[test]
fn mark_idle_marks_only_free_regions() {
    let map = RegionMap::new_empty(300).unwrap();
    let locks: RegionLocks<u32> = RegionLocks::new();
    assert!(locks.try_start_copy(5, &map), "a copy in flight");
    assert_eq!(locks.admit_write(70, 1, &map), Admit::QueuedNeedsCopy);
    assert!(locks.start_overwrite(99));
    assert!(
        locks.try_start_copy(250, &map),
        "held, but outside the range"
    );
    let held = locks.mark_idle(0..100, &map);
    assert_eq!(held, vec![5, 70, 99]);
    for r in 0..100 {
        assert_eq!(map.is_hydrated(r), !held.contains(&r), "region {r}");
    }
    assert!(!map.is_hydrated(100) && !map.is_hydrated(250));
    assert_eq!(map.hydrated_count(), 97);
    assert_eq!(locks.state(70), RegionState::Pending { waiters: 1 });
    assert!(locks.mark_idle(100..100, &map).is_empty());
}
