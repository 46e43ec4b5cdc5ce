//! Metadata space-map index block (spec §5.2): csum u32, padding u32, blocknr u64, then 255
//! entries { blocknr u64, nr_free u32, none_free_before u32 }.

use crate::pdata::block_device::{Block, BLOCK_SIZE};
use crate::pdata::checksum::{seal, verify, BlockKind};
use crate::pdata::error::PdataError;
use crate::pdata::unpack::{le_u32, le_u64, put_u32, put_u64};

/// Header size of the index block.
pub const INDEX_HEADER_SIZE: usize = 16;
/// Size of one index entry.
pub const INDEX_ENTRY_SIZE: usize = 16;
/// Entries in the index block = maximum number of bitmaps.
pub const MAX_BITMAPS: usize = 255;

/// One bitmap's index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct IndexEntry {
    pub blocknr: u64,
    pub nr_free: u32,
    pub none_free_before: u32,
}

/// Validates the index block at `loc` and returns all 255 entries.
pub fn unpack_index(blk: &Block, loc: u64) -> Result<Vec<IndexEntry>, PdataError> {
    verify(blk, BlockKind::SmIndex, loc)?;
    Ok((0..MAX_BITMAPS)
        .map(|i| {
            let off = INDEX_HEADER_SIZE + INDEX_ENTRY_SIZE * i;
            IndexEntry {
                blocknr: le_u64(blk, off),
                nr_free: le_u32(blk, off + 8),
                none_free_before: le_u32(blk, off + 12),
            }
        })
        .collect())
}

/// Encodes the index block at `loc` (entries beyond 255 are not written).
pub fn pack_index(loc: u64, entries: &[IndexEntry]) -> Box<Block> {
    let mut blk: Box<Block> = Box::new([0; BLOCK_SIZE]);
    put_u64(&mut blk[..], 8, loc);
    for (i, e) in entries.iter().take(MAX_BITMAPS).enumerate() {
        let off = INDEX_HEADER_SIZE + INDEX_ENTRY_SIZE * i;
        put_u64(&mut blk[..], off, e.blocknr);
        put_u32(&mut blk[..], off + 8, e.nr_free);
        put_u32(&mut blk[..], off + 12, e.none_free_before);
    }
    seal(&mut blk, BlockKind::SmIndex);
    blk
}
