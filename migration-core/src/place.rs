//! Putting received pages into fresh guest RAM without faulting them in first.
//!
//! A migration destination starts with guest RAM that was never touched. Writing a page of
//! it costs a page fault, in which the kernel allocates a page and clears it, and then the
//! copy: two writes of every page to memory, and under nested virtualisation a fault costs
//! microseconds. `UFFDIO_COPY` allocates the page and fills it from our buffer in one step,
//! with no fault and no clearing (it is how post-copy places pages). [`FreshPages`]
//! registers guest RAM with a userfaultfd for that, and only for that: the
//! registration asks for `UFFD_FEATURE_SIGBUS`, so that any access to a page that was not
//! placed yet fails at once (`SIGBUS`, or `EFAULT` in a system call) instead of waiting for
//! a fault handler that does not exist. Hence the rule for callers: while it is registered,
//! touch only pages already placed (or written); unregister ([`FreshPages::finish`], or
//! drop) before anything else reads guest RAM. Pages never placed are then ordinary
//! untouched memory again, reading as zero.

use std::io;

use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::GuestMemoryBackend;

use crate::geometry::GuestRam;

fn uffd_io(e: userfaultfd::Error) -> io::Error {
    match e {
        userfaultfd::Error::SystemError(errno) | userfaultfd::Error::CopyFailed(errno) => {
            io::Error::from_raw_os_error(errno as i32)
        }
        other => io::Error::other(other.to_string()),
    }
}

/// Guest RAM registered for placing pages with `UFFDIO_COPY` (see the module docs).
#[derive(Debug)]
pub struct FreshPages {
    uffd: Uffd,
    /// (host address, length) of each registered mapping.
    ranges: Vec<(usize, usize)>,
    page_size: usize,
}

impl FreshPages {
    /// Registers every region of `ram`. Fails where userfaultfd is missing or closed to this
    /// process, or where the memory is not anonymous private memory; callers then write
    /// pages the ordinary way.
    pub fn register<M: GuestMemoryBackend>(ram: &GuestRam<'_, M>) -> io::Result<FreshPages> {
        let layout = ram.layout();
        let page_size = layout.page_size() as usize;
        if page_size != 4096 {
            // UFFDIO_COPY places base pages of anonymous memory.
            return Err(io::Error::other(format!(
                "pages of {page_size} bytes: userfaultfd places 4 KiB pages"
            )));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // Only our own user-mode accesses could fault, and none should: no privilege
            // needed for kernel-mode fault handling.
            .user_mode_only(true)
            .require_features(FeatureFlags::SIGBUS)
            .create()
            .map_err(uffd_io)?;
        let mut pages = FreshPages {
            uffd,
            ranges: Vec::new(),
            page_size,
        };
        for (_, run) in layout.split_at_regions(0..layout.page_count()) {
            let host = ram.host_address(run.start).map_err(io::Error::other)? as usize;
            let len = run.len() * page_size;
            pages
                .uffd
                .register_with_mode(host as *mut libc::c_void, len, RegisterMode::MISSING)
                .map_err(uffd_io)?;
            pages.ranges.push((host, len));
        }
        Ok(pages)
    }

    /// Fills the page at `dst` with `src` if the page is not there yet: returns `true`
    /// when placed, `false` when the page already exists (then write it the ordinary
    /// way).
    ///
    /// # Safety
    /// `dst` must be the start of a page inside the registered RAM.
    ///
    /// # Panics
    /// If `src` is not one page long.
    pub unsafe fn place(&self, dst: *mut u8, src: &[u8]) -> io::Result<bool> {
        assert_eq!(src.len(), self.page_size, "placing a partial page");
        // SAFETY: the kernel checks that `dst` lies in a registered range and copies one
        // page from `src`, which is readable for that long.
        match unsafe {
            self.uffd
                .copy(src.as_ptr().cast(), dst.cast(), self.page_size, false)
        } {
            Ok(n) if n == self.page_size => Ok(true),
            Ok(n) => Err(io::Error::other(format!(
                "UFFDIO_COPY placed {n} of {} bytes",
                self.page_size
            ))),
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => Ok(false),
            Err(e) => Err(uffd_io(e)),
        }
    }

    /// Unregisters guest RAM: pages not placed are ordinary untouched memory again.
    pub fn finish(mut self) -> io::Result<()> {
        self.unregister()
    }

    fn unregister(&mut self) -> io::Result<()> {
        let mut first_err = None;
        for (host, len) in self.ranges.drain(..) {
            if let Err(e) = self.uffd.unregister(host as *mut libc::c_void, len) {
                first_err.get_or_insert(uffd_io(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for FreshPages {
    fn drop(&mut self) {
        if let Err(e) = self.unregister() {
            // Closing the userfaultfd, which follows, unregisters as well.
            tracing::debug!(error = %e, "unregistering guest RAM from userfaultfd");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::RamLayout;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn ram(regions: &[(u64, usize)]) -> GuestMemoryMmap {
        let r: Vec<(GuestAddress, usize)> =
            regions.iter().map(|&(b, s)| (GuestAddress(b), s)).collect();
        GuestMemoryMmap::from_ranges(&r).unwrap()
    }

    #[test]
    fn places_fresh_pages_refuses_present_ones_and_leaves_the_rest_zero() {
        let mem = ram(&[(0, 64 << 10), (1 << 20, 32 << 10)]);
        let layout = RamLayout::of_memory(&mem).unwrap();
        let g = GuestRam::with_layout(&mem, layout.clone());
        let pages = match FreshPages::register(&g) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipped: userfaultfd is not available here: {e}");
                return;
            }
        };
        let page = |v: u8| vec![v; 4096];
        // A page in each region, the last page of the first one.
        for (idx, v) in [(0usize, 1u8), (15, 2), (16, 3), (23, 4)] {
            let dst = g.host_address(idx).unwrap();
            // SAFETY: `dst` starts a page of the registered RAM.
            assert!(unsafe { pages.place(dst, &page(v)) }.unwrap(), "page {idx}");
        }
        // Placed twice: the second is refused, the page keeps its first contents.
        let dst = g.host_address(0).unwrap();
        // SAFETY: as above.
        assert!(!unsafe { pages.place(dst, &page(9)) }.unwrap());
        pages.finish().unwrap();
        for (idx, want) in [(0usize, 1u8), (1, 0), (15, 2), (16, 3), (17, 0), (23, 4)] {
            let mut buf = vec![0xaau8; 4096];
            mem.read_slice(&mut buf, GuestAddress(layout.page_to_gpa(idx).unwrap()))
                .unwrap();
            assert!(
                buf.iter().all(|&b| b == want),
                "page {idx} should hold {want}"
            );
        }
    }

    #[test]
    fn pages_of_another_size_are_refused() {
        let mem = ram(&[(0, 64 << 10)]);
        let layout = RamLayout::new(16 << 10, &[(0, 64 << 10)]).unwrap();
        let g = GuestRam::with_layout(&mem, layout);
        assert!(FreshPages::register(&g).is_err());
    }
}
