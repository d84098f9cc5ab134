//! Records of the return path (destination to source).

use bytes::{BufMut, Bytes, BytesMut};

use super::error::PayloadError;
use super::wire::{Reader, RecordType, begin_record, end_record, put_string};
use crate::bitmap::{DirtyBitmap, words_for};
use crate::page::varint;

/// What the destination acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ack {
    /// Every record up to and including the end of this pre-copy pass was applied.
    Iteration(u64),
    /// Every byte of the migration stream before this offset (counted from the first
    /// byte of its header) was received and applied: lets the source bound what it has in
    /// flight.
    StreamOffset(u64),
    /// The switch to post-copy arrived whole: pages discarded, device state loaded, RAM
    /// registered for faults; the destination runs the guest on the source's
    /// [`Record::PostcopyCommit`](super::Record::PostcopyCommit). The value is the number
    /// of pages it holds.
    PostcopyReady(u64),
}

/// The destination's final word. The source stays paused with all its state until it
/// gets one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The destination runs the guest; the source may let go of it.
    Running,
    /// The destination failed; the source resumes the guest.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A record of the return path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnRecord {
    /// An acknowledgement.
    Ack(Ack),
    /// During post-copy: the guest faulted on these pages; send them first.
    PageRequest {
        /// First page index.
        page: u64,
        /// Number of pages, at least 1.
        count: u32,
    },
    /// When resuming an interrupted post-copy: the pages the destination holds.
    ReceivedBitmap(DirtyBitmap),
    /// The outcome.
    Verdict(Verdict),
}

const ACK_ITERATION: u8 = 0;
const ACK_OFFSET: u8 = 1;
const ACK_POSTCOPY_READY: u8 = 2;
const VERDICT_RUNNING: u8 = 0;
const VERDICT_FAILED: u8 = 1;
const BITMAP_RUNS: u8 = 0;
const BITMAP_WORDS: u8 = 1;

impl ReturnRecord {
    /// The record's type code.
    pub fn record_type(&self) -> RecordType {
        match self {
            ReturnRecord::Ack(_) => RecordType::ACK,
            ReturnRecord::PageRequest { .. } => RecordType::PAGE_REQUEST,
            ReturnRecord::ReceivedBitmap(_) => RecordType::RECEIVED_BITMAP,
            ReturnRecord::Verdict(_) => RecordType::VERDICT,
        }
    }

    /// Whether the record ends the return path.
    pub fn is_terminal(&self) -> bool {
        matches!(self, ReturnRecord::Verdict(_))
    }

    /// Appends the record.
    ///
    /// # Panics
    /// If a page request has a count of 0, or the payload would reach 4 GiB.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = begin_record(out, self.record_type());
        match self {
            ReturnRecord::Ack(a) => {
                let (kind, value) = match *a {
                    Ack::Iteration(n) => (ACK_ITERATION, n),
                    Ack::StreamOffset(n) => (ACK_OFFSET, n),
                    Ack::PostcopyReady(n) => (ACK_POSTCOPY_READY, n),
                };
                out.put_u8(kind);
                out.put_u64_le(value);
            }
            ReturnRecord::PageRequest { page, count } => {
                assert!(*count > 0, "page request for no page");
                out.put_u64_le(*page);
                out.put_u32_le(*count);
            }
            ReturnRecord::ReceivedBitmap(b) => put_bitmap(out, b),
            ReturnRecord::Verdict(Verdict::Running) => out.put_u8(VERDICT_RUNNING),
            ReturnRecord::Verdict(Verdict::Failed { reason }) => {
                out.put_u8(VERDICT_FAILED);
                put_string(out, reason);
            }
        }
        end_record(out, start);
    }
}

/// Writes the bitmap as runs, or as raw words when runs would be longer.
fn put_bitmap(out: &mut BytesMut, b: &DirtyBitmap) {
    out.put_u64_le(b.len() as u64);
    let form_at = out.len();
    let words_len = words_for(b.len()) * 8;
    out.put_u8(BITMAP_RUNS);
    let count_at = out.len();
    out.put_u32_le(0);
    let mut runs = 0u32;
    let mut prev_end = 0usize;
    for run in b.iter_runs() {
        varint::push(out, (run.start - prev_end) as u64);
        varint::push(out, run.len() as u64);
        prev_end = run.end;
        runs += 1;
        if out.len() - count_at > words_len {
            break;
        }
    }
    if out.len() - count_at > words_len {
        out.truncate(form_at);
        out.put_u8(BITMAP_WORDS);
        out.reserve(words_len);
        for w in b.words() {
            out.put_u64_le(*w);
        }
    } else {
        out[count_at..count_at + 4].copy_from_slice(&runs.to_le_bytes());
    }
}

/// Reads a bitmap of exactly `expected` pages, or of at most `max` when `expected` is
/// unknown. Nothing is allocated before the page count passed that check.
fn get_bitmap(
    r: &mut Reader<'_>,
    expected: Option<u64>,
    max: u64,
) -> Result<DirtyBitmap, PayloadError> {
    let pages = r.u64("bitmap page count")?;
    match expected {
        Some(e) if e != pages => return Err(PayloadError::BitmapSize { pages, expected: e }),
        None if pages > max => {
            return Err(PayloadError::BitmapSize {
                pages,
                expected: max,
            });
        }
        _ => {}
    }
    let len = usize::try_from(pages).map_err(|_| PayloadError::BitmapSize {
        pages,
        expected: usize::MAX as u64,
    })?;
    match r.u8("bitmap form")? {
        BITMAP_RUNS => {
            let n = r.count("bitmap runs", 2)?;
            let mut bitmap = DirtyBitmap::new(len);
            let mut pos = 0u64;
            for run in 0..n {
                let gap = r.varint("bitmap run gap")?;
                let run_len = r.varint("bitmap run length")?;
                let bad = || PayloadError::BadRun {
                    run: run as u32,
                    gap,
                    len: run_len,
                };
                if run_len == 0 || (run > 0 && gap == 0) {
                    return Err(bad());
                }
                let start = pos.checked_add(gap).ok_or_else(bad)?;
                let end = start.checked_add(run_len).ok_or_else(bad)?;
                if end > pages {
                    return Err(bad());
                }
                bitmap.set_range(start as usize..end as usize);
                pos = end;
            }
            Ok(bitmap)
        }
        BITMAP_WORDS => {
            let n = words_for(len);
            let raw = r.slice(n.saturating_mul(8), "bitmap words")?;
            let words = raw
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    u64::from_le_bytes(a)
                })
                .collect();
            let words: Vec<u64> = words;
            let rem = len % 64;
            if rem != 0 && words.last().is_some_and(|w| w >> rem != 0) {
                return Err(PayloadError::BitmapTail { pages });
            }
            // The length matches by construction.
            DirtyBitmap::from_words(words, len).ok_or(PayloadError::BitmapSize {
                pages,
                expected: pages,
            })
        }
        form => Err(PayloadError::UnknownBitmapForm(form)),
    }
}

/// Decodes a return-path payload; `Ok(None)` for a type this build does not know.
pub(crate) fn decode(
    record_type: RecordType,
    payload: &Bytes,
    page_count: Option<u64>,
    max_bitmap_pages: u64,
) -> Result<Option<ReturnRecord>, PayloadError> {
    let mut r = Reader::new(payload);
    let record = match record_type {
        RecordType::ACK => {
            let kind = r.u8("ack kind")?;
            let value = r.u64("ack value")?;
            ReturnRecord::Ack(match kind {
                ACK_ITERATION => Ack::Iteration(value),
                ACK_OFFSET => Ack::StreamOffset(value),
                ACK_POSTCOPY_READY => Ack::PostcopyReady(value),
                k => return Err(PayloadError::UnknownAck(k)),
            })
        }
        RecordType::PAGE_REQUEST => {
            let page = r.u64("requested page")?;
            let count = r.u32("requested page count")?;
            if count == 0 {
                return Err(PayloadError::EmptyRange { start: page });
            }
            let limit = page_count.unwrap_or(u64::MAX);
            if page.checked_add(count.into()).is_none_or(|end| end > limit) {
                return Err(PayloadError::RangeOutOfRange {
                    start: page,
                    count: count.into(),
                    pages: limit,
                });
            }
            ReturnRecord::PageRequest { page, count }
        }
        RecordType::RECEIVED_BITMAP => {
            ReturnRecord::ReceivedBitmap(get_bitmap(&mut r, page_count, max_bitmap_pages)?)
        }
        RecordType::VERDICT => ReturnRecord::Verdict(match r.u8("verdict")? {
            VERDICT_RUNNING => Verdict::Running,
            VERDICT_FAILED => Verdict::Failed {
                reason: r.string("failure reason")?,
            },
            c => return Err(PayloadError::UnknownVerdict(c)),
        }),
        _ => return Ok(None),
    };
    r.end()?;
    Ok(Some(record))
}
