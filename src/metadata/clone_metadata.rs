//! The public handle on dm-clone metadata: open/format, the in-core region bitset, commit.

use std::collections::BTreeSet;
use std::path::Path;

use super::error::{step, MetadataError};
use super::geometry::Geometry;
use super::load::{block0_is_zero, load, mask_tail};
use super::superblock::Superblock;
use crate::pdata::array::{pack_u64, ARRAY_ENTRIES_U64};
use crate::pdata::btree::{build_tree, max_entries, LoadedTree, Node};
use crate::pdata::space_map::{nr_bitmaps, SpaceMap, MAX_METADATA_BLOCKS};
use crate::pdata::{Block, FileDevice, MetaDevice};

/// What a commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// All blocks written, superblock included (0 for a no-op commit).
    pub blocks_written: u64,
    /// Array blocks rewritten.
    pub array_blocks: u64,
    /// Btree nodes rewritten.
    pub btree_nodes: u64,
    /// Space-map bitmaps and index written.
    pub space_map_blocks: u64,
}

/// An open dm-clone metadata device.
///
/// Commit errors are final: after a failed commit [`CloneMetadata::is_failed`] is true and
/// every later commit returns [`MetadataError::Failed`]. The on-disk committed state is intact
/// (new blocks only go to blocks free at the last commit, the superblock is written last), so
/// the caller can switch to read-only or reopen the device.
pub struct CloneMetadata {
    dev: Box<dyn MetaDevice>,
    sb: Superblock,
    geo: Geometry,
    sm: SpaceMap,
    tree: LoadedTree,
    array_nr: Vec<u32>,
    words: Vec<u64>,
    hydrated: u64,
    dirty: BTreeSet<u64>,
    failed: bool,
}

impl std::fmt::Debug for CloneMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneMetadata")
            .field("superblock", &self.sb)
            .field("hydrated", &self.hydrated)
            .field("dirty_array_blocks", &self.dirty.len())
            .field("failed", &self.failed)
            .finish()
    }
}

fn nodes_needed(array_blocks: u64) -> u64 {
    let cap = u64::from(max_entries(8));
    let mut level = array_blocks;
    let mut total = 0;
    loop {
        let n = level.div_ceil(cap).max(1);
        total += n;
        if n == 1 {
            return total;
        }
        level = n;
    }
}

impl CloneMetadata {
    /// Kernel decision: block 0 all zero -> format; else open and validate against these sizes.
    pub fn open_or_format(
        path: &Path,
        region_size: u64,
        target_size: u64,
    ) -> Result<Self, MetadataError> {
        let dev = FileDevice::open(path, true).map_err(step("open metadata device"))?;
        Self::open_or_format_dev(Box::new(dev), region_size, target_size)
    }

    /// Open an existing device; `Some((region_size, target_size))` must match the superblock.
    pub fn open(path: &Path, expect: Option<(u64, u64)>) -> Result<Self, MetadataError> {
        let dev = FileDevice::open(path, true).map_err(step("open metadata device"))?;
        Self::open_dev(Box::new(dev), expect)
    }

    /// Format; refuses if block 0 is not all zero.
    pub fn format(path: &Path, region_size: u64, target_size: u64) -> Result<Self, MetadataError> {
        let dev = FileDevice::open(path, true).map_err(step("open metadata device"))?;
        Self::format_dev(Box::new(dev), region_size, target_size)
    }

    /// [`CloneMetadata::open_or_format`] over any device.
    pub fn open_or_format_dev(
        dev: Box<dyn MetaDevice>,
        region_size: u64,
        target_size: u64,
    ) -> Result<Self, MetadataError> {
        if block0_is_zero(&*dev)? {
            Self::format_dev(dev, region_size, target_size)
        } else {
            Self::open_dev(dev, Some((region_size, target_size)))
        }
    }

    /// [`CloneMetadata::open`] over any device: validates every block of the bitset and space map.
    pub fn open_dev(
        dev: Box<dyn MetaDevice>,
        expect: Option<(u64, u64)>,
    ) -> Result<Self, MetadataError> {
        let l = load(&*dev, expect)?;
        let hydrated = l.hydrated_count();
        Ok(CloneMetadata {
            dev,
            sb: l.sb,
            geo: l.geo,
            sm: l.sm,
            tree: l.tree,
            array_nr: l.array_nr,
            words: l.words,
            hydrated,
            dirty: BTreeSet::new(),
            failed: false,
        })
    }

    /// [`CloneMetadata::format`] over any device. For at most 252 array blocks the result is
    /// byte-identical to the kernel's format (spec §4.2); beyond that the btree is built
    /// bottom-up with balanced leaves.
    pub fn format_dev(
        mut dev: Box<dyn MetaDevice>,
        region_size: u64,
        target_size: u64,
    ) -> Result<Self, MetadataError> {
        if !block0_is_zero(&*dev)? {
            return Err(MetadataError::NotZero);
        }
        let geo = Geometry::for_format(region_size, target_size)?;
        let n = dev.nr_blocks().min(MAX_METADATA_BLOCKS);
        let nb = nr_bitmaps(n);
        let a = geo.nr_array_blocks;
        let need = 3 + nb + a + nodes_needed(a);
        if need > n {
            return Err(MetadataError::DeviceTooSmall { have: n, need });
        }
        let s = step("format");
        let mut sm = SpaceMap::bootstrap(n).map_err(&s)?;
        sm.inc(0).map_err(&s)?;
        let index = sm.alloc().map_err(&s)?;
        let overflow = sm.alloc().map_err(&s)?;
        let bitmaps = (0..nb)
            .map(|_| sm.alloc())
            .collect::<Result<Vec<_>, _>>()
            .map_err(&s)?;
        sm.set_locations(index, overflow, &bitmaps);
        let mut writes: Vec<(u64, Box<Block>)> =
            vec![(overflow, Node::new_leaf(overflow, 4).pack())];
        let per = u64::from(ARRAY_ENTRIES_U64);
        let zeros = [0u64; ARRAY_ENTRIES_U64 as usize];
        let last_nr = geo.nr_words - per * (a.saturating_sub(1));
        let mut arrays = Vec::new();
        let mut alloc_arrays = |sm: &mut SpaceMap, writes: &mut Vec<(u64, Box<Block>)>| {
            for j in 0..a {
                let b = sm.alloc()?;
                let nr = if j + 1 == a { last_nr } else { per };
                writes.push((b, pack_u64(b, zeros.get(..nr as usize).unwrap_or(&zeros))));
                arrays.push((j, b));
            }
            Ok(())
        };
        let root = if a <= u64::from(max_entries(8)) {
            let root = sm.alloc().map_err(&s)?;
            alloc_arrays(&mut sm, &mut writes).map_err(&s)?;
            let mut leaf = Node::new_leaf(root, 8);
            leaf.keys = arrays.iter().map(|e| e.0).collect();
            leaf.values = arrays.iter().map(|e| e.1).collect();
            writes.push((root, leaf.pack()));
            root
        } else {
            alloc_arrays(&mut sm, &mut writes).map_err(&s)?;
            let (root, nodes) = build_tree(&arrays, 8, &mut || sm.alloc()).map_err(&s)?;
            writes.extend(nodes.iter().map(|n| (n.blocknr, n.pack())));
            root
        };
        let sm_root = sm.prepare_commit(&mut writes).map_err(&s)?;
        for (b, blk) in &writes {
            dev.write_block(*b, blk).map_err(&s)?;
        }
        dev.flush().map_err(&s)?;
        let sb = Superblock::new(sm_root, region_size, target_size, root);
        dev.write_block(0, &sb.pack()).map_err(&s)?;
        dev.flush().map_err(&s)?;
        Self::open_dev(dev, Some((region_size, target_size)))
    }

    /// Region size in sectors.
    pub fn region_size(&self) -> u64 {
        self.geo.region_size
    }
    /// Target size in sectors.
    pub fn target_size(&self) -> u64 {
        self.geo.target_size
    }
    /// Number of regions.
    pub fn nr_regions(&self) -> u64 {
        self.geo.nr_regions
    }
    /// The in-core bitset (committed plus pending): bit r%64 of word r/64 is region r.
    pub fn words(&self) -> &[u64] {
        let n = usize::try_from(self.geo.nr_words).unwrap_or(usize::MAX);
        self.words.get(..n).unwrap_or(&self.words)
    }
    /// Number of hydrated regions.
    pub fn hydrated_count(&self) -> u64 {
        self.hydrated
    }
    /// Whether region `r` is hydrated.
    pub fn is_hydrated(&self, r: u64) -> bool {
        usize::try_from(r / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| w & (1 << (r % 64)) != 0)
            && r < self.geo.nr_regions
    }
    /// Marks region `r` hydrated (pending until the next commit).
    pub fn set_region(&mut self, r: u64) -> Result<(), MetadataError> {
        if r >= self.geo.nr_regions {
            return Err(MetadataError::RegionOutOfRange {
                region: r,
                nr_regions: self.geo.nr_regions,
            });
        }
        let w = r / 64;
        let old = self.word(w);
        self.set_word(w, old | (1 << (r % 64)))
    }

    fn word(&self, w: u64) -> u64 {
        usize::try_from(w)
            .ok()
            .and_then(|i| self.words.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Replaces word `w`; bits beyond nr_regions are masked off.
    pub fn set_word(&mut self, w: u64, value: u64) -> Result<(), MetadataError> {
        let slot = usize::try_from(w)
            .ok()
            .filter(|_| w < self.geo.nr_words)
            .and_then(|i| self.words.get_mut(i))
            .ok_or(MetadataError::WordOutOfRange {
                word: w,
                nr_words: self.geo.nr_words,
            })?;
        let mut v = [value];
        mask_tail(&mut v, self.geo.nr_regions.saturating_sub(w * 64));
        let new = v[0];
        if *slot != new {
            self.hydrated =
                self.hydrated + u64::from(new.count_ones()) - u64::from(slot.count_ones());
            *slot = new;
            self.dirty.insert(w / u64::from(ARRAY_ENTRIES_U64));
        }
        Ok(())
    }

    /// Whether changes are pending.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }
    /// Whether a commit failed (the handle is then read-only).
    pub fn is_failed(&self) -> bool {
        self.failed
    }
    /// Metadata blocks in use (dm-clone status "used").
    pub fn used_blocks(&self) -> u64 {
        self.sm.nr_allocated()
    }
    /// Metadata blocks managed (dm-clone status "total").
    pub fn total_blocks(&self) -> u64 {
        self.sm.nr_blocks()
    }
    /// The last committed superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }
    /// Depth of the bitset btree.
    pub fn btree_depth(&self) -> usize {
        self.tree.depth()
    }

    /// Commits pending changes in the kernel's order: shadow the changed array blocks and their
    /// btree paths, shadow the space-map bitmaps and index, write them all, flush, then write
    /// the superblock and flush. A clean handle writes nothing. Errors are final (see the type docs).
    pub fn commit(&mut self) -> Result<CommitStats, MetadataError> {
        if self.failed {
            return Err(MetadataError::Failed);
        }
        if self.dirty.is_empty() {
            return Ok(CommitStats::default());
        }
        let r = self.commit_inner();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn commit_inner(&mut self) -> Result<CommitStats, MetadataError> {
        let s = step("commit");
        let per = u64::from(ARRAY_ENTRIES_U64);
        let mut writes: Vec<(u64, Box<Block>)> = Vec::new();
        let mut dirty_nodes: BTreeSet<(std::cmp::Reverse<usize>, usize)> = BTreeSet::new();
        for j in std::mem::take(&mut self.dirty) {
            let path = self.tree.path(j).ok_or_else(|| {
                MetadataError::Array(format!("array block {j} missing from the btree"))
            })?;
            let &(leaf, slot) = path.last().ok_or_else(|| {
                MetadataError::Array(format!("empty btree path for array block {j}"))
            })?;
            let tn = self
                .tree
                .nodes
                .get_mut(leaf)
                .ok_or_else(|| MetadataError::Array("bad btree arena index".into()))?;
            let value = tn
                .node
                .values
                .get_mut(slot)
                .ok_or_else(|| MetadataError::Array("bad btree slot".into()))?;
            let old = *value;
            let new = self.sm.alloc().map_err(&s)?;
            self.sm.dec(old).map_err(&s)?;
            *value = new;
            let start = usize::try_from(j * per).unwrap_or(usize::MAX);
            let nr = self
                .array_nr
                .get(usize::try_from(j).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0) as usize;
            let words = self
                .words
                .get(start..start.saturating_add(nr))
                .unwrap_or(&[]);
            writes.push((new, pack_u64(new, words)));
            for (ni, _) in path {
                let depth = self.tree.nodes.get(ni).map(|t| t.depth).unwrap_or(0);
                dirty_nodes.insert((std::cmp::Reverse(depth), ni));
            }
        }
        let array_blocks = writes.len() as u64;
        for (_, ni) in &dirty_nodes {
            let new = self.sm.alloc().map_err(&s)?;
            let (old, parent) = match self.tree.nodes.get_mut(*ni) {
                Some(tn) => (std::mem::replace(&mut tn.node.blocknr, new), tn.parent),
                None => return Err(MetadataError::Array("bad btree arena index".into())),
            };
            self.sm.dec(old).map_err(&s)?;
            if let Some((p, slot)) = parent {
                if let Some(v) = self
                    .tree
                    .nodes
                    .get_mut(p)
                    .and_then(|t| t.node.values.get_mut(slot))
                {
                    *v = new;
                }
            }
        }
        for (_, ni) in &dirty_nodes {
            if let Some(tn) = self.tree.nodes.get(*ni) {
                writes.push((tn.node.blocknr, tn.node.pack()));
            }
        }
        let before_sm = writes.len() as u64;
        let sm_root = self.sm.prepare_commit(&mut writes).map_err(&s)?;
        for (b, blk) in &writes {
            self.dev.write_block(*b, blk).map_err(&s)?;
        }
        self.dev.flush().map_err(&s)?;
        let root = self.tree.root().unwrap_or(self.sb.bitset_root);
        let sb = Superblock::new(sm_root, self.geo.region_size, self.geo.target_size, root);
        self.dev.write_block(0, &sb.pack()).map_err(&s)?;
        self.dev.flush().map_err(&s)?;
        self.sm.finish_commit(&sm_root);
        self.sb = sb;
        Ok(CommitStats {
            blocks_written: writes.len() as u64 + 1,
            array_blocks,
            btree_nodes: dirty_nodes.len() as u64,
            space_map_blocks: writes.len() as u64 - before_sm,
        })
    }
}
