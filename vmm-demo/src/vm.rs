//! The VM a migration engine drives: RAM, vCPUs (KVM or software), serial console, and
//! [`VmControl`].
//!
//! What an engine gets from a [`Vm`]:
//! - guest RAM: [`Vm::memory`] (an `Arc<GuestMemory>` to read pages from or write
//!   them into) and [`Vm::ram_layout`] (the dense page numbering of `migration-core`);
//! - dirty tracking inputs: for KVM, [`Vm::vm_fd`] and [`Vm::memory_slots`]; for any
//!   guest, [`Vm::host_ranges`], the host mappings of guest RAM;
//! - control: [`Vm`] and its cheap clone [`VmHandle`] implement [`VmControl`];
//! - the oracle: [`Vm::check`] and [`Vm::ram_hash`], or [`crate::oracle`] directly over
//!   any guest memory and the [`Workload`].
//!
//! A source is made with [`Vm::new`] and starts paused: call `resume` to run it. A
//! destination is made with [`Vm::new_incoming`]: its RAM is left empty for the
//! migration to fill and it refuses to run until `load_device_state` succeeded.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::guest::GuestMemory;
use kvm_ioctls::VmFd;
use migration_core::RamLayout;
use migration_core::dirty::HostRange;
use migration_core::vm::{DeviceState, VmControl, VmError, VmOp};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::control::{RunControl, VcpuStats, Want};
use crate::kvm::{KvmError, KvmMachine};
pub use crate::kvm::{MemorySlot, kvm_available};
use crate::layout::{ConfigError, VmConfig, Workload};
use crate::oracle::{self, OracleError, OracleReport};
use crate::serial::{Console, Serial};
use crate::software::SoftVcpu;
use crate::state::{self, BLOB_VERSION, SoftPosition, VcpuState};
use crate::virtio_blk::state::{BLK_ID, BlkState};
use crate::virtio_blk::{BlkDevice, DiskError, DiskImage, WriteObservers};
use migration_nbd::mirror::PersistentBitmap;

/// How long a pause may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which kind of vCPU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// KVM vCPUs running the guest program.
    Kvm,
    /// Software vCPU threads doing the same work.
    Software,
}

impl GuestKind {
    /// `"kvm"` or `"software"`.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Kvm => "kvm",
            GuestKind::Software => "software",
        }
    }

    /// KVM if `/dev/kvm` can be used, software otherwise.
    pub fn best_available() -> GuestKind {
        if kvm_available() {
            GuestKind::Kvm
        } else {
            GuestKind::Software
        }
    }
}

impl std::fmt::Display for GuestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error("VM configuration: {0}")]
    Config(#[from] ConfigError),
    /// Guest RAM could not be mapped.
    #[error("mapping {bytes} bytes of guest RAM")]
    Memory {
        /// Bytes asked for.
        bytes: u64,
        /// What vm-memory said.
        source: vm_memory::mmap::FromRangesError,
    },
    /// Guest RAM could not be populated beforehand.
    #[error("populating {bytes} bytes of guest RAM")]
    Populate {
        /// Bytes asked for.
        bytes: u64,
        /// What `madvise` said.
        source: std::io::Error,
    },
    /// The initial RAM image could not be written.
    #[error("writing the initial RAM image")]
    Image(#[source] vm_memory::GuestMemoryError),
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A thread could not be started.
    #[error("starting thread {name}")]
    Thread {
        /// The thread.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// The disk image cannot be the VM's disk.
    #[error("the VM's disk")]
    Disk(#[source] DiskError),
    /// The configuration has a disk and no image was given, or the reverse.
    #[error("{0}")]
    DiskMismatch(String),
    /// The vCPU threads did not reach their first park point.
    #[error("vCPU threads did not start: {0}")]
    Start(String),
}

/// The `machine` blob does not describe a VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MachineError {
    /// Larger than any machine description.
    #[error("machine description of {len} bytes is too large (at most {MAX_MACHINE_BLOB})")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Not the JSON of a [`MachineInfo`].
    #[error("not a machine description")]
    Json(#[source] serde_json::Error),
    /// No `machine` blob among the device states.
    #[error("no machine blob among the device states")]
    Missing,
}

/// Largest `machine` blob parsed.
pub const MAX_MACHINE_BLOB: usize = 64 << 10;

/// The vCPUs did not reach a pass count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// vCPUs stopped for good.
    #[error("vCPUs failed: {}", .0.join("; "))]
    VcpuFailed(Vec<String>),
    /// Time ran out.
    #[error("after {timeout:?} the vCPUs are at passes {passes:?}, not yet {wanted}")]
    Timeout {
        /// How long was waited.
        timeout: Duration,
        /// Where the vCPUs are.
        passes: Vec<u64>,
        /// What was waited for.
        wanted: u64,
    },
}

/// What a VM is: its guest kind and configuration. The content of the `machine` blob
/// (JSON), which a destination checks against itself before loading anything else; a
/// migration engine may also send it ahead of RAM so that the destination can build a
/// matching [`Vm::new_incoming`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// Which vCPUs run the guest.
    pub guest: GuestKind,
    /// The VM's shape and workload.
    pub config: VmConfig,
}

impl MachineInfo {
    /// The JSON bytes of the `machine` blob.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of numbers and unit enums: serializing it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses the `machine` blob, bounded to [`MAX_MACHINE_BLOB`] bytes.
    pub fn from_bytes(b: &[u8]) -> Result<MachineInfo, MachineError> {
        if b.len() > MAX_MACHINE_BLOB {
            return Err(MachineError::TooLarge { len: b.len() });
        }
        serde_json::from_slice(b).map_err(MachineError::Json)
    }

    /// Finds and parses the `machine` blob among saved states.
    pub fn from_states(states: &[DeviceState]) -> Result<MachineInfo, MachineError> {
        let blob = states
            .iter()
            .find(|s| s.id == state::MACHINE_ID)
            .ok_or(MachineError::Missing)?;
        Self::from_bytes(&blob.data)
    }
}

enum Machine {
    Kvm(KvmMachine),
    Software(Vec<Arc<SoftVcpu>>),
}

struct Inner {
    // Declared first so it is dropped first: KVM lets go of guest RAM before it is unmapped.
    machine: Machine,
    kind: GuestKind,
    workload: Workload,
    layout: RamLayout,
    mem: Arc<GuestMemory>,
    ctl: Arc<RunControl>,
    serial: Arc<Serial>,
    /// The vCPUs hold a complete state they may run from.
    runnable: AtomicBool,
    /// The virtio-blk disk, if the VM has one.
    disk: Option<Disk>,
}

/// The VM's disk: the device, shared by the vCPUs (MMIO), its thread (KVM) and the VMM
/// (pause, save, load).
pub(crate) struct Disk {
    pub(crate) dev: Arc<Mutex<BlkDevice>>,
    pub(crate) mmio_base: u64,
    /// KVM: the queue's ioeventfd, signalled at resume to make the device thread look at
    /// the queue (requests made available before a pause or a migration). Software: none,
    /// the queue is processed at once.
    kick: Option<EventFd>,
    /// KVM: tells the device thread to return.
    stop: Option<EventFd>,
    /// Who is told of the guest's writes to the image (a storage mirror, the bitmap).
    observers: WriteObservers,
    /// The persistent record of the writes since the image's base (for a later
    /// `--copy-storage-inc`), held open while the VM runs.
    bitmap: Mutex<Option<Arc<Mutex<PersistentBitmap>>>>,
}

impl Drop for Disk {
    // The device is stopped by now: every write it made was recorded, so the bitmap is
    // complete and is closed as such.
    fn drop(&mut self) {
        self.set_bitmap(None);
    }
}

impl Disk {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, BlkDevice> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self) -> std::path::PathBuf {
        self.lock().disk().path().to_path_buf()
    }

    fn bytes(&self) -> u64 {
        self.lock().disk().sectors() * crate::virtio_blk::SECTOR_SIZE
    }

    /// Opens the image's persistent bitmap if there is one; one that cannot be used (not
    /// closed cleanly, another size) is left alone, and a later incremental copy says why.
    fn open_bitmap(&self) {
        let path = crate::migration::storage::bitmap_path(&self.path());
        if !path.exists() {
            return;
        }
        match PersistentBitmap::open(&path, self.bytes()) {
            Ok(b) => self.set_bitmap(Some(b)),
            Err(e) => tracing::warn!(%e, "not recording writes for an incremental copy"),
        }
    }

    /// Replaces the bitmap (closing the old one cleanly); the new one is told of writes.
    fn set_bitmap(&self, b: Option<PersistentBitmap>) {
        let mut slot = self.bitmap.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.take() {
            let key: Arc<dyn crate::virtio_blk::WriteObserver> = old.clone();
            self.observers.remove(&key);
            Self::close_bitmap(old);
        }
        if let Some(b) = b {
            let b = Arc::new(Mutex::new(b));
            self.observers.add(b.clone());
            *slot = Some(b);
        }
    }

    fn close_bitmap(b: Arc<Mutex<PersistentBitmap>>) {
        match Arc::try_unwrap(b) {
            Ok(m) => {
                let b = m.into_inner().unwrap_or_else(|e| e.into_inner());
                let path = b.path().to_path_buf();
                if let Err(e) = b.close() {
                    tracing::warn!(path = %path.display(), %e, "closing the disk's bitmap");
                }
            }
            // Still shared (cannot happen: the observers let go of it first): saved in
            // use, it is not trusted later, which is the safe side.
            Err(b) => {
                let _ = b.lock().unwrap_or_else(|e| e.into_inner()).save();
            }
        }
    }

    /// The device, once whoever holds it lets go, or why not within `timeout`. For a
    /// pause: the device thread holds the lock for one request, which in a post-copy
    /// waits for any page of guest RAM it touches that has not arrived; if the source is
    /// gone that page never comes, and a pause must fail rather than hang.
    fn lock_within(
        &self,
        timeout: Duration,
    ) -> Result<std::sync::MutexGuard<'_, BlkDevice>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.dev.try_lock() {
                Ok(g) => return Ok(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the device was still busy with a request after {timeout:?} (waiting for a page of guest RAM that has not arrived?)"
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn alloc_ram(workload: &Workload, bytes: u64) -> Result<GuestMemory, VmmError> {
    let ranges: Vec<(GuestAddress, usize)> = workload
        .regions()
        .iter()
        .map(|&(b, s)| (GuestAddress(b), s as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| VmmError::Memory { bytes, source })
}

/// Guest RAM allocated and populated before an incoming migration, as QEMU's
/// `-mem-prealloc` does for a destination: the migration then writes into pages that are
/// there already instead of faulting each one in (allocate, clear, map) as it arrives,
/// which is the costliest part of receiving. The price is all of guest RAM resident from
/// the start, pages that arrive as zero included.
pub struct PreallocatedRam {
    regions: Vec<(u64, u64)>,
    mem: GuestMemory,
}

impl std::fmt::Debug for PreallocatedRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreallocatedRam")
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

impl PreallocatedRam {
    /// RAM for a VM of `mem_bytes` in `ram_regions` regions (the layout
    /// [`Workload::new`] gives them), every page populated.
    pub fn new(mem_bytes: u64, ram_regions: u32) -> Result<PreallocatedRam, VmmError> {
        use vm_memory::GuestMemoryRegion;
        let config = VmConfig {
            mem_bytes,
            ram_regions,
            vcpus: 1,
            working_set_bytes: 0,
            ..VmConfig::default()
        };
        let workload = Workload::new(&config)?;
        let mem = alloc_ram(&workload, mem_bytes)?;
        for r in mem.iter() {
            // SAFETY: advice on the region's own mapping, `len()` bytes from `as_ptr()`;
            // populating writes nothing into the (zero) pages.
            let rc = unsafe {
                libc::madvise(
                    r.as_ptr().cast(),
                    r.len() as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                return Err(VmmError::Populate {
                    bytes: mem_bytes,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(PreallocatedRam {
            regions: workload.regions().to_vec(),
            mem,
        })
    }
}

/// A VM: guest RAM, vCPU threads, the serial console. Dropping it stops the threads.
pub struct Vm {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

/// A cheap, cloneable handle on a [`Vm`], for an engine or a monitor on another thread.
/// Once the `Vm` is dropped, its vCPUs are gone and `pause`/`resume` fail.
#[derive(Clone)]
pub struct VmHandle {
    inner: Arc<Inner>,
}

impl Vm {
    /// A VM running the workload from its start, paused: call `resume` to run it.
    pub fn new(config: &VmConfig, kind: GuestKind, console: Console) -> Result<Vm, VmmError> {
        Self::build(config, kind, console, false, None, None)
    }

    /// [`Vm::new`] with the raw image at `disk` as its virtio-blk disk, which
    /// `config.disk_sectors` must describe (and no disk when it is 0).
    pub fn with_disk(
        config: &VmConfig,
        kind: GuestKind,
        console: Console,
        disk: Option<&Path>,
    ) -> Result<Vm, VmmError> {
        Self::build(config, kind, console, false, None, disk)
    }

    /// [`Vm::new_incoming`] with the raw image at `disk` as its disk (the source's image,
    /// on shared storage).
    pub fn new_incoming_with_disk(
        config: &VmConfig,
        kind: GuestKind,
        console: Console,
        disk: Option<&Path>,
    ) -> Result<Vm, VmmError> {
        Self::build(config, kind, console, true, None, disk)
    }

    /// A VM to receive a migration: RAM empty (never touched, so all zero), vCPUs paused
    /// with no state. It runs only once `load_device_state` has succeeded.
    pub fn new_incoming(
        config: &VmConfig,
        kind: GuestKind,
        console: Console,
    ) -> Result<Vm, VmmError> {
        Self::build(config, kind, console, true, None, None)
    }

    /// [`Vm::new_incoming`] on RAM allocated beforehand, if it has the layout this VM
    /// needs; otherwise on fresh RAM. Returns whether `ram` was used.
    pub fn new_incoming_on(
        config: &VmConfig,
        kind: GuestKind,
        console: Console,
        ram: PreallocatedRam,
    ) -> Result<(Vm, bool), VmmError> {
        Self::new_incoming_on_with_disk(config, kind, console, ram, None)
    }

    /// [`Vm::new_incoming_on`] with a disk, as [`Vm::new_incoming_with_disk`].
    pub fn new_incoming_on_with_disk(
        config: &VmConfig,
        kind: GuestKind,
        console: Console,
        ram: PreallocatedRam,
        disk: Option<&Path>,
    ) -> Result<(Vm, bool), VmmError> {
        let regions = Workload::new(config)?.regions().to_vec();
        if regions == ram.regions {
            Ok((
                Self::build(config, kind, console, true, Some(ram.mem), disk)?,
                true,
            ))
        } else {
            tracing::warn!(
                ?regions,
                preallocated = ?ram.regions,
                "the incoming VM's RAM differs from the preallocated RAM; allocating afresh"
            );
            drop(ram);
            Ok((Self::build(config, kind, console, true, None, disk)?, false))
        }
    }

    fn build(
        config: &VmConfig,
        kind: GuestKind,
        console: Console,
        incoming: bool,
        ram: Option<GuestMemory>,
        disk: Option<&Path>,
    ) -> Result<Vm, VmmError> {
        let workload = Workload::new(config)?;
        let image = match (disk, workload.mmio_base()) {
            (None, None) => None,
            (Some(p), Some(_)) => {
                let img = DiskImage::open(p).map_err(VmmError::Disk)?;
                if img.sectors() != config.disk_sectors {
                    return Err(VmmError::Disk(DiskError::Capacity {
                        path: p.to_path_buf(),
                        found: img.sectors(),
                        expected: config.disk_sectors,
                    }));
                }
                // A guest is about to write it: the image will not be the disk as it was
                // at any base written beside it (an incremental copy checked it already).
                let base = crate::migration::storage::base_path(p);
                if base.exists() {
                    if let Err(e) = std::fs::remove_file(&base) {
                        tracing::warn!(path = %base.display(), %e, "removing a stale base");
                    }
                }
                Some(img)
            }
            (Some(p), None) => {
                return Err(VmmError::DiskMismatch(format!(
                    "a disk image ({}) was given for a VM configured without a disk",
                    p.display()
                )));
            }
            (None, Some(_)) => {
                return Err(VmmError::DiskMismatch(format!(
                    "the VM has a disk of {} sectors and no image was given for it (--disk)",
                    config.disk_sectors
                )));
            }
        };
        let mem = match ram {
            Some(m) => m,
            None => alloc_ram(&workload, config.mem_bytes)?,
        };
        if !incoming {
            crate::guest::write_image(&mem, &workload).map_err(VmmError::Image)?;
        }
        let machine = match kind {
            GuestKind::Kvm => Machine::Kvm(KvmMachine::create(&mem, &workload, !incoming)?),
            GuestKind::Software => Machine::Software(
                (0..workload.vcpus())
                    .map(|i| Arc::new(SoftVcpu::new(i, &workload)))
                    .collect(),
            ),
        };
        let layout = workload.ram().clone();
        let n = workload.vcpus();
        let mem = Arc::new(mem);
        let disk = match (image, workload.mmio_base()) {
            (Some(img), Some(mmio_base)) => {
                let d = Self::attach_disk(&machine, &mem, img, mmio_base)?;
                // The writes since the image's base, kept by an earlier VM on it: this one
                // goes on recording (a VM that arrives by migration starts its own once
                // the migration succeeded).
                if !incoming {
                    d.open_bitmap();
                }
                Some(d)
            }
            _ => None,
        };
        let inner = Arc::new(Inner {
            disk,
            kind,
            layout,
            mem,
            ctl: Arc::new(RunControl::new(n)),
            serial: Arc::new(Serial::new(n, console)),
            machine,
            runnable: AtomicBool::new(!incoming),
            workload,
        });
        let mut vm = Vm {
            inner,
            threads: Vec::new(),
        };
        vm.spawn_threads()?;
        let i = &vm.inner;
        i.ctl
            .wait_parked(&|| i.kick_all(), PAUSE_TIMEOUT)
            .map_err(VmmError::Start)?;
        tracing::info!(
            guest = %kind,
            mem_bytes = config.mem_bytes,
            vcpus = n,
            incoming,
            "VM ready"
        );
        Ok(vm)
    }

    /// The disk's device and, for KVM, its notification path: an ioeventfd on QueueNotify
    /// (the kernel signals it without a userspace exit) and an irqfd on the irqchip's
    /// line [`IRQ`](crate::guest::abi::disk::IRQ).
    fn attach_disk(
        machine: &Machine,
        mem: &Arc<GuestMemory>,
        img: DiskImage,
        mmio_base: u64,
    ) -> Result<Disk, VmmError> {
        let efd = |what: &'static str| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| VmmError::Thread {
                name: format!("virtio-blk {what} eventfd"),
                source,
            })
        };
        match machine {
            Machine::Software(_) => Ok(Disk {
                observers: img.observers().clone(),
                dev: Arc::new(Mutex::new(BlkDevice::new(mem.clone(), img, None))),
                mmio_base,
                kick: None,
                stop: None,
                bitmap: Mutex::new(None),
            }),
            Machine::Kvm(k) => {
                let notify = efd("notify")?;
                let irq = efd("interrupt")?;
                let kvm = |what: String| move |source| VmmError::Kvm(KvmError { what, source });
                let addr =
                    mmio_base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
                k.vm.register_ioevent(
                    &notify,
                    &kvm_ioctls::IoEventAddress::Mmio(addr),
                    kvm_ioctls::NoDatamatch,
                )
                .map_err(kvm(format!(
                    "registering the virtio-blk ioeventfd at {addr:#x}"
                )))?;
                k.vm.register_irqfd(&irq, crate::guest::abi::disk::IRQ)
                    .map_err(kvm(format!(
                        "registering the virtio-blk irqfd on GSI {}",
                        crate::guest::abi::disk::IRQ
                    )))?;
                let kick = notify.try_clone().map_err(|source| VmmError::Thread {
                    name: "virtio-blk eventfd clone".into(),
                    source,
                })?;
                Ok(Disk {
                    observers: img.observers().clone(),
                    dev: Arc::new(Mutex::new(BlkDevice::new(mem.clone(), img, Some(irq)))),
                    mmio_base,
                    kick: Some(kick),
                    // The thread gets the other end of these in spawn_threads.
                    stop: Some(efd("stop")?),
                    bitmap: Mutex::new(None),
                })
            }
        }
    }

    fn spawn_threads(&mut self) -> Result<(), VmmError> {
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(f)
                .map_err(|source| VmmError::Thread { name, source })
        };
        let i = self.inner.clone();
        if let Some(d) = &i.disk {
            if let (Some(kick), Some(stop)) = (&d.kick, &d.stop) {
                let clone = |e: &EventFd| {
                    e.try_clone().map_err(|source| VmmError::Thread {
                        name: "virtio-blk".into(),
                        source,
                    })
                };
                let (dev, notify, stop) = (d.dev.clone(), clone(kick)?, clone(stop)?);
                self.threads.push(spawn(
                    "virtio-blk".into(),
                    Box::new(move || crate::virtio_blk::thread::run(dev, notify, stop)),
                )?);
            }
        }
        let mmio = i.disk.as_ref().map(|d| (d.mmio_base, d.dev.clone()));
        match &i.machine {
            Machine::Kvm(k) => {
                let vcpus = k.vcpus.clone();
                let ctl = i.ctl.clone();
                self.threads.push(spawn(
                    "throttle".into(),
                    Box::new(move || {
                        while ctl.next_tick() {
                            for v in &vcpus {
                                v.kick();
                            }
                        }
                    }),
                )?);
                for v in &k.vcpus {
                    let (v, ctl, serial) = (v.clone(), i.ctl.clone(), i.serial.clone());
                    let name = format!("vcpu{}", v.index);
                    let mmio = mmio.clone();
                    self.threads.push(spawn(
                        name,
                        Box::new(move || crate::kvm::vcpu_thread(v, ctl, serial, mmio)),
                    )?);
                }
            }
            Machine::Software(vcpus) => {
                for v in vcpus {
                    let (v, mem, ctl, serial) =
                        (v.clone(), i.mem.clone(), i.ctl.clone(), i.serial.clone());
                    let name = format!("swcpu{}", v.index);
                    let dev = i.disk.as_ref().map(|d| d.dev.clone());
                    self.threads.push(spawn(
                        name,
                        Box::new(move || crate::software::vcpu_thread(v, mem, ctl, serial, dev)),
                    )?);
                }
            }
        }
        Ok(())
    }

    /// A cloneable handle implementing [`VmControl`] and the read-only accessors.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.inner.ctl.request(Want::Exit);
        self.inner.kick_all();
        if let Some(stop) = self.inner.disk.as_ref().and_then(|d| d.stop.as_ref()) {
            let _ = stop.write(1);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn kick_all(&self) {
        match &self.machine {
            Machine::Kvm(k) => k.kick_all(),
            Machine::Software(v) => v.iter().for_each(|v| v.kick()),
        }
    }

    fn pause(&self) -> Result<(), VmError> {
        self.ctl.request(Want::Pause);
        self.kick_all();
        self.ctl
            .wait_parked(&|| self.kick_all(), PAUSE_TIMEOUT)
            .map_err(|e| VmError::new(VmOp::Pause, e))?;
        // With the vCPUs parked nothing new is queued; the device finishes the request it
        // is processing (the lock waits for it) and the image is flushed: the state saved
        // next, and the image another process opens, hold everything completed so far.
        if let Some(d) = &self.disk {
            d.lock_within(PAUSE_TIMEOUT)
                .map_err(|e| VmError::new(VmOp::Pause, e).for_device(BLK_ID))?
                .pause()
                .map_err(|e| VmError::new(VmOp::Pause, e).for_device(BLK_ID))?;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        if !self.runnable.load(Ordering::SeqCst) {
            return Err(VmError::new(
                VmOp::Resume,
                "the vCPUs have no complete state: an incoming VM runs only after its device state loaded",
            ));
        }
        let failures = self.ctl.failures();
        if !failures.is_empty() {
            return Err(VmError::new(VmOp::Resume, failures.join("; ")));
        }
        if self.ctl.wanted() == Want::Exit {
            return Err(VmError::new(VmOp::Resume, "the VM has been shut down"));
        }
        if let Some(d) = &self.disk {
            // Before the vCPUs: requests available already (made before a pause, or on the
            // source of a migration) are taken now, by the device's own thread (KVM) or
            // the first software vCPU as it resumes, never by the caller. The caller may
            // be a post-copy engine's thread, for which guest RAM it has not received yet
            // is out of bounds: the queue's rings may be on such a page, and touching it
            // would wait for a page only that thread can fetch.
            d.lock().resume();
            if let Some(k) = &d.kick {
                k.write(1)
                    .map_err(|e| VmError::new(VmOp::Resume, e).for_device(BLK_ID))?;
            }
        }
        self.ctl.request(Want::Run);
        Ok(())
    }

    fn set_throttle(&self, pct: u8) -> Result<(), VmError> {
        if pct > 99 {
            return Err(VmError::new(
                VmOp::Throttle,
                format!("{pct} % is over the 99 % maximum"),
            ));
        }
        self.ctl.set_throttle(pct);
        Ok(())
    }

    fn device_ids(&self) -> Vec<String> {
        let mut ids = vec![state::MACHINE_ID.to_string(), state::SERIAL_ID.to_string()];
        let n = self.workload.vcpus();
        match self.kind {
            GuestKind::Kvm => {
                ids.extend((0..n).map(state::vcpu_id));
                ids.extend(
                    [
                        state::PIC_MASTER_ID,
                        state::PIC_SLAVE_ID,
                        state::IOAPIC_ID,
                        state::PIT_ID,
                        state::KVMCLOCK_ID,
                    ]
                    .map(String::from),
                );
            }
            GuestKind::Software => ids.extend((0..n).map(state::swcpu_id)),
        }
        if self.disk.is_some() {
            ids.push(BLK_ID.to_string());
        }
        ids
    }

    fn machine_blob(&self) -> MachineInfo {
        MachineInfo {
            guest: self.kind,
            config: self.workload.config().clone(),
        }
    }

    fn save(&self) -> Result<Vec<DeviceState>, VmError> {
        if !self.ctl.all_parked() {
            return Err(VmError::new(
                VmOp::SaveState,
                "the VM is running: pause it first",
            ));
        }
        let err = |id: &str, e: String| VmError::new(VmOp::SaveState, e).for_device(id);
        let machine = self.machine_blob().to_bytes();
        let mut out = vec![
            DeviceState::new(state::MACHINE_ID, BLOB_VERSION, machine),
            DeviceState::new(state::SERIAL_ID, BLOB_VERSION, self.serial.save()),
        ];
        if let Some(d) = &self.disk {
            out.push(DeviceState::new(
                BLK_ID,
                BLOB_VERSION,
                d.lock().save().to_bytes(),
            ));
        }
        match &self.machine {
            Machine::Kvm(k) => {
                for (i, v) in k.vcpus.iter().enumerate() {
                    let id = state::vcpu_id(v.index);
                    let s = k.save_vcpu(i).map_err(|e| err(&id, e.to_string()))?;
                    out.push(DeviceState::new(id, BLOB_VERSION, s.to_bytes()));
                }
                let devices = k
                    .save_devices()
                    .map_err(|e| VmError::new(VmOp::SaveState, e))?;
                for (id, data) in devices {
                    out.push(DeviceState::new(id, BLOB_VERSION, data));
                }
            }
            Machine::Software(vcpus) => {
                for v in vcpus {
                    out.push(DeviceState::new(
                        state::swcpu_id(v.index),
                        BLOB_VERSION,
                        v.position().to_bytes(),
                    ));
                }
            }
        }
        Ok(out)
    }

    fn load(&self, states: &[DeviceState]) -> Result<(), VmError> {
        let err = |id: &str, e: String| VmError::new(VmOp::LoadState, e).for_device(id);
        if !self.ctl.all_parked() {
            return Err(VmError::new(
                VmOp::LoadState,
                "the VM is running: pause it first",
            ));
        }
        let ids = self.device_ids();
        let mut by_id: Vec<Option<&DeviceState>> = vec![None; ids.len()];
        for s in states {
            let Some(slot) = ids.iter().position(|id| *id == s.id) else {
                return Err(err(
                    &s.id,
                    format!(
                        "unknown device for a {} VM with {} vCPUs",
                        self.kind,
                        self.workload.vcpus()
                    ),
                ));
            };
            if s.version != BLOB_VERSION {
                return Err(err(
                    &s.id,
                    format!(
                        "blob version {} is not the supported {BLOB_VERSION}",
                        s.version
                    ),
                ));
            }
            if by_id[slot].replace(s).is_some() {
                return Err(err(&s.id, "given twice".into()));
            }
        }
        if let Some(missing) = ids.iter().zip(&by_id).find(|(_, s)| s.is_none()) {
            return Err(err(missing.0, "missing from the saved state".into()));
        }
        let blobs: Vec<&DeviceState> = by_id.into_iter().flatten().collect();
        let machine = MachineInfo::from_bytes(&blobs[0].data)
            .map_err(|e| VmError::new(VmOp::LoadState, e).for_device(state::MACHINE_ID))?;
        if machine != self.machine_blob() {
            return Err(err(
                state::MACHINE_ID,
                format!(
                    "the saved VM ({} guest, {:?}) does not match this one ({} guest, {:?})",
                    machine.guest,
                    machine.config,
                    self.kind,
                    self.workload.config()
                ),
            ));
        }
        // Until every blob is in, the vCPUs hold a mix of states: never run that.
        self.runnable.store(false, Ordering::SeqCst);
        for s in &blobs[1..] {
            self.load_one(s).map_err(|e| err(&s.id, e))?;
        }
        self.runnable.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn load_one(&self, s: &DeviceState) -> Result<(), String> {
        if s.id == state::SERIAL_ID {
            return self.serial.load(&s.data);
        }
        if s.id == BLK_ID {
            let d = self.disk.as_ref().ok_or("this VM has no disk")?;
            let st = BlkState::from_bytes(&s.data).map_err(|e| e.to_string())?;
            return d.lock().load(&st).map_err(|e| e.to_string());
        }
        match &self.machine {
            Machine::Kvm(k) => {
                if let Some(i) = k.vcpus.iter().position(|v| state::vcpu_id(v.index) == s.id) {
                    let vs = VcpuState::from_bytes(&s.data).map_err(|e| e.to_string())?;
                    k.load_vcpu(i, &vs)
                } else {
                    k.load_device(&s.id, &s.data)
                }
            }
            Machine::Software(vcpus) => {
                let v = vcpus
                    .iter()
                    .find(|v| state::swcpu_id(v.index) == s.id)
                    .ok_or("not a device of a software VM")?;
                let p = SoftPosition::from_bytes(&s.data).map_err(|e| e.to_string())?;
                v.set_position(p, &self.workload)
            }
        }
    }

    fn passes(&self) -> Vec<u64> {
        (0..self.workload.vcpus())
            .map(|i| oracle::pass_of(&self.mem, i).unwrap_or(0))
            .collect()
    }

    fn vcpu_stats(&self) -> Vec<VcpuStats> {
        match &self.machine {
            Machine::Kvm(k) => k.vcpus.iter().map(|v| v.counters.snapshot()).collect(),
            Machine::Software(v) => v.iter().map(|v| v.counters.snapshot()).collect(),
        }
    }

    fn vcpu_thread_ids(&self) -> Vec<u32> {
        let tid = |c: &crate::control::VcpuCounters| c.tid.load(Ordering::Relaxed);
        match &self.machine {
            Machine::Kvm(k) => k.vcpus.iter().map(|v| tid(&v.counters)).collect(),
            Machine::Software(v) => v.iter().map(|v| tid(&v.counters)).collect(),
        }
    }
}

/// Accessors shared by [`Vm`] and [`VmHandle`].
macro_rules! accessors {
    ($t:ty) => {
        impl $t {
            /// Which kind of vCPU runs the guest.
            pub fn kind(&self) -> GuestKind {
                self.inner.kind
            }

            /// The guest kind and configuration, as the `machine` blob carries them.
            pub fn machine_info(&self) -> MachineInfo {
                self.inner.machine_blob()
            }

            /// The VM's configuration.
            pub fn config(&self) -> &VmConfig {
                self.inner.workload.config()
            }

            /// The workload's layout: what the oracle checks against.
            pub fn workload(&self) -> &Workload {
                &self.inner.workload
            }

            /// Guest RAM. Read and write it through `vm-memory` (volatile accesses); the
            /// vCPUs may be writing it unless paused.
            pub fn memory(&self) -> &Arc<GuestMemory> {
                &self.inner.mem
            }

            /// Page geometry of guest RAM (migration-core's dense page numbering).
            pub fn ram_layout(&self) -> &RamLayout {
                &self.inner.layout
            }

            /// The KVM memory slots, one per RAM region, in slot order. Empty for a
            /// software guest.
            pub fn memory_slots(&self) -> &[MemorySlot] {
                match &self.inner.machine {
                    Machine::Kvm(k) => &k.slots,
                    Machine::Software(_) => &[],
                }
            }

            /// The KVM VM, for the dirty log. `None` for a software guest.
            pub fn vm_fd(&self) -> Option<Arc<VmFd>> {
                match &self.inner.machine {
                    Machine::Kvm(k) => Some(k.vm.clone()),
                    Machine::Software(_) => None,
                }
            }

            /// The host mappings of guest RAM, one per region, ascending, in the form a
            /// dirty tracker without KVM takes them
            /// ([`UffdWpTracker::new`](migration_core::dirty::UffdWpTracker::new)).
            pub fn host_ranges(&self) -> Vec<HostRange> {
                let layout = &self.inner.layout;
                self.inner
                    .mem
                    .iter()
                    .filter_map(|r| {
                        Some(HostRange {
                            host_addr: r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?
                                as usize,
                            len: usize::try_from(r.len()).ok()?,
                            first_page: layout.gpa_to_page(r.start_addr().0)?,
                        })
                    })
                    .collect()
            }

            /// Runs the oracle over guest RAM. Meaningful with the VM paused.
            pub fn check(&self) -> Result<OracleReport, OracleError> {
                oracle::check(&self.inner.mem, &self.inner.workload)
            }

            /// Hash of all guest RAM. Meaningful with the VM paused.
            pub fn ram_hash(&self) -> Result<u64, OracleError> {
                oracle::ram_hash(&self.inner.mem)
            }

            /// What the disk's device did, if the VM has a disk.
            pub fn disk_stats(&self) -> Option<crate::virtio_blk::BlkStats> {
                self.inner.disk.as_ref().map(|d| d.lock().stats())
            }

            /// Who is told of the guest's writes to its disk, if it has one.
            pub fn disk_observers(&self) -> Option<crate::virtio_blk::WriteObservers> {
                self.inner.disk.as_ref().map(|d| d.observers.clone())
            }

            /// The disk's size in bytes, if the VM has a disk.
            pub fn disk_bytes(&self) -> Option<u64> {
                self.inner.disk.as_ref().map(|d| d.bytes())
            }

            /// The clusters written since the disk image's base, their size, and the base,
            /// from the bitmap this VM keeps; `None` without one.
            pub fn disk_bitmap(
                &self,
            ) -> Option<(migration_core::bitmap::DirtyBitmap, u64, [u8; 16])> {
                let d = self.inner.disk.as_ref()?;
                let slot = d.bitmap.lock().unwrap_or_else(|e| e.into_inner());
                let b = slot.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
                Some((b.bits().clone(), b.granularity(), b.base()))
            }

            /// Starts recording the guest's writes since `base` (the disk as it is now, and
            /// as the migration's other side holds it), replacing a bitmap kept so far.
            pub fn start_disk_bitmap(
                &self,
                base: [u8; 16],
                granularity: u64,
            ) -> Result<(), String> {
                let Some(d) = self.inner.disk.as_ref() else {
                    return Ok(());
                };
                let path = crate::migration::storage::bitmap_path(&d.path());
                let b = PersistentBitmap::create(&path, d.bytes(), granularity, base)
                    .map_err(|e| e.to_string())?;
                d.set_bitmap(Some(b));
                Ok(())
            }

            /// Stops recording and closes the bitmap cleanly (a later VM on the image
            /// trusts it), or with `remove`, deletes it (it counts from a base the image is
            /// not at any more).
            pub fn close_disk_bitmap(&self, remove: bool) {
                let Some(d) = self.inner.disk.as_ref() else {
                    return;
                };
                d.set_bitmap(None);
                if remove {
                    let _ = std::fs::remove_file(crate::migration::storage::bitmap_path(&d.path()));
                }
            }

            /// The path of the disk's image, if the VM has a disk.
            pub fn disk_path(&self) -> Option<std::path::PathBuf> {
                self.inner
                    .disk
                    .as_ref()
                    .map(|d| d.lock().disk().path().to_path_buf())
            }

            /// Runs the disk oracle over the image (see [`crate::disk_oracle`]), against the
            /// pass counters in RAM; `None` without a disk. Meaningful with the VM paused.
            /// `ram` is the RAM oracle's report on the same instant, for the check that
            /// disk and RAM agree on each vCPU's step.
            pub fn check_disk(
                &self,
                ram: Option<&OracleReport>,
            ) -> Option<Result<crate::disk_oracle::DiskReport, crate::disk_oracle::DiskOracleError>>
            {
                let d = self.inner.disk.as_ref()?;
                let dev = d.lock();
                Some(crate::disk_oracle::check(
                    dev.disk(),
                    &self.inner.mem,
                    &self.inner.workload,
                    ram,
                ))
            }

            /// Hash of the disk image's content, `None` without a disk. Meaningful with the
            /// VM paused (its device flushed).
            pub fn disk_hash(&self) -> Option<Result<u64, crate::disk_oracle::DiskOracleError>> {
                let d = self.inner.disk.as_ref()?;
                let dev = d.lock();
                Some(crate::disk_oracle::disk_hash(dev.disk()))
            }

            /// Each vCPU's pass counter, read from its control block.
            pub fn passes(&self) -> Vec<u64> {
                self.inner.passes()
            }

            /// Each vCPU's run, throttle and exit counters.
            pub fn vcpu_stats(&self) -> Vec<VcpuStats> {
                self.inner.vcpu_stats()
            }

            /// The kernel thread id of each vCPU's thread (0 for one that has not
            /// started), as userfaultfd names faulting threads.
            pub fn vcpu_thread_ids(&self) -> Vec<u32> {
                self.inner.vcpu_thread_ids()
            }

            /// Console lines the guest completed, and those the console dropped.
            pub fn console_lines(&self) -> (u64, u64) {
                (self.inner.serial.lines(), self.inner.serial.dropped())
            }

            /// Why vCPUs stopped for good (a triple fault, a failed KVM_RUN), if any did.
            pub fn failures(&self) -> Vec<String> {
                self.inner.ctl.failures()
            }

            /// Is the VM paused (every vCPU parked)?
            pub fn is_paused(&self) -> bool {
                self.inner.ctl.all_parked()
            }

            /// Makes a software vCPU spend at least `per_page` on each page (zero: as fast
            /// as it can, the default). No effect on KVM vCPUs.
            pub fn set_software_pace(&self, per_page: Duration) {
                self.inner
                    .ctl
                    .set_software_pace_ns(per_page.as_nanos().min(u128::from(u64::MAX)) as u64);
            }

            /// The throttle in force, in percent.
            pub fn throttle(&self) -> u8 {
                self.inner.ctl.throttle_pct()
            }

            /// Waits until every vCPU has completed at least `passes` passes. Fails if a
            /// vCPU stops or `timeout` expires first.
            pub fn wait_for_passes(
                &self,
                passes: u64,
                timeout: Duration,
            ) -> Result<Vec<u64>, WaitError> {
                let deadline = Instant::now() + timeout;
                loop {
                    let p = self.passes();
                    if p.iter().all(|&x| x >= passes) {
                        return Ok(p);
                    }
                    let f = self.failures();
                    if !f.is_empty() {
                        return Err(WaitError::VcpuFailed(f));
                    }
                    if Instant::now() >= deadline {
                        return Err(WaitError::Timeout {
                            timeout,
                            passes: p,
                            wanted: passes,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }

        impl VmControl for $t {
            fn pause(&mut self) -> Result<(), VmError> {
                self.inner.pause()
            }

            fn resume(&mut self) -> Result<(), VmError> {
                self.inner.resume()
            }

            fn set_throttle(&mut self, percent: u8) -> Result<(), VmError> {
                self.inner.set_throttle(percent)
            }

            fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
                self.inner.save()
            }

            fn load_device_state(&mut self, states: &[DeviceState]) -> Result<(), VmError> {
                self.inner.load(states)
            }
        }
    };
}

accessors!(Vm);
accessors!(VmHandle);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Fill, Order};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn machine_info_round_trips(mem in 1u64..1 << 40, regions in 0u32..100, vcpus in 0u32..100,
                                    ws in any::<u64>(), zero in any::<bool>(), seed in any::<u64>(), kvm in any::<bool>(),
                                    scattered in any::<bool>()) {
            let m = MachineInfo {
                guest: if kvm { GuestKind::Kvm } else { GuestKind::Software },
                config: VmConfig {
                    mem_bytes: mem,
                    ram_regions: regions,
                    vcpus,
                    working_set_bytes: ws,
                    fill: if zero { Fill::Zero } else { Fill::Random },
                    seed,
                    order: if scattered { Order::Scattered } else { Order::Sequential },
                    disk_sectors: ws % 1000,
                    disk_working_set: seed % 100,
                    disk_prefill_percent: (seed % 101) as u8,
                },
            };
            prop_assert_eq!(MachineInfo::from_bytes(&m.to_bytes()).unwrap(), m.clone());
            let states = vec![DeviceState::new(state::MACHINE_ID, BLOB_VERSION, m.to_bytes())];
            prop_assert_eq!(MachineInfo::from_states(&states).unwrap(), m);
        }

        #[test]
        fn machine_info_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = MachineInfo::from_bytes(&data);
        }
    }

    #[test]
    fn oversized_machine_info_is_refused_before_parsing() {
        let big = vec![b' '; (64 << 10) + 1];
        assert!(matches!(
            MachineInfo::from_bytes(&big),
            Err(MachineError::TooLarge { len }) if len == big.len()
        ));
        assert!(MachineInfo::from_states(&[]).is_err());
    }
}
