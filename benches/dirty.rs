//! Dirty-tracking sync of a 1 GiB guest.
//!
//! - `kvm_dirty_log_sync_1GiB/{get-clears,manual-protect}/{clean,1pct,100pct}`: one 1 GiB
//!   KVM memory slot with dirty logging. Before each timed sync, a tiny guest program (the
//!   same hand-assembled protected-mode loop as the tests, with a stride) writes one byte
//!   into every page (100%) or every 100th page (1%); that run is setup, not timed. The
//!   guest's memory is populated once before measuring, so the numbers are those of a
//!   running guest, not of first-touch faults.
//! - `uffd_wp_sync_1GiB/{async,sync}/{clean,1pct,100pct}`: the userfaultfd write-protect
//!   tracker over 1 GiB of anonymous memory, pages dirtied by this thread before each timed
//!   sync (100% only for async: the synchronous form takes a fault round trip per page).
//!
//! Without /dev/kvm the KVM part prints why and is skipped.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, criterion_group, criterion_main};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration_core::dirty::kvm::manual_protect_supported;
use migration_core::dirty::{
    DirtyTracker, KvmDirtyLog, KvmDirtyLogMode, UffdWpConfig, UffdWpMode, UffdWpTracker,
};
use migration_core::{DirtyBitmap, RamLayout};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

const GIB: usize = 1 << 30;
const PAGES: usize = GIB / 4096;

/// Writes dl at eax, eax + ecx, ... while below ebx, then halts. 32-bit protected mode with
/// flat segments loaded through KVM_SET_SREGS; no stack, no GDT.
///
/// ```text
/// 0x00: 88 10     next: mov [eax], dl
/// 0x02: 01 c8           add eax, ecx
/// 0x04: 39 d8           cmp eax, ebx
/// 0x06: 72 f8           jb  next        ; 0x08 - 8 = 0x00
/// 0x08: f4              hlt
/// ```
const STRIDE_WRITER: [u8; 9] = [0x88, 0x10, 0x01, 0xc8, 0x39, 0xd8, 0x72, 0xf8, 0xf4];

struct KvmGuest {
    vcpu: VcpuFd,
    vm: Arc<VmFd>,
    slot: kvm_userspace_memory_region,
    layout: RamLayout,
    /// Declared after the vCPU and the VM, so dropped after them.
    _mem: GuestMemoryMmap,
    marker: u8,
}

fn kvm_guest() -> Result<KvmGuest, String> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = Arc::new(kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GIB)]).unwrap();
    let layout = RamLayout::of_memory(&mem).unwrap();
    let region = mem.iter().next().unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: GIB as u64,
        userspace_addr: region.get_host_address(MemoryRegionAddress(0)).unwrap() as u64,
    };
    // SAFETY: the slot is backed by `mem`, which KvmGuest keeps until after the VM is gone.
    unsafe { vm.set_user_memory_region(slot) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    mem.write_slice(&STRIDE_WRITER, GuestAddress(0)).unwrap();
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().unwrap();
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
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
        type_: 0x3,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs).unwrap();
    Ok(KvmGuest {
        vcpu,
        vm,
        slot,
        layout,
        _mem: mem,
        marker: 0,
    })
}

impl KvmGuest {
    /// Has the guest write every `stride`-th page from page 1 on; returns how many.
    fn dirty(&mut self, stride: usize) -> usize {
        self.marker = self.marker.wrapping_add(1);
        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rip = 0;
        regs.rflags = 0x2;
        regs.rax = 0x1000;
        regs.rbx = GIB as u64;
        regs.rcx = (stride * 4096) as u64;
        regs.rdx = u64::from(self.marker);
        self.vcpu.set_regs(&regs).unwrap();
        match self.vcpu.run() {
            Ok(VcpuExit::Hlt) => {}
            Ok(other) => panic!("guest stopped with {other:?}"),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
        (PAGES - 1).div_ceil(stride)
    }
}

fn kvm_sync(c: &mut Criterion) {
    let mut g = match kvm_guest() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("skipping the KVM dirty-log benchmarks: {why}");
            return;
        }
    };
    // Populate the guest's memory once, before any tracking.
    g.dirty(1);
    let mut bitmap = DirtyBitmap::new(PAGES);
    for mode in [KvmDirtyLogMode::GetClears, KvmDirtyLogMode::ManualProtect] {
        if mode == KvmDirtyLogMode::ManualProtect && !manual_protect_supported(&g.vm) {
            eprintln!("skipping manual-protect: no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
            continue;
        }
        // SAFETY: `g.slot` is the slot as registered, backed by `g.mem`, which outlives
        // the tracker (stopped and dropped at the end of this iteration).
        let mut tracker =
            unsafe { KvmDirtyLog::new(g.vm.clone(), &g.layout, &[g.slot], mode) }.unwrap();
        tracker.start().unwrap();
        // Check what is about to be measured.
        let expected = g.dirty(100);
        bitmap.clear_all();
        tracker.sync_and_clear(&mut bitmap).unwrap();
        assert_eq!(
            bitmap.count(),
            expected,
            "{mode:?}: the guest's writes were not all reported"
        );

        let mut group = c.benchmark_group(format!("kvm_dirty_log_sync_1GiB/{}", mode.as_str()));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sampling_mode(SamplingMode::Flat);
        group.bench_function("clean", |b| {
            b.iter(|| tracker.sync_and_clear(&mut bitmap).unwrap())
        });
        for (name, stride) in [("1pct", 100), ("100pct", 1)] {
            group.bench_function(name, |b| {
                b.iter_batched(
                    || g.dirty(stride),
                    |_| tracker.sync_and_clear(&mut bitmap).unwrap(),
                    BatchSize::PerIteration,
                )
            });
        }
        group.finish();
        tracker.stop().unwrap();
    }
}

fn uffd_sync(c: &mut Criterion) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GIB)]).unwrap();
    let layout = RamLayout::of_memory(&mem).unwrap();
    let base = mem
        .iter()
        .next()
        .unwrap()
        .get_host_address(MemoryRegionAddress(0))
        .unwrap() as usize;
    let mut value = 0u8;
    let mut dirty = |stride: usize| {
        value = value.wrapping_add(1);
        for page in (0..PAGES).step_by(stride) {
            // SAFETY: inside the 1 GiB mapping owned by `mem`, which outlives this closure;
            // only this thread touches it.
            unsafe { ((base + page * 4096) as *mut u8).write_volatile(value) };
        }
        PAGES.div_ceil(stride)
    };
    // A running guest's memory is populated.
    dirty(1);
    let mut bitmap = layout.new_bitmap();
    for mode in [UffdWpMode::Async, UffdWpMode::Sync] {
        let config = UffdWpConfig {
            mode,
            ..UffdWpConfig::default()
        };
        let mut tracker = UffdWpTracker::for_memory(&mem, &layout, config).unwrap();
        if let Err(e) = tracker.start() {
            eprintln!("skipping uffd-wp {}: {e}", mode.as_str());
            continue;
        }
        let expected = dirty(100);
        bitmap.clear_all();
        tracker.sync_and_clear(&mut bitmap).unwrap();
        assert_eq!(
            bitmap.count(),
            expected,
            "{mode:?}: writes were not all reported"
        );

        let mut group = c.benchmark_group(format!("uffd_wp_sync_1GiB/{}", mode.as_str()));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sampling_mode(SamplingMode::Flat);
        group.bench_function("clean", |b| {
            b.iter(|| tracker.sync_and_clear(&mut bitmap).unwrap())
        });
        let levels: &[(&str, usize)] = match mode {
            UffdWpMode::Async => &[("1pct", 100), ("100pct", 1)],
            _ => &[("1pct", 100)],
        };
        for &(name, stride) in levels {
            group.bench_function(name, |b| {
                b.iter_batched(
                    || dirty(stride),
                    |_| tracker.sync_and_clear(&mut bitmap).unwrap(),
                    BatchSize::PerIteration,
                )
            });
        }
        group.finish();
        tracker.stop().unwrap();
    }
}

criterion_group!(benches, kvm_sync, uffd_sync);
criterion_main!(benches);
