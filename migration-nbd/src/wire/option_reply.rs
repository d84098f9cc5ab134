//! The server's replies to options: typed replies, `REP_INFO` items and block size
//! constraints, and the answer to `OPT_EXPORT_NAME`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{WireError, malformed, parse_string, take_string, take_u16, take_u32};
use crate::proto::{self, info, rep};

/// Length of an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// Reply type (`proto::rep`).
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Decodes a header from the front of `buf` without consuming it.
    pub fn peek(buf: &[u8]) -> Result<Option<Self>, WireError> {
        if buf.len() < OPTION_REPLY_HEADER_LEN {
            return Ok(None);
        }
        let magic = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
        if magic != proto::OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "option reply",
                expected: proto::OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        Ok(Some(OptionReplyHeader {
            option: u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes")),
            reply_type: u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes")),
            length: u32::from_be_bytes(buf[16..20].try_into().expect("4 bytes")),
        }))
    }
}

/// Block size constraints (`INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest addressable length and alignment.
    pub minimum: u32,
    /// Size for efficient I/O.
    pub preferred: u32,
    /// Largest payload of one request.
    pub maximum: u32,
}

impl BlockSize {
    /// Whether the constraints are valid per the protocol (powers of two, bounds).
    pub fn is_valid(&self) -> bool {
        self.minimum.is_power_of_two()
            && self.minimum <= 1 << 16
            && self.preferred.is_power_of_two()
            && self.preferred >= self.minimum.max(512)
            && self.maximum >= self.preferred
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: proto::DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// One `REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// Size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags (`proto::tflags`).
        flags: u16,
    },
    /// Canonical name.
    Name(String),
    /// Description.
    Description(String),
    /// Block size constraints.
    BlockSize(BlockSize),
    /// An information type this implementation does not know.
    Unknown {
        /// Information type.
        kind: u16,
        /// Its payload.
        data: Bytes,
    },
}

/// An option reply, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    /// `REP_ACK`.
    Ack,
    /// `REP_SERVER`: one export of a list.
    Server {
        /// Export name.
        name: String,
        /// Free text after the name.
        details: String,
    },
    /// `REP_INFO`.
    Info(InfoReply),
    /// `REP_META_CONTEXT`.
    MetaContext {
        /// Context id used in block status replies.
        id: u32,
        /// Context name.
        name: String,
    },
    /// Any error reply (bit 31 set), with its message.
    Error {
        /// Reply type (`proto::rep::ERR_*`).
        code: u32,
        /// Message for a human.
        message: String,
    },
    /// A non-error reply type this implementation does not know.
    Unknown {
        /// Reply type.
        reply_type: u32,
        /// Its data.
        data: Bytes,
    },
}

impl OptionReply {
    /// The reply type code.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => rep::ACK,
            OptionReply::Server { .. } => rep::SERVER,
            OptionReply::Info(_) => rep::INFO,
            OptionReply::MetaContext { .. } => rep::META_CONTEXT,
            OptionReply::Error { code, .. } => *code,
            OptionReply::Unknown { reply_type, .. } => *reply_type,
        }
    }

    fn encode_data(&self, out: &mut BytesMut) {
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, details } => {
                out.put_u32(name.len() as u32);
                out.put_slice(name.as_bytes());
                out.put_slice(details.as_bytes());
            }
            OptionReply::Info(i) => match i {
                InfoReply::Export { size, flags } => {
                    out.put_u16(info::EXPORT);
                    out.put_u64(*size);
                    out.put_u16(*flags);
                }
                InfoReply::Name(n) => {
                    out.put_u16(info::NAME);
                    out.put_slice(n.as_bytes());
                }
                InfoReply::Description(d) => {
                    out.put_u16(info::DESCRIPTION);
                    out.put_slice(d.as_bytes());
                }
                InfoReply::BlockSize(b) => {
                    out.put_u16(info::BLOCK_SIZE);
                    out.put_u32(b.minimum);
                    out.put_u32(b.preferred);
                    out.put_u32(b.maximum);
                }
                InfoReply::Unknown { kind, data } => {
                    out.put_u16(*kind);
                    out.put_slice(data);
                }
            },
            OptionReply::MetaContext { id, name } => {
                out.put_u32(*id);
                out.put_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => out.put_slice(message.as_bytes()),
            OptionReply::Unknown { data, .. } => out.put_slice(data),
        }
    }

    /// Appends the reply to `option` (header and data).
    pub fn encode(&self, option: u32, out: &mut BytesMut) {
        let mut data = BytesMut::new();
        self.encode_data(&mut data);
        out.put_u64(proto::OPTION_REPLY_MAGIC);
        out.put_u32(option);
        out.put_u32(self.reply_type());
        out.put_u32(data.len() as u32);
        out.put_slice(&data);
    }

    /// Parses the data of a reply of type `reply_type`.
    pub fn parse(reply_type: u32, mut data: Bytes) -> Result<OptionReply, WireError> {
        const WHAT: &str = "option reply";
        if reply_type & rep::ERROR_BIT != 0 {
            // Error messages are for humans: keep what is readable rather than fail.
            let message =
                String::from_utf8_lossy(&data[..data.len().min(proto::MAX_STRING)]).into_owned();
            return Ok(OptionReply::Error {
                code: reply_type,
                message,
            });
        }
        match reply_type {
            rep::ACK => {
                if data.is_empty() {
                    Ok(OptionReply::Ack)
                } else {
                    Err(malformed(WHAT, "ACK carries data"))
                }
            }
            rep::SERVER => {
                let len = take_u32(WHAT, &mut data)? as usize;
                let name = take_string(WHAT, &mut data, len)?;
                let rest = data.remaining();
                let details = take_string(WHAT, &mut data, rest)?;
                Ok(OptionReply::Server { name, details })
            }
            rep::INFO => {
                let kind = take_u16(WHAT, &mut data)?;
                let item = match kind {
                    info::EXPORT => {
                        if data.len() != 10 {
                            return Err(malformed(WHAT, "INFO_EXPORT must be 12 bytes"));
                        }
                        InfoReply::Export {
                            size: data.get_u64(),
                            flags: data.get_u16(),
                        }
                    }
                    info::NAME => InfoReply::Name(parse_string(WHAT, &data)?),
                    info::DESCRIPTION => InfoReply::Description(parse_string(WHAT, &data)?),
                    info::BLOCK_SIZE => {
                        if data.len() != 12 {
                            return Err(malformed(WHAT, "INFO_BLOCK_SIZE must be 14 bytes"));
                        }
                        InfoReply::BlockSize(BlockSize {
                            minimum: data.get_u32(),
                            preferred: data.get_u32(),
                            maximum: data.get_u32(),
                        })
                    }
                    _ => InfoReply::Unknown { kind, data },
                };
                Ok(OptionReply::Info(item))
            }
            rep::META_CONTEXT => {
                let id = take_u32(WHAT, &mut data)?;
                let name = parse_string(WHAT, &data)?;
                Ok(OptionReply::MetaContext { id, name })
            }
            _ => Ok(OptionReply::Unknown { reply_type, data }),
        }
    }
}

/// Length of the server's answer to `OPT_EXPORT_NAME` without the zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;

/// Appends the answer to `OPT_EXPORT_NAME`: size, flags and, unless the client asked for
/// `NO_ZEROES`, 124 zero bytes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool, out: &mut BytesMut) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, 124);
    }
}
