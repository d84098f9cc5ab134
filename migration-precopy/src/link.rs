//! The source's side of the connection: a writer thread that overlaps sending with encoding,
//! the return-path reader thread, and cancellation.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use migration_core::stream::{DecoderOptions, Frame, ReturnDecoder, ReturnRecord, StreamError};
use migration_core::transport::{Channel, ChannelCounters, Connection};

/// Cancels a migration from any thread, or asks it to switch to post-copy.
///
/// [`cancel`](Self::cancel) sets a flag the engine checks between page batches and shuts
/// the connection down, so that a write or read blocked on the network returns at once.
/// The engine then resumes the guest on the source.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

/// Shuts down the connection of the migration being cancelled.
type Breaker = Box<dyn Fn() + Send>;

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    handover: AtomicBool,
    breaker: Mutex<Option<Breaker>>,
}

impl std::fmt::Debug for CancelInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelInner")
            .field("cancelled", &self.cancelled)
            .finish_non_exhaustive()
    }
}

impl CancelToken {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the migration to stop. Idempotent.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        if let Ok(b) = self.inner.breaker.lock() {
            if let Some(b) = b.as_ref() {
                b();
            }
        }
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Asks a running pre-copy to hand over to post-copy at its next decision (QEMU's
    /// `migrate_start_postcopy`): [`migrate`](crate::migrate) then returns
    /// [`SourceOutcome::LimitReached`](crate::SourceOutcome::LimitReached). Idempotent.
    pub fn request_handover(&self) {
        self.inner.handover.store(true, Ordering::SeqCst);
    }

    /// Whether [`request_handover`](Self::request_handover) was called.
    pub fn handover_requested(&self) -> bool {
        self.inner.handover.load(Ordering::SeqCst)
    }

    /// Registers the connection to shut down on cancel (a clone of it); if the token was
    /// cancelled already, shuts it down now.
    pub(crate) fn attach<C: Connection>(&self, s: &C) -> io::Result<()> {
        let clone = s.try_clone()?;
        let mut slot = self.inner.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_cancelled() {
            let _ = clone.shutdown(Shutdown::Both);
        }
        *slot = Some(Box::new(move || {
            let _ = clone.shutdown(Shutdown::Both);
        }));
        Ok(())
    }

    pub(crate) fn detach(&self) {
        let mut slot = self.inner.breaker.lock().unwrap_or_else(|e| e.into_inner());
        *slot = None;
    }
}

/// Buffers in circulation between the encoder and the writer thread: one being filled, one
/// being written, one queued. Bounds the source's memory to three batches.
const BUFFERS: usize = 3;

/// Sends filled buffers on a writer thread so that encoding the next batch overlaps the
/// system call that sends this one.
pub(crate) struct Sender<C> {
    to_writer: Option<SyncSender<BytesMut>>,
    back: Receiver<Result<BytesMut, io::Error>>,
    free: Vec<BytesMut>,
    in_flight: usize,
    thread: Option<JoinHandle<Channel<C>>>,
    counters: Arc<ChannelCounters>,
    busy_ns: Arc<AtomicU64>,
    failed: Option<io::ErrorKind>,
}

impl<C: Connection> Sender<C> {
    pub(crate) fn new(channel: Channel<C>, buf_capacity: usize) -> io::Result<Sender<C>> {
        let counters = channel.counters();
        let (to_writer, rx) = mpsc::sync_channel::<BytesMut>(BUFFERS);
        let (back_tx, back) = mpsc::sync_channel(BUFFERS);
        let busy_ns = Arc::new(AtomicU64::new(0));
        let busy = busy_ns.clone();
        let thread = std::thread::Builder::new()
            .name("precopy-send".into())
            .spawn(move || {
                let mut ch = channel;
                for mut buf in rx {
                    let t = Instant::now();
                    let r = ch.write_all(&buf);
                    busy.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    let r = r.map(|()| {
                        buf.clear();
                        buf
                    });
                    let failed = r.is_err();
                    if back_tx.send(r).is_err() || failed {
                        break;
                    }
                }
                let _ = ch.flush();
                ch
            })?;
        Ok(Sender {
            to_writer: Some(to_writer),
            back,
            free: (0..BUFFERS)
                .map(|_| BytesMut::with_capacity(buf_capacity))
                .collect(),
            in_flight: 0,
            thread: Some(thread),
            counters,
            busy_ns,
            failed: None,
        })
    }

    /// Time the writer thread spent writing (including rate-limit waits): the link's
    /// bandwidth is bytes over this, not over wall time, which would measure how fast the
    /// encoder produced bytes whenever the link was not the bottleneck.
    pub(crate) fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    /// Bytes the kernel accepted so far.
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.counters.sent()
    }

    fn collect_one(&mut self) -> io::Result<()> {
        match self.back.recv() {
            Ok(Ok(buf)) => {
                self.in_flight -= 1;
                self.free.push(buf);
                Ok(())
            }
            Ok(Err(e)) => {
                self.in_flight -= 1;
                self.failed = Some(e.kind());
                Err(e)
            }
            Err(_) => Err(self.dead()),
        }
    }

    fn dead(&mut self) -> io::Error {
        let kind = *self.failed.get_or_insert(io::ErrorKind::BrokenPipe);
        io::Error::new(kind, "the connection failed earlier")
    }

    /// An empty buffer to fill; waits for the writer to hand one back if all are out.
    pub(crate) fn buffer(&mut self) -> io::Result<BytesMut> {
        if self.failed.is_some() {
            return Err(self.dead());
        }
        while self.free.is_empty() {
            self.collect_one()?;
        }
        Ok(self.free.pop().unwrap_or_default())
    }

    /// Queues `buf` for writing.
    pub(crate) fn send(&mut self, buf: BytesMut) -> io::Result<()> {
        if self.failed.is_some() {
            return Err(self.dead());
        }
        if buf.is_empty() {
            self.free.push(buf);
            return Ok(());
        }
        let tx = self.to_writer.as_ref().ok_or_else(|| self.failed_err())?;
        if tx.send(buf).is_err() {
            return Err(self.dead());
        }
        self.in_flight += 1;
        Ok(())
    }

    fn failed_err(&self) -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "sender closed")
    }

    /// Waits until everything queued was accepted by the kernel.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while self.in_flight > 0 {
            self.collect_one()?;
        }
        if self.failed.is_some() {
            return Err(self.dead());
        }
        Ok(())
    }

    /// Flushes, stops the writer thread and hands back the channel.
    pub(crate) fn into_channel(mut self) -> io::Result<Channel<C>> {
        self.flush()?;
        self.to_writer = None;
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .ok_or_else(|| io::Error::other("the writer thread panicked"))
    }
}

impl<C> Drop for Sender<C> {
    fn drop(&mut self) {
        self.to_writer = None;
        // Unblock the writer if the receiver side is gone; it exits when its queue drains
        // or its write fails (the engine shuts the stream down before dropping on errors).
        // The writer ends once its queue is written, or at once when the engine shut the
        // connection down (every error path does); it is not joined here so that a peer
        // that stopped reading cannot hang the caller.
        drop(self.thread.take());
    }
}

/// What the return-path reader thread reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReturnEvent {
    /// A record from the destination.
    Record(ReturnRecord),
    /// The return path ended: `None` after its last record (a verdict), otherwise why it
    /// broke.
    Closed(Option<ReturnPathError>),
}

/// How the return path ended before its last record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReturnPathError {
    /// The destination closed it.
    #[error("the destination closed the return path without a verdict")]
    Closed,
    /// Reading it failed.
    #[error("reading the return path: {0}")]
    Io(#[source] io::Error),
    /// What arrived is not a valid return path.
    #[error("{0}")]
    Stream(#[source] StreamError),
    /// The reader thread stopped without saying why.
    #[error("the return-path reader stopped")]
    ReaderGone,
}

/// The return path: a thread reading the destination's records from a clone of the
/// connection and passing them on.
#[derive(Debug)]
pub struct ReturnPath {
    rx: Receiver<ReturnEvent>,
    thread: Option<JoinHandle<()>>,
    closed: bool,
}

impl ReturnPath {
    /// Starts reading `stream` (a clone of the migration connection) on its own thread.
    /// The header must carry `vm_id`; bitmaps and page requests are checked against
    /// `page_count`.
    pub fn start<C: Connection>(
        stream: C,
        vm_id: [u8; 16],
        page_count: u64,
    ) -> io::Result<ReturnPath> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("precopy-return".into())
            .spawn(move || read_returns(stream, vm_id, page_count, tx))?;
        Ok(ReturnPath {
            rx,
            thread: Some(thread),
            closed: false,
        })
    }

    /// The next event if one is ready.
    pub fn try_next(&mut self) -> Option<ReturnEvent> {
        if self.closed {
            return None;
        }
        match self.rx.try_recv() {
            Ok(e) => {
                self.closed |= matches!(e, ReturnEvent::Closed(_));
                Some(e)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.closed = true;
                Some(ReturnEvent::Closed(Some(ReturnPathError::ReaderGone)))
            }
        }
    }

    /// The next event, waiting at most `timeout` (`None`: forever). `None` on timeout or
    /// once the path is closed and drained.
    pub fn next(&mut self, timeout: Option<Duration>) -> Option<ReturnEvent> {
        if self.closed {
            return None;
        }
        let r = match timeout {
            Some(t) => self.rx.recv_timeout(t),
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match r {
            Ok(e) => {
                self.closed |= matches!(e, ReturnEvent::Closed(_));
                Some(e)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Some(ReturnEvent::Closed(Some(ReturnPathError::ReaderGone)))
            }
        }
    }
}

impl Drop for ReturnPath {
    fn drop(&mut self) {
        // The reader thread ends when the connection is shut down or closed by the peer
        // (the engine shuts it down on every path that does not hand it on; whoever takes
        // a hand-over does the same when done). It is not joined: a peer that keeps the
        // connection open must not hang the caller.
        drop(self.thread.take());
    }
}

fn read_returns<C: Read>(
    mut s: C,
    vm_id: [u8; 16],
    page_count: u64,
    tx: mpsc::Sender<ReturnEvent>,
) {
    let mut dec = ReturnDecoder::new(DecoderOptions {
        expected_vm: Some(vm_id),
        page_count: Some(page_count),
        ..DecoderOptions::default()
    });
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(Frame::Header(_))) => {}
                Ok(Some(Frame::Record(r))) => {
                    let end = r.is_terminal();
                    if tx.send(ReturnEvent::Record(r)).is_err() {
                        return;
                    }
                    if end {
                        let _ = tx.send(ReturnEvent::Closed(None));
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(ReturnEvent::Closed(Some(ReturnPathError::Stream(e))));
                    return;
                }
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                // No verdict came (it would have ended the loop above).
                let why = match dec.finish(&buf) {
                    Ok(()) => ReturnPathError::Closed,
                    Err(e) => ReturnPathError::Stream(e),
                };
                let _ = tx.send(ReturnEvent::Closed(Some(why)));
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(ReturnEvent::Closed(Some(ReturnPathError::Io(e))));
                return;
            }
        }
    }
}
