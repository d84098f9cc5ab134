//! The demo VM's disk: a virtio-blk device (virtio 1.x, section 5.2) on the virtio-mmio
//! transport (section 4.2.2, version 2: modern only, `VIRTIO_F_VERSION_1` required),
//! backed by a raw image file, with its descriptor chains parsed by rust-vmm's
//! `virtio-queue`.
//!
//! One model, two ways in:
//! - **KVM**: the guest's write of `QueueNotify` is an ioeventfd the kernel signals without
//!   leaving the guest; a device thread (`thread.rs`) waits on it, processes the queue and
//!   signals an irqfd on [`abi::disk::IRQ`](crate::guest::abi::disk::IRQ) of the in-kernel
//!   irqchip. Every other register access is an MMIO exit the vCPU thread hands to
//!   [`BlkDevice::mmio_read`] / [`BlkDevice::mmio_write`].
//! - **software vCPU**: it calls the same two functions; its `QueueNotify` write processes
//!   the queue synchronously, and the interrupt is only counted (there is no interrupt
//!   controller: the software driver reads `InterruptStatus`, as the polling guest does).
//!
//! The device is one `Mutex<BlkDevice>`: the device thread holds it for one request at a
//! time, so a pause ([`BlkDevice::pause`]) waits for the request being processed to finish,
//! then fdatasyncs the image, and only then may the state be saved ([`state`]). Requests
//! the guest made available but the device had not taken stay in the available ring: the
//! saved `next_avail` says where they start, and the destination processes them when it
//! resumes, so a migrated guest's in-flight I/O completes there.
//!
//! Every request is bounds checked against the image: one that reaches past its end, a
//! malformed chain or an unknown type is answered with a status byte (`IOERR`, `UNSUPP`),
//! never a panic. Chains with no writable byte for the status are returned with length 0.

pub mod driver;
mod request;
pub mod state;
pub(crate) mod thread;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};

pub use driver::DriverError;
use vmm_sys_util::eventfd::EventFd;

use crate::guest::GuestMemory;

pub use state::BlkState;

/// Bytes per sector, as virtio-blk counts them whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// `"virt"`, the value of the MagicValue register.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The virtio-mmio version: 2, the modern transport (1 is the legacy one).
pub const MMIO_VERSION: u32 = 2;
/// Subsystem vendor the device reports (QEMU's, as Firecracker and Cloud Hypervisor do).
pub const VENDOR_ID: u32 = 0x554d_4551;
/// Largest queue the device accepts.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Bytes of the MMIO window: registers below 0x100, the config space above.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Most sectors one discard or write-zeroes segment may cover (the config says so).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// The features the device offers: modern virtio, flush, discard and write-zeroes.
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
/// The 20 bytes a `GET_ID` request returns: the serial number, zero padded.
pub const DEVICE_ID: &[u8; 20] = b"vmm-demo-disk0\0\0\0\0\0\0";

/// The raw image could not be opened or used. Each names the image and, for I/O, the
/// byte offset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// Opening the image failed.
    #[error("opening the disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The image is empty or not a whole number of sectors.
    #[error(
        "the disk image {path} is {bytes} bytes: a raw image for virtio-blk is a non-zero multiple of {SECTOR_SIZE}"
    )]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// The image has another size than the VM was configured (or migrated) with.
    #[error(
        "the disk image {path} has {found} sectors, the VM's disk has {expected}: both sides of a migration must see the same image"
    )]
    Capacity {
        /// The image.
        path: PathBuf,
        /// Its sectors.
        found: u64,
        /// The configuration's.
        expected: u64,
    },
    /// Reading, writing or syncing the image failed.
    #[error("{what} the disk image {path} at byte {offset}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The image.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
}

/// Told of every write, write-zeroes and discard that reached a disk image, after it did:
/// a storage mirror (which re-copies, or in write-blocking mode writes the target before
/// the guest's request completes), a persistent dirty bitmap.
pub trait WriteObserver: Send + Sync {
    /// `len` bytes at `offset` changed.
    fn wrote(&self, offset: u64, len: u64);

    /// `len` bytes at `offset` read as zeroes now (a discard, write-zeroes); by default a
    /// change like any other.
    fn zeroed(&self, offset: u64, len: u64) {
        self.wrote(offset, len);
    }
}

impl WriteObserver for migration_nbd::mirror::MirrorHandle {
    fn wrote(&self, offset: u64, len: u64) {
        self.note_write(offset, len);
    }

    fn zeroed(&self, offset: u64, len: u64) {
        self.note_zeroes(offset, len);
    }
}

impl WriteObserver for std::sync::Mutex<migration_nbd::mirror::PersistentBitmap> {
    fn wrote(&self, offset: u64, len: u64) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .mark(offset, len);
    }
}

/// The observers of one image, shared with whoever adds or removes them (the migration
/// code, while the device thread writes).
#[derive(Clone, Default)]
pub struct WriteObservers(Arc<std::sync::RwLock<Vec<Arc<dyn WriteObserver>>>>);

impl std::fmt::Debug for WriteObservers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriteObservers({})", self.read().len())
    }
}

impl WriteObservers {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<dyn WriteObserver>>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `o`; returns it back as the key to remove it with.
    pub fn add(&self, o: Arc<dyn WriteObserver>) -> Arc<dyn WriteObserver> {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(o.clone());
        o
    }

    /// Removes `o` (added before).
    pub fn remove(&self, o: &Arc<dyn WriteObserver>) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| !Arc::ptr_eq(x, o));
    }

    fn wrote(&self, offset: u64, len: u64) {
        for o in self.read().iter() {
            o.wrote(offset, len);
        }
    }

    fn zeroed(&self, offset: u64, len: u64) {
        for o in self.read().iter() {
            o.zeroed(offset, len);
        }
    }
}

/// A raw disk image: an open file of a whole number of sectors.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    sectors: u64,
    observers: WriteObservers,
}

impl DiskImage {
    /// Opens `path` for reading and writing.
    pub fn open(path: &Path) -> Result<DiskImage, DiskError> {
        let open = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open)?;
        let bytes = file.metadata().map_err(open)?.len();
        if bytes == 0 || bytes % SECTOR_SIZE != 0 {
            return Err(DiskError::Size {
                path: path.to_path_buf(),
                bytes,
            });
        }
        Ok(DiskImage {
            file,
            path: path.to_path_buf(),
            sectors: bytes / SECTOR_SIZE,
            observers: WriteObservers::default(),
        })
    }

    /// Creates a sparse image of `bytes` (a multiple of the sector size) at `path`, which
    /// must not exist yet.
    pub fn create_sparse(path: &Path, bytes: u64) -> Result<(), DiskError> {
        if bytes == 0 || bytes % SECTOR_SIZE != 0 {
            return Err(DiskError::Size {
                path: path.to_path_buf(),
                bytes,
            });
        }
        let open = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(open)?;
        // set_len makes a hole: nothing is allocated until the guest writes.
        f.set_len(bytes).map_err(open)
    }

    /// The open file, for the oracle's extent walk.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn io(&self, what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> DiskError {
        let path = self.path.clone();
        move |source| DiskError::Io {
            what,
            path,
            offset,
            source,
        }
    }

    /// Reads `buf.len()` bytes at byte `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(self.io("reading", offset))
    }

    /// Writes `buf` at byte `offset`, then tells the observers.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(self.io("writing", offset))?;
        self.observers.wrote(offset, buf.len() as u64);
        Ok(())
    }

    /// Who is told of the writes to this image.
    pub fn observers(&self) -> &WriteObservers {
        &self.observers
    }

    /// fdatasync: what the guest wrote is on stable storage (and visible to any other
    /// process opening the image, which the page cache gives already on one host).
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(self.io("syncing", 0))
    }

    /// Makes `len` bytes at `offset` read as zero, deallocating them where the
    /// filesystem can (a hole), writing zeroes where it cannot.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(self.io("zeroing", offset)(std::io::Error::from(
                std::io::ErrorKind::InvalidInput,
            )));
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let rc =
            unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.file), mode, off, n) };
        if rc == 0 {
            self.observers.zeroed(offset, len);
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(self.io("punching a hole in", offset)(e));
        }
        let zeros = vec![0u8; 64 << 10];
        let mut at = 0u64;
        while at < len {
            let k = (len - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..k], offset + at)?;
            at += k as u64;
        }
        Ok(())
    }
}

/// Counters of what the device did, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlkStats {
    /// Requests completed (whatever their status).
    pub requests: u64,
    /// Sectors read.
    pub sectors_read: u64,
    /// Sectors written.
    pub sectors_written: u64,
    /// Requests answered with a status other than OK, or chains returned unanswered.
    pub errors: u64,
    /// Used-buffer interrupts raised.
    pub interrupts: u64,
    /// Interrupts the driver acknowledged (InterruptACK writes with the bit set).
    pub acks: u64,
    /// Flushes of the image (requests and pauses).
    pub flushes: u64,
}

/// What a register write asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEffect {
    /// Nothing more.
    None,
    /// The driver notified queue 0: process it (the software vCPU does it at once; a KVM
    /// guest's notification never gets here, it goes to the ioeventfd).
    Notify,
}

/// The virtio-blk device and its virtio-mmio transport.
pub struct BlkDevice {
    mem: Arc<GuestMemory>,
    disk: DiskImage,
    queue: Queue,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    queue_sel: u32,
    /// The driver's last QueueNum was not a size the queue can have.
    bad_queue_size: bool,
    irq: Option<EventFd>,
    paused: bool,
    stats: BlkStats,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("disk", &self.disk.path)
            .field("sectors", &self.disk.sectors)
            .field("status", &self.status)
            .field("paused", &self.paused)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

impl BlkDevice {
    /// A device in its reset state over `disk`, reading and writing guest RAM `mem`,
    /// raising its interrupt on `irq` (an irqfd) or, without one, only counting it. It
    /// starts paused, as the VM does.
    pub fn new(mem: Arc<GuestMemory>, disk: DiskImage, irq: Option<EventFd>) -> BlkDevice {
        BlkDevice {
            mem,
            disk,
            // QUEUE_MAX_SIZE is a power of two below the spec's maximum: cannot fail.
            queue: Queue::new(QUEUE_MAX_SIZE).unwrap_or_default(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            queue_sel: 0,
            bad_queue_size: false,
            irq,
            paused: true,
            stats: BlkStats::default(),
        }
    }

    /// The image.
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// What the device did so far.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Is the device live: the driver said DRIVER_OK and the queue is ready?
    fn activated(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
            && self.queue.ready()
    }

    /// The config space (section 5.2.4) as bytes: capacity, then the discard and
    /// write-zeroes limits; every other field is 0 (its feature is not offered).
    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        // max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = 1;
        c
    }

    /// A read of `data.len()` bytes at `offset` in the MMIO window. Registers are 32-bit
    /// (other widths read as zero, as the transport defines no such access); the config
    /// space is read at any width.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            let cfg = self.config();
            let start = offset - u64::from(reg::VIRTIO_MMIO_CONFIG);
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(v) = usize::try_from(start + i as u64)
                    .ok()
                    .and_then(|at| cfg.get(at))
                {
                    *b = *v;
                }
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: read of a width registers do not have"
            );
            return;
        }
        let q0 = self.queue_sel == 0;
        let v: u32 = match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => lo(DEVICE_FEATURES),
                1 => hi(DEVICE_FEATURES),
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX if q0 => u32::from(self.queue.max_size()),
            reg::VIRTIO_MMIO_QUEUE_READY if q0 => u32::from(self.queue.ready()),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // Write-only registers, a queue that does not exist, offsets with no register.
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A write of `data` at `offset` in the MMIO window. Writes the transport forbids at
    /// this point (queue setup on a ready queue, features after FEATURES_OK, widths other
    /// than 32 bits, the read-only config space) are ignored.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> WriteEffect {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: write of a width registers do not have"
            );
            return WriteEffect::None;
        };
        if offset % 4 != 0 || offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            return WriteEffect::None;
        }
        let v = u32::from_le_bytes(bytes);
        // Queue registers apply to queue 0 only, and only while it is not ready.
        let q_setup = self.queue_sel == 0 && !self.queue.ready();
        let features_open = self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
            && self.status & VIRTIO_CONFIG_S_DRIVER != 0;
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES if features_open => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            reg::VIRTIO_MMIO_QUEUE_NUM if q_setup => {
                // A size that is not a power of two up to the maximum leaves the queue
                // unable to become ready until the driver writes a good one.
                self.bad_queue_size = u16::try_from(v)
                    .map_err(|_| ())
                    .and_then(|n| self.queue.try_set_size(n).map_err(|_| ()))
                    .is_err();
            }
            reg::VIRTIO_MMIO_QUEUE_READY if self.queue_sel == 0 => {
                if v == 1 && !self.queue.ready() {
                    self.queue.set_ready(true);
                    if self.bad_queue_size || !self.queue.is_valid(&*self.mem) {
                        tracing::warn!("virtio-blk: the driver made an invalid queue ready");
                        self.queue.set_ready(false);
                    }
                } else if v == 0 {
                    self.queue.set_ready(false);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW if q_setup => {
                self.queue.set_desc_table_address(Some(v), None)
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH if q_setup => {
                self.queue.set_desc_table_address(None, Some(v))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW if q_setup => {
                self.queue.set_avail_ring_address(Some(v), None)
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH if q_setup => {
                self.queue.set_avail_ring_address(None, Some(v))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW if q_setup => {
                self.queue.set_used_ring_address(Some(v), None)
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH if q_setup => {
                self.queue.set_used_ring_address(None, Some(v))
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                return if v == 0 && self.activated() {
                    WriteEffect::Notify
                } else {
                    WriteEffect::None
                };
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => {
                if self.interrupt_status & v & reg::VIRTIO_MMIO_INT_VRING != 0 {
                    self.stats.acks += 1;
                }
                self.interrupt_status &= !v;
            }
            reg::VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => tracing::debug!(offset, v, "virtio-mmio: write ignored"),
        }
        WriteEffect::None
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED;
        // The driver sets bits one step at a time and never clears one (but by a reset).
        if v & !known != 0 || v & self.status != self.status {
            tracing::debug!(
                from = self.status,
                to = v,
                "virtio-blk: status change refused"
            );
            return;
        }
        let mut v = v;
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            // Accepted only for features the device offers, modern virtio among them; the
            // driver reads the status back to learn whether they were.
            let ok = self.driver_features & !DEVICE_FEATURES == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            v &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = v;
    }

    fn reset(&mut self) {
        self.queue.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.queue_sel = 0;
        self.bad_queue_size = false;
    }

    /// Takes one available request, executes it, publishes it in the used ring and raises
    /// the interrupt. `false` when there was none to take (or the device is paused or not
    /// live).
    pub fn process_one(&mut self) -> bool {
        if self.paused || !self.activated() {
            return false;
        }
        let mem = self.mem.clone();
        let Some(chain) = self.queue.pop_descriptor_chain(&*mem) else {
            return false;
        };
        let head = chain.head_index();
        let done = request::execute(&self.disk, &mem, chain);
        self.stats.requests += 1;
        self.stats.sectors_read += done.sectors_read;
        self.stats.sectors_written += done.sectors_written;
        if done.status != Some(request::Status::Ok) {
            self.stats.errors += 1;
        }
        if done.flushed {
            self.stats.flushes += 1;
        }
        // The interrupt status is set before the used ring moves, so that a driver that
        // polls the ring and then reads InterruptStatus always finds the bit it must ack.
        self.interrupt_status |= reg::VIRTIO_MMIO_INT_VRING;
        if let Err(e) = self.queue.add_used(&*mem, head, done.used_len) {
            // The ring's addresses were checked when it was made ready; RAM cannot shrink.
            tracing::error!(%e, head, "virtio-blk: publishing a used buffer failed");
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            return false;
        }
        self.stats.interrupts += 1;
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.write(1) {
                tracing::error!(%e, "virtio-blk: signalling the irqfd failed");
            }
        }
        true
    }

    /// Processes every available request.
    pub fn process_all(&mut self) -> usize {
        let mut n = 0;
        while self.process_one() {
            n += 1;
        }
        n
    }

    /// Stops taking requests (the one being processed, if any, finished before the lock
    /// on the device could be taken) and flushes the image, so that what the guest wrote
    /// is on disk before the state is saved or another process opens the image.
    pub fn pause(&mut self) -> Result<(), DiskError> {
        self.paused = true;
        self.stats.flushes += 1;
        self.disk.flush()
    }

    /// Takes requests again. The caller then processes the queue (or wakes the device
    /// thread), for the requests made available while paused or before a migration.
    pub fn resume(&mut self) {
        self.paused = false;
    }

    /// Is the device paused?
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The state to migrate. Meaningful while paused.
    pub fn save(&self) -> BlkState {
        let q = self.queue.state();
        BlkState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            driver_features: self.driver_features,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            capacity: self.disk.sectors,
            queue: q,
        }
    }

    /// Takes `s` (checked against this device: capacity, features, queue) as its state.
    pub fn load(&mut self, s: &BlkState) -> Result<(), state::BlkStateError> {
        let queue = s.validate(self.disk.sectors, &self.mem)?;
        self.queue = queue;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.driver_features = s.driver_features;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
