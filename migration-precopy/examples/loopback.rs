//! Where pre-copy throughput goes: migrates 256 MiB of random RAM (no guest writing it)
//! in-process over a unix socket pair, once to a real destination and once to a sink that
//! only reads, and prints the bulk pass rates.
//!
//! `cargo run --release -p migration-precopy --example loopback [MIB]`
//!
//! Environment knobs for experiments: `PLACEMENT=write|prefault|userfaultfd` (how the
//! destination puts pages into untouched RAM), `PREPOP` (destination RAM populated before the migration starts), `THP`
//! (destination RAM advised as transparent huge pages).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use migration_core::dirty::VmmBitmapTracker;
use migration_core::stats::{Phase, ProgressEvent};
use migration_core::transport::Stream;
use migration_core::vm::{DeviceState, VmControl, VmError};
use migration_core::{GuestRam, RamLayout};
use migration_precopy::{CancelToken, DestinationOptions, Incoming, SourceOptions, migrate};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

struct Idle;

impl VmControl for Idle {
    fn pause(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn set_throttle(&mut self, _: u8) -> Result<(), VmError> {
        Ok(())
    }
    fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(vec![DeviceState::new("cpu", 1, vec![1, 2, 3])])
    }
    fn load_device_state(&mut self, _: &[DeviceState]) -> Result<(), VmError> {
        Ok(())
    }
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let size = mib << 20;
    let mem = Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = vec![0u8; 4096];
    for p in 0..size / 4096 {
        for w in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress((p * 4096) as u64))
            .unwrap();
    }
    let layout = RamLayout::of_memory(&mem).unwrap();
    for real in [false, true] {
        let (a, mut b) = UnixStream::pair().unwrap();
        let dmem = Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        {
            use vm_memory::GuestMemoryBackend;
            let h = dmem.get_host_address(GuestAddress(0)).unwrap();
            // Advice on a mapping of `size` bytes that `dmem` owns; neither changes what
            // the memory holds.
            if std::env::var_os("THP").is_some() {
                // SAFETY: see above.
                unsafe { libc::madvise(h.cast(), size, libc::MADV_HUGEPAGE) };
            }
            if std::env::var_os("PREPOP").is_some() {
                // SAFETY: see above.
                unsafe { libc::madvise(h.cast(), size, libc::MADV_POPULATE_WRITE) };
            }
        }
        let dest = std::thread::Builder::new()
            .name("dest".into())
            .spawn(move || {
                if real {
                    let opts = DestinationOptions {
                        placement: std::env::var("PLACEMENT")
                            .map(|p| p.parse().expect("PLACEMENT"))
                            .unwrap_or_default(),
                        ..DestinationOptions::default()
                    };
                    let inc = Incoming::accept(Stream::Unix(b), &opts).unwrap();
                    let l = RamLayout::of_memory(&dmem).unwrap();
                    let ram = GuestRam::with_layout(&dmem, l);
                    inc.receive(&ram, &mut Idle, &mut |_| Ok(()), &mut |_| {})
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    let mut buf = vec![0u8; 1 << 20];
                    while b.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                    Ok(())
                }
            })
            .unwrap();
        let ram = GuestRam::with_layout(&mem, layout.clone());
        let tracker = VmmBitmapTracker::new(&mem, &layout).unwrap();
        let cancel = CancelToken::new();
        let c = cancel.clone();
        let start = Instant::now();
        let mut bulk = None;
        let r = migrate(
            &ram,
            &mut Idle,
            tracker,
            Stream::Unix(a),
            &SourceOptions::default(),
            &cancel,
            &mut |e| {
                if let ProgressEvent::IterationDone(it) = e {
                    if it.iteration == 0 {
                        bulk = Some((it.duration, it.bytes_on_wire));
                        if !real {
                            c.cancel();
                        }
                    }
                }
                if let ProgressEvent::Phase(Phase::Completed) = e {
                    eprintln!("completed in {:?}", start.elapsed());
                }
            },
        );
        let _ = dest.join();
        let (d, bytes) = bulk.unwrap();
        println!(
            "{}: bulk pass {:.0} MB/s ({} MB in {:.1} ms); outcome {:?}",
            if real {
                "real destination"
            } else {
                "discarding sink"
            },
            bytes as f64 / d.as_secs_f64() / 1e6,
            bytes / 1_000_000,
            d.as_secs_f64() * 1e3,
            r.map(|_| "completed").map_err(|e| e.to_string())
        );
    }
}
