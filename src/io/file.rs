//! Files and block devices opened for direct I/O.
//!
//! [`ReadOnlyFile`] has no way to write: the clone source is one, so writing it does not compile.
//! [`ReadWriteFile`] additionally implements [`WritableFd`], which the ring's write, fsync and
//! fallocate submissions require.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

// <linux/fs.h>
ioctl_io_nr!(BLKSSZGET, 0x12, 104);
ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
ioctl_io_nr!(BLKDISCARD, 0x12, 119);
ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

/// What kind of object was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A block device.
    BlockDevice,
}

/// Direct-I/O alignment requirements, in bytes (powers of two; 1 means "none").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Every buffer address (and, conservatively, handled by callers, length) must be a multiple.
    pub mem: u32,
    /// Every file offset and every I/O length must be a multiple.
    pub offset: u32,
}

impl DioAlign {
    /// No requirement (buffered I/O).
    pub const NONE: DioAlign = DioAlign { mem: 1, offset: 1 };

    /// True if a transfer of `len` bytes at `offset` from/to `addr` meets the requirement.
    pub fn fits(&self, addr: usize, len: usize, offset: u64) -> bool {
        let mem = usize::try_from(self.mem).unwrap_or(usize::MAX);
        let off = usize::try_from(self.offset).unwrap_or(usize::MAX);
        addr.is_multiple_of(mem)
            && len.is_multiple_of(off)
            && offset.is_multiple_of(u64::from(self.offset))
    }
}

/// Facts about an opened file or block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// Regular file or block device.
    pub kind: FileKind,
    /// Size in bytes at open time.
    pub size: u64,
    /// True if opened with `O_DIRECT`; false if the filesystem refused it and we fell back.
    pub direct: bool,
    /// What direct I/O requires (`DioAlign::NONE` when not direct).
    pub align: DioAlign,
    /// Logical block size of the underlying device (512 when unknown).
    pub logical_block_size: u32,
}

/// Why a file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// open(2) failed.
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// fstat/ioctl failed while finding the size.
    #[error("cannot find the size of {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    /// Neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device")]
    NotFileOrBlockDevice { path: PathBuf },
}

/// Implemented by handles the ring may write to (never by [`ReadOnlyFile`]).
pub trait WritableFd: AsRawFd {}

#[derive(Debug)]
struct Handle {
    file: File,
    path: PathBuf,
    info: FileInfo,
}

impl Handle {
    fn open(path: &Path, writable: bool, try_direct: bool) -> Result<Self, OpenError> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(writable);
            o.custom_flags(if direct { libc::O_DIRECT } else { 0 } | libc::O_CLOEXEC);
            o.open(path)
        };
        let first = if try_direct { open(true) } else { open(false) };
        let (file, direct) = match first {
            Ok(f) => (f, try_direct),
            Err(e) if try_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: the filesystem refuses O_DIRECT; falling back to buffered I/O \
                     (page cache in use, slower and double-cached)",
                    path.display()
                );
                let f = open(false).map_err(|source| OpenError::Open {
                    path: path.to_owned(),
                    source,
                })?;
                (f, false)
            }
            Err(source) => {
                return Err(OpenError::Open {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let size_err = |source| OpenError::Size {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(size_err)?;
        let ft = meta.file_type();
        let (kind, size, lbs) = if ft.is_file() {
            (FileKind::Regular, meta.len(), None)
        } else if ft.is_block_device() {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which is a valid &mut u64.
            let rc = unsafe { ioctl_with_mut_ref(&file, BLKGETSIZE64(), &mut size) };
            if rc < 0 {
                return Err(size_err(io::Error::last_os_error()));
            }
            let mut lbs: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int to the pointer, which is a valid &mut c_int.
            let rc = unsafe { ioctl_with_mut_ref(&file, BLKSSZGET(), &mut lbs) };
            let lbs = if rc < 0 {
                None
            } else {
                u32::try_from(lbs).ok().filter(|v| v.is_power_of_two())
            };
            (FileKind::BlockDevice, size, lbs)
        } else {
            return Err(OpenError::NotFileOrBlockDevice {
                path: path.to_owned(),
            });
        };
        let statx_align = statx_dio_align(&file);
        let logical_block_size = lbs.unwrap_or(512);
        let align = if !direct {
            DioAlign::NONE
        } else if let Some(a) = statx_align {
            a
        } else {
            DioAlign {
                mem: logical_block_size,
                offset: logical_block_size,
            }
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            info: FileInfo {
                kind,
                size,
                direct,
                align,
                logical_block_size,
            },
        })
    }
}

/// STATX_DIOALIGN, when the kernel (>= 6.1) and the filesystem report it.
fn statx_dio_align(file: &File) -> Option<DioAlign> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a valid NUL-terminated empty string used with AT_EMPTY_PATH on a
    // valid fd, and stx points to writable memory of the right size for the kernel to fill.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded, so the struct is initialised (it was zeroed beforehand anyway).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (mem, offset) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    if mem == 0 || offset == 0 || !mem.is_power_of_two() || !offset.is_power_of_two() {
        // 0 means the file does not support direct I/O at all; leave it to the fallback.
        return None;
    }
    Some(DioAlign { mem, offset })
}

macro_rules! common_accessors {
    ($t:ty) => {
        impl $t {
            /// The path it was opened with.
            pub fn path(&self) -> &Path {
                &self.0.path
            }
            /// Kind, size, alignment.
            pub fn info(&self) -> &FileInfo {
                &self.0.info
            }
            /// Size in bytes at open time.
            pub fn size(&self) -> u64 {
                self.0.info.size
            }
            /// Regular file or block device.
            pub fn kind(&self) -> FileKind {
                self.0.info.kind
            }
            /// Direct-I/O alignment requirement (`DioAlign::NONE` if buffered).
            pub fn align(&self) -> DioAlign {
                self.0.info.align
            }
            /// True if opened with `O_DIRECT`.
            pub fn is_direct(&self) -> bool {
                self.0.info.direct
            }
        }
        impl AsRawFd for $t {
            fn as_raw_fd(&self) -> RawFd {
                self.0.file.as_raw_fd()
            }
        }
        impl AsFd for $t {
            fn as_fd(&self) -> BorrowedFd<'_> {
                self.0.file.as_fd()
            }
        }
    };
}

/// A file or block device opened `O_RDONLY | O_DIRECT`. It has no write methods, and the
/// ring's write, fsync and fallocate submissions do not accept it:
///
/// ```compile_fail
/// # use vhost_clone::io::{AlignedBuf, ReadOnlyFile, Ring};
/// fn write_the_source(src: &ReadOnlyFile, ring: &mut Ring, buf: AlignedBuf) {
///     let _ = ring.submit_write_buf(src, 0, buf, 512, 0); // ReadOnlyFile is not WritableFd
/// }
/// ```
#[derive(Debug)]
pub struct ReadOnlyFile(Handle);

/// A file or block device opened `O_RDWR | O_DIRECT`.
///
/// ```no_run
/// # use vhost_clone::io::{AlignedBuf, ReadWriteFile, Ring};
/// fn write_the_destination(dst: &ReadWriteFile, ring: &mut Ring, buf: AlignedBuf) {
///     let _ = ring.submit_write_buf(dst, 0, buf, 512, 0);
/// }
/// ```
#[derive(Debug)]
pub struct ReadWriteFile(Handle);

common_accessors!(ReadOnlyFile);
common_accessors!(ReadWriteFile);

impl WritableFd for ReadWriteFile {}

impl ReadOnlyFile {
    /// Open `path` read-only for direct I/O (buffered if the filesystem refuses O_DIRECT).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Handle::open(path.as_ref(), false, true).map(Self)
    }

    /// Open `path` read-only through the page cache (no `O_DIRECT`).
    pub fn open_buffered(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Handle::open(path.as_ref(), false, false).map(Self)
    }
}

impl ReadWriteFile {
    /// Open `path` read-write for direct I/O (buffered if the filesystem refuses O_DIRECT).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Handle::open(path.as_ref(), true, true).map(Self)
    }

    /// Open `path` read-write through the page cache (no `O_DIRECT`; flushes still fsync).
    pub fn open_buffered(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Handle::open(path.as_ref(), true, false).map(Self)
    }

    /// BLKDISCARD `len` bytes at `offset` (block devices only). Synchronous: the kernel has
    /// no asynchronous discard for a block device fd through io_uring's fallocate.
    pub fn blk_discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.blk_range_ioctl(BLKDISCARD(), offset, len)
    }

    /// BLKZEROOUT `len` bytes at `offset` (block devices only). Synchronous.
    pub fn blk_zeroout(&self, offset: u64, len: u64) -> io::Result<()> {
        self.blk_range_ioctl(BLKZEROOUT(), offset, len)
    }

    fn blk_range_ioctl(&self, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        if self.kind() != FileKind::BlockDevice {
            return Err(io::Error::from_raw_os_error(libc::ENOTBLK));
        }
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read a `u64[2]` {start, len} from the pointer, which
        // refers to a live array of that type.
        let rc = unsafe { ioctl_with_ref(&self.0.file, req, &range) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}
