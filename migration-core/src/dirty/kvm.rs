//! Pages the guest wrote, from KVM's dirty log.
//!
//! KVM keeps one bit per 4 KiB page of every memory slot registered with
//! `KVM_MEM_LOG_DIRTY_PAGES`, set when the guest writes the page through its page tables
//! (KVM write-protects the page, or uses PML or the D bits of its page tables, and marks the
//! bit on the first write). There are two ways to collect it:
//!
//! - **Get-clears** (every KVM): `KVM_GET_DIRTY_LOG` swaps each word of the slot's log with
//!   zero, write-protects the pages it found dirty again, and copies the words out. One ioctl
//!   per slot; the write-protection of everything found dirty happens inside it, under
//!   KVM's MMU lock, which stalls vCPUs for the whole slot at once on big guests.
//! - **Manual protect** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, Linux 5.3+): once enabled on
//!   the VM, `KVM_GET_DIRTY_LOG` only copies the log; `KVM_CLEAR_DIRTY_LOG` then clears
//!   exactly the bits handed to it and write-protects those pages. This is how QEMU
//!   (`kvm_physical_sync_dirty_bitmap`, `kvm_log_clear_one_slot`) spreads the cost. A write
//!   racing the sync is never lost: a page clean at GET that is written before CLEAR keeps
//!   its bit (CLEAR only clears bits it is given), and a page dirty at GET that is written
//!   again before CLEAR was still writable, so that write is in memory before the sync
//!   returns and the caller's copy of the page, made after the sync, includes it.
//!
//! Both modes reuse one buffer per slot across syncs, so a sync allocates nothing.

use std::borrow::Borrow;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES, kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::{DirtyTracker, TrackerError, check_len};
use crate::bitmap::{DirtyBitmap, words_for};
use crate::layout::RamLayout;

const BACKEND: &str = "kvm-dirty-log";

/// KVM's dirty log counts 4 KiB pages on x86-64, whatever the host maps.
const KVM_PAGE_SIZE: u64 = 4096;

/// The ioctls kvm-ioctls does not wrap in a form we can use: its `get_dirty_log` allocates
/// a vector per call, and it has no `KVM_CLEAR_DIRTY_LOG` at all.
mod ioctls {
    use kvm_bindings::{KVMIO, kvm_clear_dirty_log, kvm_dirty_log};
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}

/// How the dirty log is read and cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvmDirtyLogMode {
    /// Manual protect where the kernel offers it, else get-clears.
    #[default]
    Auto,
    /// `KVM_GET_DIRTY_LOG` reads and clears in one ioctl.
    GetClears,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: `KVM_GET_DIRTY_LOG` reads, then
    /// `KVM_CLEAR_DIRTY_LOG` clears exactly what was read.
    ManualProtect,
}

impl KvmDirtyLogMode {
    /// The name used in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            KvmDirtyLogMode::Auto => "auto",
            KvmDirtyLogMode::GetClears => "get-clears",
            KvmDirtyLogMode::ManualProtect => "manual-protect",
        }
    }
}

struct Slot {
    /// The slot exactly as the VMM registered it; restored by `stop`.
    region: kvm_userspace_memory_region,
    first_page: usize,
    pages: usize,
    /// The slot's log, reused by every sync.
    log: Vec<u64>,
}

impl Slot {
    fn pages_range(&self) -> Range<usize> {
        self.first_page..self.first_page + self.pages
    }

    fn err(&self, op: &'static str, source: io::Error) -> TrackerError {
        TrackerError::Slot {
            backend: BACKEND,
            op,
            slot: self.region.slot,
            guest_base: self.region.guest_phys_addr,
            size: self.region.memory_size,
            pages: self.pages_range(),
            source,
        }
    }
}

fn os_err(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// Whether the VM offers `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub fn manual_protect_supported(vm: &VmFd) -> bool {
    let options = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    options > 0 && (options as u32) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
}

/// Reports the pages a KVM guest wrote, from KVM's dirty log of its memory slots.
///
/// `V` is how the tracker holds the VM: `Arc<VmFd>` (the default) for a tracker that lives on
/// its own, or `&VmFd` for one that borrows it.
pub struct KvmDirtyLog<V: Borrow<VmFd> = Arc<VmFd>> {
    vm: V,
    slots: Vec<Slot>,
    pages: usize,
    requested: KvmDirtyLogMode,
    /// The mode in effect while started.
    active: Option<KvmDirtyLogMode>,
}

impl<V: Borrow<VmFd>> KvmDirtyLog<V> {
    /// A tracker for the memory slots `slots` of `vm`, reporting in the page indices of
    /// `layout` (whose page size must be 4 KiB, KVM's).
    ///
    /// Every slot must lie within one region of `layout`; slots need not start on a 64-page
    /// boundary of the global numbering.
    ///
    /// # Safety
    ///
    /// `start` and `stop` register the slots again with KVM (changing only
    /// `KVM_MEM_LOG_DIRTY_PAGES`), so each element of `slots` must be exactly what the VMM
    /// registered with `KVM_SET_USER_MEMORY_REGION`: same slot, guest address, size and
    /// userspace address, with that host memory mapped for as long as the VM may run. The
    /// VMM must not change those slots while the tracker lives.
    pub unsafe fn new(
        vm: V,
        layout: &RamLayout,
        slots: &[kvm_userspace_memory_region],
        mode: KvmDirtyLogMode,
    ) -> Result<Self, TrackerError> {
        let config = |what: String| TrackerError::Config {
            backend: BACKEND,
            what,
        };
        if layout.page_size() != KVM_PAGE_SIZE {
            return Err(config(format!(
                "the RAM layout counts {}-byte pages; KVM's dirty log counts {KVM_PAGE_SIZE}-byte pages",
                layout.page_size()
            )));
        }
        let mut tracked: Vec<Slot> = Vec::with_capacity(slots.len());
        for r in slots {
            let what = |s: &str| {
                config(format!(
                    "memory slot {} at guest {:#x} ({:#x} bytes) {s}",
                    r.slot, r.guest_phys_addr, r.memory_size
                ))
            };
            if r.memory_size == 0
                || r.memory_size % KVM_PAGE_SIZE != 0
                || r.guest_phys_addr % KVM_PAGE_SIZE != 0
            {
                return Err(what("is empty or not aligned to 4 KiB pages"));
            }
            let pages = r.memory_size / KVM_PAGE_SIZE;
            if pages > u64::from(u32::MAX) {
                return Err(what("has more pages than KVM_CLEAR_DIRTY_LOG can address"));
            }
            let pages = pages as usize;
            let first_page = layout
                .gpa_to_page(r.guest_phys_addr)
                .ok_or_else(|| what("is not RAM of the layout"))?;
            let region_end = layout
                .region_of_page(first_page)
                .map(|reg| reg.page_range(KVM_PAGE_SIZE).end)
                .unwrap_or(first_page);
            if first_page + pages > region_end {
                return Err(what("runs past the end of its RAM region in the layout"));
            }
            let range = first_page..first_page + pages;
            if let Some(other) = tracked
                .iter()
                .find(|s| s.first_page < range.end && range.start < s.first_page + s.pages)
            {
                return Err(what(&format!(
                    "overlaps memory slot {} in the layout's pages",
                    other.region.slot
                )));
            }
            tracked.push(Slot {
                region: *r,
                first_page,
                pages,
                log: vec![0; words_for(pages)],
            });
        }
        Ok(KvmDirtyLog {
            vm,
            slots: tracked,
            pages: layout.page_count(),
            requested: mode,
            active: None,
        })
    }

    /// The mode in effect, once started.
    pub fn mode(&self) -> Option<KvmDirtyLogMode> {
        self.active
    }

    fn vm(&self) -> &VmFd {
        self.vm.borrow()
    }

    fn set_manual_protect(&self, on: bool) -> Result<(), TrackerError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = if on {
            KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into()
        } else {
            0
        };
        self.vm().enable_cap(&cap).map_err(|e| TrackerError::Os {
            backend: BACKEND,
            op: if on {
                "enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"
            } else {
                "disabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"
            },
            source: os_err(e),
        })
    }

    fn register(&self, slot: &Slot, flags: u32) -> Result<(), TrackerError> {
        let region = kvm_userspace_memory_region {
            flags,
            ..slot.region
        };
        // SAFETY: the caller of `new` promised that `slot.region` is the slot as the VMM
        // registered it, backed by host memory that stays mapped while the VM may run; only
        // the dirty-logging flag differs, which changes no mapping.
        unsafe { self.vm().set_user_memory_region(region) }
            .map_err(|e| slot.err("KVM_SET_USER_MEMORY_REGION", os_err(e)))
    }

    /// Copies slot `i`'s log into its buffer; clears what it found when `manual`.
    /// Returns whether any page was dirty.
    fn fetch(vm: &VmFd, slot: &mut Slot, manual: bool) -> Result<bool, TrackerError> {
        let log = kvm_dirty_log {
            slot: slot.region.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: slot.log.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `vm` is a VM fd; KVM writes ALIGN(npages, 64) / 8 bytes for this slot, and
        // the buffer holds words_for(npages) u64 words, exactly that, and is not otherwise
        // borrowed during the call.
        let ret = unsafe { ioctl_with_ref(vm, ioctls::KVM_GET_DIRTY_LOG(), &log) };
        if ret < 0 {
            return Err(slot.err("KVM_GET_DIRTY_LOG", io::Error::last_os_error()));
        }
        let Some(first) = slot.log.iter().position(|&w| w != 0) else {
            return Ok(false);
        };
        if manual {
            let last = slot.log.iter().rposition(|&w| w != 0).unwrap_or(first);
            // KVM wants first_page on a 64-page boundary and num_pages a multiple of 64
            // unless the range reaches the end of the slot.
            let first_page = first * 64;
            let end_page = ((last + 1) * 64).min(slot.pages);
            let clear = kvm_clear_dirty_log {
                slot: slot.region.slot,
                num_pages: (end_page - first_page) as u32,
                first_page: first_page as u64,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: slot.log[first..].as_mut_ptr().cast(),
                },
            };
            // SAFETY: `vm` is a VM fd; KVM reads ALIGN(num_pages, 64) / 8 bytes from the
            // pointer, which lie within `slot.log[first..=last]`, and writes nothing.
            let ret = unsafe { ioctl_with_ref(vm, ioctls::KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret < 0 {
                return Err(slot.err("KVM_CLEAR_DIRTY_LOG", io::Error::last_os_error()));
            }
        }
        Ok(true)
    }

    fn start_inner(&mut self) -> Result<KvmDirtyLogMode, TrackerError> {
        let supported = manual_protect_supported(self.vm());
        let mode = match self.requested {
            KvmDirtyLogMode::Auto if supported => KvmDirtyLogMode::ManualProtect,
            KvmDirtyLogMode::Auto => KvmDirtyLogMode::GetClears,
            KvmDirtyLogMode::ManualProtect if !supported => {
                return Err(TrackerError::Unsupported {
                    backend: BACKEND,
                    feature: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                    hint: "use KvmDirtyLogMode::GetClears or Auto",
                });
            }
            m => m,
        };
        let manual = mode == KvmDirtyLogMode::ManualProtect;
        // Set the VM-wide switch either way: a tracker before us may have left it on, and
        // then KVM_GET_DIRTY_LOG would never clear.
        if supported {
            self.set_manual_protect(manual)?;
        }
        for i in 0..self.slots.len() {
            let flags = self.slots[i].region.flags | KVM_MEM_LOG_DIRTY_PAGES;
            if let Err(e) = self.register(&self.slots[i], flags) {
                self.unwind(i, manual);
                return Err(e);
            }
        }
        // A slot that already logged (the VMM enabled it itself) has bits from before
        // `start`; a freshly enabled one has none. Reading once makes both start clean.
        let vm = self.vm.borrow();
        for slot in &mut self.slots {
            if let Err(e) = Self::fetch(vm, slot, manual) {
                self.unwind(self.slots.len(), manual);
                return Err(e);
            }
        }
        Ok(mode)
    }

    /// Registers every slot as the VMM had it and turns manual protection off again;
    /// goes through all of it even if a step fails, and reports the first failure.
    fn restore(&self, mode: KvmDirtyLogMode) -> Result<(), TrackerError> {
        let mut first = None;
        for slot in &self.slots {
            if let Err(e) = self.register(slot, slot.region.flags) {
                first.get_or_insert(e);
            }
        }
        if mode == KvmDirtyLogMode::ManualProtect {
            if let Err(e) = self.set_manual_protect(false) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Restores the first `n` slots and the VM-wide switch after a failed start.
    fn unwind(&self, n: usize, manual: bool) {
        for slot in &self.slots[..n] {
            if let Err(e) = self.register(slot, slot.region.flags) {
                tracing::warn!(error = %e, "restoring a memory slot after a failed start");
            }
        }
        if manual {
            if let Err(e) = self.set_manual_protect(false) {
                tracing::warn!(error = %e, "after a failed start");
            }
        }
    }
}

impl<V: Borrow<VmFd> + Send> DirtyTracker for KvmDirtyLog<V> {
    fn name(&self) -> &str {
        BACKEND
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        if self.active.is_some() {
            self.stop()?;
        }
        let mode = self.start_inner()?;
        tracing::debug!(
            mode = mode.as_str(),
            slots = self.slots.len(),
            "KVM dirty log started"
        );
        self.active = Some(mode);
        Ok(())
    }

    fn sync_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), TrackerError> {
        check_len(BACKEND, self.pages, into)?;
        let manual = match self.active {
            None => return Err(TrackerError::NotStarted { backend: BACKEND }),
            Some(m) => m == KvmDirtyLogMode::ManualProtect,
        };
        let vm = self.vm.borrow();
        for slot in &mut self.slots {
            if Self::fetch(vm, slot, manual)? {
                into.or_bits_at(slot.first_page, &slot.log, slot.pages);
            }
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        match self.active.take() {
            None => Ok(()),
            Some(mode) => self.restore(mode),
        }
    }
}

impl<V: Borrow<VmFd>> Drop for KvmDirtyLog<V> {
    fn drop(&mut self) {
        if let Some(mode) = self.active.take() {
            if let Err(e) = self.restore(mode) {
                tracing::warn!(error = %e, "stopping the KVM dirty log on drop");
            }
        }
    }
}
