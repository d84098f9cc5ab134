//! Pause, resume and throttle through `VmControl`, for the KVM and the software guest.

mod common;

use std::time::{Duration, Instant};

use common::{kinds, small_config};
use migration_core::vm::VmControl;
use vm_memory::{Bytes, GuestAddress};
use vmm_demo::layout::{self, control_block};
use vmm_demo::{Console, GuestKind, Vm, VmConfig};

const WAIT: Duration = Duration::from_secs(30);

/// Passes per second of the slowest vCPU, measured over the next `more` passes.
fn measure_rate(vm: &Vm, more: u64) -> f64 {
    let p0 = vm.passes();
    let t0 = Instant::now();
    vm.wait_for_passes(p0.iter().max().unwrap() + more, WAIT)
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let p1 = vm.passes();
    p0.iter()
        .zip(&p1)
        .map(|(a, b)| (b - a) as f64 / secs)
        .fold(f64::INFINITY, f64::min)
}

fn pause_freezes_ram(kind: GuestKind) {
    let mut vm = Vm::new(&small_config(2), kind, Console::Discard).unwrap();
    assert!(vm.is_paused(), "a new VM starts paused");
    let h0 = vm.ram_hash().unwrap();
    vm.resume().unwrap();
    vm.wait_for_passes(2, WAIT).unwrap();
    let rate = measure_rate(&vm, 5);
    vm.pause().unwrap();
    assert!(vm.is_paused());
    let h1 = vm.ram_hash().unwrap();
    assert_ne!(h0, h1, "passes advanced but RAM did not change");
    let p1 = vm.passes();
    let run1: Vec<u64> = vm.vcpu_stats().iter().map(|s| s.run_ns).collect();
    let lines1 = vm.console_lines().0;

    // Paused for as long as ten passes take at the rate just measured.
    let quiet = Duration::from_secs_f64(10.0 / rate)
        .clamp(Duration::from_millis(50), Duration::from_secs(3));
    std::thread::sleep(quiet);
    assert_eq!(
        vm.ram_hash().unwrap(),
        h1,
        "RAM changed while paused ({kind})"
    );
    assert_eq!(vm.passes(), p1);
    let run2: Vec<u64> = vm.vcpu_stats().iter().map(|s| s.run_ns).collect();
    assert_eq!(run1, run2, "a vCPU ran while paused");
    assert_eq!(vm.console_lines().0, lines1);
    vm.check().unwrap();

    // Pausing or resuming twice is no error.
    vm.pause().unwrap();
    vm.resume().unwrap();
    vm.resume().unwrap();
    vm.wait_for_passes(p1.iter().max().unwrap() + 3, WAIT)
        .unwrap();
    vm.pause().unwrap();
    assert_ne!(vm.ram_hash().unwrap(), h1);
    let r = vm.check().unwrap();
    for (v, before) in r.vcpus.iter().zip(&p1) {
        assert!(v.pass > *before);
    }
    assert!(vm.failures().is_empty());
}

#[test]
fn kvm_pause_freezes_ram_and_resume_goes_on() {
    if common::kvm_or_skip("kvm_pause_freezes_ram_and_resume_goes_on") {
        pause_freezes_ram(GuestKind::Kvm);
    }
}

#[test]
fn software_pause_freezes_ram_and_resume_goes_on() {
    pause_freezes_ram(GuestKind::Software);
}

struct Window {
    rate: f64,
    slept: f64,
    sleeps: u64,
}

fn window(vm: &Vm, len: Duration) -> Window {
    let (p0, s0, t0) = (vm.passes()[0], vm.vcpu_stats()[0], Instant::now());
    std::thread::sleep(len);
    let (p1, s1, secs) = (
        vm.passes()[0],
        vm.vcpu_stats()[0],
        t0.elapsed().as_secs_f64(),
    );
    Window {
        rate: (p1 - p0) as f64 / secs,
        slept: (s1.throttle_ns - s0.throttle_ns) as f64 / 1e9 / secs,
        sleeps: s1.throttle_sleeps - s0.throttle_sleeps,
    }
}

fn throttle_slows_the_guest(kind: GuestKind) {
    let cfg = VmConfig {
        working_set_bytes: 1 << 20,
        ..small_config(1)
    };
    let mut vm = Vm::new(&cfg, kind, Console::Discard).unwrap();
    assert!(vm.set_throttle(100).is_err());
    vm.resume().unwrap();
    vm.wait_for_passes(2, WAIT).unwrap();
    let len = Duration::from_millis(500);
    let free1 = window(&vm, len);
    vm.set_throttle(80).unwrap();
    assert_eq!(vm.throttle(), 80);
    let throttled = window(&vm, len);
    vm.set_throttle(0).unwrap();
    let free2 = window(&vm, len);
    eprintln!(
        "{kind}: {:.0} passes/s free, {:.0} at 80 % ({:.0} % asleep, {} sleeps), {:.0} free again",
        free1.rate,
        throttled.rate,
        throttled.slept * 100.0,
        throttled.sleeps,
        free2.rate
    );
    assert!(
        throttled.sleeps > 0,
        "the throttle never put the vCPU to sleep"
    );
    // 80 % asked; any scheduler hiccup only adds to the time not running.
    assert!(
        throttled.slept > 0.5,
        "asleep only {:.0} %",
        throttled.slept * 100.0
    );
    assert!(
        free1.slept < 0.2 && free2.slept < 0.2,
        "slept while not throttled"
    );
    // Expected a fifth of the free rate; only the ordering is asserted, with room.
    let free = free1.rate.min(free2.rate);
    assert!(
        throttled.rate < 0.6 * free,
        "{:.0} passes/s throttled against {free:.0} free",
        throttled.rate
    );
    vm.pause().unwrap();
    vm.check().unwrap();
}

#[test]
fn kvm_throttle_slows_the_guest() {
    if common::kvm_or_skip("kvm_throttle_slows_the_guest") {
        throttle_slows_the_guest(GuestKind::Kvm);
    }
}

#[test]
fn software_throttle_slows_the_guest() {
    throttle_slows_the_guest(GuestKind::Software);
}

#[test]
fn a_broken_guest_is_reported_and_does_not_block_a_pause() {
    for kind in kinds("a_broken_guest_is_reported_and_does_not_block_a_pause") {
        let mut vm = Vm::new(&small_config(1), kind, Console::Discard).unwrap();
        match kind {
            // ud2 with no IDT: #UD, #DF, triple fault.
            GuestKind::Kvm => vm
                .memory()
                .write_slice(&[0x0f, 0x0b], GuestAddress(layout::CODE_ADDR))
                .unwrap(),
            // A segment beyond RAM: the next pass walks off the end.
            GuestKind::Software => vm
                .memory()
                .write_obj(
                    0x40_0000_0000u64,
                    GuestAddress(layout::control_block_addr(0) + control_block::SEGMENTS),
                )
                .unwrap(),
        }
        vm.resume().unwrap();
        let deadline = Instant::now() + WAIT;
        while vm.failures().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{kind}: the broken guest kept running"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let why = vm.failures().join("; ");
        assert!(why.contains("vcpu0"), "{why}");
        vm.pause().unwrap();
        let e = vm.resume().unwrap_err();
        assert!(e.to_string().contains("vcpu0"), "{e}");
        assert!(vm.wait_for_passes(1_000_000, WAIT).is_err());
    }
}

#[test]
fn software_pace_sets_a_floor_on_time_per_page() {
    let cfg = VmConfig {
        working_set_bytes: 64 * vmm_demo::PAGE_SIZE,
        ..small_config(1)
    };
    let mut vm = Vm::new(&cfg, GuestKind::Software, Console::Discard).unwrap();
    vm.set_software_pace(Duration::from_micros(200));
    vm.resume().unwrap();
    vm.wait_for_passes(1, WAIT).unwrap();
    let (p0, t0) = (vm.passes()[0], Instant::now());
    vm.wait_for_passes(p0 + 5, WAIT).unwrap();
    // 320 pages at 200 us: 64 ms, less what one catch-up burst and one check interval
    // (64 pages) may gain.
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(40), "5 passes in {took:?}");
    vm.pause().unwrap();
    vm.check().unwrap();
}

/// A slowly paced software vCPU sleeps between bursts of pages (here 64 pages at 100 ms
/// each: 6.4 s); a pause must not wait for the end of that sleep.
#[test]
fn software_pause_does_not_wait_out_the_pacing() {
    let mut vm = Vm::new(&small_config(1), GuestKind::Software, Console::Discard).unwrap();
    vm.set_software_pace(Duration::from_millis(100));
    let h0 = vm.ram_hash().unwrap();
    vm.resume().unwrap();
    // The first burst has run once some RAM changed from the initial image; then the
    // vCPU sleeps.
    let deadline = Instant::now() + WAIT;
    while vm.ram_hash().unwrap() == h0 {
        assert!(Instant::now() < deadline, "the software vCPU never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    vm.pause().unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "pausing took {took:?}: it waited for the pacing sleep"
    );
    let h1 = vm.ram_hash().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.ram_hash().unwrap(), h1, "RAM changed while paused");
}
