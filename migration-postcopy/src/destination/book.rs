//! The destination's page bookkeeping, without I/O: which pages are present, which were
//! requested, who waits for what, and what it cost them.
//!
//! The fault thread tells it what faulted ([`PageBook::on_faults`]) and gets back the page
//! requests to send (each missing page once, however many threads fault on it) and the
//! pages to wake (present by the time the fault was read); the receiving threads ask
//! whether a page that arrived is still missing ([`PageBook::is_missing`]) and report it
//! placed ([`PageBook::placed`]). While the connection is down
//! ([`PageBook::connection_lost`]) faults are noted and no request is sent; on the new
//! connection ([`PageBook::resumed`]) every page still waited for is requested again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use migration_core::bitmap::DirtyBitmap;
use migration_core::fault::Fault;

use crate::stats::{Origin, PostcopyStats, Recovery};

/// The pages the destination holds at the switch: those pre-copy wrote (`received`) less
/// the discard list (they changed on the source since they were sent). Every other page
/// is fetched, whatever the pre-copy placement left in it (prefaulted zeros).
pub fn present_at_switch(received: DirtyBitmap, discard: &[std::ops::Range<u64>]) -> DirtyBitmap {
    let mut present = received;
    let pages = present.len();
    for r in discard {
        let end = usize::try_from(r.end).unwrap_or(usize::MAX).min(pages);
        let start = usize::try_from(r.start).unwrap_or(usize::MAX).min(end);
        present.clear_range(start..end);
    }
    present
}

/// How many served faults [`PageBook::take_served`] keeps between two calls: a progress
/// callback that is not called for a while must not grow the book without bound.
pub const MAX_UNREPORTED_FAULTS: usize = 4096;

/// A page waited for.
#[derive(Debug)]
struct Wait {
    /// When its first fault was read.
    since: Instant,
    /// Threads blocked on it.
    threads: Vec<u32>,
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct PageBook {
    present: DirtyBitmap,
    /// Requested (or to request on the next connection) and not present yet.
    requested: DirtyBitmap,
    missing: usize,
    waits: HashMap<usize, Wait>,
    /// Threads blocked now, since when.
    blocked: HashMap<u32, Instant>,
    blocktime: HashMap<u32, Duration>,
    /// Since when at least one thread has been blocked.
    any_blocked_since: Option<Instant>,
    connected: bool,
    lost_at: Option<Instant>,
    attempts: u32,
    started: Instant,
    stats: PostcopyStats,
    served: Vec<(u64, Duration)>,
}

impl PageBook {
    /// A book for RAM of `pages` pages of which `present` are there already (received in
    /// pre-copy and not discarded), from the commit at `now`.
    pub fn new(present: DirtyBitmap, now: Instant) -> PageBook {
        let pages = present.len();
        let have = present.count();
        PageBook {
            requested: DirtyBitmap::new(pages),
            missing: pages - have,
            present,
            waits: HashMap::new(),
            blocked: HashMap::new(),
            blocktime: HashMap::new(),
            any_blocked_since: None,
            connected: true,
            lost_at: None,
            attempts: 0,
            started: now,
            served: Vec::new(),
            stats: PostcopyStats {
                pages: crate::stats::PagesByOrigin {
                    precopied: have as u64,
                    ..Default::default()
                },
                ..Default::default()
            },
        }
    }

    /// Pages still missing.
    pub fn missing(&self) -> usize {
        self.missing
    }

    /// Whether every page is present.
    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Whether `page` is still missing (a page that arrives is placed only then).
    pub fn is_missing(&self, page: usize) -> bool {
        page < self.present.len() && !self.present.test(page)
    }

    /// The pages present, for the resume handshake.
    pub fn present(&self) -> &DirtyBitmap {
        &self.present
    }

    /// Takes in faults read at `now`: appends to `requests` the pages to request (each
    /// missing page once; none while the connection is down) and to `wake` the pages that
    /// are present already (their faults raced the placement).
    pub fn on_faults(
        &mut self,
        faults: &[Fault],
        now: Instant,
        requests: &mut Vec<usize>,
        wake: &mut Vec<usize>,
    ) {
        for f in faults {
            self.stats.faults += 1;
            if f.page >= self.present.len() {
                continue;
            }
            if self.present.test(f.page) {
                self.stats.faults_already_served += 1;
                wake.push(f.page);
                continue;
            }
            let thread = f.thread.unwrap_or(0);
            if let std::collections::hash_map::Entry::Vacant(e) = self.blocked.entry(thread) {
                e.insert(now);
                self.any_blocked_since.get_or_insert(now);
            }
            let w = self.waits.entry(f.page).or_insert(Wait {
                since: now,
                threads: Vec::new(),
            });
            if !w.threads.contains(&thread) {
                w.threads.push(thread);
            }
            if self.requested.test_and_set(f.page) {
                if self.connected {
                    requests.push(f.page);
                    self.stats.requests += 1;
                }
            } else {
                self.stats.duplicate_requests_avoided += 1;
            }
        }
    }

    /// `page` is in place now (it came from `origin`); returns the fault latency when
    /// someone waited for it.
    pub fn placed(&mut self, page: usize, origin: Origin, now: Instant) -> Option<Duration> {
        if page >= self.present.len() || !self.present.test_and_set(page) {
            return None;
        }
        self.missing -= 1;
        self.requested.clear(page);
        match origin {
            Origin::Precopied => self.stats.pages.precopied += 1,
            Origin::Pushed => self.stats.pages.pushed += 1,
            Origin::Requested => self.stats.pages.requested += 1,
        }
        let w = self.waits.remove(&page)?;
        let latency = now.saturating_duration_since(w.since);
        self.stats.fault_latency.record(latency);
        if self.served.len() < MAX_UNREPORTED_FAULTS {
            self.served.push((page as u64, latency));
        }
        for t in w.threads {
            if let Some(since) = self.blocked.remove(&t) {
                *self.blocktime.entry(t).or_default() += now.saturating_duration_since(since);
            }
        }
        if self.blocked.is_empty() {
            if let Some(since) = self.any_blocked_since.take() {
                self.stats.blocked_any += now.saturating_duration_since(since);
            }
        }
        Some(latency)
    }

    /// The faults served since the last call, with their latencies, for progress events
    /// (at most [`MAX_UNREPORTED_FAULTS`] between two calls; the histogram has them all).
    pub fn take_served(&mut self) -> Vec<(u64, Duration)> {
        std::mem::take(&mut self.served)
    }

    /// A page arrived that was present already (placed once, by the other channel).
    pub fn duplicate(&mut self) {
        self.stats.duplicate_pages += 1;
    }

    /// The connection broke at `now`: requests wait for the next one.
    pub fn connection_lost(&mut self, now: Instant) {
        if self.connected {
            self.connected = false;
            self.lost_at = Some(now);
            self.attempts = 0;
        }
    }

    /// A connection attempt (of the source's) arrived, whether it works out or not.
    pub fn attempt(&mut self) {
        self.attempts += 1;
    }

    /// A new connection serves pages from `now`: returns the pages to request (again):
    /// after a break, those waited for or requested and lost in flight, each a new
    /// request; on the first connection, those faulted on before it could carry requests,
    /// counted already when they faulted.
    pub fn resumed(&mut self, now: Instant) -> Vec<usize> {
        let again: Vec<usize> = self.requested.iter_ones().collect();
        if !self.connected {
            self.connected = true;
            if let Some(lost) = self.lost_at.take() {
                self.stats.recoveries.push(Recovery {
                    duration: now.saturating_duration_since(lost),
                    attempts: self.attempts.max(1),
                });
            }
            self.stats.requests += again.len() as u64;
        }
        again
    }

    /// A recovery that happened before this book served pages (a break before the commit).
    pub fn record_recovery(&mut self, r: Recovery) {
        self.stats.recoveries.push(r);
    }

    /// Whether requests go out now.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The statistics, as of `now`.
    pub fn stats(&self, now: Instant) -> PostcopyStats {
        let mut s = self.stats.clone();
        let mut by_thread: Vec<(u32, Duration)> =
            self.blocktime.iter().map(|(t, d)| (*t, *d)).collect();
        // Threads still blocked count up to now.
        for (t, since) in &self.blocked {
            let d = now.saturating_duration_since(*since);
            match by_thread.iter_mut().find(|(x, _)| x == t) {
                Some((_, acc)) => *acc += d,
                None => by_thread.push((*t, d)),
            }
        }
        by_thread.sort_unstable();
        s.blocktime_by_thread = by_thread;
        if let Some(since) = self.any_blocked_since {
            s.blocked_any += now.saturating_duration_since(since);
        }
        s.postcopy_time = now.saturating_duration_since(self.started);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fault(page: usize, thread: u32) -> Fault {
        Fault {
            page,
            thread: Some(thread),
            write: false,
        }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn discarded_pages_are_fetched_again_and_a_discard_past_the_end_is_ignored() {
        let mut received = DirtyBitmap::new(16);
        received.set_range(0..12);
        let present = present_at_switch(received, &[2..4, 9..10, 14..100, u64::MAX - 1..u64::MAX]);
        assert_eq!(
            present.iter_runs().collect::<Vec<_>>(),
            vec![0..2, 4..9, 10..12]
        );
        let t0 = Instant::now();
        let mut b = PageBook::new(present, t0);
        let (mut req, mut wake) = (Vec::new(), Vec::new());
        b.on_faults(&[fault(3, 1), fault(5, 1)], t0, &mut req, &mut wake);
        assert_eq!((req, wake), (vec![3], vec![5]));
    }

    #[test]
    fn each_missing_page_is_requested_once_however_many_threads_fault_on_it() {
        let t0 = Instant::now();
        let mut present = DirtyBitmap::new(16);
        present.set(3);
        let mut b = PageBook::new(present, t0);
        assert_eq!(b.missing(), 15);
        let (mut req, mut wake) = (Vec::new(), Vec::new());
        b.on_faults(
            &[fault(5, 1), fault(5, 2), fault(3, 3), fault(7, 1)],
            t0,
            &mut req,
            &mut wake,
        );
        assert_eq!(req, vec![5, 7]);
        assert_eq!(wake, vec![3], "present already: woken, not requested");
        // A later fault on a page in flight sends nothing either.
        req.clear();
        b.on_faults(&[fault(7, 4)], at(t0, 1), &mut req, &mut wake);
        assert!(req.is_empty());
        let s = b.stats(t0);
        assert_eq!(
            (
                s.faults,
                s.requests,
                s.duplicate_requests_avoided,
                s.faults_already_served
            ),
            (5, 2, 2, 1)
        );
    }

    #[test]
    fn a_page_placed_ends_every_wait_on_it_and_counts_latency_and_blocktime() {
        let t0 = Instant::now();
        let mut b = PageBook::new(DirtyBitmap::new(8), t0);
        let (mut req, mut wake) = (Vec::new(), Vec::new());
        b.on_faults(
            &[fault(1, 10), fault(1, 11)],
            at(t0, 2),
            &mut req,
            &mut wake,
        );
        b.on_faults(&[fault(2, 12)], at(t0, 4), &mut req, &mut wake);
        assert_eq!(
            b.placed(1, Origin::Requested, at(t0, 5)),
            Some(Duration::from_millis(3))
        );
        // The push brought page 2 first; the requested copy that follows is a duplicate.
        assert_eq!(
            b.placed(2, Origin::Pushed, at(t0, 10)),
            Some(Duration::from_millis(6))
        );
        assert!(!b.is_missing(2));
        assert_eq!(b.placed(2, Origin::Requested, at(t0, 11)), None);
        let s = b.stats(at(t0, 20));
        assert_eq!(s.fault_latency.count(), 2);
        assert_eq!(
            s.blocktime_by_thread,
            vec![
                (10, Duration::from_millis(3)),
                (11, Duration::from_millis(3)),
                (12, Duration::from_millis(6))
            ]
        );
        // Blocked from 2 ms to 10 ms, with overlaps counted once.
        assert_eq!(s.blocked_any, Duration::from_millis(8));
        assert_eq!((s.pages.requested, s.pages.pushed), (1, 1));
        assert_eq!(b.missing(), 6);
    }

    #[test]
    fn faults_during_a_cut_are_requested_again_on_the_new_connection() {
        let t0 = Instant::now();
        let mut b = PageBook::new(DirtyBitmap::new(8), t0);
        let (mut req, mut wake) = (Vec::new(), Vec::new());
        // Requested before the cut, and lost with it.
        b.on_faults(&[fault(1, 1)], t0, &mut req, &mut wake);
        assert_eq!(req, vec![1]);
        b.connection_lost(at(t0, 1));
        req.clear();
        b.on_faults(&[fault(4, 2), fault(1, 3)], at(t0, 2), &mut req, &mut wake);
        assert!(req.is_empty(), "no request while the connection is down");
        b.attempt();
        b.attempt();
        assert_eq!(b.resumed(at(t0, 50)), vec![1, 4]);
        let s = b.stats(at(t0, 50));
        assert_eq!(
            s.recoveries,
            vec![Recovery {
                duration: Duration::from_millis(49),
                attempts: 2
            }]
        );
        // One request before the cut, two again after it.
        assert_eq!(s.requests, 3);
        // A second cut, during the recovery's page service.
        b.connection_lost(at(t0, 60));
        assert_eq!(b.resumed(at(t0, 70)), vec![1, 4]);
        assert_eq!(b.stats(at(t0, 70)).recoveries.len(), 2);
        assert_eq!(b.stats(at(t0, 70)).requests, 5);
    }

    #[test]
    fn a_fault_before_the_first_connection_is_sent_on_it_and_counted_once() {
        let t0 = Instant::now();
        let mut b = PageBook::new(DirtyBitmap::new(8), t0);
        let (mut req, mut wake) = (Vec::new(), Vec::new());
        // The fault thread runs before page service has a channel to send on.
        b.on_faults(&[fault(3, 1)], t0, &mut req, &mut wake);
        assert_eq!(req, vec![3]);
        assert_eq!(
            b.resumed(at(t0, 1)),
            vec![3],
            "sent on the first connection"
        );
        let s = b.stats(at(t0, 1));
        assert_eq!((s.requests, s.recoveries.len()), (1, 0), "{s:?}");
        b.placed(3, Origin::Requested, at(t0, 2));
        assert_eq!(b.stats(at(t0, 2)).fault_latency.count(), 1);
    }

    proptest! {
        /// Whatever the order of faults, arrivals and cuts, every page is placed once,
        /// `missing` counts what is not present, and every page waited for is either
        /// requested on the current connection or present.
        #[test]
        fn the_book_stays_consistent(ops in proptest::collection::vec((0u8..4, 0usize..32, 0u32..4), 1..200)) {
            let t0 = Instant::now();
            let mut b = PageBook::new(DirtyBitmap::new(32), t0);
            let mut placed = std::collections::HashSet::new();
            let mut outstanding = std::collections::HashSet::new();
            for (i, (op, page, thread)) in ops.into_iter().enumerate() {
                let now = t0 + Duration::from_micros(i as u64);
                match op {
                    0 => {
                        let (mut req, mut wake) = (Vec::new(), Vec::new());
                        b.on_faults(&[fault(page, thread)], now, &mut req, &mut wake);
                        for p in req {
                            prop_assert!(outstanding.insert(p), "page {} requested twice", p);
                        }
                    }
                    1 => {
                        let fresh = b.is_missing(page);
                        b.placed(page, Origin::Pushed, now);
                        prop_assert_eq!(fresh, placed.insert(page));
                        outstanding.remove(&page);
                    }
                    2 => { b.connection_lost(now); }
                    _ => {
                        for p in b.resumed(now) {
                            outstanding.insert(p);
                        }
                    }
                }
                prop_assert_eq!(b.missing(), 32 - placed.len());
            }
        }
    }
}
