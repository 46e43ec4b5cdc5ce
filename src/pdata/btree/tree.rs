//! A btree loaded into memory with full validation, kept as an arena so that a transaction can
//! shadow the path of a key and rewrite the nodes it changed.

use std::collections::HashSet;

use super::node::Node;
use crate::pdata::block_device::{MetaDevice, BLOCK_SIZE};
use crate::pdata::checksum::BlockKind;
use crate::pdata::error::PdataError;

/// Deepest tree accepted (the kernel cursor's limit).
pub const MAX_DEPTH: usize = 15;

/// One node of a loaded tree with its place in the arena.
#[derive(Debug, Clone)]
pub struct TreeNode {
    pub node: Node,
    pub depth: usize,
    /// (parent arena index, slot in the parent).
    pub parent: Option<(usize, usize)>,
    /// Arena indices of the children of an internal node, slot by slot.
    pub children: Vec<usize>,
}

/// A whole btree in memory; arena index 0 is the root.
#[derive(Debug, Clone, Default)]
pub struct LoadedTree {
    pub nodes: Vec<TreeNode>,
}

struct Loader<'a> {
    dev: &'a dyn MetaDevice,
    leaf_vs: u32,
    nr_blocks: u64,
    visited: HashSet<u64>,
    nodes: Vec<TreeNode>,
}

impl Loader<'_> {
    fn load(
        &mut self,
        b: u64,
        depth: usize,
        parent: Option<(usize, usize)>,
        lo: u64,
        hi: Option<u64>,
    ) -> Result<usize, PdataError> {
        let kind = BlockKind::BtreeNode;
        if depth >= MAX_DEPTH {
            return Err(PdataError::corrupt(
                kind,
                b,
                format!("btree deeper than {MAX_DEPTH}"),
            ));
        }
        if b >= self.nr_blocks {
            return Err(PdataError::OutOfRange {
                what: "btree node pointer",
                block: b,
                nr_blocks: self.nr_blocks,
            });
        }
        if !self.visited.insert(b) {
            return Err(PdataError::corrupt(
                kind,
                b,
                "node referenced twice (shared or cyclic btree)",
            ));
        }
        let mut blk = [0u8; BLOCK_SIZE];
        self.dev.read_block(b, &mut blk)?;
        let node = Node::unpack(&blk, b)?;
        if node.leaf && node.value_size != self.leaf_vs {
            return Err(PdataError::corrupt(
                kind,
                b,
                format!(
                    "leaf value_size {} (expected {})",
                    node.value_size, self.leaf_vs
                ),
            ));
        }
        if parent.is_some() {
            match (node.keys.first(), node.keys.last()) {
                (Some(first), Some(last)) => {
                    if *first < lo || hi.is_some_and(|h| *last >= h) {
                        return Err(PdataError::corrupt(
                            kind,
                            b,
                            "keys outside the range given by the parent node",
                        ));
                    }
                }
                _ => return Err(PdataError::corrupt(kind, b, "empty non-root node")),
            }
        }
        let idx = self.nodes.len();
        let leaf = node.leaf;
        let keys = node.keys.clone();
        let values = node.values.clone();
        self.nodes.push(TreeNode {
            node,
            depth,
            parent,
            children: Vec::new(),
        });
        if !leaf {
            for (slot, (k, child)) in keys.iter().zip(&values).enumerate() {
                let child_hi = keys.get(slot + 1).copied().or(hi);
                let c = self.load(*child, depth + 1, Some((idx, slot)), *k, child_hi)?;
                if let Some(tn) = self.nodes.get_mut(idx) {
                    tn.children.push(c);
                }
            }
        }
        Ok(idx)
    }
}

impl LoadedTree {
    /// Reads and validates every node of the tree rooted at `root`. `leaf_vs` is the expected
    /// leaf value size; every pointer must be below `nr_blocks`; no node may be reached twice.
    pub fn load(
        dev: &dyn MetaDevice,
        root: u64,
        leaf_vs: u32,
        nr_blocks: u64,
    ) -> Result<Self, PdataError> {
        let mut l = Loader {
            dev,
            leaf_vs,
            nr_blocks,
            visited: HashSet::new(),
            nodes: Vec::new(),
        };
        l.load(root, 0, None, 0, None)?;
        Ok(LoadedTree { nodes: l.nodes })
    }

    /// Leaf entries (key, value) in key order.
    pub fn leaf_entries(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![0usize];
        while let Some(i) = stack.pop() {
            let Some(tn) = self.nodes.get(i) else {
                continue;
            };
            if tn.node.leaf {
                out.extend(
                    tn.node
                        .keys
                        .iter()
                        .copied()
                        .zip(tn.node.values.iter().copied()),
                );
            } else {
                stack.extend(tn.children.iter().rev());
            }
        }
        out
    }

    /// Block numbers of all nodes.
    pub fn node_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.nodes.iter().map(|n| n.node.blocknr)
    }

    /// Root block number.
    pub fn root(&self) -> Option<u64> {
        self.nodes.first().map(|n| n.node.blocknr)
    }

    /// Depth of the tree (1 for a lone root leaf).
    pub fn depth(&self) -> usize {
        self.nodes.iter().map(|n| n.depth + 1).max().unwrap_or(0)
    }

    /// Path from the root to the leaf entry holding `key`: (arena index, slot) per level.
    pub fn path(&self, key: u64) -> Option<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        let mut i = 0usize;
        loop {
            let tn = self.nodes.get(i)?;
            let slot = tn.node.keys.partition_point(|k| *k <= key).checked_sub(1)?;
            out.push((i, slot));
            if tn.node.leaf {
                return (tn.node.keys.get(slot) == Some(&key)).then_some(out);
            }
            i = *tn.children.get(slot)?;
        }
    }
}
