//! The session driven by a simulated driver: replies encoded by the server's own codecs
//! come back as the data, holes and extents that were sent, however the bytes are split
//! and however chunks of different requests interleave; arbitrary bytes never panic it
//! nor point the driver outside a buffer.

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::proto::{REPLY_FLAG_DONE, STRUCTURED_REPLY_MAGIC};
use crate::wire::{self, BlockDescriptor, BlockSize};

fn negotiated(structured: bool, size: u64) -> ClientNegotiated {
    ClientNegotiated {
        size,
        flags: tflags::HAS_FLAGS
            | tflags::SEND_FLUSH
            | tflags::SEND_FUA
            | tflags::SEND_TRIM
            | tflags::SEND_WRITE_ZEROES,
        structured_replies: structured,
        base_allocation_id: structured.then_some(7),
        block_size: BlockSize::default(),
    }
}

/// A driver without sockets: buffers per read, outcomes per cookie, and checks of every
/// step the session asks for.
struct Sim {
    session: ClientSession,
    bufs: HashMap<u64, Vec<u8>>,
    done: HashMap<u64, Result<Reply, ClientError>>,
}

/// How a simulated run ended.
#[derive(Debug)]
enum End {
    /// The stream ran out while the session wanted more.
    Starved,
    /// The session reported a protocol error.
    Broken(ProtocolError),
}

impl Sim {
    fn new(structured: bool) -> Sim {
        Sim {
            session: ClientSession::new(negotiated(structured, 1 << 50), false),
            bufs: HashMap::new(),
            done: HashMap::new(),
        }
    }

    fn submit(&mut self, r: ClientRequest) -> u64 {
        let s = self.session.submit(r).expect("lax session accepts");
        if let ClientRequest::Read { length, .. } = r {
            // Stale bytes, as in a recycled buffer: holes must overwrite them.
            self.bufs.insert(s.cookie, vec![0xa5; length as usize]);
        }
        s.cookie
    }

    /// Feeds `stream` in pieces of the sizes `cuts` gives (cycled), moving payload the
    /// way the threaded driver does: from the input buffer first, then "from the socket"
    /// (the rest of the stream) in pieces too.
    fn run(&mut self, stream: &[u8], cuts: &[usize]) -> End {
        let mut input = BytesMut::new();
        let mut pos = 0;
        let mut cut = cuts.iter().cycle().map(|&c| c.max(1));
        // Each step consumes input or finishes a request; a bound catches a session that
        // stops making progress.
        for _ in 0..(stream.len() * 4 + 1000) {
            let step = match self.session.handle_input(&mut input) {
                Ok(s) => s,
                Err(e) => return End::Broken(e),
            };
            match step {
                ReplyStep::NeedInput { min } => {
                    assert!(min > 0, "asked for no input");
                    if pos == stream.len() {
                        return End::Starved;
                    }
                    let n = cut.next().unwrap_or(1).min(stream.len() - pos);
                    input.extend_from_slice(&stream[pos..pos + n]);
                    pos += n;
                }
                ReplyStep::Payload {
                    cookie,
                    offset,
                    len,
                } => {
                    assert!(len > 0, "empty payload step");
                    let buf = self.bufs.get_mut(&cookie).expect("payload for a read");
                    assert!(offset + len <= buf.len(), "payload outside the buffer");
                    let from_input = input.len().min(len);
                    buf[offset..offset + from_input].copy_from_slice(&input[..from_input]);
                    input.advance(from_input);
                    self.session.payload_received(from_input);
                    if from_input < len {
                        let n = cut
                            .next()
                            .unwrap_or(1)
                            .min(len - from_input)
                            .min(stream.len() - pos);
                        if n == 0 {
                            return End::Starved;
                        }
                        let at = offset + from_input;
                        buf[at..at + n].copy_from_slice(&stream[pos..pos + n]);
                        pos += n;
                        self.session.payload_received(n);
                    }
                }
                ReplyStep::Zeroes {
                    cookie,
                    offset,
                    len,
                } => {
                    let buf = self.bufs.get_mut(&cookie).expect("zeroes for a read");
                    assert!(offset + len <= buf.len(), "zeroes outside the buffer");
                    buf[offset..offset + len].fill(0);
                }
                ReplyStep::Complete { cookie, result } => {
                    assert!(
                        self.done.insert(cookie, result).is_none(),
                        "cookie {cookie} completed twice"
                    );
                }
            }
        }
        panic!("the session made no progress");
    }
}

fn data_chunk(cookie: u64, done: bool, offset: u64, data: &[u8], out: &mut BytesMut) {
    ChunkPayload::OffsetData {
        offset,
        data: bytes::Bytes::copy_from_slice(data),
    }
    .encode_chunk(cookie, done, out);
}

fn raw_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8], out: &mut BytesMut) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
}

/// One read's reply: its range cut into data and hole pieces, sent in a given order, and
/// ended either by a DONE flag on the last piece or by a NONE chunk.
#[derive(Debug, Clone)]
struct ReadReply {
    offset: u64,
    data: Vec<u8>,
    /// Piece boundaries (sorted, inside the range) and which pieces are holes.
    pieces: Vec<(usize, usize, bool)>,
    order: Vec<usize>,
    trailing_none: bool,
}

fn read_reply() -> impl Strategy<Value = ReadReply> {
    (
        0u64..1 << 40,
        prop::collection::vec(any::<u8>(), 1..3000),
        prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        any::<u64>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(offset, data, cuts, holes, trailing_none, seed)| {
            let mut bounds: Vec<usize> = cuts.iter().map(|i| i.index(data.len())).collect();
            bounds.push(0);
            bounds.push(data.len());
            bounds.sort_unstable();
            bounds.dedup();
            let pieces: Vec<_> = bounds
                .windows(2)
                .enumerate()
                .map(|(i, w)| (w[0], w[1], holes >> (i % 64) & 1 == 1))
                .collect();
            // A deterministic shuffle from the seed.
            let mut order: Vec<usize> = (0..pieces.len()).collect();
            let mut x = seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            ReadReply {
                offset,
                data,
                pieces,
                order,
                trailing_none,
            }
        })
}

impl ReadReply {
    /// The chunks of this reply, each encoded apart, in sending order.
    fn chunks(&self, cookie: u64) -> Vec<BytesMut> {
        let mut out = Vec::new();
        for (n, &i) in self.order.iter().enumerate() {
            let (a, b, hole) = self.pieces[i];
            let done = !self.trailing_none && n + 1 == self.order.len();
            let mut c = BytesMut::new();
            if hole {
                ChunkPayload::OffsetHole {
                    offset: self.offset + a as u64,
                    length: (b - a) as u32,
                }
                .encode_chunk(cookie, done, &mut c);
            } else {
                data_chunk(
                    cookie,
                    done,
                    self.offset + a as u64,
                    &self.data[a..b],
                    &mut c,
                );
            }
            out.push(c);
        }
        if self.trailing_none {
            let mut c = BytesMut::new();
            ChunkPayload::None.encode_chunk(cookie, true, &mut c);
            out.push(c);
        }
        out
    }

    fn expected(&self) -> Vec<u8> {
        let mut e = self.data.clone();
        for &(a, b, hole) in &self.pieces {
            if hole {
                e[a..b].fill(0);
            }
        }
        e
    }
}

/// Merges several replies' chunk lists, keeping each list's order, picking the next list
/// from `picks`.
fn interleave(mut lists: Vec<Vec<BytesMut>>, picks: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = picks.iter().cycle();
    for l in &mut lists {
        l.reverse();
    }
    while lists.iter().any(|l| !l.is_empty()) {
        let live: Vec<usize> = (0..lists.len()).filter(|&i| !lists[i].is_empty()).collect();
        let i = live[p.next().copied().unwrap_or(0) % live.len()];
        out.extend_from_slice(&lists[i].pop().expect("live list"));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Two reads and a write, their structured replies interleaved chunk by chunk and the
    /// stream split anywhere: each read's buffer holds exactly the data sent, with holes
    /// zeroed over the stale bytes, and every request completes once.
    #[test]
    fn structured_replies_round_trip(
        a in read_reply(),
        b in read_reply(),
        picks in prop::collection::vec(0usize..3, 1..16),
        cuts in prop::collection::vec(1usize..200, 1..16),
    ) {
        let mut sim = Sim::new(true);
        let ca = sim.submit(ClientRequest::Read { offset: a.offset, length: a.data.len() as u32 });
        let cw = sim.submit(ClientRequest::Write { offset: 0, length: 9, fua: false });
        let cb = sim.submit(ClientRequest::Read { offset: b.offset, length: b.data.len() as u32 });
        let mut w = BytesMut::new();
        wire::encode_simple_reply(cw, 0, &mut w);
        let stream = interleave(vec![a.chunks(ca), vec![w], b.chunks(cb)], &picks);
        let end = sim.run(&stream, &cuts);
        prop_assert!(matches!(end, End::Starved), "{end:?}");
        prop_assert_eq!(sim.session.in_flight(), 0);
        prop_assert!(matches!(sim.done.get(&ca), Some(Ok(Reply::Read))));
        prop_assert!(matches!(sim.done.get(&cb), Some(Ok(Reply::Read))));
        prop_assert!(matches!(sim.done.get(&cw), Some(Ok(Reply::Done))));
        prop_assert_eq!(&sim.bufs[&ca], &a.expected());
        prop_assert_eq!(&sim.bufs[&cb], &b.expected());
    }

    /// Simple replies (no structured replies negotiated): reads get their data whole,
    /// errors come back as the server's error and carry no data.
    #[test]
    fn simple_replies_round_trip(
        reads in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..2000), 0u32..3), 1..6),
        cuts in prop::collection::vec(1usize..300, 1..16),
    ) {
        let mut sim = Sim::new(false);
        let mut stream = BytesMut::new();
        let mut cookies = Vec::new();
        for (data, error) in &reads {
            let c = sim.submit(ClientRequest::Read { offset: 4096, length: data.len() as u32 });
            cookies.push(c);
            wire::encode_simple_reply(c, *error, &mut stream);
            if *error == 0 {
                stream.extend_from_slice(data);
            }
        }
        // Replies in reverse order: completion is by cookie.
        let end = sim.run(&stream, &cuts);
        prop_assert!(matches!(end, End::Starved), "{end:?}");
        for (c, (data, error)) in cookies.iter().zip(&reads) {
            match (&sim.done[c], error) {
                (Ok(Reply::Read), 0) => prop_assert_eq!(&sim.bufs[c], data),
                (Err(ClientError::Server { error: e, command: "READ", .. }), n) => {
                    prop_assert_eq!(e.0, *n)
                }
                (other, _) => prop_assert!(false, "unexpected outcome {:?}", other),
            }
        }
    }

    /// Block status extents come back consecutive from the request's offset, the last one
    /// allowed past its end.
    #[test]
    fn block_status_round_trip(
        offset in 0u64..1 << 60,
        lengths in prop::collection::vec((1u32..100_000, any::<u32>()), 1..64),
        overhang in any::<prop::sample::Index>(),
        cuts in prop::collection::vec(1usize..64, 1..8),
    ) {
        let total: u64 = lengths.iter().map(|&(l, _)| l as u64).sum();
        let last = lengths.last().expect("one extent").0 as u64;
        let length = (total - overhang.index(last as usize) as u64) as u32;
        let mut sim = Sim::new(true);
        let c = sim.submit(ClientRequest::BlockStatus { offset, length, req_one: false });
        let mut stream = BytesMut::new();
        ChunkPayload::BlockStatus {
            context_id: 7,
            descriptors: lengths.iter().map(|&(length, flags)| BlockDescriptor { length, flags }).collect(),
        }
        .encode_chunk(c, true, &mut stream);
        sim.run(&stream, &cuts);
        let Some(Ok(Reply::BlockStatus(ext))) = sim.done.get(&c) else {
            panic!("block status not complete: {:?}", sim.done.get(&c))
        };
        let mut at = offset;
        for (e, &(l, f)) in ext.iter().zip(&lengths) {
            prop_assert_eq!((e.offset, e.length, e.flags), (at, l as u64, f));
            at += l as u64;
        }
        prop_assert_eq!(ext.len(), lengths.len());
    }

    /// Arbitrary bytes, and messages with valid framing but arbitrary contents, never
    /// panic the session, never point the driver outside a buffer, never complete a
    /// request twice, and an error ends the session for good.
    #[test]
    fn arbitrary_replies_never_panic(
        structured in any::<bool>(),
        messages in prop::collection::vec(message(), 0..12),
        tail in prop::collection::vec(any::<u8>(), 0..512),
        read_len in 0u32..5000,
        req_one in any::<bool>(),
        cuts in prop::collection::vec(1usize..100, 1..8),
    ) {
        let mut sim = Sim::new(structured);
        let cookies = [
            sim.submit(ClientRequest::Read { offset: 1 << 20, length: read_len }),
            sim.submit(ClientRequest::Write { offset: 0, length: 512, fua: true }),
            sim.submit(ClientRequest::BlockStatus { offset: 1 << 20, length: 1 << 16, req_one }),
            sim.submit(ClientRequest::Flush),
        ];
        let mut stream = BytesMut::new();
        for m in &messages {
            m.encode(&cookies, &mut stream);
        }
        stream.extend_from_slice(&tail);
        if let End::Broken(e) = sim.run(&stream, &cuts) {
            let mut input = BytesMut::from(&b"more"[..]);
            prop_assert_eq!(sim.session.handle_input(&mut input).err(), Some(e));
            prop_assert!(sim.session.submit(ClientRequest::Flush).is_err());
        }
        for c in sim.done.keys() {
            prop_assert!(cookies.contains(c));
        }
    }
}

/// A reply message with valid framing (or not) and arbitrary contents.
#[derive(Debug, Clone)]
struct Message {
    simple: bool,
    flags: u16,
    kind: u16,
    cookie: prop::sample::Index,
    random_cookie: Option<u64>,
    error: u32,
    payload: Vec<u8>,
    /// Lie about the payload length by this much.
    skew: i8,
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<bool>(),
        any::<u16>(),
        prop_oneof![
            Just(chunk::NONE),
            Just(chunk::OFFSET_DATA),
            Just(chunk::OFFSET_HOLE),
            Just(chunk::BLOCK_STATUS),
            Just(chunk::ERROR),
            Just(chunk::ERROR_OFFSET),
            any::<u16>()
        ],
        any::<prop::sample::Index>(),
        prop::option::weighted(0.1, any::<u64>()),
        prop_oneof![Just(0u32), any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..64),
        prop_oneof![Just(0i8), any::<i8>()],
    )
        .prop_map(
            |(simple, flags, kind, cookie, random_cookie, error, payload, skew)| Message {
                simple,
                flags,
                kind,
                cookie,
                random_cookie,
                error,
                payload,
                skew,
            },
        )
}

impl Message {
    fn encode(&self, cookies: &[u64], out: &mut BytesMut) {
        let cookie = self
            .random_cookie
            .unwrap_or_else(|| cookies[self.cookie.index(cookies.len())]);
        if self.simple {
            wire::encode_simple_reply(cookie, self.error, out);
            out.put_slice(&self.payload);
            return;
        }
        let len = (self.payload.len() as i64 + self.skew as i64).max(0) as u32;
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(cookie);
        out.put_u32(len);
        out.put_slice(&self.payload);
    }
}

fn read_session() -> (Sim, u64) {
    let mut sim = Sim::new(true);
    let c = sim.submit(ClientRequest::Read {
        offset: 0,
        length: 4096,
    });
    (sim, c)
}

fn violation(end: End) -> Violation {
    match end {
        End::Broken(e) => e.violation,
        End::Starved => panic!("the session accepted a hostile reply"),
    }
}

#[test]
fn data_chunk_whose_end_wraps_past_two_to_the_64_is_outside_the_request() {
    let (mut sim, c) = read_session();
    let mut s = BytesMut::new();
    data_chunk(c, true, u64::MAX - 10, &[1; 4096], &mut s);
    let v = violation(sim.run(&s, &[4096]));
    assert!(matches!(v, Violation::OutsideRequest { .. }), "{v:?}");
}

#[test]
fn data_chunk_longer_than_the_request_is_refused_before_its_data_arrives() {
    let (mut sim, c) = read_session();
    let mut s = BytesMut::new();
    // A header promising 1 GiB, and nothing after it.
    raw_chunk(0, chunk::OFFSET_DATA, c, &[], &mut s);
    let len_at = s.len() - 4;
    s[len_at..].copy_from_slice(&(1u32 << 30).to_be_bytes());
    let v = violation(sim.run(&s, &[1000]));
    assert!(matches!(v, Violation::OutsideRequest { length, .. } if length == (1 << 30) - 8));
}

#[test]
fn hole_chunk_whose_end_wraps_is_outside_the_request() {
    let (mut sim, c) = read_session();
    let mut s = BytesMut::new();
    ChunkPayload::OffsetHole {
        offset: u64::MAX - 5,
        length: 4096,
    }
    .encode_chunk(c, true, &mut s);
    assert!(matches!(
        violation(sim.run(&s, &[100])),
        Violation::OutsideRequest { .. }
    ));
}

#[test]
fn overlapping_chunks_and_short_reads_break_the_protocol() {
    let (mut sim, c) = read_session();
    let mut s = BytesMut::new();
    data_chunk(c, false, 0, &[1; 2048], &mut s);
    data_chunk(c, true, 1024, &[1; 2048], &mut s);
    assert!(matches!(
        violation(sim.run(&s, &[100])),
        Violation::Overlap { .. }
    ));
    let (mut sim, c) = read_session();
    let mut s = BytesMut::new();
    data_chunk(c, true, 0, &[1; 2048], &mut s);
    assert!(matches!(
        violation(sim.run(&s, &[100])),
        Violation::ShortRead { covered: 2048, .. }
    ));
}

#[test]
fn scattered_one_byte_chunks_are_bounded() {
    let mut sim = Sim::new(true);
    let pieces = MAX_READ_PIECES as u32 + 1;
    let c = sim.submit(ClientRequest::Read {
        offset: 0,
        length: 2 * pieces,
    });
    let mut s = BytesMut::new();
    for i in 0..pieces {
        data_chunk(c, false, 2 * i as u64, &[1], &mut s);
    }
    assert!(matches!(
        violation(sim.run(&s, &[1 << 16])),
        Violation::TooFragmented { .. }
    ));
    // In order, the same chunks join into one range: no bound is hit.
    let mut sim = Sim::new(true);
    let c = sim.submit(ClientRequest::Read {
        offset: 0,
        length: pieces,
    });
    let mut s = BytesMut::new();
    for i in 0..pieces {
        data_chunk(c, i + 1 == pieces, i as u64, &[1], &mut s);
    }
    assert!(matches!(sim.run(&s, &[1 << 16]), End::Starved));
    assert!(matches!(sim.done[&c], Ok(Reply::Read)));
}

fn status_chunk(cookie: u64, id: u32, lengths: &[u32], out: &mut BytesMut) {
    ChunkPayload::BlockStatus {
        context_id: id,
        descriptors: lengths
            .iter()
            .map(|&length| BlockDescriptor { length, flags: 0 })
            .collect(),
    }
    .encode_chunk(cookie, true, out);
}

#[test]
fn block_status_that_breaks_the_rules_is_refused() {
    let run = |offset: u64, req_one: bool, id: u32, lengths: &[u32], twice: bool| {
        let mut sim = Sim::new(true);
        let c = sim.submit(ClientRequest::BlockStatus {
            offset,
            length: 100,
            req_one,
        });
        let mut s = BytesMut::new();
        if twice {
            ChunkPayload::BlockStatus {
                context_id: 7,
                descriptors: vec![BlockDescriptor {
                    length: 50,
                    flags: 0,
                }],
            }
            .encode_chunk(c, false, &mut s);
        }
        status_chunk(c, id, lengths, &mut s);
        violation(sim.run(&s, &[1000]))
    };
    let near_top = u64::MAX - 100;
    assert!(matches!(
        run(near_top, false, 7, &[u32::MAX, u32::MAX], false),
        Violation::ExtentOverflow { .. } | Violation::ExtentPastRequest { .. }
    ));
    assert!(matches!(
        run(near_top, false, 7, &[50, u32::MAX], false),
        Violation::ExtentOverflow { .. }
    ));
    assert!(matches!(
        run(0, false, 7, &[100, 1], false),
        Violation::ExtentPastRequest { offset: 100, .. }
    ));
    assert!(matches!(
        run(0, true, 7, &[10, 10], false),
        Violation::ReqOneExtents { count: 2 }
    ));
    assert!(matches!(
        run(0, false, 8, &[10], false),
        Violation::WrongContext {
            id: 8,
            expected: Some(7)
        }
    ));
    assert!(matches!(
        run(0, false, 7, &[10], true),
        Violation::SecondStatusChunk { id: 7 }
    ));
}

#[test]
fn errors_are_the_servers_and_the_connection_goes_on() {
    let (mut sim, c) = read_session();
    let w = sim.submit(ClientRequest::Flush);
    let mut s = BytesMut::new();
    ChunkPayload::ErrorOffset {
        error: 5,
        message: "bad sector".into(),
        offset: 512,
    }
    .encode_chunk(c, false, &mut s);
    ChunkPayload::None.encode_chunk(c, true, &mut s);
    wire::encode_simple_reply(w, 0, &mut s);
    assert!(matches!(sim.run(&s, &[7]), End::Starved));
    match &sim.done[&c] {
        Err(ClientError::Server { error, message, .. }) => {
            assert_eq!((error.0, message.as_str()), (5, "bad sector"))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(sim.done[&w], Ok(Reply::Done)));
}

#[test]
fn wrong_chunks_for_the_command_and_unknown_cookies_break_the_protocol() {
    let mut sim = Sim::new(true);
    let w = sim.submit(ClientRequest::Write {
        offset: 0,
        length: 10,
        fua: false,
    });
    let mut s = BytesMut::new();
    data_chunk(w, true, 0, &[1; 10], &mut s);
    assert!(matches!(
        violation(sim.run(&s, &[100])),
        Violation::WrongChunk {
            chunk: "OFFSET_DATA",
            command: "WRITE"
        }
    ));
    let (mut sim, c) = read_session();
    let mut s = BytesMut::new();
    wire::encode_simple_reply(c + 1, 0, &mut s);
    let e = match sim.run(&s, &[100]) {
        End::Broken(e) => e,
        End::Starved => panic!("accepted"),
    };
    assert_eq!((e.at, e.cookie), (0, None));
    assert_eq!(e.violation, Violation::UnknownCookie(c + 1));
    // After an abort nothing is waited for and nothing more is accepted.
    assert_eq!(sim.session.abort(), vec![c]);
    assert!(sim.session.submit(ClientRequest::Flush).is_err());
}

#[test]
fn errors_say_where_in_the_stream_the_bad_reply_starts() {
    let (mut sim, c) = read_session();
    let f = sim.submit(ClientRequest::Flush);
    let mut s = BytesMut::new();
    wire::encode_simple_reply(f, 0, &mut s);
    raw_chunk(REPLY_FLAG_DONE, chunk::NONE, c, &[1], &mut s);
    let e = match sim.run(&s, &[3]) {
        End::Broken(e) => e,
        End::Starved => panic!("accepted"),
    };
    assert_eq!((e.at, e.cookie), (16, Some(c)));
}

#[test]
fn strict_sessions_refuse_what_the_server_would() {
    let mut n = negotiated(true, 1 << 20);
    n.flags |= tflags::READ_ONLY;
    let mut s = ClientSession::new(n, true);
    let refused = |r: Result<Submitted, ClientError>| matches!(r, Err(ClientError::Invalid { .. }));
    assert!(refused(s.submit(ClientRequest::Write {
        offset: 0,
        length: 1,
        fua: false
    })));
    assert!(refused(s.submit(ClientRequest::Read {
        offset: u64::MAX,
        length: 2
    })));
    assert!(refused(s.submit(ClientRequest::WriteZeroes {
        offset: 0,
        length: 1,
        flags: ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        }
    })));
    let ok = s
        .submit(ClientRequest::Read {
            offset: 4096,
            length: 512,
        })
        .unwrap();
    let h = RequestHeader::parse(&ok.header).unwrap();
    assert_eq!(
        (h.command, h.cookie, h.offset, h.length),
        (cmd::READ, ok.cookie, 4096, 512)
    );
    assert_eq!(s.in_flight(), 1);
}
