//! Arbitrary server bytes into `ClientSession`, driven the way `Client` drives it. The
//! session must never panic, never point the driver outside a request's buffer, and never
//! complete a request twice or one it did not have.

#![no_main]

use std::collections::HashMap;

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use migration_nbd::handshake::{BlockSize, ClientNegotiated};
use migration_nbd::proto::tflags;
use migration_nbd::{ClientRequest, ClientSession, ReplyStep};

fuzz_target!(|data: &[u8]| {
    // Two bytes choose the session and how the stream is cut; the rest is the stream.
    let [setup, cut, stream @ ..] = data else {
        return;
    };
    let structured = setup & 1 != 0;
    let negotiated = ClientNegotiated {
        size: 1 << 40,
        flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA,
        structured_replies: structured,
        base_allocation_id: structured.then_some(u32::from(setup >> 4)),
        block_size: BlockSize::default(),
    };
    let mut session = ClientSession::new(negotiated, false);
    let mut bufs: HashMap<u64, Vec<u8>> = HashMap::new();
    let read_len = u32::from(*setup) * 37;
    let requests = [
        ClientRequest::Read {
            offset: 4096,
            length: read_len,
        },
        ClientRequest::Write {
            offset: 0,
            length: 512,
            fua: false,
        },
        ClientRequest::BlockStatus {
            offset: 4096,
            length: 1 << 20,
            req_one: setup & 2 != 0,
        },
        ClientRequest::Flush,
    ];
    let mut cookies = Vec::new();
    for r in requests {
        let s = session.submit(r).expect("a lax session accepts any request");
        if let ClientRequest::Read { length, .. } = r {
            bufs.insert(s.cookie, vec![0; length as usize]);
        }
        cookies.push(s.cookie);
    }
    let piece = usize::from(*cut).max(1);
    let mut input = BytesMut::new();
    let mut pos = 0;
    let mut done = Vec::new();
    loop {
        let step = match session.handle_input(&mut input) {
            Ok(s) => s,
            Err(_) => {
                // An error is final.
                assert!(session.is_closed());
                assert!(session.handle_input(&mut input).is_err());
                return;
            }
        };
        match step {
            ReplyStep::NeedInput { min } => {
                assert!(min > 0);
                if pos == stream.len() {
                    return;
                }
                let n = piece.min(stream.len() - pos);
                input.extend_from_slice(&stream[pos..pos + n]);
                pos += n;
            }
            ReplyStep::Payload { cookie, offset, len } => {
                assert!(len > 0);
                let buf = bufs.get_mut(&cookie).expect("payload for a read in flight");
                let dst = &mut buf[offset..offset + len];
                let from_input = input.len().min(len);
                dst[..from_input].copy_from_slice(&input[..from_input]);
                input.advance(from_input);
                let rest = (len - from_input).min(stream.len() - pos);
                dst[from_input..from_input + rest].copy_from_slice(&stream[pos..pos + rest]);
                pos += rest;
                session.payload_received(from_input + rest);
                if from_input + rest < len {
                    return;
                }
            }
            ReplyStep::Zeroes { cookie, offset, len } => {
                let buf = bufs.get_mut(&cookie).expect("zeroes for a read in flight");
                buf[offset..offset + len].fill(0);
            }
            ReplyStep::Complete { cookie, .. } => {
                assert!(cookies.contains(&cookie), "completion of an unknown cookie");
                assert!(!done.contains(&cookie), "completed twice");
                done.push(cookie);
            }
            _ => {}
        }
    }
});
