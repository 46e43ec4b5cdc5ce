//! The contract between the virtio-blk device and whatever stores the blocks.
//!
//! The device (this crate) parses and validates guest requests, translates guest
//! buffers to host addresses, and hands each request to the [`BlockWorker`] of the
//! thread that owns the queue. The worker starts the I/O and returns at once; it
//! reports completions later through [`BlockWorker::reap`], after signalling its
//! eventfd. Requests may complete in any order.

use std::io;
use std::os::fd::RawFd;

/// Size of a virtio-blk sector: always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;

/// What the device looks like to the guest; fixed for the life of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (512 or 4096).
    pub logical_block_size: u32,
    /// log2(physical block size / logical block size).
    pub physical_block_exp: u8,
    /// Minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// The device refuses writes, discards and write-zeroes.
    pub read_only: bool,
    /// DISCARD is offered.
    pub discard: bool,
    /// WRITE_ZEROES is offered.
    pub write_zeroes: bool,
    /// Discard granularity in 512-byte sectors (the backend's natural unit, e.g. a region).
    pub discard_granularity_sectors: u32,
}

/// One guest buffer, as a host virtual address inside mapped guest memory.
#[derive(Clone, Copy, Debug)]
pub struct GuestBuf {
    /// Host address of the first byte.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a GuestBuf is a plain address range inside guest memory. The device keeps
// that memory mapped (it holds an Arc of the memory map) until the request that
// carries the buffer has completed, whichever thread touches it.
unsafe impl Send for GuestBuf {}
// SAFETY: as above; the range is only read or written by the one request that owns it.
unsafe impl Sync for GuestBuf {}

/// What a request asks for; ranges are in 512-byte sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Read `bufs` total bytes starting at `sector` into the guest buffers.
    Read { sector: u64 },
    /// Write the guest buffers starting at `sector`.
    Write { sector: u64 },
    /// Make every completed write durable.
    Flush,
    /// The guest no longer needs the range.
    Discard { sector: u64, nr_sectors: u64 },
    /// Make the range read as zeroes; `unmap` allows deallocating it.
    WriteZeroes {
        sector: u64,
        nr_sectors: u64,
        unmap: bool,
    },
}

/// Why a request failed; the device maps this to a virtio status in one place.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing store failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The backend does not do this operation.
    #[error("operation not supported")]
    Unsupported,
    /// The device is read-only (or its metadata became read-only).
    #[error("device is read-only")]
    ReadOnly,
    /// The range lies (partly) outside the device.
    #[error("sector range {sector}+{nr_sectors} is beyond the device capacity {capacity}")]
    OutOfRange {
        sector: u64,
        nr_sectors: u64,
        capacity: u64,
    },
}

/// One finished request.
#[derive(Debug)]
pub struct Completion {
    /// The tag given to [`BlockWorker::submit`].
    pub tag: u64,
    /// Outcome.
    pub result: Result<(), BlockError>,
}

/// A block store shared by all queue threads.
pub trait BlockBackend: Send + Sync + 'static {
    /// Per-thread I/O state (an io_uring ring, buffers, ...).
    type Worker: BlockWorker;

    /// The geometry shown to the guest.
    fn geometry(&self) -> DiskGeometry;

    /// Create the worker for queue thread `thread_index`. Called once per thread at start-up.
    fn new_worker(&self, thread_index: usize) -> io::Result<Self::Worker>;
}

/// The I/O engine of one queue thread. Only that thread ever calls it.
pub trait BlockWorker: Send + 'static {
    /// An eventfd that becomes readable when completions may be ready. The device
    /// registers it in the thread's epoll; the worker must tolerate spurious wake-ups
    /// and must clear (read) the eventfd itself inside `reap`.
    fn event_fd(&self) -> RawFd;

    /// Start one request. `bufs` are the guest data buffers in order (empty for
    /// flush, discard and write-zeroes). The buffers stay valid until the completion
    /// carrying `tag` has been returned by `reap`. Never blocks on disk I/O;
    /// failures are reported as completions, never panics.
    fn submit(&mut self, tag: u64, op: BlockOp, bufs: &[GuestBuf]);

    /// Called once after a batch of `submit` calls: push queued work to the kernel.
    fn kick(&mut self) {}

    /// Append every finished request to `done`. Must not block.
    fn reap(&mut self, done: &mut Vec<Completion>);

    /// Whether [`reap`](Self::reap) would hand back something now, judged without a system
    /// call (e.g. by looking at an io_uring completion queue). Called in a busy-poll loop,
    /// so it must be cheap. A false `false` only delays a completion until the eventfd
    /// wakes the thread; the default never claims anything is ready.
    fn completions_ready(&mut self) -> bool {
        false
    }

    /// Number of requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Block until every submitted request has completed (used on disconnect and
    /// shutdown); completions stay available to `reap`.
    fn drain(&mut self);
}

/// Told about every request the backend completed (for metrics). Called on the queue's
/// worker thread: keep it cheap and lock-free.
pub trait RequestObserver: Send + Sync + 'static {
    /// `queue` is the global queue index; `bytes` the data length of reads and writes.
    fn completed(
        &self,
        queue: usize,
        op: &BlockOp,
        bytes: u64,
        latency: std::time::Duration,
        ok: bool,
    );

    /// Queue thread `thread` finished probing whether polling pays (every few seconds while
    /// polling is enabled and tuned; see [`crate::poll_tuner`]).
    fn poll_probe(&self, thread: usize, result: &crate::poll_tuner::ProbeResult) {
        let _ = (thread, result);
    }
}
