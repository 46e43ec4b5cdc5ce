//! The in-core hydration bitmap (dm-clone's `region_map`) with kernel-style dirty-word tracking.
//!
//! Shared by every queue thread and the hydration thread. Reads are lock-free; marking is lock-free; only the
//! committer's operations (`take_dirty`, `restore_dirty`, `release_if_complete`) take a small mutex, so they
//! are mutually exclusive with each other but never block the data path.
//!
//! # Memory release (dm-clone known issue 2, fixed)
//! The bit words and the dirty-word bits live in one `Words` allocation behind an
//! `arc_swap::ArcSwapOption`. Readers take a cheap guard (`load()`), which keeps the allocation alive for the
//! duration of the read even if the committer swaps in `None` concurrently; the memory is freed when the last
//! guard drops. Before touching the allocation at all, readers check an atomic `complete` flag, so after release
//! the hot path is a single relaxed-free `Acquire` load. No `unsafe` is needed and no reader can observe freed
//! memory.
//!
//! # Ordering of a mark (why the count is exact and nothing is lost)
//! `mark` does, with `SeqCst`: (1) `fetch_or` the region bit; if newly set, (2) set the word's dirty bit,
//! (3) set `any_dirty`, (4) increment `hydrated`. `take_dirty` swaps `any_dirty` to false, then for every dirty
//! bit swaps the dirty word to zero and *then* loads the bit word. A dirty bit seen implies the bit word store
//! is visible; a dirty bit not seen will be seen by the next `take_dirty`. Because the count is incremented last,
//! `hydrated == nr_regions` implies every mark's dirty bit is already set, so `release_if_complete` can never
//! drop an uncommitted word.
//!
//! # Commit protocol for the caller
//! `take_dirty()` **before** flushing the destination, then flush, then write the words to the metadata. Every
//! region bit in a taken word was set after its data write completed, so the flush makes it durable first.
//! On failure `restore_dirty(&words)`. After a successful commit call `release_if_complete()`.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

/// Errors constructing a [`RegionMap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionMapError {
    #[error("loaded bitset has {got} words, but {nr_regions} regions need {expected}")]
    WrongWordCount {
        nr_regions: u64,
        expected: u64,
        got: u64,
    },
    #[error("{0} regions do not fit in memory on this host")]
    TooLarge(u64),
}

struct Words {
    bits: Box<[AtomicU64]>,
    /// One bit per word of `bits`.
    dirty: Box<[AtomicU64]>,
}

/// In-core hydration bitmap. See the module documentation for the concurrency design.
pub struct RegionMap {
    nr_regions: u64,
    nr_words: u64,
    words: ArcSwapOption<Words>,
    complete: AtomicBool,
    hydrated: AtomicU64,
    any_dirty: AtomicBool,
    /// Serialises the committer operations; after release it holds the word indices restored by a failed
    /// commit (their value is "all regions set").
    committer: Mutex<Vec<u64>>,
}

fn word_mask(nr_regions: u64, word: u64) -> u64 {
    let first = word.saturating_mul(64);
    let left = nr_regions.saturating_sub(first);
    if left >= 64 {
        u64::MAX
    } else {
        (1u64 << left) - 1
    }
}

fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

impl RegionMap {
    /// Build from the loaded on-disk bitset: bit `r % 64` of word `r / 64` is region `r`. Bits past
    /// `nr_regions` in the last word are ignored (cleared).
    pub fn from_words(nr_regions: u64, loaded: Vec<u64>) -> Result<Self, RegionMapError> {
        let expected = nr_regions.div_ceil(64);
        let got = u64::try_from(loaded.len()).map_err(|_| RegionMapError::TooLarge(nr_regions))?;
        if got != expected {
            return Err(RegionMapError::WrongWordCount {
                nr_regions,
                expected,
                got,
            });
        }
        let mut count = 0u64;
        let bits: Box<[AtomicU64]> = loaded
            .into_iter()
            .zip(0u64..)
            .map(|(w, i)| {
                let w = w & word_mask(nr_regions, i);
                count += u64::from(w.count_ones());
                AtomicU64::new(w)
            })
            .collect();
        let nr_dirty =
            to_usize(expected.div_ceil(64)).ok_or(RegionMapError::TooLarge(nr_regions))?;
        let dirty: Box<[AtomicU64]> = (0..nr_dirty).map(|_| AtomicU64::new(0)).collect();
        let map = Self {
            nr_regions,
            nr_words: expected,
            words: ArcSwapOption::from_pointee(Words { bits, dirty }),
            complete: AtomicBool::new(false),
            hydrated: AtomicU64::new(count),
            any_dirty: AtomicBool::new(false),
            committer: Mutex::new(Vec::new()),
        };
        Ok(map)
    }

    /// A map with no region hydrated.
    pub fn new_empty(nr_regions: u64) -> Result<Self, RegionMapError> {
        let n = to_usize(nr_regions.div_ceil(64)).ok_or(RegionMapError::TooLarge(nr_regions))?;
        Self::from_words(nr_regions, vec![0; n])
    }

    /// Number of regions.
    pub fn nr_regions(&self) -> u64 {
        self.nr_regions
    }

    /// Number of 64-bit words of the bitset.
    pub fn nr_words(&self) -> u64 {
        self.nr_words
    }

    /// Is region `r` hydrated? Lock-free. Regions out of range answer false.
    pub fn is_hydrated(&self, r: u64) -> bool {
        if r >= self.nr_regions {
            return false;
        }
        if self.complete.load(SeqCst) {
            return true;
        }
        let guard = self.words.load();
        let Some(words) = guard.as_ref() else {
            return true; // released: everything is hydrated
        };
        match to_usize(r / 64).and_then(|i| words.bits.get(i)) {
            Some(w) => w.load(SeqCst) & (1u64 << (r % 64)) != 0,
            None => false,
        }
    }

    /// Mark region `r` hydrated. Returns true if it was newly set. Out-of-range regions are ignored.
    pub fn mark_hydrated(&self, r: u64) -> bool {
        if r >= self.nr_regions {
            return false;
        }
        self.mark_word(r / 64, 1u64 << (r % 64)) == 1
    }

    /// Mark every region of `range` (clamped to the map) hydrated. Returns how many were newly set.
    pub fn mark_range(&self, range: Range<u64>) -> u64 {
        let end = range.end.min(self.nr_regions);
        let mut r = range.start;
        let mut newly = 0;
        while r < end {
            let word = r / 64;
            let bit = r % 64;
            let word_end = (word + 1).saturating_mul(64).min(end);
            let n = word_end - r; // 1..=64
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            newly += self.mark_word(word, mask);
            r = word_end;
        }
        newly
    }

    /// Set `mask` in word `word`; returns the number of newly set bits.
    fn mark_word(&self, word: u64, mask: u64) -> u64 {
        if self.complete.load(SeqCst) {
            return 0;
        }
        let guard = self.words.load();
        let Some(words) = guard.as_ref() else {
            return 0;
        };
        let Some(w) = to_usize(word).and_then(|i| words.bits.get(i)) else {
            return 0;
        };
        let newly = mask & !w.fetch_or(mask, SeqCst);
        if newly == 0 {
            return 0;
        }
        if let Some(d) = to_usize(word / 64).and_then(|i| words.dirty.get(i)) {
            d.fetch_or(1u64 << (word % 64), SeqCst);
        }
        self.any_dirty.store(true, SeqCst);
        let n = u64::from(newly.count_ones());
        self.hydrated.fetch_add(n, SeqCst);
        n
    }

    /// Number of hydrated regions (exact once concurrent marks have returned).
    pub fn hydrated_count(&self) -> u64 {
        self.hydrated.load(SeqCst)
    }

    /// True when every region is hydrated.
    pub fn all_hydrated(&self) -> bool {
        self.hydrated_count() >= self.nr_regions
    }

    /// True if some word changed since the last `take_dirty` (a commit is needed).
    pub fn is_dirty(&self) -> bool {
        if self.any_dirty.load(SeqCst) {
            return true;
        }
        let restored = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        !restored.is_empty()
    }

    /// First unhydrated region in `from..nr_regions`, scanning whole words. `None` if there is none (or the map
    /// was released).
    pub fn next_unhydrated(&self, from: u64) -> Option<u64> {
        if from >= self.nr_regions || self.complete.load(SeqCst) {
            return None;
        }
        let guard = self.words.load();
        let words = guard.as_ref()?;
        let mut word = from / 64;
        let mut skip_mask = (1u64 << (from % 64)) - 1; // bits below `from` count as set
        while word < self.nr_words {
            let w = words.bits.get(to_usize(word)?)?.load(SeqCst) | skip_mask;
            let free = !w & word_mask(self.nr_regions, word);
            if free != 0 {
                return Some(word * 64 + u64::from(free.trailing_zeros()));
            }
            skip_mask = 0;
            word += 1;
        }
        None
    }

    /// Take the changed words `(word_index, word_value)` and clear the dirty set. Marking may continue
    /// concurrently; later marks go to the next take.
    pub fn take_dirty(&self) -> Vec<(u64, u64)> {
        let mut restored = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, u64)> = Vec::new();
        let guard = self.words.load();
        match guard.as_ref() {
            None => {
                restored.sort_unstable();
                restored.dedup();
                out.extend(
                    restored
                        .drain(..)
                        .map(|i| (i, word_mask(self.nr_regions, i))),
                );
            }
            Some(words) => {
                if !self.any_dirty.swap(false, SeqCst) {
                    return out;
                }
                for (d, di) in words.dirty.iter().zip(0u64..) {
                    let mut bits = d.swap(0, SeqCst);
                    while bits != 0 {
                        let word = di * 64 + u64::from(bits.trailing_zeros());
                        bits &= bits - 1;
                        if let Some(w) = to_usize(word).and_then(|i| words.bits.get(i)) {
                            out.push((word, w.load(SeqCst)));
                        }
                    }
                }
            }
        }
        out
    }

    /// Put back the words of a failed commit so the next `take_dirty` returns them again (with their then
    /// current values).
    pub fn restore_dirty(&self, words_taken: &[(u64, u64)]) {
        let mut restored = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        let guard = self.words.load();
        match guard.as_ref() {
            None => restored.extend(
                words_taken
                    .iter()
                    .map(|&(i, _)| i)
                    .filter(|&i| i < self.nr_words),
            ),
            Some(words) => {
                let mut any = false;
                for &(i, _) in words_taken {
                    if let Some(d) = to_usize(i / 64).and_then(|j| words.dirty.get(j)) {
                        if i < self.nr_words {
                            d.fetch_or(1u64 << (i % 64), SeqCst);
                            any = true;
                        }
                    }
                }
                if any {
                    self.any_dirty.store(true, SeqCst);
                }
            }
        }
    }

    /// If every region is hydrated and nothing is waiting to be committed, free the bitmap memory. Call it
    /// from the committer after a successful commit. Returns true if the map is (now) released.
    pub fn release_if_complete(&self) -> bool {
        let _committer = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        if self.complete.load(SeqCst) {
            return true;
        }
        if !self.all_hydrated() {
            return false;
        }
        let guard = self.words.load();
        let Some(words) = guard.as_ref() else {
            return true;
        };
        if self.any_dirty.load(SeqCst) || words.dirty.iter().any(|d| d.load(SeqCst) != 0) {
            return false;
        }
        drop(guard);
        // Flag first so readers stop loading the allocation; then drop our reference.
        self.complete.store(true, SeqCst);
        self.words.store(None);
        true
    }

    /// True once the bitmap memory has been released.
    pub fn is_released(&self) -> bool {
        self.complete.load(SeqCst)
    }

    /// Heap bytes held by the bitmap (0 after release, apart from the struct itself).
    pub fn memory_bytes(&self) -> u64 {
        let base = u64::try_from(std::mem::size_of::<Self>()).unwrap_or(0);
        let guard = self.words.load();
        let heap = guard.as_ref().map_or(0, |w: &Arc<Words>| {
            let n = w.bits.len().saturating_add(w.dirty.len()).saturating_mul(8);
            u64::try_from(n).unwrap_or(u64::MAX)
        });
        base.saturating_add(heap)
    }

    /// A snapshot of the bitset words (for tests and for a full metadata rewrite). After release every word is
    /// "all set".
    pub fn snapshot(&self) -> Vec<u64> {
        let guard = self.words.load();
        match guard.as_ref() {
            Some(w) => w.bits.iter().map(|a| a.load(SeqCst)).collect(),
            None => (0..self.nr_words)
                .map(|i| word_mask(self.nr_regions, i))
                .collect(),
        }
    }
}

impl std::fmt::Debug for RegionMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionMap")
            .field("nr_regions", &self.nr_regions)
            .field("hydrated", &self.hydrated_count())
            .field("released", &self.is_released())
            .finish()
    }
}

#[cfg(test)]
mod tests;
