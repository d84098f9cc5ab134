//! # migration-core
//!
//! The pieces every live-migration engine in this workspace stands on:
//!
//! - [`geometry`]: guest RAM as dense page indices over `vm-memory`;
//! - [`bitmap`]: [`DirtyBitmap`], a bitset over those pages scanned a word at a time;
//! - [`dirty`]: the [`DirtyTracker`](dirty::DirtyTracker) trait and its backends (KVM dirty
//!   log behind the `kvm` feature, the `vm-memory` `AtomicBitmap`, userfaultfd
//!   write-protect for guests that KVM does not run, and the union of several);
//! - [`stream`]: the versioned, checksummed migration stream and its return path, as
//!   sans-io encoder and decoder;
//! - [`page`]: zero-page detection, zstd and delta encoding of single pages;
//! - [`pagemap`]: which pages of guest RAM hold data at all, from the kernel's page tables;
//! - [`place`]: received pages put into fresh guest RAM with `UFFDIO_COPY`, unfaulted;
//! - [`transport`]: `tcp:HOST:PORT` and `unix:PATH` addresses, and a byte-counting,
//!   rate-limited channel;
//! - [`vm`]: the [`VmControl`](vm::VmControl) trait a VMM implements so engines can drive it;
//! - [`stats`]: statistics and progress events engines report.
#![deny(missing_docs)]

pub mod bitmap;
pub mod dirty;
pub mod geometry;
pub mod page;
pub mod pagemap;
pub mod place;
pub mod stats;
pub mod stream;
pub mod transport;
pub mod vm;

pub use bitmap::DirtyBitmap;
pub use geometry::{GuestRam, PAGE_SIZE, RamLayout};
