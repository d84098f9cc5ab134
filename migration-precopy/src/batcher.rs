//! Pages on their way into page-batch records: what is queued, how each page is encoded,
//! and the delta cache that encoding works against, in one component that owns all three.
//!
//! The one rule the delta cache lives by: for every page it holds, it holds exactly the
//! bytes the destination last received for that page. A delta is computed against the
//! cached copy and applied on the destination's copy, so a cached copy that is not the
//! destination's corrupts the page silently. Keeping the queue, the encoder and the cache
//! together, and taking the pass kind with the pages it applies to, is what keeps the rule:
//! every page that leaves through [`PageBatcher::encode`] either updates its cache entry
//! or drops it.
//!
//! # Reading guest RAM
//!
//! The guest writes its RAM while pages are read. Each page is copied once, and everything
//! that decides what is sent looks at the copy, never at guest RAM again, so a page changing
//! meanwhile can never make the encoded form disagree with itself. Without an encoder a
//! page goes straight from guest RAM into the batch buffer, where the zero check and the CRC
//! read it ([`PageBatchWriter::push_raw_from`]); with zstd or delta encoding, one run of
//! contiguous pages at a time is copied out with `vm-memory`'s `VolatileSlice::copy_to` into
//! a scratch buffer owned here, and encoded from there (the delta cache keeps exactly the
//! bytes sent). A page torn by a concurrent write is dirty in the tracker and is sent again.

use std::ops::Range;

use bytes::BytesMut;
use migration_core::geometry::{GuestRam, RamAccessError};
use migration_core::layout::RamLayout;
use migration_core::page::{EncodedPage, PageEncoder, PageError};
use migration_core::stats::PageCounts;
use migration_core::stream::PageBatchWriter;
use vm_memory::GuestMemoryBackend;

use crate::cache::DeltaCache;

/// Which kind of pass the queued pages belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PassKind {
    /// The first, full pass: nothing is cached yet and nothing is worth caching (caching
    /// every page of RAM would only thrash the cache).
    Bulk,
    /// A pass over pages sent before: deltas against the cached copy, and the cache learns
    /// what is sent.
    Resend,
}

/// Zero-page entries per record when a run is known to be zero without looking: 9 bytes
/// an entry, so a record of 16 Ki zero pages is 147 KiB on the wire.
pub(crate) const ZERO_RUN_PAGES: usize = 16 << 10;

/// Queues pages into batches of at most `batch_pages` and encodes them into page-batch
/// records.
pub(crate) struct PageBatcher {
    page_size: usize,
    batch_pages: usize,
    /// Page runs of the batch being built, each within one RAM region.
    pending: Vec<Range<usize>>,
    pending_pages: usize,
    encoder: Option<PageEncoder>,
    /// Private copies of the pending pages, for the encoder (empty without one).
    scratch: Vec<u8>,
    cache: Option<DeltaCache>,
}

impl std::fmt::Debug for PageBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBatcher")
            .field("batch_pages", &self.batch_pages)
            .field("pending_pages", &self.pending_pages)
            .field("encoder", &self.encoder.is_some())
            .field(
                "delta_cache",
                &self.cache.as_ref().map(DeltaCache::capacity_bytes),
            )
            .finish_non_exhaustive()
    }
}

impl PageBatcher {
    /// A batcher for pages of `page_size` bytes, encoding with zstd at `zstd_level` and
    /// against a delta cache of `delta_cache_bytes`, where given.
    pub(crate) fn new(
        page_size: usize,
        batch_pages: usize,
        zstd_level: Option<i32>,
        delta_cache_bytes: Option<usize>,
    ) -> Result<Self, PageError> {
        let encoder = if zstd_level.is_some() || delta_cache_bytes.is_some() {
            Some(PageEncoder::new(page_size, zstd_level)?)
        } else {
            None
        };
        Ok(PageBatcher {
            page_size,
            batch_pages,
            pending: Vec::with_capacity(batch_pages),
            pending_pages: 0,
            scratch: if encoder.is_some() {
                vec![0; batch_pages * page_size]
            } else {
                Vec::new()
            },
            encoder,
            cache: delta_cache_bytes.map(|b| DeltaCache::new(b, page_size)),
        })
    }

    /// Bytes a full batch takes on the wire at most: what a send buffer must hold.
    pub(crate) fn max_record_len(&self) -> usize {
        self.batch_pages * (self.page_size + 16) + 4096
    }

    /// Pages queued.
    pub(crate) fn pending_pages(&self) -> usize {
        self.pending_pages
    }

    /// Whether a full batch is queued.
    pub(crate) fn is_full(&self) -> bool {
        self.pending_pages >= self.batch_pages
    }

    /// Queues the start of `run`, as much as fits in the batch, and returns the rest.
    pub(crate) fn queue(&mut self, layout: &RamLayout, run: Range<usize>) -> Range<usize> {
        let room = self.batch_pages - self.pending_pages;
        let end = run.end.min(run.start + room);
        // Keep each piece within one RAM region: one volatile copy per piece.
        for (_, piece) in layout.split_at_regions(run.start..end) {
            self.pending_pages += piece.len();
            self.pending.push(piece);
        }
        end..run.end
    }

    /// Encodes the queued pages, which belong to a pass of `kind`, into one page-batch
    /// record appended to `buf`, and empties the queue. Returns the pages by encoding.
    pub(crate) fn encode<M: GuestMemoryBackend>(
        &mut self,
        ram: &GuestRam<'_, M>,
        kind: PassKind,
        buf: &mut BytesMut,
    ) -> Result<PageCounts, RamAccessError> {
        let mut counts = PageCounts::default();
        if self.pending_pages == 0 {
            return Ok(counts);
        }
        let ps = self.page_size;
        let r = match self.encoder.as_mut() {
            Some(enc) => {
                let mut off = 0;
                for piece in &self.pending {
                    let n = piece.len();
                    let slice = ram.pages_slice(piece.start, n)?;
                    // Volatile copy: the guest may be writing these pages right now.
                    slice.copy_to(&mut self.scratch[off..off + n * ps]);
                    off += n * ps;
                }
                let mut w = PageBatchWriter::new(buf, ps as u32);
                let mut off = 0;
                for idx in self.pending.iter().flat_map(Clone::clone) {
                    let page = &self.scratch[off..off + ps];
                    off += ps;
                    let index = idx as u64;
                    let prev = match (&mut self.cache, kind) {
                        (Some(c), PassKind::Resend) => c.get(index),
                        _ => None,
                    };
                    let e = enc.encode(page, prev);
                    match e {
                        EncodedPage::Zero => counts.zero += 1,
                        EncodedPage::Raw(_) => counts.raw += 1,
                        EncodedPage::Zstd(_) => counts.zstd += 1,
                        EncodedPage::Delta(_) => counts.delta += 1,
                    }
                    let zero = matches!(e, EncodedPage::Zero);
                    w.push(index, e);
                    if let Some(c) = &mut self.cache {
                        // The destination now has `page` (or zero): the cache must hold
                        // that, or nothing.
                        match kind {
                            PassKind::Resend if !zero => c.insert(index, page),
                            _ => c.remove(index),
                        }
                    }
                }
                w.finish();
                Ok(())
            }
            None => {
                // Raw pages go from guest RAM straight into the batch: one copy, not two.
                let mut w = PageBatchWriter::new(buf, ps as u32);
                let mut r = Ok(());
                for piece in &self.pending {
                    // Checks that the piece lies in guest RAM (in one region, as split).
                    let slice = match ram.pages_slice(piece.start, piece.len()) {
                        Ok(s) => s,
                        Err(e) => {
                            r = Err(e);
                            break;
                        }
                    };
                    let base = slice.ptr_guard().as_ptr();
                    for (i, idx) in piece.clone().enumerate() {
                        // SAFETY: the piece's `len()` pages lie in one mapping from `base`,
                        // which lives as long as `ram`; the guest may write them meanwhile,
                        // which `push_raw_from` allows for.
                        if unsafe { w.push_raw_from(idx as u64, base.add(i * ps)) } {
                            counts.zero += 1;
                        } else {
                            counts.raw += 1;
                        }
                    }
                }
                w.finish();
                r
            }
        };
        self.pending.clear();
        self.pending_pages = 0;
        r.map(|()| counts)
    }

    /// Appends a record of zero-page entries for `run` (at most [`ZERO_RUN_PAGES`] pages),
    /// pages known to be zero without reading them. Only for the bulk pass: no page is
    /// cached before it, so the cache has nothing to forget.
    pub(crate) fn encode_zero_run(&self, run: Range<usize>, buf: &mut BytesMut) {
        debug_assert!(run.len() <= ZERO_RUN_PAGES);
        let mut w = PageBatchWriter::new(buf, self.page_size as u32);
        for idx in run {
            w.push_zero(idx as u64);
        }
        w.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::page::PageDecoder;
    use migration_core::stream::{
        DecoderOptions, Direction, Frame, Record, StreamDecoder, StreamHeader,
    };
    use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

    /// Applies the page-batch records in `buf` onto `dst`, one page per index, as a
    /// destination does.
    fn apply(buf: &BytesMut, dst: &mut [Vec<u8>]) {
        let mut framed = BytesMut::new();
        StreamHeader::new([0; 16]).encode(Direction::Migration, &mut framed);
        framed.extend_from_slice(buf);
        let mut dec = StreamDecoder::new(DecoderOptions::default());
        let mut pd = PageDecoder::new().unwrap();
        while let Some(f) = dec.decode(&mut framed).unwrap() {
            if let Frame::Record(Record::PageBatch(b)) = f {
                for p in b.pages {
                    pd.apply(p.data.as_encoded(), &mut dst[p.index as usize])
                        .unwrap();
                }
            }
        }
    }

    /// A byte that changes and changes back (a lock word), in a page re-sent once in a
    /// full batch and once alone in the last, partial batch of a pass: the destination
    /// must end with the source's bytes whatever the batch boundaries.
    #[test]
    fn partial_batches_of_resend_passes_keep_the_delta_cache_true() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * 4096)]).unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        let mut b = PageBatcher::new(4096, 4, None, Some(1 << 20)).unwrap();
        let mut dst = vec![vec![0u8; 4096]; 8];
        let mut deltas = 0;
        let mut src = [0u8; 4096];
        mem.write_slice(&[7u8; 8 * 4096], GuestAddress(0)).unwrap();
        for pass in 0..6 {
            let word = if pass % 2 == 0 { 0xff } else { 0 };
            mem.write_slice(&[word; 8], GuestAddress(64)).unwrap();
            let kind = if pass == 0 {
                PassKind::Bulk
            } else {
                PassKind::Resend
            };
            // Page 0 with pages 1-3 (one full batch), or alone after pages 4-7.
            let runs: &[(usize, usize)] = if pass % 2 == 0 {
                &[(0, 4)]
            } else {
                &[(4, 8), (0, 1)]
            };
            let mut buf = BytesMut::new();
            for &(start, end) in runs {
                let mut rest = start..end;
                while !rest.is_empty() {
                    rest = b.queue(ram.layout(), rest);
                    if b.is_full() {
                        deltas += b.encode(&ram, kind, &mut buf).unwrap().delta;
                    }
                }
            }
            deltas += b.encode(&ram, kind, &mut buf).unwrap().delta;
            assert_eq!(b.pending_pages(), 0);
            apply(&buf, &mut dst);
            mem.read_slice(&mut src, GuestAddress(0)).unwrap();
            assert!(dst[0] == src, "page 0 differs after pass {pass}");
        }
        assert!(deltas >= 2, "re-sent pages went as deltas ({deltas})");
    }
}
