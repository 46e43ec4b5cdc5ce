//! The `linear` target: dm's `linear <device> <offset>`, a window of a file or block device.
//!
//! Each queue thread gets a [`LinearWorker`] with its own io_uring [`Ring`]. Guest buffers go
//! straight to readv/writev when addresses, lengths and the offset meet the direct-I/O
//! alignment; otherwise the data goes through an aligned bounce buffer. Block-device discard
//! and write-zeroes use the BLKDISCARD/BLKZEROOUT ioctls **synchronously** (io_uring has no
//! asynchronous equivalent for a block device fd in the kernels we target); regular files use
//! fallocate through the ring.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost_user_blk::{
    BlockBackend, BlockError, BlockOp, BlockWorker, Completion, DiskGeometry, GuestBuf, SECTOR_SIZE,
};

use crate::io::{
    AlignedBuf, EofPolicy, FileInfo, FileKind, OpenError, ReadOnlyFile, ReadWriteFile, Ring,
    RingCompletion, MAX_IOVECS,
};

/// Discard granularity offered to the guest, in sectors (4 KiB).
pub const DISCARD_GRANULARITY_SECTORS: u32 = 8;

/// Submission queue entries per worker ring.
const RING_ENTRIES: u32 = 128;
/// Completion queue entries per worker ring: a full 1024-descriptor virtqueue fits.
const RING_CQ_ENTRIES: u32 = 1024;

/// Options of a linear table line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearOptions {
    /// Where the window starts on the device, in 512-byte sectors (dm's `<offset>`).
    pub offset_sectors: u64,
    /// Window length in sectors; `None`: the rest of the device (rounded down to whole
    /// logical blocks).
    pub length_sectors: Option<u64>,
    /// Refuse writes, discards and write-zeroes; open the device `O_RDONLY`.
    pub read_only: bool,
    /// Logical block size shown to the guest: 512 or 4096.
    pub logical_block_size: u32,
}

impl Default for LinearOptions {
    fn default() -> Self {
        Self {
            offset_sectors: 0,
            length_sectors: None,
            read_only: false,
            logical_block_size: 512,
        }
    }
}

/// Why a linear target could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LinearError {
    /// Opening the device failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Logical block size other than 512 or 4096.
    #[error("logical block size {0} is not supported: use 512 or 4096")]
    BadLogicalBlockSize(u32),
    /// A writable target over a read-only handle.
    #[error("{path}: a writable linear target needs a read-write handle (or set read_only)")]
    NeedsWritableHandle { path: PathBuf },
    /// The window does not fit on the device.
    #[error(
        "{path}: sectors {offset_sectors}+{length_sectors} exceed the device size of \
         {device_sectors} sectors"
    )]
    RangeBeyondDevice {
        path: PathBuf,
        offset_sectors: u64,
        length_sectors: u64,
        device_sectors: u64,
    },
    /// The window is empty.
    #[error("{path}: the linear window at sector {offset_sectors} is empty")]
    Empty { path: PathBuf, offset_sectors: u64 },
    /// Length not a whole number of logical blocks.
    #[error("length of {length_sectors} sectors is not a multiple of the {logical_block_size}-byte logical block size")]
    LengthNotBlockMultiple {
        length_sectors: u64,
        logical_block_size: u32,
    },
    /// The device's direct-I/O alignment cannot be met by guest requests.
    #[error(
        "{path}: {what} ({value}) is not a multiple of the device's direct-I/O alignment \
         {align} bytes; use a larger logical block size or offset"
    )]
    Misaligned {
        path: PathBuf,
        what: &'static str,
        value: u64,
        align: u32,
    },
}

/// The handle a linear target serves from.
#[derive(Debug)]
pub enum LinearFile {
    /// Writable device.
    ReadWrite(ReadWriteFile),
    /// Read-only device: the target is read-only whatever the options say.
    ReadOnly(ReadOnlyFile),
}

impl LinearFile {
    /// Kind, size, alignment.
    pub fn info(&self) -> &FileInfo {
        match self {
            Self::ReadWrite(f) => f.info(),
            Self::ReadOnly(f) => f.info(),
        }
    }

    /// Path opened.
    pub fn path(&self) -> &Path {
        match self {
            Self::ReadWrite(f) => f.path(),
            Self::ReadOnly(f) => f.path(),
        }
    }

    fn writable(&self) -> Option<&ReadWriteFile> {
        match self {
            Self::ReadWrite(f) => Some(f),
            Self::ReadOnly(_) => None,
        }
    }
}

impl AsRawFd for LinearFile {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::ReadWrite(f) => f.as_raw_fd(),
            Self::ReadOnly(f) => f.as_raw_fd(),
        }
    }
}

impl Shared {
    fn writable(&self) -> Result<&ReadWriteFile, BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.file.writable().ok_or(BlockError::ReadOnly)
    }
}

#[derive(Debug)]
struct Shared {
    file: LinearFile,
    offset_sectors: u64,
    length_sectors: u64,
    read_only: bool,
    geometry: DiskGeometry,
}

/// A linear mapping of the guest disk onto a window of a file or block device.
#[derive(Debug, Clone)]
pub struct LinearTarget {
    shared: Arc<Shared>,
}

impl LinearTarget {
    /// Open `path` (read-only if `opts.read_only`) and build the target.
    pub fn open(path: impl AsRef<Path>, opts: &LinearOptions) -> Result<Self, LinearError> {
        let file = if opts.read_only {
            LinearFile::ReadOnly(ReadOnlyFile::open(path)?)
        } else {
            LinearFile::ReadWrite(ReadWriteFile::open(path)?)
        };
        Self::new(file, opts)
    }

    /// Make every completed write durable (fdatasync); a no-op when read-only.
    pub fn sync(&self) -> io::Result<()> {
        match self.shared.file.writable() {
            // SAFETY: fdatasync(2) on a descriptor the target keeps open.
            Some(f) => match unsafe { libc::fdatasync(f.as_raw_fd()) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            },
            None => Ok(()),
        }
    }

    /// Build the target over an opened handle.
    pub fn new(file: LinearFile, opts: &LinearOptions) -> Result<Self, LinearError> {
        let lbs = opts.logical_block_size;
        if lbs != 512 && lbs != 4096 {
            return Err(LinearError::BadLogicalBlockSize(lbs));
        }
        let path = file.path().to_owned();
        let read_only = opts.read_only || file.writable().is_none();
        if !opts.read_only && file.writable().is_none() {
            return Err(LinearError::NeedsWritableHandle { path });
        }
        let info = file.info().clone();
        let device_sectors = info.size / SECTOR_SIZE;
        let lbs_sectors = u64::from(lbs) / SECTOR_SIZE;
        let length_sectors = match opts.length_sectors {
            Some(l) => {
                if l % lbs_sectors != 0 {
                    return Err(LinearError::LengthNotBlockMultiple {
                        length_sectors: l,
                        logical_block_size: lbs,
                    });
                }
                l
            }
            None => {
                let rest = device_sectors.saturating_sub(opts.offset_sectors);
                rest - rest % lbs_sectors
            }
        };
        let fits = opts
            .offset_sectors
            .checked_add(length_sectors)
            .is_some_and(|end| end <= device_sectors);
        if !fits {
            return Err(LinearError::RangeBeyondDevice {
                path,
                offset_sectors: opts.offset_sectors,
                length_sectors,
                device_sectors,
            });
        }
        if length_sectors == 0 {
            return Err(LinearError::Empty {
                path,
                offset_sectors: opts.offset_sectors,
            });
        }
        let align = info.align.offset;
        if u64::from(lbs) % u64::from(align) != 0 {
            return Err(LinearError::Misaligned {
                path,
                what: "logical block size",
                value: u64::from(lbs),
                align,
            });
        }
        let offset_bytes = opts.offset_sectors.saturating_mul(SECTOR_SIZE);
        if !offset_bytes.is_multiple_of(u64::from(align)) {
            return Err(LinearError::Misaligned {
                path,
                what: "offset in bytes",
                value: offset_bytes,
                align,
            });
        }
        let writable = !read_only;
        let geometry = DiskGeometry {
            capacity_sectors: length_sectors,
            logical_block_size: lbs,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            read_only,
            discard: writable,
            write_zeroes: writable,
            discard_granularity_sectors: DISCARD_GRANULARITY_SECTORS,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                file,
                offset_sectors: opts.offset_sectors,
                length_sectors,
                read_only,
                geometry,
            }),
        })
    }

    /// Window start on the device, in sectors.
    pub fn offset_sectors(&self) -> u64 {
        self.shared.offset_sectors
    }

    /// Window length in sectors (the guest's capacity).
    pub fn length_sectors(&self) -> u64 {
        self.shared.length_sectors
    }

    /// The device handle's facts (kind, size, direct or buffered, alignment).
    pub fn file_info(&self) -> &FileInfo {
        self.shared.file.info()
    }

    /// A worker with its own ring (also what [`BlockBackend::new_worker`] returns).
    pub fn worker(&self) -> io::Result<LinearWorker> {
        Ok(LinearWorker {
            shared: Arc::clone(&self.shared),
            ring: Ring::with_cq_size(RING_ENTRIES, RING_CQ_ENTRIES)?,
            next_id: 0,
            pending: HashMap::new(),
            ready: Vec::new(),
            ring_done: Vec::new(),
            zero_range_unsupported: false,
            punch_hole_unsupported: false,
        })
    }
}

impl BlockBackend for LinearTarget {
    type Worker = LinearWorker;

    fn geometry(&self) -> DiskGeometry {
        self.shared.geometry.clone()
    }

    fn new_worker(&self, _thread_index: usize) -> io::Result<LinearWorker> {
        self.worker()
    }
}

/// What to do when a request's ring operation completes.
#[derive(Debug)]
enum Stage {
    /// Nothing more: report the result.
    Plain,
    /// Copy `len` bytes from the bounce buffer at `skip` into the guest buffers.
    BounceRead {
        guest: Vec<GuestBuf>,
        skip: usize,
        len: usize,
    },
    /// fallocate for write-zeroes; on EOPNOTSUPP write zeroes instead.
    ZeroFallocate { offset: u64, len: u64, unmap: bool },
    /// fallocate(PUNCH_HOLE) for discard; EOPNOTSUPP is not an error (discard is a hint).
    Discard,
}

#[derive(Debug)]
struct Pending {
    tag: u64,
    stage: Stage,
}

/// How `start` left a request.
enum Started {
    /// A ring operation carries it on.
    Queued(Stage),
    /// Finished synchronously.
    Done,
}

/// The per-queue-thread I/O engine of a [`LinearTarget`].
pub struct LinearWorker {
    shared: Arc<Shared>,
    ring: Ring,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    ready: Vec<Completion>,
    ring_done: Vec<RingCompletion>,
    zero_range_unsupported: bool,
    punch_hole_unsupported: bool,
}

fn invalid(msg: String) -> BlockError {
    BlockError::Io(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

fn iovecs(bufs: &[GuestBuf]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|b| libc::iovec {
            iov_base: b.ptr.cast(),
            iov_len: b.len,
        })
        .collect()
}

impl LinearWorker {
    /// Byte offset on the device of `sector`, after checking `sector + nr_sectors` fits.
    fn byte_offset(&self, sector: u64, nr_sectors: u64) -> Result<u64, BlockError> {
        let capacity = self.shared.length_sectors;
        let oor = || BlockError::OutOfRange {
            sector,
            nr_sectors,
            capacity,
        };
        let end = sector.checked_add(nr_sectors).ok_or_else(oor)?;
        if end > capacity {
            return Err(oor());
        }
        self.shared
            .offset_sectors
            .checked_add(sector)
            .and_then(|s| s.checked_mul(SECTOR_SIZE))
            .ok_or_else(oor)
    }

    fn data_range(&self, sector: u64, bufs: &[GuestBuf]) -> Result<(u64, usize), BlockError> {
        let total = bufs
            .iter()
            .try_fold(0usize, |acc, b| acc.checked_add(b.len))
            .ok_or_else(|| invalid("guest buffer lengths overflow".into()))?;
        let total64 = u64::try_from(total).map_err(|_| invalid("request too large".into()))?;
        if total64 % SECTOR_SIZE != 0 {
            return Err(invalid(format!(
                "data length {total} is not a multiple of {SECTOR_SIZE}"
            )));
        }
        let offset = self.byte_offset(sector, total64 / SECTOR_SIZE)?;
        Ok((offset, total))
    }

    fn direct_ok(&self, offset: u64, bufs: &[GuestBuf]) -> bool {
        let align = self.shared.file.info().align;
        bufs.len() <= MAX_IOVECS
            && align.fits(0, 0, offset)
            && bufs.iter().all(|b| align.fits(b.ptr as usize, b.len, 0))
    }

    fn start(&mut self, id: u64, op: BlockOp, bufs: &[GuestBuf]) -> Result<Started, BlockError> {
        match op {
            BlockOp::Read { sector } => self.start_read(id, sector, bufs),
            BlockOp::Write { sector } => self.start_write(id, sector, bufs),
            BlockOp::Flush => {
                if self.shared.read_only {
                    return Ok(Started::Done);
                }
                let file = self.shared.writable()?;
                self.ring.submit_fsync(file, true, id).map_err(io_err)?;
                Ok(Started::Queued(Stage::Plain))
            }
            BlockOp::Discard { sector, nr_sectors } => self.start_discard(id, sector, nr_sectors),
            BlockOp::WriteZeroes {
                sector,
                nr_sectors,
                unmap,
            } => self.start_write_zeroes(id, sector, nr_sectors, unmap),
        }
    }

    fn start_read(
        &mut self,
        id: u64,
        sector: u64,
        bufs: &[GuestBuf],
    ) -> Result<Started, BlockError> {
        let (offset, total) = self.data_range(sector, bufs)?;
        if total == 0 {
            return Ok(Started::Done);
        }
        let file = &self.shared.file;
        if self.direct_ok(offset, bufs) {
            let iov = iovecs(bufs);
            // SAFETY: the device keeps every GuestBuf valid and untouched until the completion
            // with this request's tag is reaped (BlockWorker::submit contract); we only report
            // that completion after the ring returned this operation.
            unsafe {
                self.ring
                    .submit_readv(file, offset, &iov, EofPolicy::Error, id)
            }
            .map_err(io_err)?;
            return Ok(Started::Queued(Stage::Plain));
        }
        // Bounce: read the aligned superset of the range.
        let align = u64::from(file.info().align.offset);
        let start = offset - offset % align;
        let end = offset
            .checked_add(total as u64)
            .and_then(|e| e.checked_next_multiple_of(align))
            .ok_or_else(|| invalid("read range overflows".into()))?;
        let len = usize::try_from(end - start).map_err(|_| invalid("read too large".into()))?;
        let skip = usize::try_from(offset - start).map_err(|_| invalid("bad offset".into()))?;
        let buf = AlignedBuf::with_min_len(len).map_err(|e| BlockError::Io(io::Error::other(e)))?;
        let eof = if end > file.info().size {
            EofPolicy::ZeroFill
        } else {
            EofPolicy::Error
        };
        self.ring
            .submit_read_buf(file, start, buf, len, eof, id)
            .map_err(io_err)?;
        Ok(Started::Queued(Stage::BounceRead {
            guest: bufs.to_vec(),
            skip,
            len: total,
        }))
    }

    fn start_write(
        &mut self,
        id: u64,
        sector: u64,
        bufs: &[GuestBuf],
    ) -> Result<Started, BlockError> {
        let file = self.shared.writable()?;
        let (offset, total) = self.data_range(sector, bufs)?;
        if total == 0 {
            return Ok(Started::Done);
        }
        if self.direct_ok(offset, bufs) {
            let iov = iovecs(bufs);
            // SAFETY: the device keeps every GuestBuf valid and unmodified until the completion
            // with this request's tag is reaped (BlockWorker::submit contract).
            unsafe { self.ring.submit_writev(file, offset, &iov, id) }.map_err(io_err)?;
            return Ok(Started::Queued(Stage::Plain));
        }
        let align = file.info().align;
        if !align.fits(0, total, offset) {
            return Err(invalid(format!(
                "write of {total} bytes at byte {offset} is not aligned to the device's \
                 {}-byte direct-I/O block",
                align.offset
            )));
        }
        let mut buf =
            AlignedBuf::with_min_len(total).map_err(|e| BlockError::Io(io::Error::other(e)))?;
        let mut at = 0usize;
        for b in bufs {
            let dst = buf
                .as_mut_slice()
                .get_mut(at..at + b.len)
                .ok_or_else(|| invalid("bounce buffer too small".into()))?;
            // SAFETY: the GuestBuf is valid readable guest memory of b.len bytes until this
            // request completes (BlockWorker::submit contract); dst is our own buffer.
            let src = unsafe { std::slice::from_raw_parts(b.ptr.cast_const(), b.len) };
            dst.copy_from_slice(src);
            at += b.len;
        }
        let file = self.shared.writable()?;
        self.ring
            .submit_write_buf(file, offset, buf, total, id)
            .map_err(io_err)?;
        Ok(Started::Queued(Stage::Plain))
    }

    fn start_discard(&mut self, id: u64, sector: u64, nr: u64) -> Result<Started, BlockError> {
        let file = self.shared.writable()?;
        let offset = self.byte_offset(sector, nr)?;
        let len = nr * SECTOR_SIZE;
        if len == 0 {
            return Ok(Started::Done);
        }
        if file.kind() == FileKind::BlockDevice {
            // Synchronous: BLKDISCARD blocks this queue thread for the duration.
            return match file.blk_discard(offset, len) {
                Err(e) if !is_unsupported(&e) => Err(BlockError::Io(e)),
                _ => Ok(Started::Done),
            };
        }
        if self.punch_hole_unsupported {
            return Ok(Started::Done);
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.ring
            .submit_fallocate(file, mode, offset, len, id)
            .map_err(io_err)?;
        Ok(Started::Queued(Stage::Discard))
    }

    fn start_write_zeroes(
        &mut self,
        id: u64,
        sector: u64,
        nr: u64,
        unmap: bool,
    ) -> Result<Started, BlockError> {
        let file = self.shared.writable()?;
        let offset = self.byte_offset(sector, nr)?;
        let len = nr * SECTOR_SIZE;
        if len == 0 {
            return Ok(Started::Done);
        }
        if file.kind() == FileKind::BlockDevice {
            // Synchronous: BLKZEROOUT blocks this queue thread (the kernel offloads to
            // WRITE ZEROES or writes zero pages itself).
            match file.blk_zeroout(offset, len) {
                Ok(()) => return Ok(Started::Done),
                Err(e) if !is_unsupported(&e) => return Err(BlockError::Io(e)),
                Err(_) => {}
            }
        } else {
            let (mode, unsupported) = if unmap {
                (libc::FALLOC_FL_PUNCH_HOLE, self.punch_hole_unsupported)
            } else {
                (libc::FALLOC_FL_ZERO_RANGE, self.zero_range_unsupported)
            };
            if !unsupported {
                let mode = mode | libc::FALLOC_FL_KEEP_SIZE;
                self.ring
                    .submit_fallocate(file, mode, offset, len, id)
                    .map_err(io_err)?;
                return Ok(Started::Queued(Stage::ZeroFallocate { offset, len, unmap }));
            }
        }
        self.ring
            .submit_write_zeroes(file, offset, len, id)
            .map_err(io_err)?;
        Ok(Started::Queued(Stage::Plain))
    }

    fn finish_now(&mut self, tag: u64, result: Result<(), BlockError>) {
        self.ready.push(Completion { tag, result });
        // The device learns of completions through the eventfd.
        self.ring.notify();
    }

    /// Turn ring completions into request completions (may queue fallback operations).
    fn process_ring(&mut self) -> bool {
        let mut queued_more = false;
        let mut done = std::mem::take(&mut self.ring_done);
        for c in done.drain(..) {
            queued_more |= self.on_ring_completion(c);
        }
        self.ring_done = done;
        queued_more
    }

    fn on_ring_completion(&mut self, c: RingCompletion) -> bool {
        let Some(p) = self.pending.remove(&c.token) else {
            log::error!("linear: completion for unknown request id {}", c.token);
            return false;
        };
        let result = match (p.stage, c.result) {
            (Stage::BounceRead { guest, skip, len }, Ok(_)) => copy_out(c.buf, skip, len, &guest),
            (Stage::ZeroFallocate { offset, len, unmap }, Err(e)) if is_unsupported(&e) => {
                if unmap {
                    self.punch_hole_unsupported = true;
                } else {
                    self.zero_range_unsupported = true;
                }
                log::info!("linear: fallocate mode unsupported here, writing zeroes instead");
                match self.shared.file.writable() {
                    Some(file) => match self.ring.submit_write_zeroes(file, offset, len, c.token) {
                        Ok(()) => {
                            let stage = Stage::Plain;
                            self.pending.insert(c.token, Pending { tag: p.tag, stage });
                            return true;
                        }
                        Err(e) => Err(io_err(e)),
                    },
                    None => Err(BlockError::ReadOnly),
                }
            }
            (Stage::Discard, Err(e)) if is_unsupported(&e) => {
                self.punch_hole_unsupported = true;
                Ok(())
            }
            (_, Ok(_)) => Ok(()),
            (_, Err(e)) => Err(BlockError::Io(e)),
        };
        self.ready.push(Completion { tag: p.tag, result });
        false
    }
}

fn io_err(e: crate::io::RingError) -> BlockError {
    BlockError::Io(e.into())
}

/// Copy `len` bytes at `skip` of the bounce buffer into the guest buffers.
fn copy_out(
    buf: Option<AlignedBuf>,
    skip: usize,
    len: usize,
    guest: &[GuestBuf],
) -> Result<(), BlockError> {
    let buf = buf.ok_or_else(|| BlockError::Io(io::Error::other("bounce buffer lost")))?;
    let mut src = buf
        .as_slice()
        .get(skip..skip.saturating_add(len))
        .ok_or_else(|| BlockError::Io(io::Error::other("bounce buffer too short")))?;
    for g in guest {
        let Some((head, rest)) = src.split_at_checked(g.len) else {
            return Err(BlockError::Io(io::Error::other("bounce buffer too short")));
        };
        // SAFETY: the GuestBuf is valid writable guest memory of g.len bytes until this
        // request's completion is reaped (BlockWorker::submit contract), and does not overlap
        // our bounce buffer; head has exactly g.len bytes.
        unsafe { std::ptr::copy_nonoverlapping(head.as_ptr(), g.ptr, g.len) };
        src = rest;
    }
    Ok(())
}

impl BlockWorker for LinearWorker {
    fn event_fd(&self) -> RawFd {
        self.ring.event_fd()
    }

    fn submit(&mut self, tag: u64, op: BlockOp, bufs: &[GuestBuf]) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        match self.start(id, op, bufs) {
            Ok(Started::Queued(stage)) => {
                self.pending.insert(id, Pending { tag, stage });
            }
            Ok(Started::Done) => self.finish_now(tag, Ok(())),
            Err(e) => self.finish_now(tag, Err(e)),
        }
    }

    fn kick(&mut self) {
        if let Err(e) = self.ring.kick() {
            log::error!("linear: io_uring submit failed: {e}");
        }
    }

    fn reap(&mut self, done: &mut Vec<Completion>) {
        self.ring.reap(&mut self.ring_done);
        if self.process_ring() {
            self.kick();
        }
        done.append(&mut self.ready);
    }

    fn completions_ready(&mut self) -> bool {
        !self.ready.is_empty() || self.ring.completions_ready()
    }

    fn in_flight(&self) -> usize {
        self.pending.len() + self.ready.len()
    }

    fn drain(&mut self) {
        while !self.pending.is_empty() {
            if self.ring.in_flight() == 0 {
                // Cannot happen (one ring operation per pending request); never spin on it.
                log::error!("linear: {} requests lost their I/O", self.pending.len());
                for (_, p) in self.pending.drain() {
                    let e = io::Error::other("request lost by the I/O engine");
                    self.ready.push(Completion {
                        tag: p.tag,
                        result: Err(BlockError::Io(e)),
                    });
                }
                break;
            }
            if let Err(e) = self.ring.wait() {
                log::error!(
                    "linear: waiting for {} in-flight requests failed: {e}",
                    self.pending.len()
                );
                break;
            }
            self.ring.reap(&mut self.ring_done);
            if self.process_ring() {
                self.kick();
            }
        }
        if !self.ready.is_empty() {
            self.ring.notify();
        }
    }
}
