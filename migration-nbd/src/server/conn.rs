//! One connection: the negotiation, then the request loop that reads and checks requests
//! and hands them to [`Conn::execute`](super::dispatch) inline or on worker threads.

use std::io::{self, IoSlice, Read};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;

use bytes::BytesMut;
use tracing::debug;

use super::Inner;
use crate::addr::Stream;
use crate::backend::{AlignedBuf, FileBackend};
use crate::handshake::{HandshakeError, ServerHandshake, ServerStep};
use crate::transmission::{
    FatalRequest, REQUEST_HEADER_LEN, Request, RequestHeader, Session, Verdict,
};
use crate::wire::WireError;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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

/// Negotiates, then serves requests until the client leaves.
pub(super) fn serve(inner: &Inner, mut stream: Stream) -> Result<(), ConnectionError> {
    let mut out = BytesMut::new();
    let mut hs = ServerHandshake::new(inner.infos.clone(), inner.config.handshake, &mut out);
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
    let export = &inner.exports[negotiated.export_index];
    let cfg = inner.config;
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

// ---------------------------------------------------------------------------------------
// Transmission driver.

/// Payload buffers of one connection. Never more than `cap` bytes are allocated, in use or
/// idle; `take` waits for a buffer to come back when a new one would go over.
pub(super) struct BufferPool {
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

    pub(super) fn take(&self, len: usize) -> AlignedBuf {
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

    pub(super) fn give(&self, b: AlignedBuf) {
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

/// One connection in transmission, shared by its reader and its workers.
pub(super) struct Conn {
    pub(super) backend: Arc<FileBackend>,
    pub(super) session: Session,
    pub(super) writer: Mutex<Stream>,
    pub(super) pool: BufferPool,
    pub(super) max_extents: usize,
}

/// A checked request ready to run, with its payload buffer.
pub(super) struct Job {
    pub(super) cookie: u64,
    pub(super) request: Request,
    pub(super) buf: Option<AlignedBuf>,
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
