//! The hydration queue: urgent (writes wait) → hinted (guest reads hit unhydrated regions; dm-clone known
//! issue 1, fixed) → background sweep.
//!
//! | class      | `hydration_threshold` | guest-I/O back-off | `disable_hydration` | stopped by failures |
//! |------------|-----------------------|--------------------|---------------------|---------------------|
//! | urgent     | no (a write waits)    | no                 | still runs          | still runs          |
//! | hinted     | yes                   | no                 | still runs          | stops               |
//! | background | yes                   | yes (dm-clone)     | stops               | stops               |
//!
//! Background copies also shrink while the guest is busy (a request finished within
//! [`GUEST_BUSY_WINDOW`]): at most `busy_threshold` regions in flight, `busy_batch_size` per batch.
//!
//! Lock order: the scheduler's queue mutex may be held while taking a region-lock shard, never the reverse
//! (callers push urgent regions *after* `admit_write` returned, i.e. with no shard lock held).

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::events::Event;
use super::failures::FailureTracker;
use super::region_locks::RegionLocks;
use super::region_map::RegionMap;

/// Default bound of the hint queue.
pub const DEFAULT_MAX_HINTS: usize = 4096;

/// Why a setting was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("{0} must be at least 1 region")]
    Zero(&'static str),
}

/// Which queue a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchKind {
    Urgent,
    Hinted,
    Background,
}

/// Contiguous regions, all marked `Hydrating` in the region locks, to copy in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub regions: Range<u64>,
    pub kind: BatchKind,
}

impl Batch {
    /// Number of regions.
    pub fn len(&self) -> u64 {
        self.regions.end.saturating_sub(self.regions.start)
    }

    /// Never true for a batch returned by the scheduler.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Initial settings (from the table line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub hydration_threshold: u64,
    pub hydration_batch_size: u64,
    /// False for `no_hydration`.
    pub background: bool,
    pub max_hints: usize,
    pub max_failures: u64,
    /// Caps on the sweep (regions in flight, regions per batch) while the guest is busy: see
    /// [`GUEST_BUSY_WINDOW`].
    pub busy_threshold: u64,
    pub busy_batch_size: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            hydration_threshold: 1,
            hydration_batch_size: 1,
            background: true,
            max_hints: DEFAULT_MAX_HINTS,
            max_failures: super::failures::DEFAULT_MAX_FAILURES,
            busy_threshold: u64::MAX,
            busy_batch_size: u64::MAX,
        }
    }
}

/// The guest counts as busy this long after its last request finished. While it is busy,
/// background copies (the sweep, not the copies a guest request waits for) stay within the
/// `busy_*` caps, so a large `hydration_batch_size` hydrates fast on an idle disk without
/// holding the disk away from a busy guest. dm-clone only pauses the sweep while I/O is in
/// flight; between two requests it starts full-size batches.
pub const GUEST_BUSY_WINDOW: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct DedupQueue {
    queue: VecDeque<u64>,
    set: HashSet<u64>,
}

impl DedupQueue {
    fn push(&mut self, r: u64, bound: usize) -> bool {
        if !self.set.insert(r) {
            return false;
        }
        self.queue.push_back(r);
        while self.queue.len() > bound {
            if let Some(old) = self.queue.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn pop(&mut self) -> Option<u64> {
        let r = self.queue.pop_front()?;
        self.set.remove(&r);
        Some(r)
    }

    fn len(&self) -> usize {
        self.queue.len()
    }
}

#[derive(Debug, Default)]
struct Queues {
    urgent: DedupQueue,
    hinted: DedupQueue,
}

/// The hydration scheduler. Shared (`&self`) between queue threads (hints, urgent pushes, guest I/O counter)
/// and the hydration thread (`next_batch`, completions).
#[derive(Debug)]
pub struct Scheduler {
    nr_regions: u64,
    threshold: AtomicU64,
    batch_size: AtomicU64,
    enabled: AtomicBool,
    halted: AtomicBool,
    in_flight: AtomicU64,
    guest_io: AtomicU64,
    /// When the last guest request finished, in microseconds since `epoch`.
    guest_last_us: AtomicU64,
    epoch: Instant,
    busy_threshold: u64,
    busy_batch_size: u64,
    cursor: AtomicU64,
    max_hints: usize,
    queues: Mutex<Queues>,
    failures: FailureTracker,
}

impl Scheduler {
    /// A scheduler for `nr_regions` regions.
    pub fn new(nr_regions: u64, config: SchedulerConfig) -> Result<Self, SchedulerError> {
        if config.hydration_threshold == 0 {
            return Err(SchedulerError::Zero("hydration_threshold"));
        }
        if config.hydration_batch_size == 0 {
            return Err(SchedulerError::Zero("hydration_batch_size"));
        }
        Ok(Self {
            nr_regions,
            threshold: AtomicU64::new(config.hydration_threshold),
            batch_size: AtomicU64::new(config.hydration_batch_size),
            enabled: AtomicBool::new(config.background),
            halted: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            guest_io: AtomicU64::new(0),
            guest_last_us: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            busy_threshold: config.busy_threshold.max(1),
            busy_batch_size: config.busy_batch_size.max(1),
            cursor: AtomicU64::new(0),
            max_hints: config.max_hints.max(1),
            queues: Mutex::new(Queues::default()),
            failures: FailureTracker::new(config.max_failures),
        })
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- settings (dm-clone messages) ----

    /// `hydration_threshold <n>`.
    pub fn set_threshold(&self, n: u64) -> Result<(), SchedulerError> {
        if n == 0 {
            return Err(SchedulerError::Zero("hydration_threshold"));
        }
        self.threshold.store(n, SeqCst);
        Ok(())
    }

    /// `hydration_batch_size <n>`.
    pub fn set_batch_size(&self, n: u64) -> Result<(), SchedulerError> {
        if n == 0 {
            return Err(SchedulerError::Zero("hydration_batch_size"));
        }
        self.batch_size.store(n, SeqCst);
        Ok(())
    }

    /// `enable_hydration`: background on, failure stop cleared.
    pub fn enable(&self) {
        self.failures.reset();
        self.halted.store(false, SeqCst);
        self.enabled.store(true, SeqCst);
    }

    /// `disable_hydration`.
    pub fn disable(&self) {
        self.enabled.store(false, SeqCst);
    }

    /// Current `hydration_threshold`.
    pub fn threshold(&self) -> u64 {
        self.threshold.load(SeqCst)
    }

    /// Current `hydration_batch_size`.
    pub fn batch_size(&self) -> u64 {
        self.batch_size.load(SeqCst)
    }

    /// Background hydration enabled by configuration (false shows `no_hydration` in the status).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(SeqCst)
    }

    /// Background and hinted hydration stopped after too many failures.
    pub fn is_halted(&self) -> bool {
        self.halted.load(SeqCst)
    }

    /// The failure tracker (stats, limit).
    pub fn failures(&self) -> &FailureTracker {
        &self.failures
    }

    // ---- inputs from queue threads ----

    /// A partial write waits for region `r` (after `RegionLocks::admit_write` returned `QueuedNeedsCopy`).
    pub fn push_urgent(&self, r: u64) -> bool {
        r < self.nr_regions && self.queues().urgent.push(r, usize::MAX)
    }

    /// A guest read hit unhydrated region `r`: hydrate it sooner. Deduplicated; the oldest hint is dropped
    /// when the queue is full. Returns true if queued.
    pub fn hint(&self, r: u64, map: &RegionMap) -> bool {
        if r >= self.nr_regions || map.is_hydrated(r) {
            return false;
        }
        self.queues().hinted.push(r, self.max_hints)
    }

    /// Pending (urgent, hinted) queue lengths.
    pub fn queued(&self) -> (usize, usize) {
        let q = self.queues();
        (q.urgent.len(), q.hinted.len())
    }

    /// A guest request was submitted (background hydration backs off while any is in flight).
    pub fn guest_io_started(&self) {
        self.guest_io.fetch_add(1, SeqCst);
    }

    /// A guest request completed.
    pub fn guest_io_finished(&self) {
        let _ = self
            .guest_io
            .fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(1)));
        let us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.guest_last_us.store(us, Relaxed);
    }

    /// The guest finished a request within [`GUEST_BUSY_WINDOW`] before `now`.
    fn guest_busy(&self, now: Instant) -> bool {
        let last = self.guest_last_us.load(Relaxed);
        if last == u64::MAX {
            return false;
        }
        let now_us = u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX);
        now_us.saturating_sub(last) < GUEST_BUSY_WINDOW.as_micros() as u64
    }

    // ---- completions from the hydration thread ----

    /// Regions in flight (counted against the threshold).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(SeqCst)
    }

    /// `n` regions of a batch finished (success or failure) and were released with `RegionLocks::finish_copy`.
    pub fn copy_done(&self, n: u64) {
        let _ = self
            .in_flight
            .fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(n)));
    }

    /// A batch copy succeeded (progress: resets the consecutive-failure count).
    pub fn copy_succeeded(&self) {
        self.failures.record_success();
    }

    /// A batch copy failed. Returns `HydrationStopped` once the failure limit is reached; background and
    /// hinted hydration are then halted until `enable`. Parked writers of the batch get EIO (caller).
    pub fn copy_failed(&self, error: &str) -> Option<Event> {
        let ev = self.failures.record_failure(error);
        if ev.is_some() {
            self.halted.store(true, SeqCst);
        }
        ev
    }

    // ---- the queue ----

    /// The next batch to copy, or `None`. Every region of the batch is unhydrated, was not busy, and is now
    /// `Hydrating` in `locks`; the in-flight count grows by the batch length.
    pub fn next_batch<W>(&self, map: &RegionMap, locks: &RegionLocks<W>) -> Option<Batch> {
        self.next_batch_at(map, locks, Instant::now())
    }

    /// [`Scheduler::next_batch`] as of `now` (the guest-busy caps depend on the time).
    pub fn next_batch_at<W>(
        &self,
        map: &RegionMap,
        locks: &RegionLocks<W>,
        now: Instant,
    ) -> Option<Batch> {
        let batch = self.batch_size().max(1);
        // Urgent: no threshold, no back-off.
        {
            let mut q = self.queues();
            while let Some(r) = q.urgent.pop() {
                if locks.try_start_copy(r, map) {
                    let b = self.extend(r, batch, map, locks, BatchKind::Urgent);
                    drop(q);
                    return Some(self.account(b));
                }
            }
        }
        if self.is_halted() {
            return None;
        }
        let room = self.threshold().saturating_sub(self.in_flight());
        if room == 0 {
            return None;
        }
        let limit = batch.min(room);
        {
            let mut q = self.queues();
            while let Some(r) = q.hinted.pop() {
                if locks.try_start_copy(r, map) {
                    let b = self.extend(r, limit, map, locks, BatchKind::Hinted);
                    drop(q);
                    return Some(self.account(b));
                }
            }
        }
        if !self.is_enabled() || self.guest_io.load(SeqCst) > 0 {
            return None;
        }
        let limit = if self.guest_busy(now) {
            let room = self.busy_threshold.saturating_sub(self.in_flight());
            if room == 0 {
                return None;
            }
            limit.min(room).min(self.busy_batch_size)
        } else {
            limit
        };
        self.sweep(limit, map, locks).map(|b| self.account(b))
    }

    fn account(&self, b: Batch) -> Batch {
        self.in_flight.fetch_add(b.len(), SeqCst);
        b
    }

    /// `first` is already Hydrating; extend with following unhydrated, idle regions up to `limit` regions.
    fn extend<W>(
        &self,
        first: u64,
        limit: u64,
        map: &RegionMap,
        locks: &RegionLocks<W>,
        kind: BatchKind,
    ) -> Batch {
        let mut end = first.saturating_add(1);
        while end < self.nr_regions
            && end - first < limit
            && !map.is_hydrated(end)
            && locks.try_start_copy(end, map)
        {
            end += 1;
        }
        Batch {
            regions: first..end,
            kind,
        }
    }

    /// Background sweep from the cursor, wrapping once.
    fn sweep<W>(&self, limit: u64, map: &RegionMap, locks: &RegionLocks<W>) -> Option<Batch> {
        let start = self.cursor.load(SeqCst).min(self.nr_regions);
        let mut pos = start;
        let mut wrapped = false;
        loop {
            let candidate = match map.next_unhydrated(pos) {
                Some(r) if !wrapped || r < start => Some(r),
                _ => None,
            };
            let Some(r) = candidate else {
                if wrapped || start == 0 {
                    return None;
                }
                wrapped = true;
                pos = 0;
                continue;
            };
            if locks.try_start_copy(r, map) {
                let b = self.extend(r, limit, map, locks, BatchKind::Background);
                let next = if b.regions.end >= self.nr_regions {
                    0
                } else {
                    b.regions.end
                };
                self.cursor.store(next, SeqCst);
                return Some(b);
            }
            pos = r.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests;
