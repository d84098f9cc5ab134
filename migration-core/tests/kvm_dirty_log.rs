//! The KVM dirty-log tracker against a real KVM guest: what only KVM has (slot checks,
//! the mode chosen, the union with the VMM's own writes). The contract every tracker
//! keeps is in `tracker_contract.rs`.
#![cfg(feature = "kvm")]

mod common;

use common::kvm_guest::{TABLE_GPA, guest};
use migration_core::dirty::kvm::manual_protect_supported;
use migration_core::dirty::{
    DirtyTracker, KvmDirtyLog, KvmDirtyLogMode, TrackerError, UnionTracker, VmmBitmapTracker,
};
use migration_core::{DirtyBitmap, RamLayout};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

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

/// The contract every tracker keeps is checked for both modes in `tracker_contract.rs`;
/// here, what only KVM has: the mode `Auto` picks.
#[test]
fn kvm_auto_mode_picks_manual_protect_where_available() {
    let Some(g) = guest::<()>() else { return };
    let expected = if manual_protect_supported(&g.vm) {
        KvmDirtyLogMode::ManualProtect
    } else {
        KvmDirtyLogMode::GetClears
    };
    // SAFETY: the slots are as registered, over `g.mem`, which outlives the tracker.
    let mut t =
        unsafe { KvmDirtyLog::new(g.vm.clone(), &g.layout, &g.slots, KvmDirtyLogMode::Auto) }
            .unwrap();
    assert_eq!(t.mode(), None);
    t.start().unwrap();
    assert_eq!(t.mode(), Some(expected));
    t.stop().unwrap();
    assert_eq!(t.mode(), None);
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
