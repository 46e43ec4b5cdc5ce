//! `vhost_bench`: a vhost-user-blk load generator built on the `blkio` crate (libblkio's
//! `virtio-blk-vhost-user` driver), so every server (vhost-clone, qemu-storage-daemon, ...)
//! is driven by exactly the same client.
//!
//! One `Blkio` connection with N queues; each queue is driven by its own thread that keeps
//! QD requests in flight (`do_io` with `min_completions = 1`). With `--poll` the queues are
//! libblkio poll queues: `do_io` busy-polls the used ring instead of sleeping on the
//! completion eventfd (a guest with virtio-blk poll queues, or an SPDK-like initiator).
//!
//! ```text
//! cargo bench --bench vhost_bench -- --socket SOCK --pattern randread --bs 4096 \
//!     --qd 32 --queues 4 --runtime 5 [--ramp 1] [--offset 0] [--size BYTES] [--json]
//! ```
//!
//! Output: one human line, or with `--json` one JSON object:
//! `{"iops":..,"mib_s":..,"lat_mean_us":..,"lat_p50_us":..,"lat_p99_us":..,"ios":..,"errors":..}`.

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    /// Each queue discards its own share front to back (no data buffers).
    SeqDiscard,
}

#[derive(Clone, Debug)]
struct Opts {
    socket: String,
    pattern: Pattern,
    bs: u64,
    qd: usize,
    queues: usize,
    runtime: f64,
    ramp: f64,
    offset: u64,
    size: u64, // 0 = up to the end of the disk
    queue_size: i32,
    json: bool,
    poll: bool,
}

const USAGE: &str =
    "usage: vhost_bench --socket SOCK [--pattern randread|randwrite|seqread|seqdiscard] \
[--bs BYTES] [--qd N] [--queues N] [--runtime SECS] [--ramp SECS] [--offset BYTES] \
[--size BYTES] [--queue-size N] [--poll] [--json]";

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|e| format!("bad size '{s}': {e}"))
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        socket: String::new(),
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
        queues: 1,
        runtime: 5.0,
        ramp: 0.5,
        offset: 0,
        size: 0,
        queue_size: 256,
        json: false,
        poll: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--bench" | "--nocapture" => {} // passed by `cargo bench`
            "--socket" => o.socket = val()?,
            "--pattern" => {
                o.pattern = match val()?.as_str() {
                    "randread" => Pattern::RandRead,
                    "randwrite" => Pattern::RandWrite,
                    "seqread" | "read" => Pattern::SeqRead,
                    "seqdiscard" => Pattern::SeqDiscard,
                    p => return Err(format!("unknown pattern '{p}'")),
                }
            }
            "--bs" => o.bs = parse_size(&val()?)?,
            "--qd" => o.qd = val()?.parse().map_err(|e| format!("--qd: {e}"))?,
            "--queues" => o.queues = val()?.parse().map_err(|e| format!("--queues: {e}"))?,
            "--runtime" => o.runtime = val()?.parse().map_err(|e| format!("--runtime: {e}"))?,
            "--ramp" => o.ramp = val()?.parse().map_err(|e| format!("--ramp: {e}"))?,
            "--offset" => o.offset = parse_size(&val()?)?,
            "--size" => o.size = parse_size(&val()?)?,
            "--queue-size" => {
                o.queue_size = val()?.parse().map_err(|e| format!("--queue-size: {e}"))?
            }
            "--json" => o.json = true,
            "--poll" => o.poll = true,
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument '{a}'\n{USAGE}")),
        }
    }
    if o.socket.is_empty() {
        return Err(USAGE.into());
    }
    if o.bs == 0 || !o.bs.is_multiple_of(512) {
        return Err("--bs must be a non-zero multiple of 512".into());
    }
    if o.qd == 0 || o.queues == 0 {
        return Err("--qd and --queues must be >= 1".into());
    }
    if o.qd > o.queue_size as usize {
        o.queue_size = (o.qd as u32).next_power_of_two() as i32;
    }
    Ok(o)
}

/// xorshift64*: cheap, good enough to spread offsets, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Default)]
struct ThreadResult {
    ios: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
    lat_ns: Vec<u32>,
    measured: Duration,
}

struct Job {
    opts: Opts,
    index: usize,
    buf: *mut u8, // qd * bs bytes of this thread's slice of the mapped region
    start: u64,   // byte range of the disk this thread touches
    len: u64,
}
// SAFETY: each thread gets a disjoint slice of a mapped region that outlives the threads.
unsafe impl Send for Job {}

fn run_queue(mut q: Blkioq, job: Job, stop: Arc<AtomicBool>, go: Arc<Barrier>) -> ThreadResult {
    let o = &job.opts;
    let blocks = job.len / o.bs;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((job.index as u64 + 1) * 0x1234_5678_9ABC));
    let mut seq_next = 0u64;
    let mut next_offset = |rng: &mut Rng| -> u64 {
        let blk = match o.pattern {
            Pattern::SeqRead | Pattern::SeqDiscard => {
                let b = seq_next;
                seq_next = (seq_next + 1) % blocks;
                b
            }
            _ => rng.next() % blocks,
        };
        job.start + blk * o.bs
    };
    let mut submit_t = vec![Instant::now(); o.qd];
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..o.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut res = ThreadResult {
        lat_ns: Vec::with_capacity(1 << 20),
        ..Default::default()
    };
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        if o.pattern == Pattern::SeqDiscard {
            return q.discard(off, o.bs, slot, ReqFlags::empty());
        }
        // SAFETY: slot < qd, so the buffer lies inside this thread's slice.
        let buf = unsafe { job.buf.add(slot * o.bs as usize) };
        match o.pattern {
            Pattern::RandWrite => q.write(off, buf, o.bs as usize, slot, ReqFlags::empty()),
            _ => q.read(off, buf, o.bs as usize, slot, ReqFlags::empty()),
        }
    };
    go.wait();
    let t0 = Instant::now();
    let ramp_end = t0 + Duration::from_secs_f64(o.ramp);
    let mut measuring = o.ramp <= 0.0;
    let mut measure_start = t0;
    for (slot, t) in submit_t.iter_mut().enumerate().take(o.qd) {
        *t = Instant::now();
        submit(&mut q, slot, next_offset(&mut rng));
    }
    let mut in_flight = o.qd;
    let mut stopping = false;
    while in_flight > 0 {
        let n = match q.do_io(&mut comps, 1, None, None) {
            Ok(n) => n,
            Err(e) => {
                res.errors += 1;
                res.first_error.get_or_insert(format!("do_io: {e}"));
                break;
            }
        };
        let now = Instant::now();
        if !measuring && now >= ramp_end {
            measuring = true;
            measure_start = now;
        }
        if !stopping && stop.load(Ordering::Relaxed) {
            stopping = true;
            res.measured = now.saturating_duration_since(measure_start);
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            in_flight -= 1;
            if c.ret != 0 {
                res.errors += 1;
                if res.first_error.is_none() {
                    res.first_error = Some(format!("request failed: ret {}", c.ret));
                }
            } else if measuring && !stopping {
                res.ios += 1;
                res.bytes += o.bs;
                let ns = now.duration_since(submit_t[slot]).as_nanos();
                res.lat_ns.push(ns.min(u32::MAX as u128) as u32);
            }
            if !stopping && res.errors < 100 {
                submit_t[slot] = Instant::now();
                submit(&mut q, slot, next_offset(&mut rng));
                in_flight += 1;
            }
        }
    }
    if !stopping {
        res.measured = Instant::now().saturating_duration_since(measure_start);
    }
    res
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(o: &Opts) -> Result<(), String> {
    let e = |what: &'static str| move |err: blkio::Error| format!("{what}: {err}");
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
    b.set_str("path", &o.socket).map_err(e("path"))?;
    let writes = matches!(o.pattern, Pattern::RandWrite | Pattern::SeqDiscard);
    b.set_bool("read-only", !writes).map_err(e("read-only"))?;
    b.connect().map_err(e("connect"))?;
    let max_queues = b.get_i32("max-queues").map_err(e("max-queues"))?;
    if (o.queues as i32) > max_queues {
        return Err(format!(
            "server offers {max_queues} queues, asked {}",
            o.queues
        ));
    }
    let (interrupt, poll) = if o.poll { (0, o.queues) } else { (o.queues, 0) };
    b.set_i32("num-queues", interrupt as i32)
        .map_err(e("num-queues"))?;
    b.set_i32("num-poll-queues", poll as i32)
        .map_err(e("num-poll-queues"))?;
    b.set_i32("queue-size", o.queue_size)
        .map_err(e("queue-size"))?;
    let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(e("align"))?
        .max(4096);
    let started = b.start().map_err(e("start"))?;
    let queues = if o.poll {
        started.poll_queues
    } else {
        started.queues
    };

    let size = if o.size == 0 {
        capacity.saturating_sub(o.offset)
    } else {
        o.size
    };
    if o.offset + size > capacity || size < o.bs * o.queues as u64 {
        return Err(format!(
            "range {}+{} does not fit the disk ({capacity} bytes) for {} queues of bs {}",
            o.offset, size, o.queues, o.bs
        ));
    }
    // Discards carry no data: one page per thread keeps the mapping small.
    let buf_bs = if o.pattern == Pattern::SeqDiscard {
        4096
    } else {
        o.bs
    };
    let per_thread = o.qd as u64 * buf_bs;
    let total = (per_thread * o.queues as u64).div_ceil(align) * align;
    let region = b
        .alloc_mem_region(total as usize)
        .map_err(e("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(e("map_mem_region"))?;
    // Non-zero, incompressible-looking payload for writes.
    {
        let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
        // SAFETY: the region is `total` bytes of mapped, writable memory we own.
        let s =
            unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u64, total as usize / 8) };
        s.iter_mut().for_each(|w| *w = rng.next());
    }

    // Random patterns: every queue touches the whole range. Sequential: each queue streams
    // through its own contiguous share of the range.
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(Barrier::new(o.queues + 1));
    let share = (size / o.queues as u64) / o.bs * o.bs;
    let mut handles = Vec::new();
    for (i, q) in queues.into_iter().enumerate() {
        let (start, len) = match o.pattern {
            Pattern::SeqRead | Pattern::SeqDiscard => (o.offset + i as u64 * share, share),
            _ => (o.offset, size / o.bs * o.bs),
        };
        let job = Job {
            opts: o.clone(),
            index: i,
            // SAFETY: i * per_thread + per_thread <= total.
            buf: unsafe { (region.addr as *mut u8).add(i * per_thread as usize) },
            start,
            len,
        };
        let (stop, go) = (stop.clone(), go.clone());
        handles.push(std::thread::spawn(move || run_queue(q, job, stop, go)));
    }
    go.wait();
    std::thread::sleep(Duration::from_secs_f64(o.ramp.max(0.0) + o.runtime));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<ThreadResult> = handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "worker thread panicked".to_string()))
        .collect::<Result<_, _>>()?;

    let ios: u64 = results.iter().map(|r| r.ios).sum();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let secs = results
        .iter()
        .map(|r| r.measured.as_secs_f64())
        .fold(0.0, f64::max)
        .max(1e-9);
    let mut lat: Vec<u32> = results
        .iter()
        .flat_map(|r| r.lat_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let idx = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[idx] as f64 / 1000.0
    };
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1000.0
    };
    let iops = ios as f64 / secs;
    let mib_s = bytes as f64 / secs / (1 << 20) as f64;
    let first_error = results.iter().find_map(|r| r.first_error.clone());
    if o.json {
        println!(
            "{{\"iops\":{iops:.1},\"mib_s\":{mib_s:.2},\"lat_mean_us\":{mean:.2},\
\"lat_p50_us\":{:.2},\"lat_p99_us\":{:.2},\"ios\":{ios},\"errors\":{errors},\"secs\":{secs:.3},\
\"capacity\":{capacity}}}",
            pct(0.50),
            pct(0.99)
        );
    } else {
        println!(
            "{:?} bs={} qd={} queues={}: {iops:.0} IOPS, {mib_s:.1} MiB/s, lat mean {mean:.1} us, \
p50 {:.1} us, p99 {:.1} us ({ios} ios in {secs:.2} s, {errors} errors)",
            o.pattern,
            o.bs,
            o.qd,
            o.queues,
            pct(0.50),
            pct(0.99)
        );
    }
    if let Some(err) = first_error {
        eprintln!("vhost_bench: first error: {err}");
    }
    b.unmap_mem_region(&region);
    if errors > 0 {
        return Err(format!("{errors} requests failed"));
    }
    Ok(())
}
