//! vhost-clone: a vhost-user-blk backend serving dm-style tables (`linear`, `clone`).

pub mod control;
pub mod daemon;
pub mod device;
pub mod io;
pub mod metadata;
pub mod metrics;
pub mod pdata;
pub mod service;
pub mod source;
pub mod table;
pub mod target;
