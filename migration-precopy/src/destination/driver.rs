//! The threaded driver of [`DestinationMachine`]: what most VMMs call.

use std::time::Instant;

use bytes::BytesMut;
use migration_core::bitmap::DirtyBitmap;
use migration_core::geometry::GuestRam;
use migration_core::stream::{Config, DeviceState, StreamHeader};
use migration_core::transport::{Connection, Stream};
use migration_core::vm::VmControl;
use vm_memory::GuestMemoryBackend;

use super::machine::{DestinationAction, DestinationEvent, DestinationMachine, SwitchedStream};
use super::ram::RamWriter;
use super::{DestinationError, DestinationOptions, DestinationStats, Placement, VerifyError};

/// Bytes asked of the connection per read.
const READ_CHUNK: usize = 256 << 10;

/// How [`Incoming::receive_or_switch`] ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum Received<C: Connection> {
    /// A pre-copy migration completed: the guest runs here.
    Completed(DestinationStats),
    /// The source switched to post-copy.
    Postcopy(Box<PostcopySwitch<C>>),
}

/// What a post-copy engine takes over at the switch.
#[derive(Debug)]
#[non_exhaustive]
pub struct PostcopySwitch<C> {
    /// The migration connection.
    pub conn: C,
    /// Bytes read from it and not decoded yet: the rest of the stream starts here.
    pub input: BytesMut,
    /// The stream's decoder and what came before the switch.
    pub stream: SwitchedStream,
    /// Pages whose content arrived (written into guest RAM, or zero pages, which fresh RAM
    /// already reads as without being touched), before the discard list is applied.
    /// Every other page may hold anything the destination's own placement left there
    /// (prefaulted zeros): a post-copy engine treats it as missing.
    pub received: DirtyBitmap,
}

/// An incoming migration whose header and config were read.
pub struct Incoming<C: Connection = Stream> {
    m: DestinationMachine,
    conn: C,
    buf: BytesMut,
    placement: Placement,
}

impl<C: Connection> std::fmt::Debug for Incoming<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("header", &self.m.header())
            .field("config", &self.m.config())
            .finish_non_exhaustive()
    }
}

impl<C: Connection> Incoming<C> {
    /// Reads the stream header and the config record from `conn`, and answers with the
    /// return-path header. A stream that is not a migration, for another VM, or that does
    /// not start with its config is refused (with a `Failed` verdict where possible).
    pub fn accept(conn: C, opts: &DestinationOptions) -> Result<Self, DestinationError> {
        let mut inc = Incoming {
            m: DestinationMachine::new(opts, Instant::now()),
            conn,
            buf: BytesMut::with_capacity(READ_CHUNK * 2),
            placement: opts.placement,
        };
        let setup = inc
            .conn
            .set_read_timeout(opts.idle_timeout)
            .and_then(|()| inc.conn.set_nodelay(true));
        if let Err(e) = setup {
            let _ = inc.conn.shutdown(std::net::Shutdown::Both);
            return Err(DestinationError::Connection(e));
        }
        loop {
            match inc.m.poll(&mut inc.buf, Instant::now()) {
                DestinationAction::Configured => return Ok(inc),
                DestinationAction::NeedInput => inc.read(),
                DestinationAction::Transmit => inc.transmit(),
                DestinationAction::Shutdown(how) => {
                    let _ = inc.conn.shutdown(how);
                }
                DestinationAction::Done => {
                    return Err(inc
                        .m
                        .take_result()
                        .and_then(Result::err)
                        .unwrap_or(DestinationError::NoConfig { found: None }));
                }
                other => unreachable!("{other:?} before the configuration"),
            }
        }
    }

    /// The source's configuration: RAM layout and VMM blob.
    pub fn config(&self) -> &Config {
        self.m.config().expect("accepted only with a configuration")
    }

    /// The stream header (VM UUID, flags).
    pub fn header(&self) -> &StreamHeader {
        self.m.header().expect("accepted only after the header")
    }

    /// Refuses the migration (this side cannot build a matching VM, say): sends a `Failed`
    /// verdict with `reason` and closes the connection.
    pub fn refuse(mut self, reason: &str) -> DestinationError {
        self.m.refuse(reason);
        loop {
            match self.m.poll(&mut self.buf, Instant::now()) {
                DestinationAction::Transmit => self.transmit(),
                DestinationAction::Shutdown(how) => {
                    let _ = self.conn.shutdown(how);
                }
                _ => break,
            }
        }
        DestinationError::Refused(reason.into())
    }

    /// Receives the rest of the stream into `ram` and `vm`; at the source's `EndOfData`
    /// loads the device state, runs `verify` over it and sends `Running`; at the source's
    /// `Complete` (its commit) resumes the guest. Without that commit the guest is not
    /// run. `vm` must be paused and hold no state yet; `ram` must be all zero (fresh
    /// memory) and match the config. `progress` sees the statistics after each pass.
    pub fn receive<M, V>(
        self,
        ram: &GuestRam<'_, M>,
        vm: &mut V,
        verify: &mut dyn FnMut(&[DeviceState]) -> Result<(), VerifyError>,
        progress: &mut dyn FnMut(&DestinationStats),
    ) -> Result<DestinationStats, DestinationError>
    where
        M: GuestMemoryBackend,
        V: VmControl + ?Sized,
    {
        match self.receive_or_switch(ram, vm, verify, progress)? {
            Received::Completed(stats) => Ok(stats),
            Received::Postcopy(_) => {
                unreachable!("a switch only with DestinationOptions::postcopy")
            }
        }
    }

    /// As [`receive`](Self::receive), but with [`DestinationOptions::postcopy`] a switch
    /// to post-copy ends it too: then what was received, the connection and the rest of
    /// the stream are handed over in [`Received::Postcopy`] (pages placed so far, and the
    /// unread bytes of the stream), for a post-copy engine to go on with.
    pub fn receive_or_switch<M, V>(
        mut self,
        ram: &GuestRam<'_, M>,
        vm: &mut V,
        verify: &mut dyn FnMut(&[DeviceState]) -> Result<(), VerifyError>,
        progress: &mut dyn FnMut(&DestinationStats),
    ) -> Result<Received<C>, DestinationError>
    where
        M: GuestMemoryBackend,
        V: VmControl + ?Sized,
    {
        let mut writer = None;
        if self.m.begin(ram.layout()) {
            match RamWriter::new(ram, self.placement) {
                Ok((w, used)) => {
                    self.placement = used;
                    writer = Some(w);
                }
                Err(e) => self.m.abort(e),
            }
        }
        loop {
            let action = self.m.poll(&mut self.buf, Instant::now());
            let ev = match action {
                DestinationAction::NeedInput => {
                    self.read();
                    continue;
                }
                DestinationAction::Transmit => {
                    self.transmit();
                    continue;
                }
                DestinationAction::PlacePages(batch) => {
                    let r = match writer.as_mut() {
                        Some(w) => w.place(&batch),
                        None => Ok(Default::default()),
                    };
                    DestinationEvent::PagesPlaced(r)
                }
                DestinationAction::PassEnded => {
                    if let Some(w) = writer.as_mut() {
                        w.pass_ended();
                    }
                    let mut stats = self.m.stats().clone();
                    stats.placement = self.placement;
                    progress(&stats);
                    continue;
                }
                DestinationAction::FinishRam => {
                    let r = writer.as_mut().map_or(Ok(()), RamWriter::finish);
                    DestinationEvent::RamFinished(r)
                }
                DestinationAction::LoadDeviceState => {
                    DestinationEvent::StateLoaded(vm.load_device_state(self.m.device_states()))
                }
                DestinationAction::Verify => {
                    DestinationEvent::Verified(verify(self.m.device_states()))
                }
                DestinationAction::Resume => {
                    // The source committed: nothing here touches RAM any more.
                    drop(writer.take());
                    DestinationEvent::Resumed(vm.resume())
                }
                DestinationAction::Shutdown(how) => {
                    let _ = self.conn.shutdown(how);
                    continue;
                }
                DestinationAction::Configured => {
                    unreachable!("configured once, in accept")
                }
                DestinationAction::SwitchToPostcopy => {
                    let Some(mut w) = writer.take() else {
                        unreachable!("receiving means a writer")
                    };
                    // Placing pages is over here: the post-copy engine registers RAM for
                    // faults its own way.
                    w.finish().map_err(DestinationError::Placement)?;
                    let received = w.into_received();
                    let Incoming {
                        m,
                        conn,
                        buf,
                        placement,
                    } = self;
                    let mut stream = m.into_postcopy().expect("switched");
                    stream.stats.placement = placement;
                    return Ok(Received::Postcopy(Box::new(PostcopySwitch {
                        conn,
                        input: buf,
                        stream,
                        received,
                    })));
                }
                DestinationAction::Done => break,
            };
            self.m.handle(ev, Instant::now());
        }
        // Prefaulting stops, and userfaultfd lets go of RAM, before the caller sees it.
        drop(writer);
        let mut r = self
            .m
            .take_result()
            .expect("the machine returns Done only with a result");
        if let Ok(stats) = &mut r {
            stats.placement = self.placement;
        }
        r.map(Received::Completed)
    }

    fn read(&mut self) {
        let ev = match self.conn.read_into(&mut self.buf, READ_CHUNK) {
            Ok(0) => DestinationEvent::Eof,
            Ok(n) => DestinationEvent::Received(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(e) => DestinationEvent::ReadFailed(e),
        };
        self.m.handle(ev, Instant::now());
    }

    fn transmit(&mut self) {
        let out = self.m.take_transmit();
        let r = self.conn.write_all(&out).and_then(|()| self.conn.flush());
        self.m
            .handle(DestinationEvent::Transmitted(r), Instant::now());
    }
}
