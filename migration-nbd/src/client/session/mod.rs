//! The client side of the transmission phase as a state machine without I/O.
//!
//! [`ClientSession`] turns requests into header bytes ([`ClientSession::submit`]) and the
//! server's bytes into steps for the driver ([`ClientSession::handle_input`]), in the shape
//! of rustls' unbuffered API and quinn-proto's `handle_*`/`poll_*`: the session never reads
//! or writes a socket and never owns a request's data buffer. Read data in particular is
//! not copied through it: the session says "the next N bytes of the stream belong to
//! request X at offset Y of its buffer" ([`ReplyStep::Payload`]), and the driver moves them
//! there itself, from the socket if it likes, then reports how many it moved
//! ([`ClientSession::payload_received`]).
//!
//! Every number in a reply comes from the server and is checked before it is used: offsets
//! and lengths with checked arithmetic against the request they answer, chunk payloads
//! against a bound per chunk type before anything waits for them, so that no reply can
//! make the session panic, allocate what a length field claims, or point the driver outside
//! a buffer. A reply that breaks the protocol ends the session with a [`ProtocolError`].

use std::collections::{BTreeMap, HashMap};

use bytes::{Buf, BytesMut};

use super::error::{ClientError, ConnectionLost, ProtocolError, Violation};
use crate::handshake::ClientNegotiated;
use crate::proto::{self, NbdErrno, cflags, chunk, cmd, tflags};
use crate::wire::{
    CHUNK_HEADER_LEN, ChunkHeader, ChunkPayload, REQUEST_HEADER_LEN, ReplyHeader, RequestHeader,
    SIMPLE_REPLY_LEN, WireError,
};

/// Most extents accepted in one block status chunk (an 8 MiB payload).
pub const MAX_EXTENTS: usize = 1 << 20;

/// Most disjoint pieces one read may be answered in before they join up. Servers send a
/// read's chunks in order, which keeps one piece; the bound only stops a server that
/// scatters tiny chunks from making the client track millions of ranges.
pub const MAX_READ_PIECES: usize = 1 << 16;

/// Largest error chunk: error value, message length, a message of up to 64 KiB, an offset.
const MAX_ERROR_CHUNK: u32 = 6 + u16::MAX as u32 + 8;

/// Flags of a `WRITE_ZEROES` request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Persist before the reply.
    pub fua: bool,
    /// Keep the range allocated.
    pub no_hole: bool,
    /// Fail with `ENOTSUP` rather than write zeroes slowly.
    pub fast: bool,
}

/// One extent of a block status reply (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockExtent {
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// `proto::state` flags.
    pub flags: u32,
}

impl BlockExtent {
    /// The extent is a hole.
    pub fn is_hole(&self) -> bool {
        self.flags & proto::state::HOLE != 0
    }

    /// The extent reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.flags & proto::state::ZERO != 0
    }
}

/// A request to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRequest {
    /// Read `length` bytes at `offset`: the reply's data goes into a buffer of `length`
    /// bytes the driver keeps for the request.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
    /// Write `length` bytes at `offset`; the driver sends them right after the header.
    Write {
        /// Offset.
        offset: u64,
        /// Length of the payload.
        length: u32,
        /// Persist before the reply (dropped when the server does not offer `FUA`).
        fua: bool,
    },
    /// Persist completed writes.
    Flush,
    /// Discard a range.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Persist before the reply (dropped when the server does not offer `FUA`).
        fua: bool,
    },
    /// Write zeroes without a payload.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Flags.
        flags: ZeroFlags,
    },
    /// Allocation status (`base:allocation`) from `offset`.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length of interest.
        length: u32,
        /// One extent only.
        req_one: bool,
    },
}

/// A request the session accepted: send `header` (and, for a `WRITE`, its payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// Cookie that the reply will carry.
    pub cookie: u64,
    /// The request header, ready for the wire.
    pub header: [u8; REQUEST_HEADER_LEN],
}

/// The result of a successful request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// A request without data (write, flush, trim, zeroes) succeeded.
    Done,
    /// A read succeeded: every byte of its buffer was filled by a [`ReplyStep::Payload`]
    /// or [`ReplyStep::Zeroes`] step.
    Read,
    /// Consecutive extents from the request's offset (possibly covering less than its
    /// length; the last may extend past it).
    BlockStatus(Vec<BlockExtent>),
}

/// What the driver must do next, from [`ClientSession::handle_input`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ReplyStep {
    /// Read more from the server into the input buffer: at least `min` more bytes are
    /// needed before the session can go on.
    NeedInput {
        /// Bytes missing from the message being decoded.
        min: usize,
    },
    /// The next `len` bytes of the stream are data of request `cookie`: store them at
    /// `offset..offset + len` of its buffer, taking first what the input buffer holds
    /// (consuming it) and the rest straight from the connection, and report them with
    /// [`ClientSession::payload_received`]. `offset + len` never exceeds the request's
    /// length, and `len` is never 0.
    Payload {
        /// Request.
        cookie: u64,
        /// Where in the request's buffer.
        offset: usize,
        /// How many bytes.
        len: usize,
    },
    /// Bytes `offset..offset + len` of request `cookie`'s buffer read as zeroes (a hole):
    /// fill them. Within the request's length, as for `Payload`.
    Zeroes {
        /// Request.
        cookie: u64,
        /// Where in the request's buffer.
        offset: usize,
        /// How many bytes.
        len: usize,
    },
    /// Request `cookie` is finished; the session forgot it.
    Complete {
        /// Request.
        cookie: u64,
        /// Its outcome (an error is the server's answer, the connection goes on).
        result: Result<Reply, ClientError>,
    },
}

/// What a request in flight has received so far.
#[derive(Debug)]
enum Progress {
    Unit,
    Read {
        /// Bytes covered by data and holes.
        covered: u64,
        /// Covered ranges, start to end, adjacent ones joined: chunks must not overlap,
        /// and with a recycled buffer a gap would otherwise hide stale bytes.
        ranges: BTreeMap<u64, u64>,
    },
    Status {
        extents: Vec<BlockExtent>,
        /// A chunk for our context arrived (the protocol allows exactly one).
        answered: bool,
    },
}

#[derive(Debug)]
struct InFlight {
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
    progress: Progress,
    /// The first error chunk (or simple error) the server sent.
    error: Option<ClientError>,
    /// A structured chunk arrived for this request.
    chunked: bool,
}

impl InFlight {
    fn name(&self) -> &'static str {
        proto::command_name(self.command)
    }

    /// Where `[offset, offset + length)` starts in the request's buffer, if it lies inside
    /// the request. Offsets come from the server: nothing here may overflow.
    fn place(&self, chunk: &'static str, offset: u64, length: u64) -> Result<usize, Violation> {
        let start = offset.checked_sub(self.offset).filter(|rel| {
            rel.checked_add(length)
                .is_some_and(|end| end <= self.length as u64)
        });
        match start {
            // Inside a request whose length fits in 32 bits, so in a usize too.
            Some(rel) => Ok(rel as usize),
            None => Err(Violation::OutsideRequest {
                chunk,
                offset,
                length,
                command: self.name(),
                req_offset: self.offset,
                req_length: self.length,
            }),
        }
    }

    /// Records that `[start, start + len)` of a read arrived (inside the request, as
    /// [`InFlight::place`] checked), refusing overlaps.
    fn cover(&mut self, start: u64, len: u64) -> Result<(), Violation> {
        let req_offset = self.offset;
        let Progress::Read { covered, ranges } = &mut self.progress else {
            return Ok(());
        };
        let overlap = Violation::Overlap {
            offset: start,
            length: len,
            req_offset,
        };
        let end = start.checked_add(len).ok_or_else(|| overlap.clone())?;
        let before = ranges.range(..=start).next_back().map(|(&s, &e)| (s, e));
        let after = ranges.range(start..).next().map(|(&s, &e)| (s, e));
        if before.is_some_and(|(_, e)| e > start) || after.is_some_and(|(s, _)| s < end) {
            return Err(overlap);
        }
        let (mut new_start, mut new_end) = (start, end);
        if let Some((s, e)) = before.filter(|&(_, e)| e == start) {
            ranges.remove(&s);
            new_start = s;
            new_end = new_end.max(e);
        }
        if let Some((s, e)) = after.filter(|&(s, _)| s == end) {
            ranges.remove(&s);
            new_end = e;
        }
        if ranges.len() >= MAX_READ_PIECES {
            return Err(Violation::TooFragmented {
                req_offset,
                max: MAX_READ_PIECES,
            });
        }
        ranges.insert(new_start, new_end);
        *covered += len;
        Ok(())
    }

    fn server_error(&self, error: u32, message: String) -> ClientError {
        ClientError::Server {
            command: self.name(),
            offset: self.offset,
            length: self.length,
            error: NbdErrno(error),
            message,
        }
    }

    /// The outcome once the last chunk arrived; a success that does not add up breaks the
    /// protocol.
    fn outcome(self) -> Result<Result<Reply, ClientError>, Violation> {
        if let Some(e) = self.error {
            return Ok(Err(e));
        }
        match self.progress {
            Progress::Unit => Ok(Ok(Reply::Done)),
            Progress::Read { covered, .. } if covered < self.length as u64 => {
                Err(Violation::ShortRead {
                    covered,
                    length: self.length,
                    offset: self.offset,
                })
            }
            Progress::Read { .. } => Ok(Ok(Reply::Read)),
            Progress::Status { extents, .. } if extents.is_empty() => Err(Violation::NoExtents {
                offset: self.offset,
            }),
            Progress::Status { extents, .. } => Ok(Ok(Reply::BlockStatus(extents))),
        }
    }
}

/// Where the session is in the stream of replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// Waiting for a reply header.
    Header,
    /// A chunk header of a type with a bounded payload was decoded; its payload is next.
    ChunkPayload(ChunkHeader),
    /// An `OFFSET_DATA` header was decoded; the 8-byte offset is next.
    DataOffset(ChunkHeader),
    /// Data of a request is passing through the driver.
    Payload {
        cookie: u64,
        offset: usize,
        remaining: usize,
        /// The reply ends with this data.
        last: bool,
    },
    /// The reply to `cookie` is complete and must be reported.
    Finished { cookie: u64 },
    /// A protocol error or [`ClientSession::abort`] ended the session.
    Closed,
}

/// The client side of the NBD transmission phase, without I/O.
///
/// Created from what [`ClientHandshake`](crate::handshake::ClientHandshake) negotiated. A
/// driver loops: [`submit`](Self::submit) requests and write their headers (any time, also
/// while replies are being decoded); feed what the server sends to
/// [`handle_input`](Self::handle_input) and act on each [`ReplyStep`] until it asks for
/// more input. When the connection fails for a reason of its own, [`abort`](Self::abort)
/// returns the cookies still waiting, to fail them.
#[derive(Debug)]
pub struct ClientSession {
    negotiated: ClientNegotiated,
    strict: bool,
    next_cookie: u64,
    requests: HashMap<u64, InFlight>,
    recv: Recv,
    /// Bytes of the reply stream consumed so far.
    consumed: u64,
    /// Offset of the message being decoded, for errors.
    message_at: u64,
    /// What ended the session, reported again by every later call.
    error: Option<ProtocolError>,
}

impl ClientSession {
    /// A session for what the handshake negotiated. With `strict`, requests the server
    /// would have to reject (past the end, not offered, unaligned) are refused before
    /// sending; off only to see how servers answer them.
    pub fn new(negotiated: ClientNegotiated, strict: bool) -> ClientSession {
        ClientSession {
            negotiated,
            strict,
            next_cookie: 1,
            requests: HashMap::new(),
            recv: Recv::Header,
            consumed: 0,
            message_at: 0,
            error: None,
        }
    }

    /// What the handshake negotiated.
    pub fn negotiated(&self) -> &ClientNegotiated {
        &self.negotiated
    }

    /// Requests submitted and not yet complete.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Whether a protocol error or [`abort`](Self::abort) ended the session.
    pub fn is_closed(&self) -> bool {
        self.recv == Recv::Closed
    }

    fn has(&self, f: u16) -> bool {
        self.negotiated.flags & f != 0
    }

    /// Accepts a request: checks it (when strict), gives it a cookie and returns the
    /// header to send. The session expects its reply from then on.
    pub fn submit(&mut self, request: ClientRequest) -> Result<Submitted, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Disconnected(std::sync::Arc::new(
                match &self.error {
                    Some(e) => ConnectionLost::Protocol(e.clone()),
                    None => ConnectionLost::Aborted,
                },
            )));
        }
        let fua = |fua: bool, has: bool| if fua && has { cflags::FUA } else { 0 };
        let can_fua = self.has(tflags::SEND_FUA);
        let (command, flags, offset, length) = match request {
            ClientRequest::Read { offset, length } => (cmd::READ, 0, offset, length),
            ClientRequest::Write {
                offset,
                length,
                fua: f,
            } => (cmd::WRITE, fua(f, can_fua), offset, length),
            ClientRequest::Flush => (cmd::FLUSH, 0, 0, 0),
            ClientRequest::Trim {
                offset,
                length,
                fua: f,
            } => (cmd::TRIM, fua(f, can_fua), offset, length),
            ClientRequest::WriteZeroes {
                offset,
                length,
                flags: z,
            } => {
                let mut f = fua(z.fua, can_fua);
                if z.no_hole {
                    f |= cflags::NO_HOLE;
                }
                if z.fast {
                    f |= cflags::FAST_ZERO;
                }
                (cmd::WRITE_ZEROES, f, offset, length)
            }
            ClientRequest::BlockStatus {
                offset,
                length,
                req_one,
            } => {
                let f = if req_one { cflags::REQ_ONE } else { 0 };
                (cmd::BLOCK_STATUS, f, offset, length)
            }
        };
        if self.strict {
            self.check(command, flags, offset, length)?;
        }
        let cookie = self.allocate_cookie();
        let progress = match command {
            cmd::READ => Progress::Read {
                covered: 0,
                ranges: BTreeMap::new(),
            },
            cmd::BLOCK_STATUS => Progress::Status {
                extents: Vec::new(),
                answered: false,
            },
            _ => Progress::Unit,
        };
        self.requests.insert(
            cookie,
            InFlight {
                command,
                flags,
                offset,
                length,
                progress,
                error: None,
                chunked: false,
            },
        );
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .to_bytes();
        Ok(Submitted { cookie, header })
    }

    /// The `DISC` request that ends the transmission phase (it has no reply: send it once
    /// nothing is in flight, then close).
    pub fn disconnect_header(&self) -> [u8; REQUEST_HEADER_LEN] {
        RequestHeader {
            flags: 0,
            command: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .to_bytes()
    }

    fn allocate_cookie(&mut self) -> u64 {
        // Cookies are only compared for equality; skip any still in flight after a wrap.
        loop {
            let c = self.next_cookie;
            self.next_cookie = self.next_cookie.wrapping_add(1);
            if !self.requests.contains_key(&c) {
                return c;
            }
        }
    }

    fn check(&self, command: u16, flags: u16, offset: u64, length: u32) -> Result<(), ClientError> {
        let invalid = |reason: String| ClientError::Invalid {
            command: proto::command_name(command),
            offset,
            length,
            reason,
        };
        let writes = matches!(command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && self.has(tflags::READ_ONLY) {
            return Err(invalid("the export is read-only".into()));
        }
        let offered = match command {
            cmd::FLUSH => self.has(tflags::SEND_FLUSH),
            cmd::TRIM => self.has(tflags::SEND_TRIM),
            cmd::WRITE_ZEROES => self.has(tflags::SEND_WRITE_ZEROES),
            cmd::BLOCK_STATUS => {
                self.negotiated.structured_replies && self.negotiated.base_allocation_id.is_some()
            }
            _ => true,
        };
        if !offered {
            return Err(invalid("the server did not offer this command".into()));
        }
        if flags & cflags::FAST_ZERO != 0 && !self.has(tflags::SEND_FAST_ZERO) {
            return Err(invalid("the server did not offer FAST_ZERO".into()));
        }
        if command == cmd::FLUSH {
            return Ok(());
        }
        let size = self.negotiated.size;
        if offset.checked_add(length as u64).is_none_or(|e| e > size) {
            return Err(invalid(format!(
                "past the end of the export ({size} bytes)"
            )));
        }
        let b = self.negotiated.block_size;
        // The handshake only accepts valid constraints, but a minimum of 0 must not divide.
        let min = b.minimum.max(1);
        if offset % min as u64 != 0 || length % min != 0 {
            return Err(invalid(format!(
                "not aligned to the minimum block size {min}"
            )));
        }
        if matches!(command, cmd::READ | cmd::WRITE) && length > b.maximum {
            return Err(invalid(format!(
                "above the maximum payload of {} bytes",
                b.maximum
            )));
        }
        Ok(())
    }

    /// Fails the session: forgets every request in flight and returns their cookies, so
    /// the driver can fail them (for example when the socket broke). Later calls to
    /// [`submit`](Self::submit) fail, and [`handle_input`](Self::handle_input) completes
    /// nothing more (it returns the protocol error that ended the session, if one did, and
    /// otherwise only asks for input).
    pub fn abort(&mut self) -> Vec<u64> {
        self.recv = Recv::Closed;
        self.requests.drain().map(|(c, _)| c).collect()
    }

    /// Reports that the driver stored `n` bytes of the data the last
    /// [`ReplyStep::Payload`] announced (the first `n` of what was left: a driver may
    /// deliver it in pieces). More than announced counts as all of it.
    pub fn payload_received(&mut self, n: usize) {
        if let Recv::Payload {
            cookie,
            offset,
            remaining,
            last,
        } = self.recv
        {
            let n = n.min(remaining);
            self.consumed += n as u64;
            self.recv = if n < remaining {
                Recv::Payload {
                    cookie,
                    offset: offset + n,
                    remaining: remaining - n,
                    last,
                }
            } else if last {
                Recv::Finished { cookie }
            } else {
                Recv::Header
            };
        }
    }

    fn fail(&mut self, cookie: Option<u64>, violation: Violation) -> ProtocolError {
        let e = ProtocolError {
            at: self.message_at,
            cookie,
            violation,
        };
        self.recv = Recv::Closed;
        self.error = Some(e.clone());
        e
    }

    fn take(&mut self, input: &mut BytesMut, n: usize) -> BytesMut {
        self.consumed += n as u64;
        input.split_to(n)
    }

    /// Decodes what `input` holds (consuming it) and says what the driver must do next.
    /// Call again after acting on any step but [`ReplyStep::NeedInput`], which needs more
    /// bytes appended to `input` first. An error ends the session: the reply broke the
    /// protocol (the driver should hang up and fail what is in flight, see
    /// [`abort`](Self::abort)); it is returned again on every later call.
    pub fn handle_input(&mut self, input: &mut BytesMut) -> Result<ReplyStep, ProtocolError> {
        loop {
            match self.recv {
                Recv::Closed => {
                    return match &self.error {
                        Some(e) => Err(e.clone()),
                        None => Ok(ReplyStep::NeedInput { min: 1 }),
                    };
                }
                Recv::Payload {
                    cookie,
                    offset,
                    remaining,
                    ..
                } => {
                    return Ok(ReplyStep::Payload {
                        cookie,
                        offset,
                        len: remaining,
                    });
                }
                Recv::Finished { cookie } => {
                    let Some(f) = self.requests.remove(&cookie) else {
                        // Only an abort forgets requests, and it closes the session.
                        self.recv = Recv::Header;
                        continue;
                    };
                    self.recv = Recv::Header;
                    return match f.outcome() {
                        Ok(result) => Ok(ReplyStep::Complete { cookie, result }),
                        Err(v) => Err(self.fail(Some(cookie), v)),
                    };
                }
                Recv::Header => {
                    if let Some(step) = self.header(input)? {
                        return Ok(step);
                    }
                }
                Recv::ChunkPayload(h) => {
                    let need = h.length as usize;
                    if input.len() < need {
                        return Ok(ReplyStep::NeedInput {
                            min: need - input.len(),
                        });
                    }
                    let payload = self.take(input, need).freeze();
                    if let Some(step) = self.chunk(h, payload)? {
                        return Ok(step);
                    }
                }
                Recv::DataOffset(h) => {
                    if input.len() < 8 {
                        return Ok(ReplyStep::NeedInput {
                            min: 8 - input.len(),
                        });
                    }
                    let offset = self.take(input, 8).get_u64();
                    // The header was checked: at least one byte of data follows.
                    let len = (h.length - 8) as usize;
                    return self.data(h, offset, len);
                }
            }
        }
    }

    /// Decodes a reply header; `None` when the session moved on without a step.
    fn header(&mut self, input: &mut BytesMut) -> Result<Option<ReplyStep>, ProtocolError> {
        self.message_at = self.consumed;
        if input.len() < 4 {
            return Ok(Some(ReplyStep::NeedInput {
                min: 4 - input.len(),
            }));
        }
        let magic = u32::from_be_bytes([input[0], input[1], input[2], input[3]]);
        let need = match magic {
            proto::SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
            proto::STRUCTURED_REPLY_MAGIC if self.negotiated.structured_replies => CHUNK_HEADER_LEN,
            proto::STRUCTURED_REPLY_MAGIC => {
                return Err(self.fail(None, Violation::UnexpectedChunk));
            }
            m => return Err(self.fail(None, Violation::BadMagic(m))),
        };
        if input.len() < need {
            return Ok(Some(ReplyStep::NeedInput {
                min: need - input.len(),
            }));
        }
        let header = match ReplyHeader::decode(input) {
            Ok(Some(h)) => h,
            // The length was checked and the magic is one of the two.
            Ok(None) => return Err(self.fail(None, Violation::BadMagic(magic))),
            Err(e) => return Err(self.fail(None, e.into())),
        };
        self.consumed += need as u64;
        let cookie = header.cookie();
        let Some(f) = self.requests.get_mut(&cookie) else {
            return Err(self.fail(None, Violation::UnknownCookie(cookie)));
        };
        match header {
            ReplyHeader::Simple { error, .. } => {
                if f.chunked {
                    let command = f.name();
                    return Err(self.fail(Some(cookie), Violation::SimpleAfterChunks { command }));
                }
                if error != 0 {
                    f.error = Some(f.server_error(error, String::new()));
                    self.recv = Recv::Finished { cookie };
                    return Ok(None);
                }
                if let Progress::Read { covered, .. } = &mut f.progress {
                    // Not allowed with structured replies, but unambiguous: the data is the
                    // whole request, so take it.
                    *covered = f.length as u64;
                    if f.length > 0 {
                        self.recv = Recv::Payload {
                            cookie,
                            offset: 0,
                            remaining: f.length as usize,
                            last: true,
                        };
                        return Ok(None);
                    }
                }
                self.recv = Recv::Finished { cookie };
                Ok(None)
            }
            ReplyHeader::Chunk(h) => {
                f.chunked = true;
                let is_read = matches!(f.progress, Progress::Read { .. });
                let command = f.name();
                let wrong = |chunk| Violation::WrongChunk { chunk, command };
                let max = match h.kind {
                    chunk::OFFSET_DATA => {
                        if !is_read {
                            let v = wrong("OFFSET_DATA");
                            return Err(self.fail(Some(cookie), v));
                        }
                        if h.length < 9 {
                            let v = Violation::Malformed(WireError::Malformed {
                                what: "structured reply chunk",
                                detail: format!("OFFSET_DATA of {} bytes", h.length),
                            });
                            return Err(self.fail(Some(cookie), v));
                        }
                        // Data longer than the request cannot lie inside it: refuse it before
                        // its bytes arrive.
                        let n = (h.length - 8) as u64;
                        if n > f.length as u64 {
                            let v = Violation::OutsideRequest {
                                chunk: "OFFSET_DATA",
                                offset: f.offset,
                                length: n,
                                command: f.name(),
                                req_offset: f.offset,
                                req_length: f.length,
                            };
                            return Err(self.fail(Some(cookie), v));
                        }
                        self.recv = Recv::DataOffset(h);
                        return Ok(None);
                    }
                    chunk::NONE => 0,
                    chunk::OFFSET_HOLE if is_read => 12,
                    chunk::OFFSET_HOLE => return Err(self.fail(Some(cookie), wrong("OFFSET_HOLE"))),
                    chunk::BLOCK_STATUS if matches!(f.progress, Progress::Status { .. }) => {
                        4 + 8 * MAX_EXTENTS as u32
                    }
                    chunk::BLOCK_STATUS => {
                        return Err(self.fail(Some(cookie), wrong("BLOCK_STATUS")));
                    }
                    k if k & chunk::ERROR_BIT != 0 => MAX_ERROR_CHUNK,
                    other => {
                        let v = Violation::Malformed(WireError::Malformed {
                            what: "structured reply chunk",
                            detail: format!("unknown chunk type {other}"),
                        });
                        return Err(self.fail(Some(cookie), v));
                    }
                };
                if h.length > max {
                    let v = Violation::ChunkTooLong {
                        kind: h.kind,
                        length: h.length,
                        max,
                    };
                    return Err(self.fail(Some(cookie), v));
                }
                self.recv = Recv::ChunkPayload(h);
                Ok(None)
            }
        }
    }

    /// Applies a chunk with a bounded payload, now read whole.
    fn chunk(
        &mut self,
        h: ChunkHeader,
        payload: bytes::Bytes,
    ) -> Result<Option<ReplyStep>, ProtocolError> {
        let cookie = h.cookie;
        let parsed = match ChunkPayload::parse(h.kind, payload) {
            Ok(p) => p,
            Err(e) => return Err(self.fail(Some(cookie), e.into())),
        };
        let base_allocation = self.negotiated.base_allocation_id;
        let Some(f) = self.requests.get_mut(&cookie) else {
            return Err(self.fail(None, Violation::UnknownCookie(cookie)));
        };
        let next = if h.is_done() {
            Recv::Finished { cookie }
        } else {
            Recv::Header
        };
        let mut step = None;
        match parsed {
            ChunkPayload::None => {
                if !h.is_done() {
                    return Err(self.fail(Some(cookie), Violation::NoneWithoutDone));
                }
            }
            ChunkPayload::OffsetHole { offset, length } => {
                let placed = f
                    .place("OFFSET_HOLE", offset, length as u64)
                    .and_then(|start| f.cover(offset, length as u64).map(|()| start));
                match placed {
                    Ok(start) => {
                        step = Some(ReplyStep::Zeroes {
                            cookie,
                            offset: start,
                            len: length as usize,
                        })
                    }
                    Err(v) => return Err(self.fail(Some(cookie), v)),
                }
            }
            ChunkPayload::BlockStatus {
                context_id,
                descriptors,
            } => {
                if let Err(v) = status(f, context_id, base_allocation, &descriptors) {
                    return Err(self.fail(Some(cookie), v));
                }
            }
            ChunkPayload::Error { error, message }
            | ChunkPayload::ErrorOffset { error, message, .. }
            | ChunkPayload::UnknownError { error, message, .. } => {
                if f.error.is_none() {
                    f.error = Some(f.server_error(error, message));
                }
            }
            ChunkPayload::OffsetData { .. } => {
                // Data chunks never take this path (their payload goes to the driver).
                let v = Violation::WrongChunk {
                    chunk: "OFFSET_DATA",
                    command: f.name(),
                };
                return Err(self.fail(Some(cookie), v));
            }
        }
        self.recv = next;
        Ok(step)
    }

    /// Checks where an `OFFSET_DATA` chunk's data goes and hands it to the driver.
    fn data(
        &mut self,
        h: ChunkHeader,
        offset: u64,
        len: usize,
    ) -> Result<ReplyStep, ProtocolError> {
        let cookie = h.cookie;
        let Some(f) = self.requests.get_mut(&cookie) else {
            return Err(self.fail(None, Violation::UnknownCookie(cookie)));
        };
        let placed = f
            .place("OFFSET_DATA", offset, len as u64)
            .and_then(|start| f.cover(offset, len as u64).map(|()| start));
        match placed {
            Ok(start) => {
                self.recv = Recv::Payload {
                    cookie,
                    offset: start,
                    remaining: len,
                    last: h.is_done(),
                };
                Ok(ReplyStep::Payload {
                    cookie,
                    offset: start,
                    len,
                })
            }
            Err(v) => Err(self.fail(Some(cookie), v)),
        }
    }
}

/// Adds a block status chunk's extents to a request, checking that they answer it.
fn status(
    f: &mut InFlight,
    context_id: u32,
    expected: Option<u32>,
    descriptors: &[crate::wire::BlockDescriptor],
) -> Result<(), Violation> {
    let (req_offset, req_length, req_one) = (f.offset, f.length, f.flags & cflags::REQ_ONE != 0);
    let Progress::Status { extents, answered } = &mut f.progress else {
        return Err(Violation::WrongChunk {
            chunk: "BLOCK_STATUS",
            command: proto::command_name(f.command),
        });
    };
    if Some(context_id) != expected {
        return Err(Violation::WrongContext {
            id: context_id,
            expected,
        });
    }
    if *answered {
        return Err(Violation::SecondStatusChunk { id: context_id });
    }
    *answered = true;
    if req_one && descriptors.len() > 1 {
        return Err(Violation::ReqOneExtents {
            count: descriptors.len(),
        });
    }
    // A lax client may ask for a range that itself runs past 2^64; it ends there.
    let end = req_offset.saturating_add(req_length as u64);
    let mut at = req_offset;
    extents.reserve(descriptors.len());
    for d in descriptors {
        // Only the last extent may reach past the request.
        if at >= end && at > req_offset {
            return Err(Violation::ExtentPastRequest {
                offset: at,
                req_offset,
                req_length,
            });
        }
        let next = at
            .checked_add(d.length as u64)
            .ok_or(Violation::ExtentOverflow {
                offset: at,
                length: d.length,
            })?;
        extents.push(BlockExtent {
            offset: at,
            length: d.length as u64,
            flags: d.flags,
        });
        at = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
