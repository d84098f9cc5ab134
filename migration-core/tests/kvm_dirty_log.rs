//! The KVM dirty-log tracker against a real KVM guest.
//!
//! The guest is a 14-byte program in 32-bit protected mode that writes one byte into each
//! page of a list the test chooses, then halts. Its code and its list live in pages it only
//! reads, so the pages it dirties are exactly the ones listed, and the test checks that the
//! tracker reports exactly those, in both modes, across rounds and a restart.
#![cfg(feature = "kvm")]

use std::sync::Arc;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration_core::dirty::kvm::manual_protect_supported;
use migration_core::dirty::{
    DirtyTracker, KvmDirtyLog, KvmDirtyLogMode, TrackerError, UnionTracker, VmmBitmapTracker,
};
use migration_core::{DirtyBitmap, RamLayout};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// The guest program, at guest-physical 0. It runs in 32-bit protected mode with flat
/// 4 GiB segments that the test loads straight into the segment caches with
/// KVM_SET_SREGS; it never loads a segment register, so it needs no GDT, and it uses no
/// stack. Input: esi = guest-physical address of a zero-terminated table of u32 addresses,
/// dl = the byte to write at each.
///
/// ```text
/// 0x00: 8b 06     next: mov  eax, [esi]
/// 0x02: 85 c0           test eax, eax
/// 0x04: 74 07           jz   done          ; 0x06 + 7 = 0x0d
/// 0x06: 88 10           mov  [eax], dl
/// 0x08: 83 c6 04        add  esi, 4
/// 0x0b: eb f3           jmp  next          ; 0x0d - 13 = 0x00
/// 0x0d: f4        done: hlt
/// ```
const CODE: [u8; 14] = [
    0x8b, 0x06, 0x85, 0xc0, 0x74, 0x07, 0x88, 0x10, 0x83, 0xc6, 0x04, 0xeb, 0xf3, 0xf4,
];
const TABLE_GPA: u64 = 0x1000;
/// Slot 0: code (page 0), table (page 1), then pages the guest may write. 67 pages, so
/// slot 1's pages start at global page 67, off a 64-page word boundary.
const SLOT0: (u64, u64) = (0, 67 * 4096);
/// Slot 1: 4 MiB at 1 MiB.
const SLOT1: (u64, u64) = (0x10_0000, 4 << 20);

struct Guest<B: NewBitmap> {
    // Dropped in this order: the vCPU and VM before the memory they map.
    vcpu: VcpuFd,
    vm: Arc<VmFd>,
    slots: Vec<kvm_userspace_memory_region>,
    layout: RamLayout,
    mem: GuestMemoryMmap<B>,
}

/// A VM with the two slots and one vCPU in flat protected mode, or `None` (with the reason
/// printed) where KVM is not available.
fn guest<B: NewBitmap>() -> Option<Guest<B>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm does not exist on this machine");
        return None;
    }
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipped: cannot open /dev/kvm: {e}");
            return None;
        }
    };
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    let mem = GuestMemoryMmap::<B>::from_ranges(&[
        (GuestAddress(SLOT0.0), SLOT0.1 as usize),
        (GuestAddress(SLOT1.0), SLOT1.1 as usize),
    ])
    .unwrap();
    let layout = RamLayout::of_memory(&mem).unwrap();
    let slots: Vec<_> = mem
        .iter()
        .enumerate()
        .map(|(i, r)| kvm_userspace_memory_region {
            slot: i as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.get_host_address(MemoryRegionAddress(0)).unwrap() as u64,
        })
        .collect();
    for s in &slots {
        // SAFETY: the region is mapped by `mem`, which the Guest keeps until after the VM
        // is gone.
        unsafe {
            vm.set_user_memory_region(*s)
                .expect("KVM_SET_USER_MEMORY_REGION")
        };
    }
    mem.write_slice(&CODE, GuestAddress(0)).unwrap();

    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().unwrap();
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3, // read/write, accessed
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1; // PE, no paging
    vcpu.set_sregs(&sregs).unwrap();
    Some(Guest {
        vcpu,
        vm,
        slots,
        layout,
        mem,
    })
}

impl<B: NewBitmap> Guest<B> {
    /// Global page indices for pages `local` of slot `slot`.
    fn pages(&self, slot: usize, local: &[usize]) -> Vec<usize> {
        let first = self.layout.regions()[slot].first_page;
        local.iter().map(|p| first + p).collect()
    }

    /// Runs the guest over `pages` (global indices), writing `marker` at a different offset
    /// in each, and checks that it did.
    fn write_pages(&mut self, pages: &[usize], marker: u8) {
        let mut table = Vec::new();
        let mut addrs = Vec::new();
        for (i, &p) in pages.iter().enumerate() {
            let gpa = self.layout.page_to_gpa(p).unwrap() + (i as u64 * 97) % 4096;
            assert_ne!(gpa >> 12, 0, "the code page must stay clean");
            assert_ne!(gpa >> 12, TABLE_GPA >> 12, "the table page must stay clean");
            table.extend_from_slice(&(gpa as u32).to_le_bytes());
            addrs.push(gpa);
        }
        table.extend_from_slice(&0u32.to_le_bytes());
        assert!(table.len() <= 4096, "the table must fit its page");
        // Written by the host through the mapping: KVM does not log it.
        self.mem
            .write_slice(&table, GuestAddress(TABLE_GPA))
            .unwrap();

        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rip = 0;
        regs.rflags = 0x2;
        regs.rsi = TABLE_GPA;
        regs.rdx = u64::from(marker);
        self.vcpu.set_regs(&regs).unwrap();
        match self.vcpu.run() {
            Ok(VcpuExit::Hlt) => {}
            Ok(other) => panic!("guest stopped with {other:?} instead of hlt"),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
        let regs = self.vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x0e, "guest halted somewhere else than its hlt");
        for gpa in addrs {
            let byte: u8 = self.mem.read_obj(GuestAddress(gpa)).unwrap();
            assert_eq!(byte, marker, "the guest did not write {gpa:#x}");
        }
    }
}

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

fn sync(tracker: &mut dyn DirtyTracker, layout: &RamLayout) -> Vec<usize> {
    let mut bitmap = layout.new_bitmap();
    tracker.sync_and_clear(&mut bitmap).unwrap();
    bitmap.iter_ones().collect()
}

fn exercise(mode: KvmDirtyLogMode) {
    let Some(mut g) = guest::<()>() else { return };
    let supported = manual_protect_supported(&g.vm);
    if mode == KvmDirtyLogMode::ManualProtect && !supported {
        eprintln!("skipped: this KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
        return;
    }
    let expected_mode = match mode {
        KvmDirtyLogMode::Auto if supported => KvmDirtyLogMode::ManualProtect,
        KvmDirtyLogMode::Auto => KvmDirtyLogMode::GetClears,
        m => m,
    };

    // Written before start: never reported.
    let before = [g.pages(0, &[10, 11]), g.pages(1, &[5, 900])].concat();
    g.write_pages(&before, 0x11);

    // SAFETY: `g.slots` are the slots as registered above, over `g.mem`, which outlives
    // the tracker (dropped at the end of this function, before `g`).
    let mut tracker = unsafe { KvmDirtyLog::new(g.vm.clone(), &g.layout, &g.slots, mode) }
        .expect("building the tracker");
    assert_eq!(tracker.mode(), None);
    assert!(matches!(
        tracker.sync_and_clear(&mut g.layout.new_bitmap()),
        Err(TrackerError::NotStarted { .. })
    ));
    tracker.start().expect("start");
    assert_eq!(tracker.mode(), Some(expected_mode));
    assert_eq!(
        sync(&mut tracker, &g.layout),
        Vec::<usize>::new(),
        "pages written before start were reported"
    );

    // Round 1: pages around both word boundaries of each slot and of the global bitmap
    // (slot 1 starts at global page 67).
    let round1 = sorted(
        [
            g.pages(0, &[2, 3, 40, 63, 64, 66]),
            g.pages(1, &[0, 1, 60, 61, 62, 63, 64, 127, 128, 500, 1023]),
        ]
        .concat(),
    );
    g.write_pages(&round1, 0x22);
    assert_eq!(sync(&mut tracker, &g.layout), round1, "round 1");
    assert_eq!(
        sync(&mut tracker, &g.layout),
        Vec::<usize>::new(),
        "round 1 not cleared"
    );

    // Round 2 overlaps round 1: pages already reported must be caught again.
    let round2 = sorted(
        [
            g.pages(0, &[2, 5, 65]),
            g.pages(1, &[0, 2, 63, 64, 700, 1022, 1023]),
        ]
        .concat(),
    );
    g.write_pages(&round2, 0x33);
    // The sync ORs into what the bitmap holds: pages already marked stay marked.
    let mut bitmap = g.layout.new_bitmap();
    bitmap.set(0);
    tracker.sync_and_clear(&mut bitmap).unwrap();
    assert_eq!(
        bitmap.iter_ones().collect::<Vec<_>>(),
        sorted([vec![0], round2.clone()].concat()),
        "round 2"
    );
    assert_eq!(
        sync(&mut tracker, &g.layout),
        Vec::<usize>::new(),
        "round 2 not cleared"
    );

    // A bitmap of the wrong size is an error, not a panic, and loses nothing.
    g.write_pages(&g.pages(1, &[77]), 0x44);
    match tracker.sync_and_clear(&mut DirtyBitmap::new(g.layout.page_count() - 1)) {
        Err(TrackerError::BitmapLength { expected, got, .. }) => {
            assert_eq!(
                (expected, got),
                (g.layout.page_count(), g.layout.page_count() - 1)
            )
        }
        other => panic!("expected BitmapLength, got {other:?}"),
    }
    assert_eq!(sync(&mut tracker, &g.layout), g.pages(1, &[77]));

    // Stop, write, restart: the write in between is not reported, the next one is.
    tracker.stop().unwrap();
    tracker.stop().expect("stop is idempotent");
    assert_eq!(tracker.mode(), None);
    assert!(matches!(
        tracker.sync_and_clear(&mut g.layout.new_bitmap()),
        Err(TrackerError::NotStarted { .. })
    ));
    g.write_pages(&g.pages(0, &[30]), 0x55);
    tracker.start().unwrap();
    let round3 = sorted([g.pages(0, &[66]), g.pages(1, &[1, 333])].concat());
    g.write_pages(&round3, 0x66);
    assert_eq!(sync(&mut tracker, &g.layout), round3, "after restart");
    tracker.stop().unwrap();
}

#[test]
fn kvm_get_clears_reports_exactly_the_pages_the_guest_wrote() {
    exercise(KvmDirtyLogMode::GetClears);
}

#[test]
fn kvm_manual_protect_reports_exactly_the_pages_the_guest_wrote() {
    exercise(KvmDirtyLogMode::ManualProtect);
}

#[test]
fn kvm_auto_mode_picks_manual_protect_where_available() {
    exercise(KvmDirtyLogMode::Auto);
}

#[test]
fn kvm_slots_must_fit_the_layout() {
    let Some(g) = guest::<()>() else { return };
    let mut bad = g.slots.clone();
    bad[1].guest_phys_addr = 0x8000_0000;
    // SAFETY: construction fails before anything is registered.
    let r = unsafe { KvmDirtyLog::new(g.vm.clone(), &g.layout, &bad, KvmDirtyLogMode::Auto) };
    assert!(
        matches!(r, Err(TrackerError::Config { .. })),
        "slot outside RAM accepted"
    );
    let mut bad = g.slots.clone();
    bad[0].memory_size += 4096; // runs into the gap after region 0
    // SAFETY: as above.
    let r = unsafe { KvmDirtyLog::new(g.vm.clone(), &g.layout, &bad, KvmDirtyLogMode::Auto) };
    match r {
        Err(e @ TrackerError::Config { .. }) => {
            assert!(e.to_string().contains("memory slot 0"), "{e}")
        }
        other => panic!("slot past its region accepted: {:?}", other.err()),
    }
    // The tracker may also borrow the VM instead of sharing it.
    // SAFETY: the slots are as registered, over `g.mem`, which outlives the tracker.
    let mut borrowed =
        unsafe { KvmDirtyLog::new(&*g.vm, &g.layout, &g.slots, KvmDirtyLogMode::GetClears) }
            .unwrap();
    borrowed.start().unwrap();
    assert_eq!(sync(&mut borrowed, &g.layout), Vec::<usize>::new());
    borrowed.stop().unwrap();
    let huge_pages = RamLayout::new(2 << 20, &[(0, 2 << 20)]).unwrap();
    // SAFETY: as above.
    let r = unsafe {
        KvmDirtyLog::new(
            g.vm.clone(),
            &huge_pages,
            &g.slots[..0],
            KvmDirtyLogMode::Auto,
        )
    };
    assert!(
        matches!(r, Err(TrackerError::Config { .. })),
        "2 MiB layout pages accepted"
    );
}

/// What a VMM on KVM runs: the guest's writes come from KVM's log, the VMM's own writes
/// (through vm-memory) from the AtomicBitmap, and the union reports both.
#[test]
fn kvm_log_and_vmm_bitmap_in_a_union_report_guest_and_vmm_writes() {
    let Some(mut g) = guest::<AtomicBitmap>() else {
        return;
    };
    // SAFETY: the slots are as registered, over `g.mem`, which outlives the tracker.
    let kvm = unsafe { KvmDirtyLog::new(g.vm.clone(), &g.layout, &g.slots, KvmDirtyLogMode::Auto) }
        .unwrap();
    let vmm = VmmBitmapTracker::new(&g.mem, &g.layout).unwrap();
    let mut union = UnionTracker::new(vec![Box::new(kvm), Box::new(vmm)]);
    // The test wrote the code through vm-memory before: start forgets it.
    union.start().unwrap();
    assert_eq!(sync(&mut union, &g.layout), Vec::<usize>::new());

    let guest_pages = sorted([g.pages(0, &[4]), g.pages(1, &[9, 10])].concat());
    g.write_pages(&guest_pages, 0x77);
    // The table page was written by the VMM (through vm-memory) to program the guest.
    let table_page = g.layout.gpa_to_page(TABLE_GPA).unwrap();
    let vmm_page = g.pages(1, &[1000])[0];
    g.mem
        .write_obj(
            0xabcdu32,
            GuestAddress(g.layout.page_to_gpa(vmm_page).unwrap()),
        )
        .unwrap();
    let expected = sorted([guest_pages, vec![table_page, vmm_page]].concat());
    assert_eq!(sync(&mut union, &g.layout), expected);
    assert_eq!(sync(&mut union, &g.layout), Vec::<usize>::new());

    match union.sync_and_clear(&mut DirtyBitmap::new(3)) {
        Err(TrackerError::Member {
            index: 0,
            name,
            source,
        }) => {
            assert_eq!(name, "kvm-dirty-log");
            assert!(matches!(*source, TrackerError::BitmapLength { .. }));
        }
        other => panic!("expected the union to name its first member, got {other:?}"),
    }
    union.stop().unwrap();
}
