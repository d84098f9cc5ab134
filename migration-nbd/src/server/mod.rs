//! The NBD server: blocking drivers around [`ServerHandshake`] and [`Session`], split by
//! concern: what to serve (`config`), accepting and tracking connections (here), one
//! connection's negotiation and request loop (`conn`), and running requests against the
//! backend and replying (`dispatch`).
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
//!
//! [`ServerHandshake`]: crate::handshake::ServerHandshake
//! [`Session`]: crate::transmission::Session

mod config;
mod conn;
mod dispatch;

pub use config::{ExportConfig, ServerConfig, ServerError};
pub use conn::ConnectionError;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

use tracing::{debug, info, warn};

use crate::addr::{Address, Listener, Stream};
use crate::backend::{DIRECT_ALIGN, FileBackend};
use crate::handshake::{BlockSize, ExportInfo};

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

impl Server {
    /// Opens every export's file and checks the configuration.
    pub fn new(exports: Vec<ExportConfig>, config: ServerConfig) -> Result<Server, ServerError> {
        if config.max_payload < 4096 {
            return Err(ServerError::Config(format!(
                "max_payload {} is below the preferred block size 4096",
                config.max_payload
            )));
        }
        if config.max_payload > u32::MAX - 8 {
            // A data chunk's length field holds the payload and its 8-byte offset.
            return Err(ServerError::Config(format!(
                "max_payload {} does not fit a structured reply chunk",
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
                flags: config::export_flags(e.read_only),
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
        let result = conn::serve(&self.inner, stream);
        let mut conns = self.inner.conns.lock().expect("conns lock");
        if let Some(s) = conns.remove(&id) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.inner.conns_changed.notify_all();
        result
    }
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
