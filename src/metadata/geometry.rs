//! dm-clone geometry (spec §8.1, §10.1).

use super::error::MetadataError;
use crate::pdata::array::ARRAY_ENTRIES_U64;

/// Most regions dm-clone accepts.
pub const MAX_REGIONS: u64 = 1 << 31;
/// Smallest and largest region sizes (sectors).
pub const MIN_REGION_SIZE: u64 = 8;
pub const MAX_REGION_SIZE: u64 = 2_097_152;

/// Sizes derived from region_size and target_size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub region_size: u64,
    pub target_size: u64,
    pub nr_regions: u64,
    pub nr_words: u64,
    pub nr_array_blocks: u64,
}

impl Geometry {
    /// Geometry of existing metadata: sizes must be non-zero and give at most 2^31 regions.
    pub fn new(region_size: u64, target_size: u64) -> Result<Self, MetadataError> {
        if region_size == 0 || target_size == 0 {
            return Err(MetadataError::Geometry(format!(
                "region_size {region_size} and target_size {target_size} must be non-zero"
            )));
        }
        let nr_regions = target_size.div_ceil(region_size);
        if nr_regions > MAX_REGIONS {
            return Err(MetadataError::Geometry(format!(
                "{nr_regions} regions exceed the dm-clone limit of {MAX_REGIONS}; use a larger region size"
            )));
        }
        let nr_words = nr_regions.div_ceil(64);
        Ok(Geometry {
            region_size,
            target_size,
            nr_regions,
            nr_words,
            nr_array_blocks: nr_words.div_ceil(u64::from(ARRAY_ENTRIES_U64)),
        })
    }

    /// Geometry for a new format: also requires a power-of-two region size in 8..=2097152.
    pub fn for_format(region_size: u64, target_size: u64) -> Result<Self, MetadataError> {
        if !region_size.is_power_of_two()
            || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size)
        {
            return Err(MetadataError::Geometry(format!(
                "region size {region_size} sectors must be a power of two between {MIN_REGION_SIZE} and {MAX_REGION_SIZE}"
            )));
        }
        Self::new(region_size, target_size)
    }
}
