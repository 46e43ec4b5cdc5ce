//! Region-lock stress: writers (partial and full-region) race urgent copies. Invariants checked:
//! a write never overlaps a copy of the same region, every parked writer is resumed exactly once,
//! failed copies fail their parked writers (EIO) instead of losing them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use vhost_clone::target::clone::{Admit, RegionLocks, RegionMap, Scheduler, SchedulerConfig};

const REGIONS: u64 = 600;
const WRITERS: usize = 3;
const WRITES: u32 = 1500;

/// Waiter = (writer id, sequence number of the parked admission).
type Waiter = (usize, u64);

#[derive(Debug)]
struct Resume {
    seq: u64,
    ok: bool,
}

struct World {
    map: RegionMap,
    locks: RegionLocks<Waiter>,
    sched: Scheduler,
    copying: Vec<AtomicBool>,
    writing: Vec<AtomicU64>,
    resume: Vec<Sender<Resume>>,
    resumed: AtomicU64,
}

impl World {
    fn wake(&self, waiters: Vec<Waiter>, ok: bool) {
        for (id, seq) in waiters {
            self.resumed.fetch_add(1, SeqCst);
            self.resume[id].send(Resume { seq, ok }).unwrap();
        }
    }

    fn do_write(&self, r: u64) {
        let i = usize::try_from(r).unwrap();
        self.writing[i].fetch_add(1, SeqCst);
        assert!(
            !self.copying[i].load(SeqCst),
            "write overlaps copy of region {r}"
        );
        thread::yield_now();
        assert!(
            !self.copying[i].load(SeqCst),
            "write overlaps copy of region {r}"
        );
        self.writing[i].fetch_sub(1, SeqCst);
    }
}

fn writer(w: Arc<World>, id: usize, rx: Receiver<Resume>) -> (u64, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64);
    let (mut parked, mut failed) = (0u64, 0u64);
    let mut seq = 0u64;
    for _ in 0..WRITES {
        let r = rng.gen_range(0..REGIONS);
        let full = rng.gen_bool(0.2);
        loop {
            seq += 1;
            if w.map.is_hydrated(r) {
                w.do_write(r);
                break;
            }
            let admit = if full {
                w.locks.admit_overwrite(r, (id, seq))
            } else {
                w.locks.admit_write(r, (id, seq), &w.map)
            };
            match admit {
                Admit::Proceed(_) if full => {
                    w.do_write(r);
                    w.map.mark_hydrated(r);
                    let waiters = w.locks.finish_overwrite(r);
                    w.wake(waiters, true);
                    break;
                }
                Admit::Proceed(_) => {
                    w.do_write(r);
                    break;
                }
                Admit::Queued | Admit::QueuedNeedsCopy => {
                    if matches!(admit, Admit::QueuedNeedsCopy) {
                        w.sched.push_urgent(r);
                    }
                    parked += 1;
                    let m = match rx.recv_timeout(Duration::from_secs(20)) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => {
                            panic!("lost wake-up: writer {id} region {r}")
                        }
                        Err(e) => panic!("{e}"),
                    };
                    assert_eq!(m.seq, seq, "resumed for the wrong admission");
                    if !m.ok {
                        failed += 1; // EIO to the guest
                        break;
                    }
                    // re-run admission
                }
            }
        }
    }
    // no stray resumes
    assert!(rx.try_recv().is_err());
    (parked, failed)
}

#[test]
fn writes_never_race_copies_and_wake_exactly_once() {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..WRITERS).map(|_| channel()).unzip();
    let world = Arc::new(World {
        map: RegionMap::new_empty(REGIONS).unwrap(),
        locks: RegionLocks::new(),
        sched: Scheduler::new(
            REGIONS,
            SchedulerConfig {
                hydration_batch_size: 4,
                background: false,
                ..SchedulerConfig::default()
            },
        )
        .unwrap(),
        copying: (0..REGIONS).map(|_| AtomicBool::new(false)).collect(),
        writing: (0..REGIONS).map(|_| AtomicU64::new(0)).collect(),
        resume: txs,
        resumed: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let hydrator = {
        let (w, stop) = (world.clone(), stop.clone());
        thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            let mut copies = 0u64;
            while !stop.load(SeqCst) {
                let Some(b) = w.sched.next_batch(&w.map, &w.locks) else {
                    thread::yield_now();
                    continue;
                };
                let ok = rng.gen_bool(0.9);
                for r in b.regions.clone() {
                    let i = usize::try_from(r).unwrap();
                    w.copying[i].store(true, SeqCst);
                    assert_eq!(
                        w.writing[i].load(SeqCst),
                        0,
                        "copy overlaps write of region {r}"
                    );
                }
                thread::yield_now();
                for r in b.regions.clone() {
                    let i = usize::try_from(r).unwrap();
                    assert_eq!(
                        w.writing[i].load(SeqCst),
                        0,
                        "copy overlaps write of region {r}"
                    );
                    w.copying[i].store(false, SeqCst);
                }
                if ok {
                    w.map.mark_range(b.regions.clone());
                }
                for r in b.regions.clone() {
                    let waiters = w.locks.finish_copy(r);
                    w.wake(waiters, ok);
                }
                w.sched.copy_done(b.len());
                copies += 1;
            }
            copies
        })
    };
    let writers: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(id, rx)| {
            let w = world.clone();
            thread::spawn(move || writer(w, id, rx))
        })
        .collect();
    let mut parked = 0;
    for h in writers {
        let (p, _failed) = h.join().unwrap();
        parked += p;
    }
    stop.store(true, SeqCst);
    let copies = hydrator.join().unwrap();
    assert!(copies > 0);
    assert!(parked > 0);
    assert_eq!(
        world.resumed.load(SeqCst),
        parked,
        "every parked writer resumed exactly once"
    );
    assert_eq!(world.locks.hydrating(), 0);
    assert_eq!(world.sched.in_flight(), 0);
}
