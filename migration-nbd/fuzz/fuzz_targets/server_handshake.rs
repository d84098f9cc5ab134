//! Arbitrary client bytes into the server's negotiation: it must never panic, and never
//! hold more than one option (bounded by the limits) while it waits for the rest.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migration_nbd::handshake::{
    BlockSize, ExportInfo, HandshakeLimits, ServerHandshake, ServerStep,
};
use migration_nbd::proto::tflags;

fuzz_target!(|data: &[u8]| {
    let Some((&setup, rest)) = data.split_first() else {
        return;
    };
    let exports = vec![ExportInfo {
        name: "disk".into(),
        description: "a disk".into(),
        size: 1 << 30,
        flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
        block_size: BlockSize::default(),
    }];
    let limits = HandshakeLimits {
        max_option_len: 1024,
        max_options: 64,
    };
    let mut out = BytesMut::new();
    let mut hs = ServerHandshake::new(exports, limits, &mut out);
    let mut input = BytesMut::new();
    if setup & 1 != 0 {
        // Valid client flags, so that the bytes reach the options.
        input.extend_from_slice(&[0, 0, 0, 3]);
    }
    let piece = usize::from(setup >> 1).max(1);
    for p in rest.chunks(piece) {
        input.extend_from_slice(p);
        match hs.handle(&mut input, &mut out) {
            Ok(ServerStep::NeedMore) => {
                assert!(input.len() < 16 + 1024 + piece, "buffered past the option limit");
            }
            Ok(_) | Err(_) => return,
        }
    }
});
