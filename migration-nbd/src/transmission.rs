//! The server side of the transmission phase, without I/O: every request header becomes
//! either a typed [`Request`] to execute or the exact error the NBD protocol document asks
//! for, decided before anything is allocated, and every reply is encoded by the
//! [`Session`] that knows whether structured replies were negotiated.
//!
//! [`Server`](crate::Server) drives it on threads; a VMM with its own event loop can drive
//! [`ServerHandshake`](crate::handshake::ServerHandshake) and then a [`Session`] itself:
//! parse each 28-byte header with [`RequestHeader::parse`], [`Session::check`] it, read a
//! `WRITE`'s payload (or drain a rejected one), run the request and append its reply with
//! the `encode_*` methods.

use bytes::{BufMut, BytesMut};

use crate::proto::{self, NbdErrno, cflags, cmd, tflags};
use crate::wire::{self, ChunkHeader, ChunkPayload};
pub use crate::wire::{BlockDescriptor, REQUEST_HEADER_LEN, RequestHeader};

/// What was negotiated for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Export size.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies are on.
    pub structured_replies: bool,
    /// `base:allocation` was selected (its id).
    pub base_allocation_id: Option<u32>,
    /// Alignment the client promised to respect (1 when it did not ask for constraints).
    pub alignment: u32,
    /// Largest `READ`/`WRITE` payload accepted.
    pub max_payload: u32,
    /// Largest `WRITE` payload the server reads and throws away after rejecting it; a
    /// longer one ends the connection (it would only cost the server time).
    pub max_drain: u32,
}

/// A valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Read `length` bytes at `offset`.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// One content chunk only.
        df: bool,
    },
    /// Write the `length` bytes of payload that follow at `offset`.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Persist all completed writes.
    Flush,
    /// Discard.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Prefetch.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Persist before replying.
        fua: bool,
        /// Must stay allocated.
        no_hole: bool,
        /// Fail with `ENOTSUP` rather than be slow.
        fast: bool,
    },
    /// Allocation status.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length of interest.
        length: u32,
        /// One extent only.
        req_one: bool,
    },
    /// Clean disconnect.
    Disconnect,
}

/// A request the server answers with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Error value sent.
    pub error: NbdErrno,
    /// Message sent in a structured error chunk.
    pub message: String,
    /// Bytes of `WRITE` payload to read and discard before the next request.
    pub drain: u32,
}

/// Verdict on one request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Execute it.
    Accept(Request),
    /// Answer with this error; the connection stays up.
    Reject(Rejection),
}

/// A request after which the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FatalRequest {
    /// A `WRITE` whose payload is too large to even read and discard.
    #[error("WRITE of {length} bytes at offset {offset}: payload above {max} bytes, hanging up")]
    PayloadTooLarge {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Limit.
        max: u32,
    },
}

impl Session {
    /// Appends the reply to a request that succeeded and returns no data (or the header of
    /// a simple reply to a `READ`, when structured replies are off: the data follows it).
    pub fn encode_ok(&self, cookie: u64, out: &mut BytesMut) {
        wire::encode_simple_reply(cookie, 0, out);
    }

    /// Appends an error reply: a final structured error chunk carrying `message` (cut to
    /// the protocol's 4096 bytes) when structured replies are on, a simple reply otherwise.
    pub fn encode_error(&self, cookie: u64, error: NbdErrno, message: &str, out: &mut BytesMut) {
        if self.structured_replies {
            ChunkPayload::Error {
                error: error.0,
                message: protocol_string(message),
            }
            .encode_chunk(cookie, true, out);
        } else {
            wire::encode_simple_reply(cookie, error.0, out);
        }
    }

    /// Appends the header of an `OFFSET_DATA` chunk (structured replies only) for the `len`
    /// bytes at `offset` that must follow it; `done` marks the reply's last chunk.
    pub fn encode_data_header(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        done: bool,
        out: &mut BytesMut,
    ) {
        ChunkHeader {
            flags: if done { proto::REPLY_FLAG_DONE } else { 0 },
            kind: proto::chunk::OFFSET_DATA,
            cookie,
            // `Server::new` keeps payloads 8 bytes below 2^32.
            length: len.saturating_add(8),
        }
        .encode(out);
        out.put_u64(offset);
    }

    /// Appends an `OFFSET_HOLE` chunk (structured replies only): `len` bytes at `offset`
    /// read as zeroes.
    pub fn encode_hole(&self, cookie: u64, offset: u64, len: u32, done: bool, out: &mut BytesMut) {
        ChunkPayload::OffsetHole {
            offset,
            length: len,
        }
        .encode_chunk(cookie, done, out);
    }

    /// Appends the final `NONE` chunk of a structured reply whose other chunks all went
    /// out without the done flag.
    pub fn encode_done(&self, cookie: u64, out: &mut BytesMut) {
        ChunkPayload::None.encode_chunk(cookie, true, out);
    }

    /// Appends a final `ERROR_OFFSET` chunk (structured replies only): the request failed
    /// at `offset`.
    pub fn encode_error_at(
        &self,
        cookie: u64,
        error: NbdErrno,
        message: &str,
        offset: u64,
        out: &mut BytesMut,
    ) {
        ChunkPayload::ErrorOffset {
            error: error.0,
            message: protocol_string(message),
            offset,
        }
        .encode_chunk(cookie, true, out);
    }

    /// Appends the final `BLOCK_STATUS` chunk for the negotiated `base:allocation`
    /// context.
    pub fn encode_block_status(
        &self,
        cookie: u64,
        descriptors: &[BlockDescriptor],
        out: &mut BytesMut,
    ) {
        ChunkHeader {
            flags: proto::REPLY_FLAG_DONE,
            kind: proto::chunk::BLOCK_STATUS,
            cookie,
            // The server sends at most `max_extents` descriptors; the length saturates
            // rather than wraps for a caller that passes more than 2^29.
            length: u32::try_from(4 + 8 * descriptors.len()).unwrap_or(u32::MAX),
        }
        .encode(out);
        out.put_u32(self.base_allocation_id.unwrap_or(0));
        for d in descriptors {
            out.put_u32(d.length);
            out.put_u32(d.flags);
        }
    }

    /// Decides what to do with a request header.
    pub fn check(&self, h: &RequestHeader) -> Result<Verdict, FatalRequest> {
        let drain = if h.command == cmd::WRITE { h.length } else { 0 };
        if drain > self.max_drain.max(self.max_payload) {
            return Err(FatalRequest::PayloadTooLarge {
                offset: h.offset,
                length: h.length,
                max: self.max_drain.max(self.max_payload),
            });
        }
        match self.check_inner(h) {
            Ok(r) => Ok(Verdict::Accept(r)),
            Err((error, message)) => Ok(Verdict::Reject(Rejection {
                error,
                message: format!(
                    "{} offset {} length {}: {message}",
                    proto::command_name(h.command),
                    h.offset,
                    h.length
                ),
                drain,
            })),
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn check_inner(&self, h: &RequestHeader) -> Result<Request, (NbdErrno, String)> {
        let inval = |m: &str| Err((NbdErrno::EINVAL, m.to_string()));
        let (offset, length, flags) = (h.offset, h.length, h.flags);
        if h.command == cmd::DISC {
            // The client is leaving; whatever else the header says does not matter.
            return Ok(Request::Disconnect);
        }
        let is_write = matches!(h.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if !matches!(
            h.command,
            cmd::READ
                | cmd::WRITE
                | cmd::FLUSH
                | cmd::TRIM
                | cmd::CACHE
                | cmd::WRITE_ZEROES
                | cmd::BLOCK_STATUS
        ) {
            return inval(&format!("unknown command {}", h.command));
        }
        if flags & !cflags::KNOWN != 0 {
            return inval(&format!(
                "unknown command flags {:#x}",
                flags & !cflags::KNOWN
            ));
        }
        if flags & cflags::FUA != 0 && !self.has(tflags::SEND_FUA) {
            return inval("FUA flag but FUA was not offered");
        }
        if flags & (cflags::NO_HOLE | cflags::FAST_ZERO) != 0 && h.command != cmd::WRITE_ZEROES {
            return inval("NO_HOLE/FAST_ZERO flag is only valid on WRITE_ZEROES");
        }
        if flags & cflags::FAST_ZERO != 0 && !self.has(tflags::SEND_FAST_ZERO) {
            return inval("FAST_ZERO flag but FAST_ZERO was not offered");
        }
        if flags & cflags::DF != 0 && (h.command != cmd::READ || !self.has(tflags::SEND_DF)) {
            return inval("DF flag is only valid on READ with structured replies");
        }
        if flags & cflags::REQ_ONE != 0 && h.command != cmd::BLOCK_STATUS {
            return inval("REQ_ONE flag is only valid on BLOCK_STATUS");
        }
        if is_write && self.has(tflags::READ_ONLY) {
            return Err((NbdErrno::EPERM, "the export is read-only".into()));
        }
        let offered = match h.command {
            cmd::FLUSH => self.has(tflags::SEND_FLUSH),
            cmd::TRIM => self.has(tflags::SEND_TRIM),
            cmd::WRITE_ZEROES => self.has(tflags::SEND_WRITE_ZEROES),
            cmd::CACHE => self.has(tflags::SEND_CACHE),
            cmd::BLOCK_STATUS => self.structured_replies && self.base_allocation_id.is_some(),
            _ => true,
        };
        if !offered {
            return inval(match h.command {
                cmd::BLOCK_STATUS => "BLOCK_STATUS without a negotiated metadata context",
                _ => "command was not offered for this export",
            });
        }
        if h.command == cmd::FLUSH {
            if offset != 0 || length != 0 {
                return inval("FLUSH offset and length must be zero");
            }
            return Ok(Request::Flush);
        }
        let end = offset.checked_add(length as u64);
        if end.is_none_or(|end| end > self.size) {
            let e = if matches!(h.command, cmd::WRITE | cmd::WRITE_ZEROES) {
                NbdErrno::ENOSPC
            } else {
                NbdErrno::EINVAL
            };
            return Err((
                e,
                format!(
                    "range goes past the end of the export ({} bytes)",
                    self.size
                ),
            ));
        }
        if self.alignment > 1
            && (offset % self.alignment as u64 != 0 || length % self.alignment != 0)
        {
            return inval(&format!(
                "not aligned to the minimum block size of {}",
                self.alignment
            ));
        }
        let fua = flags & cflags::FUA != 0;
        match h.command {
            cmd::READ => {
                if length > self.max_payload {
                    // Without structured replies the protocol says EINVAL; with them a
                    // large read may be refused with EOVERFLOW.
                    let e = if self.structured_replies {
                        NbdErrno::EOVERFLOW
                    } else {
                        NbdErrno::EINVAL
                    };
                    return Err((
                        e,
                        format!("read above the maximum payload of {}", self.max_payload),
                    ));
                }
                Ok(Request::Read {
                    offset,
                    length,
                    df: flags & cflags::DF != 0,
                })
            }
            cmd::WRITE => {
                if length > self.max_payload {
                    return inval(&format!(
                        "write above the maximum payload of {}",
                        self.max_payload
                    ));
                }
                Ok(Request::Write {
                    offset,
                    length,
                    fua,
                })
            }
            cmd::TRIM => Ok(Request::Trim {
                offset,
                length,
                fua,
            }),
            cmd::CACHE => Ok(Request::Cache { offset, length }),
            cmd::WRITE_ZEROES => Ok(Request::WriteZeroes {
                offset,
                length,
                fua,
                no_hole: flags & cflags::NO_HOLE != 0,
                fast: flags & cflags::FAST_ZERO != 0,
            }),
            cmd::BLOCK_STATUS => {
                if length == 0 {
                    return inval("BLOCK_STATUS of length 0 has no extent to describe");
                }
                Ok(Request::BlockStatus {
                    offset,
                    length,
                    req_one: flags & cflags::REQ_ONE != 0,
                })
            }
            _ => inval("unknown command"),
        }
    }
}

/// `message` cut to the protocol's longest string, on a character boundary.
fn protocol_string(message: &str) -> String {
    let mut cut = message.len().min(proto::MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message[..cut].to_string()
}
