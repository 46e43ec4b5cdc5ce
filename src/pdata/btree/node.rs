//! Btree node codec (spec §6.1-§6.3).

use crate::pdata::block_device::{Block, BLOCK_SIZE};
use crate::pdata::checksum::{seal, verify, BlockKind};
use crate::pdata::error::PdataError;
use crate::pdata::unpack::{le_u32, le_u64, put_u32, put_u64};

/// Size of the node header: csum u32, flags u32, blocknr u64, nr_entries u32, max_entries u32,
/// value_size u32, padding u32.
pub const NODE_HEADER_SIZE: usize = 32;
/// `flags` bit of an internal node.
pub const INTERNAL_NODE: u32 = 1;
/// `flags` bit of a leaf.
pub const LEAF_NODE: u32 = 2;

/// Kernel `max_entries` for a value size: rounded down to a multiple of 3 (§6.2).
pub const fn max_entries(value_size: u32) -> u32 {
    let n = (BLOCK_SIZE as u32 - NODE_HEADER_SIZE as u32) / (8 + value_size);
    n / 3 * 3
}

/// A decoded btree node. Values are held as u64 whatever their on-disk size (4 or 8 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub blocknr: u64,
    pub leaf: bool,
    pub max_entries: u32,
    pub value_size: u32,
    pub keys: Vec<u64>,
    pub values: Vec<u64>,
}

impl Node {
    /// An empty leaf with the kernel's capacity for `value_size`.
    pub fn new_leaf(blocknr: u64, value_size: u32) -> Self {
        Node {
            blocknr,
            leaf: true,
            max_entries: max_entries(value_size),
            value_size,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    /// An empty internal node.
    pub fn new_internal(blocknr: u64) -> Self {
        Node {
            leaf: false,
            ..Node::new_leaf(blocknr, 8)
        }
    }

    /// Decodes and validates the node stored at block `loc` (§6.3).
    pub fn unpack(blk: &Block, loc: u64) -> Result<Node, PdataError> {
        let kind = BlockKind::BtreeNode;
        verify(blk, kind, loc)?;
        let flags = le_u32(blk, 4);
        let nr = le_u32(blk, 16);
        let max = le_u32(blk, 20);
        let vs = le_u32(blk, 24);
        if flags & (INTERNAL_NODE | LEAF_NODE) == 0 {
            return Err(PdataError::corrupt(
                kind,
                loc,
                format!("flags {flags:#x} name neither internal nor leaf"),
            ));
        }
        let leaf = flags & INTERNAL_NODE == 0;
        if vs != 4 && vs != 8 {
            return Err(PdataError::corrupt(
                kind,
                loc,
                format!("unsupported value_size {vs}"),
            ));
        }
        if !leaf && vs != 8 {
            return Err(PdataError::corrupt(
                kind,
                loc,
                format!("internal node with value_size {vs}"),
            ));
        }
        let need = u64::from(max)
            .checked_mul(8 + u64::from(vs))
            .and_then(|x| x.checked_add(NODE_HEADER_SIZE as u64));
        if need.is_none_or(|n| n > BLOCK_SIZE as u64) {
            return Err(PdataError::corrupt(
                kind,
                loc,
                format!("max_entries {max} too large for value_size {vs}"),
            ));
        }
        if nr > max {
            return Err(PdataError::corrupt(
                kind,
                loc,
                format!("nr_entries {nr} > max_entries {max}"),
            ));
        }
        let nr = nr as usize;
        let vbase = NODE_HEADER_SIZE + 8 * max as usize;
        let keys: Vec<u64> = (0..nr)
            .map(|i| le_u64(blk, NODE_HEADER_SIZE + 8 * i))
            .collect();
        let values: Vec<u64> = (0..nr)
            .map(|i| {
                let off = vbase + vs as usize * i;
                if vs == 8 {
                    le_u64(blk, off)
                } else {
                    u64::from(le_u32(blk, off))
                }
            })
            .collect();
        if keys.windows(2).any(|w| matches!(w, [a, b] if a >= b)) {
            return Err(PdataError::corrupt(
                kind,
                loc,
                "keys not strictly increasing",
            ));
        }
        Ok(Node {
            blocknr: loc,
            leaf,
            max_entries: max,
            value_size: vs,
            keys,
            values,
        })
    }

    /// Encodes the node into a zeroed block and seals it. Entries beyond `max_entries` are not
    /// written (callers never create them).
    pub fn pack(&self) -> Box<Block> {
        let mut blk: Box<Block> = Box::new([0; BLOCK_SIZE]);
        let n = self
            .keys
            .len()
            .min(self.values.len())
            .min(self.max_entries as usize);
        put_u32(
            &mut blk[..],
            4,
            if self.leaf { LEAF_NODE } else { INTERNAL_NODE },
        );
        put_u64(&mut blk[..], 8, self.blocknr);
        put_u32(&mut blk[..], 16, n as u32);
        put_u32(&mut blk[..], 20, self.max_entries);
        put_u32(&mut blk[..], 24, self.value_size);
        let vbase = NODE_HEADER_SIZE + 8 * self.max_entries as usize;
        for (i, (k, v)) in self.keys.iter().zip(&self.values).take(n).enumerate() {
            put_u64(&mut blk[..], NODE_HEADER_SIZE + 8 * i, *k);
            let off = vbase + self.value_size as usize * i;
            if self.value_size == 8 {
                put_u64(&mut blk[..], off, *v);
            } else {
                put_u32(&mut blk[..], off, *v as u32);
            }
        }
        seal(&mut blk, BlockKind::BtreeNode);
        blk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_entries_match_kernel() {
        assert_eq!(max_entries(8), 252);
        assert_eq!(max_entries(4), 336);
    }

    #[test]
    fn roundtrip() {
        let mut n = Node::new_leaf(7, 8);
        n.keys = vec![0, 1, 5];
        n.values = vec![10, 11, 12];
        let blk = n.pack();
        assert_eq!(Node::unpack(&blk, 7).ok(), Some(n));
        assert!(Node::unpack(&blk, 8).is_err());
    }
}
