//! The destination machine driven by scripts, with a fake clock: the switch, each failure
//! before the commit, a break before and after it, how the connections of the source's
//! attempts are paired (the stale urgent channel that made both sides thrash), the window,
//! and a property over arbitrary events.

use super::*;
use migration_core::vm::VmOp;
use proptest::prelude::*;

const WINDOW: Duration = Duration::from_secs(10);
const URGENT: HeaderFlags = HeaderFlags::URGENT;
const RESUME: HeaderFlags = HeaderFlags::POSTCOPY_RESUME;

fn both(a: HeaderFlags, b: HeaderFlags) -> HeaderFlags {
    HeaderFlags(a.0 | b.0)
}

struct Script {
    m: DestinationMachine,
    now: Instant,
    actions: Vec<DestinationAction>,
}

impl Script {
    fn new() -> Script {
        let now = Instant::now();
        Script {
            m: DestinationMachine::new(0, WINDOW, now),
            now,
            actions: Vec::new(),
        }
    }

    fn poll(&mut self) -> DestinationAction {
        self.now += Duration::from_millis(1);
        let a = self.m.poll(self.now);
        self.actions.push(a);
        a
    }

    fn expect(&mut self, a: DestinationAction) {
        assert_eq!(self.poll(), a, "after {:?}", &self.actions);
    }

    fn handle(&mut self, e: DestinationEvent) {
        self.m.handle(e, self.now);
    }

    fn record(&mut self, r: Record) {
        self.expect(DestinationAction::ReadMain);
        self.handle(DestinationEvent::Record(r));
    }

    fn accept(&mut self, id: ConnId, flags: HeaderFlags) {
        assert!(
            matches!(self.poll(), DestinationAction::Accept { .. }),
            "{:?}",
            self.actions
        );
        self.handle(DestinationEvent::Accepted(Ok((id, flags))));
    }

    fn answer(&mut self, a: DestinationAction) {
        self.expect(a);
        let id = match a {
            DestinationAction::AnswerMain(id) | DestinationAction::AnswerUrgent(id) => id,
            a => panic!("{a:?}"),
        };
        self.handle(DestinationEvent::Answered(id, Ok(())));
    }

    /// A resumed main stream `main` and urgent channel `urgent` come and are answered.
    fn attempt(&mut self, main: ConnId, urgent: ConnId) {
        self.accept(main, RESUME);
        self.answer(DestinationAction::AnswerMain(main));
        self.accept(urgent, both(URGENT, RESUME));
        self.answer(DestinationAction::AnswerUrgent(urgent));
    }

    /// The switch up to RAM registered for faults (not reported).
    fn run_to_prepare(&mut self) {
        self.record(Record::DeviceState(DeviceState::new(
            "vcpu0",
            1,
            vec![1, 2],
        )));
        self.record(Record::EndOfData);
        self.accept(1, URGENT);
        self.answer(DestinationAction::AnswerUrgent(1));
        self.expect(DestinationAction::Prepare);
        assert_eq!(self.m.device_states().len(), 1);
    }

    /// The switch up to `PostcopyReady` sent.
    fn run_to_ready(&mut self) {
        self.run_to_prepare();
        self.handle(DestinationEvent::Prepared(Ok(())));
        self.expect(DestinationAction::SendReady);
        self.handle(DestinationEvent::Sent(Ok(())));
        assert_eq!(self.m.phase(), DestinationPhase::AwaitingCommit);
    }

    /// The switch up to the commit read, the guest resumed.
    fn run_to_serving(&mut self) {
        self.run_to_ready();
        assert!(!self.m.committed());
        self.record(Record::PostcopyCommit);
        self.expect(DestinationAction::Resume);
        self.handle(DestinationEvent::Resumed(Ok(())));
        assert_eq!(self.m.phase(), DestinationPhase::Postcopy { connection: 1 });
        assert_eq!(self.m.connections(), (Some(0), Some(1)));
    }

    fn serve(&mut self, s: Service) {
        self.expect(DestinationAction::Serve);
        self.handle(DestinationEvent::Served(s));
    }

    fn result(&mut self) -> Result<(), DestinationError> {
        for _ in 0..20 {
            match self.poll() {
                DestinationAction::Done => return self.m.take_result().expect("a result"),
                DestinationAction::Pause => self.handle(DestinationEvent::Paused(Ok(()))),
                DestinationAction::Drop(_)
                | DestinationAction::Refuse
                | DestinationAction::Finish => {}
                a => panic!("{a:?} while ending: {:?}", self.actions),
            }
        }
        panic!("never done: {:?}", self.actions)
    }

    fn count(&self, f: impl Fn(&DestinationAction) -> bool) -> usize {
        self.actions.iter().filter(|a| f(a)).count()
    }

    fn phases(&mut self) -> Vec<Phase> {
        std::iter::from_fn(|| self.m.poll_event())
            .filter_map(|e| match e {
                ProgressEvent::Phase(p) => Some(p),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn the_switch_runs_the_guest_only_on_the_commit_and_finishes_when_every_page_is_there() {
    let mut s = Script::new();
    s.run_to_serving();
    // The commit was read at the 7th step.
    assert_eq!(s.m.switchover(), Some(Duration::from_millis(7)));
    s.serve(Service::Complete);
    s.expect(DestinationAction::Finish);
    s.expect(DestinationAction::Done);
    assert!(s.m.take_result().unwrap().is_ok());
    assert_eq!(s.phases(), vec![Phase::Postcopy, Phase::Completed]);
}

#[test]
fn every_failure_before_the_commit_refuses_and_never_runs_the_guest() {
    type Case = (&'static str, fn(&mut Script), &'static str);
    let cases: [Case; 7] = [
        (
            "a record out of place",
            |s| s.record(Record::Complete),
            "(complete) record in the switch",
        ),
        (
            "the second connection is not urgent",
            |s| {
                s.record(Record::EndOfData);
                s.accept(1, HeaderFlags::NONE);
            },
            "not the urgent channel",
        ),
        (
            "no urgent channel in time",
            |s| {
                s.record(Record::EndOfData);
                let DestinationAction::Accept { until } = s.poll() else {
                    panic!()
                };
                s.now = until;
            },
            "no urgent channel from the source within",
        ),
        (
            "answering the urgent channel fails",
            |s| {
                s.record(Record::EndOfData);
                s.accept(1, URGENT);
                s.expect(DestinationAction::AnswerUrgent(1));
                s.handle(DestinationEvent::Answered(
                    1,
                    Err(io::ErrorKind::BrokenPipe.into()),
                ));
            },
            "connection lost",
        ),
        (
            "registering RAM fails",
            |s| {
                s.run_to_prepare();
                s.handle(DestinationEvent::Prepared(Err(DestinationError::Register(
                    io::ErrorKind::PermissionDenied.into(),
                ))));
            },
            "registering guest RAM",
        ),
        (
            "the main stream is corrupt before the commit",
            |s| {
                s.run_to_ready();
                s.expect(DestinationAction::ReadMain);
                s.handle(DestinationEvent::MainBroken(DestinationError::Protocol(
                    "bad crc".into(),
                )));
            },
            "bad crc",
        ),
        (
            "a record instead of the commit",
            |s| {
                s.run_to_ready();
                s.record(Record::EndOfData);
            },
            "instead of the commit",
        ),
    ];
    for (name, run, text) in cases {
        let mut s = Script::new();
        run(&mut s);
        let reason = {
            s.expect(DestinationAction::Refuse);
            s.m.refusal().expect("a reason to send").to_string()
        };
        assert!(reason.contains(text), "{name}: {reason}");
        let e = s.result().expect_err(name);
        assert!(!e.committed(), "{name}");
        assert_eq!(s.count(|a| *a == DestinationAction::Resume), 0, "{name}");
        assert_eq!(s.count(|a| *a == DestinationAction::Pause), 0, "{name}");
    }
}

#[test]
fn an_abort_in_the_switch_ends_without_a_verdict() {
    let mut s = Script::new();
    s.record(Record::Abort {
        reason: "operator".into(),
    });
    let e = s.result().unwrap_err();
    assert!(matches!(e, DestinationError::Aborted(ref r) if r == "operator"));
    assert_eq!(s.count(|a| *a == DestinationAction::Refuse), 0);
}

#[test]
fn a_break_before_the_commit_waits_for_the_source_and_counts_as_a_recovery() {
    let mut s = Script::new();
    s.run_to_ready();
    s.expect(DestinationAction::ReadMain);
    let broke = s.now;
    s.handle(DestinationEvent::MainBroken(DestinationError::Connection(
        io::ErrorKind::ConnectionReset.into(),
    )));
    assert!(matches!(
        s.m.phase(),
        DestinationPhase::Paused {
            committed: false,
            ..
        }
    ));
    s.attempt(2, 3);
    s.record(Record::PostcopyCommit);
    s.expect(DestinationAction::Resume);
    s.handle(DestinationEvent::Resumed(Ok(())));
    assert_eq!(s.m.connections(), (Some(2), Some(3)));
    let r = s.m.recovered_before_commit().expect("a recovery");
    // Broken, then five steps to the commit on the new pair.
    assert_eq!(r.duration, s.now - broke - Duration::from_millis(1));
    assert_eq!(r.duration, Duration::from_millis(5));
    // No pause was announced: the guest had not run here.
    assert_eq!(s.phases(), vec![Phase::Postcopy]);
}

#[test]
fn a_break_before_the_commit_that_the_source_never_mends_ends_with_the_guest_not_run_here() {
    let mut s = Script::new();
    s.run_to_ready();
    s.expect(DestinationAction::ReadMain);
    s.handle(DestinationEvent::MainBroken(DestinationError::Connection(
        io::ErrorKind::ConnectionReset.into(),
    )));
    let DestinationAction::Accept { until } = s.poll() else {
        panic!()
    };
    s.now = until;
    let e = s.result().unwrap_err();
    assert!(matches!(e, DestinationError::Connection(_)), "{e:?}");
    assert!(e.to_string().contains("did not come back"), "{e}");
    assert_eq!(s.count(|a| *a == DestinationAction::Resume), 0);
    assert_eq!(s.count(|a| *a == DestinationAction::Pause), 0);
}

#[test]
fn after_a_break_a_stale_urgent_channel_is_dropped_and_the_latest_attempt_is_paired() {
    let mut s = Script::new();
    s.run_to_serving();
    s.serve(Service::Broken("main stream: reset".into()));
    assert!(matches!(
        s.m.phase(),
        DestinationPhase::Paused {
            committed: true,
            ..
        }
    ));
    // The urgent channel of an attempt the source gave up, still in the backlog.
    s.accept(2, both(URGENT, RESUME));
    s.expect(DestinationAction::Drop(2));
    // An attempt whose urgent channel never comes (the source gave it up too)...
    s.accept(3, RESUME);
    s.answer(DestinationAction::AnswerMain(3));
    // ... and the next: its main stream replaces the older one.
    s.accept(4, RESUME);
    s.answer(DestinationAction::AnswerMain(4));
    s.expect(DestinationAction::Drop(3));
    s.accept(5, both(URGENT, RESUME));
    s.answer(DestinationAction::AnswerUrgent(5));
    s.record(Record::PostcopyCommit);
    assert_eq!(s.m.phase(), DestinationPhase::Postcopy { connection: 2 });
    assert_eq!(s.m.connections(), (Some(4), Some(5)));
    // Resumed once, at the first commit.
    assert_eq!(s.count(|a| *a == DestinationAction::Resume), 1);
    s.serve(Service::Complete);
    assert!(s.result().is_ok());
    assert_eq!(
        s.phases(),
        vec![
            Phase::Postcopy,
            Phase::PostcopyPaused,
            Phase::Postcopy,
            Phase::Completed
        ]
    );
}

#[test]
fn an_attempt_that_breaks_before_its_commit_is_dropped_and_the_next_awaited() {
    let mut s = Script::new();
    s.run_to_serving();
    s.serve(Service::Broken("cut".into()));
    s.attempt(2, 3);
    s.expect(DestinationAction::ReadMain);
    s.handle(DestinationEvent::MainBroken(DestinationError::Connection(
        io::ErrorKind::UnexpectedEof.into(),
    )));
    s.expect(DestinationAction::Drop(2));
    s.expect(DestinationAction::Drop(3));
    // A connection that is no resume (a new migration) is refused; the wait goes on.
    s.accept(4, HeaderFlags::NONE);
    s.expect(DestinationAction::Drop(4));
    // An answer that cannot be written drops that connection only.
    s.accept(5, RESUME);
    s.expect(DestinationAction::AnswerMain(5));
    s.handle(DestinationEvent::Answered(
        5,
        Err(io::ErrorKind::BrokenPipe.into()),
    ));
    s.expect(DestinationAction::Drop(5));
    // A listener error waits a little and accepts again.
    assert!(matches!(s.poll(), DestinationAction::Accept { .. }));
    s.handle(DestinationEvent::Accepted(Err(io::ErrorKind::Other.into())));
    assert!(matches!(s.poll(), DestinationAction::Sleep { .. }));
    s.attempt(6, 7);
    s.record(Record::PostcopyCommit);
    assert_eq!(s.m.connections(), (Some(6), Some(7)));
    assert_eq!(s.m.phase(), DestinationPhase::Postcopy { connection: 2 });
}

#[test]
fn when_the_source_does_not_come_back_the_guest_is_paused_here_and_the_error_says_so() {
    for pause_fails in [false, true] {
        let mut s = Script::new();
        s.run_to_serving();
        s.serve(Service::Broken("urgent channel: reset".into()));
        // Half an attempt came.
        s.accept(2, RESUME);
        s.answer(DestinationAction::AnswerMain(2));
        let DestinationAction::Accept { until } = s.poll() else {
            panic!()
        };
        s.now = until;
        s.expect(DestinationAction::Drop(2));
        s.expect(DestinationAction::Pause);
        s.handle(DestinationEvent::Paused(if pause_fails {
            Err(VmError::new(VmOp::Pause, "stuck"))
        } else {
            Ok(())
        }));
        s.expect(DestinationAction::Done);
        let e = s.m.take_result().unwrap().unwrap_err();
        assert!(e.committed());
        match e {
            DestinationError::SourceLost {
                window, why, pause, ..
            } => {
                assert_eq!(window, WINDOW);
                assert!(why.contains("urgent channel: reset"), "{why}");
                assert_eq!(pause.is_some(), pause_fails);
            }
            e => panic!("{e:?}"),
        }
    }
}

#[test]
fn failures_after_the_commit_pause_the_guest() {
    // Page service fails for good.
    let mut s = Script::new();
    s.run_to_serving();
    s.serve(Service::Failed(DestinationError::Placement {
        page: 7,
        source: io::ErrorKind::OutOfMemory.into(),
    }));
    let e = s.result().unwrap_err();
    assert!(matches!(e, DestinationError::Placement { page: 7, .. }));
    assert_eq!(s.count(|a| *a == DestinationAction::Pause), 1);
    // A resumed stream that does not start with the commit.
    let mut s = Script::new();
    s.run_to_serving();
    s.serve(Service::Broken("cut".into()));
    s.attempt(2, 3);
    s.record(Record::EndOfData);
    let e = s.result().unwrap_err();
    assert!(e.to_string().contains("not the commit"), "{e}");
    assert_eq!(s.count(|a| *a == DestinationAction::Pause), 1);
}

fn or<E>(ok: bool, e: impl FnOnce() -> E) -> Result<(), E> {
    if ok { Ok(()) } else { Err(e()) }
}

/// What the property below answers to an action.
fn answer(a: DestinationAction, pick: u8) -> Option<DestinationEvent> {
    let ok = pick % 4 != 0;
    Some(match a {
        DestinationAction::ReadMain => DestinationEvent::Record(match pick % 9 {
            0 => Record::DeviceState(DeviceState::new("d", 1, vec![])),
            1 | 2 => Record::EndOfData,
            3 | 4 => Record::PostcopyCommit,
            5 => Record::Complete,
            6 => Record::Abort { reason: "x".into() },
            7 => {
                return Some(DestinationEvent::MainBroken(DestinationError::Connection(
                    io::ErrorKind::ConnectionReset.into(),
                )));
            }
            _ => {
                return Some(DestinationEvent::MainBroken(DestinationError::Protocol(
                    "x".into(),
                )));
            }
        }),
        DestinationAction::Accept { .. } => {
            let flags =
                [HeaderFlags::NONE, URGENT, RESUME, both(URGENT, RESUME)][usize::from(pick % 4)];
            match pick % 7 {
                0 => return None,
                1 => DestinationEvent::Accepted(Err(io::ErrorKind::Other.into())),
                _ => DestinationEvent::Accepted(Ok((u64::from(pick), flags))),
            }
        }
        DestinationAction::AnswerMain(id) | DestinationAction::AnswerUrgent(id) => {
            DestinationEvent::Answered(id, or(ok, || io::ErrorKind::BrokenPipe.into()))
        }
        DestinationAction::Prepare => {
            DestinationEvent::Prepared(or(ok, || DestinationError::Protocol("x".into())))
        }
        DestinationAction::SendReady => {
            DestinationEvent::Sent(or(ok, || io::ErrorKind::BrokenPipe.into()))
        }
        DestinationAction::Resume => {
            DestinationEvent::Resumed(or(ok, || VmError::new(VmOp::Resume, "x")))
        }
        DestinationAction::Pause => DestinationEvent::Paused(Ok(())),
        DestinationAction::Serve => DestinationEvent::Served(match pick % 3 {
            0 => Service::Complete,
            1 => Service::Broken("x".into()),
            _ => Service::Failed(DestinationError::Protocol("x".into())),
        }),
        DestinationAction::Drop(_)
        | DestinationAction::Refuse
        | DestinationAction::Finish
        | DestinationAction::Sleep { .. }
        | DestinationAction::Done => return None,
    })
}

proptest! {
    /// Whatever the source and the VMM do: the machine ends; the guest is resumed here at
    /// most once and only after a commit was read; it is paused here only after the
    /// commit; success means every page was served and the migration finished.
    #[test]
    fn the_guest_runs_here_only_after_the_commit_whatever_happens(
        picks in proptest::collection::vec(any::<u8>(), 1..200),
        gaps in proptest::collection::vec(0u64..4000, 1..50),
    ) {
        let mut s = Script::new();
        let mut commit_seen = false;
        let mut i = 0;
        let result = loop {
            prop_assert!(i < 20_000, "never ends");
            // Varied even when the input repeats (a source that sends device state for
            // ever is a stream that never ends, not a machine that does not).
            let pick = picks[i % picks.len()].wrapping_add((i as u8).wrapping_mul(37));
            s.now += Duration::from_millis(gaps[i % gaps.len()]);
            i += 1;
            let a = s.poll();
            match a {
                DestinationAction::Done => break s.m.take_result().expect("a result"),
                DestinationAction::Resume => prop_assert!(commit_seen, "resumed before a commit"),
                DestinationAction::Pause => prop_assert!(commit_seen, "paused before a commit"),
                DestinationAction::Sleep { until } => s.now = until,
                _ => {}
            }
            let e = answer(a, pick);
            if let Some(DestinationEvent::Record(Record::PostcopyCommit)) = &e
                && matches!(s.m.phase(), DestinationPhase::AwaitingCommit | DestinationPhase::Paused { .. })
            {
                commit_seen = true;
            }
            if let Some(e) = e {
                s.handle(e);
            }
        };
        prop_assert!(s.count(|a| *a == DestinationAction::Resume) <= 1);
        match result {
            Ok(()) => {
                prop_assert!(s.m.committed());
                prop_assert_eq!(s.count(|a| *a == DestinationAction::Finish), 1);
                prop_assert_eq!(s.count(|a| *a == DestinationAction::Pause), 0);
            }
            Err(e) if e.committed() => {
                prop_assert_eq!(s.count(|a| *a == DestinationAction::Pause), 1);
            }
            Err(_) => {}
        }
    }
}
