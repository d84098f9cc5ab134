//! The source and destination engines over a real socket pair, with a VM double: guest RAM
//! (`GuestMemoryMmap<AtomicBitmap>`, tracked by the vm-memory bitmap tracker), a writer
//! thread that keeps incrementing a counter in every page of a working set, and a
//! `VmControl` that parks that thread.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use migration_core::dirty::VmmBitmapTracker;
use migration_core::stats::{Phase, ProgressEvent};
use migration_core::stream::DeviceState;
use migration_core::transport::Stream;
use migration_core::vm::{VmControl, VmError, VmOp};
use migration_core::{GuestRam, RamLayout};
use migration_precopy::{
    CancelToken, DestinationError, DestinationOptions, Incoming, LimitPolicy, Placement,
    SourceError, SourceOptions, SourceOutcome, migrate,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = 4096;

/// Two regions with a hole, so batches are split at a region boundary.
fn regions(mib: u64) -> Vec<(GuestAddress, usize)> {
    let half = (mib << 20) / 2;
    vec![
        (GuestAddress(0), half as usize),
        (GuestAddress(half + (2 << 20)), half as usize),
    ]
}

fn new_mem(mib: u64) -> Arc<Mem> {
    Arc::new(Mem::from_ranges(&regions(mib)).unwrap())
}

fn layout_of(mem: &Mem) -> RamLayout {
    RamLayout::of_memory(mem).unwrap()
}

#[derive(Default)]
struct Ctl {
    want_pause: AtomicBool,
    parked: AtomicBool,
    exit: AtomicBool,
    throttle: AtomicU8,
    passes: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
    log: Mutex<Vec<String>>,
    /// When each pause took effect.
    pause_times: Mutex<Vec<Instant>>,
}

/// The source guest double.
struct Guest {
    mem: Arc<Mem>,
    ctl: Arc<Ctl>,
    thread: Option<JoinHandle<()>>,
}

impl Guest {
    /// `mib` of RAM: the first `fill_pages` pages of pseudo-random content, the rest zero;
    /// a writer that increments the first word of pages `ws` at `pages_per_ms` (0: as fast
    /// as it can). Starts running.
    fn start(mib: u64, fill_pages: usize, ws: std::ops::Range<usize>, pages_per_ms: u64) -> Guest {
        let mem = new_mem(mib);
        let layout = layout_of(&mem);
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut page = vec![0u8; PAGE as usize];
        for p in 0..fill_pages {
            for w in page.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            mem.write_slice(&page, GuestAddress(layout.page_to_gpa(p).unwrap()))
                .unwrap();
        }
        let ctl = Arc::new(Ctl::default());
        let (m, c) = (mem.clone(), ctl.clone());
        let thread = std::thread::spawn(move || writer(m, layout, c, ws, pages_per_ms));
        Guest {
            mem,
            ctl,
            thread: Some(thread),
        }
    }

    fn handle(&self) -> GuestCtl {
        GuestCtl {
            ctl: self.ctl.clone(),
            mem: self.mem.clone(),
        }
    }

    fn is_running(&self) -> bool {
        !self.ctl.want_pause.load(Ordering::SeqCst)
    }

    /// Waits until the writer completed `n` more passes: proof it runs.
    fn wait_passes(&self, n: u64) {
        let start = self.ctl.passes.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ctl.passes.load(Ordering::SeqCst) < start + n {
            assert!(Instant::now() < deadline, "the guest writer does not run");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.ctl.exit.store(true, Ordering::SeqCst);
        self.ctl.want_pause.store(false, Ordering::SeqCst);
        self.ctl.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer(
    mem: Arc<Mem>,
    layout: RamLayout,
    ctl: Arc<Ctl>,
    ws: std::ops::Range<usize>,
    per_ms: u64,
) {
    let mut tick = Instant::now();
    let mut credit = 0.0f64;
    loop {
        if ws.is_empty() {
            // An idle guest: nothing to write, but it still parks when asked.
            if ctl.exit.load(Ordering::SeqCst) {
                return;
            }
            if ctl.want_pause.load(Ordering::SeqCst) {
                let mut g = ctl.lock.lock().unwrap();
                ctl.parked.store(true, Ordering::SeqCst);
                ctl.cv.notify_all();
                while ctl.want_pause.load(Ordering::SeqCst) && !ctl.exit.load(Ordering::SeqCst) {
                    g = ctl.cv.wait(g).unwrap();
                }
                ctl.parked.store(false, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        for p in ws.clone() {
            if ctl.exit.load(Ordering::SeqCst) {
                return;
            }
            if ctl.want_pause.load(Ordering::SeqCst) {
                let mut g = ctl.lock.lock().unwrap();
                ctl.parked.store(true, Ordering::SeqCst);
                ctl.cv.notify_all();
                while ctl.want_pause.load(Ordering::SeqCst) && !ctl.exit.load(Ordering::SeqCst) {
                    g = ctl.cv.wait(g).unwrap();
                }
                ctl.parked.store(false, Ordering::SeqCst);
                drop(g);
                tick = Instant::now();
            }
            let gpa = GuestAddress(layout.page_to_gpa(p).unwrap());
            let v: u64 = mem.read_obj(gpa).unwrap();
            mem.write_obj(v + 1, gpa).unwrap();
            if per_ms > 0 {
                // Paced at `per_ms` pages per millisecond, less the throttle: each tick of
                // 1 ms earns that many pages of credit (fractions carry over).
                credit -= 1.0;
                while credit < 1.0 {
                    let t = f64::from(ctl.throttle.load(Ordering::Relaxed));
                    let next = tick + Duration::from_millis(1);
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    tick = next.max(now - Duration::from_millis(5));
                    credit += per_ms as f64 * (100.0 - t) / 100.0;
                    if ctl.want_pause.load(Ordering::SeqCst) || ctl.exit.load(Ordering::SeqCst) {
                        break;
                    }
                }
            }
        }
        ctl.passes.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct GuestCtl {
    ctl: Arc<Ctl>,
    mem: Arc<Mem>,
}

impl VmControl for GuestCtl {
    fn pause(&mut self) -> Result<(), VmError> {
        self.ctl.log.lock().unwrap().push("pause".into());
        self.ctl.want_pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut g = self.ctl.lock.lock().unwrap();
        while !self.ctl.parked.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return Err(VmError::new(VmOp::Pause, "writer did not park"));
            }
            g = self
                .ctl
                .cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap()
                .0;
        }
        self.ctl.pause_times.lock().unwrap().push(Instant::now());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.ctl.log.lock().unwrap().push("resume".into());
        let _g = self.ctl.lock.lock().unwrap();
        self.ctl.want_pause.store(false, Ordering::SeqCst);
        self.ctl.cv.notify_all();
        Ok(())
    }
    fn set_throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.ctl
            .log
            .lock()
            .unwrap()
            .push(format!("throttle {percent}"));
        self.ctl.throttle.store(percent, Ordering::SeqCst);
        Ok(())
    }
    fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        let passes = self.ctl.passes.load(Ordering::SeqCst);
        let sum: u64 = (0..64u64)
            .map(|i| self.mem.read_obj::<u64>(GuestAddress(i * PAGE)).unwrap())
            .fold(0, u64::wrapping_add);
        Ok(vec![
            DeviceState::new("cpu", 1, passes.to_le_bytes().to_vec()),
            DeviceState::new("sum", 1, sum.to_le_bytes().to_vec()),
        ])
    }
    fn load_device_state(&mut self, _: &[DeviceState]) -> Result<(), VmError> {
        Err(VmError::new(VmOp::LoadState, "not a destination"))
    }
}

/// The destination VM double: records what the engine asked.
#[derive(Default, Clone)]
struct DestVm {
    log: Arc<Mutex<Vec<String>>>,
    states: Arc<Mutex<Vec<DeviceState>>>,
}

impl DestVm {
    fn resumed(&self) -> bool {
        self.log.lock().unwrap().iter().any(|l| l == "resume")
    }
}

impl VmControl for DestVm {
    fn pause(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.log.lock().unwrap().push("resume".into());
        Ok(())
    }
    fn set_throttle(&mut self, p: u8) -> Result<(), VmError> {
        self.log.lock().unwrap().push(format!("throttle {p}"));
        Ok(())
    }
    fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(vec![])
    }
    fn load_device_state(&mut self, s: &[DeviceState]) -> Result<(), VmError> {
        self.log.lock().unwrap().push("load".into());
        *self.states.lock().unwrap() = s.to_vec();
        Ok(())
    }
}

struct DestResult {
    result: Result<migration_precopy::DestinationStats, DestinationError>,
    mem: Arc<Mem>,
    vm: DestVm,
}

/// Runs a destination on `stream` in a thread; `verify` decides the verdict.
fn destination(
    stream: UnixStream,
    verify: impl FnMut(&[DeviceState]) -> Result<(), String> + Send + 'static,
) -> JoinHandle<DestResult> {
    slow_destination(
        stream,
        verify,
        Duration::ZERO,
        Arc::default(),
        DestinationOptions::default(),
    )
}

/// A destination that lags `lag` behind after applying each pass (as one whose host is
/// busy does), and notes in `applied` when it applied each pass.
fn slow_destination(
    stream: UnixStream,
    verify: impl FnMut(&[DeviceState]) -> Result<(), String> + Send + 'static,
    lag: Duration,
    applied: Arc<Mutex<Vec<(u64, Instant)>>>,
    dest_opts: DestinationOptions,
) -> JoinHandle<DestResult> {
    std::thread::spawn(move || {
        let mut verify = verify;
        let vm = DestVm::default();
        let incoming = match Incoming::accept(Stream::Unix(stream), &dest_opts) {
            Ok(i) => i,
            Err(e) => {
                return DestResult {
                    result: Err(e),
                    mem: new_mem(1),
                    vm,
                };
            }
        };
        let layout = incoming.config().layout().unwrap();
        let ranges: Vec<(GuestAddress, usize)> = layout
            .regions()
            .iter()
            .map(|r| (GuestAddress(r.guest_base), r.size as usize))
            .collect();
        let mem = Arc::new(Mem::from_ranges(&ranges).unwrap());
        let ram = GuestRam::with_layout(&*mem, layout);
        let mut v = vm.clone();
        let result = incoming.receive(
            &ram,
            &mut v,
            &mut |s| verify(s).map_err(Into::into),
            &mut |stats| {
                {
                    let mut a = applied.lock().unwrap();
                    let done = a.len();
                    for it in &stats.iterations[done..] {
                        a.push((it.iteration, Instant::now()));
                    }
                }
                std::thread::sleep(lag);
            },
        );
        DestResult { result, mem, vm }
    })
}

fn ram_equal(a: &Mem, b: &Mem) {
    let layout = layout_of(a);
    let (mut x, mut y) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
    for (p, gpa) in layout.pages() {
        a.read_slice(&mut x, GuestAddress(gpa)).unwrap();
        b.read_slice(&mut y, GuestAddress(gpa)).unwrap();
        assert!(x == y, "page {p} differs between source and destination");
    }
}

struct Run {
    result: Result<SourceOutcome<VmmBitmapTracker, Stream>, SourceError>,
    dest: DestResult,
    phases: Vec<Phase>,
    events: Vec<ProgressEvent>,
}

fn run(
    guest: &Guest,
    opts: SourceOptions,
    verify: impl FnMut(&[DeviceState]) -> Result<(), String> + Send + 'static,
    cancel_at: Option<Phase>,
) -> Run {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = destination(b, verify);
    let (result, events) = run_source(guest, Stream::Unix(a), opts, cancel_at);
    let dest = dest.join().unwrap();
    let phases = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Phase(p) => Some(*p),
            _ => None,
        })
        .collect();
    Run {
        result,
        dest,
        phases,
        events,
    }
}

fn run_source(
    guest: &Guest,
    stream: Stream,
    opts: SourceOptions,
    cancel_at: Option<Phase>,
) -> (
    Result<SourceOutcome<VmmBitmapTracker, Stream>, SourceError>,
    Vec<ProgressEvent>,
) {
    run_source_with(guest, stream, opts, cancel_at, &mut |_| {})
}

/// [`run_source`], calling `on_event` on the engine's thread with each event (to hold the
/// engine back at a chosen point).
fn run_source_with(
    guest: &Guest,
    stream: Stream,
    opts: SourceOptions,
    cancel_at: Option<Phase>,
    on_event: &mut dyn FnMut(&ProgressEvent),
) -> (
    Result<SourceOutcome<VmmBitmapTracker, Stream>, SourceError>,
    Vec<ProgressEvent>,
) {
    let layout = layout_of(&guest.mem);
    let ram = GuestRam::with_layout(&*guest.mem, layout.clone());
    let tracker = VmmBitmapTracker::new(&guest.mem, &layout).unwrap();
    let mut vm = guest.handle();
    let cancel = CancelToken::new();
    let mut events = Vec::new();
    let c = cancel.clone();
    let result = migrate(&ram, &mut vm, tracker, stream, &opts, &cancel, &mut |e| {
        on_event(e);
        events.push(e.clone());
        if let ProgressEvent::Phase(p) = e {
            if Some(*p) == cancel_at {
                c.cancel();
            }
        }
    });
    (result, events)
}

fn opts() -> SourceOptions {
    SourceOptions {
        vm_id: [7; 16],
        vmm_blob: Bytes::from_static(b"test-vm"),
        ..SourceOptions::default()
    }
}

#[test]
fn migration_completes_and_ram_is_equal() {
    let guest = Guest::start(16, 1024, 2048..2304, 0);
    guest.wait_passes(2);
    let r = run(&guest, opts(), |_| Ok(()), None);
    let stats = match r.result {
        Ok(SourceOutcome::Completed(s)) => s,
        other => panic!(
            "migration failed: {other:?}; destination: {:?}",
            r.dest.result.err()
        ),
    };
    let dstats = r.dest.result.expect("destination succeeded");
    // The source stays paused after completion; so RAM must be equal to the byte.
    assert!(
        !guest.is_running(),
        "the source must stay paused after the verdict"
    );
    ram_equal(&guest.mem, &r.dest.mem);
    assert!(r.dest.vm.resumed());
    let log = r.dest.vm.log.lock().unwrap().clone();
    assert_eq!(log, ["load", "resume"], "load, then resume, nothing else");
    assert_eq!(r.dest.vm.states.lock().unwrap().len(), 2);
    let pages = layout_of(&guest.mem).page_count() as u64;
    assert!(stats.pages.total() >= pages);
    assert!(
        stats.pages.zero >= pages - 1024 - 256,
        "zero pages sent as zero records: {stats:?}"
    );
    assert!(stats.iterations.len() >= 2);
    assert_eq!(stats.iterations[0].pages.total(), pages);
    assert!(stats.bytes_on_wire > 1024 * PAGE);
    assert!(stats.downtime > Duration::ZERO);
    assert_eq!(dstats.pages.total(), stats.pages.total());
    assert_eq!(
        r.phases,
        [
            Phase::Setup,
            Phase::BulkCopy,
            Phase::Iterating,
            Phase::StopAndCopy,
            Phase::AwaitingVerdict,
            Phase::Completed
        ]
    );
    assert!(
        r.events
            .iter()
            .any(|e| matches!(e, ProgressEvent::IterationDone(_)))
    );
}

#[test]
fn zstd_and_delta_encoding_round_trip() {
    let guest = Guest::start(8, 256, 512..768, 0);
    guest.wait_passes(2);
    let o = SourceOptions {
        zstd_level: Some(1),
        delta_cache_bytes: Some(4 << 20),
        // Keep iterating a while so pages are re-sent and deltas happen.
        downtime_limit: Duration::from_micros(1),
        max_iterations: Some(6),
        limit_policy: LimitPolicy::HandOver,
        ..opts()
    };
    let (a, b) = UnixStream::pair().unwrap();
    let dest = destination(b, |_| Ok(()));
    // After each pass the writer sweeps its pages once more before the engine goes on, so
    // every pass re-sends pages the one before sent (and cached): deltas, however the
    // threads are scheduled.
    let (result, _) = run_source_with(&guest, Stream::Unix(a), o, None, &mut |e| {
        if matches!(e, ProgressEvent::IterationDone(_)) {
            guest.wait_passes(1);
        }
    });
    // With a 1 us limit it cannot converge: the handover gives everything back.
    let h = match result {
        Ok(SourceOutcome::LimitReached(h)) => h,
        other => panic!("expected a hand-over, got {other:?}"),
    };
    assert!(
        h.stats.pages.delta > 0,
        "no page went as a delta: {:?}",
        h.stats.pages
    );
    assert!(h.stats.pages.zero > 0);
    assert!(guest.is_running());
    assert!(h.not_converged.to_string().contains("did not converge"));
    // Finish by hand as a post-copy engine would not: end the stream, the destination
    // refuses an unterminated stream; here we just drop the connection.
    h.channel
        .get_ref()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    drop(h);
    let d = dest.join().unwrap();
    assert!(d.result.is_err());
    assert!(!d.vm.resumed());

    // And a complete run with both encodings: the destination's RAM equals the source's.
    let o = SourceOptions {
        zstd_level: Some(3),
        delta_cache_bytes: Some(1 << 20),
        ..opts()
    };
    let r = run(&guest, o, |_| Ok(()), None);
    assert!(
        matches!(r.result, Ok(SourceOutcome::Completed(_))),
        "{:?}",
        r.result
    );
    ram_equal(&guest.mem, &r.dest.mem);
}

/// Pages placed with `UFFDIO_COPY` into untouched RAM, in every encoding, re-sent pages
/// written over placed ones, zero pages left alone: the destination ends up equal.
#[test]
fn userfaultfd_placement_round_trips_every_encoding() {
    let guest = Guest::start(8, 256, 512..768, 0);
    guest.wait_passes(2);
    for (zstd, delta) in [(None, None), (Some(1), Some(1 << 20))] {
        let o = SourceOptions {
            zstd_level: zstd,
            delta_cache_bytes: delta,
            ..opts()
        };
        let (a, b) = UnixStream::pair().unwrap();
        let dest_opts = DestinationOptions {
            placement: Placement::Userfaultfd,
            ..DestinationOptions::default()
        };
        let dest = slow_destination(b, |_| Ok(()), Duration::ZERO, Arc::default(), dest_opts);
        let (result, _) = run_source(&guest, Stream::Unix(a), o, None);
        let d = dest.join().unwrap();
        assert!(
            matches!(result, Ok(SourceOutcome::Completed(_))),
            "{result:?}; destination: {:?}",
            d.result
        );
        let dstats = d.result.unwrap();
        if dstats.placement != migration_precopy::Placement::Userfaultfd {
            eprintln!(
                "skipped userfaultfd_placement_round_trips_every_encoding: userfaultfd is \
                 not available here (placement: {})",
                dstats.placement.as_str()
            );
            return;
        }
        assert!(dstats.iterations.len() >= 2, "pages were re-sent");
        ram_equal(&guest.mem, &d.mem);
        assert!(d.vm.resumed());
        guest.handle().resume().unwrap();
    }
}

#[test]
fn a_guest_faster_than_the_link_fails_cleanly_at_the_limit() {
    // 4 MiB working set dirtied at ~40 MB/s, 3 MB/s link, 1 ms limit.
    let guest = Guest::start(8, 0, 0..1024, 10);
    guest.wait_passes(1);
    let o = SourceOptions {
        max_bandwidth: Some(3_000_000),
        downtime_limit: Duration::from_millis(1),
        max_iterations: Some(2),
        ..opts()
    };
    let r = run(&guest, o, |_| Ok(()), None);
    let e = r.result.expect_err("must not converge");
    let msg = e.to_string();
    assert!(matches!(e, SourceError::NotConverged(_)), "{msg}");
    assert!(
        msg.contains("did not converge") && msg.contains("iteration limit"),
        "{msg}"
    );
    assert!(
        msg.contains("dirties") && msg.contains("link carries"),
        "{msg}"
    );
    assert!(guest.is_running(), "the guest keeps running on the source");
    guest.wait_passes(1);
    let d = r.dest.result.expect_err("the destination saw an abort");
    assert!(matches!(d, DestinationError::Aborted(_)), "{d}");
    assert!(!r.dest.vm.resumed());
    assert_eq!(r.phases.last(), Some(&Phase::Failed));
}

#[test]
fn auto_converge_throttles_until_it_fits() {
    // A 2 MiB working set dirtied at ~100 MB/s against a 20 MB/s link and a 10 ms limit
    // (50 pages): only a guest throttled to 80 % or more can converge.
    let guest = Guest::start(8, 0, 0..512, 25);
    guest.wait_passes(1);
    let o = SourceOptions {
        max_bandwidth: Some(20_000_000),
        downtime_limit: Duration::from_millis(10),
        auto_converge: true,
        max_time: Some(Duration::from_secs(30)),
        ..opts()
    };
    let r = run(&guest, o, |_| Ok(()), None);
    let stats = match r.result {
        Ok(SourceOutcome::Completed(s)) => s,
        other => panic!("{other:?}"),
    };
    assert!(stats.max_throttle_pct >= 20, "{stats:?}");
    let throttles: Vec<String> = guest.ctl.log.lock().unwrap().clone();
    assert!(
        throttles.iter().any(|l| l == "throttle 20"),
        "{throttles:?}"
    );
    // The throttle is lifted at the pause: the destination must not inherit it.
    assert_eq!(guest.ctl.throttle.load(Ordering::SeqCst), 0);
    assert!(
        r.events
            .iter()
            .any(|e| matches!(e, ProgressEvent::Throttle { percent: 20 }))
    );
    ram_equal(&guest.mem, &r.dest.mem);
}

#[test]
fn cancel_at_each_phase_resumes_the_source() {
    for phase in [
        Phase::Setup,
        Phase::BulkCopy,
        Phase::Iterating,
        Phase::StopAndCopy,
    ] {
        let guest = Guest::start(8, 256, 512..640, 0);
        guest.wait_passes(1);
        let r = run(&guest, opts(), |_| Ok(()), Some(phase));
        match r.result {
            Err(SourceError::Cancelled { phase: p }) => assert_eq!(p, phase),
            other => panic!("cancel at {phase}: {other:?}"),
        }
        assert!(guest.is_running(), "cancel at {phase}: guest not resumed");
        guest.wait_passes(2);
        assert!(
            r.dest.result.is_err(),
            "cancel at {phase}: destination succeeded"
        );
        assert!(
            !r.dest.vm.resumed(),
            "cancel at {phase}: destination ran the guest"
        );
        assert_eq!(r.phases.last(), Some(&Phase::Cancelled));
        let log = guest.ctl.log.lock().unwrap().clone();
        if phase == Phase::StopAndCopy {
            assert_eq!(log, ["pause", "resume"]);
        } else {
            assert!(log.is_empty(), "{log:?}");
        }
    }
}

#[test]
fn a_broken_connection_resumes_the_source() {
    let guest = Guest::start(8, 2048, 0..128, 0);
    guest.wait_passes(1);
    let (a, mut b) = UnixStream::pair().unwrap();
    // A destination that dies after 1 MiB.
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        b.read_exact(&mut buf).unwrap();
        drop(b);
    });
    let (result, events) = run_source(&guest, Stream::Unix(a), opts(), None);
    t.join().unwrap();
    let e = result.expect_err("the connection broke");
    assert!(
        matches!(
            e,
            SourceError::Connection { .. } | SourceError::ReturnPath { .. }
        ),
        "{e}"
    );
    assert!(guest.is_running());
    guest.wait_passes(1);
    assert!(events.contains(&ProgressEvent::Phase(Phase::Failed)));
}

#[test]
fn a_corrupted_byte_is_refused_naming_the_record_and_the_source_resumes() {
    let guest = Guest::start(8, 512, 600..700, 0);
    guest.wait_passes(1);
    let (a, mut p_src) = UnixStream::pair().unwrap();
    let (mut p_dst, b) = UnixStream::pair().unwrap();
    // A proxy that flips one byte 100 000 bytes in (inside a page batch of random pages).
    let mut back_src = p_src.try_clone().unwrap();
    let mut back_dst = p_dst.try_clone().unwrap();
    let fwd = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut off = 0usize;
        loop {
            let n = match p_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (off..off + n).contains(&100_000) {
                buf[100_000 - off] ^= 0x10;
            }
            off += n;
            if p_dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = p_dst.shutdown(std::net::Shutdown::Write);
    });
    let bwd = std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_dst, &mut back_src);
        let _ = back_src.shutdown(std::net::Shutdown::Both);
    });
    let dest = destination(b, |_| Ok(()));
    let (result, _) = run_source(&guest, Stream::Unix(a), opts(), None);
    let d = dest.join().unwrap();
    let derr = d
        .result
        .expect_err("the destination must refuse")
        .to_string();
    assert!(
        derr.contains("page-batch") || derr.contains("PageBatch") || derr.contains("0x0002"),
        "{derr}"
    );
    assert!(derr.contains("CRC") || derr.contains("crc"), "{derr}");
    assert!(!d.vm.resumed());
    let e = result.expect_err("the source must fail");
    match &e {
        SourceError::DestinationFailed { reason } => assert!(reason.contains("0x0002"), "{reason}"),
        other => panic!("{other}"),
    }
    assert!(guest.is_running());
    guest.wait_passes(1);
    fwd.join().unwrap();
    bwd.join().unwrap();
}

#[test]
fn a_failed_verdict_resumes_the_source() {
    let guest = Guest::start(8, 64, 100..200, 0);
    guest.wait_passes(1);
    let r = run(&guest, opts(), |_| Err("the oracle says no".into()), None);
    match r.result {
        Err(SourceError::DestinationFailed { reason }) => {
            assert!(reason.contains("the oracle says no"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(guest.is_running());
    guest.wait_passes(1);
    assert!(
        !r.dest.vm.resumed(),
        "the destination must not run a refused guest"
    );
    assert_eq!(guest.ctl.log.lock().unwrap().clone(), ["pause", "resume"]);
}

#[test]
fn the_source_pauses_only_once_the_destination_has_caught_up() {
    // The destination falls behind after each pass, so what the source sent last sits in
    // the socket buffers: the source must not count it as applied and pause, or the
    // backlog becomes downtime.
    let guest = Guest::start(8, 512, 0..4, 0);
    let (a, b) = UnixStream::pair().unwrap();
    let applied = Arc::new(Mutex::new(Vec::new()));
    let dest = slow_destination(
        b,
        |_| Ok(()),
        Duration::from_millis(200),
        applied.clone(),
        DestinationOptions::default(),
    );
    let (result, _) = run_source(&guest, Stream::Unix(a), opts(), None);
    let dest = dest.join().unwrap();
    let stats = match result {
        Ok(SourceOutcome::Completed(s)) => s,
        other => panic!("{other:?}"),
    };
    dest.result.expect("destination");
    let applied = applied.lock().unwrap().clone();
    let pause = *guest
        .ctl
        .pause_times
        .lock()
        .unwrap()
        .first()
        .expect("paused once");
    // Every pass but the one sent while paused was applied before the pause.
    let before_pause = stats.iterations.len() - 1;
    assert!(applied.len() >= before_pause, "{applied:?}");
    for (pass, at) in &applied[..before_pause] {
        assert!(
            *at <= pause,
            "pass {pass} was applied after the guest was paused"
        );
    }
    ram_equal(&guest.mem, &dest.mem);
}

#[test]
fn an_idle_guest_stops_with_almost_nothing_left() {
    let guest = Guest::start(8, 512, 0..0, 0);
    let r = run(&guest, opts(), |_| Ok(()), None);
    let stats = match r.result {
        Ok(SourceOutcome::Completed(s)) => s,
        other => panic!("{other:?}"),
    };
    let last = stats.iterations.last().unwrap();
    assert_eq!(
        last.pages.total(),
        0,
        "nothing left to send while paused: {stats:?}"
    );
    ram_equal(&guest.mem, &r.dest.mem);
}

#[test]
fn cancel_while_awaiting_the_verdict_resumes_the_source_and_the_destination_cannot_commit() {
    let guest = Guest::start(8, 64, 100..200, 0);
    guest.wait_passes(1);
    let (a, b) = UnixStream::pair().unwrap();
    let go = Arc::new(AtomicBool::new(false));
    let g = go.clone();
    // The destination's checks take until the source has given up.
    let dest = destination(b, move |_| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !g.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the source never gave up");
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    });
    let (result, events) = run_source(
        &guest,
        Stream::Unix(a),
        opts(),
        Some(Phase::AwaitingVerdict),
    );
    go.store(true, Ordering::SeqCst);
    match result {
        Err(SourceError::Cancelled { phase }) => assert_eq!(phase, Phase::AwaitingVerdict),
        other => panic!("{other:?}"),
    }
    assert!(guest.is_running());
    guest.wait_passes(1);
    assert_eq!(events.last(), Some(&ProgressEvent::Phase(Phase::Cancelled)));
    let d = dest.join().unwrap();
    // The connection is closed: the Running verdict cannot be delivered, so the
    // destination does not resume its copy.
    match d.result {
        Err(DestinationError::VerdictNotSent(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(!d.vm.resumed(), "both copies would run");
}

/// A source that stops after the destination's `Running` verdict, without committing.
fn source_without_commit(mut src: UnixStream) {
    use bytes::BytesMut;
    use migration_core::stream::{
        Config, DecoderOptions, Direction, Frame, Record, ReturnDecoder, ReturnRecord,
        StreamHeader, Verdict,
    };
    let layout = RamLayout::new(PAGE, &[(0, 1 << 20)]).unwrap();
    let mut out = BytesMut::new();
    StreamHeader::new([7; 16]).encode(Direction::Migration, &mut out);
    Record::Config(Config::from_layout(&layout, Bytes::from_static(b"test-vm"))).encode(&mut out);
    Record::DeviceState(DeviceState::new("cpu", 1, vec![0u8; 8])).encode(&mut out);
    Record::EndOfData.encode(&mut out);
    src.write_all(&out).unwrap();
    src.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut dec = ReturnDecoder::new(DecoderOptions::default());
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            match f {
                Frame::Record(ReturnRecord::Verdict(Verdict::Running)) => return,
                Frame::Record(ReturnRecord::Verdict(v)) => panic!("verdict {v:?}"),
                _ => {}
            }
        }
        let n = src.read(&mut chunk).unwrap();
        assert!(n > 0, "the destination closed without a verdict");
        buf.extend_from_slice(&chunk[..n]);
    }
    // Dropping `src` here breaks the connection before `Complete`.
}

#[test]
fn the_destination_does_not_run_the_guest_without_the_source_commit() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = destination(b, |_| Ok(()));
    source_without_commit(a);
    let r = dest.join().unwrap();
    let err = r
        .result
        .expect_err("the destination must fail without Complete");
    assert!(
        err.to_string().contains("before the source's commit"),
        "{err}"
    );
    let log = r.vm.log.lock().unwrap().clone();
    assert!(
        log.contains(&"load".to_string()),
        "state was loaded and checked: {log:?}"
    );
    assert!(
        !log.contains(&"resume".to_string()),
        "the destination ran the guest without the commit: {log:?}"
    );
}
