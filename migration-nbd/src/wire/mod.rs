//! Encoders and decoders of every NBD message, over `bytes` buffers, without I/O, one
//! module per kind of message: the negotiation's options ([`option`]) and their replies
//! ([`option_reply`]), transmission requests ([`request`]), reply headers ([`reply`]) and
//! structured reply chunk payloads ([`chunk`]).
//!
//! Decoders that read from a stream buffer (`decode(&mut BytesMut)`) return `Ok(None)` until
//! the whole fixed-size part of a message is present, and then consume exactly that part.
//! Variable-length payloads are parsed from a `Bytes` the caller has already bounded and
//! read, so no decoder here ever allocates what a length field claims.
//!
//! Internal to the crate: embedders use the state machines built on these
//! ([`ClientHandshake`](crate::handshake::ClientHandshake),
//! [`ClientSession`](crate::ClientSession), [`Session`](crate::transmission::Session)),
//! which re-export the few message types their signatures use.

use bytes::{Buf, Bytes};

use crate::proto;

pub(crate) mod chunk;
pub(crate) mod option;
pub(crate) mod option_reply;
pub(crate) mod reply;
pub(crate) mod request;

pub use chunk::{BlockDescriptor, ChunkPayload};
pub use option::{
    ClientOption, GoRequest, MetaContextRequest, OPTION_HEADER_LEN, OptionHeader, decode_greeting,
    encode_greeting,
};
pub use option_reply::{
    BlockSize, EXPORT_NAME_REPLY_LEN, InfoReply, OPTION_REPLY_HEADER_LEN, OptionReply,
    OptionReplyHeader, encode_export_name_reply,
};
pub use reply::{
    CHUNK_HEADER_LEN, ChunkHeader, ReplyHeader, SIMPLE_REPLY_LEN, encode_simple_reply,
};
pub use request::{REQUEST_HEADER_LEN, RequestHeader};

#[cfg(test)]
mod tests;

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A magic number is wrong: the peer does not speak NBD, or the stream lost sync.
    #[error("bad magic in {what}: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// The magic the protocol requires.
        expected: u64,
        /// What came instead.
        found: u64,
    },
    /// A length field is above what this side accepts.
    #[error("{what}: length {length} is above the limit of {max} bytes")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length received.
        length: u64,
        /// The largest length accepted.
        max: u64,
    },
    /// The message is inconsistent (lengths that do not add up, invalid strings...).
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> WireError {
    WireError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// Checks a protocol string: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(what: &'static str, bytes: &[u8]) -> Result<String, WireError> {
    if bytes.len() > proto::MAX_STRING {
        return Err(WireError::TooLong {
            what,
            length: bytes.len() as u64,
            max: proto::MAX_STRING as u64,
        });
    }
    if bytes.contains(&0) {
        return Err(malformed(what, "string contains a NUL byte"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| malformed(what, "string is not UTF-8"))
}

pub(crate) fn take_string(
    what: &'static str,
    data: &mut Bytes,
    len: usize,
) -> Result<String, WireError> {
    if data.remaining() < len {
        return Err(malformed(
            what,
            format!(
                "string of {len} bytes but only {} bytes left",
                data.remaining()
            ),
        ));
    }
    let raw = data.split_to(len);
    parse_string(what, &raw)
}

pub(crate) fn take_u32(what: &'static str, data: &mut Bytes) -> Result<u32, WireError> {
    if data.remaining() < 4 {
        return Err(malformed(what, "truncated 32-bit field"));
    }
    Ok(data.get_u32())
}

pub(crate) fn take_u16(what: &'static str, data: &mut Bytes) -> Result<u16, WireError> {
    if data.remaining() < 2 {
        return Err(malformed(what, "truncated 16-bit field"));
    }
    Ok(data.get_u16())
}
