//! The source of a post-copy migration.
//!
//! [`migrate`] runs a pure post-copy (the guest moves at once and its pages follow), or a
//! hybrid: pre-copy through [`migration_precopy::migrate`] first, switching when pre-copy
//! will not converge ([`Switch::Auto`]), after a number of passes or a time, or on the
//! operator's command ([`CancelToken::request_handover`], QEMU's `migrate_start_postcopy`),
//! whichever comes first. A hybrid that converges finishes as a pre-copy.
//!
//! The switch: in a pure post-copy, the destination's acknowledgement of the configuration
//! is awaited (it builds its VM from it, which is not downtime either); the urgent channel
//! is opened (before the guest pauses, so that connecting is not downtime), the guest
//! paused, the tracker synced a last time, the discard list
//! (pages dirtied since they were sent), the device state and `EndOfData` sent; then the
//! source waits for the destination's `PostcopyReady`. Until it writes `PostcopyCommit`
//! whole, any failure (or a cancel) resumes the guest here. From then on it never
//! resumes: the guest runs on the destination, and this side holds the only copy of the
//! pages the destination lacks. It serves page requests on the urgent channel, ahead of
//! the background push of every page the destination lacks (in address order, restarting
//! after each requested page), and ends both streams with `Complete`; the destination's
//! `Running` verdict, once it holds every page, ends the migration.
//!
//! A broken connection after the commit is not the end: this side dials the destination
//! again through the caller's `connect` (which may dial a new address an operator gave)
//! with backoff for up to [`SourceOptions::recovery_window`], sends the commit again, takes the
//! destination's received-pages bitmap for what is left to send, and goes on. Only when the
//! window passes does it give up, with [`SourceError::DestinationLost`]: the guest is lost
//! (resuming this side's stale copy would roll it back), and never reported as migrated.

pub mod machine;
pub mod plan;

use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use migration_core::bitmap::DirtyBitmap;
use migration_core::dirty::DirtyTracker;
use migration_core::geometry::GuestRam;
use migration_core::pagemap::populated_pages;
use migration_core::stats::{MigrationStats, Phase, ProgressEvent};
use migration_core::stream::{
    Ack, Config, DecoderOptions, Direction, Frame, HeaderFlags, PageBatchWriter, Record,
    ReturnDecoder, ReturnRecord, StreamHeader, Verdict,
};
use migration_core::transport::Connection;
use migration_core::vm::{VmControl, VmError};
use migration_precopy::{CancelToken, LimitPolicy, ReturnEvent, ReturnPath, SourceOutcome};
use vm_memory::GuestMemoryBackend;

pub use machine::{Served, SourceAction, SourceEvent, SourceMachine, SourcePhase, SwitchStart};
pub use plan::PushPlan;

use crate::stats::Recovery;

/// When a hybrid migration switches from pre-copy to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Switch {
    /// When pre-copy will not converge: passes stop shrinking what a pause would cost, or
    /// a limit of the pre-copy options is reached.
    #[default]
    Auto,
    /// After this many passes over dirty pages.
    AfterPasses(u32),
    /// After iterating this long.
    AfterTime(Duration),
    /// Only on the operator's command.
    OnCommand,
}

/// Pre-copy first or not.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Mode {
    /// Post-copy at once: the guest moves before any page.
    Pure,
    /// Pre-copy with these options, then post-copy when `switch` says.
    Hybrid {
        /// The pre-copy half (its limit policy is set to hand over).
        precopy: Box<migration_precopy::SourceOptions>,
        /// When to switch.
        switch: Switch,
    },
}

/// Settings of a post-copy source.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Pure or hybrid.
    pub mode: Mode,
    /// The VM's UUID, in every stream header (a hybrid takes its pre-copy options').
    pub vm_id: [u8; 16],
    /// The VMM's blob in the config record (pure post-copy; a hybrid's pre-copy options
    /// carry their own).
    pub vmm_blob: bytes::Bytes,
    /// Pages per background batch. Default 256.
    pub batch_pages: usize,
    /// How long to try to reach the destination again after a broken connection, once
    /// committed. Default 5 minutes.
    pub recovery_window: Duration,
    /// How long to wait for the destination's `PostcopyReady` at the switch (`None`: as
    /// long as the connection stays up). On expiry the guest resumes here.
    pub ready_timeout: Option<Duration>,
    /// How long a pure post-copy waits for the destination to build its VM from the
    /// configuration (its acknowledgement) before the guest pauses (`None`: as long as the
    /// connection stays up). On expiry the migration fails, the guest never paused.
    pub configured_timeout: Option<Duration>,
    /// The destination's longest record (its `max_record_len`), to split the discard
    /// list by. Default 64 MiB.
    pub max_record_len: u32,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            mode: Mode::Pure,
            vm_id: [0; 16],
            vmm_blob: bytes::Bytes::new(),
            batch_pages: 256,
            recovery_window: Duration::from_secs(300),
            ready_timeout: None,
            configured_timeout: None,
            max_record_len: migration_core::stream::DEFAULT_MAX_RECORD_LEN,
        }
    }
}

/// Why a post-copy source failed, and where the guest is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// Pre-copy failed before any switch: see its error for where the guest is (it runs
    /// here unless it says it was left paused).
    #[error("{0}")]
    Precopy(#[from] migration_precopy::SourceError),
    /// The switch failed before the commit: the guest runs here again (unless `resume`
    /// says otherwise).
    #[error("the switch to post-copy failed, {}: {why}", if .resume.is_none() { "the guest runs on the source" } else { "and resuming the guest failed" })]
    Switch {
        /// What failed.
        why: String,
        /// The resume's failure, if it failed.
        resume: Option<VmError>,
    },
    /// Cancelled before the commit: the guest runs here again.
    #[error("cancelled before the commit; the guest runs on the source")]
    Cancelled,
    /// The VMM refused an operation of the switch.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// After the commit the destination could not be reached again within the recovery
    /// window: the guest is lost. This side's copy is stale (the guest ran on the
    /// destination since), so resuming it would roll the guest back.
    #[error(
        "the destination was lost after the commit ({why}) and could not be reached again within \
         {window:?}: the guest is lost; this side's copy is stale, and resuming it would roll the \
         guest back to the commit"
    )]
    DestinationLost {
        /// What broke.
        why: String,
        /// The recovery window.
        window: Duration,
        /// Pages the destination did not have.
        missing: usize,
    },
}

impl SourceError {
    /// Whether the guest still runs somewhere: on this side before the commit, nowhere
    /// after a lost destination.
    pub fn guest_lost(&self) -> bool {
        matches!(self, SourceError::DestinationLost { .. })
    }
}

/// What a post-copy source reports.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SourceReport {
    /// Pre-copy's part (empty for a pure post-copy).
    pub precopy: MigrationStats,
    /// Why pre-copy handed over (empty for a pure post-copy).
    pub switch_reason: String,
    /// From the pause to the commit written.
    pub downtime: Duration,
    /// From the commit to the destination's final verdict.
    pub postcopy_time: Duration,
    /// From the start to the end.
    pub total_time: Duration,
    /// Pages pushed in the background.
    pub pages_pushed: u64,
    /// Pages sent in answer to requests.
    pub pages_requested: u64,
    /// Page requests served.
    pub requests: u64,
    /// Bytes written on the main stream and the urgent channel during post-copy.
    pub bytes: u64,
    /// Pages the discard list named.
    pub discarded: u64,
    /// Recoveries from broken connections.
    pub recoveries: Vec<Recovery>,
}

/// How a hybrid migration ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// Pre-copy converged: no switch was needed.
    Precopy(MigrationStats),
    /// The guest moved by post-copy and every page followed.
    Postcopy(SourceReport),
}

/// Opens a new connection to the destination: the urgent channel, and new connections
/// after a break.
pub type Connect<'a, C> = dyn FnMut() -> io::Result<C> + 'a;

/// Migrates the guest (see the [module docs](self)). `conn` is the main connection;
/// `connect` opens the others. `tracker` covers `ram` and is not started (a pure
/// post-copy does not use it).
#[allow(clippy::too_many_arguments)]
pub fn migrate<M, V, T, C>(
    ram: &GuestRam<'_, M>,
    vm: &mut V,
    tracker: T,
    conn: C,
    connect: &mut Connect<'_, C>,
    opts: &SourceOptions,
    control: &CancelToken,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> Result<Outcome, SourceError>
where
    M: GuestMemoryBackend + Sync,
    V: VmControl + ?Sized,
    T: DirtyTracker,
    C: Connection,
{
    let started = Instant::now();
    let layout = ram.layout();
    let pages = layout.page_count();
    match &opts.mode {
        Mode::Pure => {
            progress(&ProgressEvent::Phase(Phase::Setup));
            let mut conn = conn;
            let setup = (|| {
                conn.set_nodelay(true)?;
                let mut out = BytesMut::new();
                StreamHeader::new(opts.vm_id).encode(Direction::Migration, &mut out);
                Record::Config(Config::from_layout(layout, opts.vmm_blob.clone())).encode(&mut out);
                conn.write_all(&out)?;
                Ok::<_, io::Error>((
                    ReturnPath::start(conn.try_clone()?, opts.vm_id, pages as u64)?,
                    out.len() as u64,
                ))
            })();
            let (mut returns, configured) = setup.map_err(|e| SourceError::Switch {
                why: format!("setting up the connection: {e}"),
                resume: None,
            })?;
            // The destination builds its VM from the configuration: the guest pauses only
            // once it has (its acknowledgement of the configuration's end), so that the
            // pause is the switch alone.
            await_configured(&mut returns, configured, opts.configured_timeout)
                .map_err(|why| SourceError::Switch { why, resume: None })?;
            // Every page goes in post-copy: what the kernel never backed goes as zero pages.
            let need = DirtyBitmap::new_full(pages);
            let sw = Switching {
                conn,
                returns,
                need,
                discard: DirtyBitmap::new(pages),
                throttle: 0,
                precopy: MigrationStats::default(),
                reason: String::new(),
            };
            let mut none: Option<T> = None;
            drop(tracker);
            switch_and_run(
                ram, vm, &mut none, sw, connect, opts, control, started, progress,
            )
            .map(Outcome::Postcopy)
        }
        Mode::Hybrid { precopy, switch } => {
            let mut pre = (**precopy).clone();
            pre.limit_policy = LimitPolicy::HandOver;
            match switch {
                Switch::Auto => {
                    pre.give_up_after_stalled = pre.give_up_after_stalled.or(Some(3));
                }
                Switch::AfterPasses(n) => pre.max_iterations = Some(*n),
                Switch::AfterTime(d) => pre.max_time = Some(*d),
                Switch::OnCommand => {}
            }
            match migration_precopy::migrate(ram, vm, tracker, conn, &pre, control, progress)? {
                SourceOutcome::Completed(stats) => Ok(Outcome::Precopy(stats)),
                SourceOutcome::LimitReached(h) => {
                    let h = *h;
                    tracing::info!(reason = %h.not_converged.limit, dirty = h.dirty.count(), "switching to post-copy");
                    let discard = h.dirty.clone();
                    let sw = Switching {
                        conn: h.channel.into_inner(),
                        returns: h.returns,
                        need: h.dirty,
                        discard,
                        throttle: h.throttle_pct,
                        precopy: h.stats,
                        reason: h.not_converged.limit.to_string(),
                    };
                    let mut tracker = Some(h.tracker);
                    let o = SourceOptions {
                        vm_id: pre.vm_id,
                        ..opts.clone()
                    };
                    switch_and_run(
                        ram,
                        vm,
                        &mut tracker,
                        sw,
                        connect,
                        &o,
                        control,
                        started,
                        progress,
                    )
                    .map(Outcome::Postcopy)
                }
            }
        }
    }
}

/// What the switch starts from.
struct Switching<C> {
    conn: C,
    returns: ReturnPath,
    /// Pages the destination lacks (before the final sync).
    need: DirtyBitmap,
    /// Pages it must drop (before the final sync).
    discard: DirtyBitmap,
    throttle: u8,
    precopy: MigrationStats,
    reason: String,
}

/// The connections of page service.
struct Conns<C> {
    main: C,
    returns: ReturnPath,
    urgent: Option<Urgent<C>>,
}

impl<C: Connection> Conns<C> {
    fn shutdown(&mut self) {
        let _ = self.main.shutdown(Shutdown::Both);
        if let Some(u) = &self.urgent {
            let _ = u.conn.shutdown(Shutdown::Both);
        }
    }
}

/// Runs [`SourceMachine`] from the switch to the end: does what it asks on `vm`, the
/// tracker and the connections.
#[allow(clippy::too_many_arguments)]
fn switch_and_run<M, V, T, C>(
    ram: &GuestRam<'_, M>,
    vm: &mut V,
    tracker: &mut Option<T>,
    sw: Switching<C>,
    connect: &mut Connect<'_, C>,
    opts: &SourceOptions,
    control: &CancelToken,
    started: Instant,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> Result<SourceReport, SourceError>
where
    M: GuestMemoryBackend + Sync,
    V: VmControl + ?Sized,
    T: DirtyTracker,
    C: Connection,
{
    let pages = ram.layout().page_count();
    let mut m = SourceMachine::new(
        SwitchStart {
            need: sw.need,
            discard: sw.discard,
            tracker: tracker.is_some(),
            throttle: sw.throttle,
            precopy: sw.precopy,
            reason: sw.reason,
            started,
        },
        opts,
    );
    let mut conns = Some(Conns {
        main: sw.conn,
        returns: sw.returns,
        urgent: None,
    });
    let mut cancel_seen = false;
    loop {
        while let Some(e) = m.poll_event() {
            progress(&e);
        }
        if !cancel_seen && control.is_cancelled() {
            cancel_seen = true;
            m.handle(SourceEvent::Cancel, Instant::now());
        }
        let event = match m.poll(Instant::now()) {
            SourceAction::OpenUrgent => SourceEvent::UrgentOpened(
                open_urgent(connect, opts.vm_id, pages as u64, HeaderFlags::URGENT)
                    .map(|u| {
                        if let Some(c) = conns.as_mut() {
                            c.urgent = Some(u);
                        }
                    })
                    .map_err(|e| e.to_string()),
            ),
            SourceAction::Pause => SourceEvent::Paused(vm.pause()),
            SourceAction::Resume => SourceEvent::Resumed(vm.resume()),
            SourceAction::SetThrottle(p) => SourceEvent::Throttled(vm.set_throttle(p)),
            SourceAction::SyncTracker => {
                let t = tracker
                    .as_mut()
                    .expect("the machine syncs only a tracker it has");
                let mut last = ram.layout().new_bitmap();
                SourceEvent::Synced(
                    t.sync_and_clear(&mut last)
                        .map(|()| last)
                        .map_err(|e| e.to_string()),
                )
            }
            SourceAction::StopTracker => SourceEvent::TrackerStopped(
                tracker
                    .as_mut()
                    .map_or(Ok(()), |t| t.stop().map_err(|e| e.to_string())),
            ),
            SourceAction::SaveDeviceState => SourceEvent::DeviceState(vm.save_device_state()),
            SourceAction::SendSwitch => {
                let mut out = BytesMut::new();
                m.write_switch(&mut out);
                SourceEvent::Sent(send(&mut conns, &out))
            }
            SourceAction::SendCommit => {
                let mut out = BytesMut::new();
                Record::PostcopyCommit.encode(&mut out);
                SourceEvent::Sent(send(&mut conns, &out))
            }
            SourceAction::Wait { until } => {
                // Short waits, so that a cancel is seen.
                let wait = until.map_or(Duration::from_millis(50), |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50))
                });
                let c = conns.as_mut().expect("connections before the commit");
                match c.returns.next(Some(wait)) {
                    Some(ReturnEvent::Record(r)) => {
                        m.handle(SourceEvent::Return(r), Instant::now())
                    }
                    Some(ReturnEvent::Closed(why)) => m.handle(
                        SourceEvent::ReturnClosed(why.map(|w| w.to_string())),
                        Instant::now(),
                    ),
                    Some(_) | None => {}
                }
                continue;
            }
            SourceAction::Serve => {
                let c = conns.take().expect("connections to serve on");
                let (r, served) = serve(ram, m.plan(), c, opts);
                SourceEvent::Served(r, served)
            }
            SourceAction::Dial => SourceEvent::Dialled(try_resume(connect, opts, pages).map(
                |(main, returns, urgent, bitmap)| {
                    conns = Some(Conns {
                        main,
                        returns,
                        urgent: Some(urgent),
                    });
                    bitmap
                },
            )),
            SourceAction::Sleep { until } => {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                continue;
            }
            SourceAction::Close => {
                if let Some(c) = conns.as_mut() {
                    c.shutdown();
                }
                continue;
            }
            SourceAction::Done => {
                while let Some(e) = m.poll_event() {
                    progress(&e);
                }
                return m.take_result().expect("a result at the end");
            }
        };
        m.handle(event, Instant::now());
    }
}

fn send<C: Connection>(conns: &mut Option<Conns<C>>, out: &[u8]) -> Result<(), String> {
    conns
        .as_mut()
        .ok_or_else(|| "no connection".to_string())?
        .main
        .write_all(out)
        .map_err(|e| e.to_string())
}

/// Waits (for at most `timeout`, or as long as the return path lasts) for the
/// destination's acknowledgement that it applied the stream up to `offset` (its VM
/// exists); why not, when it refused or went away.
fn await_configured(
    returns: &mut ReturnPath,
    offset: u64,
    timeout: Option<Duration>,
) -> Result<(), String> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if let (Some(t), Some(left)) = (timeout, left)
            && left.is_zero()
        {
            return Err(format!(
                "the destination did not take the configuration within {t:?}"
            ));
        }
        match returns.next(left) {
            Some(ReturnEvent::Record(ReturnRecord::Ack(Ack::StreamOffset(n)))) if n >= offset => {
                return Ok(());
            }
            Some(ReturnEvent::Record(ReturnRecord::Verdict(Verdict::Failed { reason }))) => {
                return Err(format!("the destination refused the migration: {reason}"));
            }
            Some(ReturnEvent::Closed(why)) => {
                return Err(format!(
                    "the destination closed the return path before taking the configuration{}",
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                ));
            }
            Some(_) => {}
            // Without a deadline the wait ends only with the return path.
            None if timeout.is_none() => {
                return Err(
                    "the return path ended before the destination took the configuration".into(),
                );
            }
            None => {}
        }
    }
}

/// The urgent channel, with what was read of its return side so far (the destination's
/// header, when a resume waited for it).
struct Urgent<C> {
    conn: C,
    dec: ReturnDecoder,
    input: BytesMut,
}

impl<C: Connection> Urgent<C> {
    /// Waits until `deadline` for the destination's answer on this channel (its return
    /// header): until then the destination may still drop the channel, and a source that
    /// took the resume as done would push into a main stream nobody reads.
    fn await_answer(&mut self, deadline: Instant) -> Result<(), String> {
        let mut read = self.conn.try_clone().map_err(|e| e.to_string())?;
        loop {
            match self.dec.decode(&mut self.input) {
                Ok(Some(Frame::Header(_))) => break,
                Ok(Some(Frame::Record(r))) => {
                    return Err(format!(
                        "the urgent channel's answer began with a {} record",
                        r.record_type()
                    ));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("the urgent channel's answer: {e}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("no answer on the urgent channel".into());
            }
            read.set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match read.read_into(&mut self.input, 4096) {
                Ok(0) => return Err("the destination closed the urgent channel".into()),
                Ok(_) => {}
                // The deadline is checked above.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("the urgent channel's answer: {e}")),
            }
        }
        read.set_read_timeout(None).map_err(|e| e.to_string())
    }
}

fn open_urgent<C: Connection>(
    connect: &mut Connect<'_, C>,
    vm_id: [u8; 16],
    pages: u64,
    flags: HeaderFlags,
) -> io::Result<Urgent<C>> {
    let mut conn = connect()?;
    conn.set_nodelay(true)?;
    let mut out = BytesMut::new();
    StreamHeader {
        flags,
        vm_uuid: vm_id,
    }
    .encode(Direction::Migration, &mut out);
    conn.write_all(&out)?;
    Ok(Urgent {
        conn,
        dec: ReturnDecoder::new(DecoderOptions {
            expected_vm: Some(vm_id),
            page_count: Some(pages),
            ..DecoderOptions::default()
        }),
        input: BytesMut::with_capacity(4096),
    })
}

#[allow(clippy::type_complexity)]
fn try_resume<C: Connection>(
    connect: &mut Connect<'_, C>,
    opts: &SourceOptions,
    pages: usize,
) -> Result<(C, ReturnPath, Urgent<C>, DirtyBitmap), String> {
    let mut conn = connect().map_err(|e| format!("connecting: {e}"))?;
    let setup = (|| -> io::Result<ReturnPath> {
        conn.set_nodelay(true)?;
        let mut out = BytesMut::new();
        StreamHeader {
            flags: HeaderFlags::POSTCOPY_RESUME,
            vm_uuid: opts.vm_id,
        }
        .encode(Direction::Migration, &mut out);
        conn.write_all(&out)?;
        ReturnPath::start(conn.try_clone()?, opts.vm_id, pages as u64)
    })();
    let mut returns = setup.map_err(|e| format!("resuming the main stream: {e}"))?;
    let mut urgent = open_urgent(
        connect,
        opts.vm_id,
        pages as u64,
        HeaderFlags::URGENT | HeaderFlags::POSTCOPY_RESUME,
    )
    .map_err(|e| {
        let _ = conn.shutdown(Shutdown::Both);
        format!("resuming the urgent channel: {e}")
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let bitmap = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match returns.next(Some(left)) {
            Some(ReturnEvent::Record(ReturnRecord::ReceivedBitmap(b))) => break b,
            Some(ReturnEvent::Record(_)) => {}
            Some(ReturnEvent::Closed(why)) => {
                let _ = urgent.conn.shutdown(Shutdown::Both);
                return Err(format!(
                    "the destination closed the resumed stream{}",
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                ));
            }
            Some(_) => {}
            None => {
                let _ = conn.shutdown(Shutdown::Both);
                let _ = urgent.conn.shutdown(Shutdown::Both);
                return Err("no received-pages bitmap from the destination".into());
            }
        }
    };
    // The destination answers the urgent channel after the main stream: once it has, it
    // holds the pair and takes the commit below.
    if let Err(e) = urgent.await_answer(deadline) {
        let _ = conn.shutdown(Shutdown::Both);
        let _ = urgent.conn.shutdown(Shutdown::Both);
        return Err(e);
    }
    // The commit again: one lost with the old connection is taken up.
    let mut out = BytesMut::new();
    Record::PostcopyCommit.encode(&mut out);
    conn.write_all(&out)
        .map_err(|e| format!("committing again: {e}"))?;
    Ok((conn, returns, urgent, bitmap))
}

/// Serves one pair of connections until the destination's final verdict (`Ok`) or a
/// break (`Err` with why).
fn serve<M, C>(
    ram: &GuestRam<'_, M>,
    plan: &Mutex<PushPlan>,
    conns: Conns<C>,
    opts: &SourceOptions,
) -> (Result<(), String>, Served)
where
    M: GuestMemoryBackend + Sync,
    C: Connection,
{
    let Conns {
        main: mut conn,
        mut returns,
        urgent,
    } = conns;
    let mut total = Served::default();
    let Some(urgent) = urgent else {
        return (Err("no urgent channel".into()), total);
    };
    let r = serve_on(ram, plan, &mut conn, &mut returns, urgent, opts, &mut total);
    (r, total)
}

fn serve_on<M, C>(
    ram: &GuestRam<'_, M>,
    plan: &Mutex<PushPlan>,
    conn: &mut C,
    returns: &mut ReturnPath,
    urgent: Urgent<C>,
    opts: &SourceOptions,
    total: &mut Served,
) -> Result<(), String>
where
    M: GuestMemoryBackend + Sync,
    C: Connection,
{
    let ps = ram.layout().page_size() as usize;
    let broken = Arc::new(AtomicBool::new(false));
    // Set before the push's end is written: from then on the destination may close the
    // urgent channel under an answer it no longer needs (the page came by the push), and
    // the main stream alone says how the post-copy ends (a verdict, or a break).
    let push_ended = Arc::new(AtomicBool::new(false));
    let populated = populated_pages(ram.memory(), ram.layout()).ok();
    std::thread::scope(|s| {
        let urgent_ctl = urgent.conn.try_clone().map_err(|e| e.to_string())?;
        let main_ctl = conn.try_clone().map_err(|e| e.to_string())?;
        let b = broken.clone();
        let ended = push_ended.clone();
        let server = s.spawn(move || {
            let mut served = Served::default();
            let r = serve_requests(ram, plan, urgent, &mut served);
            if let Err(e) = &r
                && ended.load(Ordering::SeqCst)
            {
                tracing::debug!(%e, "the urgent channel ended after the push");
            } else if r.is_err() {
                b.store(true, Ordering::SeqCst);
                // The push must notice at once.
                let _ = main_ctl.shutdown(Shutdown::Both);
            }
            served
        });
        // The background push: this thread reads and encodes pages while a writer thread
        // sends the previous batch.
        let push = (|| -> Result<(), String> {
            let cap = opts.batch_pages * (ps + 16) + 64;
            let (to_writer, batches) = std::sync::mpsc::sync_channel::<BytesMut>(2);
            let (to_pusher, free) = std::sync::mpsc::channel::<BytesMut>();
            for _ in 0..3 {
                to_pusher
                    .send(BytesMut::with_capacity(cap))
                    .expect("receiver alive");
            }
            let mut wconn = conn.try_clone().map_err(|e| e.to_string())?;
            let writer = s.spawn(move || -> Result<(), String> {
                for buf in batches {
                    wconn
                        .write_all(&buf)
                        .map_err(|e| format!("pushing pages: {e}"))?;
                    // The pusher may be gone already (it stopped on an error).
                    let _ = to_pusher.send(buf);
                }
                Ok(())
            });
            let pushed = (|| -> Result<(), String> {
                loop {
                    if broken.load(Ordering::SeqCst) {
                        return Err("the urgent channel broke".into());
                    }
                    if let Some(ReturnEvent::Closed(Some(e))) = returns.try_next() {
                        return Err(format!("main return path: {e}"));
                    }
                    let run = plan
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .next_run(opts.batch_pages);
                    let Some(run) = run else { return Ok(()) };
                    let Ok(mut buf) = free.recv() else {
                        // The writer stopped: its error says why.
                        return Ok(());
                    };
                    buf.clear();
                    encode_pages(ram, run.clone(), populated.as_ref(), &mut buf)
                        .map_err(|e| format!("reading guest RAM: {e}"))?;
                    total.pushed += run.len() as u64;
                    total.bytes += buf.len() as u64;
                    if to_writer.send(buf).is_err() {
                        return Ok(());
                    }
                }
            })();
            drop(to_writer);
            let written = writer
                .join()
                .unwrap_or_else(|_| Err("the writer panicked".into()));
            pushed?;
            written?;
            push_ended.store(true, Ordering::SeqCst);
            let mut out = BytesMut::new();
            Record::Complete.encode(&mut out);
            conn.write_all(&out)
                .map_err(|e| format!("ending the push: {e}"))?;
            // The destination says when it holds every page (urgent answers may still be
            // on their way).
            loop {
                match returns.next(Some(Duration::from_millis(50))) {
                    Some(ReturnEvent::Record(ReturnRecord::Verdict(Verdict::Running))) => {
                        return Ok(());
                    }
                    Some(ReturnEvent::Record(ReturnRecord::Verdict(Verdict::Failed {
                        reason,
                    }))) => {
                        return Err(format!("the destination failed: {reason}"));
                    }
                    Some(ReturnEvent::Closed(why)) => {
                        return Err(format!(
                            "main return path closed before the final verdict{}",
                            why.map(|w| format!(": {w}")).unwrap_or_default()
                        ));
                    }
                    // A break of the urgent channel alone is the destination's to see:
                    // it ends the main stream if it still lacks pages.
                    _ => {}
                }
            }
        })();
        // Done or broken: stop the server either way.
        let _ = urgent_ctl.shutdown(Shutdown::Both);
        if push.is_err() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        // What was served counts however the channel ended.
        let served = server.join().unwrap_or_default();
        total.requested += served.requested;
        total.requests += served.requests;
        total.bytes += served.bytes;
        push
    })
}

/// Answers page requests on the urgent channel until it ends.
fn serve_requests<M: GuestMemoryBackend, C: Connection>(
    ram: &GuestRam<'_, M>,
    plan: &Mutex<PushPlan>,
    urgent: Urgent<C>,
    served: &mut Served,
) -> Result<(), String> {
    let Urgent {
        conn: mut urgent,
        mut dec,
        mut input,
    } = urgent;
    let mut out = BytesMut::with_capacity(64 << 10);
    let mut read = urgent.try_clone().map_err(|e| e.to_string())?;
    loop {
        loop {
            match dec.decode(&mut input) {
                Ok(Some(Frame::Record(ReturnRecord::PageRequest { page, count }))) => {
                    let run = page as usize..(page + u64::from(count)) as usize;
                    plan.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .requested(run.clone());
                    out.clear();
                    encode_pages(ram, run.clone(), None, &mut out)
                        .map_err(|e| format!("reading guest RAM: {e}"))?;
                    urgent
                        .write_all(&out)
                        .map_err(|e| format!("answering a page request: {e}"))?;
                    served.requests += 1;
                    served.requested += run.len() as u64;
                    served.bytes += out.len() as u64;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(format!("urgent return path: {e}")),
            }
        }
        match read.read_into(&mut input, 4096) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return if served.requests > 0 || e.kind() != io::ErrorKind::NotConnected {
                    Err(format!("urgent channel: {e}"))
                } else {
                    Ok(())
                };
            }
        }
    }
}

/// Appends one page-batch record of `run` read from `ram` (split at region boundaries):
/// pages the kernel never backed (`populated` says) as zero pages unread.
fn encode_pages<M: GuestMemoryBackend>(
    ram: &GuestRam<'_, M>,
    run: Range<usize>,
    populated: Option<&DirtyBitmap>,
    out: &mut BytesMut,
) -> Result<(), migration_core::geometry::RamAccessError> {
    let ps = ram.layout().page_size() as usize;
    let mut w = PageBatchWriter::new(out, ps as u32);
    for (_, piece) in ram.layout().split_at_regions(run) {
        let slice = ram.pages_slice(piece.start, piece.len())?;
        let base = slice.ptr_guard().as_ptr();
        for (i, idx) in piece.enumerate() {
            if populated.is_some_and(|p| !p.test(idx)) {
                w.push_zero(idx as u64);
                continue;
            }
            // SAFETY: the piece lies in one mapping from `base`, which lives as long as
            // `ram`; the guest is paused, and `push_raw_from` allows for writes anyway.
            unsafe { w.push_raw_from(idx as u64, base.add(i * ps)) };
        }
    }
    w.finish();
    Ok(())
}
