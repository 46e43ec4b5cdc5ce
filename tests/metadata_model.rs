//! Model test: random set-region/commit sequences against a BTreeSet, reopening and checking
//! after every commit; plus commit-size and open-time figures.

#[path = "metadata_common.rs"]
mod common;

use std::collections::BTreeSet;

use rand::{Rng, SeedableRng};
use vhost_clone::metadata::{check_image, CloneMetadata};
use vhost_clone::pdata::MemDevice;

fn run_model(
    dev_blocks: u64,
    region: u64,
    target: u64,
    commits: usize,
    per_commit: usize,
    seed: u64,
) {
    let dev = MemDevice::zeroed(dev_blocks);
    let mut md = CloneMetadata::format_dev(Box::new(dev.clone()), region, target).unwrap();
    let n = md.nr_regions();
    let used = md.used_blocks();
    let mut model = BTreeSet::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..commits {
        for _ in 0..per_commit {
            let r = if rng.gen_bool(0.2) {
                n - 1 - rng.gen_range(0..n.min(100))
            } else {
                rng.gen_range(0..n)
            };
            md.set_region(r).unwrap();
            model.insert(r);
        }
        if rng.gen_bool(0.2) {
            let w = rng.gen_range(0..md.words().len() as u64);
            md.set_word(w, u64::MAX).unwrap();
            for r in w * 64..((w + 1) * 64).min(n) {
                model.insert(r);
            }
        }
        assert!(md.set_region(n).is_err());
        md.commit().unwrap();
        assert!(!md.is_dirty());
        assert_eq!(md.used_blocks(), used);
        let report = check_image(&dev.snapshot()).unwrap();
        assert!(report.is_consistent(), "{report}");
        let re = CloneMetadata::open_dev(Box::new(dev.clone()), Some((region, target))).unwrap();
        let got: BTreeSet<u64> = (0..n)
            .filter(|r| re.words()[(r / 64) as usize] & (1 << (r % 64)) != 0)
            .collect();
        assert_eq!(got, model);
        assert_eq!(re.hydrated_count(), model.len() as u64);
        md = re;
    }
}

#[test]
fn model_single_leaf() {
    run_model(1024, 8, 2_097_152, 12, 20, 1);
    run_model(64, 16, 1000, 10, 3, 2); // partial last region, one array block
}

#[test]
fn model_multilevel_btree() {
    // 64 GiB at 4 KiB regions: 516 array blocks, a two-level btree, 2 space-map bitmaps.
    run_model(16384, 8, 134_217_728, 5, 8, 3);
}

#[test]
fn commit_writes_few_blocks() {
    let dev = MemDevice::zeroed(16384);
    let mut md = CloneMetadata::format_dev(Box::new(dev), 8, 134_217_728).unwrap();
    for k in [1u64, 10, 100, 1000] {
        for i in 0..k {
            md.set_region(i * 64 * 509 * 3 % md.nr_regions()).unwrap();
        }
        let s = md.commit().unwrap();
        println!(
            "k={k} dirty regions -> {s:?} (btree depth {})",
            md.btree_depth()
        );
        // array blocks + path nodes + bitmaps + index + superblock
        assert!(s.blocks_written <= s.array_blocks * 2 + 2 + 2 + 3 + 1);
    }
    let s = md.commit().unwrap();
    assert_eq!(s.blocks_written, 0);
}

#[test]
fn open_1tib_4k_regions() {
    // 1 TiB at 4 KiB regions: 268,435,456 regions, 8241 array blocks, on a 64 MiB device.
    let dev = MemDevice::zeroed(16384);
    let t = std::time::Instant::now();
    let md = CloneMetadata::format_dev(Box::new(dev.clone()), 8, 2_147_483_648).unwrap();
    println!(
        "format 1 TiB/4 KiB: {:?}, used {} blocks, depth {}",
        t.elapsed(),
        md.used_blocks(),
        md.btree_depth()
    );
    let t = std::time::Instant::now();
    let md = CloneMetadata::open_dev(Box::new(dev), None).unwrap();
    println!("open 1 TiB/4 KiB (in memory): {:?}", t.elapsed());
    assert_eq!(md.nr_regions(), 268_435_456);
    assert_eq!(md.words().len(), 4_194_304);
}
