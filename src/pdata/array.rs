//! dm-array blocks holding u64 values (spec §7.1): header csum u32, max_entries u32,
//! nr_entries u32, value_size u32, blocknr u64 (self location at offset 16), then values.

use super::block_device::{Block, BLOCK_SIZE};
use super::checksum::{seal, verify, BlockKind};
use super::error::PdataError;
use super::unpack::{le_u32, le_u64, put_u32, put_u64};

/// Size of the array-block header.
pub const ARRAY_HEADER_SIZE: usize = 24;
/// u64 values per array block: (4096 - 24) / 8.
pub const ARRAY_ENTRIES_U64: u32 = ((BLOCK_SIZE - ARRAY_HEADER_SIZE) / 8) as u32;

/// Validates the array block at `loc` and appends its values to `out`; returns nr_entries.
pub fn unpack_u64_into(blk: &Block, loc: u64, out: &mut Vec<u64>) -> Result<u32, PdataError> {
    let kind = BlockKind::ArrayBlock;
    verify(blk, kind, loc)?;
    let max = le_u32(blk, 4);
    let nr = le_u32(blk, 8);
    let vs = le_u32(blk, 12);
    if max != ARRAY_ENTRIES_U64 || vs != 8 {
        return Err(PdataError::corrupt(
            kind,
            loc,
            format!("max_entries {max} / value_size {vs} (expected {ARRAY_ENTRIES_U64} / 8)"),
        ));
    }
    if nr > max {
        return Err(PdataError::corrupt(
            kind,
            loc,
            format!("nr_entries {nr} > max_entries {max}"),
        ));
    }
    out.extend((0..nr as usize).map(|i| le_u64(blk, ARRAY_HEADER_SIZE + 8 * i)));
    Ok(nr)
}

/// Encodes an array block at `loc` holding `values` (at most 509; extra ones are not written).
pub fn pack_u64(loc: u64, values: &[u64]) -> Box<Block> {
    let mut blk: Box<Block> = Box::new([0; BLOCK_SIZE]);
    let n = values.len().min(ARRAY_ENTRIES_U64 as usize);
    put_u32(&mut blk[..], 4, ARRAY_ENTRIES_U64);
    put_u32(&mut blk[..], 8, n as u32);
    put_u32(&mut blk[..], 12, 8);
    put_u64(&mut blk[..], 16, loc);
    for (i, v) in values.iter().take(n).enumerate() {
        put_u64(&mut blk[..], ARRAY_HEADER_SIZE + 8 * i, *v);
    }
    seal(&mut blk, BlockKind::ArrayBlock);
    blk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let blk = pack_u64(5, &[1, 2, 3]);
        let mut out = Vec::new();
        assert_eq!(unpack_u64_into(&blk, 5, &mut out).ok(), Some(3));
        assert_eq!(out, vec![1, 2, 3]);
        assert_eq!(ARRAY_ENTRIES_U64, 509);
    }
}
