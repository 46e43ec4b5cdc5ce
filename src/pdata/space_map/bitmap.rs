//! Space-map bitmap blocks (spec §5.3): csum u32, not_used u32, blocknr u64, then 16320 two-bit
//! entries. Entry e: H = bit 2(e%32) and L = bit 2(e%32)+1 of LE word e/32; value = 2H + L.

use crate::pdata::block_device::{Block, BLOCK_SIZE};
use crate::pdata::checksum::{seal, verify, BlockKind};
use crate::pdata::error::PdataError;

/// Header size of a bitmap block.
pub const BITMAP_HEADER_SIZE: usize = 16;
/// Two-bit entries per bitmap block.
pub const ENTRIES_PER_BITMAP: u64 = ((BLOCK_SIZE - BITMAP_HEADER_SIZE) * 4) as u64;

/// Decodes one byte's four entries.
fn byte_entries(byte: u8) -> [u8; 4] {
    let e = |j: u32| {
        let h = (byte >> (2 * j)) & 1;
        let l = (byte >> (2 * j + 1)) & 1;
        2 * h + l
    };
    [e(0), e(1), e(2), e(3)]
}

/// Validates the bitmap at `loc` and writes its first `out.len()` entries (values 0..=3).
pub fn unpack_bitmap(blk: &Block, loc: u64, out: &mut [u8]) -> Result<(), PdataError> {
    verify(blk, BlockKind::SmBitmap, loc)?;
    let body = blk.get(BITMAP_HEADER_SIZE..).unwrap_or(&[]);
    for (chunk, byte) in out.chunks_mut(4).zip(body) {
        for (o, v) in chunk.iter_mut().zip(byte_entries(*byte)) {
            *o = v;
        }
    }
    Ok(())
}

/// Encodes a bitmap at `loc` from entry values (values above 3 are stored as 3).
pub fn pack_bitmap(loc: u64, counts: &[u8]) -> Box<Block> {
    let mut blk: Box<Block> = Box::new([0; BLOCK_SIZE]);
    crate::pdata::unpack::put_u64(&mut blk[..], 8, loc);
    if let Some(body) = blk.get_mut(BITMAP_HEADER_SIZE..) {
        for (byte, chunk) in body.iter_mut().zip(counts.chunks(4)) {
            let mut b = 0u8;
            for (j, v) in chunk.iter().enumerate() {
                let v = (*v).min(3);
                b |= ((v >> 1) & 1) << (2 * j);
                b |= (v & 1) << (2 * j + 1);
            }
            *byte = b;
        }
    }
    seal(&mut blk, BlockKind::SmBitmap);
    blk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example() {
        let blk = pack_bitmap(3, &[1, 1, 2, 0, 3]);
        assert_eq!(&blk[16..24], &[0x1a, 0x03, 0, 0, 0, 0, 0, 0]);
        let mut out = [0u8; 5];
        assert!(unpack_bitmap(&blk, 3, &mut out).is_ok());
        assert_eq!(out, [1, 1, 2, 0, 3]);
        assert_eq!(ENTRIES_PER_BITMAP, 16320);
    }
}
