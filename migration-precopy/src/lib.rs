#![doc = include_str!("../README.md")]
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
    DestinationStats, Incoming, PageWriteError, Placement, PostcopySwitch, ProtocolViolation,
    Received, SwitchedStream, VerifyError,
};
pub use link::{CancelToken, ReturnEvent, ReturnPath, ReturnPathError};
pub use source::{
    HandOver, LimitPolicy, ReturnViolation, SourceAction, SourceError, SourceEvent, SourceMachine,
    SourceOptions, SourceOutcome, SourceResult, migrate,
};
