//! Single-page codecs: zero-page detection, zstd compression and delta encoding.
//!
//! These are plain functions and small reusable contexts, so the hot path of an engine
//! (hundreds of thousands of pages per second) allocates nothing per page:
//!
//! - [`is_zero_page`] tests a page for all-zero bytes at L1/L2 speed;
//! - [`ZstdCompressor`] / [`ZstdDecompressor`] keep one zstd context each and work into
//!   caller buffers; decompression never writes past one page and rejects anything that
//!   does not decompress to exactly one page;
//! - [`delta_encode`] / [`delta_decode`] encode a page against the copy sent before, in the
//!   spirit of QEMU's XBZRLE (see below);
//! - [`PageEncoder`] picks the cheapest encoding for a page, [`PageDecoder`] applies any of
//!   them onto a page of guest RAM.
//!
//! # Delta format
//!
//! A delta is a sequence of runs; each run skips some unchanged bytes and then replaces
//! some changed ones:
//!
//! ```text
//! delta = run*
//! run   = skip:varint  len:varint  byte[len]
//! ```
//!
//! `varint` is unsigned LEB128 (7 bits per byte, least significant group first, high bit
//! set on every byte but the last; at most 10 bytes). Starting at page offset 0, a run
//! advances `skip` bytes, which keep their old content, then copies its `len` bytes to the
//! page. Bytes after the last run are unchanged; an empty delta means the page did not
//! change. Only the first run may have `skip == 0` (two changed runs that touch would be
//! one), and `len` is never 0. The decoder checks every run against the page length before
//! it writes anything, so a rejected delta leaves the page untouched.
//!
//! Unlike XBZRLE, which uses 14-bit varints and so caps pages at 16 KiB, lengths here may
//! be as long as the page; and the encoder folds unchanged gaps of one or two bytes into
//! the surrounding changed run, because encoding such a gap costs at least two bytes of
//! run headers.

use std::io;

/// How a page travels in a page batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageEncoding {
    /// All bytes are zero; nothing but the page index is sent.
    Zero,
    /// The page bytes as they are.
    Raw,
    /// One zstd frame that decompresses to exactly one page.
    Zstd,
    /// A delta against the copy of the page sent before (see the module docs).
    Delta,
}

impl PageEncoding {
    /// All encodings, in wire-code order.
    pub const ALL: [PageEncoding; 4] = [
        PageEncoding::Zero,
        PageEncoding::Raw,
        PageEncoding::Zstd,
        PageEncoding::Delta,
    ];

    /// A short lower-case name, for logs and statistics.
    pub fn name(self) -> &'static str {
        match self {
            PageEncoding::Zero => "zero",
            PageEncoding::Raw => "raw",
            PageEncoding::Zstd => "zstd",
            PageEncoding::Delta => "delta",
        }
    }
}

impl std::fmt::Display for PageEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One page in its wire encoding, borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodedPage<'a> {
    /// An all-zero page.
    Zero,
    /// The whole page.
    Raw(&'a [u8]),
    /// A zstd frame of the page.
    Zstd(&'a [u8]),
    /// A delta against the previously sent copy.
    Delta(&'a [u8]),
}

impl<'a> EncodedPage<'a> {
    /// Which encoding this is.
    pub fn encoding(&self) -> PageEncoding {
        match self {
            EncodedPage::Zero => PageEncoding::Zero,
            EncodedPage::Raw(_) => PageEncoding::Raw,
            EncodedPage::Zstd(_) => PageEncoding::Zstd,
            EncodedPage::Delta(_) => PageEncoding::Delta,
        }
    }

    /// The encoded bytes (empty for a zero page).
    pub fn data(&self) -> &'a [u8] {
        match *self {
            EncodedPage::Zero => &[],
            EncodedPage::Raw(d) | EncodedPage::Zstd(d) | EncodedPage::Delta(d) => d,
        }
    }
}

/// What went wrong encoding or decoding a page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// zstd could not create a context (out of memory) or refused a parameter.
    #[error("zstd context setup failed: {0}")]
    ZstdSetup(io::Error),
    /// The zstd data is corrupt, or decompresses to more than one page.
    #[error("zstd data does not decompress into one {page_len}-byte page: {source}")]
    Zstd {
        /// The page length.
        page_len: usize,
        /// What zstd said.
        source: io::Error,
    },
    /// The zstd data decompresses to less than one page.
    #[error("zstd data decompresses to {got} bytes, not one {page_len}-byte page")]
    ZstdShort {
        /// Bytes produced.
        got: usize,
        /// The page length.
        page_len: usize,
    },
    /// A raw page of the wrong length.
    #[error("raw page of {got} bytes for a {page_len}-byte page")]
    RawLength {
        /// Length of the raw data.
        got: usize,
        /// The page length.
        page_len: usize,
    },
    /// A malformed delta.
    #[error("delta: {0}")]
    Delta(#[from] DeltaError),
}

/// What is wrong with a delta. Offsets are byte positions in the delta.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta ends inside a varint or inside a run's bytes.
    #[error("truncated at byte {at}")]
    Truncated {
        /// Where the missing field starts.
        at: usize,
    },
    /// A varint longer than 10 bytes or above `u64::MAX`.
    #[error("over-long varint at byte {at}")]
    BadVarint {
        /// Where the varint starts.
        at: usize,
    },
    /// A run that changes no byte.
    #[error("empty run at byte {at}")]
    EmptyRun {
        /// Where the run starts.
        at: usize,
    },
    /// A run after the first one that skips nothing.
    #[error("run at byte {at} skips no byte after the run before it")]
    EmptySkip {
        /// Where the run starts.
        at: usize,
    },
    /// A run that reaches past the end of the page.
    #[error("run at byte {at} reaches page offset {end}, past the {page_len}-byte page")]
    PastEnd {
        /// Where the run starts.
        at: usize,
        /// The page offset the run would end at (saturated).
        end: u64,
        /// The page length.
        page_len: usize,
    },
}

/// Whether every byte of `page` is zero.
///
/// Eight 64-bit words (64 bytes) are ORed together per step, so the loop compiles to wide
/// vector loads and ORs with one branch per 64 bytes; the first non-zero chunk ends it.
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    for chunk in &mut chunks {
        let acc = chunk
            .chunks_exact(8)
            .fold(0u64, |acc, w| acc | u64::from_ne_bytes(word(w)));
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Eight bytes as an array; `w` always has exactly eight (callers use `chunks_exact(8)`),
/// and the compiler removes the check.
#[inline(always)]
fn word(w: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(w);
    a
}

/// LEB128 varints, shared with the stream module.
pub(crate) mod varint {
    /// Longest encoding of a `u64`.
    pub(crate) const MAX_LEN: usize = 10;

    /// Encoded length of `v`.
    #[inline]
    pub(crate) fn len(v: u64) -> usize {
        let bits = 64 - (v | 1).leading_zeros() as usize;
        bits.div_ceil(7)
    }

    /// Writes `v` at `dst[at..]`; `None` when it does not fit.
    #[inline]
    pub(crate) fn put(dst: &mut [u8], at: usize, mut v: u64) -> Option<usize> {
        let mut i = at;
        loop {
            let byte = dst.get_mut(i)?;
            if v < 0x80 {
                *byte = v as u8;
                return Some(i + 1);
            }
            *byte = (v as u8) | 0x80;
            v >>= 7;
            i += 1;
        }
    }

    /// Appends `v` to `out`.
    #[inline]
    pub(crate) fn push(out: &mut impl bytes::BufMut, mut v: u64) {
        while v >= 0x80 {
            out.put_u8((v as u8) | 0x80);
            v >>= 7;
        }
        out.put_u8(v as u8);
    }

    /// Why a varint could not be read.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Error {
        /// The input ends inside it.
        Truncated,
        /// More than 10 bytes, or a value above `u64::MAX`.
        Overlong,
    }

    /// Reads a varint at `src[at..]`, returning it and the position after it.
    #[inline]
    pub(crate) fn get(src: &[u8], at: usize) -> Result<(u64, usize), Error> {
        let mut v = 0u64;
        for i in 0..MAX_LEN {
            let Some(&b) = src.get(at + i) else {
                return Err(Error::Truncated);
            };
            let bits = u64::from(b & 0x7f);
            // The tenth byte may only carry the top bit of a u64.
            if i == MAX_LEN - 1 && bits > 1 {
                return Err(Error::Overlong);
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok((v, at + i + 1));
            }
        }
        Err(Error::Overlong)
    }
}

/// Index of the first byte at or after `i` where `a` and `b` differ, or `a.len()`.
#[inline]
fn next_diff(a: &[u8], b: &[u8], mut i: usize) -> usize {
    let n = a.len().min(b.len());
    while i + 32 <= n {
        let (ca, cb) = (&a[i..i + 32], &b[i..i + 32]);
        let mut x = [0u64; 4];
        for (k, slot) in x.iter_mut().enumerate() {
            *slot = u64::from_le_bytes(word(&ca[k * 8..k * 8 + 8]))
                ^ u64::from_le_bytes(word(&cb[k * 8..k * 8 + 8]));
        }
        if x.iter().fold(0, |acc, w| acc | w) != 0 {
            // Little-endian loads: the lowest set byte of the XOR is the first difference.
            for (k, w) in x.iter().enumerate() {
                if *w != 0 {
                    return i + k * 8 + (w.trailing_zeros() / 8) as usize;
                }
            }
        }
        i += 32;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Unchanged gaps shorter than this are folded into the changed run around them: a gap
/// costs at least two bytes of run headers (its skip and the next run's length).
const MIN_GAP: usize = 3;

/// End of the changed run that starts at `j` (where `old[j] != new[j]`), folding short
/// unchanged gaps into it. `None` once the run grows past `budget` bytes, which is more
/// than the output can hold anyway.
#[inline]
fn changed_run_end(old: &[u8], new: &[u8], j: usize, budget: usize) -> Option<usize> {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let n = new.len();
    let mut k = j;
    loop {
        // Eight bytes at a time while all eight differ: their XOR has no zero byte.
        while k + 8 <= n {
            let x =
                u64::from_le_bytes(word(&old[k..k + 8])) ^ u64::from_le_bytes(word(&new[k..k + 8]));
            if x.wrapping_sub(LOW) & !x & HIGH != 0 {
                break;
            }
            k += 8;
            if k - j > budget {
                return None;
            }
        }
        while k < n && old[k] != new[k] {
            k += 1;
            if k - j > budget {
                return None;
            }
        }
        if k == n {
            return Some(n);
        }
        let mut e = k;
        while e < n && e < k + MIN_GAP && old[e] == new[e] {
            e += 1;
        }
        if e == n || e - k >= MIN_GAP {
            return Some(k);
        }
        k = e;
    }
}

/// Encodes `new` as a delta against `old` into `dst`, returning the delta's length.
///
/// Returns `None` when the delta would need more than `dst.len()` bytes: give `dst` the
/// largest size worth sending (say, a little less than a page) and send the page another
/// way when it does not fit. An empty delta (`Some(0)`) means the page has not changed.
/// Scanning stops as soon as the delta is known not to fit, so a page that changed
/// everywhere costs little more than filling `dst`.
///
/// # Panics
/// If `old` and `new` differ in length.
pub fn delta_encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    assert_eq!(old.len(), new.len(), "delta of pages of different lengths");
    let n = new.len();
    let mut i = 0;
    let mut d = 0;
    loop {
        let j = next_diff(old, new, i);
        if j >= n {
            return Some(d);
        }
        // The run needs at least two header bytes; what is left bounds its data.
        let budget = dst.len().checked_sub(d + 2)?;
        let k = changed_run_end(old, new, j, budget)?;
        d = varint::put(dst, d, (j - i) as u64)?;
        d = varint::put(dst, d, (k - j) as u64)?;
        dst.get_mut(d..d + (k - j))?.copy_from_slice(&new[j..k]);
        d += k - j;
        i = k;
    }
}

/// Walks the runs of a delta: yields `(page_range, delta_range)` for each run, checked
/// against `page_len`.
struct DeltaRuns<'a> {
    delta: &'a [u8],
    at: usize,
    pos: u64,
    page_len: usize,
}

impl Iterator for DeltaRuns<'_> {
    type Item = Result<(std::ops::Range<usize>, std::ops::Range<usize>), DeltaError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.delta.len() {
            return None;
        }
        Some(self.step())
    }
}

impl DeltaRuns<'_> {
    fn step(&mut self) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>), DeltaError> {
        let start = self.at;
        let vmap = |e: varint::Error, at: usize| match e {
            varint::Error::Truncated => DeltaError::Truncated { at },
            varint::Error::Overlong => DeltaError::BadVarint { at },
        };
        let (skip, p) = varint::get(self.delta, start).map_err(|e| vmap(e, start))?;
        let (len, p) = varint::get(self.delta, p).map_err(|e| vmap(e, p))?;
        if len == 0 {
            return Err(DeltaError::EmptyRun { at: start });
        }
        if skip == 0 && start != 0 {
            return Err(DeltaError::EmptySkip { at: start });
        }
        let page_start = self.pos.saturating_add(skip);
        let page_end = page_start.saturating_add(len);
        if page_end > self.page_len as u64 {
            return Err(DeltaError::PastEnd {
                at: start,
                end: page_end,
                page_len: self.page_len,
            });
        }
        // `len <= page_len`, so it fits a usize.
        let data_end = p
            .checked_add(len as usize)
            .filter(|&e| e <= self.delta.len())
            .ok_or(DeltaError::Truncated { at: p })?;
        self.at = data_end;
        self.pos = page_end;
        Ok((page_start as usize..page_end as usize, p..data_end))
    }
}

/// Checks a delta against a page of `page_len` bytes without applying it.
pub fn delta_validate(delta: &[u8], page_len: usize) -> Result<(), DeltaError> {
    let runs = DeltaRuns {
        delta,
        at: 0,
        pos: 0,
        page_len,
    };
    for run in runs {
        run?;
    }
    Ok(())
}

/// Applies `delta` onto `page`, which holds the copy the delta was made against.
///
/// The whole delta is checked first: on error the page is left as it was. Never writes
/// outside `page`, never panics.
pub fn delta_decode(delta: &[u8], page: &mut [u8]) -> Result<(), DeltaError> {
    delta_validate(delta, page.len())?;
    let runs = DeltaRuns {
        delta,
        at: 0,
        pos: 0,
        page_len: page.len(),
    };
    for run in runs {
        let (to, from) = run?;
        let page_len = page.len();
        let dst = page.get_mut(to.clone()).ok_or(DeltaError::PastEnd {
            at: from.start,
            end: to.end as u64,
            page_len,
        })?;
        dst.copy_from_slice(&delta[from]);
    }
    Ok(())
}

/// A reusable zstd compression context for single pages.
///
/// Frames carry no checksum, content size or dictionary id: the stream's record CRC
/// already covers the bytes and the page length is known, and on a 4 KiB page those
/// fields cost several percent of the output.
pub struct ZstdCompressor {
    ctx: zstd::bulk::Compressor<'static>,
    level: i32,
}

impl std::fmt::Debug for ZstdCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdCompressor")
            .field("level", &self.level)
            .finish()
    }
}

/// The default zstd level for pages: fast, since pages must keep up with the link.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

impl ZstdCompressor {
    /// A context compressing at `level` (negative levels are faster, zstd's range is
    /// about -131072 to 22; values outside it are clamped by zstd).
    pub fn new(level: i32) -> Result<Self, PageError> {
        use zstd::zstd_safe::CParameter;
        let mut ctx = zstd::bulk::Compressor::new(level).map_err(PageError::ZstdSetup)?;
        for p in [
            CParameter::ChecksumFlag(false),
            CParameter::ContentSizeFlag(false),
            CParameter::DictIdFlag(false),
        ] {
            ctx.set_parameter(p).map_err(PageError::ZstdSetup)?;
        }
        Ok(ZstdCompressor { ctx, level })
    }

    /// The compression level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses `page` into `dst`; `None` when the frame would not fit in `dst` (make
    /// `dst` shorter than a page to get only frames worth sending).
    pub fn compress(&mut self, page: &[u8], dst: &mut [u8]) -> Option<usize> {
        self.ctx.compress_to_buffer(page, dst).ok()
    }
}

/// A reusable zstd decompression context for single pages.
pub struct ZstdDecompressor {
    ctx: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for ZstdDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdDecompressor").finish_non_exhaustive()
    }
}

impl ZstdDecompressor {
    /// A new context.
    pub fn new() -> Result<Self, PageError> {
        let ctx = zstd::bulk::Decompressor::new().map_err(PageError::ZstdSetup)?;
        Ok(ZstdDecompressor { ctx })
    }

    /// Decompresses `src` into `page`, which it must fill exactly.
    ///
    /// zstd is told `page` is all the room there is, so it never writes past it; a frame
    /// that would produce more, or less, or is not zstd at all, is an error. On error the
    /// page content is unspecified (zstd may have written part of it).
    pub fn decompress(&mut self, src: &[u8], page: &mut [u8]) -> Result<(), PageError> {
        let page_len = page.len();
        let got = self
            .ctx
            .decompress_to_buffer(src, page)
            .map_err(|source| PageError::Zstd { page_len, source })?;
        if got != page_len {
            return Err(PageError::ZstdShort { got, page_len });
        }
        Ok(())
    }
}

/// Chooses the encoding of each page: zero if it is all zero, else a delta against the
/// previously sent copy when one is given and the delta is small, else zstd when enabled
/// and it saves space, else raw. Holds its scratch buffers, so encoding allocates nothing.
#[derive(Debug)]
pub struct PageEncoder {
    page_len: usize,
    zstd: Option<ZstdCompressor>,
    delta_buf: Box<[u8]>,
    zstd_buf: Box<[u8]>,
}

impl PageEncoder {
    /// An encoder for pages of `page_len` bytes; `zstd_level` enables zstd at that level.
    pub fn new(page_len: usize, zstd_level: Option<i32>) -> Result<Self, PageError> {
        let zstd = zstd_level.map(ZstdCompressor::new).transpose()?;
        // Anything not shorter than the page is sent raw.
        let room = page_len.saturating_sub(1);
        Ok(PageEncoder {
            page_len,
            zstd_buf: vec![0; if zstd.is_some() { room } else { 0 }].into_boxed_slice(),
            zstd,
            delta_buf: vec![0; room].into_boxed_slice(),
        })
    }

    /// The page length this encoder was made for.
    pub fn page_len(&self) -> usize {
        self.page_len
    }

    /// Encodes `page`, trying a delta against `previous` (the copy sent before) if given.
    ///
    /// # Panics
    /// If `page` (or `previous`) is not `page_len()` bytes long.
    pub fn encode<'a>(&'a mut self, page: &'a [u8], previous: Option<&[u8]>) -> EncodedPage<'a> {
        assert_eq!(page.len(), self.page_len, "page of the wrong length");
        if is_zero_page(page) {
            return EncodedPage::Zero;
        }
        let delta = previous.and_then(|old| delta_encode(old, page, &mut self.delta_buf));
        // A delta of an eighth of a page or less beats what zstd usually gets from a page,
        // at a fraction of its cost.
        if let Some(n) = delta {
            if n <= self.page_len / 8 || self.zstd.is_none() {
                return EncodedPage::Delta(&self.delta_buf[..n]);
            }
        }
        let zstd = match self.zstd.as_mut() {
            Some(z) => z.compress(page, &mut self.zstd_buf),
            None => None,
        };
        match (delta, zstd) {
            (Some(d), Some(z)) if d <= z => EncodedPage::Delta(&self.delta_buf[..d]),
            (_, Some(z)) => EncodedPage::Zstd(&self.zstd_buf[..z]),
            (Some(d), None) => EncodedPage::Delta(&self.delta_buf[..d]),
            (None, None) => EncodedPage::Raw(page),
        }
    }
}

/// Applies encoded pages onto guest pages; holds the zstd context.
#[derive(Debug)]
pub struct PageDecoder {
    zstd: ZstdDecompressor,
}

impl PageDecoder {
    /// A new decoder.
    pub fn new() -> Result<Self, PageError> {
        Ok(PageDecoder {
            zstd: ZstdDecompressor::new()?,
        })
    }

    /// Writes the page `encoded` describes into `page`.
    ///
    /// A delta applies onto what `page` holds, which must be the copy it was made against.
    /// A zero page is written only if `page` is not zero already, so untouched anonymous
    /// memory stays unallocated.
    pub fn apply(&mut self, encoded: EncodedPage<'_>, page: &mut [u8]) -> Result<(), PageError> {
        match encoded {
            EncodedPage::Zero => {
                if !is_zero_page(page) {
                    page.fill(0);
                }
                Ok(())
            }
            EncodedPage::Raw(data) => {
                if data.len() != page.len() {
                    return Err(PageError::RawLength {
                        got: data.len(),
                        page_len: page.len(),
                    });
                }
                page.copy_from_slice(data);
                Ok(())
            }
            EncodedPage::Zstd(data) => self.zstd.decompress(data, page),
            EncodedPage::Delta(data) => Ok(delta_decode(data, page)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = 4096;

    /// Straightforward reference for the zero test.
    fn zero_ref(p: &[u8]) -> bool {
        p.iter().all(|&b| b == 0)
    }

    #[test]
    fn zero_page_detects_every_single_nonzero_byte() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero_page(&p));
        for i in 0..PAGE {
            p[i] = 1;
            assert!(!is_zero_page(&p), "missed a non-zero byte at {i}");
            p[i] = 0;
        }
        // Lengths that are not a multiple of 64 use the tail loop.
        for len in [0, 1, 63, 65, 127, 4095] {
            let mut q = vec![0u8; len];
            assert!(is_zero_page(&q));
            if len > 0 {
                q[len - 1] = 0x80;
                assert!(!is_zero_page(&q), "missed the last byte of {len}");
            }
        }
    }

    fn apply_ref(delta: &[u8], page: &mut [u8]) {
        delta_decode(delta, page).expect("valid delta");
    }

    fn page_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        let len = prop_oneof![Just(PAGE), 0usize..300];
        len.prop_flat_map(|len| {
            (
                proptest::collection::vec(any::<u8>(), len),
                // Edits: (position, value) pairs, few or many.
                proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..64),
                prop_oneof![Just(0u8), Just(1), Just(2)],
            )
                .prop_map(|(old, edits, mode)| {
                    let mut new = old.clone();
                    match mode {
                        // A few scattered edits.
                        0 if !new.is_empty() => {
                            for (ix, v) in edits {
                                let i = ix.index(new.len());
                                new[i] = v;
                            }
                        }
                        // Every byte changed.
                        1 => new.iter_mut().for_each(|b| *b = !*b),
                        // Nothing changed.
                        _ => {}
                    }
                    (old, new)
                })
        })
    }

    proptest! {
        #[test]
        fn zero_page_matches_reference(p in proptest::collection::vec(prop_oneof![9 => Just(0u8), 1 => any::<u8>()], 0..600)) {
            prop_assert_eq!(is_zero_page(&p), zero_ref(&p));
        }

        #[test]
        fn delta_round_trip((old, new) in page_pair()) {
            let mut dst = vec![0u8; 2 * new.len() + 16];
            let n = delta_encode(&old, &new, &mut dst).expect("fits in twice the page");
            let mut page = old.clone();
            apply_ref(&dst[..n], &mut page);
            prop_assert_eq!(&page, &new);
            if old == new {
                prop_assert_eq!(n, 0);
            }
            // Any limit: either it fits and round-trips, or it reports overflow.
            for limit in [0, 1, 2, 3, n / 2, n.saturating_sub(1), n] {
                let mut small = vec![0u8; limit];
                match delta_encode(&old, &new, &mut small) {
                    Some(m) => {
                        prop_assert!(m <= limit);
                        prop_assert_eq!(&small[..m], &dst[..n]);
                    }
                    None => prop_assert!(limit < n, "limit {} >= needed {}", limit, n),
                }
            }
        }

        #[test]
        fn delta_decode_never_panics(delta in proptest::collection::vec(any::<u8>(), 0..64),
                                     page_len in 0usize..128,
                                     fill in any::<u8>()) {
            let mut page = vec![fill; page_len];
            let before = page.clone();
            match delta_decode(&delta, &mut page) {
                Ok(()) => prop_assert!(delta_validate(&delta, page_len).is_ok()),
                // A rejected delta leaves the page as it was.
                Err(_) => prop_assert_eq!(page, before),
            }
        }

        #[test]
        fn zstd_round_trip((_, page) in page_pair(), level in -5i32..4) {
            let mut c = ZstdCompressor::new(level).unwrap();
            let mut d = ZstdDecompressor::new().unwrap();
            let mut buf = vec![0u8; zstd::zstd_safe::compress_bound(page.len())];
            let n = c.compress(&page, &mut buf).expect("fits in compress_bound");
            let mut out = vec![0xa5u8; page.len()];
            d.decompress(&buf[..n], &mut out).unwrap();
            prop_assert_eq!(&out, &page);
            // One byte less room than the page length cannot hold it.
            if !page.is_empty() {
                let mut short = vec![0u8; page.len() - 1];
                prop_assert!(d.decompress(&buf[..n], &mut short).is_err());
            }
            let mut long = vec![0u8; page.len() + 1];
            let long_is_short = matches!(d.decompress(&buf[..n], &mut long), Err(PageError::ZstdShort { .. }));
            prop_assert!(long_is_short);
        }

        #[test]
        fn zstd_decompress_never_panics(src in proptest::collection::vec(any::<u8>(), 0..200), page_len in 0usize..5000) {
            let mut d = ZstdDecompressor::new().unwrap();
            let mut out = vec![0u8; page_len];
            let _ = d.decompress(&src, &mut out);
        }

        #[test]
        fn zstd_decompress_of_mutated_frames_never_panics((_, page) in page_pair(), flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)) {
            let mut c = ZstdCompressor::new(1).unwrap();
            let mut d = ZstdDecompressor::new().unwrap();
            let mut buf = vec![0u8; zstd::zstd_safe::compress_bound(page.len())];
            let n = c.compress(&page, &mut buf).unwrap();
            let mut frame = buf[..n].to_vec();
            for (ix, x) in flips {
                let i = ix.index(frame.len());
                frame[i] ^= x;
            }
            let mut out = vec![0u8; page.len()];
            let _ = d.decompress(&frame, &mut out);
        }

        #[test]
        fn encoder_decoder_round_trip((old, new) in page_pair(), zstd in any::<bool>(), use_prev in any::<bool>()) {
            prop_assume!(!new.is_empty());
            let mut enc = PageEncoder::new(new.len(), zstd.then_some(1)).unwrap();
            let mut dec = PageDecoder::new().unwrap();
            let prev = use_prev.then_some(&old[..]);
            let e = enc.encode(&new, prev);
            if e.encoding() != PageEncoding::Raw && e.encoding() != PageEncoding::Zero {
                prop_assert!(e.data().len() < new.len());
            }
            if !use_prev {
                prop_assert_ne!(e.encoding(), PageEncoding::Delta);
            }
            prop_assert_eq!(e.encoding() == PageEncoding::Zero, zero_ref(&new));
            let mut page = if use_prev { old.clone() } else { vec![0x5a; new.len()] };
            dec.apply(e, &mut page).unwrap();
            prop_assert_eq!(&page, &new);
        }
    }

    #[test]
    fn delta_edge_cases() {
        let old = vec![7u8; PAGE];
        let mut dst = vec![0u8; PAGE];

        // Unchanged: empty delta.
        assert_eq!(delta_encode(&old, &old, &mut dst), Some(0));

        // One byte changed in the middle: skip, len 1, the byte.
        let mut new = old.clone();
        new[1000] = 9;
        let n = delta_encode(&old, &new, &mut dst).unwrap();
        assert_eq!(&dst[..n], &[0xe8, 0x07, 1, 9]);

        // Change at offset 0: skip 0 is allowed for the first run.
        let mut new = old.clone();
        new[0] = 1;
        let n = delta_encode(&old, &new, &mut dst).unwrap();
        assert_eq!(&dst[..n], &[0, 1, 1]);

        // Last byte: run ends at the page end.
        let mut new = old.clone();
        new[PAGE - 1] = 1;
        let n = delta_encode(&old, &new, &mut dst).unwrap();
        let mut page = old.clone();
        delta_decode(&dst[..n], &mut page).unwrap();
        assert_eq!(page, new);

        // Gaps of one and two bytes are folded in, a gap of three is not.
        let mut new = old.clone();
        new[10] = 0;
        new[12] = 0; // gap of 1
        new[15] = 0; // gap of 2
        new[19] = 0; // gap of 3
        let n = delta_encode(&old, &new, &mut dst).unwrap();
        assert_eq!(&dst[..n], &[10, 6, 0, 7, 0, 7, 7, 0, 3, 1, 0]);

        // Everything changed: does not fit in less than the page plus headers.
        let new = vec![8u8; PAGE];
        assert_eq!(delta_encode(&old, &new, &mut dst[..PAGE - 1]), None);
        let mut big = vec![0u8; PAGE + 4];
        let n = delta_encode(&old, &new, &mut big).unwrap();
        assert_eq!(n, 1 + 2 + PAGE);
    }

    #[test]
    fn delta_decode_rejects_each_malformation() {
        let mut page = vec![0u8; 16];
        let cases: &[(&[u8], DeltaError)] = &[
            (&[0], DeltaError::Truncated { at: 1 }),
            (&[0, 2, 1], DeltaError::Truncated { at: 2 }),
            (&[0, 0], DeltaError::EmptyRun { at: 0 }),
            (&[0, 1, 5, 0, 1, 6], DeltaError::EmptySkip { at: 3 }),
            (
                &[15, 2, 1, 1],
                DeltaError::PastEnd {
                    at: 0,
                    end: 17,
                    page_len: 16,
                },
            ),
            (
                &[
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 1, 1,
                ],
                DeltaError::BadVarint { at: 0 },
            ),
            (
                &[
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff,
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                DeltaError::PastEnd {
                    at: 0,
                    end: u64::MAX,
                    page_len: 16,
                },
            ),
            (&[0x80], DeltaError::Truncated { at: 0 }),
        ];
        for (delta, want) in cases {
            assert_eq!(
                delta_decode(delta, &mut page).as_ref(),
                Err(want),
                "{delta:?}"
            );
            assert_eq!(page, vec![0u8; 16], "page touched by rejected {delta:?}");
        }
        // A valid one after a rejected one: two runs.
        delta_decode(&[1, 1, 5, 2, 2, 6, 7], &mut page).unwrap();
        assert_eq!(&page[..6], &[0, 5, 0, 0, 6, 7]);
    }

    #[test]
    fn varint_round_trip_and_limits() {
        let mut buf = [0u8; 10];
        for v in [
            0,
            1,
            127,
            128,
            16383,
            16384,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let n = varint::put(&mut buf, 0, v).unwrap();
            assert_eq!(n, varint::len(v), "{v}");
            assert_eq!(varint::get(&buf[..n], 0), Ok((v, n)));
            assert_eq!(varint::get(&buf[..n - 1], 0), Err(varint::Error::Truncated));
            let mut v2 = Vec::new();
            varint::push(&mut v2, v);
            assert_eq!(&v2[..], &buf[..n]);
        }
        assert_eq!(varint::put(&mut buf[..2], 0, 1 << 14), None);
        // 2^64 does not fit.
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(varint::get(&over, 0), Err(varint::Error::Overlong));
        let eleven = [0x80; 11];
        assert_eq!(varint::get(&eleven, 0), Err(varint::Error::Overlong));
    }

    #[test]
    fn zstd_rejects_garbage_and_foreign_frames() {
        let mut d = ZstdDecompressor::new().unwrap();
        let mut out = vec![0u8; PAGE];
        assert!(d.decompress(&[], &mut out).is_err());
        assert!(d.decompress(b"definitely not zstd", &mut out).is_err());
        // A valid frame of two pages does not fit one.
        let two = vec![3u8; 2 * PAGE];
        let frame = zstd::bulk::compress(&two, 1).unwrap();
        assert!(matches!(
            d.decompress(&frame, &mut out),
            Err(PageError::Zstd { .. })
        ));
        // A valid frame of half a page is too short.
        let frame = zstd::bulk::compress(&two[..PAGE / 2], 1).unwrap();
        assert!(matches!(
            d.decompress(&frame, &mut out),
            Err(PageError::ZstdShort { got, .. }) if got == PAGE / 2
        ));
    }

    #[test]
    fn encoder_picks_expected_encodings() {
        let mut enc = PageEncoder::new(PAGE, Some(1)).unwrap();
        let zero = vec![0u8; PAGE];
        assert_eq!(enc.encode(&zero, None), EncodedPage::Zero);

        // Incompressible page: raw.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..PAGE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(enc.encode(&noise, None).encoding(), PageEncoding::Raw);

        // Same noise with two bytes changed against the previous copy: a tiny delta.
        let mut changed = noise.clone();
        changed[5] ^= 1;
        changed[3000] ^= 1;
        let e = enc.encode(&changed, Some(&noise));
        assert_eq!(e.encoding(), PageEncoding::Delta);
        // skip 5, len 1, byte; skip 2994 (two bytes), len 1, byte.
        assert_eq!(e.data().len(), 3 + 4);

        // Text-like page: zstd.
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. "
            .iter()
            .copied()
            .cycle()
            .take(PAGE)
            .collect();
        let e = enc.encode(&text, None);
        assert_eq!(e.encoding(), PageEncoding::Zstd);
        assert!(e.data().len() < 200, "{}", e.data().len());

        // Without zstd, the same page goes raw.
        let mut plain = PageEncoder::new(PAGE, None).unwrap();
        assert_eq!(plain.encode(&text, None), EncodedPage::Raw(&text));
    }

    #[test]
    fn decoder_leaves_zero_pages_unwritten_and_checks_raw_length() {
        let mut dec = PageDecoder::new().unwrap();
        let mut page = vec![1u8; 64];
        dec.apply(EncodedPage::Zero, &mut page).unwrap();
        assert!(zero_ref(&page));
        assert!(matches!(
            dec.apply(EncodedPage::Raw(&[1, 2, 3]), &mut page),
            Err(PageError::RawLength {
                got: 3,
                page_len: 64
            })
        ));
    }
}
