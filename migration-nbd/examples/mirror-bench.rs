//! Mirror benchmark driver (run by `bench/mirror-bench.sh`): mirrors a file into an NBD
//! export over a unix socket and prints one line of `key=value` results.
//!
//! ```text
//! mirror-bench SOURCE SOCKET [--writer BYTES_PER_S] [--block BYTES] [--mode bg|auto|blocking]
//!              [--granularity BYTES] [--ready-limit SECONDS] [--target-is-zero]
//! mirror-bench --nbd-writer SOCKET EXPORT --writer BYTES_PER_S [--block BYTES]
//! ```
//!
//! Without `--writer` it is the bulk copy alone: start, ready, complete. With it, a guest
//! writer thread writes `--block` bytes (64 KiB by default) at random aligned offsets of
//! the source (through the
//! `MirroredDisk` seam) at that rate from the start until the mirror is ready, so the
//! result says how long convergence took and how much was copied again (or, past
//! `--ready-limit`, that it was not ready: the job is cancelled and `ready=0` printed).
//! Write-blocking (and auto, once switched) report the latency added to the writer's
//! writes. `dirtied` is what the mirror saw: bytes of clean clusters the writes made dirty.
//!
//! `--nbd-writer` is the same writer for QEMU's mirror (`bench/qemu-mirror.py`): it writes
//! into an NBD export of the source that qemu-storage-daemon serves, so that the writes go
//! through QEMU's dirty bitmap, until its standard input closes; then it prints
//! `written=BYTES`. It keeps 16 writes in flight (the in-process writer, one: it measures
//! the latency write-blocking adds to each).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use migration_nbd::backend::FileBackend;
use migration_nbd::mirror::{CopyMode, Mirror, MirrorConfig, MirrorOptions, MirroredDisk};
use migration_nbd::{Address, Client, ClientOptions};

/// Random aligned offsets below `size`, `block` apart (xorshift: cheap and repeatable).
struct Offsets {
    x: u64,
    slots: u64,
    block: u64,
}

impl Offsets {
    fn new(size: u64, block: usize) -> Offsets {
        Offsets {
            x: 0x2545_f491_4f6c_dd1d,
            slots: size / block as u64,
            block: block as u64,
        }
    }

    fn next(&mut self) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        (self.x % self.slots) * self.block
    }
}

/// Sleeps until `n` bytes are due at `rate` bytes per second since `t0`: paced on the
/// total so far, so that the rate holds whatever one write cost.
fn pace(t0: Instant, n: u64, rate: u64) {
    let due = t0 + Duration::from_secs_f64(n as f64 / rate as f64);
    if let Some(d) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// Writes the NBD writer keeps in flight.
const NBD_WRITER_DEPTH: usize = 16;

fn nbd_writer(args: &[String]) {
    let usage =
        "usage: mirror-bench --nbd-writer SOCKET EXPORT --writer BYTES_PER_S [--block BYTES]";
    let (Some(sock), Some(export)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let num = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (Some(rate), block) = (num("--writer"), num("--block").unwrap_or(64 << 10) as usize) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let c = Client::connect(
        &Address::Unix(sock.into()),
        export,
        &ClientOptions::default(),
    )
    .expect("connect to the source's export");
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        s.store(true, Ordering::Relaxed);
    });
    let data: Vec<u8> = (0..block).map(|i| (i % 251) as u8 | 1).collect();
    let mut at = Offsets::new(c.size(), block);
    let t0 = Instant::now();
    let mut n = 0u64;
    // Several writes in flight, as a guest's queue has: one at a time, the round trip
    // through the daemon's export, not the rate asked for, would bound the writer.
    let mut inflight = std::collections::VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        if inflight.len() == NBD_WRITER_DEPTH {
            let t: migration_nbd::Ticket<()> = inflight.pop_front().unwrap();
            t.wait().expect("write into the source's export");
        }
        inflight.push_back(
            c.submit_write(at.next(), &data, false)
                .expect("write into the source's export"),
        );
        n += block as u64;
        pace(t0, n, rate);
    }
    for t in inflight {
        t.wait().expect("write into the source's export");
    }
    println!("written={n}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--nbd-writer") {
        return nbd_writer(&args[1..]);
    }
    let usage = "usage: mirror-bench SOURCE SOCKET [--writer BYTES_PER_S] [--mode bg|auto|blocking] [--ready-limit SECONDS] [--target-is-zero]";
    let (Some(src), Some(sock)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let mut writer_rate = 0u64;
    let mut mode = CopyMode::Background;
    let mut limit = Duration::from_secs(300);
    let mut target_is_zero = false;
    let mut block = 64usize << 10;
    let mut granularity = migration_nbd::mirror::machine::DEFAULT_GRANULARITY;
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            "--writer" => {
                i += 1;
                writer_rate = args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
                    eprintln!("{usage}");
                    std::process::exit(2)
                });
            }
            "--mode" => {
                i += 1;
                mode = match args.get(i).map(String::as_str) {
                    Some("bg") => CopyMode::Background,
                    Some("auto") => CopyMode::Auto,
                    Some("blocking") => CopyMode::WriteBlocking,
                    _ => {
                        eprintln!("{usage}");
                        std::process::exit(2)
                    }
                };
            }
            "--ready-limit" => {
                i += 1;
                let secs: f64 = args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
                    eprintln!("{usage}");
                    std::process::exit(2)
                });
                limit = Duration::from_secs_f64(secs);
            }
            "--block" | "--granularity" => {
                let k = args[i].clone();
                i += 1;
                let v: u64 = args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
                    eprintln!("{usage}");
                    std::process::exit(2)
                });
                if k == "--block" {
                    block = v as usize;
                } else {
                    granularity = v;
                }
            }
            "--target-is-zero" => target_is_zero = true,
            other => {
                eprintln!("unknown argument {other}\n{usage}");
                std::process::exit(2);
            }
        }
        i += 1;
    }
    let source = Arc::new(
        FileBackend::open(std::path::Path::new(src), false, false).expect("open the source"),
    );
    let size = source.size();
    let opts = MirrorOptions {
        config: MirrorConfig {
            mode,
            target_is_zero,
            granularity,
            ..MirrorConfig::default()
        },
        ..MirrorOptions::default()
    };
    let start = Instant::now();
    let job = Mirror::start(source.clone(), &Address::Unix(sock.into()), opts).expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = (writer_rate > 0).then(|| {
        let disk = MirroredDisk::new(source.clone(), job.handle());
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let data: Vec<u8> = (0..block).map(|i| (i % 251) as u8 | 1).collect();
            let mut at = Offsets::new(size, block);
            let t0 = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                disk.write_at(&data, at.next()).expect("guest write");
                n += block as u64;
                written.store(n, Ordering::Relaxed);
                pace(t0, n, writer_rate);
            }
        })
    });
    let ready = job.wait_ready(limit);
    let t_ready = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    if let Some(w) = writer {
        w.join().expect("writer");
    }
    if let Err(e) = ready {
        eprintln!("not ready: {e}");
        let c = job.cancel().expect("cancel");
        let st = c.stats;
        println!(
            "ready=0 ready_s={:.3} recopied={} dirty={} dirtied={} written={}",
            t_ready.as_secs_f64(),
            st.bytes_recopied,
            st.dirty_bytes,
            st.bytes_dirtied,
            written.load(Ordering::Relaxed)
        );
        return;
    }
    let stats = job.complete().expect("complete");
    let total = start.elapsed();
    let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1e3);
    println!(
        "ready=1 size={size} ready_s={:.3} total_s={:.3} rate_mib_s={:.0} copied={} holes={} zeroed={} recopied={} dirtied={} passes={} written={} p50_ms={:.3} p99_ms={:.3} blocking_writes={} switches={}",
        t_ready.as_secs_f64(),
        total.as_secs_f64(),
        size as f64 / total.as_secs_f64() / 1048576.0,
        stats.bytes_copied,
        stats.bytes_holes,
        stats.bytes_zeroed,
        stats.bytes_recopied,
        stats.bytes_dirtied,
        stats.passes,
        written.load(Ordering::Relaxed),
        ms(stats.write_latency_p50),
        ms(stats.write_latency_p99),
        stats.blocking_writes,
        stats.mode_switches,
    );
}
