//! Incremental decoders for both directions.

use bytes::{Buf, Bytes, BytesMut};

use super::error::{PayloadError, StreamError};
use super::header::{Direction, HEADER_LEN, StreamHeader};
use super::record::{self, Record};
use super::ret::{self, ReturnRecord};
use super::wire::{RECORD_HEADER_LEN, RECORD_OVERHEAD, RecordType};

/// Default limit on a record's payload: 64 MiB, room for a large page batch or device
/// state while keeping what a corrupt length can make a receiver buffer small.
pub const DEFAULT_MAX_RECORD_LEN: u32 = 64 << 20;

/// Default limit on the pages of a received bitmap whose size is not known in advance:
/// 2^28 pages (1 TiB of 4 KiB pages), a 32 MiB bitmap.
pub const DEFAULT_MAX_BITMAP_PAGES: u64 = 1 << 28;

/// What a decoder accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderOptions {
    /// Longest record payload accepted, checked as soon as a record's length arrives, before
    /// the decoder waits for (and the caller buffers) the record.
    pub max_record_len: u32,
    /// When set, a header for any other VM is refused.
    pub expected_vm: Option<[u8; 16]>,
    /// Pages of guest RAM, when this side knows them: page indices, ranges and bitmaps are
    /// checked against it. The migration decoder also learns it from the config record
    /// (and then checks the config agrees with this value).
    pub page_count: Option<u64>,
    /// Largest received bitmap accepted when `page_count` is not known.
    pub max_bitmap_pages: u64,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        DecoderOptions {
            max_record_len: DEFAULT_MAX_RECORD_LEN,
            expected_vm: None,
            page_count: None,
            max_bitmap_pages: DEFAULT_MAX_BITMAP_PAGES,
        }
    }
}

/// One decoded item: the header first, then records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<R> {
    /// The stream header.
    Header(StreamHeader),
    /// A record.
    Record(R),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Records,
    Ended,
    Failed { offset: u64 },
}

/// A record as framed, CRC checked, payload not yet looked at.
struct RawRecord {
    record_type: RecordType,
    offset: u64,
    payload: Bytes,
}

enum RawFrame {
    Header(StreamHeader),
    Record(RawRecord),
}

/// Header and record framing, shared by both directions.
#[derive(Debug)]
struct Framer {
    direction: Direction,
    max_record_len: u32,
    expected_vm: Option<[u8; 16]>,
    state: State,
    offset: u64,
    header: Option<StreamHeader>,
    skipped: u64,
}

impl Framer {
    fn new(direction: Direction, opts: &DecoderOptions) -> Self {
        Framer {
            direction,
            max_record_len: opts.max_record_len,
            expected_vm: opts.expected_vm,
            state: State::Header,
            offset: 0,
            header: None,
            skipped: 0,
        }
    }

    fn fail(&mut self, offset: u64) {
        self.state = State::Failed { offset };
    }

    /// Frames the next header or record and hands a record's payload to `decode`: the
    /// part both directions share (skipping unknown skippable records, failing on unknown
    /// others and on malformed payloads, ending after a terminal record).
    fn next_frame<R>(
        &mut self,
        buf: &mut BytesMut,
        mut decode: impl FnMut(RecordType, &Bytes) -> Result<Option<R>, PayloadError>,
        is_terminal: impl Fn(&R) -> bool,
    ) -> Result<Option<Frame<R>>, StreamError> {
        loop {
            let raw = match self.next(buf)? {
                None => return Ok(None),
                Some(RawFrame::Header(h)) => return Ok(Some(Frame::Header(h))),
                Some(RawFrame::Record(raw)) => raw,
            };
            match decode(raw.record_type, &raw.payload) {
                Ok(Some(record)) => {
                    if is_terminal(&record) {
                        self.state = State::Ended;
                    }
                    return Ok(Some(Frame::Record(record)));
                }
                Ok(None) if raw.record_type.is_skippable() => {
                    tracing::debug!(record_type = %raw.record_type, offset = raw.offset, "skipping unknown record");
                    self.skipped += 1;
                }
                Ok(None) => {
                    self.fail(raw.offset);
                    return Err(StreamError::UnknownRecord {
                        record_type: raw.record_type,
                        offset: raw.offset,
                    });
                }
                Err(reason) => {
                    self.fail(raw.offset);
                    return Err(StreamError::Malformed {
                        record_type: raw.record_type,
                        offset: raw.offset,
                        reason,
                    });
                }
            }
        }
    }

    fn next(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, StreamError> {
        let r = self.next_inner(buf);
        if r.is_err() && !matches!(self.state, State::Failed { .. }) {
            self.fail(self.offset);
        }
        r
    }

    fn next_inner(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, StreamError> {
        let direction = self.direction;
        match self.state {
            State::Failed { offset } => Err(StreamError::Poisoned { direction, offset }),
            State::Header => {
                if buf.len() >= 8 {
                    StreamHeader::check_magic(direction, buf)?;
                }
                let Some(bytes) = buf.first_chunk::<HEADER_LEN>() else {
                    return Ok(None);
                };
                let header = StreamHeader::parse(direction, bytes, self.expected_vm.as_ref())?;
                buf.advance(HEADER_LEN);
                self.offset += HEADER_LEN as u64;
                self.header = Some(header);
                self.state = State::Records;
                Ok(Some(RawFrame::Header(header)))
            }
            State::Records | State::Ended => {
                let Some(&[t0, t1, l0, l1, l2, l3]) = buf.first_chunk::<RECORD_HEADER_LEN>() else {
                    return Ok(None);
                };
                let record_type = RecordType(u16::from_le_bytes([t0, t1]));
                let length = u32::from_le_bytes([l0, l1, l2, l3]);
                let offset = self.offset;
                if self.state == State::Ended {
                    return Err(StreamError::AfterEnd {
                        direction,
                        record_type,
                        offset,
                    });
                }
                if length > self.max_record_len {
                    return Err(StreamError::RecordTooLong {
                        record_type,
                        offset,
                        length,
                        max: self.max_record_len,
                    });
                }
                let body = RECORD_HEADER_LEN + length as usize;
                let total = body + 4;
                if buf.len() < total {
                    return Ok(None);
                }
                let stored =
                    u32::from_le_bytes([buf[body], buf[body + 1], buf[body + 2], buf[body + 3]]);
                let computed = crc32fast::hash(&buf[..body]);
                if stored != computed {
                    return Err(StreamError::RecordCrc {
                        record_type,
                        offset,
                        stored,
                        computed,
                    });
                }
                let record = buf.split_to(total).freeze();
                self.offset += total as u64;
                Ok(Some(RawFrame::Record(RawRecord {
                    record_type,
                    offset,
                    payload: record.slice(RECORD_HEADER_LEN..body),
                })))
            }
        }
    }

    /// Checks the input ended where the stream may end. `terminal` names the records
    /// that end it.
    fn finish(&self, buf: &BytesMut, terminal: &'static str) -> Result<(), StreamError> {
        let direction = self.direction;
        let offset = self.offset;
        let have = buf.len();
        match self.state {
            State::Failed { offset } => Err(StreamError::Poisoned { direction, offset }),
            State::Header => Err(StreamError::Truncated {
                direction,
                offset,
                what: "stream header",
                have,
                need: HEADER_LEN,
            }),
            State::Records | State::Ended if have > 0 => {
                if let Some(&[t0, t1, l0, l1, l2, l3]) = buf.first_chunk::<RECORD_HEADER_LEN>() {
                    let record_type = RecordType(u16::from_le_bytes([t0, t1]));
                    if self.state == State::Ended {
                        return Err(StreamError::AfterEnd {
                            direction,
                            record_type,
                            offset,
                        });
                    }
                    let length = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
                    Err(StreamError::Truncated {
                        direction,
                        offset,
                        what: "record",
                        have,
                        need: RECORD_OVERHEAD + length,
                    })
                } else {
                    Err(StreamError::Truncated {
                        direction,
                        offset,
                        what: "record header",
                        have,
                        need: RECORD_HEADER_LEN,
                    })
                }
            }
            State::Records => Err(StreamError::Unterminated {
                direction,
                offset,
                expected: terminal,
            }),
            State::Ended => Ok(()),
        }
    }
}

macro_rules! common_accessors {
    () => {
        /// Bytes consumed from the stream so far.
        pub fn offset(&self) -> u64 {
            self.framer.offset
        }

        /// The header, once decoded.
        pub fn header(&self) -> Option<&StreamHeader> {
            self.framer.header.as_ref()
        }

        /// Records of unknown, skippable types skipped so far.
        pub fn skipped_records(&self) -> u64 {
            self.framer.skipped
        }

        /// Whether the record that ends the stream was decoded.
        pub fn is_ended(&self) -> bool {
            self.framer.state == State::Ended
        }
    };
}

/// Decodes the migration stream (source to destination), incrementally.
///
/// Append received bytes to a `BytesMut` and call [`decode`](Self::decode) until it
/// returns `Ok(None)`; it consumes what it decodes and leaves a partial record in the
/// buffer for next time. At the end of input, [`finish`](Self::finish) says whether the
/// stream ended cleanly. After an error the decoder refuses further input.
///
/// ```
/// use bytes::BytesMut;
/// use migration_core::stream::*;
///
/// let mut wire = BytesMut::new();
/// StreamHeader::new([7; 16]).encode(Direction::Migration, &mut wire);
/// Record::Complete.encode(&mut wire);
///
/// let mut dec = StreamDecoder::new(DecoderOptions::default());
/// let mut buf = BytesMut::new();
/// let mut got = Vec::new();
/// for b in wire.iter() {
///     buf.extend_from_slice(&[*b]);
///     while let Some(frame) = dec.decode(&mut buf)? {
///         got.push(frame);
///     }
/// }
/// dec.finish(&buf)?;
/// assert_eq!(got[1], Frame::Record(Record::Complete));
/// # Ok::<(), StreamError>(())
/// ```
#[derive(Debug)]
pub struct StreamDecoder {
    framer: Framer,
    ctx: record::Context,
}

impl StreamDecoder {
    /// A decoder expecting a stream header first.
    pub fn new(opts: DecoderOptions) -> Self {
        StreamDecoder {
            framer: Framer::new(Direction::Migration, &opts),
            ctx: record::Context {
                page_count: opts.page_count,
                ..Default::default()
            },
        }
    }

    common_accessors!();

    /// Pages of guest RAM, from the options or the config record.
    pub fn page_count(&self) -> Option<u64> {
        self.ctx.page_count
    }

    /// Decodes the next header or record from the front of `buf`, consuming it;
    /// `Ok(None)` when `buf` does not hold a complete one yet. Unknown skippable records
    /// are consumed and skipped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Record>>, StreamError> {
        let ctx = &mut self.ctx;
        self.framer.next_frame(
            buf,
            |record_type, payload| record::decode(record_type, payload, ctx),
            Record::is_terminal,
        )
    }

    /// At the end of input: `Ok` if the stream ended with `Complete` or `Abort` and
    /// nothing follows; an error naming what is missing otherwise.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), StreamError> {
        self.framer.finish(buf, "a Complete or Abort record")
    }
}

/// Decodes the return path (destination to source), incrementally. Used like
/// [`StreamDecoder`].
#[derive(Debug)]
pub struct ReturnDecoder {
    framer: Framer,
    page_count: Option<u64>,
    max_bitmap_pages: u64,
}

impl ReturnDecoder {
    /// A decoder expecting a return-path header first.
    pub fn new(opts: DecoderOptions) -> Self {
        ReturnDecoder {
            framer: Framer::new(Direction::Return, &opts),
            page_count: opts.page_count,
            max_bitmap_pages: opts.max_bitmap_pages,
        }
    }

    common_accessors!();

    /// Decodes the next header or record from the front of `buf`, consuming it;
    /// `Ok(None)` when `buf` does not hold a complete one yet.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Frame<ReturnRecord>>, StreamError> {
        let (page_count, max_bitmap_pages) = (self.page_count, self.max_bitmap_pages);
        self.framer.next_frame(
            buf,
            |record_type, payload| ret::decode(record_type, payload, page_count, max_bitmap_pages),
            ReturnRecord::is_terminal,
        )
    }

    /// At the end of input: `Ok` if the return path ended with a verdict and nothing
    /// follows; an error naming what is missing otherwise.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), StreamError> {
        self.framer.finish(buf, "a Verdict record")
    }
}
