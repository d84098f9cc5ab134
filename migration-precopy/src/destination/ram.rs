//! Received pages into guest RAM: decoding, and how pages reach RAM this side never
//! touched ([`Placement`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use migration_core::bitmap::DirtyBitmap;
use migration_core::geometry::GuestRam;
use migration_core::page::{EncodedPage, PageDecoder};
use migration_core::place::FreshPages;
use migration_core::stats::PageCounts;
use migration_core::stream::{PageBatch, PageData};
use vm_memory::{Bytes as _, GuestMemoryBackend};

use super::{DestinationError, PageWriteError, Placement};

/// Puts received pages into guest RAM and keeps track of which pages it wrote.
pub(crate) struct RamWriter<'r, 'm, M: GuestMemoryBackend> {
    ram: &'r GuestRam<'m, M>,
    fresh: Option<FreshPages>,
    prefault: Option<Prefaulter>,
    /// Pages written so far: a zero page for a page never written needs no write, fresh
    /// guest RAM is zero already (and stays unallocated).
    written: DirtyBitmap,
    /// Pages whose content arrived: written, or zero pages (which fresh RAM already is).
    received: DirtyBitmap,
    decoder: PageDecoder,
    scratch: Vec<u8>,
    zero: Vec<u8>,
}

impl<'r, 'm, M: GuestMemoryBackend> RamWriter<'r, 'm, M> {
    /// A writer into `ram`, which must be all zero (fresh memory), placing pages as
    /// `placement` asks where the kernel allows it. Returns the placement used.
    pub(crate) fn new(
        ram: &'r GuestRam<'m, M>,
        placement: Placement,
    ) -> Result<(Self, Placement), DestinationError> {
        let ps = ram.layout().page_size() as usize;
        let decoder = PageDecoder::new().map_err(|e| DestinationError::Page {
            page: 0,
            source: PageWriteError::Decode(e),
        })?;
        let fresh = if placement == Placement::Userfaultfd {
            FreshPages::register(ram)
                .map_err(|e| {
                    tracing::debug!(error = %e, "no userfaultfd placement; prefaulting");
                })
                .ok()
        } else {
            None
        };
        let prefault = if placement != Placement::Write && fresh.is_none() {
            Prefaulter::start(ram)
        } else {
            None
        };
        let used = match (&fresh, &prefault) {
            (Some(_), _) => Placement::Userfaultfd,
            (None, Some(_)) => Placement::Prefault,
            (None, None) => Placement::Write,
        };
        Ok((
            RamWriter {
                ram,
                fresh,
                prefault,
                written: DirtyBitmap::new(ram.layout().page_count()),
                received: DirtyBitmap::new(ram.layout().page_count()),
                decoder,
                scratch: vec![0; ps],
                zero: vec![0; ps],
            },
            used,
        ))
    }

    /// Puts the pages of `batch` into guest RAM. Returns them by encoding.
    pub(crate) fn place(&mut self, batch: &PageBatch) -> Result<PageCounts, DestinationError> {
        if let (Some(pf), Some(last)) = (self.prefault.as_mut(), batch.pages.last()) {
            if !matches!(last.data, PageData::Zero) {
                pf.ahead_of(last.index as usize);
            }
        }
        let mut counts = PageCounts::default();
        let ps = self.scratch.len();
        for p in &batch.pages {
            let err = |source| DestinationError::Page {
                page: p.index,
                source,
            };
            let idx = usize::try_from(p.index).map_err(|_| err(PageWriteError::OutsideRam))?;
            let host = self
                .ram
                .host_address(idx)
                .map_err(|_| err(PageWriteError::OutsideRam))?;
            self.received.set(idx);
            match &p.data {
                PageData::Zero => {
                    counts.zero += 1;
                    // Untouched RAM reads as zero already (and stays unallocated).
                    if self.written.test(idx) {
                        // SAFETY: `host` starts page `idx` of guest RAM.
                        unsafe {
                            put_page(
                                self.fresh.as_ref(),
                                &mut self.written,
                                idx,
                                host,
                                &self.zero,
                            )
                        }
                        .map_err(err)?;
                    }
                }
                PageData::Raw(d) => {
                    counts.raw += 1;
                    if d.len() != ps {
                        return Err(err(PageWriteError::RawLength(d.len())));
                    }
                    // SAFETY: `host` starts page `idx` of guest RAM.
                    unsafe { put_page(self.fresh.as_ref(), &mut self.written, idx, host, d) }
                        .map_err(err)?;
                }
                PageData::Zstd(_) | PageData::Delta(_) => {
                    let enc: EncodedPage<'_> = p.data.as_encoded();
                    if matches!(enc, EncodedPage::Delta(_)) {
                        counts.delta += 1;
                        // A delta applies onto the copy this side holds: zero for a page
                        // never written (which, registered for placement, must not be
                        // read).
                        if self.written.test(idx) {
                            let gpa = self
                                .ram
                                .gpa(idx)
                                .map_err(|_| err(PageWriteError::OutsideRam))?;
                            self.ram
                                .memory()
                                .read_slice(&mut self.scratch, gpa)
                                .map_err(|e| err(PageWriteError::Memory(e)))?;
                        } else {
                            self.scratch.fill(0);
                        }
                    } else {
                        counts.zstd += 1;
                    }
                    self.decoder
                        .apply(enc, &mut self.scratch)
                        .map_err(|e| err(PageWriteError::Decode(e)))?;
                    // SAFETY: `host` starts page `idx` of guest RAM.
                    unsafe {
                        put_page(
                            self.fresh.as_ref(),
                            &mut self.written,
                            idx,
                            host,
                            &self.scratch,
                        )
                    }
                    .map_err(err)?;
                }
            }
        }
        Ok(counts)
    }

    /// A pass ended. The bulk pass put every non-zero page in place; what later passes
    /// re-send was faulted in then, and faulting ahead during the stop-and-copy would only
    /// lengthen the downtime.
    pub(crate) fn pass_ended(&mut self) {
        self.prefault = None;
    }

    /// The pages whose content arrived so far (written, or zero).
    pub(crate) fn into_received(self) -> DirtyBitmap {
        self.received
    }

    /// Everything arrived: RAM becomes ordinary memory again before anything reads it
    /// (pages never sent are zero).
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        self.prefault = None;
        match self.fresh.take() {
            Some(f) => f.finish(),
            None => Ok(()),
        }
    }
}

/// Writes one received page, `data`, into guest RAM at `host`: placed with `UFFDIO_COPY`
/// where the page was never written and `fresh` is registered, else copied in.
///
/// # Safety
/// `host` starts page `idx` of the guest RAM `fresh` registered (when given), a mapping
/// of `data.len()` bytes that outlives the call; the guest is not running, so nothing
/// else touches the page.
unsafe fn put_page(
    fresh: Option<&FreshPages>,
    written: &mut DirtyBitmap,
    idx: usize,
    host: *mut u8,
    data: &[u8],
) -> Result<(), PageWriteError> {
    if let (false, Some(f)) = (written.test(idx), fresh) {
        // SAFETY: `host` starts a page of the RAM `f` registered (the caller's contract).
        let placed = unsafe { f.place(host, data) }.map_err(PageWriteError::Place)?;
        if placed {
            written.set(idx);
            return Ok(());
        }
        // Present already (RAM someone touched): written below like any other.
    }
    // SAFETY: the caller's contract. Not through `write_slice`: its dirty-bitmap update, an
    // atomic read-modify-write, waits for the whole page's stores to drain, page after
    // page, and the destination's own writes are not guest dirtying anyway.
    unsafe { copy_page_nt(data.as_ptr(), host, data.len()) };
    written.set(idx);
    Ok(())
}

/// Copies a page into guest RAM with non-temporal stores where the CPU has them: the
/// destination writes each page once and does not read it again, so filling the cache
/// with it (and first reading every line in from memory, as ordinary stores do) only
/// costs memory bandwidth.
///
/// # Safety
/// `src` valid for `len` bytes of reads, `dst` for `len` bytes of writes, not
/// overlapping; `dst` 16-byte aligned and `len` a multiple of 64 for the fast path.
#[inline]
unsafe fn copy_page_nt(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        if (dst as usize) % 16 == 0 && len % 64 == 0 {
            let (s, d) = (src.cast::<__m128i>(), dst.cast::<__m128i>());
            let mut i = 0;
            while i < len / 16 {
                // SAFETY: in bounds by the caller's contract; SSE2 is part of x86_64.
                unsafe {
                    let a = _mm_loadu_si128(s.add(i));
                    let b = _mm_loadu_si128(s.add(i + 1));
                    let c = _mm_loadu_si128(s.add(i + 2));
                    let e = _mm_loadu_si128(s.add(i + 3));
                    _mm_stream_si128(d.add(i), a);
                    _mm_stream_si128(d.add(i + 1), b);
                    _mm_stream_si128(d.add(i + 2), c);
                    _mm_stream_si128(d.add(i + 3), e);
                }
                i += 4;
            }
            // Streaming stores are weakly ordered: fence them before anything else may
            // look at the page.
            // SAFETY: a fence has no preconditions; SSE is part of x86_64.
            unsafe { _mm_sfence() };
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Faults destination RAM in ahead of the receiving thread (see
/// [`Placement::Prefault`]).
struct Prefaulter {
    tx: Option<std::sync::mpsc::SyncSender<(usize, usize)>>,
    /// Asks the helper to give up what is still queued.
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Chunks (of `CHUNK_PAGES` pages) already asked for.
    asked: DirtyBitmap,
    /// (host address, length) of each chunk, `None` where it is not one mapping.
    chunks: Vec<Option<(usize, usize)>>,
}

/// 2 MiB of 4 KiB pages.
const CHUNK_PAGES: usize = 512;
/// How far ahead of the last non-zero page to fault in.
const AHEAD_CHUNKS: usize = 4;
/// Bytes populated per `madvise`, between checks of the stop flag.
const PREFAULT_STEP: usize = 256 << 10;

impl Prefaulter {
    fn start<M: GuestMemoryBackend>(ram: &GuestRam<'_, M>) -> Option<Prefaulter> {
        let layout = ram.layout();
        let n = layout.page_count().div_ceil(CHUNK_PAGES);
        let mut chunks = Vec::with_capacity(n);
        for c in 0..n {
            let first = c * CHUNK_PAGES;
            let end = (first + CHUNK_PAGES).min(layout.page_count());
            // One piece per chunk within one region; chunks that straddle two regions are
            // left to ordinary faults.
            let mut pieces = layout.split_at_regions(first..end);
            let chunk = match (pieces.next(), pieces.next()) {
                (Some((_, r)), None) => ram
                    .host_address(r.start)
                    .ok()
                    .map(|h| (h as usize, r.len() * layout.page_size() as usize)),
                _ => None,
            };
            chunks.push(chunk);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, usize)>(64);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("precopy-prefault".into())
            .spawn(move || {
                for (addr, len) in rx {
                    // In steps, so that a stop request waits for one step at most.
                    for off in (0..len).step_by(PREFAULT_STEP) {
                        if stopped.load(Ordering::Relaxed) {
                            return;
                        }
                        let n = PREFAULT_STEP.min(len - off);
                        // SAFETY: `addr..addr+len` lies in a mapping of guest RAM that
                        // outlives this thread (the receiver joins it before it returns).
                        // Populating for write never changes the contents of a page: a
                        // present page is left as it is, an absent one becomes the zero
                        // page it reads as anyway, so racing with the receiver's writes is
                        // harmless.
                        let rc = unsafe {
                            libc::madvise(
                                (addr + off) as *mut libc::c_void,
                                n,
                                libc::MADV_POPULATE_WRITE,
                            )
                        };
                        if rc != 0 {
                            // Kernels before 5.14 lack it; faults then happen on first write.
                            tracing::debug!(err = %io::Error::last_os_error(), "MADV_POPULATE_WRITE");
                            return;
                        }
                    }
                }
            })
            .ok()?;
        Some(Prefaulter {
            tx: Some(tx),
            stop,
            thread: Some(thread),
            asked: DirtyBitmap::new(n),
            chunks,
        })
    }

    /// A non-zero page was received at `page`: fault in the chunks after it.
    fn ahead_of(&mut self, page: usize) {
        let c = page / CHUNK_PAGES;
        for c in c..(c + 1 + AHEAD_CHUNKS).min(self.chunks.len()) {
            if !self.asked.test_and_set(c) {
                continue;
            }
            if let (Some(chunk), Some(tx)) = (self.chunks[c], self.tx.as_ref()) {
                // Never block the receiver: a full queue means the helper is behind anyway.
                let _ = tx.try_send(chunk);
            }
        }
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_temporal_page_copy_copies_exactly() {
        let src: Vec<u8> = (0..4096 + 64).map(|i| (i * 31 + 7) as u8).collect();
        // An aligned destination (the fast path) and an unaligned one (the fallback), from
        // aligned and unaligned sources.
        let mut dst = vec![0u8; 4096 + 128];
        for s_off in [0, 1, 9] {
            for d_off in [0, 3] {
                dst.iter_mut().for_each(|b| *b = 0xee);
                let base = dst.as_mut_ptr().align_offset(64);
                let d = base + d_off;
                // SAFETY: both ranges are in bounds and do not overlap.
                unsafe { copy_page_nt(src.as_ptr().add(s_off), dst.as_mut_ptr().add(d), 4096) };
                assert_eq!(&dst[d..d + 4096], &src[s_off..s_off + 4096]);
                assert!(dst[..d].iter().all(|&b| b == 0xee), "wrote before the page");
                assert!(
                    dst[d + 4096..].iter().all(|&b| b == 0xee),
                    "wrote past the page"
                );
            }
        }
    }
}
