use super::*;

#[test]
fn load_and_query() {
    let m = RegionMap::from_words(70, vec![0b101, 1 << 5 | 1 << 63]).unwrap();
    assert!(m.is_hydrated(0));
    assert!(!m.is_hydrated(1));
    assert!(m.is_hydrated(2));
    assert!(m.is_hydrated(69));
    assert!(!m.is_hydrated(70));
    // bit 63 of word 1 is region 127 > 70: masked away
    assert_eq!(m.hydrated_count(), 3);
    assert!(matches!(
        RegionMap::from_words(70, vec![0]),
        Err(RegionMapError::WrongWordCount { expected: 2, .. })
    ));
}

#[test]
fn mark_and_dirty() {
    let m = RegionMap::new_empty(200).unwrap();
    assert!(m.mark_hydrated(3));
    assert!(!m.mark_hydrated(3));
    assert!(m.is_dirty());
    assert_eq!(m.take_dirty(), vec![(0, 1 << 3)]);
    assert!(!m.is_dirty());
    assert!(m.take_dirty().is_empty());
    assert_eq!(m.mark_range(60..130), 70);
    let d = m.take_dirty();
    assert_eq!(d, vec![(0, (0xf << 60) | 1 << 3), (1, u64::MAX), (2, 0b11)]);
    m.restore_dirty(&d);
    assert_eq!(m.take_dirty(), d);
    assert_eq!(m.hydrated_count(), 71);
    assert_eq!(m.next_unhydrated(0), Some(0));
    assert_eq!(m.next_unhydrated(60), Some(130));
    assert_eq!(m.next_unhydrated(199), Some(199));
    assert_eq!(m.next_unhydrated(200), None);
}

#[test]
fn release_after_complete() {
    let m = RegionMap::new_empty(100).unwrap();
    assert_eq!(m.mark_range(0..100), 100);
    assert!(m.all_hydrated());
    assert!(!m.release_if_complete(), "dirty words not committed yet");
    let d = m.take_dirty();
    assert_eq!(d.len(), 2);
    assert!(m.release_if_complete());
    assert!(m.is_released());
    assert!(m.is_hydrated(99));
    assert!(!m.is_hydrated(100));
    assert!(!m.mark_hydrated(5));
    assert_eq!(m.next_unhydrated(0), None);
    assert!(m.memory_bytes() < 200);
    // a failed commit after release still gets its words back
    m.restore_dirty(&d);
    assert!(m.is_dirty());
    assert_eq!(m.take_dirty(), vec![(0, u64::MAX), (1, (1 << 36) - 1)]);
    assert!(!m.is_dirty());
}
