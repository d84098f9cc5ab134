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
use std::sync::{Arc, Condvar, Mutex};
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
    SIMPLE_REPLY_LEN,
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
    /// The connection ended (or broke protocol) before the reply came.
    #[error("connection lost: {0}")]
    Disconnected(String),
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

struct Completion<T> {
    result: Mutex<Option<Result<T, ClientError>>>,
    ready: Condvar,
}

impl<T> Completion<T> {
    fn new() -> Arc<Self> {
        Arc::new(Completion {
            result: Mutex::new(None),
            ready: Condvar::new(),
        })
    }

    fn complete(&self, r: Result<T, ClientError>) {
        *self.result.lock().expect("completion lock") = Some(r);
        self.ready.notify_all();
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
        let mut g = self.completion.result.lock().expect("completion lock");
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = self.completion.ready.wait(g).expect("completion lock");
        }
    }

    /// Whether the reply has arrived.
    pub fn is_done(&self) -> bool {
        self.completion
            .result
            .lock()
            .expect("completion lock")
            .is_some()
    }
}

enum Completer {
    Unit(Arc<Completion<()>>),
    Read(Arc<Completion<Bytes>>, BytesMut),
    Status(Arc<Completion<Vec<BlockExtent>>>, Vec<BlockExtent>),
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
    /// Records that `[start, start + len)` of a read arrived, refusing overlaps.
    fn cover(&mut self, start: u64, len: u64) -> Result<(), String> {
        let end = start + len;
        let before = self.ranges.range(..=start).next_back();
        let after = self.ranges.range(start..).next();
        if before.is_some_and(|(_, &e)| e > start) || after.is_some_and(|(&s, _)| s < end) {
            return Err(format!(
                "chunk at {start} length {len} overlaps an earlier chunk of READ offset {}",
                self.offset
            ));
        }
        self.ranges.insert(start, end);
        self.covered += len;
        Ok(())
    }
}

impl InFlight {
    fn fail(self, e: ClientError) {
        match self.completer {
            Completer::Unit(c) => c.complete(Err(e)),
            Completer::Read(c, _) => c.complete(Err(e)),
            Completer::Status(c, _) => c.complete(Err(e)),
        }
    }

    fn finish(mut self) {
        if let Some(e) = self.error.take() {
            return self.fail(e);
        }
        match self.completer {
            Completer::Unit(c) => c.complete(Ok(())),
            Completer::Read(c, buf) => {
                if self.covered < self.length as u64 {
                    c.complete(Err(ClientError::Disconnected(format!(
                        "server sent {} of {} bytes of READ offset {} and said done",
                        self.covered, self.length, self.offset
                    ))));
                } else {
                    c.complete(Ok(buf.freeze()))
                }
            }
            Completer::Status(c, ext) => {
                if ext.is_empty() {
                    c.complete(Err(ClientError::Disconnected(format!(
                        "no base:allocation extents for BLOCK_STATUS offset {}",
                        self.offset
                    ))));
                } else {
                    c.complete(Ok(ext))
                }
            }
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
    lost: Option<String>,
}

struct Shared {
    writer: Mutex<Stream>,
    pending: Mutex<Pending>,
    slot_freed: Condvar,
    max_in_flight: usize,
}

impl Shared {
    fn lose(&self, why: String) {
        let drained: Vec<InFlight> = {
            let mut p = self.pending.lock().expect("pending lock");
            if p.lost.is_none() {
                p.lost = Some(why.clone());
            }
            p.map.drain().map(|(_, v)| v).collect()
        };
        self.slot_freed.notify_all();
        for f in drained {
            f.fail(ClientError::Disconnected(why.clone()));
        }
        let _ = self
            .writer
            .lock()
            .expect("writer lock")
            .shutdown(std::net::Shutdown::Both);
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
                let why = match read_replies(&s, reader_stream, structured) {
                    Ok(()) => "server closed the connection".to_string(),
                    Err(e) => e,
                };
                debug!("client reader ends: {why}");
                s.lose(why);
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
        self.shared.pending.lock().expect("pending lock").map.len()
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
            let mut p = self.shared.pending.lock().expect("pending lock");
            loop {
                if let Some(why) = &p.lost {
                    return Err(ClientError::Disconnected(why.clone()));
                }
                if p.map.len() < self.shared.max_in_flight {
                    break;
                }
                p = self.shared.slot_freed.wait(p).expect("pending lock");
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
            let mut w = self.shared.writer.lock().expect("writer lock");
            match payload {
                Some(p) => w.write_all_vectored(&mut [IoSlice::new(&raw), IoSlice::new(p)]),
                None => std::io::Write::write_all(&mut *w, &raw),
            }
        };
        if let Err(e) = sent {
            let why = format!("sending {}: {e}", proto::command_name(header.command));
            self.shared.lose(why.clone());
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
        let c = Completion::new();
        buf.resize(length as usize, 0);
        self.submit(
            Self::request(cmd::READ, 0, offset, length),
            None,
            Completer::Read(c.clone(), buf),
        )?;
        Ok(Ticket {
            completion: c,
            _t: PhantomData,
        })
    }

    fn unit(
        &self,
        header: RequestHeader,
        payload: Option<&[u8]>,
    ) -> Result<Ticket<()>, ClientError> {
        self.check(header.command, header.offset, header.length)?;
        let c = Completion::new();
        self.submit(header, payload, Completer::Unit(c.clone()))?;
        Ok(Ticket {
            completion: c,
            _t: PhantomData,
        })
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
        let c = Completion::new();
        let flags = if req_one { cflags::REQ_ONE } else { 0 };
        self.submit(
            Self::request(cmd::BLOCK_STATUS, flags, offset, length),
            None,
            Completer::Status(c.clone(), Vec::new()),
        )?;
        Ok(Ticket {
            completion: c,
            _t: PhantomData,
        })
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
            let mut p = self.shared.pending.lock().expect("pending lock");
            while !p.map.is_empty() && p.lost.is_none() {
                p = self.shared.slot_freed.wait(p).expect("pending lock");
            }
            p.lost.clone()
        };
        let result = if lost.is_none() {
            let raw = Self::request(cmd::DISC, 0, 0, 0).to_bytes();
            let mut w = self.shared.writer.lock().expect("writer lock");
            let r = std::io::Write::write_all(&mut *w, &raw)
                .map_err(|e| ClientError::Disconnected(format!("sending DISC: {e}")));
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

fn read_replies(shared: &Shared, stream: Stream, structured: bool) -> Result<(), String> {
    // Small on purpose: read data larger than the buffer goes straight into the request's
    // buffer instead of being copied through this one.
    let mut r = BufReader::with_capacity(16 * 1024, stream);
    let mut head = [0u8; CHUNK_HEADER_LEN];
    loop {
        match r.read(&mut head[..4]) {
            Ok(0) => return Ok(()),
            Ok(n) => r
                .read_exact(&mut head[n..4])
                .map_err(|e| format!("reading a reply header: {e}"))?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading a reply header: {e}")),
        }
        let magic = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
        let len = match magic {
            proto::SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
            proto::STRUCTURED_REPLY_MAGIC if structured => CHUNK_HEADER_LEN,
            m => return Err(format!("bad reply magic {m:#x}")),
        };
        r.read_exact(&mut head[4..len])
            .map_err(|e| format!("reading a reply header: {e}"))?;
        let mut b = BytesMut::from(&head[..len]);
        let header = ReplyHeader::decode(&mut b)
            .map_err(|e| e.to_string())?
            .ok_or("short reply header")?;
        let cookie = header.cookie();
        // Take the request out while its payload is read, so submitters are not blocked.
        let mut f = shared
            .pending
            .lock()
            .expect("pending lock")
            .map
            .remove(&cookie)
            .ok_or_else(|| format!("reply for unknown cookie {cookie:#x}"))?;
        let done = match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    f.error = Some(f.server_error(error, String::new()));
                    Ok(true)
                } else if let Completer::Read(_, buf) = &mut f.completer {
                    let r = r
                        .read_exact(&mut buf[..])
                        .map_err(|e| format!("reading READ data: {e}"));
                    f.covered = f.length as u64;
                    r.map(|()| true)
                } else {
                    Ok(true)
                }
            }
            ReplyHeader::Chunk(h) => chunk_payload(&mut r, &mut f, &h).map(|()| h.is_done()),
        };
        // The request is out of the map: fail it here, or its ticket would wait forever.
        let done = match done {
            Ok(d) => d,
            Err(why) => {
                f.fail(ClientError::Disconnected(why.clone()));
                return Err(why);
            }
        };
        if done {
            f.finish();
            shared.slot_freed.notify_all();
        } else {
            shared
                .pending
                .lock()
                .expect("pending lock")
                .map
                .insert(cookie, f);
        }
    }
}

fn chunk_payload(r: &mut impl Read, f: &mut InFlight, h: &ChunkHeader) -> Result<(), String> {
    if h.kind == chunk::OFFSET_DATA {
        let (Completer::Read(_, buf), true) = (&mut f.completer, h.length > 8) else {
            return Err(format!(
                "OFFSET_DATA chunk of {} bytes for a {} request",
                h.length,
                proto::command_name(f.command)
            ));
        };
        let mut o = [0u8; 8];
        r.read_exact(&mut o).map_err(|e| e.to_string())?;
        let at = u64::from_be_bytes(o);
        let n = (h.length - 8) as u64;
        if at < f.offset || at + n > f.offset + f.length as u64 {
            return Err(format!(
                "OFFSET_DATA at {at} length {n} outside READ offset {} length {}",
                f.offset, f.length
            ));
        }
        let start = (at - f.offset) as usize;
        r.read_exact(&mut buf[start..start + n as usize])
            .map_err(|e| format!("reading READ data: {e}"))?;
        return f.cover(at, n);
    }
    if h.length > MAX_META_CHUNK {
        return Err(format!(
            "chunk type {} of {} bytes is too long",
            h.kind, h.length
        ));
    }
    let mut payload = vec![0u8; h.length as usize];
    r.read_exact(&mut payload).map_err(|e| e.to_string())?;
    let parsed = ChunkPayload::parse(h.kind, Bytes::from(payload)).map_err(|e| e.to_string())?;
    match parsed {
        ChunkPayload::None => {
            if !h.is_done() {
                return Err("NONE chunk without the DONE flag".into());
            }
        }
        ChunkPayload::OffsetHole { offset, length } => {
            if !matches!(f.completer, Completer::Read(..))
                || offset < f.offset
                || offset + length as u64 > f.offset + f.length as u64
            {
                return Err(format!(
                    "OFFSET_HOLE at {offset} length {length} outside the request"
                ));
            }
            if let Completer::Read(_, buf) = &mut f.completer {
                let start = (offset - f.offset) as usize;
                buf[start..start + length as usize].fill(0);
            }
            f.cover(offset, length as u64)?;
        }
        ChunkPayload::BlockStatus { descriptors, .. } => {
            let Completer::Status(_, ext) = &mut f.completer else {
                return Err("BLOCK_STATUS chunk for another command".into());
            };
            let mut at = f.offset;
            for d in descriptors {
                ext.push(BlockExtent {
                    offset: at,
                    length: d.length as u64,
                    flags: d.flags,
                });
                at += d.length as u64;
            }
        }
        ChunkPayload::Error { error, message }
        | ChunkPayload::ErrorOffset { error, message, .. }
        | ChunkPayload::UnknownError { error, message, .. } => {
            if f.error.is_none() {
                f.error = Some(f.server_error(error, message));
            }
        }
        ChunkPayload::OffsetData { .. } => unreachable!("handled above"),
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
