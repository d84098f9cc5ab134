//! The KVM machine: a VM with its RAM in memory slots, the in-kernel irqchip and PIT,
//! vCPUs put in 64-bit long mode by the VMM, one thread per vCPU, and the save and restore
//! of everything KVM holds for them.
//!
//! Kicking a vCPU out of `KVM_RUN` follows Cloud Hypervisor and Firecracker: set
//! `immediate_exit` in the vCPU's shared `kvm_run` page, then signal its thread. A vCPU
//! about to enter the guest sees the flag and returns at once with `EINTR`; one inside the
//! guest is interrupted by the signal. Either way it reaches a park point, and only after
//! re-entering `KVM_RUN` once, so that a port I/O exit it had just handled is completed
//! in the kernel before its registers are saved (see the KVM API documentation of
//! `KVM_RUN`: pending I/O is not part of the state userspace can read).

use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::guest::GuestMemory;
use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY, Msrs, Xsave,
    kvm_clock_data, kvm_irqchip, kvm_msr_entry, kvm_pit_config, kvm_pit_state2, kvm_regs,
    kvm_segment, kvm_userspace_memory_region, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use zerocopy::IntoBytes;

use crate::control::{Parked, RunControl, VcpuCounters};
use crate::guest::{self, SERIAL_PORT};
use crate::layout::{self, Workload};
use crate::serial::Serial;
use crate::state::{self, BlobError, VcpuState, XSAVE_LEGACY_SIZE};

/// A KVM memory slot holding one region of guest RAM: what a dirty-log tracker needs to
/// read (`KVM_GET_DIRTY_LOG`) and to re-register with logging on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest-physical address of the first byte.
    pub guest_base: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the first byte (the `userspace_addr` KVM was given).
    pub host_addr: u64,
    /// The flags the VMM registered the slot with (0: no dirty logging). A tracker that
    /// re-registers the slot with `KVM_MEM_LOG_DIRTY_PAGES` owns the flags from then on.
    pub flags: u32,
}

/// A KVM call failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct KvmError {
    /// What was being done, with the vCPU or device concerned.
    pub what: String,
    /// The kernel's answer.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn ctx<T>(r: Result<T, kvm_ioctls::Error>, what: impl FnOnce() -> String) -> Result<T, KvmError> {
    r.map_err(|source| KvmError {
        what: what(),
        source,
    })
}

/// A KVM vCPU, shared between its thread and the VMM.
pub(crate) struct KvmVcpu {
    pub(crate) index: u32,
    fd: Mutex<VcpuFd>,
    immediate_exit: ImmediateExit,
    /// The vCPU's thread while it runs; `None` before it starts and once it is leaving,
    /// so that no signal ever goes to a thread that was joined.
    thread: Mutex<Option<libc::pthread_t>>,
    pub(crate) counters: VcpuCounters,
}

/// `kvm_run.immediate_exit` of one vCPU, written from any thread.
struct ImmediateExit(NonNull<u8>);

// SAFETY: the pointer is into the vCPU's `kvm_run` mapping, which lives as long as the
// `VcpuFd` beside it in `KvmVcpu`; it is only ever accessed atomically.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above: every access is an atomic byte store.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn set(&self, v: u8) {
        // SAFETY: the byte is valid and aligned for as long as `self` lives (see above);
        // the kernel only reads it at KVM_RUN entry, and kvm-ioctls never writes it
        // because we never call `set_kvm_immediate_exit`.
        unsafe { AtomicU8::from_ptr(self.0.as_ptr()) }.store(v, Ordering::SeqCst);
    }
}

/// The kick signal: the first real-time signal glibc leaves to applications.
fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // Nothing to do: being delivered is what makes KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    });
    r.map_err(|errno| KvmError {
        what: "installing the vCPU kick signal handler".into(),
        source: kvm_ioctls::Error::new(errno),
    })
}

impl KvmVcpu {
    fn lock(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the vCPU leave guest code (or not enter it) and reach a park point.
    pub(crate) fn kick(&self) {
        self.immediate_exit.set(1);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is a live thread: it clears `thread` under this lock before it
            // returns, so it cannot have been joined while we hold the lock.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

/// Everything KVM-specific about a VM.
pub(crate) struct KvmMachine {
    pub(crate) vm: Arc<VmFd>,
    pub(crate) vcpus: Vec<Arc<KvmVcpu>>,
    pub(crate) slots: Vec<MemorySlot>,
    msr_indices: Vec<u32>,
    xsave_bytes: usize,
    xsave2: bool,
}

/// Is `/dev/kvm` there and usable: can this process open it and create a VM?
pub fn kvm_available() -> bool {
    Kvm::new().and_then(|k| k.create_vm()).is_ok()
}

impl KvmMachine {
    /// Creates the VM over `mem`. With `fresh`, the vCPUs are set up to start the guest
    /// program; otherwise they wait for state to be loaded.
    pub(crate) fn create(
        mem: &GuestMemory,
        w: &Workload,
        fresh: bool,
    ) -> Result<KvmMachine, KvmError> {
        install_kick_handler()?;
        let kvm = ctx(Kvm::new(), || "opening /dev/kvm".into())?;
        let vm = ctx(kvm.create_vm(), || "creating the VM".into())?;
        // Intel needs three pages for the real-mode TSS before the irqchip; any address
        // outside RAM does.
        ctx(vm.set_tss_address(0xfffb_d000), || {
            "setting the TSS address".into()
        })?;
        ctx(vm.create_irq_chip(), || {
            "creating the in-kernel irqchip".into()
        })?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        ctx(vm.create_pit2(pit), || "creating the in-kernel PIT".into())?;

        let mut slots = Vec::new();
        for (i, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| KvmError {
                    what: format!("host address of RAM region {i}: {e}"),
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let s = MemorySlot {
                slot: i as u32,
                guest_base: region.start_addr().0,
                size: region.len(),
                host_addr: host as u64,
                flags: 0,
            };
            let r = kvm_userspace_memory_region {
                slot: s.slot,
                flags: s.flags,
                guest_phys_addr: s.guest_base,
                memory_size: s.size,
                userspace_addr: s.host_addr,
            };
            // SAFETY: the region is a live mapping of `size` bytes owned by the guest
            // memory, which the Vm keeps alive (in an Arc) for at least as long as the
            // vCPUs that could touch it.
            ctx(unsafe { vm.set_user_memory_region(r) }, || {
                format!(
                    "registering RAM region {i} ({:#x}+{:#x}) as slot {i}",
                    s.guest_base, s.size
                )
            })?;
            slots.push(s);
        }

        let cpuid = ctx(kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES), || {
            "reading the supported CPUID".into()
        })?;
        let xsave_cap = vm.check_extension_int(Cap::Xsave2);
        let (xsave2, xsave_bytes) = if xsave_cap > XSAVE_LEGACY_SIZE as i32 {
            (true, (xsave_cap as usize).next_multiple_of(4))
        } else {
            (xsave_cap > 0, XSAVE_LEGACY_SIZE)
        };
        let mut vcpus = Vec::new();
        for i in 0..w.vcpus() {
            let mut fd = ctx(vm.create_vcpu(u64::from(i)), || format!("creating vcpu{i}"))?;
            ctx(fd.set_cpuid2(&vcpu_cpuid(&cpuid, i)), || {
                format!("vcpu{i}: setting CPUID")
            })?;
            if fresh {
                enter_long_mode(&fd, i)?;
            }
            let run = fd.get_kvm_run();
            let immediate_exit = ImmediateExit(NonNull::from(&mut run.immediate_exit));
            vcpus.push(Arc::new(KvmVcpu {
                index: i,
                fd: Mutex::new(fd),
                immediate_exit,
                thread: Mutex::new(None),
                counters: VcpuCounters::default(),
            }));
        }
        let msr_indices = usable_msrs(&kvm, &vcpus[0].lock())?;
        tracing::debug!(
            msrs = msr_indices.len(),
            xsave_bytes,
            "KVM VM created with {} vCPUs",
            vcpus.len()
        );
        Ok(KvmMachine {
            vm: Arc::new(vm),
            vcpus,
            slots,
            msr_indices,
            xsave_bytes,
            xsave2,
        })
    }

    /// Kicks every vCPU.
    pub(crate) fn kick_all(&self) {
        for v in &self.vcpus {
            v.kick();
        }
    }

    /// Saves vCPU `i`. The vCPU must be parked.
    pub(crate) fn save_vcpu(&self, i: usize) -> Result<VcpuState, KvmError> {
        let v = &self.vcpus[i];
        let fd = v.lock();
        let n = v.index;
        let what = |w: &'static str| move || format!("vcpu{n}: reading {w}");
        let cpuid = ctx(fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES), what("CPUID"))?;
        let xsave = if self.xsave2 {
            let fam = (self.xsave_bytes - XSAVE_LEGACY_SIZE) / 4;
            let mut x = ctx(
                Xsave::new(fam).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM)),
                what("XSAVE"),
            )?;
            // SAFETY: `x` holds `xsave_bytes` bytes, which is what KVM_CAP_XSAVE2 says
            // the kernel writes.
            ctx(unsafe { fd.get_xsave2(&mut x) }, what("XSAVE"))?;
            let mut b = x.as_fam_struct_ref().xsave.region.as_bytes().to_vec();
            b.extend_from_slice(x.as_slice().as_bytes());
            b
        } else {
            ctx(fd.get_xsave(), what("XSAVE"))?
                .region
                .as_bytes()
                .to_vec()
        };
        let mut msrs = Vec::with_capacity(self.msr_indices.len());
        for chunk in self.msr_indices.chunks(200) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m = ctx(
                Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG)),
                what("MSRs"),
            )?;
            let got = ctx(fd.get_msrs(&mut m), what("MSRs"))?;
            if got != chunk.len() {
                return Err(KvmError {
                    what: format!("vcpu{n}: reading MSR {:#x}", chunk[got]),
                    source: kvm_ioctls::Error::new(libc::EIO),
                });
            }
            msrs.extend_from_slice(m.as_slice());
        }
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            regs: ctx(fd.get_regs(), what("registers"))?,
            sregs: ctx(fd.get_sregs(), what("special registers"))?,
            fpu: ctx(fd.get_fpu(), what("FPU"))?,
            xsave,
            xcrs: ctx(fd.get_xcrs(), what("XCRs"))?,
            msrs,
            lapic: ctx(fd.get_lapic(), what("local APIC"))?,
            mp_state: ctx(fd.get_mp_state(), what("MP state"))?,
            events: ctx(fd.get_vcpu_events(), what("vCPU events"))?,
            debugregs: ctx(fd.get_debug_regs(), what("debug registers"))?,
            tsc_khz: fd.get_tsc_khz().unwrap_or(0),
        })
    }

    /// Loads vCPU `i`'s state. The vCPU must be parked.
    pub(crate) fn load_vcpu(&self, i: usize, s: &VcpuState) -> Result<(), String> {
        let v = &self.vcpus[i];
        let fd = v.lock();
        let e = |w: &'static str| move |err: kvm_ioctls::Error| format!("writing {w}: {err}");
        if s.xsave.len() != self.xsave_bytes {
            return Err(format!(
                "XSAVE area of {} bytes, this host's is {}",
                s.xsave.len(),
                self.xsave_bytes
            ));
        }
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| "too many CPUID entries")?;
        fd.set_cpuid2(&cpuid).map_err(e("CPUID"))?;
        if s.tsc_khz != 0 && fd.get_tsc_khz().ok() != Some(s.tsc_khz) {
            fd.set_tsc_khz(s.tsc_khz).map_err(e("the TSC frequency"))?;
        }
        fd.set_sregs(&s.sregs).map_err(e("special registers"))?;
        fd.set_regs(&s.regs).map_err(e("registers"))?;
        fd.set_xcrs(&s.xcrs).map_err(e("XCRs"))?;
        fd.set_fpu(&s.fpu).map_err(e("FPU"))?;
        let words = s
            .xsave
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        if self.xsave2 {
            let mut x = Xsave::new((self.xsave_bytes - XSAVE_LEGACY_SIZE) / 4)
                .map_err(|err| format!("allocating XSAVE: {err:?}"))?;
            let mut words = words;
            // SAFETY: only the fixed region is written; the length field stays as set.
            let region = &mut unsafe { x.as_mut_fam_struct() }.xsave.region;
            for (dst, w) in region.iter_mut().zip(&mut words) {
                *dst = w;
            }
            for (dst, w) in x.as_mut_slice().iter_mut().zip(words) {
                *dst = w;
            }
            // SAFETY: `x` holds `xsave_bytes` bytes, all the kernel reads for this VM.
            unsafe { fd.set_xsave2(&x) }.map_err(e("XSAVE"))?;
        } else {
            let mut k = kvm_xsave::default();
            for (dst, w) in k.region.iter_mut().zip(words) {
                *dst = w;
            }
            // SAFETY: without KVM_CAP_XSAVE2 the kernel reads exactly the 4 KiB region.
            unsafe { fd.set_xsave(&k) }.map_err(e("XSAVE"))?;
        }
        fd.set_lapic(&s.lapic).map_err(e("the local APIC"))?;
        for chunk in s.msrs.chunks(200) {
            let m = Msrs::from_entries(chunk).map_err(|_| "too many MSRs")?;
            let n = fd.set_msrs(&m).map_err(e("MSRs"))?;
            if n != chunk.len() {
                return Err(format!(
                    "the kernel refused MSR {:#x} (value {:#x})",
                    chunk[n].index, chunk[n].data
                ));
            }
        }
        fd.set_mp_state(s.mp_state).map_err(e("the MP state"))?;
        fd.set_vcpu_events(&s.events).map_err(e("vCPU events"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(e("debug registers"))?;
        Ok(())
    }

    /// Saves the VM-wide devices as `(id, bytes)`.
    pub(crate) fn save_devices(&self) -> Result<Vec<(&'static str, Vec<u8>)>, KvmError> {
        let mut out = Vec::new();
        for (id, chip_id) in [
            (state::PIC_MASTER_ID, KVM_IRQCHIP_PIC_MASTER),
            (state::PIC_SLAVE_ID, KVM_IRQCHIP_PIC_SLAVE),
            (state::IOAPIC_ID, KVM_IRQCHIP_IOAPIC),
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            ctx(self.vm.get_irqchip(&mut chip), || format!("reading {id}"))?;
            out.push((id, chip.as_bytes().to_vec()));
        }
        let pit = ctx(self.vm.get_pit2(), || "reading the PIT".into())?;
        out.push((state::PIT_ID, pit.as_bytes().to_vec()));
        let clock = ctx(self.vm.get_clock(), || "reading the KVM clock".into())?;
        out.push((state::KVMCLOCK_ID, clock.as_bytes().to_vec()));
        Ok(out)
    }

    /// Loads one VM-wide device.
    pub(crate) fn load_device(&self, id: &str, data: &[u8]) -> Result<(), String> {
        let chip_id = match id {
            state::PIC_MASTER_ID => Some(KVM_IRQCHIP_PIC_MASTER),
            state::PIC_SLAVE_ID => Some(KVM_IRQCHIP_PIC_SLAVE),
            state::IOAPIC_ID => Some(KVM_IRQCHIP_IOAPIC),
            _ => None,
        };
        if let Some(chip_id) = chip_id {
            let chip: kvm_irqchip =
                state::struct_from_bytes("irqchip", data).map_err(|e| e.to_string())?;
            if chip.chip_id != chip_id {
                return Err(format!(
                    "holds irqchip {} instead of {chip_id}",
                    chip.chip_id
                ));
            }
            return self.vm.set_irqchip(&chip).map_err(|e| e.to_string());
        }
        match id {
            state::PIT_ID => {
                let pit: kvm_pit_state2 =
                    state::struct_from_bytes("pit", data).map_err(|e: BlobError| e.to_string())?;
                self.vm.set_pit2(&pit).map_err(|e| e.to_string())
            }
            state::KVMCLOCK_ID => {
                let c: kvm_clock_data =
                    state::struct_from_bytes("kvmclock", data).map_err(|e| e.to_string())?;
                // The guest's clock resumes where it stopped, as QEMU does: without
                // KVM_CLOCK_REALTIME the kernel does not add the time spent migrating.
                let set = kvm_clock_data {
                    clock: c.clock,
                    ..Default::default()
                };
                self.vm.set_clock(&set).map_err(|e| e.to_string())
            }
            _ => Err("not a device of a KVM VM".into()),
        }
    }
}

/// The host's CPUID with this vCPU's APIC ID.
fn vcpu_cpuid(base: &CpuId, index: u32) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            // Initial APIC ID in EBX[31:24].
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            // x2APIC ID of the extended topology leaves.
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    c
}

/// Puts a fresh vCPU in 64-bit mode at the guest program, paging on with the identity
/// map, interrupts off, `rsi` at its control block and `rsp` at the end of that page.
fn enter_long_mode(fd: &VcpuFd, index: u32) -> Result<(), KvmError> {
    let what = |w: &'static str| move || format!("vcpu{index}: {w}");
    let mut sregs = ctx(fd.get_sregs(), what("reading special registers"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: guest::CODE_SELECTOR,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: guest::DATA_SELECTOR,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    let tss = kvm_segment {
        selector: guest::TSS_SELECTOR,
        type_: 0xb, // busy 64-bit TSS
        s: 0,
        db: 0,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (guest::GDT.len() * 8 - 1) as u16;
    // No IDT: any exception becomes a triple fault, which the VMM reports.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    ctx(fd.set_sregs(&sregs), what("entering long mode"))?;
    let cb = layout::control_block_addr(index);
    let regs = kvm_regs {
        rip: layout::CODE_ADDR,
        rflags: 0x2,
        rsi: cb,
        rsp: cb + migration_core::PAGE_SIZE,
        ..Default::default()
    };
    ctx(fd.set_regs(&regs), what("setting registers"))?;
    // With the in-kernel irqchip, application processors wait for INIT/SIPI; this guest
    // has no BIOS to send them, so every vCPU starts runnable.
    let mp = kvm_bindings::kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    };
    ctx(fd.set_mp_state(mp), what("making it runnable"))?;
    Ok(())
}

/// The MSRs of `KVM_GET_MSR_INDEX_LIST` this vCPU can read and write back.
fn usable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<u32>, KvmError> {
    let list = ctx(kvm.get_msr_index_list(), || {
        "reading the MSR index list".into()
    })?;
    let mut keep = Vec::new();
    for &index in list.as_slice() {
        let Ok(mut m) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if fd.get_msrs(&mut m).ok() != Some(1) {
            continue;
        }
        // Writing the TSC of one vCPU would desynchronise it from the others and turn
        // off KVM's master clock (kvmclock's TSC_STABLE); host writes to it always work.
        if index != state::MSR_IA32_TSC && fd.set_msrs(&m).ok() != Some(1) {
            continue;
        }
        keep.push(index);
    }
    tracing::debug!(
        listed = list.as_slice().len(),
        usable = keep.len(),
        "MSRs to save"
    );
    Ok(keep)
}

/// The disk's MMIO window: its base and the device behind it.
pub(crate) type MmioDevice = (u64, Arc<Mutex<crate::virtio_blk::BlkDevice>>);

/// The body of a KVM vCPU thread.
pub(crate) fn vcpu_thread(
    vcpu: Arc<KvmVcpu>,
    ctl: Arc<RunControl>,
    serial: Arc<Serial>,
    mmio: Option<MmioDevice>,
) {
    // The offset in the disk's window of a guest-physical access, if it falls there.
    let window = |addr: u64| {
        let (base, dev) = mmio.as_ref()?;
        let off = addr.checked_sub(*base)?;
        (off < crate::layout::MMIO_WINDOW).then_some((off, dev))
    };
    struct Registered<'a>(&'a Mutex<Option<libc::pthread_t>>);
    impl Drop for Registered<'_> {
        fn drop(&mut self) {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
    // SAFETY: pthread_self has no preconditions.
    *vcpu.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(unsafe { libc::pthread_self() });
    let _registered = Registered(&vcpu.thread);
    vcpu.counters.record_thread();
    let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
    let n = vcpu.index;
    if ctl.park_point() == Parked::Exit {
        return;
    }
    let mut slice_start = Instant::now();
    loop {
        let mut fd = vcpu.lock();
        let t0 = Instant::now();
        let res = fd.run();
        vcpu.counters.add_run(t0.elapsed());
        vcpu.counters.exits.fetch_add(1, Ordering::Relaxed);
        let fatal = match res {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == SERIAL_PORT {
                    serial.write(n, data);
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => match window(addr) {
                Some((off, dev)) => {
                    dev.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .mmio_read(off, data);
                    None
                }
                None => Some(format!(
                    "MMIO read of {} bytes at {addr:#x}, where no device is",
                    data.len()
                )),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => match window(addr) {
                Some((off, dev)) => {
                    let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                    // QueueNotify has an ioeventfd and does not come here; if it did, the
                    // queue is processed on this thread, as the software vCPU does.
                    if d.mmio_write(off, data) == crate::virtio_blk::WriteEffect::Notify {
                        d.process_all();
                    }
                    None
                }
                None => Some(format!(
                    "MMIO write of {} bytes at {addr:#x}, where no device is",
                    data.len()
                )),
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                // Line status: transmitter empty, so a polling guest would go on.
                let v = if port == SERIAL_PORT + 5 { 0x60 } else { 0xff };
                data.fill(v);
                None
            }
            Ok(exit) => Some(format!("{exit:?}")),
            Err(e) if e.errno() == libc::EINTR => {
                vcpu.immediate_exit.set(0);
                drop(fd);
                match ctl.park_point() {
                    Parked::Exit => return,
                    Parked::Resumed => slice_start = Instant::now(),
                    Parked::Continue => ctl.throttle(&mut slice_start, &vcpu.counters),
                }
                continue;
            }
            Err(e) if e.errno() == libc::EAGAIN => None,
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(why) = fatal {
            let rip = fd
                .get_regs()
                .map(|r| format!("{:#x}", r.rip))
                .unwrap_or_else(|_| "?".into());
            drop(fd);
            ctl.fail(format!("vcpu{n} stopped at rip {rip}: {why}"));
            return;
        }
    }
}
