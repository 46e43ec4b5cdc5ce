//! Read-only sources of a clone: a local file or block device (read through the io_uring
//! engine with O_DIRECT, see `io::file::ReadOnlyFile`), or a remote export over NBD, read by
//! a small pool of connections whose completions come back through a callback.

pub mod nbd;
pub mod pool;

pub use nbd::{NbdAddr, NbdClient, NbdError};
pub use pool::{NbdPool, ReadDst};
