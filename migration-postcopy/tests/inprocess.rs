//! Post-copy between two threads of this process, over unix sockets: the destination's
//! "guest" is a thread that touches pages after the commit (each touch of a missing page
//! faults through userfaultfd, as a vCPU's would), the source's a writer thread that
//! dirties pages before the switch. Skipped, with a line saying why, where userfaultfd
//! for missing pages is not available.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration_core::dirty::VmmBitmapTracker;
use migration_core::stream::DeviceState;
use migration_core::transport::{self, Address, Listener, Stream};
use migration_core::vm::{VmControl, VmError};
use migration_core::{GuestRam, RamLayout};
use migration_postcopy::destination::{self, DestinationOptions};
use migration_postcopy::source::{self, Mode, Outcome, SourceOptions, Switch};
use migration_precopy::{CancelToken, Incoming, PostcopySwitch, Received};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;
const PAGE: usize = 4096;

fn uffd_or_skip(test: &str) -> bool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PAGE)]).unwrap();
    let ram = GuestRam::new(&mem).unwrap();
    match migration_core::fault::FaultingRam::register(&ram) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("{test}: skipped, userfaultfd for missing pages is not available: {e}");
            false
        }
    }
}

fn regions(mib: usize) -> Vec<(GuestAddress, usize)> {
    vec![
        (GuestAddress(0), (mib << 20) / 2),
        (GuestAddress(1 << 32), (mib << 20) / 2),
    ]
}

/// Guest RAM filled with a pattern that names each page.
fn source_mem(mib: usize) -> Arc<Mem> {
    let mem = Arc::new(Mem::from_ranges(&regions(mib)).unwrap());
    let layout = RamLayout::of_memory(&*mem).unwrap();
    for p in 0..layout.page_count() {
        // Every eighth page untouched: zero on both sides, never read on the source.
        if p % 8 == 7 {
            continue;
        }
        let v: Vec<u8> = (0..PAGE)
            .map(|i| (i as u64 * 31 + p as u64 * 7) as u8)
            .collect();
        mem.write_slice(&v, GuestAddress(layout.page_to_gpa(p).unwrap()))
            .unwrap();
    }
    mem
}

/// A VM double: pause, resume, a device state, and a flag the guest thread watches.
#[derive(Clone, Default)]
struct Vm {
    running: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
}

impl VmControl for Vm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.running.store(false, Ordering::SeqCst);
        self.log.lock().unwrap().push("pause".into());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.running.store(true, Ordering::SeqCst);
        self.log.lock().unwrap().push("resume".into());
        Ok(())
    }
    fn set_throttle(&mut self, _: u8) -> Result<(), VmError> {
        Ok(())
    }
    fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(vec![DeviceState::new("dev0", 1, vec![9u8; 10])])
    }
    fn load_device_state(&mut self, s: &[DeviceState]) -> Result<(), VmError> {
        self.log.lock().unwrap().push(format!("load {}", s.len()));
        Ok(())
    }
}

/// Accepts the source's connection, maps RAM in the layout the source announces and
/// receives pre-copy into it until the source switches: what post-copy takes over (the
/// switch, that RAM, its layout and the VM).
fn accept_until_switch(
    listener: &Listener,
) -> (PostcopySwitch<Stream>, Arc<GuestMemoryMmap>, RamLayout, Vm) {
    accept_until_switch_with(listener, &mut || {})
}

/// As [`accept_until_switch`], calling `built` once RAM is mapped, before pre-copy begins
/// (where a VMM finishes building its VM).
fn accept_until_switch_with(
    listener: &Listener,
    built: &mut dyn FnMut(),
) -> (PostcopySwitch<Stream>, Arc<GuestMemoryMmap>, RamLayout, Vm) {
    let conn = listener.accept().unwrap();
    let inc = Incoming::accept(
        conn,
        &migration_precopy::DestinationOptions {
            postcopy: true,
            ..Default::default()
        },
    )
    .unwrap();
    let layout = inc.config().layout().unwrap();
    let ranges: Vec<_> = layout
        .regions()
        .iter()
        .map(|r| (GuestAddress(r.guest_base), r.size as usize))
        .collect();
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap());
    built();
    let mut vm = Vm::default();
    // Only a view of `mem`: post-copy's own view of it sees what pre-copy wrote here.
    let ram = GuestRam::with_layout(&*mem, layout.clone());
    let switch = match inc
        .receive_or_switch(&ram, &mut vm, &mut |_| Ok(()), &mut |_| {})
        .unwrap()
    {
        Received::Postcopy(s) => *s,
        Received::Completed(_) => panic!("pre-copy completed; a switch was expected"),
        _ => panic!("a switch was expected"),
    };
    drop(ram);
    (switch, mem, layout, vm)
}

struct Dest {
    report: Result<destination::DestinationReport, String>,
    /// What `receive_with_progress` told, in order.
    events: Vec<migration_core::stats::ProgressEvent>,
    mem: Arc<GuestMemoryMmap>,
    touched: u64,
}

/// The destination: accepts on `listener`, switches, and runs a guest thread that reads
/// a word of pages in a scattered order once the guest runs.
fn destination(listener: Listener, opts: DestinationOptions) -> std::thread::JoinHandle<Dest> {
    destination_with(listener, opts, true)
}

/// As [`destination`]; with `touch` off the guest touches nothing (every page arrives by
/// the push).
fn destination_with(
    listener: Listener,
    opts: DestinationOptions,
    touch: bool,
) -> std::thread::JoinHandle<Dest> {
    std::thread::spawn(move || {
        let (switch, mem, layout, mut vm) = accept_until_switch(&listener);
        let ram = GuestRam::with_layout(&*mem, layout.clone());
        // The guest: touches pages as soon as it runs, until told to stop.
        let stop = Arc::new(AtomicBool::new(false));
        let touched = Arc::new(AtomicU64::new(0));
        let guest = {
            let (mem, running, stop, touched) = (
                mem.clone(),
                vm.running.clone(),
                stop.clone(),
                touched.clone(),
            );
            let addrs: Vec<usize> = (0..layout.page_count())
                .map(|p| {
                    GuestRam::with_layout(&*mem, layout.clone())
                        .host_address(p)
                        .unwrap() as usize
                })
                .collect();
            std::thread::spawn(move || {
                let n = addrs.len();
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    if !touch || !running.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let p = (i * 7919) % n;
                    i += 1;
                    // SAFETY: inside guest RAM, which outlives this thread (joined below);
                    // a missing page faults and waits for its placement.
                    let w = unsafe { &*((addrs[p] + 64) as *const AtomicU64) };
                    w.load(Ordering::Relaxed);
                    touched.fetch_add(1, Ordering::Relaxed);
                    if i % 64 == 0 {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            })
        };
        let mut accept = |t: Duration| listener.accept_timeout(t);
        let mut events = Vec::new();
        let report = destination::receive_with_progress(
            switch,
            &mut accept,
            &ram,
            &mut vm,
            &opts,
            &mut |e| events.push(e.clone()),
        )
        .map_err(|e| e.to_string());
        stop.store(true, Ordering::SeqCst);
        guest.join().unwrap();
        drop(ram);
        Dest {
            report,
            events,
            mem,
            touched: touched.load(Ordering::Relaxed),
        }
    })
}

/// The destination's events: the commit first, the end last, a pause and a resumption for
/// each break it saw after the commit (one before it is only a recovery), and the pages
/// present only ever growing, and one fault event for each fault served (the histogram's
/// count), each page at most once.
fn check_events(
    events: &[migration_core::stats::ProgressEvent],
    cuts: usize,
    stats: &migration_postcopy::PostcopyStats,
) {
    use migration_core::stats::{Phase, ProgressEvent as E};
    let phases: Vec<Phase> = events
        .iter()
        .filter_map(|e| match e {
            E::Phase(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(phases.first(), Some(&Phase::Postcopy), "{phases:?}");
    assert_eq!(phases.last(), Some(&Phase::Completed), "{phases:?}");
    let paused = phases
        .iter()
        .filter(|p| **p == Phase::PostcopyPaused)
        .count();
    assert!(paused <= cuts, "{phases:?}");
    assert_eq!(
        phases.iter().filter(|p| **p == Phase::Postcopy).count(),
        paused + 1,
        "{phases:?}"
    );
    let faults: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            E::PageFault { page, .. } => Some(*page),
            _ => None,
        })
        .collect();
    if stats.fault_latency.count()
        < migration_postcopy::destination::book::MAX_UNREPORTED_FAULTS as u64
    {
        assert_eq!(faults.len() as u64, stats.fault_latency.count());
    }
    let mut distinct = faults.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), faults.len(), "a page placed twice");
    let mut last = 0;
    for e in events {
        if let E::Progress {
            pages_sent,
            pages_remaining,
            pages_total,
            ..
        } = e
        {
            assert_eq!(pages_sent + pages_remaining, *pages_total, "{e:?}");
            assert!(*pages_sent >= last, "{events:?}");
            last = *pages_sent;
        }
    }
}

/// A source VM that runs until the migration pauses it.
fn running_vm() -> Vm {
    let vm = Vm::default();
    vm.running.store(true, Ordering::SeqCst);
    vm
}

/// Pure post-copy, as the migration of a VM `vm_id`.
fn pure(vm_id: u8) -> SourceOptions {
    SourceOptions {
        mode: Mode::Pure,
        vm_id: [vm_id; 16],
        ..SourceOptions::default()
    }
}

/// As [`migrate_watching`], with nothing to cancel it and nobody watching its progress.
fn migrate(
    mem: &Mem,
    vm: &mut Vm,
    addr: &Address,
    opts: &SourceOptions,
) -> Result<Outcome, source::SourceError> {
    migrate_watching(mem, vm, addr, opts, &CancelToken::new(), &mut |_| {})
}

/// Migrates `mem` over a connection to `addr` (retried while the destination starts
/// listening), reconnecting to `addr` after a break.
fn migrate_watching(
    mem: &Mem,
    vm: &mut Vm,
    addr: &Address,
    opts: &SourceOptions,
    control: &CancelToken,
    progress: &mut dyn FnMut(&migration_core::stats::ProgressEvent),
) -> Result<Outcome, source::SourceError> {
    let ram = GuestRam::new(mem).unwrap();
    let tracker = VmmBitmapTracker::new(mem, ram.layout()).unwrap();
    let conn = transport::connect_retry(addr, Duration::from_secs(10)).unwrap();
    let mut connect = || transport::connect(addr);
    source::migrate(
        &ram,
        vm,
        tracker,
        conn,
        &mut connect,
        opts,
        control,
        progress,
    )
}

/// The source's and the destination's reports of a post-copy that both saw complete; a
/// failure on one side shows what the other said.
#[track_caller]
fn completed(
    source: Result<Outcome, source::SourceError>,
    destination: Result<destination::DestinationReport, String>,
) -> (source::SourceReport, destination::DestinationReport) {
    let report = match source {
        Ok(Outcome::Postcopy(rep)) => rep,
        other => panic!("{other:?}; destination: {destination:?}"),
    };
    let dr = destination.expect("the destination completed");
    (report, dr)
}

fn ram_equal(a: &Mem, b: &GuestMemoryMmap) {
    let layout = RamLayout::of_memory(a).unwrap();
    let (mut x, mut y) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    for (p, gpa) in layout.pages() {
        a.read_slice(&mut x, GuestAddress(gpa)).unwrap();
        b.read_slice(&mut y, GuestAddress(gpa)).unwrap();
        assert!(x == y, "page {p} differs");
    }
}

fn socket(name: &str) -> (Address, Listener, tempfile_dir::Dir) {
    let dir = tempfile_dir::Dir::new(name);
    let addr = Address::Unix(dir.path.join("m.sock"));
    let l = Listener::bind(&addr).unwrap();
    (addr, l, dir)
}

mod tempfile_dir {
    /// A directory removed when dropped.
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new(name: &str) -> Dir {
            let path = std::env::temp_dir().join(format!("pc-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[test]
fn a_pure_postcopy_moves_the_guest_first_and_every_page_follows() {
    if !uffd_or_skip("a_pure_postcopy_moves_the_guest_first_and_every_page_follows") {
        return;
    }
    let (addr, listener, _dir) = socket("pure");
    let dest = destination(listener, DestinationOptions::default());
    let mem = source_mem(16);
    let mut vm = running_vm();
    let r = migrate(&mem, &mut vm, &addr, &pure(3));
    let d = dest.join().unwrap();
    let (report, dr) = completed(r, d.report);
    assert!(
        !vm.running.load(Ordering::SeqCst),
        "the source never resumes"
    );
    assert_eq!(*vm.log.lock().unwrap(), ["pause"]);
    check_events(&d.events, 0, &dr.postcopy);
    ram_equal(&mem, &d.mem);
    assert!(d.touched > 0, "the guest ran on the destination");
    let pages = RamLayout::of_memory(&*mem).unwrap().page_count() as u64;
    assert!(
        report.pages_pushed + report.pages_requested >= pages,
        "{report:?}"
    );
    let st = &dr.postcopy;
    assert_eq!(st.pages.pushed + st.pages.requested, pages, "{st:?}");
    assert!(
        st.faults > 0 && st.requests > 0,
        "the guest faulted: {st:?}"
    );
    // Every page requested was waited for and is there now; one may have come by the push.
    assert_eq!(st.fault_latency.count(), st.requests, "{st:?}");
    assert!(st.pages.requested <= st.requests);
    assert!(st.faults >= st.requests + st.duplicate_requests_avoided);
    assert_eq!(dr.device_states, 1);
}

/// The destination builds its VM from the configuration while the source's guest still
/// runs: the source pauses only once the destination acknowledged it, so that the pause is
/// the switch alone; a destination that goes away before leaves the guest running, never
/// paused.
#[test]
fn a_pure_postcopy_pauses_the_guest_only_once_the_destination_has_its_vm() {
    if !uffd_or_skip("a_pure_postcopy_pauses_the_guest_only_once_the_destination_has_its_vm") {
        return;
    }
    let (addr, listener, _dir) = socket("configured");
    let mem = source_mem(8);
    let mut vm = running_vm();
    let log = vm.log.clone();
    let dest = std::thread::spawn(move || {
        let (switch, mem, layout, mut dvm) = accept_until_switch_with(&listener, &mut || {
            // Building the VM takes a while, as a real VMM's does.
            std::thread::sleep(Duration::from_millis(100));
            log.lock().unwrap().push("destination has its VM".into());
        });
        let ram = GuestRam::with_layout(&*mem, layout);
        let mut accept = |t: Duration| listener.accept_timeout(t);
        let r = destination::receive(
            switch,
            &mut accept,
            &ram,
            &mut dvm,
            &DestinationOptions::default(),
        )
        .map_err(|e| e.to_string());
        drop(ram);
        (r, mem)
    });
    let r = migrate(&mem, &mut vm, &addr, &pure(6));
    let (d, dmem) = dest.join().unwrap();
    completed(r, d);
    assert_eq!(
        vm.log.lock().unwrap()[..2],
        ["destination has its VM", "pause"],
        "the guest paused before the destination could take it"
    );
    ram_equal(&mem, &dmem);

    // A destination that reads the configuration and goes away.
    let (addr, listener, _dir) = socket("gone");
    let dest = std::thread::spawn(move || {
        let conn = listener.accept().unwrap();
        let opts = migration_precopy::DestinationOptions {
            postcopy: true,
            ..Default::default()
        };
        drop(Incoming::accept(conn, &opts).unwrap());
    });
    let mut vm = running_vm();
    let e = migrate(&mem, &mut vm, &addr, &pure(7)).expect_err("nobody took the guest");
    dest.join().unwrap();
    assert!(e.to_string().contains("configuration"), "{e}");
    assert!(vm.log.lock().unwrap().is_empty(), "{:?}", vm.log);
    assert!(vm.running.load(Ordering::SeqCst));

    // One that never builds its VM, with a bound on the wait.
    let (addr, listener, _dir) = socket("stuck");
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let dest = std::thread::spawn(move || {
        let conn = listener.accept().unwrap();
        let opts = migration_precopy::DestinationOptions {
            postcopy: true,
            ..Default::default()
        };
        let inc = Incoming::accept(conn, &opts).unwrap();
        // Held, configured, until the source gave up.
        let _ = held_rx.recv();
        drop(inc);
    });
    let mut vm = running_vm();
    let opts = SourceOptions {
        configured_timeout: Some(Duration::from_millis(200)),
        ..pure(8)
    };
    let e = migrate(&mem, &mut vm, &addr, &opts).expect_err("the destination never took it");
    let _ = held_tx.send(());
    dest.join().unwrap();
    assert!(e.to_string().contains("within 200ms"), "{e}");
    assert!(vm.log.lock().unwrap().is_empty(), "{:?}", vm.log);
    assert!(vm.running.load(Ordering::SeqCst));
}

#[test]
fn a_hybrid_switches_on_command_and_the_pages_dirtied_since_they_were_sent_are_fetched_fresh() {
    if !uffd_or_skip("a_hybrid_switches_on_command") {
        return;
    }
    let (addr, listener, _dir) = socket("hybrid");
    let dest = destination(listener, DestinationOptions::default());
    let mem = source_mem(16);
    let mut vm = running_vm();
    // A writer that keeps changing a working set while pre-copy runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mem, stop, running) = (mem.clone(), stop.clone(), vm.running.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if running.load(Ordering::SeqCst) {
                    for p in 0..200u64 {
                        mem.write_obj(n, GuestAddress(p * PAGE as u64)).unwrap();
                    }
                    n += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let control = CancelToken::new();
    let opts = SourceOptions {
        mode: Mode::Hybrid {
            precopy: Box::new(migration_precopy::SourceOptions {
                vm_id: [4; 16],
                // Never fits: only the command ends pre-copy.
                downtime_limit: Duration::from_nanos(1),
                ..Default::default()
            }),
            switch: Switch::OnCommand,
        },
        ..SourceOptions::default()
    };
    let c = control.clone();
    let mut passes = 0;
    let m = mem.clone();
    let r = migrate_watching(&mem, &mut vm, &addr, &opts, &control, &mut |e| {
        if let migration_core::stats::ProgressEvent::IterationDone(_) = e {
            passes += 1;
            if passes == 3 {
                // Pages dirtied after the pass's sync, whether or not the writer got to
                // run (a loaded machine may starve it for a pass): the switch must fetch
                // them fresh.
                for p in 200..208u64 {
                    m.write_obj(u64::MAX - p, GuestAddress(p * PAGE as u64))
                        .unwrap();
                }
                c.request_handover();
            }
        }
    });
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let d = dest.join().unwrap();
    let (report, dr) = completed(r, d.report);
    assert_eq!(report.switch_reason, "a switch on command");
    assert!(report.precopy.iterations.len() >= 3);
    assert!(
        report.discarded > 0,
        "the writer's pages were discarded: {report:?}"
    );
    assert!(dr.postcopy.pages.precopied > 0);
    ram_equal(&mem, &d.mem);
}

#[test]
fn a_connection_cut_after_the_commit_is_recovered_and_nothing_is_lost() {
    cut_and_recover("cut", 1);
}

#[test]
fn a_second_cut_during_recovery_is_recovered_too() {
    cut_and_recover("cut2", 2);
}

/// Cuts every connection `cuts` times, each right after the source (re)starts post-copy.
fn cut_and_recover(name: &str, cuts: usize) {
    if !uffd_or_skip(name) {
        return;
    }
    let (addr, listener, _dir) = socket(name);
    let dest = destination(
        listener,
        DestinationOptions {
            recovery_window: Duration::from_secs(30),
            ..Default::default()
        },
    );
    let mem = source_mem(32);
    let ram = GuestRam::new(&*mem).unwrap();
    let tracker = VmmBitmapTracker::new(&mem, ram.layout()).unwrap();
    let mut vm = running_vm();
    // Every connection the source makes, so that the test can cut them.
    let made: Arc<Mutex<Vec<Stream>>> = Arc::default();
    let conn = transport::connect_retry(&addr, Duration::from_secs(10)).unwrap();
    made.lock().unwrap().push(conn.try_clone().unwrap());
    let m2 = made.clone();
    let mut connect = move || {
        let c = transport::connect(&addr)?;
        m2.lock().unwrap().push(c.try_clone()?);
        Ok(c)
    };
    let opts = SourceOptions {
        batch_pages: 16,
        ..pure(5)
    };
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (m3, cut) = (made.clone(), done.clone());
    let r = source::migrate(
        &ram,
        &mut vm,
        tracker,
        conn,
        &mut connect,
        &opts,
        &CancelToken::new(),
        &mut |e| {
            if *e
                == migration_core::stats::ProgressEvent::Phase(
                    migration_core::stats::Phase::Postcopy,
                )
                && cut.fetch_add(1, Ordering::SeqCst) < cuts
            {
                // Right after the commit (or a recovery): break every connection off.
                for c in m3.lock().unwrap().iter() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            }
        },
    );
    let d = dest.join().unwrap();
    let (report, dr) = completed(r, d.report);
    assert_eq!(report.recoveries.len(), cuts, "{report:?}");
    assert_eq!(dr.postcopy.recoveries.len(), cuts, "{:?}", dr.postcopy);
    check_events(&d.events, cuts, &dr.postcopy);
    ram_equal(&mem, &d.mem);
    let _ = Instant::now();
}

/// A hybrid whose destination guest touches nothing: every page it lacks must come by the
/// push, and the zero pages pre-copy sent (which the destination never wrote) must count
/// as held, or it would wait for them for ever.
#[test]
fn a_hybrid_completes_when_the_guest_touches_nothing() {
    if !uffd_or_skip("a_hybrid_completes_when_the_guest_touches_nothing") {
        return;
    }
    let (addr, listener, _dir) = socket("idle");
    let dest = destination_with(listener, DestinationOptions::default(), false);
    let mem = source_mem(16);
    let (tx, rx) = std::sync::mpsc::channel();
    let m = mem.clone();
    std::thread::spawn(move || {
        let mut vm = running_vm();
        let opts = SourceOptions {
            mode: Mode::Hybrid {
                precopy: Box::new(migration_precopy::SourceOptions {
                    vm_id: [6; 16],
                    // Never fits: the pass limit hands over.
                    downtime_limit: Duration::from_nanos(1),
                    ..Default::default()
                }),
                switch: Switch::AfterPasses(1),
            },
            ..SourceOptions::default()
        };
        // Dirty a few pages after the bulk pass, so that there is something to discard.
        let mm = m.clone();
        let r = migrate_watching(&m, &mut vm, &addr, &opts, &CancelToken::new(), &mut |e| {
            if let migration_core::stats::ProgressEvent::IterationDone(_) = e {
                for p in 0..16u64 {
                    mm.write_obj(p, GuestAddress(p * PAGE as u64)).unwrap();
                }
            }
        });
        let _ = tx.send(
            r.map(|o| matches!(o, Outcome::Postcopy(_)))
                .map_err(|e| e.to_string()),
        );
    });
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the migration did not end within a minute");
    assert_eq!(r, Ok(true));
    let d = dest.join().unwrap();
    let dr = d.report.expect("the destination completed");
    assert!(dr.postcopy.pages.precopied > 0);
    assert_eq!(dr.postcopy.faults, 0, "nothing touched");
    ram_equal(&mem, &d.mem);
}

/// A thread of the VMM that is not a vCPU (a device's, as a virtio-blk thread that reads
/// the queue's rings and writes the used ring and read data into guest RAM) touches pages
/// that are still on the source as soon as the guest resumes, before the fault thread even
/// runs: it must wait for them like a vCPU and see the source's content, never zeros, and
/// what it writes must stay (the page is placed before its write, and a copy of the page
/// arriving later does not overwrite it).
#[test]
fn a_device_thread_touching_missing_pages_waits_for_them_and_its_writes_stay() {
    if !uffd_or_skip("a_device_thread_touching_missing_pages_waits_for_them_and_its_writes_stay") {
        return;
    }
    let (addr, listener, _dir) = socket("device");
    let mem = source_mem(16);
    let layout = RamLayout::of_memory(&*mem).unwrap();
    // Near the end of each region (the last pages are zero on the source): the
    // background push, in page order from the start, reaches them late.
    let read_page = layout.page_count() - 2;
    let write_page = layout.page_count() / 2 - 2;
    const WORD: u64 = 0xdead_beef_0bad_cafe;
    let dest = std::thread::spawn(move || {
        let (switch, mem, layout, mut vm) = accept_until_switch(&listener);
        let ram = GuestRam::with_layout(&*mem, layout.clone());
        // The device thread: waits for the guest to run, then reads a word of one page
        // and writes a word into another, through vm-memory as a device model does.
        let device = {
            let (mem, running) = (mem.clone(), vm.running.clone());
            let (rd, wr) = (
                layout.page_to_gpa(read_page).unwrap(),
                layout.page_to_gpa(write_page).unwrap(),
            );
            std::thread::Builder::new()
                .name("device".into())
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() } as u32;
                    while !running.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    let read: u64 = mem.read_obj(GuestAddress(rd + 64)).unwrap();
                    mem.write_obj(WORD, GuestAddress(wr + 128)).unwrap();
                    (tid, read)
                })
                .unwrap()
        };
        let mut accept = |t: Duration| listener.accept_timeout(t);
        let report = destination::receive(
            switch,
            &mut accept,
            &ram,
            &mut vm,
            &DestinationOptions::default(),
        )
        .map_err(|e| e.to_string());
        let (tid, read) = device.join().unwrap();
        drop(ram);
        (report, mem, tid, read)
    });
    let mut vm = running_vm();
    let r = migrate(&mem, &mut vm, &addr, &pure(5));
    let (report, dmem, tid, read) = dest.join().unwrap();
    assert!(matches!(r, Ok(Outcome::Postcopy(_))), "{r:?}; {report:?}");
    let dr = report.expect("the destination completed");
    // What the device read is the source's page, not a zero page placed in its stead.
    let rd = layout.page_to_gpa(read_page).unwrap();
    let expected: u64 = mem.read_obj(GuestAddress(rd + 64)).unwrap();
    assert_ne!(expected, 0, "the source's page has content");
    assert_eq!(read, expected);
    // The written page: the source's content with the device's word, which stayed.
    let wr = layout.page_to_gpa(write_page).unwrap();
    let (mut src_page, mut dst_page) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    mem.read_slice(&mut src_page, GuestAddress(wr)).unwrap();
    dmem.read_slice(&mut dst_page, GuestAddress(wr)).unwrap();
    src_page[128..136].copy_from_slice(&WORD.to_le_bytes());
    assert!(src_page == dst_page, "page {write_page} on the destination");
    // Both pages were faulted on by the device thread (no vCPU touched anything) and
    // requested (an answer may still lose the race to the push on a loaded machine), and
    // the time it waited is its own, not a vCPU's.
    let st = &dr.postcopy;
    assert!(st.faults >= 2 && st.requests >= 2, "{st:?}");
    if !st.blocktime_by_thread.is_empty() {
        assert!(
            st.blocktime_by_thread.iter().any(|(t, _)| *t == tid),
            "thread {tid} waited: {st:?}"
        );
    }
}
