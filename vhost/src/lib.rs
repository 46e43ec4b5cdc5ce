//! virtio-blk over vhost-user, generic over a [`BlockBackend`]. Knows nothing of cloning.

pub mod block;

pub use block::{
    BlockBackend, BlockError, BlockOp, BlockWorker, Completion, DiskGeometry, GuestBuf, SECTOR_SIZE,
};
