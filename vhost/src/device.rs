//! The virtio-blk device: `VhostUserBackend` (the `&self` flavour) with per-thread state.
//!
//! Each vring worker thread owns a `ThreadState` (its [`BlockWorker`] and the in-flight
//! slots of its queues); only that thread locks it on the data path, so the lock is
//! uncontended. The frontend thread takes it only in `stop_vring`/`reset_device`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::block::{
    BlockBackend, BlockError, BlockOp, BlockWorker, Completion, GuestBuf, RequestObserver,
};
use crate::config::{BlkConfig, ConfigOptions};
use crate::poll::AdaptivePoll;
use crate::poll_tuner::PollTuner;
use crate::request::{
    self, Desc, Limits, ParseError, Request, HEADER_LEN, ID_LEN, SEGMENT_LEN, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use crate::server::DeviceOptions;

/// Guest memory as mapped by vhost-user-backend (no dirty bitmap).
pub type Mem = GuestMemoryMmap<()>;
/// The atomically replaceable guest memory map.
pub type Gm = GuestMemoryAtomic<Mem>;
/// Vring type used by the device.
pub type Vring = VringMutex<Gm>;

/// Map the outcome of a backend request to a virtio status. The ONE place where a
/// [`BlockError`] becomes a guest-visible status.
pub fn block_status(result: &Result<(), BlockError>) -> u8 {
    match result {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(BlockError::Unsupported) => VIRTIO_BLK_S_UNSUPP,
        Err(BlockError::Io(_) | BlockError::ReadOnly | BlockError::OutOfRange { .. }) => {
            VIRTIO_BLK_S_IOERR
        }
    }
}

/// Why a chain was completed without reaching the backend.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

impl RequestError {
    fn status(&self) -> Option<u8> {
        match self {
            RequestError::Parse(e) => e.status(),
            RequestError::Memory(_) => Some(VIRTIO_BLK_S_IOERR),
        }
    }
}

/// One request handed to the worker and not yet completed.
struct InFlight {
    head: u16,
    status: GuestAddress,
    ok_len: u32,
    /// Keeps the buffers mapped even if the frontend removes the region meanwhile.
    mem: Arc<Mem>,
    /// For the request observer: what, how much, since when.
    observed: Option<(BlockOp, u64, Instant)>,
}

#[derive(Default)]
struct QueueSlots {
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    need_signal: bool,
    /// A poll loop popped this queue with the frontend's notifications off; they must be
    /// re-armed before the thread sleeps.
    notify_off: bool,
}

impl QueueSlots {
    fn insert(&mut self, inf: InFlight) -> u32 {
        if let Some(i) = self.free.pop() {
            if let Some(s) = self.slots.get_mut(i as usize) {
                *s = Some(inf);
                return i;
            }
        }
        self.slots.push(Some(inf));
        u32::try_from(self.slots.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }

    fn take(&mut self, i: u32) -> Option<InFlight> {
        let inf = self.slots.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some(inf)
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
        self.need_signal = false;
        self.notify_off = false;
    }
}

struct ThreadState<W> {
    worker: W,
    /// Per local queue (position in this thread's vring list).
    queues: Vec<QueueSlots>,
    /// This thread's vrings for the current connection (set on the first event).
    vrings: Vec<Vring>,
    done: Vec<Completion>,
    descs: Vec<Desc>,
    bufs: Vec<GuestBuf>,
    /// Local queue index -> global queue index.
    globals: Vec<usize>,
    /// This thread's index among the device's queue threads.
    index: usize,
    poll: AdaptivePoll,
    /// Decides whether polling pays; `None` with polling off or `poll_always`.
    tuner: Option<PollTuner>,
}

fn tag_of(local: usize, slot: u32) -> u64 {
    ((local as u64) << 32) | u64::from(slot)
}

fn untag(tag: u64) -> (usize, u32) {
    let local = usize::try_from(tag >> 32).unwrap_or(usize::MAX);
    (local, (tag & 0xffff_ffff) as u32)
}

/// A virtio-blk device over vhost-user, generic over its [`BlockBackend`].
pub struct VhostUserBlk<B: BlockBackend> {
    backend: Arc<B>,
    limits: Limits,
    features: u64,
    num_queues: usize,
    queue_size: usize,
    serial: [u8; ID_LEN],
    config: Mutex<BlkConfig>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    mem: RwLock<Option<Gm>>,
    /// Global queue index -> (thread, local index).
    queue_map: Vec<(usize, usize)>,
    thread_masks: Vec<u64>,
    threads: Vec<Mutex<ThreadState<B::Worker>>>,
    observer: Option<Arc<dyn RequestObserver>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spread `num_queues` over `threads` in contiguous blocks, the first threads taking the extras.
pub fn spread_queues(num_queues: usize, threads: usize) -> Vec<u64> {
    let nq = num_queues.clamp(1, 64);
    let threads = threads.clamp(1, nq);
    let (base, extra) = (nq / threads, nq % threads);
    let mut masks = Vec::with_capacity(threads);
    let mut next = 0usize;
    for t in 0..threads {
        let n = base + usize::from(t < extra);
        let mut mask = 0u64;
        for q in next..next + n {
            mask |= 1u64 << q;
        }
        next += n;
        masks.push(mask);
    }
    masks
}

impl<B: BlockBackend> VhostUserBlk<B> {
    /// Report every completed request to `observer` (metrics).
    pub fn with_observer(mut self, observer: Option<Arc<dyn RequestObserver>>) -> Self {
        self.observer = observer;
        self
    }

    /// Build the device and create one worker per thread.
    pub fn new(backend: Arc<B>, opts: &DeviceOptions) -> io::Result<Self> {
        let geo = backend.geometry();
        let num_queues = usize::from(opts.num_queues).clamp(1, 64);
        let thread_masks = spread_queues(num_queues, opts.threads);
        let mut queue_map = vec![(0usize, 0usize); num_queues];
        let mut threads = Vec::with_capacity(thread_masks.len());
        for (t, mask) in thread_masks.iter().enumerate() {
            let mut local = 0usize;
            for (q, entry) in queue_map.iter_mut().enumerate() {
                if mask >> q & 1 == 1 {
                    *entry = (t, local);
                    local += 1;
                }
            }
            let worker = backend.new_worker(t)?;
            let globals = (0..num_queues).filter(|q| mask >> q & 1 == 1).collect();
            threads.push(Mutex::new(ThreadState {
                globals,
                worker,
                queues: (0..local).map(|_| QueueSlots::default()).collect(),
                vrings: Vec::new(),
                done: Vec::new(),
                descs: Vec::new(),
                bufs: Vec::new(),
                index: t,
                poll: AdaptivePoll::new(Duration::from_micros(u64::from(opts.poll_us))),
                tuner: (opts.poll_us > 0 && !opts.poll_always)
                    .then(|| PollTuner::new(Instant::now())),
            }));
        }
        let limits = Limits {
            capacity_sectors: geo.capacity_sectors,
            seg_max: opts.seg_max.max(1),
            size_max: opts.size_max,
            read_only: geo.read_only,
            discard: geo.discard,
            write_zeroes: geo.write_zeroes,
            max_write_zeroes_sectors: opts.max_write_zeroes_sectors.max(1),
        };
        let bit = |b: u32| 1u64 << b;
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if opts.size_max != 0 {
            features |= bit(VIRTIO_BLK_F_SIZE_MAX);
        }
        if geo.discard {
            features |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if geo.write_zeroes {
            features |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if geo.read_only {
            features |= bit(VIRTIO_BLK_F_RO);
        }
        let mut serial = [0u8; ID_LEN];
        for (d, s) in serial.iter_mut().zip(opts.serial.bytes()) {
            *d = s;
        }
        let config = BlkConfig::new(
            &geo,
            &ConfigOptions {
                size_max: opts.size_max,
                seg_max: limits.seg_max,
                num_queues: u16::try_from(num_queues).unwrap_or(1),
                writeback: 1,
                max_write_zeroes_sectors: limits.max_write_zeroes_sectors,
            },
        );
        Ok(VhostUserBlk {
            backend,
            limits,
            features,
            num_queues,
            queue_size: usize::from(opts.queue_size.max(1)),
            serial,
            config: Mutex::new(config),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            mem: RwLock::new(None),
            queue_map,
            observer: None,
            thread_masks,
            threads,
        })
    }

    /// The backend this device serves.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Number of vring worker threads.
    pub fn num_threads(&self) -> usize {
        self.threads.len()
    }

    /// Epoll data id of the worker eventfd (above the ids vhost-user-backend reserves).
    pub fn worker_event_id(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    /// The eventfd of thread `t`'s worker.
    pub fn worker_fd(&self, t: usize) -> Option<std::os::fd::RawFd> {
        self.threads.get(t).map(|m| lock(m).worker.event_fd())
    }

    /// A new frontend is about to connect with this (empty) memory map.
    pub fn begin_connection(&self, mem: Gm) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        self.event_idx.store(false, Ordering::Release);
    }

    /// The frontend is gone and the vring threads have exited: wait for every in-flight
    /// request and drop it (its vrings are gone), forget the connection's vrings.
    pub fn end_connection(&self) {
        for t in &self.threads {
            let mut ts = lock(t);
            ts.worker.drain();
            let mut done = std::mem::take(&mut ts.done);
            ts.worker.reap(&mut done);
            done.clear();
            ts.done = done;
            ts.queues.iter_mut().for_each(QueueSlots::clear);
            ts.vrings.clear();
        }
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Drain every worker, delivering completions to the guest (stop/reset).
    fn drain_threads(&self, only: Option<usize>) {
        for (i, t) in self.threads.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let mut ts = lock(t);
            ts.worker.drain();
            self.complete(&mut ts);
        }
    }

    /// Wait up to [`MEMORY_UPDATE_GRACE`] for the frontend thread to install a memory map
    /// other than `old`; `None` if it does not.
    fn newer_memory(&self, old: &Arc<Mem>) -> Option<Arc<Mem>> {
        let start = Instant::now();
        loop {
            if let Some(now) = self.memory().filter(|m| !Arc::ptr_eq(m, old)) {
                return Some(now);
            }
            if start.elapsed() >= MEMORY_UPDATE_GRACE {
                return None;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn memory(&self) -> Option<Arc<Mem>> {
        let g = self.mem.read().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|m| m.memory().into_inner())
    }

    /// Pop and start every available request of queue `local`, then re-enable the frontend's
    /// notifications (rechecking for requests that raced with the re-enabling).
    fn process_queue(&self, ts: &mut ThreadState<B::Worker>, local: usize) {
        self.pop_queue(ts, local, true);
    }

    /// Pop and start every available request of queue `local`. With `rearm` false (a polling
    /// thread), the frontend's notifications stay off: it need not kick a queue that is being
    /// watched, which saves it a system call (a VM exit for a guest) per request. Every exit
    /// of the poll loop re-arms them ([`Self::rearm_notifications`]) before the thread sleeps.
    fn pop_queue(&self, ts: &mut ThreadState<B::Worker>, local: usize, rearm: bool) {
        let Some(vring) = ts.vrings.get(local).cloned() else {
            return;
        };
        let Some(mem) = self.memory() else {
            return;
        };
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let was_off = ts
            .queues
            .get_mut(local)
            .is_some_and(|q| std::mem::replace(&mut q.notify_off, !rearm));
        loop {
            if event_idx || !rearm {
                if let Err(e) = vring.disable_notification() {
                    warn!("queue {local}: disable_notification: {e}");
                }
            }
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                self.start_request(ts, local, &vring, chain, &mem);
            }
            if !rearm || !(event_idx || was_off) {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!("queue {local}: enable_notification: {e}");
                    break;
                }
            }
        }
        ts.worker.kick();
    }

    /// Turn the frontend's notifications back on for every queue of this thread (after a poll
    /// loop that popped with them off), handling requests that arrived meanwhile. Returns
    /// true if there were any.
    fn rearm_notifications(&self, ts: &mut ThreadState<B::Worker>) -> bool {
        let mut found = false;
        for local in 0..ts.vrings.len() {
            let off = ts
                .queues
                .get_mut(local)
                .is_some_and(|q| std::mem::take(&mut q.notify_off));
            let Some(vring) = ts.vrings.get(local).cloned().filter(|_| off) else {
                continue;
            };
            match vring.enable_notification() {
                Ok(false) => {}
                Ok(true) => {
                    found = true;
                    self.pop_queue(ts, local, true);
                }
                Err(e) => warn!("queue {local}: enable_notification: {e}"),
            }
        }
        found
    }

    fn start_request(
        &self,
        ts: &mut ThreadState<B::Worker>,
        local: usize,
        vring: &Vring,
        chain: DescriptorChain<Arc<Mem>>,
        mem: &Arc<Mem>,
    ) {
        let head = chain.head_index();
        let mut descs = std::mem::take(&mut ts.descs);
        descs.clear();
        // One more than the largest valid chain, so an over-long chain is detected.
        let cap = (self.limits.seg_max as usize).saturating_add(3);
        descs.extend(chain.take(cap).map(|d| Desc {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
        }));
        match request::status_desc(&descs) {
            Err(e) => {
                warn!("queue {local} head {head}: {e}");
                self.add_used(ts, vring, local, head, 0);
            }
            Ok(status) => {
                let status_addr = GuestAddress(status.addr);
                let mut mem = mem.clone();
                let mut result = self.dispatch(ts, local, head, status_addr, &descs, &mem);
                if matches!(result, Err(RequestError::Memory(_))) {
                    // A frontend that maps memory and uses it at once without waiting for
                    // the reply (libblkio can) may have its request here before the
                    // frontend thread applied the new map: give that update a moment.
                    if let Some(newer) = self.newer_memory(&mem) {
                        mem = newer;
                        result = self.dispatch(ts, local, head, status_addr, &descs, &mem);
                        if result.is_ok() {
                            debug!("queue {local} head {head}: found after a memory map update");
                        }
                    }
                }
                if let Err(e) = result {
                    warn!("queue {local} head {head}: {e}");
                    let code = e.status().unwrap_or(VIRTIO_BLK_S_IOERR);
                    self.finish_now(ts, vring, local, head, &mem, status_addr, code, 1);
                }
            }
        }
        ts.descs = descs;
    }

    /// Parse and either submit the request or complete it at once. `Err` = reject with a status.
    fn dispatch(
        &self,
        ts: &mut ThreadState<B::Worker>,
        local: usize,
        head: u16,
        status: GuestAddress,
        descs: &[Desc],
        mem: &Arc<Mem>,
    ) -> Result<(), RequestError> {
        let mut header = [0u8; HEADER_LEN];
        if let Some(h) = descs.first() {
            if !h.writable && h.len as usize >= HEADER_LEN {
                mem.read_slice(&mut header, GuestAddress(h.addr))
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
            }
        }
        let req = request::parse(&header, descs, &self.limits)?;
        let (op, data, ok_len): (BlockOp, &[Desc], u64) = match req {
            Request::Read { sector, data, len } => (BlockOp::Read { sector }, data, len),
            Request::Write { sector, data, .. } => (BlockOp::Write { sector }, data, 0),
            Request::Flush => (BlockOp::Flush, &[], 0),
            Request::GetId { data } => {
                let written = self.write_id(mem, data)?;
                let vring = ts.vrings.get(local).cloned();
                if let Some(vring) = vring {
                    self.finish_now(
                        ts,
                        &vring,
                        local,
                        head,
                        mem,
                        status,
                        VIRTIO_BLK_S_OK,
                        written + 1,
                    );
                }
                return Ok(());
            }
            Request::Discard { segment } | Request::WriteZeroes { segment } => {
                let mut seg = [0u8; SEGMENT_LEN];
                mem.read_slice(&mut seg, GuestAddress(segment.addr))
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                (request::parse_segment(&req, &seg, &self.limits)?, &[], 0)
            }
        };
        let mut bufs = std::mem::take(&mut ts.bufs);
        bufs.clear();
        let translated = translate(mem, data, &mut bufs);
        if let Err(e) = translated {
            ts.bufs = bufs;
            return Err(e);
        }
        let ok_len = u32::try_from(ok_len.saturating_add(1)).unwrap_or(u32::MAX);
        let observed = self.observer.as_ref().map(|_| {
            let bytes = bufs.iter().map(|b| b.len as u64).sum();
            (op, bytes, Instant::now())
        });
        let inflight = InFlight {
            head,
            status,
            ok_len,
            mem: mem.clone(),
            observed,
        };
        let slot = match ts.queues.get_mut(local) {
            Some(q) => q.insert(inflight),
            None => {
                ts.bufs = bufs;
                return Err(RequestError::Memory(format!("no queue {local}")));
            }
        };
        ts.worker.submit(tag_of(local, slot), op, &bufs);
        ts.bufs = bufs;
        Ok(())
    }

    fn write_id(&self, mem: &Mem, data: &[Desc]) -> Result<u32, RequestError> {
        let mut rest: &[u8] = &self.serial;
        let mut written = 0u32;
        for d in data {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(d.len as usize);
            let (now, later) = rest.split_at(n);
            mem.write_slice(now, GuestAddress(d.addr))
                .map_err(|e| RequestError::Memory(e.to_string()))?;
            written += n as u32;
            rest = later;
        }
        Ok(written)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_now(
        &self,
        ts: &mut ThreadState<B::Worker>,
        vring: &Vring,
        local: usize,
        head: u16,
        mem: &Mem,
        status: GuestAddress,
        code: u8,
        len: u32,
    ) {
        if let Err(e) = mem.write_obj(code, status) {
            warn!("queue {local} head {head}: cannot write status: {e}");
        }
        self.add_used(ts, vring, local, head, len);
    }

    fn add_used(
        &self,
        ts: &mut ThreadState<B::Worker>,
        vring: &Vring,
        local: usize,
        head: u16,
        len: u32,
    ) {
        if let Err(e) = vring.add_used(head, len) {
            warn!("queue {local}: add_used({head}, {len}) failed: {e}");
            return;
        }
        if let Some(q) = ts.queues.get_mut(local) {
            q.need_signal = true;
        }
    }

    /// Busy-poll this thread's avail rings and its worker's completions until nothing new
    /// came for the adaptive window, then let the thread sleep in epoll.
    fn poll(&self, ts: &mut ThreadState<B::Worker>) {
        if !ts.poll.enabled() {
            return;
        }
        if let Some(tuner) = ts.tuner.as_mut() {
            let (polling, probed) = tuner.should_poll(Instant::now());
            if let Some(r) = probed {
                debug!(
                    "queue thread {}: polling {} ({} requests/s polling, {} sleeping)",
                    ts.index,
                    if r.polling { "pays" } else { "does not pay" },
                    r.rate_polling,
                    r.rate_not_polling
                );
                if let Some(obs) = &self.observer {
                    obs.poll_probe(ts.index, &r);
                }
            }
            if !polling {
                return;
            }
        }
        let window = ts.poll.window();
        let last_work = self.poll_until_idle(ts, window);
        ts.poll.went_idle(last_work);
    }

    /// The polling loop; returns when it last found work. Bounded: after [`MAX_POLL_BUSY`] of
    /// continuous work it returns anyway, so the epoll loop still sees its exit and control
    /// events.
    fn poll_until_idle(&self, ts: &mut ThreadState<B::Worker>, window: Duration) -> Instant {
        let start = Instant::now();
        if window.is_zero() || ts.vrings.is_empty() {
            return start;
        }
        let Some(mem) = self.memory() else {
            return start;
        };
        let mut last_work = start;
        loop {
            let mut worked = false;
            if ts.worker.completions_ready() {
                self.complete(ts);
                worked = true;
            }
            for local in 0..ts.vrings.len() {
                if ts.vrings.get(local).is_some_and(|v| avail_pending(v, &mem)) {
                    self.pop_queue(ts, local, false);
                    worked = true;
                }
            }
            let now = Instant::now();
            if worked {
                last_work = now;
                if now.saturating_duration_since(start) >= MAX_POLL_BUSY {
                    self.rearm_notifications(ts);
                    return last_work;
                }
            } else if now.saturating_duration_since(last_work) >= window {
                if self.rearm_notifications(ts) {
                    last_work = Instant::now();
                    continue;
                }
                return last_work;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Reap the worker, complete requests to the guest and notify it.
    fn complete(&self, ts: &mut ThreadState<B::Worker>) {
        let mut done = std::mem::take(&mut ts.done);
        ts.worker.reap(&mut done);
        if let Some(tuner) = ts.tuner.as_mut() {
            tuner.completed(done.len());
        }
        for c in done.drain(..) {
            let (local, slot) = untag(c.tag);
            let Some(inf) = ts.queues.get_mut(local).and_then(|q| q.take(slot)) else {
                warn!("completion with unknown tag {:#x}", c.tag);
                continue;
            };
            let code = block_status(&c.result);
            if let Err(e) = &c.result {
                debug!("queue {local} head {}: {e}", inf.head);
            }
            let len = if c.result.is_ok() { inf.ok_len } else { 1 };
            if let (Some(obs), Some((op, bytes, t0))) = (&self.observer, &inf.observed) {
                let queue = ts.globals.get(local).copied().unwrap_or(local);
                obs.completed(queue, op, *bytes, t0.elapsed(), c.result.is_ok());
            }
            if let Some(vring) = ts.vrings.get(local).cloned() {
                self.finish_now(ts, &vring, local, inf.head, &inf.mem, inf.status, code, len);
            }
        }
        ts.done = done;
        for (local, q) in ts.queues.iter_mut().enumerate() {
            if !std::mem::take(&mut q.need_signal) {
                continue;
            }
            let Some(vring) = ts.vrings.get(local) else {
                continue;
            };
            let notify = vring.needs_notification().unwrap_or(true);
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    warn!("queue {local}: signal_used_queue: {e}");
                }
            }
        }
    }
}

/// How long a request whose buffers lie outside guest memory waits for a memory map update
/// before it fails (see `start_request`). A correct frontend never makes it wait.
const MEMORY_UPDATE_GRACE: Duration = Duration::from_millis(20);

/// Longest a poll loop keeps going while there is work, before it returns to epoll.
const MAX_POLL_BUSY: Duration = Duration::from_millis(1);

/// The frontend made requests available that this thread has not popped yet (an enabled,
/// ready queue whose avail index moved). Reads two bytes of guest memory; no system call.
fn avail_pending(vring: &Vring, mem: &Mem) -> bool {
    let state = vring.get_ref();
    if !state.is_enabled() {
        return false;
    }
    let queue = state.get_queue();
    queue.ready()
        && queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Turn guest data descriptors into host buffers, splitting a descriptor that spans
/// two memory regions. Every byte must lie inside guest memory.
fn translate(mem: &Mem, data: &[Desc], bufs: &mut Vec<GuestBuf>) -> Result<(), RequestError> {
    for d in data {
        let mut covered = 0usize;
        for s in GuestMemoryBackend::get_slices(mem, GuestAddress(d.addr), d.len as usize) {
            let s = s.map_err(|e| RequestError::Memory(e.to_string()))?;
            bufs.push(GuestBuf {
                ptr: s.ptr_guard_mut().as_ptr(),
                len: s.len(),
            });
            covered += s.len();
        }
        if covered != d.len as usize {
            return Err(RequestError::Memory(format!(
                "descriptor {:#x}+{} not fully inside guest memory",
                d.addr, d.len
            )));
        }
    }
    Ok(())
}

impl<B: BlockBackend> VhostUserBackend for VhostUserBlk<B> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.drain_threads(None);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        lock(&self.config).read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if lock(&self.config).write(offset, buf) {
            Ok(())
        } else {
            warn!(
                "refusing config write at offset {offset}, {} bytes",
                buf.len()
            );
            Err(io::Error::from(io::ErrorKind::InvalidInput))
        }
    }

    fn update_memory(&self, mem: Gm) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.thread_masks.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let thread = self.queue_map.get(queue_index as usize).map(|(t, _)| *t);
        if let Some(t) = thread {
            self.drain_threads(Some(t));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(t) = self.threads.get(thread_id) else {
            warn!("event for unknown thread {thread_id}");
            return Ok(());
        };
        let mut ts = lock(t);
        if ts.poll.enabled() {
            ts.poll.woke(Instant::now());
        }
        if ts.vrings.len() != vrings.len() {
            ts.vrings = vrings.to_vec();
        }
        let ev = usize::from(device_event);
        if ev < vrings.len() {
            self.process_queue(&mut ts, ev);
        } else if u64::from(device_event) != self.worker_event_id() {
            debug!("thread {thread_id}: unexpected event {device_event}");
        }
        self.complete(&mut ts);
        self.poll(&mut ts);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_spread_over_threads() {
        assert_eq!(spread_queues(4, 2), vec![0b0011, 0b1100]);
        assert_eq!(spread_queues(3, 2), vec![0b011, 0b100]);
        assert_eq!(spread_queues(2, 8), vec![0b01, 0b10]);
        assert_eq!(spread_queues(1, 0), vec![0b1]);
        assert_eq!(spread_queues(0, 1), vec![0b1]);
        let all = spread_queues(64, 3);
        assert_eq!(all.iter().fold(0u64, |a, m| a | m), u64::MAX);
        assert_eq!(all.iter().map(|m| m.count_ones()).sum::<u32>(), 64);
    }

    #[test]
    fn translate_splits_across_regions_and_stays_inside_memory() {
        let mem =
            Mem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap();
        let mut bufs = Vec::new();
        let d = Desc {
            addr: 0xf00,
            len: 0x200,
            writable: true,
        };
        translate(&mem, &[d], &mut bufs).unwrap();
        assert_eq!(bufs.len(), 2);
        assert_eq!(bufs[0].len + bufs[1].len, 0x200);
        assert_eq!(bufs[0].len, 0x100);
        bufs.clear();
        let beyond = Desc {
            addr: 0x1f00,
            len: 0x200,
            writable: true,
        };
        assert!(translate(&mem, &[beyond], &mut bufs).is_err());
        bufs.clear();
        let outside = Desc {
            addr: u64::MAX - 4,
            len: 16,
            writable: false,
        };
        assert!(translate(&mem, &[outside], &mut bufs).is_err());
    }

    #[test]
    fn tags_round_trip() {
        assert_eq!(untag(tag_of(3, 77)), (3, 77));
        assert_eq!(untag(tag_of(0, u32::MAX)), (0, u32::MAX));
    }

    #[test]
    fn error_statuses() {
        assert_eq!(block_status(&Ok(())), VIRTIO_BLK_S_OK);
        assert_eq!(
            block_status(&Err(BlockError::Unsupported)),
            VIRTIO_BLK_S_UNSUPP
        );
        assert_eq!(block_status(&Err(BlockError::ReadOnly)), VIRTIO_BLK_S_IOERR);
        let io = BlockError::Io(io::Error::from(io::ErrorKind::Other));
        assert_eq!(block_status(&Err(io)), VIRTIO_BLK_S_IOERR);
    }
}
