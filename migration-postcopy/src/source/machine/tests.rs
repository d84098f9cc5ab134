//! The source machine driven by scripts, with a fake clock: every step of the switch, a
//! failure and a cancel at each point before the commit, the commit point, recovery with
//! its backoff and window, and a property over arbitrary outcomes.

use super::*;
use migration_core::stream::Verdict;
use migration_core::vm::VmOp;
use proptest::prelude::*;

const PAGES: usize = 64;

fn start(tracker: bool, throttle: u8, t0: Instant) -> SwitchStart {
    let mut need = DirtyBitmap::new(PAGES);
    need.set_range(0..16);
    let mut discard = DirtyBitmap::new(PAGES);
    discard.set_range(8..16);
    SwitchStart {
        need,
        discard,
        tracker,
        throttle,
        precopy: MigrationStats::default(),
        reason: "test".into(),
        started: t0,
    }
}

fn opts() -> SourceOptions {
    SourceOptions {
        ready_timeout: Some(Duration::from_secs(5)),
        recovery_window: Duration::from_secs(10),
        ..SourceOptions::default()
    }
}

fn vm_err(op: VmOp) -> VmError {
    VmError::new(op, "scripted")
}

/// A scripted peer and VMM: answers each action as told, records every action, and moves
/// the fake clock by `step` per action.
struct Script {
    m: SourceMachine,
    now: Instant,
    step: Duration,
    actions: Vec<SourceAction>,
}

impl Script {
    fn new(tracker: bool, throttle: u8) -> Script {
        let now = Instant::now();
        Script {
            m: SourceMachine::new(start(tracker, throttle, now), &opts()),
            now,
            step: Duration::from_millis(1),
            actions: Vec::new(),
        }
    }

    fn poll(&mut self) -> SourceAction {
        self.now += self.step;
        let a = self.m.poll(self.now);
        self.actions.push(a);
        a
    }

    fn handle(&mut self, e: SourceEvent) {
        self.m.handle(e, self.now);
    }

    /// Answers every action successfully until `stop` is asked for (not answered).
    fn run_until(&mut self, stop: SourceAction) {
        for _ in 0..100 {
            let a = self.poll();
            if a == stop {
                return;
            }
            self.ok(a);
        }
        panic!("{stop:?} never asked for: {:?}", self.actions);
    }

    fn ok(&mut self, a: SourceAction) {
        let e = match a {
            SourceAction::OpenUrgent => SourceEvent::UrgentOpened(Ok(())),
            SourceAction::Pause => SourceEvent::Paused(Ok(())),
            SourceAction::SetThrottle(_) => SourceEvent::Throttled(Ok(())),
            SourceAction::SyncTracker => {
                let mut last = DirtyBitmap::new(PAGES);
                last.set(40);
                SourceEvent::Synced(Ok(last))
            }
            SourceAction::StopTracker => SourceEvent::TrackerStopped(Ok(())),
            SourceAction::SaveDeviceState => SourceEvent::DeviceState(Ok(vec![])),
            SourceAction::SendSwitch | SourceAction::SendCommit => SourceEvent::Sent(Ok(())),
            SourceAction::Wait { .. } => {
                SourceEvent::Return(ReturnRecord::Ack(Ack::PostcopyReady(48)))
            }
            SourceAction::Serve => SourceEvent::Served(Ok(()), Served::default()),
            SourceAction::Dial => SourceEvent::Dialled(Ok(DirtyBitmap::new(PAGES))),
            SourceAction::Resume => SourceEvent::Resumed(Ok(())),
            SourceAction::Sleep { .. } | SourceAction::Close | SourceAction::Done => return,
        };
        self.handle(e);
    }

    /// Finishes with every action succeeding; returns the result.
    fn finish(&mut self) -> Result<SourceReport, SourceError> {
        for _ in 0..1000 {
            let a = self.poll();
            if a == SourceAction::Done {
                return self.m.take_result().expect("a result once done");
            }
            self.ok(a);
        }
        panic!("never done: {:?}", self.actions);
    }

    fn events(&mut self) -> Vec<ProgressEvent> {
        std::iter::from_fn(|| self.m.poll_event()).collect()
    }

    fn count(&self, a: SourceAction) -> usize {
        self.actions.iter().filter(|&&x| x == a).count()
    }
}

fn phases(events: &[ProgressEvent]) -> Vec<Phase> {
    events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Phase(p) => Some(*p),
            _ => None,
        })
        .collect()
}

#[test]
fn a_pure_switch_goes_urgent_pause_state_switch_ready_commit_serve() {
    let mut s = Script::new(false, 0);
    let r = s.finish().expect("completes");
    use SourceAction::*;
    assert_eq!(
        s.actions,
        vec![
            OpenUrgent,
            Pause,
            SaveDeviceState,
            SendSwitch,
            Wait {
                until: Some(s.actions_deadline())
            },
            SendCommit,
            Serve,
            Done
        ]
    );
    // Paused at the 2nd step, commit written at the 6th: 4 ms of fake time.
    assert_eq!(r.downtime, Duration::from_millis(4));
    assert_eq!(r.discarded, 8);
    assert_eq!(
        phases(&s.events()),
        vec![Phase::StopAndCopy, Phase::Postcopy, Phase::Completed]
    );
    assert!(s.m.committed());
}

impl Script {
    /// The ready deadline the machine set: 5 s after the switch was sent (the 4th step).
    fn actions_deadline(&self) -> Instant {
        match self
            .actions
            .iter()
            .find(|a| matches!(a, SourceAction::Wait { .. }))
        {
            Some(SourceAction::Wait { until: Some(d) }) => *d,
            other => panic!("no wait with a deadline: {other:?}"),
        }
    }
}

#[test]
fn a_hybrid_lifts_the_throttle_syncs_a_last_time_and_discards_what_it_found() {
    let mut s = Script::new(true, 30);
    s.run_until(SourceAction::SendSwitch);
    use SourceAction::*;
    assert_eq!(
        s.actions,
        vec![
            OpenUrgent,
            Pause,
            SetThrottle(0),
            SyncTracker,
            StopTracker,
            SaveDeviceState,
            SendSwitch
        ]
    );
    let mut out = BytesMut::new();
    s.m.write_switch(&mut out);
    let mut dec = migration_core::stream::StreamDecoder::new(Default::default());
    let mut header = BytesMut::new();
    migration_core::stream::StreamHeader::new([0; 16])
        .encode(migration_core::stream::Direction::Migration, &mut header);
    header.extend_from_slice(&out);
    let mut records = Vec::new();
    while let Some(f) = dec.decode(&mut header).expect("decodes") {
        if let migration_core::stream::Frame::Record(r) = f {
            records.push(r);
        }
    }
    let discard: Vec<Range<u64>> = records
        .iter()
        .filter_map(|r| match r {
            Record::SwitchToPostcopy { discard } => Some(discard.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    // The pre-copy's discard list and the page the last sync found.
    assert_eq!(discard, vec![8..16, 40..41]);
    assert!(matches!(records.last(), Some(Record::EndOfData)));
    s.handle(SourceEvent::Sent(Ok(())));
    s.run_until(SourceAction::Serve);
    // The push sends what pre-copy left and the page the last sync found.
    assert_eq!(s.m.plan().lock().unwrap().remaining(), 17);
}

/// Each point before the commit where a failure can come, and the failure there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailAt {
    Urgent,
    Pause,
    Throttle,
    Sync,
    DeviceState,
    SendSwitch,
    VerdictFailed,
    Closed,
    UnexpectedRecord,
    ReadyTimeout,
    Commit,
}

const FAIL_POINTS: [FailAt; 11] = [
    FailAt::Urgent,
    FailAt::Pause,
    FailAt::Throttle,
    FailAt::Sync,
    FailAt::DeviceState,
    FailAt::SendSwitch,
    FailAt::VerdictFailed,
    FailAt::Closed,
    FailAt::UnexpectedRecord,
    FailAt::ReadyTimeout,
    FailAt::Commit,
];

/// Runs a hybrid switch that fails at `at`; returns the script after `Done`.
fn fail_at(at: FailAt) -> (Script, SourceError) {
    let mut s = Script::new(true, 30);
    for _ in 0..200 {
        let a = s.poll();
        let e = match (a, at) {
            (SourceAction::Done, _) => {
                let e = s.m.take_result().expect("result").expect_err("fails");
                return (s, e);
            }
            (SourceAction::OpenUrgent, FailAt::Urgent) => {
                SourceEvent::UrgentOpened(Err("refused".into()))
            }
            (SourceAction::Pause, FailAt::Pause) => SourceEvent::Paused(Err(vm_err(VmOp::Pause))),
            (SourceAction::SetThrottle(30..), _) => unreachable!(),
            (SourceAction::SetThrottle(0), FailAt::Throttle) if !s.m.failure_pending() => {
                SourceEvent::Throttled(Err(vm_err(VmOp::Throttle)))
            }
            (SourceAction::SyncTracker, FailAt::Sync) => SourceEvent::Synced(Err("sync".into())),
            (SourceAction::SaveDeviceState, FailAt::DeviceState) => {
                SourceEvent::DeviceState(Err(vm_err(VmOp::SaveState)))
            }
            (SourceAction::SendSwitch, FailAt::SendSwitch) => {
                SourceEvent::Sent(Err("broken pipe".into()))
            }
            (SourceAction::Wait { .. }, FailAt::VerdictFailed) => {
                SourceEvent::Return(ReturnRecord::Verdict(Verdict::Failed {
                    reason: "no room".into(),
                }))
            }
            (SourceAction::Wait { .. }, FailAt::Closed) => SourceEvent::ReturnClosed(None),
            (SourceAction::Wait { .. }, FailAt::UnexpectedRecord) => {
                SourceEvent::Return(ReturnRecord::Verdict(Verdict::Running))
            }
            (SourceAction::Wait { until }, FailAt::ReadyTimeout) => {
                // Nothing comes; the clock passes the deadline.
                s.now = until.expect("a ready deadline");
                continue;
            }
            (SourceAction::SendCommit, FailAt::Commit) => {
                SourceEvent::Sent(Err("connection reset".into()))
            }
            (a, _) => {
                s.ok(a);
                continue;
            }
        };
        s.handle(e);
    }
    panic!("never done: {:?}", s.actions);
}

impl SourceMachine {
    fn failure_pending(&self) -> bool {
        self.failure.is_some()
    }
}

#[test]
fn every_failure_before_the_commit_resumes_the_guest_here_and_never_serves() {
    for at in FAIL_POINTS {
        let (s, e) = fail_at(at);
        let paused = s.count(SourceAction::Pause) == 1;
        assert_eq!(
            s.count(SourceAction::Resume),
            usize::from(paused && at != FailAt::Urgent),
            "{at:?}: {:?}",
            s.actions
        );
        assert_eq!(paused, at != FailAt::Urgent, "{at:?}");
        assert_eq!(s.count(SourceAction::Serve), 0, "{at:?}");
        assert_eq!(s.count(SourceAction::Close), 1, "{at:?}");
        assert!(!s.m.committed(), "{at:?}");
        // The tracker is stopped, the throttle lifted, whatever failed.
        assert_eq!(
            s.count(SourceAction::StopTracker),
            1,
            "{at:?}: {:?}",
            s.actions
        );
        assert!(s.actions.contains(&SourceAction::SetThrottle(0)), "{at:?}");
        match e {
            SourceError::Switch { why, resume: None } => {
                let expect = match at {
                    FailAt::Urgent => "urgent channel",
                    FailAt::Pause => "pausing",
                    FailAt::Throttle => "throttling",
                    FailAt::Sync => "sync",
                    FailAt::DeviceState => "saving device state",
                    FailAt::SendSwitch => "sending the switch",
                    FailAt::VerdictFailed => "no room",
                    FailAt::Closed => "closed the connection before it was ready",
                    FailAt::UnexpectedRecord => "unexpected",
                    FailAt::ReadyTimeout => "not ready in time",
                    FailAt::Commit => "writing the commit",
                };
                assert!(why.contains(expect), "{at:?}: {why}");
            }
            e => panic!("{at:?}: {e:?}"),
        }
        assert!(
            !SourceError::Switch {
                why: String::new(),
                resume: None
            }
            .guest_lost()
        );
    }
}

#[test]
fn a_failed_resume_is_said_in_the_error() {
    let mut s = Script::new(false, 0);
    s.run_until(SourceAction::SendSwitch);
    s.handle(SourceEvent::Sent(Err("gone".into())));
    assert_eq!(s.poll(), SourceAction::Resume);
    s.handle(SourceEvent::Resumed(Err(vm_err(VmOp::Resume))));
    assert_eq!(s.poll(), SourceAction::Close);
    assert_eq!(s.poll(), SourceAction::Done);
    let e = s.m.take_result().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            SourceError::Switch {
                resume: Some(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("resuming the guest failed"), "{e}");
}

#[test]
fn a_cancel_at_each_point_before_the_commit_resumes_and_after_it_is_refused() {
    // Cancel after the n-th action, for every n up to the commit.
    for n in 0..8 {
        let mut s = Script::new(true, 30);
        for _ in 0..n {
            let a = s.poll();
            s.ok(a);
        }
        s.handle(SourceEvent::Cancel);
        let r = s.finish();
        assert!(matches!(r, Err(SourceError::Cancelled)), "after {n}: {r:?}");
        assert_eq!(s.count(SourceAction::Serve), 0);
        assert_eq!(
            s.count(SourceAction::Resume),
            s.count(SourceAction::Pause),
            "after {n}: {:?}",
            s.actions
        );
    }
    // After the commit is written, a cancel changes nothing.
    let mut s = Script::new(false, 0);
    s.run_until(SourceAction::Serve);
    s.handle(SourceEvent::Served(Err("cut".into()), Served::default()));
    s.handle(SourceEvent::Cancel);
    let r = s.finish().expect("post-copy completes despite the cancel");
    assert_eq!(r.recoveries.len(), 1);
    assert_eq!(s.count(SourceAction::Resume), 0);
}

#[test]
fn a_cancel_while_the_commit_is_written_comes_too_late() {
    let mut s = Script::new(false, 0);
    assert_eq!(
        {
            s.run_until(SourceAction::SendCommit);
            s.handle(SourceEvent::Cancel);
            s.handle(SourceEvent::Sent(Ok(())));
            s.poll()
        },
        SourceAction::Serve
    );
    assert!(s.m.committed());
}

#[test]
fn a_break_after_the_commit_dials_again_with_backoff_and_takes_up_the_bitmap() {
    let mut s = Script::new(false, 0);
    s.step = Duration::ZERO;
    s.run_until(SourceAction::Serve);
    let served = Served {
        pushed: 5,
        requests: 2,
        requested: 2,
        bytes: 7 * 4096,
    };
    let broke = s.now;
    s.handle(SourceEvent::Served(Err("cut".into()), served));
    assert_eq!(
        s.m.phase(),
        SourcePhase::Recovering {
            since: broke,
            attempts: 0
        }
    );
    // The first attempt at once, then 10, 20, 40 ms apart.
    let mut waits = Vec::new();
    for _ in 0..4 {
        assert_eq!(s.poll(), SourceAction::Dial);
        s.handle(SourceEvent::Dialled(Err("refused".into())));
        match s.poll() {
            SourceAction::Sleep { until } => {
                waits.push(until - s.now);
                s.now = until;
            }
            a => panic!("{a:?}"),
        }
    }
    assert_eq!(waits, [10, 20, 40, 80].map(Duration::from_millis).to_vec());
    assert_eq!(s.poll(), SourceAction::Dial);
    // The destination holds the first 10 pages: the rest is pushed again.
    let mut have = DirtyBitmap::new(PAGES);
    have.set_range(0..10);
    s.handle(SourceEvent::Dialled(Ok(have)));
    assert_eq!(s.m.phase(), SourcePhase::Postcopy { connection: 2 });
    assert_eq!(s.m.plan().lock().unwrap().remaining(), PAGES - 10);
    assert_eq!(s.poll(), SourceAction::Serve);
    s.handle(SourceEvent::Served(Ok(()), served));
    assert_eq!(s.poll(), SourceAction::Done);
    let r = s.m.take_result().unwrap().unwrap();
    assert_eq!(r.recoveries.len(), 1);
    assert_eq!(r.recoveries[0].attempts, 5);
    assert_eq!(r.recoveries[0].duration, s.now - broke);
    assert_eq!((r.pages_pushed, r.requests, r.bytes), (10, 4, 14 * 4096));
    assert_eq!(
        phases(&s.events()),
        vec![
            Phase::StopAndCopy,
            Phase::Postcopy,
            Phase::PostcopyPaused,
            Phase::Postcopy,
            Phase::Completed
        ]
    );
}

#[test]
fn the_backoff_stops_growing_at_one_second() {
    let mut s = Script::new(false, 0);
    s.step = Duration::ZERO;
    s.run_until(SourceAction::Serve);
    s.handle(SourceEvent::Served(Err("cut".into()), Served::default()));
    let mut longest = Duration::ZERO;
    for _ in 0..12 {
        assert_eq!(s.poll(), SourceAction::Dial);
        s.handle(SourceEvent::Dialled(Err("refused".into())));
        if let SourceAction::Sleep { until } = s.poll() {
            longest = longest.max(until - s.now);
            s.now = until;
        }
    }
    assert_eq!(longest, MAX_BACKOFF);
}

#[test]
fn when_the_window_passes_the_guest_is_lost_never_resumed_here() {
    let mut s = Script::new(false, 0);
    s.run_until(SourceAction::Serve);
    s.handle(SourceEvent::Served(
        Err("connection reset".into()),
        Served::default(),
    ));
    let mut attempts = 0;
    let r = loop {
        match s.poll() {
            SourceAction::Dial => {
                attempts += 1;
                s.handle(SourceEvent::Dialled(Err("no route to host".into())));
            }
            SourceAction::Sleep { until } => s.now = until,
            SourceAction::Done => break s.m.take_result().unwrap(),
            a => panic!("{a:?}"),
        }
    };
    assert_eq!(s.count(SourceAction::Resume), 0);
    let e = r.unwrap_err();
    assert!(e.guest_lost());
    let text = e.to_string();
    assert!(text.contains("connection reset"), "{text}");
    assert!(text.contains("no route to host"), "{text}");
    assert!(text.contains(&format!("{attempts} attempts")), "{text}");
    assert!(text.contains("roll the guest back"), "{text}");
    match e {
        SourceError::DestinationLost {
            window, missing, ..
        } => {
            assert_eq!(window, Duration::from_secs(10));
            // Nothing was pushed before the break: every page the push had is missing.
            assert_eq!(missing, 16);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_second_break_after_a_recovery_is_recovered_too() {
    let mut s = Script::new(false, 0);
    s.run_until(SourceAction::Serve);
    for _ in 0..2 {
        s.handle(SourceEvent::Served(Err("cut".into()), Served::default()));
        assert_eq!(s.poll(), SourceAction::Dial);
        s.handle(SourceEvent::Dialled(Ok(DirtyBitmap::new(PAGES))));
        assert_eq!(s.poll(), SourceAction::Serve);
    }
    assert_eq!(s.m.phase(), SourcePhase::Postcopy { connection: 3 });
    s.handle(SourceEvent::Served(Ok(()), Served::default()));
    assert_eq!(s.poll(), SourceAction::Done);
    assert_eq!(s.m.take_result().unwrap().unwrap().recoveries.len(), 2);
}

#[test]
fn return_records_outside_the_switch_change_nothing() {
    let mut s = Script::new(false, 0);
    s.run_until(SourceAction::Serve);
    s.m.handle(
        SourceEvent::Return(ReturnRecord::Verdict(Verdict::Failed {
            reason: "late".into(),
        })),
        s.now,
    );
    s.m.handle(SourceEvent::ReturnClosed(None), s.now);
    assert_eq!(s.m.phase(), SourcePhase::Postcopy { connection: 1 });
}

/// An outcome for an action in the property below.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok,
    Fail,
    Cancel,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![6 => Just(Outcome::Ok), 2 => Just(Outcome::Fail), 1 => Just(Outcome::Cancel)]
}

proptest! {
    /// Whatever each step gives: the machine ends; before the commit every end resumes a
    /// paused guest exactly once; after it, the guest is never resumed here; success only
    /// follows the destination's verdict.
    #[test]
    fn the_commit_point_holds_whatever_happens(
        tracker in any::<bool>(),
        throttle in prop_oneof![Just(0u8), Just(40u8)],
        outcomes in proptest::collection::vec(outcome(), 1..80),
        gaps in proptest::collection::vec(0u64..3000, 1..80),
    ) {
        let mut s = Script::new(tracker, throttle);
        let mut i = 0;
        let mut committed_at_action = None;
        let result = loop {
            prop_assert!(i < 10_000, "never ends: {:?}", &s.actions[s.actions.len().saturating_sub(20)..]);
            let o = outcomes[i % outcomes.len()];
            s.step = Duration::from_millis(gaps[i % gaps.len()]);
            i += 1;
            if matches!(o, Outcome::Cancel) {
                s.handle(SourceEvent::Cancel);
            }
            let a = s.poll();
            if s.m.committed() && committed_at_action.is_none() {
                committed_at_action = Some(s.actions.len() - 1);
            }
            let fail = matches!(o, Outcome::Fail);
            let e = match a {
                SourceAction::Done => break s.m.take_result().expect("a result"),
                SourceAction::Sleep { until } => { s.now = until; continue; }
                SourceAction::Close => continue,
                SourceAction::Wait { until } if fail => {
                    if let Some(d) = until { s.now = d; }
                    continue;
                }
                SourceAction::OpenUrgent if fail => SourceEvent::UrgentOpened(Err("x".into())),
                SourceAction::Pause if fail => SourceEvent::Paused(Err(vm_err(VmOp::Pause))),
                SourceAction::SetThrottle(_) if fail => SourceEvent::Throttled(Err(vm_err(VmOp::Throttle))),
                SourceAction::SyncTracker if fail => SourceEvent::Synced(Err("x".into())),
                SourceAction::StopTracker if fail => SourceEvent::TrackerStopped(Err("x".into())),
                SourceAction::SaveDeviceState if fail => SourceEvent::DeviceState(Err(vm_err(VmOp::SaveState))),
                SourceAction::SendSwitch | SourceAction::SendCommit if fail => SourceEvent::Sent(Err("x".into())),
                SourceAction::Serve if fail => SourceEvent::Served(Err("x".into()), Served::default()),
                SourceAction::Dial if fail => SourceEvent::Dialled(Err("x".into())),
                SourceAction::Resume if fail => SourceEvent::Resumed(Err(vm_err(VmOp::Resume))),
                a => { s.ok(a); continue; }
            };
            s.handle(e);
        };
        let resumes = s.count(SourceAction::Resume);
        match (&result, committed_at_action) {
            (Ok(_), Some(_)) => prop_assert_eq!(resumes, 0),
            (Ok(_), None) => prop_assert!(false, "success without a commit"),
            (Err(e), Some(c)) => {
                prop_assert!(e.guest_lost(), "{e:?}");
                prop_assert!(!s.actions[c..].contains(&SourceAction::Resume));
                prop_assert_eq!(resumes, 0);
            }
            (Err(e), None) => {
                prop_assert!(matches!(e, SourceError::Switch { .. } | SourceError::Cancelled), "{e:?}");
                prop_assert_eq!(resumes, s.count(SourceAction::Pause));
                prop_assert_eq!(s.count(SourceAction::Serve), 0);
            }
        }
        if let Ok(r) = &result {
            prop_assert_eq!(s.count(SourceAction::Serve), r.recoveries.len() + 1);
        }
    }
}
