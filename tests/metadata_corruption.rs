//! Corruption: damaged copies of fixtures make open/check fail with errors, never panic;
//! damage outside reachable blocks changes nothing.

#[path = "metadata_common.rs"]
mod common;

use rand::{Rng, SeedableRng};
use vhost_clone::metadata::{check_image, CloneMetadata};
use vhost_clone::pdata::MemDevice;

fn open(img: &[u8]) -> Result<CloneMetadata, vhost_clone::metadata::MetadataError> {
    CloneMetadata::open_dev(Box::new(MemDevice::from_bytes(img.to_vec())), None)
}

#[test]
fn random_damage_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for name in ["partial-64m-4k", "fresh-1g-4k"] {
        let base = common::fixture_bytes(name);
        let good = open(&base).unwrap().words().to_vec();
        // Blocks that matter: the first 100 hold every live block in these fixtures.
        for i in 0..150 {
            let mut img = base.clone();
            let blk = rng.gen_range(0..100usize);
            match i % 3 {
                0 => {
                    let off = blk * 4096 + rng.gen_range(0..4096);
                    img[off] ^= 1 << rng.gen_range(0..8);
                }
                1 => img[blk * 4096..(blk + 1) * 4096].fill(0),
                _ => {
                    let off = blk * 4096 + rng.gen_range(0..4090);
                    img[off..off + 4].copy_from_slice(&rng.gen::<u32>().to_le_bytes());
                }
            }
            let o = open(&img);
            let c = check_image(&img);
            match o {
                // Damage to an unused block: same state, still consistent.
                Ok(md) => {
                    assert_eq!(md.words(), &good[..], "{name} iteration {i}");
                    assert!(c.is_ok());
                }
                Err(e) => {
                    assert!(c.is_err());
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}

#[test]
fn damaged_live_blocks_are_errors() {
    let base = common::fixture_bytes("fresh-1g-4k");
    for blk in 0..14usize {
        let mut img = base.clone();
        img[blk * 4096 + 100] ^= 0x40;
        let e = open(&img).unwrap_err();
        println!("block {blk}: {e}");
        assert!(check_image(&img).is_err());
    }
    let mut img = base.clone();
    img[..4096].fill(0);
    assert!(open(&img).is_err());
    assert!(check_image(&[]).is_err());
    assert!(check_image(&[1; 100]).is_err());
    assert!(check_image(&base[..4096 * 5]).is_err());
}
