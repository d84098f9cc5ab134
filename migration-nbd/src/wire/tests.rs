//! Property tests: every codec round-trips, and arbitrary bytes fed to the server's
//! negotiation and request parsing (and to the client's) never panic. (The client's reply
//! handling has its own, in `client::session::tests`.)

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::handshake::{
    ClientHandshake, ClientWants, ExportInfo, HandshakeLimits, ServerHandshake, ServerStep,
};
use crate::proto::{self, cmd, opt, rep, tflags};
use crate::transmission::{Request, Session, Verdict};

fn nbd_string() -> impl Strategy<Value = String> {
    // Protocol strings: UTF-8 without NUL, at most 4096 bytes.
    "[^\u{0}]{0,40}"
}

fn go_request() -> impl Strategy<Value = GoRequest> {
    (nbd_string(), prop::collection::vec(any::<u16>(), 0..8)).prop_map(|(name, info_requests)| {
        GoRequest {
            name,
            info_requests,
        }
    })
}

fn meta_request() -> impl Strategy<Value = MetaContextRequest> {
    (nbd_string(), prop::collection::vec(nbd_string(), 0..5))
        .prop_map(|(export, queries)| MetaContextRequest { export, queries })
}

fn client_option() -> impl Strategy<Value = ClientOption> {
    prop_oneof![
        nbd_string().prop_map(ClientOption::ExportName),
        Just(ClientOption::Abort),
        Just(ClientOption::List),
        Just(ClientOption::StartTls),
        go_request().prop_map(ClientOption::Info),
        go_request().prop_map(ClientOption::Go),
        Just(ClientOption::StructuredReply),
        meta_request().prop_map(ClientOption::ListMetaContext),
        meta_request().prop_map(ClientOption::SetMetaContext),
        (12u32..1000, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(option, d)| {
            ClientOption::Unknown {
                option,
                data: Bytes::from(d),
            }
        }),
    ]
}

fn option_reply() -> impl Strategy<Value = OptionReply> {
    let info = prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoReply::Export { size, flags }),
        nbd_string().prop_map(InfoReply::Name),
        nbd_string().prop_map(InfoReply::Description),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
            InfoReply::BlockSize(BlockSize {
                minimum,
                preferred,
                maximum,
            })
        }),
        (4u16.., prop::collection::vec(any::<u8>(), 0..32)).prop_map(|(kind, d)| {
            InfoReply::Unknown {
                kind,
                data: Bytes::from(d),
            }
        }),
    ];
    prop_oneof![
        Just(OptionReply::Ack),
        (nbd_string(), nbd_string())
            .prop_map(|(name, details)| OptionReply::Server { name, details }),
        info.prop_map(OptionReply::Info),
        (any::<u32>(), nbd_string()).prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
        ((1u32..11).prop_map(|c| c | rep::ERROR_BIT), nbd_string())
            .prop_map(|(code, message)| OptionReply::Error { code, message }),
        (5u32..1000, prop::collection::vec(any::<u8>(), 0..32)).prop_map(|(reply_type, d)| {
            OptionReply::Unknown {
                reply_type,
                data: Bytes::from(d),
            }
        }),
    ]
}

fn chunk_payload() -> impl Strategy<Value = ChunkPayload> {
    prop_oneof![
        Just(ChunkPayload::None),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 1..256)).prop_map(|(offset, d)| {
            ChunkPayload::OffsetData {
                offset,
                data: Bytes::from(d),
            }
        }),
        (any::<u64>(), 1u32..)
            .prop_map(|(offset, length)| ChunkPayload::OffsetHole { offset, length }),
        (
            any::<u32>(),
            prop::collection::vec((1u32.., any::<u32>()), 1..20)
        )
            .prop_map(|(context_id, d)| ChunkPayload::BlockStatus {
                context_id,
                descriptors: d
                    .into_iter()
                    .map(|(length, flags)| BlockDescriptor { length, flags })
                    .collect(),
            }),
        (1u32.., nbd_string()).prop_map(|(error, message)| ChunkPayload::Error { error, message }),
        (1u32.., nbd_string(), any::<u64>()).prop_map(|(error, message, offset)| {
            ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            }
        }),
        ((0x8003u16..), 1u32.., nbd_string()).prop_map(|(kind, error, message)| {
            ChunkPayload::UnknownError {
                kind,
                error,
                message,
            }
        }),
    ]
}

fn exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: String::new(),
            description: "default".into(),
            size: 1 << 30,
            flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
            block_size: BlockSize::default(),
        },
        ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: 4096,
            flags: tflags::HAS_FLAGS | tflags::READ_ONLY,
            block_size: BlockSize::default(),
        },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn client_options_round_trip(o in client_option()) {
        let mut b = BytesMut::new();
        o.encode(&mut b);
        let h = OptionHeader::peek(&b).unwrap().unwrap();
        prop_assert_eq!(h.option, o.code());
        prop_assert_eq!(h.length as usize, b.len() - OPTION_HEADER_LEN);
        let data = Bytes::copy_from_slice(&b[OPTION_HEADER_LEN..]);
        prop_assert_eq!(ClientOption::parse(h.option, data).unwrap(), o);
    }

    #[test]
    fn option_replies_round_trip(r in option_reply(), option in any::<u32>()) {
        let mut b = BytesMut::new();
        r.encode(option, &mut b);
        let h = OptionReplyHeader::peek(&b).unwrap().unwrap();
        prop_assert_eq!(h.option, option);
        prop_assert_eq!(h.length as usize, b.len() - OPTION_REPLY_HEADER_LEN);
        let data = Bytes::copy_from_slice(&b[OPTION_REPLY_HEADER_LEN..]);
        prop_assert_eq!(OptionReply::parse(h.reply_type, data).unwrap(), r);
    }

    #[test]
    fn requests_round_trip(flags in any::<u16>(), command in any::<u16>(), cookie in any::<u64>(),
                           offset in any::<u64>(), length in any::<u32>()) {
        let h = RequestHeader { flags, command, cookie, offset, length };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        b.extend_from_slice(b"rest");
        prop_assert_eq!(RequestHeader::decode(&mut b).unwrap(), Some(h));
        prop_assert_eq!(&b[..], b"rest");
    }

    #[test]
    fn reply_headers_round_trip(cookie in any::<u64>(), error in any::<u32>(), p in chunk_payload(), done in any::<bool>()) {
        let mut b = BytesMut::new();
        encode_simple_reply(cookie, error, &mut b);
        p.encode_chunk(cookie, done, &mut b);
        prop_assert_eq!(ReplyHeader::decode(&mut b).unwrap(), Some(ReplyHeader::Simple { cookie, error }));
        let Some(ReplyHeader::Chunk(h)) = ReplyHeader::decode(&mut b).unwrap() else {
            panic!("chunk header expected")
        };
        prop_assert_eq!(h.cookie, cookie);
        prop_assert_eq!(h.is_done(), done);
        prop_assert_eq!(h.length as usize, b.len());
        prop_assert_eq!(ChunkPayload::parse(h.kind, b.freeze()).unwrap(), p);
    }

    #[test]
    fn truncated_headers_wait_for_more(cut in 0usize..28) {
        let h = RequestHeader { flags: 0, command: 0, cookie: 1, offset: 2, length: 3 };
        let mut b = BytesMut::from(&h.to_bytes()[..cut]);
        prop_assert_eq!(RequestHeader::decode(&mut b).unwrap(), None);
        prop_assert_eq!(b.len(), cut);
    }

    /// The server's negotiation never panics, whatever arrives and however it is split, and
    /// never buffers more than the option limit.
    #[test]
    fn server_handshake_survives_arbitrary_bytes(
        prefix in prop::sample::select(vec![vec![], vec![0u8, 0, 0, 3]]),
        body in prop::collection::vec(any::<u8>(), 0..2048),
        split in 1usize..64,
    ) {
        let mut out = BytesMut::new();
        let limits = HandshakeLimits { max_option_len: 512, max_options: 16 };
        let mut hs = ServerHandshake::new(exports(), limits, &mut out);
        let mut input = BytesMut::new();
        let bytes: Vec<u8> = prefix.into_iter().chain(body).collect();
        for piece in bytes.chunks(split) {
            input.extend_from_slice(piece);
            match hs.handle(&mut input, &mut out) {
                Ok(ServerStep::NeedMore) => {
                    prop_assert!(input.len() < 16 + 512 + 64);
                }
                Ok(_) | Err(_) => break,
            }
        }
    }

    /// Well-formed options with arbitrary contents, in any order, never panic the server
    /// and every one gets a reply (or ends the negotiation).
    #[test]
    fn server_handshake_answers_any_option_sequence(opts in prop::collection::vec(client_option(), 1..12)) {
        let mut out = BytesMut::new();
        let mut hs = ServerHandshake::new(exports(), HandshakeLimits::default(), &mut out);
        out.clear();
        let mut input = BytesMut::new();
        input.extend_from_slice(&proto::client_flags::FIXED_NEWSTYLE.to_be_bytes());
        for o in &opts {
            o.encode(&mut input);
        }
        let mut replied = 0;
        if !matches!(hs.handle(&mut input, &mut out), Ok(ServerStep::NeedMore)) {
            // GO, EXPORT_NAME or ABORT ended the negotiation, or an error did.
            return Ok(());
        }
        // Count final replies (ACK or error) per option.
        let mut b = out.clone();
        while let Some(h) = OptionReplyHeader::peek(&b).unwrap() {
            let total = OPTION_REPLY_HEADER_LEN + h.length as usize;
            if h.reply_type == rep::ACK || h.reply_type & rep::ERROR_BIT != 0 {
                replied += 1;
            }
            let _ = b.split_to(total);
        }
        prop_assert_eq!(replied, opts.len());
        prop_assert!(b.is_empty());
    }

    /// Any request header gets a verdict without panicking; accepted ones lie inside the
    /// export and within the payload limit.
    #[test]
    fn request_checks_never_panic(raw in prop::array::uniform28(any::<u8>()),
                                  structured in any::<bool>(), ro in any::<bool>()) {
        let mut raw = raw;
        raw[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        raw[6] = 0;
        raw[7] %= 10;
        let h = RequestHeader::parse(&raw).unwrap();
        let mut flags = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_TRIM
            | tflags::SEND_WRITE_ZEROES | tflags::SEND_FUA;
        if ro { flags |= tflags::READ_ONLY; }
        let s = Session {
            size: 1 << 20,
            flags,
            structured_replies: structured,
            base_allocation_id: Some(1),
            alignment: 1,
            max_payload: 1 << 16,
            max_drain: 1 << 17,
        };
        if let Ok(Verdict::Accept(r)) = s.check(&h) {
            match r {
                Request::Read { offset, length, .. } | Request::Write { offset, length, .. } => {
                    prop_assert!(offset + length as u64 <= 1 << 20);
                    prop_assert!(length <= 1 << 16);
                }
                Request::Trim { offset, length, .. } | Request::Cache { offset, length }
                | Request::WriteZeroes { offset, length, .. } | Request::BlockStatus { offset, length, .. } => {
                    prop_assert!(offset + length as u64 <= 1 << 20);
                }
                Request::Flush | Request::Disconnect => {}
            }
            if ro {
                let writes = matches!(r, Request::Write { .. } | Request::Trim { .. } | Request::WriteZeroes { .. });
                prop_assert!(!writes, "write accepted on a read-only export");
            }
        }
    }

    /// The client's negotiation and reply parsing never panic on arbitrary server bytes.
    #[test]
    fn client_parsers_survive_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048),
                                              greet in any::<bool>(), kind in any::<u16>()) {
        let mut input = BytesMut::new();
        if greet {
            encode_greeting(proto::handshake_flags::FIXED_NEWSTYLE, &mut input);
        }
        input.extend_from_slice(&bytes);
        let mut hs = ClientHandshake::new(ClientWants::new("x"));
        let mut out = BytesMut::new();
        let _ = hs.handle(&mut input, &mut out);
        let mut b = BytesMut::from(&bytes[..]);
        let _ = ReplyHeader::decode(&mut b);
        let _ = ChunkPayload::parse(kind, Bytes::from(bytes.clone()));
        let _ = OptionReply::parse(u32::from(kind) | if greet { rep::ERROR_BIT } else { 0 }, Bytes::from(bytes.clone()));
        for code in [opt::INFO, opt::GO, opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT, opt::EXPORT_NAME] {
            let _ = ClientOption::parse(code, Bytes::from(bytes.clone()));
        }
    }
}

#[test]
fn meta_context_count_is_bounded_before_allocating() {
    // Claims 2^32-1 queries in a few bytes: rejected without reserving that many.
    let mut d = BytesMut::new();
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(ClientOption::parse(opt::SET_META_CONTEXT, d.freeze()).is_err());
}

#[test]
fn unknown_command_is_rejected_with_einval_and_write_payload_drained() {
    let s = Session {
        size: 1 << 20,
        flags: tflags::HAS_FLAGS,
        structured_replies: false,
        base_allocation_id: None,
        alignment: 1,
        max_payload: 1 << 16,
        max_drain: 1 << 17,
    };
    let h = RequestHeader {
        flags: 0,
        command: 42,
        cookie: 1,
        offset: 0,
        length: 10,
    };
    match s.check(&h).unwrap() {
        Verdict::Reject(r) => {
            assert_eq!(r.error, proto::NbdErrno::EINVAL);
            assert_eq!(r.drain, 0);
        }
        v => panic!("{v:?}"),
    }
    let w = RequestHeader {
        command: cmd::WRITE,
        offset: (1 << 20) - 1,
        ..h
    };
    match s.check(&w).unwrap() {
        Verdict::Reject(r) => {
            assert_eq!(r.error, proto::NbdErrno::ENOSPC);
            assert_eq!(r.drain, 10);
        }
        v => panic!("{v:?}"),
    }
    let huge = RequestHeader {
        command: cmd::WRITE,
        length: 1 << 20,
        ..h
    };
    assert!(
        s.check(&huge).is_err(),
        "a payload above max_drain ends the connection"
    );
}

proptest! {
    /// The server session's encoders write what the chunk codec writes (and so what the
    /// client's parsers read back).
    #[test]
    fn server_session_encoders_match_the_codecs(
        cookie in any::<u64>(),
        offset in any::<u64>(),
        len in 1u32..1 << 25,
        done in any::<bool>(),
        descriptors in prop::collection::vec((1u32.., any::<u32>()), 1..50),
        message in nbd_string(),
    ) {
        let s = Session {
            size: u64::MAX,
            flags: tflags::HAS_FLAGS,
            structured_replies: true,
            base_allocation_id: Some(9),
            alignment: 1,
            max_payload: 1 << 25,
            max_drain: 1 << 26,
        };
        let descriptors: Vec<BlockDescriptor> = descriptors
            .into_iter()
            .map(|(length, flags)| BlockDescriptor { length, flags })
            .collect();
        let (mut ours, mut codec) = (BytesMut::new(), BytesMut::new());
        s.encode_block_status(cookie, &descriptors, &mut ours);
        ChunkPayload::BlockStatus { context_id: 9, descriptors }.encode_chunk(cookie, true, &mut codec);
        prop_assert_eq!(&ours, &codec);

        let (mut ours, mut codec) = (BytesMut::new(), BytesMut::new());
        s.encode_hole(cookie, offset, len, done, &mut ours);
        ChunkPayload::OffsetHole { offset, length: len }.encode_chunk(cookie, done, &mut codec);
        prop_assert_eq!(&ours, &codec);

        let (mut ours, mut codec) = (BytesMut::new(), BytesMut::new());
        s.encode_data_header(cookie, offset, 3, done, &mut ours);
        ours.extend_from_slice(b"abc");
        ChunkPayload::OffsetData { offset, data: Bytes::from_static(b"abc") }
            .encode_chunk(cookie, done, &mut codec);
        prop_assert_eq!(&ours, &codec);

        let (mut ours, mut codec) = (BytesMut::new(), BytesMut::new());
        s.encode_error_at(cookie, proto::NbdErrno::EIO, &message, offset, &mut ours);
        ChunkPayload::ErrorOffset { error: 5, message: message.clone(), offset }
            .encode_chunk(cookie, true, &mut codec);
        prop_assert_eq!(&ours, &codec);
    }
}

#[test]
fn server_session_errors_are_cut_to_the_protocol_string_limit() {
    let s = Session {
        size: 1 << 20,
        flags: tflags::HAS_FLAGS,
        structured_replies: true,
        base_allocation_id: None,
        alignment: 1,
        max_payload: 1 << 16,
        max_drain: 1 << 17,
    };
    let mut out = BytesMut::new();
    // 3-byte characters: the cut must fall on a character boundary.
    s.encode_error(1, proto::NbdErrno::EIO, &"€".repeat(2000), &mut out);
    let Some(ReplyHeader::Chunk(h)) = ReplyHeader::decode(&mut out).unwrap() else {
        panic!("a structured error chunk")
    };
    match ChunkPayload::parse(h.kind, out.freeze()).unwrap() {
        ChunkPayload::Error { message, .. } => {
            assert!(message.len() <= proto::MAX_STRING && message.len() > 4000);
            assert!(message.chars().all(|c| c == '€'));
        }
        other => panic!("{other:?}"),
    }
}
