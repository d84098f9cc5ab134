//! The guest's walk as the vCPUs run it: paused anywhere in a pass, RAM is what the
//! oracle expects of the walk's order, and the vCPU's own idea of where it is (the KVM
//! guest's registers, the software vCPU's position) is the page after the visited part.

mod common;

use std::time::{Duration, Instant};

use common::{kinds, small_config};
use migration_core::vm::VmControl;
use vmm_demo::layout::Order;
use vmm_demo::state::{self, SoftPosition, VcpuState};
use vmm_demo::{Console, GuestKind, PAGE_SIZE, Vm, VmConfig};

/// Pauses wanted in the middle of a pass, per vCPU.
const MID_PASS: usize = 5;
/// Longest the test goes on pausing for them.
const DEADLINE: Duration = Duration::from_secs(60);

/// The index, in its share (address order), of the `k`-th page vCPU `v` visits.
fn nth_index(vm: &Vm, v: u32, k: usize) -> u64 {
    let gpa = vm.workload().walk(v).nth(k).unwrap();
    let first = vm.workload().share(v).start;
    (vm.workload().ram().gpa_to_page(gpa).unwrap() - first) as u64
}

/// Pauses a running guest at arbitrary points until each vCPU was caught mid-pass
/// [`MID_PASS`] times, checking each time that the oracle accepts RAM and that the vCPU
/// is about to visit the page the oracle's count says comes next.
fn paused_anywhere(kind: GuestKind, order: Order) {
    // 2048 pages for two vCPUs in two regions: vCPU 1's share crosses the hole.
    let cfg = VmConfig {
        working_set_bytes: 8 << 20,
        order,
        ..small_config(2)
    };
    let mut vm = Vm::new(&cfg, kind, Console::Discard).unwrap();
    assert_eq!(vm.workload().segments(1).len(), 2);
    if kind == GuestKind::Software {
        // About as fast as the KVM guest, so that pauses land all along a pass.
        vm.set_software_pace(Duration::from_micros(5));
    }
    vm.resume().unwrap();
    vm.wait_for_passes(1, Duration::from_secs(30)).unwrap();
    let mut mid = [0usize; 2];
    let start = Instant::now();
    let mut round = 0u64;
    while mid.iter().any(|&m| m < MID_PASS) {
        assert!(
            start.elapsed() < DEADLINE,
            "{kind} {order}: caught mid-pass only {mid:?} times in {DEADLINE:?}"
        );
        // Let it run a little, for a time that drifts against the pass length.
        std::thread::sleep(Duration::from_micros(700 + 1_300 * (round % 7)));
        round += 1;
        vm.pause().unwrap();
        let report = vm.check().unwrap_or_else(|e| panic!("{kind} {order}: {e}"));
        let states = vm.save_device_state().unwrap();
        for (v, verdict) in report.vcpus.iter().enumerate() {
            let v = v as u32;
            let k = verdict.visited;
            if k == 0 || k == verdict.pages {
                continue;
            }
            mid[v as usize] += 1;
            let n = verdict.pages as u64;
            match kind {
                GuestKind::Kvm => {
                    let s = states.iter().find(|s| s.id == state::vcpu_id(v)).unwrap();
                    let regs = VcpuState::from_bytes(&s.data).unwrap().regs;
                    match order {
                        // rdi: the next page, or the one just visited, or (paused
                        // between the step and the load of the next segment) the end
                        // of the segment it was in.
                        Order::Sequential => {
                            let next = vm.workload().walk(v).nth(k).unwrap();
                            let prev = vm.workload().walk(v).nth(k - 1).unwrap();
                            assert!(
                                [next, prev, prev + PAGE_SIZE].contains(&regs.rdi),
                                "vcpu{v}: rdi {:#x}, the oracle's next page {next:#x}",
                                regs.rdi
                            );
                        }
                        // r8: the offset in the share of the next page, or of the page
                        // just visited when paused between its increment and the step
                        // to the next, maybe one share length on before the wrap.
                        Order::Scattered => {
                            let at = regs.r8 / PAGE_SIZE % n;
                            assert!(
                                at == nth_index(&vm, v, k) || at == nth_index(&vm, v, k - 1),
                                "vcpu{v}: r8 {}, the oracle's next page is index {} after {k} visits",
                                regs.r8,
                                nth_index(&vm, v, k)
                            );
                        }
                    }
                }
                GuestKind::Software => {
                    let s = states.iter().find(|s| s.id == state::swcpu_id(v)).unwrap();
                    let pos = SoftPosition::from_bytes(&s.data).unwrap();
                    let next = vm.workload().walk(v).nth(k).unwrap();
                    assert_eq!(pos.addr, next, "vcpu{v} after {k} visits");
                }
            }
        }
        vm.resume().unwrap();
    }
    vm.pause().unwrap();
    assert!(vm.failures().is_empty(), "{:?}", vm.failures());
}

#[test]
fn a_scattered_walk_paused_anywhere_is_where_the_oracle_says() {
    for kind in kinds("a_scattered_walk_paused_anywhere_is_where_the_oracle_says") {
        paused_anywhere(kind, Order::Scattered);
    }
}

#[test]
fn a_sequential_walk_paused_anywhere_is_where_the_oracle_says() {
    for kind in kinds("a_sequential_walk_paused_anywhere_is_where_the_oracle_says") {
        paused_anywhere(kind, Order::Sequential);
    }
}
