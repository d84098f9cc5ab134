//! What can go wrong on the client side, typed: the request itself, the server's answer, the
//! protocol, or the connection under it.

use std::io;
use std::sync::Arc;

use crate::handshake::HandshakeError;
use crate::proto::NbdErrno;
use crate::wire::WireError;

/// What went wrong on the client side.
///
/// Cheap to clone: errors shared by every request a lost connection failed are behind an
/// `Arc`, which keeps the operating system's error as the source.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server cannot be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address.
        addr: String,
        /// Why.
        source: Arc<io::Error>,
    },
    /// Negotiation failed.
    #[error("negotiating export {export:?}: {source}")]
    Handshake {
        /// Export asked for.
        export: String,
        /// Why.
        source: Arc<NegotiationError>,
    },
    /// The server answered a request with an error.
    #[error("server error on {command} offset {offset} length {length}: {error}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        /// Command name.
        command: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u32,
        /// Error value.
        error: NbdErrno,
        /// Server's message (structured replies only).
        message: String,
    },
    /// The request cannot be sent to this export (past the end, not offered...).
    #[error("invalid {command} offset {offset} length {length}: {reason}")]
    Invalid {
        /// Command name.
        command: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u32,
        /// Why.
        reason: String,
    },
    /// The server answered this request in a way the protocol forbids; the client hung
    /// up, and every other request in flight failed with [`ClientError::Disconnected`].
    #[error("{0}")]
    Protocol(#[source] ProtocolError),
    /// The connection ended before the reply came (shared by every request it failed).
    #[error("connection lost: {0}")]
    Disconnected(#[source] Arc<ConnectionLost>),
}

impl ClientError {
    /// The NBD error value, for errors the server sent.
    pub fn nbd_errno(&self) -> Option<NbdErrno> {
        match self {
            ClientError::Server { error, .. } => Some(*error),
            _ => None,
        }
    }
}

/// Why a negotiation did not reach the transmission phase.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NegotiationError {
    /// The server refused or answered out of protocol.
    #[error(transparent)]
    Protocol(#[from] HandshakeError),
    /// The socket failed.
    #[error("{during}: {source}")]
    Io {
        /// What the client was doing.
        during: &'static str,
        /// The error of the operating system.
        source: io::Error,
    },
    /// The server closed the connection during negotiation.
    #[error("the server closed the connection")]
    Closed,
    /// The server sent bytes after the end of the negotiation, before any request.
    #[error("{0} unexpected bytes after negotiation")]
    TrailingBytes(usize),
    /// The server did not finish the negotiation within
    /// [`ClientOptions::connect_timeout`](crate::ClientOptions::connect_timeout): it accepted
    /// the connection but is hung, stopped, or not an NBD server.
    #[error(
        "the server accepted the connection but did not finish the negotiation within {after:?} (hung, stopped, or not an NBD server?)"
    )]
    TimedOut {
        /// The timeout.
        after: std::time::Duration,
    },
}

/// Why a connection stopped serving requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionLost {
    /// The server closed the connection.
    #[error("the server closed the connection")]
    Closed,
    /// The socket failed.
    #[error("{during}: {source}")]
    Io {
        /// What the client was doing (`reading a reply`, `sending WRITE`...).
        during: String,
        /// The error of the operating system.
        source: io::Error,
    },
    /// The server broke the protocol.
    #[error("{0}")]
    Protocol(#[source] ProtocolError),
    /// The session was aborted by its driver (see [`ClientSession::abort`]).
    ///
    /// [`ClientSession::abort`]: crate::client::ClientSession::abort
    #[error("the connection was aborted by this client")]
    Aborted,
    /// The thread reading replies stopped without saying why: a bug in this crate, reported
    /// rather than leaving requests waiting forever.
    #[error("the reply reader stopped unexpectedly")]
    ReaderStopped,
}

/// A reply that breaks the NBD protocol, and where it was in the stream of replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server reply at byte {at} of the transmission phase: {violation}")]
pub struct ProtocolError {
    /// Offset of the reply's header from the start of the transmission phase.
    pub at: u64,
    /// Cookie of the request the reply was for, when it names one in flight.
    pub cookie: Option<u64>,
    /// What is wrong with it.
    pub violation: Violation,
}

/// The ways a server reply can break the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A header that is neither a simple reply nor a structured chunk.
    #[error("bad reply magic {0:#x}")]
    BadMagic(u32),
    /// A structured reply chunk, but structured replies were not negotiated.
    #[error("structured reply chunk without structured replies negotiated")]
    UnexpectedChunk,
    /// A reply for a cookie no request in flight has.
    #[error("reply for cookie {0:#x}, which no request in flight has")]
    UnknownCookie(u64),
    /// A simple reply to a request that already received structured chunks.
    #[error("simple reply to a {command} request that already received chunks")]
    SimpleAfterChunks {
        /// Command of the request.
        command: &'static str,
    },
    /// A chunk payload that does not parse.
    #[error(transparent)]
    Malformed(#[from] WireError),
    /// A chunk whose payload is larger than this client accepts for its type.
    #[error("chunk type {kind} of {length} bytes is above the limit of {max}")]
    ChunkTooLong {
        /// Chunk type.
        kind: u16,
        /// Its payload length.
        length: u32,
        /// The largest accepted.
        max: u32,
    },
    /// A chunk type that does not answer this command (data for a `WRITE`...).
    #[error("{chunk} chunk for a {command} request")]
    WrongChunk {
        /// Chunk type name.
        chunk: &'static str,
        /// Command of the request.
        command: &'static str,
    },
    /// Data or a hole outside the range the request asked for.
    #[error(
        "{chunk} at {offset} length {length} outside {command} offset {req_offset} length {req_length}"
    )]
    OutsideRequest {
        /// Chunk type name.
        chunk: &'static str,
        /// Offset the chunk claims.
        offset: u64,
        /// Its length.
        length: u64,
        /// Command of the request.
        command: &'static str,
        /// Offset of the request.
        req_offset: u64,
        /// Length of the request.
        req_length: u32,
    },
    /// Two chunks of one read that cover the same bytes.
    #[error(
        "chunk at {offset} length {length} overlaps an earlier chunk of READ offset {req_offset}"
    )]
    Overlap {
        /// Offset of the later chunk.
        offset: u64,
        /// Its length.
        length: u64,
        /// Offset of the request.
        req_offset: u64,
    },
    /// A read answered in more disjoint pieces than this client keeps track of.
    #[error("READ offset {req_offset} answered in more than {max} disjoint pieces")]
    TooFragmented {
        /// Offset of the request.
        req_offset: u64,
        /// The most pieces accepted.
        max: usize,
    },
    /// The reply ended before covering the whole read.
    #[error("server sent {covered} of {length} bytes of READ offset {offset} and said done")]
    ShortRead {
        /// Bytes covered by data and holes.
        covered: u64,
        /// Length of the request.
        length: u32,
        /// Offset of the request.
        offset: u64,
    },
    /// A `NONE` chunk not marked as the last one.
    #[error("NONE chunk without the DONE flag")]
    NoneWithoutDone,
    /// Block status for a metadata context that was not negotiated.
    #[error("block status for context {id}, negotiated {expected:?}")]
    WrongContext {
        /// Context id in the chunk.
        id: u32,
        /// The id of `base:allocation`, if negotiated.
        expected: Option<u32>,
    },
    /// A second block status chunk for the same context in one reply.
    #[error("a second block status chunk for context {id} in one reply")]
    SecondStatusChunk {
        /// Context id.
        id: u32,
    },
    /// More than one extent for a request with `REQ_ONE`.
    #[error("{count} block status extents for a REQ_ONE request")]
    ReqOneExtents {
        /// Extents sent.
        count: usize,
    },
    /// Block status extents that run past the end of the 64-bit offset space.
    #[error("block status extent of {length} bytes at {offset} runs past 2^64")]
    ExtentOverflow {
        /// Where the extent starts.
        offset: u64,
        /// Its length.
        length: u32,
    },
    /// A block status extent that starts after earlier ones already covered the request.
    #[error(
        "block status extent at {offset} starts past the end of BLOCK_STATUS offset {req_offset} length {req_length}"
    )]
    ExtentPastRequest {
        /// Where the extra extent starts.
        offset: u64,
        /// Offset of the request.
        req_offset: u64,
        /// Length of the request.
        req_length: u32,
    },
    /// A successful block status reply without a single extent.
    #[error("no base:allocation extents for BLOCK_STATUS offset {offset}")]
    NoExtents {
        /// Offset of the request.
        offset: u64,
    },
}
