//! The post-copy source's control flow as a state machine without I/O: the switch, the
//! commit point, page service and recovery.
//!
//! The driver ([`super::migrate`]) asks [`SourceMachine::poll`] what to do, does it, and
//! reports what happened with [`SourceMachine::handle`]; time is passed in with every call
//! and never read inside. Every action but [`SourceAction::Wait`], [`SourceAction::Sleep`],
//! [`SourceAction::Close`] and [`SourceAction::Done`] must be answered with its event
//! before the next `poll`; a cancel and return-path records may be reported at any time.
//!
//! What it decides, and the driver must not: where the commit point lies (until the
//! commit is written whole, every failure and a cancel roll the switch back and resume the
//! guest here; from then on nothing does), what a broken connection means (after the
//! commit, a recovery: dial again with backoff until the window passes, then the guest is
//! lost), and what the report says. The data path of page service (the push, the urgent
//! server) is the driver's: it shares [`SourceMachine::plan`] with its threads.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use migration_core::bitmap::DirtyBitmap;
use migration_core::stats::{MigrationStats, Phase, ProgressEvent};
use migration_core::stream::{
    Ack, DeviceState, Record, ReturnRecord, Verdict, write_postcopy_switch,
};
use migration_core::vm::VmError;

use super::{PushPlan, SourceError, SourceOptions, SourceReport};
use crate::stats::Recovery;

/// The first pause between two connection attempts of a recovery; it doubles after each
/// failed attempt up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between two connection attempts of a recovery.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Where the machine stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourcePhase {
    /// Before the commit, getting the switch out: the urgent channel, the pause, the last
    /// dirty sync, the device state, the switch records.
    Switching,
    /// The switch is sent; the destination's `PostcopyReady` is awaited.
    AwaitingReady,
    /// The commit is being written: the last moment a failure resumes the guest here.
    Committing,
    /// Committed: page service on the `connection`th pair of connections (1 at the
    /// commit, one more after each recovery).
    Postcopy {
        /// Which pair of connections.
        connection: u32,
    },
    /// Committed, and a connection broke: dialling the destination again.
    Recovering {
        /// When the connection broke.
        since: Instant,
        /// Attempts so far.
        attempts: u32,
    },
    /// Before the commit, something failed: the guest is being resumed here.
    RollingBack,
    /// Ended: [`SourceMachine::take_result`] says how.
    Done,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceAction {
    /// Open the urgent channel; report [`SourceEvent::UrgentOpened`].
    OpenUrgent,
    /// Pause the vCPUs; report [`SourceEvent::Paused`].
    Pause,
    /// Throttle the vCPUs to this percentage (0 lifts it); report
    /// [`SourceEvent::Throttled`].
    SetThrottle(u8),
    /// Sync the dirty tracker a last time; report [`SourceEvent::Synced`] with the pages
    /// dirtied since the last sync.
    SyncTracker,
    /// Stop the dirty tracker; report [`SourceEvent::TrackerStopped`].
    StopTracker,
    /// Save the device state; report [`SourceEvent::DeviceState`].
    SaveDeviceState,
    /// Write what [`SourceMachine::write_switch`] gives on the main stream; report
    /// [`SourceEvent::Sent`].
    SendSwitch,
    /// Wait for a return-path record (report [`SourceEvent::Return`] or
    /// [`SourceEvent::ReturnClosed`]) or a cancel, at most until `until`; then poll again.
    Wait {
        /// When to poll again at the latest (`None`: only on an event).
        until: Option<Instant>,
    },
    /// Write the commit (`PostcopyCommit`) on the main stream; report
    /// [`SourceEvent::Sent`].
    SendCommit,
    /// Serve pages on the current connections (the push from [`SourceMachine::plan`], the
    /// requests on the urgent channel) until the destination's final verdict or a break;
    /// report [`SourceEvent::Served`].
    Serve,
    /// Dial the destination again: a resumed main stream and urgent channel, the
    /// destination's received-pages bitmap, the commit again; report
    /// [`SourceEvent::Dialled`].
    Dial,
    /// Do nothing until `until`, then poll again.
    Sleep {
        /// When to poll again.
        until: Instant,
    },
    /// Resume the vCPUs; report [`SourceEvent::Resumed`].
    Resume,
    /// Shut every connection down. No event follows.
    Close,
    /// The migration ended: take the result with [`SourceMachine::take_result`].
    Done,
}

/// What page service on one pair of connections did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Pages pushed in the background.
    pub pushed: u64,
    /// Page requests answered.
    pub requests: u64,
    /// Pages sent in answer to requests.
    pub requested: u64,
    /// Bytes written, both connections.
    pub bytes: u64,
}

/// What happened, for [`SourceMachine::handle`].
#[derive(Debug)]
#[non_exhaustive]
pub enum SourceEvent {
    /// The urgent channel is open, or why not.
    UrgentOpened(Result<(), String>),
    /// The vCPUs were paused, or not.
    Paused(Result<(), VmError>),
    /// The throttle was set, or not.
    Throttled(Result<(), VmError>),
    /// The tracker's last sync: the pages dirtied since the previous one, or why not.
    Synced(Result<DirtyBitmap, String>),
    /// The tracker was stopped, or why not (only logged: its last sync is taken already).
    TrackerStopped(Result<(), String>),
    /// The saved device state.
    DeviceState(Result<Vec<DeviceState>, VmError>),
    /// What was to be written (the switch, the commit) was written whole, or why not.
    Sent(Result<(), String>),
    /// A record from the destination.
    Return(ReturnRecord),
    /// The return path ended, with why if known.
    ReturnClosed(Option<String>),
    /// Page service ended: `Ok` on the destination's `Running` verdict, else why it broke;
    /// with what it did however it ended.
    Served(Result<(), String>, Served),
    /// The destination was reached again, with its received-pages bitmap, or why not.
    Dialled(Result<DirtyBitmap, String>),
    /// The vCPUs were resumed, or not.
    Resumed(Result<(), VmError>),
    /// The user cancelled. Honoured before the commit, refused after it.
    Cancel,
}

/// Where the switch starts from.
#[derive(Debug, Clone)]
pub struct SwitchStart {
    /// Pages the destination lacks (before the last sync).
    pub need: DirtyBitmap,
    /// Pages it holds an old copy of and must drop (before the last sync).
    pub discard: DirtyBitmap,
    /// Whether a dirty tracker runs (a hybrid's; a pure post-copy has none).
    pub tracker: bool,
    /// The throttle in force, in percent.
    pub throttle: u8,
    /// Pre-copy's part of the report.
    pub precopy: MigrationStats,
    /// Why pre-copy handed over.
    pub reason: String,
    /// When the migration started.
    pub started: Instant,
}

/// Steps before the commit, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    OpenUrgent,
    Pause,
    Unthrottle,
    Sync,
    StopTracker,
    SaveState,
    SendSwitch,
    AwaitReady { deadline: Option<Instant> },
    Commit,
    Serve,
    Recover,
    Rollback,
    Done,
}

/// Why the switch is rolled back.
#[derive(Debug)]
enum Failure {
    Cancelled,
    Failed(String),
}

#[derive(Debug)]
struct Recovering {
    since: Instant,
    deadline: Instant,
    next_at: Instant,
    backoff: Duration,
    attempts: u32,
    why: String,
    last: String,
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct SourceMachine {
    step: Step,
    /// An action was given whose event is awaited.
    awaiting: bool,
    need: DirtyBitmap,
    discard: DirtyBitmap,
    /// What the push sends; made of `need` at the commit.
    plan: Mutex<PushPlan>,
    tracker: bool,
    throttle: u8,
    paused: bool,
    closed: bool,
    cancelled: bool,
    states: Vec<DeviceState>,
    failure: Option<Failure>,
    resume_error: Option<VmError>,
    recovery: Option<Recovering>,
    connection: u32,
    ready_timeout: Option<Duration>,
    recovery_window: Duration,
    max_record_len: u32,
    started: Instant,
    paused_at: Option<Instant>,
    committed_at: Option<Instant>,
    report: SourceReport,
    events: VecDeque<ProgressEvent>,
    result: Option<Result<SourceReport, SourceError>>,
}

impl SourceMachine {
    /// A machine that switches from `start` under `opts`.
    pub fn new(start: SwitchStart, opts: &SourceOptions) -> SourceMachine {
        let pages = start.need.len();
        SourceMachine {
            step: Step::OpenUrgent,
            awaiting: false,
            need: start.need,
            discard: start.discard,
            plan: Mutex::new(PushPlan::new(DirtyBitmap::new(pages))),
            tracker: start.tracker,
            throttle: start.throttle,
            paused: false,
            closed: false,
            cancelled: false,
            states: Vec::new(),
            failure: None,
            resume_error: None,
            recovery: None,
            connection: 0,
            ready_timeout: opts.ready_timeout,
            recovery_window: opts.recovery_window,
            max_record_len: opts.max_record_len,
            started: start.started,
            paused_at: None,
            committed_at: None,
            report: SourceReport {
                precopy: start.precopy,
                switch_reason: start.reason,
                ..SourceReport::default()
            },
            events: VecDeque::new(),
            result: None,
        }
    }

    /// Where the machine stands.
    pub fn phase(&self) -> SourcePhase {
        match self.step {
            Step::OpenUrgent
            | Step::Pause
            | Step::Unthrottle
            | Step::Sync
            | Step::StopTracker
            | Step::SaveState
            | Step::SendSwitch => SourcePhase::Switching,
            Step::AwaitReady { .. } => SourcePhase::AwaitingReady,
            Step::Commit => SourcePhase::Committing,
            Step::Serve => SourcePhase::Postcopy {
                connection: self.connection,
            },
            Step::Recover => {
                let r = self.recovery.as_ref().expect("recovering");
                SourcePhase::Recovering {
                    since: r.since,
                    attempts: r.attempts,
                }
            }
            Step::Rollback => SourcePhase::RollingBack,
            Step::Done => SourcePhase::Done,
        }
    }

    /// Whether the commit was written: from then on the guest never runs here again.
    pub fn committed(&self) -> bool {
        self.committed_at.is_some()
    }

    /// The push plan, shared with page service's threads during [`SourceAction::Serve`].
    pub fn plan(&self) -> &Mutex<PushPlan> {
        &self.plan
    }

    /// The next progress event to pass on.
    pub fn poll_event(&mut self) -> Option<ProgressEvent> {
        self.events.pop_front()
    }

    /// How the migration ended, once [`SourceAction::Done`] was given.
    pub fn take_result(&mut self) -> Option<Result<SourceReport, SourceError>> {
        self.result.take()
    }

    /// The switch records for [`SourceAction::SendSwitch`]: the discard list (split to
    /// the destination's longest record), the device state, `EndOfData`.
    pub fn write_switch(&self, out: &mut BytesMut) {
        let ranges: Vec<Range<u64>> = self
            .discard
            .iter_runs()
            .map(|r| r.start as u64..r.end as u64)
            .collect();
        write_postcopy_switch(out, &ranges, self.max_record_len);
        for s in &self.states {
            Record::DeviceState(s.clone()).encode(out);
        }
        Record::EndOfData.encode(out);
    }

    /// What to do next.
    pub fn poll(&mut self, now: Instant) -> SourceAction {
        assert!(
            !self.awaiting,
            "an action's event must be reported before the next poll"
        );
        let before_commit = !matches!(
            self.step,
            Step::Serve | Step::Recover | Step::Rollback | Step::Done
        );
        if self.cancelled && before_commit {
            self.fail(Failure::Cancelled);
        }
        let action = match self.step {
            Step::OpenUrgent => SourceAction::OpenUrgent,
            Step::Pause => SourceAction::Pause,
            Step::Unthrottle => SourceAction::SetThrottle(0),
            Step::Sync => SourceAction::SyncTracker,
            Step::StopTracker => SourceAction::StopTracker,
            Step::SaveState => SourceAction::SaveDeviceState,
            Step::SendSwitch => SourceAction::SendSwitch,
            Step::AwaitReady { deadline } => {
                if deadline.is_some_and(|d| now >= d) {
                    self.fail(Failure::Failed(
                        "the destination was not ready in time".into(),
                    ));
                    return self.poll(now);
                }
                return SourceAction::Wait { until: deadline };
            }
            Step::Commit => SourceAction::SendCommit,
            Step::Serve => SourceAction::Serve,
            Step::Recover => {
                let r = self.recovery.as_mut().expect("recovering");
                if now >= r.deadline {
                    let missing = self
                        .plan
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remaining();
                    tracing::error!(attempts = r.attempts, last = %r.last, "the destination could not be reached again");
                    let why = format!(
                        "{}; then {} attempts, the last: {}",
                        r.why, r.attempts, r.last
                    );
                    self.finish(Err(SourceError::DestinationLost {
                        why,
                        window: self.recovery_window,
                        missing,
                    }));
                    return SourceAction::Done;
                }
                if now < r.next_at {
                    return SourceAction::Sleep {
                        until: r.next_at.min(r.deadline),
                    };
                }
                r.attempts += 1;
                SourceAction::Dial
            }
            Step::Rollback => return self.roll_back(),
            Step::Done => return SourceAction::Done,
        };
        self.awaiting = true;
        action
    }

    /// The next step of a roll-back: stop the tracker, lift the throttle, resume, close.
    fn roll_back(&mut self) -> SourceAction {
        let action = if self.tracker {
            SourceAction::StopTracker
        } else if self.throttle != 0 {
            SourceAction::SetThrottle(0)
        } else if self.paused {
            SourceAction::Resume
        } else if !self.closed {
            self.closed = true;
            return SourceAction::Close;
        } else {
            let e = match self.failure.take() {
                Some(Failure::Cancelled) => SourceError::Cancelled,
                Some(Failure::Failed(why)) => SourceError::Switch {
                    why,
                    resume: self.resume_error.take(),
                },
                None => unreachable!("a roll-back has a cause"),
            };
            self.finish(Err(e));
            return SourceAction::Done;
        };
        self.awaiting = true;
        action
    }

    fn fail(&mut self, f: Failure) {
        if let Failure::Failed(why) = &f {
            tracing::warn!(%why, "switch to post-copy failed; the guest runs on the source");
        }
        self.failure.get_or_insert(f);
        self.step = Step::Rollback;
    }

    fn finish(&mut self, r: Result<SourceReport, SourceError>) {
        self.step = Step::Done;
        self.result = Some(r);
    }

    /// Reports what happened.
    pub fn handle(&mut self, event: SourceEvent, now: Instant) {
        match event {
            SourceEvent::Cancel => {
                if self.committed_at.is_some() {
                    tracing::warn!(
                        "cancel refused: the guest runs on the destination, and this side's copy is stale"
                    );
                } else {
                    self.cancelled = true;
                }
                return;
            }
            SourceEvent::Return(r) => return self.on_return(r),
            SourceEvent::ReturnClosed(why) => {
                if matches!(self.step, Step::AwaitReady { .. }) {
                    self.fail(Failure::Failed(format!(
                        "the destination closed the connection before it was ready{}",
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    )));
                }
                return;
            }
            _ => {}
        }
        assert!(self.awaiting, "an event for an action not given: {event:?}");
        self.awaiting = false;
        let rolling = self.step == Step::Rollback;
        match event {
            SourceEvent::UrgentOpened(r) => match r {
                Ok(()) => self.step = Step::Pause,
                Err(e) => self.fail(Failure::Failed(format!("opening the urgent channel: {e}"))),
            },
            SourceEvent::Paused(r) => match r {
                Ok(()) => {
                    self.paused = true;
                    self.paused_at = Some(now);
                    self.events
                        .push_back(ProgressEvent::Phase(Phase::StopAndCopy));
                    self.step = if self.throttle != 0 {
                        Step::Unthrottle
                    } else if self.tracker {
                        Step::Sync
                    } else {
                        Step::SaveState
                    };
                }
                // It may be paused in part: resume it either way.
                Err(e) => {
                    self.paused = true;
                    self.fail(Failure::Failed(e.to_string()));
                }
            },
            SourceEvent::Throttled(r) => {
                self.throttle = 0;
                match r {
                    Ok(()) if !rolling => {
                        self.step = if self.tracker {
                            Step::Sync
                        } else {
                            Step::SaveState
                        }
                    }
                    Ok(()) => {}
                    Err(e) if rolling => tracing::warn!(%e, "lifting the throttle"),
                    Err(e) => self.fail(Failure::Failed(e.to_string())),
                }
            }
            SourceEvent::Synced(r) => match r {
                Ok(last) => {
                    self.need.union_with(&last);
                    self.discard.union_with(&last);
                    self.step = Step::StopTracker;
                }
                Err(e) => self.fail(Failure::Failed(e)),
            },
            SourceEvent::TrackerStopped(r) => {
                self.tracker = false;
                if let Err(e) = r {
                    tracing::warn!(%e, "stopping the dirty tracker");
                }
                if !rolling {
                    self.step = Step::SaveState;
                }
            }
            SourceEvent::DeviceState(r) => match r {
                Ok(s) => {
                    self.states = s;
                    self.step = Step::SendSwitch;
                }
                Err(e) => self.fail(Failure::Failed(e.to_string())),
            },
            SourceEvent::Sent(r) => match (self.step, r) {
                (Step::SendSwitch, Ok(())) => {
                    self.step = Step::AwaitReady {
                        deadline: self.ready_timeout.map(|t| now + t),
                    }
                }
                (Step::SendSwitch, Err(e)) => {
                    self.fail(Failure::Failed(format!("sending the switch: {e}")))
                }
                (Step::Commit, Ok(())) => self.commit(now),
                (Step::Commit, Err(e)) => {
                    self.fail(Failure::Failed(format!("writing the commit: {e}")))
                }
                (step, r) => unreachable!("Sent({r:?}) in {step:?}"),
            },
            SourceEvent::Served(r, served) => {
                self.report.pages_pushed += served.pushed;
                self.report.pages_requested += served.requested;
                self.report.requests += served.requests;
                self.report.bytes += served.bytes;
                match r {
                    Ok(()) => {
                        let committed = self.committed_at.expect("serving after the commit");
                        self.report.postcopy_time = now.saturating_duration_since(committed);
                        self.report.total_time = now.saturating_duration_since(self.started);
                        self.events
                            .push_back(ProgressEvent::Phase(Phase::Completed));
                        let report = std::mem::take(&mut self.report);
                        self.finish(Ok(report));
                    }
                    Err(why) => {
                        tracing::warn!(%why, "post-copy connection lost; reconnecting");
                        self.events
                            .push_back(ProgressEvent::Phase(Phase::PostcopyPaused));
                        self.recovery = Some(Recovering {
                            since: now,
                            deadline: now + self.recovery_window,
                            next_at: now,
                            backoff: FIRST_BACKOFF,
                            attempts: 0,
                            why,
                            last: "no attempt".into(),
                        });
                        self.step = Step::Recover;
                    }
                }
            }
            SourceEvent::Dialled(r) => {
                let rec = self.recovery.as_mut().expect("dialling in a recovery");
                match r {
                    Ok(bitmap) => {
                        self.plan
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .resume(&bitmap);
                        self.report.recoveries.push(Recovery {
                            duration: now.saturating_duration_since(rec.since),
                            attempts: rec.attempts,
                        });
                        self.recovery = None;
                        self.connection += 1;
                        self.events.push_back(ProgressEvent::Phase(Phase::Postcopy));
                        self.step = Step::Serve;
                    }
                    Err(e) => {
                        tracing::debug!(%e, attempts = rec.attempts, "reconnecting");
                        rec.last = e;
                        rec.next_at = now + rec.backoff;
                        rec.backoff = (rec.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            SourceEvent::Resumed(r) => {
                self.paused = false;
                self.resume_error = r.err();
            }
            SourceEvent::Cancel | SourceEvent::Return(_) | SourceEvent::ReturnClosed(_) => {
                unreachable!("handled above")
            }
        }
    }

    fn on_return(&mut self, r: ReturnRecord) {
        if !matches!(self.step, Step::AwaitReady { .. }) {
            tracing::debug!(record = %r.record_type(), "a return record outside the switch");
            return;
        }
        match r {
            ReturnRecord::Ack(Ack::PostcopyReady(_)) => self.step = Step::Commit,
            ReturnRecord::Ack(_) => {}
            ReturnRecord::Verdict(Verdict::Failed { reason }) => {
                self.fail(Failure::Failed(format!("the destination failed: {reason}")))
            }
            r => self.fail(Failure::Failed(format!(
                "unexpected {} record before the commit",
                r.record_type()
            ))),
        }
    }

    fn commit(&mut self, now: Instant) {
        let paused_at = self.paused_at.expect("paused before the commit");
        self.report.downtime = now.saturating_duration_since(paused_at);
        self.report.discarded = self.discard.count() as u64;
        let need = std::mem::replace(&mut self.need, DirtyBitmap::new(0));
        tracing::debug!(downtime = ?self.report.downtime, need = need.count(), "post-copy committed");
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = PushPlan::new(need);
        self.committed_at = Some(now);
        self.connection = 1;
        self.events.push_back(ProgressEvent::Phase(Phase::Postcopy));
        self.step = Step::Serve;
    }
}

#[cfg(test)]
mod tests;
