//! Arbitrary request headers into the server's request checks: every header gets a verdict
//! without a panic, and an accepted request lies inside the export and the payload limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_nbd::proto::tflags;
use migration_nbd::transmission::{REQUEST_HEADER_LEN, Request, RequestHeader, Session, Verdict};

fuzz_target!(|data: &[u8]| {
    let Some((&setup, rest)) = data.split_first() else {
        return;
    };
    let mut flags = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_TRIM;
    if setup & 1 != 0 {
        flags |= tflags::READ_ONLY;
    }
    let session = Session {
        size: 1 << 30,
        flags,
        structured_replies: setup & 2 != 0,
        base_allocation_id: (setup & 4 != 0).then_some(1),
        alignment: if setup & 8 != 0 { 4096 } else { 1 },
        max_payload: 1 << 20,
        max_drain: 1 << 21,
    };
    for raw in rest.chunks_exact(REQUEST_HEADER_LEN) {
        let raw: &[u8; REQUEST_HEADER_LEN] = raw.try_into().expect("exact chunk");
        let Ok(h) = RequestHeader::parse(raw) else {
            continue;
        };
        let Ok(Verdict::Accept(r)) = session.check(&h) else {
            continue;
        };
        let range = match r {
            Request::Read { offset, length, .. } | Request::Write { offset, length, .. } => {
                assert!(length <= 1 << 20);
                Some((offset, length))
            }
            Request::Trim { offset, length, .. }
            | Request::Cache { offset, length }
            | Request::WriteZeroes { offset, length, .. }
            | Request::BlockStatus { offset, length, .. } => Some((offset, length)),
            _ => None,
        };
        if let Some((offset, length)) = range {
            assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= 1 << 30));
        }
    }
});
