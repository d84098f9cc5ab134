//! Guest RAM over `vm-memory`: the host mapping behind a [`RamLayout`]'s pages.
//!
//! [`GuestRam`] reaches the VMM's `GuestMemoryMmap` (or any `vm-memory` backend) page by
//! page without copying it; [`RamLayout::of_memory`] reads the layout off it.

use vm_memory::bitmap::MS;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice,
};

use crate::layout::{LayoutError, PAGE_SIZE, RamLayout};

/// An error reaching guest RAM through the host mapping.
#[derive(Debug, thiserror::Error)]
pub enum RamAccessError {
    /// The page index is past the end of guest RAM.
    #[error("page {page} is outside guest RAM ({pages} pages)")]
    NoSuchPage {
        /// The page asked for.
        page: usize,
        /// Number of pages of guest RAM.
        pages: usize,
    },
    /// The buffer handed in is not one page long.
    #[error("buffer of {got} bytes for a {page_size}-byte page")]
    BufferSize {
        /// Length of the buffer.
        got: usize,
        /// The page size.
        page_size: u64,
    },
    /// vm-memory refused the access.
    #[error("guest memory access to page {page} at {gpa:#x}: {source}")]
    Memory {
        /// The page.
        page: usize,
        /// Its guest-physical address.
        gpa: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
}

impl RamLayout {
    /// The layout of a VMM's guest memory, with 4 KiB pages.
    pub fn of_memory<M: GuestMemoryBackend>(mem: &M) -> Result<Self, LayoutError> {
        Self::of_memory_with_page_size(mem, PAGE_SIZE)
    }

    /// The layout of a VMM's guest memory with another page size (2 MiB huge pages, say).
    pub fn of_memory_with_page_size<M: GuestMemoryBackend>(
        mem: &M,
        page_size: u64,
    ) -> Result<Self, LayoutError> {
        let ranges: Vec<(u64, u64)> = mem
            .iter()
            .map(|r| (r.start_addr().raw_value(), r.len()))
            .collect();
        Self::new(page_size, &ranges)
    }
}

/// A VMM's guest memory seen page by page. Borrows the memory; nothing is copied.
pub struct GuestRam<'a, M: GuestMemoryBackend> {
    mem: &'a M,
    layout: RamLayout,
}

impl<'a, M: GuestMemoryBackend> GuestRam<'a, M> {
    /// Wraps the VMM's guest memory with 4 KiB pages.
    pub fn new(mem: &'a M) -> Result<Self, LayoutError> {
        Ok(GuestRam {
            layout: RamLayout::of_memory(mem)?,
            mem,
        })
    }

    /// Wraps guest memory with an explicit layout, which must describe `mem`'s regions.
    pub fn with_layout(mem: &'a M, layout: RamLayout) -> Self {
        GuestRam { mem, layout }
    }

    /// The page layout.
    #[inline]
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// The wrapped guest memory.
    #[inline]
    pub fn memory(&self) -> &'a M {
        self.mem
    }

    /// Guest-physical address of the first byte of `page`.
    pub fn gpa(&self, page: usize) -> Result<GuestAddress, RamAccessError> {
        self.layout
            .page_to_gpa(page)
            .map(GuestAddress)
            .ok_or(RamAccessError::NoSuchPage {
                page,
                pages: self.layout.page_count(),
            })
    }

    /// Host virtual address of the first byte of `page`.
    ///
    /// The page is mapped for as long as the guest memory lives; the guest (or another
    /// thread) may write it at any time, so only volatile access is sound.
    pub fn host_address(&self, page: usize) -> Result<*mut u8, RamAccessError> {
        let gpa = self.gpa(page)?;
        self.mem
            .get_host_address(gpa)
            .map_err(|source| RamAccessError::Memory {
                page,
                gpa: gpa.raw_value(),
                source,
            })
    }

    /// A volatile view of `count` pages starting at `page`, which must lie in one region.
    pub fn pages_slice(
        &self,
        page: usize,
        count: usize,
    ) -> Result<VolatileSlice<'_, MS<'_, M>>, RamAccessError> {
        let gpa = self.gpa(page)?;
        self.mem
            .get_slice(gpa, count * self.layout.page_size() as usize)
            .map_err(|source| RamAccessError::Memory {
                page,
                gpa: gpa.raw_value(),
                source,
            })
    }

    /// Copies `page` into `buf`, which must be one page long.
    pub fn read_page(&self, page: usize, buf: &mut [u8]) -> Result<(), RamAccessError> {
        self.check_buf(buf.len())?;
        let gpa = self.gpa(page)?;
        self.mem
            .read_slice(buf, gpa)
            .map_err(|source| RamAccessError::Memory {
                page,
                gpa: gpa.raw_value(),
                source,
            })
    }

    /// Writes `buf`, one page long, into `page`.
    pub fn write_page(&self, page: usize, buf: &[u8]) -> Result<(), RamAccessError> {
        self.check_buf(buf.len())?;
        let gpa = self.gpa(page)?;
        self.mem
            .write_slice(buf, gpa)
            .map_err(|source| RamAccessError::Memory {
                page,
                gpa: gpa.raw_value(),
                source,
            })
    }

    fn check_buf(&self, len: usize) -> Result<(), RamAccessError> {
        if len as u64 != self.layout.page_size() {
            return Err(RamAccessError::BufferSize {
                got: len,
                page_size: self.layout.page_size(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn guest_ram_reads_and_writes_through_the_mapping() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10_0000), 0x2000),
        ])
        .unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        assert_eq!(ram.layout().page_count(), 6);
        let page = vec![0xabu8; 4096];
        ram.write_page(4, &page).unwrap();
        let mut back = vec![0u8; 4096];
        ram.read_page(4, &mut back).unwrap();
        assert_eq!(back, page);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xab);
        let host = ram.host_address(4).unwrap();
        // SAFETY: page 4 is mapped for as long as `mem` lives and nothing else touches it.
        assert_eq!(unsafe { host.read_volatile() }, 0xab);
        let slice = ram.pages_slice(4, 2).unwrap();
        assert_eq!(slice.len(), 8192);
        assert!(ram.read_page(6, &mut back).is_err());
        assert!(matches!(
            ram.read_page(0, &mut back[..100]),
            Err(RamAccessError::BufferSize { got: 100, .. })
        ));
    }
}
