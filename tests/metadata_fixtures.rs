//! Kernel-written fixtures: open, check, expected hydration, byte-identical format, and
//! continuing the kernel's metadata with our own commits.

#[path = "metadata_common.rs"]
mod common;

use common::*;
use vhost_clone::metadata::{check_cmd, check_image, dump_cmd, ranges_string, CloneMetadata};
use vhost_clone::pdata::MemDevice;

#[test]
fn every_fixture_opens_checks_and_matches_expect() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let bytes = fixture_bytes(name);
        let path = tmp.path().join(format!("{name}.meta"));
        std::fs::write(&path, &bytes).unwrap();
        let report = check_cmd(&path).unwrap();
        assert!(report.is_consistent(), "{name}: {report}");
        let (h, n, ranges) = expect(name);
        let md = CloneMetadata::open(&path, None).unwrap();
        assert_eq!(md.hydrated_count(), h, "{name}");
        assert_eq!(md.nr_regions(), n, "{name}");
        if let Some(r) = ranges {
            assert_eq!(ranges_string(md.words(), md.nr_regions()), r, "{name}");
        }
        let open_again =
            CloneMetadata::open(&path, Some((md.region_size(), md.target_size()))).unwrap();
        assert!(!open_again.is_dirty());
        let mut m2 = open_again;
        assert_eq!(m2.commit().unwrap().blocks_written, 0);
        assert!(dump_cmd(&path, false)
            .unwrap()
            .contains(&format!("hydrated: {h}")));
        let json: serde_json::Value =
            serde_json::from_str(&dump_cmd(&path, true).unwrap()).unwrap();
        assert_eq!(json["hydrated"], h);
        // Nothing was written: open, check, dump and a no-op commit leave the bytes alone.
        assert_eq!(
            sha256(&std::fs::read(&path).unwrap()),
            sha256(&bytes),
            "{name} modified"
        );
        assert!(check_image(&bytes).unwrap().is_consistent());
    }
}

#[test]
fn format_is_byte_identical_to_kernel() {
    let kernel = fixture_bytes("fresh-1g-4k");
    let dev = MemDevice::zeroed(1024);
    let md = CloneMetadata::format_dev(Box::new(dev.clone()), 8, 2_097_152).unwrap();
    assert_eq!(md.used_blocks(), 14);
    assert_eq!(md.total_blocks(), 1024);
    let ours = dev.snapshot();
    assert_eq!(ours.len(), kernel.len());
    let diff: Vec<usize> = (0..1024)
        .filter(|b| ours[b * 4096..(b + 1) * 4096] != kernel[b * 4096..(b + 1) * 4096])
        .collect();
    assert!(diff.is_empty(), "blocks differ: {diff:?}");
}

#[test]
fn format_refuses_nonzero_and_checks_geometry() {
    let bytes = fixture_bytes("partial-64m-4k");
    assert!(
        CloneMetadata::format_dev(Box::new(MemDevice::from_bytes(bytes.clone())), 8, 131_072)
            .is_err()
    );
    assert!(CloneMetadata::open_dev(
        Box::new(MemDevice::from_bytes(bytes.clone())),
        Some((16, 131_072))
    )
    .is_err());
    assert!(CloneMetadata::open_dev(
        Box::new(MemDevice::from_bytes(bytes.clone())),
        Some((8, 131_073))
    )
    .is_err());
    let md = CloneMetadata::open_or_format_dev(Box::new(MemDevice::from_bytes(bytes)), 8, 131_072)
        .unwrap();
    assert_eq!(md.hydrated_count(), 19);
    assert!(CloneMetadata::open_dev(Box::new(MemDevice::zeroed(16)), None).is_err());
    assert!(CloneMetadata::format_dev(Box::new(MemDevice::zeroed(8)), 8, 2_097_152).is_err());
    assert!(CloneMetadata::format_dev(Box::new(MemDevice::zeroed(64)), 12, 2_097_152).is_err());
}

#[test]
fn continue_kernel_metadata() {
    for name in [
        "partial-64m-4k",
        "multilevel-64g-4k",
        "fresh-64g-4k",
        "hydrated-then-written",
    ] {
        let dev = MemDevice::from_bytes(fixture_bytes(name));
        let mut md = CloneMetadata::open_dev(Box::new(dev.clone()), None).unwrap();
        let n = md.nr_regions();
        let mut expect: Vec<u64> = md.words().to_vec();
        for r in [0, 1, 77, n / 3, n / 2 + 5, n - 1] {
            md.set_region(r).unwrap();
            expect[(r / 64) as usize] |= 1 << (r % 64);
        }
        let used = md.used_blocks();
        let stats = md.commit().unwrap();
        assert!(stats.blocks_written > 0 || md.hydrated_count() == n);
        assert_eq!(
            md.used_blocks(),
            used,
            "{name}: steady state keeps used blocks"
        );
        let report = check_image(&dev.snapshot()).unwrap();
        assert!(report.is_consistent(), "{name}: {report}");
        let md2 = CloneMetadata::open_dev(Box::new(dev.clone()), None).unwrap();
        assert_eq!(md2.words(), &expect[..], "{name}");
    }
}
