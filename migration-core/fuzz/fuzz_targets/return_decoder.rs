//! The return-path decoder on arbitrary bytes: it must never panic, and a received-pages
//! bitmap it accepts must fit the page count it was given.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migration_core::stream::{DecoderOptions, Frame, ReturnDecoder, ReturnRecord};

const PAGES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut dec = ReturnDecoder::new(DecoderOptions {
        page_count: Some(PAGES),
        ..DecoderOptions::default()
    });
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = dec.decode(&mut buf) {
        match frame {
            Frame::Record(ReturnRecord::ReceivedBitmap(b)) => {
                assert!(b.len() as u64 <= PAGES);
            }
            Frame::Record(ReturnRecord::PageRequest { page, count }) => {
                assert!(
                    page.checked_add(u64::from(count))
                        .is_some_and(|e| e <= PAGES)
                );
            }
            _ => {}
        }
    }
});
