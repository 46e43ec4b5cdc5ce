//! Errors of the persistent-data layer.

use super::checksum::BlockKind;

/// An error reading, validating or writing persistent-data structures.
#[derive(Debug, thiserror::Error)]
pub enum PdataError {
    /// The device failed a read, write or flush.
    #[error("{step}: I/O error at metadata block {block}: {source}")]
    Io {
        step: &'static str,
        block: u64,
        #[source]
        source: std::io::Error,
    },
    /// A block's stored checksum does not match its contents.
    #[error(
        "{kind} block {block}: bad checksum (stored {stored:#010x}, computed {computed:#010x})"
    )]
    Checksum {
        kind: BlockKind,
        block: u64,
        stored: u32,
        computed: u32,
    },
    /// A block's self-location field names another block.
    #[error("{kind} block {block}: self-location field says block {found}")]
    SelfLocation {
        kind: BlockKind,
        block: u64,
        found: u64,
    },
    /// A block is well formed but its contents break a format rule.
    #[error("{kind} block {block}: {reason}")]
    Corrupt {
        kind: BlockKind,
        block: u64,
        reason: String,
    },
    /// A block pointer points outside the metadata device / space map.
    #[error("{what}: block {block} is beyond the end of the metadata ({nr_blocks} blocks)")]
    OutOfRange {
        what: &'static str,
        block: u64,
        nr_blocks: u64,
    },
    /// No free block is left for a new copy-on-write block.
    #[error(
        "space map: no free metadata block left among {nr_blocks}; the metadata device is full"
    )]
    NoSpace { nr_blocks: u64 },
    /// The space map is inconsistent with an operation (e.g. freeing a free block).
    #[error("space map: {0}")]
    SpaceMap(String),
    /// The structure is valid but uses a feature this implementation does not write.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl PdataError {
    pub(crate) fn corrupt(kind: BlockKind, block: u64, reason: impl Into<String>) -> Self {
        PdataError::Corrupt {
            kind,
            block,
            reason: reason.into(),
        }
    }
}
