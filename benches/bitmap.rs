//! Scanning a dirty bitmap that covers 1 TiB of guest RAM (2^28 pages of 4 KiB, a 32 MiB
//! bitmap), next to the limit: reading the same 32 MiB from memory.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use migration_core::DirtyBitmap;

const PAGES: usize = 1 << 28;

fn bitmap_with_density(per_million: u64) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(PAGES);
    // Touch every page of the bitmap: a fresh zeroed allocation is backed by the kernel's
    // shared zero page, which would make every scan a read of one cached 4 KiB page.
    b.set_all();
    b.clear_all();
    if per_million == 0 {
        return b;
    }
    // A cheap xorshift spreads the dirty pages so that no run of clean words is typical.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let n = (PAGES as u64 * per_million / 1_000_000) as usize;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.set((x % PAGES as u64) as usize);
    }
    b
}

fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap-scan-1TiB");
    g.throughput(Throughput::Bytes((PAGES / 8) as u64));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));

    let clean = bitmap_with_density(0);
    g.bench_function("memory-read-limit", |b| {
        // The floor: every word loaded once and folded, as a vectorised sum.
        b.iter(|| black_box(clean.words()).iter().fold(0u64, |a, &w| a ^ w))
    });
    g.bench_function("iter_ones/clean", |b| {
        b.iter(|| black_box(&clean).iter_ones().count())
    });
    g.bench_function("count/clean", |b| b.iter(|| black_box(&clean).count()));
    for (name, ppm) in [("0.01%", 100), ("1%", 10_000)] {
        let bm = bitmap_with_density(ppm);
        g.bench_function(format!("iter_ones/{name}"), |b| {
            b.iter(|| black_box(&bm).iter_ones().fold(0usize, |a, p| a ^ p))
        });
        g.bench_function(format!("iter_runs/{name}"), |b| {
            b.iter(|| black_box(&bm).iter_runs().count())
        });
        g.bench_function(format!("iter_words/{name}"), |b| {
            b.iter(|| black_box(&bm).iter_words().count())
        });
    }
    let full = DirtyBitmap::new_full(PAGES);
    g.bench_function("iter_runs/full", |b| {
        b.iter(|| black_box(&full).iter_runs().count())
    });
    g.finish();

    let mut g = c.benchmark_group("bitmap-ops-1TiB");
    g.throughput(Throughput::Bytes((PAGES / 8) as u64));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    let other = bitmap_with_density(100);
    let mut acc = bitmap_with_density(100);
    g.bench_function("union_with", |b| {
        b.iter(|| acc.union_with(black_box(&other)))
    });
    g.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);
