//! The migration stream and its return path, as sans-io encoder and decoder.
//!
//! Nothing here does I/O. Encoders append to a [`BytesMut`](bytes::BytesMut) that the
//! caller sends however it likes; decoders take bytes as they arrive, in pieces of any
//! size (one byte at a time works), and hand back typed frames. Page data in a decoded
//! batch are [`Bytes`](bytes::Bytes) slices of the received buffer: nothing is copied
//! between the socket and guest RAM but the final write into the page.
//!
//! - [`StreamHeader::encode`] opens each direction; records encode themselves with
//!   [`Record::encode`] and [`ReturnRecord::encode`].
//! - [`PageBatchWriter`] is the hot path: pages are appended one at a time into a reused
//!   buffer, and the record CRC is updated as each page is written, while it is in L1.
//! - [`StreamDecoder`] (source to destination) and [`ReturnDecoder`] (destination to
//!   source) check every length against a bound before using it, check each record's CRC
//!   before looking at its payload, and report errors with the record type and the byte
//!   offset of the record in the stream.
//!
//! # Wire format, version 1
//!
//! All integers are **little-endian** (the byte order of every host KVM migrates on that
//! this workspace targets, and of the KVM dirty-log bitmap layout). Offsets in errors count
//! from the first byte of the stream header.
//!
//! ## Stream header (32 bytes)
//!
//! Each direction starts with one header. The return path echoes the VM UUID, so each side
//! can check it talks about the right guest.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0      | 8    | magic: `LVMIGSTR` (migration stream) or `LVMIGRET` (return path) |
//! | 8      | 2    | version, `1` ([`VERSION`]) |
//! | 10     | 2    | flags ([`HeaderFlags`]): bits 0–7 optional (unknown ones are ignored), bits 8–15 required (unknown ones are refused) |
//! | 12     | 16   | VM UUID |
//! | 28     | 4    | CRC32 of bytes 0..28 |
//!
//! The decoder checks the magic, then the version, then the CRC, then the flags and (if
//! asked to) the UUID.
//!
//! ## Record framing
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0      | 2    | type ([`RecordType`]); bit 15 set marks the record skippable |
//! | 2      | 4    | payload length `N` (at most [`DecoderOptions::max_record_len`]) |
//! | 6      | N    | payload |
//! | 6 + N  | 4    | CRC32 (IEEE, `crc32fast`) of bytes 0..6+N: type, length and payload |
//!
//! The length is checked against the limit as soon as its six header bytes have arrived,
//! and the CRC before anything in the payload is read. A record of unknown type is
//! skipped when its skippable bit is set and is an error otherwise. Every payload must be
//! consumed exactly: trailing bytes are an error.
//!
//! Payload field types: `u8`/`u16`/`u32`/`u64` little-endian integers; `varint` an
//! unsigned LEB128 integer of at most 10 bytes; `string` a `u32` byte length then that
//! many bytes of UTF-8; `ranges` a `u32` count then, for each, `start: varint` and
//! `count: varint` (a non-empty range of page indices `start..start+count`, in no
//! particular order).
//!
//! ## Migration stream records
//!
//! | type | record | payload |
//! |-----:|--------|---------|
//! | `0x0001` | [`Config`] | `page_size: u32`, `region_count: u32`, `region_count` × (`guest_base: u64`, `size: u64`), `vmm_len: u32`, `vmm: [u8; vmm_len]` |
//! | `0x0002` | [`PageBatch`] | `page_size: u32`, then page entries to the end of the payload (below) |
//! | `0x0003` | [`DeviceState`] | `id: string`, `version: u32`, `data`: the rest of the payload |
//! | `0x8004` | [`IterationEnd`] (skippable) | ten `u64`: iteration, zero, raw, zstd and delta pages, bytes, dirty pages left, duration in ns, dirty rate and bandwidth in bytes/s |
//! | `0x0005` | [`Record::DiscardPages`] | `ranges` |
//! | `0x0006` | [`Record::SwitchToPostcopy`] | `ranges` (pages to discard) |
//! | `0x0007` | [`Record::Complete`] | empty |
//! | `0x0008` | [`Record::Abort`] | `reason: string` |
//! | `0x0009` | [`Record::EndOfData`] | empty |
//! | `0x000a` | [`Record::PostcopyCommit`] | empty |
//!
//! The config is sent once, first; after it the decoder checks every page index and
//! discard range against the RAM it describes. A second config is an error. In a stream
//! that resumes an interrupted post-copy ([`HeaderFlags::POSTCOPY_RESUME`]) the config may
//! be left out: give the decoder [`DecoderOptions::page_count`] instead.
//!
//! A discard list too long for one record is split: any number of `DiscardPages` records,
//! then `SwitchToPostcopy` with the rest ([`write_postcopy_switch`] does the split). The
//! destination discards the union of all of them.
//!
//! `Complete` and `Abort` end the stream: a record after either is an error, and a stream
//! that stops before either is reported by [`StreamDecoder::finish`].
//!
//! The hand-over of the guest is a three-step exchange, so that a broken connection at any
//! point leaves at most one side running it: the source, guest paused, ends its data with
//! `EndOfData`; the destination checks what it received and answers `Verdict::Running`
//! (ready to run) or `Verdict::Failed`; the source, on `Running`, commits with `Complete`
//! and never runs the guest again, and only then does the destination run it. If the
//! connection breaks before the destination reads `Complete`, it does not run the guest; if
//! the source cannot send `Complete`, it resumes the guest, and the destination, which
//! cannot have read it, does not run it either. The one case left to an operator is a
//! `Complete` the source handed to the kernel but the connection lost: then neither side
//! runs the guest, and the source still holds all of it.
//!
//! ### Page entries
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0      | 8    | global page index (`u64`) |
//! | 8      | 1    | encoding: `0` zero, `1` raw, `2` zstd, `3` delta |
//! | 9      | …    | zero: nothing; raw: `page_size` bytes; zstd and delta: `len: u32` (at most `page_size`), then `len` bytes |
//!
//! The batch's `page_size` must be a power of two no larger than 1 GiB and, once a config
//! was seen, equal to the config's. A zstd entry is one zstd frame that decompresses to
//! exactly one page; a delta entry is the format described in [`crate::page`], applied
//! onto the copy of the page the destination already holds.
//!
//! ## Return path records
//!
//! | type | record | payload |
//! |-----:|--------|---------|
//! | `0x0101` | [`Ack`] | `kind: u8` (`0` iteration, `1` stream offset, `2` post-copy ready), `value: u64` (for `2`: the pages the destination holds) |
//! | `0x0102` | [`ReturnRecord::PageRequest`] | `page: u64`, `count: u32` (at least 1) |
//! | `0x0103` | [`ReturnRecord::ReceivedBitmap`] | `page_count: u64`, `form: u8`, then for form `0` (runs): `run_count: u32` and `run_count` × (`gap: varint`, `len: varint`), each run starting `gap` pages after the previous run's end (after page 0 for the first), with `len ≥ 1` and `gap ≥ 1` but for the first run; for form `1` (words): ⌈`page_count`/64⌉ × `u64`, bit `i % 64` of word `i / 64` for page `i` |
//! | `0x0104` | [`Verdict`] | `code: u8` (`0` running, `1` failed), then for `1`: `reason: string` |
//!
//! The encoder writes whichever bitmap form is shorter, so a bitmap never takes more than
//! one bit per page plus 13 bytes. On decode the bitmap's page count must equal the known
//! page count ([`DecoderOptions::page_count`]), or, if none is known, not exceed
//! [`DecoderOptions::max_bitmap_pages`], before anything is allocated for it.
//!
//! `Verdict` ends the return path.
//!
//! ## Post-copy
//!
//! A post-copy migration (or the post-copy half of a hybrid) runs over two connections
//! the source opens to the destination: the main stream, and an urgent channel whose
//! header carries [`HeaderFlags::URGENT`] and the same VM UUID.
//!
//! 1. The switch, with the guest paused on the source, on the main stream: the discard
//!    list (pages dirtied since they were sent; any `DiscardPages`, then
//!    `SwitchToPostcopy` with the rest, [`write_postcopy_switch`]), the device state, then
//!    `EndOfData`.
//! 2. The destination drops the discarded pages, loads the device state, registers every
//!    page it does not hold for faults, and answers [`Ack::PostcopyReady`] (it does not run
//!    the guest yet). A failure before that is a `Failed` verdict, and the source resumes.
//! 3. The source commits with [`Record::PostcopyCommit`] and from then on never runs the
//!    guest again; the destination runs it when it reads the commit. Before the commit is
//!    written whole, a failure resumes the guest on the source; a destination that never
//!    read it never runs the guest.
//! 4. The destination sends a `PageRequest` on the urgent channel's return path for each
//!    page the guest (or the VMM, or KVM on its behalf) faults on; the source answers with
//!    page batches on the urgent channel, ahead of everything else, and pushes every page
//!    the destination lacks as page batches on the main stream meanwhile, restarting near
//!    each requested page. `Complete` ends each stream once every page was sent.
//! 5. When it holds every page, the destination stops handling faults and ends the main
//!    return path with `Verdict::Running`.
//!
//! ## Post-copy recovery
//!
//! When a connection breaks during post-copy, both sides keep their state: the guest runs
//! on the destination with the pages it has, a vCPU that faults on a missing page waits.
//! The source reconnects and opens a new main stream whose header carries the same VM UUID
//! and [`HeaderFlags::POSTCOPY_RESUME`] (and a new urgent channel with
//! `URGENT | POSTCOPY_RESUME`, always after the main stream of the same attempt, so that
//! a destination pairs the two: an urgent channel that arrived before the latest main
//! stream belongs to an attempt the source gave up); the destination answers on the main return path with a
//! `ReceivedBitmap` of the pages it holds. That bitmap is the resume handshake: the source
//! sends `PostcopyCommit` again (a commit lost with the connection is taken up, a second
//! one changes nothing), then every page not marked in it, and serves page requests as
//! before; the destination requests again what it was waiting for. A destination that
//! does not know the flag refuses the stream instead of mistaking it for a new migration.

mod batch;
mod decoder;
mod error;
mod header;
mod record;
mod ret;
mod wire;

#[cfg(test)]
mod tests;

pub use batch::{Page, PageBatch, PageBatchWriter, PageData};
pub use decoder::{
    DEFAULT_MAX_BITMAP_PAGES, DEFAULT_MAX_RECORD_LEN, DecoderOptions, Frame, ReturnDecoder,
    StreamDecoder,
};
pub use error::{PayloadError, StreamError};
pub use header::{Direction, HEADER_LEN, HeaderFlags, StreamHeader, VERSION};
pub use record::{Config, DeviceState, IterationEnd, Record, write_postcopy_switch};
pub use ret::{Ack, ReturnRecord, Verdict};
pub use wire::{RECORD_OVERHEAD, RecordType, write_record};
