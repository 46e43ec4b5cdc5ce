//! End to end: libblkio's vhost-user-blk driver against `serve` with an in-memory backend.

use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use vhost_user_blk::poll_tuner::ProbeResult;
use vhost_user_blk::{
    serve_observed, BlockBackend, BlockError, BlockOp, BlockWorker, Completion, DeviceOptions,
    DiskGeometry, GuestBuf, RequestObserver, StopHandle, SECTOR_SIZE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SECTORS: u64 = 2048; // 1 MiB

struct MemBackend {
    data: Arc<Mutex<Vec<u8>>>,
    read_only: bool,
    refuse_writes: Arc<Mutex<bool>>,
    /// Completions a busy-polling queue thread found through `completions_ready`.
    polled: Arc<AtomicUsize>,
}

struct MemWorker {
    data: Arc<Mutex<Vec<u8>>>,
    refuse_writes: Arc<Mutex<bool>>,
    efd: EventFd,
    done: Vec<Completion>,
    polled: Arc<AtomicUsize>,
}

impl BlockBackend for MemBackend {
    type Worker = MemWorker;
    fn geometry(&self) -> DiskGeometry {
        DiskGeometry {
            capacity_sectors: SECTORS,
            logical_block_size: 512,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            read_only: self.read_only,
            discard: true,
            write_zeroes: true,
            discard_granularity_sectors: 8,
        }
    }
    fn new_worker(&self, _thread_index: usize) -> std::io::Result<MemWorker> {
        Ok(MemWorker {
            data: self.data.clone(),
            refuse_writes: self.refuse_writes.clone(),
            efd: EventFd::new(EFD_NONBLOCK)?,
            done: Vec::new(),
            polled: self.polled.clone(),
        })
    }
}

impl MemWorker {
    fn run(&self, op: BlockOp, bufs: &[GuestBuf]) -> Result<(), BlockError> {
        let mut data = self.data.lock().unwrap();
        let range = |sector: u64, n: u64| -> Result<std::ops::Range<usize>, BlockError> {
            let start = sector * SECTOR_SIZE;
            let end = start + n;
            if end > data.len() as u64 {
                return Err(BlockError::OutOfRange {
                    sector,
                    nr_sectors: n / 512,
                    capacity: SECTORS,
                });
            }
            Ok(start as usize..end as usize)
        };
        let total: u64 = bufs.iter().map(|b| b.len as u64).sum();
        match op {
            BlockOp::Read { sector } => {
                let mut off = range(sector, total)?.start;
                for b in bufs {
                    // SAFETY: the device guarantees `b` is a live guest buffer of `b.len` bytes
                    // until this request is reaped; `data` does not overlap guest memory.
                    unsafe { std::ptr::copy_nonoverlapping(data[off..].as_ptr(), b.ptr, b.len) };
                    off += b.len;
                }
            }
            BlockOp::Write { .. } if *self.refuse_writes.lock().unwrap() => {
                return Err(BlockError::ReadOnly)
            }
            BlockOp::Write { sector } => {
                let mut off = range(sector, total)?.start;
                for b in bufs {
                    // SAFETY: as above, the buffer is valid for reads of `b.len` bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(b.ptr, data[off..].as_mut_ptr(), b.len)
                    };
                    off += b.len;
                }
            }
            BlockOp::Flush => {}
            BlockOp::Discard { sector, nr_sectors }
            | BlockOp::WriteZeroes {
                sector, nr_sectors, ..
            } => {
                let r = range(sector, nr_sectors * SECTOR_SIZE)?;
                data[r].fill(0);
            }
        }
        Ok(())
    }
}

impl BlockWorker for MemWorker {
    fn event_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
    fn submit(&mut self, tag: u64, op: BlockOp, bufs: &[GuestBuf]) {
        let result = self.run(op, bufs);
        self.done.push(Completion { tag, result });
        let _ = self.efd.write(1);
    }
    fn reap(&mut self, done: &mut Vec<Completion>) {
        let _ = self.efd.read();
        done.append(&mut self.done);
    }
    fn completions_ready(&mut self) -> bool {
        let ready = !self.done.is_empty();
        if ready {
            self.polled.fetch_add(1, Ordering::Relaxed);
        }
        ready
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn drain(&mut self) {}
}

struct Server {
    path: PathBuf,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    data: Arc<Mutex<Vec<u8>>>,
    refuse_writes: Arc<Mutex<bool>>,
    polled: Arc<AtomicUsize>,
}

impl Server {
    fn start(name: &str, read_only: bool, num_queues: u16, threads: usize) -> Server {
        Server::start_polling(name, read_only, num_queues, threads, 0)
    }

    /// A server whose queue threads poll whenever the window allows (no tuning).
    fn start_polling(
        name: &str,
        read_only: bool,
        num_queues: u16,
        threads: usize,
        poll_us: u32,
    ) -> Server {
        Server::start_with(name, read_only, num_queues, threads, poll_us, true, None)
    }

    fn start_with(
        name: &str,
        read_only: bool,
        num_queues: u16,
        threads: usize,
        poll_us: u32,
        poll_always: bool,
        observer: Option<Arc<dyn RequestObserver>>,
    ) -> Server {
        let path = std::env::temp_dir().join(format!("vub-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let data = Arc::new(Mutex::new(vec![0u8; (SECTORS * SECTOR_SIZE) as usize]));
        let refuse_writes = Arc::new(Mutex::new(false));
        let polled = Arc::new(AtomicUsize::new(0));
        let backend = Arc::new(MemBackend {
            data: data.clone(),
            read_only,
            refuse_writes: refuse_writes.clone(),
            polled: polled.clone(),
        });
        let stop = StopHandle::new().unwrap();
        let stop2 = stop.clone();
        let opts = DeviceOptions {
            num_queues,
            queue_size: 256,
            threads,
            serial: "test-serial".into(),
            seg_max: 126,
            size_max: 1 << 20,
            poll_us,
            poll_always,
            ..DeviceOptions::default()
        };
        let thread = std::thread::spawn(move || {
            serve_observed(backend, &opts, listener, &stop2, observer).unwrap()
        });
        Server {
            path,
            stop,
            thread: Some(thread),
            data,
            refuse_writes,
            polled,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.stop();
        self.stop.stop(); // idempotent
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

fn connect(path: &Path, num_queues: i32) -> Client {
    connect_opts(path, num_queues, false)
}

fn connect_opts(path: &Path, num_queues: i32, read_only: bool) -> Client {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio.set_str("path", path.to_str().unwrap()).unwrap();
    blkio.set_bool("read-only", read_only).unwrap();
    blkio.connect().unwrap();
    blkio.set_i32("num-queues", num_queues).unwrap();
    let queues = blkio.start().unwrap().queues;
    let region = blkio.alloc_mem_region(1 << 20).unwrap();
    blkio.map_mem_region(&region).unwrap();
    Client {
        blkio,
        queues,
        region,
    }
}

fn wait_one(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
    let n = q.do_io(&mut c, 1, None, None).unwrap();
    assert_eq!(n, 1);
    // SAFETY: do_io initialised the first `n` (= 1) completions.
    unsafe { c[0].assume_init_read() }.ret
}

impl Client {
    fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY: the region is mapped, `off + len` is inside it, and tests use disjoint ranges.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }
    fn write(&mut self, q: usize, start: u64, off: usize, len: usize) -> i32 {
        let ptr = (self.region.addr + off) as *const u8;
        self.queues[q].write(start, ptr, len, 0, ReqFlags::empty());
        wait_one(&mut self.queues[q])
    }
    fn read(&mut self, q: usize, start: u64, off: usize, len: usize) -> i32 {
        let ptr = (self.region.addr + off) as *mut u8;
        self.queues[q].read(start, ptr, len, 0, ReqFlags::empty());
        wait_one(&mut self.queues[q])
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn read_write_flush_discard_write_zeroes() {
    let srv = Server::start("rw", false, 1, 1);
    let mut c = connect(&srv.path, 1);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), SECTORS * SECTOR_SIZE);
    let last = (SECTORS - 1) * SECTOR_SIZE;
    // First and last sector, and a multi-sector range.
    for (seed, start, len) in [(1u8, 0u64, 512usize), (2, last, 512), (3, 4096, 64 * 1024)] {
        c.buf(0, len).copy_from_slice(&pattern(seed, len));
        assert_eq!(c.write(0, start, 0, len), 0);
        c.buf(512 * 1024, len).fill(0);
        assert_eq!(c.read(0, start, 512 * 1024, len), 0);
        assert_eq!(c.buf(512 * 1024, len), &pattern(seed, len)[..]);
        let data = srv.data.lock().unwrap();
        assert_eq!(
            &data[start as usize..start as usize + len],
            &pattern(seed, len)[..]
        );
    }
    // Out of range.
    assert!(c.read(0, last, 0, 1024) < 0);
    assert!(c.write(0, SECTORS * SECTOR_SIZE, 0, 512) < 0);
    // Flush.
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    // Discard and write-zeroes zero the in-memory range.
    c.queues[0].discard(4096, 4096, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    c.queues[0].write_zeroes(8192, 8192, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    {
        let data = srv.data.lock().unwrap();
        assert!(data[4096..16384].iter().all(|&b| b == 0));
        assert_eq!(
            &data[16384..4096 + 64 * 1024],
            &pattern(3, 64 * 1024)[16384 - 4096..]
        );
    }
    assert_eq!(c.read(0, 4096, 0, 12288), 0);
    assert!(c.buf(0, 12288).iter().all(|&b| b == 0));
    drop(c);
    // A second client after the first disconnected sees the data.
    let mut c = connect(&srv.path, 1);
    assert_eq!(c.read(0, 0, 0, 512), 0);
    assert_eq!(c.buf(0, 512), &pattern(1, 512)[..]);
    drop(c);
}

#[test]
fn multi_queue_concurrent() {
    let srv = Server::start("mq", false, 4, 2);
    write_read_back_on_every_queue(&srv);
    assert_eq!(srv.polled.load(Ordering::Relaxed), 0, "polling is off");
}

#[test]
fn multi_queue_concurrent_busy_polling() {
    // A long maximum window: the queue threads find most requests and completions by
    // polling once the adaptive window has grown.
    let srv = Server::start_polling("mq-poll", false, 4, 2, 1000);
    write_read_back_on_every_queue(&srv);
    let polled = srv.polled.load(Ordering::Relaxed);
    assert!(polled > 0, "no completion was found by polling");
}

/// Write system calls made by the calling thread so far (`syscw` of /proc/thread-self/io):
/// libblkio's kicks are eventfd writes made by the thread that submits.
fn thread_write_syscalls() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("syscw: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Sequential requests on one queue (queue depth 1, as a guest's `fio --iodepth=1`): a
/// polling queue thread keeps the frontend's notifications off, so the frontend seldom
/// kicks; requests after a pause (the thread asleep) are still served. libblkio kicks after
/// a pause even without the re-arm (it compares avail_event with the index of its last
/// kick); Linux's driver does not, so the guest tests are the ones that would hang.
#[test]
fn polled_queue_is_seldom_kicked_and_rearms_before_sleeping() {
    const N: u64 = 400;
    let mut kicks = Vec::new();
    for poll_us in [0, 1000] {
        let srv = Server::start_polling(&format!("kicks-{poll_us}"), false, 1, 1, poll_us);
        let mut c = connect(&srv.path, 1);
        c.buf(0, 4096).copy_from_slice(&pattern(7, 4096));
        let before = thread_write_syscalls();
        for i in 0..N {
            assert_eq!(c.write(0, (i % 64) * 4096, 0, 4096), 0);
        }
        let during = thread_write_syscalls() - before;
        // The thread sleeps during each pause (the window is at most 1 ms).
        for round in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            c.queues[0].read(0, c.region.addr as *mut u8, 4096, 0, ReqFlags::empty());
            let mut done = [MaybeUninit::<blkio::Completion>::uninit()];
            let mut timeout = std::time::Duration::from_secs(5);
            let n = c.queues[0].do_io(&mut done, 1, Some(&mut timeout), None);
            assert_eq!(
                n.ok(),
                Some(1),
                "request after pause {round} was not served"
            );
            assert_eq!(c.buf(0, 4096), &pattern(7, 4096)[..]);
        }
        eprintln!("MEASURED poll_us {poll_us}: {during} kicks for {N} sequential requests");
        kicks.push(during);
        drop(c);
    }
    assert!(
        kicks[0] >= N,
        "without polling every request kicks: {kicks:?}"
    );
    assert!(
        kicks[1] < N / 4,
        "a polling thread should turn most kicks off: {kicks:?}"
    );
}

/// Four threads, one per queue, each writing and reading back 20 blocks of its own.
fn write_read_back_on_every_queue(srv: &Server) {
    let c = connect(&srv.path, 4);
    let Client {
        blkio,
        queues,
        region,
    } = c;
    let base = region.addr;
    std::thread::scope(|s| {
        for (i, mut q) in queues.into_iter().enumerate() {
            s.spawn(move || {
                let chunk = 128 * 1024;
                let off = i * chunk;
                // SAFETY: each thread uses its own disjoint 128 KiB slice of the mapped region.
                let buf = unsafe { std::slice::from_raw_parts_mut((base + off) as *mut u8, chunk) };
                for round in 0..20u8 {
                    let len = 4096;
                    let start = (i * chunk) as u64 + u64::from(round) * len as u64;
                    buf[..len].copy_from_slice(&pattern(round ^ i as u8, len));
                    q.write(start, buf.as_ptr(), len, 0, ReqFlags::empty());
                    assert_eq!(wait_one(&mut q), 0);
                    buf[len..2 * len].fill(0);
                    q.read(start, buf[len..].as_mut_ptr(), len, 0, ReqFlags::empty());
                    assert_eq!(wait_one(&mut q), 0);
                    assert_eq!(&buf[len..2 * len], &pattern(round ^ i as u8, len)[..]);
                }
            });
        }
    });
    drop(blkio);
}

#[test]
fn read_only_refuses_writes() {
    let srv = Server::start("ro", true, 1, 1);
    srv.data.lock().unwrap()[..512].copy_from_slice(&pattern(9, 512));
    // libblkio refuses a read-write open of a device offering VIRTIO_BLK_F_RO.
    let mut rw = Blkio::new("virtio-blk-vhost-user").unwrap();
    rw.set_str("path", srv.path.to_str().unwrap()).unwrap();
    rw.connect().unwrap();
    assert!(rw.start().is_err());
    drop(rw);
    let mut c = connect_opts(&srv.path, 1, true);
    assert_eq!(c.read(0, 0, 0, 512), 0);
    assert_eq!(c.buf(0, 512), &pattern(9, 512)[..]);
    assert!(c.write(0, 0, 0, 512) < 0);
    assert_eq!(&srv.data.lock().unwrap()[..512], &pattern(9, 512)[..]);
}

#[test]
fn backend_errors_reach_the_guest() {
    // The geometry says writable, but the backend refuses writes at run time.
    let srv = Server::start("rofail", false, 1, 1);
    *srv.refuse_writes.lock().unwrap() = true;
    let mut c = connect(&srv.path, 1);
    c.buf(0, 512).copy_from_slice(&pattern(5, 512));
    assert!(c.write(0, 0, 0, 512) < 0);
    assert!(srv.data.lock().unwrap()[..512].iter().all(|&b| b == 0));
    // The queue keeps working after the failure.
    assert_eq!(c.read(0, 0, 0, 512), 0);
}

#[test]
fn stop_while_connected() {
    let srv = Server::start("stop", false, 2, 2);
    let mut c = connect(&srv.path, 2);
    assert_eq!(c.read(1, 0, 0, 4096), 0);
    drop(srv); // stop + join must return while the client is still connected
    drop(c);
}

/// Polling probes the tuner reported.
#[derive(Default)]
struct ProbeLog(Mutex<Vec<(usize, ProbeResult)>>);

impl RequestObserver for ProbeLog {
    fn completed(&self, _: usize, _: &BlockOp, _: u64, _: std::time::Duration, _: bool) {}

    fn poll_probe(&self, thread: usize, result: &ProbeResult) {
        self.0.lock().unwrap().push((thread, *result));
    }
}

/// Tuned polling (the default): a queue thread under steady load tries both modes, measures
/// each one's request rate and keeps polling only if it completed clearly more; the I/O is
/// served correctly throughout the switches.
#[test]
fn tuned_polling_measures_both_modes_and_chooses_by_rate() {
    let log = Arc::new(ProbeLog::default());
    let srv = Server::start_with("tuned", false, 1, 1, 1000, false, Some(log.clone()));
    let mut c = connect(&srv.path, 1);
    c.buf(0, 4096).copy_from_slice(&pattern(9, 4096));
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 0u64;
    while log.0.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        c.buf(4096, 4096).fill(0);
        assert_eq!(c.read(0, 0, 4096, 4096), 0);
        assert_eq!(c.buf(4096, 4096), &pattern(9, 4096)[..], "read {n}");
        n += 1;
    }
    let probes = log.0.lock().unwrap().clone();
    eprintln!("MEASURED {n} requests; probes {probes:?}");
    assert!(
        probes.len() >= 2,
        "fewer than two probes in 10 s: {probes:?}"
    );
    for (thread, r) in probes {
        assert_eq!(thread, 0);
        assert!(
            r.conclusive && r.rate_polling > 0 && r.rate_not_polling > 0,
            "a mode was not measured: {r:?}"
        );
        // The rule (5 % margin), away from the rounding of the reported rates.
        let ratio = r.rate_polling as f64 / r.rate_not_polling as f64;
        if ratio > 1.06 {
            assert!(r.polling, "{r:?}");
        } else if ratio < 1.04 {
            assert!(!r.polling, "{r:?}");
        }
    }
}
