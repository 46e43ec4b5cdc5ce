//! Crash test: SIGKILL the daemon at random moments during mixed guest I/O, background
//! hydration and flushes; restart; every flushed write must be there, every other sector
//! must hold a content it had at some point (its old or one of its new ones), and the
//! metadata must check clean.

mod common;

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkio::ReqFlags;
use common::client::Client;
use common::daemon::{random_file, scratch, zero_file, Daemon};
use common::rng::Rng;
use common::util::metadata_check;

const SECTOR: usize = 512;
const SIZE: usize = 16 << 20;
const NSECT: usize = SIZE / SECTOR;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Val {
    Source,
    Write(u64),
    Zero,
    Any,
}

fn sector_bytes(v: Val, s: usize, src: &[u8]) -> Option<Vec<u8>> {
    match v {
        Val::Source => Some(src[s * SECTOR..(s + 1) * SECTOR].to_vec()),
        Val::Zero => Some(vec![0; SECTOR]),
        Val::Any => None,
        Val::Write(id) => {
            let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (s as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
                | 1;
            Some(
                (0..SECTOR / 8)
                    .flat_map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x.to_le_bytes()
                    })
                    .collect(),
            )
        }
    }
}

struct Model {
    durable: Vec<Val>,
    pending: Vec<Vec<Val>>,
}

impl Model {
    fn apply(&mut self, s0: usize, n: usize, v: Val) {
        for s in s0..s0 + n {
            self.pending[s].push(v);
        }
    }
    fn flushed(&mut self) {
        for (d, p) in self.durable.iter_mut().zip(self.pending.iter_mut()) {
            if let Some(last) = p.last() {
                *d = *last;
            }
            p.clear();
        }
    }
    /// Check the device against the candidates; afterwards what was read is the state.
    fn verify(&mut self, data: &[u8], src: &[u8], round: usize) {
        for s in 0..NSECT {
            let got = &data[s * SECTOR..(s + 1) * SECTOR];
            let candidates =
                std::iter::once(self.durable[s]).chain(self.pending[s].iter().copied());
            let mut matched = None;
            let mut any = false;
            for v in candidates {
                match sector_bytes(v, s, src) {
                    None => any = true,
                    Some(b) if b == got => matched = Some(v),
                    Some(_) => {}
                }
            }
            match matched {
                Some(v) => self.durable[s] = v,
                None if any => self.durable[s] = Val::Any,
                None => panic!(
                    "round {round}: sector {s} holds content it never had (durable {:?}, pending {:?})",
                    self.durable[s], self.pending[s]
                ),
            }
            self.pending[s].clear();
        }
    }
}

/// One request; false if the daemon is gone (timeout or error).
fn io(c: &mut Client, op: impl FnOnce(&mut blkio::Blkioq)) -> bool {
    let q = &mut c.queues[0];
    op(q);
    let mut done = [MaybeUninit::<blkio::Completion>::uninit()];
    let mut timeout = Duration::from_millis(300);
    match q.do_io(&mut done, 1, Some(&mut timeout), None) {
        // SAFETY: do_io initialised the first completion.
        Ok(1) => unsafe { done[0].assume_init_read() }.ret == 0,
        _ => false,
    }
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE);
    for off in (0..SIZE).step_by(1 << 20) {
        out.extend(c.read(0, off as u64, 1 << 20).expect("read after restart"));
    }
    out
}

#[test]
fn sigkill_at_random_moments() {
    let dir = scratch("clone-crash");
    let p = |n: &str| dir.path().join(n);
    let src = random_file(&p("src"), SIZE, 1234);
    zero_file(&p("dest"), SIZE as u64);
    zero_file(&p("meta"), 4 << 20);
    let table = format!(
        "clone {} {} {} 8 0 4 hydration_threshold 2 hydration_batch_size 2",
        p("meta").display(),
        p("dest").display(),
        p("src").display()
    );
    let mut model = Model {
        durable: vec![Val::Source; NSECT],
        pending: vec![Vec::new(); NSECT],
    };
    let mut rng = Rng(0xC0FFEE);
    let mut next_id = 1u64;
    let rounds = 50;
    for round in 0..rounds {
        let d = Daemon::start(dir.path(), &table, &[]);
        let mut c = Client::connect(&d.socket, 1);
        let data = read_all(&mut c);
        model.verify(&data, &src, round);
        // Mixed I/O until the kill lands.
        let killed = Arc::new(AtomicBool::new(false));
        let pid = d.child.id();
        let delay = Duration::from_millis(20 + rng.below(150) as u64);
        let k = killed.clone();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            k.store(true, Ordering::SeqCst);
            // SAFETY: kill(2) on the daemon child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let base = c.region.addr;
        while !killed.load(Ordering::SeqCst) {
            let kind = rng.below(100);
            let s0 = rng.below(NSECT - 64);
            let n = if rng.below(3) == 0 {
                8 * (1 + rng.below(4))
            } else {
                1 + rng.below(16)
            };
            let ok = match kind {
                0..=59 => {
                    let id = next_id;
                    next_id += 1;
                    let buf: Vec<u8> = (s0..s0 + n)
                        .flat_map(|s| sector_bytes(Val::Write(id), s, &src).unwrap_or_default())
                        .collect();
                    // SAFETY: the mapped region is larger than one request's data.
                    unsafe {
                        std::ptr::copy_nonoverlapping(buf.as_ptr(), base as *mut u8, buf.len())
                    };
                    // Recorded before the request: if the kill interrupts it, it may or may not land.
                    model.apply(s0, n, Val::Write(id));
                    io(&mut c, |q| {
                        q.write(
                            (s0 * SECTOR) as u64,
                            base as *const u8,
                            n * SECTOR,
                            0,
                            ReqFlags::empty(),
                        )
                    })
                }
                60..=69 => {
                    model.apply(s0, n, Val::Zero);
                    io(&mut c, |q| {
                        q.write_zeroes(
                            (s0 * SECTOR) as u64,
                            (n * SECTOR) as u64,
                            0,
                            ReqFlags::empty(),
                        )
                    })
                }
                70..=74 => {
                    // Whole regions inside become unspecified.
                    let first = s0.div_ceil(8) * 8;
                    let end = ((s0 + n) / 8) * 8;
                    if end > first {
                        model.apply(first, end - first, Val::Any);
                    }
                    io(&mut c, |q| {
                        q.discard(
                            (s0 * SECTOR) as u64,
                            (n * SECTOR) as u64,
                            0,
                            ReqFlags::empty(),
                        )
                    })
                }
                75..=89 => {
                    let ok = io(&mut c, |q| q.flush(0, ReqFlags::empty()));
                    if ok {
                        model.flushed();
                    }
                    ok
                }
                _ => io(&mut c, |q| {
                    q.read(
                        (s0 * SECTOR) as u64,
                        (base + (1 << 20)) as *mut u8,
                        n * SECTOR,
                        0,
                        ReqFlags::empty(),
                    )
                }),
            };
            if !ok {
                break;
            }
        }
        killer.join().unwrap();
        drop(c);
        d.kill();
        metadata_check(&p("meta"));
    }
    // Last verification, then let hydration finish and check the destination.
    let d = Daemon::start(dir.path(), &table, &[]);
    let mut c = Client::connect(&d.socket, 1);
    let data = read_all(&mut c);
    model.verify(&data, &src, rounds);
    drop(c);
    assert!(d.stop().success());
    assert_eq!(std::fs::read(p("src")).unwrap(), src, "source changed");
}
