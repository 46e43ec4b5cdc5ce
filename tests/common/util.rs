//! Small helpers several integration tests share: dm-clone status fields, hashes,
//! patterns, and the offline metadata check.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

/// The counters of a dm-clone status line (`0 LEN clone 8 USED/TOTAL REGION HYDRATED/NR HYDRATING ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusFields {
    pub used: u64,
    pub total: u64,
    pub hydrated: u64,
    pub nr_regions: u64,
    pub hydrating: u64,
}

/// Parse a dm-clone status line (panics on anything else: tests want to know).
pub fn status_fields(line: &str) -> StatusFields {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(
        f.len() > 7 && f[2] == "clone",
        "not a clone status line: {line:?}"
    );
    let (u, t) = f[4].split_once('/').expect("used/total");
    let (h, n) = f[6].split_once('/').expect("hydrated/nr");
    StatusFields {
        used: u.parse().expect("used"),
        total: t.parse().expect("total"),
        hydrated: h.parse().expect("hydrated"),
        nr_regions: n.parse().expect("nr_regions"),
        hydrating: f[7].parse().expect("hydrating"),
    }
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What `yes TAG | head -c LEN` prints (the guest scripts' write pattern).
pub fn yes_pattern(tag: &str, len: usize) -> Vec<u8> {
    format!("{tag}\n").bytes().cycle().take(len).collect()
}

/// `vhost-clone metadata check META` must succeed; returns its output.
pub fn metadata_check(meta: &Path) -> String {
    let check = Command::new(super::daemon::bin())
        .args(["metadata", "check"])
        .arg(meta)
        .output()
        .expect("metadata check");
    let out = String::from_utf8_lossy(&check.stdout).trim().to_string();
    assert!(
        check.status.success(),
        "metadata check failed: {out} {}",
        String::from_utf8_lossy(&check.stderr)
    );
    out
}

/// `(used, total, hydrated, nr_regions, hydrating)` of a dm-clone status line.
pub fn fields(line: &str) -> (u64, u64, u64, u64, u64) {
    let s = status_fields(line);
    (s.used, s.total, s.hydrated, s.nr_regions, s.hydrating)
}

/// `(hydrated, nr_regions, hydrating)` of a dm-clone status line.
pub fn counts(line: &str) -> (u64, u64, u64) {
    let s = status_fields(line);
    (s.hydrated, s.nr_regions, s.hydrating)
}
