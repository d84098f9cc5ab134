//! Device state through `VmControl`: saved, restored into a fresh VM, saved again, compared
//! bit for bit, and run on: a local migration without the network.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{copy_ram, kinds, small_config};
use migration_core::vm::{DeviceState, VmControl, VmOp};
use vmm_demo::state::{self, MSR_IA32_TSC, VcpuState};
use vmm_demo::{Console, GuestKind, Order, Vm, VmConfig};

const WAIT: Duration = Duration::from_secs(30);

/// Blobs whose raw bytes may differ after a restore, and only in the fields
/// `state::comparable` documents.
fn may_differ(id: &str) -> bool {
    id.starts_with("vcpu") || id == state::PIT_ID || id == state::KVMCLOCK_ID
}

fn assert_same_state(saved: &[DeviceState], again: &[DeviceState]) {
    let ids: Vec<&str> = saved.iter().map(|s| s.id.as_str()).collect();
    let ids2: Vec<&str> = again.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ids2);
    for (a, b) in saved.iter().zip(again) {
        assert_eq!(a.version, b.version, "{}", a.id);
        assert_eq!(a.data.len(), b.data.len(), "{}", a.id);
        assert_eq!(
            state::comparable(a).unwrap(),
            state::comparable(b).unwrap(),
            "{} differs beyond the fields the kernel changes",
            a.id
        );
        if !may_differ(&a.id) {
            assert_eq!(a.data, b.data, "{}", a.id);
        }
        if a.id.starts_with("vcpu") {
            // The TSC went on counting between the save and the second save.
            let tsc = |d: &Bytes| {
                VcpuState::from_bytes(d)
                    .unwrap()
                    .msrs
                    .iter()
                    .find(|m| m.index == MSR_IA32_TSC)
                    .map(|m| m.data)
            };
            assert!(tsc(&b.data) >= tsc(&a.data), "{}: TSC went back", a.id);
        }
    }
}

/// Values the guest program never touches, so they survive running: set in the source
/// before the round trip so that a component the restore skipped shows up as a
/// difference instead of hiding behind its reset value.
mod perturb {
    use super::*;

    pub const MSRS: [(u32, u64); 8] = [
        (0x174, 0x10),                        // SYSENTER_CS
        (0x175, 0xffff_8000_0000_1000),       // SYSENTER_ESP
        (0x176, 0xffff_8000_0000_2000),       // SYSENTER_EIP
        (0xc000_0081, 0x0023_0010_0000_0000), // STAR
        (0xc000_0082, 0xffff_8000_0000_3000), // LSTAR
        (0xc000_0083, 0xffff_8000_0000_4000), // CSTAR
        (0xc000_0084, 0x4700),                // SFMASK
        (0xc000_0102, 0xffff_8000_0000_5000), // KERNEL_GS_BASE
    ];
    /// Offset of the redirection table in a `kvm_irqchip` holding the IOAPIC.
    const IOAPIC_REDIR: usize = 32;
    /// Offset of the interrupt mask register in a `kvm_irqchip` holding a PIC.
    const PIC_IMR: usize = 10;
    /// Offset of channel 2 in `kvm_pit_state2`, and of its fields.
    const PIT_CH2: usize = 48;
    pub const CLOCK_AHEAD_NS: u64 = 5_000_000_000;

    fn cpu(i: u64, v: &mut VcpuState) {
        v.regs.r9 = 0x0909 + i;
        v.regs.r12 = 0x1212 + i;
        v.regs.r15 = 0x1515 + i;
        v.sregs.fs.base = 0x7000_0000 + i;
        v.sregs.gs.base = 0x7100_0000 + i;
        // CR8 and the local APIC's TPR are the same register.
        v.sregs.cr8 = 1;
        v.lapic.regs[0x80] = 0x10;
        v.debugregs.db = [0x1000, 0x2000, 0x3000, 0x4000 + i];
        for (j, x) in v.fpu.xmm.iter_mut().enumerate() {
            *x = [0x50 ^ j as u8 ^ i as u8; 16];
            // The XSAVE area holds the same registers (at 160 in its legacy region) and
            // is restored after the FPU: keep the two in step.
            v.xsave[160 + 16 * j..176 + 16 * j].copy_from_slice(x);
        }
        // XSTATE_BV (at 512) says the SSE registers are not in their initial state.
        v.xsave[512] |= 2;
        for m in v.msrs.iter_mut() {
            if let Some(&(_, val)) = MSRS.iter().find(|(idx, _)| *idx == m.index) {
                m.data = val;
            }
        }
    }

    pub fn apply(states: &mut [DeviceState]) {
        for (n, s) in states.iter_mut().enumerate() {
            let mut d = s.data.to_vec();
            match s.id.as_str() {
                id if id.starts_with("vcpu") => {
                    let mut v = VcpuState::from_bytes(&d).unwrap();
                    cpu(n as u64, &mut v);
                    d = v.to_bytes();
                }
                state::IOAPIC_ID => {
                    d[IOAPIC_REDIR + 5 * 8..IOAPIC_REDIR + 6 * 8]
                        .copy_from_slice(&0x1_0035u64.to_le_bytes());
                }
                state::PIC_MASTER_ID => d[PIC_IMR] = 0xfa,
                state::PIC_SLAVE_ID => d[PIC_IMR] = 0xf7,
                state::PIT_ID => {
                    // Channel 2 (the speaker, gate low) never fires an interrupt.
                    d[PIT_CH2..PIT_CH2 + 4].copy_from_slice(&0x1234u32.to_le_bytes());
                    d[PIT_CH2 + 14] = 3; // rw_mode
                    d[PIT_CH2 + 15] = 3; // mode
                }
                state::KVMCLOCK_ID => {
                    let c = u64::from_le_bytes(d[..8].try_into().unwrap());
                    d[..8].copy_from_slice(&(c + CLOCK_AHEAD_NS).to_le_bytes());
                }
                _ => {}
            }
            s.data = d.into();
        }
    }

    /// Asserts that `states` hold what `apply` set (clock: at least that far ahead of
    /// `clock_before`).
    pub fn check(states: &[DeviceState], clock_before: u64) {
        for s in states {
            let d = &s.data;
            match s.id.as_str() {
                id if id.starts_with("vcpu") => {
                    let i: u64 = id[4..].parse().unwrap();
                    let v = VcpuState::from_bytes(d).unwrap();
                    let mut want = v.clone();
                    cpu(i + 2, &mut want); // vcpuN is blob N + 2, after machine and serial
                    assert_eq!(v.regs.r9, want.regs.r9, "{id}: r9");
                    assert_eq!(v.regs.r15, want.regs.r15, "{id}: r15");
                    assert_eq!(v.sregs.fs.base, want.sregs.fs.base, "{id}: fs base");
                    assert_eq!(v.sregs.gs.base, want.sregs.gs.base, "{id}: gs base");
                    assert_eq!(v.sregs.cr8, 1, "{id}: cr8");
                    assert_eq!(v.lapic.regs[0x80], 0x10, "{id}: TPR");
                    assert_eq!(v.debugregs.db, want.debugregs.db, "{id}: debug registers");
                    assert_eq!(v.fpu.xmm, want.fpu.xmm, "{id}: xmm");
                    for (idx, val) in MSRS {
                        let m = v.msrs.iter().find(|m| m.index == idx);
                        assert_eq!(m.map(|m| m.data), Some(val), "{id}: MSR {idx:#x}");
                    }
                }
                state::IOAPIC_ID => assert_eq!(
                    u64::from_le_bytes(d[IOAPIC_REDIR + 40..IOAPIC_REDIR + 48].try_into().unwrap()),
                    0x1_0035
                ),
                state::PIC_MASTER_ID => assert_eq!(d[PIC_IMR], 0xfa),
                state::PIC_SLAVE_ID => assert_eq!(d[PIC_IMR], 0xf7),
                state::PIT_ID => {
                    assert_eq!(&d[PIT_CH2..PIT_CH2 + 4], &0x1234u32.to_le_bytes());
                    assert_eq!(d[PIT_CH2 + 15], 3);
                }
                state::KVMCLOCK_ID => {
                    let c = u64::from_le_bytes(d[..8].try_into().unwrap());
                    assert!(c >= clock_before + CLOCK_AHEAD_NS, "kvmclock not restored");
                }
                _ => {}
            }
        }
    }
}

fn clock_of(states: &[DeviceState]) -> u64 {
    states
        .iter()
        .find(|s| s.id == state::KVMCLOCK_ID)
        .map(|s| u64::from_le_bytes(s.data[..8].try_into().unwrap()))
        .unwrap_or(0)
}

fn round_trip(kind: GuestKind, order: Order) {
    let cfg = VmConfig {
        order,
        ..small_config(2)
    };
    let mut src = Vm::new(&cfg, kind, Console::Discard).unwrap();
    if kind == GuestKind::Kvm {
        let mut s = src.save_device_state().unwrap();
        let clock = clock_of(&s);
        perturb::apply(&mut s);
        src.load_device_state(&s).unwrap();
        perturb::check(&src.save_device_state().unwrap(), clock);
    }
    src.resume().unwrap();
    src.wait_for_passes(3, WAIT).unwrap();
    src.pause().unwrap();
    let at_pause = src.check().unwrap();
    let hash = src.ram_hash().unwrap();
    let saved = src.save_device_state().unwrap();
    assert_eq!(saved.len(), if kind == GuestKind::Kvm { 9 } else { 4 });
    let info = vmm_demo::MachineInfo::from_states(&saved).unwrap();
    assert_eq!(info, src.machine_info());
    assert_eq!((info.guest, &info.config), (kind, &cfg));
    if kind == GuestKind::Kvm {
        // The guest ran with them: they are still there, and so a restore must keep them.
        perturb::check(&saved, 0);
    }

    // State alone, into a VM whose RAM never arrived: registers do not depend on RAM.
    let mut bare = Vm::new_incoming(&cfg, kind, Console::Discard).unwrap();
    bare.load_device_state(&saved).unwrap();
    assert_same_state(&saved, &bare.save_device_state().unwrap());
    drop(bare);

    // RAM and state: a local migration.
    let mut dst = Vm::new_incoming(&cfg, kind, Console::Discard).unwrap();
    assert!(
        dst.resume().is_err(),
        "an incoming VM ran before its state loaded"
    );
    copy_ram(&src, &dst);
    assert_eq!(dst.ram_hash().unwrap(), hash);
    dst.load_device_state(&saved).unwrap();
    let again = dst.save_device_state().unwrap();
    assert_same_state(&saved, &again);
    if kind == GuestKind::Kvm {
        perturb::check(&again, clock_of(&saved) - perturb::CLOCK_AHEAD_NS);
    }
    assert_eq!(dst.check().unwrap(), at_pause);
    assert_eq!(dst.ram_hash().unwrap(), hash);

    let before = dst.passes();
    dst.resume().unwrap();
    let target = before.iter().max().unwrap() + 3;
    dst.wait_for_passes(target, WAIT).unwrap();
    dst.pause().unwrap();
    let after = dst.check().unwrap();
    for (b, a) in before.iter().zip(&after.vcpus) {
        assert!(a.pass >= target && a.pass > *b, "{before:?} -> {after:?}");
    }
    assert!(dst.failures().is_empty());

    // The source, had the migration failed, goes on too.
    src.resume().unwrap();
    src.wait_for_passes(target, WAIT).unwrap();
    src.pause().unwrap();
    src.check().unwrap();
}

#[test]
fn kvm_state_restores_bit_for_bit_and_the_guest_runs_on() {
    if common::kvm_or_skip("kvm_state_restores_bit_for_bit_and_the_guest_runs_on") {
        round_trip(GuestKind::Kvm, Order::Sequential);
    }
}

#[test]
fn software_state_restores_bit_for_bit_and_the_guest_runs_on() {
    round_trip(GuestKind::Software, Order::Sequential);
}

/// The scattered walk keeps its place in registers the sequential one does not use (and
/// leaves r9-r15 alone, which the perturbed state checks).
#[test]
fn kvm_state_of_a_scattered_walk_restores_bit_for_bit_and_the_guest_runs_on() {
    if common::kvm_or_skip(
        "kvm_state_of_a_scattered_walk_restores_bit_for_bit_and_the_guest_runs_on",
    ) {
        round_trip(GuestKind::Kvm, Order::Scattered);
    }
}

#[test]
fn software_state_of_a_scattered_walk_restores_bit_for_bit_and_the_guest_runs_on() {
    round_trip(GuestKind::Software, Order::Scattered);
}

fn expect_refused(vm: &mut Vm, states: &[DeviceState], device: &str, says: &str) {
    let e = vm.load_device_state(states).unwrap_err();
    assert_eq!(e.op, VmOp::LoadState);
    assert_eq!(e.device.as_deref(), Some(device), "{e}");
    assert!(e.to_string().contains(says), "{e}");
    assert!(vm.resume().is_err(), "resumed after a refused load: {e}");
}

#[test]
fn load_refuses_unknown_missing_and_mismatched_state() {
    for kind in kinds("load_refuses_unknown_missing_and_mismatched_state") {
        let cfg = small_config(1);
        let mut src = Vm::new(&cfg, kind, Console::Discard).unwrap();
        let good = src.save_device_state().unwrap();
        let mut dst = Vm::new_incoming(&cfg, kind, Console::Discard).unwrap();
        let cpu = if kind == GuestKind::Kvm {
            "vcpu0"
        } else {
            "swcpu0"
        };

        let mut extra = good.clone();
        extra.push(DeviceState::new("virtio-blk0", 1, vec![1, 2, 3]));
        expect_refused(&mut dst, &extra, "virtio-blk0", "unknown device");

        let mut newer = good.clone();
        newer.iter_mut().find(|s| s.id == cpu).unwrap().version = 2;
        expect_refused(&mut dst, &newer, cpu, "version 2");

        let missing: Vec<_> = good.iter().filter(|s| s.id != cpu).cloned().collect();
        expect_refused(&mut dst, &missing, cpu, "missing");

        let mut twice = good.clone();
        twice.push(good.iter().find(|s| s.id == cpu).unwrap().clone());
        expect_refused(&mut dst, &twice, cpu, "twice");

        let mut cut = good.clone();
        let blob = cut.iter_mut().find(|s| s.id == cpu).unwrap();
        blob.data = blob.data.slice(..blob.data.len() - 3);
        expect_refused(&mut dst, &cut, cpu, "");

        let other = VmConfig {
            working_set_bytes: cfg.working_set_bytes / 2,
            ..cfg.clone()
        };
        let mut elsewhere = Vm::new_incoming(&other, kind, Console::Discard).unwrap();
        expect_refused(&mut elsewhere, &good, "machine", "does not match");
        // The same VM walking in another order is another machine: its oracle would
        // judge the pages against the wrong walk.
        let scattered = VmConfig {
            order: Order::Scattered,
            ..cfg.clone()
        };
        let mut reordered = Vm::new_incoming(&scattered, kind, Console::Discard).unwrap();
        expect_refused(&mut reordered, &good, "machine", "does not match");

        let other_kind = if kind == GuestKind::Kvm {
            GuestKind::Software
        } else {
            GuestKind::Kvm
        };
        if other_kind == GuestKind::Software || vmm_demo::kvm_available() {
            let mut wrong = Vm::new_incoming(&cfg, other_kind, Console::Discard).unwrap();
            let e = wrong.load_device_state(&good).unwrap_err();
            assert!(e.to_string().contains("unknown device"), "{e}");
        }

        // The good state still loads, and a running VM refuses to save or load.
        copy_ram(&src, &dst);
        dst.load_device_state(&good).unwrap();
        dst.resume().unwrap();
        assert!(dst.save_device_state().is_err());
        assert!(dst.load_device_state(&good).is_err());
        dst.wait_for_passes(1, WAIT).unwrap();
        dst.pause().unwrap();
        dst.check().unwrap();
    }
}

/// Moves a running guest back and forth between two VMs many times, with RAM and state,
/// and checks every console line the two printed: one per pass, numbers consecutive, no
/// byte lost or doubled, even when a switch falls in the middle of a line or right after
/// a port write the vCPU had not completed.
fn ping_pong(kind: GuestKind, order: Order) {
    use std::sync::{Arc, Mutex};
    use vmm_demo::ConsoleLine;

    let cfg = VmConfig {
        working_set_bytes: 64 * vmm_demo::PAGE_SIZE,
        order,
        ..small_config(2)
    };
    let lines = Arc::new(Mutex::new(Vec::<ConsoleLine>::new()));
    let console = || {
        let l = lines.clone();
        Console::Callback(Arc::new(move |line: &ConsoleLine| {
            l.lock().unwrap().push(line.clone())
        }))
    };
    let mut a = Vm::new(&cfg, kind, console()).unwrap();
    let mut b = Vm::new_incoming(&cfg, kind, console()).unwrap();
    if kind == GuestKind::Software {
        // Slow enough that switches land all along the walk, not only between passes.
        a.set_software_pace(Duration::from_micros(20));
        b.set_software_pace(Duration::from_micros(20));
    }
    for leg in 0..24 {
        let (from, to) = if leg % 2 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        from.resume().unwrap();
        let p = from.passes();
        from.wait_for_passes(p.iter().min().unwrap() + 1, WAIT)
            .unwrap();
        from.pause().unwrap();
        let saved = from.save_device_state().unwrap();
        copy_ram(from, to);
        to.load_device_state(&saved).unwrap();
    }
    // The guest now lives in `a`.
    let last = a.check().unwrap();
    assert!(last.min_pass() >= 12, "{last:?}");
    // The lines being printed when the guest stopped, from the serial blob.
    let serial = a.save_device_state().unwrap().remove(1);
    assert_eq!(serial.id, state::SERIAL_ID);
    let mut partial = Vec::new();
    let mut at = 4;
    for _ in 0..2 {
        let n = u16::from_le_bytes([serial.data[at], serial.data[at + 1]]) as usize;
        partial.push(String::from_utf8(serial.data[at + 2..at + 2 + n].to_vec()).unwrap());
        at += 2 + n;
    }
    drop(a);
    drop(b);
    let lines = lines.lock().unwrap();
    for v in 0..2u32 {
        let passes: Vec<u64> = lines
            .iter()
            .filter(|l| l.vcpu == v)
            .map(|l| {
                assert!(l.text.starts_with(&format!("vcpu{v} pass ")), "{l:?}");
                l.pass().unwrap_or_else(|| panic!("malformed line {l:?}"))
            })
            .collect();
        let pass = last.vcpus[v as usize].pass;
        let whole = format!("vcpu{v} pass {pass}");
        let p = &partial[v as usize];
        // The last pass's report may still be on its way out. With nothing of it in the
        // serial port, the vCPU either printed all of it or stopped between counting the
        // pass and its first port write (the KVM guest program does both in turn).
        assert!(
            whole.starts_with(p.as_str()),
            "vcpu{v} stopped printing {p:?}, at pass {pass}"
        );
        let printed = if p.is_empty() && passes.last() == Some(&pass) {
            pass
        } else {
            pass - 1
        };
        let expected: Vec<u64> = (1..=printed).collect();
        assert_eq!(passes, expected, "vcpu{v}'s console");
    }
}

#[test]
fn kvm_guest_moved_back_and_forth_prints_every_pass_once() {
    if common::kvm_or_skip("kvm_guest_moved_back_and_forth_prints_every_pass_once") {
        ping_pong(GuestKind::Kvm, Order::Sequential);
    }
}

#[test]
fn kvm_guest_walking_scattered_moved_back_and_forth_prints_every_pass_once() {
    if common::kvm_or_skip(
        "kvm_guest_walking_scattered_moved_back_and_forth_prints_every_pass_once",
    ) {
        ping_pong(GuestKind::Kvm, Order::Scattered);
    }
}

#[test]
fn software_guest_walking_scattered_moved_back_and_forth_prints_every_pass_once() {
    ping_pong(GuestKind::Software, Order::Scattered);
}

#[test]
fn software_guest_moved_back_and_forth_prints_every_pass_once() {
    ping_pong(GuestKind::Software, Order::Sequential);
}
