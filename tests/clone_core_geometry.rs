//! Geometry edge cases against a brute-force model.

use vhost_clone::target::clone::{GeometryError, RegionGeometry, Segment};

/// Model: per region, which of its sectors the request covers.
fn model(g: &RegionGeometry, sector: u64, n: u64) -> Vec<(u64, u64, u64, bool)> {
    let mut out: Vec<(u64, u64, u64, bool)> = Vec::new();
    for s in sector..sector + n {
        let r = s / g.region_sectors();
        match out.last_mut() {
            Some(last) if last.0 == r => last.2 += 1,
            _ => out.push((r, s, 1, false)),
        }
    }
    for seg in &mut out {
        let (start, len) = g.region_range(seg.0).unwrap();
        seg.3 = seg.1 == start && seg.2 == len;
    }
    out
}

#[test]
fn exhaustive_small_targets() {
    for target in [8u64, 9, 15, 16, 17, 20, 24, 31, 40] {
        let g = RegionGeometry::new(8, target).unwrap();
        for sector in 0..=target {
            for n in 0..=(target - sector) {
                let m = model(&g, sector, n);
                let segs: Vec<Segment> = g.split(sector, n).unwrap().collect();
                let got: Vec<_> = segs
                    .iter()
                    .map(|s| (s.region, s.sector, s.nr_sectors, s.full))
                    .collect();
                assert_eq!(got, m, "split t={target} s={sector} n={n}");
                let touched = g.regions_touched(sector, n).unwrap();
                assert_eq!(touched.count(), m.len());
                let full: Vec<u64> = m.iter().filter(|x| x.3).map(|x| x.0).collect();
                let fc = g.regions_fully_covered(sector, n).unwrap();
                assert_eq!(
                    fc.clone().collect::<Vec<_>>(),
                    full,
                    "full t={target} s={sector} n={n}"
                );
                // discards: like writes but never the partial last region
                let disc: Vec<u64> = full
                    .iter()
                    .copied()
                    .filter(|&r| g.region_range(r).unwrap().1 == 8)
                    .collect();
                assert_eq!(
                    g.regions_discardable(sector, n)
                        .unwrap()
                        .collect::<Vec<_>>(),
                    disc
                );
            }
        }
    }
}

#[test]
fn huge_targets_and_overflow() {
    // 1 GiB regions, 2^31 regions: the largest possible target (2^52 sectors).
    let g = RegionGeometry::new(2_097_152, 1u64 << 52).unwrap();
    assert_eq!(g.nr_regions(), 1 << 31);
    let last = g.nr_regions() - 1;
    assert_eq!(
        g.region_range(last),
        Some(((1u64 << 52) - 2_097_152, 2_097_152))
    );
    assert_eq!(g.region_of((1u64 << 52) - 1), Some(last));
    assert_eq!(
        g.regions_touched((1u64 << 52) - 1, 1).unwrap(),
        last..last + 1
    );
    // partial last region on a huge target
    let g = RegionGeometry::new(2_097_152, (1u64 << 52) - 1).unwrap();
    assert_eq!(g.region_range(g.nr_regions() - 1).unwrap().1, 2_097_151);
    assert_eq!(
        g.regions_discardable(0, (1u64 << 52) - 1).unwrap().end,
        g.nr_regions() - 1
    );
    assert_eq!(
        g.regions_fully_covered(0, (1u64 << 52) - 1).unwrap().end,
        g.nr_regions()
    );
    // overflow of sector + nr_sectors is an error, not a wrap
    for (s, n) in [(u64::MAX, 1), (1, u64::MAX), (u64::MAX, u64::MAX)] {
        assert!(matches!(
            g.regions_touched(s, n),
            Err(GeometryError::OutOfRange { .. })
        ));
        assert!(g.split(s, n).is_err());
        assert!(g.regions_fully_covered(s, n).is_err());
        assert!(g.regions_discardable(s, n).is_err());
    }
    assert_eq!(g.region_of(u64::MAX), None);
    assert_eq!(g.region_range(u64::MAX), None);
    assert!(matches!(
        RegionGeometry::new(8, u64::MAX),
        Err(GeometryError::TooManyRegions { .. })
    ));
    assert!(RegionGeometry::new(u64::MAX, 8).is_err());
    assert!(RegionGeometry::new(1 << 63, 8).is_err());
}

#[test]
fn write_inside_partial_last_region_is_not_full() {
    let g = RegionGeometry::new(16, 262_144 + 8).unwrap();
    let last = g.nr_regions() - 1;
    assert_eq!(g.region_range(last), Some((262_144, 8)));
    let segs: Vec<_> = g.split(262_144, 4).unwrap().collect();
    assert!(!segs[0].full, "half of the partial tail needs a copy first");
    let segs: Vec<_> = g.split(262_144, 8).unwrap().collect();
    assert!(segs[0].full);
}
