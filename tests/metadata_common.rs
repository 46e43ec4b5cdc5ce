//! Shared helpers for the metadata tests (included with `#[path]`, not a test crate of its own).
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

pub const FIXTURES: &[&str] = &[
    "fresh-1g-4k",
    "fresh-64g-4k",
    "full-64m-4k",
    "hydrated-then-written",
    "multilevel-64g-4k",
    "partial-64m-4k",
];

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kernel-dm-clone")
}

pub fn sha256(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// Gunzipped fixture bytes; asserts the .gz file is unchanged by reading it.
pub fn fixture_bytes(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(format!("{name}.meta.gz"));
    let gz = std::fs::read(&path).unwrap();
    let before = sha256(&gz);
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(sha256(&std::fs::read(&path).unwrap()), before);
    out
}

/// (hydrated, nr_regions, ranges) from NAME.expect.
pub fn expect(name: &str) -> (u64, u64, Option<String>) {
    let s = std::fs::read_to_string(fixture_dir().join(format!("{name}.expect"))).unwrap();
    let mut h = 0;
    let mut n = 0;
    let mut r = None;
    for kv in s.split_whitespace() {
        let (k, v) = kv.split_once('=').unwrap();
        match k {
            "hydrated" => h = v.parse().unwrap(),
            "nr_regions" => n = v.parse().unwrap(),
            "ranges" => r = Some(v.to_string()),
            _ => {}
        }
    }
    (h, n, r)
}
