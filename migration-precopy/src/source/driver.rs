//! The threaded driver of [`SourceMachine`]: what most VMMs call.
//!
//! Three threads: this one runs the machine, reads guest RAM and encodes pages; a writer
//! thread sends filled buffers, so that encoding the next batch overlaps the system call
//! that sends this one; a reader thread decodes the return path.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use migration_core::dirty::DirtyTracker;
use migration_core::geometry::GuestRam;
use migration_core::pagemap::populated_pages;
use migration_core::stats::{Phase, ProgressEvent};
use migration_core::transport::{Channel, Connection};
use migration_core::vm::VmControl;
use vm_memory::GuestMemoryBackend;

use super::machine::{SourceAction, SourceEvent, SourceMachine, SourceResult};
use super::{HandOver, SourceError, SourceOptions, SourceOutcome};
use crate::link::{CancelToken, ReturnEvent, ReturnPath, Sender};

/// Longest a wait for the return path blocks before the cancel flag is looked at again.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Migrates the guest whose RAM is `ram` and whose vCPUs and devices `vm` controls, over
/// `conn`. `tracker` must cover `ram`'s layout and not be started yet.
///
/// Blocks until the destination's verdict; `cancel` stops it from another thread;
/// `progress` sees phases, periodic progress, each finished pass and throttle changes.
pub fn migrate<M, V, T, C>(
    ram: &GuestRam<'_, M>,
    vm: &mut V,
    tracker: T,
    conn: C,
    opts: &SourceOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> Result<SourceOutcome<T, C>, SourceError>
where
    M: GuestMemoryBackend,
    V: VmControl + ?Sized,
    T: DirtyTracker,
    C: Connection,
{
    let mut tracker = tracker;
    let mut m = SourceMachine::new(ram.layout().clone(), opts, Instant::now())?;
    while let Some(e) = m.poll_event() {
        progress(&e);
    }
    let setup = || -> std::io::Result<(C, ReturnPath)> {
        conn.set_nodelay(true)?;
        let ret = conn.try_clone()?;
        let ctl = conn.try_clone()?;
        cancel.attach(&ctl)?;
        let returns = ReturnPath::start(ret, opts.vm_id, ram.layout().page_count() as u64)?;
        Ok((ctl, returns))
    };
    let (ctl, returns) = match setup() {
        Ok(s) => s,
        Err(e) => {
            let _ = conn.shutdown(Shutdown::Both);
            cancel.detach();
            return Err(SourceError::Setup(e));
        }
    };
    let mut channel = Channel::new(conn);
    channel.set_rate_limit(opts.max_bandwidth);
    let sender = match Sender::new(channel, m.max_transmit_len()) {
        Ok(s) => s,
        Err(e) => {
            let _ = ctl.shutdown(Shutdown::Both);
            cancel.detach();
            return Err(SourceError::Setup(e));
        }
    };
    let mut d = Driver {
        m,
        ctl,
        returns,
        sender,
        cancel,
        cancel_seen: false,
        handover_seen: false,
    };
    d.run(ram, vm, &mut tracker, progress);
    let result = d.m.take_result();
    let Driver {
        ctl,
        returns,
        sender,
        ..
    } = d;
    cancel.detach();
    match result {
        Some(SourceResult::Completed(stats)) => {
            // The destination runs the guest; close our side.
            let _ = sender.into_channel();
            let _ = ctl.shutdown(Shutdown::Both);
            Ok(SourceOutcome::Completed(stats))
        }
        Some(SourceResult::HandOver {
            not_converged,
            dirty,
            stats,
            throttle_pct,
        }) => match sender.into_channel() {
            Ok(channel) => Ok(SourceOutcome::LimitReached(Box::new(HandOver {
                not_converged,
                tracker,
                dirty,
                channel,
                returns,
                stats,
                throttle_pct,
            }))),
            Err(source) => {
                // The writer thread is gone with the connection: nothing to hand over. The
                // guest runs here, unthrottled.
                let _ = ctl.shutdown(Shutdown::Both);
                if let Err(e) = tracker.stop() {
                    tracing::warn!(%e, "stopping the dirty tracker");
                }
                if throttle_pct != 0 {
                    vm.set_throttle(0)?;
                }
                Err(SourceError::Connection {
                    phase: Phase::Iterating,
                    source,
                })
            }
        },
        Some(SourceResult::Failed(e)) => Err(e),
        None => unreachable!("the machine returns Done only with a result"),
    }
}

struct Driver<'c, C: Connection> {
    m: SourceMachine,
    /// A handle to shut the connection down with.
    ctl: C,
    returns: ReturnPath,
    sender: Sender<C>,
    cancel: &'c CancelToken,
    cancel_seen: bool,
    handover_seen: bool,
}

impl<C: Connection> Driver<'_, C> {
    fn run<M, V, T>(
        &mut self,
        ram: &GuestRam<'_, M>,
        vm: &mut V,
        tracker: &mut T,
        progress: &mut dyn FnMut(&ProgressEvent),
    ) where
        M: GuestMemoryBackend,
        V: VmControl + ?Sized,
        T: DirtyTracker,
    {
        loop {
            // What the destination said meanwhile comes first: a verdict that arrived
            // before a cancel wins over it.
            while let Some(ev) = self.returns.try_next() {
                self.deliver(ev);
            }
            self.check_cancel();
            let action = self.m.poll(Instant::now());
            match action {
                SourceAction::Transmit => self.transmit(ram),
                SourceAction::Flush { deadline } => {
                    let r = self.flush(deadline);
                    self.link();
                    let ev = match r {
                        Ok(()) => SourceEvent::Flushed,
                        Err(e) => {
                            self.check_cancel();
                            SourceEvent::SendFailed(e)
                        }
                    };
                    self.m.handle(ev, Instant::now());
                }
                SourceAction::StartTracker => {
                    let r = tracker.start();
                    self.m
                        .handle(SourceEvent::TrackerStarted(r), Instant::now());
                }
                SourceAction::SyncTracker => {
                    let r = tracker.sync_and_clear(self.m.dirty_mut());
                    self.m.handle(SourceEvent::TrackerSynced(r), Instant::now());
                }
                SourceAction::StopTracker => {
                    let r = tracker.stop();
                    self.m
                        .handle(SourceEvent::TrackerStopped(r), Instant::now());
                }
                SourceAction::ScanPopulated => {
                    let p = populated_pages(ram.memory(), ram.layout())
                        .map_err(|e| tracing::debug!(%e, "reading every page of the bulk pass"))
                        .ok();
                    self.m.handle(SourceEvent::Populated(p), Instant::now());
                }
                SourceAction::Pause => {
                    let r = vm.pause();
                    self.m.handle(SourceEvent::Paused(r), Instant::now());
                }
                SourceAction::Resume => {
                    let r = vm.resume();
                    self.m.handle(SourceEvent::Resumed(r), Instant::now());
                }
                SourceAction::SetThrottle(p) => {
                    let r = vm.set_throttle(p);
                    self.m.handle(SourceEvent::Throttled(r), Instant::now());
                }
                SourceAction::SaveDeviceState => {
                    let r = vm.save_device_state();
                    tracing::debug!("device state saved");
                    self.m.handle(SourceEvent::DeviceState(r), Instant::now());
                }
                SourceAction::Wait { until } => {
                    let left = until.map_or(WAIT_SLICE, |u| {
                        u.saturating_duration_since(Instant::now()).min(WAIT_SLICE)
                    });
                    if let Some(ev) = self.returns.next(Some(left)) {
                        self.deliver(ev);
                    }
                }
                SourceAction::Close => {
                    let _ = self.ctl.shutdown(Shutdown::Both);
                }
                SourceAction::Done => break,
            }
            while let Some(e) = self.m.poll_event() {
                progress(&e);
            }
        }
        while let Some(e) = self.m.poll_event() {
            progress(&e);
        }
    }

    fn check_cancel(&mut self) {
        if !self.cancel_seen && self.cancel.is_cancelled() {
            self.cancel_seen = true;
            self.m.handle(SourceEvent::Cancel, Instant::now());
        }
        if !self.handover_seen && self.cancel.handover_requested() {
            self.handover_seen = true;
            self.m.handle(SourceEvent::HandOver, Instant::now());
        }
    }

    fn deliver(&mut self, ev: ReturnEvent) {
        let ev = match ev {
            ReturnEvent::Record(r) => SourceEvent::Return(r),
            ReturnEvent::Closed(why) => {
                // A cancel shuts the connection down: the reader's end is its echo.
                self.check_cancel();
                SourceEvent::ReturnClosed(why)
            }
        };
        self.m.handle(ev, Instant::now());
    }

    fn link(&mut self) {
        self.m
            .handle_link(self.sender.bytes_sent(), self.sender.busy());
    }

    fn transmit<M: GuestMemoryBackend>(&mut self, ram: &GuestRam<'_, M>) {
        let r = self.sender.buffer().and_then(|mut buf| {
            self.m.write_next(ram, &mut buf, Instant::now());
            self.sender.send(buf)
        });
        self.link();
        if let Err(e) = r {
            self.check_cancel();
            self.m.handle(SourceEvent::SendFailed(e), Instant::now());
        }
    }

    /// Waits until the writer thread wrote everything queued; past `deadline`, breaks the
    /// connection off so that a peer that stopped reading cannot hang the source.
    fn flush(&mut self, deadline: Option<Instant>) -> std::io::Result<()> {
        let Some(deadline) = deadline else {
            return self.sender.flush();
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        if let Ok(c) = self.ctl.try_clone() {
            let wait = deadline.saturating_duration_since(Instant::now());
            std::thread::spawn(move || {
                if done_rx.recv_timeout(wait) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    let _ = c.shutdown(Shutdown::Both);
                }
            });
        }
        let r = self.sender.flush();
        drop(done_tx);
        r
    }
}
