//! Writes to anonymous private memory, caught by userfaultfd write protection; no KVM needed.
//!
//! When no hypervisor keeps a dirty log (a software vCPU thread runs the guest, or the
//! memory is written by ordinary host threads), the kernel's page tables are the only
//! witness of a write. Soft-dirty bits would do, but many kernels (this project's CI among
//! them) are built without them. userfaultfd write protection is there since Linux 5.7 for
//! anonymous memory, in two forms:
//!
//! - **Asynchronous** ([`UffdWpMode::Async`], Linux 6.7+): the uffd is created with
//!   `UFFD_FEATURE_WP_ASYNC`, so a write to a protected page does not stop the writer: the
//!   kernel lifts the protection itself and the page table entry loses its uffd-wp bit. A
//!   sync is one `PAGEMAP_SCAN` ioctl per range on `/proc/self/pagemap`, asking for the pages
//!   whose bit is gone (`PAGE_IS_WRITTEN`) and, in the same walk under the page-table lock,
//!   protecting them again (`PM_SCAN_WP_MATCHING`). Writers never wait.
//! - **Synchronous** ([`UffdWpMode::Sync`], Linux 5.7+): a write to a protected page blocks
//!   the writer and queues a fault message. A handler thread records the page, lifts the
//!   protection of that page and wakes the writer. A sync protects again the pages recorded
//!   since the previous one and takes the record. The handler records and unprotects under
//!   the same lock that the sync holds while it protects and takes the record, so a page
//!   the handler unprotects is always in the record of a sync that protects it again later:
//!   without that lock a fault raised before a sync but handled after its protection would
//!   leave the page writable and unrecorded until the sync after next, and writes to it in
//!   between would be lost.
//!
//! Pages that were never touched have no page-table entry to carry the protection bit;
//! `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4+) protects them anyway with PTE markers. Without
//! it, the tracker maps them first (`MADV_POPULATE_READ`, which maps the shared zero page and
//! allocates nothing), so that a first write still faults.
//!
//! The memory must be anonymous private memory (what `GuestMemoryMmap::from_ranges` maps),
//! registered with no other userfaultfd. Transparent huge pages are split by the kernel on
//! the first write to a protected one, so writes are still seen page by page.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use libc::{c_int, c_void};
use userfaultfd::{Event, EventBuffer, FaultKind, RegisterMode, Uffd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{DirtyTracker, TrackerError, check_len};
use crate::bitmap::DirtyBitmap;
use crate::layout::RamLayout;
use crate::pagemap::{
    PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, PageRegion, ScanQuery,
    open_pagemap, scan,
};

const BACKEND: &str = "uffd-wp";

// From include/uapi/linux/userfaultfd.h; the userfaultfd crate predates the last three.
const UFFD_API: u64 = 0xaa;
const UFFD_USER_MODE_ONLY: c_int = 1;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

const UFFDIO: u32 = 0xaa;
const UFFDIO_API: libc::Ioctl = libc::_IOWR::<UffdioApi>(UFFDIO, 0x3f);
/// `/dev/userfaultfd`'s only ioctl: a new userfaultfd, with the flags of userfaultfd(2).
const USERFAULTFD_IOC_NEW: libc::Ioctl = libc::_IO(UFFDIO, 0x00);

/// Dirty runs closer than this (in layout pages) are protected again by one ioctl.
const COALESCE_GAP_PAGES: usize = 8;

fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 { ps as usize } else { 4096 }
}

fn uffd_io(e: userfaultfd::Error) -> io::Error {
    match e {
        userfaultfd::Error::SystemError(errno) => io::Error::from_raw_os_error(errno as i32),
        other => io::Error::other(other.to_string()),
    }
}

/// What the kernel's userfaultfd offers, from `UFFDIO_API`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdFeatures {
    /// The raw `UFFD_FEATURE_*` bits.
    pub bits: u64,
    /// Whether the userfaultfd could handle faults raised by the kernel itself (a `read(2)`
    /// into protected memory), which needs `CAP_SYS_PTRACE`, access to `/dev/userfaultfd`
    /// or `vm.unprivileged_userfaultfd`. Without it, such a syscall fails with `EFAULT` in
    /// synchronous mode.
    pub kernel_faults: bool,
}

impl UffdFeatures {
    /// Asks the kernel.
    pub fn probe() -> io::Result<Self> {
        let (fd, user_mode_only) = open_uffd(libc::O_CLOEXEC)?;
        let api = uffd_api(&fd, 0)?;
        Ok(UffdFeatures {
            bits: api.features,
            kernel_faults: !user_mode_only,
        })
    }

    /// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7): write faults resolved by the kernel, written
    /// pages found with `PAGEMAP_SCAN`.
    pub fn wp_async(&self) -> bool {
        self.bits & UFFD_FEATURE_WP_ASYNC != 0
    }

    /// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): never-touched pages can be protected.
    pub fn wp_unpopulated(&self) -> bool {
        self.bits & UFFD_FEATURE_WP_UNPOPULATED != 0
    }

    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP` (Linux 5.7): write protection of anonymous memory.
    pub fn wp(&self) -> bool {
        self.bits & UFFD_FEATURE_PAGEFAULT_FLAG_WP != 0
    }
}

/// A new userfaultfd, able to handle kernel-mode faults where the process may. Returns it
/// and whether it had to fall back to user-mode-only.
fn open_uffd(flags: c_int) -> io::Result<(OwnedFd, bool)> {
    // /dev/userfaultfd (Linux 6.1) grants kernel-mode faults to whoever may open it, with no
    // capability; fall back to the syscall when it is missing or closed to us.
    if let Ok(dev) = File::options()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        // SAFETY: USERFAULTFD_IOC_NEW takes an int argument and returns a new fd or -1.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if fd >= 0 {
            // SAFETY: the kernel just gave us this fd and nothing else owns it.
            return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, false));
        }
    }
    for (extra, user_mode_only) in [(0, false), (UFFD_USER_MODE_ONLY, true)] {
        // SAFETY: userfaultfd(2) takes a flags int and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | extra) };
        if fd >= 0 {
            // SAFETY: as above, a fresh fd we own.
            return Ok((unsafe { OwnedFd::from_raw_fd(fd as RawFd) }, user_mode_only));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EPERM) || user_mode_only {
            return Err(err);
        }
    }
    unreachable!("the loop returns on its last iteration")
}

fn uffd_api(fd: &OwnedFd, features: u64) -> io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api, which `api` is.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(api)
}

/// Which form of write protection to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UffdWpMode {
    /// Asynchronous where the kernel offers `UFFD_FEATURE_WP_ASYNC`, else synchronous.
    #[default]
    Auto,
    /// `UFFD_FEATURE_WP_ASYNC` with `PAGEMAP_SCAN`: writers never stop.
    Async,
    /// Write-protect faults answered by a handler thread.
    Sync,
}

impl UffdWpMode {
    /// The name used in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            UffdWpMode::Auto => "auto",
            UffdWpMode::Async => "async",
            UffdWpMode::Sync => "sync",
        }
    }
}

/// How a [`UffdWpTracker`] works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdWpConfig {
    /// Asynchronous or synchronous write protection.
    pub mode: UffdWpMode,
    /// Protect never-touched pages with `UFFD_FEATURE_WP_UNPOPULATED` where the kernel offers
    /// it (true), or map them first with `MADV_POPULATE_READ` (false, the default, and what
    /// happens anyway on kernels before 6.4). The default because of
    /// [`populated_pages`](crate::pagemap::populated_pages): a PTE marker looks like a
    /// swapped-out page to `PAGEMAP_SCAN`, so with markers every untouched page counts as
    /// holding data and a migration reads all of them, where the shared zero page that
    /// `MADV_POPULATE_READ` maps is told apart. Measured: an idle 256 MiB software guest
    /// migrates in 16-19 ms this way, 55-60 ms with markers.
    pub wp_unpopulated: bool,
    /// Entries of the `PAGEMAP_SCAN` output buffer (24 bytes each), allocated at start. A
    /// scan that fills it continues where it stopped, so this bounds memory, not results.
    pub scan_buffer: usize,
}

impl Default for UffdWpConfig {
    fn default() -> Self {
        UffdWpConfig {
            mode: UffdWpMode::Auto,
            wp_unpopulated: false,
            scan_buffer: 4096,
        }
    }
}

/// A range of host memory and the global page index of its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// Host virtual address, aligned to the host page size.
    pub host_addr: usize,
    /// Length in bytes, a multiple of the layout's page size.
    pub len: usize,
    /// Global index of the page at `host_addr`.
    pub first_page: usize,
}

impl HostRange {
    fn end(&self) -> usize {
        self.host_addr + self.len
    }

    fn pages(&self, page_size: usize) -> Range<usize> {
        self.first_page..self.first_page + self.len / page_size
    }

    fn err(&self, page_size: usize, op: &'static str, source: io::Error) -> TrackerError {
        TrackerError::Range {
            backend: BACKEND,
            op,
            host: self.host_addr as u64,
            len: self.len as u64,
            pages: self.pages(page_size),
            source,
        }
    }
}

/// Reports every write to a set of anonymous private host mappings (guest RAM run by a
/// software vCPU, or written by any thread of this process), using userfaultfd write
/// protection.
///
/// The tracker never reads or writes the memory itself; it only asks the kernel to protect
/// and scan it. The mappings must stay mapped while the tracker is started: unmapping them
/// drops the registration and later syncs fail or miss writes.
pub struct UffdWpTracker {
    /// Sorted by host address.
    ranges: Arc<[HostRange]>,
    pages: usize,
    page_size: usize,
    config: UffdWpConfig,
    active: Option<Active>,
}

enum Active {
    Async(AsyncState),
    Sync(SyncState),
}

struct AsyncState {
    uffd: Uffd,
    pagemap: File,
    out: Vec<PageRegion>,
}

struct SyncState {
    shared: Arc<SyncShared>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

struct SyncShared {
    uffd: Uffd,
    ranges: Arc<[HostRange]>,
    page_size: usize,
    host_page: usize,
    record: Mutex<Record>,
}

struct Record {
    /// Pages unprotected by the handler since the last sync.
    pages: DirtyBitmap,
    /// The first thing that went wrong in the handler thread, until a sync reports it.
    error: Option<TrackerError>,
    /// The handler thread gave up: nothing is tracked any more.
    dead: bool,
}

impl UffdWpTracker {
    /// A tracker for `ranges` of host memory, reporting in the page indices of `layout`.
    ///
    /// Ranges must be aligned to the host page size, a whole number of the layout's pages,
    /// within the layout's page count, and overlap neither in memory nor in page indices.
    pub fn new(
        layout: &RamLayout,
        ranges: &[HostRange],
        config: UffdWpConfig,
    ) -> Result<Self, TrackerError> {
        let host_page = host_page_size();
        let page_size = layout.page_size() as usize;
        let config_err = |what: String| TrackerError::Config {
            backend: BACKEND,
            what,
        };
        if page_size % host_page != 0 {
            return Err(config_err(format!(
                "the RAM layout's {page_size}-byte pages are not a multiple of the {host_page}-byte host page"
            )));
        }
        if config.scan_buffer == 0 {
            return Err(config_err(
                "scan_buffer must hold at least one region".into(),
            ));
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.host_addr);
        for (i, r) in sorted.iter().enumerate() {
            let what = |s: String| {
                config_err(format!(
                    "host range {:#x} ({:#x} bytes, first page {}) {s}",
                    r.host_addr, r.len, r.first_page
                ))
            };
            if r.len == 0 || r.host_addr % host_page != 0 || r.len % page_size != 0 {
                return Err(what(format!(
                    "is empty or not aligned to the {host_page}-byte host page and {page_size}-byte layout page"
                )));
            }
            if r.host_addr.checked_add(r.len).is_none() {
                return Err(what("wraps the address space".into()));
            }
            if r.first_page + r.len / page_size > layout.page_count() {
                return Err(what(format!(
                    "reaches past the layout's {} pages",
                    layout.page_count()
                )));
            }
            if let Some(prev) = i.checked_sub(1).map(|j| &sorted[j]) {
                if prev.end() > r.host_addr {
                    return Err(what(format!("overlaps host range {:#x}", prev.host_addr)));
                }
            }
            let pages = r.pages(page_size);
            if let Some(other) = sorted[..i].iter().find(|o| {
                let op = o.pages(page_size);
                op.start < pages.end && pages.start < op.end
            }) {
                return Err(what(format!(
                    "shares page indices with host range {:#x}",
                    other.host_addr
                )));
            }
        }
        Ok(UffdWpTracker {
            ranges: sorted.into(),
            pages: layout.page_count(),
            page_size,
            config,
            active: None,
        })
    }

    /// A tracker for every region of `mem` (anonymous private mappings, such as those of
    /// `GuestMemoryMmap::from_ranges`), reporting in the page indices of `layout`.
    pub fn for_memory<M: GuestMemoryBackend>(
        mem: &M,
        layout: &RamLayout,
        config: UffdWpConfig,
    ) -> Result<Self, TrackerError> {
        let mut ranges = Vec::with_capacity(mem.num_regions());
        for region in mem.iter() {
            let base = region.start_addr();
            let what = |s: &str| TrackerError::Config {
                backend: BACKEND,
                what: format!(
                    "guest memory region at {:#x} ({:#x} bytes) {s}",
                    base.0,
                    region.len()
                ),
            };
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| what("has no host mapping"))?;
            let first_page = layout
                .gpa_to_page(base.0)
                .ok_or_else(|| what("is not RAM of the layout"))?;
            ranges.push(HostRange {
                host_addr: host as usize,
                len: usize::try_from(region.len()).map_err(|_| what("is too large"))?,
                first_page,
            });
        }
        Self::new(layout, &ranges, config)
    }

    /// The form in effect, once started ([`UffdWpMode::Async`] or [`UffdWpMode::Sync`]).
    pub fn mode(&self) -> Option<UffdWpMode> {
        match self.active {
            Some(Active::Async(_)) => Some(UffdWpMode::Async),
            Some(Active::Sync(_)) => Some(UffdWpMode::Sync),
            None => None,
        }
    }

    /// The host ranges tracked, sorted by address.
    pub fn ranges(&self) -> &[HostRange] {
        &self.ranges
    }

    fn start_inner(&mut self) -> Result<Active, TrackerError> {
        let os = |op: &'static str| {
            move |source: io::Error| TrackerError::Os {
                backend: BACKEND,
                op,
                source,
            }
        };
        let offered = UffdFeatures::probe().map_err(os("creating a userfaultfd"))?;
        if !offered.wp() {
            return Err(TrackerError::Unsupported {
                backend: BACKEND,
                feature: "UFFD_FEATURE_PAGEFAULT_FLAG_WP",
                hint: "write protection of anonymous memory needs Linux 5.7 or later",
            });
        }
        let async_mode = match self.config.mode {
            UffdWpMode::Auto => offered.wp_async(),
            UffdWpMode::Async if !offered.wp_async() => {
                return Err(TrackerError::Unsupported {
                    backend: BACKEND,
                    feature: "UFFD_FEATURE_WP_ASYNC",
                    hint: "it needs Linux 6.7; use UffdWpMode::Sync or Auto",
                });
            }
            UffdWpMode::Async => true,
            UffdWpMode::Sync => false,
        };
        let unpopulated = self.config.wp_unpopulated && offered.wp_unpopulated();
        let mut features = 0;
        if async_mode {
            features |= UFFD_FEATURE_WP_ASYNC;
        }
        if unpopulated {
            features |= UFFD_FEATURE_WP_UNPOPULATED;
        }
        // Only the synchronous form blocks; its handler polls.
        let flags = libc::O_CLOEXEC | if async_mode { 0 } else { libc::O_NONBLOCK };
        let (fd, user_mode_only) = open_uffd(flags).map_err(os("creating a userfaultfd"))?;
        if user_mode_only && !async_mode {
            tracing::warn!(
                "userfaultfd is user-mode only: a syscall writing into tracked memory will fail with EFAULT"
            );
        }
        uffd_api(&fd, features).map_err(os("UFFDIO_API"))?;
        // SAFETY: `fd` is a userfaultfd that has completed its API handshake; Uffd takes over
        // closing it.
        let uffd = unsafe { Uffd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };

        let ps = self.page_size;
        for r in self.ranges.iter() {
            if !unpopulated {
                // SAFETY: MADV_POPULATE_READ only maps pages (the zero page where nothing was
                // written) and changes no content; the range is the caller's mapping.
                let ret = unsafe {
                    libc::madvise(r.host_addr as *mut c_void, r.len, libc::MADV_POPULATE_READ)
                };
                if ret < 0 {
                    return Err(r.err(
                        ps,
                        "madvise(MADV_POPULATE_READ)",
                        io::Error::last_os_error(),
                    ));
                }
            }
            uffd.register_with_mode(
                r.host_addr as *mut c_void,
                r.len,
                RegisterMode::WRITE_PROTECT,
            )
            .map_err(|e| r.err(ps, "UFFDIO_REGISTER (write-protect mode)", uffd_io(e)))?;
        }

        let active = if async_mode {
            let pagemap = open_pagemap().map_err(os("opening /proc/self/pagemap"))?;
            Active::Async(AsyncState {
                uffd,
                pagemap,
                out: vec![PageRegion::default(); self.config.scan_buffer],
            })
        } else {
            // SAFETY: eventfd(2) takes an initial value and flags and returns a new fd or -1.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if efd < 0 {
                return Err(os("eventfd")(io::Error::last_os_error()));
            }
            // SAFETY: a fresh fd we own.
            let stop = unsafe { OwnedFd::from_raw_fd(efd) };
            let shared = Arc::new(SyncShared {
                uffd,
                ranges: self.ranges.clone(),
                page_size: ps,
                host_page: host_page_size(),
                record: Mutex::new(Record {
                    pages: DirtyBitmap::new(self.pages),
                    error: None,
                    dead: false,
                }),
            });
            let thread = {
                let shared = shared.clone();
                let stop_fd = stop.as_raw_fd();
                std::thread::Builder::new()
                    .name("uffd-wp-handler".into())
                    .spawn(move || shared.serve(stop_fd))
                    .map_err(os("spawning the write-fault handler thread"))?
            };
            Active::Sync(SyncState {
                shared,
                stop,
                thread: Some(thread),
            })
        };
        let uffd = match &active {
            Active::Async(a) => &a.uffd,
            Active::Sync(s) => &s.shared.uffd,
        };
        for r in self.ranges.iter() {
            uffd.write_protect(r.host_addr as *mut c_void, r.len)
                .map_err(|e| r.err(ps, "UFFDIO_WRITEPROTECT", uffd_io(e)))?;
        }
        Ok(active)
    }

    fn sync_async(
        state: &mut AsyncState,
        ranges: &[HostRange],
        page_size: usize,
        into: &mut DirtyBitmap,
    ) -> Result<(), TrackerError> {
        let query = ScanQuery {
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            mask: PAGE_IS_WRITTEN,
            ret: PAGE_IS_WRITTEN,
            ..ScanQuery::default()
        };
        for r in ranges {
            let pages = r.pages(page_size);
            let base = r.host_addr as u64;
            scan(
                &state.pagemap,
                base,
                r.end() as u64,
                query,
                &mut state.out,
                |a, b| {
                    let first = pages.start + ((a - base) as usize) / page_size;
                    let last =
                        (pages.start + ((b - base) as usize).div_ceil(page_size)).min(pages.end);
                    if first < last {
                        into.set_range(first..last);
                    }
                },
            )
            .map_err(|e| r.err(page_size, "PAGEMAP_SCAN", e))?;
        }
        Ok(())
    }

    fn sync_sync(
        state: &mut SyncState,
        ranges: &[HostRange],
        page_size: usize,
        into: &mut DirtyBitmap,
    ) -> Result<(), TrackerError> {
        let mut record = state.shared.lock();
        if let Some(e) = record.error.take() {
            return Err(e);
        }
        if record.dead {
            return Err(os_error(
                "write-fault handler",
                io::Error::other(
                    "the handler thread stopped after an earlier error; stop and start the tracker again",
                ),
            ));
        }
        // Only pages the handler unprotected (all of them recorded, under this lock) can be
        // writable; protect those again before handing the record over. Protecting a page
        // that is still protected changes nothing, so runs separated by a short gap go in
        // one ioctl. Only a short one: the kernel rewrites every entry of the range, at
        // ~70 ns each on the benchmark machine, against ~1.4 us per ioctl.
        let protect = |r: &HostRange, pages: Range<usize>| {
            let addr = r.host_addr + (pages.start - r.first_page) * page_size;
            let len = pages.len() * page_size;
            retry_eagain(|| state.shared.uffd.write_protect(addr as *mut c_void, len))
                .map_err(|e| r.err(page_size, "UFFDIO_WRITEPROTECT", e))
        };
        for r in ranges {
            let mut pending: Option<Range<usize>> = None;
            for run in record.pages.iter_runs_in(r.pages(page_size)) {
                match &mut pending {
                    Some(p) if run.start - p.end <= COALESCE_GAP_PAGES => p.end = run.end,
                    _ => {
                        if let Some(p) = pending.replace(run) {
                            protect(r, p)?;
                        }
                    }
                }
            }
            if let Some(p) = pending {
                protect(r, p)?;
            }
        }
        into.union_with(&record.pages);
        record.pages.clear_all();
        Ok(())
    }

    fn stop_active(&self, active: Active) -> Result<(), TrackerError> {
        let ps = self.page_size;
        let mut first = None;
        match active {
            Active::Async(state) => {
                for r in self.ranges.iter() {
                    if let Err(e) = state.uffd.unregister(r.host_addr as *mut c_void, r.len) {
                        first.get_or_insert(r.err(ps, "UFFDIO_UNREGISTER", uffd_io(e)));
                    }
                }
            }
            Active::Sync(mut state) => {
                {
                    let _record = state.shared.lock();
                    // Lift every protection (and wake every writer) first: once the handler
                    // is gone, nobody would answer a fault.
                    for r in self.ranges.iter() {
                        if let Err(e) = retry_eagain(|| {
                            state.shared.uffd.remove_write_protection(
                                r.host_addr as *mut c_void,
                                r.len,
                                true,
                            )
                        }) {
                            first.get_or_insert(r.err(ps, "UFFDIO_WRITEPROTECT (unprotect)", e));
                        }
                    }
                }
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from `one` to our eventfd.
                let ret =
                    unsafe { libc::write(state.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
                if ret != 8 {
                    first.get_or_insert(TrackerError::Os {
                        backend: BACKEND,
                        op: "signalling the handler thread to stop",
                        source: io::Error::last_os_error(),
                    });
                } else if let Some(t) = state.thread.take() {
                    if t.join().is_err() {
                        first.get_or_insert(TrackerError::Os {
                            backend: BACKEND,
                            op: "joining the handler thread",
                            source: io::Error::other("the handler thread panicked"),
                        });
                    }
                }
                for r in self.ranges.iter() {
                    if let Err(e) = state
                        .shared
                        .uffd
                        .unregister(r.host_addr as *mut c_void, r.len)
                    {
                        first.get_or_insert(r.err(ps, "UFFDIO_UNREGISTER", uffd_io(e)));
                    }
                }
                // Dropping the last Arc closes the userfaultfd; the kernel forgets the rest.
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn retry_eagain(mut op: impl FnMut() -> userfaultfd::Result<()>) -> io::Result<()> {
    // The kernel answers EAGAIN while the address space is changing under a registered
    // range (fork, mremap); the change is short.
    for _ in 0..10_000 {
        match op().map_err(uffd_io) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
            other => return other,
        }
    }
    op().map_err(uffd_io)
}

impl SyncShared {
    fn lock(&self) -> MutexGuard<'_, Record> {
        // A panic elsewhere while holding the lock leaves a bitmap that is still a valid
        // over-approximation; keep going.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range_of(&self, addr: usize) -> Option<&HostRange> {
        let i = self.ranges.partition_point(|r| r.host_addr <= addr);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (addr < r.end()).then_some(r)
    }

    /// The handler thread: answers write-protect faults until `stop_fd` is signalled.
    fn serve(&self, stop_fd: RawFd) {
        let mut events = EventBuffer::new(64);
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is an array of two pollfd structs that outlives the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return self.give_up(&mut self.lock(), os_error("poll on the userfaultfd", e));
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                let e = io::Error::other("error or hang-up");
                return self.give_up(&mut self.lock(), os_error("poll on the userfaultfd", e));
            }
            let batch = match self.uffd.read_events(&mut events) {
                Ok(batch) => batch,
                Err(e) => {
                    let e = os_error("reading userfaultfd events", uffd_io(e));
                    return self.give_up(&mut self.lock(), e);
                }
            };
            // One lock for the whole batch: a fault read before a sync is either answered
            // before the sync protects, or recorded for the sync after it.
            let mut record = self.lock();
            for event in batch {
                let answered = match event {
                    Ok(Event::Pagefault {
                        kind: FaultKind::WriteProtected,
                        addr,
                        ..
                    }) => self.answer(&mut record, addr as usize),
                    Ok(other) => {
                        tracing::debug!(event = ?other, "ignoring userfaultfd event");
                        Ok(())
                    }
                    Err(e) => Err(os_error("decoding a userfaultfd event", uffd_io(e))),
                };
                if let Err(e) = answered {
                    return self.give_up(&mut record, e);
                }
            }
        }
    }

    /// Records the page at `addr`, then lets the writer through.
    fn answer(&self, record: &mut Record, addr: usize) -> Result<(), TrackerError> {
        let page_addr = addr & !(self.host_page - 1);
        let Some(r) = self.range_of(page_addr) else {
            return Err(os_error(
                "answering a write-protect fault",
                io::Error::other(format!("fault at {addr:#x} outside every tracked range")),
            ));
        };
        let page = r.first_page + (page_addr - r.host_addr) / self.page_size;
        record.pages.set(page);
        retry_eagain(|| {
            self.uffd
                .remove_write_protection(page_addr as *mut c_void, self.host_page, true)
        })
        .map_err(|source| TrackerError::Range {
            backend: BACKEND,
            op: "UFFDIO_WRITEPROTECT (unprotect after a fault)",
            host: page_addr as u64,
            len: self.host_page as u64,
            pages: page..page + 1,
            source,
        })
    }

    /// The handler cannot go on: lift every protection, so that no writer waits for an
    /// answer that will not come, and mark the tracker failed for every later sync.
    fn give_up(&self, record: &mut Record, error: TrackerError) {
        tracing::error!(%error, "uffd-wp handler thread stops");
        for r in self.ranges.iter() {
            let _ = self
                .uffd
                .remove_write_protection(r.host_addr as *mut c_void, r.len, true);
        }
        record.error.get_or_insert(error);
        record.dead = true;
    }
}

fn os_error(op: &'static str, source: io::Error) -> TrackerError {
    TrackerError::Os {
        backend: BACKEND,
        op,
        source,
    }
}

impl DirtyTracker for UffdWpTracker {
    fn name(&self) -> &str {
        BACKEND
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        if self.active.is_some() {
            self.stop()?;
        }
        // On failure, whatever start_inner built (fd, registrations, thread) is dropped
        // with it: closing the userfaultfd unregisters and unprotects everything.
        let active = self.start_inner();
        match active {
            Ok(a) => {
                tracing::debug!(
                    mode = if matches!(a, Active::Async(_)) {
                        "async"
                    } else {
                        "sync"
                    },
                    ranges = self.ranges.len(),
                    "userfaultfd write protection started"
                );
                self.active = Some(a);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn sync_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), TrackerError> {
        check_len(BACKEND, self.pages, into)?;
        match &mut self.active {
            None => Err(TrackerError::NotStarted { backend: BACKEND }),
            Some(Active::Async(s)) => Self::sync_async(s, &self.ranges, self.page_size, into),
            Some(Active::Sync(s)) => Self::sync_sync(s, &self.ranges, self.page_size, into),
        }
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        match self.active.take() {
            None => Ok(()),
            Some(a) => self.stop_active(a),
        }
    }
}

impl Drop for SyncState {
    fn drop(&mut self) {
        // Reached only when start failed half-way or stop could not join: make sure no
        // writer waits on a handler that is gone.
        if let Some(t) = self.thread.take() {
            for r in self.shared.ranges.iter() {
                let _ = self.shared.uffd.remove_write_protection(
                    r.host_addr as *mut c_void,
                    r.len,
                    true,
                );
            }
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from `one` to our eventfd.
            unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
            let _ = t.join();
        }
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the uffd-wp tracker on drop");
        }
    }
}
