//! # migration-core
//!
//! The pieces every live-migration engine in this workspace stands on.
//!
//! Without default features it is the pure layer, with no `vm-memory`, no `userfaultfd`
//! and nothing built with bindgen (so a crate such as `migration-nbd` that needs only
//! bitmaps and transports builds without libclang):
//!
//! - [`layout`]: guest RAM as dense page indices over its regions;
//! - [`bitmap`]: [`DirtyBitmap`], a bitset over those pages scanned a word at a time;
//! - [`stream`]: the versioned, checksummed migration stream and its return path, as
//!   sans-io encoder and decoder;
//! - [`page`]: zero-page detection, zstd and delta encoding of single pages;
//! - [`transport`]: `tcp:HOST:PORT` and `unix:PATH` addresses, the
//!   [`Connection`](transport::Connection) seam engines run over, and a byte-counting,
//!   rate-limited channel;
//! - [`stats`]: statistics and progress events engines report.
//!
//! The `host` feature (on by default) adds what touches a real VM's memory:
//!
//! - `geometry`: `GuestRam`, guest RAM over `vm-memory`, reached page by page;
//! - `dirty`: the `DirtyTracker` trait and its backends (the `vm-memory` `AtomicBitmap`,
//!   userfaultfd write-protect for guests that KVM does not run, the union of several;
//!   the KVM dirty log with the `kvm` feature);
//! - `pagemap`: which pages of guest RAM hold data at all, from the kernel's page tables;
//! - `place`: received pages put into fresh guest RAM with `UFFDIO_COPY`, unfaulted;
//! - `vm`: the `VmControl` trait a VMM implements so engines can drive it.
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
