//! The destination of a post-copy migration.
//!
//! It takes over where the pre-copy destination hands the stream over, at the source's
//! `SwitchToPostcopy` ([`migration_precopy::Incoming::receive_or_switch`], with
//! [`migration_precopy::DestinationOptions::postcopy`] on; a pure post-copy switches right
//! after the configuration):
//!
//! 1. the rest of the switch (device state, `EndOfData`) on the main stream, and the
//!    source's urgent channel, accepted from the caller's listener;
//! 2. guest RAM registered for faults ([`FaultingRam`]), every page it does not hold
//!    dropped (the discard list, and whatever pre-copy did not write), the device state
//!    loaded, `PostcopyReady` sent;
//! 3. on the source's `PostcopyCommit` the guest runs here. A fault thread reads faults in
//!    bursts and sends a page request for each missing page once; one thread places the
//!    pages answering them (urgent channel), this one places the background push (main
//!    stream); a page that arrives twice is placed once. Any thread that touches a
//!    missing page waits for it, whoever it is: a vCPU, KVM on its behalf, or a VMM
//!    thread such as a device's. The one exception is the thread that calls
//!    [`VmControl::resume`], which runs before the fault thread does: `resume` must hand
//!    work that reads guest RAM (a device re-examining its queue) to other threads;
//! 4. once every page is present, RAM is unregistered and `Running` ends the return path.
//!
//! A broken connection (either one) after the commit pauses page service, not the guest:
//! faults are noted, vCPUs that touch missing pages wait, and this side waits for the
//! source to dial again (within [`DestinationOptions::recovery_window`]), answers with its
//! received-pages bitmap, requests again what it waited for, and goes on. If the source
//! does not come back in time the guest is paused and the error says so.

pub mod book;
pub mod machine;

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use migration_core::bitmap::DirtyBitmap;
use migration_core::fault::{Fault, FaultingRam};
use migration_core::geometry::GuestRam;
use migration_core::page::PageDecoder;
use migration_core::pagemap::populated_pages;
use migration_core::stats::ProgressEvent;
use migration_core::stream::{
    Ack, DecoderOptions, DeviceState, Direction, Frame, HeaderFlags, PageBatch, PageData, Record,
    ReturnRecord, StreamDecoder, StreamError, StreamHeader, Verdict,
};
use migration_core::transport::Connection;
use migration_core::vm::{VmControl, VmError};
use migration_precopy::{DestinationStats, PostcopySwitch};
use vm_memory::GuestMemoryBackend;

use crate::stats::{Origin, PostcopyStats};
pub use book::PageBook;
pub use machine::{
    ConnId, DestinationAction, DestinationEvent, DestinationMachine, DestinationPhase, Service,
};

/// Settings of a post-copy destination.
#[derive(Debug, Clone)]
pub struct DestinationOptions {
    /// How long to wait for the source to come back after a broken connection, and for
    /// its urgent channel at the switch. Default 5 minutes.
    pub recovery_window: Duration,
    /// Longest record accepted. Default 64 MiB.
    pub max_record_len: u32,
}

impl Default for DestinationOptions {
    fn default() -> Self {
        DestinationOptions {
            recovery_window: Duration::from_secs(300),
            max_record_len: migration_core::stream::DEFAULT_MAX_RECORD_LEN,
        }
    }
}

/// Why a post-copy destination failed, and what became of the guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// The stream is malformed or corrupt (before the commit: the source resumes).
    #[error("refusing the migration stream: {0}")]
    Stream(#[from] StreamError),
    /// The connection failed before the commit: the guest was not run here.
    #[error("connection lost before the commit, the guest was not run here: {0}")]
    Connection(#[source] io::Error),
    /// The source gave up before the commit.
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// The stream broke the post-copy protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Guest RAM could not be registered for faults (before the commit).
    #[error("registering guest RAM for faults: {0}")]
    Register(#[source] io::Error),
    /// The VMM refused the device state or a resume (before the commit).
    #[error("{0}")]
    Vm(#[from] VmError),
    /// After the commit, the source did not come back within the recovery window: the
    /// guest is paused here, with the pages it has; its other pages were on the source.
    #[error(
        "the source did not come back within {window:?} after the connection broke: the guest \
         is paused here with {missing} pages missing ({why})"
    )]
    SourceLost {
        /// The recovery window.
        window: Duration,
        /// Pages the guest does not have.
        missing: usize,
        /// What broke.
        why: String,
        /// Whether pausing the guest failed too.
        pause: Option<VmError>,
    },
    /// After the commit, a page could not be placed: the guest is paused here.
    #[error("placing page {page} after the commit: {source}; the guest is paused here")]
    Placement {
        /// The page.
        page: u64,
        /// What the kernel said.
        source: io::Error,
    },
}

impl DestinationError {
    /// Whether the guest runs on this side: never on an error (before the commit it was
    /// not run here, after it it is paused).
    pub fn committed(&self) -> bool {
        matches!(
            self,
            DestinationError::SourceLost { .. } | DestinationError::Placement { .. }
        )
    }
}

/// What a post-copy destination reports.
#[derive(Debug, Clone, Default)]
pub struct DestinationReport {
    /// Pre-copy's part, before the switch.
    pub precopy: DestinationStats,
    /// Post-copy's part.
    pub postcopy: PostcopyStats,
    /// From the switch record to the guest running here.
    pub switchover: Duration,
    /// Device-state blobs loaded.
    pub device_states: usize,
}

/// How often [`receive_with_progress`] reports the pages present, at most.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Accepts one more connection of the migration within the timeout (`Ok(None)`: none came).
pub type Accept<'a, C> = dyn FnMut(Duration) -> io::Result<Option<C>> + 'a;

/// Receives the post-copy half of a migration into `ram` and `vm` (see the
/// [module docs](self)). `accept` gives the further connections the source opens to this
/// side's listener: its urgent channel, and new connections after a break.
pub fn receive<C, M, V>(
    switch: PostcopySwitch<C>,
    accept: &mut Accept<'_, C>,
    ram: &GuestRam<'_, M>,
    vm: &mut V,
    opts: &DestinationOptions,
) -> Result<DestinationReport, DestinationError>
where
    C: Connection,
    M: GuestMemoryBackend,
    V: VmControl + ?Sized,
{
    receive_with_progress(switch, accept, ram, vm, opts, &mut |_| {})
}

/// [`receive`], telling `progress` what happens, on the calling thread: the phases
/// ([`Phase::Postcopy`](migration_core::stats::Phase::Postcopy) at the commit and again
/// after each recovery, [`Phase::PostcopyPaused`](migration_core::stats::Phase::PostcopyPaused)
/// at a break, [`Phase::Completed`](migration_core::stats::Phase::Completed) once every
/// page is present); a [`ProgressEvent::PageFault`] for each fault served, with its
/// latency (at most [`book::MAX_UNREPORTED_FAULTS`] between two records of the main
/// stream; the histogram in the report has them all); and, at most every
/// [`PROGRESS_INTERVAL`] while pages arrive, [`ProgressEvent::Progress`] with the pages
/// present (`pages_sent`), still missing (`pages_remaining`) and in all, and the bytes of
/// pages received in post-copy.
pub fn receive_with_progress<C, M, V>(
    switch: PostcopySwitch<C>,
    accept: &mut Accept<'_, C>,
    ram: &GuestRam<'_, M>,
    vm: &mut V,
    opts: &DestinationOptions,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> Result<DestinationReport, DestinationError>
where
    C: Connection,
    M: GuestMemoryBackend,
    V: VmControl + ?Sized,
{
    let switched_at = Instant::now();
    let PostcopySwitch {
        mut conn,
        input,
        stream,
        received,
        ..
    } = *Box::new(switch);
    let vm_id = stream.header.vm_uuid;
    let pages = ram.layout().page_count();
    let main = Reader::new(
        conn.try_clone().map_err(DestinationError::Connection)?,
        input,
        stream.decoder,
    );
    if !stream.unsent.is_empty() {
        conn.write_all(&stream.unsent)
            .map_err(DestinationError::Connection)?;
    }
    let mut report = DestinationReport {
        precopy: stream.stats,
        ..Default::default()
    };
    let received = book::present_at_switch(received, &stream.discard);
    let mut m = DestinationMachine::new(0, opts.recovery_window, switched_at);
    let mut d = Driver {
        conns: HashMap::from([(0, (conn, main))]),
        next_id: 1,
        current: None,
        faulting: None,
        shared: None,
        fault_thread: None,
    };
    loop {
        while let Some(e) = m.poll_event() {
            progress(&e);
        }
        let now = Instant::now();
        let event = match m.poll(now) {
            DestinationAction::ReadMain => {
                let id = m.connections().0.expect("a main stream to read");
                let (_, reader) = d.conns.get_mut(&id).expect("the main stream is held");
                match reader.next() {
                    Ok(r) => DestinationEvent::Record(r),
                    Err(e) => DestinationEvent::MainBroken(e),
                }
            }
            DestinationAction::Accept { until } => {
                // A resumed main stream does not carry the config again: its decoder is
                // told the page count.
                let resumed = matches!(m.phase(), DestinationPhase::Paused { .. });
                let page_count = resumed.then_some(pages as u64);
                match accept_header(
                    accept,
                    vm_id,
                    page_count,
                    until.saturating_duration_since(now),
                ) {
                    Ok(Some((c, r, h))) => {
                        let id = d.next_id;
                        d.next_id += 1;
                        d.conns.insert(id, (c, r));
                        if let Some(s) = &d.shared
                            && !h.flags.contains(HeaderFlags::URGENT)
                        {
                            s.lock().attempt();
                        }
                        DestinationEvent::Accepted(Ok((id, h.flags)))
                    }
                    Ok(None) => continue,
                    Err(e) => DestinationEvent::Accepted(Err(e)),
                }
            }
            DestinationAction::AnswerUrgent(id) => {
                let mut out = BytesMut::new();
                StreamHeader::new(vm_id).encode(Direction::Return, &mut out);
                DestinationEvent::Answered(id, d.write(id, &out))
            }
            DestinationAction::AnswerMain(id) => {
                let mut out = BytesMut::new();
                StreamHeader::new(vm_id).encode(Direction::Return, &mut out);
                let present = match &d.shared {
                    Some(s) => s.lock().present().clone(),
                    None => received.clone(),
                };
                ReturnRecord::ReceivedBitmap(present).encode(&mut out);
                DestinationEvent::Answered(id, d.write(id, &out))
            }
            DestinationAction::Drop(id) => {
                if let Some((c, _)) = d.conns.remove(&id) {
                    let _ = c.shutdown(Shutdown::Both);
                }
                continue;
            }
            DestinationAction::Prepare => {
                let r = prepare(ram, &received, m.device_states(), vm);
                DestinationEvent::Prepared(r.map(|f| {
                    report.device_states = m.device_states().len();
                    d.faulting = Some(f);
                }))
            }
            DestinationAction::SendReady => {
                let mut out = BytesMut::new();
                ReturnRecord::Ack(Ack::PostcopyReady(received.count() as u64)).encode(&mut out);
                tracing::debug!(
                    present = received.count(),
                    pages,
                    "post-copy ready; waiting for the commit"
                );
                DestinationEvent::Sent(d.write(0, &out))
            }
            DestinationAction::Resume => DestinationEvent::Resumed(vm.resume()),
            DestinationAction::Pause => DestinationEvent::Paused(vm.pause()),
            DestinationAction::Serve => {
                let shared = match &d.shared {
                    Some(s) => s.clone(),
                    None => {
                        report.switchover = m.switchover().unwrap_or_default();
                        tracing::debug!(since_switch = ?report.switchover, "committed: the guest runs here");
                        let mut book = PageBook::new(received.clone(), Instant::now());
                        if let Some(r) = m.recovered_before_commit() {
                            book.record_recovery(r);
                        }
                        let s = Arc::new(Shared {
                            book: Mutex::new(book),
                            complete: Condvar::new(),
                            faulting: d.faulting.take().expect("RAM registered before the commit"),
                            requests: Mutex::new(None),
                            stop: AtomicBool::new(false),
                            failed: Mutex::new(None),
                        });
                        let f = s.clone();
                        match std::thread::Builder::new()
                            .name("postcopy-faults".into())
                            .spawn(move || fault_loop(&f))
                        {
                            Ok(t) => d.fault_thread = Some(t),
                            Err(e) => {
                                d.shared = Some(s);
                                m.handle(
                                    DestinationEvent::Served(Service::Failed(
                                        DestinationError::Connection(e),
                                    )),
                                    Instant::now(),
                                );
                                continue;
                            }
                        }
                        d.shared = Some(s.clone());
                        s
                    }
                };
                let (Some(main), Some(urgent)) = m.connections() else {
                    unreachable!("page service on a pair of connections")
                };
                let (main, main_reader) = d.conns.remove(&main).expect("the main stream is held");
                let (uconn, ureader) = d.conns.remove(&urgent).expect("the urgent channel is held");
                let mut conns = Conns {
                    main,
                    main_reader,
                    urgent: Urgent {
                        conn: uconn,
                        reader: ureader,
                    },
                };
                let served = run_connections(&shared, &mut conns, progress);
                report_faults(&shared, progress);
                let service = match served {
                    Ok(Service::Broken(why)) => {
                        // Page service pauses; the guest runs on with what it has.
                        shared.lock().connection_lost(Instant::now());
                        *shared.requests.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        let _ = conns.main.shutdown(Shutdown::Both);
                        let _ = conns.urgent.conn.shutdown(Shutdown::Both);
                        Service::Broken(why)
                    }
                    Ok(s) => {
                        d.current = Some(conns);
                        s
                    }
                    Err(e) => Service::Failed(e),
                };
                DestinationEvent::Served(service)
            }
            DestinationAction::Refuse => {
                let reason = m.refusal().unwrap_or("refused").to_string();
                if let Some((c, _)) = d.conns.get_mut(&0) {
                    let mut out = BytesMut::new();
                    ReturnRecord::Verdict(Verdict::Failed { reason }).encode(&mut out);
                    let _ = c.write_all(&out);
                }
                d.close_all();
                continue;
            }
            DestinationAction::Finish => {
                d.stop_faults();
                // Every page is present: RAM is ordinary memory again (every thread that
                // shared it is joined), then the source hears it.
                match d.shared.take().map(Arc::try_unwrap) {
                    Some(Ok(s)) => {
                        report.postcopy = s.lock().stats(Instant::now());
                        if let Err(e) = s.faulting.finish() {
                            tracing::warn!(%e, "unregistering guest RAM from userfaultfd");
                        }
                    }
                    // Cannot happen: every thread that shared it was joined. Dropping the
                    // last reference unregisters it anyway.
                    Some(Err(s)) => {
                        report.postcopy = s.lock().stats(Instant::now());
                        tracing::warn!("guest RAM still shared at the end of post-copy");
                    }
                    None => {}
                }
                if let Some(c) = d.current.as_mut() {
                    let mut out = BytesMut::new();
                    ReturnRecord::Verdict(Verdict::Running).encode(&mut out);
                    if let Err(e) = c.main.write_all(&out) {
                        tracing::debug!(%e, "the final verdict");
                    }
                    let _ = c.main.shutdown(Shutdown::Write);
                }
                continue;
            }
            DestinationAction::Sleep { until } => {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                continue;
            }
            DestinationAction::Done => {
                while let Some(e) = m.poll_event() {
                    progress(&e);
                }
                d.stop_faults();
                if let Some(s) = &d.shared {
                    report.postcopy = s.lock().stats(Instant::now());
                }
                let missing = d.shared.as_ref().map(|s| s.lock().missing());
                d.close_all();
                return match m.take_result().expect("a result at the end") {
                    Ok(()) => Ok(report),
                    Err(DestinationError::SourceLost {
                        window, why, pause, ..
                    }) => Err(DestinationError::SourceLost {
                        window,
                        missing: missing.unwrap_or(pages),
                        why,
                        pause,
                    }),
                    Err(e) => Err(e),
                };
            }
        };
        m.handle(event, Instant::now());
    }
}

/// What the driver holds besides the machine.
struct Driver<C> {
    /// Connections accepted and not yet in page service (the main stream at the switch is
    /// number 0).
    conns: HashMap<ConnId, (C, Reader<C>)>,
    next_id: ConnId,
    /// The pair page service ended on, complete.
    current: Option<Conns<C>>,
    /// RAM registered for faults, until page service takes it.
    faulting: Option<FaultingRam>,
    shared: Option<Arc<Shared<C>>>,
    fault_thread: Option<std::thread::JoinHandle<()>>,
}

impl<C: Connection> Driver<C> {
    fn write(&mut self, id: ConnId, out: &[u8]) -> io::Result<()> {
        match self.conns.get_mut(&id) {
            Some((c, _)) => c.write_all(out),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no such connection",
            )),
        }
    }

    fn stop_faults(&mut self) {
        if let Some(s) = &self.shared {
            s.stop.store(true, Ordering::SeqCst);
        }
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
    }

    fn close_all(&mut self) {
        for (_, (c, _)) in self.conns.drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Registers RAM for faults, drops every page not `received` and maps the zero page where
/// a received page is zero and holds nothing, loads the device state.
fn prepare<M, V>(
    ram: &GuestRam<'_, M>,
    received: &DirtyBitmap,
    states: &[DeviceState],
    vm: &mut V,
) -> Result<FaultingRam, DestinationError>
where
    M: GuestMemoryBackend,
    V: VmControl + ?Sized,
{
    let faulting = FaultingRam::register(ram).map_err(DestinationError::Register)?;
    let layout = ram.layout();
    // Pages to fetch must fault: drop whatever they hold (a discarded old copy,
    // prefaulted zeros, nothing at all: dropping nothing is cheap).
    let mut fetch = DirtyBitmap::new_full(layout.page_count());
    fetch.subtract(received);
    for run in fetch.iter_runs() {
        for (_, piece) in layout.split_at_regions(run) {
            faulting
                .discard(piece)
                .map_err(DestinationError::Register)?;
        }
    }
    // Pages known to be zero that hold no page (pre-copy never wrote them: fresh RAM
    // reads as zero) would fault for ever: map the zero page into them. Where the
    // kernel says which pages hold something, only into those that do not.
    let mut zero = received.clone();
    if let Ok(held) = populated_pages(ram.memory(), layout) {
        zero.subtract(&held);
    }
    for run in zero.iter_runs() {
        for (_, piece) in layout.split_at_regions(run) {
            faulting
                .place_zero(piece)
                .map_err(DestinationError::Register)?;
        }
    }
    vm.load_device_state(states)?;
    Ok(faulting)
}

/// Reads records from one stream.
struct Reader<C> {
    conn: C,
    buf: BytesMut,
    dec: StreamDecoder,
}

impl<C: Connection> Reader<C> {
    fn new(conn: C, buf: BytesMut, dec: StreamDecoder) -> Self {
        Reader { conn, buf, dec }
    }

    /// The next record; the end of the stream or a read error is a
    /// [`DestinationError::Connection`].
    fn next(&mut self) -> Result<Record, DestinationError> {
        loop {
            match self.dec.decode(&mut self.buf)? {
                Some(Frame::Record(r)) => return Ok(r),
                Some(Frame::Header(_)) => continue,
                None => {}
            }
            match self.conn.read_into(&mut self.buf, 256 << 10) {
                Ok(0) => {
                    return Err(DestinationError::Connection(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream ended",
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DestinationError::Connection(e)),
            }
        }
    }
}

/// The two connections of a running post-copy.
struct Conns<C> {
    /// The main connection (this side writes the return path on it).
    main: C,
    main_reader: Reader<C>,
    urgent: Urgent<C>,
}

/// The urgent channel: requests written on `conn`, pages read with `reader`.
struct Urgent<C> {
    conn: C,
    reader: Reader<C>,
}

/// Accepts the source's next connection within `timeout` (`None`: none came) and reads its header, which must
/// name this VM and carry `flags` (the main stream's config is not resent on a resume, so
/// its decoder is told the page count).
fn accept_header<C: Connection>(
    accept: &mut Accept<'_, C>,
    vm_id: [u8; 16],
    page_count: Option<u64>,
    timeout: Duration,
) -> io::Result<Option<(C, Reader<C>, StreamHeader)>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let Some(conn) = accept(left)? else {
            continue;
        };
        let r = (|| {
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            conn.set_nodelay(true)?;
            let read = conn.try_clone()?;
            Ok::<_, io::Error>(read)
        })();
        let read = match r {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%e, "a connection that cannot be set up");
                continue;
            }
        };
        let mut reader = Reader::new(
            read,
            BytesMut::new(),
            StreamDecoder::new(DecoderOptions {
                expected_vm: Some(vm_id),
                page_count,
                ..DecoderOptions::default()
            }),
        );
        match read_header(&mut reader) {
            Ok(h) => {
                let _ = conn.set_read_timeout(None);
                return Ok(Some((conn, reader, h)));
            }
            Err(e) => {
                // Not the source (a stray connection, another VM): keep waiting.
                tracing::warn!(error = %e, "refusing a connection");
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
    }
}

fn read_header<C: Connection>(r: &mut Reader<C>) -> Result<StreamHeader, DestinationError> {
    loop {
        match r.dec.decode(&mut r.buf)? {
            Some(Frame::Header(h)) => return Ok(h),
            Some(Frame::Record(rec)) => {
                return Err(DestinationError::Protocol(format!(
                    "a {} record before the header",
                    rec.record_type()
                )));
            }
            None => {}
        }
        match r.conn.read_into(&mut r.buf, 4096) {
            Ok(0) => {
                return Err(DestinationError::Connection(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended before its header",
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DestinationError::Connection(e)),
        }
    }
}

/// What the threads of a running post-copy share.
struct Shared<C> {
    book: Mutex<PageBook>,
    /// Notified when the last page is placed, or a thread failed.
    complete: Condvar,
    faulting: FaultingRam,
    /// Where page requests go: the urgent channel, while it works.
    requests: Mutex<Option<C>>,
    stop: AtomicBool,
    /// A failure after the commit that no recovery mends (a page that cannot be placed).
    failed: Mutex<Option<DestinationError>>,
}

impl<C: Connection> Shared<C> {
    /// Places the pages of `batch` that are still missing: runs of consecutive pages in
    /// one `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`) each, the book updated once per run.
    fn place(
        &self,
        batch: &PageBatch,
        origin: Origin,
        decoder: &mut PageDecoder,
        staging: &mut Vec<u8>,
    ) -> Result<(), DestinationError> {
        let ps = self.faulting.page_size();
        let pages = &batch.pages;
        let missing: Vec<bool> = {
            let b = self.lock();
            pages
                .iter()
                .map(|p| b.is_missing(p.index as usize))
                .collect()
        };
        let mut i = 0;
        while i < pages.len() {
            if !missing[i] {
                self.lock().duplicate();
                i += 1;
                continue;
            }
            let first = pages[i].index as usize;
            let zero = matches!(pages[i].data, PageData::Zero);
            let region_end = self.faulting.region_of(first).map_or(first + 1, |r| r.end);
            // The run: missing pages of the same kind (zero or not), consecutive, in one
            // region.
            let mut j = i + 1;
            while j < pages.len()
                && missing[j]
                && matches!(pages[j].data, PageData::Zero) == zero
                && pages[j].index == pages[j - 1].index + 1
                && (pages[j].index as usize) < region_end
            {
                j += 1;
            }
            let run = first..first + (j - i);
            let fail = |source| DestinationError::Placement {
                page: first as u64,
                source,
            };
            let present = if zero {
                self.place_zero_run(run.clone()).map_err(fail)?
            } else {
                staging.clear();
                for p in &pages[i..j] {
                    match &p.data {
                        PageData::Raw(d) => staging.extend_from_slice(d),
                        PageData::Zstd(_) => {
                            let at = staging.len();
                            staging.resize(at + ps, 0);
                            decoder
                                .apply(p.data.as_encoded(), &mut staging[at..])
                                .map_err(|e| fail(io::Error::other(e.to_string())))?;
                        }
                        PageData::Delta(_) => {
                            return Err(DestinationError::Protocol(format!(
                                "a delta for page {}, which this side does not hold",
                                p.index
                            )));
                        }
                        PageData::Zero => unreachable!("a run of one kind"),
                    }
                }
                self.faulting.place_run(first, staging).map_err(fail)?
            };
            self.placed_run(run, &present, origin);
            i = j;
        }
        Ok(())
    }

    /// Places zero pages into `run` (missing when looked at); returns the pages that were
    /// present after all.
    fn place_zero_run(&self, run: Range<usize>) -> io::Result<Vec<usize>> {
        self.faulting.place_zero(run)?;
        Ok(Vec::new())
    }

    /// Marks the pages of `run` placed (`present`: those that were there already).
    fn placed_run(&self, run: Range<usize>, present: &[usize], origin: Origin) {
        let now = Instant::now();
        let mut b = self.lock();
        for p in run {
            if present.contains(&p) {
                b.duplicate();
            } else {
                b.placed(p, origin, now);
            }
        }
        if b.is_complete() {
            self.complete.notify_all();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PageBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, e: DestinationError) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(e);
        self.complete.notify_all();
    }

    /// Sends page requests on the urgent channel, if it works.
    fn request(&self, pages: &[usize]) -> bool {
        if pages.is_empty() {
            return true;
        }
        let mut out = BytesMut::with_capacity(pages.len() * 24);
        for &p in pages {
            ReturnRecord::PageRequest {
                page: p as u64,
                count: 1,
            }
            .encode(&mut out);
        }
        let mut slot = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(c) => match c.write_all(&out) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(%e, "sending page requests");
                    // The receivers notice the broken connection; shut it so they do now.
                    let _ = c.shutdown(Shutdown::Both);
                    *slot = None;
                    false
                }
            },
            None => false,
        }
    }
}

/// Runs page service on one pair of connections until every page is present or one of
/// them breaks.
fn run_connections<C: Connection>(
    shared: &Arc<Shared<C>>,
    conns: &mut Conns<C>,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> Result<Service, DestinationError> {
    let w = conns
        .urgent
        .conn
        .try_clone()
        .map_err(DestinationError::Connection)?;
    // The channel is put in place under the book's lock: a fault the fault thread takes
    // before is in `pending`, one after is sent by that thread on this channel, so none
    // is left unsent.
    let pending = {
        let mut book = shared.lock();
        *shared.requests.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
        book.resumed(Instant::now())
    };
    shared.request(&pending);
    // Set before this side closes the urgent channel itself, once done.
    let closing = Arc::new(AtomicBool::new(false));
    // The urgent channel's pages on a thread of their own, so that an answer to a fault
    // never waits behind a background batch.
    let urgent_thread = {
        let s = shared.clone();
        let mut reader = Reader::new(
            conns
                .urgent
                .reader
                .conn
                .try_clone()
                .map_err(DestinationError::Connection)?,
            std::mem::take(&mut conns.urgent.reader.buf),
            std::mem::replace(
                &mut conns.urgent.reader.dec,
                StreamDecoder::new(DecoderOptions::default()),
            ),
        );
        let main_ctl = conns
            .main
            .try_clone()
            .map_err(DestinationError::Connection)?;
        let closing = closing.clone();
        std::thread::Builder::new()
            .name("postcopy-urgent".into())
            .spawn(move || {
                let r = receive_pages(&s, &mut || reader.next(), Origin::Requested);
                if r.is_err() && !closing.load(Ordering::SeqCst) {
                    // Break the main stream off too, so that this side acts on it now.
                    let _ = main_ctl.shutdown(Shutdown::Both);
                }
                r
            })
            .map_err(DestinationError::Connection)?
    };
    // The background push: one thread reads and decodes while this one places, so that
    // reading the socket and allocating pages overlap.
    let main_ctl = conns
        .main
        .try_clone()
        .map_err(DestinationError::Connection)?;
    let pushed = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Record, DestinationError>>(4);
        let reader = &mut conns.main_reader;
        s.spawn(move || {
            loop {
                let r = reader.next();
                let more = matches!(r, Ok(Record::PageBatch(_) | Record::PostcopyCommit));
                if tx.send(r).is_err() || !more {
                    return;
                }
            }
        });
        let mut last = Instant::now();
        let r = receive_pages(
            shared,
            &mut || {
                report_faults(shared, progress);
                if last.elapsed() >= PROGRESS_INTERVAL {
                    last = Instant::now();
                    let b = shared.lock();
                    let (total, missing) = (b.present().len() as u64, b.missing() as u64);
                    let s = b.stats(last);
                    drop(b);
                    progress(&ProgressEvent::Progress {
                        bytes_on_wire: (s.pages.pushed + s.pages.requested)
                            * shared.faulting.page_size() as u64,
                        pages_sent: total - missing,
                        pages_remaining: missing,
                        pages_total: total,
                        bandwidth_bps: 0.0,
                        dirty_rate_bps: 0.0,
                    });
                }
                rx.recv().unwrap_or_else(|_| {
                    Err(DestinationError::Connection(io::Error::other(
                        "the main stream's reader stopped",
                    )))
                })
            },
            Origin::Pushed,
        );
        if r.is_err() {
            // The reader may be waiting for bytes: end that.
            let _ = main_ctl.shutdown(Shutdown::Both);
        }
        r
    });
    let broken = match pushed {
        // The push is over: wait for the pages still in flight on the urgent channel.
        Ok(()) => {
            let mut b = shared.lock();
            loop {
                let failed = shared
                    .failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some();
                if b.is_complete() || failed {
                    break None;
                }
                if urgent_thread.is_finished() {
                    break Some("the urgent channel ended before every page arrived".to_string());
                }
                b = shared
                    .complete
                    .wait_timeout(b, Duration::from_millis(50))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
                let served = b.take_served();
                if !served.is_empty() {
                    drop(b);
                    emit_faults(served, progress);
                    b = shared.lock();
                }
            }
        }
        Err(DestinationError::Connection(e)) => Some(format!("main stream: {e}")),
        Err(e) => {
            let _ = conns.urgent.conn.shutdown(Shutdown::Both);
            let _ = urgent_thread.join();
            return Err(e);
        }
    };
    closing.store(true, Ordering::SeqCst);
    let _ = conns.urgent.conn.shutdown(Shutdown::Both);
    let urgent = urgent_thread.join().unwrap_or(Ok(()));
    if let Some(e) = shared
        .failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        return Err(e);
    }
    match urgent {
        Err(DestinationError::Connection(_)) | Ok(()) => {}
        Err(e) => return Err(e),
    }
    if shared.lock().is_complete() {
        return Ok(Service::Complete);
    }
    Ok(Service::Broken(
        broken.unwrap_or_else(|| "the urgent channel broke".into()),
    ))
}

/// Passes the faults served since the last call on as [`ProgressEvent::PageFault`].
fn report_faults<C: Connection>(shared: &Shared<C>, progress: &mut dyn FnMut(&ProgressEvent)) {
    let served = shared.lock().take_served();
    emit_faults(served, progress);
}

fn emit_faults(served: Vec<(u64, Duration)>, progress: &mut dyn FnMut(&ProgressEvent)) {
    for (page, latency) in served {
        progress(&ProgressEvent::PageFault { page, latency });
    }
}

/// Places the pages of one stream until its `Complete` (`Ok`) or a failure.
fn receive_pages<C: Connection>(
    shared: &Shared<C>,
    next: &mut dyn FnMut() -> Result<Record, DestinationError>,
    origin: Origin,
) -> Result<(), DestinationError> {
    let mut decoder = PageDecoder::new().map_err(|e| DestinationError::Protocol(e.to_string()))?;
    let mut staging = Vec::with_capacity(256 * shared.faulting.page_size());
    loop {
        match next()? {
            Record::PageBatch(b) => shared.place(&b, origin, &mut decoder, &mut staging)?,
            Record::Complete => return Ok(()),
            // A commit again (after a resume) changes nothing.
            Record::PostcopyCommit => {}
            Record::Abort { reason } => {
                return Err(DestinationError::Connection(io::Error::other(format!(
                    "the source aborted after the commit: {reason}"
                ))));
            }
            r => {
                return Err(DestinationError::Protocol(format!(
                    "a {} record during post-copy",
                    r.record_type()
                )));
            }
        }
    }
}

/// The fault thread: reads faults in bursts and requests each missing page once.
fn fault_loop<C: Connection>(shared: &Shared<C>) {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = shared.faulting.as_fd().as_raw_fd();
    let mut faults: Vec<Fault> = Vec::with_capacity(64);
    let (mut requests, mut wake) = (Vec::new(), Vec::new());
    while !shared.stop.load(Ordering::SeqCst) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a short timeout so that the stop flag is seen.
        let n = unsafe { libc::poll(&mut p, 1, 20) };
        if n <= 0 {
            continue;
        }
        faults.clear();
        if let Err(e) = shared.faulting.read_faults(&mut faults) {
            tracing::error!(%e, "reading faults");
            shared.fail(DestinationError::Placement { page: 0, source: e });
            return;
        }
        requests.clear();
        wake.clear();
        shared
            .lock()
            .on_faults(&faults, Instant::now(), &mut requests, &mut wake);
        shared.request(&requests);
        for &p in &wake {
            let _ = shared.faulting.wake(p..p + 1);
        }
    }
}
