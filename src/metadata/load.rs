//! Loading and validating a whole dm-clone metadata device (spec §3.2, §11.2).

use super::error::{step, MetadataError};
use super::geometry::Geometry;
use super::superblock::Superblock;
use crate::pdata::array::{unpack_u64_into, ARRAY_ENTRIES_U64};
use crate::pdata::btree::LoadedTree;
use crate::pdata::space_map::SpaceMap;
use crate::pdata::{Block, BlockKind, MetaDevice, PdataError, BLOCK_SIZE};

/// Longest run of consecutive array blocks read with one request.
const MAX_RUN: usize = 256;

/// Everything read from a metadata device.
pub(crate) struct Loaded {
    pub sb: Superblock,
    pub geo: Geometry,
    pub sm: SpaceMap,
    pub tree: LoadedTree,
    /// Block of each array block, by array index.
    pub array_blocks: Vec<u64>,
    /// nr_entries of each array block.
    pub array_nr: Vec<u32>,
    /// Every word stored in the array (at least `geo.nr_words`), bits >= nr_regions cleared.
    pub words: Vec<u64>,
    /// Whether bits >= nr_regions were set on disk (they were cleared in `words`).
    pub stray_bits: bool,
}

/// Whether block 0 of `dev` is all zero (the kernel's "unformatted" test).
pub(crate) fn block0_is_zero(dev: &dyn MetaDevice) -> Result<bool, MetadataError> {
    if dev.nr_blocks() == 0 {
        return Err(MetadataError::DeviceTooSmall { have: 0, need: 1 });
    }
    let mut blk: Block = [0; BLOCK_SIZE];
    dev.read_block(0, &mut blk)
        .map_err(step("read superblock"))?;
    Ok(blk.iter().all(|b| *b == 0))
}

pub(crate) fn load(
    dev: &dyn MetaDevice,
    expect: Option<(u64, u64)>,
) -> Result<Loaded, MetadataError> {
    if block0_is_zero(dev)? {
        return Err(MetadataError::Unformatted);
    }
    let mut blk: Block = [0; BLOCK_SIZE];
    dev.read_block(0, &mut blk)
        .map_err(step("read superblock"))?;
    let sb = Superblock::unpack(&blk)?;
    if let Some((region, target)) = expect {
        if region != sb.region_size || target != sb.target_size {
            return Err(MetadataError::GeometryMismatch {
                found_region: sb.region_size,
                found_target: sb.target_size,
                expected_region: region,
                expected_target: target,
            });
        }
    }
    let geo = Geometry::new(sb.region_size, sb.target_size)?;
    let sm = SpaceMap::load(dev, &sb.sm_root).map_err(step("load space map"))?;
    let nr_blocks = sm.nr_blocks();
    if sb.bitset_root >= nr_blocks {
        return Err(step("load region bitset")(PdataError::OutOfRange {
            what: "bitset root",
            block: sb.bitset_root,
            nr_blocks,
        }));
    }
    let tree = LoadedTree::load(dev, sb.bitset_root, 8, nr_blocks)
        .map_err(step("load region bitset btree"))?;
    let entries = tree.leaf_entries();
    if entries.len() as u64 > nr_blocks {
        return Err(MetadataError::Array(format!(
            "{} array blocks cannot fit in {nr_blocks} metadata blocks",
            entries.len()
        )));
    }
    for (i, (k, v)) in entries.iter().enumerate() {
        if *k != i as u64 {
            return Err(MetadataError::Array(format!(
                "btree key {k} where array block {i} was expected (keys must be 0..A-1)"
            )));
        }
        if *v >= nr_blocks {
            return Err(step("load region bitset")(PdataError::OutOfRange {
                what: "array block pointer",
                block: *v,
                nr_blocks,
            }));
        }
    }
    let per = u64::from(ARRAY_ENTRIES_U64);
    let max_bits = (entries.len() as u64)
        .saturating_mul(per)
        .saturating_mul(64);
    if max_bits < geo.nr_regions {
        return Err(MetadataError::BitsetTooShort {
            found: max_bits,
            nr_regions: geo.nr_regions,
        });
    }
    let array_blocks: Vec<u64> = entries.iter().map(|e| e.1).collect();
    let mut words = Vec::with_capacity(entries.len().saturating_mul(ARRAY_ENTRIES_U64 as usize));
    let mut array_nr = Vec::with_capacity(entries.len());
    let mut bufs: Vec<Block> = Vec::new();
    let mut i = 0usize;
    while i < array_blocks.len() {
        let start = array_blocks.get(i).copied().unwrap_or(0);
        let mut n = 1usize;
        while n < MAX_RUN && array_blocks.get(i + n) == Some(&(start + n as u64)) {
            n += 1;
        }
        bufs.resize(n, [0; BLOCK_SIZE]);
        dev.read_run(start, &mut bufs)
            .map_err(step("read bitset array blocks"))?;
        for (j, buf) in bufs.iter().enumerate() {
            let loc = start + j as u64;
            let nr =
                unpack_u64_into(buf, loc, &mut words).map_err(step("read bitset array blocks"))?;
            array_nr.push(nr);
        }
        i += n;
    }
    if let Some((_, rest)) = array_nr.split_last() {
        if let Some(k) = rest.iter().position(|nr| *nr != ARRAY_ENTRIES_U64) {
            return Err(MetadataError::Array(format!(
                "array block {k} (block {}) holds {} entries but is not the last one (all but the last must hold {ARRAY_ENTRIES_U64})",
                array_blocks.get(k).copied().unwrap_or(0),
                rest.get(k).copied().unwrap_or(0)
            )));
        }
    }
    if (words.len() as u64).saturating_mul(64) < geo.nr_regions {
        return Err(MetadataError::BitsetTooShort {
            found: (words.len() as u64).saturating_mul(64),
            nr_regions: geo.nr_regions,
        });
    }
    let stray_bits = mask_tail(&mut words, geo.nr_regions);
    Ok(Loaded {
        sb,
        geo,
        sm,
        tree,
        array_blocks,
        array_nr,
        words,
        stray_bits,
    })
}

/// Clears every bit >= nr_regions; returns whether any was set.
pub(crate) fn mask_tail(words: &mut [u64], nr_regions: u64) -> bool {
    let mut stray = false;
    let first = usize::try_from(nr_regions / 64).unwrap_or(usize::MAX);
    for (i, w) in words.iter_mut().enumerate().skip(first) {
        let valid = nr_regions.saturating_sub(i as u64 * 64);
        let mask = if valid >= 64 {
            u64::MAX
        } else {
            (1u64 << valid) - 1
        };
        if *w & !mask != 0 {
            stray = true;
            *w &= mask;
        }
    }
    stray
}

impl Loaded {
    /// Regions marked hydrated in the loaded bitset (bits past the region count are not
    /// counted; the loader keeps them zero).
    pub(crate) fn hydrated_count(&self) -> u64 {
        let nr_words = usize::try_from(self.geo.nr_words).unwrap_or(usize::MAX);
        self.words
            .get(..nr_words)
            .unwrap_or(&[])
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Every block reachable from the superblock, with its kind.
    pub fn reachable(&self) -> Vec<(u64, BlockKind)> {
        let mut v = vec![(0, BlockKind::Superblock)];
        v.extend(self.sm.owned_blocks());
        v.extend(self.tree.node_blocks().map(|b| (b, BlockKind::BtreeNode)));
        v.extend(
            self.array_blocks
                .iter()
                .map(|b| (*b, BlockKind::ArrayBlock)),
        );
        v
    }
}
