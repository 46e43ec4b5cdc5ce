//! The commit thread: every metadata commit of a live clone runs here (guest flushes, the
//! one-second timer, the commit that announces completion), so the hydration thread's copy
//! pipeline never waits for the destination's flush. On a virtual disk whose host caches
//! writes, that flush takes a quarter of a second after a second of copying; done inline
//! it stalled every copy for that long.
//!
//! # How often
//! Changes made by guest I/O (writes, write-zeroes and discards that marked regions, copies a
//! guest request waited for) are committed within [`COMMIT_INTERVAL`], dm-clone's one second.
//! Background hydration alone is committed every [`BACKGROUND_COMMIT_INTERVAL`]: a flush in
//! the middle of a copy stream stalled every read and write of the virtual disk for 190-370 ms
//! on the benchmark machine (a quarter of the time at one flush a second), and what a crash
//! loses of uncommitted background progress is only copying to redo: no guest data, since a
//! guest's flush still commits at once. Completion is committed at once too.
//!
//! Ordering is unchanged: [`Shared::commit`] takes the dirty bits first, flushes the
//! destination, then writes the bits. A region is marked dirty only after its data write
//! completed, so every bit a commit writes covers data its flush made durable; regions
//! marked while the flush runs wait for the next commit.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::{lock, MailItem, Shared};
use super::{Event, MetadataMode};

/// Commit at least this often while guest I/O changed the map (dm-clone: every second).
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Commit at least this often while only background hydration changed the map.
pub const BACKGROUND_COMMIT_INTERVAL: Duration = Duration::from_secs(10);

/// How long the map may stay changed before the next commit is due.
fn interval(s: &Shared) -> Duration {
    if s.guest_changes.load(Ordering::SeqCst) {
        COMMIT_INTERVAL
    } else {
        BACKGROUND_COMMIT_INTERVAL
    }
}

/// Entry point of the thread; returns once `Shared::committer_stop` is set.
pub fn run(s: Arc<Shared>) {
    let mut last_commit = Instant::now();
    loop {
        let stopping = s.committer_stop.load(Ordering::SeqCst);
        if s.active.load(Ordering::SeqCst) {
            serve_flushes(&s, &mut last_commit);
            if s.map.is_dirty() && last_commit.elapsed() >= interval(&s) {
                commit(&s, &mut last_commit);
            }
            check_complete(&s, &mut last_commit);
        }
        if stopping {
            break;
        }
        wait(&s, &last_commit);
    }
}

fn wait(s: &Shared, last_commit: &Instant) {
    let mut fd = libc::pollfd {
        fd: s.committer_wake.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = if s.active.load(Ordering::SeqCst) && s.map.is_dirty() {
        let left = interval(s).saturating_sub(last_commit.elapsed());
        i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
    } else {
        1000
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, timeout_ms) };
    let _ = s.committer_wake.read();
}

fn commit(s: &Shared, last_commit: &mut Instant) {
    *last_commit = Instant::now();
    if let Err(e) = s.commit() {
        log::error!("clone: {e}");
    }
}

/// Answer every waiting guest flush with one commit.
fn serve_flushes(s: &Shared, last_commit: &mut Instant) {
    let waiting = std::mem::take(&mut *lock(&s.flushes));
    if waiting.is_empty() {
        return;
    }
    *last_commit = Instant::now();
    let result = s.commit();
    for (mailbox, tag) in waiting {
        mailbox.post(MailItem::FlushDone(tag, result.clone()));
    }
}

/// Once every region is hydrated: commit, then announce it (once).
fn check_complete(s: &Shared, last_commit: &mut Instant) {
    if !s.map.all_hydrated() || s.complete_announced.load(Ordering::SeqCst) {
        return;
    }
    commit(s, last_commit);
    if !s.map.is_dirty() && s.mode() == MetadataMode::Rw {
        s.complete_announced.store(true, Ordering::SeqCst);
        log::info!("clone: every region is hydrated");
        s.events.publish(&Event::HydrationComplete);
    }
}
