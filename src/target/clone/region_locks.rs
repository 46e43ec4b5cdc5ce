//! Per-region exclusion between hydration copies and guest writes: **a write never races a copy of the same
//! region**, and a copy never starts over guest data.
//!
//! A region with no entry is *idle*. Entries (in a shard map keyed by region, 64 shards):
//! - `Pending(waiters)`: a partial guest write needs this region copied; the copy has not started yet (the
//!   caller has queued the region as *urgent* in the scheduler).
//! - `Hydrating(waiters)`: a copy is in flight; guest writes to the region wait.
//! - `Overwriting(n, waiters)`: `n` full-region guest writes (or discards) are in flight; no copy may start.
//!
//! # Protocol (every step that decides happens under the region's shard lock)
//! 1. A copy starts only through [`RegionLocks::try_start_copy`], which re-checks `RegionMap::is_hydrated`
//!    *under the shard lock*: an idle or `Pending` region that is unhydrated becomes `Hydrating`.
//! 2. Whoever finishes work on a region (copy or overwrite) first calls `RegionMap::mark_hydrated` (on
//!    success), **then** `finish_copy` / `finish_overwrite`, which removes the entry under the lock.
//!    So "entry gone" implies "map already updated": a writer that finds no entry re-checks the map under the
//!    same lock and can never miss a wake-up (the lost-wake-up window between "not hydrated" and "copy done"
//!    is closed by the lock + the mark-before-finish order).
//! 3. A partial write calls [`RegionLocks::admit_write`] when its region is unhydrated: it proceeds if the
//!    region is (now) hydrated, otherwise it is parked in the entry's wait list; `Admit::QueuedNeedsCopy`
//!    tells the caller to push the region as urgent.
//! 4. Full-region writes and discards call [`RegionLocks::admit_overwrite`] and `finish_overwrite` when done.
//! 5. Returned waiters are resumed exactly once: each waiter is stored in exactly one entry and handed back
//!    exactly once by the `finish_*` that removes it. A resumed write re-runs admission (the copy may have
//!    failed); if the copy failed the caller may instead fail the waiters with EIO (`failures.rs`).
//!
//! Guest reads take no lock: the source is read-only and a hydrated region's destination data is final.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::region_map::RegionMap;

/// Number of lock shards.
pub const NR_SHARDS: usize = 64;

/// State of a busy region (idle regions have no entry).
#[derive(Debug)]
enum State<W> {
    Pending(Vec<W>),
    Hydrating(Vec<W>),
    Overwriting(u64, Vec<W>),
}

/// What a caller must do with a write after admission.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<W> {
    /// Go ahead now (the waiter is handed back).
    Proceed(W),
    /// Parked; it will come back from a `finish_*` call.
    Queued,
    /// Parked, and no copy is scheduled yet: push the region as urgent in the scheduler.
    QueuedNeedsCopy,
}

/// Observable state of a region, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionState {
    Idle,
    Pending { waiters: usize },
    Hydrating { waiters: usize },
    Overwriting { writers: u64, waiters: usize },
}

/// Sharded per-region locks, generic over the waiter type `W` (e.g. a request id or a parked request).
pub struct RegionLocks<W> {
    shards: [Mutex<HashMap<u64, State<W>>>; NR_SHARDS],
    hydrating: AtomicU64,
}

/// Give back a shard's table once it has emptied out: one big discard or batch can
/// put tens of thousands of regions in flight, and a hash table never shrinks by itself.
fn trim<W>(shard: &mut HashMap<u64, State<W>>) {
    const KEEP: usize = 256;
    if shard.capacity() > KEEP && shard.len() < shard.capacity() / 8 {
        shard.shrink_to((shard.len() * 2).max(KEEP / 2));
    }
}

impl<W> Default for RegionLocks<W> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W> RegionLocks<W> {
    /// Create with [`NR_SHARDS`] shards.
    pub fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hydrating: AtomicU64::new(0),
        }
    }

    fn shard(&self, r: u64) -> MutexGuard<'_, HashMap<u64, State<W>>> {
        // Fibonacci hash so that contiguous regions spread over shards.
        let h = r.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58; // < 64 == NR_SHARDS
        let idx = usize::try_from(h).unwrap_or(0) % NR_SHARDS;
        // In bounds: idx < NR_SHARDS, the array length. A poisoned shard is still consistent (every update
        // is a single map operation), so recover it.
        self.shards[idx].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of regions with a copy in flight (the status line's `<hydrating>`).
    pub fn hydrating(&self) -> u64 {
        self.hydrating.load(Ordering::SeqCst)
    }

    /// Start a copy of `r` if it is unhydrated (checked under the lock) and idle or `Pending`.
    pub fn try_start_copy(&self, r: u64, map: &RegionMap) -> bool {
        let mut shard = self.shard(r);
        let started = match shard.remove(&r) {
            None if !map.is_hydrated(r) => {
                shard.insert(r, State::Hydrating(Vec::new()));
                true
            }
            None => false,
            Some(State::Pending(w)) => {
                // Under the protocol nothing marks a Pending region, so it is still unhydrated; even if it were
                // not, copying keeps the parked writers' wake-up path (finish_copy) intact.
                shard.insert(r, State::Hydrating(w));
                true
            }
            Some(other) => {
                shard.insert(r, other);
                false
            }
        };
        if started {
            self.hydrating.fetch_add(1, Ordering::SeqCst);
        }
        started
    }

    /// The copy of `r` is over (mark the map first on success). Returns the waiters to resume.
    pub fn finish_copy(&self, r: u64) -> Vec<W> {
        let mut shard = self.shard(r);
        match shard.remove(&r) {
            Some(State::Hydrating(w)) => {
                self.hydrating.fetch_sub(1, Ordering::SeqCst);
                trim(&mut shard);
                w
            }
            Some(other) => {
                shard.insert(r, other);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Park `w` on `r` if a copy is pending or in flight, or an overwrite is in flight. `Err(w)` otherwise.
    pub fn add_waiter(&self, r: u64, w: W) -> Result<(), W> {
        let mut shard = self.shard(r);
        match shard.get_mut(&r) {
            Some(State::Pending(ws) | State::Hydrating(ws) | State::Overwriting(_, ws)) => {
                ws.push(w);
                Ok(())
            }
            None => Err(w),
        }
    }

    /// Admission of a partial write to region `r` (see the module protocol, step 3).
    pub fn admit_write(&self, r: u64, w: W, map: &RegionMap) -> Admit<W> {
        let mut shard = self.shard(r);
        match shard.get_mut(&r) {
            Some(State::Pending(ws) | State::Hydrating(ws) | State::Overwriting(_, ws)) => {
                ws.push(w);
                Admit::Queued
            }
            None if map.is_hydrated(r) => Admit::Proceed(w),
            None => {
                shard.insert(r, State::Pending(vec![w]));
                Admit::QueuedNeedsCopy
            }
        }
    }

    /// Admission of a full-region write or a discard of `r`: proceeds unless a copy is in flight (then parked).
    /// A `Pending` region turns into `Overwriting` (the overwrite makes the copy unnecessary; its waiters are
    /// resumed when the overwrite finishes).
    pub fn admit_overwrite(&self, r: u64, w: W) -> Admit<W> {
        let mut shard = self.shard(r);
        match shard.remove(&r) {
            None => {
                shard.insert(r, State::Overwriting(1, Vec::new()));
                Admit::Proceed(w)
            }
            Some(State::Pending(ws)) => {
                shard.insert(r, State::Overwriting(1, ws));
                Admit::Proceed(w)
            }
            Some(State::Overwriting(n, ws)) => {
                shard.insert(r, State::Overwriting(n.saturating_add(1), ws));
                Admit::Proceed(w)
            }
            Some(State::Hydrating(mut ws)) => {
                ws.push(w);
                shard.insert(r, State::Hydrating(ws));
                Admit::Queued
            }
        }
    }

    /// `admit_overwrite` without a waiter: true if the overwrite may start (`Overwriting(n+1)`), false if a copy
    /// is in flight.
    pub fn start_overwrite(&self, r: u64) -> bool {
        let mut shard = self.shard(r);
        match shard.remove(&r) {
            None => {
                shard.insert(r, State::Overwriting(1, Vec::new()));
                true
            }
            Some(State::Pending(ws)) => {
                shard.insert(r, State::Overwriting(1, ws));
                true
            }
            Some(State::Overwriting(n, ws)) => {
                shard.insert(r, State::Overwriting(n.saturating_add(1), ws));
                true
            }
            Some(h @ State::Hydrating(_)) => {
                shard.insert(r, h);
                false
            }
        }
    }

    /// One overwrite of `r` is over (mark the map first on success). Returns the waiters to resume when the last
    /// overwrite finishes.
    pub fn finish_overwrite(&self, r: u64) -> Vec<W> {
        let mut shard = self.shard(r);
        match shard.remove(&r) {
            Some(State::Overwriting(n, ws)) if n <= 1 => {
                trim(&mut shard);
                ws
            }
            Some(State::Overwriting(n, ws)) => {
                shard.insert(r, State::Overwriting(n - 1, ws));
                Vec::new()
            }
            Some(other) => {
                shard.insert(r, other);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Mark hydrated, a word at a time, every region of `range` that no copy, write or
    /// waiter holds, with all shards locked so that none can start meanwhile (the shards are
    /// taken in index order; every other method holds one shard at a time). Returns the held
    /// regions of `range`, sorted, for the caller to handle one by one. This is how a discard
    /// of a whole device marks millions of regions without a lock operation per region.
    pub fn mark_idle(&self, range: Range<u64>, map: &RegionMap) -> Vec<u64> {
        let guards: Vec<_> = self
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut held: Vec<u64> = guards
            .iter()
            .flat_map(|g| g.keys().copied())
            .filter(|r| range.contains(r))
            .collect();
        held.sort_unstable();
        let mut next = range.start;
        for &r in &held {
            if next < r {
                map.mark_range(next..r);
            }
            next = r + 1;
        }
        if next < range.end {
            map.mark_range(next..range.end);
        }
        drop(guards);
        held
    }

    /// True if a copy or overwrite is pending or in flight for `r`.
    pub fn is_busy(&self, r: u64) -> bool {
        self.shard(r).contains_key(&r)
    }

    /// The state of `r`.
    pub fn state(&self, r: u64) -> RegionState {
        match self.shard(r).get(&r) {
            None => RegionState::Idle,
            Some(State::Pending(w)) => RegionState::Pending { waiters: w.len() },
            Some(State::Hydrating(w)) => RegionState::Hydrating { waiters: w.len() },
            Some(State::Overwriting(n, w)) => RegionState::Overwriting {
                writers: *n,
                waiters: w.len(),
            },
        }
    }
}

#[cfg(test)]
mod tests;
