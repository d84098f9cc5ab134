#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod destination;
pub mod source;
pub mod stats;

pub use destination::book::PageBook;
pub use source::plan::PushPlan;
pub use stats::{LatencyHistogram, Origin, PagesByOrigin, PostcopyStats, Recovery};
