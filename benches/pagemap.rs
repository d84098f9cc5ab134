//! Finding the pages of 1 GiB of guest RAM that hold data, with one `PAGEMAP_SCAN` walk,
//! next to what it saves: reading every never-touched page (a zero-page fault each).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use migration_core::RamLayout;
use migration_core::pagemap::populated_pages;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GIB: usize = 1 << 30;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("populated_pages_1GiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, stride) in [
        ("untouched", 0usize),
        ("1pct-written", 100),
        ("all-written", 1),
    ] {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GIB)]).unwrap();
        let layout = RamLayout::of_memory(&mem).unwrap();
        if stride > 0 {
            for p in (0..layout.page_count()).step_by(stride) {
                mem.write_obj(1u8, GuestAddress(layout.page_to_gpa(p).unwrap()))
                    .unwrap();
            }
        }
        if let Err(e) = populated_pages(&mem, &layout) {
            eprintln!("skipping populated_pages: {e}");
            return;
        }
        g.bench_function(name, |b| {
            b.iter(|| populated_pages(black_box(&mem), &layout).unwrap())
        });
    }
    g.bench_function("read-every-untouched-page (what the scan saves)", |b| {
        b.iter_batched(
            || GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GIB)]).unwrap(),
            |mem| {
                let mut page = [0u8; 4096];
                for p in 0..(GIB / 4096) {
                    mem.read_slice(&mut page, GuestAddress((p * 4096) as u64))
                        .unwrap();
                }
                black_box(page[0])
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
