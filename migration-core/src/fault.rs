//! Guest RAM that faults on missing pages: the post-copy destination's side of
//! `userfaultfd`.
//!
//! [`FaultingRam`] registers guest RAM with a userfaultfd in missing mode. A thread that
//! touches a page that is not present (a vCPU, the VMM, or KVM on a vCPU's behalf, which is
//! why faults from the kernel are not refused) stops, and the fault is queued for the
//! handler, who reads it with [`FaultingRam::read_faults`], gets the page from the source,
//! and places it with [`FaultingRam::place`] (`UFFDIO_COPY`) or
//! [`FaultingRam::place_zero`] (`UFFDIO_ZEROPAGE`), which wakes whoever waits for it.
//! Pages already present (received before the switch) never fault;
//! [`FaultingRam::discard`] makes pages missing again (the switch's discard list).
//!
//! Placing is idempotent in the way post-copy needs it: two copies of one page can race
//! (the background push and the answer to a fault), and the second finds the page present
//! (`EEXIST`), changes nothing and reports [`Placed::AlreadyPresent`]; it wakes the range
//! anyway, so that no thread waits on a page that is there.
//!
//! The handler must never touch a missing page itself: it would wait for itself.

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use userfaultfd::{Event, EventBuffer, FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::GuestMemoryBackend;

use crate::geometry::GuestRam;

fn uffd_io(e: userfaultfd::Error) -> io::Error {
    match e {
        userfaultfd::Error::SystemError(errno)
        | userfaultfd::Error::CopyFailed(errno)
        | userfaultfd::Error::ZeropageFailed(errno) => io::Error::from_raw_os_error(errno as i32),
        other => io::Error::other(other.to_string()),
    }
}

/// A fault read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Global page index of the faulting address.
    pub page: usize,
    /// The faulting thread (its kernel thread id), where the kernel reports it.
    pub thread: Option<u32>,
    /// Whether the access was a write.
    pub write: bool,
}

/// What [`FaultingRam::place`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page was missing and now holds the data.
    Placed,
    /// The page was present already (placed by someone else): nothing changed.
    AlreadyPresent,
}

/// One registered mapping: guest pages `pages` at host address `host`.
#[derive(Debug, Clone)]
struct Mapping {
    host: usize,
    pages: Range<usize>,
}

/// Guest RAM registered for missing-page faults (see the module docs).
pub struct FaultingRam {
    uffd: Uffd,
    mappings: Vec<Mapping>,
    page_size: usize,
    thread_ids: bool,
    /// The buffer the fault handler reads into (one reader at a time).
    events: std::sync::Mutex<EventBuffer>,
    registered: bool,
}

impl std::fmt::Debug for FaultingRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultingRam")
            .field("mappings", &self.mappings)
            .field("thread_ids", &self.thread_ids)
            .field("registered", &self.registered)
            .finish_non_exhaustive()
    }
}

// SAFETY: the userfaultfd is a file descriptor, usable from any thread; the mappings are
// plain numbers. `EventBuffer` holds plain `uffd_msg` values.
unsafe impl Send for FaultingRam {}
// SAFETY: events are read into a buffer behind a mutex; the ioctls (`copy`, `zeropage`,
// `wake`) may be issued from several threads at once, as the kernel allows.
unsafe impl Sync for FaultingRam {}

/// Events read per `read` of the userfaultfd: one system call drains a burst of faults.
const EVENTS_PER_READ: usize = 64;

impl FaultingRam {
    /// Registers every region of `ram` for missing-page faults. Fails where userfaultfd is
    /// missing or closed to this process (faults taken in the kernel, as KVM's are, need
    /// `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd = 1`), or where the memory is not
    /// anonymous private memory.
    pub fn register<M: GuestMemoryBackend>(ram: &GuestRam<'_, M>) -> io::Result<FaultingRam> {
        let layout = ram.layout();
        let page_size = layout.page_size() as usize;
        if page_size != 4096 {
            return Err(io::Error::other(format!(
                "pages of {page_size} bytes: userfaultfd places 4 KiB pages"
            )));
        }
        let build = |features: FeatureFlags| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                // KVM touches guest memory from the kernel on a vCPU's behalf.
                .user_mode_only(false)
                .require_features(features)
                .create()
        };
        // The faulting thread's id attributes blocked time to vCPUs; not every kernel has
        // it, and faults are served without it.
        let (uffd, thread_ids) = match build(FeatureFlags::THREAD_ID) {
            Ok(u) => (u, true),
            Err(_) => (build(FeatureFlags::empty()).map_err(uffd_io)?, false),
        };
        let mut r = FaultingRam {
            uffd,
            mappings: Vec::new(),
            page_size,
            thread_ids,
            events: std::sync::Mutex::new(EventBuffer::new(EVENTS_PER_READ)),
            registered: true,
        };
        for (_, run) in layout.split_at_regions(0..layout.page_count()) {
            let host = ram.host_address(run.start).map_err(io::Error::other)? as usize;
            r.uffd
                .register_with_mode(
                    host as *mut libc::c_void,
                    run.len() * page_size,
                    RegisterMode::MISSING,
                )
                .map_err(uffd_io)?;
            r.mappings.push(Mapping { host, pages: run });
        }
        Ok(r)
    }

    /// Whether faults say which thread took them.
    pub fn reports_threads(&self) -> bool {
        self.thread_ids
    }

    /// Bytes per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The pages of the RAM region that holds `page` (a run passed to
    /// [`place_run`](Self::place_run) stays within one).
    pub fn region_of(&self, page: usize) -> Option<Range<usize>> {
        self.mapping(page).ok().map(|m| m.pages.clone())
    }

    fn mapping(&self, page: usize) -> io::Result<&Mapping> {
        let i = self.mappings.partition_point(|m| m.pages.end <= page);
        match self.mappings.get(i) {
            Some(m) if m.pages.contains(&page) => Ok(m),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("page {page} is not registered guest RAM"),
            )),
        }
    }

    /// Checks that `pages` (not empty) lie within one registered region.
    fn within_one_region(&self, pages: &Range<usize>) -> io::Result<()> {
        let m = self.mapping(pages.start)?;
        if pages.end > m.pages.end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("pages {pages:?} cross the end of a RAM region"),
            ));
        }
        Ok(())
    }

    fn host(&self, page: usize) -> io::Result<*mut libc::c_void> {
        let m = self.mapping(page)?;
        Ok((m.host + (page - m.pages.start) * self.page_size) as *mut libc::c_void)
    }

    fn page_of(&self, addr: usize) -> Option<usize> {
        self.mappings.iter().find_map(|m| {
            let len = m.pages.len() * self.page_size;
            (addr >= m.host && addr < m.host + len)
                .then(|| m.pages.start + (addr - m.host) / self.page_size)
        })
    }

    /// Reads the faults queued now, without waiting (the descriptor is non-blocking: wait
    /// for it to be readable with `poll` on [`AsFd::as_fd`]), appending them to `out`.
    /// Returns how many were read. Events other than missing-page faults are skipped.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<usize> {
        let before = out.len();
        let mut batch = Vec::new();
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        for ev in self.uffd.read_events(&mut events).map_err(uffd_io)? {
            if let Event::Pagefault {
                addr,
                rw,
                thread_id,
                ..
            } = ev.map_err(uffd_io)?
            {
                batch.push((addr as usize, rw, thread_id.as_raw()));
            }
        }
        for (addr, rw, tid) in batch {
            if let Some(page) = self.page_of(addr) {
                out.push(Fault {
                    page,
                    thread: self.thread_ids.then_some(tid as u32),
                    write: rw == userfaultfd::ReadWrite::Write,
                });
            }
        }
        Ok(out.len() - before)
    }

    /// Places `data` (one page) into `page` if it is missing, waking whoever faulted on it.
    pub fn place(&self, page: usize, data: &[u8]) -> io::Result<Placed> {
        if data.len() != self.page_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "placing {} bytes into a {}-byte page",
                    data.len(),
                    self.page_size
                ),
            ));
        }
        let dst = self.host(page)?;
        // A fault while the kernel reads `data` (it is our own buffer, present) or a
        // concurrent change of the mapping makes it stop early with EAGAIN: go on from
        // where it stopped, a bounded number of times.
        let mut done = 0;
        for _ in 0..64 {
            // SAFETY: `dst + done` lies in the registered page `page` (checked by `host`)
            // and `data[done..]` is readable for the rest of the page; the kernel copies into
            // a missing page only, atomically, and refuses a present one.
            let r = unsafe {
                self.uffd.copy(
                    data[done..].as_ptr().cast(),
                    dst.cast::<u8>().add(done).cast(),
                    self.page_size - done,
                    true,
                )
            };
            match r {
                Ok(n) if done + n == self.page_size => return Ok(Placed::Placed),
                Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) => done += n,
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    self.wake(page..page + 1)?;
                    return Ok(Placed::AlreadyPresent);
                }
                Err(e) => return Err(uffd_io(e)),
            }
        }
        Err(io::Error::other(format!(
            "UFFDIO_COPY of page {page} kept stopping early"
        )))
    }

    /// Places `data`, a whole number of pages, into the pages from `first` on (one run
    /// within one region) where they are missing, waking whoever faulted on them; one
    /// `UFFDIO_COPY` for the run unless some of its pages are present already. Returns the
    /// pages that were present (left as they were).
    pub fn place_run(&self, first: usize, data: &[u8]) -> io::Result<Vec<usize>> {
        let n = data.len() / self.page_size;
        if n * self.page_size != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "placing {} bytes: not whole {}-byte pages",
                    data.len(),
                    self.page_size
                ),
            ));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        self.within_one_region(&(first..first + n))?;
        let base = self.host(first)?.cast::<u8>();
        let mut present = Vec::new();
        let mut done = 0;
        let mut stalls = 0;
        while done < data.len() {
            // SAFETY: `base + done..base + len` lies in one registered mapping (checked
            // above) and `data[done..]` is readable for as long; the kernel copies into
            // missing pages only and stops at a present one.
            let r = unsafe {
                self.uffd.copy(
                    data[done..].as_ptr().cast(),
                    base.add(done).cast(),
                    data.len() - done,
                    true,
                )
            };
            match r {
                Ok(k) | Err(userfaultfd::Error::PartiallyCopied(k)) if k > 0 => {
                    done += k;
                    stalls = 0;
                }
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    let page = first + done / self.page_size;
                    self.wake(page..page + 1)?;
                    present.push(page);
                    done += self.page_size;
                }
                Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) => {
                    stalls += 1;
                    if stalls > 64 {
                        return Err(io::Error::other(format!(
                            "UFFDIO_COPY of pages {first}..{} kept stopping early",
                            first + n
                        )));
                    }
                }
                Err(e) => return Err(uffd_io(e)),
            }
        }
        Ok(present)
    }

    /// Places zero pages into the missing pages of `pages` (a run within one region),
    /// waking whoever faulted on them; pages present already are left as they are.
    pub fn place_zero(&self, pages: Range<usize>) -> io::Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        self.within_one_region(&pages)?;
        // One ioctl for the whole run in the common case. Where a page of it is present
        // the kernel stops there with EEXIST, and how far it got is not reported back:
        // then page by page.
        if self.zero(pages.clone())? {
            return Ok(());
        }
        for p in pages {
            if !self.zero(p..p + 1)? {
                self.wake(p..p + 1)?;
            }
        }
        Ok(())
    }

    /// One `UFFDIO_ZEROPAGE` over `pages`: `false` when a page of them was present.
    fn zero(&self, pages: Range<usize>) -> io::Result<bool> {
        let start = self.host(pages.start)?;
        let len = pages.len() * self.page_size;
        for _ in 0..64 {
            // SAFETY: the range lies in one registered mapping (checked by the caller); the
            // kernel maps the zero page into missing pages only.
            match unsafe { self.uffd.zeropage(start, len, true) } {
                Ok(n) if n == len => return Ok(true),
                Ok(_) => return Ok(false),
                Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {
                    return Ok(false);
                }
                // The mapping changed under it: try again.
                Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EAGAIN => {}
                Err(e) => return Err(uffd_io(e)),
            }
        }
        Err(io::Error::other(format!(
            "UFFDIO_ZEROPAGE of pages {pages:?} kept failing with EAGAIN"
        )))
    }

    /// Wakes threads waiting on `pages` (a run within one region).
    pub fn wake(&self, pages: Range<usize>) -> io::Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let start = self.host(pages.start)?;
        self.uffd
            .wake(start, pages.len() * self.page_size)
            .map_err(uffd_io)
    }

    /// Drops the contents of `pages` (a run within one region): they are missing again and
    /// fault on their next access. For pages that changed on the source since they were
    /// sent.
    pub fn discard(&self, pages: Range<usize>) -> io::Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        self.within_one_region(&pages)?;
        let start = self.host(pages.start)?;
        // SAFETY: the range is guest RAM this process maps (checked above); dropping it
        // only makes its pages missing, which is what the caller asks for.
        let rc = unsafe { libc::madvise(start, pages.len() * self.page_size, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Unregisters guest RAM: pages still missing read as zero from now on (call it once
    /// every page is present).
    pub fn finish(mut self) -> io::Result<()> {
        self.unregister()
    }

    fn unregister(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.registered) {
            return Ok(());
        }
        let mut first_err = None;
        for m in &self.mappings {
            if let Err(e) = self
                .uffd
                .unregister(m.host as *mut libc::c_void, m.pages.len() * self.page_size)
            {
                first_err.get_or_insert(uffd_io(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl AsFd for FaultingRam {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor lives as long as `self.uffd`, which `self` owns.
        unsafe { BorrowedFd::borrow_raw(self.uffd.as_raw_fd()) }
    }
}

impl Drop for FaultingRam {
    fn drop(&mut self) {
        if let Err(e) = self.unregister() {
            // Closing the userfaultfd, which follows, unregisters as well (and wakes
            // whoever waits, who then sees zero pages).
            tracing::debug!(error = %e, "unregistering guest RAM from userfaultfd");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::RamLayout;
    use std::sync::atomic::{AtomicU64, Ordering};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 * 4096),
            (GuestAddress(1 << 20), 8 * 4096),
        ])
        .unwrap()
    }

    fn faulting(mem: &GuestMemoryMmap) -> Option<(FaultingRam, GuestRam<'_, GuestMemoryMmap>)> {
        let g = GuestRam::new(mem).unwrap();
        match FaultingRam::register(&g) {
            Ok(f) => Some((f, g)),
            Err(e) => {
                eprintln!("skipped: userfaultfd for missing pages is not available here: {e}");
                None
            }
        }
    }

    /// A thread that touches a missing page waits until the handler places it, and reads
    /// what was placed.
    #[test]
    fn a_fault_waits_for_the_page_placed() {
        let mem = ram();
        let Some((f, g)) = faulting(&mem) else {
            return;
        };
        let _ = RamLayout::of_memory(&mem).unwrap();
        let addr = g.host_address(18).unwrap() as usize;
        let reader = std::thread::spawn(move || {
            // SAFETY: page 18 is mapped for as long as `mem` lives (joined below).
            let word = unsafe { &*((addr + 8) as *const AtomicU64) };
            word.load(Ordering::Relaxed)
        });
        let mut faults = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while faults.is_empty() {
            assert!(std::time::Instant::now() < deadline, "no fault arrived");
            let mut p = libc::pollfd {
                fd: f.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            f.read_faults(&mut faults).unwrap();
        }
        assert_eq!(faults[0].page, 18);
        assert!(!faults[0].write);
        let mut page = vec![0u8; 4096];
        page[8..16].copy_from_slice(&0xfeed_u64.to_le_bytes());
        assert_eq!(f.place(18, &page).unwrap(), Placed::Placed);
        assert_eq!(reader.join().unwrap(), 0xfeed);
        // Placing it again changes nothing.
        assert_eq!(
            f.place(18, &vec![1u8; 4096]).unwrap(),
            Placed::AlreadyPresent
        );
        let mut back = vec![0u8; 4096];
        g.read_page(18, &mut back).unwrap();
        assert_eq!(back, page);
    }

    #[test]
    fn a_run_is_placed_around_pages_present_already() {
        let mem = ram();
        let Some((f, g)) = faulting(&mem) else { return };
        assert_eq!(f.place(2, &vec![0xeeu8; 4096]).unwrap(), Placed::Placed);
        assert_eq!(f.place(5, &vec![0xeeu8; 4096]).unwrap(), Placed::Placed);
        let data: Vec<u8> = (0..8 * 4096).map(|i| (i / 4096) as u8 + 1).collect();
        assert_eq!(f.place_run(0, &data).unwrap(), vec![2, 5]);
        let mut back = vec![0u8; 4096];
        for p in 0..8 {
            g.read_page(p, &mut back).unwrap();
            let want = if p == 2 || p == 5 { 0xee } else { p as u8 + 1 };
            assert!(back.iter().all(|&b| b == want), "page {p}");
        }
        assert!(
            f.place_run(14, &data[..3 * 4096]).is_err(),
            "across a region end"
        );
        assert!(f.place_run(0, &data[..100]).is_err(), "not whole pages");
    }

    #[test]
    fn zero_runs_skip_present_pages_and_discard_makes_pages_missing_again() {
        let mem = ram();
        let Some((f, g)) = faulting(&mem) else { return };
        assert_eq!(f.place(3, &vec![7u8; 4096]).unwrap(), Placed::Placed);
        f.place_zero(0..8).unwrap();
        let mut back = vec![1u8; 4096];
        g.read_page(3, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        g.read_page(5, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        f.discard(3..4).unwrap();
        assert_eq!(
            f.place(3, &vec![9u8; 4096]).unwrap(),
            Placed::Placed,
            "discarded"
        );
        g.read_page(3, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 9));
        assert!(
            f.place_zero(14..18).is_err(),
            "a run across a region end is refused"
        );
        assert!(
            f.place(24, &vec![0u8; 4096]).is_err(),
            "past the end of RAM"
        );
        assert!(f.place(2, &[0u8; 100]).is_err(), "a partial page");
        f.finish().unwrap();
        // Unregistered: missing pages read as zero.
        g.read_page(10, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }
}
