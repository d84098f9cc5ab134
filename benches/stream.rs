//! Encode and decode of page batches, for every page encoding, in bytes of guest pages
//! per second, next to a plain memcpy of the same size.
//!
//! A batch is 256 pages of 4 KiB (1 MiB of guest RAM). "hot" sources are 1 MiB (in L2),
//! "dram" sources cycle through 256 MiB so every page comes from memory, as it does when an
//! engine walks guest RAM. Decoding starts from a record freshly copied into its buffer (in
//! L2), as one just read from a socket is.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
#[path = "common/mod.rs"]
mod common;
use common::{noise, typical};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use migration_core::page::{PageDecoder, PageEncoder};
use migration_core::stream::{
    DecoderOptions, Direction, Frame, PageBatchWriter, Record, StreamDecoder, StreamHeader,
};

const PAGE: usize = 4096;
const BATCH: usize = 256;
const BATCH_BYTES: usize = PAGE * BATCH;
const DRAM: usize = 256 << 20;

/// `src` with 16 bytes changed per page.
fn lightly_changed(src: &[u8]) -> Vec<u8> {
    let mut v = src.to_vec();
    for page in v.chunks_mut(PAGE) {
        for i in 0..16 {
            page[i * 251 + 7] ^= 1;
        }
    }
    v
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_encode");
    g.throughput(Throughput::Bytes(BATCH_BYTES as u64));
    let mut out = BytesMut::with_capacity(2 * BATCH_BYTES);

    // Raw pages: copy into the batch and CRC, the bound the issue sets at 8 GB/s.
    let hot = noise(BATCH_BYTES, 1);
    g.bench_function(BenchmarkId::new("raw", "hot"), |b| {
        b.iter(|| {
            out.clear();
            let mut w = PageBatchWriter::new(&mut out, PAGE as u32);
            for (i, p) in black_box(&hot).chunks(PAGE).enumerate() {
                w.push_raw(i as u64, p);
            }
            w.finish()
        })
    });
    let mut dram = vec![1u8; DRAM];
    black_box(&mut dram);
    dram.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7) as u8);
    let mut at = 0;
    g.bench_function(BenchmarkId::new("raw", "dram"), |b| {
        b.iter(|| {
            out.clear();
            let src = &dram[at..at + BATCH_BYTES];
            at = (at + BATCH_BYTES) % DRAM;
            let mut w = PageBatchWriter::new(&mut out, PAGE as u32);
            for (i, p) in src.chunks(PAGE).enumerate() {
                w.push_raw(i as u64, p);
            }
            w.finish()
        })
    });

    // The same through PageEncoder, which tests each page for zero first.
    let mut enc = PageEncoder::new(PAGE, None).unwrap();
    g.bench_function(BenchmarkId::new("raw_via_encoder", "hot"), |b| {
        b.iter(|| {
            out.clear();
            let mut w = PageBatchWriter::new(&mut out, PAGE as u32);
            for (i, p) in black_box(&hot).chunks(PAGE).enumerate() {
                w.push(i as u64, enc.encode(p, None));
            }
            w.finish()
        })
    });

    let zeros = {
        let mut v = vec![1u8; BATCH_BYTES];
        black_box(&mut v);
        v.fill(0);
        v
    };
    g.bench_function(BenchmarkId::new("zero", "hot"), |b| {
        b.iter(|| {
            out.clear();
            let mut w = PageBatchWriter::new(&mut out, PAGE as u32);
            for (i, p) in black_box(&zeros).chunks(PAGE).enumerate() {
                w.push(i as u64, enc.encode(p, None));
            }
            w.finish()
        })
    });

    let text = typical(BATCH_BYTES, 2);
    for level in [-1, 1] {
        let mut zenc = PageEncoder::new(PAGE, Some(level)).unwrap();
        g.bench_function(BenchmarkId::new("zstd", format!("level{level}")), |b| {
            b.iter(|| {
                out.clear();
                let mut w = PageBatchWriter::new(&mut out, PAGE as u32);
                for (i, p) in black_box(&text).chunks(PAGE).enumerate() {
                    w.push(i as u64, zenc.encode(p, None));
                }
                w.finish()
            })
        });
    }

    let changed = lightly_changed(&text);
    g.bench_function(BenchmarkId::new("delta", "16B_per_page"), |b| {
        b.iter(|| {
            out.clear();
            let mut w = PageBatchWriter::new(&mut out, PAGE as u32);
            for (i, (p, old)) in black_box(&changed)
                .chunks(PAGE)
                .zip(text.chunks(PAGE))
                .enumerate()
            {
                w.push(i as u64, enc.encode(p, Some(old)));
            }
            w.finish()
        })
    });

    // The limit: copying the same bytes.
    let mut dst = vec![0u8; BATCH_BYTES];
    g.bench_function(BenchmarkId::new("memcpy", "hot"), |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&hot));
            black_box(&dst);
        })
    });
    let mut at = 0;
    g.bench_function(BenchmarkId::new("memcpy", "dram"), |b| {
        b.iter(|| {
            dst.copy_from_slice(&dram[at..at + BATCH_BYTES]);
            at = (at + BATCH_BYTES) % DRAM;
            black_box(&dst);
        })
    });
    g.finish();
}

/// One encoded batch record of `pages`, each against `old` when given.
fn batch_record(pages: &[u8], old: Option<&[u8]>, zstd: Option<i32>) -> BytesMut {
    let mut enc = PageEncoder::new(PAGE, zstd).unwrap();
    let mut out = BytesMut::new();
    let mut w = PageBatchWriter::new(&mut out, PAGE as u32);
    for (i, p) in pages.chunks(PAGE).enumerate() {
        let prev = old.map(|o| &o[i * PAGE..(i + 1) * PAGE]);
        w.push(i as u64, enc.encode(p, prev));
    }
    w.finish();
    out
}

fn decoder() -> StreamDecoder {
    let mut d = StreamDecoder::new(DecoderOptions::default());
    let mut h = BytesMut::new();
    StreamHeader::new([0; 16]).encode(Direction::Migration, &mut h);
    assert!(matches!(d.decode(&mut h), Ok(Some(Frame::Header(_)))));
    d
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_decode");
    g.throughput(Throughput::Bytes(BATCH_BYTES as u64));
    let text = typical(BATCH_BYTES, 2);
    let zeros = vec![0u8; BATCH_BYTES];
    let changed = lightly_changed(&text);
    let cases = [
        (
            "raw",
            batch_record(&noise(BATCH_BYTES, 1), None, None),
            None,
        ),
        ("zero", batch_record(&zeros, None, None), None),
        ("zstd_level1", batch_record(&text, None, Some(1)), None),
        (
            "delta_16B_per_page",
            batch_record(&changed, Some(&text), None),
            Some(&text),
        ),
    ];
    let mut dec = decoder();
    let mut pages = PageDecoder::new().unwrap();
    let mut guest = vec![1u8; BATCH_BYTES];
    for (name, record, base) in &cases {
        // A delta applies onto the copy it was made against; applying it again rewrites the
        // same bytes, so the guest buffer needs no reset between iterations.
        if let Some(base) = base {
            guest.copy_from_slice(base);
        }
        eprintln!(
            "{name}: {} bytes on the wire for {BATCH_BYTES} bytes of pages",
            record.len()
        );
        // Decode only: framing, CRC, parsing into zero-copy slices.
        g.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter_batched(
                || record.clone(),
                |mut buf| match dec.decode(&mut buf) {
                    Ok(Some(Frame::Record(Record::PageBatch(b)))) => b,
                    other => panic!("{other:?}"),
                },
                BatchSize::PerIteration,
            )
        });
        // Decode and write every page into guest memory.
        g.bench_function(BenchmarkId::new("decode_apply", name), |b| {
            b.iter_batched(
                || record.clone(),
                |mut buf| {
                    let Ok(Some(Frame::Record(Record::PageBatch(b)))) = dec.decode(&mut buf) else {
                        panic!("no batch");
                    };
                    for p in &b.pages {
                        let i = p.index as usize * PAGE;
                        pages
                            .apply(p.data.as_encoded(), &mut guest[i..i + PAGE])
                            .unwrap();
                    }
                    // Freed outside the timing, as in the decode-only case.
                    b
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = encode, decode
}
criterion_main!(benches);
