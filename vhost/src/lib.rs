//! virtio-blk over vhost-user, generic over a [`BlockBackend`]. Knows nothing of cloning.

pub mod block;
pub mod config;
pub mod request;

pub use block::{
    BlockBackend, BlockError, BlockOp, BlockWorker, Completion, DiskGeometry, GuestBuf,
    RequestObserver, SECTOR_SIZE,
};
pub mod device;
pub mod poll;
pub mod poll_tuner;
pub mod server;

pub use device::VhostUserBlk;
pub use server::{serve, serve_observed, DeviceOptions, ServeError, StopHandle};
