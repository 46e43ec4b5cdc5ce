//! Space-map root: the first 32 bytes of the 128-byte blob in the superblock (spec §5.1).

use crate::pdata::unpack::{le_u64, put_u64};

/// Bytes of the root actually used.
pub const SM_ROOT_SIZE: usize = 32;
/// Size of the blob reserved for it in the superblock.
pub const SM_ROOT_BLOB_SIZE: usize = 128;

/// nr_blocks, nr_allocated, bitmap_root (index block), ref_count_root (overflow tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

impl SmRoot {
    /// Decodes from the blob (at least 32 bytes).
    pub fn unpack(b: &[u8]) -> SmRoot {
        SmRoot {
            nr_blocks: le_u64(b, 0),
            nr_allocated: le_u64(b, 8),
            bitmap_root: le_u64(b, 16),
            ref_count_root: le_u64(b, 24),
        }
    }
    /// Encodes into the blob (bytes 32.. left untouched, i.e. zero).
    pub fn pack(&self, b: &mut [u8]) {
        put_u64(b, 0, self.nr_blocks);
        put_u64(b, 8, self.nr_allocated);
        put_u64(b, 16, self.bitmap_root);
        put_u64(b, 24, self.ref_count_root);
    }
}
