//! Dirty-page tracking: which pages of guest RAM were written since the last look.
//!
//! A pre-copy engine sends all of RAM once, then asks a [`DirtyTracker`] again and again
//! which pages were written in the meantime, and resends those. Every backend answers in
//! the dense page indices of one [`RamLayout`](crate::RamLayout), into a [`DirtyBitmap`]:
//!
//! - `KvmDirtyLog` (module `kvm`, feature `kvm`): pages the guest wrote, from KVM's per-slot dirty log,
//!   either with `KVM_GET_DIRTY_LOG` clearing as it reads, or with manual protection
//!   (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` and `KVM_CLEAR_DIRTY_LOG`);
//! - [`VmmBitmapTracker`]: pages the VMM itself wrote through `vm-memory` (virtio devices,
//!   say), from the `AtomicBitmap` of a `GuestMemoryMmap<AtomicBitmap>`. KVM does not see
//!   those writes, so a VMM on KVM needs both;
//! - [`UffdWpTracker`]: for a guest that KVM does not run (a software vCPU thread), any
//!   write to anonymous private memory, caught by userfaultfd write protection, with the
//!   asynchronous `PAGEMAP_SCAN` form where the kernel has it;
//! - [`UnionTracker`]: several of the above as one.
//!
//! The contract every backend keeps: a write made after [`DirtyTracker::start`] is reported
//! by the first [`DirtyTracker::sync_and_clear`] that begins after the write completes, or by
//! the one it raced, never by none. A page is reported only if it was written (or, for the
//! KVM log, if the guest or KVM itself marked it dirty).

#[cfg(feature = "kvm")]
pub mod kvm;
pub mod uffd_wp;
pub mod union;
pub mod vmm_bitmap;

use std::io;
use std::ops::Range;

use crate::bitmap::DirtyBitmap;

#[cfg(feature = "kvm")]
pub use kvm::{KvmDirtyLog, KvmDirtyLogMode};
pub use uffd_wp::{HostRange, UffdFeatures, UffdWpConfig, UffdWpMode, UffdWpTracker};
pub use union::UnionTracker;
pub use vmm_bitmap::VmmBitmapTracker;

/// A source of dirty-page information for guest RAM.
///
/// Implementations are built for one [`RamLayout`](crate::RamLayout) and report in its
/// global page indices. They are driven from one thread at a time (`&mut self`), while the
/// guest and the VMM keep writing from any number of other threads.
pub trait DirtyTracker: Send {
    /// Short name for reports and logs, e.g. "kvm-dirty-log".
    fn name(&self) -> &str;

    /// Begins tracking. Writes made before `start` are not reported.
    fn start(&mut self) -> Result<(), TrackerError>;

    /// ORs every page written since `start` or the previous sync into `into` (global page
    /// indices of the RamLayout the tracker was built for) and forgets them, atomically with
    /// respect to writers: a write is reported by exactly the sync that follows it (or a later
    /// one if it races the sync), never lost.
    fn sync_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), TrackerError>;

    /// Stops tracking and releases what start took (idempotent).
    fn stop(&mut self) -> Result<(), TrackerError>;

    /// Syncs into a fresh bitmap of `pages` pages and returns it: a convenience for callers
    /// that do not keep a bitmap around between passes.
    fn sync_to_new(&mut self, pages: usize) -> Result<DirtyBitmap, TrackerError> {
        let mut bitmap = DirtyBitmap::new(pages);
        self.sync_and_clear(&mut bitmap)?;
        Ok(bitmap)
    }
}

impl<T: DirtyTracker + ?Sized> DirtyTracker for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        (**self).start()
    }

    fn sync_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), TrackerError> {
        (**self).sync_and_clear(into)
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        (**self).stop()
    }
}

/// What went wrong while tracking dirty pages, with the backend and the memory involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackerError {
    /// The bitmap handed to `sync_and_clear` does not cover the tracker's RAM layout.
    #[error(
        "{backend}: the dirty bitmap covers {got} pages but guest RAM has {expected}; pass a bitmap from RamLayout::new_bitmap"
    )]
    BitmapLength {
        /// The backend.
        backend: &'static str,
        /// Pages in the RAM layout.
        expected: usize,
        /// Pages in the bitmap that was passed.
        got: usize,
    },

    /// `sync_and_clear` was called while the tracker was not started.
    #[error("{backend}: not tracking; call start() before sync_and_clear()")]
    NotStarted {
        /// The backend.
        backend: &'static str,
    },

    /// The memory handed to the constructor does not fit the RAM layout, or the backend
    /// cannot track it as configured.
    #[error("{backend}: {what}")]
    Config {
        /// The backend.
        backend: &'static str,
        /// What does not fit, in words.
        what: String,
    },

    /// The kernel lacks a feature the configuration asks for.
    #[error("{backend}: the kernel does not offer {feature}; {hint}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// The missing feature, as the kernel names it.
        feature: &'static str,
        /// What the user can do instead.
        hint: &'static str,
    },

    /// An operation on a KVM memory slot failed.
    #[error(
        "{backend}: {op} on memory slot {slot} (guest {guest_base:#x}, {size:#x} bytes, pages {pages:?}): {source}"
    )]
    Slot {
        /// The backend.
        backend: &'static str,
        /// The ioctl or step that failed.
        op: &'static str,
        /// The slot id as KVM knows it (address space in the upper 16 bits).
        slot: u32,
        /// Guest-physical address of the slot.
        guest_base: u64,
        /// Size of the slot in bytes.
        size: u64,
        /// The global page indices the slot covers.
        pages: Range<usize>,
        /// What the kernel said.
        source: io::Error,
    },

    /// An operation on a range of host memory failed.
    #[error("{backend}: {op} on host memory {host:#x}..{host_end:#x} (pages {pages:?}): {source}", host_end = host.saturating_add(*len))]
    Range {
        /// The backend.
        backend: &'static str,
        /// The ioctl or step that failed.
        op: &'static str,
        /// Host virtual address of the range.
        host: u64,
        /// Length of the range in bytes.
        len: u64,
        /// The global page indices the range covers.
        pages: Range<usize>,
        /// What the kernel said.
        source: io::Error,
    },

    /// An operation that concerns no particular memory (opening a file descriptor, enabling
    /// a capability, starting a thread) failed.
    #[error("{backend}: {op}: {source}")]
    Os {
        /// The backend.
        backend: &'static str,
        /// What was being done.
        op: &'static str,
        /// What the kernel said.
        source: io::Error,
    },

    /// One tracker of a [`UnionTracker`] failed.
    #[error("tracker {index} ({name}) of the union failed: {source}")]
    Member {
        /// Position of the tracker in the union.
        index: usize,
        /// Its [`DirtyTracker::name`].
        name: String,
        /// What it reported.
        source: Box<TrackerError>,
    },
}

/// Checks that `into` has one bit per page of the layout the tracker was built for.
pub(crate) fn check_len(
    backend: &'static str,
    expected: usize,
    into: &DirtyBitmap,
) -> Result<(), TrackerError> {
    if into.len() != expected {
        return Err(TrackerError::BitmapLength {
            backend,
            expected,
            got: into.len(),
        });
    }
    Ok(())
}
