//! The stream decoders never allocate more than what they actually received justifies,
//! whatever lengths and counts hostile input claims.
//!
//! A global allocator records the largest single allocation made by the current thread, so
//! the decoders' allocations can be measured directly. This is its own test binary so the
//! allocator does not touch any other test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, BytesMut};
use migration_core::stream::{
    DecoderOptions, Direction, RecordType, ReturnDecoder, StreamDecoder, StreamHeader, write_record,
};
use proptest::prelude::*;

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations can happen while the thread's locals are torn down.
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size);
        }
    });
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to the system allocator with the caller's arguments
// unchanged; the bookkeeping touches only a thread-local `Cell<usize>`, which needs no
// allocation (const-initialised, no destructor).
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours, passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours, passed through.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, passed through.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours, passed through.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Largest single allocation `f` makes on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|c| c.set(0));
    f();
    LARGEST.with(|c| c.get())
}

const MAX_BITMAP_PAGES: u64 = 1 << 16;

fn opts() -> DecoderOptions {
    DecoderOptions {
        max_bitmap_pages: MAX_BITMAP_PAGES,
        ..Default::default()
    }
}

/// Feeds `wire` in `chunk`-byte pieces until the decoder errs or the input ends.
fn drain(dir: Direction, wire: &[u8], chunk: usize) {
    let mut buf = BytesMut::with_capacity(wire.len());
    match dir {
        Direction::Migration => {
            let mut d = StreamDecoder::new(opts());
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Ok(Some(_)) = d.decode(&mut buf) {}
            }
            let _ = d.finish(&buf);
        }
        Direction::Return => {
            let mut d = ReturnDecoder::new(opts());
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Ok(Some(_)) = d.decode(&mut buf) {}
            }
            let _ = d.finish(&buf);
        }
    }
}

/// What an input of `len` bytes may cost: a constant, a small multiple of the input (a
/// batch of zero pages decodes to 48 bytes of `Page` per 9 input bytes, Vec growth may
/// double that), and the bitmap limit.
fn budget(len: usize) -> usize {
    64 * 1024 + 12 * len + (MAX_BITMAP_PAGES as usize / 8)
}

const TYPES: [u16; 12] = [
    0x0001, 0x0002, 0x0003, 0x8004, 0x0005, 0x0006, 0x0007, 0x0008, 0x0101, 0x0102, 0x0103, 0x0104,
];

/// A field value that claims a lot.
fn big() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(1 << 40),
        Just(1 << 28),
        any::<u64>(),
        0u64..64,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Records with a valid CRC whose first fields are huge counts and lengths.
    #[test]
    fn claimed_counts_and_lengths_do_not_drive_allocation(
        which in 0usize..TYPES.len(),
        a in big(),
        b in big(),
        small in any::<u8>(),
        tail in proptest::collection::vec(any::<u8>(), 0..200),
        chunk in 1usize..100,
    ) {
        let t = TYPES[which];
        let dir = if t & 0x0100 != 0 { Direction::Return } else { Direction::Migration };
        // Several layouts of "big" fields so each parser meets them where it reads counts.
        let mut wire = BytesMut::new();
        StreamHeader::new([1; 16]).encode(dir, &mut wire);
        for layout in 0..4 {
            let mut p = BytesMut::new();
            match layout {
                0 => { p.put_u32_le(a as u32); p.put_u32_le(b as u32); }
                1 => { p.put_u64_le(a); p.put_u8(small % 4); p.put_u32_le(b as u32); }
                2 => { p.put_u32_le(4096); p.put_u64_le(a); p.put_u8(small % 4); p.put_u32_le(b as u32); }
                _ => { p.put_u64_le(a); p.put_u8(small % 2); p.put_u64_le(b); }
            }
            p.extend_from_slice(&tail);
            let mut one = wire.clone();
            write_record(&mut one, RecordType(t), &p);
            let used = largest_allocation(|| drain(dir, &one, chunk));
            prop_assert!(used <= budget(one.len()), "type {:#x} layout {}: {} bytes for {} input bytes", t, layout, used, one.len());
        }
    }

    /// Arbitrary bytes after a valid header.
    #[test]
    fn arbitrary_input_allocation_is_bounded(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        ret in any::<bool>(),
    ) {
        let dir = if ret { Direction::Return } else { Direction::Migration };
        let mut wire = BytesMut::new();
        StreamHeader::new([1; 16]).encode(dir, &mut wire);
        wire.extend_from_slice(&bytes);
        let used = largest_allocation(|| drain(dir, &wire, wire.len()));
        prop_assert!(used <= budget(wire.len()), "{} bytes for {} input bytes", used, wire.len());
    }
}

/// The record header claims 4 GiB and a few bytes follow: the decoder refuses at once and
/// allocates nothing of the sort.
#[test]
fn u32_max_length_with_a_tiny_buffer() {
    for dir in [Direction::Migration, Direction::Return] {
        let mut wire = BytesMut::new();
        StreamHeader::new([1; 16]).encode(dir, &mut wire);
        wire.put_u16_le(0x0002);
        wire.put_u32_le(u32::MAX);
        wire.put_slice(&[0; 8]);
        let used = largest_allocation(|| drain(dir, &wire, 1));
        assert!(used < 4096, "{used} bytes allocated");
    }
}

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    f();
    COUNT.with(|c| c.get())
}

/// The hot path of a source: pages encoded (zero, raw, zstd, delta) and appended to a
/// batch in a reused buffer. Once the buffer has grown to a batch, nothing is allocated,
/// per page or per batch. (zstd's own context allocates through libc, which this allocator
/// does not see; the context is reused, so it allocates nothing per call either.)
#[test]
fn batch_encoding_does_not_allocate_in_steady_state() {
    use migration_core::page::PageEncoder;
    use migration_core::stream::PageBatchWriter;
    const PS: usize = 4096;
    let pages: Vec<u8> = (0..64 * PS)
        .map(|i| match (i / PS) % 4 {
            0 => 0,
            1 => (i * 7919 % 251) as u8,
            _ => b"some text "[i % 10],
        })
        .collect();
    let mut old = pages.clone();
    old.iter_mut().step_by(997).for_each(|b| *b ^= 1);
    let mut enc = PageEncoder::new(PS, Some(1)).unwrap();
    let mut out = BytesMut::new();
    let batch = |out: &mut BytesMut, enc: &mut PageEncoder| {
        out.clear();
        let mut w = PageBatchWriter::new(out, PS as u32);
        for (i, p) in pages.chunks(PS).enumerate() {
            let prev = (i % 2 == 0).then(|| &old[i * PS..(i + 1) * PS]);
            w.push(i as u64, enc.encode(p, prev));
        }
        w.finish();
    };
    batch(&mut out, &mut enc);
    let n = allocations(|| {
        for _ in 0..10 {
            batch(&mut out, &mut enc);
        }
    });
    assert_eq!(n, 0, "{n} allocations for 640 pages");
}

/// Sanity check that the measurement works, so the bounds above mean something.
#[test]
fn the_tracking_allocator_sees_allocations() {
    let used = largest_allocation(|| {
        let v = vec![0u8; 1 << 20];
        std::hint::black_box(&v);
    });
    assert!(used >= 1 << 20);
    let n = allocations(|| {
        let v: Vec<Box<u8>> = (0..3).map(Box::new).collect();
        std::hint::black_box(&v);
    });
    assert!(n >= 4, "{n}");
}
