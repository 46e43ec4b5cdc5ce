//! The dm-clone superblock (block 0, spec §3).

use super::error::{step, MetadataError};
use crate::pdata::checksum::{seal, verify_checksum, verify_location, BlockKind};
use crate::pdata::space_map::root::{SmRoot, SM_ROOT_BLOB_SIZE};
use crate::pdata::unpack::{le_u32, le_u64, put_u32, put_u64};
use crate::pdata::{Block, BLOCK_SIZE};

/// Superblock location.
pub const SUPERBLOCK_LOCATION: u64 = 0;
/// dm-clone magic.
pub const SUPERBLOCK_MAGIC: u64 = 0x8AF2_7F64;
/// The only metadata version.
pub const METADATA_VERSION: u32 = 1;
/// Bytes of the superblock in use: csum 4, flags 4, blocknr 8, uuid 16, magic 8, version 4,
/// space-map root 128, region_size 8, target_size 8, bitset_root 8. The rest is zero.
pub const SUPERBLOCK_SIZE: usize = 196;
const OFF_MAGIC: usize = 32;
const OFF_VERSION: usize = 40;
const OFF_SM_ROOT: usize = 44;
const OFF_REGION_SIZE: usize = 172;
const OFF_TARGET_SIZE: usize = 180;
const OFF_BITSET_ROOT: usize = 188;

/// Decoded superblock fields (flags and uuid are ignored, written as zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Superblock {
    pub flags: u32,
    pub magic: u64,
    pub version: u32,
    pub sm_root: SmRoot,
    pub region_size: u64,
    pub target_size: u64,
    pub bitset_root: u64,
}

impl Superblock {
    /// A superblock as written by the kernel.
    pub fn new(sm_root: SmRoot, region_size: u64, target_size: u64, bitset_root: u64) -> Self {
        Superblock {
            flags: 0,
            magic: SUPERBLOCK_MAGIC,
            version: METADATA_VERSION,
            sm_root,
            region_size,
            target_size,
            bitset_root,
        }
    }

    /// Validates block 0 in the kernel's order (location, magic, checksum, version) and decodes it.
    pub fn unpack(blk: &Block) -> Result<Self, MetadataError> {
        let kind = BlockKind::Superblock;
        verify_location(blk, kind, SUPERBLOCK_LOCATION).map_err(step("validate superblock"))?;
        let magic = le_u64(blk, OFF_MAGIC);
        if magic != SUPERBLOCK_MAGIC {
            return Err(MetadataError::BadMagic(magic));
        }
        verify_checksum(blk, kind, SUPERBLOCK_LOCATION).map_err(step("validate superblock"))?;
        let version = le_u32(blk, OFF_VERSION);
        if version != METADATA_VERSION {
            return Err(MetadataError::BadVersion(version));
        }
        let blob = blk
            .get(OFF_SM_ROOT..OFF_SM_ROOT + SM_ROOT_BLOB_SIZE)
            .unwrap_or(&[]);
        Ok(Superblock {
            flags: le_u32(blk, 4),
            magic,
            version,
            sm_root: SmRoot::unpack(blob),
            region_size: le_u64(blk, OFF_REGION_SIZE),
            target_size: le_u64(blk, OFF_TARGET_SIZE),
            bitset_root: le_u64(blk, OFF_BITSET_ROOT),
        })
    }

    /// Encodes into a zeroed block (flags, uuid zero) and seals it.
    pub fn pack(&self) -> Box<Block> {
        let mut blk: Box<Block> = Box::new([0; BLOCK_SIZE]);
        put_u64(&mut blk[..], 8, SUPERBLOCK_LOCATION);
        put_u64(&mut blk[..], OFF_MAGIC, SUPERBLOCK_MAGIC);
        put_u32(&mut blk[..], OFF_VERSION, METADATA_VERSION);
        if let Some(blob) = blk.get_mut(OFF_SM_ROOT..OFF_SM_ROOT + SM_ROOT_BLOB_SIZE) {
            self.sm_root.pack(blob);
        }
        put_u64(&mut blk[..], OFF_REGION_SIZE, self.region_size);
        put_u64(&mut blk[..], OFF_TARGET_SIZE, self.target_size);
        put_u64(&mut blk[..], OFF_BITSET_ROOT, self.bitset_root);
        seal(&mut blk, BlockKind::Superblock);
        blk
    }
}
