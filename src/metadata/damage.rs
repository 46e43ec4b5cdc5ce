//! Structured damage for fuzzing `open` and `check` past the checksums (in the spirit of
//! thin-provisioning-tools' damage generator): a small, valid, committed metadata image is
//! edited byte by byte as the input says, and every edited block is re-sealed with the
//! checksum of the kind it had, so the edits reach the structural validators (btree
//! headers, array packing, space-map counts, the superblock's fields) instead of
//! stopping at a checksum mismatch.

use crate::pdata::block_device::{Block, MemDevice, BLOCK_SIZE};
use crate::pdata::checksum::{seal, verify_checksum, BlockKind};

use super::{check_image, CheckReport, CloneMetadata, MetadataError};

const KINDS: [BlockKind; 5] = [
    BlockKind::Superblock,
    BlockKind::BtreeNode,
    BlockKind::SmIndex,
    BlockKind::SmBitmap,
    BlockKind::ArrayBlock,
];

/// The image the edits apply to: 48 blocks, 600 KiB target at 8-sector regions (two
/// array blocks' worth of words would need more; one leaf, one array block), some
/// regions hydrated over two commits (so old shadows lie around too).
pub fn base_image() -> Result<Vec<u8>, MetadataError> {
    let dev = MemDevice::zeroed(48);
    let mut md = CloneMetadata::format_dev(Box::new(dev.clone()), 8, 1200)?;
    for r in [0, 1, 63, 64, 149] {
        md.set_region(r)?;
    }
    md.commit()?;
    for r in 70..90 {
        md.set_region(r)?;
    }
    md.commit()?;
    Ok(dev.snapshot())
}

/// Apply `edits` (records of 4 bytes: block, offset low, offset high, value) to the base
/// image, re-seal the edited blocks, then open and check it. Never panics.
pub fn check_damaged(edits: &[u8]) -> Result<CheckReport, MetadataError> {
    let mut image = base_image()?;
    let nr_blocks = image.len() / BLOCK_SIZE;
    // Edits aim at the blocks that hold something (live structure and old shadows).
    let written: Vec<usize> = (0..nr_blocks)
        .filter(|&b| {
            image
                .get(b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE)
                .is_some_and(|blk| blk.iter().any(|&x| x != 0))
        })
        .collect();
    let mut touched = vec![None::<BlockKind>; nr_blocks];
    for rec in edits.chunks_exact(4) {
        let (Some(&b), Some(&lo), Some(&hi), Some(&v)) =
            (rec.first(), rec.get(1), rec.get(2), rec.get(3))
        else {
            continue;
        };
        let Some(&block) = written.get(usize::from(b) % written.len().max(1)) else {
            continue;
        };
        let offset = (usize::from(lo) | usize::from(hi) << 8) % BLOCK_SIZE;
        let Some(blk) = block_mut(&mut image, block) else {
            continue;
        };
        if let Some(slot) = touched.get_mut(block) {
            if slot.is_none() {
                *slot = KINDS
                    .into_iter()
                    .find(|k| verify_checksum(blk, *k, block as u64).is_ok());
            }
        }
        if let Some(byte) = blk.get_mut(offset) {
            *byte = v;
        }
    }
    for (block, kind) in touched.iter().enumerate() {
        if let (Some(kind), Some(blk)) = (kind, block_mut(&mut image, block)) {
            seal(blk, *kind);
        }
    }
    check_image(&image)
}

fn block_mut(image: &mut [u8], block: usize) -> Option<&mut Block> {
    let start = block.checked_mul(BLOCK_SIZE)?;
    image
        .get_mut(start..start.checked_add(BLOCK_SIZE)?)?
        .try_into()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_image_is_consistent() {
        let report = check_image(&base_image().unwrap()).unwrap();
        assert!(report.is_consistent(), "{report}");
        assert_eq!(report.hydrated, 25);
    }

    #[test]
    fn random_structural_damage_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut errors = 0;
        for _ in 0..400 {
            let n = 1 + (x % 12) as usize;
            let mut edits = Vec::with_capacity(n * 4);
            for _ in 0..n * 4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                edits.push(x as u8);
            }
            match check_damaged(&edits) {
                Ok(r) if r.is_consistent() => {}
                _ => errors += 1,
            }
        }
        // Most edits land in live structure and must be caught.
        eprintln!("{errors} of 400 damaged images refused");
        assert!(
            errors > 100,
            "only {errors} of 400 damaged images were refused"
        );
    }
}
