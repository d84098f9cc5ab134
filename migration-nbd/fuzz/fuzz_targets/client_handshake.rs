//! Arbitrary server bytes into the client's negotiation, after a valid greeting or not.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migration_nbd::handshake::{ClientHandshake, ClientStep, ClientWants};

fuzz_target!(|data: &[u8]| {
    let Some((&setup, rest)) = data.split_first() else {
        return;
    };
    let mut wants = ClientWants::new("disk");
    wants.structured_replies = setup & 1 != 0;
    wants.base_allocation = setup & 2 != 0;
    let mut hs = ClientHandshake::new(wants);
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    if setup & 4 != 0 {
        // A valid fixed-newstyle greeting, so that the bytes reach the option replies.
        input.extend_from_slice(b"NBDMAGICIHAVEOPT\x00\x03");
    }
    let piece = usize::from(setup >> 3).max(1);
    for p in rest.chunks(piece) {
        input.extend_from_slice(p);
        match hs.handle(&mut input, &mut out) {
            Ok(ClientStep::NeedMore) => {}
            Ok(_) | Err(_) => return,
        }
    }
});
