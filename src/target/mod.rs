//! Targets: what a table line maps the virtual disk onto (dm-style).

pub mod linear;
