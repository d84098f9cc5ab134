//! The machine driven by hand with a fake clock, and a model of a source and a target
//! driven by proptest through any interleaving of writes, reads, landings and losses.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

const G: u64 = 4096;

fn cfg() -> MirrorConfig {
    MirrorConfig {
        granularity: G,
        io_size: 2 * G,
        max_in_flight: 4,
        buffer_bytes: 8 * G,
        rate_window: Duration::from_secs(1),
        reconnect_window: Duration::from_secs(10),
        reconnect_delay: Duration::from_millis(100),
        reconnect_delay_max: Duration::from_millis(400),
        reply_timeout: Duration::from_secs(5),
        ..MirrorConfig::default()
    }
}

fn copies(m: &mut MirrorMachine, now: Instant) -> Vec<(OpId, u64, u64)> {
    let mut out = Vec::new();
    while let Some(a) = m.poll_action(now) {
        match a {
            Action::Copy {
                op, offset, len, ..
            } => out.push((op, offset, len)),
            other => panic!("expected only copies, got {other:?}"),
        }
    }
    out
}

/// The copy `op` lands: its `len` bytes written as data.
fn land(m: &mut MirrorMachine, op: OpId, len: u64, now: Instant) {
    m.handle_copied(
        op,
        CopyOutcome {
            data: len,
            ..CopyOutcome::default()
        },
        now,
    );
}

fn land_all(m: &mut MirrorMachine, ops: &[(OpId, u64, u64)], now: Instant) {
    for &(op, _, len) in ops {
        land(m, op, len, now);
    }
}

fn expect_flush(m: &mut MirrorMachine, now: Instant) -> OpId {
    match m.poll_action(now) {
        Some(Action::Flush { op }) => op,
        other => panic!("expected a flush, got {other:?} in {}", m.phase()),
    }
}

/// Runs copies and flushes until ready.
fn run_to_ready(m: &mut MirrorMachine, now: Instant) {
    for _ in 0..1000 {
        match m.poll_action(now) {
            Some(Action::Copy { op, len, .. }) => land(m, op, len, now),
            Some(Action::Flush { op }) => m.handle_flushed(op, now),
            None if *m.phase() == Phase::Ready => return,
            other => panic!("unexpected {other:?} in {}", m.phase()),
        }
    }
    panic!("never ready: {}", m.phase());
}

/// A machine in auto mode over 64 clusters.
fn auto(t0: Instant) -> MirrorMachine {
    let c = MirrorConfig {
        mode: CopyMode::Auto,
        ..cfg()
    };
    MirrorMachine::new(64 * G, c, t0).unwrap()
}

/// A write-blocking machine over two clusters whose write to cluster 0 waits for the
/// bulk copies handed out, which are returned unlanded.
fn write_waiting_on_a_copy(now: Instant) -> (MirrorMachine, Vec<(OpId, u64, u64)>, WriteId) {
    let mut m = MirrorMachine::new(2 * G, cfg(), now).unwrap();
    m.set_mode(CopyMode::WriteBlocking, now);
    let ops = copies(&mut m, now);
    let WriteStart::Wait(id) = m.begin_write(0, 1, now) else {
        panic!("cluster 0 is being copied")
    };
    (m, ops, id)
}

#[test]
fn config_is_checked() {
    let now = Instant::now();
    let bad = [
        MirrorConfig {
            granularity: 3000,
            ..cfg()
        },
        MirrorConfig {
            granularity: 256,
            ..cfg()
        },
        MirrorConfig {
            io_size: G + 1,
            ..cfg()
        },
        MirrorConfig {
            max_in_flight: 0,
            ..cfg()
        },
        MirrorConfig {
            buffer_bytes: G,
            ..cfg()
        },
        MirrorConfig {
            reply_timeout: Duration::ZERO,
            ..cfg()
        },
    ];
    for c in bad {
        assert!(
            MirrorMachine::new(1 << 20, c.clone(), now).is_err(),
            "{c:?}"
        );
    }
    assert!(MirrorMachine::new(1 << 20, MirrorConfig::default(), now).is_ok());
}

#[test]
fn bulk_copies_in_io_sized_runs_within_the_in_flight_limits_then_flushes_then_is_ready() {
    let now = Instant::now();
    // 10 clusters and a short last one.
    let size = 10 * G + 100;
    let mut m = MirrorMachine::new(size, cfg(), now).unwrap();
    let first = copies(&mut m, now);
    // 4 in flight at most, 2 clusters each.
    assert_eq!(
        first.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(0, 2 * G), (2 * G, 2 * G), (4 * G, 2 * G), (6 * G, 2 * G)]
    );
    land_all(&mut m, &first[..1], now);
    let next = copies(&mut m, now);
    assert_eq!(
        next.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(8 * G, 2 * G)]
    );
    land_all(&mut m, &first[1..], now);
    let last = copies(&mut m, now);
    assert_eq!(
        last.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(10 * G, 100)],
        "the last cluster is cut at the end of the disk"
    );
    assert_eq!(*m.phase(), Phase::Bulk);
    land_all(&mut m, &next, now);
    land_all(&mut m, &last, now);
    let f = expect_flush(&mut m, now);
    assert_eq!(*m.phase(), Phase::Flushing { pass: 0 });
    assert_eq!(m.poll_action(now), None, "one flush at a time");
    m.handle_flushed(f, now);
    assert_eq!(*m.phase(), Phase::Ready);
    assert!(m.reached_ready());
    let s = m.stats(now);
    assert_eq!((s.bytes_copied, s.bytes_recopied, s.passes), (size, 0, 0));
}

#[test]
fn a_write_to_a_cluster_in_flight_makes_it_dirty_again_after_the_copy_and_never_copies_it_twice_at_once()
 {
    let now = Instant::now();
    let mut m = MirrorMachine::new(4 * G, cfg(), now).unwrap();
    let ops = copies(&mut m, now);
    assert_eq!(ops.len(), 2);
    // A write into the first copy's range while it is in flight.
    m.note_write(G + 10, 1, now);
    assert_eq!(m.dirty_clusters(), 1);
    // Not handed out again while its copy is in flight.
    assert_eq!(m.poll_action(now), None);
    land_all(&mut m, &ops[1..], now);
    assert_eq!(m.poll_action(now), None, "still in flight");
    land_all(&mut m, &ops[..1], now);
    // The pass ended with a dirty cluster: an iteration copies exactly it.
    let again = copies(&mut m, now);
    assert_eq!(*m.phase(), Phase::Iterating { pass: 1 });
    assert_eq!(
        again.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(G, G)]
    );
    land_all(&mut m, &again, now);
    let f = expect_flush(&mut m, now);
    m.handle_flushed(f, now);
    assert_eq!(*m.phase(), Phase::Ready);
    assert_eq!(m.stats(now).bytes_recopied, G);
}

#[test]
fn a_write_during_a_recopy_and_during_the_flush_starts_another_pass() {
    let now = Instant::now();
    let mut m = MirrorMachine::new(4 * G, cfg(), now).unwrap();
    let ops = copies(&mut m, now);
    m.note_write(0, 1, now);
    land_all(&mut m, &ops, now);
    let re = copies(&mut m, now);
    assert_eq!(*m.phase(), Phase::Iterating { pass: 1 });
    // During the re-copy, the same cluster again and another one.
    m.note_write(0, 1, now);
    m.note_write(3 * G, 1, now);
    assert_eq!(
        copies(&mut m, now),
        vec![],
        "both wait for the next pass: one is in flight, the other behind the cursor"
    );
    land_all(&mut m, &re, now);
    let re2 = copies(&mut m, now);
    assert_eq!(*m.phase(), Phase::Iterating { pass: 2 });
    assert_eq!(
        re2.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(0, G), (3 * G, G)]
    );
    land_all(&mut m, &re2, now);
    let f = expect_flush(&mut m, now);
    // A write while the flush is in flight: ready (nothing was dirty when it was sent),
    // and the write is copied from the ready phase.
    m.note_write(2 * G, 1, now);
    m.handle_flushed(f, now);
    assert_eq!(*m.phase(), Phase::Ready);
    assert_eq!(
        copies(&mut m, now)
            .iter()
            .map(|c| (c.1, c.2))
            .collect::<Vec<_>>(),
        vec![(2 * G, G)]
    );
}

/// QEMU's readiness rule: ready (after a flush) once nothing is dirty and nothing is in
/// flight. No pass over the whole disk has to end clean: a cluster dirtied behind the
/// cursor during the bulk pass makes a pass of its own, and ready follows it.
#[test]
fn ready_follows_the_first_moment_nothing_is_dirty_or_in_flight_without_a_clean_whole_pass() {
    let now = Instant::now();
    let mut m = MirrorMachine::new(8 * G, cfg(), now).unwrap();
    // A write into a cluster not copied yet dirties nothing new.
    m.note_write(7 * G, 1, now);
    assert_eq!(m.stats(now).bytes_dirtied, 0);
    let bulk = copies(&mut m, now);
    assert_eq!(bulk.len(), 4, "the whole disk in flight: {bulk:?}");
    land_all(&mut m, &bulk[..1], now);
    m.note_write(0, 1, now);
    assert_eq!(m.stats(now).bytes_dirtied, G);
    land_all(&mut m, &bulk[1..], now);
    let again = copies(&mut m, now);
    assert_eq!(
        again.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(0, G)],
        "the pass after the bulk one copies the one dirtied cluster"
    );
    assert_eq!(*m.phase(), Phase::Iterating { pass: 1 });
    land_all(&mut m, &again, now);
    let f = expect_flush(&mut m, now);
    m.handle_flushed(f, now);
    assert_eq!(*m.phase(), Phase::Ready);
    let st = m.stats(now);
    assert_eq!((st.passes, st.bytes_dirtied, st.bytes_recopied), (1, G, G));
}

#[test]
fn a_write_blocking_write_waits_for_the_bulk_copy_of_its_cluster_and_is_not_overtaken() {
    let now = Instant::now();
    let mut m = MirrorMachine::new(8 * G, cfg(), now).unwrap();
    m.set_mode(CopyMode::WriteBlocking, now);
    // Two copies in flight: [0, 2G) and [2G, 4G), then the in-flight budget is not full
    // but let the test hold them.
    let a = m.poll_action(now).unwrap();
    let Action::Copy { op: op_a, .. } = a else {
        panic!("{a:?}")
    };
    // A guest write of cluster 1, which copy A holds: it waits.
    let w = m.begin_write(G, 100, now);
    let WriteStart::Wait(id) = w else {
        panic!("{w:?}")
    };
    assert!(!m.write_claimed(id));
    // A write of a free cluster goes at once, and is not made dirty by its success.
    let WriteStart::Mirror(free) = m.begin_write(6 * G, 10, now) else {
        panic!("cluster 6 is free")
    };
    // The copies handed out now skip cluster 6 (claimed) but the pass goes on.
    let rest = copies(&mut m, now);
    assert_eq!(
        rest.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(2 * G, 2 * G), (4 * G, 2 * G), (7 * G, G)]
    );
    m.end_write(free, true, now);
    // Copy A lands: the waiting write now holds cluster 1.
    m.handle_copied(op_a, CopyOutcome::default(), now);
    assert!(m.write_claimed(id));
    // While it holds it, no copy of cluster 1 is handed out, even when dirty again.
    m.note_write(G, 1, now);
    land_all(&mut m, &rest, now);
    let next = copies(&mut m, now);
    assert!(
        next.iter().all(|c| c.1 != G),
        "cluster 1 is claimed: {next:?}"
    );
    m.end_write(id, true, now);
    // Cluster 6 was skipped by the bulk pass (claimed) and cluster 1 dirtied: both copied.
    let mut copied: Vec<u64> = next.iter().map(|c| c.1).collect();
    land_all(&mut m, &next, now);
    copied.extend(copies(&mut m, now).iter().map(|c| c.1));
    copied.sort_unstable();
    assert_eq!(copied, vec![G, 6 * G]);
    let s = m.stats(now);
    assert_eq!(s.blocking_writes, 2);
    assert!(s.write_latency_p50.is_some() && s.write_latency_p99.is_some());
}

#[test]
fn a_waiting_write_is_not_starved_by_new_copies_of_its_cluster() {
    let now = Instant::now();
    let (mut m, ops, id) = write_waiting_on_a_copy(now);
    m.note_write(0, 1, now); // a background write from elsewhere dirties it too
    land_all(&mut m, &ops, now);
    assert!(
        m.write_claimed(id),
        "the write gets the cluster before any new copy"
    );
    assert_eq!(m.poll_action(now), None);
    m.end_write(id, false, now); // it failed on the target: dirty
    run_to_ready(&mut m, now);
}

#[test]
fn switching_to_background_releases_waiting_writes_and_marks_them_dirty() {
    let now = Instant::now();
    let (mut m, ops, id) = write_waiting_on_a_copy(now);
    m.set_mode(CopyMode::Background, now);
    assert!(
        m.write_claimed(id),
        "released: it goes on as a background write"
    );
    assert_eq!(m.begin_write(0, 1, now), WriteStart::Background);
    m.end_write(id, true, now);
    land_all(&mut m, &ops, now);
    assert_eq!(m.dirty_clusters(), 1);
    let events: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(
                e,
                MirrorEvent::ModeSwitched {
                    automatic: false,
                    ..
                }
            ))
            .count(),
        2
    );
}

#[test]
fn auto_mode_switches_when_the_guest_dirties_faster_than_the_copy_cleans() {
    let t0 = Instant::now();
    let mut m = auto(t0);
    run_to_ready(&mut m, t0);
    let mut now = t0;
    // Then a slow link: one copy of 2 clusters lands every 100 ms (80 KiB/s), while the
    // guest dirties 4 clean clusters every 100 ms (160 KiB/s).
    let mut switched_at = None;
    for step in 1..40u64 {
        now = t0 + Duration::from_millis(100 * step);
        if let Some(Action::Copy { op, len, .. }) = m.poll_action(now) {
            land(&mut m, op, len, now);
        }
        for k in 0..4 {
            m.note_write(((step * 4 + k) % 64) * G, 1, now);
        }
        if m.is_write_blocking() && switched_at.is_none() {
            switched_at = Some(step);
        }
    }
    let at = switched_at.expect("auto mode never switched");
    assert!(at >= 10, "not before a whole window was seen (step {at})");
    let ev: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
    let sw = ev
        .iter()
        .find_map(|e| match e {
            MirrorEvent::ModeSwitched {
                write_blocking: true,
                automatic: true,
                dirty_rate,
                copy_rate,
            } => Some((*dirty_rate, *copy_rate)),
            _ => None,
        })
        .expect("a switch event");
    assert!(sw.0 > sw.1, "{sw:?}");
    assert_eq!(m.stats(now).mode_switches, 1);
}

#[test]
fn auto_mode_stays_background_when_the_copy_keeps_up() {
    let t0 = Instant::now();
    let mut m = auto(t0);
    for step in 0..40u64 {
        let now = t0 + Duration::from_millis(100 * step);
        // Fast copies, one rare write.
        let ops = copies(&mut m, now);
        land_all(&mut m, &ops, now);
        if step % 10 == 0 {
            m.note_write(0, 1, now);
        }
        while let Some(a) = m.poll_action(now) {
            match a {
                Action::Flush { op } => m.handle_flushed(op, now),
                Action::Copy { op, len, .. } => land(&mut m, op, len, now),
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(!m.is_write_blocking());
}

#[test]
fn auto_mode_switches_when_one_hot_cluster_is_rewritten_faster_than_it_is_copied() {
    let t0 = Instant::now();
    let mut m = auto(t0);
    // The bulk pass goes through; then one cluster is written again while each copy of
    // it is on the wire (a slow link), so the mirror is never clean.
    let mut now = t0;
    for step in 0..60u64 {
        now = t0 + Duration::from_millis(100 * step);
        let mut ops = Vec::new();
        while let Some(a) = m.poll_action(now) {
            match a {
                Action::Flush { op } => m.handle_flushed(op, now),
                Action::Copy {
                    op, offset, len, ..
                } => ops.push((op, offset, len)),
                other => panic!("{other:?}"),
            }
        }
        m.note_write(5 * G, 512, now);
        land_all(&mut m, &ops, now);
        if m.is_write_blocking() {
            break;
        }
    }
    assert!(!m.reached_ready());
    assert!(
        m.is_write_blocking(),
        "a hot cluster keeps the mirror from being in sync: {:?}",
        m.stats(now)
    );
    assert_eq!(m.stats(now).mode_switches, 1);
}

#[test]
fn a_lost_connection_requeues_what_was_in_flight_and_reconnects_with_backoff() {
    let t0 = Instant::now();
    let mut m = MirrorMachine::new(8 * G, cfg(), t0).unwrap();
    let ops = copies(&mut m, t0);
    land_all(&mut m, &ops[..1], t0);
    let dirty_before = m.dirty_clusters();
    m.handle_connection_lost(t0);
    assert_eq!(m.ops_in_flight(), 0);
    assert_eq!(
        m.dirty_clusters(),
        dirty_before + 6,
        "three copies of two put back"
    );
    // A late success of a lost copy changes nothing.
    land_all(&mut m, &ops[1..2], t0);
    assert_eq!(m.dirty_clusters(), dirty_before + 6);
    assert_eq!(m.poll_action(t0), Some(Action::Reconnect { attempt: 1 }));
    assert_eq!(
        m.poll_action(t0),
        Some(Action::WaitUntil(t0 + Duration::from_secs(10))),
        "no second attempt before the first is reported"
    );
    m.handle_reconnect_failed(t0);
    assert_eq!(
        m.poll_action(t0),
        Some(Action::WaitUntil(t0 + Duration::from_millis(100)))
    );
    let t1 = t0 + Duration::from_millis(100);
    assert_eq!(m.poll_action(t1), Some(Action::Reconnect { attempt: 2 }));
    m.handle_reconnect_failed(t1);
    assert_eq!(
        m.poll_action(t1),
        Some(Action::WaitUntil(t1 + Duration::from_millis(200)))
    );
    let t2 = t1 + Duration::from_millis(200);
    assert_eq!(m.poll_action(t2), Some(Action::Reconnect { attempt: 3 }));
    m.handle_reconnect_failed(t2);
    m.poll_action(t2 + Duration::from_millis(400));
    m.handle_reconnect_failed(t2 + Duration::from_millis(400));
    assert_eq!(
        m.poll_action(t2 + Duration::from_millis(400)),
        Some(Action::WaitUntil(t2 + Duration::from_millis(800))),
        "the delay stops growing at the maximum"
    );
    m.poll_action(t2 + Duration::from_millis(800));
    m.handle_reconnected(8 * G, t2 + Duration::from_millis(800));
    assert_eq!(*m.phase(), Phase::Bulk);
    let ev: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
    assert!(ev.contains(&MirrorEvent::ConnectionLost { requeued: 6 * G }));
    assert!(ev.contains(&MirrorEvent::Reconnected {
        attempts: 5,
        down_for: Duration::from_millis(1100)
    }));
    run_to_ready(&mut m, t2);
    assert_eq!(m.stats(t2).reconnects, 1);
}

#[test]
fn a_target_that_never_comes_back_fails_after_the_window() {
    let t0 = Instant::now();
    let mut m = MirrorMachine::new(8 * G, cfg(), t0).unwrap();
    run_to_ready(&mut m, t0);
    m.handle_connection_lost(t0);
    let mut now = t0;
    loop {
        match m.poll_action(now) {
            Some(Action::Reconnect { .. }) => m.handle_reconnect_failed(now),
            Some(Action::WaitUntil(t)) => {
                assert!(t > now);
                now = t;
            }
            Some(Action::Done) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(now, t0 + Duration::from_secs(10));
    match m.phase() {
        Phase::Failed(Failure::ReconnectWindow { window, attempts }) => {
            assert_eq!(*window, Duration::from_secs(10));
            assert!(*attempts > 20, "{attempts}");
        }
        p => panic!("{p}"),
    }
}

#[test]
fn a_target_that_comes_back_smaller_fails() {
    let t0 = Instant::now();
    let mut m = MirrorMachine::new(8 * G, cfg(), t0).unwrap();
    m.handle_connection_lost(t0);
    m.poll_action(t0);
    m.handle_reconnected(4 * G, t0);
    assert_eq!(
        *m.phase(),
        Phase::Failed(Failure::TargetTooSmall {
            target: 4 * G,
            source: 8 * G
        })
    );
    assert_eq!(m.poll_action(t0), Some(Action::Done));
}

#[test]
fn a_target_error_fails_the_job_with_the_range() {
    let t0 = Instant::now();
    let mut m = MirrorMachine::new(8 * G, cfg(), t0).unwrap();
    let ops = copies(&mut m, t0);
    assert_eq!(
        m.handle_op_failed(ops[1].0),
        Some(Failure::Copy {
            offset: 2 * G,
            len: 2 * G
        })
    );
    assert!(matches!(m.phase(), Phase::Failed(Failure::Copy { .. })));
    assert_eq!(m.poll_action(t0), Some(Action::Done));
}

#[test]
fn complete_is_refused_before_ready_and_flushes_what_is_left() {
    let t0 = Instant::now();
    let mut m = MirrorMachine::new(4 * G, cfg(), t0).unwrap();
    assert!(matches!(
        m.complete(),
        Err(StateError::NotReady { phase: Phase::Bulk })
    ));
    run_to_ready(&mut m, t0);
    m.note_write(0, 1, t0);
    m.complete().unwrap();
    assert_eq!(*m.phase(), Phase::Completing);
    let c = copies(&mut m, t0);
    assert_eq!(c.len(), 1);
    land_all(&mut m, &c, t0);
    let f = expect_flush(&mut m, t0);
    // A write that slipped in during the flush is copied and flushed again.
    m.note_write(3 * G, 1, t0);
    m.handle_flushed(f, t0);
    assert_eq!(*m.phase(), Phase::Completing);
    let c = copies(&mut m, t0);
    land_all(&mut m, &c, t0);
    let f = expect_flush(&mut m, t0);
    m.handle_flushed(f, t0);
    assert_eq!(*m.phase(), Phase::Completed);
    assert_eq!(m.poll_action(t0), Some(Action::Done));
}

#[test]
fn cancel_at_each_phase() {
    let t0 = Instant::now();
    // Bulk, with copies in flight: cancelling until they land.
    let mut m = MirrorMachine::new(8 * G, cfg(), t0).unwrap();
    let ops = copies(&mut m, t0);
    m.cancel();
    assert_eq!(*m.phase(), Phase::Cancelling);
    assert_eq!(m.poll_action(t0), None, "nothing new is handed out");
    land_all(&mut m, &ops[..3], t0);
    assert_eq!(*m.phase(), Phase::Cancelling);
    // A failed copy while cancelling ends it too, without failing the job.
    m.handle_op_failed(ops[3].0);
    assert_eq!(*m.phase(), Phase::Cancelled);
    assert_eq!(m.poll_action(t0), Some(Action::Done));
    // Flushing.
    let mut m = MirrorMachine::new(2 * G, cfg(), t0).unwrap();
    let ops = copies(&mut m, t0);
    land_all(&mut m, &ops, t0);
    let f = expect_flush(&mut m, t0);
    m.cancel();
    m.handle_flushed(f, t0);
    assert_eq!(*m.phase(), Phase::Cancelled);
    // Ready, idle: at once.
    let mut m = MirrorMachine::new(2 * G, cfg(), t0).unwrap();
    run_to_ready(&mut m, t0);
    m.cancel();
    assert_eq!(*m.phase(), Phase::Cancelled);
    // Reconnecting.
    let mut m = MirrorMachine::new(2 * G, cfg(), t0).unwrap();
    copies(&mut m, t0);
    m.handle_connection_lost(t0);
    m.cancel();
    assert_eq!(*m.phase(), Phase::Cancelled);
    // Completing.
    let mut m = MirrorMachine::new(2 * G, cfg(), t0).unwrap();
    run_to_ready(&mut m, t0);
    m.complete().unwrap();
    m.cancel();
    assert_eq!(*m.phase(), Phase::Cancelled);
    // Finished jobs stay as they are.
    m.cancel();
    m.fail(Failure::Flush);
    assert_eq!(*m.phase(), Phase::Cancelled);
}

#[test]
fn holes_may_be_skipped_only_on_a_first_copy_of_clusters_no_write_touched() {
    let t0 = Instant::now();
    let c = MirrorConfig {
        target_is_zero: true,
        ..cfg()
    };
    let mut m = MirrorMachine::new(4 * G, c, t0).unwrap();
    m.set_mode(CopyMode::WriteBlocking, t0);
    let WriteStart::Mirror(w) = m.begin_write(2 * G, 1, t0) else {
        panic!()
    };
    m.end_write(w, true, t0);
    let mut zero = Vec::new();
    while let Some(a) = m.poll_action(t0) {
        match a {
            Action::Copy {
                op,
                offset,
                target_zero,
                ..
            } => {
                zero.push((offset, target_zero));
                m.handle_copied(op, CopyOutcome::default(), t0);
            }
            Action::Flush { op } => m.handle_flushed(op, t0),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(zero, vec![(0, true), (2 * G, false)]);
    m.note_write(0, 1, t0);
    let Some(Action::Copy { target_zero, .. }) = m.poll_action(t0) else {
        panic!()
    };
    assert!(!target_zero, "a re-copy never assumes zeroes");
}

/// A lost connection restarts the bulk pass: a cluster whose copy landed before the loss
/// and that a background write dirtied while reconnecting is copied again in the bulk
/// phase, and must not skip holes (the write may have zeroed what the target holds).
#[test]
fn a_bulk_pass_restarted_by_a_loss_zeroes_holes_in_clusters_it_had_copied() {
    let t0 = Instant::now();
    let c = MirrorConfig {
        target_is_zero: true,
        ..cfg()
    };
    let mut m = MirrorMachine::new(16 * G, c, t0).unwrap();
    let ops = copies(&mut m, t0);
    assert!(ops.len() > 1);
    land_all(&mut m, &ops[..1], t0);
    m.handle_connection_lost(t0);
    m.note_write(ops[0].1, G, t0);
    assert_eq!(m.poll_action(t0), Some(Action::Reconnect { attempt: 1 }));
    m.handle_reconnected(16 * G, t0);
    assert_eq!(*m.phase(), Phase::Bulk);
    let mut seen = Vec::new();
    while let Some(Action::Copy {
        op,
        offset,
        len,
        target_zero,
    }) = m.poll_action(t0)
    {
        seen.push((offset, target_zero));
        land_all(&mut m, &[(op, offset, len)], t0);
    }
    for &(_, off, _) in &ops {
        assert!(
            seen.contains(&(off, false)),
            "{off} was copied (or was in flight) before the loss: {seen:?}"
        );
    }
    assert!(
        seen.iter().any(|&(o, z)| o >= 8 * G && z),
        "untouched clusters still skip holes: {seen:?}"
    );
}

#[test]
fn a_target_that_answers_nothing_for_the_reply_timeout_is_hung_up_and_its_copies_requeued() {
    let t0 = Instant::now();
    let mut m = MirrorMachine::new(16 * G, cfg(), t0).unwrap();
    let ops = copies(&mut m, t0);
    assert_eq!(ops.len(), 4);
    let dirty = m.dirty_clusters();
    assert_eq!(m.reply_deadline(), Some(t0 + Duration::from_secs(5)));
    let almost = t0 + Duration::from_millis(4999);
    assert_eq!(m.poll_action(almost), None, "not yet");
    assert_eq!(m.poll_timeout(almost), None);
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(
        m.poll_action(t1),
        Some(Action::HangUp(Stalled {
            waited: Duration::from_secs(5),
            unanswered: 4
        }))
    );
    assert_eq!(m.ops_in_flight(), 0);
    assert_eq!(m.dirty_clusters(), dirty + 8, "four copies of two put back");
    assert_eq!(
        m.reply_deadline(),
        None,
        "nothing to time out while reconnecting"
    );
    let ev: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
    let stalled = ev
        .iter()
        .position(|e| matches!(e, MirrorEvent::TargetStalled(_)));
    let lost = ev
        .iter()
        .position(|e| *e == MirrorEvent::ConnectionLost { requeued: 8 * G });
    assert!(stalled.is_some() && stalled < lost, "{ev:?}");
    // A late answer on the hung connection changes nothing.
    land_all(&mut m, &ops, t1);
    assert_eq!(m.dirty_clusters(), dirty + 8);
    assert_eq!(m.poll_action(t1), Some(Action::Reconnect { attempt: 1 }));
    m.handle_reconnected(16 * G, t1);
    assert_eq!(*m.phase(), Phase::Bulk);
    run_to_ready(&mut m, t1);
    assert_eq!(m.stats(t1).reconnects, 1);
}

#[test]
fn a_slow_target_that_keeps_answering_is_never_timed_out() {
    let t0 = Instant::now();
    let mut m = MirrorMachine::new(64 * G, cfg(), t0).unwrap();
    let mut in_flight = copies(&mut m, t0);
    // One answer every 3 s: the oldest copies wait far longer than the timeout, but the
    // target is still answering.
    for k in 1..=8u32 {
        let now = t0 + Duration::from_secs(3) * k;
        assert_eq!(m.poll_timeout(now), None, "timed out at {k}");
        let done = in_flight.remove(0);
        land_all(&mut m, &[done], now);
        in_flight.extend(copies(&mut m, now));
        assert_eq!(m.reply_deadline(), Some(now + Duration::from_secs(5)));
    }
    assert_eq!(m.phase(), &Phase::Bulk);
}

#[test]
fn a_hung_flush_and_a_hung_write_blocking_write_time_out_too() {
    let t0 = Instant::now();
    let mut m = MirrorMachine::new(4 * G, cfg(), t0).unwrap();
    let ops = copies(&mut m, t0);
    land_all(&mut m, &ops, t0);
    let _flush = expect_flush(&mut m, t0);
    let t1 = t0 + Duration::from_secs(5);
    assert!(matches!(
        m.poll_action(t1),
        Some(Action::HangUp(Stalled { unanswered: 1, .. }))
    ));
    assert!(
        matches!(m.phase(), Phase::Reconnecting { resume, .. } if **resume == Phase::Iterating { pass: 0 }),
        "{}",
        m.phase()
    );
    assert_eq!(m.poll_action(t1), Some(Action::Reconnect { attempt: 1 }));
    m.handle_reconnected(4 * G, t1);
    run_to_ready(&mut m, t1);
    // Ready and idle: nothing waits, so nothing times out however long it stays so.
    assert_eq!(m.reply_deadline(), None);
    assert_eq!(m.poll_action(t1 + Duration::from_secs(3600)), None);
    // A write-blocking write that the target never answers.
    m.set_mode(CopyMode::WriteBlocking, t1);
    let t2 = t1 + Duration::from_secs(3600);
    let WriteStart::Mirror(id) = m.begin_write(0, 100, t2) else {
        panic!("the cluster is free")
    };
    assert_eq!(m.reply_deadline(), Some(t2 + Duration::from_secs(5)));
    let t3 = t2 + Duration::from_secs(5);
    assert_eq!(
        m.poll_action(t3),
        Some(Action::HangUp(Stalled {
            waited: Duration::from_secs(5),
            unanswered: 1
        }))
    );
    // Hung up, the write fails and leaves its cluster dirty for the new connection.
    m.end_write(id, false, t3);
    assert_eq!(m.dirty_clusters(), 1);
    assert_eq!(m.poll_action(t3), Some(Action::Reconnect { attempt: 1 }));
    m.handle_reconnected(4 * G, t3);
    run_to_ready(&mut m, t3);
}

// The model: bytes of a source and a target, and a driver whose copies read the source at
// a moment of the script's choosing and land later, in any order.

const MODEL_CLUSTERS: u64 = 12;
const MODEL_G: u64 = 512;

#[derive(Debug, Clone)]
enum Step {
    Write {
        offset: u64,
        len: u64,
        byte: u8,
    },
    Poll,
    Read(usize),
    Land(usize),
    FinishWrite(usize),
    Lose {
        landed_mask: u8,
    },
    Mode(u8),
    Tick,
    /// The target answers nothing for the reply timeout.
    Stall,
}

fn step() -> impl Strategy<Value = Step> {
    let size = MODEL_CLUSTERS * MODEL_G;
    prop_oneof![
        4 => (0..size, 1..3 * MODEL_G, any::<u8>()).prop_map(move |(o, l, b)| Step::Write {
            offset: o,
            len: l.min(size - o),
            byte: b
        }),
        4 => Just(Step::Poll),
        3 => (0..8usize).prop_map(Step::Read),
        3 => (0..8usize).prop_map(Step::Land),
        2 => (0..4usize).prop_map(Step::FinishWrite),
        1 => any::<u8>().prop_map(|m| Step::Lose { landed_mask: m }),
        1 => (0..3u8).prop_map(Step::Mode),
        1 => Just(Step::Tick),
        1 => Just(Step::Stall),
    ]
}

struct InFlight {
    op: OpId,
    offset: u64,
    len: u64,
    /// The machine said the target reads as zeroes here: zero bytes are not written.
    target_zero: bool,
    read: Option<Vec<u8>>,
}

impl InFlight {
    /// Puts what was read on the target, skipping zeroes where the machine allowed it
    /// (byte by byte, more than the driver skips, so a wrong allowance shows).
    fn land_on(&self, dst: &mut [u8], data: &[u8]) {
        let d = &mut dst[self.offset as usize..(self.offset + self.len) as usize];
        for (t, &b) in d.iter_mut().zip(data) {
            if b != 0 || !self.target_zero {
                *t = b;
            }
        }
    }
}

struct Model {
    m: MirrorMachine,
    src: Vec<u8>,
    dst: Vec<u8>,
    copies: Vec<InFlight>,
    flushes: Vec<OpId>,
    /// Write-blocking writes: id, offset, data; `wrote_source` once the source holds it.
    writes: Vec<(WriteId, u64, Vec<u8>, bool)>,
    now: Instant,
}

impl Model {
    fn new(mode: CopyMode) -> Model {
        let now = Instant::now();
        let size = (MODEL_CLUSTERS * MODEL_G) as usize;
        let c = MirrorConfig {
            granularity: MODEL_G,
            io_size: 2 * MODEL_G,
            max_in_flight: 3,
            buffer_bytes: 8 * MODEL_G,
            mode,
            rate_window: Duration::from_millis(50),
            // Well inside the reconnection window, which a stall right after a loss (before
            // the model reconnects) must not use up.
            reply_timeout: Duration::from_secs(1),
            // The model's target starts as zeroes, so the first copies may skip them.
            target_is_zero: true,
            ..MirrorConfig::default()
        };
        let src: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        Model {
            m: MirrorMachine::new(size as u64, c, now).unwrap(),
            src,
            dst: vec![0; size],
            copies: Vec::new(),
            flushes: Vec::new(),
            writes: Vec::new(),
            now,
        }
    }

    fn read(&mut self, i: usize) {
        if let Some(c) = self.copies.iter_mut().filter(|c| c.read.is_none()).nth(i) {
            c.read = Some(self.src[c.offset as usize..(c.offset + c.len) as usize].to_vec());
        }
    }

    fn land(&mut self, i: usize) {
        let Some(pos) = self
            .copies
            .iter()
            .enumerate()
            .filter(|(_, c)| c.read.is_some())
            .map(|(p, _)| p)
            .nth(i)
        else {
            return;
        };
        let c = self.copies.remove(pos);
        let data = c.read.as_deref().expect("read");
        c.land_on(&mut self.dst, data);
        self.m.handle_copied(c.op, CopyOutcome::default(), self.now);
    }

    fn poll(&mut self) {
        while let Some(a) = self.m.poll_action(self.now) {
            match a {
                Action::Copy {
                    op,
                    offset,
                    len,
                    target_zero,
                } => self.copies.push(InFlight {
                    op,
                    offset,
                    len,
                    target_zero,
                    read: None,
                }),
                Action::Flush { op } => self.flushes.push(op),
                Action::Reconnect { .. } => {
                    let size = self.m.size();
                    self.m.handle_reconnected(size, self.now)
                }
                Action::HangUp(_) => {
                    // The driver waits for the hung connections to close before copying
                    // again: what was sent lands (or not) before any new copy. Here every
                    // other one that was read lands.
                    for (k, c) in std::mem::take(&mut self.copies).into_iter().enumerate() {
                        if let (Some(d), 0) = (&c.read, k % 2) {
                            c.land_on(&mut self.dst, d);
                        }
                    }
                    // Flushes sent on the hung connection are never answered.
                    self.flushes.clear();
                }
                Action::WaitUntil(t) => self.now = t,
                Action::Done => break,
            }
        }
        for op in std::mem::take(&mut self.flushes) {
            self.m.handle_flushed(op, self.now);
        }
    }

    fn write(&mut self, offset: u64, len: u64, byte: u8) {
        let data = vec![byte; len as usize];
        match self.m.begin_write(offset, len, self.now) {
            WriteStart::Background => {
                self.src[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                self.m.note_write(offset, len, self.now);
            }
            WriteStart::Mirror(id) => {
                self.src[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                self.writes.push((id, offset, data, true));
            }
            WriteStart::Wait(id) => self.writes.push((id, offset, data, false)),
        }
    }

    /// Moves write-blocking write `i` on: once claimed, the source, then the target.
    fn finish_write(&mut self, i: usize) {
        if i >= self.writes.len() {
            return;
        }
        let (id, offset, ref data, wrote) = self.writes[i];
        let range = offset as usize..offset as usize + data.len();
        if !wrote {
            if self.m.write_claimed(id) {
                self.src[range].copy_from_slice(&data.clone());
                self.writes[i].3 = true;
            }
            return;
        }
        let (id, _, data, _) = self.writes.remove(i);
        self.dst[range].copy_from_slice(&data);
        self.m.end_write(id, true, self.now);
    }

    fn lose(&mut self, landed_mask: u8) {
        // What was read may have landed before the connection went; the rest is lost.
        for (k, c) in std::mem::take(&mut self.copies).into_iter().enumerate() {
            if let Some(d) = &c.read {
                if landed_mask & (1 << (k % 8)) != 0 {
                    c.land_on(&mut self.dst, d);
                }
            }
        }
        self.m.handle_connection_lost(self.now);
    }

    /// No more guest writes: drive everything to completion.
    fn finish(&mut self) {
        for _ in 0..10_000 {
            if let Some(i) = self
                .writes
                .iter()
                .position(|w| w.3 || self.m.write_claimed(w.0))
            {
                self.finish_write(i);
                continue;
            }
            if !self.copies.is_empty() {
                self.read(0);
                self.land(0);
                continue;
            }
            if self.m.reached_ready() && *self.m.phase() == Phase::Ready {
                self.m.complete().unwrap();
            }
            if *self.m.phase() == Phase::Completed {
                return;
            }
            self.poll();
        }
        panic!("the model never completed: {}", self.m.phase());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever the order of guest writes, reads of the source, landings on the target,
    /// connection losses and mode switches, a completed mirror's target equals its source.
    #[test]
    fn any_interleaving_ends_with_the_target_equal_to_the_source(
        mode in 0..3u8,
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let modes = [CopyMode::Background, CopyMode::WriteBlocking, CopyMode::Auto];
        let mut md = Model::new(modes[mode as usize]);
        for s in steps {
            match s {
                Step::Write { offset, len, byte } => md.write(offset, len, byte),
                Step::Poll => md.poll(),
                Step::Read(i) => md.read(i),
                Step::Land(i) => md.land(i),
                Step::FinishWrite(i) => md.finish_write(i),
                Step::Lose { landed_mask } => md.lose(landed_mask),
                Step::Mode(k) => {
                    let now = md.now;
                    md.m.set_mode(modes[k as usize], now)
                }
                Step::Tick => md.now += Duration::from_millis(20),
                Step::Stall => {
                    md.now += md.m.config().reply_timeout;
                    md.poll();
                }
            }
        }
        md.finish();
        prop_assert!(md.src == md.dst, "target differs from source at {:?}",
            md.src.iter().zip(&md.dst).position(|(a, b)| a != b));
    }
}

#[test]
fn an_incremental_mirror_copies_only_the_clusters_of_its_bitmap_then_tracks_writes() {
    let now = Instant::now();
    let size = 16 * G;
    let mut dirty = DirtyBitmap::new(16);
    dirty.set(3);
    dirty.set_range(10..12);
    let mut m = MirrorMachine::new_incremental(size, cfg(), dirty, now).unwrap();
    let first = copies(&mut m, now);
    assert_eq!(
        first.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(3 * G, G), (10 * G, 2 * G)]
    );
    // A guest write during the copy is tracked as in a full mirror.
    m.note_write(7 * G, 10, now);
    land_all(&mut m, &first, now);
    let again = copies(&mut m, now);
    assert_eq!(
        again.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(7 * G, G)]
    );
    land_all(&mut m, &again, now);
    run_to_ready(&mut m, now);
    let s = m.stats(now);
    assert_eq!(s.bytes_copied, 4 * G);
}

#[test]
fn an_incremental_mirror_refuses_a_bitmap_of_another_disk_or_a_zero_target() {
    let now = Instant::now();
    assert_eq!(
        MirrorMachine::new_incremental(16 * G, cfg(), DirtyBitmap::new(15), now).err(),
        Some(ConfigError::BitmapLength {
            bits: 15,
            clusters: 16
        })
    );
    let zero = MirrorConfig {
        target_is_zero: true,
        ..cfg()
    };
    assert_eq!(
        MirrorMachine::new_incremental(16 * G, zero, DirtyBitmap::new(16), now).err(),
        Some(ConfigError::IncrementalOntoZero)
    );
}
