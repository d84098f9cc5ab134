//! Mirror benchmark driver (run by `bench/mirror-bench.sh`): mirrors a file into an NBD
//! export over a unix socket and prints one line of `key=value` results.
//!
//! ```text
//! mirror-bench SOURCE SOCKET [--writer BYTES_PER_S] [--mode bg|auto|blocking]
//!              [--ready-limit SECONDS] [--target-is-zero]
//! ```
//!
//! Without `--writer` it is the bulk copy alone: start, ready, complete. With it, a guest
//! writer thread writes 64 KiB blocks at random offsets of the source (through the
//! `MirroredDisk` seam) at that rate from the start until the mirror is ready, so the
//! result says how long convergence took and how much was copied again (or, past
//! `--ready-limit`, that it was not ready: the job is cancelled and `ready=0` printed).
//! Write-blocking (and auto, once switched) report the latency added to the writer's
//! writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use migration_nbd::Address;
use migration_nbd::backend::FileBackend;
use migration_nbd::mirror::{CopyMode, Mirror, MirrorConfig, MirrorOptions, MirroredDisk};

const BLOCK: usize = 64 << 10;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: mirror-bench SOURCE SOCKET [--writer BYTES_PER_S] [--mode bg|auto|blocking] [--ready-limit SECONDS] [--target-is-zero]";
    let (Some(src), Some(sock)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let mut writer_rate = 0u64;
    let mut mode = CopyMode::Background;
    let mut limit = Duration::from_secs(300);
    let mut target_is_zero = false;
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
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let data: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8 | 1).collect();
            let t0 = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (size / BLOCK as u64)) * BLOCK as u64;
                disk.write_at(&data, off).expect("guest write");
                n += BLOCK as u64;
                written.store(n, Ordering::Relaxed);
                // Paced on the total so far: the rate holds whatever one write cost.
                let due = t0 + Duration::from_secs_f64(n as f64 / writer_rate as f64);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
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
            "ready=0 ready_s={:.3} recopied={} dirty={} written={}",
            t_ready.as_secs_f64(),
            st.bytes_recopied,
            st.dirty_bytes,
            written.load(Ordering::Relaxed)
        );
        return;
    }
    let stats = job.complete().expect("complete");
    let total = start.elapsed();
    let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1e3);
    println!(
        "ready=1 size={size} ready_s={:.3} total_s={:.3} rate_mib_s={:.0} copied={} holes={} zeroed={} recopied={} passes={} written={} p50_ms={:.3} p99_ms={:.3} blocking_writes={} switches={}",
        t_ready.as_secs_f64(),
        total.as_secs_f64(),
        size as f64 / total.as_secs_f64() / 1048576.0,
        stats.bytes_copied,
        stats.bytes_holes,
        stats.bytes_zeroed,
        stats.bytes_recopied,
        stats.passes,
        written.load(Ordering::Relaxed),
        ms(stats.write_latency_p50),
        ms(stats.write_latency_p99),
        stats.blocking_writes,
        stats.mode_switches,
    );
}
