//! The pure, I/O-free core of the `clone` target (dm-clone in user space): region geometry, the in-core
//! hydration bitmap, per-region copy/write exclusion, the hydration scheduler, failure accounting, status
//! formatting and events. The io_uring engine and the virtio device drive these types.
//!
//! Data-path recipe (see `region_locks` for the exact protocol):
//! - READ: per `Segment`, hydrated → destination, else source + `Scheduler::hint`.
//! - WRITE: full segment of an unhydrated region → `RegionLocks::admit_overwrite`, write, `mark_hydrated`,
//!   `finish_overwrite`; partial segment of an unhydrated region → `admit_write` (+ `push_urgent` on
//!   `QueuedNeedsCopy`), issue when `Proceed` or when resumed and re-admitted.
//! - DISCARD: `regions_discardable` → like a full overwrite (no data write), `mark_range`/`mark_hydrated`.
//! - HYDRATION: `Scheduler::next_batch` → copy → `mark_range` (success) → `finish_copy` per region →
//!   `copy_done(n)` + `copy_succeeded()`/`copy_failed()`; on failure fail parked writers with EIO.
//! - COMMIT: `take_dirty` → flush destination → write words → on error `restore_dirty`, on success
//!   `release_if_complete`.

pub mod events;
pub mod failures;
pub mod geometry;
pub mod region_locks;
pub mod region_map;
pub mod scheduler;
pub mod status;

pub use events::{Event, EventHub, MetadataMode};
pub use failures::{FailureStats, FailureTracker, DEFAULT_MAX_FAILURES};
pub use geometry::{GeometryError, RegionGeometry, Segment, Split};
pub use region_locks::{Admit, RegionLocks, RegionState};
pub use region_map::{RegionMap, RegionMapError};
pub use scheduler::{
    Batch, BatchKind, Scheduler, SchedulerConfig, SchedulerError, GUEST_BUSY_WINDOW,
};
pub use status::{CloneStatus, HydrationState, StatusJson};

pub mod committer;
pub mod engine;
pub mod guest_io;
pub mod hydrator;
pub mod worker;

pub use engine::{CloneError, CloneTarget};
