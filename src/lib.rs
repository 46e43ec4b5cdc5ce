//! vhost-clone: a vhost-user-blk backend serving dm-style tables (`linear`, `clone`).

pub mod control;
pub mod daemon;
pub mod io;
pub mod metadata;
pub mod pdata;
pub mod source;
pub mod table;
pub mod target;
