//! The post-copy destination's control flow as a state machine without I/O: the rest of
//! the switch, the commit, page service, and waiting for the source after a break.
//!
//! The driver ([`super::receive_with_progress`]) asks [`DestinationMachine::poll`] what to
//! do, does it, and reports what happened with [`DestinationMachine::handle`]; time is
//! passed in and never read inside. Every action but [`DestinationAction::Accept`],
//! [`DestinationAction::Sleep`], [`DestinationAction::Drop`], [`DestinationAction::Refuse`],
//! [`DestinationAction::Finish`] and [`DestinationAction::Done`] must be answered with its
//! event before the next `poll`; `Accept` may be answered, or not when nothing came in time.
//!
//! What it decides: that the guest runs here only on the source's commit; that a broken
//! connection after it pauses page service, not the guest, and is waited out for the
//! recovery window; which connections of the source's new attempt belong together (the
//! source opens the main stream first, so an urgent channel that came before the latest
//! main stream is of an attempt the source gave up, and pairing it thrashed); what a
//! failure means for the guest (not run here before the commit, paused here after it).
//! Page placement and the fault thread are the driver's (with [`super::PageBook`]).

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use migration_core::stats::{Phase, ProgressEvent};
use migration_core::stream::{DeviceState, HeaderFlags, Record};
use migration_core::vm::VmError;

use super::DestinationError;
use crate::stats::Recovery;

/// How the driver names a connection it accepted.
pub type ConnId = u64;

/// How long to wait before accepting again after the listener failed.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Where the machine stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestinationPhase {
    /// Reading the rest of the switch (device state, `EndOfData`) on the main stream.
    Switching,
    /// Waiting for the source's urgent channel.
    AwaitingUrgent,
    /// Registering RAM for faults and loading the device state.
    Preparing,
    /// `PostcopyReady` sent; the source's commit is awaited. The guest does not run here.
    AwaitingCommit,
    /// The guest runs here; pages are served on the `connection`th pair of connections.
    Postcopy {
        /// Which pair of connections (1 at the commit, one more after each recovery).
        connection: u32,
    },
    /// A connection broke: waiting for the source to come back, until `deadline`. Before
    /// the commit (`committed` false) the guest has not run here yet.
    Paused {
        /// When it broke.
        since: Instant,
        /// When the source is given up.
        deadline: Instant,
        /// Whether the source's commit was read before the break.
        committed: bool,
    },
    /// Ended: [`DestinationMachine::take_result`] says how.
    Done,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestinationAction {
    /// Read the next record of the main stream; report [`DestinationEvent::Record`] or
    /// [`DestinationEvent::MainBroken`].
    ReadMain,
    /// Accept the source's next connection and read its header (a connection that is not
    /// the source's is dropped by the driver), until `until`; report
    /// [`DestinationEvent::Accepted`], or nothing when none came in time.
    Accept {
        /// When to poll again at the latest.
        until: Instant,
    },
    /// Answer this urgent channel with this side's header; report
    /// [`DestinationEvent::Answered`].
    AnswerUrgent(ConnId),
    /// Make this the main stream: answer with this side's header and the received-pages
    /// bitmap; report [`DestinationEvent::Answered`].
    AnswerMain(ConnId),
    /// Shut this connection and forget it. No event follows.
    Drop(ConnId),
    /// Register RAM for faults, drop the pages not present, load
    /// [`DestinationMachine::device_states`]; report [`DestinationEvent::Prepared`].
    Prepare,
    /// Send `PostcopyReady` on the main stream; report [`DestinationEvent::Sent`].
    SendReady,
    /// Resume the vCPUs; report [`DestinationEvent::Resumed`].
    Resume,
    /// Serve faults and place pages on the current pair until every page is present or a
    /// connection breaks; report [`DestinationEvent::Served`].
    Serve,
    /// Pause the vCPUs (page service failed for good); report [`DestinationEvent::Paused`].
    Pause,
    /// Send a `Failed` verdict with the error where the main stream still works, and shut
    /// every connection. No event follows.
    Refuse,
    /// Every page is present: unregister RAM, send the `Running` verdict, shut the
    /// connections. No event follows.
    Finish,
    /// Do nothing until `until`, then poll again.
    Sleep {
        /// When to poll again.
        until: Instant,
    },
    /// Ended: take the result with [`DestinationMachine::take_result`].
    Done,
}

/// How page service on one pair of connections ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum Service {
    /// Every page is present.
    Complete,
    /// A connection broke, for this reason.
    Broken(String),
    /// Something no recovery mends (a page that cannot be placed, a protocol breach).
    Failed(DestinationError),
}

/// What happened, for [`DestinationMachine::handle`].
#[derive(Debug)]
#[non_exhaustive]
pub enum DestinationEvent {
    /// A record of the main stream.
    Record(Record),
    /// The main stream ended or broke, or is corrupt.
    MainBroken(DestinationError),
    /// A connection of the source's came (with the flags of its header), or the listener
    /// failed.
    Accepted(io::Result<(ConnId, HeaderFlags)>),
    /// The answer was written, or not (the connection is then dropped by the machine).
    Answered(ConnId, io::Result<()>),
    /// RAM is registered and the device state loaded, or why not.
    Prepared(Result<(), DestinationError>),
    /// `PostcopyReady` was sent, or not.
    Sent(io::Result<()>),
    /// The vCPUs were resumed, or not.
    Resumed(Result<(), VmError>),
    /// Page service ended.
    Served(Service),
    /// The vCPUs were paused, or not.
    Paused(Result<(), VmError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Switch,
    AwaitUrgent,
    AnsweringUrgent(ConnId),
    Prepare,
    Ready,
    AwaitCommit,
    Resume,
    Serve,
    /// Waiting for the source's next attempt.
    Wait,
    /// Answering a connection of the attempt.
    Answering,
    /// Reading the attempt's commit on its main stream.
    ReadCommit,
    Pause,
    Refuse,
    Finish,
    Done,
}

/// A recovery in progress.
#[derive(Debug)]
struct Waiting {
    since: Instant,
    deadline: Instant,
    committed: bool,
    why: String,
    /// The latest attempt's main stream, answered.
    main: Option<ConnId>,
    /// Its urgent channel, answered.
    urgent: Option<ConnId>,
    /// The connection being answered, and whether it is the main stream.
    answering: Option<(ConnId, bool)>,
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct DestinationMachine {
    step: Step,
    awaiting: bool,
    window: Duration,
    switched_at: Instant,
    committed_at: Option<Instant>,
    states: Vec<DeviceState>,
    /// The connections page service runs on, once both are there.
    main: Option<ConnId>,
    urgent: Option<ConnId>,
    connection: u32,
    waiting: Option<Waiting>,
    recovered_before_commit: Option<Recovery>,
    /// The error to end with, after a refusal or a pause.
    error: Option<DestinationError>,
    refused: Option<String>,
    /// Actions without an event, to give before the next.
    pending: VecDeque<DestinationAction>,
    events: VecDeque<ProgressEvent>,
    result: Option<Result<(), DestinationError>>,
}

impl DestinationMachine {
    /// A machine that takes over the main stream `main` at the source's switch (read at
    /// `now`), waiting up to `window` for the source after a break and for its urgent
    /// channel.
    pub fn new(main: ConnId, window: Duration, now: Instant) -> DestinationMachine {
        DestinationMachine {
            step: Step::Switch,
            awaiting: false,
            window,
            switched_at: now,
            committed_at: None,
            states: Vec::new(),
            main: Some(main),
            urgent: None,
            connection: 0,
            waiting: None,
            recovered_before_commit: None,
            error: None,
            refused: None,
            pending: VecDeque::new(),
            events: VecDeque::new(),
            result: None,
        }
    }

    /// Where the machine stands.
    pub fn phase(&self) -> DestinationPhase {
        match self.step {
            Step::Switch => DestinationPhase::Switching,
            Step::AwaitUrgent | Step::AnsweringUrgent(_) => DestinationPhase::AwaitingUrgent,
            Step::Prepare | Step::Ready => DestinationPhase::Preparing,
            Step::AwaitCommit | Step::Resume => DestinationPhase::AwaitingCommit,
            Step::Serve => DestinationPhase::Postcopy {
                connection: self.connection,
            },
            Step::Wait | Step::Answering | Step::ReadCommit => {
                let w = self.waiting.as_ref().expect("waiting");
                DestinationPhase::Paused {
                    since: w.since,
                    deadline: w.deadline,
                    committed: w.committed,
                }
            }
            Step::Pause | Step::Refuse | Step::Finish | Step::Done => DestinationPhase::Done,
        }
    }

    /// The main stream and urgent channel page service runs on.
    pub fn connections(&self) -> (Option<ConnId>, Option<ConnId>) {
        (self.main, self.urgent)
    }

    /// The device state read in the switch, for [`DestinationAction::Prepare`].
    pub fn device_states(&self) -> &[DeviceState] {
        &self.states
    }

    /// From the switch record to the guest running here.
    pub fn switchover(&self) -> Option<Duration> {
        self.committed_at
            .map(|c| c.saturating_duration_since(self.switched_at))
    }

    /// Whether the guest runs (or ran) here: the source's commit was read.
    pub fn committed(&self) -> bool {
        self.committed_at.is_some()
    }

    /// A break before the commit that the source came back from: the source counts it as
    /// a recovery (it may have committed before the break), and so must this side.
    pub fn recovered_before_commit(&self) -> Option<Recovery> {
        self.recovered_before_commit.clone()
    }

    /// What [`DestinationAction::Refuse`] sends as the reason.
    pub fn refusal(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// The next progress event to pass on.
    pub fn poll_event(&mut self) -> Option<ProgressEvent> {
        self.events.pop_front()
    }

    /// How it ended, once [`DestinationAction::Done`] was given.
    pub fn take_result(&mut self) -> Option<Result<(), DestinationError>> {
        self.result.take()
    }

    /// What to do next.
    pub fn poll(&mut self, now: Instant) -> DestinationAction {
        assert!(
            !self.awaiting,
            "an action's event must be reported before the next poll"
        );
        if let Some(a) = self.pending.pop_front() {
            return a;
        }
        let action = match self.step {
            Step::Switch | Step::AwaitCommit | Step::ReadCommit => DestinationAction::ReadMain,
            Step::AwaitUrgent => {
                let until = self.switched_at + self.window;
                if now >= until {
                    self.refuse(DestinationError::Connection(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no urgent channel from the source within {:?}", self.window),
                    )));
                    return self.poll(now);
                }
                return DestinationAction::Accept { until };
            }
            Step::AnsweringUrgent(id) => DestinationAction::AnswerUrgent(id),
            Step::Prepare => DestinationAction::Prepare,
            Step::Ready => DestinationAction::SendReady,
            Step::Resume => DestinationAction::Resume,
            Step::Serve => DestinationAction::Serve,
            Step::Wait => {
                let w = self.waiting.as_ref().expect("waiting");
                if now >= w.deadline {
                    return self.give_up(now);
                }
                return DestinationAction::Accept { until: w.deadline };
            }
            Step::Answering => {
                let (id, main) = self
                    .waiting
                    .as_ref()
                    .and_then(|w| w.answering)
                    .expect("answering");
                if main {
                    DestinationAction::AnswerMain(id)
                } else {
                    DestinationAction::AnswerUrgent(id)
                }
            }
            Step::Pause => DestinationAction::Pause,
            Step::Refuse => {
                let e = self.error.take().expect("a refusal has a cause");
                self.end(Err(e));
                return DestinationAction::Refuse;
            }
            Step::Finish => {
                self.events
                    .push_back(ProgressEvent::Phase(Phase::Completed));
                self.end(Ok(()));
                return DestinationAction::Finish;
            }
            Step::Done => return DestinationAction::Done,
        };
        self.awaiting = true;
        action
    }

    /// The window passed with no working attempt.
    fn give_up(&mut self, now: Instant) -> DestinationAction {
        let w = self.waiting.take().expect("waiting");
        // Half an attempt: nothing to keep.
        for id in [w.main, w.urgent].into_iter().flatten() {
            self.pending.push_back(DestinationAction::Drop(id));
        }
        self.main = None;
        self.urgent = None;
        if w.committed {
            tracing::error!(why = %w.why, "the source did not come back");
            self.error = Some(DestinationError::SourceLost {
                window: self.window,
                // The driver knows how many: it holds the page book.
                missing: 0,
                why: w.why,
                pause: None,
            });
            self.step = Step::Pause;
        } else {
            self.end(Err(DestinationError::Connection(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{}, and the source did not come back within {:?}",
                    w.why, self.window
                ),
            ))));
        }
        // The drops first, then the pause or the end.
        self.poll(now)
    }

    fn drop_conn(&mut self, id: ConnId) {
        self.pending.push_back(DestinationAction::Drop(id));
    }

    fn end(&mut self, r: Result<(), DestinationError>) {
        self.step = Step::Done;
        self.result = Some(r);
    }

    /// Refuses the migration with `e` (before the guest ran here).
    fn refuse(&mut self, e: DestinationError) {
        tracing::warn!(error = %e, "post-copy switch failed; the guest is not run here");
        self.refused = Some(e.to_string());
        self.error = Some(e);
        self.step = Step::Refuse;
    }

    /// A connection broke: wait for the source's next attempt.
    fn wait_for_source(&mut self, why: String, now: Instant) {
        let committed = self.committed_at.is_some();
        if committed {
            tracing::warn!(error = %why, "post-copy connection lost; waiting for the source to come back");
            self.events
                .push_back(ProgressEvent::Phase(Phase::PostcopyPaused));
        } else {
            tracing::warn!(error = %why, "connection lost before the commit; waiting for the source");
        }
        self.main = None;
        self.urgent = None;
        self.waiting = Some(Waiting {
            since: now,
            deadline: now + self.window,
            committed,
            why,
            main: None,
            urgent: None,
            answering: None,
        });
        self.step = Step::Wait;
    }

    /// Reports what happened.
    pub fn handle(&mut self, event: DestinationEvent, now: Instant) {
        let accepting = matches!(self.step, Step::AwaitUrgent | Step::Wait);
        if !accepting {
            assert!(self.awaiting, "an event for an action not given: {event:?}");
        }
        self.awaiting = false;
        match (self.step, event) {
            (Step::Switch, DestinationEvent::Record(r)) => match r {
                Record::DeviceState(s) => self.states.push(s),
                Record::EndOfData => self.step = Step::AwaitUrgent,
                Record::Abort { reason } => self.end(Err(DestinationError::Aborted(reason))),
                r => self.refuse(DestinationError::Protocol(format!(
                    "a {} record in the switch to post-copy",
                    r.record_type()
                ))),
            },
            (Step::Switch | Step::AwaitCommit, DestinationEvent::MainBroken(e))
                if !matches!(e, DestinationError::Connection(_)) || self.step == Step::Switch =>
            {
                self.refuse(e)
            }
            (Step::AwaitCommit, DestinationEvent::MainBroken(e)) => {
                // The source may have committed before the break: wait for it.
                self.wait_for_source(e.to_string(), now)
            }
            (Step::AwaitUrgent, DestinationEvent::Accepted(r)) => match r {
                Ok((id, flags)) if flags.contains(HeaderFlags::URGENT) => {
                    self.step = Step::AnsweringUrgent(id)
                }
                Ok((id, _)) => {
                    self.urgent = Some(id);
                    self.refuse(DestinationError::Protocol(
                        "a second connection that is not the urgent channel".into(),
                    ))
                }
                Err(e) => self.refuse(DestinationError::Connection(e)),
            },
            (Step::AnsweringUrgent(id), DestinationEvent::Answered(_, r)) => {
                self.urgent = Some(id);
                match r {
                    Ok(()) => self.step = Step::Prepare,
                    Err(e) => self.refuse(DestinationError::Connection(e)),
                }
            }
            (Step::Prepare, DestinationEvent::Prepared(r)) => match r {
                Ok(()) => self.step = Step::Ready,
                Err(e) => self.refuse(e),
            },
            (Step::Ready, DestinationEvent::Sent(r)) => match r {
                Ok(()) => self.step = Step::AwaitCommit,
                Err(e) => self.end(Err(DestinationError::Connection(e))),
            },
            (Step::AwaitCommit, DestinationEvent::Record(r)) => match r {
                Record::PostcopyCommit => {
                    self.committed_at = Some(now);
                    self.step = Step::Resume;
                }
                Record::Abort { reason } => self.end(Err(DestinationError::Aborted(reason))),
                r => self.refuse(DestinationError::Protocol(format!(
                    "a {} record instead of the commit",
                    r.record_type()
                ))),
            },
            (Step::Resume, DestinationEvent::Resumed(r)) => match r {
                Ok(()) => {
                    self.connection += 1;
                    self.events.push_back(ProgressEvent::Phase(Phase::Postcopy));
                    self.step = Step::Serve;
                }
                // Not running here, and the source committed: pause what may run.
                Err(e) => {
                    self.error = Some(DestinationError::Vm(e));
                    self.step = Step::Pause;
                }
            },
            (Step::Serve, DestinationEvent::Served(s)) => match s {
                Service::Complete => self.step = Step::Finish,
                Service::Broken(why) => self.wait_for_source(why, now),
                Service::Failed(e) => {
                    self.error = Some(e);
                    self.step = Step::Pause;
                }
            },
            (Step::Wait, DestinationEvent::Accepted(r)) => self.on_attempt(r, now),
            (Step::Answering, DestinationEvent::Answered(id, r)) => {
                let w = self.waiting.as_mut().expect("waiting");
                let (_, main) = w.answering.take().expect("answering");
                match r {
                    Err(e) => {
                        tracing::debug!(%e, id, "answering the source's connection");
                        self.step = Step::Wait;
                        return self.drop_conn(id);
                    }
                    Ok(()) if main => {
                        // A new attempt: an urgent channel held so far is an older one's.
                        if let Some(old) = w.urgent.take() {
                            self.drop_conn(old);
                        }
                        let w = self.waiting.as_mut().expect("waiting");
                        if let Some(old) = w.main.replace(id) {
                            self.drop_conn(old);
                        }
                    }
                    Ok(()) => w.urgent = Some(id),
                }
                let w = self.waiting.as_ref().expect("waiting");
                self.step = if w.main.is_some() && w.urgent.is_some() {
                    self.main = w.main;
                    self.urgent = w.urgent;
                    Step::ReadCommit
                } else {
                    Step::Wait
                };
            }
            (Step::ReadCommit, DestinationEvent::Record(r)) => match r {
                // The source commits again first: a commit lost with the old connection
                // is taken up.
                Record::PostcopyCommit => {
                    let w = self.waiting.take().expect("waiting");
                    if w.committed {
                        self.connection += 1;
                        self.events.push_back(ProgressEvent::Phase(Phase::Postcopy));
                        self.step = Step::Serve;
                    } else {
                        self.recovered_before_commit = Some(Recovery {
                            duration: now.saturating_duration_since(w.since),
                            attempts: 1,
                        });
                        self.committed_at = Some(now);
                        self.step = Step::Resume;
                    }
                }
                Record::Abort { reason } => self.end(Err(DestinationError::Aborted(reason))),
                r => {
                    self.error = Some(DestinationError::Protocol(format!(
                        "a resumed stream starting with a {} record, not the commit",
                        r.record_type()
                    )));
                    self.after_fatal();
                }
            },
            (Step::ReadCommit, DestinationEvent::MainBroken(e)) => {
                // This attempt broke before its commit: wait for the next.
                tracing::warn!(error = %e, "a recovery attempt broke; waiting for the next");
                let w = self.waiting.as_mut().expect("waiting");
                let (m, u) = (w.main.take(), w.urgent.take());
                self.main = None;
                self.urgent = None;
                for id in [m, u].into_iter().flatten() {
                    self.drop_conn(id);
                }
                self.step = Step::Wait;
            }
            (Step::Pause, DestinationEvent::Paused(r)) => {
                let e = match self.error.take().expect("a pause has a cause") {
                    DestinationError::SourceLost {
                        window,
                        missing,
                        why,
                        ..
                    } => DestinationError::SourceLost {
                        window,
                        missing,
                        why,
                        pause: r.err(),
                    },
                    e => e,
                };
                self.end(Err(e));
            }
            (step, event) => unreachable!("{event:?} in {step:?}"),
        }
    }

    /// A fatal error while waiting: before the commit it ends the migration, after it the
    /// guest is paused.
    fn after_fatal(&mut self) {
        let committed = self.committed_at.is_some();
        self.waiting = None;
        if committed {
            self.step = Step::Pause;
        } else {
            let e = self.error.take().expect("an error");
            self.refuse(e);
        }
    }

    fn on_attempt(&mut self, r: io::Result<(ConnId, HeaderFlags)>, now: Instant) {
        let (id, flags) = match r {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%e, "accepting the source's connection");
                self.pending.push_back(DestinationAction::Sleep {
                    until: now + ACCEPT_RETRY,
                });
                return;
            }
        };
        if !flags.contains(HeaderFlags::POSTCOPY_RESUME) {
            tracing::warn!("a new migration while one is in post-copy: refused");
            return self.drop_conn(id);
        }
        let w = self.waiting.as_mut().expect("waiting");
        if flags.contains(HeaderFlags::URGENT) && w.main.is_none() {
            // Only an urgent channel that came after the main stream is of the same
            // attempt (the source opens them in that order).
            tracing::debug!("an urgent channel of an earlier attempt: dropped");
            return self.drop_conn(id);
        }
        w.answering = Some((id, !flags.contains(HeaderFlags::URGENT)));
        self.step = Step::Answering;
    }
}

#[cfg(test)]
mod tests;
