//! The destination's protocol as a state machine without I/O.
//!
//! The driver keeps an input buffer: [`DestinationMachine::poll`] decodes what it holds
//! and says what to do (read more, place these pages, send the return-path bytes, load
//! the device state, verify, resume); the driver does it and reports back with
//! [`DestinationMachine::handle`]. Time is passed in, never read inside.

use std::net::Shutdown;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use migration_core::layout::RamLayout;
use migration_core::stats::PageCounts;
use migration_core::stream::{
    Ack, Config, DecoderOptions, DeviceState, Direction, Frame, PageBatch, Record, ReturnRecord,
    StreamDecoder, StreamHeader, Verdict,
};
use migration_core::vm::VmError;

use super::{
    DestinationError, DestinationOptions, DestinationStats, ProtocolViolation, VerifyError,
};

/// What the driver does next.
#[derive(Debug)]
#[non_exhaustive]
pub enum DestinationAction {
    /// Read more of the stream into the input buffer and report
    /// [`DestinationEvent::Received`], or [`DestinationEvent::Eof`] at its end.
    NeedInput,
    /// Write [`DestinationMachine::take_transmit`]'s bytes to the return path and report
    /// [`DestinationEvent::Transmitted`].
    Transmit,
    /// The header and config arrived: the VMM may build its VM now (or
    /// [`refuse`](DestinationMachine::refuse)), then call
    /// [`begin`](DestinationMachine::begin).
    Configured,
    /// Put these pages into guest RAM and report [`DestinationEvent::PagesPlaced`].
    PlacePages(PageBatch),
    /// A pre-copy pass ended ([`DestinationMachine::stats`] has it): report progress now,
    /// before its acknowledgement goes out.
    PassEnded,
    /// Every page is in: finish placing pages (stop prefaulting, hand RAM back from
    /// userfaultfd) and report [`DestinationEvent::RamFinished`].
    FinishRam,
    /// Load [`DestinationMachine::device_states`] into the VM and report
    /// [`DestinationEvent::StateLoaded`].
    LoadDeviceState,
    /// Run the caller's checks over the loaded guest and report
    /// [`DestinationEvent::Verified`].
    Verify,
    /// The source committed: resume the guest and report [`DestinationEvent::Resumed`].
    Resume,
    /// The source switched to post-copy (only with
    /// [`DestinationOptions::postcopy`](super::DestinationOptions::postcopy)): placing pages
    /// is over here (finish it), and the rest of the stream goes to a post-copy engine with
    /// [`DestinationMachine::into_postcopy`].
    SwitchToPostcopy,
    /// Shut the connection down in this direction. No event follows.
    Shutdown(Shutdown),
    /// Finished: take the result with [`DestinationMachine::take_result`].
    Done,
}

/// What happened, for [`DestinationMachine::handle`].
#[derive(Debug)]
#[non_exhaustive]
pub enum DestinationEvent {
    /// `n` more bytes were appended to the input buffer.
    Received(usize),
    /// The stream ended.
    Eof,
    /// Reading the stream failed (a read timeout included).
    ReadFailed(std::io::Error),
    /// The return-path bytes were written, or not.
    Transmitted(std::io::Result<()>),
    /// The pages of the last [`DestinationAction::PlacePages`] are in place, or not.
    PagesPlaced(Result<PageCounts, DestinationError>),
    /// Page placement finished, or not.
    RamFinished(std::io::Result<()>),
    /// The device state was loaded, or refused.
    StateLoaded(Result<(), VmError>),
    /// The caller's checks passed, or not.
    Verified(Result<(), VerifyError>),
    /// The guest was resumed, or not.
    Resumed(Result<(), VmError>),
}

#[derive(Debug)]
enum State {
    /// Until the config record.
    Handshake,
    /// Waiting for [`DestinationMachine::begin`].
    Configured,
    Receiving,
    /// A page batch is being placed.
    Placing,
    /// A pass ended: report, then acknowledge it.
    PassEnded,
    FinishRam,
    LoadDevices,
    Verify,
    /// `Running` queued: waiting for it to be written.
    SendingVerdict,
    /// `Running` sent: only the source's `Complete` lets the guest run here.
    Ready,
    Resume,
    /// The guest runs here: close our direction and finish.
    Resumed,
    Failing {
        error: DestinationError,
    },
    /// The source switched to post-copy: the machine's part is over.
    Switched,
    Done,
}

/// The destination of a pre-copy migration, without I/O. See the [module docs](crate::destination).
#[derive(Debug)]
pub struct DestinationMachine {
    dec: StreamDecoder,
    state: State,
    out: BytesMut,
    header: Option<StreamHeader>,
    config: Option<Config>,
    states: Vec<DeviceState>,
    stats: DestinationStats,
    started: Instant,
    received: u64,
    /// `Running` was sent: no `Failed` may follow it.
    verdict_sent: bool,
    end_at: Option<Instant>,
    complete_at: Option<Instant>,
    verify_started: Option<Instant>,
    result: Option<Result<DestinationStats, DestinationError>>,
    /// The stream ended: what `input` holds is all there is.
    eof: bool,
    /// Accept a switch to post-copy.
    postcopy: bool,
    /// Pages to discard, from `DiscardPages` records before the switch.
    discard: Vec<std::ops::Range<u64>>,
}

/// What a post-copy engine takes over at the switch (see
/// [`DestinationMachine::into_postcopy`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct SwitchedStream {
    /// The migration stream's decoder, after the `SwitchToPostcopy` record.
    pub decoder: StreamDecoder,
    /// The stream header.
    pub header: StreamHeader,
    /// The source's configuration.
    pub config: Config,
    /// Every page to discard (all `DiscardPages` records and the switch's own list).
    pub discard: Vec<std::ops::Range<u64>>,
    /// What pre-copy received.
    pub stats: DestinationStats,
    /// Return-path bytes still to write (an acknowledgement), before anything else.
    pub unsent: Bytes,
}

impl DestinationMachine {
    /// A machine for one incoming stream, starting at `now`.
    pub fn new(opts: &DestinationOptions, now: Instant) -> Self {
        DestinationMachine {
            dec: StreamDecoder::new(DecoderOptions {
                max_record_len: opts.max_record_len,
                expected_vm: opts.expected_vm,
                ..DecoderOptions::default()
            }),
            state: State::Handshake,
            out: BytesMut::new(),
            header: None,
            config: None,
            states: Vec::new(),
            stats: DestinationStats::default(),
            started: now,
            received: 0,
            verdict_sent: false,
            end_at: None,
            complete_at: None,
            verify_started: None,
            result: None,
            eof: false,
            postcopy: opts.postcopy,
            discard: Vec::new(),
        }
    }

    /// The stream header, once read.
    pub fn header(&self) -> Option<&StreamHeader> {
        self.header.as_ref()
    }

    /// The source's configuration (RAM layout and the VMM's blob), once read.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// The device state received, all of it once `EndOfData` arrived.
    pub fn device_states(&self) -> &[DeviceState] {
        &self.states
    }

    /// What was received so far.
    pub fn stats(&self) -> &DestinationStats {
        &self.stats
    }

    /// The return-path bytes to write for a [`DestinationAction::Transmit`].
    pub fn take_transmit(&mut self) -> Bytes {
        self.out.split().freeze()
    }

    /// The result, once [`DestinationAction::Done`] was returned.
    pub fn take_result(&mut self) -> Option<Result<DestinationStats, DestinationError>> {
        self.result.take()
    }

    /// Starts receiving into RAM of `layout` (after [`DestinationAction::Configured`]),
    /// and says whether it did: a layout that is not the source's fails the migration.
    pub fn begin(&mut self, layout: &RamLayout) -> bool {
        let (State::Configured, Some(config)) = (&self.state, &self.config) else {
            return false;
        };
        let source = match config.layout() {
            Ok(l) => l,
            Err(e) => {
                self.fail(DestinationError::BadConfig(e));
                return false;
            }
        };
        if !same_layout(&source, layout) {
            self.fail(DestinationError::Layout {
                source_pages: source.page_count() as u64,
                local_pages: layout.page_count() as u64,
            });
            return false;
        }
        self.state = State::Receiving;
        // The VM exists: a source waiting to pause until it does (a pure post-copy) may
        // go on.
        ReturnRecord::Ack(Ack::StreamOffset(self.dec.offset())).encode(&mut self.out);
        true
    }

    /// Refuses the migration (this side cannot build a matching VM, say): a `Failed`
    /// verdict with `reason` goes to the source, then the connection closes.
    pub fn refuse(&mut self, reason: &str) {
        self.fail(DestinationError::Refused(reason.into()));
    }

    /// Hands what a post-copy engine needs over, after
    /// [`DestinationAction::SwitchToPostcopy`]; `None` before it.
    pub fn into_postcopy(mut self) -> Option<SwitchedStream> {
        if !matches!(self.state, State::Switched) {
            return None;
        }
        Some(SwitchedStream {
            header: self.header?,
            config: self.config.take()?,
            discard: std::mem::take(&mut self.discard),
            stats: std::mem::take(&mut self.stats),
            unsent: self.out.split().freeze(),
            decoder: self.dec,
        })
    }

    /// Fails the migration with `error`, for what the driver could not do (set up page
    /// placement, say): the source hears why, and the guest is not run here.
    pub fn abort(&mut self, error: DestinationError) {
        self.fail(error);
    }

    /// What the driver does next, decoding from `input` what it needs.
    ///
    /// # Panics
    /// If called while a [`DestinationAction::PlacePages`] awaits its
    /// [`DestinationEvent::PagesPlaced`]: the batch was handed out and is not kept.
    pub fn poll(&mut self, input: &mut BytesMut, now: Instant) -> DestinationAction {
        loop {
            match &self.state {
                State::Handshake | State::Receiving | State::Ready => {}
                State::Configured => return DestinationAction::Configured,
                State::Placing => unreachable_state("placing"),
                State::PassEnded | State::SendingVerdict => {
                    return DestinationAction::Transmit;
                }
                State::FinishRam => return DestinationAction::FinishRam,
                State::LoadDevices => return DestinationAction::LoadDeviceState,
                State::Verify => {
                    self.verify_started.get_or_insert(now);
                    return DestinationAction::Verify;
                }
                State::Resume => return DestinationAction::Resume,
                State::Resumed => {
                    self.stats.bytes_received = self.received;
                    self.stats.total_time = now.saturating_duration_since(self.started);
                    self.result = Some(Ok(self.stats.clone()));
                    self.state = State::Done;
                    return DestinationAction::Shutdown(Shutdown::Write);
                }
                State::Failing { .. } => {
                    if !self.out.is_empty() {
                        return DestinationAction::Transmit;
                    }
                    let State::Failing { error } = std::mem::replace(&mut self.state, State::Done)
                    else {
                        unreachable!("matched above")
                    };
                    tracing::warn!(%error, "incoming migration failed; the guest is not run here");
                    self.result = Some(Err(error));
                    return DestinationAction::Shutdown(Shutdown::Both);
                }
                State::Switched => return DestinationAction::SwitchToPostcopy,
                State::Done => return DestinationAction::Done,
            }
            if !self.out.is_empty() {
                return DestinationAction::Transmit;
            }
            let frame = match self.dec.decode(input) {
                Ok(Some(f)) => f,
                Ok(None) if self.eof => {
                    self.on_eof(input);
                    continue;
                }
                Ok(None) => return DestinationAction::NeedInput,
                Err(e) => {
                    self.fail(e.into());
                    continue;
                }
            };
            if let Some(a) = self.on_frame(frame, now) {
                return a;
            }
        }
    }

    fn on_frame(&mut self, frame: Frame<Record>, now: Instant) -> Option<DestinationAction> {
        let record = match frame {
            Frame::Header(h) => {
                self.header = Some(h);
                StreamHeader::new(h.vm_uuid).encode(Direction::Return, &mut self.out);
                return None;
            }
            Frame::Record(r) => r,
        };
        tracing::trace!(record = %record.record_type(), received = self.received, "record");
        if matches!(self.state, State::Handshake) {
            match record {
                Record::Config(c) => {
                    self.config = Some(c);
                    self.state = State::Configured;
                }
                Record::Abort { reason } => self.fail(DestinationError::Aborted(reason)),
                r => self.fail(DestinationError::NoConfig {
                    found: Some(r.record_type()),
                }),
            }
            return None;
        }
        if matches!(self.state, State::Ready) {
            match record {
                Record::Complete => {
                    self.complete_at = Some(now);
                    tracing::debug!(since_ready = ?self.end_at.map(|e| now.saturating_duration_since(e)), "commit received");
                    self.state = State::Resume;
                }
                Record::Abort { reason } => self.fail(DestinationError::Aborted(reason)),
                Record::EndOfData => self.fail(DestinationError::Protocol(
                    ProtocolViolation::SecondEndOfData,
                )),
                // RAM and state were checked and the verdict given: nothing may change
                // them any more.
                r => self.fail(DestinationError::Protocol(
                    ProtocolViolation::AfterEndOfData(r.record_type()),
                )),
            }
            return None;
        }
        match record {
            Record::PageBatch(batch) => {
                self.state = State::Placing;
                return Some(DestinationAction::PlacePages(batch));
            }
            Record::DeviceState(s) => self.states.push(s),
            Record::IterationEnd(it) => {
                self.stats.iterations.push(it);
                self.stats.bytes_received = self.received;
                ReturnRecord::Ack(Ack::Iteration(it.iteration)).encode(&mut self.out);
                self.state = State::PassEnded;
                // Reported before it is acknowledged: the source may pause its guest on
                // the acknowledgement, and whoever watches this side then has seen every
                // pass the guest was not paused for.
                return Some(DestinationAction::PassEnded);
            }
            Record::Abort { reason } => self.fail(DestinationError::Aborted(reason)),
            Record::EndOfData => {
                self.end_at = Some(now);
                self.stats.device_states = self.states.len();
                self.state = State::FinishRam;
            }
            Record::Complete => self.fail(DestinationError::Protocol(
                ProtocolViolation::CompleteBeforeEndOfData,
            )),
            // The decoder refuses a second config before it gets here.
            r @ Record::Config(_) => self.fail(DestinationError::Protocol(
                ProtocolViolation::Unexpected(r.record_type()),
            )),
            Record::DiscardPages(d) if self.postcopy => self.discard.extend(d),
            Record::SwitchToPostcopy { discard } if self.postcopy => {
                self.discard.extend(discard);
                self.stats.bytes_received = self.received;
                self.state = State::Switched;
                return Some(DestinationAction::SwitchToPostcopy);
            }
            r @ (Record::DiscardPages(_)
            | Record::SwitchToPostcopy { .. }
            | Record::PostcopyCommit) => self.fail(DestinationError::Protocol(
                ProtocolViolation::PostcopyRecord(r.record_type()),
            )),
        }
        None
    }

    /// Reports what happened.
    pub fn handle(&mut self, event: DestinationEvent, now: Instant) {
        match event {
            DestinationEvent::Received(n) => self.received += n as u64,
            DestinationEvent::Eof => self.eof = true,
            DestinationEvent::ReadFailed(e) => self.fail(DestinationError::Connection(e)),
            DestinationEvent::Transmitted(r) => match (&self.state, r) {
                (State::PassEnded, r) => {
                    // The stream is what counts: a source that already gave up may have
                    // closed its side, and its Abort is still to be read.
                    if let Err(e) = r {
                        tracing::debug!(%e, "acknowledging a pass");
                    }
                    self.state = State::Receiving;
                }
                (State::SendingVerdict, Ok(())) => {
                    self.verdict_sent = true;
                    tracing::debug!(since_end = ?self.since_end(now), "ready; waiting for the commit");
                    self.state = State::Ready;
                }
                (State::SendingVerdict, Err(e)) => self.fail(DestinationError::VerdictNotSent(e)),
                (_, Err(e)) => tracing::debug!(%e, "writing the return path"),
                (_, Ok(())) => {}
            },
            DestinationEvent::PagesPlaced(r) => {
                if !matches!(self.state, State::Placing) {
                    return;
                }
                match r {
                    Ok(c) => {
                        self.stats.pages.add(&c);
                        self.state = State::Receiving;
                    }
                    Err(e) => self.fail(e),
                }
            }
            DestinationEvent::RamFinished(r) => {
                if !matches!(self.state, State::FinishRam) {
                    return;
                }
                match r {
                    Ok(()) => self.state = State::LoadDevices,
                    Err(e) => self.fail(DestinationError::Placement(e)),
                }
            }
            DestinationEvent::StateLoaded(r) => {
                if !matches!(self.state, State::LoadDevices) {
                    return;
                }
                match r {
                    Ok(()) => {
                        tracing::debug!(since_end = ?self.since_end(now), "device state loaded");
                        self.state = State::Verify;
                    }
                    Err(e) => self.fail(e.into()),
                }
            }
            DestinationEvent::Verified(r) => {
                if !matches!(self.state, State::Verify) {
                    return;
                }
                if let Some(t) = self.verify_started {
                    self.stats.verify_time = now.saturating_duration_since(t);
                }
                match r {
                    Ok(()) => {
                        tracing::debug!(since_end = ?self.since_end(now), "verified");
                        ReturnRecord::Verdict(Verdict::Running).encode(&mut self.out);
                        self.state = State::SendingVerdict;
                    }
                    Err(e) => self.fail(DestinationError::Verify(e)),
                }
            }
            DestinationEvent::Resumed(r) => {
                if !matches!(self.state, State::Resume) {
                    return;
                }
                match r {
                    Ok(()) => {
                        if let Some(c) = self.complete_at {
                            self.stats.switchover = now.saturating_duration_since(c);
                        }
                        tracing::debug!(since_complete = ?self.stats.switchover, "resumed");
                        self.state = State::Resumed;
                    }
                    Err(e) => self.fail(DestinationError::ResumeAfterVerdict(e)),
                }
            }
        }
    }

    fn since_end(&self, now: Instant) -> Option<std::time::Duration> {
        self.end_at.map(|e| now.saturating_duration_since(e))
    }

    /// The stream ended; `input` holds what is left unread of it.
    fn on_eof(&mut self, input: &BytesMut) {
        let e = match self.state {
            State::Ready => DestinationError::Protocol(ProtocolViolation::EndedAfterVerdict),
            // A record cut short says more, and where, than what is missing.
            _ => match self.dec.finish(input) {
                Err(e) => e.into(),
                Ok(()) if matches!(self.state, State::Handshake) => {
                    DestinationError::NoConfig { found: None }
                }
                Ok(()) => DestinationError::Protocol(ProtocolViolation::EndedEarly),
            },
        };
        self.fail(e);
    }

    fn fail(&mut self, error: DestinationError) {
        if matches!(
            self.state,
            State::Failing { .. } | State::Done | State::Switched
        ) {
            return;
        }
        // After `Running`, a second verdict would contradict the first; before the header
        // there is no return path to say it on. What is queued already (the return
        // header, an acknowledgement) goes out first.
        if !self.verdict_sent && self.header.is_some() {
            ReturnRecord::Verdict(Verdict::Failed {
                reason: error.to_string(),
            })
            .encode(&mut self.out);
        }
        self.state = State::Failing { error };
    }
}

fn unreachable_state(what: &str) -> ! {
    unreachable!("poll while {what}: the driver must report the action's result first")
}

fn same_layout(a: &RamLayout, b: &RamLayout) -> bool {
    a.page_size() == b.page_size()
        && a.regions().len() == b.regions().len()
        && a.regions()
            .iter()
            .zip(b.regions())
            .all(|(x, y)| x.guest_base == y.guest_base && x.size == y.size)
}
