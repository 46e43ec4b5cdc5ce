//! The `clone` target: shared state, construction (validated as dm-clone does),
//! status, messages and the commit path. The per-queue data path is in `worker.rs`,
//! the hydration thread in `hydrator.rs`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use vhost_user_blk::{BlockBackend, DiskGeometry, GuestBuf, SECTOR_SIZE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::CloneWorker;
use super::{
    CloneStatus, Event, EventHub, HydrationState, MetadataMode, RegionGeometry, RegionLocks,
    RegionMap, Scheduler, SchedulerConfig, StatusJson,
};
use crate::io::{ReadOnlyFile, ReadWriteFile};
use crate::metadata::CloneMetadata;
use crate::table::{parse_core_value, CloneSpec};

/// Why a clone target could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("cannot open the {role} device {path}: {source}")]
    Open {
        role: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the {0} device: {1}")]
    OpenDirect(&'static str, #[source] crate::io::OpenError),
    #[error("the source {path} is empty (0 sectors)")]
    EmptySource { path: PathBuf },
    #[error("the {role} device {path} has {have} sectors; the table needs {need}")]
    TooSmall {
        role: &'static str,
        path: PathBuf,
        have: u64,
        need: u64,
    },
    #[error("invalid clone geometry: {0}")]
    Geometry(#[from] super::GeometryError),
    #[error("metadata device {path}: {source}")]
    Metadata {
        path: PathBuf,
        source: crate::metadata::MetadataError,
    },
    #[error("in-core region map: {0}")]
    RegionMap(#[from] super::RegionMapError),
    #[error("hydration scheduler: {0}")]
    Scheduler(#[from] super::SchedulerError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start the hydration thread: {0}")]
    Thread(std::io::Error),
    #[error("the NBD source: {0}")]
    Nbd(#[from] crate::source::NbdError),
}

/// Connections to an NBD source.
const NBD_CONNECTIONS: usize = 4;

/// The read-only source: a local file or block device, or an NBD export.
pub enum SourceIo {
    /// Read through the io_uring engine (O_DIRECT, buffered for unaligned transfers).
    File {
        direct: ReadOnlyFile,
        buffered: File,
    },
    /// Read by a pool of NBD connections (`nbd://...`, `nbd+unix://...?socket=...`).
    Nbd(Arc<crate::source::NbdPool>),
}

impl SourceIo {
    fn open(path: &std::path::Path) -> Result<Self, CloneError> {
        if let Some(uri) = path.to_str().filter(|s| crate::source::NbdAddr::is_uri(s)) {
            let addr = crate::source::NbdAddr::parse(uri)?;
            return Ok(SourceIo::Nbd(crate::source::NbdPool::connect(
                &addr,
                NBD_CONNECTIONS,
            )?));
        }
        let direct = ReadOnlyFile::open(path).map_err(|e| CloneError::OpenDirect("source", e))?;
        let buffered = buffered(&path.to_path_buf(), false, "source")?;
        Ok(SourceIo::File { direct, buffered })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            SourceIo::File { direct, .. } => direct.size(),
            SourceIo::Nbd(pool) => pool.size(),
        }
    }
}

/// A guest request parked until a region it needs has been hydrated.
pub struct ParkedReq {
    pub tag: u64,
    pub op: vhost_user_blk::BlockOp,
    pub bufs: Vec<GuestBuf>,
}

/// What is posted to a queue worker from another thread.
pub enum MailItem {
    /// Run this parked request again (the region it waited for changed state).
    Resume(ParkedReq),
    /// Fail this parked request (the copy it waited for failed).
    Fail(ParkedReq, String),
    /// A flush finished (`Err` carries the reason).
    FlushDone(u64, Result<(), String>),
    /// A remote source read of request slot `usize` finished.
    RemoteDone(usize, Result<(), String>),
}

/// A worker's inbox: items plus a descriptor of the worker's eventfd to wake it.
pub struct Mailbox {
    items: Mutex<Vec<MailItem>>,
    wake: File,
}

impl Mailbox {
    /// A mailbox that wakes the eventfd `fd` (duplicated here).
    pub fn new(fd: std::os::fd::RawFd) -> std::io::Result<Self> {
        // SAFETY: dup(2) of a descriptor we were handed; the result is checked below and
        // owned by the File from then on.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor nothing else owns.
        let wake = unsafe { File::from_raw_fd(dup) };
        Ok(Mailbox {
            items: Mutex::new(Vec::new()),
            wake,
        })
    }

    /// Queue an item and wake the worker.
    pub fn post(&self, item: MailItem) {
        lock(&self.items).push(item);
        if let Err(e) = (&self.wake).write_all(&1u64.to_ne_bytes()) {
            log::error!("cannot wake a queue worker: {e}");
        }
    }

    /// Whether anything is queued (one uncontended lock, no system call).
    pub fn has_items(&self) -> bool {
        !lock(&self.items).is_empty()
    }

    /// Take every queued item.
    pub fn take(&self) -> Vec<MailItem> {
        std::mem::take(&mut *lock(&self.items))
    }
}

/// A waiter in the region locks: the request and where to send it back.
pub struct Parked {
    pub mailbox: Arc<Mailbox>,
    pub req: ParkedReq,
}

fn rank_of_mode(m: MetadataMode) -> u8 {
    match m {
        MetadataMode::Rw => 0,
        MetadataMode::Ro => 1,
        MetadataMode::Fail => 2,
    }
}

fn mode_of_rank(r: u8) -> MetadataMode {
    match r {
        0 => MetadataMode::Rw,
        1 => MetadataMode::Ro,
        _ => MetadataMode::Fail,
    }
}

/// Lock a mutex, recovering the data if a thread panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything the queue workers and the hydration thread share.
pub struct Shared {
    pub geo: RegionGeometry,
    pub spec: CloneSpec,
    pub len: u64,
    pub logical_block_size: u32,
    pub map: RegionMap,
    pub locks: RegionLocks<Parked>,
    pub sched: Scheduler,
    pub dest: ReadWriteFile,
    pub dest_buffered: File,
    pub source: SourceIo,
    /// Source reads finished by the NBD pool for the hydration thread: (copy slot, result, buffer).
    pub remote_copies: Mutex<Vec<(usize, std::io::Result<()>, crate::io::AlignedBuf)>>,
    pub metadata: Mutex<CloneMetadata>,
    /// Metadata blocks used as of the last commit, and managed (fixed at open): dm-clone's
    /// status fields. `status` reads these rather than taking `metadata`, which a commit
    /// holds across the destination flush (hundreds of milliseconds on a host-cached
    /// virtual disk).
    md_used_blocks: AtomicU64,
    md_total_blocks: u64,
    /// A guest write, write-zeroes or discard, or a copy a guest request waited for, changed
    /// the map since the last commit: commit within [`COMMIT_INTERVAL`] (dm-clone's period).
    /// Background progress alone waits [`BACKGROUND_COMMIT_INTERVAL`].
    ///
    /// [`COMMIT_INTERVAL`]: super::committer::COMMIT_INTERVAL
    /// [`BACKGROUND_COMMIT_INTERVAL`]: super::committer::BACKGROUND_COMMIT_INTERVAL
    pub guest_changes: AtomicBool,
    /// The metadata mode as its rank (0 rw, 1 ro, 2 fail): read on every guest write, so
    /// an atomic rather than a lock shared by all queues.
    mode: AtomicU8,
    pub events: EventHub,
    /// Wakes the hydration thread (new urgent work, settings, stop).
    pub hydrator_wake: EventFd,
    /// Wakes the commit thread (flush requests, completion, stop).
    pub committer_wake: EventFd,
    /// Tells the commit thread to do its last round and exit (set after the hydration
    /// thread has exited).
    pub committer_stop: AtomicBool,
    /// Flush requests waiting for the next commit.
    pub flushes: Mutex<Vec<(Arc<Mailbox>, u64)>>,
    pub stop: AtomicBool,
    pub started: Instant,
    /// Regions hydrated by copies since start (for the rate).
    pub copied_regions: AtomicU64,
    pub copied_bytes: AtomicU64,
    pub commits: AtomicU64,
    pub complete_announced: AtomicBool,
    /// False while the target is only loaded (not live): no copies, no commits.
    pub active: AtomicBool,
}

impl Shared {
    /// Current metadata mode.
    pub fn mode(&self) -> MetadataMode {
        mode_of_rank(self.mode.load(Ordering::Acquire))
    }

    /// Switch the metadata mode (only ever towards worse), with an event.
    pub fn set_mode(&self, to: MetadataMode) {
        let from = mode_of_rank(self.mode.fetch_max(rank_of_mode(to), Ordering::AcqRel));
        if rank_of_mode(to) > rank_of_mode(from) {
            log::error!(
                "clone metadata mode {} -> {}",
                from.as_status_str(),
                to.as_status_str()
            );
            self.events.publish(&Event::ModeChange { from, to });
        }
    }

    /// Wake the hydration thread.
    pub fn wake_hydrator(&self) {
        if let Err(e) = self.hydrator_wake.write(1) {
            log::error!("cannot wake the hydration thread: {e}");
        }
    }

    /// Record that guest I/O changed the map (see [`Shared::guest_changes`]); the first such
    /// change after a commit wakes the commit thread, which may be sleeping out the longer
    /// background interval.
    pub fn note_guest_change(&self) {
        // Per guest write on every queue: a plain load first keeps the shared line clean
        // while the flag is already set.
        if !self.guest_changes.load(Ordering::Relaxed)
            && !self.guest_changes.swap(true, Ordering::SeqCst)
        {
            self.wake_committer();
        }
    }

    /// Wake the commit thread.
    pub fn wake_committer(&self) {
        if let Err(e) = self.committer_wake.write(1) {
            log::error!("cannot wake the commit thread: {e}");
        }
    }

    /// Commit: take the dirty words, make the destination durable, then write the
    /// words and commit the metadata (superblock last). A region's bit never reaches
    /// the metadata device before its data is durable on the destination.
    pub fn commit(&self) -> Result<(), String> {
        let mut md = lock(&self.metadata);
        if self.mode() != MetadataMode::Rw {
            // Still make guest writes durable; the metadata cannot change.
            return self
                .dest_buffered
                .sync_data()
                .map_err(|e| format!("flushing the destination: {e}"))
                .and(Err(
                    "metadata is read-only after an earlier error".to_string()
                ));
        }
        let guest = self.guest_changes.swap(false, Ordering::SeqCst);
        let words = self.map.take_dirty();
        let restore = |words: &[(u64, u64)]| {
            self.map.restore_dirty(words);
            if guest {
                self.guest_changes.store(true, Ordering::SeqCst);
            }
        };
        if let Err(e) = self.dest_buffered.sync_data() {
            restore(&words);
            return Err(format!("flushing the destination: {e}"));
        }
        if words.is_empty() {
            return Ok(());
        }
        let result = words
            .iter()
            .try_for_each(|&(w, value)| md.set_word(w, value))
            .and_then(|()| md.commit().map(|_| ()));
        self.md_used_blocks
            .store(md.used_blocks(), Ordering::Relaxed);
        drop(md);
        match result {
            Ok(()) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                self.map.release_if_complete();
                Ok(())
            }
            Err(e) => {
                restore(&words);
                self.set_mode(MetadataMode::Ro);
                Err(format!("committing metadata: {e}"))
            }
        }
    }

    /// dm-clone's status fields.
    pub fn status(&self) -> CloneStatus {
        CloneStatus {
            used_md_blocks: self.md_used_blocks.load(Ordering::Relaxed),
            total_md_blocks: self.md_total_blocks,
            region_sectors: self.geo.region_sectors(),
            hydrated: self.map.hydrated_count(),
            nr_regions: self.geo.nr_regions(),
            hydrating: self.locks.hydrating(),
            no_hydration: !self.sched.is_enabled(),
            no_discard_passdown: self.spec.no_discard_passdown,
            hydration_threshold: self.sched.threshold(),
            hydration_batch_size: self.sched.batch_size(),
            mode: self.mode(),
        }
    }

    /// Progress as JSON.
    pub fn status_json(&self) -> StatusJson {
        let status = self.status();
        let state = if self.map.all_hydrated() {
            HydrationState::Complete
        } else if self.sched.is_halted() {
            HydrationState::Stopped
        } else if self.sched.is_enabled() {
            HydrationState::Running
        } else {
            HydrationState::Disabled
        };
        let secs = self.started.elapsed().as_secs_f64();
        let copied = self.copied_regions.load(Ordering::Relaxed);
        let rate = (secs > 0.0 && copied > 0).then(|| copied as f64 / secs);
        StatusJson::new(
            &status,
            state,
            rate,
            &self.sched.failures().stats(),
            self.map.memory_bytes(),
        )
    }
}

/// Background copies in flight while the guest is busy (see [`super::GUEST_BUSY_WINDOW`]).
const BUSY_IN_FLIGHT_BYTES: u64 = 256 << 10;
/// Largest background copy while the guest is busy.
const BUSY_BATCH_BYTES: u64 = 64 << 10;

/// The `clone` target: a [`BlockBackend`] whose workers route by region.
pub struct CloneTarget {
    shared: Arc<Shared>,
    hydrator: Mutex<Option<JoinHandle<()>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
    read_only: bool,
}

fn buffered(path: &PathBuf, write: bool, role: &'static str) -> Result<File, CloneError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| CloneError::Open {
            role,
            path: path.clone(),
            source,
        })
}

impl CloneTarget {
    /// Open the three devices and the metadata as dm-clone's constructor does. `len`
    /// is the table length (default: the source size).
    pub fn open(
        spec: &CloneSpec,
        len: Option<u64>,
        logical_block_size: u32,
        read_only: bool,
    ) -> Result<Arc<Self>, CloneError> {
        let source = SourceIo::open(&spec.source)?;
        let dest = ReadWriteFile::open(&spec.destination)
            .map_err(|e| CloneError::OpenDirect("destination", e))?;
        let dest_buffered = buffered(&spec.destination, true, "destination")?;
        let source_sectors = source.size() / SECTOR_SIZE;
        let len = len.unwrap_or(source_sectors);
        if len == 0 {
            return Err(CloneError::EmptySource {
                path: spec.source.clone(),
            });
        }
        for (role, path, have) in [
            ("source", &spec.source, source_sectors),
            ("destination", &spec.destination, dest.size() / SECTOR_SIZE),
        ] {
            if have < len {
                return Err(CloneError::TooSmall {
                    role,
                    path: path.clone(),
                    have,
                    need: len,
                });
            }
        }
        let geo = RegionGeometry::new(spec.region_sectors, len)?;
        let metadata = CloneMetadata::open_or_format(&spec.metadata, spec.region_sectors, len)
            .map_err(|source| CloneError::Metadata {
                path: spec.metadata.clone(),
                source,
            })?;
        let map = RegionMap::from_words(geo.nr_regions(), metadata.words().to_vec())?;
        let region_bytes = geo.region_sectors().saturating_mul(SECTOR_SIZE).max(1);
        let sched = Scheduler::new(
            geo.nr_regions(),
            SchedulerConfig {
                hydration_threshold: u64::from(spec.hydration_threshold),
                hydration_batch_size: u64::from(spec.hydration_batch_size),
                background: !spec.no_hydration,
                busy_threshold: (BUSY_IN_FLIGHT_BYTES / region_bytes).max(1),
                busy_batch_size: (BUSY_BATCH_BYTES / region_bytes).max(1),
                ..SchedulerConfig::default()
            },
        )?;
        let shared = Arc::new(Shared {
            geo,
            spec: spec.clone(),
            len,
            logical_block_size,
            map,
            locks: RegionLocks::new(),
            sched,
            dest,
            dest_buffered,
            source,
            remote_copies: Mutex::new(Vec::new()),
            md_used_blocks: AtomicU64::new(metadata.used_blocks()),
            md_total_blocks: metadata.total_blocks(),
            guest_changes: AtomicBool::new(false),
            metadata: Mutex::new(metadata),
            mode: AtomicU8::new(rank_of_mode(MetadataMode::Rw)),
            events: EventHub::new(),
            hydrator_wake: EventFd::new(EFD_NONBLOCK).map_err(CloneError::EventFd)?,
            committer_wake: EventFd::new(EFD_NONBLOCK).map_err(CloneError::EventFd)?,
            committer_stop: AtomicBool::new(false),
            flushes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            started: Instant::now(),
            copied_regions: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            complete_announced: AtomicBool::new(false),
            active: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let hydrator = std::thread::Builder::new()
            .name("hydrator".into())
            .spawn(move || super::hydrator::run(thread_shared))
            .map_err(CloneError::Thread)?;
        let thread_shared = shared.clone();
        let committer = std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || super::committer::run(thread_shared));
        let committer = match committer {
            Ok(c) => c,
            Err(e) => {
                shared.stop.store(true, Ordering::SeqCst);
                shared.wake_hydrator();
                if hydrator.join().is_err() {
                    log::error!("the hydration thread panicked");
                }
                return Err(CloneError::Thread(e));
            }
        };
        log::info!(
            "clone: {} regions of {} sectors, {} hydrated, background hydration {}",
            shared.geo.nr_regions(),
            shared.geo.region_sectors(),
            shared.map.hydrated_count(),
            if spec.no_hydration { "off" } else { "on" }
        );
        Ok(Arc::new(CloneTarget {
            shared,
            hydrator: Mutex::new(Some(hydrator)),
            committer: Mutex::new(Some(committer)),
            read_only,
        }))
    }

    /// Make the target live: background hydration and commits may start. A target that
    /// is only loaded beside a live one copies nothing and writes no metadata.
    pub fn activate(&self) {
        self.shared.active.store(true, Ordering::SeqCst);
        self.shared.wake_hydrator();
        self.shared.wake_committer();
    }

    /// Shared state (status, events).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The table length in sectors.
    pub fn len(&self) -> u64 {
        self.shared.len
    }

    /// Never true: a target has at least one sector.
    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }

    /// The `dmsetup status` line.
    pub fn status_line(&self) -> String {
        self.shared.status().dmsetup_line(0, self.shared.len)
    }

    /// A dm-clone message: `enable_hydration`, `disable_hydration`,
    /// `hydration_threshold N`, `hydration_batch_size N`.
    pub fn message(&self, words: &[&str]) -> Result<(), String> {
        let s = &self.shared;
        match words {
            ["enable_hydration"] => {
                s.sched.enable();
                s.wake_hydrator();
            }
            ["disable_hydration"] => s.sched.disable(),
            ["hydration_threshold", n] => {
                let n = parse_core_value("hydration_threshold", n).map_err(|e| e.to_string())?;
                s.sched
                    .set_threshold(u64::from(n))
                    .map_err(|e| e.to_string())?;
                s.wake_hydrator();
            }
            ["hydration_batch_size", n] => {
                let n = parse_core_value("hydration_batch_size", n).map_err(|e| e.to_string())?;
                s.sched
                    .set_batch_size(u64::from(n))
                    .map_err(|e| e.to_string())?;
            }
            _ => {
                return Err(format!(
                    "unsupported message '{}' (expected enable_hydration, disable_hydration, \
                     hydration_threshold N or hydration_batch_size N)",
                    words.join(" ")
                ))
            }
        }
        Ok(())
    }

    /// Stop the hydration and commit threads: in-flight copies finish, waiting flushes are
    /// answered, the metadata is committed.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake_hydrator();
        if let Some(handle) = lock(&self.hydrator).take() {
            if handle.join().is_err() {
                log::error!("the hydration thread panicked");
            }
        }
        self.shared.committer_stop.store(true, Ordering::SeqCst);
        self.shared.wake_committer();
        if let Some(handle) = lock(&self.committer).take() {
            if handle.join().is_err() {
                log::error!("the commit thread panicked");
            }
        }
        if let Err(e) = self.shared.commit() {
            log::error!("final commit: {e}");
        }
    }
}

impl Drop for CloneTarget {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl BlockBackend for CloneTarget {
    type Worker = CloneWorker;

    fn geometry(&self) -> DiskGeometry {
        let region = u32::try_from(self.shared.geo.region_sectors()).unwrap_or(u32::MAX);
        DiskGeometry {
            capacity_sectors: self.shared.len,
            logical_block_size: self.shared.logical_block_size,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            read_only: self.read_only,
            discard: !self.read_only,
            write_zeroes: !self.read_only,
            discard_granularity_sectors: region,
        }
    }

    fn new_worker(&self, _thread_index: usize) -> std::io::Result<CloneWorker> {
        CloneWorker::new(self.shared.clone(), self.read_only)
    }
}
