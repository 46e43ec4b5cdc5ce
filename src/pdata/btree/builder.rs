//! Bottom-up btree builder: balanced leaves of at most `max_entries`, internal levels above.

use super::node::Node;
use crate::pdata::error::PdataError;

/// Splits `n` items into the fewest groups of at most `cap`, sizes differing by at most one.
fn group_sizes(n: usize, cap: usize) -> Vec<usize> {
    let groups = n.div_ceil(cap.max(1)).max(1);
    let base = n / groups;
    let rem = n % groups;
    (0..groups).map(|g| base + usize::from(g < rem)).collect()
}

/// Builds a btree over sorted `entries` (key, value), allocating each node's block with
/// `alloc`. Returns the root block and all nodes (root last).
pub fn build_tree(
    entries: &[(u64, u64)],
    leaf_value_size: u32,
    alloc: &mut dyn FnMut() -> Result<u64, PdataError>,
) -> Result<(u64, Vec<Node>), PdataError> {
    let mut all = Vec::new();
    let mut level: Vec<(u64, u64)> = entries.to_vec();
    let mut leaf = true;
    loop {
        let proto = if leaf {
            Node::new_leaf(0, leaf_value_size)
        } else {
            Node::new_internal(0)
        };
        let mut next = Vec::new();
        let mut rest: &[(u64, u64)] = &level;
        for size in group_sizes(level.len(), proto.max_entries as usize) {
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            rest = tail;
            let mut node = proto.clone();
            node.blocknr = alloc()?;
            node.keys = chunk.iter().map(|e| e.0).collect();
            node.values = chunk.iter().map(|e| e.1).collect();
            next.push((node.keys.first().copied().unwrap_or(0), node.blocknr));
            all.push(node);
        }
        if next.len() == 1 {
            let root = next.first().map(|e| e.1).unwrap_or(0);
            return Ok((root, all));
        }
        level = next;
        leaf = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups() {
        assert_eq!(group_sizes(0, 252), vec![0]);
        assert_eq!(group_sizes(252, 252), vec![252]);
        assert_eq!(group_sizes(253, 252), vec![127, 126]);
    }

    #[test]
    fn builds_two_levels() {
        let e: Vec<(u64, u64)> = (0..600).map(|i| (i, 1000 + i)).collect();
        let mut next = 10;
        let (root, nodes) = build_tree(&e, 8, &mut || {
            next += 1;
            Ok(next)
        })
        .unwrap_or_default();
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes.last().map(|n| n.blocknr), Some(root));
    }
}
