//! The served device: whichever table is live, swappable while the guest runs.
//!
//! dmsetup's words: `load` opens the new table's target beside the live one;
//! `suspend` holds new guest requests and waits for in-flight ones to drain (and commits
//! the clone metadata); `resume` makes the loaded table live and releases the held
//! requests. Each queue worker switches to the new target's worker at its next wake-up,
//! once its own requests have drained; the old target is closed when the last worker
//! has let go of it.
//!
//! A queue worker exposes an epoll descriptor of its own to the device layer; inside it
//! sit the current target worker's eventfd and a wake eventfd, so the target worker (and
//! its eventfd) can change without re-registering anything in the vhost-user loop.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost_user_blk::{BlockBackend, BlockOp, BlockWorker, Completion, DiskGeometry, GuestBuf};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::table::{Table, TargetSpec};
use crate::target::clone::worker::CloneWorker;
use crate::target::clone::CloneTarget;
use crate::target::linear::{LinearOptions, LinearTarget, LinearWorker};

/// A live or loaded target.
pub enum Target {
    Linear(Arc<LinearTarget>),
    Clone(Arc<CloneTarget>),
}

impl Target {
    /// Open the target a table describes.
    pub fn open(table: &Table, read_only: bool, logical_block_size: u32) -> anyhow::Result<Self> {
        use anyhow::Context;
        Ok(match &table.target {
            TargetSpec::Linear(l) => Target::Linear(Arc::new(
                LinearTarget::open(
                    &l.device,
                    &LinearOptions {
                        offset_sectors: l.offset,
                        length_sectors: table.len,
                        read_only,
                        logical_block_size,
                    },
                )
                .context("opening the linear target")?,
            )),
            TargetSpec::Clone(c) => Target::Clone(
                CloneTarget::open(c, table.len, logical_block_size, read_only)
                    .context("opening the clone target")?,
            ),
        })
    }

    fn geometry(&self) -> DiskGeometry {
        match self {
            Target::Linear(t) => t.geometry(),
            Target::Clone(t) => t.geometry(),
        }
    }

    /// Length in sectors.
    pub fn len(&self) -> u64 {
        self.geometry().capacity_sectors
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn activate(&self) {
        if let Target::Clone(c) = self {
            c.activate();
        }
    }

    fn new_worker(&self, thread_index: usize) -> io::Result<AnyWorker> {
        Ok(match self {
            Target::Linear(t) => AnyWorker::Linear(t.new_worker(thread_index)?),
            Target::Clone(t) => AnyWorker::Clone(t.new_worker(thread_index)?),
        })
    }
}

enum AnyWorker {
    Linear(LinearWorker),
    Clone(CloneWorker),
}

macro_rules! each {
    ($w:expr, $x:ident => $e:expr) => {
        match $w {
            AnyWorker::Linear($x) => $e,
            AnyWorker::Clone($x) => $e,
        }
    };
}

/// What the live table is, for the control socket.
pub struct Live {
    pub target: Arc<Target>,
    pub table: Table,
}

/// A queue worker's handle as the device sees it.
struct WorkerSlot {
    in_flight: Arc<AtomicUsize>,
    wake: EventFd,
    /// Set after `wake` is written, so the worker reads the eventfd only when it was woken
    /// (no failed read per completion round).
    woken: Arc<AtomicBool>,
}

/// Why a table operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum TableOpError {
    #[error("the new table has {new} sectors but the device has {old}: a live swap cannot resize")]
    Size { old: u64, new: u64 },
    #[error("the new table shows {new}-byte blocks but the device has {old}")]
    BlockSize { old: u32, new: u32 },
    #[error("the device is not suspended")]
    NotSuspended,
    #[error(
        "the live clone already uses the metadata device {0}: two clone targets must not share it \
         (change hydration settings with `message`)"
    )]
    SameMetadata(std::path::PathBuf),
    #[error("in-flight requests did not drain within {0:?}")]
    DrainTimeout(Duration),
    #[error("{0:#}")]
    Open(anyhow::Error),
}

/// The device: the live target, the loaded one, and the suspend state.
pub struct Device {
    me: std::sync::Weak<Device>,
    geometry: DiskGeometry,
    read_only: bool,
    live: RwLock<Live>,
    generation: AtomicU64,
    suspended: AtomicBool,
    loaded: Mutex<Option<Live>>,
    workers: Mutex<Vec<WorkerSlot>>,
    /// Device events (table swaps) and the live clone target's events, as JSON lines.
    pub events: Arc<Mutex<Vec<std::sync::mpsc::Sender<String>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Device {
    /// A device serving `table`.
    pub fn new(
        table: Table,
        read_only: bool,
        logical_block_size: u32,
    ) -> anyhow::Result<Arc<Self>> {
        let target = Arc::new(Target::open(&table, read_only, logical_block_size)?);
        let dev = Arc::new_cyclic(|me| Device {
            me: me.clone(),
            geometry: target.geometry(),
            read_only,
            live: RwLock::new(Live {
                target: target.clone(),
                table,
            }),
            generation: AtomicU64::new(0),
            suspended: AtomicBool::new(false),
            loaded: Mutex::new(None),
            workers: Mutex::new(Vec::new()),
            events: Arc::new(Mutex::new(Vec::new())),
        });
        dev.forward_events(&target);
        target.activate();
        Ok(dev)
    }

    /// Run `f` on the live table.
    pub fn with_live<R>(&self, f: impl FnOnce(&Live) -> R) -> R {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        f(&live)
    }

    /// The live target.
    pub fn live_target(&self) -> Arc<Target> {
        self.with_live(|l| l.target.clone())
    }

    /// Capacity in sectors.
    pub fn len(&self) -> u64 {
        self.geometry.capacity_sectors
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Publish a device event (one JSON object).
    pub fn publish(&self, json: String) {
        lock(&self.events).retain(|tx| tx.send(json.clone()).is_ok());
    }

    /// Subscribe to every event from now on.
    pub fn subscribe(&self) -> std::sync::mpsc::Receiver<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        lock(&self.events).push(tx);
        rx
    }

    fn forward_events(self: &Arc<Self>, target: &Target) {
        let Target::Clone(c) = target else { return };
        let rx = c.shared().events.subscribe();
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("clone-events".into())
            .spawn(move || {
                for e in rx {
                    match weak.upgrade() {
                        Some(dev) => dev.publish(e.to_json()),
                        None => break,
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot forward clone events: {e}");
        }
    }

    /// Open a table's target beside the live one (dmsetup load).
    pub fn load(self: &Arc<Self>, table: Table) -> Result<(), TableOpError> {
        if let TargetSpec::Clone(new) = &table.target {
            let same = |t: &Table| match &t.target {
                TargetSpec::Clone(c) => same_file(&c.metadata, &new.metadata),
                TargetSpec::Linear(_) => false,
            };
            if self.with_live(|l| same(&l.table)) {
                return Err(TableOpError::SameMetadata(new.metadata.clone()));
            }
        }
        let target = Target::open(&table, self.read_only, self.geometry.logical_block_size)
            .map_err(TableOpError::Open)?;
        let g = target.geometry();
        if g.capacity_sectors != self.geometry.capacity_sectors {
            return Err(TableOpError::Size {
                old: self.geometry.capacity_sectors,
                new: g.capacity_sectors,
            });
        }
        if g.logical_block_size != self.geometry.logical_block_size {
            return Err(TableOpError::BlockSize {
                old: self.geometry.logical_block_size,
                new: g.logical_block_size,
            });
        }
        *lock(&self.loaded) = Some(Live {
            target: Arc::new(target),
            table,
        });
        Ok(())
    }

    /// The loaded (inactive) table, if any.
    pub fn loaded_table(&self) -> Option<Table> {
        lock(&self.loaded).as_ref().map(|l| l.table.clone())
    }

    /// Hold new requests and wait until in-flight ones have completed; then commit.
    pub fn suspend(&self, timeout: Duration) -> Result<(), TableOpError> {
        self.suspended.store(true, Ordering::SeqCst);
        self.wake_workers();
        let t0 = Instant::now();
        while self.in_flight() > 0 {
            if t0.elapsed() > timeout {
                return Err(TableOpError::DrainTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Target::Clone(c) = &*self.live_target() {
            if let Err(e) = c.shared().commit() {
                log::error!("suspend: {e}");
            }
        }
        Ok(())
    }

    /// True while suspended.
    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::SeqCst)
    }

    /// Make the loaded table live (if any) and release held requests.
    pub fn resume(self: &Arc<Self>) -> Result<Option<Table>, TableOpError> {
        if !self.is_suspended() {
            return Err(TableOpError::NotSuspended);
        }
        let swapped = lock(&self.loaded).take().map(|new| {
            let table = new.table.clone();
            new.target.activate();
            self.forward_events(&new.target);
            let old = {
                let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
                std::mem::replace(&mut *live, new)
            };
            self.generation.fetch_add(1, Ordering::SeqCst);
            log::info!(
                "table swapped: {} -> {}",
                old.table.to_dm_line(self.len()),
                table.to_dm_line(self.len())
            );
            table
        });
        self.suspended.store(false, Ordering::SeqCst);
        self.wake_workers();
        if let Some(t) = &swapped {
            self.publish(format!(
                "{{\"event\":\"table_swapped\",\"table\":{}}}",
                serde_json::Value::String(t.to_dm_line(self.len()))
            ));
        }
        Ok(swapped)
    }

    fn wake_workers(&self) {
        for w in lock(&self.workers).iter() {
            let _ = w.wake.write(1);
            w.woken.store(true, Ordering::SeqCst);
        }
    }

    fn in_flight(&self) -> usize {
        lock(&self.workers)
            .iter()
            .map(|w| w.in_flight.load(Ordering::SeqCst))
            .sum()
    }

    /// Stop background work, flush and commit (the daemon is exiting).
    pub fn shutdown(&self) {
        let loaded = lock(&self.loaded).take();
        for target in [Some(self.live_target()), loaded.map(|l| l.target)]
            .into_iter()
            .flatten()
        {
            match &*target {
                Target::Clone(c) => c.shutdown(),
                Target::Linear(l) => {
                    if let Err(e) = l.sync() {
                        log::error!("final flush of the linear target: {e}");
                    }
                }
            }
        }
    }

    /// Suspend, swap to `table`, resume: the whole dmsetup sequence.
    pub fn swap(self: &Arc<Self>, table: Table) -> Result<(), TableOpError> {
        self.load(table)?;
        self.suspend(Duration::from_secs(60))?;
        self.resume().map(|_| ())
    }
}

/// True if both paths name the same file (or are the same path).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

impl BlockBackend for Device {
    type Worker = DeviceWorker;

    fn geometry(&self) -> DiskGeometry {
        self.geometry.clone()
    }

    fn new_worker(&self, thread_index: usize) -> io::Result<DeviceWorker> {
        let (target, generation) = {
            let live = self.live.read().unwrap_or_else(|p| p.into_inner());
            (live.target.clone(), self.generation.load(Ordering::SeqCst))
        };
        let inner = target.new_worker(thread_index)?;
        // SAFETY: epoll_create1 has no memory arguments; the result is checked.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epfd` is a fresh descriptor owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let woken = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let dev = self
            .me
            .upgrade()
            .ok_or_else(|| io::Error::other("the device is gone"))?;
        let w = DeviceWorker {
            dev,
            thread_index,
            dev_generation: generation,
            epoll,
            wake: wake.try_clone()?,
            woken: woken.clone(),
            inner,
            held: VecDeque::new(),
            in_flight: in_flight.clone(),
            suspended: false,
            target,
        };
        epoll_add(w.epoll.as_raw_fd(), w.wake.as_raw_fd())?;
        epoll_add(w.epoll.as_raw_fd(), each!(&w.inner, x => x.event_fd()))?;
        lock(&self.workers).push(WorkerSlot {
            in_flight,
            wake,
            woken,
        });
        Ok(w)
    }
}

fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_add(epfd: RawFd, fd: RawFd) -> io::Result<()> {
    epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd)
}

/// A queue thread's worker: forwards to the live target's worker, holds requests while
/// the device is suspended, and switches target workers after a swap.
pub struct DeviceWorker {
    dev: Arc<Device>,
    thread_index: usize,
    dev_generation: u64,
    epoll: OwnedFd,
    wake: EventFd,
    woken: Arc<AtomicBool>,
    inner: AnyWorker,
    target: Arc<Target>,
    held: VecDeque<(u64, BlockOp, Vec<GuestBuf>)>,
    in_flight: Arc<AtomicUsize>,
    suspended: bool,
}

impl DeviceWorker {
    fn publish_in_flight(&self) {
        let n = each!(&self.inner, x => x.in_flight());
        self.in_flight.store(n, Ordering::SeqCst);
    }

    /// Follow the device: suspend state, and a new target once our requests drained.
    fn sync_state(&mut self) {
        let dev = self.dev.clone();
        self.suspended = dev.is_suspended();
        let generation = dev.generation.load(Ordering::SeqCst);
        if generation == self.dev_generation || each!(&self.inner, x => x.in_flight()) > 0 {
            return;
        }
        let target = dev.live_target();
        match target.new_worker(self.thread_index) {
            Ok(new) => {
                let ep = self.epoll.as_raw_fd();
                let old_fd = each!(&self.inner, x => x.event_fd());
                if let Err(e) = epoll_ctl(ep, libc::EPOLL_CTL_DEL, old_fd) {
                    log::warn!("worker {}: epoll del: {e}", self.thread_index);
                }
                if let Err(e) = epoll_add(ep, each!(&new, x => x.event_fd())) {
                    log::error!(
                        "worker {}: cannot watch the new target: {e}",
                        self.thread_index
                    );
                    return;
                }
                self.inner = new;
                self.target = target;
                self.dev_generation = generation;
            }
            Err(e) => log::error!(
                "worker {}: cannot start the new target's worker: {e}",
                self.thread_index
            ),
        }
    }

    fn release_held(&mut self) {
        if self.suspended || self.dev_generation != self.dev.generation.load(Ordering::SeqCst) {
            return;
        }
        let mut any = false;
        while let Some((tag, op, bufs)) = self.held.pop_front() {
            each!(&mut self.inner, x => x.submit(tag, op, &bufs));
            any = true;
        }
        if any {
            each!(&mut self.inner, x => x.kick());
        }
    }
}

impl BlockWorker for DeviceWorker {
    fn event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn submit(&mut self, tag: u64, op: BlockOp, bufs: &[GuestBuf]) {
        // Count first, then look at the flag: a suspend that set the flag before this
        // load sees us hold the request; one that set it after sees the count.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.dev.is_suspended() || !self.held.is_empty() {
            self.suspended = true;
            self.held.push_back((tag, op, bufs.to_vec()));
        } else {
            each!(&mut self.inner, x => x.submit(tag, op, bufs));
        }
        self.publish_in_flight();
    }

    fn kick(&mut self) {
        each!(&mut self.inner, x => x.kick());
    }

    fn reap(&mut self, done: &mut Vec<Completion>) {
        // The flag is set after the eventfd is written: a wake-up seen before its flag
        // leaves the (level-triggered) eventfd readable, so epoll returns again until both
        // are seen.
        if self.woken.swap(false, Ordering::SeqCst) {
            let _ = self.wake.read();
        }
        each!(&mut self.inner, x => x.reap(done));
        self.sync_state();
        self.release_held();
        self.publish_in_flight();
    }

    fn completions_ready(&mut self) -> bool {
        each!(&mut self.inner, x => x.completions_ready())
    }

    fn in_flight(&self) -> usize {
        each!(&self.inner, x => x.in_flight()) + self.held.len()
    }

    fn drain(&mut self) {
        // Requests held by a suspend are released first (a stopping daemon resumes).
        self.suspended = false;
        let held: Vec<_> = self.held.drain(..).collect();
        for (tag, op, bufs) in held {
            each!(&mut self.inner, x => x.submit(tag, op, &bufs));
        }
        each!(&mut self.inner, x => x.kick());
        each!(&mut self.inner, x => x.drain());
        self.publish_in_flight();
    }
}
