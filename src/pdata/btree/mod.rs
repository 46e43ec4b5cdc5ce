//! Persistent btrees (spec §6): node codec, loading into an in-memory arena with full
//! validation, lookup of a key's path, and a bottom-up builder.

pub mod builder;
pub mod node;
pub mod tree;

pub use builder::build_tree;
pub use node::{max_entries, Node, INTERNAL_NODE, LEAF_NODE, NODE_HEADER_SIZE};
pub use tree::{LoadedTree, MAX_DEPTH};
