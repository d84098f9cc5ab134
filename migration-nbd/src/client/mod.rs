//! The NBD client: [`ClientSession`], the protocol without I/O, and [`Client`], a thin
//! threaded driver of it.
//!
//! A [`Client`] is one connection. Any thread may submit requests (`submit_*`), each
//! returning a [`Ticket`] at once; up to [`ClientOptions::max_in_flight`] requests are on
//! the wire together, and a reader thread completes tickets by cookie as replies arrive,
//! in whatever order the server sends them. The blocking helpers (`read`, `write`...) are
//! `submit_*` followed by [`Ticket::wait`]. [`ClientPool`] spreads requests over several
//! connections when the server allows it (`CAN_MULTI_CONN`).
//!
//! The driver only reads and writes: what to send, what a reply means and whether it is
//! valid is [`ClientSession`]'s, which a VMM with its own event loop can drive instead.
//! Read data goes from the socket straight into the request's buffer.

mod error;
mod session;

pub use error::{ClientError, ConnectionLost, NegotiationError, ProtocolError, Violation};
pub use session::{
    BlockExtent, ClientRequest, ClientSession, MAX_EXTENTS, MAX_READ_PIECES, Reply, ReplyStep,
    Submitted, ZeroFlags,
};

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tracing::debug;

use crate::addr::{Address, NbdUri, Stream};
use crate::handshake::{ClientHandshake, ClientNegotiated, ClientStep, ClientWants};
use crate::proto::{self, tflags};
use crate::wire::BlockSize;

/// Bytes the reader takes from the socket at a time when it is not moving read data.
/// Small on purpose: data of a read goes straight from the socket into the request's
/// buffer, except what the read that fetched its header already took in (at most this
/// much, copied once more).
const INPUT_CHUNK: usize = 16 * 1024;

/// Default [`ClientOptions::connect_timeout`]: 30 s, as the mirror's reply timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Longest time from connecting to the end of the negotiation (`None`: no limit). A
    /// server that accepts and never answers (hung, stopped, or not an NBD server) would
    /// otherwise hold the caller forever: the kernel completes the accept by itself.
    /// TCP's connect counts against it; a unix connect does not wait.
    pub connect_timeout: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            structured_replies: true,
            block_status: true,
            max_in_flight: 64,
            strict: true,
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
        }
    }
}

/// Locks `m` even if a thread panicked while holding it: the state it guards stays
/// usable, and a lost connection fails everything anyway, so waiters must still be woken
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

    /// Waits for the reply until `deadline`; whether it arrived (then [`wait`](Self::wait)
    /// returns at once). A caller that must notice a server that stopped answering (a
    /// mirror's reply timeout) waits in slices with this.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let g = lock(&self.completion.result);
        let left = deadline.saturating_duration_since(Instant::now());
        self.completion
            .ready
            .wait_timeout_while(g, left, |r| r.is_none())
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .is_some()
    }

    /// Whether the reply has arrived.
    pub fn is_done(&self) -> bool {
        lock(&self.completion.result).is_some()
    }
}

/// Who waits for a request, and the buffer of a read.
enum Waiter {
    Unit(Promise<()>),
    /// The buffer is taken out while the reader fills it, so submitters are not blocked.
    Read(Promise<Bytes>, BytesMut),
    Status(Promise<Vec<BlockExtent>>),
}

impl Waiter {
    fn fail(self, e: ClientError) {
        match self {
            Waiter::Unit(p) => p.complete(Err(e)),
            Waiter::Read(p, _) => p.complete(Err(e)),
            Waiter::Status(p) => p.complete(Err(e)),
        }
    }

    fn complete(self, result: Result<Reply, ClientError>) -> Result<(), ()> {
        match (self, result) {
            (w, Err(e)) => w.fail(e),
            (Waiter::Unit(p), Ok(Reply::Done)) => p.complete(Ok(())),
            (Waiter::Read(p, buf), Ok(Reply::Read)) => p.complete(Ok(buf.freeze())),
            (Waiter::Status(p), Ok(Reply::BlockStatus(e))) => p.complete(Ok(e)),
            // The session answers each request with the reply of its kind.
            (w, Ok(_)) => {
                w.fail(ClientError::Disconnected(Arc::new(
                    ConnectionLost::ReaderStopped,
                )));
                return Err(());
            }
        }
        Ok(())
    }
}

struct State {
    session: ClientSession,
    waiting: HashMap<u64, Waiter>,
    lost: Option<Arc<ConnectionLost>>,
    /// Hung up with [`Client::hang_up_draining`]: only the sending half is shut, and the
    /// reader discards what the server still sends until it closes its end.
    draining: bool,
    /// The reply reader ended: the server can send nothing more on this connection.
    reader_done: bool,
}

struct Shared {
    writer: Mutex<Stream>,
    /// A handle to hang up with that needs no lock: a writer blocked on a server that does
    /// not read must not keep the connection from being failed.
    control: Stream,
    state: Mutex<State>,
    /// A request completed or the connection was lost.
    changed: Condvar,
    max_in_flight: usize,
}

impl Shared {
    /// Fails every request in flight and hangs up; the first reason sticks. A protocol
    /// error fails the request it concerns with [`ClientError::Protocol`], the others with
    /// [`ClientError::Disconnected`].
    fn lose(&self, why: ConnectionLost) -> Arc<ConnectionLost> {
        let (why, waiting) = {
            let mut st = lock(&self.state);
            let why = st.lost.get_or_insert_with(|| Arc::new(why)).clone();
            st.session.abort();
            let w: Vec<(u64, Waiter)> = st.waiting.drain().collect();
            (why, w)
        };
        self.changed.notify_all();
        for (cookie, w) in waiting {
            let e = match &*why {
                ConnectionLost::Protocol(p) if p.cookie == Some(cookie) => {
                    ClientError::Protocol(p.clone())
                }
                _ => ClientError::Disconnected(why.clone()),
            };
            w.fail(e);
        }
        let how = if lock(&self.state).draining {
            std::net::Shutdown::Write
        } else {
            std::net::Shutdown::Both
        };
        let _ = self.control.shutdown(how);
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
        lock(&self.shared.state).reader_done = true;
        self.shared.changed.notify_all();
    }
}

/// Reads and drops what the server still sends on a connection hung up with
/// [`Client::hang_up_draining`], until it closes its end (or our reading half is shut).
fn discard_until_closed(stream: &mut Stream) {
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// One NBD connection.
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    negotiated: ClientNegotiated,
    export: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.export)
            .field("negotiated", &self.negotiated)
            .finish()
    }
}

/// Runs the negotiation over `stream`.
fn negotiate(
    stream: &mut Stream,
    opts: &ClientOptions,
    export: &str,
    deadline: Option<Instant>,
) -> Result<ClientNegotiated, NegotiationError> {
    let io = |during| move |source| NegotiationError::Io { during, source };
    let mut wants = ClientWants::new(export);
    wants.structured_replies = opts.structured_replies;
    wants.base_allocation = opts.block_status && opts.structured_replies;
    let mut hs = ClientHandshake::new(wants);
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let negotiated = loop {
        let step = hs.handle(&mut input, &mut out);
        if !out.is_empty() {
            stream.write_all(&out).map_err(io("sending an option"))?;
            out.clear();
        }
        match step? {
            ClientStep::NeedMore => {
                // Each read waits only for what is left of the whole timeout, so that a
                // server answering a byte at a time cannot stretch it.
                if let (Some(d), Some(t)) = (deadline, opts.connect_timeout) {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(NegotiationError::TimedOut { after: t });
                    }
                    stream
                        .set_read_timeout(Some(left))
                        .map_err(io("setting the negotiation timeout"))?;
                }
                let n = match stream.read_buf(&mut input, 4096) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) && deadline.is_some() =>
                    {
                        return Err(NegotiationError::TimedOut {
                            after: opts.connect_timeout.unwrap_or_default(),
                        });
                    }
                    r => r.map_err(io("reading an option reply"))?,
                };
                if n == 0 {
                    return Err(NegotiationError::Closed);
                }
            }
            ClientStep::Done(n) => break n,
        }
    };
    // The server speaks only when asked from here on.
    if !input.is_empty() {
        return Err(NegotiationError::TrailingBytes(input.len()));
    }
    // The reply reader blocks for as long as the connection lives (the mirror has its own
    // reply timeout on top).
    if deadline.is_some() {
        stream
            .set_read_timeout(None)
            .map_err(io("clearing the negotiation timeout"))?;
    }
    Ok(negotiated)
}

impl Client {
    /// Connects to `addr` and negotiates `export`.
    pub fn connect(
        addr: &Address,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let start = Instant::now();
        let stream = crate::addr::connect_within(addr, opts.connect_timeout).map_err(|e| {
            ClientError::Connect {
                addr: addr.to_string(),
                source: Arc::new(e),
            }
        })?;
        Client::negotiate_over(stream, export, opts, start)
    }

    /// Connects to the server and export an NBD URI names.
    pub fn connect_uri(uri: &NbdUri, opts: &ClientOptions) -> Result<Client, ClientError> {
        Client::connect(&uri.address, &uri.export, opts)
    }

    /// Negotiates `export` over an already connected socket.
    /// [`ClientOptions::connect_timeout`] bounds the negotiation from this call on.
    pub fn over(stream: Stream, export: &str, opts: &ClientOptions) -> Result<Client, ClientError> {
        Client::negotiate_over(stream, export, opts, Instant::now())
    }

    fn negotiate_over(
        mut stream: Stream,
        export: &str,
        opts: &ClientOptions,
        start: Instant,
    ) -> Result<Client, ClientError> {
        let hs_err = |e: NegotiationError| ClientError::Handshake {
            export: export.to_string(),
            source: Arc::new(e),
        };
        let deadline = opts.connect_timeout.map(|t| start + t);
        let negotiated = negotiate(&mut stream, opts, export, deadline).map_err(hs_err)?;
        let io = |during| move |source| hs_err(NegotiationError::Io { during, source });
        let reader_stream = stream.try_clone().map_err(io("cloning the socket"))?;
        let control = stream.try_clone().map_err(io("cloning the socket"))?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(stream),
            control,
            state: Mutex::new(State {
                session: ClientSession::new(negotiated.clone(), opts.strict),
                waiting: HashMap::new(),
                lost: None,
                draining: false,
                reader_done: false,
            }),
            changed: Condvar::new(),
            max_in_flight: opts.max_in_flight.max(1),
        });
        let s = shared.clone();
        let reader = thread::Builder::new()
            .name("nbd-client-reader".into())
            .spawn(move || {
                let mut stream = reader_stream;
                let mut guard = LoseOnExit {
                    shared: &s,
                    why: None,
                };
                guard.why = Some(read_replies(&s, &mut stream));
                if lock(&s.state).draining {
                    discard_until_closed(&mut stream);
                }
            })
            .map_err(io("starting the reply reader"))?;
        Ok(Client {
            shared,
            reader: Some(reader),
            negotiated,
            export: export.to_string(),
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
        lock(&self.shared.state).session.in_flight()
    }

    /// Hands `request` to the session (which checks it and picks its cookie) once a slot
    /// is free, then sends it.
    fn submit(
        &self,
        request: ClientRequest,
        payload: Option<&[u8]>,
        waiter: Waiter,
    ) -> Result<(), ClientError> {
        let sent = {
            let mut st = lock(&self.shared.state);
            loop {
                if let Some(why) = &st.lost {
                    return Err(ClientError::Disconnected(why.clone()));
                }
                if st.session.in_flight() < self.shared.max_in_flight {
                    break;
                }
                st = wait(&self.shared.changed, st);
            }
            let sent = st.session.submit(request)?;
            st.waiting.insert(sent.cookie, waiter);
            sent
        };
        // Registered before it is sent, so that even an immediate reply finds it.
        let written = {
            let mut w = lock(&self.shared.writer);
            match payload {
                Some(p) => w.write_all_vectored(&mut [IoSlice::new(&sent.header), IoSlice::new(p)]),
                None => w.write_all(&sent.header),
            }
        };
        if let Err(source) = written {
            let command = u16::from_be_bytes([sent.header[6], sent.header[7]]);
            let why = self.shared.lose(ConnectionLost::Io {
                during: format!("sending {}", proto::command_name(command)),
                source,
            });
            return Err(ClientError::Disconnected(why));
        }
        Ok(())
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
        let (promise, ticket) = Promise::new();
        buf.resize(length as usize, 0);
        self.submit(
            ClientRequest::Read { offset, length },
            None,
            Waiter::Read(promise, buf),
        )?;
        Ok(ticket)
    }

    fn unit(
        &self,
        request: ClientRequest,
        payload: Option<&[u8]>,
    ) -> Result<Ticket<()>, ClientError> {
        let (promise, ticket) = Promise::new();
        self.submit(request, payload, Waiter::Unit(promise))?;
        Ok(ticket)
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
            ClientRequest::Write {
                offset,
                length,
                fua,
            },
            Some(data),
        )
    }

    /// Submits a `FLUSH`.
    pub fn submit_flush(&self) -> Result<Ticket<()>, ClientError> {
        self.unit(ClientRequest::Flush, None)
    }

    /// Submits a `TRIM`.
    pub fn submit_trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> Result<Ticket<()>, ClientError> {
        self.unit(
            ClientRequest::Trim {
                offset,
                length,
                fua,
            },
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
        self.unit(
            ClientRequest::WriteZeroes {
                offset,
                length,
                flags,
            },
            None,
        )
    }

    /// Submits a `BLOCK_STATUS` for `base:allocation`; the ticket yields consecutive
    /// extents from `offset` (possibly covering less than `length`).
    pub fn submit_block_status(
        &self,
        offset: u64,
        length: u32,
        req_one: bool,
    ) -> Result<Ticket<Vec<BlockExtent>>, ClientError> {
        let (promise, ticket) = Promise::new();
        self.submit(
            ClientRequest::BlockStatus {
                offset,
                length,
                req_one,
            },
            None,
            Waiter::Status(promise),
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

    /// Hangs up now: every request in flight fails at once with
    /// [`ConnectionLost::Aborted`], and so does every later one. Unlike
    /// [`disconnect`](Self::disconnect) it waits for nothing, so a caller that must be sure
    /// no request of this connection is still to be sent (a mirror about to reconnect and
    /// copy the same ranges again) can use it on a connection that hangs.
    pub fn abort(&self) {
        lock(&self.shared.state).draining = false;
        self.shared.lose(ConnectionLost::Aborted);
        // Also ends a drain started by `hang_up_draining`.
        let _ = self.shared.control.shutdown(std::net::Shutdown::Both);
    }

    /// Hangs up like [`abort`](Self::abort) (every request in flight and every later one
    /// fails at once, nothing more is sent), but shuts only the sending half and keeps
    /// reading, dropping what arrives, until the server closes its end
    /// ([`wait_closed`](Self::wait_closed)).
    ///
    /// For a server that stopped answering without closing: requests it holds may still
    /// be carried out when it wakes up. A caller about to write the same ranges again on a
    /// new connection waits until this one is closed, so that none of the old writes can
    /// land after the new ones. [`abort`](Self::abort) (or dropping the client) gives up
    /// waiting.
    pub fn hang_up_draining(&self) {
        {
            let mut st = lock(&self.shared.state);
            if st.lost.is_some() {
                // Already hung up (and maybe both halves shut): nothing more to drain.
                return;
            }
            st.draining = true;
        }
        self.shared.lose(ConnectionLost::Aborted);
    }

    /// Waits until the server can send nothing more on this connection (the reader saw
    /// it close, or the connection failed otherwise), for at most until `deadline`;
    /// whether it is closed.
    pub fn wait_closed(&self, deadline: Instant) -> bool {
        let st = lock(&self.shared.state);
        let left = deadline.saturating_duration_since(Instant::now());
        self.shared
            .changed
            .wait_timeout_while(st, left, |s| !s.reader_done)
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .reader_done
    }

    /// Whether the connection was lost (or aborted): every request on it fails.
    pub fn is_lost(&self) -> bool {
        lock(&self.shared.state).lost.is_some()
    }

    /// Waits for every request in flight, sends `DISC` and closes.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.close()
    }

    fn close(&mut self) -> Result<(), ClientError> {
        let Some(reader) = self.reader.take() else {
            return Ok(());
        };
        let (lost, disc) = {
            let mut st = lock(&self.shared.state);
            while st.session.in_flight() > 0 && st.lost.is_none() {
                st = wait(&self.shared.changed, st);
            }
            (st.lost.clone(), st.session.disconnect_header())
        };
        let result = if lost.is_none() {
            let mut w = lock(&self.shared.writer);
            let r = w.write_all(&disc).map_err(|source| {
                ClientError::Disconnected(Arc::new(ConnectionLost::Io {
                    during: "sending DISC".into(),
                    source,
                }))
            });
            let _ = w.shutdown(std::net::Shutdown::Both);
            r
        } else {
            // A connection still draining is given up: joining its reader must not wait
            // for a server that may never close.
            let _ = self.shared.control.shutdown(std::net::Shutdown::Both);
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

/// Moves `dst.len()` bytes of read data into `dst`: what `input` already holds, then the
/// rest straight from the socket.
fn fill(stream: &mut Stream, input: &mut BytesMut, dst: &mut [u8]) -> io::Result<()> {
    let have = input.len().min(dst.len());
    dst[..have].copy_from_slice(&input[..have]);
    input.advance(have);
    stream.read_exact(&mut dst[have..])
}

/// Reads replies until the connection ends, doing what the session says; returns why it
/// ended (the caller fails whatever is still in flight).
fn read_replies(shared: &Shared, stream: &mut Stream) -> ConnectionLost {
    let io = |during: &str, source| ConnectionLost::Io {
        during: during.to_string(),
        source,
    };
    let mut input = BytesMut::with_capacity(INPUT_CHUNK);
    loop {
        let step = {
            let mut st = lock(&shared.state);
            if st.lost.is_some() {
                return ConnectionLost::Aborted;
            }
            st.session.handle_input(&mut input)
        };
        match step {
            Err(e) => return ConnectionLost::Protocol(e),
            Ok(ReplyStep::NeedInput { min }) => {
                match stream.read_buf(&mut input, min.max(INPUT_CHUNK)) {
                    Ok(0) => return ConnectionLost::Closed,
                    Ok(_) => {}
                    Err(e) => return io("reading a reply", e),
                }
            }
            Ok(ReplyStep::Payload {
                cookie,
                offset,
                len,
            }) => {
                let mut buf = match lock(&shared.state).waiting.get_mut(&cookie) {
                    Some(Waiter::Read(_, b)) => std::mem::take(b),
                    _ => return ConnectionLost::ReaderStopped,
                };
                let filled = match offset
                    .checked_add(len)
                    .and_then(|end| buf.get_mut(offset..end))
                {
                    Some(dst) => fill(stream, &mut input, dst),
                    None => return ConnectionLost::ReaderStopped,
                };
                let mut st = lock(&shared.state);
                if let Some(Waiter::Read(_, b)) = st.waiting.get_mut(&cookie) {
                    *b = buf;
                }
                if let Err(e) = filled {
                    return io("reading READ data", e);
                }
                st.session.payload_received(len);
            }
            Ok(ReplyStep::Zeroes {
                cookie,
                offset,
                len,
            }) => {
                let mut st = lock(&shared.state);
                let dst = match st.waiting.get_mut(&cookie) {
                    Some(Waiter::Read(_, b)) => {
                        offset.checked_add(len).and_then(|e| b.get_mut(offset..e))
                    }
                    _ => None,
                };
                match dst {
                    Some(d) => d.fill(0),
                    None => return ConnectionLost::ReaderStopped,
                }
            }
            Ok(ReplyStep::Complete { cookie, result }) => {
                let w = lock(&shared.state).waiting.remove(&cookie);
                shared.changed.notify_all();
                match w {
                    Some(w) => {
                        if w.complete(result).is_err() {
                            return ConnectionLost::ReaderStopped;
                        }
                    }
                    None => return ConnectionLost::ReaderStopped,
                }
            }
        }
    }
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

    /// Hangs up every connection now (see [`Client::abort`]).
    pub fn abort(&self) {
        for c in &self.clients {
            c.abort();
        }
    }

    /// Hangs up every connection, waiting for the server to close them (see
    /// [`Client::hang_up_draining`]).
    pub fn hang_up_draining(&self) {
        for c in &self.clients {
            c.hang_up_draining();
        }
    }

    /// Waits until every connection is closed, at most until `deadline`; whether they
    /// all are (see [`Client::wait_closed`]).
    pub fn wait_closed(&self, deadline: Instant) -> bool {
        self.clients.iter().all(|c| c.wait_closed(deadline))
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn shared() -> Arc<Shared> {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let negotiated = ClientNegotiated {
            size: 1 << 20,
            flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
            structured_replies: true,
            base_allocation_id: None,
            block_size: BlockSize::default(),
        };
        Arc::new(Shared {
            writer: Mutex::new(Stream::Unix(ours.try_clone().unwrap())),
            control: Stream::Unix(ours),
            state: Mutex::new(State {
                session: ClientSession::new(negotiated, true),
                waiting: HashMap::new(),
                lost: None,
                draining: false,
                reader_done: false,
            }),
            changed: Condvar::new(),
            max_in_flight: 4,
        })
    }

    /// Waits for a ticket with a deadline, so that a ticket nobody completes fails the test
    /// instead of hanging it; true if it failed because the reader stopped.
    fn stopped<T: Send + 'static>(t: Ticket<T>) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(t.wait().err());
        });
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the ticket was never completed");
        matches!(e, Some(ClientError::Disconnected(ref l)) if matches!(**l, ConnectionLost::ReaderStopped))
    }

    /// A reader that panics (here while holding the state lock, which poisons it) still
    /// fails every request in flight, and later submissions fail instead of waiting.
    #[test]
    fn a_reader_that_panics_fails_every_waiting_request() {
        let shared = shared();
        let (unit, unit_ticket) = Promise::<()>::new();
        let (read, read_ticket) = Promise::<Bytes>::new();
        {
            let mut st = lock(&shared.state);
            let a = st.session.submit(ClientRequest::Flush).unwrap();
            st.waiting.insert(a.cookie, Waiter::Unit(unit));
            let b = st
                .session
                .submit(ClientRequest::Read {
                    offset: 0,
                    length: 4,
                })
                .unwrap();
            st.waiting
                .insert(b.cookie, Waiter::Read(read, BytesMut::zeroed(4)));
        }
        let s = shared.clone();
        let reader = thread::spawn(move || {
            let _guard = LoseOnExit {
                shared: &s,
                why: None,
            };
            let _held = lock(&s.state);
            panic!("a bug in the reply reader");
        });
        assert!(reader.join().is_err());
        assert!(stopped(unit_ticket));
        assert!(stopped(read_ticket));
        let st = lock(&shared.state);
        assert!(st.waiting.is_empty() && st.session.is_closed());
        assert!(st.lost.is_some());
    }

    /// Whatever drops the completing side of a ticket fails the ticket.
    #[test]
    fn a_dropped_promise_fails_its_ticket() {
        let (promise, ticket) = Promise::<Vec<BlockExtent>>::new();
        drop(promise);
        assert!(stopped(ticket));
    }
}
