//! Region geometry of a `clone` target: how sectors map to regions.
//!
//! All arithmetic is checked; no lossy casts. Sectors are 512-byte units on the target.

use std::ops::Range;

/// Smallest region size accepted by dm-clone (4 KiB).
pub const MIN_REGION_SECTORS: u64 = 8;
/// Largest region size accepted by dm-clone (1 GiB).
pub const MAX_REGION_SECTORS: u64 = 2_097_152;
/// dm-clone rejects tables with more regions than this (dm-clone-metadata.md §10.1).
pub const MAX_REGIONS: u64 = 1 << 31;

/// Why a geometry or a request range was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("region size {0} sectors is not a power of two")]
    RegionSizeNotPowerOfTwo(u64),
    #[error("region size {0} sectors is outside 8..=2097152")]
    RegionSizeOutOfRange(u64),
    #[error("target length is zero sectors")]
    EmptyTarget,
    #[error("target of {target_sectors} sectors needs {nr_regions} regions, more than the 2^31 dm-clone allows; use a larger region size")]
    TooManyRegions {
        target_sectors: u64,
        nr_regions: u64,
    },
    #[error("request [{sector}, +{nr_sectors}) is beyond the target end {target_sectors}")]
    OutOfRange {
        sector: u64,
        nr_sectors: u64,
        target_sectors: u64,
    },
}

/// A contiguous part of a request that lies inside one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Region index.
    pub region: u64,
    /// First sector of the segment (target-relative).
    pub sector: u64,
    /// Length in sectors (> 0).
    pub nr_sectors: u64,
    /// True if the segment covers the whole region (for a partial last region: from its start to the target end).
    pub full: bool,
}

/// Immutable region geometry: region size, target length and region count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionGeometry {
    region_sectors: u64,
    region_shift: u32,
    target_sectors: u64,
    nr_regions: u64,
}

impl RegionGeometry {
    /// Checked constructor: region size a power of two in 8..=2097152, target non-empty, at most 2^31 regions.
    pub fn new(region_sectors: u64, target_sectors: u64) -> Result<Self, GeometryError> {
        if !region_sectors.is_power_of_two() {
            return Err(GeometryError::RegionSizeNotPowerOfTwo(region_sectors));
        }
        if !(MIN_REGION_SECTORS..=MAX_REGION_SECTORS).contains(&region_sectors) {
            return Err(GeometryError::RegionSizeOutOfRange(region_sectors));
        }
        if target_sectors == 0 {
            return Err(GeometryError::EmptyTarget);
        }
        let nr_regions = target_sectors.div_ceil(region_sectors);
        if nr_regions > MAX_REGIONS {
            return Err(GeometryError::TooManyRegions {
                target_sectors,
                nr_regions,
            });
        }
        Ok(Self {
            region_sectors,
            region_shift: region_sectors.trailing_zeros(),
            target_sectors,
            nr_regions,
        })
    }

    /// Region size in sectors.
    pub fn region_sectors(&self) -> u64 {
        self.region_sectors
    }

    /// Target length in sectors.
    pub fn target_sectors(&self) -> u64 {
        self.target_sectors
    }

    /// Number of regions, `ceil(target / region)`.
    pub fn nr_regions(&self) -> u64 {
        self.nr_regions
    }

    /// True if the last region is shorter than `region_sectors`.
    pub fn has_partial_last_region(&self) -> bool {
        self.target_sectors & (self.region_sectors - 1) != 0
    }

    /// Region containing `sector`, or `None` if the sector is beyond the target.
    pub fn region_of(&self, sector: u64) -> Option<u64> {
        (sector < self.target_sectors).then_some(sector >> self.region_shift)
    }

    /// `(start_sector, nr_sectors)` of region `r`; the last region may be partial. `None` if `r` is out of range.
    pub fn region_range(&self, r: u64) -> Option<(u64, u64)> {
        if r >= self.nr_regions {
            return None;
        }
        // r < nr_regions <= 2^31 and region_sectors <= 2^21: the shift cannot overflow, but stay checked.
        let start = r.checked_shl(self.region_shift)?;
        let len = self
            .target_sectors
            .checked_sub(start)?
            .min(self.region_sectors);
        Some((start, len))
    }

    fn check(&self, sector: u64, nr_sectors: u64) -> Result<u64, GeometryError> {
        let err = GeometryError::OutOfRange {
            sector,
            nr_sectors,
            target_sectors: self.target_sectors,
        };
        match sector.checked_add(nr_sectors) {
            Some(end) if end <= self.target_sectors => Ok(end),
            _ => Err(err),
        }
    }

    /// Regions touched (at least partly) by `[sector, sector + nr_sectors)`. Empty for `nr_sectors == 0`.
    pub fn regions_touched(
        &self,
        sector: u64,
        nr_sectors: u64,
    ) -> Result<Range<u64>, GeometryError> {
        let end = self.check(sector, nr_sectors)?;
        let first = sector >> self.region_shift;
        if nr_sectors == 0 {
            return Ok(first..first);
        }
        // end >= 1 because nr_sectors >= 1.
        let last = (end - 1) >> self.region_shift;
        Ok(first..last + 1)
    }

    /// Regions a *write* covers completely: whole regions, plus the partial last region if the request covers
    /// it from its start up to the target end.
    pub fn regions_fully_covered(
        &self,
        sector: u64,
        nr_sectors: u64,
    ) -> Result<Range<u64>, GeometryError> {
        let end = self.check(sector, nr_sectors)?;
        let first = self.ceil_region(sector);
        let mut last = end >> self.region_shift; // exclusive
        if end == self.target_sectors && self.has_partial_last_region() {
            last = self.nr_regions;
        }
        Ok(first..last.max(first))
    }

    /// Regions a *discard* may mark hydrated: `ceil(start/region) .. floor(end/region)`. The kernel never marks
    /// the partial last region for a discard (dm-clone-metadata.md §16).
    pub fn regions_discardable(
        &self,
        sector: u64,
        nr_sectors: u64,
    ) -> Result<Range<u64>, GeometryError> {
        let end = self.check(sector, nr_sectors)?;
        let first = self.ceil_region(sector);
        let last = end >> self.region_shift;
        Ok(first..last.max(first))
    }

    fn ceil_region(&self, sector: u64) -> u64 {
        let mask = self.region_sectors - 1;
        (sector >> self.region_shift) + u64::from(sector & mask != 0)
    }

    /// Split `[sector, sector + nr_sectors)` into one segment per touched region, in order.
    pub fn split(&self, sector: u64, nr_sectors: u64) -> Result<Split, GeometryError> {
        let end = self.check(sector, nr_sectors)?;
        Ok(Split {
            geo: *self,
            pos: sector,
            end,
        })
    }
}

/// Iterator returned by [`RegionGeometry::split`].
#[derive(Debug, Clone)]
pub struct Split {
    geo: RegionGeometry,
    pos: u64,
    end: u64,
}

impl Iterator for Split {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        if self.pos >= self.end {
            return None;
        }
        let region = self.geo.region_of(self.pos)?;
        let (rstart, rlen) = self.geo.region_range(region)?;
        let rend = rstart.checked_add(rlen)?;
        let seg_end = rend.min(self.end);
        let nr_sectors = seg_end.checked_sub(self.pos)?;
        let seg = Segment {
            region,
            sector: self.pos,
            nr_sectors,
            full: self.pos == rstart && seg_end == rend,
        };
        self.pos = seg_end;
        Some(seg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructor_rejects_bad_geometry() {
        assert_eq!(
            RegionGeometry::new(12, 100),
            Err(GeometryError::RegionSizeNotPowerOfTwo(12))
        );
        assert_eq!(
            RegionGeometry::new(4, 100),
            Err(GeometryError::RegionSizeOutOfRange(4))
        );
        assert_eq!(
            RegionGeometry::new(4_194_304, 100),
            Err(GeometryError::RegionSizeOutOfRange(4_194_304))
        );
        assert_eq!(RegionGeometry::new(8, 0), Err(GeometryError::EmptyTarget));
        assert!(matches!(
            RegionGeometry::new(8, (1 << 34) + 1),
            Err(GeometryError::TooManyRegions { .. })
        ));
        assert_eq!(
            RegionGeometry::new(8, 1 << 34).unwrap().nr_regions(),
            1 << 31
        );
    }

    #[test]
    fn partial_last_region() {
        let g = RegionGeometry::new(8, 20).unwrap();
        assert_eq!(g.nr_regions(), 3);
        assert!(g.has_partial_last_region());
        assert_eq!(g.region_range(2), Some((16, 4)));
        assert_eq!(g.region_range(3), None);
        assert_eq!(g.region_of(19), Some(2));
        assert_eq!(g.region_of(20), None);
        // A write from the last region's start to the end covers it; a discard never does.
        assert_eq!(g.regions_fully_covered(16, 4).unwrap(), 2..3);
        assert_eq!(g.regions_fully_covered(17, 3).unwrap(), 3..3);
        assert_eq!(g.regions_discardable(0, 20).unwrap(), 0..2);
        assert_eq!(g.regions_fully_covered(0, 20).unwrap(), 0..3);
    }

    #[test]
    fn split_segments() {
        let g = RegionGeometry::new(8, 20).unwrap();
        let segs: Vec<_> = g.split(5, 15).unwrap().collect();
        assert_eq!(
            segs,
            vec![
                Segment {
                    region: 0,
                    sector: 5,
                    nr_sectors: 3,
                    full: false
                },
                Segment {
                    region: 1,
                    sector: 8,
                    nr_sectors: 8,
                    full: true
                },
                Segment {
                    region: 2,
                    sector: 16,
                    nr_sectors: 4,
                    full: true
                },
            ]
        );
        assert_eq!(g.split(3, 0).unwrap().count(), 0);
        assert!(g.split(19, 2).is_err());
        assert!(g.split(u64::MAX, 2).is_err());
    }
}
