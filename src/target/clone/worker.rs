//! The clone target's per-queue data path (dm-clone's routing, see ARCHITECTURE.md):
//! - READ: per region run, hydrated → destination, unhydrated → source (and a hint that
//!   makes the region hydrate sooner).
//! - WRITE / WRITE_ZEROES: hydrated regions → destination; fully covered unhydrated
//!   regions → destination, then marked hydrated (no copy), under an overwrite lock so no
//!   copy races them; a partly covered unhydrated region parks the request until the
//!   region is hydrated (urgently), then the request runs again from the start.
//! - DISCARD: whole unhydrated regions are marked hydrated without copying; the
//!   region-aligned range is passed down unless `no_discard_passdown`.
//! - FLUSH: handed to the commit thread, which flushes the destination and commits
//!   the metadata, then posts the completion back here.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vhost_user_blk::{BlockError, BlockOp, BlockWorker, Completion, GuestBuf, SECTOR_SIZE};

use super::engine::{lock, MailItem, Mailbox, Parked, ParkedReq, Shared, SourceIo};
use super::guest_io::{slice_iovecs, total_len, DualFd};
use super::{Admit, MetadataMode};
use crate::io::{EofPolicy, FileKind, Ring};
use crate::source::ReadDst;

const RING_ENTRIES: u32 = 256;

/// One guest request in progress.
struct Req {
    tag: u64,
    remaining: usize,
    error: Option<BlockError>,
    /// Unhydrated regions this request overwrites whole: marked hydrated on success.
    overwrites: Vec<u64>,
    guest_io: bool,
}

/// Regions a discard marks per round of [`super::RegionLocks::mark_idle`] (how long it holds every
/// region-lock shard: a few hundred microseconds).
const DISCARD_CHUNK_REGIONS: u64 = 1 << 20;

/// A queue thread's I/O engine for the clone target.
pub struct CloneWorker {
    shared: Arc<Shared>,
    ring: Ring,
    mailbox: Arc<Mailbox>,
    read_only: bool,
    reqs: Vec<Option<Req>>,
    free: Vec<usize>,
    /// Completions ready to hand to the device.
    ready: Vec<Completion>,
    /// Parked requests (waiting in region locks or for a flush).
    parked: usize,
    /// Reads in flight at a remote (NBD) source.
    remote: usize,
    scratch: Vec<crate::io::RingCompletion>,
}

/// Guest bytes `[buf_off, buf_off + len)` of a request, at byte `offset` of a device.
#[derive(Clone, Copy)]
struct Span {
    buf_off: usize,
    len: usize,
    offset: u64,
}

/// What to do with a write-like request's data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Data {
    Guest,
    Zeroes { unmap: bool },
}

impl CloneWorker {
    pub(super) fn new(shared: Arc<Shared>, read_only: bool) -> io::Result<Self> {
        let ring = Ring::new(RING_ENTRIES).map_err(io::Error::from)?;
        let mailbox = Arc::new(Mailbox::new(ring.event_fd())?);
        Ok(CloneWorker {
            shared,
            ring,
            mailbox,
            read_only,
            reqs: Vec::new(),
            free: Vec::new(),
            ready: Vec::new(),
            parked: 0,
            remote: 0,
            scratch: Vec::new(),
        })
    }

    fn new_req(&mut self, tag: u64, guest_io: bool) -> usize {
        if guest_io {
            self.shared.sched.guest_io_started();
        }
        let req = Req {
            tag,
            // One extra reference held while sub-operations are being submitted.
            remaining: 1,
            error: None,
            overwrites: Vec::new(),
            guest_io,
        };
        match self.free.pop() {
            Some(i) => {
                if let Some(slot) = self.reqs.get_mut(i) {
                    *slot = Some(req);
                }
                i
            }
            None => {
                self.reqs.push(Some(req));
                self.reqs.len() - 1
            }
        }
    }

    fn fail_sub(&mut self, idx: usize, e: BlockError) {
        if let Some(Some(r)) = self.reqs.get_mut(idx) {
            r.error.get_or_insert(e);
        }
    }

    /// One sub-operation (or the submission reference) of request `idx` is done.
    fn put(&mut self, idx: usize) {
        let Some(Some(r)) = self.reqs.get_mut(idx) else {
            return;
        };
        r.remaining = r.remaining.saturating_sub(1);
        if r.remaining > 0 {
            return;
        }
        let Some(req) = self.reqs.get_mut(idx).and_then(Option::take) else {
            return;
        };
        self.free.push(idx);
        if req.guest_io {
            self.shared.sched.guest_io_finished();
        }
        let ok = req.error.is_none();
        for &r in &req.overwrites {
            if ok {
                self.shared.map.mark_hydrated(r);
            }
            for w in self.shared.locks.finish_overwrite(r) {
                w.mailbox.post(MailItem::Resume(w.req));
            }
        }
        if ok && !req.overwrites.is_empty() {
            self.shared.note_guest_change();
            if self.shared.map.all_hydrated() {
                self.shared.wake_committer();
            }
        }
        self.ready.push(Completion {
            tag: req.tag,
            result: req.error.map_or(Ok(()), Err),
        });
    }

    fn token(idx: usize) -> u64 {
        idx as u64
    }

    /// Submit a read or write of the guest bytes of `span`.
    fn submit_rw(
        &mut self,
        idx: usize,
        to_source: bool,
        write: bool,
        bufs: &[GuestBuf],
        span: Span,
    ) {
        let Span {
            buf_off,
            len,
            offset,
        } = span;
        let Some(iov) = slice_iovecs(bufs, buf_off, len) else {
            self.fail_sub(
                idx,
                BlockError::Io(io::Error::from_raw_os_error(libc::EFAULT)),
            );
            return;
        };
        let s = &self.shared;
        let fd = if to_source {
            match &s.source {
                SourceIo::File { direct, buffered } => DualFd {
                    direct: direct.as_raw_fd(),
                    align: direct.align(),
                    buffered,
                }
                .pick(&iov, offset),
                SourceIo::Nbd(pool) => {
                    let bufs = iov
                        .iter()
                        .map(|v| GuestBuf {
                            ptr: v.iov_base.cast(),
                            len: v.iov_len,
                        })
                        .collect();
                    let mailbox = self.mailbox.clone();
                    self.remote += 1;
                    hold(&mut self.reqs, idx);
                    pool.read(
                        offset,
                        ReadDst::Guest(bufs),
                        Box::new(move |_, result| {
                            let result = result.map_err(|e| format!("reading the NBD source: {e}"));
                            mailbox.post(MailItem::RemoteDone(idx, result));
                        }),
                    );
                    return;
                }
            }
        } else {
            DualFd {
                direct: s.dest.as_raw_fd(),
                align: s.dest.align(),
                buffered: &s.dest_buffered,
            }
            .pick(&iov, offset)
        };
        let fd = RawFdRef(fd);
        // SAFETY: the iovecs point into guest buffers that the device keeps mapped and
        // reserved for this request until its completion is reaped (BlockWorker contract);
        // the request completes only after every sub-operation has been reaped.
        let submitted = unsafe {
            if write {
                self.ring.submit_writev(&fd, offset, &iov, Self::token(idx))
            } else {
                self.ring
                    .submit_readv(&fd, offset, &iov, EofPolicy::Error, Self::token(idx))
            }
        };
        match submitted {
            Ok(()) => hold(&mut self.reqs, idx),
            Err(e) => self.fail_sub(idx, BlockError::Io(e.into())),
        }
    }

    fn start(&mut self, tag: u64, op: BlockOp, bufs: &[GuestBuf]) {
        match op {
            BlockOp::Read { sector } => self.read(tag, sector, bufs),
            BlockOp::Write { sector } => {
                let nr = total_len(bufs).map_or(0, |l| (l as u64) / SECTOR_SIZE);
                self.modify(tag, op, sector, nr, bufs, Data::Guest)
            }
            BlockOp::WriteZeroes {
                sector,
                nr_sectors,
                unmap,
            } => self.modify(tag, op, sector, nr_sectors, bufs, Data::Zeroes { unmap }),
            BlockOp::Discard { sector, nr_sectors } => self.discard(tag, sector, nr_sectors),
            BlockOp::Flush => self.flush(tag),
        }
    }

    fn complete_now(&mut self, tag: u64, result: Result<(), BlockError>) {
        self.ready.push(Completion { tag, result });
    }

    fn range_ok(&mut self, tag: u64, sector: u64, nr: u64) -> bool {
        let cap = self.shared.len;
        if sector.checked_add(nr).is_none_or(|end| end > cap) {
            self.complete_now(
                tag,
                Err(BlockError::OutOfRange {
                    sector,
                    nr_sectors: nr,
                    capacity: cap,
                }),
            );
            return false;
        }
        true
    }

    fn read(&mut self, tag: u64, sector: u64, bufs: &[GuestBuf]) {
        let Some(len) = total_len(bufs) else {
            return self.complete_now(
                tag,
                Err(BlockError::Io(io::Error::from_raw_os_error(libc::EINVAL))),
            );
        };
        let nr = len as u64 / SECTOR_SIZE;
        if !self.range_ok(tag, sector, nr) {
            return;
        }
        let idx = self.new_req(tag, true);
        let runs = match read_runs(&self.shared, sector, nr) {
            Ok(runs) => runs,
            Err(e) => {
                self.fail_sub(idx, BlockError::Io(io::Error::other(e.to_string())));
                return self.put(idx);
            }
        };
        for (from_source, start, n) in runs {
            let buf_off = ((start - sector) * SECTOR_SIZE) as usize;
            let bytes = (n * SECTOR_SIZE) as usize;
            let span = Span {
                buf_off,
                len: bytes,
                offset: start * SECTOR_SIZE,
            };
            self.submit_rw(idx, from_source, false, bufs, span);
        }
        self.put(idx);
    }

    /// Release overwrite locks taken by an admission that then had to park.
    fn undo_overwrites(&self, taken: &[u64]) {
        for &r in taken {
            for w in self.shared.locks.finish_overwrite(r) {
                w.mailbox.post(MailItem::Resume(w.req));
            }
        }
    }

    fn park(&mut self, tag: u64, op: BlockOp, bufs: &[GuestBuf]) -> Parked {
        self.parked += 1;
        Parked {
            mailbox: self.mailbox.clone(),
            req: ParkedReq {
                tag,
                op,
                bufs: bufs.to_vec(),
            },
        }
    }

    fn modify(
        &mut self,
        tag: u64,
        op: BlockOp,
        sector: u64,
        nr: u64,
        bufs: &[GuestBuf],
        data: Data,
    ) {
        if self.read_only {
            return self.complete_now(tag, Err(BlockError::ReadOnly));
        }
        if !self.range_ok(tag, sector, nr) {
            return;
        }
        let s = self.shared.clone();
        let Ok(split) = s.geo.split(sector, nr) else {
            return self.complete_now(
                tag,
                Err(BlockError::Io(io::Error::from_raw_os_error(libc::EINVAL))),
            );
        };
        let metadata_ok = s.mode() == MetadataMode::Rw;
        // Admission: take overwrite locks on whole unhydrated regions; park on the first
        // partly covered unhydrated region (or on a whole one whose copy is in flight).
        let mut taken: Vec<u64> = Vec::new();
        for seg in split {
            if s.map.is_hydrated(seg.region) {
                continue;
            }
            if !metadata_ok {
                self.undo_overwrites(&taken);
                return self.complete_now(tag, Err(BlockError::ReadOnly));
            }
            if seg.full && s.locks.start_overwrite(seg.region) {
                taken.push(seg.region);
                continue;
            }
            self.undo_overwrites(&taken);
            let parked = self.park(tag, op, bufs);
            match s.locks.admit_write(seg.region, parked, &s.map) {
                Admit::Proceed(p) => {
                    // Hydrated meanwhile: start over.
                    self.parked -= 1;
                    return self.modify(tag, op, sector, nr, &p.req.bufs, data);
                }
                Admit::Queued => {}
                Admit::QueuedNeedsCopy => {
                    s.sched.push_urgent(seg.region);
                    s.wake_hydrator();
                }
            }
            return;
        }
        let idx = self.new_req(tag, true);
        if let Some(Some(r)) = self.reqs.get_mut(idx) {
            r.overwrites = taken;
        }
        let offset = sector * SECTOR_SIZE;
        let bytes = nr * SECTOR_SIZE;
        match data {
            Data::Guest => {
                let span = Span {
                    buf_off: 0,
                    len: bytes as usize,
                    offset,
                };
                self.submit_rw(idx, false, true, bufs, span)
            }
            Data::Zeroes { unmap } => self.submit_zeroes(idx, offset, bytes, unmap),
        }
        self.put(idx);
    }

    fn submit_zeroes(&mut self, idx: usize, offset: u64, len: u64, unmap: bool) {
        let s = &self.shared;
        let result = if s.dest.kind() == FileKind::BlockDevice {
            // Synchronous: block devices have no asynchronous zero-out through the ring.
            s.dest
                .blk_zeroout(offset, len)
                .map_err(BlockError::Io)
                .map(|()| false)
        } else {
            let mode = if unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            self.ring
                .submit_fallocate(&s.dest, mode, offset, len, Self::token(idx))
                .map_err(|e| BlockError::Io(e.into()))
                .map(|()| true)
        };
        match result {
            Ok(true) => hold(&mut self.reqs, idx),
            Ok(false) => {}
            Err(e) => self.fail_sub(idx, e),
        }
    }

    fn discard(&mut self, tag: u64, sector: u64, nr: u64) {
        if self.read_only {
            return self.complete_now(tag, Err(BlockError::ReadOnly));
        }
        if !self.range_ok(tag, sector, nr) {
            return;
        }
        let s = self.shared.clone();
        let Ok(range) = s.geo.regions_discardable(sector, nr) else {
            return self.complete_now(
                tag,
                Err(BlockError::Io(io::Error::from_raw_os_error(libc::EINVAL))),
            );
        };
        if range.is_empty() {
            return self.complete_now(tag, Ok(()));
        }
        if s.mode() != MetadataMode::Rw && (range.start..range.end).any(|r| !s.map.is_hydrated(r)) {
            return self.complete_now(tag, Err(BlockError::ReadOnly));
        }
        // Whole unhydrated regions not being copied become hydrated without a copy, at
        // once: a discarded range reads as unspecified data, so nothing waits for the
        // passdown, and a discard of the whole device holds no per-region state (memory
        // stays flat however large the guest's request). A region whose copy is in flight
        // keeps its source data: discard is a hint.
        let mut chunk = range.start;
        while chunk < range.end {
            let end = chunk.saturating_add(DISCARD_CHUNK_REGIONS).min(range.end);
            for r in s.locks.mark_idle(chunk..end, &s.map) {
                if !s.map.is_hydrated(r) && s.locks.start_overwrite(r) {
                    s.map.mark_hydrated(r);
                    for w in s.locks.finish_overwrite(r) {
                        w.mailbox.post(MailItem::Resume(w.req));
                    }
                }
            }
            chunk = end;
        }
        s.note_guest_change();
        if s.map.all_hydrated() {
            s.wake_committer();
        }
        let idx = self.new_req(tag, false);
        if !s.spec.no_discard_passdown {
            let start = range.start * s.geo.region_sectors() * SECTOR_SIZE;
            let end = (range.end * s.geo.region_sectors()).min(s.len) * SECTOR_SIZE;
            let len = end.saturating_sub(start);
            if s.dest.kind() == FileKind::BlockDevice {
                if let Err(e) = s.dest.blk_discard(start, len) {
                    log::warn!("clone: discard passdown failed (ignored): {e}");
                }
            } else {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                match self
                    .ring
                    .submit_fallocate(&s.dest, mode, start, len, Self::token(idx))
                {
                    Ok(()) => hold(&mut self.reqs, idx),
                    Err(e) => log::warn!("clone: discard passdown failed (ignored): {e}"),
                }
            }
        }
        self.put(idx);
    }

    fn flush(&mut self, tag: u64) {
        self.parked += 1;
        lock(&self.shared.flushes).push((self.mailbox.clone(), tag));
        self.shared.wake_committer();
    }

    /// Finish what the ring completed, run what other threads posted, push new I/O.
    fn progress(&mut self) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.ring.reap(&mut scratch);
        for c in scratch.drain(..) {
            let idx = usize::try_from(c.token).unwrap_or(usize::MAX);
            if let Err(e) = c.result {
                self.fail_sub(idx, BlockError::Io(e));
            }
            self.put(idx);
        }
        self.scratch = scratch;
        self.handle_mail();
        if let Err(e) = self.ring.kick() {
            log::error!("clone: submitting I/O: {e}");
        }
    }

    fn handle_mail(&mut self) {
        for item in self.mailbox.take() {
            match item {
                MailItem::Resume(p) => {
                    self.parked = self.parked.saturating_sub(1);
                    self.start(p.tag, p.op, &p.bufs);
                }
                MailItem::Fail(p, why) => {
                    self.parked = self.parked.saturating_sub(1);
                    log::warn!("clone: request failed: {why}");
                    self.complete_now(p.tag, Err(BlockError::Io(io::Error::other(why))));
                }
                MailItem::RemoteDone(idx, result) => {
                    self.remote = self.remote.saturating_sub(1);
                    if let Err(why) = result {
                        log::warn!("clone: {why}");
                        self.fail_sub(idx, BlockError::Io(io::Error::other(why)));
                    }
                    self.put(idx);
                }
                MailItem::FlushDone(tag, result) => {
                    self.parked = self.parked.saturating_sub(1);
                    let result = result.map_err(|why| {
                        log::warn!("clone: flush failed: {why}");
                        BlockError::Io(io::Error::other(why))
                    });
                    self.complete_now(tag, result);
                }
            }
        }
    }
}

/// The runs of a read: consecutive segments with the same origin become one I/O
/// `(from_source, start sector, sectors)`. Unhydrated regions are hinted to the
/// hydration scheduler while background hydration is enabled.
fn read_runs(
    s: &Shared,
    sector: u64,
    nr: u64,
) -> Result<Vec<(bool, u64, u64)>, super::GeometryError> {
    let hint = s.sched.is_enabled();
    let mut runs: Vec<(bool, u64, u64)> = Vec::new();
    for seg in s.geo.split(sector, nr)? {
        let from_source = !s.map.is_hydrated(seg.region);
        if from_source && hint && s.sched.hint(seg.region, &s.map) {
            s.wake_hydrator();
        }
        match runs.last_mut() {
            Some((src, _, n)) if *src == from_source => *n += seg.nr_sectors,
            _ => runs.push((from_source, seg.sector, seg.nr_sectors)),
        }
    }
    Ok(runs)
}

/// One more sub-operation of request `idx` is in flight.
fn hold(reqs: &mut [Option<Req>], idx: usize) {
    if let Some(Some(r)) = reqs.get_mut(idx) {
        r.remaining += 1;
    }
}

/// A borrowed raw descriptor, for ring calls that take `AsRawFd`.
struct RawFdRef(RawFd);

impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

// The destination may be written through either descriptor.
impl crate::io::WritableFd for RawFdRef {}

impl BlockWorker for CloneWorker {
    fn event_fd(&self) -> RawFd {
        self.ring.event_fd()
    }

    fn submit(&mut self, tag: u64, op: BlockOp, bufs: &[GuestBuf]) {
        self.start(tag, op, bufs);
    }

    fn kick(&mut self) {
        if let Err(e) = self.ring.kick() {
            log::error!("clone: submitting I/O: {e}");
        }
    }

    fn reap(&mut self, done: &mut Vec<Completion>) {
        self.progress();
        done.append(&mut self.ready);
    }

    fn completions_ready(&mut self) -> bool {
        !self.ready.is_empty()
            || self.ring.completions_ready()
            || ((self.parked > 0 || self.remote > 0) && self.mailbox.has_items())
    }

    fn in_flight(&self) -> usize {
        self.ring.in_flight() + self.parked + self.remote + self.ready.len()
    }

    fn drain(&mut self) {
        while self.ring.in_flight() > 0 || self.parked > 0 || self.remote > 0 {
            if self.ring.in_flight() > 0 {
                if let Err(e) = self.ring.wait() {
                    log::error!("clone: waiting for I/O: {e}");
                    break;
                }
            } else {
                // Parked requests and remote reads come back through the mailbox; wait
                // for its eventfd.
                let mut pfd = libc::pollfd {
                    fd: self.ring.event_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 100) };
            }
            self.progress();
        }
    }
}
