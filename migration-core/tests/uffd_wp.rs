//! The userfaultfd write-protect tracker against real writer threads.
//!
//! Guest RAM is a `GuestMemoryMmap` (anonymous private memory) of two regions, 1000 and
//! 2000 pages, so the second starts off a 64-page word boundary. Writer threads write it
//! through raw host pointers, as a software vCPU would, and record what they wrote; the
//! tests compare that record with what the tracker reports, in the asynchronous form
//! (`UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`) and in the synchronous fallback.

#![cfg(feature = "host")]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use migration_core::dirty::{
    DirtyTracker, HostRange, TrackerError, UffdFeatures, UffdWpConfig, UffdWpMode, UffdWpTracker,
    UnionTracker, VmmBitmapTracker,
};
use migration_core::{DirtyBitmap, GuestRam, RamLayout};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REGIONS: [(u64, usize); 2] = [(0, 1000 * 4096), (0x1_0000_0000, 2000 * 4096)];

struct Ram<B: NewBitmap> {
    mem: GuestMemoryMmap<B>,
    layout: RamLayout,
    /// Host address of every page, by global index.
    addrs: Vec<usize>,
}

fn ram<B: NewBitmap>() -> Ram<B> {
    let ranges: Vec<_> = REGIONS.iter().map(|&(b, s)| (GuestAddress(b), s)).collect();
    let mem = GuestMemoryMmap::<B>::from_ranges(&ranges).unwrap();
    let guest = GuestRam::new(&mem).unwrap();
    let layout = guest.layout().clone();
    let addrs = (0..layout.page_count())
        .map(|p| guest.host_address(p).unwrap() as usize)
        .collect();
    Ram { mem, layout, addrs }
}

impl<B: NewBitmap> Ram<B> {
    /// Writes one word of `page`, the way a vCPU thread would.
    fn write(&self, page: usize, offset_words: usize, value: u64) {
        let addr = self.addrs[page] + (offset_words % 512) * 8;
        // SAFETY: the address is 8-aligned and inside a mapping owned by `self.mem`, which
        // outlives every caller; the tests touch guest memory only through atomics.
        let word = unsafe { &*(addr as *const AtomicU64) };
        word.store(value, Ordering::Relaxed);
    }

    fn read(&self, page: usize, offset_words: usize) -> u64 {
        let addr = self.addrs[page] + (offset_words % 512) * 8;
        // SAFETY: as in `write`.
        let word = unsafe { &*(addr as *const AtomicU64) };
        word.load(Ordering::Relaxed)
    }
}

/// xorshift64*: the tests want reproducible page choices, not quality randomness.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

fn features() -> UffdFeatures {
    let f = UffdFeatures::probe().expect("probing userfaultfd");
    eprintln!(
        "userfaultfd features {:#x}: wp={} wp_unpopulated={} wp_async={} kernel_faults={}",
        f.bits,
        f.wp(),
        f.wp_unpopulated(),
        f.wp_async(),
        f.kernel_faults
    );
    f
}

/// A started tracker over `ram`, or `None` (with the reason printed) where the kernel
/// lacks what `mode` needs.
fn tracker<B: NewBitmap>(
    ram: &Ram<B>,
    mode: UffdWpMode,
    wp_unpopulated: bool,
) -> Option<UffdWpTracker> {
    let f = features();
    if !f.wp() {
        eprintln!("skipped: this kernel has no userfaultfd write protection for anonymous memory");
        return None;
    }
    if mode == UffdWpMode::Async && !f.wp_async() {
        eprintln!("skipped: this kernel lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7)");
        return None;
    }
    let config = UffdWpConfig {
        mode,
        wp_unpopulated,
        // Small, so that scans of many scattered pages fill it and must continue.
        scan_buffer: 7,
    };
    let mut t = UffdWpTracker::for_memory(&ram.mem, &ram.layout, config).unwrap();
    t.start().expect("start");
    let expected = match mode {
        UffdWpMode::Auto if f.wp_async() => UffdWpMode::Async,
        UffdWpMode::Auto => UffdWpMode::Sync,
        m => m,
    };
    assert_eq!(t.mode(), Some(expected));
    Some(t)
}

fn sync(t: &mut dyn DirtyTracker, layout: &RamLayout) -> Vec<usize> {
    let mut b = layout.new_bitmap();
    t.sync_and_clear(&mut b).unwrap();
    b.iter_ones().collect()
}

/// Writers write in rounds separated by barriers; each round's sync must report exactly
/// the pages written in that round, not the pages only read, not earlier rounds.
fn phased(mode: UffdWpMode, wp_unpopulated: bool) {
    const WRITERS: usize = 4;
    const ROUNDS: usize = 6;
    let ram = ram::<()>();
    let n = ram.layout.page_count();
    // Written before start, and read: neither may show up.
    for p in [0, 1, 999, 1000, 2999] {
        ram.write(p, 3, 1);
    }
    let Some(mut t) = tracker(&ram, mode, wp_unpopulated) else {
        return;
    };
    assert_eq!(
        sync(&mut t, &ram.layout),
        Vec::<usize>::new(),
        "pages written before start"
    );

    let barrier = Barrier::new(WRITERS + 1);
    let written: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let mut outcomes = Vec::new();
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (ram, barrier, written) = (&ram, &barrier, &written);
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let mut rng = Rng::new((w * 1000 + round) as u64);
                    barrier.wait();
                    let mut mine = Vec::new();
                    for i in 0..40 {
                        // Round 3 hammers a few pages from every writer at once.
                        let p = if round == 3 {
                            rng.below(8) * 61
                        } else {
                            rng.below(n)
                        };
                        ram.write(p, i, (round * 100 + w) as u64);
                        mine.push(p);
                        // Reads (of pages never written, too) are not writes.
                        std::hint::black_box(ram.read(rng.below(n), i));
                    }
                    written.lock().unwrap().extend(mine);
                    barrier.wait();
                }
            });
        }
        // No assertion inside the scope: a panic here would leave the writers waiting on
        // the barrier forever. Collect, then compare.
        for _ in 0..ROUNDS {
            barrier.wait();
            barrier.wait();
            let mut expected = std::mem::take(&mut *written.lock().unwrap());
            expected.sort_unstable();
            expected.dedup();
            let mut got = ram.layout.new_bitmap();
            let result = t
                .sync_and_clear(&mut got)
                .map(|()| got.iter_ones().collect::<Vec<_>>());
            outcomes.push((expected, result));
        }
    });
    for (round, (expected, got)) in outcomes.into_iter().enumerate() {
        assert_eq!(got.expect("sync"), expected, "round {round}");
    }
    assert_eq!(
        sync(&mut t, &ram.layout),
        Vec::<usize>::new(),
        "after the last round"
    );
    t.stop().unwrap();
    t.stop().expect("stop is idempotent");
}

#[test]
fn uffd_async_reports_exactly_each_rounds_writes() {
    phased(UffdWpMode::Async, true);
}

#[test]
fn uffd_async_without_wp_unpopulated_reports_exactly_each_rounds_writes() {
    phased(UffdWpMode::Async, false);
}

#[test]
fn uffd_sync_reports_exactly_each_rounds_writes() {
    phased(UffdWpMode::Sync, true);
}

#[test]
fn uffd_sync_without_wp_unpopulated_reports_exactly_each_rounds_writes() {
    phased(UffdWpMode::Sync, false);
}

/// Writers never pause while the main thread syncs in a loop. Every write must be reported
/// by a sync that ended after the write began, and no page that was never written may
/// ever be reported.
fn concurrent(mode: UffdWpMode) {
    const WRITERS: usize = 3;
    const WRITES: usize = 30_000;
    let ram = ram::<()>();
    let n = ram.layout.page_count();
    let Some(mut t) = tracker(&ram, mode, true) else {
        return;
    };

    // Syncs begun so far; sync i (from 0) stores i + 1 just before it begins.
    let begun = AtomicUsize::new(0);
    // For each page, 1 + the largest `begun` a writer saw before writing it (0: never).
    let need: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
    let writers_done = AtomicUsize::new(0);
    // For each page, 1 + the index of the last sync that reported it (0: never).
    let mut reported = vec![0usize; n];
    let mut syncs = 0usize;
    let never = AtomicBool::new(false);
    let mut failure = None;

    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (ram, begun, need, writers_done) = (&ram, &begun, &need, &writers_done);
            s.spawn(move || {
                let mut rng = Rng::new(0xc0ffee + w as u64);
                for i in 0..WRITES {
                    // Skewed: a hot set of 64 pages, and the rest of RAM.
                    let p = if rng.below(4) == 0 {
                        rng.below(n)
                    } else {
                        rng.below(64) * 17
                    };
                    let c = begun.load(Ordering::SeqCst);
                    need[p].fetch_max(c + 1, Ordering::SeqCst);
                    ram.write(p, i, i as u64);
                    if i % 7 == 0 {
                        std::hint::black_box(ram.read(rng.below(n), i));
                    }
                }
                writers_done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut bitmap = ram.layout.new_bitmap();
        while writers_done.load(Ordering::SeqCst) < WRITERS {
            if Instant::now() > deadline {
                failure = Some("writers did not finish in 120 s".to_string());
                break;
            }
            begun.store(syncs + 1, Ordering::SeqCst);
            bitmap.clear_all();
            if let Err(e) = t.sync_and_clear(&mut bitmap) {
                failure = Some(format!("sync {syncs}: {e}"));
                break;
            }
            for p in bitmap.iter_ones() {
                reported[p] = syncs + 1;
                if need[p].load(Ordering::SeqCst) == 0 {
                    never.store(true, Ordering::SeqCst);
                }
            }
            syncs += 1;
            // Pace the loop a little: an empty sync is cheap, but millions of them only
            // burn the CPU the writers need.
            std::thread::sleep(Duration::from_micros(20));
        }
    });
    if let Some(f) = failure {
        panic!("{f}");
    }
    // The final sync, after every writer stopped.
    let mut bitmap = ram.layout.new_bitmap();
    t.sync_and_clear(&mut bitmap).unwrap();
    for p in bitmap.iter_ones() {
        reported[p] = syncs + 1;
    }
    syncs += 1;
    eprintln!("{mode:?}: {syncs} syncs while {WRITERS} writers made {WRITES} writes each");
    assert!(syncs > 2, "the test needs syncs racing the writers");
    assert!(
        !never.load(Ordering::SeqCst),
        "a page nobody had written was reported mid-run"
    );

    let mut lost = Vec::new();
    for p in 0..n {
        let need = need[p].load(Ordering::SeqCst);
        if need == 0 {
            assert_eq!(
                reported[p], 0,
                "page {p} was never written but was reported"
            );
            continue;
        }
        // Written after sync need-2 had begun: sync need-2 (which may have raced it) or
        // a later one must have reported it.
        let last_report = reported[p].checked_sub(1);
        if last_report.is_none_or(|j| j + 2 < need) {
            lost.push((p, need, reported[p]));
        }
    }
    assert!(
        lost.is_empty(),
        "writes never reported after they began: {:?}",
        &lost[..lost.len().min(10)]
    );
    assert_eq!(sync(&mut t, &ram.layout), Vec::<usize>::new());
    t.stop().unwrap();
}

#[test]
fn uffd_async_loses_no_write_of_concurrent_writers() {
    concurrent(UffdWpMode::Async);
}

#[test]
fn uffd_sync_loses_no_write_of_concurrent_writers() {
    concurrent(UffdWpMode::Sync);
}

/// A write the kernel makes on our behalf (read(2) into guest memory, as a device backend
/// would) is a write too.
fn kernel_write(mode: UffdWpMode) {
    let ram = ram::<()>();
    let Some(mut t) = tracker(&ram, mode, true) else {
        return;
    };
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let data = [0x5au8; 100];
    // SAFETY: writes 100 bytes from `data` into the pipe we own.
    let put = unsafe { libc::write(fds[1], data.as_ptr().cast(), data.len()) };
    assert_eq!(put, 100);
    let page = 1500;
    // Ends 50 bytes into the next page: two pages written.
    let dst = ram.addrs[page] + 4096 - 50;
    // SAFETY: the 100 bytes at `dst` lie in the mapping of pages 1500 and 1501, owned by
    // `ram.mem`; no other thread touches them.
    let got = unsafe { libc::read(fds[0], dst as *mut libc::c_void, 100) };
    assert_eq!(
        got,
        100,
        "read(2) into tracked memory: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: closing the fds we own.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert_eq!(sync(&mut t, &ram.layout), vec![page, page + 1]);
    t.stop().unwrap();
}

#[test]
fn uffd_async_sees_writes_made_by_the_kernel() {
    kernel_write(UffdWpMode::Async);
}

#[test]
fn uffd_sync_sees_writes_made_by_the_kernel() {
    let f = features();
    if !f.kernel_faults {
        eprintln!(
            "skipped: this process may not handle kernel-mode userfaults (needs CAP_SYS_PTRACE or /dev/userfaultfd)"
        );
        return;
    }
    kernel_write(UffdWpMode::Sync);
}

#[test]
fn uffd_tracker_lifecycle_and_errors() {
    let ram = ram::<()>();
    let mut t = UffdWpTracker::for_memory(&ram.mem, &ram.layout, UffdWpConfig::default()).unwrap();
    assert!(matches!(
        t.sync_and_clear(&mut ram.layout.new_bitmap()),
        Err(TrackerError::NotStarted { .. })
    ));
    t.start().unwrap();
    ram.write(7, 0, 1);
    match t.sync_and_clear(&mut DirtyBitmap::new(5)) {
        Err(TrackerError::BitmapLength {
            expected: 3000,
            got: 5,
            ..
        }) => {}
        other => panic!("expected BitmapLength, got {other:?}"),
    }
    assert_eq!(
        sync(&mut t, &ram.layout),
        vec![7],
        "a failed sync must lose nothing"
    );
    // Restart forgets what was written in between.
    ram.write(8, 0, 1);
    t.start().unwrap();
    ram.write(9, 0, 1);
    assert_eq!(sync(&mut t, &ram.layout), vec![9]);
    t.stop().unwrap();
    ram.write(10, 0, 1);
    t.start().unwrap();
    assert_eq!(sync(&mut t, &ram.layout), Vec::<usize>::new());
    drop(t); // stops
    ram.write(11, 0, 1);

    let layout = &ram.layout;
    let cfg = UffdWpConfig::default();
    let r0 = HostRange {
        host_addr: ram.addrs[0],
        len: 1000 * 4096,
        first_page: 0,
    };
    for (bad, why) in [
        (
            HostRange {
                host_addr: r0.host_addr + 1,
                ..r0
            },
            "unaligned",
        ),
        (HostRange { len: 0, ..r0 }, "empty"),
        (
            HostRange {
                first_page: 2500,
                ..r0
            },
            "past the layout",
        ),
    ] {
        assert!(
            matches!(
                UffdWpTracker::new(layout, &[bad], cfg),
                Err(TrackerError::Config { .. })
            ),
            "{why} range accepted"
        );
    }
    let overlap = HostRange {
        host_addr: r0.host_addr + 4096,
        len: 4096,
        first_page: 2000,
    };
    assert!(
        UffdWpTracker::new(layout, &[r0, overlap], cfg).is_err(),
        "overlapping ranges accepted"
    );
    let shared_pages = HostRange {
        host_addr: ram.addrs[1000],
        len: 4096,
        first_page: 999,
    };
    assert!(
        UffdWpTracker::new(layout, &[r0, shared_pages], cfg).is_err(),
        "shared page indices accepted"
    );

    // Memory that is not mapped cannot be registered: start fails and says where.
    // SAFETY: a fresh anonymous mapping, unmapped right away to leave a hole.
    let hole = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        libc::munmap(p, 8192);
        p as usize
    };
    let layout2 = RamLayout::new(4096, &[(0, 8192)]).unwrap();
    let mut t = UffdWpTracker::new(
        &layout2,
        &[HostRange {
            host_addr: hole,
            len: 8192,
            first_page: 0,
        }],
        cfg,
    )
    .unwrap();
    match t.start() {
        Err(e @ TrackerError::Range { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("uffd-wp") && msg.contains(&format!("{hole:#x}")),
                "{msg}"
            );
        }
        other => panic!("registering a hole: {other:?}"),
    }
}

/// Two backends at once: the uffd tracker sees every write to RAM, the vm-memory bitmap
/// only the writes made through vm-memory; the union reports both, and names the member
/// that fails.
#[test]
fn union_of_uffd_and_vmm_bitmap_reports_both_and_names_failures() {
    let ram = ram::<AtomicBitmap>();
    if !features().wp() {
        eprintln!("skipped: no userfaultfd write protection");
        return;
    }
    let uffd = UffdWpTracker::for_memory(&ram.mem, &ram.layout, UffdWpConfig::default()).unwrap();
    let vmm = VmmBitmapTracker::new(&ram.mem, &ram.layout).unwrap();
    let mut union = UnionTracker::new(vec![Box::new(vmm), Box::new(uffd)]);
    union.start().unwrap();
    ram.write(3, 0, 1); // raw: only uffd sees it
    ram.mem
        .write_obj(7u64, GuestAddress(ram.layout.page_to_gpa(1200).unwrap()))
        .unwrap(); // both see it
    assert_eq!(sync(&mut union, &ram.layout), vec![3, 1200]);
    assert_eq!(sync(&mut union, &ram.layout), Vec::<usize>::new());
    union.stop().unwrap();

    // A member that cannot start: the union says which, and leaves the others stopped.
    let layout2 = RamLayout::new(4096, &[(0, 4096)]).unwrap();
    let vmm2 = VmmBitmapTracker::new(
        &GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap(),
        &layout2,
    )
    .unwrap();
    let broken = UffdWpTracker::new(
        &layout2,
        // Page 0 of the process: never mapped.
        &[HostRange {
            host_addr: 0,
            len: 4096,
            first_page: 0,
        }],
        UffdWpConfig::default(),
    )
    .unwrap();
    let mut union = UnionTracker::new(vec![Box::new(vmm2), Box::new(broken)]);
    match union.start() {
        Err(e @ TrackerError::Member { index: 1, .. }) => {
            assert!(e.to_string().contains("tracker 1 (uffd-wp)"), "{e}");
        }
        other => panic!("expected member 1 to fail, got {other:?}"),
    }
    match union.sync_and_clear(&mut layout2.new_bitmap()) {
        Err(TrackerError::Member {
            index: 0,
            name,
            source,
        }) => {
            assert_eq!(name, "vmm-bitmap");
            assert!(
                matches!(*source, TrackerError::NotStarted { .. }),
                "member 0 was left started"
            );
        }
        other => panic!("expected member 0 to be stopped, got {other:?}"),
    }
}

/// With the default configuration a started tracker leaves untouched pages telling apart
/// from written ones, so a migration's bulk pass can skip them: `populated_pages` reports
/// exactly the pages written, before and after the tracker started.
#[test]
fn default_tracker_keeps_untouched_pages_visible_as_unpopulated() {
    let r = ram::<()>();
    let before = [3usize, 40];
    for &p in &before {
        r.mem
            .write_slice(&[1u8; 8], GuestAddress(r.layout.page_to_gpa(p).unwrap()))
            .unwrap();
    }
    let f = features();
    if !f.wp() {
        eprintln!("skipped: this kernel has no userfaultfd write protection for anonymous memory");
        return;
    }
    let mut t = UffdWpTracker::for_memory(&r.mem, &r.layout, UffdWpConfig::default()).unwrap();
    t.start().expect("start");
    let after = 17usize;
    r.mem
        .write_slice(
            &[2u8; 8],
            GuestAddress(r.layout.page_to_gpa(after).unwrap()),
        )
        .unwrap();
    let populated: Vec<usize> = migration_core::pagemap::populated_pages(&r.mem, &r.layout)
        .unwrap()
        .iter_ones()
        .collect();
    assert_eq!(populated, [3, 17, 40]);
    assert_eq!(sync(&mut t, &r.layout), [17]);
    t.stop().unwrap();
}
