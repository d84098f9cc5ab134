//! What a migration engine takes from a `Vm`: RAM, its layout, KVM memory slots and host
//! ranges for dirty tracking.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::small_config;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use migration_core::PAGE_SIZE;
use migration_core::geometry::GuestRam;
use migration_core::vm::VmControl;
use vmm_demo::{Console, GuestKind, Vm};

#[test]
fn ram_layout_and_host_ranges_describe_guest_memory() {
    for kind in common::kinds("ram_layout_and_host_ranges_describe_guest_memory") {
        let vm = Vm::new(&small_config(2), kind, Console::Discard).unwrap();
        let ram = GuestRam::new(vm.memory().as_ref()).unwrap();
        assert_eq!(ram.layout(), vm.ram_layout());
        assert_eq!(vm.ram_layout().ram_bytes(), vm.config().mem_bytes);
        let ranges = vm.host_ranges();
        assert_eq!(ranges.len(), vm.workload().regions().len());
        for (r, &(base, size)) in ranges.iter().zip(vm.workload().regions()) {
            assert_eq!(r.len as u64, size);
            let page = vm.ram_layout().gpa_to_page(base).unwrap();
            assert_eq!(r.first_page, page);
            assert_eq!(r.host_addr, ram.host_address(page).unwrap() as usize);
        }
        // They are what a tracker without KVM takes.
        migration_core::dirty::UffdWpTracker::new(
            vm.ram_layout(),
            &ranges,
            migration_core::dirty::UffdWpConfig::default(),
        )
        .unwrap();
        match kind {
            GuestKind::Kvm => {
                assert!(vm.vm_fd().is_some());
                let slots = vm.memory_slots();
                assert_eq!(slots.len(), ranges.len());
                for ((s, r), &(base, _)) in slots.iter().zip(&ranges).zip(vm.workload().regions()) {
                    assert_eq!(
                        (s.guest_base, s.size, s.host_addr),
                        (base, r.len as u64, r.host_addr as u64)
                    );
                    assert_eq!(s.flags, 0);
                }
            }
            GuestKind::Software => {
                assert!(vm.vm_fd().is_none());
                assert!(vm.memory_slots().is_empty());
            }
        }
    }
}

/// The slots and VM fd are all a KVM dirty-log tracker needs: with logging turned on
/// through them, the pages the guest dirties are exactly its working set (plus the
/// control blocks and stacks it writes, and page tables it marks accessed).
#[test]
fn memory_slots_are_enough_for_the_kvm_dirty_log() {
    if !common::kvm_or_skip("memory_slots_are_enough_for_the_kvm_dirty_log") {
        return;
    }
    let mut vm = Vm::new(&small_config(2), GuestKind::Kvm, Console::Discard).unwrap();
    let fd = vm.vm_fd().unwrap();
    for s in vm.memory_slots() {
        let r = kvm_userspace_memory_region {
            slot: s.slot,
            flags: s.flags | KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: s.guest_base,
            memory_size: s.size,
            userspace_addr: s.host_addr,
        };
        // SAFETY: the same mapping the VM registered, kept alive by `vm`.
        unsafe { fd.set_user_memory_region(r) }.unwrap();
    }
    vm.resume().unwrap();
    vm.wait_for_passes(
        vm.passes().iter().max().unwrap() + 2,
        Duration::from_secs(30),
    )
    .unwrap();
    vm.pause().unwrap();
    let mut dirty = BTreeSet::new();
    for s in vm.memory_slots() {
        let words = fd.get_dirty_log(s.slot, s.size as usize).unwrap();
        for (w, bits) in words.iter().enumerate() {
            for b in 0..64 {
                if bits & (1 << b) != 0 {
                    dirty.insert(s.guest_base + (w as u64 * 64 + b) * PAGE_SIZE);
                }
            }
        }
    }
    let w = vm.workload();
    let ws: BTreeSet<u64> = (0..w.vcpus())
        .flat_map(|v| w.segments(v).to_vec())
        .flat_map(|(s, e)| (s..e).step_by(PAGE_SIZE as usize))
        .collect();
    assert!(
        ws.is_subset(&dirty),
        "a working-set page was not logged dirty"
    );
    let outside: Vec<u64> = dirty
        .iter()
        .copied()
        .filter(|&g| !ws.contains(&g) && g >= vmm_demo::layout::DATA_START)
        .collect();
    assert!(
        outside.is_empty(),
        "data pages outside the working set logged dirty: {outside:x?}"
    );
    vm.check().unwrap();
}

/// Preallocated RAM is populated page for page, and an incoming VM of that layout is built
/// on it (on fresh RAM when the layouts differ).
#[test]
fn incoming_vm_uses_preallocated_ram_of_its_layout() {
    use vmm_demo::PreallocatedRam;
    let cfg = small_config(2);
    for kind in common::kinds("incoming_vm_uses_preallocated_ram_of_its_layout") {
        let ram = PreallocatedRam::new(cfg.mem_bytes, cfg.ram_regions).unwrap();
        let (vm, used) = Vm::new_incoming_on(&cfg, kind, Console::Discard, ram).unwrap();
        assert!(
            used,
            "{kind}: same layout, the preallocated RAM must be used"
        );
        let populated =
            migration_core::pagemap::populated_pages(vm.memory().as_ref(), vm.ram_layout())
                .unwrap();
        assert_eq!(
            populated.count(),
            vm.ram_layout().page_count(),
            "{kind}: every page of preallocated RAM is present"
        );
        drop(vm);
        // Another layout: fresh RAM, nothing present.
        let ram = PreallocatedRam::new(cfg.mem_bytes * 2, cfg.ram_regions).unwrap();
        let (vm, used) = Vm::new_incoming_on(&cfg, kind, Console::Discard, ram).unwrap();
        assert!(!used);
        let populated =
            migration_core::pagemap::populated_pages(vm.memory().as_ref(), vm.ram_layout())
                .unwrap();
        assert!(
            populated.count() < vm.ram_layout().page_count() / 2,
            "{kind}: fresh RAM is mostly untouched"
        );
    }
}
