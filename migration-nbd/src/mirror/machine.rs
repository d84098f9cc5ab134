//! The mirror job without I/O: which clusters to copy next, what a guest write does to
//! them, when the target is in sync, and what to do when the connection is lost.
//!
//! [`MirrorMachine`] is told what happened (`note_write`, `begin_write`/`end_write`,
//! `handle_*`) and asked what to do (`poll_action`, `poll_event`). Time is passed in; the
//! machine never reads a clock, never sleeps and never touches a file or a socket, so the
//! tests drive it with a fake clock and scripted completions.
//!
//! # The rules that keep the target equal to the source
//!
//! - The disk is split into clusters of [`MirrorConfig::granularity`] bytes; a cluster's
//!   dirty bit means "the target may differ from the source here".
//! - A copy clears the dirty bits of its clusters when it is handed out, *before* the
//!   driver reads the source. A guest write noted after that sets them again, so a write
//!   that the read may have missed is copied again: a write is never lost, whether it lands
//!   before, during or after the copy.
//! - [`MirrorMachine::note_write`] must be called once the write has reached the source
//!   (readable there), not before: noted before it lands, a copy handed out between the note
//!   and the landing would read the old data and clear the bit.
//! - A cluster is in at most one operation at a time (a copy, or a write-blocking guest
//!   write). Two copies of one cluster in flight could land on the target in either
//!   order, the older data last.
//! - Write-blocking writes ([`MirrorMachine::begin_write`]) claim their clusters before
//!   the guest's data is written anywhere. A write whose clusters are being copied waits
//!   for that copy to land (the copy read the source before the write, so landing after
//!   the write on the target would undo it); while a write waits, no new copy of its
//!   clusters is handed out, so it cannot be starved. A write that reached the target adds
//!   no dirty bit; one that failed there marks its clusters dirty.
//! - A lost connection puts every copy in flight back into the dirty bitmap: nothing the
//!   target may not have received is assumed to be there.
//! - A target that answers nothing for [`MirrorConfig::reply_timeout`] while requests
//!   wait counts as lost too ([`Action::HangUp`]): a hung server keeps its connections
//!   open, so no error would ever say so.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use migration_core::bitmap::DirtyBitmap;

/// Default dirty-tracking granularity: 64 KiB, QEMU's mirror default.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Default largest copy: 1 MiB.
pub const DEFAULT_IO_SIZE: u64 = 1 << 20;
/// Default copies in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;
/// Default bytes of copies in flight (the buffers the driver holds): 16 MiB.
pub const DEFAULT_BUFFER_BYTES: u64 = 16 << 20;
/// Default time a target may leave every request unanswered: 30 s, the default request
/// timeout of Linux's NBD driver.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Guest writes kept for the latency percentiles.
const LATENCY_SAMPLES: usize = 4096;
/// Buckets of a rate window.
const RATE_BUCKETS: u32 = 16;

/// How guest writes reach the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CopyMode {
    /// Guest writes only mark clusters dirty; the copy loop sends them later.
    Background,
    /// Each guest write is also written to the target before it completes.
    WriteBlocking,
    /// Background, switching to write-blocking by itself when, with at least one copy's
    /// worth dirty, the guest dirties clusters faster than the copy cleans them over
    /// [`MirrorConfig::rate_window`], or keeps dirtying while the backlog did not shrink
    /// over a whole window after the bulk pass. It does not switch back by itself.
    Auto,
}

/// Mirror settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Bytes per dirty bit: a power of two from 512 B to 64 MiB.
    pub granularity: u64,
    /// Largest copy, a multiple of the granularity, at most 32 MiB.
    pub io_size: u64,
    /// Copies in flight at once.
    pub max_in_flight: usize,
    /// Bytes of copies in flight at once (at least `io_size`).
    pub buffer_bytes: u64,
    /// Copy mode at the start.
    pub mode: CopyMode,
    /// Window over which dirty and copy rates are measured.
    pub rate_window: Duration,
    /// How long the target may stay unreachable before the job fails.
    pub reconnect_window: Duration,
    /// Delay before the first reconnection attempt; doubled after each failure.
    pub reconnect_delay: Duration,
    /// Longest delay between reconnection attempts.
    pub reconnect_delay_max: Duration,
    /// How long the target may answer nothing (no copy, flush or write-blocking write
    /// lands) while requests wait, before it counts as hung: the connection is then
    /// treated as lost. Measured from the later of the last answer and the oldest request
    /// in flight, so a slow target that keeps answering is never timed out. Not zero.
    pub reply_timeout: Duration,
    /// The target reads as zeroes before the mirror starts (a fresh export): the first
    /// copy of a cluster may skip its holes and zero data instead of zeroing them there.
    pub target_is_zero: bool,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            granularity: DEFAULT_GRANULARITY,
            io_size: DEFAULT_IO_SIZE,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            mode: CopyMode::Background,
            rate_window: Duration::from_secs(1),
            reconnect_window: Duration::from_secs(30),
            reconnect_delay: Duration::from_millis(50),
            reconnect_delay_max: Duration::from_secs(2),
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            target_is_zero: false,
        }
    }
}

/// Settings that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The granularity is not a power of two in range.
    #[error("granularity {0} is not a power of two from 512 B to 64 MiB")]
    Granularity(u64),
    /// The I/O size is not a multiple of the granularity, or too large.
    #[error("io_size {io_size} is not a multiple of the granularity {granularity} up to 32 MiB")]
    IoSize {
        /// I/O size asked for.
        io_size: u64,
        /// Granularity.
        granularity: u64,
    },
    /// Nothing could ever be in flight.
    #[error(
        "max_in_flight must be at least 1 and buffer_bytes ({buffer_bytes}) at least io_size ({io_size})"
    )]
    InFlight {
        /// Buffer bytes asked for.
        buffer_bytes: u64,
        /// I/O size.
        io_size: u64,
    },
    /// An incremental mirror's bitmap does not cover the disk cluster for cluster.
    #[error(
        "the bitmap to start from has {bits} clusters; the disk has {clusters} at this granularity"
    )]
    BitmapLength {
        /// Clusters in the bitmap.
        bits: usize,
        /// Clusters of the disk.
        clusters: usize,
    },
    /// An incremental mirror onto a target said to read as zeroes: the target holds an
    /// older copy, whose clean clusters are kept.
    #[error("an incremental mirror cannot assume that the target reads as zeroes")]
    IncrementalOntoZero,
    /// A reply timeout of zero would time out every request.
    #[error("reply_timeout must be more than zero")]
    ReplyTimeout,
    /// The disk has more clusters than this machine can index.
    #[error("a disk of {size} bytes has too many clusters of {granularity} bytes")]
    TooManyClusters {
        /// Disk size.
        size: u64,
        /// Granularity.
        granularity: u64,
    },
}

/// Where the job is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// The first pass over the disk.
    Bulk,
    /// Copying clusters dirtied since they were copied; `pass` counts from 1.
    Iterating {
        /// Pass number.
        pass: u32,
    },
    /// Nothing dirty or in flight: flushing the target before saying ready.
    Flushing {
        /// Pass that ended clean.
        pass: u32,
    },
    /// In sync; guest writes go on being mirrored.
    Ready,
    /// [`MirrorMachine::complete`] was called: copying what is left, then flushing.
    Completing,
    /// The target equals the source and is flushed.
    Completed,
    /// [`MirrorMachine::cancel`] was called: waiting for copies in flight to land.
    Cancelling,
    /// Cancelled; the source was never touched and the target is left as it is.
    Cancelled,
    /// The connection was lost at `since`; `attempt` attempts have failed so far, the next
    /// is due at `next_at`.
    Reconnecting {
        /// When the connection was lost.
        since: Instant,
        /// Failed attempts so far.
        attempt: u32,
        /// When to try next.
        next_at: Instant,
        /// The phase to go back to.
        resume: Box<Phase>,
    },
    /// The job failed.
    Failed(Failure),
}

impl Phase {
    /// Whether the job ended (completed, cancelled or failed).
    pub fn is_finished(&self) -> bool {
        matches!(self, Phase::Completed | Phase::Cancelled | Phase::Failed(_))
    }

    fn name(&self) -> String {
        match self {
            Phase::Bulk => "bulk copy".into(),
            Phase::Iterating { pass } => format!("iterating (pass {pass})"),
            Phase::Flushing { .. } => "flushing".into(),
            Phase::Ready => "ready".into(),
            Phase::Completing => "completing".into(),
            Phase::Completed => "completed".into(),
            Phase::Cancelling => "cancelling".into(),
            Phase::Cancelled => "cancelled".into(),
            Phase::Reconnecting { attempt, .. } => format!("reconnecting (attempt {attempt})"),
            Phase::Failed(_) => "failed".into(),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Why the job failed, as far as the machine knows (the driver keeps the error under it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// A copy failed for a reason reconnecting does not cure (the target refused it, the
    /// source could not be read).
    Copy {
        /// Offset of the copy.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The flush of the target failed.
    Flush,
    /// The target stayed unreachable for the whole reconnection window.
    ReconnectWindow {
        /// The window.
        window: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// The target that came back is smaller than the source.
    TargetTooSmall {
        /// Its size.
        target: u64,
        /// The source's size.
        source: u64,
    },
}

/// An operation the machine handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub u64);

/// A write-blocking guest write (see [`MirrorMachine::begin_write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriteId(pub u64);

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Copy `[offset, offset + len)` from the source to the target: data as `WRITE`,
    /// holes and all-zero data as `WRITE_ZEROES`, or not at all where `target_zero` says
    /// the target already reads as zeroes. Then [`MirrorMachine::handle_copied`].
    Copy {
        /// Operation.
        op: OpId,
        /// Source and target offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The target reads as zeroes over the whole range.
        target_zero: bool,
    },
    /// Flush the target, then [`MirrorMachine::handle_flushed`].
    Flush {
        /// Operation.
        op: OpId,
    },
    /// Connect to the target again, then [`MirrorMachine::handle_reconnected`] or
    /// [`MirrorMachine::handle_reconnect_failed`].
    Reconnect {
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// The target answered nothing for [`MirrorConfig::reply_timeout`]: hang up every
    /// connection at once, so that nothing more of them is sent (what was in flight is
    /// dirty again, and the machine asks to reconnect next). The server may still carry
    /// out what it holds if it wakes up, so before copying on a new connection the driver
    /// should see the old ones closed by the server.
    HangUp(Stalled),
    /// Nothing to do before this instant, unless something is reported first.
    WaitUntil(Instant),
    /// The job ended: see [`MirrorMachine::phase`].
    Done,
}

/// A target that stopped answering (see [`Action::HangUp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled {
    /// Time without an answer while requests waited.
    pub waited: Duration,
    /// Requests that were waiting (copies, flushes, write-blocking writes).
    pub unanswered: usize,
}

/// Progress worth telling the embedder about.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MirrorEvent {
    /// The phase changed.
    Phase {
        /// The new phase.
        phase: Phase,
    },
    /// The copy mode in force changed.
    ModeSwitched {
        /// Write-blocking now (background otherwise).
        write_blocking: bool,
        /// The machine switched by itself (auto mode), not on request.
        automatic: bool,
        /// Dirty rate then, bytes per second.
        dirty_rate: f64,
        /// Copy rate then, bytes per second.
        copy_rate: f64,
    },
    /// The target answered nothing for the reply timeout; the connection is treated as
    /// lost (a [`MirrorEvent::ConnectionLost`] follows).
    TargetStalled(Stalled),
    /// The connection was lost; copies in flight were put back as dirty.
    ConnectionLost {
        /// Bytes that were in flight.
        requeued: u64,
    },
    /// The connection is back.
    Reconnected {
        /// Attempts it took.
        attempts: u32,
        /// Time without a connection.
        down_for: Duration,
    },
}

/// How a copy went, for the statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyOutcome {
    /// Bytes written as data.
    pub data: u64,
    /// Bytes that were holes in the source.
    pub holes: u64,
    /// Bytes sent as `WRITE_ZEROES` (holes, and data that read as zeroes).
    pub zeroed: u64,
}

/// What a write-blocking write may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteStart {
    /// Background mode (or no target now): write the source, then
    /// [`MirrorMachine::note_write`].
    Background,
    /// The clusters are claimed: write the source, then the target, then
    /// [`MirrorMachine::end_write`].
    Mirror(WriteId),
    /// A copy of the same clusters is in flight: wait for a completion, then ask again
    /// with [`MirrorMachine::write_claimed`].
    Wait(WriteId),
}

/// Dirty and copy rates over the rate window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Bytes of clean clusters the guest made dirty, per second.
    pub dirty_rate: f64,
    /// Bytes of clusters the copy made clean, per second.
    pub copy_rate: f64,
}

/// Counters of the job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorStats {
    /// Disk size.
    pub size: u64,
    /// Bytes written to the target as data by copies.
    pub bytes_copied: u64,
    /// Bytes found as holes in the source.
    pub bytes_holes: u64,
    /// Bytes sent as `WRITE_ZEROES`.
    pub bytes_zeroed: u64,
    /// Bytes copied again after their first copy (dirtied, or lost with a connection).
    pub bytes_recopied: u64,
    /// Bytes of clean clusters guest writes made dirty since the start: the dirty rate the
    /// mirror sees, in whole clusters (a 4 KiB write dirties a whole 64 KiB cluster;
    /// writes into clusters not copied yet or already dirty add nothing).
    pub bytes_dirtied: u64,
    /// Bytes dirty now.
    pub dirty_bytes: u64,
    /// Bytes of copies in flight now.
    pub in_flight_bytes: u64,
    /// Passes after the bulk one.
    pub passes: u32,
    /// Rates over the window.
    pub rates: Rates,
    /// Whether write-blocking is in force.
    pub write_blocking: bool,
    /// Mode switches, automatic or requested.
    pub mode_switches: u32,
    /// Times the connection came back.
    pub reconnects: u32,
    /// Guest writes mirrored synchronously.
    pub blocking_writes: u64,
    /// Bytes of those.
    pub blocking_write_bytes: u64,
    /// Median latency write-blocking added to a guest write (claim to target done).
    pub write_latency_p50: Option<Duration>,
    /// 99th percentile of it.
    pub write_latency_p99: Option<Duration>,
}

/// Bytes per second over a sliding window, in buckets so that adding is O(1).
#[derive(Debug, Clone)]
struct RateWindow {
    window: Duration,
    bucket: Duration,
    buckets: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    fn new(window: Duration) -> RateWindow {
        let window = window.max(Duration::from_millis(1));
        RateWindow {
            window,
            bucket: window / RATE_BUCKETS,
            buckets: VecDeque::new(),
        }
    }

    fn add(&mut self, now: Instant, bytes: u64) {
        match self.buckets.back_mut() {
            Some((start, n)) if now < *start + self.bucket => *n = n.saturating_add(bytes),
            _ => self.buckets.push_back((now, bytes)),
        }
        self.prune(now);
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&(start, _)) = self.buckets.front() {
            if now.saturating_duration_since(start) > self.window {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// Rate over the window, or over `since_start` when the job is younger than it.
    fn rate(&self, now: Instant, since_start: Duration) -> f64 {
        let span = since_start.min(self.window).max(Duration::from_millis(1));
        let sum: u64 = self
            .buckets
            .iter()
            .filter(|(start, _)| now.saturating_duration_since(*start) <= self.window)
            .map(|&(_, n)| n)
            .sum();
        sum as f64 / span.as_secs_f64()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    /// `first` is set for the bulk pass's copy.
    Copy {
        first: bool,
    },
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: OpKind,
    first: usize,
    count: usize,
    /// When it was handed out, for the reply timeout.
    since: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Claim {
    first: usize,
    count: usize,
    state: ClaimState,
    since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimState {
    /// Waiting for copies of its clusters to land.
    Waiting,
    /// Holds its clusters.
    Claimed,
    /// Let go without its clusters (the mode went back to background): it ends as a
    /// background write.
    Released,
}

/// The mirror job as a state machine (see the [module docs](self)).
#[derive(Debug)]
pub struct MirrorMachine {
    cfg: MirrorConfig,
    size: u64,
    clusters: usize,
    /// Clusters per copy at most.
    io_clusters: usize,
    phase: Phase,
    started: Instant,
    /// Clusters where the target may differ from the source.
    dirty: DirtyBitmap,
    /// Clusters in an operation (a copy or a claimed write).
    busy: DirtyBitmap,
    /// Clusters the target may hold data in, though `target_is_zero`: written by a
    /// write-blocking write, or by any copy handed out (landed, lost or failed, whole or in
    /// part). A copy skips holes only where none of its clusters is touched. A lost
    /// connection restarts the bulk pass from the start, so "in the bulk pass" alone does
    /// not mean "never copied".
    touched: DirtyBitmap,
    /// Where the current pass stands.
    cursor: usize,
    ops: HashMap<OpId, Op>,
    copy_bytes_in_flight: u64,
    copies_in_flight: usize,
    next_id: u64,
    writes: HashMap<WriteId, Claim>,
    /// Writes waiting for their clusters, oldest first.
    pending: VecDeque<WriteId>,
    mode: CopyMode,
    blocking: bool,
    dirty_rate: RateWindow,
    copy_rate: RateWindow,
    events: VecDeque<MirrorEvent>,
    stats: MirrorStats,
    latencies: VecDeque<Duration>,
    /// The Ready phase was reported once (the driver's `wait_ready` keys on it).
    reached_ready: bool,
    /// Dirty bytes sampled over the last rate window, for auto mode.
    backlog_hist: VecDeque<(Instant, u64)>,
    /// When the target last answered (or the connection last came up), for the reply
    /// timeout.
    last_answer: Instant,
}

fn clusters_of(offset: u64, len: u64, granularity: u64, clusters: usize) -> (usize, usize) {
    if len == 0 {
        return (0, 0);
    }
    let first = (offset / granularity) as usize;
    let last = (offset.saturating_add(len - 1) / granularity) as usize;
    let first = first.min(clusters);
    let end = (last + 1).min(clusters);
    (first, end.saturating_sub(first))
}

impl MirrorMachine {
    /// A job over a disk of `size` bytes, started at `now`: every cluster dirty, in the
    /// bulk phase.
    pub fn new(size: u64, cfg: MirrorConfig, now: Instant) -> Result<MirrorMachine, ConfigError> {
        let g = cfg.granularity;
        if !g.is_power_of_two() || !(512..=64 << 20).contains(&g) {
            return Err(ConfigError::Granularity(g));
        }
        if cfg.io_size < g || cfg.io_size % g != 0 || cfg.io_size > 32 << 20 {
            return Err(ConfigError::IoSize {
                io_size: cfg.io_size,
                granularity: g,
            });
        }
        if cfg.max_in_flight == 0 || cfg.buffer_bytes < cfg.io_size {
            return Err(ConfigError::InFlight {
                buffer_bytes: cfg.buffer_bytes,
                io_size: cfg.io_size,
            });
        }
        if cfg.reply_timeout.is_zero() {
            return Err(ConfigError::ReplyTimeout);
        }
        let clusters =
            usize::try_from(size.div_ceil(g)).map_err(|_| ConfigError::TooManyClusters {
                size,
                granularity: g,
            })?;
        let blocking = cfg.mode == CopyMode::WriteBlocking;
        Ok(MirrorMachine {
            size,
            clusters,
            io_clusters: (cfg.io_size / g) as usize,
            phase: Phase::Bulk,
            started: now,
            dirty: DirtyBitmap::new_full(clusters),
            busy: DirtyBitmap::new(clusters),
            touched: DirtyBitmap::new(clusters),
            cursor: 0,
            ops: HashMap::new(),
            copy_bytes_in_flight: 0,
            copies_in_flight: 0,
            next_id: 0,
            writes: HashMap::new(),
            pending: VecDeque::new(),
            mode: cfg.mode,
            blocking,
            dirty_rate: RateWindow::new(cfg.rate_window),
            copy_rate: RateWindow::new(cfg.rate_window),
            events: VecDeque::new(),
            stats: MirrorStats {
                size,
                write_blocking: blocking,
                ..MirrorStats::default()
            },
            latencies: VecDeque::new(),
            reached_ready: false,
            backlog_hist: VecDeque::new(),
            last_answer: now,
            cfg,
        })
    }

    /// An incremental mirror: the target holds an older copy of the disk, and only the
    /// clusters set in `dirty` (one bit per `cfg.granularity` bytes, for example a
    /// [`PersistentBitmap`](super::PersistentBitmap)'s) differ from it; the first pass
    /// copies those alone, and guest writes are tracked as in a full mirror.
    pub fn new_incremental(
        size: u64,
        cfg: MirrorConfig,
        dirty: DirtyBitmap,
        now: Instant,
    ) -> Result<MirrorMachine, ConfigError> {
        if cfg.target_is_zero {
            return Err(ConfigError::IncrementalOntoZero);
        }
        let mut m = MirrorMachine::new(size, cfg, now)?;
        if dirty.len() != m.clusters {
            return Err(ConfigError::BitmapLength {
                bits: dirty.len(),
                clusters: m.clusters,
            });
        }
        m.dirty = dirty;
        Ok(m)
    }

    /// The settings.
    pub fn config(&self) -> &MirrorConfig {
        &self.cfg
    }

    /// Disk size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the job is.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Whether the job was ready at least once (it stays usable for completion after).
    pub fn reached_ready(&self) -> bool {
        self.reached_ready
    }

    /// Whether write-blocking is in force now.
    pub fn is_write_blocking(&self) -> bool {
        self.blocking
    }

    /// The mode asked for.
    pub fn mode(&self) -> CopyMode {
        self.mode
    }

    /// Dirty clusters now.
    pub fn dirty_clusters(&self) -> usize {
        self.dirty.count()
    }

    /// Operations in flight (copies and flushes).
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Dirty and copy rates over the window ending at `now`.
    pub fn rates(&self, now: Instant) -> Rates {
        let age = now.saturating_duration_since(self.started);
        Rates {
            dirty_rate: self.dirty_rate.rate(now, age),
            copy_rate: self.copy_rate.rate(now, age),
        }
    }

    /// The counters at `now`.
    pub fn stats(&self, now: Instant) -> MirrorStats {
        let mut s = self.stats.clone();
        s.dirty_bytes = (self.dirty.count() as u64).saturating_mul(self.cfg.granularity);
        s.in_flight_bytes = self.copy_bytes_in_flight;
        s.rates = self.rates(now);
        s.write_blocking = self.blocking;
        if !self.latencies.is_empty() {
            let mut l: Vec<Duration> = self.latencies.iter().copied().collect();
            l.sort_unstable();
            let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
            s.write_latency_p50 = Some(at(0.5));
            s.write_latency_p99 = Some(at(0.99));
        }
        s
    }

    /// The next progress event, oldest first.
    pub fn poll_event(&mut self) -> Option<MirrorEvent> {
        self.events.pop_front()
    }

    fn set_phase(&mut self, p: Phase) {
        if p == Phase::Ready {
            self.reached_ready = true;
        }
        self.phase = p.clone();
        self.events.push_back(MirrorEvent::Phase { phase: p });
    }

    fn range(&self, first: usize, count: usize) -> (u64, u64) {
        let g = self.cfg.granularity;
        let offset = first as u64 * g;
        let end = ((first + count) as u64 * g).min(self.size);
        (offset, end - offset)
    }

    fn mark_dirty(&mut self, first: usize, count: usize, now: Instant) {
        if count == 0 {
            return;
        }
        let newly = count - self.dirty.count_range(first..first + count);
        self.dirty.set_range(first..first + count);
        if newly > 0 {
            let bytes = newly as u64 * self.cfg.granularity;
            self.stats.bytes_dirtied += bytes;
            self.dirty_rate.add(now, bytes);
        }
    }

    /// A guest write, trim or write-zeroes of `[offset, offset + len)` reached the source:
    /// its clusters are dirty. Call it after the source holds the write (see the module
    /// docs); in write-blocking mode use [`begin_write`](Self::begin_write) instead.
    pub fn note_write(&mut self, offset: u64, len: u64, now: Instant) {
        let (first, count) = clusters_of(offset, len, self.cfg.granularity, self.clusters);
        self.mark_dirty(first, count, now);
    }

    fn overlaps_pending(&self, first: usize, count: usize, before: Option<WriteId>) -> bool {
        self.pending
            .iter()
            .take_while(|id| Some(**id) != before)
            .filter_map(|id| self.writes.get(id))
            .any(|c| c.first < first + count && first < c.first + c.count)
    }

    /// A guest write of `[offset, offset + len)` is about to be made. In background mode
    /// (or while the target is away) the answer is [`WriteStart::Background`]; in
    /// write-blocking mode the write claims its clusters, at once or after the copies of
    /// them in flight ([`WriteStart::Wait`]).
    pub fn begin_write(&mut self, offset: u64, len: u64, now: Instant) -> WriteStart {
        let live = matches!(
            self.phase,
            Phase::Bulk
                | Phase::Iterating { .. }
                | Phase::Flushing { .. }
                | Phase::Ready
                | Phase::Completing
        );
        if !self.blocking || !live || len == 0 {
            return WriteStart::Background;
        }
        let (first, count) = clusters_of(offset, len, self.cfg.granularity, self.clusters);
        if count == 0 {
            return WriteStart::Background;
        }
        let id = WriteId(self.next_id);
        self.next_id += 1;
        // Whether it claims its clusters, waits, or is released by a switch to background,
        // the driver may write it to the target.
        self.touched.set_range(first..first + count);
        let free = self.busy.count_range(first..first + count) == 0
            && !self.overlaps_pending(first, count, None);
        self.writes.insert(
            id,
            Claim {
                first,
                count,
                state: if free {
                    ClaimState::Claimed
                } else {
                    ClaimState::Waiting
                },
                since: now,
            },
        );
        if free {
            self.claim(first, count);
            WriteStart::Mirror(id)
        } else {
            self.pending.push_back(id);
            WriteStart::Wait(id)
        }
    }

    /// Every claim is of a write that [`begin_write`](Self::begin_write) counted in
    /// `touched` already.
    fn claim(&mut self, first: usize, count: usize) {
        self.busy.set_range(first..first + count);
    }

    /// Whether a write that had to wait holds its clusters now. A write that is no longer
    /// known (the mode changed under it and it was released) answers true: it may go on
    /// as a background write, and its [`end_write`](Self::end_write) marks it dirty.
    pub fn write_claimed(&self, id: WriteId) -> bool {
        self.writes
            .get(&id)
            .is_none_or(|c| c.state != ClaimState::Waiting)
    }

    /// Claims clusters for waiting writes whose clusters are free now, oldest first.
    fn promote(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            let id = self.pending[i];
            let Some(c) = self.writes.get(&id).copied() else {
                self.pending.remove(i);
                continue;
            };
            let free = self.busy.count_range(c.first..c.first + c.count) == 0
                && !self.overlaps_pending(c.first, c.count, Some(id));
            if free {
                self.pending.remove(i);
                self.claim(c.first, c.count);
                if let Some(w) = self.writes.get_mut(&id) {
                    w.state = ClaimState::Claimed;
                }
            } else {
                i += 1;
            }
        }
    }

    /// A write-blocking write ended: `on_target` says whether it reached the target. One
    /// that did not (or never claimed its clusters) leaves its clusters dirty.
    pub fn end_write(&mut self, id: WriteId, on_target: bool, now: Instant) {
        let Some(c) = self.writes.remove(&id) else {
            return;
        };
        let claimed = c.state == ClaimState::Claimed;
        if claimed {
            self.busy.clear_range(c.first..c.first + c.count);
        }
        if !on_target || !claimed {
            self.mark_dirty(c.first, c.count, now);
        } else {
            self.last_answer = self.last_answer.max(now);
            self.stats.blocking_writes += 1;
            let (_, len) = self.range(c.first, c.count);
            self.stats.blocking_write_bytes += len;
            if self.latencies.len() == LATENCY_SAMPLES {
                self.latencies.pop_front();
            }
            self.latencies
                .push_back(now.saturating_duration_since(c.since));
        }
        self.promote();
    }

    /// Asks for a mode at run time; auto mode that already switched stays write-blocking.
    pub fn set_mode(&mut self, mode: CopyMode, now: Instant) {
        self.mode = mode;
        let blocking = match mode {
            CopyMode::Background => false,
            CopyMode::WriteBlocking => true,
            CopyMode::Auto => self.blocking,
        };
        self.switch(blocking, false, now);
    }

    fn switch(&mut self, blocking: bool, automatic: bool, now: Instant) {
        if blocking == self.blocking {
            return;
        }
        self.blocking = blocking;
        self.stats.mode_switches += 1;
        let r = self.rates(now);
        self.events.push_back(MirrorEvent::ModeSwitched {
            write_blocking: blocking,
            automatic,
            dirty_rate: r.dirty_rate,
            copy_rate: r.copy_rate,
        });
        if !blocking {
            // Waiting writes go on as background writes (their end marks them dirty).
            for id in std::mem::take(&mut self.pending) {
                if let Some(w) = self.writes.get_mut(&id) {
                    w.state = ClaimState::Released;
                }
            }
        }
    }

    /// Asks for completion: allowed once ready. The guest should be paused (or its writes
    /// stopped) first, or completion may never find the disk clean.
    pub fn complete(&mut self) -> Result<(), StateError> {
        match self.phase {
            Phase::Ready => {
                self.set_phase(Phase::Completing);
                Ok(())
            }
            Phase::Reconnecting { ref mut resume, .. } if **resume == Phase::Ready => {
                **resume = Phase::Completing;
                Ok(())
            }
            Phase::Completing | Phase::Completed => Ok(()),
            ref p => Err(StateError::NotReady { phase: p.clone() }),
        }
    }

    /// Cancels: no new copy is handed out; the job ends once the copies in flight landed.
    pub fn cancel(&mut self) {
        if self.phase.is_finished() || self.phase == Phase::Cancelling {
            return;
        }
        if self.ops.is_empty() {
            self.set_phase(Phase::Cancelled);
        } else {
            self.set_phase(Phase::Cancelling);
        }
    }

    /// Fails the job (for a reason the driver found, such as a target too small).
    pub fn fail(&mut self, why: Failure) {
        if !self.phase.is_finished() {
            self.set_phase(Phase::Failed(why));
        }
    }

    fn take_op(&mut self, op: OpId) -> Option<Op> {
        let o = self.ops.remove(&op)?;
        if let OpKind::Copy { .. } = o.kind {
            self.busy.clear_range(o.first..o.first + o.count);
            let (_, len) = self.range(o.first, o.count);
            self.copy_bytes_in_flight -= len;
            self.copies_in_flight -= 1;
        }
        Some(o)
    }

    /// A copy landed on the target. Completions of operations the machine no longer knows
    /// (lost with a connection) are ignored.
    pub fn handle_copied(&mut self, op: OpId, outcome: CopyOutcome, now: Instant) {
        let Some(o) = self.take_op(op) else {
            return;
        };
        self.last_answer = self.last_answer.max(now);
        let (_, len) = self.range(o.first, o.count);
        self.stats.bytes_copied += outcome.data;
        self.stats.bytes_holes += outcome.holes;
        self.stats.bytes_zeroed += outcome.zeroed;
        if o.kind != (OpKind::Copy { first: true }) {
            self.stats.bytes_recopied += len;
        }
        self.copy_rate.add(now, len);
        self.promote();
        self.after_op();
    }

    /// An operation failed for a reason reconnecting does not cure: the job fails (or,
    /// while cancelling, just ends). Returns what failed, for the driver's error; `None`
    /// for an operation the machine no longer knows.
    pub fn handle_op_failed(&mut self, op: OpId) -> Option<Failure> {
        let o = self.take_op(op)?;
        let why = match o.kind {
            OpKind::Copy { .. } => {
                let (offset, len) = self.range(o.first, o.count);
                self.mark_dirty_silently(o.first, o.count);
                Failure::Copy { offset, len }
            }
            OpKind::Flush => Failure::Flush,
        };
        if self.phase == Phase::Cancelling {
            // The target is left as it is either way.
            self.after_op();
        } else {
            self.fail(why.clone());
        }
        Some(why)
    }

    fn mark_dirty_silently(&mut self, first: usize, count: usize) {
        self.dirty.set_range(first..first + count);
    }

    /// The flush landed.
    pub fn handle_flushed(&mut self, op: OpId, now: Instant) {
        if self.take_op(op).is_none() {
            return;
        }
        self.last_answer = self.last_answer.max(now);
        let clean = self.dirty.is_clear() && self.copies_in_flight == 0;
        match self.phase {
            // Nothing was dirty or in flight when the flush was sent, and it succeeded:
            // ready, as QEMU's mirror is. Writes made during the flush are dirty and copied
            // from the ready phase on; only completion needs the disk clean after a flush.
            Phase::Flushing { .. } => self.set_phase(Phase::Ready),
            Phase::Completing if clean && self.writes.is_empty() => {
                self.set_phase(Phase::Completed);
            }
            _ => {}
        }
        self.after_op();
    }

    fn after_op(&mut self) {
        if self.phase == Phase::Cancelling && self.ops.is_empty() {
            self.set_phase(Phase::Cancelled);
        }
    }

    /// The connection to the target was lost at `now`: every copy in flight is dirty
    /// again, and the machine asks for reconnections until [`MirrorConfig::reconnect_window`]
    /// passes. Reports about the lost operations that arrive later are ignored.
    pub fn handle_connection_lost(&mut self, now: Instant) {
        let resume = match &self.phase {
            Phase::Reconnecting { .. } => return,
            p if p.is_finished() => return,
            Phase::Cancelling => {
                self.drop_ops();
                self.set_phase(Phase::Cancelled);
                return;
            }
            Phase::Flushing { pass } => Phase::Iterating { pass: *pass },
            p => p.clone(),
        };
        let requeued = self.drop_ops();
        self.events
            .push_back(MirrorEvent::ConnectionLost { requeued });
        self.set_phase(Phase::Reconnecting {
            since: now,
            attempt: 0,
            next_at: now,
            resume: Box::new(resume),
        });
    }

    fn drop_ops(&mut self) -> u64 {
        let ops: Vec<OpId> = self.ops.keys().copied().collect();
        let mut requeued = 0;
        for id in ops {
            if let Some(o) = self.take_op(id) {
                if let OpKind::Copy { .. } = o.kind {
                    requeued += self.range(o.first, o.count).1;
                    self.mark_dirty_silently(o.first, o.count);
                }
            }
        }
        // A copy is never skipped: the pass restarts to find the clusters put back.
        self.cursor = 0;
        // Writes that waited for the lost copies need not wait any more.
        self.promote();
        requeued
    }

    /// The reconnection attempt failed.
    pub fn handle_reconnect_failed(&mut self, now: Instant) {
        if let Phase::Reconnecting {
            since,
            attempt,
            resume,
            ..
        } = &self.phase
        {
            let attempt = attempt + 1;
            let shift = attempt.saturating_sub(1).min(16);
            let delay = self
                .cfg
                .reconnect_delay
                .saturating_mul(1 << shift)
                .min(self.cfg.reconnect_delay_max);
            let p = Phase::Reconnecting {
                since: *since,
                attempt,
                next_at: now + delay,
                resume: resume.clone(),
            };
            self.set_phase(p);
        }
    }

    /// Connected again, to a target of `target_size` bytes.
    pub fn handle_reconnected(&mut self, target_size: u64, now: Instant) {
        let Phase::Reconnecting {
            since,
            attempt,
            resume,
            ..
        } = &self.phase
        else {
            return;
        };
        let (since, attempts, resume) = (*since, attempt + 1, (**resume).clone());
        if target_size < self.size {
            self.fail(Failure::TargetTooSmall {
                target: target_size,
                source: self.size,
            });
            return;
        }
        self.stats.reconnects += 1;
        // Writes still claimed from the old connection fail soon; they must not count
        // against the new one.
        self.last_answer = self.last_answer.max(now);
        self.events.push_back(MirrorEvent::Reconnected {
            attempts,
            down_for: now.saturating_duration_since(since),
        });
        self.set_phase(resume);
    }

    fn maybe_auto_switch(&mut self, now: Instant) {
        if self.mode != CopyMode::Auto || self.blocking {
            return;
        }
        if now.saturating_duration_since(self.started) < self.cfg.rate_window {
            return;
        }
        // A write now and then on an idle mirror outruns a copy rate of zero: only a
        // backlog of at least one whole copy that the copy does not keep up with counts.
        let backlog = (self.dirty.count() as u64).saturating_mul(self.cfg.granularity);
        // The backlog a window ago: a guest that re-dirties what the copy cleans at once
        // keeps the two rates equal, and the backlog not shrinking says it as well.
        let bucket = self.cfg.rate_window / RATE_BUCKETS;
        if self
            .backlog_hist
            .back()
            .is_none_or(|&(t, _)| now.saturating_duration_since(t) >= bucket)
        {
            self.backlog_hist.push_back((now, backlog));
        }
        while self
            .backlog_hist
            .get(1)
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= self.cfg.rate_window)
        {
            self.backlog_hist.pop_front();
        }
        let stuck = self.phase != Phase::Bulk
            && self.backlog_hist.front().is_some_and(|&(t, b)| {
                now.saturating_duration_since(t) >= self.cfg.rate_window && backlog >= b
            });
        let r = self.rates(now);
        let losing = r.dirty_rate > r.copy_rate || (stuck && r.dirty_rate > 0.0);
        // A small hot set the guest rewrites faster than the link moves it (one cluster,
        // written on every pass) is never a whole copy of backlog, but it keeps the mirror
        // from ever being in sync just the same: stuck for a window before ready counts.
        let hot = stuck && !self.reached_ready;
        if losing && (backlog >= self.cfg.io_size || hot) {
            self.switch(true, true, now);
        }
    }

    /// The next run of dirty, free clusters at or after `from` (and before `to`).
    fn find_run(&self, from: usize, to: usize) -> Option<(usize, usize)> {
        let mut at = from;
        loop {
            let c = self.dirty.next_set(at)?;
            if c >= to {
                return None;
            }
            if self.busy.test(c) || self.overlaps_pending(c, 1, None) {
                at = c + 1;
                continue;
            }
            let mut n = 1;
            while n < self.io_clusters
                && c + n < to
                && self.dirty.test(c + n)
                && !self.busy.test(c + n)
                && !self.overlaps_pending(c + n, 1, None)
            {
                n += 1;
            }
            return Some((c, n));
        }
    }

    fn can_start_copy(&self) -> bool {
        self.copies_in_flight < self.cfg.max_in_flight
            && self.copy_bytes_in_flight + self.cfg.io_size <= self.cfg.buffer_bytes
    }

    fn start_copy(&mut self, first: usize, count: usize, first_copy: bool, now: Instant) -> Action {
        let op = OpId(self.next_id);
        self.next_id += 1;
        self.dirty.clear_range(first..first + count);
        self.busy.set_range(first..first + count);
        let (offset, len) = self.range(first, count);
        self.copy_bytes_in_flight += len;
        self.copies_in_flight += 1;
        self.ops.insert(
            op,
            Op {
                kind: OpKind::Copy { first: first_copy },
                first,
                count,
                since: now,
            },
        );
        let target_zero = first_copy
            && self.cfg.target_is_zero
            && self.touched.count_range(first..first + count) == 0;
        // From now on the target may hold data here, whatever becomes of this copy.
        self.touched.set_range(first..first + count);
        Action::Copy {
            op,
            offset,
            len,
            target_zero,
        }
    }

    fn start_flush(&mut self, now: Instant) -> Action {
        let op = OpId(self.next_id);
        self.next_id += 1;
        self.ops.insert(
            op,
            Op {
                kind: OpKind::Flush,
                first: 0,
                count: 0,
                since: now,
            },
        );
        Action::Flush { op }
    }

    fn flush_in_flight(&self) -> bool {
        self.ops.values().any(|o| o.kind == OpKind::Flush)
    }

    /// What to do next at `now`; `None` when nothing is to be done until something is
    /// reported (a completion, a write, a call).
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if let Some(s) = self.poll_timeout(now) {
            return Some(Action::HangUp(s));
        }
        self.maybe_auto_switch(now);
        match self.phase.clone() {
            Phase::Bulk => self.copy_pass(true, now),
            Phase::Iterating { .. } => self.copy_pass(false, now),
            Phase::Flushing { .. } => {
                if self.flush_in_flight() {
                    None
                } else {
                    Some(self.start_flush(now))
                }
            }
            Phase::Ready => self.copy_anywhere(now),
            Phase::Completing => {
                if let Some(a) = self.copy_anywhere(now) {
                    return Some(a);
                }
                let clean = self.dirty.is_clear() && self.copies_in_flight == 0;
                if clean && self.writes.is_empty() && !self.flush_in_flight() {
                    return Some(self.start_flush(now));
                }
                None
            }
            Phase::Cancelling => None,
            Phase::Reconnecting {
                since,
                attempt,
                next_at,
                ..
            } => {
                let window_end = since + self.cfg.reconnect_window;
                if now >= window_end {
                    self.fail(Failure::ReconnectWindow {
                        window: self.cfg.reconnect_window,
                        attempts: attempt,
                    });
                    return Some(Action::Done);
                }
                if now < next_at {
                    return Some(Action::WaitUntil(next_at.min(window_end)));
                }
                // Until the attempt is reported, the next one is not due.
                if let Phase::Reconnecting { next_at, .. } = &mut self.phase {
                    *next_at = window_end;
                }
                Some(Action::Reconnect {
                    attempt: attempt + 1,
                })
            }
            Phase::Completed | Phase::Cancelled | Phase::Failed(_) => Some(Action::Done),
        }
    }

    /// When the target counts as hung if it answers nothing more: [`reply_timeout`] after
    /// the later of its last answer and the oldest request in flight. `None` with nothing
    /// in flight, or no connection to time out.
    ///
    /// [`reply_timeout`]: MirrorConfig::reply_timeout
    pub fn reply_deadline(&self) -> Option<Instant> {
        if self.phase.is_finished() || matches!(self.phase, Phase::Reconnecting { .. }) {
            return None;
        }
        let oldest = self
            .ops
            .values()
            .map(|o| o.since)
            .chain(
                self.writes
                    .values()
                    .filter(|c| c.state == ClaimState::Claimed)
                    .map(|c| c.since),
            )
            .min()?;
        Some(oldest.max(self.last_answer) + self.cfg.reply_timeout)
    }

    /// Checks the reply timeout at `now`. Past [`reply_deadline`](Self::reply_deadline)
    /// the target is hung: the connection counts as lost (as with
    /// [`handle_connection_lost`](Self::handle_connection_lost)) and the answer says so; the
    /// driver must then hang up at once, as for [`Action::HangUp`], which
    /// [`poll_action`](Self::poll_action) returns in the same case. A driver whose thread
    /// that polls may itself be stuck sending to the hung target calls this from the
    /// thread that waits for replies.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Stalled> {
        let deadline = self.reply_deadline()?;
        if now < deadline {
            return None;
        }
        let claimed = self
            .writes
            .values()
            .filter(|c| c.state == ClaimState::Claimed)
            .count();
        let stalled = Stalled {
            waited: now.saturating_duration_since(deadline - self.cfg.reply_timeout),
            unanswered: self.ops.len() + claimed,
        };
        self.events.push_back(MirrorEvent::TargetStalled(stalled));
        self.handle_connection_lost(now);
        Some(stalled)
    }

    /// Copies wherever something is dirty (ready and completing: no passes any more).
    fn copy_anywhere(&mut self, now: Instant) -> Option<Action> {
        if !self.can_start_copy() {
            return None;
        }
        let run = self
            .find_run(self.cursor, self.clusters)
            .or_else(|| self.find_run(0, self.cursor.min(self.clusters)));
        let (c, n) = run?;
        self.cursor = c + n;
        Some(self.start_copy(c, n, false, now))
    }

    /// The bulk pass and the iterations: copies in cluster order from the cursor; at the
    /// end of a pass, flushing if nothing is dirty, else another pass (unless every dirty
    /// cluster is held by a write, which is waited for rather than spun on).
    ///
    /// This is QEMU's readiness rule (`mirror_run`: ready after a flush once the dirty
    /// count is 0 with nothing in flight): the pass's end is the moment nothing is in
    /// flight and nothing is dirty ahead of the cursor, and a pass holding only what was
    /// dirtied during the last one is short, so no pass over the whole disk has to end
    /// clean. QEMU wraps its dirty iterator at once instead of waiting for the copies in
    /// flight to land; doing the same here was measured slower under a random writer
    /// (BENCHMARKS.md: median ready 1.7 s against 1.3 s, 10 rounds each), the clusters
    /// dirtied meanwhile being copied one by one instead of gathered into runs.
    fn copy_pass(&mut self, first_copy: bool, now: Instant) -> Option<Action> {
        if self.can_start_copy() {
            if let Some((c, n)) = self.find_run(self.cursor, self.clusters) {
                self.cursor = c + n;
                return Some(self.start_copy(c, n, first_copy, now));
            }
            self.cursor = self.clusters;
        }
        if self.cursor < self.clusters || self.copies_in_flight > 0 {
            return None;
        }
        let pass = match self.phase {
            Phase::Iterating { pass } => pass,
            _ => 0,
        };
        if self.dirty.is_clear() {
            self.set_phase(Phase::Flushing { pass });
            return self.poll_action(now);
        }
        // Every dirty cluster held by a write: its end will call again.
        self.find_run(0, self.clusters)?;
        self.cursor = 0;
        self.stats.passes += 1;
        self.set_phase(Phase::Iterating { pass: pass + 1 });
        self.poll_action(now)
    }
}

/// A call the job's phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Completion before the mirror was ready.
    #[error("the mirror cannot complete before it is ready (it is {phase})")]
    NotReady {
        /// The phase it was in.
        phase: Phase,
    },
}

#[cfg(test)]
mod tests;
