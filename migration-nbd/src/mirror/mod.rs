//! The mirror job: copies a disk into an NBD export while the guest keeps writing, until
//! the export is in sync, then keeps it in sync until completed or cancelled.
//!
//! [`machine::MirrorMachine`] decides everything (which clusters, when ready, when to
//! reconnect); [`MirrorJob`] is its threaded driver: one thread reads the source and
//! submits copies over a [`ClientPool`] (several connections when the export offers
//! multi-conn, many requests in flight on each), one waits for the replies in order and
//! reports them. A VMM's block layer tells the job about every guest write through
//! [`MirrorHandle`] (`note_write` after the source holds it) or writes through a
//! [`MirroredDisk`], which also writes the target before returning in write-blocking
//! mode.

// The errors are made on the cold path (a job fails once) and carry the client's error
// whole, offset and length included; boxing them would only hide that.
#![allow(clippy::result_large_err)]

pub mod machine;
pub mod persistent;
mod source;

pub use machine::{
    Action, ConfigError, CopyMode, CopyOutcome, Failure, MirrorConfig, MirrorEvent, MirrorMachine,
    MirrorStats, OpId, Phase, Rates, Stalled, StateError, WriteId, WriteStart,
};
pub use persistent::{BitmapFileError, BitmapInfo, PersistentBitmap};
pub use source::{BlockBackend, MEMORY_BLOCK, MemoryDisk};

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::addr::Address;
use crate::backend::Extent;
use crate::client::{ClientError, ClientOptions, ClientPool, Ticket, ZeroFlags};

/// Where the mirror writes and how.
#[derive(Clone)]
pub struct MirrorOptions {
    /// The job's settings (granularity, in-flight limits, mode, reconnection window...).
    pub config: MirrorConfig,
    /// Export name on the target.
    pub export: String,
    /// Connections to open when the export offers multi-conn.
    pub connections: usize,
    /// Client settings of each connection.
    pub client: ClientOptions,
    /// Called with every progress event, on the job's thread (keep it short).
    pub progress: Option<ProgressFn>,
    /// Copy only these clusters (of `config.granularity` bytes) in the first pass: the
    /// target holds an older copy and the rest is the same there (an incremental copy,
    /// from a [`PersistentBitmap`]). `None`: copy the whole disk.
    pub incremental: Option<migration_core::bitmap::DirtyBitmap>,
}

/// A progress callback (see [`MirrorOptions::progress`]).
pub type ProgressFn = Arc<dyn Fn(&MirrorEvent) + Send + Sync>;

impl std::fmt::Debug for MirrorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorOptions")
            .field("config", &self.config)
            .field("export", &self.export)
            .field("connections", &self.connections)
            .field("client", &self.client)
            .field("progress", &self.progress.is_some())
            .field("incremental", &self.incremental.as_ref().map(|b| b.count()))
            .finish()
    }
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            config: MirrorConfig::default(),
            export: String::new(),
            connections: 4,
            client: ClientOptions::default(),
            progress: None,
            incremental: None,
        }
    }
}

/// Why a mirror failed or a call on it was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// The settings cannot work.
    #[error("mirror settings: {0}")]
    Config(#[from] ConfigError),
    /// The target could not be reached at the start.
    #[error("cannot reach the mirror target {target}: {source}")]
    Connect {
        /// Target address and export.
        target: String,
        /// Why.
        source: ClientError,
    },
    /// The target cannot hold the source; refused before copying anything.
    #[error(
        "target {target} has {target_size} bytes, the source needs {source_size}; nothing was copied"
    )]
    TargetTooSmall {
        /// Target address and export.
        target: String,
        /// Its size.
        target_size: u64,
        /// The source's size.
        source_size: u64,
    },
    /// The target export is read-only.
    #[error("target {target} is read-only")]
    ReadOnlyTarget {
        /// Target address and export.
        target: String,
    },
    /// The target refused a copy (`ENOSPC`, `EIO`...).
    #[error("the target failed the copy of offset {offset} length {len}: {source}")]
    Target {
        /// Offset of the copy.
        offset: u64,
        /// Its length.
        len: u64,
        /// The request's error.
        source: ClientError,
    },
    /// The target failed a flush.
    #[error("the target failed a flush: {source}")]
    Flush {
        /// The request's error.
        source: ClientError,
    },
    /// Reading the source failed.
    #[error("reading the source at offset {offset} length {len}: {source}")]
    Source {
        /// Offset of the read.
        offset: u64,
        /// Its length.
        len: u64,
        /// The error of the source.
        source: Arc<io::Error>,
    },
    /// The target stayed unreachable for the whole reconnection window.
    #[error("the mirror target {target} stayed unreachable for {window:?} ({attempts} attempts to reconnect){}{}", last.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default(), if *hung_open > 0 { format!("; {hung_open} connections to it stopped answering and were never closed by it (copying again on new ones could let their old writes land last)") } else { String::new() })]
    TargetUnreachable {
        /// Target address and export.
        target: String,
        /// The window.
        window: Duration,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: Option<ClientError>,
        /// Connections hung up for the reply timeout that the target had still not
        /// closed at the end.
        hung_open: usize,
    },
    /// The target came back smaller than the source.
    #[error("target {target} came back with {target_size} bytes, the source needs {source_size}")]
    TargetShrank {
        /// Target address and export.
        target: String,
        /// Its size.
        target_size: u64,
        /// The source's size.
        source_size: u64,
    },
    /// The mirror was not ready within the deadline (it goes on: cancel it or wait more).
    #[error("the mirror was not ready after {waited:?} ({phase}, {dirty_bytes} bytes dirty): the guest dirties {:.1} MiB/s, the copy moves {:.1} MiB/s", dirty_rate / 1048576.0, copy_rate / 1048576.0)]
    ReadyDeadline {
        /// Time waited.
        waited: Duration,
        /// Phase at the deadline.
        phase: Phase,
        /// Bytes dirty at the deadline.
        dirty_bytes: u64,
        /// Dirty rate, bytes per second.
        dirty_rate: f64,
        /// Copy rate, bytes per second.
        copy_rate: f64,
    },
    /// A call the job's phase does not allow.
    #[error(transparent)]
    State(#[from] StateError),
    /// The job ended (cancelled or failed) before the call could succeed.
    #[error("the mirror ended {0} before this call")]
    Ended(Phase),
    /// A thread of the job could not be started.
    #[error("starting a mirror thread: {0}")]
    Thread(Arc<io::Error>),
}

/// What a cancelled mirror left behind.
#[derive(Debug, Clone)]
pub struct Cancelled {
    /// Phase when cancelled.
    pub phase: Phase,
    /// Counters at the end.
    pub stats: MirrorStats,
}

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mirror cancelled while {}: the source is untouched; the target is left as it \
             is, {} bytes still dirty, not a copy to use",
            self.phase, self.stats.dirty_bytes
        )
    }
}

/// Longest wait, per reconnection attempt, for the target to close connections hung up
/// for the reply timeout.
const DRAIN_SLICE: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_connection(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Disconnected(_) | ClientError::Connect { .. } | ClientError::Handshake { .. }
    )
}

struct Inner {
    m: MirrorMachine,
    /// The error behind a failed job.
    error: Option<MirrorError>,
    /// The driver waits for an event with no timer.
    idle: bool,
    /// Incremented at each reconnection: reports from older connections are stale.
    generation: u64,
    last_connect_error: Option<ClientError>,
    /// The phase when `cancel` was called.
    cancelled_in: Option<Phase>,
    /// Connections hung up because the target stopped answering, until the target closes
    /// them: a server that wakes up may still carry out the writes it holds, so nothing is
    /// copied on a new connection before they are closed.
    hung: Vec<Arc<ClientPool>>,
}

struct Shared {
    state: Mutex<Inner>,
    changed: Condvar,
    source: Arc<dyn BlockBackend>,
    target: RwLock<Option<(u64, Arc<ClientPool>)>>,
    addr: Address,
    opts: MirrorOptions,
    name: String,
}

enum Pending {
    Copy {
        generation: u64,
        op: OpId,
        offset: u64,
        len: u64,
        tickets: Vec<Ticket<()>>,
        outcome: CopyOutcome,
    },
    Flush {
        generation: u64,
        op: OpId,
        ticket: Option<Ticket<()>>,
    },
}

fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

impl Shared {
    fn pool(&self) -> Option<(u64, Arc<ClientPool>)> {
        self.target
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Retires the connections in use: reports about them are stale from now on.
    fn retire(&self, st: &mut Inner) -> Option<Arc<ClientPool>> {
        st.generation += 1;
        self.target
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map(|(_, pool)| pool)
    }

    /// A connection of `generation` failed: unless it was replaced already, hang it up
    /// and let the machine requeue what was in flight.
    fn lost(&self, st: &mut Inner, generation: u64, why: &ClientError) {
        if generation != st.generation {
            return;
        }
        if let Some(pool) = self.retire(st) {
            // Nothing of the old connections may be sent after the ranges are copied
            // again on new ones.
            pool.abort();
        }
        warn!("mirror target {}: connection lost: {why}", self.name);
        st.m.handle_connection_lost(Instant::now());
        self.changed.notify_all();
    }

    /// The machine found the target hung (it requeued what was in flight already): hang
    /// up, failing whatever waits on it, and keep the connections until the target
    /// closes them.
    fn stalled(&self, st: &mut Inner, s: Stalled) {
        warn!(
            "mirror target {}: no answer for {:?} with {} requests waiting; hanging up",
            self.name, s.waited, s.unanswered
        );
        if let Some(pool) = self.retire(st) {
            pool.hang_up_draining();
            st.hung.push(pool);
        }
        self.changed.notify_all();
    }

    /// Waits for `t`, checking the machine's reply timeout meanwhile: the thread that
    /// submits may be stuck sending to a target that stopped reading, so this one must
    /// be the one to notice.
    fn watch<T>(&self, t: Ticket<T>) -> Result<T, ClientError> {
        loop {
            let deadline = lock(&self.state).m.reply_deadline();
            // No deadline: the connection is lost or replaced already, and the ticket
            // fails or completes without waiting on the target.
            let Some(deadline) = deadline else {
                return t.wait();
            };
            if t.wait_until(deadline) {
                return t.wait();
            }
            let mut st = lock(&self.state);
            if let Some(s) = st.m.poll_timeout(Instant::now()) {
                self.stalled(&mut st, s);
            }
        }
    }

    /// Before connecting again: whether every connection hung up for the reply timeout is
    /// closed by the target now, waiting at most until `deadline`.
    fn hung_closed(&self, deadline: Instant) -> bool {
        let hung = std::mem::take(&mut lock(&self.state).hung);
        let open: Vec<_> = hung
            .into_iter()
            .filter(|p| !p.wait_closed(deadline))
            .collect();
        let closed = open.is_empty();
        lock(&self.state).hung.extend(open);
        closed
    }

    fn fail_op(&self, st: &mut Inner, op: OpId, e: MirrorError) {
        if st.m.handle_op_failed(op).is_some() && st.error.is_none() {
            st.error = Some(e);
        }
        self.changed.notify_all();
    }

    fn emit(&self, events: Vec<MirrorEvent>) {
        if let Some(p) = &self.opts.progress {
            for e in &events {
                p(e);
            }
        }
    }

    /// Runs one copy: reads the source's allocation and data, submits writes and zeroes.
    fn copy(
        &self,
        (generation, pool): (u64, &ClientPool),
        op: OpId,
        (offset, len): (u64, u64),
        target_zero: bool,
        buf: &mut Vec<u8>,
        known: &mut KnownData,
    ) -> Result<Pending, CopyFailure> {
        let src_err = |source| {
            CopyFailure::Source(MirrorError::Source {
                offset,
                len,
                source: Arc::new(source),
            })
        };
        let client = pool.pick();
        let mut tickets = Vec::new();
        let mut outcome = CopyOutcome::default();
        let end = offset + len;
        let mut pos = offset;
        let zero = |at: u64, n: u64, tickets: &mut Vec<Ticket<()>>| -> Result<(), ClientError> {
            if client.can_zero() {
                tickets.push(client.submit_write_zeroes(at, n as u32, ZeroFlags::default())?);
            } else {
                tickets.push(client.submit_write(at, &vec![0u8; n as usize], false)?);
            }
            Ok(())
        };
        while pos < end {
            let e = match known.data_at(pos) {
                Some(e) => e,
                None => {
                    let e = self.source.run_at(pos).map_err(src_err)?;
                    let e = source::run_or_data(pos, end - pos, Some(e));
                    known.remember(e);
                    e
                }
            };
            let n = e.length.min(end - e.offset);
            if e.hole {
                outcome.holes += n;
                if !target_zero {
                    outcome.zeroed += n;
                    zero(e.offset, n, &mut tickets).map_err(CopyFailure::Client)?;
                }
            } else {
                buf.resize(n as usize, 0);
                self.source.read_at(buf, e.offset).map_err(src_err)?;
                if is_zero(buf) {
                    if !target_zero {
                        outcome.zeroed += n;
                        zero(e.offset, n, &mut tickets).map_err(CopyFailure::Client)?;
                    }
                } else {
                    outcome.data += n;
                    tickets.push(
                        client
                            .submit_write(e.offset, buf, false)
                            .map_err(CopyFailure::Client)?,
                    );
                }
            }
            pos = e.offset + n;
        }
        Ok(Pending::Copy {
            generation,
            op,
            offset,
            len,
            tickets,
            outcome,
        })
    }
}

/// Where the source was last seen holding data, so that a run is looked up once and not
/// once per copy: on tmpfs `SEEK_HOLE` walks the page cache up to the next hole, the end
/// of the file on a fully written disk, which made the bulk copy quadratic in its size.
///
/// Only data is remembered, never holes. A data run that has become a hole since (a trim,
/// a file system that deallocated zeroes) reads as zeroes and is copied as zeroes: right.
/// A remembered hole that a guest write filled since would be skipped by a copy handed
/// out after the write was noted, and the write lost.
#[derive(Debug, Default)]
struct KnownData {
    start: u64,
    end: u64,
}

impl KnownData {
    /// The rest of the remembered data run, if `pos` is in it.
    fn data_at(&self, pos: u64) -> Option<Extent> {
        (self.start <= pos && pos < self.end).then(|| Extent {
            offset: pos,
            length: self.end - pos,
            hole: false,
        })
    }

    fn remember(&mut self, e: Extent) {
        if !e.hole {
            self.start = e.offset;
            self.end = e.offset.saturating_add(e.length);
        }
    }
}

enum CopyFailure {
    Source(MirrorError),
    Client(ClientError),
}

/// Starts mirror jobs.
#[derive(Debug)]
pub struct Mirror;

impl Mirror {
    /// Connects to the export at `target`, refuses a target smaller than `source` or
    /// read-only before copying anything, and starts mirroring `source` into it.
    pub fn start(
        source: Arc<dyn BlockBackend>,
        target: &Address,
        opts: MirrorOptions,
    ) -> Result<MirrorJob, MirrorError> {
        let now = Instant::now();
        let size = source.size();
        let m = match &opts.incremental {
            Some(dirty) => {
                MirrorMachine::new_incremental(size, opts.config.clone(), dirty.clone(), now)?
            }
            None => MirrorMachine::new(size, opts.config.clone(), now)?,
        };
        let name = format!("export {:?} at {}", opts.export, target);
        let pool = ClientPool::connect(target, &opts.export, &opts.client, opts.connections)
            .map_err(|source| MirrorError::Connect {
                target: name.clone(),
                source,
            })?;
        let target_size = pool.first().size();
        if target_size < size {
            let _ = pool.disconnect();
            return Err(MirrorError::TargetTooSmall {
                target: name,
                target_size,
                source_size: size,
            });
        }
        if pool.first().is_read_only() {
            let _ = pool.disconnect();
            return Err(MirrorError::ReadOnlyTarget { target: name });
        }
        info!(
            "mirroring {size} bytes into {name} over {} connections",
            pool.clients().len()
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(Inner {
                m,
                error: None,
                idle: false,
                generation: 0,
                last_connect_error: None,
                cancelled_in: None,
                hung: Vec::new(),
            }),
            changed: Condvar::new(),
            source,
            target: RwLock::new(Some((0, Arc::new(pool)))),
            addr: target.clone(),
            opts,
            name,
        });
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        let completer = thread::Builder::new()
            .name("mirror-replies".into())
            .spawn(move || complete_loop(&s, rx))
            .map_err(|e| MirrorError::Thread(Arc::new(e)))?;
        let s = shared.clone();
        let driver = thread::Builder::new()
            .name("mirror".into())
            .spawn(move || drive(&s, tx))
            .map_err(|e| MirrorError::Thread(Arc::new(e)))?;
        Ok(MirrorJob {
            shared,
            threads: vec![driver, completer],
        })
    }
}

/// Waits for replies in the order copies were submitted and reports them. Between them
/// it keeps the reply timeout: the thread that submits may be blocked sending a copy to
/// a target that stopped reading before anything reached this one to watch.
fn complete_loop(s: &Shared, rx: mpsc::Receiver<Pending>) {
    loop {
        let wait = {
            let st = lock(&s.state);
            // Without a deadline now, one may start any time (a copy being sent): look
            // again after a reply timeout at the latest.
            st.m.reply_deadline()
                .map_or(st.m.config().reply_timeout, |d| {
                    d.saturating_duration_since(Instant::now())
                })
        };
        let p = match rx.recv_timeout(wait) {
            Ok(p) => p,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let mut st = lock(&s.state);
                if let Some(stall) = st.m.poll_timeout(Instant::now()) {
                    s.stalled(&mut st, stall);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        match p {
            Pending::Copy {
                generation,
                op,
                offset,
                len,
                tickets,
                outcome,
            } => {
                let mut first_err = None;
                for t in tickets {
                    if let Err(e) = s.watch(t) {
                        first_err.get_or_insert(e);
                    }
                }
                let mut st = lock(&s.state);
                match first_err {
                    None => st.m.handle_copied(op, outcome, Instant::now()),
                    Some(e) if is_connection(&e) => s.lost(&mut st, generation, &e),
                    Some(e) => {
                        if generation == st.generation {
                            s.fail_op(
                                &mut st,
                                op,
                                MirrorError::Target {
                                    offset,
                                    len,
                                    source: e,
                                },
                            );
                        }
                    }
                }
                s.changed.notify_all();
            }
            Pending::Flush {
                generation,
                op,
                ticket,
            } => {
                let r = ticket.map(|t| s.watch(t)).unwrap_or(Ok(()));
                let mut st = lock(&s.state);
                match r {
                    Ok(()) => st.m.handle_flushed(op, Instant::now()),
                    Err(e) if is_connection(&e) => s.lost(&mut st, generation, &e),
                    Err(e) => {
                        if generation == st.generation {
                            s.fail_op(&mut st, op, MirrorError::Flush { source: e });
                        }
                    }
                }
                s.changed.notify_all();
            }
        }
    }
}

/// The job's main loop: asks the machine what to do and does it.
fn drive(s: &Shared, tx: mpsc::Sender<Pending>) {
    let mut buf = Vec::new();
    let mut known = KnownData::default();
    let window = s.opts.config.rate_window;
    loop {
        let mut st = lock(&s.state);
        let now = Instant::now();
        let action = st.m.poll_action(now);
        let events: Vec<MirrorEvent> = std::iter::from_fn(|| st.m.poll_event()).collect();
        if !events.is_empty() {
            drop(st);
            s.emit(events);
            st = lock(&s.state);
        }
        s.changed.notify_all();
        match action {
            None => {
                // Woken by completions and writes; the timeout lets auto mode look at the
                // rates again while nothing happens, and the machine check its reply
                // timeout (a write-blocking write may be all that waits on the target).
                st.idle = true;
                let wait =
                    st.m.reply_deadline()
                        .map_or(window / 4, |d| {
                            d.saturating_duration_since(now).min(window / 4)
                        })
                        .max(Duration::from_millis(1));
                let (g, _) = s
                    .changed
                    .wait_timeout(st, wait)
                    .unwrap_or_else(PoisonError::into_inner);
                st = g;
                st.idle = false;
            }
            Some(Action::HangUp(stall)) => s.stalled(&mut st, stall),
            Some(Action::WaitUntil(t)) => {
                let left = t.saturating_duration_since(now);
                let _ = s
                    .changed
                    .wait_timeout(st, left)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            Some(Action::Copy {
                op,
                offset,
                len,
                target_zero,
            }) => {
                let generation = st.generation;
                drop(st);
                let Some((g, pool)) = s.pool().filter(|(g, _)| *g == generation) else {
                    // Lost meanwhile: the machine requeued it.
                    continue;
                };
                match s.copy(
                    (g, &pool),
                    op,
                    (offset, len),
                    target_zero,
                    &mut buf,
                    &mut known,
                ) {
                    Ok(p) => {
                        let _ = tx.send(p);
                    }
                    Err(CopyFailure::Client(e)) if is_connection(&e) => {
                        s.lost(&mut lock(&s.state), g, &e)
                    }
                    Err(CopyFailure::Client(e)) => s.fail_op(
                        &mut lock(&s.state),
                        op,
                        MirrorError::Target {
                            offset,
                            len,
                            source: e,
                        },
                    ),
                    Err(CopyFailure::Source(e)) => s.fail_op(&mut lock(&s.state), op, e),
                }
            }
            Some(Action::Flush { op }) => {
                let generation = st.generation;
                drop(st);
                let Some((g, pool)) = s.pool().filter(|(g, _)| *g == generation) else {
                    continue;
                };
                let ticket = if pool.first().can_flush() {
                    match pool.first().submit_flush() {
                        Ok(t) => Some(t),
                        Err(e) if is_connection(&e) => {
                            s.lost(&mut lock(&s.state), g, &e);
                            continue;
                        }
                        Err(e) => {
                            s.fail_op(&mut lock(&s.state), op, MirrorError::Flush { source: e });
                            continue;
                        }
                    }
                } else {
                    None
                };
                let _ = tx.send(Pending::Flush {
                    generation: g,
                    op,
                    ticket,
                });
            }
            Some(Action::Reconnect { attempt }) => {
                drop(st);
                // Bounded, so that a cancel or the end of the window is not held up long.
                let drain_until = Instant::now() + s.opts.config.reply_timeout.min(DRAIN_SLICE);
                if !s.hung_closed(drain_until) {
                    info!(
                        "mirror target {}: hung connections still open, not reconnecting yet (attempt {attempt})",
                        s.name
                    );
                    let mut st = lock(&s.state);
                    st.m.handle_reconnect_failed(Instant::now());
                    continue;
                }
                info!("mirror target {}: reconnecting (attempt {attempt})", s.name);
                let r = ClientPool::connect(
                    &s.addr,
                    &s.opts.export,
                    &s.opts.client,
                    s.opts.connections,
                );
                let mut st = lock(&s.state);
                let now = Instant::now();
                match r {
                    Ok(pool) => {
                        let size = pool.first().size();
                        let g = st.generation;
                        *s.target.write().unwrap_or_else(PoisonError::into_inner) =
                            Some((g, Arc::new(pool)));
                        st.m.handle_reconnected(size, now);
                        if let Phase::Failed(Failure::TargetTooSmall { target, source }) =
                            st.m.phase().clone()
                        {
                            st.error = Some(MirrorError::TargetShrank {
                                target: s.name.clone(),
                                target_size: target,
                                source_size: source,
                            });
                        }
                    }
                    Err(e) => {
                        st.last_connect_error = Some(e);
                        st.m.handle_reconnect_failed(now);
                    }
                }
            }
            Some(Action::Done) => {
                if let Phase::Failed(Failure::ReconnectWindow { window, attempts }) =
                    st.m.phase().clone()
                {
                    let last = st.last_connect_error.clone();
                    // Those still open now: a pool's other connections may have closed.
                    let now = Instant::now();
                    let hung_open = st
                        .hung
                        .iter()
                        .flat_map(|p| p.clients())
                        .filter(|c| !c.wait_closed(now))
                        .count();
                    st.error.get_or_insert(MirrorError::TargetUnreachable {
                        target: s.name.clone(),
                        window,
                        attempts,
                        last,
                        hung_open,
                    });
                }
                // Hung connections are given up (closing them does not wait for the target).
                for p in st.hung.drain(..) {
                    p.abort();
                }
                // Completed or cancelled, nothing is in flight: say goodbye. Failed, hang up.
                let clean = matches!(st.m.phase(), Phase::Completed | Phase::Cancelled);
                s.changed.notify_all();
                drop(st);
                drop(tx);
                let pool = s
                    .target
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if let Some((_, pool)) = pool {
                    match Arc::try_unwrap(pool) {
                        Ok(p) if clean => {
                            let _ = p.disconnect();
                        }
                        Ok(p) => p.abort(),
                        Err(p) => p.abort(),
                    }
                }
                return;
            }
        }
    }
}

/// A running mirror. Dropping it cancels it.
pub struct MirrorJob {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for MirrorJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorJob")
            .field("target", &self.shared.name)
            .field("phase", &self.phase())
            .finish()
    }
}

impl MirrorJob {
    /// The seam for the VMM's write path (cheap to clone, usable from any thread).
    pub fn handle(&self) -> MirrorHandle {
        MirrorHandle {
            shared: self.shared.clone(),
        }
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        lock(&self.shared.state).m.phase().clone()
    }

    /// The counters now.
    pub fn stats(&self) -> MirrorStats {
        lock(&self.shared.state).m.stats(Instant::now())
    }

    /// Switches the copy mode at run time.
    pub fn set_mode(&self, mode: CopyMode) {
        let mut st = lock(&self.shared.state);
        st.m.set_mode(mode, Instant::now());
        self.shared.changed.notify_all();
    }

    /// Waits until the mirror is ready, for at most `timeout`. At the deadline the error
    /// says how fast the guest dirties and the copy moves; the job goes on.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), MirrorError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if st.m.reached_ready() && !st.m.phase().is_finished() {
                return Ok(());
            }
            if st.m.phase().is_finished() {
                return Err(self.ended(&st));
            }
            let now = Instant::now();
            if now >= deadline {
                let stats = st.m.stats(now);
                return Err(MirrorError::ReadyDeadline {
                    waited: now - start,
                    phase: st.m.phase().clone(),
                    dirty_bytes: stats.dirty_bytes,
                    dirty_rate: stats.rates.dirty_rate,
                    copy_rate: stats.rates.copy_rate,
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn ended(&self, st: &Inner) -> MirrorError {
        st.error
            .clone()
            .unwrap_or_else(|| MirrorError::Ended(st.m.phase().clone()))
    }

    fn wait_finished(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            while !st.m.phase().is_finished() {
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Completes: copies what is still dirty, flushes, and ends with the target equal to
    /// the source. Pause the guest's writes first (or completion may chase them forever).
    pub fn complete(mut self) -> Result<MirrorStats, MirrorError> {
        {
            let mut st = lock(&self.shared.state);
            if st.m.phase().is_finished() {
                return Err(self.ended(&st));
            }
            st.m.complete()?;
            self.shared.changed.notify_all();
        }
        self.wait_finished();
        let st = lock(&self.shared.state);
        match st.m.phase() {
            Phase::Completed => Ok(st.m.stats(Instant::now())),
            _ => Err(self.ended(&st)),
        }
    }

    /// Cancels: waits for the copies in flight, leaves the target as it is, never touches
    /// the source. A job that had failed already returns its error.
    pub fn cancel(mut self) -> Result<Cancelled, MirrorError> {
        self.cancel_inner()
    }

    fn cancel_inner(&mut self) -> Result<Cancelled, MirrorError> {
        let phase = {
            let mut st = lock(&self.shared.state);
            let p = st.m.phase().clone();
            st.cancelled_in.get_or_insert(p.clone());
            st.m.cancel();
            self.shared.changed.notify_all();
            p
        };
        self.wait_finished();
        let st = lock(&self.shared.state);
        match st.m.phase() {
            Phase::Cancelled => {
                let c = Cancelled {
                    phase,
                    stats: st.m.stats(Instant::now()),
                };
                info!("{c}");
                Ok(c)
            }
            Phase::Completed => Err(MirrorError::Ended(Phase::Completed)),
            _ => Err(self.ended(&st)),
        }
    }

    /// Waits until the job ends by itself (it failed) or `timeout` passes; returns the
    /// phase then.
    pub fn wait_finished_for(&self, timeout: Duration) -> Phase {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        while !st.m.phase().is_finished() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.m.phase().clone()
    }

    /// The error of a failed job.
    pub fn error(&self) -> Option<MirrorError> {
        lock(&self.shared.state).error.clone()
    }
}

impl Drop for MirrorJob {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let _ = self.cancel_inner();
        }
    }
}

/// What a guest write was, for the target in write-blocking mode.
/// Bytes of one WRITE of a guest write mirrored in write-blocking mode (zeroes written as
/// data, data read back from the source).
const WRITE_PIECE: u64 = 1 << 20;
/// Bytes of one WRITE_ZEROES of a guest's zeroing mirrored in write-blocking mode.
const ZEROES_PIECE: u64 = 1 << 30;

/// `f(offset, length)` over `offset..offset + len` in pieces of at most `piece`, stopping
/// at the first error.
fn in_pieces<E>(
    offset: u64,
    len: u64,
    piece: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let end = offset.saturating_add(len);
    let mut at = offset;
    while at < end {
        let n = (end - at).min(piece);
        f(at, n)?;
        at += n;
    }
    Ok(())
}

enum TargetWrite<'a> {
    Data(&'a [u8]),
    Zeroes,
    /// The source already holds it: read it back under the claim.
    ReadBack,
}

/// The seam for a VMM's block layer: tells the mirror about guest writes. Cheap to clone
/// and to call (a lock and a few bit operations in background mode).
#[derive(Clone)]
pub struct MirrorHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MirrorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorHandle")
            .field("target", &self.shared.name)
            .finish()
    }
}

impl MirrorHandle {
    /// A guest write, write-zeroes or trim of `[offset, offset + len)` has reached the
    /// source (call it after, never before). In write-blocking mode the range is read back
    /// from the source and written to the target before this returns.
    pub fn note_write(&self, offset: u64, len: u64) {
        let _ = self.mirrored(offset, len, || Ok(()), TargetWrite::ReadBack);
    }

    /// As [`note_write`](Self::note_write) for a range the source now reads as zeroes (a
    /// discard or write-zeroes): in write-blocking mode the target is zeroed too, without
    /// reading the range back.
    pub fn note_zeroes(&self, offset: u64, len: u64) {
        let _ = self.mirrored(offset, len, || Ok(()), TargetWrite::Zeroes);
    }

    fn wake_if_idle(&self, st: &Inner) {
        if st.idle {
            self.shared.changed.notify_all();
        }
    }

    /// Runs a guest write: `write_source` puts it on the source; in write-blocking mode
    /// it is then written to the target too, with the clusters claimed throughout.
    fn mirrored(
        &self,
        offset: u64,
        len: u64,
        write_source: impl FnOnce() -> io::Result<()>,
        target: TargetWrite<'_>,
    ) -> io::Result<()> {
        let s = &*self.shared;
        let start = lock(&s.state).m.begin_write(offset, len, Instant::now());
        let id = match start {
            WriteStart::Mirror(id) => id,
            WriteStart::Wait(id) => {
                let mut st = lock(&s.state);
                while !st.m.write_claimed(id) && !st.m.phase().is_finished() {
                    st = s.changed.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
                id
            }
            _ => {
                let r = write_source();
                let mut st = lock(&s.state);
                st.m.note_write(offset, len, Instant::now());
                self.wake_if_idle(&st);
                return r;
            }
        };
        if let Err(e) = write_source() {
            let mut st = lock(&s.state);
            st.m.end_write(id, false, Instant::now());
            self.wake_if_idle(&st);
            return Err(e);
        }
        let result = match s.pool() {
            None => Err(None),
            Some((generation, pool)) => {
                let c = pool.pick();
                let r = match target {
                    TargetWrite::Data(d) => c.write(offset, d),
                    // A guest's discard may span gigabytes: in pieces a request can carry
                    // (a WRITE_ZEROES length is 32 bits; written zeroes and data read
                    // back go through a buffer of one piece).
                    TargetWrite::Zeroes if c.can_zero() => {
                        in_pieces(offset, len, ZEROES_PIECE, |at, n| {
                            c.write_zeroes(at, n as u32)
                        })
                    }
                    TargetWrite::Zeroes => {
                        let zeros = vec![0; len.min(WRITE_PIECE) as usize];
                        in_pieces(offset, len, WRITE_PIECE, |at, n| {
                            c.write(at, &zeros[..n as usize])
                        })
                    }
                    TargetWrite::ReadBack => {
                        let mut buf = vec![0; len.min(WRITE_PIECE) as usize];
                        in_pieces(offset, len, WRITE_PIECE, |at, n| {
                            let buf = &mut buf[..n as usize];
                            match s.source.read_at(buf, at) {
                                Ok(()) => c.write(at, buf),
                                Err(_) => Err(ClientError::Invalid {
                                    command: "WRITE",
                                    offset: at,
                                    length: n as u32,
                                    reason: "the source could not be read back".into(),
                                }),
                            }
                        })
                    }
                };
                r.map_err(|e| Some((generation, e)))
            }
        };
        let mut st = lock(&s.state);
        let ok = result.is_ok();
        if let Err(Some((generation, e))) = result {
            if is_connection(&e) {
                s.lost(&mut st, generation, &e);
            }
        }
        st.m.end_write(id, ok, Instant::now());
        s.changed.notify_all();
        Ok(())
    }
}

/// A disk that writes the source and tells the mirror: the simplest way for a VMM's
/// block device to feed a [`MirrorJob`]. In write-blocking mode each write returns once
/// the target has it too (or, if the target failed it, once it is marked for copying).
#[derive(Clone)]
pub struct MirroredDisk {
    source: Arc<dyn BlockBackend>,
    handle: MirrorHandle,
}

impl std::fmt::Debug for MirroredDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirroredDisk")
            .field("handle", &self.handle)
            .finish()
    }
}

impl MirroredDisk {
    /// Writes go to `source` (the disk the job mirrors) and are told to `handle`.
    pub fn new(source: Arc<dyn BlockBackend>, handle: MirrorHandle) -> MirroredDisk {
        MirroredDisk { source, handle }
    }

    /// Size of the disk.
    pub fn size(&self) -> u64 {
        self.source.size()
    }

    /// Reads from the source.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.source.read_at(buf, offset)
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.handle.mirrored(
            offset,
            data.len() as u64,
            || self.source.write_at(data, offset),
            TargetWrite::Data(data),
        )
    }

    /// Zeroes `[offset, offset + len)` (a trim of a disk whose trimmed blocks read as
    /// zeroes is the same).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.handle.mirrored(
            offset,
            len,
            || self.source.write_zeroes(offset, len),
            TargetWrite::Zeroes,
        )
    }

    /// Flushes the source.
    pub fn flush(&self) -> io::Result<()> {
        self.source.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::in_pieces;

    #[test]
    fn pieces_cover_the_range_in_order_and_stop_at_an_error() {
        let mut got = Vec::new();
        in_pieces(10, 25, 10, |at, n| {
            got.push((at, n));
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(got, [(10, 10), (20, 10), (30, 5)]);
        // More than a 32-bit length in pieces that each fit one.
        let mut total = 0u64;
        in_pieces(0, 5 << 30, 1 << 30, |_, n| {
            assert!(u32::try_from(n).is_ok());
            total += n;
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(total, 5 << 30);
        let mut calls = 0;
        assert_eq!(
            in_pieces(0, 100, 10, |at, _| {
                calls += 1;
                if at == 30 { Err(at) } else { Ok(()) }
            }),
            Err(30)
        );
        assert_eq!(calls, 4);
        in_pieces(7, 0, 10, |_, _| -> Result<(), ()> {
            panic!("nothing to do")
        })
        .unwrap();
    }
}
