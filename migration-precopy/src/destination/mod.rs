//! The destination side of a pre-copy migration: receive the stream into guest RAM and
//! device state, verify, and only then run the guest.
//!
//! The protocol lives in [`DestinationMachine`], a state machine without I/O: bytes in,
//! actions out (place these pages, load the device state, verify, send these return-path
//! bytes, resume). [`Incoming`] is its threaded driver, used in two steps because the VMM
//! can only build its VM once it knows what comes:
//!
//! ```text
//! let incoming = Incoming::accept(conn, &DestinationOptions::default())?; // header + config
//! let vm = build_vm(incoming.config())?;           // or: return Err(incoming.refuse("why"))
//! let stats = incoming.receive(&ram, &mut vm, &mut verify, &mut progress)?;
//! ```
//!
//! [`Incoming::receive`] applies page batches into guest RAM and collects device state
//! until the source's `EndOfData` (sent with its guest paused). Then, in this order: it
//! loads the device state through [`VmControl::load_device_state`], calls the caller's
//! `verify` (an oracle, a hash compare), sends `Running` ("ready"), and waits for the
//! source's commit, `Complete`; only then does it resume the guest. Any failure before the
//! verdict (a malformed or corrupt record, a stream that stops early, an `Abort`, a refused
//! state, a failed check) sends `Failed` with the reason, where the connection still
//! works, and never resumes the guest; a connection that ends after the verdict but before
//! `Complete` leaves the guest unrun here too. The [`source`](crate::source) module
//! explains why this exchange never lets both sides run the guest.
//!
//! [`VmControl::load_device_state`]: migration_core::vm::VmControl::load_device_state

mod driver;
mod machine;
mod ram;

use std::io;
use std::time::Duration;

use migration_core::layout::LayoutError;
use migration_core::page::PageError;
use migration_core::stats::PageCounts;
use migration_core::stream::{IterationEnd, RecordType, StreamError};
use migration_core::vm::VmError;

pub use driver::{Incoming, PostcopySwitch, Received};
pub use machine::{DestinationAction, DestinationEvent, DestinationMachine, SwitchedStream};

/// Settings of the receiving side.
#[derive(Debug, Clone)]
pub struct DestinationOptions {
    /// Longest record accepted (page batches and device state). Default 64 MiB.
    pub max_record_len: u32,
    /// Refuse a stream for any other VM.
    pub expected_vm: Option<[u8; 16]>,
    /// Give up when no byte arrives for this long (`None`: wait forever).
    pub idle_timeout: Option<Duration>,
    /// How pages are put into guest RAM this side has not touched yet. Default
    /// [`Placement::Prefault`].
    pub placement: Placement,
    /// Accept a switch to post-copy: at the source's `SwitchToPostcopy`, hand the
    /// connection and what was received over to the caller
    /// ([`Incoming::receive_or_switch`]) instead of refusing the stream. Default off.
    pub postcopy: bool,
}

impl Default for DestinationOptions {
    fn default() -> Self {
        DestinationOptions {
            max_record_len: migration_core::stream::DEFAULT_MAX_RECORD_LEN,
            expected_vm: None,
            idle_timeout: None,
            placement: Placement::default(),
            postcopy: false,
        }
    }
}

/// Why the destination refused or lost a migration. The guest was not run here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// The stream is malformed or corrupt (the error names the record type and offset).
    #[error("refusing the migration stream: {0}")]
    Stream(#[from] StreamError),
    /// Reading or writing the connection failed.
    #[error("connection: {0}")]
    Connection(#[source] io::Error),
    /// The stream did not start with a config record.
    #[error("the stream starts with {}, not the configuration", match .found { Some(t) => format!("a {t} record"), None => "its end".to_string() })]
    NoConfig {
        /// The record that came first, or `None` for the end of the stream.
        found: Option<RecordType>,
    },
    /// The config's RAM layout is not valid.
    #[error("the source's configuration: {0}")]
    BadConfig(#[source] LayoutError),
    /// The config does not describe this VM's RAM.
    #[error(
        "the source's RAM ({source_pages} pages) does not match this VM's ({local_pages} pages)"
    )]
    Layout {
        /// Pages the source has.
        source_pages: u64,
        /// Pages this side has.
        local_pages: u64,
    },
    /// The stream broke the pre-copy protocol.
    #[error("protocol: {0}")]
    Protocol(ProtocolViolation),
    /// The source gave up.
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// A page could not be decoded or written.
    #[error("page {page}: {source}")]
    Page {
        /// Global page index.
        page: u64,
        /// What failed.
        #[source]
        source: PageWriteError,
    },
    /// Guest RAM could not be handed back from userfaultfd placement.
    #[error("finishing the placement of pages: {0}")]
    Placement(#[source] io::Error),
    /// The VMM refused the device state.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// The caller's check refused the guest.
    #[error("verification failed: {0}")]
    Verify(#[source] VerifyError),
    /// Refused by the caller before receiving (see [`Incoming::refuse`]).
    #[error("refused: {0}")]
    Refused(String),
    /// The guest could not be resumed after `Running` was sent: it runs nowhere, and the
    /// VMM must decide (see the [`source`](crate::source) module on the two generals).
    #[error("the Running verdict was sent but resuming the guest failed: {0}")]
    ResumeAfterVerdict(#[source] VmError),
    /// The `Running` verdict could not be sent: the guest was not resumed here, and the
    /// source resumes it there.
    #[error("sending the verdict failed, the guest was not resumed here: {0}")]
    VerdictNotSent(#[source] io::Error),
}

/// Why the caller's check refused the guest ([`Incoming::receive`]'s `verify`).
pub type VerifyError = Box<dyn std::error::Error + Send + Sync>;

/// How the source broke the pre-copy protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// The stream ended before `EndOfData`.
    #[error("the stream ended without Complete")]
    EndedEarly,
    /// The stream ended after this side's `Running` but before the source's commit.
    #[error(
        "the connection ended after our Running verdict but before the source's commit \
         (Complete): the guest is not run here"
    )]
    EndedAfterVerdict,
    /// `Complete` came before `EndOfData`.
    #[error("Complete before EndOfData: nothing was checked")]
    CompleteBeforeEndOfData,
    /// A second `EndOfData`.
    #[error("a second EndOfData record")]
    SecondEndOfData,
    /// A record that belongs to post-copy.
    #[error("{0} record in a pre-copy migration")]
    PostcopyRecord(RecordType),
    /// A record after `EndOfData` other than `Complete` or `Abort`.
    #[error("a {0} record after EndOfData")]
    AfterEndOfData(RecordType),
    /// A record that has no place where it came.
    #[error("unexpected {0} record")]
    Unexpected(RecordType),
}

/// Why one received page could not be put into guest RAM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PageWriteError {
    /// The index is past the end of this VM's RAM.
    #[error("outside guest RAM")]
    OutsideRam,
    /// A raw page of the wrong length.
    #[error("raw page of {0} bytes")]
    RawLength(usize),
    /// A zstd or delta page that does not decode.
    #[error("{0}")]
    Decode(#[source] PageError),
    /// `UFFDIO_COPY` failed.
    #[error("placing the page: {0}")]
    Place(#[source] io::Error),
    /// Reading this side's copy of the page (for a delta) failed.
    #[error("reading the page: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// What the destination saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationStats {
    /// Bytes received.
    pub bytes_received: u64,
    /// Pages applied, by encoding.
    pub pages: PageCounts,
    /// Pre-copy passes the source reported.
    pub iterations: Vec<IterationEnd>,
    /// Device-state blobs received.
    pub device_states: usize,
    /// From the first byte to the resume.
    pub total_time: Duration,
    /// From `Complete` received to the guest resumed (load, verify, verdict).
    pub switchover: Duration,
    /// Time spent in the caller's verification.
    pub verify_time: Duration,
    /// How pages were put into untouched guest RAM.
    pub placement: Placement,
}

/// How the destination puts pages into guest RAM it has not touched yet: asked for in
/// [`DestinationOptions::placement`], and reported as used in
/// [`DestinationStats::placement`] (userfaultfd falls back to prefaulting where the kernel
/// refuses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Placement {
    /// Ordinary writes: each first write of a page faults it in. The right choice for RAM
    /// populated beforehand (QEMU's `-mem-prealloc`), where there is nothing to fault.
    Write,
    /// Ordinary writes, with a helper thread faulting RAM in ahead of them
    /// (`MADV_POPULATE_WRITE`, 2 MiB at a time, only just ahead of where non-zero pages
    /// land, so zero RAM stays unallocated). The default: under nested virtualisation a
    /// page fault costs microseconds, and taking them off the receiving thread is most of
    /// what bounds the destination's rate.
    #[default]
    Prefault,
    /// `UFFDIO_COPY` ([`migration_core::place`]): the kernel fills a new page from the
    /// received bytes, with no page fault, no clearing of the page before it is written,
    /// and no helper thread. It takes the least CPU in all, but puts all of the page
    /// allocation on the receiving thread, one `ioctl` per page, where `Prefault` moves it
    /// to a second thread. Measured on a 2-core host, 256 MiB of random RAM migrated from
    /// a KVM guest: 1033 MB/s with it against 1207 MB/s with `Prefault` (medians of 7).
    Userfaultfd,
}

impl Placement {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Write => "write",
            Placement::Prefault => "prefault",
            Placement::Userfaultfd => "userfaultfd",
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A placement name that is not one of `write`, `prefault`, `userfaultfd`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement {0:?} (expected write, prefault or userfaultfd)")]
pub struct UnknownPlacement(pub String);

impl std::str::FromStr for Placement {
    type Err = UnknownPlacement;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Placement::Write,
            Placement::Prefault,
            Placement::Userfaultfd,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| UnknownPlacement(s.to_string()))
    }
}
