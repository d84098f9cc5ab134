//! The contract every `DirtyTracker` backend keeps, run against each of them: the KVM
//! dirty log in both modes (with a real guest writing), the `vm-memory` bitmap (the VMM's
//! writes), userfaultfd write protection in both modes (a software vCPU's writes), and a
//! union. Each backend writes pages the way its writers do; the contract is the same.
//!
//! The contract (`migration_core::dirty`): a sync before `start` is refused; a bitmap of
//! the wrong size is refused and loses nothing; writes before `start` are never reported;
//! every page written after `start` is reported by the next sync, and only those pages;
//! a sync forgets what it reported and ORs into the bitmap it is given; `stop` is
//! idempotent, and after a restart only writes made since are reported.
#![cfg(feature = "host")]

mod common;

use migration_core::dirty::{
    DirtyTracker, TrackerError, UffdFeatures, UffdWpConfig, UffdWpMode, UffdWpTracker,
    UnionTracker, VmmBitmapTracker,
};
use migration_core::{DirtyBitmap, GuestRam, RamLayout};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A tracker under test and a way to write guest pages that it must see.
trait Backend {
    fn layout(&self) -> &RamLayout;
    fn tracker(&mut self) -> &mut dyn DirtyTracker;
    /// Writes `marker` into each of `pages` (global indices), as this backend's writers do.
    fn write(&mut self, pages: &[usize], marker: u8);
    /// Pages the writer may write (the KVM guest's code and table pages must stay clean).
    fn writable(&self) -> Vec<usize>;
}

fn sync(b: &mut dyn Backend) -> Vec<usize> {
    let mut bitmap = b.layout().new_bitmap();
    b.tracker().sync_and_clear(&mut bitmap).unwrap();
    bitmap.iter_ones().collect()
}

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

/// Pages around every 64-page word boundary of the bitmap and every region boundary,
/// plus a spread of others, that `b` may write.
fn interesting(b: &dyn Backend, salt: usize) -> Vec<usize> {
    let ok = b.writable();
    let n = b.layout().page_count();
    let mut want: Vec<usize> = Vec::new();
    for w in (0..n).step_by(64) {
        want.extend([w.wrapping_sub(1), w, w + 1]);
    }
    for r in b.layout().regions() {
        let range = r.page_range(b.layout().page_size());
        want.extend([range.start, range.start + 1, range.end - 1]);
    }
    want.extend((0..n).step_by(37 + salt));
    sorted(
        want.into_iter()
            .filter(|p| ok.binary_search(p).is_ok())
            .collect(),
    )
}

/// Whether `r` refuses a sync because the tracker is not started (a union names the
/// member that refused).
fn not_started(r: Result<(), TrackerError>) -> bool {
    match r {
        Err(TrackerError::NotStarted { .. }) => true,
        Err(TrackerError::Member { source, .. }) => not_started(Err(*source)),
        _ => false,
    }
}

fn contract(name: &str, b: &mut dyn Backend) {
    eprintln!("contract: {name}");
    let pages = b.layout().page_count();
    // A sync before start is refused.
    assert!(
        not_started(b.tracker().sync_and_clear(&mut DirtyBitmap::new(pages))),
        "{name}: sync before start"
    );
    // Written before start: never reported.
    let before = interesting(b, 1);
    b.write(&before[..before.len().min(8)], 0x11);
    b.tracker().start().expect("start");
    assert_eq!(
        sync(b),
        Vec::<usize>::new(),
        "{name}: writes before start reported"
    );

    // Round 1: exactly the pages written, then nothing.
    let round1 = interesting(b, 0);
    b.write(&round1, 0x22);
    assert_eq!(sync(b), round1, "{name}: round 1");
    assert_eq!(sync(b), Vec::<usize>::new(), "{name}: round 1 not cleared");

    // Round 2 overlaps round 1: pages reported already are caught again, and the sync
    // ORs into what the bitmap holds.
    let round2: Vec<usize> = round1
        .iter()
        .copied()
        .step_by(3)
        .chain(interesting(b, 5))
        .collect();
    let round2 = sorted(round2);
    b.write(&round2, 0x33);
    let mut bitmap = b.layout().new_bitmap();
    let extra = *b.writable().last().unwrap();
    bitmap.set(extra);
    b.tracker().sync_and_clear(&mut bitmap).unwrap();
    assert_eq!(
        bitmap.iter_ones().collect::<Vec<_>>(),
        sorted([round2, vec![extra]].concat()),
        "{name}: round 2"
    );

    // A bitmap of the wrong size is refused, and what was written is still reported.
    let one = vec![b.writable()[b.writable().len() / 2]];
    b.write(&one, 0x44);
    match b.tracker().sync_and_clear(&mut DirtyBitmap::new(pages - 1)) {
        Err(TrackerError::BitmapLength { expected, got, .. }) => {
            assert_eq!((expected, got), (pages, pages - 1), "{name}")
        }
        Err(TrackerError::Member { source, .. })
            if matches!(*source, TrackerError::BitmapLength { .. }) => {}
        other => panic!("{name}: expected BitmapLength, got {other:?}"),
    }
    assert_eq!(sync(b), one, "{name}: a refused sync lost a write");

    // Stop twice, write, restart: the write in between is not reported, the next one is.
    b.tracker().stop().unwrap();
    b.tracker().stop().expect("stop is idempotent");
    assert!(
        not_started(b.tracker().sync_and_clear(&mut DirtyBitmap::new(pages))),
        "{name}: sync after stop"
    );
    let between = interesting(b, 11);
    b.write(&between[..between.len().min(5)], 0x55);
    b.tracker().start().unwrap();
    let round3 = interesting(b, 23);
    b.write(&round3, 0x66);
    assert_eq!(sync(b), round3, "{name}: after restart");
    b.tracker().stop().unwrap();
}

/// Two regions, the second starting off a 64-page word boundary.
fn memory<B: NewBitmap>() -> GuestMemoryMmap<B> {
    GuestMemoryMmap::<B>::from_ranges(&[
        (GuestAddress(0), 300 * 4096),
        (GuestAddress(0x1_0000_0000), 700 * 4096),
    ])
    .unwrap()
}

/// The VMM writes guest memory through vm-memory: the bitmap tracker sees it.
struct VmmWrites<T> {
    mem: GuestMemoryMmap<AtomicBitmap>,
    layout: RamLayout,
    tracker: T,
}

impl<T: DirtyTracker> Backend for VmmWrites<T> {
    fn layout(&self) -> &RamLayout {
        &self.layout
    }
    fn tracker(&mut self) -> &mut dyn DirtyTracker {
        &mut self.tracker
    }
    fn write(&mut self, pages: &[usize], marker: u8) {
        for &p in pages {
            let gpa = GuestAddress(self.layout.page_to_gpa(p).unwrap() + (p as u64 * 13) % 4096);
            self.mem.write_obj(marker, gpa).unwrap();
        }
    }
    fn writable(&self) -> Vec<usize> {
        (0..self.layout.page_count()).collect()
    }
}

#[test]
fn vmm_bitmap_tracker_keeps_the_contract() {
    let mem = memory::<AtomicBitmap>();
    let layout = RamLayout::of_memory(&mem).unwrap();
    let tracker = VmmBitmapTracker::new(&mem, &layout).unwrap();
    contract(
        "vmm-bitmap",
        &mut VmmWrites {
            mem,
            layout,
            tracker,
        },
    );
}

/// A software vCPU writes guest memory through raw host pointers: only write protection
/// sees it.
struct RawWrites<B: NewBitmap> {
    mem: GuestMemoryMmap<B>,
    layout: RamLayout,
    addrs: Vec<usize>,
    tracker: Box<dyn DirtyTracker>,
}

impl<B: NewBitmap> Backend for RawWrites<B> {
    fn layout(&self) -> &RamLayout {
        &self.layout
    }
    fn tracker(&mut self) -> &mut dyn DirtyTracker {
        &mut *self.tracker
    }
    fn write(&mut self, pages: &[usize], marker: u8) {
        let _ = &self.mem;
        for &p in pages {
            let addr = self.addrs[p] + (p * 13) % 4096;
            // SAFETY: inside a mapping owned by `self.mem`, which outlives the writes; the
            // test touches guest memory from this thread only.
            unsafe { (addr as *mut u8).write_volatile(marker) };
        }
    }
    fn writable(&self) -> Vec<usize> {
        (0..self.layout.page_count()).collect()
    }
}

fn raw_writes<B: NewBitmap>(
    make: impl FnOnce(&GuestMemoryMmap<B>, &RamLayout) -> Box<dyn DirtyTracker>,
) -> RawWrites<B> {
    let mem = memory::<B>();
    let ram = GuestRam::new(&mem).unwrap();
    let layout = ram.layout().clone();
    let addrs = (0..layout.page_count())
        .map(|p| ram.host_address(p).unwrap() as usize)
        .collect();
    let tracker = make(&mem, &layout);
    RawWrites {
        mem,
        layout,
        addrs,
        tracker,
    }
}

fn uffd(mode: UffdWpMode) -> Option<UffdWpConfig> {
    let f = UffdFeatures::probe().expect("probing userfaultfd");
    if !f.wp() {
        eprintln!("skipped: this kernel has no userfaultfd write protection for anonymous memory");
        return None;
    }
    if mode == UffdWpMode::Async && !f.wp_async() {
        eprintln!("skipped: this kernel lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7)");
        return None;
    }
    Some(UffdWpConfig {
        mode,
        // Small, so that scans of scattered pages fill it and must continue.
        scan_buffer: 5,
        ..UffdWpConfig::default()
    })
}

#[test]
fn userfaultfd_write_protect_keeps_the_contract_in_both_modes() {
    for mode in [UffdWpMode::Async, UffdWpMode::Sync] {
        let Some(cfg) = uffd(mode) else { continue };
        let mut b = raw_writes::<()>(|mem, layout| {
            Box::new(UffdWpTracker::for_memory(mem, layout, cfg).unwrap())
        });
        contract(&format!("uffd-wp {}", mode.as_str()), &mut b);
    }
}

#[test]
fn a_union_keeps_the_contract() {
    let Some(cfg) = uffd(UffdWpMode::Auto) else {
        return;
    };
    // Raw writes (a vCPU) seen by write protection, with a bitmap tracker beside it that
    // sees none of them: the union reports what either member saw.
    let mut b = raw_writes::<AtomicBitmap>(|mem, layout| {
        Box::new(UnionTracker::new(vec![
            Box::new(VmmBitmapTracker::new(mem, layout).unwrap()),
            Box::new(UffdWpTracker::for_memory(mem, layout, cfg).unwrap()),
        ]))
    });
    contract("union", &mut b);
}

#[cfg(feature = "kvm")]
mod kvm {
    use super::common::kvm_guest::{Guest, TABLE_GPA, guest};
    use super::*;
    use migration_core::dirty::kvm::manual_protect_supported;
    use migration_core::dirty::{KvmDirtyLog, KvmDirtyLogMode};

    /// A real KVM guest writes the pages: KVM's dirty log sees it.
    struct GuestWrites {
        g: Guest<()>,
        tracker: KvmDirtyLog<std::sync::Arc<kvm_ioctls::VmFd>>,
    }

    impl Backend for GuestWrites {
        fn layout(&self) -> &RamLayout {
            &self.g.layout
        }
        fn tracker(&mut self) -> &mut dyn DirtyTracker {
            &mut self.tracker
        }
        fn write(&mut self, pages: &[usize], marker: u8) {
            // The guest's table holds at most 1023 addresses.
            for chunk in pages.chunks(1000) {
                self.g.write_pages(chunk, marker);
            }
        }
        fn writable(&self) -> Vec<usize> {
            let table = (TABLE_GPA / 4096) as usize;
            (0..self.g.layout.page_count())
                .filter(|&p| p != 0 && p != table)
                .collect()
        }
    }

    #[test]
    fn kvm_dirty_log_keeps_the_contract_in_both_modes() {
        for mode in [KvmDirtyLogMode::GetClears, KvmDirtyLogMode::ManualProtect] {
            let Some(g) = guest::<()>() else { return };
            if mode == KvmDirtyLogMode::ManualProtect && !manual_protect_supported(&g.vm) {
                eprintln!("skipped: this KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
                continue;
            }
            // SAFETY: the slots are as registered, over `g.mem`, which outlives the
            // tracker (dropped with it, the tracker first).
            let tracker = unsafe { KvmDirtyLog::new(g.vm.clone(), &g.layout, &g.slots, mode) }
                .expect("building the tracker");
            contract(&format!("kvm {mode:?}"), &mut GuestWrites { g, tracker });
        }
    }
}
