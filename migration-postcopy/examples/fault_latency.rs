//! Post-copy's fault path, measured in one process: a pure post-copy of RAM full of data
//! over loopback TCP, with a "vCPU" thread on the destination touching pages in a
//! scattered order from the moment it runs, so that almost every touch faults a page not
//! there yet. Prints the fault latency (fault read to page placed) percentiles, the
//! blocktime, the requests and the total time, next to the loopback round trip of a
//! 16-byte request and a 4 KiB reply measured right before.
//!
//! `cargo run --release -p migration-postcopy --example fault_latency [MIB]` (default 256;
//! needs userfaultfd with kernel faults allowed: root, or vm.unprivileged_userfaultfd).
//! With `IDLE` set the "vCPU" touches nothing: the background push alone.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use migration_core::dirty::VmmBitmapTracker;
use migration_core::stream::DeviceState;
use migration_core::transport::{self, Address, Listener};
use migration_core::vm::{VmControl, VmError};
use migration_core::{GuestRam, RamLayout};
use migration_postcopy::destination::{self, DestinationOptions};
use migration_postcopy::source::{self, Mode, Outcome, SourceOptions};
use migration_precopy::{CancelToken, Incoming, Received};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Clone, Default)]
struct Vm(Arc<AtomicBool>);

impl VmControl for Vm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.0.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn set_throttle(&mut self, _: u8) -> Result<(), VmError> {
        Ok(())
    }
    fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(vec![DeviceState::new("cpu", 1, vec![0u8; 4096])])
    }
    fn load_device_state(&mut self, _: &[DeviceState]) -> Result<(), VmError> {
        Ok(())
    }
}

/// p50 and p99 of a 16-byte request answered by 4 KiB, over loopback TCP.
fn round_trip() -> (Duration, Duration) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let (mut req, reply) = ([0u8; 16], vec![7u8; 4096]);
        while s.read_exact(&mut req).is_ok() {
            if s.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(a).unwrap();
    c.set_nodelay(true).unwrap();
    let mut reply = vec![0u8; 4096];
    let mut ts: Vec<Duration> = (0..5000)
        .map(|_| {
            let t = Instant::now();
            c.write_all(&[1u8; 16]).unwrap();
            c.read_exact(&mut reply).unwrap();
            t.elapsed()
        })
        .collect();
    drop(c);
    server.join().unwrap();
    ts.sort_unstable();
    (ts[ts.len() / 2], ts[ts.len() * 99 / 100])
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map_or(256, |a| a.parse().expect("MIB"));
    let (p50, p99) = round_trip();
    println!("loopback round trip (16 B request, 4 KiB reply): p50 {p50:?}, p99 {p99:?}");

    let mem = Arc::new(
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap(),
    );
    let layout = RamLayout::of_memory(&*mem).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = vec![0u8; 4096];
    for p in 0..layout.page_count() {
        for w in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(layout.page_to_gpa(p).unwrap()))
            .unwrap();
    }
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse::<Address>().unwrap()).unwrap();
    let addr = listener.local_address().unwrap();
    let dest = std::thread::spawn(move || {
        let conn = listener.accept().unwrap();
        let inc = Incoming::accept(
            conn,
            &migration_precopy::DestinationOptions {
                postcopy: true,
                ..Default::default()
            },
        )
        .unwrap();
        let layout = inc.config().layout().unwrap();
        let dmem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), layout.ram_bytes() as usize)])
                .unwrap(),
        );
        let ram = GuestRam::with_layout(&*dmem, layout.clone());
        let mut vm = Vm::default();
        let Received::Postcopy(sw) = inc
            .receive_or_switch(&ram, &mut vm, &mut |_| Ok(()), &mut |_| {})
            .unwrap()
        else {
            panic!("no switch")
        };
        let stop = Arc::new(AtomicBool::new(false));
        let touches = Arc::new(AtomicU64::new(0));
        let idle = std::env::var_os("IDLE").is_some();
        let vcpu = {
            let (running, stop, touches) = (vm.0.clone(), stop.clone(), touches.clone());
            let base = ram.host_address(0).unwrap() as usize;
            let n = layout.page_count();
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    if idle || !running.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let p = (i.wrapping_mul(0x9e37_79b9)) % n;
                    i += 1;
                    // SAFETY: inside guest RAM, which outlives this thread (joined below).
                    let w = unsafe { &*((base + p * 4096 + 8) as *const AtomicU64) };
                    w.fetch_add(1, Ordering::Relaxed);
                    touches.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let mut accept = |t: Duration| listener.accept_timeout(t);
        let r = destination::receive(
            *sw,
            &mut accept,
            &ram,
            &mut vm,
            &DestinationOptions::default(),
        );
        stop.store(true, Ordering::SeqCst);
        vcpu.join().unwrap();
        (r.unwrap(), touches.load(Ordering::Relaxed))
    });

    let ram = GuestRam::new(&*mem).unwrap();
    let tracker = VmmBitmapTracker::new(&mem, ram.layout()).unwrap();
    let mut vm = Vm(Arc::new(AtomicBool::new(true)));
    let conn = transport::connect_retry(&addr, Duration::from_secs(10)).unwrap();
    let mut connect = || transport::connect(&addr);
    let t = Instant::now();
    let r = source::migrate(
        &ram,
        &mut vm,
        tracker,
        conn,
        &mut connect,
        &SourceOptions {
            mode: Mode::Pure,
            ..SourceOptions::default()
        },
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap();
    let total = t.elapsed();
    let (d, touches) = dest.join().unwrap();
    let Outcome::Postcopy(s) = r else {
        panic!("pre-copy?")
    };
    let st = &d.postcopy;
    let h = &st.fault_latency;
    println!(
        "pure post-copy of {mib} MiB: total {total:?} (downtime {:?}, post-copy {:?}), {:.0} MB/s",
        s.downtime,
        st.postcopy_time,
        s.bytes as f64 / total.as_secs_f64() / 1e6
    );
    println!(
        "faults {}, requests {}, duplicates avoided {}, already served {}; pages pushed {}, requested {}, twice {}",
        st.faults,
        st.requests,
        st.duplicate_requests_avoided,
        st.faults_already_served,
        st.pages.pushed,
        st.pages.requested,
        st.duplicate_pages
    );
    println!(
        "fault latency: p50 {:?}, p99 {:?}, max {:?}, mean {:?} ({} faults waited for); blocktime {:?} over {:?} of post-copy; {touches} touches",
        h.quantile(0.5),
        h.quantile(0.99),
        h.max(),
        h.mean(),
        h.count(),
        st.blocktime_total(),
        st.postcopy_time
    );
}
