//! Device-mapper style targets.

pub mod clone;
pub mod linear;
