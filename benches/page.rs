//! Single-page codecs: zero-page detection, CRC32, zstd and delta, next to a plain memcpy
//! of the same size as the limit.
//!
//! Buffers come in three sizes: one 4 KiB page (hot in L1), 1 MiB (L2) and 256 MiB (from
//! DRAM). Large buffers are written before they are read, so they are backed by real memory
//! rather than the kernel's shared zero page.

use std::hint::black_box;
use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::{noise, typical};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use migration_core::page::{
    ZstdCompressor, ZstdDecompressor, delta_decode, delta_encode, is_zero_page,
};

const PAGE: usize = 4096;
const SIZES: [(&str, usize); 3] = [("4KiB", PAGE), ("1MiB", 1 << 20), ("256MiB", 256 << 20)];

/// A buffer of `len` bytes of `value`, with every page actually allocated.
fn touched(len: usize, value: u8) -> Vec<u8> {
    let mut v = vec![1u8; len];
    // Keeps the compiler from folding the two fills into one zeroed (lazily mapped)
    // allocation.
    black_box(&mut v);
    v.fill(value);
    v
}

fn zero_page(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_page");
    for (name, len) in SIZES {
        let buf = touched(len, 0);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("is_zero_page", name), |b| {
            b.iter(|| {
                black_box(&buf)
                    .chunks(PAGE)
                    .filter(|p| is_zero_page(p))
                    .count()
            })
        });
    }
    g.finish();
}

fn memcpy(c: &mut Criterion) {
    let mut g = c.benchmark_group("memcpy");
    for (name, len) in SIZES {
        let src = touched(len, 7);
        let mut dst = touched(len, 0);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("copy_from_slice", name), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
    }
    g.finish();
}

fn crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32");
    for (name, len) in SIZES {
        let buf = touched(len, 7);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("crc32fast", name), |b| {
            b.iter(|| crc32fast::hash(black_box(&buf)))
        });
    }
    g.finish();
}

fn zstd(c: &mut Criterion) {
    let mut g = c.benchmark_group("zstd_page");
    g.throughput(Throughput::Bytes(PAGE as u64));
    let typical = typical(PAGE, 1);
    let random = noise(PAGE, 2);
    let mut out = vec![0u8; PAGE - 1];
    for level in [-5, -1, 1, 3] {
        let mut z = ZstdCompressor::new(level).unwrap();
        let n = z.compress(&typical, &mut out).unwrap();
        eprintln!("zstd level {level}: typical page -> {n} bytes");
        g.bench_function(BenchmarkId::new("compress_typical", level), |b| {
            b.iter(|| z.compress(black_box(&typical), &mut out))
        });
    }
    let mut z = ZstdCompressor::new(1).unwrap();
    assert!(z.compress(&random, &mut out).is_none());
    g.bench_function(BenchmarkId::new("compress_incompressible", 1), |b| {
        b.iter(|| z.compress(black_box(&random), &mut out))
    });
    let n = z.compress(&typical, &mut out).unwrap();
    let frame = out[..n].to_vec();
    let mut d = ZstdDecompressor::new().unwrap();
    let mut page = vec![0u8; PAGE];
    g.bench_function(BenchmarkId::new("decompress_typical", 1), |b| {
        b.iter(|| d.decompress(black_box(&frame), &mut page).unwrap())
    });
    g.finish();
}

fn delta(c: &mut Criterion) {
    let mut g = c.benchmark_group("delta_page");
    g.throughput(Throughput::Bytes(PAGE as u64));
    let old = typical(PAGE, 3);
    let mut few = old.clone();
    // A counter bumped in 16 places, as a guest updating a few fields would.
    for i in 0..16 {
        few[i * 251 + 7] ^= 0x01;
    }
    let same = old.clone();
    let mut out = vec![0u8; PAGE - 1];
    for (name, new) in [("unchanged", &same), ("16_bytes_changed", &few)] {
        g.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| delta_encode(black_box(&old), black_box(new), &mut out))
        });
    }
    let all = noise(PAGE, 4);
    g.bench_function(BenchmarkId::new("encode", "all_changed_overflow"), |b| {
        b.iter(|| delta_encode(black_box(&old), black_box(&all), &mut out))
    });
    let n = delta_encode(&old, &few, &mut out).unwrap();
    eprintln!("delta of 16 changed bytes: {n} bytes");
    let d = out[..n].to_vec();
    let mut page = old.clone();
    g.bench_function(BenchmarkId::new("decode", "16_bytes_changed"), |b| {
        b.iter(|| delta_decode(black_box(&d), &mut page).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = zero_page, memcpy, crc, zstd, delta
}
criterion_main!(benches);
