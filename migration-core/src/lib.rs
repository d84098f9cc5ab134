#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod bitmap;
pub mod layout;
pub mod page;
pub mod stats;
pub mod stream;
pub mod transport;

#[cfg(feature = "host")]
pub mod dirty;
#[cfg(feature = "host")]
pub mod fault;
#[cfg(feature = "host")]
pub mod geometry;
#[cfg(feature = "host")]
pub mod pagemap;
#[cfg(feature = "host")]
pub mod place;
#[cfg(feature = "host")]
pub mod vm;

pub use bitmap::DirtyBitmap;
#[cfg(feature = "host")]
pub use geometry::GuestRam;
pub use layout::{PAGE_SIZE, RamLayout};
