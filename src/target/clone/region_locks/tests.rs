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
