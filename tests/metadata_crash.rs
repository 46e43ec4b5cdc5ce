//! Crash test: a commit cut after every possible number of writes must leave a device that
//! opens cleanly with exactly the old or the new state; failed commits are final.

#[path = "metadata_common.rs"]
mod common;

use vhost_clone::metadata::{check_image, CloneMetadata, MetadataError};
use vhost_clone::pdata::{FaultyDevice, MemDevice};

fn crash_all_points(base: Vec<u8>, regions: &[u64]) {
    let old = CloneMetadata::open_dev(Box::new(MemDevice::from_bytes(base.clone())), None).unwrap();
    let old_words = old.words().to_vec();
    // Dry run to learn the number of writes and the new state.
    let probe = MemDevice::from_bytes(base.clone());
    let mut md = CloneMetadata::open_dev(Box::new(probe.clone()), None).unwrap();
    for r in regions {
        md.set_region(*r).unwrap();
    }
    let n = md.commit().unwrap().blocks_written;
    let new_words = md.words().to_vec();
    assert_ne!(old_words, new_words);
    for k in 0..=n {
        let mem = MemDevice::from_bytes(base.clone());
        let faulty = FaultyDevice::new(mem.clone(), k, false);
        let mut md = CloneMetadata::open_dev(Box::new(faulty), None).unwrap();
        for r in regions {
            md.set_region(*r).unwrap();
        }
        md.commit().unwrap();
        let img = mem.snapshot();
        let re =
            CloneMetadata::open_dev(Box::new(MemDevice::from_bytes(img.clone())), None).unwrap();
        let expect = if k == n { &new_words } else { &old_words };
        assert_eq!(re.words(), &expect[..], "k={k} of {n}");
        assert!(check_image(&img).unwrap().is_consistent(), "k={k}");
        // Continue from the crashed device.
        let mut re = re;
        re.set_region(regions[0]).unwrap();
        re.commit().unwrap();
    }
    // I/O errors: the commit fails, the handle is failed, the disk keeps the old state.
    for k in 0..n {
        let mem = MemDevice::from_bytes(base.clone());
        let mut md =
            CloneMetadata::open_dev(Box::new(FaultyDevice::new(mem.clone(), k, true)), None)
                .unwrap();
        for r in regions {
            md.set_region(*r).unwrap();
        }
        assert!(md.commit().is_err());
        assert!(md.is_failed());
        assert!(matches!(md.commit(), Err(MetadataError::Failed)));
        let re = CloneMetadata::open_dev(Box::new(mem), None).unwrap();
        assert_eq!(re.words(), &old_words[..]);
    }
}

#[test]
fn crash_during_commit_fresh() {
    let mem = MemDevice::zeroed(1024);
    CloneMetadata::format_dev(Box::new(mem.clone()), 8, 2_097_152).unwrap();
    crash_all_points(mem.snapshot(), &[3, 40_000, 262_143]);
}

#[test]
fn crash_during_commit_kernel_multilevel() {
    crash_all_points(
        common::fixture_bytes("multilevel-64g-4k"),
        &[5, 9_000_100, 16_777_000],
    );
}
