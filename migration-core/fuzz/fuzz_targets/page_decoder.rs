//! Page decoding of arbitrary zstd frames and deltas onto a page: it must never panic nor
//! write past the page, and a delta that validates must apply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_core::page::{EncodedPage, PageDecoder, delta_decode, delta_validate};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    let mut page = vec![0x5au8; 4096];
    let mut dec = PageDecoder::new().expect("a zstd context");
    let encoded = if kind & 1 == 0 {
        EncodedPage::Zstd(payload)
    } else {
        EncodedPage::Delta(payload)
    };
    let _ = dec.apply(encoded, &mut page);
    assert_eq!(page.len(), 4096);
    if delta_validate(payload, 4096).is_ok() {
        let mut p = vec![0u8; 4096];
        assert!(
            delta_decode(payload, &mut p).is_ok(),
            "a validated delta did not apply"
        );
    }
});
