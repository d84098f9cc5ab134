//! Page batches: the hot-path writer and the zero-copy decoded form.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::PayloadError;
use super::wire::{RECORD_HEADER_LEN, Reader, RecordType, begin_record};
use crate::page::{EncodedPage, PageEncoding};

const CODE_ZERO: u8 = 0;
const CODE_RAW: u8 = 1;
const CODE_ZSTD: u8 = 2;
const CODE_DELTA: u8 = 3;

/// Index and encoding.
const ENTRY_HEADER: usize = 9;

/// Largest page size a batch may declare.
pub(crate) const MAX_PAGE_SIZE: u32 = 1 << 30;

pub(crate) fn valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && page_size <= MAX_PAGE_SIZE
}

/// One page's data as received: slices of the received record, not copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageData {
    /// An all-zero page.
    Zero,
    /// The page's bytes, exactly one page.
    Raw(Bytes),
    /// A zstd frame of the page, at most one page long.
    Zstd(Bytes),
    /// A delta against the destination's copy, at most one page long.
    Delta(Bytes),
}

impl PageData {
    /// Borrows the data in the form [`PageDecoder::apply`](crate::page::PageDecoder::apply)
    /// takes.
    pub fn as_encoded(&self) -> EncodedPage<'_> {
        match self {
            PageData::Zero => EncodedPage::Zero,
            PageData::Raw(b) => EncodedPage::Raw(b),
            PageData::Zstd(b) => EncodedPage::Zstd(b),
            PageData::Delta(b) => EncodedPage::Delta(b),
        }
    }

    /// The encoding.
    pub fn encoding(&self) -> PageEncoding {
        self.as_encoded().encoding()
    }
}

/// One page of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Global page index (see [`crate::layout`]).
    pub index: u64,
    /// The page's data.
    pub data: PageData,
}

/// A decoded page batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    /// Page size in bytes.
    pub page_size: u32,
    /// The pages, in the order sent.
    pub pages: Vec<Page>,
}

impl PageBatch {
    /// Appends the batch as one record. [`PageBatchWriter`] does the same without building
    /// a `PageBatch` first.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut w = PageBatchWriter::new(out, self.page_size);
        for p in &self.pages {
            w.push(p.index, p.data.as_encoded());
        }
        w.finish();
    }
}

/// Writes one page-batch record page by page, into a buffer the caller reuses.
///
/// The record header is reserved when the writer starts and filled in by
/// [`finish`](Self::finish); each page is copied into the buffer and folded into the
/// record's CRC right away, while it is still in L1. Nothing is allocated once the buffer
/// has grown to a batch's size. Dropping the writer without `finish` removes the partial
/// record from the buffer.
///
/// ```
/// use bytes::BytesMut;
/// use migration_core::stream::PageBatchWriter;
///
/// let mut out = BytesMut::with_capacity(1 << 20);
/// let page = vec![7u8; 4096];
/// let mut batch = PageBatchWriter::new(&mut out, 4096);
/// batch.push_raw(12, &page);
/// batch.push_zero(13);
/// let written = batch.finish();
/// assert_eq!(written, out.len());
/// ```
#[derive(Debug)]
pub struct PageBatchWriter<'a> {
    out: &'a mut BytesMut,
    start: usize,
    page_size: u32,
    pages: u32,
    crc: crc32fast::Hasher,
    done: bool,
}

impl<'a> PageBatchWriter<'a> {
    /// Starts a batch of `page_size`-byte pages at the end of `out`.
    ///
    /// # Panics
    /// If `page_size` is not a power of two up to 1 GiB.
    pub fn new(out: &'a mut BytesMut, page_size: u32) -> Self {
        assert!(valid_page_size(page_size), "bad page size {page_size}");
        let start = begin_record(out, RecordType::PAGE_BATCH);
        out.put_u32_le(page_size);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&page_size.to_le_bytes());
        PageBatchWriter {
            out,
            start,
            page_size,
            pages: 0,
            crc,
            done: false,
        }
    }

    /// The batch's page size.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Pages written so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Whether no page was written yet.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Bytes the record will take if finished now, CRC included: compare with a batch
    /// size target to decide when to finish.
    pub fn encoded_len(&self) -> usize {
        self.out.len() - self.start + 4
    }

    #[inline]
    fn entry(&mut self, index: u64, code: u8, len: Option<u32>, data: &[u8]) {
        let at = self.out.len();
        self.out.reserve(ENTRY_HEADER + 4 + data.len());
        self.out.put_u64_le(index);
        self.out.put_u8(code);
        if let Some(len) = len {
            self.out.put_u32_le(len);
        }
        self.out.extend_from_slice(data);
        self.crc.update(&self.out[at..]);
        self.pages += 1;
    }

    /// Appends an all-zero page.
    #[inline]
    pub fn push_zero(&mut self, index: u64) {
        self.entry(index, CODE_ZERO, None, &[]);
    }

    /// Appends a page as it is.
    ///
    /// # Panics
    /// If `page` is not one page long.
    #[inline]
    pub fn push_raw(&mut self, index: u64, page: &[u8]) {
        assert_eq!(
            page.len(),
            self.page_size as usize,
            "raw page of the wrong length"
        );
        self.entry(index, CODE_RAW, None, page);
    }

    /// Appends the page at `src`, copied straight into the batch (no staging copy), as a
    /// raw page, or as a zero page if the copy is all zero. Returns whether it went as a
    /// zero page.
    ///
    /// The zero check looks at the copy, so the entry always describes exactly the bytes
    /// that were sent, even if the memory at `src` changes meanwhile (a guest writing the
    /// page being copied: the dirty log re-sends it).
    ///
    /// # Safety
    /// `src` must be valid for reads of one page. Other threads may write it concurrently
    /// (as guest RAM is); the bytes copied are then some mix of old and new.
    #[inline]
    pub unsafe fn push_raw_from(&mut self, index: u64, src: *const u8) -> bool {
        let ps = self.page_size as usize;
        let at = self.out.len();
        self.out.reserve(ENTRY_HEADER + ps);
        self.out.put_u64_le(index);
        self.out.put_u8(CODE_RAW);
        let data_at = self.out.len();
        let spare = self.out.spare_capacity_mut();
        // SAFETY: `reserve` made room for the page; the caller vouches for `src`. The
        // copy is a plain memcpy, as vm-memory's own copies of guest RAM are.
        unsafe {
            std::ptr::copy_nonoverlapping(src, spare.as_mut_ptr().cast::<u8>(), ps);
            self.out.set_len(data_at + ps);
        }
        let zero = crate::page::is_zero_page(&self.out[data_at..]);
        if zero {
            self.out.truncate(data_at);
            self.out[data_at - 1] = CODE_ZERO;
        }
        self.crc.update(&self.out[at..]);
        self.pages += 1;
        zero
    }

    /// Appends a zstd frame of a page.
    ///
    /// # Panics
    /// If the frame is longer than a page (send the page raw instead).
    #[inline]
    pub fn push_zstd(&mut self, index: u64, frame: &[u8]) {
        let len = self.checked_len(frame);
        self.entry(index, CODE_ZSTD, Some(len), frame);
    }

    /// Appends a delta of a page against the copy sent before.
    ///
    /// # Panics
    /// If the delta is longer than a page (send the page raw instead).
    #[inline]
    pub fn push_delta(&mut self, index: u64, delta: &[u8]) {
        let len = self.checked_len(delta);
        self.entry(index, CODE_DELTA, Some(len), delta);
    }

    fn checked_len(&self, data: &[u8]) -> u32 {
        assert!(
            data.len() <= self.page_size as usize,
            "{} bytes of encoded data for a {}-byte page",
            data.len(),
            self.page_size
        );
        data.len() as u32
    }

    /// Appends a page in whatever encoding it comes in.
    ///
    /// # Panics
    /// As [`push_raw`](Self::push_raw), [`push_zstd`](Self::push_zstd) and
    /// [`push_delta`](Self::push_delta).
    #[inline]
    pub fn push(&mut self, index: u64, page: EncodedPage<'_>) {
        match page {
            EncodedPage::Zero => self.push_zero(index),
            EncodedPage::Raw(d) => self.push_raw(index, d),
            EncodedPage::Zstd(d) => self.push_zstd(index, d),
            EncodedPage::Delta(d) => self.push_delta(index, d),
        }
    }

    /// Completes the record: fills in its length and appends its CRC. Returns the bytes
    /// the whole record takes.
    ///
    /// # Panics
    /// If the payload reached 4 GiB.
    pub fn finish(mut self) -> usize {
        let start = self.start;
        let len = self.out.len() - start - RECORD_HEADER_LEN;
        let len = u32::try_from(len).expect("page batch of 4 GiB or more");
        self.out[start + 2..start + 6].copy_from_slice(&len.to_le_bytes());
        // CRC(type, length, payload) from CRC(type, length) and the payload's running CRC.
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.out[start..start + RECORD_HEADER_LEN]);
        crc.combine(&self.crc);
        let crc = crc.finalize();
        self.out.put_u32_le(crc);
        self.done = true;
        self.out.len() - start
    }
}

impl Drop for PageBatchWriter<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.out.truncate(self.start);
        }
    }
}

/// Decodes a page-batch payload. Page data are slices of `payload`.
pub(crate) fn decode(
    payload: &Bytes,
    config_page_size: Option<u32>,
    page_count: Option<u64>,
) -> Result<PageBatch, PayloadError> {
    let mut r = Reader::new(payload);
    let page_size = r.u32("page size")?;
    if !valid_page_size(page_size) {
        return Err(PayloadError::BadPageSize(page_size));
    }
    if let Some(config) = config_page_size {
        if config != page_size {
            return Err(PayloadError::PageSizeMismatch {
                batch: page_size,
                config,
            });
        }
    }
    let mut pages = Vec::new();
    while !r.is_empty() {
        let index = r.u64("page index")?;
        if let Some(pages) = page_count {
            if index >= pages {
                return Err(PayloadError::PageOutOfRange { index, pages });
            }
        }
        let code = r.u8("page encoding")?;
        let data = match code {
            CODE_ZERO => PageData::Zero,
            CODE_RAW => PageData::Raw(r.bytes(page_size as usize, "raw page")?),
            CODE_ZSTD | CODE_DELTA => {
                let len = r.u32("encoded page length")?;
                if len > page_size {
                    return Err(PayloadError::PageDataTooLong {
                        index,
                        len,
                        page_size,
                    });
                }
                let data = r.bytes(len as usize, "encoded page")?;
                if code == CODE_ZSTD {
                    PageData::Zstd(data)
                } else {
                    PageData::Delta(data)
                }
            }
            code => return Err(PayloadError::UnknownEncoding { index, code }),
        };
        pages.push(Page { index, data });
    }
    Ok(PageBatch { page_size, pages })
}
