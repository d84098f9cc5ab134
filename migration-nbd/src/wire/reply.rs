//! The fixed part of every transmission reply: simple replies and structured chunk headers.

use bytes::{Buf, BufMut, BytesMut};

use super::WireError;
use crate::proto;

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Appends a simple reply header (read data, if any, follows it).
pub fn encode_simple_reply(cookie: u64, error: u32, out: &mut BytesMut) {
    out.put_u32(proto::SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// The fixed part of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`proto::REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`proto::chunk`).
    pub kind: u16,
    /// Cookie of the request answered.
    pub cookie: u64,
    /// Length of the payload that follows.
    pub length: u32,
}

impl ChunkHeader {
    /// Appends the header.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(proto::STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u32(self.length);
    }

    /// Whether this is the last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags & proto::REPLY_FLAG_DONE != 0
    }
}

/// The fixed part of any reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: read data of the request's length follows when `error` is 0 and
    /// the request was a `READ`.
    Simple {
        /// Cookie of the request answered.
        cookie: u64,
        /// Error value, 0 on success.
        error: u32,
    },
    /// A structured reply chunk.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// Decodes and consumes a reply header from the front of `buf`.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let magic = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
        match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                if buf.len() < SIMPLE_REPLY_LEN {
                    return Ok(None);
                }
                buf.advance(4);
                let error = buf.get_u32();
                let cookie = buf.get_u64();
                Ok(Some(ReplyHeader::Simple { cookie, error }))
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                if buf.len() < CHUNK_HEADER_LEN {
                    return Ok(None);
                }
                buf.advance(4);
                Ok(Some(ReplyHeader::Chunk(ChunkHeader {
                    flags: buf.get_u16(),
                    kind: buf.get_u16(),
                    cookie: buf.get_u64(),
                    length: buf.get_u32(),
                })))
            }
            found => Err(WireError::BadMagic {
                what: "reply",
                expected: proto::SIMPLE_REPLY_MAGIC as u64,
                found: found as u64,
            }),
        }
    }

    /// Cookie of the request answered.
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } => *cookie,
            ReplyHeader::Chunk(c) => c.cookie,
        }
    }
}
