//! The source's protocol as a state machine without I/O.
//!
//! The driver asks [`SourceMachine::poll`] what to do, does it, and reports what happened
//! with [`SourceMachine::handle`]; time is passed in with every call and never read inside.
//! Actions that have a result ([`SourceAction::StartTracker`], [`SourceAction::Flush`],
//! [`SourceAction::Pause`], ...) must be answered with their event before the next `poll`;
//! return-path records, the end of the return path and a cancel may be reported at any
//! time. See [`crate::source`] for the order of events.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use migration_core::bitmap::DirtyBitmap;
use migration_core::dirty::TrackerError;
use migration_core::geometry::GuestRam;
use migration_core::layout::RamLayout;
use migration_core::stats::{IterationStats, MigrationStats, PageCounts, Phase, ProgressEvent};
use migration_core::stream::{
    Ack, Config, DeviceState, Direction, IterationEnd, Record, ReturnRecord, StreamHeader, Verdict,
};
use migration_core::vm::VmError;
use vm_memory::GuestMemoryBackend;

use super::{LimitPolicy, ReturnPathError, ReturnViolation, SourceError, SourceOptions};
use crate::batcher::{PageBatcher, PassKind, ZERO_RUN_PAGES};
use crate::estimate::BandwidthEstimator;
use crate::policy::{Decision, NotConverged, PeriodMeasure, Planner};

/// How long the source waits, guest running, for the destination to catch up before the
/// switchover.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// How long an `Abort` record may take to leave before the connection is broken off: a
/// destination that stopped reading must not hang the source.
const ABORT_WAIT: Duration = Duration::from_secs(5);
/// After a failed write, how long to look on the return path for the destination's own
/// reason (a `Failed` verdict sent just before it closed).
const EXPLAIN_WAIT: Duration = Duration::from_secs(2);

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceAction {
    /// Call [`SourceMachine::write_next`] with an empty send buffer and queue what it wrote
    /// for sending; then report the link with [`SourceMachine::handle_link`].
    Transmit,
    /// Wait until everything queued was written to the connection, then report
    /// [`SourceEvent::Flushed`], or [`SourceEvent::SendFailed`]. With a deadline, break the
    /// connection off when the peer takes longer.
    Flush {
        /// Latest instant to give the peer.
        deadline: Option<Instant>,
    },
    /// Start the dirty tracker; report [`SourceEvent::TrackerStarted`].
    StartTracker,
    /// Sync the tracker into [`SourceMachine::dirty_mut`]; report
    /// [`SourceEvent::TrackerSynced`].
    SyncTracker,
    /// Stop the tracker; report [`SourceEvent::TrackerStopped`].
    StopTracker,
    /// Find which pages of guest RAM the kernel ever backed with data
    /// (`migration_core::pagemap::populated_pages`); report [`SourceEvent::Populated`].
    ScanPopulated,
    /// Pause the vCPUs; report [`SourceEvent::Paused`].
    Pause,
    /// Resume the vCPUs; report [`SourceEvent::Resumed`].
    Resume,
    /// Throttle the vCPUs to this percentage (0 lifts it); report
    /// [`SourceEvent::Throttled`].
    SetThrottle(u8),
    /// Save the device state; report [`SourceEvent::DeviceState`].
    SaveDeviceState,
    /// Wait for a return-path record or its end, at most until `until`, then poll again.
    Wait {
        /// When to poll again at the latest (`None`: only on an event).
        until: Option<Instant>,
    },
    /// Shut the connection down in both directions. No event follows.
    Close,
    /// The migration ended: take the result with [`SourceMachine::take_result`].
    Done,
}

/// What happened, for [`SourceMachine::handle`].
#[derive(Debug)]
#[non_exhaustive]
pub enum SourceEvent {
    /// Everything queued was written.
    Flushed,
    /// Writing the stream failed (a flush, or queueing a buffer).
    SendFailed(io::Error),
    /// The tracker was started, or not.
    TrackerStarted(Result<(), TrackerError>),
    /// The tracker synced into [`SourceMachine::dirty_mut`], or failed.
    TrackerSynced(Result<(), TrackerError>),
    /// The tracker was stopped, or not.
    TrackerStopped(Result<(), TrackerError>),
    /// The pages that hold data (`None`: unknown, so every page is read).
    Populated(Option<DirtyBitmap>),
    /// The vCPUs were paused, or not.
    Paused(Result<(), VmError>),
    /// The vCPUs were resumed, or not.
    Resumed(Result<(), VmError>),
    /// The throttle was set, or not.
    Throttled(Result<(), VmError>),
    /// The saved device state.
    DeviceState(Result<Vec<DeviceState>, VmError>),
    /// A record from the destination.
    Return(ReturnRecord),
    /// The return path ended: `None` after a verdict, else why.
    ReturnClosed(Option<ReturnPathError>),
    /// The user cancelled.
    Cancel,
    /// The operator asks to switch to post-copy now (QEMU's `migrate_start_postcopy`):
    /// pre-copy hands over at its next decision, as at a limit with
    /// [`LimitPolicy::HandOver`], whatever the policy.
    HandOver,
}

/// How a migration ended on the source, as the machine sees it.
#[derive(Debug)]
#[non_exhaustive]
pub enum SourceResult {
    /// The destination runs the guest; this side committed and never resumes it.
    Completed(MigrationStats),
    /// A limit was reached under [`LimitPolicy::HandOver`]: the guest runs here (throttled
    /// as it was), the tracker is started, the connection is open after the last
    /// `IterationEnd`, and `dirty` holds the pages still to send.
    HandOver {
        /// Why pre-copy stopped.
        not_converged: NotConverged,
        /// Pages dirty and not yet re-sent.
        dirty: DirtyBitmap,
        /// What pre-copy did so far.
        stats: MigrationStats,
        /// The throttle in force, in percent.
        throttle_pct: u8,
    },
    /// The migration failed; the guest runs here again unless the error is
    /// [`SourceError::ResumeFailed`].
    Failed(SourceError),
}

/// Where the bulk pass stands: pages the kernel never backed are sent as zero runs
/// without being read, the rest is read.
#[derive(Debug)]
struct BulkCursor {
    populated: Option<DirtyBitmap>,
    pos: usize,
}

/// What follows a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterFlush {
    /// The pass's bytes are on the wire: sync and end the pass.
    EndPass,
    /// The final pass and the device state are on the wire.
    EndFinalPass,
    /// `EndOfData` is on the wire.
    AwaitVerdict,
    /// `Complete` is on the wire: committed.
    Committed,
    /// Pre-copy hands over to the caller.
    HandOver,
}

/// What follows a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterSync {
    /// End the pass just sent, then decide.
    EndPass,
    /// Decide again (after waiting for an acknowledgement).
    Decide,
    /// The guest is paused: send what is left.
    FinalPass,
}

/// Steps of the failure path, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FailStep {
    SendAbort,
    FlushAbort,
    Close,
    StopTracker,
    LiftThrottle,
    Resume,
}

#[derive(Debug)]
enum State {
    /// Header and config queued; the tracker starts next.
    StartTracker,
    ScanPopulated,
    Bulk(BulkCursor),
    /// A pass over `dirty`, from page `pos`; `last` when the guest is paused.
    Pass {
        pos: usize,
        last: bool,
    },
    Flush(AfterFlush),
    Sync(AfterSync),
    Decide,
    Throttle(u8),
    AwaitAck {
        pass: u64,
        deadline: Instant,
    },
    Pause,
    Unthrottle,
    SaveDevices,
    AwaitVerdict {
        deadline: Option<Instant>,
    },
    StopTrackerAfterCommit,
    CloseAfterCommit,
    /// A write failed: look for the destination's reason before failing with `error`.
    Explain {
        error: io::Error,
        deadline: Instant,
    },
    Failing {
        error: SourceError,
        step: FailStep,
    },
    Done,
}

/// The pass being sent.
#[derive(Debug, Clone)]
struct Pass {
    iteration: u32,
    started: Instant,
    bytes_before: u64,
    counts: PageCounts,
}

/// The source of a pre-copy migration, without I/O. See the [module docs](crate::source).
#[derive(Debug)]
pub struct SourceMachine {
    opts: SourceOptions,
    layout: RamLayout,
    page_size: usize,
    batcher: PageBatcher,
    dirty: DirtyBitmap,
    state: State,
    /// Small records to send before anything else.
    control: VecDeque<Record>,
    events: VecDeque<ProgressEvent>,
    result: Option<SourceResult>,
    phase: Phase,
    stats: MigrationStats,
    planner: Planner,
    bw: BandwidthEstimator,
    bytes_sent: u64,
    started: Instant,
    last_progress: Instant,
    pass: Pass,
    /// When the sync before the current period ran.
    last_sync: Instant,
    /// From that sync to the one before it: the period the dirty pages accumulated in.
    period: Duration,
    /// Bytes the last full pass sent, for the planner.
    pass_bytes: u64,
    /// When iterating began (right after the bulk pass).
    iterating_since: Instant,
    pages_sent: u64,
    pages_remaining: u64,
    pause_at: Option<Instant>,
    paused: bool,
    throttle: u8,
    tracker_started: bool,
    cancelled: bool,
    /// Highest pass the destination said it applied.
    acked: Option<u64>,
    /// A wait for an acknowledgement ran out once: do not wait again (a destination that
    /// does not acknowledge must not keep the migration from ending).
    ack_wait_expired: bool,
    /// Set when the VMM could not lift the throttle on the failure path.
    throttle_error: Option<VmError>,
    /// Set when the VMM could not resume the guest on the failure path.
    resume_error: Option<VmError>,
    /// The stream header and config record are still to be written.
    setup_pending: bool,
    /// Why pre-copy hands over, while the last bytes are flushed.
    handover: Option<NotConverged>,
    /// The destination's `Running` arrived while `EndOfData` was still being flushed.
    running_verdict: bool,
    /// The operator asked to hand over.
    handover_requested: bool,
}

impl SourceMachine {
    /// A machine migrating RAM of `layout` with `opts`, starting at `now`.
    pub fn new(layout: RamLayout, opts: &SourceOptions, now: Instant) -> Result<Self, SourceError> {
        let page_size = layout.page_size() as usize;
        let batch_pages = opts.batch_pages.clamp(1, 4096);
        let batcher = PageBatcher::new(
            page_size,
            batch_pages,
            opts.zstd_level,
            opts.delta_cache_bytes,
        )?;
        let mut m = SourceMachine {
            dirty: layout.new_bitmap(),
            planner: Planner::new(opts.convergence()),
            opts: opts.clone(),
            page_size,
            batcher,
            state: State::StartTracker,
            control: VecDeque::new(),
            events: VecDeque::new(),
            result: None,
            phase: Phase::Setup,
            stats: MigrationStats::default(),
            bw: BandwidthEstimator::new(Duration::from_secs(1)),
            bytes_sent: 0,
            started: now,
            last_progress: now,
            pass: Pass {
                iteration: 0,
                started: now,
                bytes_before: 0,
                counts: PageCounts::default(),
            },
            last_sync: now,
            period: Duration::ZERO,
            pass_bytes: 0,
            iterating_since: now,
            pages_sent: 0,
            pages_remaining: layout.page_count() as u64,
            pause_at: None,
            paused: false,
            throttle: 0,
            tracker_started: false,
            cancelled: false,
            acked: None,
            ack_wait_expired: false,
            throttle_error: None,
            resume_error: None,
            setup_pending: true,
            handover: None,
            running_verdict: false,
            handover_requested: false,
            layout,
        };
        m.events.push_back(ProgressEvent::Phase(Phase::Setup));
        Ok(m)
    }

    /// Bytes a send buffer must be able to hold for one [`SourceAction::Transmit`].
    pub fn max_transmit_len(&self) -> usize {
        self.batcher.max_record_len()
    }

    /// The phase the migration is in, as reported.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The dirty bitmap a [`SourceAction::SyncTracker`] syncs into.
    pub fn dirty_mut(&mut self) -> &mut DirtyBitmap {
        &mut self.dirty
    }

    /// The next progress event, if any.
    pub fn poll_event(&mut self) -> Option<ProgressEvent> {
        self.events.pop_front()
    }

    /// The result, once [`SourceAction::Done`] was returned.
    pub fn take_result(&mut self) -> Option<SourceResult> {
        self.result.take()
    }

    /// What the driver does next.
    pub fn poll(&mut self, now: Instant) -> SourceAction {
        loop {
            if (self.setup_pending || !self.control.is_empty()) && self.may_send() {
                return SourceAction::Transmit;
            }
            match &mut self.state {
                State::StartTracker => return SourceAction::StartTracker,
                State::ScanPopulated => return SourceAction::ScanPopulated,
                State::Bulk(_) | State::Pass { .. } => return SourceAction::Transmit,
                State::Flush(_) => return SourceAction::Flush { deadline: None },
                State::Sync(_) => return SourceAction::SyncTracker,
                State::Decide => self.decide(now),
                State::Throttle(p) => return SourceAction::SetThrottle(*p),
                State::AwaitAck { pass, deadline } => {
                    let (pass, deadline) = (*pass, *deadline);
                    if self.acked.is_some_and(|a| a >= pass) {
                        tracing::debug!(pass, "destination caught up");
                        self.state = State::Sync(AfterSync::Decide);
                    } else if now >= deadline {
                        tracing::warn!(
                            pass,
                            "no acknowledgement from the destination; switching over anyway"
                        );
                        self.ack_wait_expired = true;
                        self.state = State::Sync(AfterSync::Decide);
                    } else {
                        return SourceAction::Wait {
                            until: Some(deadline),
                        };
                    }
                }
                State::Pause => return SourceAction::Pause,
                State::Unthrottle => return SourceAction::SetThrottle(0),
                State::SaveDevices => return SourceAction::SaveDeviceState,
                State::AwaitVerdict { deadline } => match *deadline {
                    Some(d) if now >= d => {
                        let t = self.opts.verdict_timeout.unwrap_or_default();
                        self.fail(SourceError::VerdictTimeout(t));
                    }
                    until => return SourceAction::Wait { until },
                },
                State::StopTrackerAfterCommit => return SourceAction::StopTracker,
                State::CloseAfterCommit => {
                    self.set_phase(Phase::Completed);
                    self.stats.total_time = now.saturating_duration_since(self.started);
                    self.result = Some(SourceResult::Completed(self.stats.clone()));
                    self.state = State::Done;
                    return SourceAction::Close;
                }
                State::Explain { deadline, .. } => {
                    if now >= *deadline {
                        self.explained(None);
                    } else {
                        return SourceAction::Wait {
                            until: Some(*deadline),
                        };
                    }
                }
                State::Failing { step, .. } => match *step {
                    FailStep::SendAbort => {
                        // The Abort record was queued with this step and is sent above;
                        // an empty queue means it is out.
                        self.set_fail_step(FailStep::FlushAbort);
                    }
                    FailStep::FlushAbort => {
                        return SourceAction::Flush {
                            deadline: Some(now + ABORT_WAIT),
                        };
                    }
                    FailStep::Close => {
                        self.set_fail_step(FailStep::StopTracker);
                        return SourceAction::Close;
                    }
                    FailStep::StopTracker if self.tracker_started => {
                        return SourceAction::StopTracker;
                    }
                    FailStep::StopTracker => self.set_fail_step(FailStep::LiftThrottle),
                    FailStep::LiftThrottle if self.throttle != 0 => {
                        return SourceAction::SetThrottle(0);
                    }
                    FailStep::LiftThrottle => self.set_fail_step(FailStep::Resume),
                    FailStep::Resume if self.paused => return SourceAction::Resume,
                    FailStep::Resume => self.finish_failure(),
                },
                State::Done => return SourceAction::Done,
            }
        }
    }

    /// Whether records may be written now: not once the connection is being closed.
    fn may_send(&self) -> bool {
        match &self.state {
            State::Failing { step, .. } => *step <= FailStep::FlushAbort,
            State::Done | State::CloseAfterCommit | State::StopTrackerAfterCommit => false,
            _ => true,
        }
    }

    /// Writes the next bytes to send into `buf` (for [`SourceAction::Transmit`]): the
    /// records queued, or one batch of pages read from `ram`, which must be the RAM of
    /// the layout the machine was made for.
    pub fn write_next<M: GuestMemoryBackend>(
        &mut self,
        ram: &GuestRam<'_, M>,
        buf: &mut BytesMut,
        now: Instant,
    ) {
        if self.setup_pending {
            self.setup_pending = false;
            StreamHeader::new(self.opts.vm_id).encode(Direction::Migration, buf);
            Record::Config(Config::from_layout(
                &self.layout,
                self.opts.vmm_blob.clone(),
            ))
            .encode(buf);
        }
        if !self.control.is_empty() {
            while let Some(r) = self.control.pop_front() {
                r.encode(buf);
            }
            return;
        }
        let r = match &mut self.state {
            State::Bulk(_) => self.write_bulk(ram, buf),
            State::Pass { .. } => self.write_pass(ram, buf),
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.fail(e);
        }
        self.maybe_progress(now);
    }

    fn write_bulk<M: GuestMemoryBackend>(
        &mut self,
        ram: &GuestRam<'_, M>,
        buf: &mut BytesMut,
    ) -> Result<(), SourceError> {
        let State::Bulk(cursor) = &mut self.state else {
            return Ok(());
        };
        let total = self.layout.page_count();
        while !self.batcher.is_full() && cursor.pos < total {
            let pos = cursor.pos;
            let (data_start, data_end) = match &cursor.populated {
                None => (pos, total),
                Some(p) => match p.next_set(pos) {
                    None => (total, total),
                    Some(s) => (s, p.next_clear(s).min(total)),
                },
            };
            if data_start > pos {
                // Pages the kernel never backed read as zeros: sent as zero pages
                // unread (reading costs a zero-page fault each). The tracker runs
                // already, so a page the guest writes after the scan is sent again.
                let end = data_start.min(pos + ZERO_RUN_PAGES);
                self.batcher.encode_zero_run(pos..end, buf);
                let n = (end - pos) as u64;
                cursor.pos = end;
                self.pass.counts.zero += n;
                self.pages_sent += n;
                self.pages_remaining = self.pages_remaining.saturating_sub(n);
                return Ok(());
            }
            let rest = self.batcher.queue(&self.layout, pos..data_end);
            cursor.pos = rest.start;
        }
        let done = cursor.pos >= total;
        if self.batcher.is_full() || done {
            self.encode_batch(ram, PassKind::Bulk, buf)?;
        }
        if done && self.batcher.pending_pages() == 0 {
            self.state = State::Flush(AfterFlush::EndPass);
        }
        Ok(())
    }

    fn write_pass<M: GuestMemoryBackend>(
        &mut self,
        ram: &GuestRam<'_, M>,
        buf: &mut BytesMut,
    ) -> Result<(), SourceError> {
        let State::Pass { pos, last } = &mut self.state else {
            return Ok(());
        };
        let last = *last;
        // Runs are read off the bitmap as they are sent and the bitmap is cleared at the
        // end of the pass: a page the guest dirties again meanwhile is found by the next
        // sync, not lost.
        while !self.batcher.is_full() {
            let Some(s) = self.dirty.next_set(*pos) else {
                *pos = self.dirty.len();
                break;
            };
            let e = self.dirty.next_clear(s).min(self.dirty.len());
            let rest = self.batcher.queue(&self.layout, s..e);
            *pos = rest.start;
        }
        let done = *pos >= self.dirty.len();
        self.encode_batch(ram, PassKind::Resend, buf)?;
        if done {
            self.dirty.clear_all();
            self.state = if last {
                State::SaveDevices
            } else {
                State::Flush(AfterFlush::EndPass)
            };
        }
        Ok(())
    }

    fn encode_batch<M: GuestMemoryBackend>(
        &mut self,
        ram: &GuestRam<'_, M>,
        kind: PassKind,
        buf: &mut BytesMut,
    ) -> Result<(), SourceError> {
        let n = self.batcher.pending_pages() as u64;
        let counts = self.batcher.encode(ram, kind, buf)?;
        self.pass.counts.add(&counts);
        self.pages_sent += n;
        self.pages_remaining = self.pages_remaining.saturating_sub(n);
        Ok(())
    }

    /// Reports the link after a transmit or a flush: `bytes_sent` the kernel accepted in
    /// all, `busy` the time spent writing (including rate-limit waits). Bandwidth is bytes
    /// over busy time, not wall time, which would measure how fast the encoder produced
    /// bytes whenever the link was not the bottleneck.
    pub fn handle_link(&mut self, bytes_sent: u64, busy: Duration) {
        self.bytes_sent = bytes_sent;
        self.bw.sample(busy, bytes_sent);
    }

    /// Reports what happened.
    pub fn handle(&mut self, event: SourceEvent, now: Instant) {
        if matches!(self.state, State::Done) {
            return;
        }
        match event {
            SourceEvent::Cancel => {
                if !self.cancelled {
                    self.cancelled = true;
                    if !self.is_failing() {
                        let phase = self.phase;
                        self.fail(SourceError::Cancelled { phase });
                    }
                }
            }
            SourceEvent::Return(r) => self.on_return(r),
            SourceEvent::HandOver => self.handover_requested = true,
            SourceEvent::ReturnClosed(why) => self.on_return_closed(why),
            SourceEvent::SendFailed(e) => self.on_send_failed(e, now),
            SourceEvent::Flushed => self.on_flushed(now),
            SourceEvent::TrackerStarted(r) => {
                if !matches!(self.state, State::StartTracker) {
                    return;
                }
                match r {
                    Ok(()) => {
                        self.tracker_started = true;
                        self.last_sync = now;
                        self.set_phase(Phase::BulkCopy);
                        self.begin_pass(0, now);
                        self.state = State::ScanPopulated;
                    }
                    Err(e) => self.fail(e.into()),
                }
            }
            SourceEvent::Populated(populated) => {
                if matches!(self.state, State::ScanPopulated) {
                    self.state = State::Bulk(BulkCursor { populated, pos: 0 });
                }
            }
            SourceEvent::TrackerSynced(r) => {
                let State::Sync(after) = self.state else {
                    return;
                };
                if let Err(e) = r {
                    self.fail(e.into());
                    return;
                }
                self.synced(after, now);
            }
            SourceEvent::TrackerStopped(r) => {
                if let Err(e) = r {
                    // Nothing to undo: after a commit the guest runs on the destination,
                    // after a failure it runs here either way.
                    tracing::warn!(error = %e, "stopping the dirty tracker");
                }
                match &self.state {
                    State::StopTrackerAfterCommit => self.state = State::CloseAfterCommit,
                    State::Failing {
                        step: FailStep::StopTracker,
                        ..
                    } => {
                        self.tracker_started = false;
                        self.set_fail_step(FailStep::LiftThrottle);
                    }
                    _ => {}
                }
            }
            SourceEvent::Throttled(r) => match (&self.state, r) {
                (State::Throttle(p), Ok(())) => {
                    let p = *p;
                    self.throttle = p;
                    self.stats.max_throttle_pct = self.stats.max_throttle_pct.max(p);
                    self.events
                        .push_back(ProgressEvent::Throttle { percent: p });
                    self.next_pass(now);
                }
                (State::Unthrottle, Ok(())) => {
                    self.throttle = 0;
                    self.state = State::Sync(AfterSync::FinalPass);
                }
                (State::Throttle(_) | State::Unthrottle, Err(e)) => self.fail(e.into()),
                (
                    State::Failing {
                        step: FailStep::LiftThrottle,
                        ..
                    },
                    r,
                ) => {
                    match r {
                        Ok(()) => self.throttle = 0,
                        Err(e) => self.throttle_error = Some(e),
                    }
                    self.set_fail_step(FailStep::Resume);
                }
                _ => {}
            },
            SourceEvent::Paused(r) => {
                if !matches!(self.state, State::Pause) {
                    return;
                }
                match r {
                    Ok(()) => {
                        self.pause_at = Some(now);
                        self.set_phase(Phase::StopAndCopy);
                        // The guest is paused: the throttle has nothing left to do, and the
                        // destination must not inherit it.
                        self.state = if self.throttle != 0 {
                            State::Unthrottle
                        } else {
                            State::Sync(AfterSync::FinalPass)
                        };
                    }
                    Err(e) => self.fail(e.into()),
                }
            }
            SourceEvent::DeviceState(r) => {
                if !matches!(self.state, State::SaveDevices) {
                    return;
                }
                match r {
                    Ok(states) => {
                        self.stats.device_state_bytes =
                            states.iter().map(|s| s.data.len() as u64).sum();
                        self.control
                            .extend(states.into_iter().map(Record::DeviceState));
                        // The tracker is stopped after the commit, not here: with the
                        // guest paused it records nothing, and stopping it
                        // (un-write-protecting all of RAM, or turning the dirty log off)
                        // takes milliseconds that would only lengthen the downtime.
                        self.state = State::Flush(AfterFlush::EndFinalPass);
                    }
                    Err(e) => self.fail(e.into()),
                }
            }
            SourceEvent::Resumed(r) => {
                if let State::Failing {
                    step: FailStep::Resume,
                    ..
                } = self.state
                {
                    match r {
                        Ok(()) => self.paused = false,
                        Err(e) => self.resume_error = Some(e),
                    }
                    self.finish_failure();
                }
            }
        }
    }

    fn is_failing(&self) -> bool {
        matches!(self.state, State::Failing { .. } | State::Done)
    }

    fn set_phase(&mut self, p: Phase) {
        tracing::debug!(phase = %p, "source phase");
        self.phase = p;
        self.events.push_back(ProgressEvent::Phase(p));
    }

    fn begin_pass(&mut self, iteration: u32, now: Instant) {
        self.pass = Pass {
            iteration,
            started: now,
            bytes_before: self.bytes_sent,
            counts: PageCounts::default(),
        };
    }

    fn next_pass(&mut self, now: Instant) {
        let it = self.pass.iteration + 1;
        self.begin_pass(it, now);
        self.pages_remaining = self.dirty.count() as u64;
        self.state = State::Pass {
            pos: 0,
            last: false,
        };
    }

    fn on_flushed(&mut self, now: Instant) {
        match self.state {
            State::Flush(AfterFlush::EndPass) => self.state = State::Sync(AfterSync::EndPass),
            State::Flush(AfterFlush::EndFinalPass) => {
                self.end_pass(0, now);
                self.control.push_back(Record::EndOfData);
                self.state = State::Flush(AfterFlush::AwaitVerdict);
            }
            State::Flush(AfterFlush::AwaitVerdict) => {
                self.stats.bytes_on_wire = self.bytes_sent;
                tracing::debug!(since_pause = ?self.since_pause(now), "end of data sent");
                self.set_phase(Phase::AwaitingVerdict);
                if self.running_verdict {
                    self.commit();
                } else {
                    self.state = State::AwaitVerdict {
                        deadline: self.opts.verdict_timeout.map(|t| now + t),
                    };
                }
            }
            State::Flush(AfterFlush::Committed) => {
                self.stats.downtime = self.since_pause(now);
                tracing::debug!(since_pause = ?self.stats.downtime, "verdict: running; committed");
                // From here on nothing resumes the guest on this side: it runs there.
                self.paused = false;
                self.tracker_started = false;
                self.state = State::StopTrackerAfterCommit;
            }
            State::Flush(AfterFlush::HandOver) => {
                let Some(not_converged) = self.handover.take() else {
                    return;
                };
                self.stats.total_time = now.saturating_duration_since(self.started);
                let dirty = std::mem::replace(&mut self.dirty, DirtyBitmap::new(0));
                self.result = Some(SourceResult::HandOver {
                    not_converged,
                    dirty,
                    stats: self.stats.clone(),
                    throttle_pct: self.throttle,
                });
                self.state = State::Done;
            }
            State::Failing {
                step: FailStep::FlushAbort,
                ..
            } => self.set_fail_step(FailStep::Close),
            _ => {}
        }
    }

    fn since_pause(&self, now: Instant) -> Duration {
        self.pause_at
            .map_or(Duration::ZERO, |p| now.saturating_duration_since(p))
    }

    fn synced(&mut self, after: AfterSync, now: Instant) {
        self.period = now.saturating_duration_since(self.last_sync);
        self.last_sync = now;
        match after {
            AfterSync::EndPass => {
                let first = self.pass.iteration == 0;
                let dirty = self.dirty.count() as u64;
                self.pass_bytes = self.end_pass(dirty, now);
                if first {
                    self.iterating_since = now;
                    self.set_phase(Phase::Iterating);
                }
                self.state = State::Decide;
            }
            AfterSync::Decide => self.state = State::Decide,
            AfterSync::FinalPass => {
                tracing::debug!(since_pause = ?self.since_pause(now), pages = self.dirty.count(), "final sync");
                let it = self.pass.iteration + 1;
                self.begin_pass(it, now);
                self.pages_remaining = self.dirty.count() as u64;
                self.state = State::Pass { pos: 0, last: true };
            }
        }
    }

    /// Ends the pass: statistics, the `IterationEnd` record, the event. Returns the bytes
    /// the pass sent.
    fn end_pass(&mut self, dirty_after: u64, now: Instant) -> u64 {
        let bytes = self.bytes_sent.saturating_sub(self.pass.bytes_before);
        let duration = now.saturating_duration_since(self.pass.started);
        let it = IterationStats {
            iteration: self.pass.iteration,
            pages: std::mem::take(&mut self.pass.counts),
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
        self.control
            .push_back(Record::IterationEnd(IterationEnd::from_stats(&it)));
        self.events
            .push_back(ProgressEvent::IterationDone(it.clone()));
        self.stats.record_iteration(it);
        self.pages_remaining = dirty_after;
        bytes
    }

    fn decide(&mut self, now: Instant) {
        let dirty_pages = self.dirty.count() as u64;
        let last = self.stats.iterations.last();
        let wire_bytes_per_page = last
            .filter(|l| l.iteration > 0 && l.pages.total() > 0)
            .map(|l| l.bytes_on_wire as f64 / l.pages.total() as f64);
        let m = PeriodMeasure {
            dirty_pages,
            page_size: self.page_size as u64,
            wire_bytes_per_page,
            bytes_sent: self.pass_bytes,
            period: self.period,
            bandwidth_bps: self.bw.bytes_per_sec().unwrap_or(0.0),
            device_state_bytes: self.opts.device_state_estimate,
            elapsed: now.saturating_duration_since(self.iterating_since),
            iterations: self.pass.iteration,
        };
        if let Some(last) = self.stats.iterations.last_mut() {
            last.dirty_rate_bps = m.dirty_rate_bps();
            last.expected_downtime = m.expected_downtime();
        }
        let decision = if self.handover_requested {
            Decision::LimitReached(NotConverged {
                limit: "a switch on command",
                iterations: m.iterations,
                elapsed: m.elapsed,
                dirty_rate_bps: m.dirty_rate_bps(),
                bandwidth_bps: m.bandwidth_bps,
                remaining_bytes: m.dirty_pages * m.page_size,
                expected_downtime: m.expected_downtime(),
                downtime_limit: self.opts.downtime_limit,
                throttle_pct: self.throttle,
            })
        } else {
            self.planner.decide(&m)
        };
        tracing::debug!(?decision, dirty_pages, "planner");
        match decision {
            Decision::StopAndCopy => {
                let last_pass = self
                    .stats
                    .iterations
                    .last()
                    .map_or(0, |l| u64::from(l.iteration));
                if self.ack_wait_expired || self.acked.is_some_and(|a| a >= last_pass) {
                    self.stats.expected_downtime = m.expected_downtime();
                    // Marked paused before asking, so that a pause that fails halfway is
                    // undone by a resume.
                    self.paused = true;
                    self.state = State::Pause;
                } else {
                    // The destination is still applying what the kernel's socket buffers
                    // hold (it may have been building its VM): pausing now would add that
                    // backlog to the downtime. Wait with the guest running, then take in
                    // what it dirtied meanwhile and decide again.
                    self.state = State::AwaitAck {
                        pass: last_pass,
                        deadline: now + ACK_WAIT,
                    };
                }
            }
            Decision::LimitReached(nc) => match self.opts.limit_policy {
                LimitPolicy::Fail if !self.handover_requested => {
                    self.fail(SourceError::NotConverged(nc))
                }
                _ => {
                    self.handover = Some(nc);
                    self.state = State::Flush(AfterFlush::HandOver);
                }
            },
            Decision::Throttle(p) => self.state = State::Throttle(p),
            Decision::Iterate => self.next_pass(now),
        }
    }

    fn on_return(&mut self, r: ReturnRecord) {
        match r {
            ReturnRecord::Ack(Ack::Iteration(n)) => {
                self.acked = Some(self.acked.map_or(n, |a| a.max(n)));
            }
            ReturnRecord::Ack(a) => tracing::trace!(?a, "ack"),
            ReturnRecord::Verdict(Verdict::Running) => match self.state {
                State::AwaitVerdict { .. } => self.commit(),
                // A quick destination answers `EndOfData` before the source saw its own
                // flush end.
                State::Flush(AfterFlush::AwaitVerdict) => self.running_verdict = true,
                _ if self.is_failing() => {}
                _ => {
                    let phase = self.phase;
                    self.fail(SourceError::Protocol {
                        phase,
                        violation: ReturnViolation::EarlyRunning,
                    });
                }
            },
            ReturnRecord::Verdict(Verdict::Failed { reason }) => {
                if matches!(self.state, State::Explain { .. }) {
                    self.explained(Some(reason));
                } else if !self.is_failing() {
                    self.fail(SourceError::DestinationFailed { reason });
                }
            }
            other => {
                if !self.is_failing() {
                    let phase = self.phase;
                    self.fail(SourceError::Protocol {
                        phase,
                        violation: ReturnViolation::Unexpected(other.record_type()),
                    });
                }
            }
        }
    }

    /// The destination runs the guest once it reads `Complete`. If `Complete` cannot be
    /// written whole, the destination cannot have read it and will not run the guest: the
    /// failure path resumes the guest here.
    fn commit(&mut self) {
        self.control.push_back(Record::Complete);
        self.state = State::Flush(AfterFlush::Committed);
    }

    fn on_return_closed(&mut self, why: Option<ReturnPathError>) {
        if matches!(self.state, State::Explain { .. }) {
            self.explained(None);
            return;
        }
        // `None`: the return path ended after its verdict, which was handled already.
        let Some(source) = why else {
            return;
        };
        if self.is_failing() || self.committed() {
            return;
        }
        let phase = self.phase;
        self.fail(SourceError::ReturnPath { phase, source });
    }

    /// Whether `Complete` went out: nothing may undo the hand-over any more.
    fn committed(&self) -> bool {
        matches!(
            self.state,
            State::StopTrackerAfterCommit | State::CloseAfterCommit
        )
    }

    fn on_send_failed(&mut self, error: io::Error, now: Instant) {
        match &self.state {
            State::Failing {
                step: FailStep::SendAbort | FailStep::FlushAbort,
                ..
            } => {
                tracing::debug!(%error, "sending the abort");
                self.set_fail_step(FailStep::Close);
            }
            State::Failing { .. } | State::Done | State::Explain { .. } => {}
            _ if self.cancelled => {
                let phase = self.phase;
                self.fail(SourceError::Cancelled { phase });
            }
            _ => {
                // The destination may have said why it closed: its verdict is the better
                // error than a broken pipe.
                self.state = State::Explain {
                    error,
                    deadline: now + EXPLAIN_WAIT,
                };
            }
        }
    }

    fn explained(&mut self, reason: Option<String>) {
        let State::Explain { .. } = self.state else {
            return;
        };
        let State::Explain { error, .. } = std::mem::replace(&mut self.state, State::Decide) else {
            unreachable!("checked above")
        };
        let phase = self.phase;
        let e = match reason {
            Some(reason) => SourceError::DestinationFailed { reason },
            None if self.cancelled => SourceError::Cancelled { phase },
            None => SourceError::Connection {
                phase,
                source: error,
            },
        };
        self.fail(e);
    }

    /// Enters the failure path with `error`: the guest runs here again with nothing lost.
    fn fail(&mut self, error: SourceError) {
        if self.is_failing() {
            return;
        }
        tracing::warn!(%error, phase = %self.phase, "migration failed; resuming the guest on the source");
        // Tell the destination, where the connection still works and it gave no verdict.
        let tell = !self.cancelled
            && !matches!(
                error,
                SourceError::DestinationFailed { .. }
                    | SourceError::Connection { .. }
                    | SourceError::ReturnPath { .. }
            );
        self.control.clear();
        // Before the header went out there is no stream to abort.
        let tell = tell && !self.setup_pending;
        self.setup_pending = false;
        let step = if tell {
            self.control.push_back(Record::Abort {
                reason: error.to_string(),
            });
            FailStep::SendAbort
        } else {
            FailStep::Close
        };
        self.state = State::Failing { error, step };
    }

    fn set_fail_step(&mut self, next: FailStep) {
        if let State::Failing { step, .. } = &mut self.state {
            *step = next;
        }
    }

    fn finish_failure(&mut self) {
        let State::Failing { .. } = self.state else {
            return;
        };
        let State::Failing { error, .. } = std::mem::replace(&mut self.state, State::Done) else {
            unreachable!("checked above")
        };
        self.control.clear();
        let phase = if matches!(error, SourceError::Cancelled { .. }) {
            Phase::Cancelled
        } else {
            Phase::Failed
        };
        self.set_phase(phase);
        let error = match (self.resume_error.take(), self.throttle_error.take()) {
            // Paused is what matters most: the guest runs nowhere.
            (Some(resume), _) => SourceError::ResumeFailed {
                error: Box::new(error),
                resume,
            },
            (None, Some(throttle)) => SourceError::ThrottleNotLifted {
                error: Box::new(error),
                throttle,
            },
            (None, None) => error,
        };
        self.result = Some(SourceResult::Failed(error));
    }

    fn maybe_progress(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_progress) < self.opts.progress_interval {
            return;
        }
        self.last_progress = now;
        self.events.push_back(ProgressEvent::Progress {
            bytes_on_wire: self.bytes_sent,
            pages_sent: self.pages_sent,
            pages_remaining: self.pages_remaining,
            pages_total: self.layout.page_count() as u64,
            bandwidth_bps: self.bw.bytes_per_sec().unwrap_or(0.0),
            dirty_rate_bps: self
                .stats
                .iterations
                .last()
                .map_or(0.0, |i| i.dirty_rate_bps),
        });
    }
}
