//! The metadata space map (spec §5): reference counts of every metadata block, held in memory
//! as two copies (as of the last commit, and current). A block is handed out only if it is free
//! in both, so blocks freed in a transaction are never reused before it commits (§5.5).
//!
//! Limitation: dm-clone never shares blocks, so counts stay 0 or 1. Counts of 3 or more (which
//! live in the overflow btree) are loaded and checked but never changed: such a change returns
//! [`PdataError::Unsupported`].

pub mod bitmap;
pub mod index;
pub mod root;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use self::bitmap::{pack_bitmap, unpack_bitmap, ENTRIES_PER_BITMAP};
use self::index::{pack_index, unpack_index, IndexEntry, MAX_BITMAPS};
use self::root::SmRoot;
use super::block_device::{Block, MetaDevice, BLOCK_SIZE};
use super::btree::LoadedTree;
use super::checksum::BlockKind;
use super::error::PdataError;

/// Most blocks a metadata space map can describe (255 bitmaps).
pub const MAX_METADATA_BLOCKS: u64 = MAX_BITMAPS as u64 * ENTRIES_PER_BITMAP;

/// Number of bitmaps needed for `nr_blocks`.
pub fn nr_bitmaps(nr_blocks: u64) -> u64 {
    nr_blocks.div_ceil(ENTRIES_PER_BITMAP)
}

/// In-memory metadata space map.
#[derive(Debug, Clone)]
pub struct SpaceMap {
    nr_blocks: u64,
    committed: Vec<u8>,
    current: Vec<u8>,
    overflow: BTreeMap<u64, u32>,
    overflow_nodes: Vec<u64>,
    index: Vec<IndexEntry>,
    bitmap_root: u64,
    ref_count_root: u64,
    root_nr_allocated: u64,
    nr_allocated: u64,
    changed: BTreeSet<u64>,
    new_this_tx: HashSet<u64>,
    cursor: u64,
}

fn len_of(nr_blocks: u64) -> Result<usize, PdataError> {
    if nr_blocks == 0 || nr_blocks > MAX_METADATA_BLOCKS {
        return Err(PdataError::SpaceMap(format!(
            "nr_blocks {nr_blocks} outside 1..={MAX_METADATA_BLOCKS}"
        )));
    }
    usize::try_from(nr_blocks).map_err(|_| PdataError::SpaceMap("nr_blocks too large".into()))
}

impl SpaceMap {
    /// A space map for a device being formatted: everything free, no committed state.
    /// Bitmap and index locations are set with [`SpaceMap::set_locations`].
    pub fn bootstrap(nr_blocks: u64) -> Result<Self, PdataError> {
        let n = len_of(nr_blocks)?;
        Ok(SpaceMap {
            nr_blocks,
            committed: vec![0; n],
            current: vec![0; n],
            overflow: BTreeMap::new(),
            overflow_nodes: Vec::new(),
            index: vec![IndexEntry::default(); MAX_BITMAPS],
            bitmap_root: 0,
            ref_count_root: 0,
            root_nr_allocated: 0,
            nr_allocated: 0,
            changed: BTreeSet::new(),
            new_this_tx: HashSet::new(),
            cursor: 0,
        })
    }

    /// During format: where the index, overflow root and bitmaps live (all allocated already).
    pub fn set_locations(&mut self, index_block: u64, ref_count_root: u64, bitmaps: &[u64]) {
        self.bitmap_root = index_block;
        self.ref_count_root = ref_count_root;
        for (e, b) in self.index.iter_mut().zip(bitmaps) {
            *e = IndexEntry {
                blocknr: *b,
                nr_free: ENTRIES_PER_BITMAP as u32,
                none_free_before: 0,
            };
        }
    }

    /// Loads and validates the index, every bitmap and the overflow tree named by `root`.
    pub fn load(dev: &dyn MetaDevice, root: &SmRoot) -> Result<Self, PdataError> {
        let mut sm = Self::bootstrap(root.nr_blocks)?;
        if root.nr_blocks > dev.nr_blocks() {
            return Err(PdataError::SpaceMap(format!(
                "space map covers {} blocks but the device has only {}",
                root.nr_blocks,
                dev.nr_blocks()
            )));
        }
        let oob = |what, block| PdataError::OutOfRange {
            what,
            block,
            nr_blocks: root.nr_blocks,
        };
        if root.bitmap_root >= root.nr_blocks {
            return Err(oob("space-map index pointer", root.bitmap_root));
        }
        let mut blk: Block = [0; BLOCK_SIZE];
        dev.read_block(root.bitmap_root, &mut blk)?;
        sm.index = unpack_index(&blk, root.bitmap_root)?;
        let nb = nr_bitmaps(root.nr_blocks) as usize;
        for (i, chunk) in sm
            .committed
            .chunks_mut(ENTRIES_PER_BITMAP as usize)
            .enumerate()
            .take(nb)
        {
            let loc = sm.index.get(i).map(|e| e.blocknr).unwrap_or(0);
            if loc >= root.nr_blocks {
                return Err(oob("space-map bitmap pointer", loc));
            }
            dev.read_block(loc, &mut blk)?;
            unpack_bitmap(&blk, loc, chunk)?;
        }
        if root.ref_count_root >= root.nr_blocks {
            return Err(oob("space-map overflow tree root", root.ref_count_root));
        }
        let tree = LoadedTree::load(dev, root.ref_count_root, 4, root.nr_blocks)?;
        sm.overflow_nodes = tree.node_blocks().collect();
        for (k, v) in tree.leaf_entries() {
            sm.overflow.insert(k, v as u32);
        }
        sm.current.clone_from(&sm.committed);
        sm.nr_allocated = sm.committed.iter().filter(|v| **v != 0).count() as u64;
        sm.root_nr_allocated = root.nr_allocated;
        sm.bitmap_root = root.bitmap_root;
        sm.ref_count_root = root.ref_count_root;
        Ok(sm)
    }

    /// Blocks described.
    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }
    /// Blocks with a non-zero count now.
    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }
    /// `nr_allocated` as stored in the root that was loaded.
    pub fn root_nr_allocated(&self) -> u64 {
        self.root_nr_allocated
    }
    /// Committed location of the index block.
    pub fn bitmap_root(&self) -> u64 {
        self.bitmap_root
    }
    /// Root of the overflow ref-count tree.
    pub fn ref_count_root(&self) -> u64 {
        self.ref_count_root
    }
    /// Index entries of the live bitmaps.
    pub fn index_entries(&self) -> &[IndexEntry] {
        let nb = nr_bitmaps(self.nr_blocks) as usize;
        self.index.get(..nb).unwrap_or(&self.index)
    }
    /// All 255 index entries as held in memory.
    pub fn all_index_entries(&self) -> &[IndexEntry] {
        &self.index
    }
    /// Blocks of the overflow tree.
    pub fn overflow_nodes(&self) -> &[u64] {
        &self.overflow_nodes
    }
    /// Overflow entries (block, count).
    pub fn overflow_entries(&self) -> &BTreeMap<u64, u32> {
        &self.overflow
    }
    /// The two-bit values of every block (current state).
    pub fn entries(&self) -> &[u8] {
        &self.current
    }

    /// Reference count of block `b` (0 beyond the map).
    pub fn count(&self, b: u64) -> u32 {
        let v = usize::try_from(b)
            .ok()
            .and_then(|i| self.current.get(i))
            .copied()
            .unwrap_or(0);
        if v == 3 {
            self.overflow.get(&b).copied().unwrap_or(3)
        } else {
            u32::from(v)
        }
    }

    fn slot(&self, b: u64) -> Result<usize, PdataError> {
        usize::try_from(b)
            .ok()
            .filter(|i| *i < self.current.len())
            .ok_or(PdataError::OutOfRange {
                what: "space-map entry",
                block: b,
                nr_blocks: self.nr_blocks,
            })
    }

    fn set(&mut self, b: u64, v: u8) -> Result<(), PdataError> {
        let i = self.slot(b)?;
        if let Some(cur) = self.current.get_mut(i) {
            if *cur == 0 && v != 0 {
                self.nr_allocated += 1;
            } else if *cur != 0 && v == 0 {
                self.nr_allocated = self.nr_allocated.saturating_sub(1);
            }
            *cur = v;
        }
        self.changed.insert(b);
        Ok(())
    }

    /// Increments the count of `b`.
    pub fn inc(&mut self, b: u64) -> Result<(), PdataError> {
        let v = self.current.get(self.slot(b)?).copied().unwrap_or(0);
        if v >= 2 {
            return Err(PdataError::Unsupported(format!(
                "raising the reference count of block {b} above 2 (overflow tree)"
            )));
        }
        self.set(b, v + 1)
    }

    /// Decrements the count of `b`.
    pub fn dec(&mut self, b: u64) -> Result<(), PdataError> {
        match self.current.get(self.slot(b)?).copied().unwrap_or(0) {
            0 => Err(PdataError::SpaceMap(format!(
                "freeing block {b}, which is already free"
            ))),
            3 => Err(PdataError::Unsupported(format!(
                "lowering the overflow reference count of block {b}"
            ))),
            v => self.set(b, v - 1),
        }
    }

    /// Allocates a block free both now and at the last commit (count becomes 1).
    pub fn alloc(&mut self) -> Result<u64, PdataError> {
        let n = self.current.len();
        let start = usize::try_from(self.cursor).unwrap_or(0).min(n);
        let free =
            |i: &usize| self.current.get(*i) == Some(&0) && self.committed.get(*i) == Some(&0);
        let found = (start..n).find(free).or_else(|| (0..start).find(free));
        let i = found.ok_or(PdataError::NoSpace {
            nr_blocks: self.nr_blocks,
        })?;
        let b = i as u64;
        self.set(b, 1)?;
        self.new_this_tx.insert(b);
        self.cursor = b + 1;
        Ok(b)
    }

    /// Whether `b` was allocated in the current transaction (may be written in place).
    pub fn is_new(&self, b: u64) -> bool {
        self.new_this_tx.contains(&b)
    }

    /// Shadows the changed bitmaps and the index, appends their new contents to `writes`, and
    /// returns the root to store in the superblock. Call [`SpaceMap::finish_commit`] once the
    /// superblock is durable.
    pub fn prepare_commit(
        &mut self,
        writes: &mut Vec<(u64, Box<Block>)>,
    ) -> Result<SmRoot, PdataError> {
        let index_loc = if self.is_new(self.bitmap_root) {
            self.bitmap_root
        } else {
            let new = self.alloc()?;
            self.dec(self.bitmap_root)?;
            new
        };
        let mut shadowed: BTreeSet<usize> = BTreeSet::new();
        // Bitmaps created in this transaction (format) are written even if no entry changed.
        let nb = nr_bitmaps(self.nr_blocks) as usize;
        for (i, e) in self.index.iter().enumerate().take(nb) {
            if self.new_this_tx.contains(&e.blocknr) {
                shadowed.insert(i);
            }
        }
        loop {
            let dirty: BTreeSet<usize> = self
                .changed
                .iter()
                .map(|b| (b / ENTRIES_PER_BITMAP) as usize)
                .filter(|i| !shadowed.contains(i))
                .collect();
            if dirty.is_empty() {
                break;
            }
            for i in dirty {
                shadowed.insert(i);
                let old = self.index.get(i).map(|e| e.blocknr).unwrap_or(0);
                if !self.is_new(old) {
                    let new = self.alloc()?;
                    self.dec(old)?;
                    if let Some(e) = self.index.get_mut(i) {
                        e.blocknr = new;
                    }
                }
            }
        }
        let per = ENTRIES_PER_BITMAP as usize;
        for i in shadowed {
            let lo = i.saturating_mul(per).min(self.current.len());
            let hi = lo.saturating_add(per).min(self.current.len());
            let counts = self.current.get(lo..hi).unwrap_or(&[]);
            let allocated = counts.iter().filter(|v| **v != 0).count() as u32;
            let first_free = counts.iter().position(|v| *v == 0).unwrap_or(counts.len()) as u32;
            if let Some(e) = self.index.get_mut(i) {
                e.nr_free = ENTRIES_PER_BITMAP as u32 - allocated;
                e.none_free_before = first_free;
                writes.push((e.blocknr, pack_bitmap(e.blocknr, counts)));
            }
        }
        writes.push((index_loc, pack_index(index_loc, &self.index)));
        Ok(SmRoot {
            nr_blocks: self.nr_blocks,
            nr_allocated: self.nr_allocated,
            bitmap_root: index_loc,
            ref_count_root: self.ref_count_root,
        })
    }

    /// Makes the current counts the committed ones after the superblock naming `root` is durable.
    pub fn finish_commit(&mut self, root: &SmRoot) {
        for b in std::mem::take(&mut self.changed) {
            if let (Ok(i), Some(v)) = (
                self.slot(b),
                usize::try_from(b)
                    .ok()
                    .and_then(|i| self.current.get(i).copied()),
            ) {
                if let Some(c) = self.committed.get_mut(i) {
                    *c = v;
                }
            }
        }
        self.new_this_tx.clear();
        self.bitmap_root = root.bitmap_root;
        self.root_nr_allocated = root.nr_allocated;
    }

    /// Kind of the structure blocks owned by the space map, for reachability checks.
    pub fn owned_blocks(&self) -> Vec<(u64, BlockKind)> {
        let mut v = vec![(self.bitmap_root, BlockKind::SmIndex)];
        v.extend(
            self.index_entries()
                .iter()
                .map(|e| (e.blocknr, BlockKind::SmBitmap)),
        );
        v.extend(
            self.overflow_nodes
                .iter()
                .map(|b| (*b, BlockKind::BtreeNode)),
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_blocks_not_reused_before_commit() {
        let mut sm = SpaceMap::bootstrap(100).unwrap_or_else(|_| unreachable!());
        for _ in 0..10 {
            assert!(sm.alloc().is_ok());
        }
        let root = SmRoot::default();
        sm.finish_commit(&root);
        assert!(sm.dec(3).is_ok());
        sm.cursor = 0;
        assert_eq!(sm.alloc().ok(), Some(10));
    }
}
