//! # migration-precopy
//!
//! Iterative pre-copy live migration: send all of guest RAM, then the pages dirtied since
//! the previous pass, with live bandwidth and dirty-rate estimates, a downtime limit,
//! auto-converge throttling, and zero-page, zstd and delta encoding of pages.
//!
//! - [`source::migrate`] drives the source: bulk copy, iterations, stop-and-copy, and the
//!   wait for the destination's verdict, with the guest resumed on every failure;
//! - [`destination::Incoming`] receives: header and config first (so the VMM can build a
//!   matching VM), then RAM and device state, verification, the verdict, and the resume;
//! - [`CancelToken`] cancels from any thread;
//! - the parts without I/O: [`estimate`] (bandwidth over a sliding window), [`policy`]
//!   (when to stop iterating, auto-converge, limits) and [`cache`] (the size-bounded cache
//!   of sent pages that delta encoding works against).
#![deny(missing_docs)]

mod batcher;
pub mod cache;
pub mod destination;
pub mod estimate;
mod link;
pub mod policy;
pub mod source;

pub use destination::{
    DestinationAction, DestinationError, DestinationEvent, DestinationMachine, DestinationOptions,
    DestinationStats, Incoming, PageWriteError, Placement, ProtocolViolation, VerifyError,
};
pub use link::{CancelToken, ReturnEvent, ReturnPath, ReturnPathError};
pub use source::{
    HandOver, LimitPolicy, ReturnViolation, SourceAction, SourceError, SourceEvent, SourceMachine,
    SourceOptions, SourceOutcome, SourceResult, migrate,
};
