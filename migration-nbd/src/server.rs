//! The NBD server: blocking drivers around [`ServerHandshake`] and [`Session`].
//!
//! Each connection has one thread that reads requests in the order they arrive and checks
//! them; requests are executed either on that thread or, with
//! [`ServerConfig::workers_per_connection`] > 0, by that many worker threads of the
//! connection, which reply as soon as they finish, so replies may come out of order.
//!
//! Memory is bounded per connection: every `READ` and `WRITE` payload lives in a buffer from
//! a pool that never holds more than [`ServerConfig::in_flight_bytes`]; when it is used up,
//! the reading thread stops reading the socket until a reply has been sent, so a client that
//! sends faster than it reads replies is slowed down by TCP, not buffered.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::{self, JoinHandle};

use bytes::BytesMut;
use tracing::{debug, info, warn};

use crate::addr::{Address, Listener, Stream};
use crate::backend::{AlignedBuf, DIRECT_ALIGN, FileBackend, ZeroError};
use crate::handshake::{ExportInfo, HandshakeError, HandshakeLimits, ServerHandshake, ServerStep};
use crate::proto::{self, NbdErrno, state, tflags};
use crate::transmission::{FatalRequest, Request, Session, Verdict};
use crate::wire::{
    self, BlockDescriptor, BlockSize, ChunkHeader, ChunkPayload, REQUEST_HEADER_LEN, RequestHeader,
    WireError,
};

/// One export to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Name clients ask for ("" is the default export).
    pub name: String,
    /// Raw file or block device.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Bypass the page cache for aligned I/O (`O_DIRECT`).
    pub direct: bool,
    /// Description shown to clients.
    pub description: String,
}

impl ExportConfig {
    /// A writable export of `path` named `name`.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> ExportConfig {
        ExportConfig {
            name: name.into(),
            path: path.into(),
            read_only: false,
            direct: false,
            description: String::new(),
        }
    }
}

/// Server tuning and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest `READ`/`WRITE` payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Bytes of request and reply payload one connection may hold at once.
    pub in_flight_bytes: usize,
    /// Worker threads per connection; 0 runs requests on the connection's thread.
    pub workers_per_connection: usize,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Limits of the negotiation phase.
    pub handshake: HandshakeLimits,
    /// Most extents in one `BLOCK_STATUS` reply.
    pub max_extents: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            in_flight_bytes: 2 * proto::DEFAULT_MAX_PAYLOAD as usize,
            workers_per_connection: 0,
            max_connections: 64,
            handshake: HandshakeLimits::default(),
            max_extents: 1 << 16,
        }
    }
}

/// A server that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An export's file cannot be opened.
    #[error("export {name:?}: cannot open {}: {source}", path.display())]
    Open {
        /// Export name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Two exports share a name.
    #[error("two exports are named {0:?}")]
    DuplicateExport(String),
    /// Limits that cannot work together.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The listening socket failed.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Why.
        source: io::Error,
    },
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The socket failed.
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
    /// Negotiation failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The client sent something that is not an NBD request.
    #[error("request stream: {0}")]
    Wire(#[from] WireError),
    /// The client sent a request that ends the connection.
    #[error(transparent)]
    Fatal(#[from] FatalRequest),
}

struct Export {
    info: ExportInfo,
    backend: Arc<FileBackend>,
}

struct Inner {
    exports: Vec<Export>,
    infos: Vec<ExportInfo>,
    config: ServerConfig,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, Stream>>,
    conns_changed: Condvar,
    next_id: AtomicU64,
}

/// An NBD server over a set of exports. Cheap to clone; clones share exports and
/// connections.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.inner.infos)
            .field("config", &self.inner.config)
            .finish()
    }
}

fn export_flags(read_only: bool) -> u16 {
    // One file shared by every connection through the kernel's page cache: a flush on one
    // connection covers writes completed on all of them, hence CAN_MULTI_CONN.
    let mut f =
        tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::CAN_MULTI_CONN | tflags::SEND_CACHE;
    if read_only {
        f |= tflags::READ_ONLY;
    } else {
        f |= tflags::SEND_FUA
            | tflags::SEND_TRIM
            | tflags::SEND_WRITE_ZEROES
            | tflags::SEND_FAST_ZERO;
    }
    f
}

impl Server {
    /// Opens every export's file and checks the configuration.
    pub fn new(exports: Vec<ExportConfig>, config: ServerConfig) -> Result<Server, ServerError> {
        if config.max_payload < 4096 {
            return Err(ServerError::Config(format!(
                "max_payload {} is below the preferred block size 4096",
                config.max_payload
            )));
        }
        if config.in_flight_bytes < config.max_payload as usize {
            return Err(ServerError::Config(format!(
                "in_flight_bytes {} cannot hold one request of max_payload {}",
                config.in_flight_bytes, config.max_payload
            )));
        }
        if config.max_extents == 0 {
            return Err(ServerError::Config("max_extents must be at least 1".into()));
        }
        let mut out = Vec::new();
        for e in exports {
            if out.iter().any(|x: &Export| x.info.name == e.name) {
                return Err(ServerError::DuplicateExport(e.name));
            }
            let backend = FileBackend::open(&e.path, e.read_only, e.direct).map_err(|source| {
                ServerError::Open {
                    name: e.name.clone(),
                    path: e.path.clone(),
                    source,
                }
            })?;
            let minimum = if e.direct { DIRECT_ALIGN as u32 } else { 1 };
            let info = ExportInfo {
                name: e.name.clone(),
                description: e.description.clone(),
                size: backend.size(),
                flags: export_flags(e.read_only),
                block_size: BlockSize {
                    minimum,
                    preferred: 4096,
                    maximum: config.max_payload,
                },
            };
            out.push(Export {
                info,
                backend: Arc::new(backend),
            });
        }
        let infos = out.iter().map(|e| e.info.clone()).collect();
        Ok(Server {
            inner: Arc::new(Inner {
                exports: out,
                infos,
                config,
                stop: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                conns_changed: Condvar::new(),
                next_id: AtomicU64::new(0),
            }),
        })
    }

    /// What clients are told about each export.
    pub fn exports(&self) -> &[ExportInfo] {
        &self.inner.infos
    }

    /// Accepts connections until [`ServerHandle::shutdown`] (or an accept error), one
    /// thread per connection.
    pub fn serve(&self, listener: &Listener) -> io::Result<()> {
        loop {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if self.inner.stop.load(Ordering::SeqCst) => {
                    debug!("accept ended by shutdown: {e}");
                    return Ok(());
                }
                Err(e) if is_transient_accept_error(&e) => {
                    warn!("accept: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if self.inner.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Replies are small and latency-bound, as the NBD protocol notes.
            let _ = stream.set_nodelay(true);
            let active = self.inner.conns.lock().expect("conns lock").len();
            if active >= self.inner.config.max_connections {
                warn!(
                    "refusing a connection: {active} connections already (limit {})",
                    self.inner.config.max_connections
                );
                continue;
            }
            let server = self.clone();
            let spawned = thread::Builder::new()
                .name("nbd-conn".into())
                .spawn(move || {
                    if let Err(e) = server.serve_connection(stream) {
                        info!("connection ended: {e}");
                    }
                });
            if let Err(e) = spawned {
                warn!("cannot start a connection thread: {e}");
            }
        }
    }

    /// Starts the accept loop on its own thread.
    pub fn spawn(&self, listener: Listener) -> io::Result<ServerHandle> {
        let address = listener.local_address()?;
        let listener = Arc::new(listener);
        let server = self.clone();
        let l = listener.clone();
        let thread = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                if let Err(e) = server.serve(&l) {
                    warn!("accept loop failed: {e}");
                }
            })?;
        Ok(ServerHandle {
            server: self.clone(),
            address,
            thread: Some(thread),
            _listener: listener,
        })
    }

    /// Serves one already-accepted connection on the calling thread until the client
    /// leaves. A VMM with its own accept loop can call this directly.
    pub fn serve_connection(&self, stream: Stream) -> Result<(), ConnectionError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .conns
            .lock()
            .expect("conns lock")
            .insert(id, stream.try_clone()?);
        let result = self.connection(stream);
        let mut conns = self.inner.conns.lock().expect("conns lock");
        if let Some(s) = conns.remove(&id) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.inner.conns_changed.notify_all();
        result
    }

    fn connection(&self, mut stream: Stream) -> Result<(), ConnectionError> {
        let mut out = BytesMut::new();
        let mut hs = ServerHandshake::new(
            self.inner.infos.clone(),
            self.inner.config.handshake,
            &mut out,
        );
        let mut input = BytesMut::new();
        let negotiated = loop {
            let step = hs.handle(&mut input, &mut out);
            if !out.is_empty() {
                std::io::Write::write_all(&mut stream, &out)?;
                out.clear();
            }
            match step? {
                ServerStep::NeedMore => {
                    // Read no more than the handshake asked for, which it has bounded.
                    let want = hs.wants(&input).saturating_sub(input.len()).max(1);
                    let mut chunk = vec![0u8; want.min(64 * 1024)];
                    let n = stream.read(&mut chunk)?;
                    if n == 0 {
                        debug!("client left during negotiation");
                        return Ok(());
                    }
                    input.extend_from_slice(&chunk[..n]);
                }
                ServerStep::Close => return Ok(()),
                ServerStep::Transmission(n) => break n,
            }
        };
        let export = &self.inner.exports[negotiated.export_index];
        let cfg = self.inner.config;
        let alignment = if negotiated.block_size_agreed {
            export.info.block_size.minimum
        } else {
            1
        };
        let session = Session {
            size: export.info.size,
            flags: negotiated.flags,
            structured_replies: negotiated.structured_replies,
            base_allocation_id: negotiated.base_allocation_id,
            alignment,
            max_payload: cfg.max_payload,
            max_drain: cfg.max_payload.saturating_mul(2),
        };
        debug!(
            "export {:?}: transmission, structured={} base_allocation={:?}",
            export.info.name, session.structured_replies, session.base_allocation_id
        );
        let conn = Arc::new(Conn {
            backend: export.backend.clone(),
            session,
            writer: Mutex::new(stream.try_clone()?),
            pool: BufferPool::new(cfg.in_flight_bytes),
            max_extents: cfg.max_extents,
        });
        let reader = InBuf::new(stream, &input);
        let result = run_transmission(conn.clone(), reader, cfg.workers_per_connection);
        let _ = conn
            .writer
            .lock()
            .expect("writer lock")
            .shutdown(std::net::Shutdown::Both);
        result
    }
}

/// Sends a reply header, telling TCP that data follows so it is not sent alone.
fn send_more(stream: &Stream, bytes: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        match rustix::net::send(
            stream,
            &bytes[done..],
            rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
        ) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Errors of the socket side of `sendfile` (the client went away), as opposed to errors
/// reading the file.
fn is_socket_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) | Some(libc::ESHUTDOWN)
    )
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED)
            | Some(libc::EMFILE)
            | Some(libc::ENFILE)
            | Some(libc::ENOBUFS)
            | Some(libc::ENOMEM)
    )
}

/// A running server started by [`Server::spawn`]; stops it when dropped.
#[derive(Debug)]
pub struct ServerHandle {
    server: Server,
    address: Address,
    thread: Option<JoinHandle<()>>,
    _listener: Arc<Listener>,
}

impl ServerHandle {
    /// Where the server listens (with the real port when 0 was asked).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The server.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Stops accepting, hangs up on every client and waits for the connections to end.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let inner = &self.server.inner;
        inner.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = crate::addr::connect(&self.address);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut conns = inner.conns.lock().expect("conns lock");
        for s in conns.values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        while !conns.is_empty() {
            conns = inner.conns_changed.wait(conns).expect("conns lock");
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Transmission driver.

/// Payload buffers of one connection. Never more than `cap` bytes are allocated, in use or
/// idle; `take` waits for a buffer to come back when a new one would go over.
struct BufferPool {
    state: Mutex<PoolState>,
    returned: Condvar,
    cap: usize,
}

struct PoolState {
    allocated: usize,
    free: Vec<AlignedBuf>,
}

impl BufferPool {
    fn new(cap: usize) -> BufferPool {
        BufferPool {
            state: Mutex::new(PoolState {
                allocated: 0,
                free: Vec::new(),
            }),
            returned: Condvar::new(),
            cap,
        }
    }

    fn take(&self, len: usize) -> AlignedBuf {
        // Round sizes up so that buffers get reused across slightly different lengths.
        let size = len.next_multiple_of(64 * 1024).min(self.cap.max(len));
        let mut s = self.state.lock().expect("pool lock");
        loop {
            if let Some(i) = s.free.iter().position(|b| b.capacity() >= len) {
                let mut b = s.free.swap_remove(i);
                b.set_len(len);
                return b;
            }
            if s.allocated + size <= self.cap {
                s.allocated += size;
                drop(s);
                let mut b = AlignedBuf::new(size);
                b.set_len(len);
                return b;
            }
            if let Some((i, _)) = s.free.iter().enumerate().max_by_key(|(_, b)| b.capacity()) {
                let b = s.free.swap_remove(i);
                s.allocated -= b.capacity();
                continue;
            }
            s = self.returned.wait(s).expect("pool lock");
        }
    }

    fn give(&self, b: AlignedBuf) {
        self.state.lock().expect("pool lock").free.push(b);
        self.returned.notify_one();
    }
}

/// Buffered reads of request headers, with payloads read straight into their buffers.
struct InBuf {
    stream: Stream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

/// Small on purpose: a `WRITE` payload goes straight from the socket into its buffer,
/// except for what the read that fetched its header already took in (at most this much,
/// copied once more); 4 KiB still holds over a hundred request headers.
const INBUF: usize = 4 * 1024;

impl InBuf {
    fn new(stream: Stream, leftover: &[u8]) -> InBuf {
        let mut buf = vec![0u8; INBUF.max(leftover.len())];
        buf[..leftover.len()].copy_from_slice(leftover);
        InBuf {
            stream,
            buf,
            pos: 0,
            end: leftover.len(),
        }
    }

    /// The next request header, or `None` when the client closed between requests.
    fn header(&mut self) -> io::Result<Option<[u8; REQUEST_HEADER_LEN]>> {
        while self.end - self.pos < REQUEST_HEADER_LEN {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            }
            let n = self.stream.read(&mut self.buf[self.end..])?;
            if n == 0 {
                if self.end == 0 {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed in the middle of a request header",
                ));
            }
            self.end += n;
        }
        let h = self.buf[self.pos..self.pos + REQUEST_HEADER_LEN]
            .try_into()
            .expect("28 bytes");
        self.pos += REQUEST_HEADER_LEN;
        Ok(Some(h))
    }

    fn payload(&mut self, out: &mut [u8]) -> io::Result<()> {
        let have = (self.end - self.pos).min(out.len());
        out[..have].copy_from_slice(&self.buf[self.pos..self.pos + have]);
        self.pos += have;
        self.stream.read_exact(&mut out[have..])
    }

    fn drain(&mut self, mut n: usize) -> io::Result<()> {
        let have = (self.end - self.pos).min(n);
        self.pos += have;
        n -= have;
        let mut scratch = vec![0u8; n.min(INBUF)];
        while n > 0 {
            let k = n.min(scratch.len());
            self.stream.read_exact(&mut scratch[..k])?;
            n -= k;
        }
        Ok(())
    }
}

struct Conn {
    backend: Arc<FileBackend>,
    session: Session,
    writer: Mutex<Stream>,
    pool: BufferPool,
    max_extents: usize,
}

struct Job {
    cookie: u64,
    request: Request,
    buf: Option<AlignedBuf>,
}

fn run_transmission(
    conn: Arc<Conn>,
    mut reader: InBuf,
    workers: usize,
) -> Result<(), ConnectionError> {
    let mut pool_threads = Vec::new();
    let sender = if workers > 0 {
        let (tx, rx) = mpsc::sync_channel::<Job>(64);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers {
            let rx = rx.clone();
            let conn = conn.clone();
            pool_threads.push(thread::Builder::new().name("nbd-worker".into()).spawn(
                move || {
                    loop {
                        let job = rx.lock().expect("job queue").recv();
                        let Ok(job) = job else { return };
                        if conn.execute(job).is_err() {
                            // The client is gone; the reader will notice too.
                            let _ = conn
                                .writer
                                .lock()
                                .expect("writer lock")
                                .shutdown(std::net::Shutdown::Both);
                        }
                    }
                },
            )?);
        }
        Some(tx)
    } else {
        None
    };
    let result = read_requests(&conn, &mut reader, sender.as_ref());
    drop(sender);
    // The protocol wants outstanding requests handled before the connection closes.
    for t in pool_threads {
        let _ = t.join();
    }
    result
}

fn read_requests(
    conn: &Conn,
    reader: &mut InBuf,
    sender: Option<&mpsc::SyncSender<Job>>,
) -> Result<(), ConnectionError> {
    loop {
        let Some(raw) = reader.header()? else {
            debug!("client closed the connection");
            return Ok(());
        };
        let header = RequestHeader::parse(&raw)?;
        let verdict = conn.session.check(&header)?;
        let job = match verdict {
            Verdict::Reject(r) => {
                reader.drain(r.drain as usize)?;
                debug!("rejecting request: {} ({})", r.message, r.error);
                let reply = conn.error_reply(header.cookie, r.error, &r.message);
                conn.send(&mut [IoSlice::new(&reply)])?;
                continue;
            }
            Verdict::Accept(Request::Disconnect) => {
                debug!("client sent DISC");
                return Ok(());
            }
            Verdict::Accept(request) => {
                let buf = match request {
                    // Only O_DIRECT reads need a buffer; the others use sendfile.
                    Request::Read { length, .. } if conn.backend.is_direct() => {
                        Some(conn.pool.take(length as usize))
                    }
                    Request::Write { length, .. } => {
                        let mut b = conn.pool.take(length as usize);
                        if let Err(e) = reader.payload(b.as_mut_slice()) {
                            conn.pool.give(b);
                            return Err(e.into());
                        }
                        Some(b)
                    }
                    _ => None,
                };
                Job {
                    cookie: header.cookie,
                    request,
                    buf,
                }
            }
        };
        match sender {
            Some(tx) => {
                if tx.send(job).is_err() {
                    return Err(io::Error::other("worker threads ended").into());
                }
            }
            None => conn.execute(job)?,
        }
    }
}

impl Conn {
    fn send(&self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        self.writer
            .lock()
            .expect("writer lock")
            .write_all_vectored(bufs)
    }

    fn error_reply(&self, cookie: u64, error: NbdErrno, message: &str) -> BytesMut {
        let mut out = BytesMut::new();
        if self.session.structured_replies {
            let mut message = message.to_string();
            if message.len() > proto::MAX_STRING {
                let mut cut = proto::MAX_STRING;
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                message.truncate(cut);
            }
            ChunkPayload::Error {
                error: error.0,
                message,
            }
            .encode_chunk(cookie, true, &mut out);
        } else {
            wire::encode_simple_reply(cookie, error.0, &mut out);
        }
        out
    }

    fn ok_or_error(&self, cookie: u64, what: &str, r: io::Result<()>) -> io::Result<()> {
        let reply = match r {
            Ok(()) => {
                let mut out = BytesMut::new();
                wire::encode_simple_reply(cookie, 0, &mut out);
                out
            }
            Err(e) => {
                let errno = NbdErrno::from_io(&e);
                warn!("{what} failed: {e}");
                self.error_reply(cookie, errno, &format!("{what}: {e}"))
            }
        };
        self.send(&mut [IoSlice::new(&reply)])
    }

    /// Runs one request and sends its reply; an error means the reply could not be sent.
    fn execute(&self, job: Job) -> io::Result<()> {
        let Job {
            cookie,
            request,
            buf,
        } = job;
        let b = &self.backend;
        match request {
            Request::Read { offset, length, df } => self.read(cookie, offset, length, df, buf),
            Request::Write {
                offset,
                length,
                fua,
            } => {
                let buf = buf.expect("write buffer");
                let r = b
                    .write_at(buf.as_slice(), offset)
                    .and_then(|()| if fua { b.flush() } else { Ok(()) });
                self.pool.give(buf);
                self.ok_or_error(cookie, &format!("WRITE offset {offset} length {length}"), r)
            }
            Request::Flush => self.ok_or_error(cookie, "FLUSH", b.flush()),
            Request::Trim {
                offset,
                length,
                fua,
            } => {
                let r = b
                    .trim(offset, length as u64)
                    .and_then(|()| if fua { b.flush() } else { Ok(()) });
                self.ok_or_error(cookie, &format!("TRIM offset {offset} length {length}"), r)
            }
            Request::Cache { offset, length } => self.ok_or_error(
                cookie,
                &format!("CACHE offset {offset} length {length}"),
                b.cache(offset, length as u64),
            ),
            Request::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast,
            } => match b.write_zeroes(offset, length as u64, no_hole, fast) {
                Err(ZeroError::NotFast) => {
                    let reply = self.error_reply(
                        cookie,
                        NbdErrno::ENOTSUP,
                        "WRITE_ZEROES: the filesystem cannot zero faster than writing",
                    );
                    self.send(&mut [IoSlice::new(&reply)])
                }
                Err(ZeroError::Io(e)) => self.ok_or_error(
                    cookie,
                    &format!("WRITE_ZEROES offset {offset} length {length}"),
                    Err(e),
                ),
                Ok(()) => {
                    self.ok_or_error(cookie, "WRITE_ZEROES", if fua { b.flush() } else { Ok(()) })
                }
            },
            Request::BlockStatus {
                offset,
                length,
                req_one,
            } => self.block_status(cookie, offset, length, req_one),
            Request::Disconnect => Ok(()),
        }
    }

    /// Where the data of a read lies: `(offset, length, is_hole)` runs covering the
    /// request, holes only when the reply can say so (structured, no `DF`).
    fn read_segments(&self, offset: u64, length: u32, holes: bool) -> Vec<(u64, u64, bool)> {
        let all_data = vec![(offset, length as u64, false)];
        if !holes || !self.backend.may_have_holes() {
            return all_data;
        }
        match self
            .backend
            .extents(offset, length as u64, 1 + length as usize / 512)
        {
            Ok(ext) if ext.iter().map(|e| e.length).sum::<u64>() == length as u64 => {
                ext.iter().map(|e| (e.offset, e.length, e.hole)).collect()
            }
            // No sparseness information, or the file changed under us: all data.
            _ => all_data,
        }
    }

    fn read(
        &self,
        cookie: u64,
        offset: u64,
        length: u32,
        df: bool,
        buf: Option<AlignedBuf>,
    ) -> io::Result<()> {
        let structured = self.session.structured_replies;
        if structured && length == 0 {
            let mut out = BytesMut::new();
            ChunkPayload::None.encode_chunk(cookie, true, &mut out);
            return self.send(&mut [IoSlice::new(&out)]);
        }
        let segments = self.read_segments(offset, length, structured && !df);
        match buf {
            None => self.read_sendfile(cookie, offset, length, &segments),
            Some(mut buf) => {
                let r = self.read_buffered(cookie, offset, length, &segments, &mut buf);
                self.pool.give(buf);
                r
            }
        }
    }

    /// Reads through a buffer (`O_DIRECT` exports).
    fn read_buffered(
        &self,
        cookie: u64,
        offset: u64,
        length: u32,
        segments: &[(u64, u64, bool)],
        buf: &mut AlignedBuf,
    ) -> io::Result<()> {
        let data = buf.as_mut_slice();
        for &(o, l, hole) in segments {
            if hole {
                continue;
            }
            let at = (o - offset) as usize;
            if let Err(e) = self.backend.read_at(&mut data[at..at + l as usize], o) {
                warn!("READ offset {offset} length {length} failed: {e}");
                let reply = self.error_reply(
                    cookie,
                    NbdErrno::from_io(&e),
                    &format!("READ offset {offset} length {length}: {e}"),
                );
                return self.send(&mut [IoSlice::new(&reply)]);
            }
        }
        let mut heads = BytesMut::new();
        if !self.session.structured_replies {
            wire::encode_simple_reply(cookie, 0, &mut heads);
            return self.send(&mut [IoSlice::new(&heads), IoSlice::new(buf.as_slice())]);
        }
        for (i, &(o, l, hole)) in segments.iter().enumerate() {
            let done = i + 1 == segments.len();
            if hole {
                ChunkPayload::OffsetHole {
                    offset: o,
                    length: l as u32,
                }
                .encode_chunk(cookie, done, &mut heads);
            } else {
                ChunkHeader {
                    flags: if done { proto::REPLY_FLAG_DONE } else { 0 },
                    kind: proto::chunk::OFFSET_DATA,
                    cookie,
                    length: 8 + l as u32,
                }
                .encode(&mut heads);
                bytes::BufMut::put_u64(&mut heads, o);
            }
        }
        let data = buf.as_slice();
        let mut slices = Vec::with_capacity(segments.len() * 2);
        let mut hpos = 0;
        for &(o, l, hole) in segments {
            let hlen = wire::CHUNK_HEADER_LEN + if hole { 12 } else { 8 };
            slices.push(IoSlice::new(&heads[hpos..hpos + hlen]));
            hpos += hlen;
            if !hole {
                let at = (o - offset) as usize;
                slices.push(IoSlice::new(&data[at..at + l as usize]));
            }
        }
        self.send(&mut slices)
    }

    /// Reads with `sendfile`: file pages go to the socket without a copy through this
    /// process. A data chunk cannot be marked final before all of it is sent (an error
    /// could still happen), so a `NONE` chunk ends the reply.
    fn read_sendfile(
        &self,
        cookie: u64,
        offset: u64,
        length: u32,
        segments: &[(u64, u64, bool)],
    ) -> io::Result<()> {
        let mut w = self.writer.lock().expect("writer lock");
        let mut head = BytesMut::new();
        if !self.session.structured_replies {
            wire::encode_simple_reply(cookie, 0, &mut head);
            send_more(&w, &head)?;
            let sent = self.backend.send_to(&*w, offset, length as u64)?;
            if sent < length as u64 {
                // A simple reply cannot report an error after its header: hang up, as
                // the protocol says.
                return Err(io::Error::other(format!(
                    "READ offset {offset} length {length}: file ended after {sent} bytes"
                )));
            }
            return Ok(());
        }
        let mut failed = None;
        for &(o, l, hole) in segments {
            head.clear();
            if hole {
                ChunkPayload::OffsetHole {
                    offset: o,
                    length: l as u32,
                }
                .encode_chunk(cookie, false, &mut head);
                send_more(&w, &head)?;
                continue;
            }
            ChunkHeader {
                flags: 0,
                kind: proto::chunk::OFFSET_DATA,
                cookie,
                length: 8 + l as u32,
            }
            .encode(&mut head);
            bytes::BufMut::put_u64(&mut head, o);
            send_more(&w, &head)?;
            let sent = match self.backend.send_to(&*w, o, l) {
                Ok(n) => n,
                Err(e) if is_socket_error(&e) => return Err(e),
                Err(e) => {
                    failed = Some((o, e));
                    0
                }
            };
            if sent < l {
                // The chunk must be completed: pad it, then report the error.
                let zeroes = vec![0u8; (l - sent).min(1 << 20) as usize];
                let mut left = l - sent;
                while left > 0 {
                    let n = left.min(zeroes.len() as u64) as usize;
                    std::io::Write::write_all(&mut *w, &zeroes[..n])?;
                    left -= n as u64;
                }
                if failed.is_none() {
                    failed = Some((
                        o + sent,
                        io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than export"),
                    ));
                }
            }
        }
        head.clear();
        match failed {
            None => ChunkPayload::None.encode_chunk(cookie, true, &mut head),
            Some((at, e)) => {
                warn!("READ offset {offset} length {length} failed at {at}: {e}");
                ChunkPayload::ErrorOffset {
                    error: NbdErrno::from_io(&e).0,
                    message: format!("READ failed at offset {at}: {e}"),
                    offset: at,
                }
                .encode_chunk(cookie, true, &mut head)
            }
        }
        std::io::Write::write_all(&mut *w, &head)
    }

    fn block_status(&self, cookie: u64, offset: u64, length: u32, req_one: bool) -> io::Result<()> {
        let max = if req_one { 1 } else { self.max_extents };
        let ext = match self.backend.extents(offset, length as u64, max) {
            Ok(e) if !e.is_empty() => e,
            Ok(_) => {
                let reply = self.error_reply(
                    cookie,
                    NbdErrno::EINVAL,
                    "BLOCK_STATUS: empty range at the end of the export",
                );
                return self.send(&mut [IoSlice::new(&reply)]);
            }
            Err(e) => {
                let reply = self.error_reply(
                    cookie,
                    NbdErrno::from_io(&e),
                    &format!("BLOCK_STATUS offset {offset} length {length}: {e}"),
                );
                return self.send(&mut [IoSlice::new(&reply)]);
            }
        };
        let descriptors = ext
            .iter()
            .map(|e| BlockDescriptor {
                // Extents lie inside the request, whose length fits in 32 bits.
                length: e.length as u32,
                flags: if e.hole { state::HOLE | state::ZERO } else { 0 },
            })
            .collect();
        let mut out = BytesMut::new();
        ChunkPayload::BlockStatus {
            context_id: self.session.base_allocation_id.unwrap_or(0),
            descriptors,
        }
        .encode_chunk(cookie, true, &mut out);
        self.send(&mut [IoSlice::new(&out)])
    }
}
