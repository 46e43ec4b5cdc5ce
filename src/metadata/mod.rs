//! dm-clone metadata: superblock, open/format, commit, in-core region bitmap, and the
//! `metadata {format,check,dump}` tool functions. Byte-compatible with the kernel's dm-clone
//! (see `docs/dm-clone-metadata.md`).

mod check;
mod clone_metadata;
pub mod damage;
mod error;
mod geometry;
mod load;
pub mod superblock;
pub mod tool;

pub use check::{check_device, CheckReport};
pub use clone_metadata::{CloneMetadata, CommitStats};
pub use error::MetadataError;
pub use geometry::{Geometry, MAX_REGIONS};
pub use tool::{check_cmd, check_image, dump_cmd, format_cmd, ranges_string};
