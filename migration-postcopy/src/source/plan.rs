//! The source's push plan, without I/O: which pages the destination still lacks, and in
//! which order the background push sends them.
//!
//! The push goes in address order from a cursor; a page request moves the cursor to just
//! after the requested pages (the guest tends to touch what lies next to what it just
//! touched), and the requested pages leave on the urgent channel, so the push skips them.
//! After a broken connection the destination's received-pages bitmap says what it lacks,
//! whatever was in flight when the connection broke.

use std::ops::Range;

use migration_core::bitmap::DirtyBitmap;

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct PushPlan {
    need: DirtyBitmap,
    remaining: usize,
    cursor: usize,
}

impl PushPlan {
    /// A plan that sends every page set in `need`.
    pub fn new(need: DirtyBitmap) -> PushPlan {
        PushPlan {
            remaining: need.count(),
            need,
            cursor: 0,
        }
    }

    /// Pages still to send.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Whether every page was sent.
    pub fn is_done(&self) -> bool {
        self.remaining == 0
    }

    /// Takes the next run of at most `max` pages still to send, from the cursor on
    /// (wrapping around once), and marks them sent.
    pub fn next_run(&mut self, max: usize) -> Option<Range<usize>> {
        if self.remaining == 0 || max == 0 {
            return None;
        }
        let start = self
            .need
            .next_set(self.cursor)
            .or_else(|| self.need.next_set(0))?;
        let end = self
            .need
            .next_clear(start)
            .min(self.need.len())
            .min(start + max);
        self.need.clear_range(start..end);
        self.remaining -= end - start;
        self.cursor = end;
        Some(start..end)
    }

    /// The destination asked for `pages`: they go on the urgent channel (whether or not
    /// they were pushed already: the request may be quicker than what is queued), and the
    /// push goes on after them.
    pub fn requested(&mut self, pages: Range<usize>) {
        let end = pages.end.min(self.need.len());
        let start = pages.start.min(end);
        let had = self.need.count_range(start..end);
        self.need.clear_range(start..end);
        self.remaining -= had;
        self.cursor = end;
    }

    /// After a broken connection: the destination holds the pages set in `received`, and
    /// every other page is to be sent again.
    pub fn resume(&mut self, received: &DirtyBitmap) {
        let mut need = DirtyBitmap::new_full(received.len());
        need.subtract(received);
        self.remaining = need.count();
        self.need = need;
        self.cursor = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_push_goes_in_order_and_restarts_after_each_request() {
        let mut need = DirtyBitmap::new(100);
        need.set_range(0..100);
        let mut p = PushPlan::new(need);
        assert_eq!(p.next_run(10), Some(0..10));
        p.requested(50..51);
        assert_eq!(
            p.next_run(10),
            Some(51..61),
            "locality: right after the request"
        );
        assert_eq!(p.next_run(100), Some(61..100));
        assert_eq!(p.next_run(100), Some(10..50), "then what was skipped");
        assert_eq!(p.next_run(100), None);
        assert!(p.is_done());
        // A request for a page pushed already changes no count.
        p.requested(5..6);
        assert_eq!(p.remaining(), 0);
        let mut received = DirtyBitmap::new(100);
        received.set_range(0..90);
        p.resume(&received);
        assert_eq!(p.remaining(), 10);
        assert_eq!(p.next_run(100), Some(90..100));
    }

    proptest! {
        /// Whatever the requests, every page needed is handed out exactly once, by the
        /// push or by a request.
        #[test]
        fn every_page_leaves_once(pages in 1usize..300, reqs in proptest::collection::vec((0usize..300, 1usize..4), 0..40), max in 1usize..50) {
            let mut need = DirtyBitmap::new(pages);
            need.set_range(0..pages);
            let mut p = PushPlan::new(need);
            let mut sent = vec![0u32; pages];
            let mut reqs = reqs.into_iter();
            while let Some(r) = p.next_run(max) {
                for i in r {
                    sent[i] += 1;
                }
                if let Some((s, n)) = reqs.next() {
                    let s = s % pages;
                    let e = (s + n).min(pages);
                    // Pages requested after they were pushed are sent again on the urgent
                    // channel; only first sends are counted here.
                    for (i, c) in sent.iter_mut().enumerate().take(e).skip(s) {
                        let _ = i;
                        if *c == 0 {
                            *c = 1;
                        }
                    }
                    p.requested(s..e);
                }
            }
            prop_assert!(sent.iter().all(|&c| c == 1), "{:?}", sent);
            prop_assert!(p.is_done());
        }
    }
}
