//! Encoders and decoders of every NBD message, over `bytes` buffers, without I/O.
//!
//! Decoders that read from a stream buffer (`decode(&mut BytesMut)`) return `Ok(None)` until
//! the whole fixed-size part of a message is present, and then consume exactly that part.
//! Variable-length payloads are parsed from a `Bytes` the caller has already bounded and
//! read, so no decoder here ever allocates what a length field claims.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::proto::{self, chunk, info, rep};

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

fn malformed(what: &'static str, detail: impl Into<String>) -> WireError {
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

fn take_string(what: &'static str, data: &mut Bytes, len: usize) -> Result<String, WireError> {
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

fn take_u32(what: &'static str, data: &mut Bytes) -> Result<u32, WireError> {
    if data.remaining() < 4 {
        return Err(malformed(what, "truncated 32-bit field"));
    }
    Ok(data.get_u32())
}

fn take_u16(what: &'static str, data: &mut Bytes) -> Result<u16, WireError> {
    if data.remaining() < 2 {
        return Err(malformed(what, "truncated 16-bit field"));
    }
    Ok(data.get_u16())
}

// ---------------------------------------------------------------------------------------
// Handshake: greeting, client flags, options, option replies.

/// Length of the server greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;

/// Appends the newstyle greeting with the given handshake flags.
pub fn encode_greeting(handshake_flags: u16, out: &mut BytesMut) {
    out.put_u64(proto::NBDMAGIC);
    out.put_u64(proto::IHAVEOPT);
    out.put_u16(handshake_flags);
}

/// Decodes the greeting, returning the handshake flags.
pub fn decode_greeting(buf: &mut BytesMut) -> Result<Option<u16>, WireError> {
    if buf.len() < GREETING_LEN {
        return Ok(None);
    }
    let magic = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
    if magic != proto::NBDMAGIC {
        return Err(WireError::BadMagic {
            what: "server greeting",
            expected: proto::NBDMAGIC,
            found: magic,
        });
    }
    let second = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
    if second != proto::IHAVEOPT {
        // 0x00420281861253 would be oldstyle, which this implementation does not speak.
        return Err(WireError::BadMagic {
            what: "server greeting (newstyle)",
            expected: proto::IHAVEOPT,
            found: second,
        });
    }
    buf.advance(16);
    Ok(Some(buf.get_u16()))
}

/// Length of an option header: `IHAVEOPT`, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;

/// The fixed part of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`proto::opt`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Appends the header.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u64(proto::IHAVEOPT);
        out.put_u32(self.option);
        out.put_u32(self.length);
    }

    /// Decodes a header from the front of `buf` without consuming it, so the caller can
    /// check the length before waiting for the data.
    pub fn peek(buf: &[u8]) -> Result<Option<Self>, WireError> {
        if buf.len() < OPTION_HEADER_LEN {
            return Ok(None);
        }
        let magic = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
        if magic != proto::IHAVEOPT {
            return Err(WireError::BadMagic {
                what: "option",
                expected: proto::IHAVEOPT,
                found: magic,
            });
        }
        Ok(Some(OptionHeader {
            option: u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes")),
            length: u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes")),
        }))
    }
}

/// `OPT_INFO` / `OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Requested information types (`proto::info`).
    pub info_requests: Vec<u16>,
}

/// `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries such as `base:allocation`.
    pub queries: Vec<String>,
}

/// A client option, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `OPT_EXPORT_NAME`.
    ExportName(String),
    /// `OPT_ABORT`.
    Abort,
    /// `OPT_LIST`.
    List,
    /// `OPT_STARTTLS`.
    StartTls,
    /// `OPT_INFO`.
    Info(GoRequest),
    /// `OPT_GO`.
    Go(GoRequest),
    /// `OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any other option, kept raw.
    Unknown {
        /// Option code.
        option: u32,
        /// Its data.
        data: Bytes,
    },
}

impl ClientOption {
    /// The option code.
    pub fn code(&self) -> u32 {
        use proto::opt;
        match self {
            ClientOption::ExportName(_) => opt::EXPORT_NAME,
            ClientOption::Abort => opt::ABORT,
            ClientOption::List => opt::LIST,
            ClientOption::StartTls => opt::STARTTLS,
            ClientOption::Info(_) => opt::INFO,
            ClientOption::Go(_) => opt::GO,
            ClientOption::StructuredReply => opt::STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => opt::LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => opt::SET_META_CONTEXT,
            ClientOption::Unknown { option, .. } => *option,
        }
    }

    fn encode_data(&self, out: &mut BytesMut) {
        match self {
            ClientOption::ExportName(name) => out.put_slice(name.as_bytes()),
            ClientOption::Abort
            | ClientOption::List
            | ClientOption::StartTls
            | ClientOption::StructuredReply => {}
            ClientOption::Info(go) | ClientOption::Go(go) => {
                out.put_u32(go.name.len() as u32);
                out.put_slice(go.name.as_bytes());
                out.put_u16(go.info_requests.len() as u16);
                for r in &go.info_requests {
                    out.put_u16(*r);
                }
            }
            ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
                out.put_u32(m.export.len() as u32);
                out.put_slice(m.export.as_bytes());
                out.put_u32(m.queries.len() as u32);
                for q in &m.queries {
                    out.put_u32(q.len() as u32);
                    out.put_slice(q.as_bytes());
                }
            }
            ClientOption::Unknown { data, .. } => out.put_slice(data),
        }
    }

    /// Appends the whole option (header and data).
    pub fn encode(&self, out: &mut BytesMut) {
        let mut data = BytesMut::new();
        self.encode_data(&mut data);
        OptionHeader {
            option: self.code(),
            length: data.len() as u32,
        }
        .encode(out);
        out.put_slice(&data);
    }

    /// Parses the data of option `option`. An error means the server must answer
    /// `REP_ERR_INVALID` (the option is known but its data is not valid).
    pub fn parse(option: u32, mut data: Bytes) -> Result<ClientOption, WireError> {
        use proto::opt;
        let what = proto::option_name(option);
        let no_data = |data: &Bytes, v: ClientOption| {
            if data.is_empty() {
                Ok(v)
            } else {
                Err(malformed(
                    what,
                    format!("carries {} bytes of data, none allowed", data.len()),
                ))
            }
        };
        match option {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(what, &data)?)),
            // The protocol asks servers to ignore data sent with ABORT.
            opt::ABORT => Ok(ClientOption::Abort),
            opt::LIST => no_data(&data, ClientOption::List),
            opt::STARTTLS => no_data(&data, ClientOption::StartTls),
            opt::STRUCTURED_REPLY => no_data(&data, ClientOption::StructuredReply),
            opt::INFO | opt::GO => {
                let name_len = take_u32(what, &mut data)? as usize;
                let name = take_string(what, &mut data, name_len)?;
                let n = take_u16(what, &mut data)? as usize;
                if data.remaining() != n * 2 {
                    return Err(malformed(
                        what,
                        format!(
                            "{n} information requests need {} bytes, {} present",
                            n * 2,
                            data.remaining()
                        ),
                    ));
                }
                let info_requests = (0..n).map(|_| data.get_u16()).collect();
                let go = GoRequest {
                    name,
                    info_requests,
                };
                Ok(if option == opt::INFO {
                    ClientOption::Info(go)
                } else {
                    ClientOption::Go(go)
                })
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let export_len = take_u32(what, &mut data)? as usize;
                let export = take_string(what, &mut data, export_len)?;
                let n = take_u32(what, &mut data)? as usize;
                // Each query needs at least its 4-byte length: bound n before collecting.
                if n > data.remaining() / 4 {
                    return Err(malformed(
                        what,
                        format!("{n} queries cannot fit in {} bytes", data.remaining()),
                    ));
                }
                let mut queries = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = take_u32(what, &mut data)? as usize;
                    queries.push(take_string(what, &mut data, len)?);
                }
                if data.has_remaining() {
                    return Err(malformed(
                        what,
                        format!("{} trailing bytes after the queries", data.remaining()),
                    ));
                }
                let m = MetaContextRequest { export, queries };
                Ok(if option == opt::LIST_META_CONTEXT {
                    ClientOption::ListMetaContext(m)
                } else {
                    ClientOption::SetMetaContext(m)
                })
            }
            _ => Ok(ClientOption::Unknown { option, data }),
        }
    }
}

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

// ---------------------------------------------------------------------------------------
// Transmission: requests, simple replies, structured reply chunks.

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
