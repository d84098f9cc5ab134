//! The delta cache: the last copy sent of recently re-sent pages, bounded in size.
//!
//! Delta encoding sends a page as the difference from the copy the destination already
//! has, which pays off for pages the guest keeps rewriting in a few places (counters,
//! page tables, small records). Both sides must agree on "the copy the destination
//! already has", so the source keeps the bytes it sent; the destination needs no cache, it
//! applies deltas onto the page in guest RAM.
//!
//! Like QEMU's XBZRLE cache it is direct-mapped with a fixed number of page-sized slots
//! allocated once: memory is bounded by the configured size, lookups and inserts cost one
//! hash and no allocation. A page that collides with another simply evicts it; the next
//! send of the evicted page goes out in full and re-enters the cache.

/// A size-bounded, direct-mapped cache of page contents keyed by global page index.
pub struct DeltaCache {
    page_size: usize,
    data: Vec<u8>,
    /// Page index held by each slot, or `EMPTY`.
    keys: Vec<u64>,
    hits: u64,
    misses: u64,
}

const EMPTY: u64 = u64::MAX;

impl DeltaCache {
    /// A cache of at most `capacity_bytes` of page data (rounded down to whole pages; at
    /// least one slot).
    pub fn new(capacity_bytes: usize, page_size: usize) -> Self {
        assert!(page_size > 0, "page size must not be zero");
        let slots = (capacity_bytes / page_size).max(1);
        DeltaCache {
            page_size,
            data: vec![0; slots * page_size],
            keys: vec![EMPTY; slots],
            hits: 0,
            misses: 0,
        }
    }

    /// Bytes of page data the cache holds at most.
    pub fn capacity_bytes(&self) -> usize {
        self.data.len()
    }

    /// Number of page slots.
    pub fn slots(&self) -> usize {
        self.keys.len()
    }

    #[inline]
    fn slot(&self, page: u64) -> usize {
        // Fibonacci hashing spreads the strided page numbers a guest tends to dirty.
        let h = page.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h as u128 * self.keys.len() as u128) >> 64) as usize
    }

    /// The copy of `page` last stored, if the cache still holds it.
    #[inline]
    pub fn get(&mut self, page: u64) -> Option<&[u8]> {
        let s = self.slot(page);
        if self.keys[s] == page {
            self.hits += 1;
            Some(&self.data[s * self.page_size..(s + 1) * self.page_size])
        } else {
            self.misses += 1;
            None
        }
    }

    /// Stores `contents` as the copy of `page` the destination now has, evicting whatever
    /// page shared its slot.
    ///
    /// # Panics
    /// If `contents` is not one page long.
    #[inline]
    pub fn insert(&mut self, page: u64, contents: &[u8]) {
        assert_eq!(
            contents.len(),
            self.page_size,
            "delta cache insert of a partial page"
        );
        let s = self.slot(page);
        self.keys[s] = page;
        self.data[s * self.page_size..(s + 1) * self.page_size].copy_from_slice(contents);
    }

    /// Forgets `page`, if cached (the destination's copy changed by other means, e.g. the
    /// page was sent as zero).
    #[inline]
    pub fn remove(&mut self, page: u64) {
        let s = self.slot(page);
        if self.keys[s] == page {
            self.keys[s] = EMPTY;
        }
    }

    /// Lookups that found their page, and lookups that did not.
    pub fn hit_miss(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn holds_what_was_inserted_and_stays_bounded() {
        let mut c = DeltaCache::new(4 * 4096 + 100, 4096);
        assert_eq!(c.slots(), 4);
        assert_eq!(c.capacity_bytes(), 4 * 4096);
        c.insert(7, &[7u8; 4096]);
        assert_eq!(c.get(7).unwrap()[0], 7);
        assert!(c.get(8).is_none());
        c.remove(7);
        assert!(c.get(7).is_none());
        assert_eq!(c.hit_miss(), (1, 2));
    }

    proptest! {
        /// Whatever the access pattern, a hit returns exactly the last contents inserted for
        /// that page (never another page's data), and at most `slots` pages are held.
        #[test]
        fn hits_are_never_stale_or_foreign(ops in proptest::collection::vec((0u64..64, any::<u8>(), any::<bool>()), 1..300)) {
            let mut c = DeltaCache::new(8 * 64, 64);
            let mut last: HashMap<u64, u8> = HashMap::new();
            for (page, byte, insert) in ops {
                if insert {
                    c.insert(page, &[byte; 64]);
                    last.insert(page, byte);
                } else if let Some(got) = c.get(page) {
                    prop_assert_eq!(got, &[last[&page]; 64][..]);
                }
            }
            let held = (0..64).filter(|&p| c.get(p).is_some()).count();
            prop_assert!(held <= c.slots());
        }
    }
}
