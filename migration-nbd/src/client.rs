//! The NBD client: a blocking driver around [`ClientHandshake`] and the reply codecs.
//!
//! A [`Client`] is one connection. Any thread may submit requests (`submit_*`), each
//! returning a [`Ticket`] at once; up to [`ClientOptions::max_in_flight`] requests are on
//! the wire together, and a reader thread completes tickets by cookie as replies arrive,
//! in whatever order the server sends them. The blocking helpers (`read`, `write`...) are
//! `submit_*` followed by [`Ticket::wait`]. [`ClientPool`] spreads requests over several
//! connections when the server allows it (`CAN_MULTI_CONN`).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, IoSlice, Read};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use bytes::{Bytes, BytesMut};
use tracing::debug;

use crate::addr::{Address, NbdUri, Stream};
use crate::handshake::{
    ClientHandshake, ClientNegotiated, ClientStep, ClientWants, HandshakeError,
};
use crate::proto::{self, NbdErrno, cflags, chunk, cmd, tflags};
use crate::wire::{
    BlockSize, CHUNK_HEADER_LEN, ChunkHeader, ChunkPayload, ReplyHeader, RequestHeader,
    SIMPLE_REPLY_LEN, WireError,
};

/// Largest payload of a non-data chunk accepted: a block status chunk of 2^20 extents.
const MAX_META_CHUNK: u32 = 4 + 8 * (1 << 20);

/// Client settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Negotiate structured replies (sparse reads, error messages, block status).
    pub structured_replies: bool,
    /// Negotiate `base:allocation` for [`Client::block_status`].
    pub block_status: bool,
    /// Requests on the wire at once; submitting more waits.
    pub max_in_flight: usize,
    /// Refuse, before sending, requests the server would reject (past the end, not
    /// offered, unaligned...). Off only to test how servers answer them.
    pub strict: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            structured_replies: true,
            block_status: true,
            max_in_flight: 64,
            strict: true,
        }
    }
}

/// What went wrong on the client side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server cannot be reached.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Negotiation failed.
    #[error("negotiating export {export:?}: {reason}")]
    Handshake {
        /// Export asked for.
        export: String,
        /// Why.
        reason: String,
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
    Protocol(ProtocolError),
    /// The connection ended before the reply came (shared by every request it failed).
    #[error("connection lost: {0}")]
    Disconnected(Arc<ConnectionLost>),
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
    /// A header that is neither a simple reply nor (once negotiated) a structured chunk.
    #[error("bad reply magic {0:#x}")]
    BadMagic(u32),
    /// A reply for a cookie no request in flight has.
    #[error("reply for cookie {0:#x}, which no request in flight has")]
    UnknownCookie(u64),
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

impl ClientError {
    /// The NBD error value, for errors the server sent.
    pub fn nbd_errno(&self) -> Option<NbdErrno> {
        match self {
            ClientError::Server { error, .. } => Some(*error),
            _ => None,
        }
    }
}

/// One extent of a block status reply (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockExtent {
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// `proto::state` flags.
    pub flags: u32,
}

impl BlockExtent {
    /// The extent is a hole.
    pub fn is_hole(&self) -> bool {
        self.flags & proto::state::HOLE != 0
    }

    /// The extent reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.flags & proto::state::ZERO != 0
    }
}

/// Flags of [`Client::submit_write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Persist before the reply.
    pub fua: bool,
    /// Keep the range allocated.
    pub no_hole: bool,
    /// Fail with `ENOTSUP` rather than write zeroes slowly.
    pub fast: bool,
}

/// Locks `m` even if a thread panicked while holding it: the state it guards stays
/// usable, and the connection is failed as a whole anyway, so waiters must still be woken
/// rather than see a second panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(PoisonError::into_inner)
}

struct Completion<T> {
    result: Mutex<Option<Result<T, ClientError>>>,
    ready: Condvar,
}

/// The completing side of a [`Ticket`]. Dropping it without completing it fails the ticket,
/// so that no path (a bug, a panic) can leave a caller waiting forever.
struct Promise<T> {
    completion: Option<Arc<Completion<T>>>,
}

impl<T> Promise<T> {
    fn new() -> (Promise<T>, Ticket<T>) {
        let c = Arc::new(Completion {
            result: Mutex::new(None),
            ready: Condvar::new(),
        });
        (
            Promise {
                completion: Some(c.clone()),
            },
            Ticket {
                completion: c,
                _t: PhantomData,
            },
        )
    }

    fn complete(mut self, r: Result<T, ClientError>) {
        if let Some(c) = self.completion.take() {
            *lock(&c.result) = Some(r);
            c.ready.notify_all();
        }
    }
}

impl<T> Drop for Promise<T> {
    fn drop(&mut self) {
        if let Some(c) = self.completion.take() {
            let lost = ClientError::Disconnected(Arc::new(ConnectionLost::ReaderStopped));
            *lock(&c.result) = Some(Err(lost));
            c.ready.notify_all();
        }
    }
}

/// A submitted request; [`Ticket::wait`] blocks until its reply.
#[must_use = "a ticket must be waited on to learn whether the request succeeded"]
pub struct Ticket<T> {
    completion: Arc<Completion<T>>,
    _t: PhantomData<T>,
}

impl<T> std::fmt::Debug for Ticket<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("done", &self.is_done())
            .finish()
    }
}

impl<T> Ticket<T> {
    /// Waits for the reply.
    pub fn wait(self) -> Result<T, ClientError> {
        let mut g = lock(&self.completion.result);
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = wait(&self.completion.ready, g);
        }
    }

    /// Whether the reply has arrived.
    pub fn is_done(&self) -> bool {
        lock(&self.completion.result).is_some()
    }
}

enum Completer {
    Unit(Promise<()>),
    Read(Promise<Bytes>, BytesMut),
    Status(Promise<Vec<BlockExtent>>, Vec<BlockExtent>),
}

struct InFlight {
    command: u16,
    offset: u64,
    length: u32,
    completer: Completer,
    /// Bytes of a read covered by data and hole chunks so far.
    covered: u64,
    /// Ranges (start to end) of a read covered so far: the protocol forbids overlapping
    /// chunks, and with a recycled buffer a gap would otherwise hide stale bytes.
    ranges: BTreeMap<u64, u64>,
    error: Option<ClientError>,
}

impl InFlight {
    /// Records that `[start, start + len)` of a read arrived, refusing overlaps. The caller
    /// has checked that the range lies inside the request.
    fn cover(&mut self, start: u64, len: u64) -> Result<(), Violation> {
        let overlap = Violation::Overlap {
            offset: start,
            length: len,
            req_offset: self.offset,
        };
        let end = start.checked_add(len).ok_or_else(|| overlap.clone())?;
        let before = self.ranges.range(..=start).next_back();
        let after = self.ranges.range(start..).next();
        if before.is_some_and(|(_, &e)| e > start) || after.is_some_and(|(&s, _)| s < end) {
            return Err(overlap);
        }
        self.ranges.insert(start, end);
        self.covered += len;
        Ok(())
    }

    /// Where `[offset, offset + length)` starts in the request's buffer, if it lies inside
    /// the request. Offsets come from the server: nothing here may overflow.
    fn place(&self, chunk: &'static str, offset: u64, length: u64) -> Result<usize, Violation> {
        let start = offset.checked_sub(self.offset).filter(|rel| {
            rel.checked_add(length)
                .is_some_and(|end| end <= self.length as u64)
        });
        match start {
            // Inside a request whose length fits in 32 bits.
            Some(rel) => Ok(rel as usize),
            None => Err(Violation::OutsideRequest {
                chunk,
                offset,
                length,
                command: proto::command_name(self.command),
                req_offset: self.offset,
                req_length: self.length,
            }),
        }
    }

    fn fail(self, e: ClientError) {
        match self.completer {
            Completer::Unit(c) => c.complete(Err(e)),
            Completer::Read(c, _) => c.complete(Err(e)),
            Completer::Status(c, _) => c.complete(Err(e)),
        }
    }

    /// Whether a reply that just ended adds up: a read covered in full, a block status
    /// with at least one extent (an error reply needs neither).
    fn check_complete(&self) -> Result<(), Violation> {
        if self.error.is_some() {
            return Ok(());
        }
        match &self.completer {
            Completer::Read(..) if self.covered < self.length as u64 => Err(Violation::ShortRead {
                covered: self.covered,
                length: self.length,
                offset: self.offset,
            }),
            Completer::Status(_, ext) if ext.is_empty() => Err(Violation::NoExtents {
                offset: self.offset,
            }),
            _ => Ok(()),
        }
    }

    /// Completes the request after its last chunk, which [`InFlight::check_complete`]
    /// accepted.
    fn finish(mut self) {
        if let Some(e) = self.error.take() {
            return self.fail(e);
        }
        match self.completer {
            Completer::Unit(c) => c.complete(Ok(())),
            Completer::Read(c, buf) => c.complete(Ok(buf.freeze())),
            Completer::Status(c, ext) => c.complete(Ok(ext)),
        }
    }

    fn server_error(&self, error: u32, message: String) -> ClientError {
        ClientError::Server {
            command: proto::command_name(self.command),
            offset: self.offset,
            length: self.length,
            error: NbdErrno(error),
            message,
        }
    }
}

struct Pending {
    map: HashMap<u64, InFlight>,
    next_cookie: u64,
    lost: Option<Arc<ConnectionLost>>,
}

struct Shared {
    writer: Mutex<Stream>,
    pending: Mutex<Pending>,
    slot_freed: Condvar,
    max_in_flight: usize,
}

impl Shared {
    /// Fails every request in flight with `why` and hangs up. The first reason sticks.
    fn lose(&self, why: ConnectionLost) -> Arc<ConnectionLost> {
        let (why, drained) = {
            let mut p = lock(&self.pending);
            let why = p.lost.get_or_insert_with(|| Arc::new(why)).clone();
            let drained: Vec<InFlight> = p.map.drain().map(|(_, v)| v).collect();
            (why, drained)
        };
        self.slot_freed.notify_all();
        for f in drained {
            f.fail(ClientError::Disconnected(why.clone()));
        }
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        why
    }
}

/// Fails the connection when the reply reader ends, however it ends: a reader that
/// unwinds from a panic must not leave requests waiting for replies nobody reads.
struct LoseOnExit<'a> {
    shared: &'a Shared,
    why: Option<ConnectionLost>,
}

impl Drop for LoseOnExit<'_> {
    fn drop(&mut self) {
        let why = self.why.take().unwrap_or(ConnectionLost::ReaderStopped);
        debug!("client reader ends: {why}");
        self.shared.lose(why);
    }
}

/// One NBD connection.
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    negotiated: ClientNegotiated,
    export: String,
    strict: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.export)
            .field("negotiated", &self.negotiated)
            .finish()
    }
}

impl Client {
    /// Connects to `addr` and negotiates `export`.
    pub fn connect(
        addr: &Address,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let stream = crate::addr::connect(addr).map_err(|e| ClientError::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        Client::over(stream, export, opts)
    }

    /// Connects to the server and export an NBD URI names.
    pub fn connect_uri(uri: &NbdUri, opts: &ClientOptions) -> Result<Client, ClientError> {
        Client::connect(&uri.address, &uri.export, opts)
    }

    /// Negotiates `export` over an already connected socket.
    pub fn over(
        mut stream: Stream,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let hs_err = |reason: String| ClientError::Handshake {
            export: export.to_string(),
            reason,
        };
        let mut wants = ClientWants::new(export);
        wants.structured_replies = opts.structured_replies;
        wants.base_allocation = opts.block_status && opts.structured_replies;
        let mut hs = ClientHandshake::new(wants);
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut chunk = vec![0u8; 4096];
        let negotiated = loop {
            let step = hs.handle(&mut input, &mut out);
            if !out.is_empty() {
                std::io::Write::write_all(&mut stream, &out).map_err(|e| hs_err(e.to_string()))?;
                out.clear();
            }
            match step.map_err(|e: HandshakeError| hs_err(e.to_string()))? {
                ClientStep::NeedMore => {
                    let n = stream.read(&mut chunk).map_err(|e| hs_err(e.to_string()))?;
                    if n == 0 {
                        return Err(hs_err("server closed the connection".into()));
                    }
                    input.extend_from_slice(&chunk[..n]);
                }
                ClientStep::Done(n) => break n,
            }
        };
        if !input.is_empty() {
            return Err(hs_err(format!(
                "{} unexpected bytes after negotiation",
                input.len()
            )));
        }
        let reader_stream = stream.try_clone().map_err(|e| hs_err(e.to_string()))?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(stream),
            pending: Mutex::new(Pending {
                map: HashMap::new(),
                next_cookie: 1,
                lost: None,
            }),
            slot_freed: Condvar::new(),
            max_in_flight: opts.max_in_flight.max(1),
        });
        let s = shared.clone();
        let structured = negotiated.structured_replies;
        let reader = thread::Builder::new()
            .name("nbd-client-reader".into())
            .spawn(move || {
                let mut guard = LoseOnExit {
                    shared: &s,
                    why: None,
                };
                guard.why = Some(read_replies(&s, reader_stream, structured));
            })
            .map_err(|e| hs_err(e.to_string()))?;
        Ok(Client {
            shared,
            reader: Some(reader),
            negotiated,
            export: export.to_string(),
            strict: opts.strict,
        })
    }

    /// Export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.negotiated.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.negotiated.flags
    }

    /// Block size constraints this client respects.
    pub fn block_size(&self) -> BlockSize {
        self.negotiated.block_size
    }

    fn has(&self, f: u16) -> bool {
        self.negotiated.flags & f != 0
    }

    /// The server allows several connections to the export.
    pub fn can_multi_conn(&self) -> bool {
        self.has(tflags::CAN_MULTI_CONN)
    }

    /// The export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.has(tflags::READ_ONLY)
    }

    /// `TRIM` is offered.
    pub fn can_trim(&self) -> bool {
        self.has(tflags::SEND_TRIM)
    }

    /// `WRITE_ZEROES` is offered.
    pub fn can_zero(&self) -> bool {
        self.has(tflags::SEND_WRITE_ZEROES)
    }

    /// `FAST_ZERO` is offered.
    pub fn can_fast_zero(&self) -> bool {
        self.has(tflags::SEND_FAST_ZERO)
    }

    /// `FLUSH` is offered.
    pub fn can_flush(&self) -> bool {
        self.has(tflags::SEND_FLUSH)
    }

    /// `FUA` is offered.
    pub fn can_fua(&self) -> bool {
        self.has(tflags::SEND_FUA)
    }

    /// Structured replies are on.
    pub fn structured_replies(&self) -> bool {
        self.negotiated.structured_replies
    }

    /// `BLOCK_STATUS` with `base:allocation` is available.
    pub fn can_block_status(&self) -> bool {
        self.negotiated.base_allocation_id.is_some()
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.pending).map.len()
    }

    fn check(&self, command: u16, offset: u64, length: u32) -> Result<(), ClientError> {
        if !self.strict {
            return Ok(());
        }
        let invalid = |reason: String| ClientError::Invalid {
            command: proto::command_name(command),
            offset,
            length,
            reason,
        };
        let writes = matches!(command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && self.is_read_only() {
            return Err(invalid("the export is read-only".into()));
        }
        let offered = match command {
            cmd::FLUSH => self.can_flush(),
            cmd::TRIM => self.can_trim(),
            cmd::WRITE_ZEROES => self.can_zero(),
            cmd::BLOCK_STATUS => self.can_block_status(),
            _ => true,
        };
        if !offered {
            return Err(invalid("the server did not offer this command".into()));
        }
        if command == cmd::FLUSH {
            return Ok(());
        }
        if offset
            .checked_add(length as u64)
            .is_none_or(|e| e > self.size())
        {
            return Err(invalid(format!(
                "past the end of the export ({} bytes)",
                self.size()
            )));
        }
        let b = self.block_size();
        if offset % b.minimum as u64 != 0 || length % b.minimum != 0 {
            return Err(invalid(format!(
                "not aligned to the minimum block size {}",
                b.minimum
            )));
        }
        if matches!(command, cmd::READ | cmd::WRITE) && length > b.maximum {
            return Err(invalid(format!(
                "above the maximum payload of {} bytes",
                b.maximum
            )));
        }
        Ok(())
    }

    fn submit(
        &self,
        header: RequestHeader,
        payload: Option<&[u8]>,
        completer: Completer,
    ) -> Result<(), ClientError> {
        let cookie = {
            let mut p = lock(&self.shared.pending);
            loop {
                if let Some(why) = &p.lost {
                    return Err(ClientError::Disconnected(why.clone()));
                }
                if p.map.len() < self.shared.max_in_flight {
                    break;
                }
                p = wait(&self.shared.slot_freed, p);
            }
            let cookie = p.next_cookie;
            p.next_cookie = p.next_cookie.wrapping_add(1);
            p.map.insert(
                cookie,
                InFlight {
                    command: header.command,
                    offset: header.offset,
                    length: header.length,
                    completer,
                    covered: 0,
                    ranges: BTreeMap::new(),
                    error: None,
                },
            );
            cookie
        };
        let raw = RequestHeader { cookie, ..header }.to_bytes();
        let sent = {
            let mut w = lock(&self.shared.writer);
            match payload {
                Some(p) => w.write_all_vectored(&mut [IoSlice::new(&raw), IoSlice::new(p)]),
                None => std::io::Write::write_all(&mut *w, &raw),
            }
        };
        if let Err(source) = sent {
            let why = self.shared.lose(ConnectionLost::Io {
                during: format!("sending {}", proto::command_name(header.command)),
                source,
            });
            return Err(ClientError::Disconnected(why));
        }
        Ok(())
    }

    fn request(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 0,
            offset,
            length,
        }
    }

    /// Submits a `READ`; the ticket yields the data (holes as zeroes).
    pub fn submit_read(&self, offset: u64, length: u32) -> Result<Ticket<Bytes>, ClientError> {
        self.submit_read_into(offset, length, BytesMut::new())
    }

    /// Submits a `READ` into a buffer the caller recycles (for example one recovered with
    /// `Bytes::try_into_mut` from an earlier read), which saves allocating and zeroing one
    /// per request. Its old contents are all overwritten.
    pub fn submit_read_into(
        &self,
        offset: u64,
        length: u32,
        mut buf: BytesMut,
    ) -> Result<Ticket<Bytes>, ClientError> {
        self.check(cmd::READ, offset, length)?;
        let (promise, ticket) = Promise::new();
        buf.resize(length as usize, 0);
        self.submit(
            Self::request(cmd::READ, 0, offset, length),
            None,
            Completer::Read(promise, buf),
        )?;
        Ok(ticket)
    }

    fn unit(
        &self,
        header: RequestHeader,
        payload: Option<&[u8]>,
    ) -> Result<Ticket<()>, ClientError> {
        self.check(header.command, header.offset, header.length)?;
        let (promise, ticket) = Promise::new();
        self.submit(header, payload, Completer::Unit(promise))?;
        Ok(ticket)
    }

    fn fua(&self, fua: bool) -> u16 {
        if fua && self.can_fua() {
            cflags::FUA
        } else {
            0
        }
    }

    /// Submits a `WRITE` of `data` at `offset`.
    pub fn submit_write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<Ticket<()>, ClientError> {
        let length = u32::try_from(data.len()).map_err(|_| ClientError::Invalid {
            command: "WRITE",
            offset,
            length: u32::MAX,
            reason: format!("{} bytes do not fit one request", data.len()),
        })?;
        self.unit(
            Self::request(cmd::WRITE, self.fua(fua), offset, length),
            Some(data),
        )
    }

    /// Submits a `FLUSH`.
    pub fn submit_flush(&self) -> Result<Ticket<()>, ClientError> {
        self.unit(Self::request(cmd::FLUSH, 0, 0, 0), None)
    }

    /// Submits a `TRIM`.
    pub fn submit_trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> Result<Ticket<()>, ClientError> {
        self.unit(
            Self::request(cmd::TRIM, self.fua(fua), offset, length),
            None,
        )
    }

    /// Submits a `WRITE_ZEROES`.
    pub fn submit_write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> Result<Ticket<()>, ClientError> {
        let mut f = self.fua(flags.fua);
        if flags.no_hole {
            f |= cflags::NO_HOLE;
        }
        if flags.fast {
            if self.strict && !self.can_fast_zero() {
                return Err(ClientError::Invalid {
                    command: "WRITE_ZEROES",
                    offset,
                    length,
                    reason: "the server did not offer FAST_ZERO".into(),
                });
            }
            f |= cflags::FAST_ZERO;
        }
        self.unit(Self::request(cmd::WRITE_ZEROES, f, offset, length), None)
    }

    /// Submits a `BLOCK_STATUS` for `base:allocation`; the ticket yields consecutive
    /// extents from `offset` (possibly covering less than `length`).
    pub fn submit_block_status(
        &self,
        offset: u64,
        length: u32,
        req_one: bool,
    ) -> Result<Ticket<Vec<BlockExtent>>, ClientError> {
        self.check(cmd::BLOCK_STATUS, offset, length)?;
        let (promise, ticket) = Promise::new();
        let flags = if req_one { cflags::REQ_ONE } else { 0 };
        self.submit(
            Self::request(cmd::BLOCK_STATUS, flags, offset, length),
            None,
            Completer::Status(promise, Vec::new()),
        )?;
        Ok(ticket)
    }

    /// Reads `length` bytes at `offset`.
    pub fn read(&self, offset: u64, length: u32) -> Result<Bytes, ClientError> {
        self.submit_read(offset, length)?.wait()
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.submit_write(offset, data, false)?.wait()
    }

    /// Flushes.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.submit_flush()?.wait()
    }

    /// Trims.
    pub fn trim(&self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.submit_trim(offset, length, false)?.wait()
    }

    /// Writes zeroes (a hole is allowed).
    pub fn write_zeroes(&self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.submit_write_zeroes(offset, length, ZeroFlags::default())?
            .wait()
    }

    /// Allocation status from `offset`.
    pub fn block_status(&self, offset: u64, length: u32) -> Result<Vec<BlockExtent>, ClientError> {
        self.submit_block_status(offset, length, false)?.wait()
    }

    /// Waits for every request in flight, sends `DISC` and closes.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.close()
    }

    fn close(&mut self) -> Result<(), ClientError> {
        let Some(reader) = self.reader.take() else {
            return Ok(());
        };
        let lost = {
            let mut p = lock(&self.shared.pending);
            while !p.map.is_empty() && p.lost.is_none() {
                p = wait(&self.shared.slot_freed, p);
            }
            p.lost.clone()
        };
        let result = if lost.is_none() {
            let raw = Self::request(cmd::DISC, 0, 0, 0).to_bytes();
            let mut w = lock(&self.shared.writer);
            let r = std::io::Write::write_all(&mut *w, &raw).map_err(|source| {
                ClientError::Disconnected(Arc::new(ConnectionLost::Io {
                    during: "sending DISC".into(),
                    source,
                }))
            });
            let _ = w.shutdown(std::net::Shutdown::Both);
            r
        } else {
            Ok(())
        };
        let _ = reader.join();
        result
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Counts the bytes read, so that a protocol error can say where in the stream it was.
struct Counting<R> {
    inner: R,
    at: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// How reading one reply failed.
enum Failure {
    Io(&'static str, io::Error),
    Protocol(Violation),
}

impl From<Violation> for Failure {
    fn from(v: Violation) -> Self {
        Failure::Protocol(v)
    }
}

fn io_failure(during: &'static str) -> impl Fn(io::Error) -> Failure {
    move |e| Failure::Io(during, e)
}

/// Reads replies until the connection ends, completing requests; returns why it ended.
/// A request whose reply broke the protocol fails with [`ClientError::Protocol`], the
/// others (failed by the caller) with [`ClientError::Disconnected`].
fn read_replies(shared: &Shared, stream: Stream, structured: bool) -> ConnectionLost {
    // Small on purpose: read data larger than the buffer goes straight into the request's
    // buffer instead of being copied through this one.
    let mut r = Counting {
        inner: BufReader::with_capacity(16 * 1024, stream),
        at: 0,
    };
    let io = |during: &str, source| ConnectionLost::Io {
        during: during.to_string(),
        source,
    };
    let mut head = [0u8; CHUNK_HEADER_LEN];
    loop {
        let at = r.at;
        let protocol = |cookie, violation| {
            ConnectionLost::Protocol(ProtocolError {
                at,
                cookie,
                violation,
            })
        };
        match r.read(&mut head[..4]) {
            Ok(0) => return ConnectionLost::Closed,
            Ok(n) => {
                if let Err(e) = r.read_exact(&mut head[n..4]) {
                    return io("reading a reply header", e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return io("reading a reply header", e),
        }
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = match magic {
            proto::SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
            proto::STRUCTURED_REPLY_MAGIC if structured => CHUNK_HEADER_LEN,
            m => return protocol(None, Violation::BadMagic(m)),
        };
        if let Err(e) = r.read_exact(&mut head[4..len]) {
            return io("reading a reply header", e);
        }
        let mut b = BytesMut::from(&head[..len]);
        let header = match ReplyHeader::decode(&mut b) {
            Ok(Some(h)) => h,
            Ok(None) => return protocol(None, Violation::BadMagic(magic)),
            Err(e) => return protocol(None, e.into()),
        };
        let cookie = header.cookie();
        // Take the request out while its payload is read, so submitters are not blocked.
        let Some(mut f) = lock(&shared.pending).map.remove(&cookie) else {
            return protocol(None, Violation::UnknownCookie(cookie));
        };
        let done = match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    f.error = Some(f.server_error(error, String::new()));
                    Ok(true)
                } else if let Completer::Read(_, buf) = &mut f.completer {
                    f.covered = f.length as u64;
                    r.read_exact(&mut buf[..])
                        .map(|()| true)
                        .map_err(io_failure("reading READ data"))
                } else {
                    Ok(true)
                }
            }
            ReplyHeader::Chunk(h) => chunk_payload(&mut r, &mut f, &h).map(|()| h.is_done()),
        };
        // The request is out of the map: fail it here, or its ticket would wait forever.
        let done = match done {
            Ok(d) => d,
            Err(Failure::Io(during, source)) => {
                // Back in the map, to be failed with the others.
                lock(&shared.pending).map.insert(cookie, f);
                return io(during, source);
            }
            Err(Failure::Protocol(violation)) => {
                let e = ProtocolError {
                    at,
                    cookie: Some(cookie),
                    violation,
                };
                f.fail(ClientError::Protocol(e.clone()));
                return ConnectionLost::Protocol(e);
            }
        };
        if done {
            if let Err(violation) = f.check_complete() {
                let e = ProtocolError {
                    at,
                    cookie: Some(cookie),
                    violation,
                };
                f.fail(ClientError::Protocol(e.clone()));
                return ConnectionLost::Protocol(e);
            }
            f.finish();
            shared.slot_freed.notify_all();
        } else {
            lock(&shared.pending).map.insert(cookie, f);
        }
    }
}

fn chunk_payload(r: &mut impl Read, f: &mut InFlight, h: &ChunkHeader) -> Result<(), Failure> {
    if h.kind == chunk::OFFSET_DATA {
        if !matches!(f.completer, Completer::Read(..)) {
            return Err(Violation::WrongChunk {
                chunk: "OFFSET_DATA",
                command: proto::command_name(f.command),
            }
            .into());
        }
        let Some(n) = h.length.checked_sub(8).filter(|&n| n > 0) else {
            return Err(Violation::Malformed(WireError::Malformed {
                what: "structured reply chunk",
                detail: format!("OFFSET_DATA of {} bytes", h.length),
            })
            .into());
        };
        let mut o = [0u8; 8];
        r.read_exact(&mut o)
            .map_err(io_failure("reading an OFFSET_DATA chunk"))?;
        let at = u64::from_be_bytes(o);
        let start = f.place("OFFSET_DATA", at, n as u64)?;
        f.cover(at, n as u64)?;
        let Completer::Read(_, buf) = &mut f.completer else {
            unreachable!("checked above")
        };
        return r
            .read_exact(&mut buf[start..start + n as usize])
            .map_err(io_failure("reading READ data"));
    }
    let max = if h.kind & chunk::ERROR_BIT != 0 {
        // Error value, message length, a message of up to 64 KiB, an offset.
        6 + u16::MAX as u32 + 8
    } else {
        MAX_META_CHUNK
    };
    if h.length > max {
        return Err(Violation::ChunkTooLong {
            kind: h.kind,
            length: h.length,
            max,
        }
        .into());
    }
    let mut payload = vec![0u8; h.length as usize];
    r.read_exact(&mut payload)
        .map_err(io_failure("reading a reply chunk"))?;
    let parsed = ChunkPayload::parse(h.kind, Bytes::from(payload)).map_err(Violation::from)?;
    match parsed {
        ChunkPayload::None => {
            if !h.is_done() {
                return Err(Violation::NoneWithoutDone.into());
            }
        }
        ChunkPayload::OffsetHole { offset, length } => {
            if !matches!(f.completer, Completer::Read(..)) {
                return Err(Violation::WrongChunk {
                    chunk: "OFFSET_HOLE",
                    command: proto::command_name(f.command),
                }
                .into());
            }
            let start = f.place("OFFSET_HOLE", offset, length as u64)?;
            f.cover(offset, length as u64)?;
            if let Completer::Read(_, buf) = &mut f.completer {
                buf[start..start + length as usize].fill(0);
            }
        }
        ChunkPayload::BlockStatus { descriptors, .. } => {
            let (req_offset, req_length) = (f.offset, f.length);
            let Completer::Status(_, ext) = &mut f.completer else {
                return Err(Violation::WrongChunk {
                    chunk: "BLOCK_STATUS",
                    command: proto::command_name(f.command),
                }
                .into());
            };
            // Where the requested range ends; a request that itself runs past 2^64 (only
            // a lax client sends one) ends there.
            let end = req_offset.saturating_add(req_length as u64);
            let mut at = ext.last().map_or(req_offset, |e| e.offset + e.length);
            for d in descriptors {
                if at >= end && at > req_offset {
                    return Err(Violation::ExtentPastRequest {
                        offset: at,
                        req_offset,
                        req_length,
                    }
                    .into());
                }
                let next = at
                    .checked_add(d.length as u64)
                    .ok_or(Violation::ExtentOverflow {
                        offset: at,
                        length: d.length,
                    })?;
                ext.push(BlockExtent {
                    offset: at,
                    length: d.length as u64,
                    flags: d.flags,
                });
                at = next;
            }
        }
        ChunkPayload::Error { error, message }
        | ChunkPayload::ErrorOffset { error, message, .. }
        | ChunkPayload::UnknownError { error, message, .. } => {
            if f.error.is_none() {
                f.error = Some(f.server_error(error, message));
            }
        }
        ChunkPayload::OffsetData { .. } => {
            return Err(Violation::WrongChunk {
                chunk: "OFFSET_DATA",
                command: proto::command_name(f.command),
            }
            .into());
        }
    }
    Ok(())
}

/// Several connections to one export, used round-robin.
#[derive(Debug)]
pub struct ClientPool {
    clients: Vec<Client>,
    next: AtomicUsize,
}

impl ClientPool {
    /// Opens up to `connections` connections: one when the server does not offer
    /// `CAN_MULTI_CONN`.
    pub fn connect(
        addr: &Address,
        export: &str,
        opts: &ClientOptions,
        connections: usize,
    ) -> Result<ClientPool, ClientError> {
        let first = Client::connect(addr, export, opts)?;
        let n = if first.can_multi_conn() {
            connections.max(1)
        } else {
            1
        };
        let mut clients = vec![first];
        for _ in 1..n {
            clients.push(Client::connect(addr, export, opts)?);
        }
        Ok(ClientPool {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    /// The connections.
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// The next connection in turn.
    pub fn pick(&self) -> &Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[i]
    }

    /// The first connection (for size and flags).
    pub fn first(&self) -> &Client {
        &self.clients[0]
    }

    /// Flushes: with `CAN_MULTI_CONN` one flush covers writes completed on every
    /// connection.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.clients[0].flush()
    }

    /// Disconnects every connection.
    pub fn disconnect(self) -> Result<(), ClientError> {
        let mut result = Ok(());
        for c in self.clients {
            if let Err(e) = c.disconnect() {
                result = Err(e);
            }
        }
        result
    }
}
