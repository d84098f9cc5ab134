//! # migration-precopy
//!
//! Iterative pre-copy live migration: send all of guest RAM, then the pages dirtied since
//! the previous pass, with live bandwidth and dirty-rate estimates, a downtime limit,
//! auto-converge throttling, and zero-page, zstd and delta encoding of pages.
//!
//! So far it holds the parts without I/O: [`estimate`] (bandwidth over a sliding window),
//! [`policy`] (when to stop iterating, auto-converge, limits) and [`cache`] (the
//! size-bounded cache of sent pages that delta encoding works against). The source and
//! destination engines that drive them over `migration-core`'s stream are the subject of
//! the pre-copy issue and are not written yet.
#![deny(missing_docs)]

pub mod cache;
pub mod estimate;
pub mod policy;
