//! Errors of the stream decoders.

use super::header::Direction;
use super::wire::RecordType;
use crate::layout::LayoutError;

/// Formats a UUID the usual way (8-4-4-4-12 hex digits).
pub(crate) struct UuidFmt<'a>(pub &'a [u8; 16]);

impl std::fmt::Display for UuidFmt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn uuid(u: &[u8; 16]) -> UuidFmt<'_> {
    UuidFmt(u)
}

/// Why a stream could not be decoded. Every variant past the header says which record and
/// where: its type and the byte offset of its first byte in the stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// The first eight bytes are not this direction's magic: not a stream of ours, or the
    /// two directions are crossed.
    #[error("not a {expected} stream: magic {found:02x?} at offset 0")]
    BadMagic {
        /// The stream expected.
        expected: Direction,
        /// The bytes found.
        found: [u8; 8],
    },
    /// A stream version this build does not speak.
    #[error(
        "{direction} stream version {version} is not supported (this build speaks version {})",
        super::VERSION
    )]
    UnsupportedVersion {
        /// The stream.
        direction: Direction,
        /// The version found.
        version: u16,
    },
    /// The header's CRC does not match: corrupted in transit.
    #[error(
        "{direction} stream header is corrupt: CRC {stored:#010x} stored, {computed:#010x} computed"
    )]
    HeaderCrc {
        /// The stream.
        direction: Direction,
        /// CRC in the header.
        stored: u32,
        /// CRC of the header bytes.
        computed: u32,
    },
    /// The header asks for features this build does not have.
    #[error(
        "{direction} stream requires features {flags:#06x} this build does not know; upgrade this side"
    )]
    UnknownRequiredFlags {
        /// The stream.
        direction: Direction,
        /// The unknown required bits.
        flags: u16,
    },
    /// The stream is for another VM.
    #[error(
        "{direction} stream is for VM {}, expected VM {}",
        uuid(found),
        uuid(expected)
    )]
    VmMismatch {
        /// The stream.
        direction: Direction,
        /// The UUID this side expected.
        expected: [u8; 16],
        /// The UUID in the header.
        found: [u8; 16],
    },
    /// A record claims a payload longer than the configured limit.
    #[error(
        "record {record_type} at offset {offset}: payload length {length} exceeds the limit of {max} bytes"
    )]
    RecordTooLong {
        /// The record type.
        record_type: RecordType,
        /// Offset of the record.
        offset: u64,
        /// The claimed payload length.
        length: u32,
        /// The limit.
        max: u32,
    },
    /// A record's CRC does not match: corrupted in transit.
    #[error(
        "record {record_type} at offset {offset} is corrupt: CRC {stored:#010x} stored, {computed:#010x} computed"
    )]
    RecordCrc {
        /// The record type (as read, which may itself be corrupt).
        record_type: RecordType,
        /// Offset of the record.
        offset: u64,
        /// CRC in the record.
        stored: u32,
        /// CRC of the record bytes.
        computed: u32,
    },
    /// A record type this build does not know, not marked skippable.
    #[error(
        "record {record_type} at offset {offset} is of an unknown type and not skippable; the peer speaks a newer protocol"
    )]
    UnknownRecord {
        /// The record type.
        record_type: RecordType,
        /// Offset of the record.
        offset: u64,
    },
    /// A record whose CRC is right but whose payload makes no sense.
    #[error("record {record_type} at offset {offset}: {reason}")]
    Malformed {
        /// The record type.
        record_type: RecordType,
        /// Offset of the record.
        offset: u64,
        /// What is wrong.
        reason: PayloadError,
    },
    /// A record after the one that ends the stream.
    #[error("record {record_type} at offset {offset} follows the end of the {direction} stream")]
    AfterEnd {
        /// The stream.
        direction: Direction,
        /// The record type.
        record_type: RecordType,
        /// Offset of the record.
        offset: u64,
    },
    /// The input ended inside the header or a record.
    #[error(
        "{direction} stream truncated at offset {offset}: {have} bytes of a {what} of at least {need} bytes"
    )]
    Truncated {
        /// The stream.
        direction: Direction,
        /// Offset of the incomplete header or record.
        offset: u64,
        /// "stream header", "record header" or "record".
        what: &'static str,
        /// Bytes present.
        have: usize,
        /// Bytes needed to complete it (as far as is known).
        need: usize,
    },
    /// The input ended between records, but before the record that ends the stream.
    #[error("{direction} stream ended at offset {offset} without {expected}")]
    Unterminated {
        /// The stream.
        direction: Direction,
        /// Where the input ended.
        offset: u64,
        /// The records that would have ended it.
        expected: &'static str,
    },
    /// The decoder already failed; it does not resynchronise.
    #[error("{direction} stream decoder already failed at offset {offset}")]
    Poisoned {
        /// The stream.
        direction: Direction,
        /// Where the first error was.
        offset: u64,
    },
}

/// What is wrong inside a record's payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// The payload ends inside a field.
    #[error("payload ends inside {field} at payload byte {at}")]
    Truncated {
        /// The field.
        field: &'static str,
        /// Position in the payload.
        at: usize,
    },
    /// Bytes are left after the last field.
    #[error("{count} bytes after the last field")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A varint over ten bytes or `u64::MAX`.
    #[error("over-long varint in {field} at payload byte {at}")]
    BadVarint {
        /// The field.
        field: &'static str,
        /// Position in the payload.
        at: usize,
    },
    /// A count larger than the rest of the payload could hold.
    #[error("{field} count {count} exceeds what the remaining {remaining} payload bytes can hold")]
    CountTooLarge {
        /// The field.
        field: &'static str,
        /// The count claimed.
        count: u64,
        /// Payload bytes left.
        remaining: usize,
    },
    /// A string that is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    BadUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A page size that is not a power of two up to 1 GiB.
    #[error("page size {0} is not a power of two up to 1 GiB")]
    BadPageSize(u32),
    /// A batch page size other than the config's.
    #[error("batch of {batch}-byte pages, but the config has {config}-byte pages")]
    PageSizeMismatch {
        /// The batch's page size.
        batch: u32,
        /// The config's.
        config: u32,
    },
    /// The config's RAM regions are not a valid layout.
    #[error("RAM layout: {0}")]
    Layout(#[from] LayoutError),
    /// The config's RAM size differs from what this side expected.
    #[error("config describes {got} pages of RAM, this side expects {expected}")]
    PageCountMismatch {
        /// Pages in the config.
        got: u64,
        /// Pages expected.
        expected: u64,
    },
    /// A second config record.
    #[error("second config record")]
    DuplicateConfig,
    /// A page index past the end of guest RAM.
    #[error("page {index} is outside guest RAM of {pages} pages")]
    PageOutOfRange {
        /// The page index.
        index: u64,
        /// Pages of guest RAM.
        pages: u64,
    },
    /// A page range reaching past the end of guest RAM, or past `u64::MAX`.
    #[error("pages {start}+{count} reach past guest RAM of {pages} pages")]
    RangeOutOfRange {
        /// First page.
        start: u64,
        /// Number of pages.
        count: u64,
        /// Pages of guest RAM (`u64::MAX` if unknown).
        pages: u64,
    },
    /// A page range of no pages.
    #[error("empty page range at page {start}")]
    EmptyRange {
        /// First page.
        start: u64,
    },
    /// An unknown page encoding code.
    #[error("page {index}: unknown encoding {code}")]
    UnknownEncoding {
        /// The page index.
        index: u64,
        /// The code.
        code: u8,
    },
    /// Encoded page data longer than a page.
    #[error("page {index}: {len} bytes of encoded data for a {page_size}-byte page")]
    PageDataTooLong {
        /// The page index.
        index: u64,
        /// Length of the data.
        len: u32,
        /// The page size.
        page_size: u32,
    },
    /// An unknown acknowledgement kind.
    #[error("unknown acknowledgement kind {0}")]
    UnknownAck(u8),
    /// An unknown verdict code.
    #[error("unknown verdict code {0}")]
    UnknownVerdict(u8),
    /// An unknown bitmap form.
    #[error("unknown bitmap form {0}")]
    UnknownBitmapForm(u8),
    /// A bitmap for more pages than allowed.
    #[error("bitmap of {pages} pages, expected {expected}")]
    BitmapSize {
        /// Pages in the bitmap.
        pages: u64,
        /// Pages expected (or the maximum, when the page count is unknown).
        expected: u64,
    },
    /// A bitmap in word form with bits set past its last page.
    #[error("bitmap of {pages} pages has bits set past its end")]
    BitmapTail {
        /// Pages in the bitmap.
        pages: u64,
    },
    /// A bitmap run that is empty, touches the previous run, or passes the end.
    #[error(
        "bitmap run {run} (gap {gap}, length {len}) is empty, touches the run before it, or passes the end"
    )]
    BadRun {
        /// Index of the run.
        run: u32,
        /// Its gap.
        gap: u64,
        /// Its length.
        len: u64,
    },
}
