//! Direct-I/O engine: aligned buffers, files opened with `O_DIRECT`, io_uring rings with an
//! eventfd for epoll loops. Generic: the linear target, the clone target and its hydration
//! thread all use it; operations carry caller-chosen `u64` tokens.

pub mod aligned;
pub mod file;
pub mod ring;

pub use aligned::{AlignedBuf, AlignedBufError};
pub use file::{DioAlign, FileInfo, FileKind, OpenError, ReadOnlyFile, ReadWriteFile, WritableFd};
pub use ring::{EofPolicy, Ring, RingCompletion, RingError, MAX_IOVECS};
