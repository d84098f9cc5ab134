//! The source engine: bulk copy, iterations over dirty pages, stop-and-copy, and the wait
//! for the destination's verdict.
//!
//! # Order of events
//!
//! 1. Setup: the stream header (with the VM's UUID) and the [`Config`] record (RAM layout
//!    and the VMM's blob) are sent; the return-path reader thread starts on a clone of the
//!    connection; the dirty tracker starts **before** any page is read, so that every write
//!    made after a page was copied is caught.
//! 2. Bulk copy: every page, zero pages as zero entries.
//! 3. Iterations: sync the tracker, ask the [`Planner`] what to do, send the dirty pages,
//!    end each pass with an [`IterationEnd`] record.
//! 4. Stop-and-copy: once the destination acknowledged the last pass (so that no backlog in
//!    the socket buffers becomes downtime), pause the guest, sync a last time, send the
//!    rest, the device state, then [`Record::EndOfData`].
//! 5. Awaiting the verdict: the guest stays paused, with all its state, until the
//!    destination's [`Verdict`] arrives. `Running` (the destination checked everything and
//!    is ready): the engine commits with [`Record::Complete`], and from then on never
//!    resumes the guest; the caller may let the source VM go. Anything else (a `Failed`
//!    verdict, the connection breaking, a cancel, a `Complete` that cannot be written): the
//!    engine resumes the guest here and returns the error.
//!
//! On every error before the verdict (a destination that fails, a broken connection, a
//! cancel, a limit reached with [`LimitPolicy::Fail`]) the engine lifts the throttle,
//! resumes the guest if it paused it, stops the tracker, sends an `Abort` record where the
//! connection still works, and returns the error: nothing is lost, the guest runs on here.
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
//!
//! # Reading guest RAM
//!
//! The guest writes its RAM while pages are read. Each page is copied once, and
//! everything that decides what is sent looks at the copy, never at guest RAM again, so a
//! page changing meanwhile can never make the encoded form disagree with itself. Without
//! an encoder a page goes straight from guest RAM into the batch buffer, where the zero
//! check and the CRC read it ([`PageBatchWriter::push_raw_from`]); with zstd or delta
//! encoding, one run of contiguous pages at a time is copied out with `vm-memory`'s
//! `VolatileSlice::copy_to` into a scratch buffer the engine owns, and encoded from there
//! (the delta cache keeps exactly the bytes sent). A page torn by a concurrent write is
//! dirty in the tracker and is sent again.

use std::io;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use migration_core::bitmap::DirtyBitmap;
use migration_core::dirty::{DirtyTracker, TrackerError};
use migration_core::geometry::{GuestRam, RamAccessError};
use migration_core::page::{EncodedPage, PageEncoder, PageError};
use migration_core::pagemap::populated_pages;
use migration_core::stats::{IterationStats, MigrationStats, PageCounts, Phase, ProgressEvent};
use migration_core::stream::{
    Ack, Config, DeviceState, Direction, IterationEnd, PageBatchWriter, Record, ReturnRecord,
    StreamHeader, Verdict,
};
use migration_core::transport::{Channel, Stream};
use migration_core::vm::{VmControl, VmError};
use vm_memory::GuestMemoryBackend;

use crate::cache::DeltaCache;
use crate::estimate::BandwidthEstimator;
use crate::link::{CancelToken, ReturnEvent, ReturnPath, Sender};
use crate::policy::{ConvergenceConfig, Decision, NotConverged, PeriodMeasure, Planner};

/// What the engine does when an iteration or time limit is reached before the migration
/// converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
            ..ConvergenceConfig::default()
        }
    }
}

/// Why a migration failed on the source. In every case the guest runs on the source
/// again, unless [`SourceError::ResumeFailed`] says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The iteration or time limit was reached first.
    #[error("{0}")]
    NotConverged(NotConverged),
    /// The destination reported a failure.
    #[error("the destination failed: {reason}")]
    DestinationFailed {
        /// The destination's reason.
        reason: String,
    },
    /// The connection broke or misbehaved.
    #[error("connection lost during {phase}: {detail}")]
    Connection {
        /// Phase the migration was in.
        phase: Phase,
        /// What happened.
        detail: String,
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
}

/// The connection and state handed back by [`LimitPolicy::HandOver`].
pub struct HandOver<T> {
    /// Why pre-copy stopped.
    pub not_converged: NotConverged,
    /// The tracker, still started.
    pub tracker: T,
    /// Pages dirty and not yet re-sent.
    pub dirty: DirtyBitmap,
    /// The migration stream, after the last `IterationEnd` record; rate limit kept.
    pub channel: Channel<Stream>,
    /// The return path's reader, still running.
    pub returns: ReturnPath,
    /// What pre-copy did so far.
    pub stats: MigrationStats,
    /// Throttle in force, in percent.
    pub throttle_pct: u8,
}

impl<T> std::fmt::Debug for HandOver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandOver")
            .field("not_converged", &self.not_converged)
            .field("dirty", &self.dirty.count())
            .finish_non_exhaustive()
    }
}

/// How a migration ended on the source, when it did not fail.
pub enum SourceOutcome<T> {
    /// The destination runs the guest. The source VM is still paused; the caller may now
    /// discard it.
    Completed(MigrationStats),
    /// A limit was reached under [`LimitPolicy::HandOver`].
    LimitReached(Box<HandOver<T>>),
}

impl<T> std::fmt::Debug for SourceOutcome<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceOutcome::Completed(s) => f.debug_tuple("Completed").field(s).finish(),
            SourceOutcome::LimitReached(h) => f.debug_tuple("LimitReached").field(h).finish(),
        }
    }
}

/// Migrates the guest whose RAM is `ram` and whose vCPUs and devices `vm` controls, over
/// `stream`. `tracker` must cover `ram`'s layout and not be started yet.
///
/// Blocks until the destination's verdict; `cancel` stops it from another thread;
/// `progress` sees phases, periodic progress, each finished pass and throttle changes.
pub fn migrate<M, V, T>(
    ram: &GuestRam<'_, M>,
    vm: &mut V,
    tracker: T,
    stream: Stream,
    opts: &SourceOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> Result<SourceOutcome<T>, SourceError>
where
    M: GuestMemoryBackend,
    V: VmControl + ?Sized,
    T: DirtyTracker,
{
    let start = Instant::now();
    progress(&ProgressEvent::Phase(Phase::Setup));
    let mut tracker = tracker;
    let setup = || -> Result<(Stream, Stream), io::Error> {
        stream.set_nodelay(true)?;
        let ret = stream.try_clone()?;
        let ctl = stream.try_clone()?;
        cancel.attach(&ctl)?;
        Ok((ret, ctl))
    };
    let (ret_stream, ctl) = match setup() {
        Ok(s) => s,
        Err(e) => {
            return Err(SourceError::Connection {
                phase: Phase::Setup,
                detail: e.to_string(),
            });
        }
    };
    let page_count = ram.layout().page_count() as u64;
    let returns = match ReturnPath::start(ret_stream, opts.vm_id, page_count) {
        Ok(r) => r,
        Err(e) => {
            let _ = ctl.shutdown(Shutdown::Both);
            cancel.detach();
            return Err(SourceError::Connection {
                phase: Phase::Setup,
                detail: format!("starting the return-path reader: {e}"),
            });
        }
    };
    let mut channel = Channel::new(stream);
    channel.set_rate_limit(opts.max_bandwidth);
    let page_size = ram.layout().page_size() as usize;
    let batch_pages = opts.batch_pages.clamp(1, 4096);
    let sender = match Sender::new(channel, batch_pages * (page_size + 16) + 4096) {
        Ok(s) => s,
        Err(e) => {
            let _ = ctl.shutdown(Shutdown::Both);
            cancel.detach();
            return Err(SourceError::Connection {
                phase: Phase::Setup,
                detail: format!("starting the writer thread: {e}"),
            });
        }
    };
    let mut eng = Engine {
        ram,
        vm,
        opts,
        cancel,
        progress,
        ctl,
        sender: Some(sender),
        returns: Some(returns),
        page_size,
        batch_pages,
        scratch: Vec::new(),
        pending: Vec::with_capacity(batch_pages),
        pending_pages: 0,
        encoder: None,
        cache: None,
        stats: MigrationStats::default(),
        phase: Phase::Setup,
        paused: false,
        throttle: 0,
        bw: BandwidthEstimator::new(Duration::from_secs(1)),
        last_progress: start,
        pass_counts: PageCounts::default(),
        pages_sent: 0,
        pages_remaining: 0,
        tracker_started: false,
        acked_iteration: None,
        ack_wait_expired: false,
    };
    if opts.zstd_level.is_some() || opts.delta_cache_bytes.is_some() {
        match PageEncoder::new(page_size, opts.zstd_level) {
            Ok(e) => {
                eng.encoder = Some(e);
                eng.scratch = vec![0u8; batch_pages * page_size];
            }
            Err(e) => return Err(eng.fail(e.into(), &mut tracker)),
        }
    }
    eng.cache = opts
        .delta_cache_bytes
        .map(|b| DeltaCache::new(b, page_size));
    match eng.run(&mut tracker) {
        Ok(Run::Completed) => {
            eng.stats.total_time = start.elapsed();
            eng.finish_ok();
            Ok(SourceOutcome::Completed(eng.stats.clone()))
        }
        Ok(Run::HandOver(nc, dirty)) => {
            let sender = eng.sender.take().expect("sender present until the end");
            let channel = match sender.into_channel() {
                Ok(c) => c,
                Err(e) => {
                    let err = eng.connection_error(e);
                    return Err(eng.fail(err, &mut tracker));
                }
            };
            eng.cancel.detach();
            eng.stats.total_time = start.elapsed();
            Ok(SourceOutcome::LimitReached(Box::new(HandOver {
                not_converged: nc,
                tracker,
                dirty,
                channel,
                returns: eng
                    .returns
                    .take()
                    .expect("return path present until the end"),
                stats: eng.stats.clone(),
                throttle_pct: eng.throttle,
            })))
        }
        Err(e) => Err(eng.fail(e, &mut tracker)),
    }
}

/// How long the source waits, guest running, for the destination to catch up before the
/// switchover.
const ACK_WAIT: Duration = Duration::from_secs(10);

enum Run {
    Completed,
    HandOver(NotConverged, DirtyBitmap),
}

struct Engine<'r, 'm, M: GuestMemoryBackend, V: VmControl + ?Sized> {
    ram: &'r GuestRam<'m, M>,
    vm: &'r mut V,
    opts: &'r SourceOptions,
    cancel: &'r CancelToken,
    progress: &'r mut dyn FnMut(&ProgressEvent),
    /// A clone of the connection, to shut it down.
    ctl: Stream,
    sender: Option<Sender>,
    returns: Option<ReturnPath>,
    page_size: usize,
    batch_pages: usize,
    /// Private copies of the pages of the batch being built, for the encoder (empty
    /// without one).
    scratch: Vec<u8>,
    /// Page runs of the batch being built.
    pending: Vec<std::ops::Range<usize>>,
    pending_pages: usize,
    encoder: Option<PageEncoder>,
    cache: Option<DeltaCache>,
    stats: MigrationStats,
    phase: Phase,
    paused: bool,
    throttle: u8,
    bw: BandwidthEstimator,
    last_progress: Instant,
    pass_counts: PageCounts,
    pages_sent: u64,
    pages_remaining: u64,
    tracker_started: bool,
    /// Highest pass the destination said it has applied.
    acked_iteration: Option<u64>,
    /// A wait for an acknowledgement ran out once: do not wait again (a destination that
    /// does not acknowledge must not keep the migration from ending).
    ack_wait_expired: bool,
}

impl<M: GuestMemoryBackend, V: VmControl + ?Sized> Engine<'_, '_, M, V> {
    fn sender(&mut self) -> &mut Sender {
        self.sender.as_mut().expect("sender present until the end")
    }

    fn set_phase(&mut self, p: Phase) {
        tracing::debug!(phase = %p, "source phase");
        self.phase = p;
        (self.progress)(&ProgressEvent::Phase(p));
    }

    fn check_cancel(&self) -> Result<(), SourceError> {
        if self.cancel.is_cancelled() {
            return Err(SourceError::Cancelled { phase: self.phase });
        }
        Ok(())
    }

    /// Looks at what the destination said so far, without waiting.
    fn poll_returns(&mut self) -> Result<(), SourceError> {
        while let Some(ev) = self.returns.as_mut().and_then(ReturnPath::try_next) {
            self.on_return(ev, false)?;
        }
        Ok(())
    }

    /// Handles one return-path event; `Ok(true)` for a `Running` verdict (only legal
    /// when `complete` is set, i.e. after `Complete` was sent).
    fn on_return(&mut self, ev: ReturnEvent, complete: bool) -> Result<bool, SourceError> {
        match ev {
            ReturnEvent::Record(ReturnRecord::Ack(Ack::Iteration(n))) => {
                self.acked_iteration = Some(self.acked_iteration.map_or(n, |a| a.max(n)));
                Ok(false)
            }
            ReturnEvent::Record(ReturnRecord::Ack(a)) => {
                tracing::trace!(?a, "ack");
                Ok(false)
            }
            ReturnEvent::Record(ReturnRecord::Verdict(Verdict::Running)) if complete => Ok(true),
            ReturnEvent::Record(ReturnRecord::Verdict(Verdict::Running)) => {
                Err(SourceError::Connection {
                    phase: self.phase,
                    detail: "the destination claims to run the guest before the stream ended"
                        .into(),
                })
            }
            ReturnEvent::Record(ReturnRecord::Verdict(Verdict::Failed { reason })) => {
                Err(SourceError::DestinationFailed { reason })
            }
            ReturnEvent::Record(other) => Err(SourceError::Connection {
                phase: self.phase,
                detail: format!(
                    "unexpected {} record on the return path of a pre-copy migration",
                    other.record_type()
                ),
            }),
            ReturnEvent::Closed(why) => Err(SourceError::Connection {
                phase: self.phase,
                detail: why.unwrap_or_else(|| {
                    "the destination closed the return path without a verdict".into()
                }),
            }),
        }
    }

    /// Waits, with the guest running, until the destination acknowledges pass `pass`.
    fn wait_for_ack(&mut self, pass: u64) -> Result<(), SourceError> {
        let deadline = Instant::now() + ACK_WAIT;
        while self.acked_iteration.is_none_or(|a| a < pass) {
            self.check_cancel()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    pass,
                    "no acknowledgement from the destination; switching over anyway"
                );
                self.ack_wait_expired = true;
                return Ok(());
            }
            let ev = match self.returns.as_mut() {
                Some(r) => r.next(Some(left.min(Duration::from_millis(50)))),
                None => None,
            };
            if let Some(ev) = ev {
                self.on_return(ev, false)?;
            }
        }
        tracing::debug!(pass, "destination caught up");
        Ok(())
    }

    /// Turns a write error into the most telling error: a cancel, the destination's own
    /// verdict if it sent one before closing, or the I/O error.
    fn connection_error(&mut self, e: io::Error) -> SourceError {
        if self.cancel.is_cancelled() {
            return SourceError::Cancelled { phase: self.phase };
        }
        if let Some(r) = self.returns.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while let Some(ev) = r.next(Some(deadline.saturating_duration_since(Instant::now()))) {
                if let ReturnEvent::Record(ReturnRecord::Verdict(Verdict::Failed { reason })) = ev {
                    return SourceError::DestinationFailed { reason };
                }
                if matches!(ev, ReturnEvent::Closed(_)) {
                    break;
                }
            }
        }
        SourceError::Connection {
            phase: self.phase,
            detail: e.to_string(),
        }
    }

    fn send_buf(&mut self, buf: BytesMut) -> Result<(), SourceError> {
        match self.sender().send(buf) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.connection_error(e)),
        }
    }

    fn send_record(&mut self, r: &Record) -> Result<(), SourceError> {
        let mut buf = match self.sender().buffer() {
            Ok(b) => b,
            Err(e) => return Err(self.connection_error(e)),
        };
        r.encode(&mut buf);
        self.send_buf(buf)
    }

    fn flush(&mut self) -> Result<(), SourceError> {
        match self.sender().flush() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.connection_error(e)),
        }
    }

    fn bytes_sent(&self) -> u64 {
        self.sender.as_ref().map_or(0, Sender::bytes_sent)
    }

    fn sample_bandwidth(&mut self) {
        if let Some(snd) = self.sender.as_ref() {
            // Sampled against the writer's busy time: see `Sender::busy`.
            self.bw.sample(snd.busy(), snd.bytes_sent());
        }
    }

    fn maybe_progress(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_progress) < self.opts.progress_interval {
            return;
        }
        self.last_progress = now;
        let ev = ProgressEvent::Progress {
            bytes_on_wire: self.bytes_sent(),
            pages_sent: self.pages_sent,
            pages_remaining: self.pages_remaining,
            pages_total: self.ram.layout().page_count() as u64,
            bandwidth_bps: self.bw.bytes_per_sec().unwrap_or(0.0),
            dirty_rate_bps: self
                .stats
                .iterations
                .last()
                .map_or(0.0, |i| i.dirty_rate_bps),
        };
        (self.progress)(&ev);
    }

    fn run<T: DirtyTracker>(&mut self, tracker: &mut T) -> Result<Run, SourceError> {
        // Setup: header and config.
        let mut buf = match self.sender().buffer() {
            Ok(b) => b,
            Err(e) => return Err(self.connection_error(e)),
        };
        StreamHeader::new(self.opts.vm_id).encode(Direction::Migration, &mut buf);
        Record::Config(Config::from_layout(
            self.ram.layout(),
            self.opts.vmm_blob.clone(),
        ))
        .encode(&mut buf);
        self.send_buf(buf)?;
        self.check_cancel()?;

        // The tracker starts before the first page is read.
        tracker.start()?;
        self.tracker_started = true;

        // Bulk copy.
        self.set_phase(Phase::BulkCopy);
        self.check_cancel()?;
        let pass_start = Instant::now();
        let bytes_before = self.bytes_sent();
        let total = self.ram.layout().page_count();
        self.pages_remaining = total as u64;
        // Pages the kernel has never backed with data read as zeros: send them as zero
        // pages without reading them (reading costs a zero-page fault each). The tracker
        // runs already, so a page the guest writes after this scan is sent again anyway.
        match populated_pages(self.ram.memory(), self.ram.layout()) {
            Ok(populated) => {
                let mut pos = 0;
                for run in populated.iter_runs() {
                    self.send_zero_pages(pos..run.start)?;
                    self.send_pages_in(run.clone(), 0)?;
                    pos = run.end;
                }
                self.send_zero_pages(pos..total)?;
            }
            Err(e) => {
                tracing::debug!(%e, "reading every page of the bulk pass");
                self.send_pages_in(0..total, 0)?;
            }
        }
        self.drain()?;
        let mut dirty = self.ram.layout().new_bitmap();
        let mut last_sync = Instant::now();
        tracker.sync_and_clear(&mut dirty)?;
        let iter_start = Instant::now();
        let mut period = last_sync.duration_since(pass_start);
        let mut pass_bytes = self.end_pass(0, pass_start, bytes_before, dirty.count() as u64)?;

        // Iterations.
        self.set_phase(Phase::Iterating);
        let mut planner = Planner::new(self.opts.convergence());
        let mut iteration: u32 = 0;
        loop {
            self.check_cancel()?;
            self.poll_returns()?;
            let dirty_pages = dirty.count() as u64;
            let last = self.stats.iterations.last();
            let wire_bytes_per_page = last
                .filter(|l| l.iteration > 0 && l.pages.total() > 0)
                .map(|l| l.bytes_on_wire as f64 / l.pages.total() as f64);
            let m = PeriodMeasure {
                dirty_pages,
                page_size: self.page_size as u64,
                wire_bytes_per_page,
                bytes_sent: pass_bytes,
                period,
                bandwidth_bps: self.bw.bytes_per_sec().unwrap_or(0.0),
                device_state_bytes: self.opts.device_state_estimate,
                elapsed: iter_start.elapsed(),
                iterations: iteration,
            };
            if let Some(last) = self.stats.iterations.last_mut() {
                last.dirty_rate_bps = m.dirty_rate_bps();
                last.expected_downtime = m.expected_downtime();
            }
            let decision = planner.decide(&m);
            tracing::debug!(?decision, dirty_pages, "planner");
            match decision {
                Decision::StopAndCopy => {
                    let last_pass = self
                        .stats
                        .iterations
                        .last()
                        .map_or(0, |l| l.iteration as u64);
                    if self.ack_wait_expired || self.acked_iteration.is_some_and(|a| a >= last_pass)
                    {
                        self.stats.expected_downtime = m.expected_downtime();
                        break;
                    }
                    // The destination is still applying what the kernel's socket buffers
                    // hold (it may have been building its VM): pausing now would add that
                    // backlog to the downtime. Wait with the guest running, then take in
                    // what it dirtied meanwhile and decide again.
                    self.wait_for_ack(last_pass)?;
                    let now = Instant::now();
                    tracker.sync_and_clear(&mut dirty)?;
                    period = now.duration_since(last_sync);
                    last_sync = now;
                    continue;
                }
                Decision::LimitReached(nc) => match self.opts.limit_policy {
                    LimitPolicy::Fail => return Err(SourceError::NotConverged(nc)),
                    LimitPolicy::HandOver => {
                        self.flush()?;
                        return Ok(Run::HandOver(nc, dirty));
                    }
                },
                Decision::Throttle(p) => {
                    self.vm.set_throttle(p)?;
                    self.throttle = p;
                    self.stats.max_throttle_pct = self.stats.max_throttle_pct.max(p);
                    (self.progress)(&ProgressEvent::Throttle { percent: p });
                }
                Decision::Iterate => {}
            }
            iteration += 1;
            let pass_start = Instant::now();
            let bytes_before = self.bytes_sent();
            self.send_dirty(&mut dirty, iteration)?;
            // The pass ends when the link has taken its bytes, not when they were queued:
            // otherwise the period, the dirty rate and the bandwidth would be those of the
            // encoder, and the stop decision would leave a full queue for the downtime.
            self.drain()?;
            let now = Instant::now();
            tracker.sync_and_clear(&mut dirty)?;
            period = now.duration_since(last_sync);
            last_sync = now;
            pass_bytes =
                self.end_pass(iteration, pass_start, bytes_before, dirty.count() as u64)?;
        }

        // Stop and copy. Marked paused before asking, so that a pause that fails halfway
        // is undone by a resume.
        self.paused = true;
        self.vm.pause()?;
        let pause_at = Instant::now();
        self.set_phase(Phase::StopAndCopy);
        self.check_cancel()?;
        if self.throttle != 0 {
            // The guest is paused: the throttle has nothing left to do, and the destination
            // must not inherit it.
            self.vm.set_throttle(0)?;
        }
        tracker.sync_and_clear(&mut dirty)?;
        tracing::debug!(since_pause = ?pause_at.elapsed(), pages = dirty.count(), "final sync");
        iteration += 1;
        let pass_start = Instant::now();
        let bytes_before = self.bytes_sent();
        self.send_dirty(&mut dirty, iteration)?;
        tracing::debug!(since_pause = ?pause_at.elapsed(), "last pages queued");
        let states = self.vm.save_device_state()?;
        tracing::debug!(since_pause = ?pause_at.elapsed(), "device state saved");
        let state_bytes: u64 = states.iter().map(|s| s.data.len() as u64).sum();
        self.stats.device_state_bytes = state_bytes;
        for s in states {
            self.send_record(&Record::DeviceState(DeviceState {
                id: s.id,
                version: s.version,
                data: s.data,
            }))?;
        }
        // The tracker is stopped after the commit, not here: with the guest paused it
        // records nothing, and stopping it (un-write-protecting all of RAM, or turning the
        // dirty log off) takes milliseconds that would only lengthen the downtime.
        self.end_pass(iteration, pass_start, bytes_before, 0)?;
        self.send_record(&Record::EndOfData)?;
        self.flush()?;
        tracing::debug!(since_pause = ?pause_at.elapsed(), "end of data sent");
        self.stats.bytes_on_wire = self.bytes_sent();

        // Awaiting the verdict, paused.
        self.set_phase(Phase::AwaitingVerdict);
        let deadline = self.opts.verdict_timeout.map(|t| Instant::now() + t);
        loop {
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let cancelled = self.cancel.is_cancelled();
            let ev = match self.returns.as_mut() {
                Some(r) => r.next(if cancelled {
                    Some(Duration::from_millis(500))
                } else {
                    wait.map(|w| w.min(Duration::from_millis(50)))
                        .or(Some(Duration::from_millis(50)))
                }),
                None => None,
            };
            match ev {
                Some(ev) => {
                    // A verdict already received wins over a late cancel.
                    match self.on_return(ev, true) {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(e) if cancelled => {
                            tracing::debug!(%e, "return path after cancel");
                            return Err(SourceError::Cancelled { phase: self.phase });
                        }
                        Err(e) => return Err(e),
                    }
                }
                None if cancelled => return Err(SourceError::Cancelled { phase: self.phase }),
                None => {
                    if let (Some(d), Some(t)) = (deadline, self.opts.verdict_timeout) {
                        if Instant::now() >= d {
                            return Err(SourceError::VerdictTimeout(t));
                        }
                    }
                }
            }
        }
        // Commit. If `Complete` cannot be written whole, the destination cannot have read
        // it and will not run the guest: the error path resumes it here.
        self.send_record(&Record::Complete)?;
        self.flush()?;
        self.stats.downtime = pause_at.elapsed();
        tracing::debug!(since_pause = ?self.stats.downtime, "verdict: running; committed");
        self.tracker_started = false;
        if let Err(e) = tracker.stop() {
            // The guest runs on the destination now; this copy is never resumed.
            tracing::warn!(error = %e, "stopping the dirty tracker after the hand-over");
        }
        self.set_phase(Phase::Completed);
        Ok(Run::Completed)
    }

    /// Ends a pass: statistics, the `IterationEnd` record, the event. Returns the bytes
    /// the pass sent.
    fn end_pass(
        &mut self,
        iteration: u32,
        started: Instant,
        bytes_before: u64,
        dirty_after: u64,
    ) -> Result<u64, SourceError> {
        self.drain()?;
        let bytes = self.bytes_sent() - bytes_before;
        let duration = started.elapsed();
        let it = IterationStats {
            iteration,
            pages: std::mem::take(&mut self.pass_counts),
            bytes_on_wire: bytes,
            duration,
            dirty_pages_after: dirty_after,
            dirty_rate_bps: if duration.is_zero() {
                0.0
            } else {
                (dirty_after * self.page_size as u64) as f64 / duration.as_secs_f64()
            },
            bandwidth_bps: self.bw.bytes_per_sec().unwrap_or(0.0),
            expected_downtime: Duration::ZERO,
            throttle_pct: self.throttle,
        };
        self.send_record(&Record::IterationEnd(IterationEnd::from_stats(&it)))?;
        (self.progress)(&ProgressEvent::IterationDone(it.clone()));
        self.stats.record_iteration(it);
        self.pages_remaining = dirty_after;
        Ok(bytes)
    }

    /// Sends the pending batch and waits until the kernel took everything queued.
    fn drain(&mut self) -> Result<(), SourceError> {
        self.flush_batch()?;
        self.flush()?;
        self.sample_bandwidth();
        Ok(())
    }

    fn send_dirty(&mut self, dirty: &mut DirtyBitmap, pass: u32) -> Result<(), SourceError> {
        self.pages_remaining = dirty.count() as u64;
        // Runs are collected first: the bitmap is cleared as it is sent, so a page the
        // guest dirties again meanwhile is found by the next sync, not lost.
        let mut start = 0;
        while let Some(s) = dirty.next_set(start) {
            let e = dirty.next_clear(s).min(dirty.len());
            self.send_pages_in(s..e, pass)?;
            start = e;
        }
        dirty.clear_all();
        Ok(())
    }

    /// Queues the pages of `run` into batches, sending each batch when full.
    fn send_pages_in(&mut self, run: std::ops::Range<usize>, pass: u32) -> Result<(), SourceError> {
        let mut pos = run.start;
        while pos < run.end {
            let room = self.batch_pages - self.pending_pages;
            let end = run.end.min(pos + room);
            // Keep each piece within one RAM region: one volatile copy per piece.
            for (_, piece) in self.ram.layout().split_at_regions(pos..end) {
                self.pending_pages += piece.len();
                self.pending.push(piece);
            }
            pos = end;
            if self.pending_pages >= self.batch_pages {
                self.flush_batch_pass(pass)?;
            }
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), SourceError> {
        self.flush_batch_pass(u32::MAX)
    }

    /// Sends the pages of `run`, known to be zero without looking, as zero-page records.
    fn send_zero_pages(&mut self, run: std::ops::Range<usize>) -> Result<(), SourceError> {
        // 9 bytes an entry: a batch of 16 Ki zero pages is 147 KiB on the wire.
        const ZERO_BATCH: usize = 16 << 10;
        let mut pos = run.start;
        while pos < run.end {
            self.check_cancel()?;
            self.poll_returns()?;
            let end = run.end.min(pos + ZERO_BATCH);
            let mut buf = match self.sender().buffer() {
                Ok(b) => b,
                Err(e) => return Err(self.connection_error(e)),
            };
            let mut w = PageBatchWriter::new(&mut buf, self.page_size as u32);
            for idx in pos..end {
                w.push_zero(idx as u64);
            }
            w.finish();
            let n = (end - pos) as u64;
            self.pass_counts.zero += n;
            self.pages_sent += n;
            self.pages_remaining = self.pages_remaining.saturating_sub(n);
            self.send_buf(buf)?;
            self.sample_bandwidth();
            self.maybe_progress();
            pos = end;
        }
        Ok(())
    }

    /// Copies the pending pages out of guest RAM, encodes them as one page-batch record
    /// and hands it to the writer thread.
    fn flush_batch_pass(&mut self, pass: u32) -> Result<(), SourceError> {
        if self.pending_pages == 0 {
            return Ok(());
        }
        self.check_cancel()?;
        self.poll_returns()?;
        let ps = self.page_size;
        let mut buf = match self.sender().buffer() {
            Ok(b) => b,
            Err(e) => return Err(self.connection_error(e)),
        };
        let mut counts = PageCounts::default();
        if let Some(enc) = self.encoder.as_mut() {
            let mut off = 0;
            for piece in &self.pending {
                let n = piece.len();
                let slice = self.ram.pages_slice(piece.start, n)?;
                // Volatile copy: the guest may be writing these pages right now.
                slice.copy_to(&mut self.scratch[off..off + n * ps]);
                off += n * ps;
            }
            // A consistent copy to encode from: the encoders and the delta cache must see
            // the bytes that are sent.
            let mut w = PageBatchWriter::new(&mut buf, ps as u32);
            let mut off = 0;
            // Deltas only once a page is re-sent: the bulk pass would only thrash the cache.
            let use_cache = pass != 0 && pass != u32::MAX;
            for piece in &self.pending {
                for idx in piece.clone() {
                    let page = &self.scratch[off..off + ps];
                    off += ps;
                    let index = idx as u64;
                    let prev = match (&mut self.cache, use_cache) {
                        (Some(c), true) => c.get(index),
                        _ => None,
                    };
                    let e = enc.encode(page, prev);
                    match e {
                        EncodedPage::Zero => counts.zero += 1,
                        EncodedPage::Raw(_) => counts.raw += 1,
                        EncodedPage::Zstd(_) => counts.zstd += 1,
                        EncodedPage::Delta(_) => counts.delta += 1,
                    }
                    let zero = matches!(e, EncodedPage::Zero);
                    w.push(index, e);
                    if let (Some(c), true) = (&mut self.cache, use_cache) {
                        if zero {
                            c.remove(index);
                        } else {
                            c.insert(index, page);
                        }
                    }
                }
            }
            w.finish();
        } else {
            // Raw pages go from guest RAM straight into the batch: one copy, not two.
            let mut w = PageBatchWriter::new(&mut buf, ps as u32);
            for piece in &self.pending {
                // Checks that the piece lies in guest RAM (in one region, as split).
                let slice = self.ram.pages_slice(piece.start, piece.len())?;
                let base = slice.ptr_guard().as_ptr();
                for (i, idx) in piece.clone().enumerate() {
                    // SAFETY: the piece's `len()` pages lie in one mapping from `base`, which
                    // lives as long as `self.ram`; the guest may write them meanwhile, which
                    // `push_raw_from` allows for.
                    if unsafe { w.push_raw_from(idx as u64, base.add(i * ps)) } {
                        counts.zero += 1;
                    } else {
                        counts.raw += 1;
                    }
                }
            }
            w.finish();
        }
        let n = self.pending_pages as u64;
        self.pending.clear();
        self.pending_pages = 0;
        self.pass_counts.add(&counts);
        self.pages_sent += n;
        self.pages_remaining = self.pages_remaining.saturating_sub(n);
        self.send_buf(buf)?;
        self.sample_bandwidth();
        self.maybe_progress();
        Ok(())
    }

    fn finish_ok(&mut self) {
        // The destination runs the guest; close our side.
        if let Some(s) = self.sender.take() {
            let _ = s.into_channel();
        }
        let _ = self.ctl.shutdown(Shutdown::Both);
        self.returns = None;
        self.cancel.detach();
    }

    /// Cleans up after `err`: the guest runs again on the source with nothing lost.
    fn fail<T: DirtyTracker>(&mut self, err: SourceError, tracker: &mut T) -> SourceError {
        tracing::warn!(error = %err, phase = %self.phase, "migration failed; resuming the guest on the source");
        // Tell the destination, where the connection still works and no verdict was given.
        if !matches!(
            err,
            SourceError::DestinationFailed { .. } | SourceError::Connection { .. }
        ) && !self.cancel.is_cancelled()
        {
            if let Some(s) = self.sender.as_mut() {
                // A destination that stopped reading must not hang us: give the abort a
                // few seconds, then break the connection.
                let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
                if let Ok(c) = self.ctl.try_clone() {
                    std::thread::spawn(move || {
                        if done_rx.recv_timeout(Duration::from_secs(5))
                            == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                        {
                            let _ = c.shutdown(Shutdown::Both);
                        }
                    });
                }
                let _done = done_tx;
                let reason = err.to_string();
                if let Ok(mut buf) = s.buffer() {
                    Record::Abort { reason }.encode(&mut buf);
                    if s.send(buf).is_ok() {
                        let _ = s.flush();
                    }
                }
            }
        }
        let _ = self.ctl.shutdown(Shutdown::Both);
        self.sender = None;
        self.returns = None;
        self.cancel.detach();
        if self.tracker_started {
            if let Err(e) = tracker.stop() {
                tracing::warn!(%e, "stopping the dirty tracker");
            }
        }
        let mut resume_err = None;
        if self.throttle != 0 {
            if let Err(e) = self.vm.set_throttle(0) {
                resume_err = Some(e);
            }
            self.throttle = 0;
        }
        if self.paused {
            match self.vm.resume() {
                Ok(()) => self.paused = false,
                Err(e) => resume_err = Some(e),
            }
        }
        let phase = if matches!(err, SourceError::Cancelled { .. }) {
            Phase::Cancelled
        } else {
            Phase::Failed
        };
        self.set_phase(phase);
        match resume_err {
            Some(resume) => SourceError::ResumeFailed {
                error: Box::new(err),
                resume,
            },
            None => err,
        }
    }
}
