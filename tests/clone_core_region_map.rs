//! RegionMap under concurrency: dirty-set union equals the final map, exact count, release after complete.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use rand::{Rng, SeedableRng};
use vhost_clone::target::clone::RegionMap;

#[test]
fn concurrent_marks_and_dirty_takes() {
    const N: u64 = 20_000;
    let map = Arc::new(RegionMap::new_empty(N).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let taker = {
        let (map, stop) = (map.clone(), stop.clone());
        thread::spawn(move || {
            let mut committed: BTreeMap<u64, u64> = BTreeMap::new();
            let mut takes = 0u32;
            loop {
                let done = stop.load(Ordering::SeqCst);
                let words = map.take_dirty();
                takes += 1;
                // simulate an occasional failed commit
                if takes.is_multiple_of(7) && !words.is_empty() {
                    map.restore_dirty(&words);
                    continue;
                }
                for (i, v) in words {
                    let e = committed.entry(i).or_insert(0);
                    assert_eq!(*e & !v, 0, "word values only grow");
                    *e = v;
                }
                if done && !map.is_dirty() {
                    return committed;
                }
            }
        })
    };
    let newly: u64 = (0..4u64)
        .map(|t| {
            let map = map.clone();
            thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut newly = 0u64;
                for i in 0..6000u32 {
                    if i.is_multiple_of(100) {
                        let s = rng.gen_range(0..N - 70);
                        newly += map.mark_range(s..s + rng.gen_range(1..70));
                    } else if map.mark_hydrated(rng.gen_range(0..N)) {
                        newly += 1;
                    }
                }
                newly
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    stop.store(true, Ordering::SeqCst);
    let committed = taker.join().unwrap();
    let snap = map.snapshot();
    let count: u64 = snap.iter().map(|w| u64::from(w.count_ones())).sum();
    assert_eq!(map.hydrated_count(), count);
    assert_eq!(newly, count, "each region newly set exactly once");
    for (i, w) in snap.iter().enumerate() {
        let i = u64::try_from(i).unwrap();
        assert_eq!(committed.get(&i).copied().unwrap_or(0), *w, "word {i}");
    }
}

#[test]
fn release_while_readers_run() {
    const N: u64 = 10_000;
    let map = Arc::new(RegionMap::new_empty(N).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (map, stop) = (map.clone(), stop.clone());
            thread::spawn(move || {
                let mut seen_release = false;
                while !stop.load(Ordering::SeqCst) {
                    for r in (0..N).step_by(97) {
                        let _ = map.is_hydrated(r);
                        if map.is_released() {
                            seen_release = true;
                            assert!(map.is_hydrated(r), "released map answers hydrated");
                        }
                    }
                }
                seen_release
            })
        })
        .collect();
    let before = map.memory_bytes();
    for r in 0..N {
        map.mark_hydrated(r);
        if r.is_multiple_of(1000) {
            assert!(!map.release_if_complete());
            map.take_dirty();
        }
    }
    assert!(map.all_hydrated());
    assert!(!map.release_if_complete(), "last words not committed");
    assert!(!map.take_dirty().is_empty());
    assert!(map.release_if_complete());
    assert!(
        map.memory_bytes() + 1000 < before,
        "{} vs {before}",
        map.memory_bytes()
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, Ordering::SeqCst);
    for h in readers {
        h.join().unwrap();
    }
    assert!(map.is_hydrated(N - 1));
    assert!(!map.is_dirty());
}
