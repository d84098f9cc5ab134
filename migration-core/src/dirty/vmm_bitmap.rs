//! Writes the VMM itself makes into guest RAM, from `vm-memory`'s `AtomicBitmap`.
//!
//! KVM's dirty log only sees writes made by the guest through its page tables. When the
//! VMM writes guest RAM itself (a virtio device filling a receive buffer, a block device
//! completing a read), KVM knows nothing of it. `vm-memory` records those writes when the
//! guest memory is a `GuestMemoryMmap<AtomicBitmap>`: every write through its `Bytes` API
//! or a `VolatileSlice` marks the pages it touched in the region's bitmap. This tracker
//! takes those bitmaps, word by word with an atomic swap, into the global page indices.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use super::{DirtyTracker, TrackerError, check_len};
use crate::bitmap::{DirtyBitmap, words_for};
use crate::layout::RamLayout;

const BACKEND: &str = "vmm-bitmap";

struct TrackedRegion {
    // Holding the mapping (not the whole GuestMemoryMmap) keeps the bitmap alive even if
    // the VMM swaps its memory object, and costs nothing.
    mapping: Arc<MmapRegion<AtomicBitmap>>,
    first_page: usize,
    pages: usize,
}

/// Reports the pages the VMM wrote through `vm-memory` into a
/// `GuestMemoryMmap<AtomicBitmap>`.
///
/// `vm-memory` marks pages whether or not anyone tracks them, so `start` only forgets what
/// was marked before. `vm-memory`'s `AtomicBitmap::get_and_reset` hands out a fresh vector
/// per region and sync; that is the one allocation per sync this tracker makes.
pub struct VmmBitmapTracker {
    regions: Vec<TrackedRegion>,
    pages: usize,
    started: bool,
}

impl VmmBitmapTracker {
    /// A tracker for the regions of `mem`, reporting in the page indices of `layout`.
    ///
    /// Every region must be RAM of `layout`, and its bitmap must count pages of the
    /// layout's page size (vm-memory uses the host page size, 4 KiB on x86-64).
    pub fn new(
        mem: &GuestMemoryMmap<AtomicBitmap>,
        layout: &RamLayout,
    ) -> Result<Self, TrackerError> {
        let page_size = layout.page_size();
        let mut regions = Vec::with_capacity(mem.num_regions());
        for (index, region) in mem.iter().enumerate() {
            let base = region.start_addr();
            let len = region.len();
            let config = |what: String| TrackerError::Config {
                backend: BACKEND,
                what: format!(
                    "guest memory region {index} at {:#x} ({len:#x} bytes): {what}",
                    base.0
                ),
            };
            let first_page = layout
                .gpa_to_page(base.0)
                .ok_or_else(|| config("is not RAM of the layout".into()))?;
            let pages = (len / page_size) as usize;
            let layout_region = layout
                .region_of_page(first_page)
                .expect("gpa_to_page returned a page of the layout");
            if len % page_size != 0 || first_page + pages > layout_region.page_range(page_size).end
            {
                return Err(config(format!(
                    "does not fit the layout's region {} ({:#x}, {:#x} bytes) in whole {page_size}-byte pages",
                    layout_region.index, layout_region.guest_base, layout_region.size
                )));
            }
            let mapping = region.get_mmap();
            let bitmap = mapping.bitmap();
            if bitmap.len() != pages || bitmap.byte_size() as u64 != len {
                return Err(config(format!(
                    "its AtomicBitmap has {} bits for {} bytes, not one bit per {page_size}-byte page",
                    bitmap.len(),
                    bitmap.byte_size()
                )));
            }
            regions.push(TrackedRegion {
                mapping,
                first_page,
                pages,
            });
        }
        Ok(VmmBitmapTracker {
            regions,
            pages: layout.page_count(),
            started: false,
        })
    }
}

impl DirtyTracker for VmmBitmapTracker {
    fn name(&self) -> &str {
        BACKEND
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        // Starting again forgets everything, like a first start.
        for r in &self.regions {
            r.mapping.bitmap().reset();
        }
        self.started = true;
        Ok(())
    }

    fn sync_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), TrackerError> {
        check_len(BACKEND, self.pages, into)?;
        if !self.started {
            return Err(TrackerError::NotStarted { backend: BACKEND });
        }
        for r in &self.regions {
            // Each word is swapped with zero atomically, so a concurrent write lands either
            // in this sync or in the bitmap for the next one.
            let words = r.mapping.bitmap().get_and_reset();
            debug_assert_eq!(words.len(), words_for(r.pages));
            into.or_bits_at(r.first_page, &words, r.pages);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        self.started = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn memory() -> (GuestMemoryMmap<AtomicBitmap>, RamLayout) {
        // 5 + 70 pages: region 1 starts at global page 5, inside the first bitmap word.
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 5 * 4096),
            (GuestAddress(0x10_0000), 70 * 4096),
        ])
        .unwrap();
        let layout = RamLayout::of_memory(&mem).unwrap();
        (mem, layout)
    }

    fn sync(t: &mut VmmBitmapTracker, layout: &RamLayout) -> Vec<usize> {
        let mut b = layout.new_bitmap();
        t.sync_and_clear(&mut b).unwrap();
        b.iter_ones().collect()
    }

    #[test]
    fn reports_exactly_the_pages_written_through_vm_memory() {
        let (mem, layout) = memory();
        let mut t = VmmBitmapTracker::new(&mem, &layout).unwrap();
        assert!(matches!(
            t.sync_and_clear(&mut layout.new_bitmap()),
            Err(TrackerError::NotStarted { .. })
        ));
        mem.write_obj(1u32, GuestAddress(0x1000)).unwrap(); // before start
        t.start().unwrap();
        assert_eq!(sync(&mut t, &layout), Vec::<usize>::new());

        // Straddles pages 2 and 3 of region 1 (global 7 and 8).
        mem.write_slice(&[0xaa; 10], GuestAddress(0x10_0000 + 3 * 4096 - 4))
            .unwrap();
        mem.write_obj(0x1234u64, GuestAddress(0x2000)).unwrap(); // global 2
        // Three pages' worth from 100 bytes into region-1 page 60: pages 60..=63.
        mem.write_slice(&[1; 3 * 4096], GuestAddress(0x10_0000 + 60 * 4096 + 100))
            .unwrap();
        // Reads are not writes.
        let _: u64 = mem.read_obj(GuestAddress(0x10_0000 + 40 * 4096)).unwrap();
        assert_eq!(sync(&mut t, &layout), vec![2, 7, 8, 65, 66, 67, 68]);
        assert_eq!(sync(&mut t, &layout), Vec::<usize>::new());

        // The sync ORs: what the caller's bitmap holds stays.
        mem.write_obj(9u8, GuestAddress(0x10_0000 + 69 * 4096 + 4095))
            .unwrap();
        let mut b = layout.new_bitmap();
        b.set(0);
        t.sync_and_clear(&mut b).unwrap();
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 74]);

        // A wrong-sized bitmap is an error and loses nothing.
        mem.write_obj(9u8, GuestAddress(0x4000)).unwrap();
        assert!(matches!(
            t.sync_and_clear(&mut DirtyBitmap::new(74)),
            Err(TrackerError::BitmapLength {
                expected: 75,
                got: 74,
                ..
            })
        ));
        assert_eq!(sync(&mut t, &layout), vec![4]);

        t.stop().unwrap();
        t.stop().unwrap();
        assert!(matches!(
            t.sync_and_clear(&mut layout.new_bitmap()),
            Err(TrackerError::NotStarted { .. })
        ));
    }

    #[test]
    fn rejects_memory_that_does_not_fit_the_layout() {
        let (mem, _) = memory();
        let only_region0 = RamLayout::new(4096, &[(0, 5 * 4096)]).unwrap();
        let e = VmmBitmapTracker::new(&mem, &only_region0).err().unwrap();
        assert!(e.to_string().contains("region 1 at 0x100000"), "{e}");
        let short = RamLayout::new(4096, &[(0, 5 * 4096), (0x10_0000, 69 * 4096)]).unwrap();
        assert!(VmmBitmapTracker::new(&mem, &short).is_err());
        // vm-memory's bitmap counts 4 KiB pages; a layout of 8 KiB pages cannot use it.
        let mem16 =
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 16 * 4096)]).unwrap();
        let pages_8k = RamLayout::new(8192, &[(0, 16 * 4096)]).unwrap();
        let e = VmmBitmapTracker::new(&mem16, &pages_8k).err().unwrap();
        assert!(
            e.to_string().contains("not one bit per 8192-byte page"),
            "{e}"
        );
    }
}
