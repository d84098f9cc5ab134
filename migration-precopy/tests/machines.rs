//! The pre-copy state machines driven deterministically, without sockets, threads or
//! sleeps: a scripted tracker that plays the guest (it writes RAM and reports the pages it
//! wrote at each sync), a fake clock (instants advanced by the test), VM doubles that log
//! what they were asked, and an in-memory link between the two machines that can be cut,
//! corrupted or stalled at any point.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use migration_core::bitmap::DirtyBitmap;
use migration_core::dirty::TrackerError;
use migration_core::geometry::GuestRam;
use migration_core::layout::RamLayout;
use migration_core::stats::{Phase, ProgressEvent};
use migration_core::stream::{
    DecoderOptions, DeviceState, Frame, RecordType, ReturnDecoder, ReturnRecord,
};
use migration_core::vm::{VmError, VmOp};
use migration_precopy::policy::NotConverged;
use migration_precopy::{
    DestinationAction, DestinationError, DestinationEvent, DestinationMachine, DestinationOptions,
    LimitPolicy, ProtocolViolation, ReturnPathError, SourceAction, SourceError, SourceEvent,
    SourceMachine, SourceOptions, SourceResult,
};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

const PAGE: usize = 4096;
const PAGES: usize = 64;

fn mem() -> GuestMemoryMmap {
    // Two regions with a gap, so batches split at a region boundary.
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), PAGES / 2 * PAGE),
        (GuestAddress(1 << 20), PAGES / 2 * PAGE),
    ])
    .unwrap()
}

fn gpa(layout: &RamLayout, page: usize) -> GuestAddress {
    GuestAddress(layout.page_to_gpa(page).unwrap())
}

/// What the guest does between two syncs: writes (page, offset, bytes).
type Step = Vec<(usize, usize, Vec<u8>)>;

/// Plays the guest: at each sync it applies the next step's writes to RAM and reports
/// those pages dirty. With the steps used up, the guest is idle.
struct ScriptedTracker {
    steps: VecDeque<Step>,
    started: bool,
    stopped: bool,
    fail_sync: Option<usize>,
    syncs: usize,
}

impl ScriptedTracker {
    fn new(steps: Vec<Step>) -> Self {
        ScriptedTracker {
            steps: steps.into(),
            started: false,
            stopped: false,
            fail_sync: None,
            syncs: 0,
        }
    }

    fn sync(
        &mut self,
        mem: &GuestMemoryMmap,
        layout: &RamLayout,
        into: &mut DirtyBitmap,
    ) -> Result<(), TrackerError> {
        self.syncs += 1;
        if self.fail_sync == Some(self.syncs) {
            return Err(TrackerError::NotStarted {
                backend: "scripted",
            });
        }
        if let Some(step) = self.steps.pop_front() {
            for (page, off, bytes) in step {
                mem.write_slice(&bytes, GuestAddress(gpa(layout, page).0 + off as u64))
                    .unwrap();
                into.set(page);
            }
        }
        Ok(())
    }
}

/// The source VM double: what it was asked, and what it refuses.
#[derive(Default)]
struct SourceVm {
    log: Vec<String>,
    paused: bool,
    throttle: u8,
    fail_resume: bool,
    fail_unthrottle: bool,
}

/// The destination VM double.
#[derive(Default)]
struct DestVm {
    loaded: Vec<DeviceState>,
    resumed: bool,
}

/// Where the link between the two machines breaks.
#[derive(Default, Clone, Copy)]
struct Faults {
    /// The source's writes fail once this many bytes went through (the destination sees
    /// the end of the stream after them).
    cut_after: Option<u64>,
    /// Flip the byte at this offset of the migration stream.
    corrupt_at: Option<u64>,
    /// The destination stops answering (reads nothing more) once it sent its `Running`.
    stall_after_verdict: bool,
    /// The destination never acknowledges a pass.
    no_acks: bool,
    /// Cancel the source as soon as it reports this phase.
    cancel_at: Option<Phase>,
    /// The destination's verify refuses the guest.
    refuse_verify: bool,
    /// Ask the source to hand over to post-copy as soon as it reports this phase.
    handover_at: Option<Phase>,
}

struct World {
    src_mem: GuestMemoryMmap,
    dst_mem: GuestMemoryMmap,
    layout: RamLayout,
    src: SourceMachine,
    dst: DestinationMachine,
    tracker: ScriptedTracker,
    svm: SourceVm,
    dvm: DestVm,
    faults: Faults,
    /// Migration-stream bytes on their way to the destination.
    wire: BytesMut,
    /// What the destination has received and not decoded yet.
    dst_in: BytesMut,
    /// Return-path bytes on their way to the source.
    ret_wire: BytesMut,
    ret_dec: ReturnDecoder,
    ret_closed: bool,
    sent: u64,
    cut: bool,
    events: Vec<ProgressEvent>,
    t0: Instant,
    now: Duration,
    src_result: Option<SourceResult>,
    dst_result: Option<Result<migration_precopy::DestinationStats, DestinationError>>,
    dst_eof: bool,
    dst_stalled: bool,
    populated: Option<DirtyBitmap>,
    /// The deadline the source waits for, if it waits.
    src_wait: Option<Instant>,
    /// How fast the link is: the writer is busy this long per byte (1: 1 GB/s).
    link_ns_per_byte: u64,
    /// The destination's last action was the end of a pass: its next transmit is the
    /// acknowledgement.
    dst_acking: bool,
}

impl World {
    fn new(opts: SourceOptions, steps: Vec<Step>) -> World {
        let src_mem = mem();
        let layout = RamLayout::of_memory(&src_mem).unwrap();
        // Data in every page but the last few, which stay untouched.
        for p in 0..PAGES - 4 {
            let v: Vec<u8> = (0..PAGE).map(|i| (i * 7 + p * 13) as u8).collect();
            src_mem.write_slice(&v, gpa(&layout, p)).unwrap();
        }
        let t0 = Instant::now();
        World {
            dst_mem: mem(),
            src: SourceMachine::new(layout.clone(), &opts, t0).unwrap(),
            dst: DestinationMachine::new(&DestinationOptions::default(), t0),
            tracker: ScriptedTracker::new(steps),
            svm: SourceVm::default(),
            dvm: DestVm::default(),
            faults: Faults::default(),
            wire: BytesMut::new(),
            dst_in: BytesMut::new(),
            ret_wire: BytesMut::new(),
            ret_dec: ReturnDecoder::new(DecoderOptions::default()),
            ret_closed: false,
            sent: 0,
            cut: false,
            events: Vec::new(),
            t0,
            now: Duration::ZERO,
            src_result: None,
            dst_result: None,
            dst_eof: false,
            dst_stalled: false,
            populated: None,
            src_wait: None,
            link_ns_per_byte: 1,
            dst_acking: false,
            src_mem,
            layout,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + self.now
    }

    /// Neither side can go on: time passes, to the source's deadline if it has one.
    fn let_time_pass(&mut self) {
        let now = self.now();
        match self.src_wait.take() {
            Some(u) if u > now => self.now += u - now,
            _ => self.now += Duration::from_millis(100),
        }
    }

    /// Runs both machines until both are done (or `limit` steps, which fails the test).
    fn run(&mut self) {
        for _ in 0..100_000 {
            let src_done = self.src_result.is_some();
            let dst_done = self.dst_result.is_some();
            if src_done && dst_done {
                return;
            }
            let mut progressed = false;
            if !src_done {
                progressed |= self.step_source();
            }
            if !dst_done && !self.dst_stalled {
                progressed |= self.step_destination();
            }
            if !progressed {
                self.let_time_pass();
            }
            if self.now > Duration::from_secs(3600) {
                panic!(
                    "no end in an hour of fake time: source {:?}, destination {:?}",
                    self.src_result.is_some(),
                    self.dst_result.is_some()
                );
            }
        }
        panic!("no end after 100000 steps");
    }

    /// One action of the source. Returns whether it did anything but wait.
    fn step_source(&mut self) -> bool {
        // Return-path records first, as the threaded driver delivers them.
        if !self.ret_closed {
            loop {
                match self.ret_dec.decode(&mut self.ret_wire) {
                    Ok(Some(Frame::Record(r))) => {
                        let end = r.is_terminal();
                        self.src.handle(SourceEvent::Return(r), self.now());
                        if end {
                            self.ret_closed = true;
                            self.src.handle(SourceEvent::ReturnClosed(None), self.now());
                            break;
                        }
                    }
                    Ok(Some(Frame::Header(_))) => {}
                    Ok(None) => break,
                    Err(e) => panic!("return path: {e}"),
                }
            }
        }
        if !self.ret_closed && self.ret_wire.is_empty() {
            let why = if self.cut {
                Some(ReturnPathError::Io(
                    std::io::ErrorKind::ConnectionReset.into(),
                ))
            } else if self.dst_result.is_some() {
                Some(ReturnPathError::Closed)
            } else {
                None
            };
            if let Some(why) = why {
                self.ret_closed = true;
                self.src
                    .handle(SourceEvent::ReturnClosed(Some(why)), self.now());
            }
        }
        let now = self.now();
        let action = self.src.poll(now);
        if std::env::var_os("TRACE").is_some() {
            eprintln!("{:?} src {action:?}", self.now);
        }
        let ram = GuestRam::with_layout(&self.src_mem, self.layout.clone());
        let ev = match action {
            SourceAction::Transmit => {
                let mut buf = BytesMut::new();
                self.src.write_next(&ram, &mut buf, now);
                self.send(&buf).err().map(SourceEvent::SendFailed)
            }
            SourceAction::Flush { .. } => Some(if self.cut {
                SourceEvent::SendFailed(std::io::ErrorKind::BrokenPipe.into())
            } else {
                SourceEvent::Flushed
            }),
            SourceAction::StartTracker => {
                self.tracker.started = true;
                Some(SourceEvent::TrackerStarted(Ok(())))
            }
            SourceAction::SyncTracker => {
                let r = self
                    .tracker
                    .sync(&self.src_mem, &self.layout, self.src.dirty_mut());
                Some(SourceEvent::TrackerSynced(r))
            }
            SourceAction::StopTracker => {
                self.tracker.stopped = true;
                Some(SourceEvent::TrackerStopped(Ok(())))
            }
            SourceAction::ScanPopulated => Some(SourceEvent::Populated(self.populated.take())),
            SourceAction::Pause => {
                self.svm.log.push("pause".into());
                self.svm.paused = true;
                Some(SourceEvent::Paused(Ok(())))
            }
            SourceAction::Resume => {
                self.svm.log.push("resume".into());
                if self.svm.fail_resume {
                    Some(SourceEvent::Resumed(Err(VmError::new(
                        VmOp::Resume,
                        "the vCPU threads are gone",
                    ))))
                } else {
                    self.svm.paused = false;
                    Some(SourceEvent::Resumed(Ok(())))
                }
            }
            SourceAction::SetThrottle(p) => {
                self.svm.log.push(format!("throttle {p}"));
                if p == 0 && self.svm.fail_unthrottle {
                    Some(SourceEvent::Throttled(Err(VmError::new(
                        VmOp::Throttle,
                        "the throttle thread is gone",
                    ))))
                } else {
                    self.svm.throttle = p;
                    Some(SourceEvent::Throttled(Ok(())))
                }
            }
            SourceAction::SaveDeviceState => {
                self.svm.log.push("save".into());
                Some(SourceEvent::DeviceState(Ok(vec![DeviceState::new(
                    "vcpu0",
                    1,
                    vec![1u8, 2, 3],
                )])))
            }
            SourceAction::Wait { until } => {
                // Nothing to hear yet: the loop lets time pass once both sides wait.
                self.src_wait = until;
                self.drain_events();
                return false;
            }
            SourceAction::Close => {
                self.cut = true;
                None
            }
            SourceAction::Done => {
                self.src_result = self.src.take_result();
                None
            }
            other => panic!("unknown action {other:?}"),
        };
        if let Some(ev) = ev {
            self.src.handle(ev, self.now());
        }
        self.src.handle_link(
            self.sent,
            Duration::from_nanos(self.sent * self.link_ns_per_byte),
        );
        self.drain_events();
        self.now += Duration::from_micros(10);
        true
    }

    fn drain_events(&mut self) {
        while let Some(e) = self.src.poll_event() {
            if let (ProgressEvent::Phase(p), Some(c)) = (&e, self.faults.cancel_at) {
                if *p == c {
                    self.src.handle(SourceEvent::Cancel, self.now());
                }
            }
            if let (ProgressEvent::Phase(p), Some(h)) = (&e, self.faults.handover_at) {
                if *p == h {
                    self.src.handle(SourceEvent::HandOver, self.now());
                }
            }
            self.events.push(e);
        }
    }

    fn send(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.cut {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let mut buf = buf.to_vec();
        if let Some(at) = self.faults.corrupt_at {
            if (self.sent..self.sent + buf.len() as u64).contains(&at) {
                buf[(at - self.sent) as usize] ^= 0x40;
            }
        }
        if let Some(cut) = self.faults.cut_after {
            if self.sent + buf.len() as u64 > cut {
                let keep = (cut - self.sent) as usize;
                self.wire.extend_from_slice(&buf[..keep]);
                self.sent = cut;
                self.cut = true;
                return Err(std::io::ErrorKind::ConnectionReset.into());
            }
        }
        self.sent += buf.len() as u64;
        self.wire.extend_from_slice(&buf);
        Ok(())
    }

    /// One action of the destination. Returns whether it did anything.
    fn step_destination(&mut self) -> bool {
        let now = self.now();
        let action = self.dst.poll(&mut self.dst_in, now);
        if std::env::var_os("TRACE").is_some() {
            eprintln!("{:?} dst {action:?}", self.now);
        }
        let ev = match action {
            DestinationAction::NeedInput => {
                if !self.wire.is_empty() {
                    let n = self.wire.len();
                    self.dst_in.extend_from_slice(&self.wire.split());
                    Some(DestinationEvent::Received(n))
                } else if self.cut && !self.dst_eof {
                    self.dst_eof = true;
                    Some(DestinationEvent::Eof)
                } else {
                    return false;
                }
            }
            DestinationAction::Transmit => {
                let out = self.dst.take_transmit();
                let ack = std::mem::take(&mut self.dst_acking);
                // A broken connection carries nothing back either.
                let dropped = self.faults.no_acks && ack;
                if !self.cut && !dropped {
                    self.ret_wire.extend_from_slice(&out);
                }
                Some(DestinationEvent::Transmitted(Ok(())))
            }
            DestinationAction::Configured => {
                self.dst.begin(&self.layout);
                None
            }
            DestinationAction::PlacePages(batch) => {
                let ram = GuestRam::with_layout(&self.dst_mem, self.layout.clone());
                let mut counts = migration_core::stats::PageCounts::default();
                let mut dec = migration_core::page::PageDecoder::new().unwrap();
                let mut page = vec![0u8; PAGE];
                for p in &batch.pages {
                    ram.read_page(p.index as usize, &mut page).unwrap();
                    dec.apply(p.data.as_encoded(), &mut page).unwrap();
                    ram.write_page(p.index as usize, &page).unwrap();
                    counts.raw += 1;
                }
                Some(DestinationEvent::PagesPlaced(Ok(counts)))
            }
            DestinationAction::PassEnded => {
                self.dst_acking = true;
                None
            }
            DestinationAction::FinishRam => Some(DestinationEvent::RamFinished(Ok(()))),
            DestinationAction::LoadDeviceState => {
                self.dvm.loaded = self.dst.device_states().to_vec();
                Some(DestinationEvent::StateLoaded(Ok(())))
            }
            DestinationAction::Verify => {
                Some(DestinationEvent::Verified(if self.faults.refuse_verify {
                    Err("RAM hash differs".into())
                } else {
                    Ok(())
                }))
            }
            DestinationAction::Resume => {
                self.dvm.resumed = true;
                Some(DestinationEvent::Resumed(Ok(())))
            }
            DestinationAction::Shutdown(_) => None,
            DestinationAction::Done => {
                self.dst_result = self.dst.take_result();
                None
            }
            other => panic!("unknown action {other:?}"),
        };
        if let Some(ev) = ev {
            let verdict = matches!(ev, DestinationEvent::Transmitted(_))
                && self.faults.stall_after_verdict
                && self.dst_verdict_sent();
            self.dst.handle(ev, now);
            if verdict {
                self.dst_stalled = true;
            }
        }
        true
    }

    fn dst_verdict_sent(&self) -> bool {
        // The destination has decoded EndOfData once it loaded the device state.
        !self.dvm.loaded.is_empty()
    }

    fn phases(&self) -> Vec<Phase> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ProgressEvent::Phase(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn ram_equal(&self) {
        let mut a = vec![0u8; PAGE];
        let mut b = vec![0u8; PAGE];
        for (p, addr) in self.layout.pages() {
            self.src_mem.read_slice(&mut a, GuestAddress(addr)).unwrap();
            self.dst_mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            assert!(a == b, "page {p} differs between source and destination");
        }
    }

    fn source_error(&mut self) -> SourceError {
        match self.src_result.take() {
            Some(SourceResult::Failed(e)) => e,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Why pre-copy handed over, and the pages it left dirty.
    #[track_caller]
    fn handed_over(&mut self) -> (NotConverged, DirtyBitmap) {
        match self.src_result.take() {
            Some(SourceResult::HandOver {
                not_converged,
                dirty,
                ..
            }) => (not_converged, dirty),
            other => panic!("{other:?}"),
        }
    }

    fn completed(&mut self) -> migration_core::stats::MigrationStats {
        match self.src_result.take() {
            Some(SourceResult::Completed(s)) => s,
            other => panic!("expected Completed, got {other:?}"),
        }
    }
}

fn opts() -> SourceOptions {
    SourceOptions {
        batch_pages: 4,
        ..SourceOptions::default()
    }
}

/// A guest that writes a few pages per period, shrinking to nothing.
fn shrinking() -> Vec<Step> {
    vec![
        (0..40).map(|p| (p, 8, vec![0xa5; 16])).collect(),
        (0..3).map(|p| (p * 7, 100, vec![0x5a; 4])).collect(),
        vec![(9, 0, vec![1])],
    ]
}

/// A guest that rewrites the first 8 bytes of pages 0 to 39 with `byte` in each of
/// `periods` periods.
fn rewriting_40_pages(periods: usize, byte: u8) -> Vec<Step> {
    (0..periods)
        .map(|_| (0..40).map(|p| (p, 0, vec![byte; 8])).collect())
        .collect()
}

#[test]
fn a_migration_runs_through_every_phase_in_order_and_ram_is_equal() {
    let mut w = World::new(opts(), shrinking());
    w.run();
    let stats = w.completed();
    assert_eq!(
        w.phases(),
        vec![
            Phase::Setup,
            Phase::BulkCopy,
            Phase::Iterating,
            Phase::StopAndCopy,
            Phase::AwaitingVerdict,
            Phase::Completed
        ]
    );
    assert!(w.dst_result.as_ref().unwrap().is_ok());
    assert!(w.dvm.resumed, "the destination runs the guest");
    assert_eq!(w.dvm.loaded.len(), 1);
    assert_eq!(
        w.svm.log,
        ["pause", "save"],
        "never resumed after the commit"
    );
    assert!(w.tracker.started && w.tracker.stopped);
    assert!(
        stats.iterations.len() >= 3,
        "bulk, a pass, the final pass: {stats:?}"
    );
    assert_eq!(stats.pages.total(), w.dst.stats().pages.total());
    w.ram_equal();
}

/// A byte that changes and changes back (a lock word), in a page that is re-sent once in
/// a full batch and once in the last, partial batch of a pass: with deltas on, the
/// destination must end with the source's bytes. The engine once flushed that partial
/// batch without reading or updating the delta cache, so the next delta of the page was
/// computed against a stale copy and the destination kept a byte the source no longer had.
#[test]
fn a_lock_word_that_flips_back_is_migrated_exactly_with_delta_encoding() {
    for zstd in [None, Some(1)] {
        const LOCK: usize = 20;
        let mut steps = Vec::new();
        for round in 0..7u8 {
            let word = if round % 2 == 0 { 0xff } else { 0 };
            let mut s: Step = vec![(LOCK, 64, vec![word; 8])];
            if round % 2 == 0 {
                // The lock page leads a full batch of four...
                s.extend((LOCK + 1..LOCK + 4).map(|p| (p, 0, vec![round; 32])));
            } else {
                // ...or comes alone after one: the last, partial batch.
                s.extend((10..14).map(|p| (p, 0, vec![round; 32])));
            }
            steps.push(s);
        }
        let o = SourceOptions {
            delta_cache_bytes: Some(1 << 20),
            zstd_level: zstd,
            // Any dirty page is over the limit: every round is a pass of its own, until
            // the guest goes quiet.
            downtime_limit: Duration::from_nanos(1),
            device_state_estimate: 0,
            ..opts()
        };
        let mut w = World::new(o, steps);
        w.run();
        let stats = w.completed();
        assert!(stats.iterations.len() >= 7, "{stats:?}");
        assert!(
            stats.pages.delta > 0,
            "re-sent pages went as deltas: {stats:?}"
        );
        w.ram_equal();
    }
}

#[test]
fn the_source_pauses_only_after_the_destination_acknowledged_the_last_pass() {
    let mut w = World::new(opts(), shrinking());
    w.faults.no_acks = true;
    w.run();
    w.completed();
    // Without acknowledgements it waited the full ack wait (10 s of fake time) first.
    assert!(w.now >= Duration::from_secs(10), "{:?}", w.now);
    w.ram_equal();

    let mut w = World::new(opts(), shrinking());
    w.run();
    w.completed();
    assert!(w.now < Duration::from_secs(10), "{:?}", w.now);
}

#[test]
fn cancel_at_each_phase_resumes_the_source_and_the_destination_never_runs() {
    for phase in [
        Phase::Setup,
        Phase::BulkCopy,
        Phase::Iterating,
        Phase::StopAndCopy,
        Phase::AwaitingVerdict,
    ] {
        let mut w = World::new(opts(), shrinking());
        w.faults.cancel_at = Some(phase);
        w.run();
        let e = w.source_error();
        assert!(
            matches!(e, SourceError::Cancelled { phase: p } if p == phase),
            "{phase}: {e}"
        );
        assert!(!w.svm.paused, "{phase}: the guest runs on the source");
        assert!(
            !w.dvm.resumed,
            "{phase}: the destination must not run the guest"
        );
        assert!(w.dst_result.as_ref().unwrap().is_err(), "{phase}");
        if w.tracker.started {
            assert!(w.tracker.stopped, "{phase}: the tracker was stopped");
        }
        assert_eq!(w.phases().last(), Some(&Phase::Cancelled), "{phase}");
    }
}

#[test]
fn a_connection_lost_anywhere_before_the_commit_resumes_the_source() {
    // Learn how long the whole stream is, then cut it at points all along it.
    let mut w = World::new(opts(), shrinking());
    w.run();
    w.completed();
    let total = w.sent;
    for cut in (0..total).step_by((total / 23).max(1) as usize) {
        let mut w = World::new(opts(), shrinking());
        w.faults.cut_after = Some(cut);
        w.run();
        let e = w.source_error();
        assert!(
            matches!(
                e,
                SourceError::Connection { .. } | SourceError::ReturnPath { .. }
            ),
            "cut at {cut}: {e}"
        );
        assert!(!w.svm.paused, "cut at {cut}: the guest runs on the source");
        assert!(
            !w.dvm.resumed,
            "cut at {cut}: the destination runs the guest"
        );
        match w.dst_result.as_ref().unwrap() {
            Err(_) => {}
            Ok(_) => panic!("cut at {cut}: the destination completed"),
        }
    }
}

#[test]
fn a_verdict_that_never_comes_times_out_and_resumes_the_source() {
    let o = SourceOptions {
        verdict_timeout: Some(Duration::from_secs(30)),
        ..opts()
    };
    let mut w = World::new(o, shrinking());
    w.faults.refuse_verify = false;
    w.faults.stall_after_verdict = true;
    // The destination loads the state and then goes silent before its verdict leaves.
    w.run_until_stalled_then_finish_source();
    let e = w.source_error();
    assert!(
        matches!(e, SourceError::VerdictTimeout(t) if t == Duration::from_secs(30)),
        "{e}"
    );
    assert!(!w.svm.paused);
    assert!(w.now >= Duration::from_secs(30));
}

impl World {
    /// Runs until the source ends, even if the destination stalls forever.
    fn run_until_stalled_then_finish_source(&mut self) {
        for _ in 0..100_000 {
            if self.src_result.is_some() {
                return;
            }
            let mut progressed = self.step_source();
            if !self.dst_stalled && self.dst_result.is_none() {
                progressed |= self.step_destination();
            }
            if self.dst_stalled {
                // Whatever the stalled destination queued never leaves.
                self.ret_wire.clear();
            }
            if !progressed {
                self.let_time_pass();
            }
        }
        panic!("the source did not end");
    }
}

#[test]
fn a_failed_verdict_resumes_the_source_with_the_destinations_reason() {
    let mut w = World::new(opts(), shrinking());
    w.faults.refuse_verify = true;
    w.run();
    let e = w.source_error();
    match &e {
        SourceError::DestinationFailed { reason } => {
            assert!(reason.contains("RAM hash differs"), "{reason}")
        }
        e => panic!("{e}"),
    }
    assert_eq!(w.svm.log, ["pause", "save", "resume"]);
    assert!(!w.dvm.resumed);
    assert!(matches!(
        w.dst_result.as_ref().unwrap(),
        Err(DestinationError::Verify(_))
    ));
}

#[test]
fn not_converging_fails_at_the_limit_and_tells_the_destination() {
    // The guest rewrites 40 pages every period; the link is measured at 1 byte/s of busy
    // time, so nothing ever fits the downtime limit.
    let steps = rewriting_40_pages(50, 0x11);
    let o = SourceOptions {
        max_iterations: Some(3),
        downtime_limit: Duration::from_nanos(1),
        ..opts()
    };
    let mut w = World::new(o, steps);
    w.run();
    let e = w.source_error();
    assert!(
        matches!(e, SourceError::NotConverged(ref nc) if nc.iterations == 3),
        "{e}"
    );
    assert!(!w.svm.paused);
    match w.dst_result.as_ref().unwrap() {
        Err(DestinationError::Aborted(reason)) => {
            assert!(reason.contains("did not converge"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hand_over_at_the_limit_returns_the_dirty_pages_with_the_tracker_running() {
    let steps = rewriting_40_pages(50, 0x11);
    let o = SourceOptions {
        max_iterations: Some(2),
        downtime_limit: Duration::from_nanos(1),
        limit_policy: LimitPolicy::HandOver,
        ..opts()
    };
    let mut w = World::new(o, steps);
    // The destination does not finish: the hand-over keeps the connection open.
    w.run_until_stalled_then_finish_source();
    let (not_converged, dirty) = w.handed_over();
    assert_eq!(not_converged.iterations, 2);
    assert_eq!(dirty.count(), 40);
    assert!(
        w.tracker.started && !w.tracker.stopped,
        "the tracker stays on"
    );
    assert!(
        !w.svm.paused && !w.cut,
        "the guest runs, the connection stays open"
    );
}

#[test]
fn a_switch_on_command_hands_over_at_the_next_decision_whatever_the_policy() {
    let steps = rewriting_40_pages(50, 0x11);
    let o = SourceOptions {
        downtime_limit: Duration::from_nanos(1),
        ..opts()
    };
    let mut w = World::new(o, steps);
    w.faults.handover_at = Some(Phase::Iterating);
    w.run_until_stalled_then_finish_source();
    let (not_converged, dirty) = w.handed_over();
    assert_eq!(not_converged.limit, "a switch on command");
    assert_eq!(not_converged.iterations, 0, "right after the bulk pass");
    assert_eq!(dirty.count(), 40);
    assert!(!w.svm.paused && !w.tracker.stopped);
}

#[test]
fn a_guest_as_fast_as_the_link_hands_over_at_the_stall_limit() {
    let steps = rewriting_40_pages(50, 0x11);
    let o = SourceOptions {
        downtime_limit: Duration::from_nanos(1),
        give_up_after_stalled: Some(3),
        limit_policy: LimitPolicy::HandOver,
        ..opts()
    };
    let mut w = World::new(o, steps);
    w.run_until_stalled_then_finish_source();
    let (not_converged, _) = w.handed_over();
    assert!(
        not_converged.limit.contains("does not converge"),
        "{}",
        not_converged.limit
    );
    assert!(not_converged.iterations >= 3);
}

#[test]
fn auto_converge_throttles_and_the_pause_lifts_the_throttle() {
    // Dirtying stays high for a few periods, then calms down.
    let mut steps = rewriting_40_pages(4, 0x22);
    steps.push(vec![(3, 0, vec![1])]);
    let o = SourceOptions {
        auto_converge: true,
        downtime_limit: Duration::from_millis(50),
        device_state_estimate: 0,
        ..opts()
    };
    let mut w = World::new(o, steps);
    // 1 MB/s: 40 pages take 164 ms, one page 4 ms.
    w.link_ns_per_byte = 1000;
    w.run();
    let stats = w.completed();
    assert!(stats.max_throttle_pct >= 20, "{stats:?}");
    let pause = w.svm.log.iter().position(|l| l == "pause").unwrap();
    assert!(
        w.svm.log[..pause]
            .iter()
            .any(|l| l.starts_with("throttle ") && l != "throttle 0")
    );
    assert_eq!(w.svm.log[pause + 1], "throttle 0", "{:?}", w.svm.log);
    w.ram_equal();
}

#[test]
fn a_resume_that_fails_is_reported_with_the_guest_paused() {
    let mut w = World::new(opts(), shrinking());
    w.faults.refuse_verify = true;
    w.svm.fail_resume = true;
    w.run();
    let e = w.source_error();
    assert!(!e.guest_running(), "{e}");
    match e {
        SourceError::ResumeFailed { error, .. } => {
            assert!(matches!(*error, SourceError::DestinationFailed { .. }))
        }
        e => panic!("{e}"),
    }
}

#[test]
fn a_throttle_that_cannot_be_lifted_is_reported_with_the_guest_running() {
    let steps = rewriting_40_pages(50, 0x11);
    let o = SourceOptions {
        auto_converge: true,
        max_iterations: Some(6),
        downtime_limit: Duration::from_nanos(1),
        ..opts()
    };
    let mut w = World::new(o, steps);
    w.svm.fail_unthrottle = true;
    w.run();
    let e = w.source_error();
    assert!(e.guest_running(), "{e}");
    match e {
        SourceError::ThrottleNotLifted { error, .. } => {
            assert!(matches!(*error, SourceError::NotConverged(_)))
        }
        e => panic!("{e}"),
    }
    assert!(!w.svm.paused);
}

#[test]
fn a_tracker_that_fails_fails_the_migration_and_the_guest_runs_on() {
    for fail_at in 1..=3 {
        let mut w = World::new(opts(), shrinking());
        w.tracker.fail_sync = Some(fail_at);
        w.run();
        let e = w.source_error();
        assert!(matches!(e, SourceError::Tracker(_)), "sync {fail_at}: {e}");
        assert!(!w.svm.paused && w.tracker.stopped);
        assert!(matches!(
            w.dst_result.as_ref().unwrap(),
            Err(DestinationError::Aborted(_))
        ));
    }
}

#[test]
fn a_corrupted_byte_is_refused_by_the_destination_and_the_source_resumes() {
    let mut w = World::new(opts(), shrinking());
    w.faults.corrupt_at = Some(5000);
    w.run();
    match w.dst_result.as_ref().unwrap() {
        Err(DestinationError::Stream(e)) => {
            let text = e.to_string();
            assert!(text.contains("0x0002") || text.contains("page"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    let e = w.source_error();
    assert!(matches!(e, SourceError::DestinationFailed { .. }), "{e}");
    assert!(!w.svm.paused && !w.dvm.resumed);
}

#[test]
fn untouched_pages_go_as_zero_pages_unread() {
    let mut w = World::new(opts(), vec![]);
    let mut populated = DirtyBitmap::new(PAGES);
    for p in 0..PAGES - 4 {
        populated.set(p);
    }
    w.populated = Some(populated);
    w.run();
    let stats = w.completed();
    assert_eq!(stats.iterations[0].pages.zero, 4, "{stats:?}");
    assert_eq!(stats.iterations[0].pages.raw, (PAGES - 4) as u64);
    w.ram_equal();
}

#[test]
fn the_destination_never_runs_the_guest_without_complete() {
    // Everything arrives, the verdict goes out, and then the stream ends.
    let mut w = World::new(opts(), shrinking());
    let mut probe = World::new(opts(), shrinking());
    probe.run();
    probe.completed();
    // `Complete` is the last record: cut just before it.
    let mut complete = BytesMut::new();
    migration_core::stream::Record::Complete.encode(&mut complete);
    w.faults.cut_after = Some(probe.sent - complete.len() as u64);
    w.run();
    assert!(!w.dvm.resumed);
    match w.dst_result.as_ref().unwrap() {
        Err(DestinationError::Protocol(ProtocolViolation::EndedAfterVerdict)) => {}
        other => panic!("{other:?}"),
    }
    // The source could not write `Complete` whole: it resumes.
    let e = w.source_error();
    assert!(matches!(e, SourceError::Connection { .. }), "{e}");
    assert!(!w.svm.paused);
}

#[test]
fn a_running_verdict_before_the_end_of_the_stream_is_a_protocol_violation() {
    let mut w = World::new(opts(), shrinking());
    // A destination that claims to run the guest right after the header.
    let mut out = BytesMut::new();
    migration_core::stream::StreamHeader::new([0; 16])
        .encode(migration_core::stream::Direction::Return, &mut out);
    ReturnRecord::Verdict(migration_core::stream::Verdict::Running).encode(&mut out);
    w.ret_wire.extend_from_slice(&out);
    w.dst_stalled = true;
    w.run_until_stalled_then_finish_source();
    let e = w.source_error();
    assert!(
        matches!(e, SourceError::Protocol { ref violation, .. } if *violation == migration_precopy::ReturnViolation::EarlyRunning),
        "{e}"
    );
    assert!(!w.svm.paused);
    let _ = RecordType::VERDICT;
}

/// Runs a destination machine alone over `stream` (all of it at once, then its end),
/// with RAM of `layout`, and returns its result and what it sent back.
fn destination_alone(
    stream: &[u8],
    layout: &RamLayout,
) -> (
    Result<migration_precopy::DestinationStats, DestinationError>,
    Vec<ReturnRecord>,
) {
    let t0 = Instant::now();
    let mut m = DestinationMachine::new(&DestinationOptions::default(), t0);
    let mut input = BytesMut::new();
    let mut fed = false;
    let mut back = BytesMut::new();
    for _ in 0..1000 {
        match m.poll(&mut input, t0) {
            DestinationAction::NeedInput if !fed => {
                fed = true;
                input.extend_from_slice(stream);
                m.handle(DestinationEvent::Received(stream.len()), t0);
            }
            DestinationAction::NeedInput => m.handle(DestinationEvent::Eof, t0),
            DestinationAction::Transmit => {
                back.extend_from_slice(&m.take_transmit());
                m.handle(DestinationEvent::Transmitted(Ok(())), t0);
            }
            DestinationAction::Configured => {
                m.begin(layout);
            }
            DestinationAction::FinishRam => m.handle(DestinationEvent::RamFinished(Ok(())), t0),
            DestinationAction::LoadDeviceState => {
                m.handle(DestinationEvent::StateLoaded(Ok(())), t0)
            }
            DestinationAction::Verify => m.handle(DestinationEvent::Verified(Ok(())), t0),
            DestinationAction::Shutdown(_) => {}
            DestinationAction::Done => {
                let mut dec = ReturnDecoder::new(DecoderOptions::default());
                let mut records = Vec::new();
                while let Some(f) = dec.decode(&mut back).unwrap() {
                    if let Frame::Record(r) = f {
                        records.push(r);
                    }
                }
                return (m.take_result().unwrap(), records);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the destination did not end");
}

fn failed_verdict(records: &[ReturnRecord]) -> String {
    match records.last() {
        Some(ReturnRecord::Verdict(migration_core::stream::Verdict::Failed { reason })) => {
            reason.clone()
        }
        other => panic!("expected a Failed verdict, got {other:?}"),
    }
}

#[test]
fn the_destination_refuses_ram_that_is_not_its_own_and_says_why() {
    use migration_core::stream::{Config, Direction, Record, StreamHeader};
    let mut s = BytesMut::new();
    StreamHeader::new([7; 16]).encode(Direction::Migration, &mut s);
    let theirs = RamLayout::new(4096, &[(0, 64 * 4096)]).unwrap();
    Record::Config(Config::from_layout(&theirs, Default::default())).encode(&mut s);
    let ours = RamLayout::new(4096, &[(0, 32 * 4096)]).unwrap();
    let (r, back) = destination_alone(&s, &ours);
    assert!(matches!(
        r,
        Err(DestinationError::Layout {
            source_pages: 64,
            local_pages: 32
        })
    ));
    assert!(failed_verdict(&back).contains("64 pages"), "{back:?}");
}

#[test]
fn the_destination_refuses_a_stream_that_does_not_start_with_its_config() {
    use migration_core::stream::{Direction, Record, StreamHeader};
    let mut s = BytesMut::new();
    StreamHeader::new([7; 16]).encode(Direction::Migration, &mut s);
    Record::EndOfData.encode(&mut s);
    let (r, back) = destination_alone(&s, &RamLayout::new(4096, &[(0, 4096)]).unwrap());
    assert!(
        matches!(r, Err(DestinationError::NoConfig { found: Some(_) })),
        "{r:?}"
    );
    failed_verdict(&back);

    // A stream that ends after its header: the decoder says where and what it lacks.
    let mut s = BytesMut::new();
    StreamHeader::new([7; 16]).encode(Direction::Migration, &mut s);
    let (r, back) = destination_alone(&s, &RamLayout::new(4096, &[(0, 4096)]).unwrap());
    match r {
        Err(DestinationError::Stream(e)) => {
            let text = e.to_string();
            assert!(text.contains("offset 32"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    failed_verdict(&back);

    // Not a migration stream at all: no return path to answer on, no verdict.
    let (r, back) = destination_alone(
        b"GET / HTTP/1.1\r\n\r\n",
        &RamLayout::new(4096, &[(0, 4096)]).unwrap(),
    );
    assert!(matches!(r, Err(DestinationError::Stream(_))), "{r:?}");
    assert!(back.is_empty(), "{back:?}");
}

#[test]
fn the_destination_rejects_records_that_have_no_place_where_they_come() {
    use migration_core::stream::{Config, Direction, IterationEnd, Record, StreamHeader};
    let layout = RamLayout::new(4096, &[(0, 8 * 4096)]).unwrap();
    let start = || {
        let mut s = BytesMut::new();
        StreamHeader::new([7; 16]).encode(Direction::Migration, &mut s);
        Record::Config(Config::from_layout(&layout, Default::default())).encode(&mut s);
        s
    };
    // `Complete` before `EndOfData`: nothing was checked.
    let mut s = start();
    Record::Complete.encode(&mut s);
    let (r, back) = destination_alone(&s, &layout);
    assert!(matches!(
        r,
        Err(DestinationError::Protocol(
            ProtocolViolation::CompleteBeforeEndOfData
        ))
    ));
    failed_verdict(&back);
    // A pass that ends after `EndOfData`: RAM was checked and the verdict given.
    let mut s = start();
    Record::EndOfData.encode(&mut s);
    Record::IterationEnd(IterationEnd::default()).encode(&mut s);
    let (r, back) = destination_alone(&s, &layout);
    assert!(
        matches!(
            r,
            Err(DestinationError::Protocol(ProtocolViolation::AfterEndOfData(t))) if t == RecordType::ITERATION_END
        ),
        "{r:?}"
    );
    // The verdict was Running; no second one contradicts it.
    assert!(matches!(
        back.last(),
        Some(ReturnRecord::Verdict(
            migration_core::stream::Verdict::Running
        ))
    ));
}

mod never_panics {
    use super::*;
    use migration_core::stream::{Config, Direction, Record, StreamHeader};
    use proptest::prelude::*;

    /// Feeds `stream` to a destination in pieces of `chunk` bytes and runs it to its end,
    /// placing nothing (the machine's own decisions are under test, not RAM).
    fn feed(stream: &[u8], chunk: usize) -> Result<(), DestinationError> {
        let layout = RamLayout::new(4096, &[(0, 8 * 4096)]).unwrap();
        let t0 = Instant::now();
        let mut m = DestinationMachine::new(&DestinationOptions::default(), t0);
        let mut input = BytesMut::new();
        let mut pos = 0;
        for _ in 0..100_000 {
            match m.poll(&mut input, t0) {
                DestinationAction::NeedInput if pos < stream.len() => {
                    let end = (pos + chunk.max(1)).min(stream.len());
                    input.extend_from_slice(&stream[pos..end]);
                    m.handle(DestinationEvent::Received(end - pos), t0);
                    pos = end;
                }
                DestinationAction::NeedInput => m.handle(DestinationEvent::Eof, t0),
                DestinationAction::Transmit => {
                    let _ = m.take_transmit();
                    m.handle(DestinationEvent::Transmitted(Ok(())), t0);
                }
                DestinationAction::Configured => {
                    m.begin(&layout);
                }
                DestinationAction::PlacePages(b) => {
                    let counts = migration_core::stats::PageCounts {
                        raw: b.pages.len() as u64,
                        ..Default::default()
                    };
                    m.handle(DestinationEvent::PagesPlaced(Ok(counts)), t0);
                }
                DestinationAction::PassEnded => {}
                DestinationAction::FinishRam => m.handle(DestinationEvent::RamFinished(Ok(())), t0),
                DestinationAction::LoadDeviceState => {
                    m.handle(DestinationEvent::StateLoaded(Ok(())), t0)
                }
                DestinationAction::Verify => m.handle(DestinationEvent::Verified(Ok(())), t0),
                DestinationAction::Resume => m.handle(DestinationEvent::Resumed(Ok(())), t0),
                DestinationAction::Shutdown(_) => {}
                DestinationAction::Done => return m.take_result().unwrap().map(|_| ()),
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("the destination did not end");
    }

    fn valid_start() -> Vec<u8> {
        let mut s = BytesMut::new();
        StreamHeader::new([7; 16]).encode(Direction::Migration, &mut s);
        let layout = RamLayout::new(4096, &[(0, 8 * 4096)]).unwrap();
        Record::Config(Config::from_layout(&layout, Default::default())).encode(&mut s);
        s.to_vec()
    }

    proptest! {
        /// Arbitrary bytes, alone or after a valid header and config, in arbitrary pieces:
        /// the destination ends (never hangs, never panics) and never runs the guest
        /// without a valid stream.
        #[test]
        fn arbitrary_streams_end_in_an_error(
            junk in proptest::collection::vec(any::<u8>(), 0..2048),
            after_config in any::<bool>(),
            chunk in 1usize..600,
        ) {
            let mut s = if after_config { valid_start() } else { Vec::new() };
            s.extend_from_slice(&junk);
            prop_assert!(feed(&s, chunk).is_err());
        }

        /// A valid stream with one byte changed is refused, wherever the byte is.
        #[test]
        fn a_flipped_byte_is_refused(at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut s = valid_start();
            let mut tail = BytesMut::new();
            Record::EndOfData.encode(&mut tail);
            Record::Complete.encode(&mut tail);
            s.extend_from_slice(&tail);
            prop_assert!(feed(&s, 64).is_ok());
            let i = at.index(s.len());
            s[i] ^= 1 << bit;
            prop_assert!(feed(&s, 64).is_err());
        }
    }
}

#[test]
fn with_post_copy_allowed_the_destination_hands_the_stream_over_at_the_switch() {
    use migration_core::stream::{Config, Direction, Record, StreamHeader, write_postcopy_switch};
    let layout = RamLayout::new(4096, &[(0, 64 * 4096)]).unwrap();
    let mut s = BytesMut::new();
    StreamHeader::new([7; 16]).encode(Direction::Migration, &mut s);
    Record::Config(Config::from_layout(&layout, Default::default())).encode(&mut s);
    // A discard list long enough to be split into several records.
    let discard: Vec<_> = (0..30u64).map(|i| i * 2..i * 2 + 1).collect();
    assert!(write_postcopy_switch(&mut s, &discard, 32) > 1);
    Record::DeviceState(DeviceState::new("vcpu0", 1, vec![1u8])).encode(&mut s);

    let t0 = Instant::now();
    let refused = {
        let (r, _) = destination_alone(&s, &layout);
        r
    };
    assert!(
        matches!(
            refused,
            Err(DestinationError::Protocol(
                ProtocolViolation::PostcopyRecord(_)
            ))
        ),
        "without the option a switch is refused: {refused:?}"
    );

    let opts = DestinationOptions {
        postcopy: true,
        ..DestinationOptions::default()
    };
    let mut m = DestinationMachine::new(&opts, t0);
    let mut input = BytesMut::from(&s[..]);
    m.handle(DestinationEvent::Received(s.len()), t0);
    loop {
        match m.poll(&mut input, t0) {
            DestinationAction::Transmit => {
                let _ = m.take_transmit();
                m.handle(DestinationEvent::Transmitted(Ok(())), t0);
            }
            DestinationAction::Configured => assert!(m.begin(&layout)),
            DestinationAction::SwitchToPostcopy => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut sw = m.into_postcopy().expect("switched");
    let mut got = sw.discard.clone();
    got.sort_by_key(|r| r.start);
    assert_eq!(got, discard);
    // The rest of the stream decodes with the decoder handed over.
    match sw.decoder.decode(&mut input).unwrap() {
        Some(Frame::Record(Record::DeviceState(d))) => assert_eq!(d.id, "vcpu0"),
        other => panic!("{other:?}"),
    }
}

/// Once the VMM has built its VM from the configuration (`begin`), the destination says
/// how far it has applied the stream: a pure post-copy source pauses its guest only then.
#[test]
fn the_destination_acknowledges_the_configuration_once_it_has_its_vm() {
    use migration_core::stream::{Ack, Config, Direction, Record, StreamHeader};
    let t0 = Instant::now();
    let layout = RamLayout::new(4096, &[(0, 16 * 4096)]).unwrap();
    let mut s = BytesMut::new();
    StreamHeader::new([3; 16]).encode(Direction::Migration, &mut s);
    Record::Config(Config::from_layout(&layout, Default::default())).encode(&mut s);
    let configured = s.len() as u64;
    let mut m = DestinationMachine::new(&DestinationOptions::default(), t0);
    let mut input = s.clone();
    m.handle(DestinationEvent::Received(s.len()), t0);
    let mut dec = ReturnDecoder::new(DecoderOptions::default());
    let mut returned = BytesMut::new();
    let mut records = |m: &mut DestinationMachine, returned: &mut BytesMut| {
        returned.extend_from_slice(&m.take_transmit());
        m.handle(DestinationEvent::Transmitted(Ok(())), t0);
        let mut got = Vec::new();
        while let Some(f) = dec.decode(returned).unwrap() {
            if let Frame::Record(r) = f {
                got.push(r);
            }
        }
        got
    };
    // Before the VM exists: the return header alone.
    loop {
        match m.poll(&mut input, t0) {
            DestinationAction::Transmit => {
                assert_eq!(records(&mut m, &mut returned), []);
            }
            DestinationAction::Configured => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(m.begin(&layout));
    assert!(matches!(
        m.poll(&mut input, t0),
        DestinationAction::Transmit
    ));
    assert_eq!(
        records(&mut m, &mut returned),
        [ReturnRecord::Ack(Ack::StreamOffset(configured))]
    );
}
