//! The migration stream decoder on arbitrary bytes, fed in pieces whose sizes the input
//! chooses: it must never panic, and once it refused the stream it must keep refusing.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migration_core::stream::{DecoderOptions, StreamDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut dec = StreamDecoder::new(DecoderOptions {
        // Small, so that length checks are reached.
        max_record_len: 1 << 16,
        ..DecoderOptions::default()
    });
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    assert!(
                        dec.decode(&mut buf).is_err(),
                        "a refused stream was taken up again"
                    );
                    return;
                }
            }
        }
    }
    let _ = dec.finish(&buf);
});
