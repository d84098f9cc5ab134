//! The negotiation, client side of the wire: the greeting the server sends, then the
//! client's options.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{WireError, malformed, parse_string, take_string, take_u16, take_u32};
use crate::proto;

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
