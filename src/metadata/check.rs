//! Offline consistency check (spec §11.2): everything `open` validates, plus reference counts.

use std::collections::HashMap;

use super::error::MetadataError;
use super::load::load;
use crate::pdata::space_map::bitmap::ENTRIES_PER_BITMAP;
use crate::pdata::space_map::nr_bitmaps;
use crate::pdata::{BlockKind, MetaDevice};

/// Result of a check; consistent iff `problems` is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    pub reachable_blocks: u64,
    pub nr_regions: u64,
    pub hydrated: u64,
}

impl CheckReport {
    /// No problem found.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "metadata blocks: {} allocated of {}, {} reachable; regions: {}/{} hydrated",
            self.nr_allocated,
            self.nr_blocks,
            self.reachable_blocks,
            self.hydrated,
            self.nr_regions
        )?;
        if self.problems.is_empty() {
            write!(f, "consistent")
        } else {
            writeln!(f, "{} problem(s):", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "  - {p}")?;
            }
            write!(f, "INCONSISTENT")
        }
    }
}

/// Loads (with every validation of `open`) and cross-checks the space map against the blocks
/// reachable from the superblock. Errors mean the metadata cannot be loaded at all.
pub fn check_device(dev: &dyn MetaDevice) -> Result<CheckReport, MetadataError> {
    let l = load(dev, None)?;
    let mut problems = Vec::new();
    let reachable = l.reachable();
    let mut refs: HashMap<u64, (u32, BlockKind)> = HashMap::new();
    for (b, kind) in &reachable {
        let e = refs.entry(*b).or_insert((0, *kind));
        e.0 += 1;
        if e.0 == 2 {
            problems.push(format!(
                "block {b} ({kind}) is referenced more than once (also as {})",
                e.1
            ));
        }
    }
    for (b, (_, kind)) in &refs {
        let c = l.sm.count(*b);
        if c != 1 {
            problems.push(format!(
                "block {b} ({kind}) has space-map count {c}, expected 1"
            ));
        }
    }
    let entries = l.sm.entries();
    let mut leaked = 0u64;
    for (b, v) in entries.iter().enumerate() {
        if *v != 0 && !refs.contains_key(&(b as u64)) {
            leaked += 1;
            if leaked <= 20 {
                problems.push(format!(
                    "block {b} has space-map count {} but is not reachable (leaked)",
                    l.sm.count(b as u64)
                ));
            }
        }
    }
    if leaked > 20 {
        problems.push(format!("{} more leaked blocks", leaked - 20));
    }
    let allocated = entries.iter().filter(|v| **v != 0).count() as u64;
    if allocated != l.sm.root_nr_allocated() {
        problems.push(format!(
            "space-map root says nr_allocated {}, bitmaps hold {allocated} allocated blocks",
            l.sm.root_nr_allocated()
        ));
    }
    let per = ENTRIES_PER_BITMAP as usize;
    for (i, e) in l.sm.index_entries().iter().enumerate() {
        let lo = (i * per).min(entries.len());
        let hi = (lo + per).min(entries.len());
        let counts = entries.get(lo..hi).unwrap_or(&[]);
        let alloc = counts.iter().filter(|v| **v != 0).count() as u64;
        if u64::from(e.nr_free) != ENTRIES_PER_BITMAP - alloc {
            problems.push(format!(
                "index entry {i}: nr_free {} but bitmap has {} free entries (of {ENTRIES_PER_BITMAP})",
                e.nr_free,
                ENTRIES_PER_BITMAP - alloc
            ));
        }
        let first_free = counts.iter().position(|v| *v == 0).unwrap_or(counts.len());
        if e.none_free_before as usize > first_free {
            problems.push(format!(
                "index entry {i}: none_free_before {} is above the first free entry {first_free}",
                e.none_free_before
            ));
        }
    }
    let nb = nr_bitmaps(l.sm.nr_blocks()) as usize;
    if l.sm
        .all_index_entries()
        .iter()
        .skip(nb)
        .any(|e| e.blocknr != 0 || e.nr_free != 0 || e.none_free_before != 0)
    {
        problems.push(format!(
            "index entries beyond the {nb} live bitmap(s) are not zero"
        ));
    }
    for (b, c) in l.sm.overflow_entries() {
        problems.push(format!(
            "overflow ref-count entry for block {b} (count {c}): dm-clone never shares blocks"
        ));
    }
    if l.stray_bits {
        problems.push(format!(
            "bits at or beyond nr_regions {} are set in the bitset",
            l.geo.nr_regions
        ));
    }
    if l.array_blocks.len() as u64 != l.geo.nr_array_blocks
        || l.words.len() as u64 != l.geo.nr_words
    {
        problems.push(format!(
            "bitset array has {} blocks / {} words, expected {} / {}",
            l.array_blocks.len(),
            l.words.len(),
            l.geo.nr_array_blocks,
            l.geo.nr_words
        ));
    }
    let hydrated = l.hydrated_count();
    Ok(CheckReport {
        problems,
        nr_blocks: l.sm.nr_blocks(),
        nr_allocated: l.sm.root_nr_allocated(),
        reachable_blocks: refs.len() as u64,
        nr_regions: l.geo.nr_regions,
        hydrated,
    })
}
