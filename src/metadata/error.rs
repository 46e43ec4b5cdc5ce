//! Errors of the dm-clone metadata layer.

use crate::pdata::PdataError;

/// An error opening, formatting, checking or committing dm-clone metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A persistent-data error during `step`.
    #[error("{step}: {source}")]
    Pdata {
        step: &'static str,
        #[source]
        source: PdataError,
    },
    /// Block 0 is all zero: the device holds no metadata.
    #[error("metadata device is not formatted (block 0 is all zero); format it first")]
    Unformatted,
    /// Format refused on a device that already has something in block 0.
    #[error("refusing to format: block 0 of the metadata device is not all zero (existing metadata would be lost; zero the first 4096 bytes to force it)")]
    NotZero,
    /// The superblock magic is wrong.
    #[error("superblock: bad magic {0:#x} (expected 0x8af27f64): not dm-clone metadata")]
    BadMagic(u64),
    /// The superblock version is not 1.
    #[error("superblock: unsupported version {0} (only version 1 exists)")]
    BadVersion(u32),
    /// The superblock's sizes differ from the requested ones.
    #[error("superblock has region_size {found_region} and target_size {found_target} sectors, but {expected_region} and {expected_target} were given; dm-clone metadata cannot be resized")]
    GeometryMismatch {
        found_region: u64,
        found_target: u64,
        expected_region: u64,
        expected_target: u64,
    },
    /// Region size / target size are not acceptable.
    #[error("invalid geometry: {0}")]
    Geometry(String),
    /// The on-disk bitset holds fewer bits than there are regions.
    #[error("region bitset too short: {found} bits on disk for {nr_regions} regions")]
    BitsetTooShort { found: u64, nr_regions: u64 },
    /// The dm-array holding the bitset is malformed.
    #[error("region bitset array: {0}")]
    Array(String),
    /// The device cannot hold the metadata.
    #[error("metadata device too small: {have} blocks of 4 KiB, need at least {need}")]
    DeviceTooSmall { have: u64, need: u64 },
    /// A region index beyond the target.
    #[error("region {region} out of range (nr_regions {nr_regions})")]
    RegionOutOfRange { region: u64, nr_regions: u64 },
    /// A word index beyond the bitset.
    #[error("bitset word {word} out of range (nr_words {nr_words})")]
    WordOutOfRange { word: u64, nr_words: u64 },
    /// A previous commit failed; this handle refuses further commits.
    #[error("a previous metadata commit failed; the metadata is read-only until reopened (the last committed state on disk is intact)")]
    Failed,
}

/// Wraps a [`PdataError`] with the step that failed.
pub(crate) fn step(step: &'static str) -> impl Fn(PdataError) -> MetadataError {
    move |source| MetadataError::Pdata { step, source }
}
