//! The source side of a pre-copy migration: bulk copy, iterations over dirty pages,
//! stop-and-copy, and the wait for the destination's verdict.
//!
//! The protocol lives in [`SourceMachine`], a state machine without I/O: it takes events
//! (a flush done, a tracker synced, an acknowledgement, a verdict, a cancel, the time) and
//! returns actions (send the next bytes, sync the tracker, pause, resume, throttle, save
//! the device state, wait until an instant). [`migrate`] is the thin threaded driver most
//! VMMs call; a VMM with an event loop of its own drives the machine itself.
//!
//! # Order of events
//!
//! 1. Setup: the stream header (with the VM's UUID) and the [`Config`](migration_core::stream::Config) record (RAM layout
//!    and the VMM's blob) are sent; the dirty tracker starts **before** any page is read,
//!    so that every write made after a page was copied is caught.
//! 2. Bulk copy: every page; pages the kernel never backed with data are sent as zero
//!    pages without being read.
//! 3. Iterations: sync the tracker, ask the [`Planner`](crate::policy::Planner) what to
//!    do, send the dirty pages, end each pass with an
//!    [`IterationEnd`](migration_core::stream::IterationEnd) record.
//! 4. Stop-and-copy: once the destination acknowledged the last pass (so that no backlog
//!    in the socket buffers becomes downtime), pause the guest, sync a last time, send the
//!    rest, the device state, then `EndOfData`.
//! 5. Awaiting the verdict: the guest stays paused, with all its state, until the
//!    destination's verdict arrives. `Running` (the destination checked everything and is
//!    ready): the engine commits with `Complete`, and from then on never resumes the
//!    guest; the caller may let the source VM go. Anything else (a `Failed` verdict, the
//!    connection breaking, a cancel, a `Complete` that cannot be written): the engine
//!    resumes the guest here and returns the error.
//!
//! On every error before the commit (a destination that fails, a broken connection, a
//! cancel, a limit reached with [`LimitPolicy::Fail`]) the engine sends an `Abort` record
//! where the connection still works, closes it, stops the tracker, lifts the throttle and
//! resumes the guest if it paused it, and returns the error: nothing is lost, the guest
//! runs on here.
//!
//! # Never both
//!
//! The destination runs the guest only once it has read the source's `Complete`, and the
//! source sends `Complete` only after the destination's `Running`, never resuming after
//! it. A connection that breaks anywhere in that exchange therefore leaves at most one side
//! running the guest: before `Complete` reaches the destination, the source resumes (if it
//! could not write `Complete`) or stays paused (if it wrote it and the connection then
//! broke). That last case, the two generals' problem, is left to an operator or
//! orchestrator: neither side runs the guest, the source still holds all of it (the engine
//! returned `Completed` once `Complete` was written), and the destination reports that it
//! never got `Complete`.

mod driver;
mod machine;

pub use driver::migrate;
pub use machine::{SourceAction, SourceEvent, SourceMachine, SourceResult};

use std::io;
use std::time::Duration;

use bytes::Bytes;
use migration_core::bitmap::DirtyBitmap;
use migration_core::dirty::TrackerError;
use migration_core::geometry::RamAccessError;
use migration_core::page::PageError;
use migration_core::stats::{MigrationStats, Phase};
use migration_core::stream::RecordType;
use migration_core::transport::Channel;
use migration_core::vm::VmError;

use crate::link::ReturnPath;
pub use crate::link::ReturnPathError;
use crate::policy::{ConvergenceConfig, NotConverged};

/// What the engine does when an iteration or time limit is reached before the migration
/// converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LimitPolicy {
    /// Abort the migration: send `Abort`, lift the throttle, and return
    /// [`SourceError::NotConverged`] with the measurements that explain why. The guest
    /// keeps running on the source.
    #[default]
    Fail,
    /// Stop pre-copy and hand everything still live back to the caller in
    /// [`SourceOutcome::LimitReached`]: the started tracker, the pages still dirty, the
    /// connection and its return path. The guest keeps running (throttled as it was); a
    /// post-copy engine continues from there with `Record::SwitchToPostcopy`.
    HandOver,
}

/// Settings of a pre-copy migration, with QEMU-like defaults.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Longest acceptable pause of the guest. Default 300 ms.
    pub downtime_limit: Duration,
    /// Cap on the stream's rate, bytes per second (token bucket). Default: none.
    pub max_bandwidth: Option<u64>,
    /// zstd level for pages that compress (`None`: off, the default).
    pub zstd_level: Option<i32>,
    /// Size of the delta cache in bytes (`None`: no delta encoding, the default). Re-sent
    /// pages still in the cache go as deltas against their previous copy.
    pub delta_cache_bytes: Option<usize>,
    /// Throttle the guest when it dirties memory faster than the link carries it. Default off.
    pub auto_converge: bool,
    /// Give up (or hand over) after this many passes over dirty pages. Default: none.
    pub max_iterations: Option<u32>,
    /// Give up (or hand over) after this much time iterating. Default: none.
    pub max_time: Option<Duration>,
    /// Give up (or hand over) after this many passes in a row that made no headway
    /// ([`ConvergenceConfig::give_up_after_stalled`]). Default: none.
    pub give_up_after_stalled: Option<u32>,
    /// What a limit does.
    pub limit_policy: LimitPolicy,
    /// Pages per page-batch record. Default 256 (1 MiB of 4 KiB pages).
    pub batch_pages: usize,
    /// Expected size of the device state, counted in the expected downtime. Default 64 KiB.
    pub device_state_estimate: u64,
    /// The VM's UUID, carried in the stream header.
    pub vm_id: [u8; 16],
    /// The VMM's blob in the config record (what the destination needs to build a VM).
    pub vmm_blob: Bytes,
    /// How long to wait for the verdict after `EndOfData` (`None`: as long as the
    /// connection stays up). When it expires the source resumes; the destination, which has
    /// not had `Complete`, does not run the guest.
    pub verdict_timeout: Option<Duration>,
    /// Least interval between two `Progress` events.
    pub progress_interval: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            zstd_level: None,
            delta_cache_bytes: None,
            auto_converge: false,
            max_iterations: None,
            max_time: None,
            give_up_after_stalled: None,
            limit_policy: LimitPolicy::Fail,
            batch_pages: 256,
            device_state_estimate: 64 << 10,
            vm_id: [0; 16],
            vmm_blob: Bytes::new(),
            verdict_timeout: None,
            progress_interval: Duration::from_millis(100),
        }
    }
}

impl SourceOptions {
    /// The planner's settings these options give.
    pub fn convergence(&self) -> ConvergenceConfig {
        ConvergenceConfig {
            downtime_limit: self.downtime_limit,
            auto_converge: self.auto_converge,
            max_iterations: self.max_iterations,
            max_time: self.max_time,
            give_up_after_stalled: self.give_up_after_stalled,
            ..ConvergenceConfig::default()
        }
    }
}

/// Why a migration failed on the source. In every case the guest runs on the source
/// again, unless [`SourceError::ResumeFailed`] says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The iteration or time limit was reached first.
    #[error("{0}")]
    NotConverged(NotConverged),
    /// The destination reported a failure.
    #[error("the destination failed: {reason}")]
    DestinationFailed {
        /// The destination's reason, in its words.
        reason: String,
    },
    /// Writing the migration stream failed.
    #[error("connection lost during {phase}: {source}")]
    Connection {
        /// Phase the migration was in.
        phase: Phase,
        /// What the transport said.
        #[source]
        source: io::Error,
    },
    /// The return path broke before the destination's verdict.
    #[error("return path lost during {phase}: {source}")]
    ReturnPath {
        /// Phase the migration was in.
        phase: Phase,
        /// How it ended.
        #[source]
        source: ReturnPathError,
    },
    /// The destination broke the protocol on the return path.
    #[error("protocol violation by the destination during {phase}: {violation}")]
    Protocol {
        /// Phase the migration was in.
        phase: Phase,
        /// What it did.
        violation: ReturnViolation,
    },
    /// The user cancelled.
    #[error("cancelled during {phase}")]
    Cancelled {
        /// Phase the migration was in.
        phase: Phase,
    },
    /// No verdict arrived in time.
    #[error("no verdict from the destination within {0:?}")]
    VerdictTimeout(Duration),
    /// The driver could not set up the connection (a second handle, its threads).
    #[error("setting up the connection: {0}")]
    Setup(#[source] io::Error),
    /// The dirty tracker failed.
    #[error("dirty tracking: {0}")]
    Tracker(#[from] TrackerError),
    /// The VMM refused an operation.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// Guest RAM could not be read.
    #[error("reading guest RAM: {0}")]
    Ram(#[from] RamAccessError),
    /// The page encoder could not be set up.
    #[error("page encoder: {0}")]
    Encoder(#[from] PageError),
    /// The migration failed, and resuming the guest afterwards failed too: the guest is
    /// paused on the source and the VMM must decide.
    #[error("{error}; and resuming the guest on the source failed: {resume}")]
    ResumeFailed {
        /// Why the migration failed.
        error: Box<SourceError>,
        /// Why the resume failed.
        resume: VmError,
    },
    /// The migration failed and the guest runs on the source again, but the auto-converge
    /// throttle could not be lifted: the vCPUs still run throttled.
    #[error("{error}; the guest runs on the source, but lifting its throttle failed: {throttle}")]
    ThrottleNotLifted {
        /// Why the migration failed.
        error: Box<SourceError>,
        /// Why lifting the throttle failed.
        throttle: VmError,
    },
}

impl SourceError {
    /// Whether the guest runs on the source again: false only for
    /// [`SourceError::ResumeFailed`], where it was left paused.
    pub fn guest_running(&self) -> bool {
        !matches!(self, SourceError::ResumeFailed { .. })
    }
}

/// Something the destination must not send during a pre-copy migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReturnViolation {
    /// `Running` before the source sent `EndOfData`.
    #[error("the destination claims to run the guest before the stream ended")]
    EarlyRunning,
    /// A record that has no place in pre-copy (a post-copy page request, say).
    #[error("unexpected {0} record on the return path of a pre-copy migration")]
    Unexpected(RecordType),
}

/// The connection and state handed back by [`LimitPolicy::HandOver`].
pub struct HandOver<T, C> {
    /// Why pre-copy stopped.
    pub not_converged: NotConverged,
    /// The tracker, still started.
    pub tracker: T,
    /// Pages dirty and not yet re-sent.
    pub dirty: DirtyBitmap,
    /// The migration stream, after the last `IterationEnd` record; rate limit kept.
    pub channel: Channel<C>,
    /// The return path's reader, still running.
    pub returns: ReturnPath,
    /// What pre-copy did so far.
    pub stats: MigrationStats,
    /// Throttle in force, in percent.
    pub throttle_pct: u8,
}

impl<T, C> std::fmt::Debug for HandOver<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandOver")
            .field("not_converged", &self.not_converged)
            .field("dirty", &self.dirty.count())
            .finish_non_exhaustive()
    }
}

/// How a migration ended on the source, when it did not fail.
pub enum SourceOutcome<T, C> {
    /// The destination runs the guest. The source VM is still paused; the caller may now
    /// discard it.
    Completed(MigrationStats),
    /// A limit was reached under [`LimitPolicy::HandOver`].
    LimitReached(Box<HandOver<T, C>>),
}

impl<T, C> std::fmt::Debug for SourceOutcome<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceOutcome::Completed(s) => f.debug_tuple("Completed").field(s).finish(),
            SourceOutcome::LimitReached(h) => f.debug_tuple("LimitReached").field(h).finish(),
        }
    }
}
