//! Transmission requests: the fixed 28-byte header (a `WRITE` payload follows it).

use bytes::{Buf, BufMut, BytesMut};

use super::WireError;
use crate::proto;

/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A transmission request header (a `WRITE` payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`proto::cflags`).
    pub flags: u16,
    /// Command type (`proto::cmd`).
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the range (and of the payload for `WRITE`).
    pub length: u32,
}

impl RequestHeader {
    /// Appends the header.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(proto::REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Parses a complete header.
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, WireError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != proto::REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "request",
                expected: proto::REQUEST_MAGIC as u64,
                found: magic as u64,
            });
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }

    /// Decodes and consumes a header from the front of `buf`.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, WireError> {
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let h = Self::parse(buf[..REQUEST_HEADER_LEN].try_into().expect("28 bytes"))?;
        buf.advance(REQUEST_HEADER_LEN);
        Ok(Some(h))
    }
}
