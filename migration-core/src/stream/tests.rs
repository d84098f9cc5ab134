//! Tests of the stream codecs: round trips, framing, corruption, bounds.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::bitmap::DirtyBitmap;
use crate::page::{PageDecoder, PageEncoder, PageEncoding};

const VM: [u8; 16] = *b"0123456789abcdef";

/// Decodes `wire` fed in pieces of `chunk` bytes; returns the frames and the first error
/// (from `decode` or `finish`).
fn decode_stream(
    wire: &[u8],
    chunk: usize,
    opts: DecoderOptions,
) -> (Vec<Frame<Record>>, Result<(), StreamError>) {
    let mut dec = StreamDecoder::new(opts);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in wire.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    // A failed decoder stays failed.
                    assert!(matches!(
                        dec.decode(&mut buf),
                        Err(StreamError::Poisoned { .. })
                    ));
                    return (frames, Err(e));
                }
            }
        }
    }
    let end = dec.finish(&buf);
    (frames, end)
}

fn decode_return(
    wire: &[u8],
    chunk: usize,
    opts: DecoderOptions,
) -> (Vec<Frame<ReturnRecord>>, Result<(), StreamError>) {
    let mut dec = ReturnDecoder::new(opts);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in wire.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Err(e)),
            }
        }
    }
    let end = dec.finish(&buf);
    (frames, end)
}

fn encode_stream(header: &StreamHeader, records: &[Record]) -> BytesMut {
    let mut out = BytesMut::new();
    header.encode(Direction::Migration, &mut out);
    for r in records {
        r.encode(&mut out);
    }
    out
}

fn encode_return(header: &StreamHeader, records: &[ReturnRecord]) -> BytesMut {
    let mut out = BytesMut::new();
    header.encode(Direction::Return, &mut out);
    for r in records {
        r.encode(&mut out);
    }
    out
}

fn frames_of<R>(header: StreamHeader, records: Vec<R>) -> Vec<Frame<R>> {
    std::iter::once(Frame::Header(header))
        .chain(records.into_iter().map(Frame::Record))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Strategies.

fn arb_header() -> impl Strategy<Value = StreamHeader> {
    (any::<[u8; 16]>(), any::<bool>(), any::<u8>()).prop_map(|(vm_uuid, resume, optional)| {
        let mut flags = HeaderFlags(optional.into());
        if resume {
            flags = flags | HeaderFlags::POSTCOPY_RESUME;
        }
        StreamHeader { flags, vm_uuid }
    })
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

/// A valid config: page size 2^0..2^12, one to four aligned, non-overlapping regions.
fn arb_config() -> impl Strategy<Value = Config> {
    (
        0u32..=12,
        proptest::collection::vec((0u64..1000, 1u64..200), 1..4),
        arb_bytes(40),
        any::<bool>(),
    )
        .prop_map(|(shift, gaps_sizes, vmm, reverse)| {
            let page = 1u64 << shift;
            let mut at = 0u64;
            let mut regions: Vec<(u64, u64)> = gaps_sizes
                .into_iter()
                .map(|(gap, size)| {
                    let base = at + gap * page;
                    at = base + size * page;
                    (base, size * page)
                })
                .collect();
            if reverse {
                regions.reverse();
            }
            Config {
                page_size: page as u32,
                regions,
                vmm,
            }
        })
}

fn config_pages(c: &Config) -> u64 {
    c.regions.iter().map(|(_, s)| s / c.page_size as u64).sum()
}

fn arb_page_data(page_size: u32) -> impl Strategy<Value = PageData> {
    let p = page_size as usize;
    prop_oneof![
        Just(PageData::Zero),
        proptest::collection::vec(any::<u8>(), p).prop_map(|v| PageData::Raw(v.into())),
        proptest::collection::vec(any::<u8>(), 0..=p.min(64))
            .prop_map(|v| PageData::Zstd(v.into())),
        proptest::collection::vec(any::<u8>(), 0..=p.min(64))
            .prop_map(|v| PageData::Delta(v.into())),
    ]
}

fn arb_batch(page_size: u32, pages: u64) -> impl Strategy<Value = PageBatch> {
    proptest::collection::vec((0..pages.max(1), arb_page_data(page_size)), 0..6).prop_map(
        move |v| PageBatch {
            page_size,
            pages: v
                .into_iter()
                .map(|(index, data)| Page { index, data })
                .collect(),
        },
    )
}

fn arb_ranges(pages: u64) -> impl Strategy<Value = Vec<Range<u64>>> {
    proptest::collection::vec((0..pages.max(1), 1..=pages.max(1)), 0..8).prop_map(move |v| {
        v.into_iter()
            .filter_map(|(s, n)| (s + n <= pages).then_some(s..s + n))
            .collect()
    })
}

fn arb_stats() -> impl Strategy<Value = IterationEnd> {
    any::<[u64; 10]>().prop_map(|f| IterationEnd {
        iteration: f[0],
        zero_pages: f[1],
        raw_pages: f[2],
        zstd_pages: f[3],
        delta_pages: f[4],
        bytes: f[5],
        dirty_pages_left: f[6],
        duration_ns: f[7],
        dirty_rate: f[8],
        bandwidth: f[9],
    })
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9/_-]{1,20}", "\\PC{0,12}"]
}

/// A record that may follow the config of a RAM of `pages` pages of `page_size` bytes.
fn arb_body_record(page_size: u32, pages: u64) -> impl Strategy<Value = Record> {
    prop_oneof![
        arb_batch(page_size, pages).prop_map(Record::PageBatch),
        (arb_string(), any::<u32>(), arb_bytes(100)).prop_map(|(id, version, data)| {
            Record::DeviceState(DeviceState { id, version, data })
        }),
        arb_stats().prop_map(Record::IterationEnd),
        arb_ranges(pages).prop_map(Record::DiscardPages),
        arb_ranges(pages).prop_map(|discard| Record::SwitchToPostcopy { discard }),
        Just(Record::EndOfData),
        Just(Record::PostcopyCommit),
    ]
}

fn arb_terminal() -> impl Strategy<Value = Record> {
    prop_oneof![
        Just(Record::Complete),
        arb_string().prop_map(|reason| Record::Abort { reason }),
    ]
}

/// A whole valid migration stream: config, body records, a terminal record.
fn arb_stream() -> impl Strategy<Value = (StreamHeader, Vec<Record>)> {
    (arb_header(), arb_config()).prop_flat_map(|(h, config)| {
        let (ps, pages) = (config.page_size, config_pages(&config));
        (
            Just(h),
            Just(config),
            proptest::collection::vec(arb_body_record(ps, pages), 0..6),
            arb_terminal(),
        )
            .prop_map(|(h, config, body, end)| {
                let mut records = vec![Record::Config(config)];
                records.extend(body);
                records.push(end);
                (h, records)
            })
    })
}

fn arb_bitmap(pages: usize) -> impl Strategy<Value = DirtyBitmap> {
    prop_oneof![
        // Sparse runs.
        proptest::collection::vec((0..pages.max(1), 1usize..20), 0..10).prop_map(move |runs| {
            let mut b = DirtyBitmap::new(pages);
            for (s, n) in runs {
                b.set_range(s.min(pages)..(s + n).min(pages));
            }
            b
        }),
        // Dense noise.
        proptest::collection::vec(any::<bool>(), pages).prop_map(move |bits| {
            let mut b = DirtyBitmap::new(pages);
            for (i, set) in bits.into_iter().enumerate() {
                if set {
                    b.set(i);
                }
            }
            b
        }),
    ]
}

fn arb_return_record(pages: u64) -> impl Strategy<Value = ReturnRecord> {
    prop_oneof![
        any::<u64>().prop_map(|n| ReturnRecord::Ack(Ack::Iteration(n))),
        any::<u64>().prop_map(|n| ReturnRecord::Ack(Ack::StreamOffset(n))),
        any::<u64>().prop_map(|n| ReturnRecord::Ack(Ack::PostcopyReady(n))),
        (0..pages.max(1), 1u32..64).prop_filter_map("in range", move |(page, count)| {
            (page + u64::from(count) <= pages).then_some(ReturnRecord::PageRequest { page, count })
        }),
        arb_bitmap(pages as usize).prop_map(ReturnRecord::ReceivedBitmap),
    ]
}

fn arb_verdict() -> impl Strategy<Value = ReturnRecord> {
    prop_oneof![
        Just(ReturnRecord::Verdict(Verdict::Running)),
        arb_string().prop_map(|reason| ReturnRecord::Verdict(Verdict::Failed { reason })),
    ]
}

fn arb_return_stream() -> impl Strategy<Value = (StreamHeader, u64, Vec<ReturnRecord>)> {
    (arb_header(), 1u64..700).prop_flat_map(|(h, pages)| {
        (
            Just(h),
            Just(pages),
            proptest::collection::vec(arb_return_record(pages), 0..6),
            arb_verdict(),
        )
            .prop_map(|(h, pages, mut body, end)| {
                body.push(end);
                (h, pages, body)
            })
    })
}

fn return_opts(pages: u64) -> DecoderOptions {
    DecoderOptions {
        page_count: Some(pages),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Round trips.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn migration_stream_round_trips_whole_bytewise_and_chunked(
        (header, records) in arb_stream(),
        chunk in 2usize..300,
    ) {
        let wire = encode_stream(&header, &records);
        let want = frames_of(header, records);
        let opts = DecoderOptions { expected_vm: Some(header.vm_uuid), ..Default::default() };

        let (whole, end) = decode_stream(&wire, wire.len(), opts.clone());
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&whole, &want);

        let (bytewise, end) = decode_stream(&wire, 1, opts.clone());
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&bytewise, &want);

        let (chunked, end) = decode_stream(&wire, chunk, opts);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&chunked, &want);
    }

    #[test]
    fn return_path_round_trips_whole_and_bytewise((header, pages, records) in arb_return_stream()) {
        let wire = encode_return(&header, &records);
        let want = frames_of(header, records);
        let (whole, end) = decode_return(&wire, wire.len(), return_opts(pages));
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&whole, &want);
        let (bytewise, end) = decode_return(&wire, 1, return_opts(pages));
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&bytewise, &want);
        // Without a known page count, the bitmap bound applies instead.
        let (unbounded, end) = decode_return(&wire, wire.len(), DecoderOptions::default());
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&unbounded, &want);
    }

    /// Pages copied straight from memory into a batch encode exactly as staged copies do:
    /// the same bytes on the wire, zero pages as zero entries.
    #[test]
    fn pages_copied_in_place_encode_as_staged_pages(
        pages in proptest::collection::vec(
            prop_oneof![
                Just(None),
                (0usize..512, any::<u8>()).prop_map(Some),
            ],
            1..24,
        ),
    ) {
        const PS: usize = 512;
        let mut mem = vec![0u8; PS * pages.len()];
        for (i, p) in pages.iter().enumerate() {
            if let Some((off, v)) = p {
                // A non-zero byte somewhere (or a zero one: then the page is zero).
                mem[i * PS + off] = *v;
            }
        }
        let mut staged = BytesMut::new();
        let mut w = PageBatchWriter::new(&mut staged, PS as u32);
        for (i, page) in mem.chunks(PS).enumerate() {
            if page.iter().all(|&b| b == 0) {
                w.push_zero(i as u64 * 3);
            } else {
                w.push_raw(i as u64 * 3, page);
            }
        }
        w.finish();
        let mut direct = BytesMut::new();
        let mut w = PageBatchWriter::new(&mut direct, PS as u32);
        let mut zeros = 0;
        for i in 0..pages.len() {
            // SAFETY: `mem` holds `pages.len()` pages.
            if unsafe { w.push_raw_from(i as u64 * 3, mem.as_ptr().add(i * PS)) } {
                zeros += 1;
            }
        }
        w.finish();
        prop_assert_eq!(&staged[..], &direct[..]);
        let want_zeros = mem.chunks(PS).filter(|p| p.iter().all(|&b| b == 0)).count();
        prop_assert_eq!(zeros, want_zeros);
    }

    /// Real encodings end to end: a source encodes pages (some against a previous copy)
    /// through the batch writer; the destination decodes the stream and applies each page
    /// onto its copy; both copies end up equal.
    #[test]
    fn real_page_encodings_round_trip_through_batches(
        seed in any::<u64>(),
        edits in proptest::collection::vec((0usize..8, 0usize..4096, any::<u8>()), 0..40),
        zstd in any::<bool>(),
    ) {
        const PS: usize = 4096;
        let pages = 8;
        // Old copies: a mix of zero, text-like and noisy pages.
        let mut x = seed | 1;
        let mut old = vec![0u8; PS * pages];
        for (i, page) in old.chunks_mut(PS).enumerate() {
            match i % 4 {
                0 => {}
                1 => page.iter_mut().enumerate().for_each(|(j, b)| *b = b"abcdefgh"[j % 8]),
                _ => page.iter_mut().for_each(|b| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }),
            }
        }
        let mut new = old.clone();
        for (p, off, v) in edits {
            new[p * PS + off] = v;
        }

        let mut enc = PageEncoder::new(PS, zstd.then_some(1)).unwrap();
        let mut out = BytesMut::new();
        StreamHeader::new(VM).encode(Direction::Migration, &mut out);
        let mut used = std::collections::HashSet::new();
        // First pass: every old page with no previous copy.
        let mut w = PageBatchWriter::new(&mut out, PS as u32);
        for (i, page) in old.chunks(PS).enumerate() {
            let e = enc.encode(page, None);
            used.insert(e.encoding());
            w.push(i as u64, e);
        }
        w.finish();
        // Second pass: every page again, against the copy sent before.
        let mut w = PageBatchWriter::new(&mut out, PS as u32);
        for (i, page) in new.chunks(PS).enumerate() {
            let e = enc.encode(page, Some(&old[i * PS..(i + 1) * PS]));
            used.insert(e.encoding());
            w.push(i as u64, e);
        }
        w.finish();
        Record::Complete.encode(&mut out);

        let (frames, end) = decode_stream(&out, 1000, DecoderOptions::default());
        prop_assert_eq!(end, Ok(()));
        let mut dest = vec![0xeeu8; PS * pages];
        let mut dec = PageDecoder::new().unwrap();
        let mut batches = 0;
        for f in &frames {
            if let Frame::Record(Record::PageBatch(b)) = f {
                batches += 1;
                for p in &b.pages {
                    let i = p.index as usize;
                    dec.apply(p.data.as_encoded(), &mut dest[i * PS..(i + 1) * PS]).unwrap();
                }
                if batches == 1 {
                    prop_assert_eq!(&dest, &old);
                }
            }
        }
        prop_assert_eq!(batches, 2);
        prop_assert_eq!(&dest, &new);
        prop_assert!(used.contains(&PageEncoding::Zero));
        prop_assert!(used.contains(&PageEncoding::Raw));
        prop_assert_eq!(used.contains(&PageEncoding::Zstd), zstd);
    }
}

#[test]
fn raw_pages_decode_as_slices_of_the_received_buffer() {
    let mut out = BytesMut::new();
    StreamHeader::new(VM).encode(Direction::Migration, &mut out);
    let page = vec![0x42u8; 4096];
    let mut w = PageBatchWriter::new(&mut out, 4096);
    w.push_raw(3, &page);
    w.finish();
    let mut dec = StreamDecoder::new(DecoderOptions::default());
    let received = out.as_ptr() as usize..out.as_ptr() as usize + out.len();
    assert!(matches!(dec.decode(&mut out), Ok(Some(Frame::Header(_)))));
    let Ok(Some(Frame::Record(Record::PageBatch(b)))) = dec.decode(&mut out) else {
        panic!("no batch");
    };
    let PageData::Raw(data) = &b.pages[0].data else {
        panic!("not raw");
    };
    assert_eq!(&data[..], &page[..]);
    // Zero-copy: the page's bytes live inside the buffer the stream was received into.
    assert!(received.contains(&(data.as_ptr() as usize)));
}

// ---------------------------------------------------------------------------------------
// Hostile input.

/// Frames `payload` as a record of type `t` with a correct CRC.
fn framed(t: u16, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    write_record(&mut out, RecordType(t), payload);
    out
}

const MIGRATION_TYPES: [u16; 8] = [
    0x0001, 0x0002, 0x0003, 0x8004, 0x0005, 0x0006, 0x0007, 0x0008,
];
const RETURN_TYPES: [u16; 4] = [0x0101, 0x0102, 0x0103, 0x0104];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        with_header in any::<bool>(),
        chunk in 1usize..64,
    ) {
        for dir in [Direction::Migration, Direction::Return] {
            let mut wire = BytesMut::new();
            if with_header {
                StreamHeader::new(VM).encode(dir, &mut wire);
            }
            wire.extend_from_slice(&bytes);
            match dir {
                Direction::Migration => {
                    let (_, end) = decode_stream(&wire, chunk, DecoderOptions::default());
                    prop_assert!(end.is_err());
                }
                Direction::Return => {
                    let (_, end) = decode_return(&wire, chunk, DecoderOptions::default());
                    prop_assert!(end.is_err());
                }
            }
        }
    }

    /// Arbitrary payloads behind a correct CRC reach the payload parsers. Whatever they
    /// accept must re-encode to something that decodes to the same record.
    #[test]
    fn arbitrary_payloads_with_valid_crc_never_panic(
        which in 0usize..12,
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        prefix in proptest::collection::vec(any::<u8>(), 0..16),
        with_config in any::<bool>(),
    ) {
        // Half the time, start the payload with plausible fixed fields so parsing goes
        // deeper than the first check.
        let mut p = prefix;
        p.extend_from_slice(&payload);
        if which < 8 {
            let t = MIGRATION_TYPES[which];
            let mut wire = BytesMut::new();
            StreamHeader::new(VM).encode(Direction::Migration, &mut wire);
            if with_config {
                Record::Config(Config { page_size: 16, regions: vec![(0, 16 * 100)], vmm: Bytes::new() }).encode(&mut wire);
            }
            wire.extend_from_slice(&framed(t, &p));
            let (frames, _) = decode_stream(&wire, wire.len(), DecoderOptions::default());
            if let Some(Frame::Record(r)) = frames.last() {
                if !(with_config && frames.len() == 2) {
                    let mut again = BytesMut::new();
                    StreamHeader::new(VM).encode(Direction::Migration, &mut again);
                    if with_config {
                        Record::Config(Config { page_size: 16, regions: vec![(0, 16 * 100)], vmm: Bytes::new() }).encode(&mut again);
                    }
                    r.encode(&mut again);
                    let (frames2, _) = decode_stream(&again, again.len(), DecoderOptions::default());
                    prop_assert_eq!(frames2.last(), Some(&Frame::Record(r.clone())));
                }
            }
        } else {
            let t = RETURN_TYPES[which - 8];
            let mut wire = BytesMut::new();
            StreamHeader::new(VM).encode(Direction::Return, &mut wire);
            wire.extend_from_slice(&framed(t, &p));
            let opts = DecoderOptions { max_bitmap_pages: 1 << 16, ..Default::default() };
            let (frames, _) = decode_return(&wire, wire.len(), opts.clone());
            if let Some(Frame::Record(r)) = frames.last() {
                let again = encode_return(&StreamHeader::new(VM), std::slice::from_ref(r));
                let (frames2, _) = decode_return(&again, again.len(), opts);
                prop_assert_eq!(frames2.last(), Some(&Frame::Record(r.clone())));
            }
        }
    }

    /// A single corrupted byte anywhere in a random valid stream: an error, and every
    /// record decoded before it is the original.
    #[test]
    fn single_byte_corruption_of_random_streams_is_detected(
        (header, records) in arb_stream(),
        pos in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let wire = encode_stream(&header, &records);
        let want = frames_of(header, records);
        let mut bad = wire.to_vec();
        let i = pos.index(bad.len());
        bad[i] ^= xor;
        let (frames, end) = decode_stream(&bad, bad.len(), DecoderOptions::default());
        prop_assert!(end.is_err(), "corruption at {} accepted", i);
        prop_assert!(frames.len() <= want.len());
        prop_assert_eq!(&frames[..], &want[..frames.len()]);
    }

    #[test]
    fn single_byte_corruption_of_random_return_paths_is_detected(
        (header, pages, records) in arb_return_stream(),
        pos in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let wire = encode_return(&header, &records);
        let want = frames_of(header, records);
        let mut bad = wire.to_vec();
        let i = pos.index(bad.len());
        bad[i] ^= xor;
        let (frames, end) = decode_return(&bad, bad.len(), return_opts(pages));
        prop_assert!(end.is_err(), "corruption at {} accepted", i);
        prop_assert_eq!(&frames[..], &want[..frames.len()]);
    }
}

/// A small stream with one record of every migration kind and every page encoding.
fn small_stream() -> (StreamHeader, Vec<Record>) {
    let header = StreamHeader {
        flags: HeaderFlags(0x0001),
        vm_uuid: VM,
    };
    let records = vec![
        Record::Config(Config {
            page_size: 16,
            regions: vec![(0x1000, 16 * 4), (0, 16 * 4)],
            vmm: Bytes::from_static(b"vcpus=1"),
        }),
        Record::PageBatch(PageBatch {
            page_size: 16,
            pages: vec![
                Page {
                    index: 0,
                    data: PageData::Zero,
                },
                Page {
                    index: 1,
                    data: PageData::Raw(Bytes::from_static(b"0123456789abcdef")),
                },
                Page {
                    index: 2,
                    data: PageData::Zstd(Bytes::from_static(b"zz")),
                },
                Page {
                    index: 7,
                    data: PageData::Delta(Bytes::from_static(&[3, 1, 9])),
                },
            ],
        }),
        Record::DeviceState(DeviceState {
            id: "uart".into(),
            version: 2,
            data: Bytes::from_static(b"\x01\x02"),
        }),
        Record::IterationEnd(IterationEnd {
            iteration: 1,
            zero_pages: 1,
            raw_pages: 1,
            zstd_pages: 1,
            delta_pages: 1,
            bytes: 99,
            dirty_pages_left: 2,
            duration_ns: 5,
            dirty_rate: 6,
            bandwidth: 7,
        }),
        Record::DiscardPages(vec![1..2, 6..8]),
        Record::SwitchToPostcopy {
            discard: vec![3..5, 0..1],
        },
        Record::Abort {
            reason: "no".into(),
        },
    ];
    (header, records)
}

#[test]
fn every_single_byte_corruption_of_a_small_stream_is_detected() {
    let (header, records) = small_stream();
    let wire = encode_stream(&header, &records);
    let want = frames_of(header, records);
    let (frames, end) = decode_stream(&wire, wire.len(), DecoderOptions::default());
    assert_eq!(end, Ok(()));
    assert_eq!(frames, want);
    for i in 0..wire.len() {
        for xor in [0x01u8, 0x02, 0x10, 0x80, 0xff, 0x5a] {
            let mut bad = wire.to_vec();
            bad[i] ^= xor;
            for chunk in [bad.len(), 7] {
                let (frames, end) = decode_stream(&bad, chunk, DecoderOptions::default());
                assert!(end.is_err(), "byte {i} ^ {xor:#x} accepted");
                assert_eq!(
                    frames[..],
                    want[..frames.len()],
                    "byte {i} ^ {xor:#x} changed a record"
                );
            }
        }
    }
}

#[test]
fn every_single_byte_corruption_of_a_small_return_path_is_detected() {
    let header = StreamHeader::new(VM);
    let mut bitmap = DirtyBitmap::new(100);
    bitmap.set_range(3..9);
    bitmap.set(50);
    let records = vec![
        ReturnRecord::Ack(Ack::Iteration(3)),
        ReturnRecord::PageRequest { page: 10, count: 2 },
        ReturnRecord::ReceivedBitmap(bitmap),
        ReturnRecord::Ack(Ack::StreamOffset(1234)),
        ReturnRecord::Verdict(Verdict::Failed {
            reason: "disk".into(),
        }),
    ];
    let wire = encode_return(&header, &records);
    let want = frames_of(header, records);
    let (frames, end) = decode_return(&wire, wire.len(), return_opts(100));
    assert_eq!(end, Ok(()));
    assert_eq!(frames, want);
    for i in 0..wire.len() {
        for xor in [0x01u8, 0x04, 0x40, 0x80, 0xff] {
            let mut bad = wire.to_vec();
            bad[i] ^= xor;
            let (frames, end) = decode_return(&bad, bad.len(), return_opts(100));
            assert!(end.is_err(), "byte {i} ^ {xor:#x} accepted");
            assert_eq!(frames[..], want[..frames.len()], "byte {i} ^ {xor:#x}");
        }
    }
}

#[test]
fn every_prefix_of_a_stream_is_reported_truncated() {
    let (header, records) = small_stream();
    let wire = encode_stream(&header, &records);
    let want = frames_of(header, records);
    for n in 0..wire.len() {
        let (frames, end) = decode_stream(&wire[..n], n.max(1), DecoderOptions::default());
        let err = end.expect_err("prefix accepted");
        assert!(
            matches!(
                err,
                StreamError::Truncated { .. } | StreamError::Unterminated { .. }
            ),
            "prefix {n}: {err}"
        );
        assert_eq!(frames[..], want[..frames.len()]);
    }
}

// ---------------------------------------------------------------------------------------
// Framing rules.

fn with_header(dir: Direction) -> BytesMut {
    let mut out = BytesMut::new();
    StreamHeader::new(VM).encode(dir, &mut out);
    out
}

#[test]
fn unknown_skippable_records_are_skipped_and_others_fail_with_type_and_offset() {
    let mut wire = with_header(Direction::Migration);
    wire.extend_from_slice(&framed(0x8123, b"future stuff"));
    Record::Complete.encode(&mut wire);
    let mut dec = StreamDecoder::new(DecoderOptions::default());
    let mut buf = wire.clone();
    assert!(matches!(dec.decode(&mut buf), Ok(Some(Frame::Header(_)))));
    assert_eq!(
        dec.decode(&mut buf),
        Ok(Some(Frame::Record(Record::Complete)))
    );
    assert_eq!(dec.skipped_records(), 1);
    assert_eq!(dec.finish(&buf), Ok(()));
    assert!(dec.is_ended());
    assert_eq!(dec.offset(), wire.len() as u64);

    // Not skippable.
    let mut wire = with_header(Direction::Migration);
    wire.extend_from_slice(&framed(0x0123, b"future stuff"));
    let (_, end) = decode_stream(&wire, wire.len(), DecoderOptions::default());
    assert_eq!(
        end,
        Err(StreamError::UnknownRecord {
            record_type: RecordType(0x0123),
            offset: HEADER_LEN as u64
        })
    );
    assert!(end.unwrap_err().to_string().contains("0x0123"));

    // A return-path record in the migration stream is unknown there.
    let mut wire = with_header(Direction::Migration);
    ReturnRecord::Ack(Ack::Iteration(1)).encode(&mut wire);
    let (_, end) = decode_stream(&wire, wire.len(), DecoderOptions::default());
    assert!(matches!(
        end,
        Err(StreamError::UnknownRecord {
            record_type: RecordType::ACK,
            ..
        })
    ));

    // Same in the return path.
    let mut wire = with_header(Direction::Return);
    wire.extend_from_slice(&framed(0x8777, b""));
    ReturnRecord::Verdict(Verdict::Running).encode(&mut wire);
    let (frames, end) = decode_return(&wire, 1, DecoderOptions::default());
    assert_eq!(end, Ok(()));
    assert_eq!(frames.len(), 2);
    let mut wire = with_header(Direction::Return);
    wire.extend_from_slice(&framed(0x0777, b""));
    let (_, end) = decode_return(&wire, 1, DecoderOptions::default());
    assert!(matches!(
        end,
        Err(StreamError::UnknownRecord {
            record_type: RecordType(0x0777),
            offset: 32
        })
    ));
}

#[test]
fn over_long_length_is_rejected_before_buffering() {
    for length in [u32::MAX, DEFAULT_MAX_RECORD_LEN + 1] {
        let mut buf = with_header(Direction::Migration);
        buf.put_u16_le(0x0002);
        buf.put_u32_le(length);
        let mut dec = StreamDecoder::new(DecoderOptions::default());
        assert!(matches!(dec.decode(&mut buf), Ok(Some(Frame::Header(_)))));
        let cap = buf.capacity();
        assert_eq!(
            dec.decode(&mut buf),
            Err(StreamError::RecordTooLong {
                record_type: RecordType::PAGE_BATCH,
                offset: HEADER_LEN as u64,
                length,
                max: DEFAULT_MAX_RECORD_LEN,
            })
        );
        // Nothing was reserved for what the length claimed.
        assert_eq!(buf.capacity(), cap);
        assert!(cap < 1024);
    }
    // A custom limit, exactly at and one past it.
    let opts = DecoderOptions {
        max_record_len: 10,
        ..Default::default()
    };
    let mut wire = with_header(Direction::Return);
    wire.extend_from_slice(&framed(0x8999, &[0; 10]));
    wire.extend_from_slice(&framed(0x8999, &[0; 11]));
    let (frames, end) = decode_return(&wire, 3, opts);
    assert_eq!(frames.len(), 1);
    assert!(matches!(
        end,
        Err(StreamError::RecordTooLong {
            length: 11,
            max: 10,
            offset: 52,
            ..
        })
    ));
}

#[test]
fn header_checks() {
    let good = with_header(Direction::Migration);
    let dec = |bytes: &[u8], opts: DecoderOptions| decode_stream(bytes, bytes.len(), opts).1;

    // Crossed directions.
    let ret = with_header(Direction::Return);
    assert!(matches!(
        dec(&ret, DecoderOptions::default()),
        Err(StreamError::BadMagic {
            expected: Direction::Migration,
            ..
        })
    ));
    // The magic is checked as soon as it arrives.
    let mut d = StreamDecoder::new(DecoderOptions::default());
    let mut b = BytesMut::from(&b"GET / HT"[..]);
    assert!(matches!(
        d.decode(&mut b),
        Err(StreamError::BadMagic { .. })
    ));

    // Version.
    let mut v2 = good.to_vec();
    v2[8] = 2;
    assert_eq!(
        dec(&v2, DecoderOptions::default()),
        Err(StreamError::UnsupportedVersion {
            direction: Direction::Migration,
            version: 2
        })
    );

    // CRC.
    let mut bad = good.to_vec();
    bad[20] ^= 1;
    assert!(matches!(
        dec(&bad, DecoderOptions::default()),
        Err(StreamError::HeaderCrc { .. })
    ));

    // UUID.
    let other = [9u8; 16];
    assert_eq!(
        dec(
            &good,
            DecoderOptions {
                expected_vm: Some(other),
                ..Default::default()
            }
        ),
        Err(StreamError::VmMismatch {
            direction: Direction::Migration,
            expected: other,
            found: VM
        })
    );

    // Flags: unknown optional bits are ignored, unknown required bits refused.
    for (flags, ok) in [
        (0x00ffu16, true),
        (0x0100, true),
        (0x0200, true),
        (0x0400, false),
        (0x8000, false),
    ] {
        let mut w = BytesMut::new();
        StreamHeader {
            flags: HeaderFlags(flags),
            vm_uuid: VM,
        }
        .encode(Direction::Migration, &mut w);
        Record::Complete.encode(&mut w);
        let (frames, end) = decode_stream(&w, 5, DecoderOptions::default());
        if ok {
            assert_eq!(end, Ok(()), "{flags:#x}");
            assert_eq!(
                frames[0],
                Frame::Header(StreamHeader {
                    flags: HeaderFlags(flags),
                    vm_uuid: VM
                })
            );
        } else {
            assert_eq!(
                end,
                Err(StreamError::UnknownRequiredFlags {
                    direction: Direction::Migration,
                    flags
                })
            );
        }
    }
}

#[test]
fn records_after_the_end_and_streams_without_one_are_errors() {
    let mut wire = with_header(Direction::Migration);
    Record::Complete.encode(&mut wire);
    let end_at = wire.len() as u64;
    Record::Complete.encode(&mut wire);
    let (frames, end) = decode_stream(&wire, wire.len(), DecoderOptions::default());
    assert_eq!(frames.len(), 2);
    assert_eq!(
        end,
        Err(StreamError::AfterEnd {
            direction: Direction::Migration,
            record_type: RecordType::COMPLETE,
            offset: end_at
        })
    );

    let mut wire = with_header(Direction::Migration);
    Record::IterationEnd(IterationEnd::default()).encode(&mut wire);
    let (_, end) = decode_stream(&wire, wire.len(), DecoderOptions::default());
    assert!(
        matches!(end, Err(StreamError::Unterminated { offset, .. }) if offset == wire.len() as u64)
    );
}

#[test]
fn page_indices_sizes_and_configs_are_checked_against_the_config() {
    let config = Record::Config(Config {
        page_size: 4096,
        regions: vec![(0, 4096 * 10)],
        vmm: Bytes::new(),
    });
    let batch = |page_size: u32, index: u64| {
        Record::PageBatch(PageBatch {
            page_size,
            pages: vec![Page {
                index,
                data: PageData::Zero,
            }],
        })
    };
    let run = |records: Vec<Record>, opts: DecoderOptions| {
        let mut all = records;
        all.push(Record::EndOfData);
        all.push(Record::Complete);
        let wire = encode_stream(&StreamHeader::new(VM), &all);
        decode_stream(&wire, wire.len(), opts).1
    };
    let reason = |r: Result<(), StreamError>| match r {
        Err(StreamError::Malformed { reason, .. }) => reason,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        run(
            vec![config.clone(), batch(4096, 9)],
            DecoderOptions::default()
        ),
        Ok(())
    );
    assert_eq!(
        reason(run(
            vec![config.clone(), batch(4096, 10)],
            DecoderOptions::default()
        )),
        PayloadError::PageOutOfRange {
            index: 10,
            pages: 10
        }
    );
    assert_eq!(
        reason(run(
            vec![config.clone(), batch(2048, 1)],
            DecoderOptions::default()
        )),
        PayloadError::PageSizeMismatch {
            batch: 2048,
            config: 4096
        }
    );
    assert_eq!(
        reason(run(
            vec![config.clone(), config.clone()],
            DecoderOptions::default()
        )),
        PayloadError::DuplicateConfig
    );
    assert_eq!(
        reason(run(
            vec![
                config.clone(),
                Record::SwitchToPostcopy {
                    discard: vec![0..1, 5..11]
                }
            ],
            DecoderOptions::default()
        )),
        PayloadError::RangeOutOfRange {
            start: 5,
            count: 6,
            pages: 10
        }
    );
    // The options' page count applies without a config, and must agree with one.
    let known = DecoderOptions {
        page_count: Some(5),
        ..Default::default()
    };
    assert_eq!(
        reason(run(vec![batch(4096, 5)], known.clone())),
        PayloadError::PageOutOfRange { index: 5, pages: 5 }
    );
    assert_eq!(
        reason(run(vec![config.clone()], known)),
        PayloadError::PageCountMismatch {
            got: 10,
            expected: 5
        }
    );
    // Without either, any index goes.
    assert_eq!(
        run(vec![batch(4096, u64::MAX)], DecoderOptions::default()),
        Ok(())
    );
    // A config with overlapping regions is refused.
    let overlapping = Record::Config(Config {
        page_size: 4096,
        regions: vec![(0, 8192), (4096, 4096)],
        vmm: Bytes::new(),
    });
    assert!(matches!(
        reason(run(vec![overlapping], DecoderOptions::default())),
        PayloadError::Layout(_)
    ));
}

#[test]
fn malformed_payloads_name_the_problem() {
    let reason = |t: u16, payload: &[u8]| {
        let mut wire = with_header(Direction::Migration);
        wire.extend_from_slice(&framed(t, payload));
        match decode_stream(&wire, wire.len(), DecoderOptions::default()).1 {
            Err(StreamError::Malformed {
                reason,
                record_type,
                offset,
            }) => {
                assert_eq!((record_type.0, offset), (t, 32));
                reason
            }
            other => panic!("{other:?}"),
        }
    };
    // Region count far beyond the payload: refused before any allocation.
    let mut p = vec![];
    p.extend_from_slice(&4096u32.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        reason(0x0001, &p),
        PayloadError::CountTooLarge {
            field: "RAM regions",
            count: u32::MAX.into(),
            remaining: 0
        }
    );
    // Range count likewise.
    assert!(matches!(
        reason(0x0006, &u32::MAX.to_le_bytes()),
        PayloadError::CountTooLarge { .. }
    ));
    // Bad page size, unknown encoding, data longer than a page, truncated raw page.
    assert_eq!(
        reason(0x0002, &3u32.to_le_bytes()),
        PayloadError::BadPageSize(3)
    );
    let mut p = 16u32.to_le_bytes().to_vec();
    p.extend_from_slice(&5u64.to_le_bytes());
    p.push(9);
    assert_eq!(
        reason(0x0002, &p),
        PayloadError::UnknownEncoding { index: 5, code: 9 }
    );
    let mut p = 16u32.to_le_bytes().to_vec();
    p.extend_from_slice(&5u64.to_le_bytes());
    p.push(3);
    p.extend_from_slice(&17u32.to_le_bytes());
    assert_eq!(
        reason(0x0002, &p),
        PayloadError::PageDataTooLong {
            index: 5,
            len: 17,
            page_size: 16
        }
    );
    let mut p = 16u32.to_le_bytes().to_vec();
    p.extend_from_slice(&5u64.to_le_bytes());
    p.push(1);
    p.extend_from_slice(&[0; 15]);
    assert_eq!(
        reason(0x0002, &p),
        PayloadError::Truncated {
            field: "raw page",
            at: 13
        }
    );
    // Strings: length beyond the payload, invalid UTF-8.
    let mut p = 100u32.to_le_bytes().to_vec();
    p.extend_from_slice(b"abc");
    assert!(matches!(
        reason(0x0008, &p),
        PayloadError::Truncated {
            field: "abort reason",
            ..
        }
    ));
    let mut p = 2u32.to_le_bytes().to_vec();
    p.extend_from_slice(&[0xc3, 0x28]);
    assert_eq!(
        reason(0x0008, &p),
        PayloadError::BadUtf8 {
            field: "abort reason"
        }
    );
    // Trailing bytes, empty ranges.
    assert_eq!(
        reason(0x0007, &[0]),
        PayloadError::TrailingBytes { count: 1 }
    );
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&[4, 0]);
    assert_eq!(reason(0x0005, &p), PayloadError::EmptyRange { start: 4 });
    assert!(matches!(
        reason(0x8004, &[0; 79]),
        PayloadError::Truncated { .. }
    ));
}

#[test]
fn return_path_bounds_and_malformations() {
    let run = |t: u16, payload: &[u8], opts: DecoderOptions| {
        let mut wire = with_header(Direction::Return);
        wire.extend_from_slice(&framed(t, payload));
        decode_return(&wire, wire.len(), opts)
    };
    let reason = |r: (Vec<Frame<ReturnRecord>>, Result<(), StreamError>)| match r.1 {
        Err(StreamError::Malformed { reason, .. }) => reason,
        other => panic!("{other:?}"),
    };
    // A bitmap claiming 2^40 pages in a few bytes: refused on the count, before allocating.
    let mut p = (1u64 << 40).to_le_bytes().to_vec();
    p.push(0);
    p.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        reason(run(0x0103, &p, DecoderOptions::default())),
        PayloadError::BitmapSize {
            pages: 1 << 40,
            expected: DEFAULT_MAX_BITMAP_PAGES
        }
    );
    assert_eq!(
        reason(run(0x0103, &p, return_opts(64))),
        PayloadError::BitmapSize {
            pages: 1 << 40,
            expected: 64
        }
    );
    // Runs: empty, touching, past the end.
    let bitmap = |runs: &[(u8, u8)]| {
        let mut p = 64u64.to_le_bytes().to_vec();
        p.push(0);
        p.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        for &(g, l) in runs {
            p.extend_from_slice(&[g, l]);
        }
        p
    };
    let (frames, _) = run(0x0103, &bitmap(&[(0, 64)]), return_opts(64));
    assert_eq!(
        frames[1],
        Frame::Record(ReturnRecord::ReceivedBitmap(DirtyBitmap::new_full(64)))
    );
    for bad in [
        &[(0u8, 0u8)][..],
        &[(0, 1), (0, 1)],
        &[(60, 5)],
        &[(1, 1), (1, 63)],
    ] {
        assert!(
            matches!(
                reason(run(0x0103, &bitmap(bad), return_opts(64))),
                PayloadError::BadRun { .. }
            ),
            "{bad:?}"
        );
    }
    // Words with bits past the end.
    let mut p = 3u64.to_le_bytes().to_vec();
    p.push(1);
    p.extend_from_slice(&0b1000u64.to_le_bytes());
    assert_eq!(
        reason(run(0x0103, &p, return_opts(3))),
        PayloadError::BitmapTail { pages: 3 }
    );
    // Page requests: empty, out of range, overflowing.
    let req = |page: u64, count: u32| {
        let mut p = page.to_le_bytes().to_vec();
        p.extend_from_slice(&count.to_le_bytes());
        p
    };
    assert_eq!(
        reason(run(0x0102, &req(3, 0), return_opts(10))),
        PayloadError::EmptyRange { start: 3 }
    );
    assert_eq!(
        reason(run(0x0102, &req(9, 2), return_opts(10))),
        PayloadError::RangeOutOfRange {
            start: 9,
            count: 2,
            pages: 10
        }
    );
    assert!(matches!(
        reason(run(0x0102, &req(u64::MAX, 1), DecoderOptions::default())),
        PayloadError::RangeOutOfRange { .. }
    ));
    assert_eq!(
        reason(run(0x0101, &[7, 0, 0, 0, 0, 0, 0, 0, 0], return_opts(1))),
        PayloadError::UnknownAck(7)
    );
    assert_eq!(
        reason(run(0x0104, &[2], return_opts(1))),
        PayloadError::UnknownVerdict(2)
    );
}

#[test]
fn received_bitmap_uses_the_shorter_form() {
    let pages = 1 << 16;
    // Sparse: a few runs, far below a bit per page.
    let mut sparse = DirtyBitmap::new(pages);
    sparse.set_range(100..5000);
    sparse.set(60000);
    let mut out = BytesMut::new();
    ReturnRecord::ReceivedBitmap(sparse.clone()).encode(&mut out);
    assert!(out.len() < 40, "{}", out.len());
    // Alternating bits: runs would take two bytes per page; words take one bit.
    let mut dense = DirtyBitmap::new(pages);
    for i in (0..pages).step_by(2) {
        dense.set(i);
    }
    let mut out2 = BytesMut::new();
    ReturnRecord::ReceivedBitmap(dense.clone()).encode(&mut out2);
    assert_eq!(out2.len(), RECORD_OVERHEAD + 8 + 1 + pages / 8);
    for (b, wire) in [(sparse, out), (dense, out2)] {
        let mut all = with_header(Direction::Return);
        all.extend_from_slice(&wire);
        let (frames, _) = decode_return(&all, all.len(), return_opts(pages as u64));
        assert_eq!(frames[1], Frame::Record(ReturnRecord::ReceivedBitmap(b)));
    }
}

#[test]
fn postcopy_switch_splits_long_discard_lists() {
    let ranges: Vec<Range<u64>> = (0..1000u64)
        .map(|i| i * 1000..i * 1000 + 1 + i % 7)
        .collect();
    let max = 200u32;
    let mut out = with_header(Direction::Migration);
    let n = write_postcopy_switch(&mut out, &ranges, max);
    assert!(n > 10, "{n}");
    Record::Complete.encode(&mut out);
    let opts = DecoderOptions {
        max_record_len: max,
        ..Default::default()
    };
    let (frames, end) = decode_stream(&out, 100, opts);
    assert_eq!(end, Ok(()));
    let mut got = Vec::new();
    let mut records = frames.into_iter().skip(1);
    for _ in 0..n - 1 {
        let Some(Frame::Record(Record::DiscardPages(r))) = records.next() else {
            panic!("expected DiscardPages");
        };
        got.extend(r);
    }
    let Some(Frame::Record(Record::SwitchToPostcopy { discard })) = records.next() else {
        panic!("expected SwitchToPostcopy");
    };
    got.extend(discard);
    assert_eq!(got, ranges);
    // A short list is one record.
    let mut out = BytesMut::new();
    assert_eq!(
        write_postcopy_switch(&mut out, &ranges[..3], DEFAULT_MAX_RECORD_LEN),
        1
    );
    let mut empty = BytesMut::new();
    assert_eq!(write_postcopy_switch(&mut empty, &[], 64), 1);
}

#[test]
fn batch_writer_reports_size_and_cleans_up_when_dropped() {
    let mut out = BytesMut::new();
    out.extend_from_slice(b"keep");
    {
        let mut w = PageBatchWriter::new(&mut out, 64);
        assert!(w.is_empty());
        w.push_raw(1, &[1; 64]);
        w.push_zero(2);
        assert_eq!(w.pages(), 2);
        assert_eq!(w.encoded_len(), RECORD_OVERHEAD + 4 + 9 + 64 + 9);
        // Dropped without finish.
    }
    assert_eq!(&out[..], b"keep");
    let mut w = PageBatchWriter::new(&mut out, 64);
    w.push_delta(0, &[0, 1, 1]);
    let expect = w.encoded_len();
    assert_eq!(w.finish(), expect);
    assert_eq!(out.len(), 4 + expect);
}

#[test]
#[should_panic(expected = "encoded data")]
fn batch_writer_refuses_oversized_encoded_pages() {
    let mut out = BytesMut::new();
    let mut w = PageBatchWriter::new(&mut out, 16);
    w.push_zstd(0, &[0; 17]);
}

#[test]
fn errors_say_what_and_where() {
    let mut wire = with_header(Direction::Migration);
    let mut rec = BytesMut::new();
    Record::Abort { reason: "x".into() }.encode(&mut rec);
    let last = rec.len() - 1;
    rec[last] ^= 1;
    wire.extend_from_slice(&rec);
    let err = decode_stream(&wire, wire.len(), DecoderOptions::default())
        .1
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("0x0008 (abort)") && msg.contains("offset 32") && msg.contains("CRC"),
        "{msg}"
    );
    let msg = StreamError::VmMismatch {
        direction: Direction::Return,
        expected: [0xab; 16],
        found: VM,
    }
    .to_string();
    assert!(
        msg.contains("abababab-abab-abab-abab-abababababab"),
        "{msg}"
    );
}
