//! Persistent data: the kernel's `drivers/md/persistent-data` on-disk formats (block checksums,
//! metadata space map, btrees, dm-array). Knows nothing of dm-clone.

pub mod array;
pub mod block_device;
pub mod btree;
pub mod checksum;
pub mod error;
pub mod space_map;
pub mod unpack;

pub use block_device::{Block, FaultyDevice, FileDevice, MemDevice, MetaDevice, BLOCK_SIZE};
pub use checksum::BlockKind;
pub use error::PdataError;
