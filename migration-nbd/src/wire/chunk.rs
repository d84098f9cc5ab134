//! Payloads of structured reply chunks: data, holes, block status, errors.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::reply::ChunkHeader;
use super::{WireError, malformed};
use crate::proto::{self, chunk};

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Length of the extent (non-zero).
    pub length: u32,
    /// Status flags of the context (`proto::state` for `base:allocation`).
    pub flags: u32,
}

/// The payload of a structured reply chunk, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    /// `REPLY_TYPE_NONE`.
    None,
    /// `REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Offset of the data in the export.
        offset: u64,
        /// The data (at least one byte).
        data: Bytes,
    },
    /// `REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Offset of the hole.
        offset: u64,
        /// Its length (non-zero).
        length: u32,
    },
    /// `REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// Consecutive extents (at least one).
        descriptors: Vec<BlockDescriptor>,
    },
    /// `REPLY_TYPE_ERROR`.
    Error {
        /// Error value (non-zero).
        error: u32,
        /// Message for a human.
        message: String,
    },
    /// `REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// Error value (non-zero).
        error: u32,
        /// Message for a human.
        message: String,
        /// Where the error happened.
        offset: u64,
    },
    /// An error chunk of a type this implementation does not know (bit 15 set): the
    /// request failed, the connection stays usable.
    UnknownError {
        /// Chunk type.
        kind: u16,
        /// Error value.
        error: u32,
        /// Message for a human.
        message: String,
    },
}

impl ChunkPayload {
    /// The chunk type code.
    pub fn kind(&self) -> u16 {
        match self {
            ChunkPayload::None => chunk::NONE,
            ChunkPayload::OffsetData { .. } => chunk::OFFSET_DATA,
            ChunkPayload::OffsetHole { .. } => chunk::OFFSET_HOLE,
            ChunkPayload::BlockStatus { .. } => chunk::BLOCK_STATUS,
            ChunkPayload::Error { .. } => chunk::ERROR,
            ChunkPayload::ErrorOffset { .. } => chunk::ERROR_OFFSET,
            ChunkPayload::UnknownError { kind, .. } => *kind,
        }
    }

    /// Length of the encoded payload.
    pub fn encoded_len(&self) -> usize {
        match self {
            ChunkPayload::None => 0,
            ChunkPayload::OffsetData { data, .. } => 8 + data.len(),
            ChunkPayload::OffsetHole { .. } => 12,
            ChunkPayload::BlockStatus { descriptors, .. } => 4 + 8 * descriptors.len(),
            ChunkPayload::Error { message, .. } | ChunkPayload::UnknownError { message, .. } => {
                6 + message.len()
            }
            ChunkPayload::ErrorOffset { message, .. } => 14 + message.len(),
        }
    }

    /// Appends the payload (not the header).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ChunkPayload::None => {}
            ChunkPayload::OffsetData { offset, data } => {
                out.put_u64(*offset);
                out.put_slice(data);
            }
            ChunkPayload::OffsetHole { offset, length } => {
                out.put_u64(*offset);
                out.put_u32(*length);
            }
            ChunkPayload::BlockStatus {
                context_id,
                descriptors,
            } => {
                out.put_u32(*context_id);
                for d in descriptors {
                    out.put_u32(d.length);
                    out.put_u32(d.flags);
                }
            }
            ChunkPayload::Error { error, message }
            | ChunkPayload::UnknownError { error, message, .. } => {
                out.put_u32(*error);
                out.put_u16(message.len() as u16);
                out.put_slice(message.as_bytes());
            }
            ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            } => {
                out.put_u32(*error);
                out.put_u16(message.len() as u16);
                out.put_slice(message.as_bytes());
                out.put_u64(*offset);
            }
        }
    }

    /// Appends a whole chunk: header then payload.
    pub fn encode_chunk(&self, cookie: u64, done: bool, out: &mut BytesMut) {
        ChunkHeader {
            flags: if done { proto::REPLY_FLAG_DONE } else { 0 },
            kind: self.kind(),
            cookie,
            length: self.encoded_len() as u32,
        }
        .encode(out);
        self.encode(out);
    }

    /// Parses the payload of a chunk of type `kind`. Unknown non-error types are errors
    /// (the protocol asks the client to hang up on them).
    pub fn parse(kind: u16, mut data: Bytes) -> Result<ChunkPayload, WireError> {
        const WHAT: &str = "structured reply chunk";
        match kind {
            chunk::NONE => {
                if data.is_empty() {
                    Ok(ChunkPayload::None)
                } else {
                    Err(malformed(WHAT, "NONE chunk carries a payload"))
                }
            }
            chunk::OFFSET_DATA => {
                if data.len() < 9 {
                    return Err(malformed(WHAT, "OFFSET_DATA shorter than 9 bytes"));
                }
                let offset = data.get_u64();
                Ok(ChunkPayload::OffsetData { offset, data })
            }
            chunk::OFFSET_HOLE => {
                if data.len() != 12 {
                    return Err(malformed(WHAT, "OFFSET_HOLE must be 12 bytes"));
                }
                let offset = data.get_u64();
                let length = data.get_u32();
                if length == 0 {
                    return Err(malformed(WHAT, "OFFSET_HOLE of length 0"));
                }
                Ok(ChunkPayload::OffsetHole { offset, length })
            }
            chunk::BLOCK_STATUS => {
                if data.len() < 12 || (data.len() - 4) % 8 != 0 {
                    return Err(malformed(
                        WHAT,
                        format!("BLOCK_STATUS payload of {} bytes", data.len()),
                    ));
                }
                let context_id = data.get_u32();
                let mut descriptors = Vec::with_capacity(data.len() / 8);
                while data.has_remaining() {
                    let length = data.get_u32();
                    let flags = data.get_u32();
                    if length == 0 {
                        return Err(malformed(WHAT, "block descriptor of length 0"));
                    }
                    descriptors.push(BlockDescriptor { length, flags });
                }
                Ok(ChunkPayload::BlockStatus {
                    context_id,
                    descriptors,
                })
            }
            k if k & chunk::ERROR_BIT != 0 => {
                if data.len() < 6 {
                    return Err(malformed(WHAT, "error chunk shorter than 6 bytes"));
                }
                let error = data.get_u32();
                let mlen = data.get_u16() as usize;
                if mlen > data.len() {
                    return Err(malformed(
                        WHAT,
                        format!(
                            "error message of {mlen} bytes in {} bytes of payload",
                            data.len()
                        ),
                    ));
                }
                let message = String::from_utf8_lossy(&data.split_to(mlen)).into_owned();
                match k {
                    chunk::ERROR => Ok(ChunkPayload::Error { error, message }),
                    chunk::ERROR_OFFSET => {
                        if data.len() != 8 {
                            return Err(malformed(WHAT, "ERROR_OFFSET without its offset"));
                        }
                        Ok(ChunkPayload::ErrorOffset {
                            error,
                            message,
                            offset: data.get_u64(),
                        })
                    }
                    _ => Ok(ChunkPayload::UnknownError {
                        kind: k,
                        error,
                        message,
                    }),
                }
            }
            other => Err(malformed(WHAT, format!("unknown chunk type {other}"))),
        }
    }
}
