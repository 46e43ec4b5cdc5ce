//! An io_uring with a completion eventfd, for epoll-driven direct I/O.
//!
//! Submissions only fill the submission queue; [`Ring::kick`] makes the one `io_uring_enter`
//! per batch. Each in-flight operation lives in a slab slot (its index is the SQE user_data)
//! that owns what the kernel still points at: the iovec array, the bounce buffer. Short reads
//! and writes are resubmitted for the remainder inside [`Ring::reap`]; the caller sees one
//! completion per submission, carrying its own `u64` token.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::aligned::{AlignedBuf, AlignedBufError};
use super::file::WritableFd;

/// Most iovecs one readv/writev may carry (Linux `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Chunk of the shared zero buffer used by [`Ring::submit_write_zeroes`].
const ZERO_CHUNK: usize = 256 * 1024;
/// iovecs per write-zeroes round (64 MiB per round).
const ZERO_IOVS: usize = 256;

/// Ring set-up and submission failures. Per-operation I/O errors come back as completions.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// io_uring_setup failed (kernel too old, io_uring disabled by sysctl or seccomp, RLIMIT_MEMLOCK).
    #[error(
        "cannot create an io_uring with {entries} entries (is io_uring allowed here?): {source}"
    )]
    Setup { entries: u32, source: io::Error },
    /// eventfd(2) failed.
    #[error("cannot create the completion eventfd: {0}")]
    EventFd(io::Error),
    /// IORING_REGISTER_EVENTFD failed.
    #[error("cannot register the completion eventfd with the io_uring: {0}")]
    RegisterEventFd(io::Error),
    /// io_uring_enter failed.
    #[error("io_uring_enter failed while submitting: {0}")]
    Submit(io::Error),
    /// More iovecs than the kernel accepts in one call.
    #[error("{0} iovecs in one request; the kernel accepts at most {MAX_IOVECS}")]
    TooManyIovecs(usize),
    /// A length does not fit the platform or the buffer.
    #[error("length {len} is invalid for this operation: {why}")]
    BadLength { len: u64, why: &'static str },
    /// The shared zero buffer could not be allocated.
    #[error("cannot allocate the zero buffer: {0}")]
    ZeroBuf(#[from] AlignedBufError),
}

impl From<RingError> for io::Error {
    fn from(e: RingError) -> Self {
        match e {
            RingError::Setup { source, .. } => source,
            RingError::EventFd(s) | RingError::RegisterEventFd(s) | RingError::Submit(s) => s,
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        }
    }
}

/// What a read does when it meets end of file before filling the buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EofPolicy {
    /// Complete with `UnexpectedEof` (the range was supposed to exist).
    Error,
    /// Zero the rest of the buffers and complete with the full length (reading a source whose
    /// size is not a multiple of the region size).
    ZeroFill,
}

/// One finished operation.
#[derive(Debug)]
pub struct RingCompletion {
    /// The caller's token.
    pub token: u64,
    /// Bytes transferred (the full requested length on success), or the error.
    pub result: io::Result<usize>,
    /// The buffer given to [`Ring::submit_read_buf`] / [`Ring::submit_write_buf`], handed back.
    pub buf: Option<AlignedBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read(EofPolicy),
    Write,
    WriteZeroes,
    Fsync { datasync: bool },
    Fallocate { mode: i32, len: u64 },
}

struct Op {
    token: u64,
    kind: Kind,
    fd: RawFd,
    /// File offset of the first byte of the whole operation.
    offset: u64,
    iovecs: Vec<libc::iovec>,
    /// First iovec not yet fully transferred.
    first: usize,
    done: usize,
    total: usize,
    buf: Option<AlignedBuf>,
}

impl Op {
    fn new(token: u64, kind: Kind, fd: RawFd, offset: u64) -> Self {
        Self {
            token,
            kind,
            fd,
            offset,
            iovecs: Vec::new(),
            first: 0,
            done: 0,
            total: 0,
            buf: None,
        }
    }

    /// Account `n` transferred bytes, trimming the iovec array.
    fn advance(&mut self, mut n: usize) {
        self.done = self.done.saturating_add(n);
        while n > 0 {
            let Some(iov) = self.iovecs.get_mut(self.first) else {
                break;
            };
            if n >= iov.iov_len {
                n -= iov.iov_len;
                self.first += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }

    fn entry(&self, slot: usize) -> Result<squeue::Entry, RingError> {
        let fd = types::Fd(self.fd);
        let pos = self
            .offset
            .checked_add(self.done as u64)
            .ok_or(RingError::BadLength {
                len: self.offset,
                why: "offset overflows",
            })?;
        let iov = self.iovecs.get(self.first..).unwrap_or(&[]);
        let n = u32::try_from(iov.len()).map_err(|_| RingError::TooManyIovecs(iov.len()))?;
        let e = match self.kind {
            Kind::Read(_) => opcode::Readv::new(fd, iov.as_ptr(), n).offset(pos).build(),
            Kind::Write | Kind::WriteZeroes => {
                opcode::Writev::new(fd, iov.as_ptr(), n).offset(pos).build()
            }
            Kind::Fsync { datasync } => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(fd).flags(flags).build()
            }
            Kind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
                .offset(self.offset)
                .mode(mode)
                .build(),
        };
        Ok(e.user_data(slot as u64))
    }

    /// For write-zeroes: lay out the next round of iovecs over the shared zero buffer.
    fn next_zero_round(&mut self, zero: *const u8) {
        let mut left = self.total.saturating_sub(self.done);
        self.iovecs.clear();
        self.first = 0;
        while left > 0 && self.iovecs.len() < ZERO_IOVS {
            let l = left.min(ZERO_CHUNK);
            self.iovecs.push(libc::iovec {
                iov_base: zero.cast_mut().cast(),
                iov_len: l,
            });
            left -= l;
        }
    }

    fn finish(self, result: io::Result<usize>) -> RingCompletion {
        RingCompletion {
            token: self.token,
            result,
            buf: self.buf,
        }
    }
}

/// An io_uring instance whose completions signal an eventfd.
pub struct Ring {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Entries that did not fit in the SQ even after a submit.
    backlog: VecDeque<squeue::Entry>,
    cqes: Vec<(u64, i32)>,
    zero: Option<AlignedBuf>,
}

/// See [`Ring::submit_early`]. Measured on the benchmark VM (4 KiB random reads, QD32):
/// one queue +22-24 % IOPS against submitting a whole batch at once, whose requests then
/// completed and came back together, leaving the virtual disk idle 38 % of the time; four
/// queues on two CPUs within -3 % (more system calls). Divisors 2 and 8 measured alike
/// (+33 %, within the noise); fixed batches of 4 gave one queue +29-44 % but cost four queues
/// 5-15 %.
const EARLY_SUBMIT_DIVISOR: usize = 4;

// SAFETY: the raw pointers inside `Op::iovecs` point either into buffers the Ring owns
// (AlignedBuf, Send) or into caller memory that the `unsafe` submit contracts keep valid until
// completion whichever thread reaps; IoUring and EventFd are plain fds plus mmaps.
unsafe impl Send for Ring {}

impl Ring {
    /// Create a ring with `entries` SQ entries and a registered non-blocking eventfd.
    /// The completion queue is twice as large; more completions than that in flight are
    /// kept by the kernel (IORING_FEAT_NODROP) and flushed by `reap`.
    pub fn new(entries: u32) -> Result<Self, RingError> {
        let ring = IoUring::new(entries).map_err(|source| RingError::Setup { entries, source })?;
        Self::with_ring(ring)
    }

    /// Like [`Ring::new`] with an explicit completion queue size (at least `entries`), for
    /// callers that keep many more operations in flight than they submit per batch.
    pub fn with_cq_size(entries: u32, cq_entries: u32) -> Result<Self, RingError> {
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries.max(entries))
            .build(entries)
            .map_err(|source| RingError::Setup { entries, source })?;
        Self::with_ring(ring)
    }

    fn with_ring(ring: IoUring) -> Result<Self, RingError> {
        let eventfd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(RingError::EventFd)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(RingError::RegisterEventFd)?;
        Ok(Self {
            ring,
            eventfd,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            backlog: VecDeque::new(),
            cqes: Vec::new(),
            zero: None,
        })
    }

    /// The eventfd to wait on (readable when completions may be ready; cleared by `reap`).
    pub fn event_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Signal the eventfd, for callers that completed work synchronously.
    pub fn notify(&self) {
        if let Err(e) = self.eventfd.write(1) {
            log::error!("cannot signal the ring eventfd: {e}");
        }
    }

    /// Whether the completion queue holds entries [`Ring::reap`] would collect; a read of
    /// shared memory, no system call (for busy-polling).
    pub fn completions_ready(&mut self) -> bool {
        self.in_flight > 0 && !self.ring.completion().is_empty()
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn insert(&mut self, op: Op) -> usize {
        self.in_flight += 1;
        if let Some(i) = self.free.pop() {
            if let Some(s) = self.slots.get_mut(i) {
                *s = Some(op);
                return i;
            }
        }
        self.slots.push(Some(op));
        self.slots.len() - 1
    }

    fn remove(&mut self, slot: usize) -> Option<Op> {
        let op = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.in_flight -= 1;
        Some(op)
    }

    /// Store `op` and queue its SQE; on failure nothing stays queued.
    fn start(&mut self, op: Op) -> Result<(), RingError> {
        let slot = self.insert(op);
        let entry = match self.slots.get(slot).and_then(Option::as_ref) {
            Some(op) => op.entry(slot),
            None => return Ok(()),
        };
        match entry {
            Ok(e) => {
                self.push(e);
                Ok(())
            }
            Err(err) => {
                self.remove(slot);
                Err(err)
            }
        }
    }

    /// Queue an SQE; if the SQ is full, kick and retry, else keep it in the backlog.
    fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() && self.try_push(&entry) {
            self.submit_early();
            return;
        }
        if self.backlog.is_empty() {
            if let Err(e) = self.kick() {
                log::warn!("submit while the SQ was full: {e}");
            }
            if self.try_push(&entry) {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    fn try_push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: every SQE we build points only at memory owned by the Op in its slot (iovec
        // array, AlignedBuf, the ring's zero buffer) or at caller memory the unsafe submit
        // contracts keep valid; the slot lives until the CQE is reaped, and Drop waits for
        // every in-flight operation.
        unsafe { self.ring.submission().push(entry).is_ok() }
    }

    /// Hand the queued SQEs to the kernel before the caller's [`Ring::kick`] once they
    /// number a quarter ([`EARLY_SUBMIT_DIVISOR`]) of the operations the kernel already
    /// holds, at least one. A device with little to do gets the first requests of a batch
    /// at once instead of after the whole batch was prepared; a busy one still gets
    /// batches (one system call, one device notification, for many requests).
    fn submit_early(&mut self) {
        let queued = self.ring.submission().len();
        let busy = self
            .in_flight
            .saturating_sub(queued.saturating_add(self.backlog.len()));
        if queued >= (busy / EARLY_SUBMIT_DIVISOR).max(1) {
            if let Err(e) = self.enter(0) {
                log::warn!("io_uring submit: {e}");
            }
        }
    }

    /// Push the backlog into the SQ and hand everything queued to the kernel (one syscall,
    /// none when nothing is queued).
    pub fn kick(&mut self) -> Result<usize, RingError> {
        while let Some(e) = self.backlog.front() {
            let e = e.clone();
            if !self.try_push(&e) {
                break;
            }
            self.backlog.pop_front();
        }
        if self.ring.submission().is_empty() {
            return Ok(0);
        }
        self.enter(0)
    }

    fn enter(&mut self, want: usize) -> Result<usize, RingError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // CQ overflow pending or out of resources: entries stay queued; reap and retry.
                Err(e)
                    if want == 0
                        && matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) =>
                {
                    return Ok(0)
                }
                Err(e) => return Err(RingError::Submit(e)),
            }
        }
    }

    /// Submit what is queued and block until at least one completion is ready (no-op when
    /// nothing is in flight). Follow with [`Ring::reap`].
    pub fn wait(&mut self) -> Result<(), RingError> {
        if self.in_flight == 0 {
            return Ok(());
        }
        self.kick()?;
        if self.ring.completion().is_empty() {
            self.enter(1)?;
        }
        Ok(())
    }

    fn iovec_total(iovecs: &[libc::iovec]) -> Result<usize, RingError> {
        if iovecs.len() > MAX_IOVECS {
            return Err(RingError::TooManyIovecs(iovecs.len()));
        }
        iovecs
            .iter()
            .try_fold(0usize, |acc, v| acc.checked_add(v.iov_len))
            .ok_or(RingError::BadLength {
                len: u64::MAX,
                why: "iovec lengths overflow",
            })
    }

    fn start_rw(
        &mut self,
        kind: Kind,
        fd: RawFd,
        offset: u64,
        iovecs: Vec<libc::iovec>,
        buf: Option<AlignedBuf>,
        token: u64,
    ) -> Result<(), RingError> {
        let mut op = Op::new(token, kind, fd, offset);
        op.total = Self::iovec_total(&iovecs)?;
        op.iovecs = iovecs;
        op.buf = buf;
        self.start(op)
    }

    /// Queue a vectored read of `iovecs` at `offset`.
    ///
    /// # Safety
    /// Every iovec must describe writable memory that stays valid, and is not otherwise
    /// accessed, until the completion carrying `token` has been returned by [`Ring::reap`]
    /// (or the ring is dropped, which waits for it).
    pub unsafe fn submit_readv(
        &mut self,
        fd: &impl AsRawFd,
        offset: u64,
        iovecs: &[libc::iovec],
        eof: EofPolicy,
        token: u64,
    ) -> Result<(), RingError> {
        let kind = Kind::Read(eof);
        self.start_rw(kind, fd.as_raw_fd(), offset, iovecs.to_vec(), None, token)
    }

    /// Queue a vectored write of `iovecs` at `offset`.
    ///
    /// # Safety
    /// Every iovec must describe readable memory that stays valid and unmodified until the
    /// completion carrying `token` has been returned by [`Ring::reap`] (or the ring is dropped).
    pub unsafe fn submit_writev<F: WritableFd>(
        &mut self,
        fd: &F,
        offset: u64,
        iovecs: &[libc::iovec],
        token: u64,
    ) -> Result<(), RingError> {
        let iov = iovecs.to_vec();
        self.start_rw(Kind::Write, fd.as_raw_fd(), offset, iov, None, token)
    }

    fn buf_iovec(buf: &mut AlignedBuf, len: usize) -> Result<Vec<libc::iovec>, RingError> {
        if len > buf.len() {
            return Err(RingError::BadLength {
                len: len as u64,
                why: "longer than the buffer",
            });
        }
        Ok(vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        }])
    }

    /// Read `len` bytes at `offset` into the start of `buf`, which the ring owns until the
    /// completion hands it back.
    pub fn submit_read_buf(
        &mut self,
        fd: &impl AsRawFd,
        offset: u64,
        mut buf: AlignedBuf,
        len: usize,
        eof: EofPolicy,
        token: u64,
    ) -> Result<(), RingError> {
        let iov = Self::buf_iovec(&mut buf, len)?;
        let fd = fd.as_raw_fd();
        self.start_rw(Kind::Read(eof), fd, offset, iov, Some(buf), token)
    }

    /// Write the first `len` bytes of `buf` at `offset`; the ring owns `buf` until completion.
    pub fn submit_write_buf<F: WritableFd>(
        &mut self,
        fd: &F,
        offset: u64,
        mut buf: AlignedBuf,
        len: usize,
        token: u64,
    ) -> Result<(), RingError> {
        let iov = Self::buf_iovec(&mut buf, len)?;
        let fd = fd.as_raw_fd();
        self.start_rw(Kind::Write, fd, offset, iov, Some(buf), token)
    }

    /// Write `len` zero bytes at `offset` from a shared zero buffer (in rounds of 64 MiB).
    pub fn submit_write_zeroes<F: WritableFd>(
        &mut self,
        fd: &F,
        offset: u64,
        len: u64,
        token: u64,
    ) -> Result<(), RingError> {
        let total = usize::try_from(len).map_err(|_| RingError::BadLength {
            len,
            why: "does not fit in usize",
        })?;
        let zero = match &self.zero {
            Some(z) => z.as_ptr(),
            None => self.zero.insert(AlignedBuf::new(ZERO_CHUNK)?).as_ptr(),
        };
        let mut op = Op::new(token, Kind::WriteZeroes, fd.as_raw_fd(), offset);
        op.total = total;
        op.next_zero_round(zero);
        self.start(op)
    }

    /// Queue fsync (`datasync`: fdatasync).
    pub fn submit_fsync<F: WritableFd>(
        &mut self,
        fd: &F,
        datasync: bool,
        token: u64,
    ) -> Result<(), RingError> {
        let op = Op::new(token, Kind::Fsync { datasync }, fd.as_raw_fd(), 0);
        self.start(op)
    }

    /// Queue fallocate(fd, mode, offset, len); completes with `Ok(0)`.
    pub fn submit_fallocate<F: WritableFd>(
        &mut self,
        fd: &F,
        mode: i32,
        offset: u64,
        len: u64,
        token: u64,
    ) -> Result<(), RingError> {
        let op = Op::new(token, Kind::Fallocate { mode, len }, fd.as_raw_fd(), offset);
        self.start(op)
    }

    /// Clear the eventfd and move every finished operation to `out`. Never blocks. Short
    /// transfers are resubmitted (and kicked) rather than reported.
    pub fn reap(&mut self, out: &mut Vec<RingCompletion>) {
        // Clear first: a CQE posted after this read signals the eventfd again.
        let _ = self.eventfd.read();
        let mut resubmitted = false;
        loop {
            self.cqes.clear();
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if self.cqes.is_empty() {
                // Completions the kernel kept aside while the CQ was full (IORING_FEAT_NODROP)
                // only come back through io_uring_enter; they do not signal the eventfd again.
                if self.ring.submission().cq_overflow() {
                    if let Err(e) = self.enter(0) {
                        log::error!("flushing overflowed completions: {e}");
                        break;
                    }
                    if !self.ring.completion().is_empty() {
                        continue;
                    }
                }
                break;
            }
            let cqes = std::mem::take(&mut self.cqes);
            for &(user_data, res) in &cqes {
                resubmitted |= self.complete(user_data, res, out);
            }
            self.cqes = cqes;
        }
        if resubmitted || !self.backlog.is_empty() {
            if let Err(e) = self.kick() {
                log::error!("resubmitting short transfers: {e}");
            }
        }
    }

    /// Handle one CQE. Returns true if the operation was resubmitted.
    fn complete(&mut self, user_data: u64, res: i32, out: &mut Vec<RingCompletion>) -> bool {
        let Ok(slot) = usize::try_from(user_data) else {
            return false;
        };
        let zero = self.zero.as_ref().map(|z| z.as_ptr());
        let Some(op) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            log::error!("io_uring completion for unknown slot {slot} (result {res})");
            return false;
        };
        let outcome: Option<io::Result<usize>> = if res < 0 {
            Some(Err(io::Error::from_raw_os_error(-res)))
        } else {
            match op.kind {
                Kind::Fsync { .. } | Kind::Fallocate { .. } => {
                    Some(Ok(usize::try_from(res).unwrap_or(0)))
                }
                Kind::Read(_) | Kind::Write | Kind::WriteZeroes => {
                    Self::progress(op, usize::try_from(res).unwrap_or(0), zero)
                }
            }
        };
        if let Some(result) = outcome {
            if let Some(op) = self.remove(slot) {
                out.push(op.finish(result));
            }
            return false;
        }
        // Resubmit the remainder.
        let entry = match self.slots.get(slot).and_then(Option::as_ref) {
            Some(op) => op.entry(slot),
            None => return false,
        };
        match entry {
            Ok(e) => {
                self.push(e);
                true
            }
            Err(err) => {
                if let Some(op) = self.remove(slot) {
                    out.push(op.finish(Err(err.into())));
                }
                false
            }
        }
    }

    /// Account `n` bytes of a read/write; `Some(result)` when the operation is over.
    fn progress(op: &mut Op, n: usize, zero: Option<*const u8>) -> Option<io::Result<usize>> {
        let remaining = op.total.saturating_sub(op.done);
        if n == 0 && remaining > 0 {
            let at = op.offset.saturating_add(op.done as u64);
            return Some(match op.kind {
                Kind::Read(EofPolicy::ZeroFill) => {
                    for iov in op.iovecs.get(op.first..).unwrap_or(&[]) {
                        // SAFETY: this iovec was accepted for a read, so by the submit contract
                        // (or because the ring owns the buffer) it is valid writable memory of
                        // iov_len bytes, and the kernel is done with it.
                        unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
                    }
                    Ok(op.total)
                }
                Kind::Read(EofPolicy::Error) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "short read: end of file at byte {at}, {remaining} of {} bytes missing \
                         (was the file truncated?)",
                        op.total
                    ),
                )),
                _ => Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("write of {remaining} bytes at byte {at} made no progress"),
                )),
            });
        }
        op.advance(n.min(remaining));
        if op.done >= op.total {
            return Some(Ok(op.total));
        }
        if op.kind == Kind::WriteZeroes && op.first >= op.iovecs.len() {
            match zero {
                Some(z) => op.next_zero_round(z),
                None => return Some(Err(io::Error::other("zero buffer missing"))),
            }
        }
        None
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers we own (or the caller's): wait for all of it.
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            if let Err(e) = self.wait() {
                log::error!("dropping a ring with {} ops in flight: {e}", self.in_flight);
                // Leak rather than free memory the kernel may still write.
                std::mem::forget(std::mem::take(&mut self.slots));
                std::mem::forget(self.zero.take());
                return;
            }
            self.reap(&mut sink);
            sink.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_trims_iovecs() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut op = Op::new(1, Kind::Write, -1, 0);
        op.iovecs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        op.total = 16;
        op.advance(3);
        assert_eq!((op.first, op.done, op.iovecs[0].iov_len), (0, 3, 5));
        op.advance(5);
        assert_eq!((op.first, op.done), (1, 8));
        op.advance(6);
        assert_eq!((op.first, op.iovecs[1].iov_len), (1, 2));
        assert_eq!(op.iovecs[1].iov_base, b[6..].as_mut_ptr().cast());
    }

    #[test]
    fn queued_reads_go_to_the_kernel_early_in_proportion_to_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let data: Vec<u8> = (0..64 * 4096).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut ring = Ring::new(64).unwrap();
        let read = |ring: &mut Ring, i: u64| {
            let buf = AlignedBuf::new(4096).unwrap();
            ring.submit_read_buf(&file, i * 4096, buf, 4096, EofPolicy::Error, i)
                .unwrap();
        };
        // While the kernel holds fewer than EARLY_SUBMIT_DIVISOR operations, every read goes
        // in at once (nothing is reaped here, so they all count as held).
        for i in 0..8 {
            read(&mut ring, i);
            assert_eq!(
                ring.ring.submission().len(),
                0,
                "read {i} was not submitted"
            );
        }
        // With 8 held, reads wait for a batch of 8 / 4 = 2.
        read(&mut ring, 8);
        assert_eq!(ring.ring.submission().len(), 1);
        read(&mut ring, 9);
        assert_eq!(ring.ring.submission().len(), 0);
        assert_eq!(ring.kick().unwrap(), 0, "nothing left to submit");
        let mut out = Vec::new();
        while out.len() < 10 {
            ring.wait().unwrap();
            ring.reap(&mut out);
        }
        out.sort_by_key(|c| c.token);
        for (i, c) in out.iter().enumerate() {
            assert_eq!(c.token, i as u64);
            assert_eq!(*c.result.as_ref().unwrap(), 4096);
            let buf = c.buf.as_ref().unwrap();
            assert_eq!(&buf.as_slice()[..4096], &data[i * 4096..(i + 1) * 4096]);
        }
    }
}
