//! Fixed newstyle negotiation as two state machines without I/O: [`ServerHandshake`] and
//! [`ClientHandshake`]. Each takes the bytes received so far and appends what must be sent.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::proto::{self, client_flags, handshake_flags, info, opt, rep, tflags};
pub use crate::wire::BlockSize;
use crate::wire::{
    self, ClientOption, GoRequest, InfoReply, MetaContextRequest, OptionHeader, OptionReply,
    OptionReplyHeader, WireError,
};

/// What the server knows about one export during negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name clients ask for ("" is the default export).
    pub name: String,
    /// Description shown by `nbdinfo`, may be empty.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags, without `SEND_DF` (added when structured replies are on).
    pub flags: u16,
    /// Block size constraints advertised.
    pub block_size: BlockSize,
}

/// Bounds that keep a hostile client from making the server work or allocate without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest option data accepted; a longer option ends the session.
    pub max_option_len: u32,
    /// Most options accepted in one session.
    pub max_options: u32,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            // An export name and a few queries fit many times over.
            max_option_len: 64 * 1024,
            max_options: 1024,
        }
    }
}

/// Why a negotiation ended without entering transmission.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A message does not follow the protocol.
    #[error("handshake: {0}")]
    Wire(#[from] WireError),
    /// The client set flags the server did not offer; the protocol says to hang up.
    #[error("handshake: client flags {0:#x} include flags the server did not offer")]
    ClientFlags(u32),
    /// An option longer than the server accepts.
    #[error("handshake: option {option} ({name}) has {length} bytes of data, limit is {max}")]
    OptionTooLong {
        /// Option code.
        option: u32,
        /// Option name.
        name: &'static str,
        /// Its length.
        length: u32,
        /// Limit.
        max: u32,
    },
    /// Too many options in one session.
    #[error("handshake: more than {0} options in one session")]
    TooManyOptions(u32),
    /// `OPT_EXPORT_NAME` for an export that does not exist (it cannot be answered with an
    /// error, so the session ends).
    #[error("handshake: OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    /// The server refused an option the client needed.
    #[error("handshake: server refused {option} with {code:#x}: {message}")]
    Refused {
        /// Option name.
        option: &'static str,
        /// Error reply type.
        code: u32,
        /// Server's message.
        message: String,
    },
    /// The server answered out of protocol.
    #[error("handshake: unexpected reply to {option}: {detail}")]
    Unexpected {
        /// Option name.
        option: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// What a negotiation produced on the server side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerNegotiated {
    /// Index of the export in the list given to [`ServerHandshake::new`].
    pub export_index: usize,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// Id of `base:allocation` when it was selected for this export.
    pub base_allocation_id: Option<u32>,
    /// The client asked for `INFO_BLOCK_SIZE` in `OPT_GO`, so it promised to respect it.
    pub block_size_agreed: bool,
}

/// What the server driver must do after [`ServerHandshake::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStep {
    /// Send what was appended to `out`, then read more.
    NeedMore,
    /// Send what was appended to `out`, then enter transmission.
    Transmission(ServerNegotiated),
    /// Send what was appended to `out`, then close (the client sent `OPT_ABORT`).
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    ClientFlags,
    Options,
    Finished,
}

/// The `base:allocation` id this server hands out.
const BASE_ALLOCATION_ID: u32 = 1;

/// Server side of fixed newstyle negotiation.
#[derive(Debug)]
pub struct ServerHandshake {
    exports: Vec<ExportInfo>,
    limits: HandshakeLimits,
    state: ServerState,
    no_zeroes: bool,
    structured: bool,
    /// Export named by the last `SET_META_CONTEXT` and whether it selected
    /// `base:allocation`.
    meta: Option<(String, bool)>,
    options: u32,
}

impl ServerHandshake {
    /// Starts a negotiation and appends the greeting to `out`.
    pub fn new(exports: Vec<ExportInfo>, limits: HandshakeLimits, out: &mut BytesMut) -> Self {
        wire::encode_greeting(
            handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
            out,
        );
        ServerHandshake {
            exports,
            limits,
            state: ServerState::ClientFlags,
            no_zeroes: false,
            structured: false,
            meta: None,
            options: 0,
        }
    }

    /// Consumes complete messages from `input`, appends replies to `out`.
    pub fn handle(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<ServerStep, HandshakeError> {
        loop {
            match self.state {
                ServerState::Finished => return Ok(ServerStep::Close),
                ServerState::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(ServerStep::NeedMore);
                    }
                    let flags = input.get_u32();
                    let known = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
                    if flags & !known != 0 {
                        return Err(HandshakeError::ClientFlags(flags));
                    }
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.state = ServerState::Options;
                }
                ServerState::Options => {
                    let Some(header) = OptionHeader::peek(input)? else {
                        return Ok(ServerStep::NeedMore);
                    };
                    if header.length > self.limits.max_option_len {
                        return Err(HandshakeError::OptionTooLong {
                            option: header.option,
                            name: proto::option_name(header.option),
                            length: header.length,
                            max: self.limits.max_option_len,
                        });
                    }
                    let total = wire::OPTION_HEADER_LEN + header.length as usize;
                    if input.len() < total {
                        return Ok(ServerStep::NeedMore);
                    }
                    self.options += 1;
                    if self.options > self.limits.max_options {
                        return Err(HandshakeError::TooManyOptions(self.limits.max_options));
                    }
                    input.advance(wire::OPTION_HEADER_LEN);
                    let data = input.split_to(header.length as usize).freeze();
                    if let Some(step) = self.option(header.option, data, out)? {
                        return Ok(step);
                    }
                }
            }
        }
    }

    /// The number of bytes the server wants before it can go on (a hint for drivers).
    pub fn wants(&self, input: &[u8]) -> usize {
        match self.state {
            ServerState::ClientFlags => 4,
            ServerState::Options => match OptionHeader::peek(input) {
                Ok(Some(h)) => wire::OPTION_HEADER_LEN + h.length as usize,
                _ => wire::OPTION_HEADER_LEN,
            },
            ServerState::Finished => 0,
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.exports.iter().position(|e| e.name == name)
    }

    fn error(option: u32, code: u32, message: impl Into<String>, out: &mut BytesMut) {
        OptionReply::Error {
            code,
            message: message.into(),
        }
        .encode(option, out);
    }

    fn option(
        &mut self,
        option: u32,
        data: Bytes,
        out: &mut BytesMut,
    ) -> Result<Option<ServerStep>, HandshakeError> {
        let parsed = match ClientOption::parse(option, data) {
            Ok(p) => p,
            Err(e) => {
                if option == opt::EXPORT_NAME {
                    // No error can be returned to EXPORT_NAME: the session must end.
                    return Err(e.into());
                }
                Self::error(option, rep::ERR_INVALID, e.to_string(), out);
                return Ok(None);
            }
        };
        match parsed {
            ClientOption::ExportName(name) => {
                let Some(index) = self.find(&name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                let flags = self.transmission_flags(index);
                wire::encode_export_name_reply(
                    self.exports[index].size,
                    flags,
                    self.no_zeroes,
                    out,
                );
                self.state = ServerState::Finished;
                Ok(Some(ServerStep::Transmission(
                    self.negotiated(index, flags, false),
                )))
            }
            ClientOption::Abort => {
                OptionReply::Ack.encode(option, out);
                self.state = ServerState::Finished;
                Ok(Some(ServerStep::Close))
            }
            ClientOption::List => {
                for e in &self.exports {
                    OptionReply::Server {
                        name: e.name.clone(),
                        details: e.description.clone(),
                    }
                    .encode(option, out);
                }
                OptionReply::Ack.encode(option, out);
                Ok(None)
            }
            ClientOption::StartTls => {
                Self::error(
                    option,
                    rep::ERR_UNSUP,
                    "this server does not support TLS",
                    out,
                );
                Ok(None)
            }
            ClientOption::StructuredReply => {
                if self.structured {
                    Self::error(
                        option,
                        rep::ERR_INVALID,
                        "structured replies are already negotiated",
                        out,
                    );
                } else {
                    self.structured = true;
                    OptionReply::Ack.encode(option, out);
                }
                Ok(None)
            }
            ClientOption::Info(go) => {
                self.info_or_go(option, &go, out);
                Ok(None)
            }
            ClientOption::Go(go) => {
                let Some(index) = self.info_or_go(option, &go, out) else {
                    return Ok(None);
                };
                let flags = self.transmission_flags(index);
                let agreed = go.info_requests.contains(&info::BLOCK_SIZE);
                self.state = ServerState::Finished;
                Ok(Some(ServerStep::Transmission(
                    self.negotiated(index, flags, agreed),
                )))
            }
            ClientOption::ListMetaContext(m) => {
                self.meta_context(option, &m, false, out);
                Ok(None)
            }
            ClientOption::SetMetaContext(m) => {
                self.meta_context(option, &m, true, out);
                Ok(None)
            }
            ClientOption::Unknown { option, .. } => {
                Self::error(
                    option,
                    rep::ERR_UNSUP,
                    format!(
                        "option {option} ({}) is not supported",
                        proto::option_name(option)
                    ),
                    out,
                );
                Ok(None)
            }
        }
    }

    fn transmission_flags(&self, index: usize) -> u16 {
        let mut flags = self.exports[index].flags | tflags::HAS_FLAGS;
        if self.structured {
            flags |= tflags::SEND_DF;
        }
        flags
    }

    fn negotiated(&self, index: usize, flags: u16, agreed: bool) -> ServerNegotiated {
        let name = &self.exports[index].name;
        let base_allocation_id = match &self.meta {
            Some((export, true)) if export == name && self.structured => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        ServerNegotiated {
            export_index: index,
            flags,
            structured_replies: self.structured,
            base_allocation_id,
            block_size_agreed: agreed,
        }
    }

    /// Answers `OPT_INFO` or `OPT_GO`; returns the export index on success.
    fn info_or_go(&self, option: u32, go: &GoRequest, out: &mut BytesMut) -> Option<usize> {
        let Some(index) = self.find(&go.name) else {
            Self::error(
                option,
                rep::ERR_UNKNOWN,
                format!("no export named {:?}", go.name),
                out,
            );
            return None;
        };
        let e = &self.exports[index];
        OptionReply::Info(InfoReply::Export {
            size: e.size,
            flags: self.transmission_flags(index),
        })
        .encode(option, out);
        if go.info_requests.contains(&info::NAME) {
            OptionReply::Info(InfoReply::Name(e.name.clone())).encode(option, out);
        }
        if go.info_requests.contains(&info::DESCRIPTION) && !e.description.is_empty() {
            OptionReply::Info(InfoReply::Description(e.description.clone())).encode(option, out);
        }
        // Sent even when not asked: clients that did not ask may ignore it, and it tells
        // them the preferred and maximum sizes.
        OptionReply::Info(InfoReply::BlockSize(e.block_size)).encode(option, out);
        OptionReply::Ack.encode(option, out);
        Some(index)
    }

    fn meta_context(&mut self, option: u32, m: &MetaContextRequest, set: bool, out: &mut BytesMut) {
        if set {
            // A SET replaces the previous selection even when it fails.
            self.meta = None;
            if !self.structured {
                Self::error(
                    option,
                    rep::ERR_INVALID,
                    "SET_META_CONTEXT needs structured replies first",
                    out,
                );
                return;
            }
        }
        if self.find(&m.export).is_none() {
            Self::error(
                option,
                rep::ERR_UNKNOWN,
                format!("no export named {:?}", m.export),
                out,
            );
            return;
        }
        for q in &m.queries {
            if !q.contains(':') {
                Self::error(
                    option,
                    rep::ERR_INVALID,
                    format!("query {q:?} has no namespace"),
                    out,
                );
                return;
            }
        }
        let selected = if set {
            m.queries.iter().any(|q| q == proto::BASE_ALLOCATION)
        } else {
            // Listing: no query lists everything, "base:" is the namespace wildcard.
            m.queries.is_empty()
                || m.queries
                    .iter()
                    .any(|q| q == proto::BASE_ALLOCATION || q == "base:")
        };
        if selected {
            OptionReply::MetaContext {
                // The protocol reserves 0 for listings.
                id: if set { BASE_ALLOCATION_ID } else { 0 },
                name: proto::BASE_ALLOCATION.to_string(),
            }
            .encode(option, out);
        }
        if set {
            self.meta = Some((m.export.clone(), selected));
        }
        OptionReply::Ack.encode(option, out);
    }
}

// ---------------------------------------------------------------------------------------

/// What a client wants from a negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientWants {
    /// Export name.
    pub export: String,
    /// Ask for structured replies.
    pub structured_replies: bool,
    /// Ask for `base:allocation` (needs structured replies).
    pub base_allocation: bool,
    /// Largest option reply accepted.
    pub max_reply_len: u32,
}

impl ClientWants {
    /// Structured replies and `base:allocation` on `export`.
    pub fn new(export: &str) -> Self {
        ClientWants {
            export: export.to_string(),
            structured_replies: true,
            base_allocation: true,
            max_reply_len: 64 * 1024,
        }
    }
}

/// What a negotiation produced on the client side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientNegotiated {
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Structured replies are on.
    pub structured_replies: bool,
    /// Context id of `base:allocation`, when the server selected it.
    pub base_allocation_id: Option<u32>,
    /// Block size constraints the client agreed to (defaults when none were sent).
    pub block_size: BlockSize,
}

/// What the client driver must do after [`ClientHandshake::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Send what was appended to `out`, then read more.
    NeedMore,
    /// Send what was appended to `out` (possibly nothing); transmission starts.
    Done(ClientNegotiated),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Greeting,
    StructuredReply,
    SetMeta,
    Go,
    ExportName,
    Done,
}

/// Client side of fixed newstyle negotiation: optionally `STRUCTURED_REPLY` and
/// `SET_META_CONTEXT base:allocation`, then `GO` (falling back to `EXPORT_NAME` for servers
/// that do not know `GO`).
#[derive(Debug)]
pub struct ClientHandshake {
    wants: ClientWants,
    state: ClientState,
    no_zeroes: bool,
    structured: bool,
    base_allocation_id: Option<u32>,
    size_flags: Option<(u64, u16)>,
    block_size: Option<BlockSize>,
}

impl ClientHandshake {
    /// Starts a negotiation (the server speaks first, so nothing is sent yet).
    pub fn new(wants: ClientWants) -> Self {
        ClientHandshake {
            wants,
            state: ClientState::Greeting,
            no_zeroes: false,
            structured: false,
            base_allocation_id: None,
            size_flags: None,
            block_size: None,
        }
    }

    fn send_go(&mut self, out: &mut BytesMut) {
        ClientOption::Go(GoRequest {
            name: self.wants.export.clone(),
            info_requests: vec![info::BLOCK_SIZE],
        })
        .encode(out);
        self.state = ClientState::Go;
    }

    fn send_meta_or_go(&mut self, out: &mut BytesMut) {
        if self.structured && self.wants.base_allocation {
            ClientOption::SetMetaContext(MetaContextRequest {
                export: self.wants.export.clone(),
                queries: vec![proto::BASE_ALLOCATION.to_string()],
            })
            .encode(out);
            self.state = ClientState::SetMeta;
        } else {
            self.send_go(out);
        }
    }

    fn done(&self) -> Result<ClientStep, HandshakeError> {
        let (size, flags) = self.size_flags.ok_or(HandshakeError::Unexpected {
            option: "GO",
            detail: "ACK without INFO_EXPORT".into(),
        })?;
        let block_size = match self.block_size {
            Some(b) if b.is_valid() => b,
            Some(b) => {
                return Err(HandshakeError::Unexpected {
                    option: "GO",
                    detail: format!("invalid block size constraints {b:?}"),
                });
            }
            None => BlockSize::default(),
        };
        Ok(ClientStep::Done(ClientNegotiated {
            size,
            flags,
            structured_replies: self.structured,
            base_allocation_id: self.base_allocation_id,
            block_size,
        }))
    }

    /// Consumes complete messages from `input`, appends what to send to `out`.
    pub fn handle(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<ClientStep, HandshakeError> {
        loop {
            match self.state {
                ClientState::Done => return self.done(),
                ClientState::Greeting => {
                    let Some(hflags) = wire::decode_greeting(input)? else {
                        return Ok(ClientStep::NeedMore);
                    };
                    if hflags & handshake_flags::FIXED_NEWSTYLE == 0 {
                        return Err(HandshakeError::Unexpected {
                            option: "greeting",
                            detail: "server does not speak fixed newstyle".into(),
                        });
                    }
                    self.no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
                    let mut cflags = client_flags::FIXED_NEWSTYLE;
                    if self.no_zeroes {
                        cflags |= client_flags::NO_ZEROES;
                    }
                    out.put_u32(cflags);
                    if self.wants.structured_replies {
                        ClientOption::StructuredReply.encode(out);
                        self.state = ClientState::StructuredReply;
                    } else {
                        self.send_go(out);
                    }
                }
                ClientState::ExportName => {
                    let need = wire::EXPORT_NAME_REPLY_LEN + if self.no_zeroes { 0 } else { 124 };
                    if input.len() < need {
                        return Ok(ClientStep::NeedMore);
                    }
                    let size = input.get_u64();
                    let flags = input.get_u16();
                    input.advance(need - wire::EXPORT_NAME_REPLY_LEN);
                    self.size_flags = Some((size, flags));
                    // Without GO the server never confirmed the context for this export.
                    self.base_allocation_id = None;
                    self.state = ClientState::Done;
                }
                ClientState::StructuredReply | ClientState::SetMeta | ClientState::Go => {
                    let Some(h) = OptionReplyHeader::peek(input)? else {
                        return Ok(ClientStep::NeedMore);
                    };
                    if h.length > self.wants.max_reply_len {
                        return Err(WireError::TooLong {
                            what: "option reply",
                            length: h.length as u64,
                            max: self.wants.max_reply_len as u64,
                        }
                        .into());
                    }
                    let total = wire::OPTION_REPLY_HEADER_LEN + h.length as usize;
                    if input.len() < total {
                        return Ok(ClientStep::NeedMore);
                    }
                    input.advance(wire::OPTION_REPLY_HEADER_LEN);
                    let data = input.split_to(h.length as usize).freeze();
                    let reply = OptionReply::parse(h.reply_type, data)?;
                    self.reply(h.option, reply, out)?;
                }
            }
        }
    }

    fn reply(
        &mut self,
        option: u32,
        reply: OptionReply,
        out: &mut BytesMut,
    ) -> Result<(), HandshakeError> {
        let expected = match self.state {
            ClientState::StructuredReply => opt::STRUCTURED_REPLY,
            ClientState::SetMeta => opt::SET_META_CONTEXT,
            _ => opt::GO,
        };
        let name = proto::option_name(expected);
        if option != expected {
            return Err(HandshakeError::Unexpected {
                option: name,
                detail: format!("reply is for option {option}"),
            });
        }
        match (self.state, reply) {
            (ClientState::StructuredReply, OptionReply::Ack) => {
                self.structured = true;
                self.send_meta_or_go(out);
            }
            (ClientState::StructuredReply, OptionReply::Error { .. }) => {
                // Old servers: carry on with simple replies.
                self.send_go(out);
            }
            (ClientState::SetMeta, OptionReply::MetaContext { id, name }) => {
                if name == proto::BASE_ALLOCATION {
                    self.base_allocation_id = Some(id);
                }
            }
            (ClientState::SetMeta, OptionReply::Ack) => self.send_go(out),
            (ClientState::SetMeta, OptionReply::Error { .. }) => {
                self.base_allocation_id = None;
                self.send_go(out);
            }
            (ClientState::Go, OptionReply::Info(i)) => match i {
                InfoReply::Export { size, flags } => self.size_flags = Some((size, flags)),
                InfoReply::BlockSize(b) => self.block_size = Some(b),
                _ => {}
            },
            (ClientState::Go, OptionReply::Ack) => self.state = ClientState::Done,
            (ClientState::Go, OptionReply::Error { code, .. }) if code == rep::ERR_UNSUP => {
                ClientOption::ExportName(self.wants.export.clone()).encode(out);
                self.state = ClientState::ExportName;
            }
            (ClientState::Go, OptionReply::Error { code, message }) => {
                return Err(HandshakeError::Refused {
                    option: name,
                    code,
                    message,
                });
            }
            (_, other) => {
                return Err(HandshakeError::Unexpected {
                    option: name,
                    detail: format!("reply {other:?}"),
                });
            }
        }
        Ok(())
    }
}
