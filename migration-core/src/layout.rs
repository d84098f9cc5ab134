//! The page geometry of guest RAM, without any memory behind it.
//!
//! Migration works on pages numbered densely across all RAM regions: page 0 is the first
//! page of the lowest region, and the pages of the next region follow without a gap, even
//! when the regions themselves are far apart in guest-physical space (RAM below and above
//! the PCI hole, say). Dirty bitmaps, the stream's page batches and post-copy page
//! requests all speak in these page indices; [`RamLayout`] converts them to and from
//! guest-physical addresses (plain `u64`s here, so that this layer needs no `vm-memory`;
//! the `host` feature's [`GuestRam`](crate::geometry::GuestRam) reaches the memory behind
//! them).

use std::ops::Range;

use crate::bitmap::DirtyBitmap;

/// The page size of x86-64 KVM guests and of the KVM dirty log.
pub const PAGE_SIZE: u64 = 4096;

/// What is wrong with a RAM layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The page size is zero or not a power of two.
    #[error("page size {0} is not a power of two")]
    BadPageSize(u64),
    /// A region does not start or end on a page boundary.
    #[error(
        "RAM region {index} at {base:#x} of {size:#x} bytes is not aligned to the {page_size}-byte page"
    )]
    Unaligned {
        /// Region index in ascending address order.
        index: usize,
        /// Guest-physical start.
        base: u64,
        /// Length in bytes.
        size: u64,
        /// The layout's page size.
        page_size: u64,
    },
    /// A region is empty, overlaps the one before it, or wraps the address space.
    #[error(
        "RAM region {index} at {base:#x} of {size:#x} bytes is empty, wraps, or overlaps the region before it"
    )]
    Overlap {
        /// Region index in ascending address order.
        index: usize,
        /// Guest-physical start.
        base: u64,
        /// Length in bytes.
        size: u64,
    },
}

/// One contiguous region of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Position of the region in ascending guest-physical order.
    pub index: usize,
    /// Guest-physical address of the first byte.
    pub guest_base: u64,
    /// Length in bytes, a multiple of the page size.
    pub size: u64,
    /// Global index of the region's first page.
    pub first_page: usize,
}

impl RamRegion {
    /// The global page indices this region covers.
    pub fn page_range(&self, page_size: u64) -> Range<usize> {
        self.first_page..self.first_page + (self.size / page_size) as usize
    }
}

/// The layout of guest RAM: regions, page size, and the dense page numbering over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    page_size: u64,
    page_shift: u32,
    regions: Vec<RamRegion>,
    pages: usize,
}

impl RamLayout {
    /// A layout from `(guest_base, size)` pairs, in any order. Regions must be page
    /// aligned, non-empty and must not overlap.
    pub fn new(page_size: u64, ranges: &[(u64, u64)]) -> Result<Self, LayoutError> {
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(LayoutError::BadPageSize(page_size));
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_unstable();
        let mut regions = Vec::with_capacity(sorted.len());
        let mut pages = 0usize;
        let mut prev_end = 0u64;
        for (index, &(base, size)) in sorted.iter().enumerate() {
            if base % page_size != 0 || size % page_size != 0 {
                return Err(LayoutError::Unaligned {
                    index,
                    base,
                    size,
                    page_size,
                });
            }
            let end = base.checked_add(size);
            if size == 0 || end.is_none() || (index > 0 && base < prev_end) {
                return Err(LayoutError::Overlap { index, base, size });
            }
            prev_end = end.unwrap_or(u64::MAX);
            regions.push(RamRegion {
                index,
                guest_base: base,
                size,
                first_page: pages,
            });
            pages += (size / page_size) as usize;
        }
        Ok(RamLayout {
            page_size,
            page_shift: page_size.trailing_zeros(),
            regions,
            pages,
        })
    }

    /// Bytes per page.
    #[inline]
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Number of pages across all regions.
    #[inline]
    pub fn page_count(&self) -> usize {
        self.pages
    }

    /// Bytes of RAM across all regions.
    #[inline]
    pub fn ram_bytes(&self) -> u64 {
        (self.pages as u64) << self.page_shift
    }

    /// The regions, in ascending guest-physical order.
    #[inline]
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// An all-clear bitmap with one bit per page of this layout.
    pub fn new_bitmap(&self) -> DirtyBitmap {
        DirtyBitmap::new(self.pages)
    }

    /// The region holding global page `page`.
    #[inline]
    pub fn region_of_page(&self, page: usize) -> Option<&RamRegion> {
        if page >= self.pages {
            return None;
        }
        // The last region whose first page is <= page.
        let i = self.regions.partition_point(|r| r.first_page <= page) - 1;
        Some(&self.regions[i])
    }

    /// Guest-physical address of the first byte of `page`.
    #[inline]
    pub fn page_to_gpa(&self, page: usize) -> Option<u64> {
        let r = self.region_of_page(page)?;
        Some(r.guest_base + (((page - r.first_page) as u64) << self.page_shift))
    }

    /// The page that holds guest-physical address `gpa`, if it is RAM.
    #[inline]
    pub fn gpa_to_page(&self, gpa: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.guest_base <= gpa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        let off = gpa - r.guest_base;
        (off < r.size).then(|| r.first_page + (off >> self.page_shift) as usize)
    }

    /// Every page as `(index, guest-physical address)`, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let shift = self.page_shift;
        self.regions.iter().flat_map(move |r| {
            (0..(r.size >> shift))
                .map(move |i| (r.first_page + i as usize, r.guest_base + (i << shift)))
        })
    }

    /// Runs of consecutive page indices that are also contiguous in guest-physical space,
    /// split at region boundaries: `runs` from a dirty bitmap become `(gpa, pages)` pieces
    /// that each map to one host mapping.
    pub fn split_at_regions(
        &self,
        run: Range<usize>,
    ) -> impl Iterator<Item = (u64, Range<usize>)> + '_ {
        let end = run.end.min(self.pages);
        let mut pos = run.start.min(end);
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let r = self.region_of_page(pos)?;
            let region_end = r.page_range(self.page_size).end;
            let stop = end.min(region_end);
            let gpa = r.guest_base + (((pos - r.first_page) as u64) << self.page_shift);
            let piece = pos..stop;
            pos = stop;
            Some((gpa, piece))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_numbers_pages_densely_across_gaps() {
        let l = RamLayout::new(4096, &[(0x1_0000_0000, 0x2000), (0, 0x3000)]).unwrap();
        assert_eq!(l.page_count(), 5);
        assert_eq!(l.ram_bytes(), 5 * 4096);
        assert_eq!(l.page_to_gpa(2), Some(0x2000));
        assert_eq!(l.page_to_gpa(3), Some(0x1_0000_0000));
        assert_eq!(l.page_to_gpa(5), None);
        assert_eq!(l.gpa_to_page(0x1_0000_1fff), Some(4));
        assert_eq!(l.gpa_to_page(0x3000), None);
        assert_eq!(l.gpa_to_page(0x1_0000_2000), None);
        let pieces: Vec<_> = l.split_at_regions(1..5).collect();
        assert_eq!(pieces, vec![(0x1000, 1..3), (0x1_0000_0000, 3..5)]);
    }

    #[test]
    fn layout_rejects_bad_regions() {
        assert_eq!(
            RamLayout::new(3000, &[]),
            Err(LayoutError::BadPageSize(3000))
        );
        assert!(matches!(
            RamLayout::new(4096, &[(0x800, 0x1000)]),
            Err(LayoutError::Unaligned { index: 0, .. })
        ));
        assert!(matches!(
            RamLayout::new(4096, &[(0, 0x2000), (0x1000, 0x1000)]),
            Err(LayoutError::Overlap { index: 1, .. })
        ));
        assert!(matches!(
            RamLayout::new(4096, &[(0, 0)]),
            Err(LayoutError::Overlap { .. })
        ));
    }

    proptest! {
        #[test]
        fn page_and_gpa_round_trip(sizes in proptest::collection::vec((0u64..4, 1u64..6), 1..5), probe in any::<u64>()) {
            let mut base = 0u64;
            let mut ranges = Vec::new();
            for (gap, pages) in sizes {
                base += gap * 4096;
                ranges.push((base, pages * 4096));
                base += pages * 4096;
            }
            let l = RamLayout::new(4096, &ranges).unwrap();
            let all: Vec<_> = l.pages().collect();
            prop_assert_eq!(all.len(), l.page_count());
            for (i, (page, gpa)) in all.iter().enumerate() {
                prop_assert_eq!(*page, i);
                prop_assert_eq!(l.page_to_gpa(i), Some(*gpa));
                prop_assert_eq!(l.gpa_to_page(*gpa), Some(i));
                prop_assert_eq!(l.gpa_to_page(*gpa + 4095), Some(i));
            }
            let gpa = probe % (base + 8192);
            let in_ram = ranges.iter().any(|&(b, s)| gpa >= b && gpa < b + s);
            prop_assert_eq!(l.gpa_to_page(gpa).is_some(), in_ram);
            let pieces: Vec<_> = l.split_at_regions(0..l.page_count()).collect();
            prop_assert_eq!(pieces.iter().map(|(_, r)| r.len()).sum::<usize>(), l.page_count());
        }
    }
}
