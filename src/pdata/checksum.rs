//! Salted block checksums (kernel `dm_bm_checksum`, spec §1.1, §2) and per-kind validation.

use super::block_device::Block;
use super::error::PdataError;
use super::unpack::{le_u32, le_u64, put_u32};

/// The kind of a metadata block; decides its checksum salt and self-location offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum BlockKind {
    Superblock,
    BtreeNode,
    SmIndex,
    SmBitmap,
    ArrayBlock,
}

impl BlockKind {
    /// Checksum salt (spec §1.1).
    pub const fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => 257_649_492,
            BlockKind::BtreeNode => 121_107,
            BlockKind::SmIndex => 160_478,
            BlockKind::SmBitmap => 240_779,
            BlockKind::ArrayBlock => 595_846_735,
        }
    }

    /// Offset of the le64 self-location field.
    pub const fn location_offset(self) -> usize {
        match self {
            BlockKind::ArrayBlock => 16,
            _ => 8,
        }
    }
}

impl std::fmt::Display for BlockKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockKind::Superblock => "superblock",
            BlockKind::BtreeNode => "btree node",
            BlockKind::SmIndex => "space-map index",
            BlockKind::SmBitmap => "space-map bitmap",
            BlockKind::ArrayBlock => "array",
        })
    }
}

/// Kernel checksum of bytes 4..4096: standard CRC-32C, inverted, xor salt.
pub fn block_checksum(blk: &Block, salt: u32) -> u32 {
    crc32c::crc32c(blk.get(4..).unwrap_or(&[])) ^ 0xFFFF_FFFF ^ salt
}

/// Computes and stores the checksum of `blk` as a block of `kind`.
pub fn seal(blk: &mut Block, kind: BlockKind) {
    let c = block_checksum(blk, kind.salt());
    put_u32(blk, 0, c);
}

/// Checks the self-location field.
pub fn verify_location(blk: &Block, kind: BlockKind, loc: u64) -> Result<(), PdataError> {
    let found = le_u64(blk, kind.location_offset());
    if found != loc {
        return Err(PdataError::SelfLocation {
            kind,
            block: loc,
            found,
        });
    }
    Ok(())
}

/// Checks the stored checksum.
pub fn verify_checksum(blk: &Block, kind: BlockKind, loc: u64) -> Result<(), PdataError> {
    let stored = le_u32(blk, 0);
    let computed = block_checksum(blk, kind.salt());
    if stored != computed {
        return Err(PdataError::Checksum {
            kind,
            block: loc,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Kernel validator order: self location, then checksum.
pub fn verify(blk: &Block, kind: BlockKind, loc: u64) -> Result<(), PdataError> {
    verify_location(blk, kind, loc)?;
    verify_checksum(blk, kind, loc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_body_vectors() {
        let blk = [0u8; 4096];
        assert_eq!(
            block_checksum(&blk, BlockKind::Superblock.salt()),
            0x5796_CCC5
        );
        assert_eq!(
            block_checksum(&blk, BlockKind::BtreeNode.salt()),
            0x58CC_7E82
        );
        assert_eq!(block_checksum(&blk, BlockKind::SmIndex.salt()), 0x58CF_D54F);
        assert_eq!(
            block_checksum(&blk, BlockKind::SmBitmap.salt()),
            0x58CE_0B1A
        );
        assert_eq!(
            block_checksum(&blk, BlockKind::ArrayBlock.salt()),
            0x7B4E_41DE
        );
    }
}
