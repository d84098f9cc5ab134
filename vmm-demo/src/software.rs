//! The software vCPU: where `/dev/kvm` is missing (or when asked), a thread runs the guest
//! program's workload itself, over the same `GuestMemory`, with the same layout: it
//! reads its segments (and, for a scattered walk, its stride) from its control block,
//! adds one to the counter of each page in the order they say, bumps its pass counter in RAM after each pass and prints the same report on the
//! same serial line buffer. Its only state outside RAM is its position (segment index and
//! next page), which is what its `swcpuN` blob carries.
//!
//! It stops at page boundaries only, so a pause never splits an increment, and it looks
//! at the clock every few pages to honour the throttle the way a KVM vCPU does. Unpaced,
//! it walks pages a hundred times faster than a KVM guest under nested virtualisation;
//! [`Vm::set_software_pace`](crate::Vm::set_software_pace) slows it to a given time per
//! page, e.g. to mimic the KVM guest or to keep its console readable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::guest::GuestMemory;
use migration_core::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress};

use crate::control::{Parked, RunControl, TIMESLICE, VcpuCounters};
use crate::layout::{self, COUNTER_OFFSET, Workload, control_block as cb, disk};
use crate::serial::Serial;
use crate::state::SoftPosition;
use crate::virtio_blk::{BlkDevice, DriverError, driver};

/// Pages between two looks at the clock and at the kick flag's slow path.
const CHECK_EVERY: u32 = 64;

/// A software vCPU, shared between its thread and the VMM.
pub(crate) struct SoftVcpu {
    pub(crate) index: u32,
    /// Where the vCPU is; current while it is parked.
    pub(crate) pos: Mutex<SoftPosition>,
    kick: AtomicBool,
    /// The vCPU thread, once it runs: a kick wakes it from a pacing sleep.
    thread: std::sync::OnceLock<std::thread::Thread>,
    pub(crate) counters: VcpuCounters,
}

impl SoftVcpu {
    pub(crate) fn new(index: u32, w: &Workload) -> SoftVcpu {
        SoftVcpu {
            index,
            // An idle vCPU (no share) has no position: (0, 0).
            pos: Mutex::new(SoftPosition {
                segment: 0,
                addr: w.segments(index).first().map_or(0, |s| s.0),
                disk: 0,
            }),
            kick: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
            counters: VcpuCounters::default(),
        }
    }

    pub(crate) fn kick(&self) {
        self.kick.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    pub(crate) fn position(&self) -> SoftPosition {
        *self.pos.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `p` against the vCPU's share and takes it as its position.
    pub(crate) fn set_position(&self, p: SoftPosition, w: &Workload) -> Result<(), String> {
        let segs = w.segments(self.index);
        let sectors = w.disk_share(self.index);
        if p.disk > sectors.end - sectors.start {
            return Err(format!(
                "{} sectors of the disk workload done, of the {} of vCPU {}'s share",
                p.disk,
                sectors.end - sectors.start,
                self.index
            ));
        }
        if segs.is_empty()
            && p == (SoftPosition {
                segment: 0,
                addr: 0,
                disk: 0,
            })
        {
            // Idle: halted, nowhere in a share it does not have.
            *self.pos.lock().unwrap_or_else(|e| e.into_inner()) = p;
            return Ok(());
        }
        let seg = usize::try_from(p.segment)
            .ok()
            .and_then(|i| segs.get(i))
            .ok_or_else(|| {
                format!(
                    "segment {} out of the {} of vCPU {}'s share",
                    p.segment,
                    segs.len(),
                    self.index
                )
            })?;
        if p.addr < seg.0 || p.addr >= seg.1 || p.addr % PAGE_SIZE != 0 {
            return Err(format!(
                "position {:#x} is not a page of segment {} ({:#x}..{:#x})",
                p.addr, p.segment, seg.0, seg.1
            ));
        }
        *self.pos.lock().unwrap_or_else(|e| e.into_inner()) = p;
        Ok(())
    }
}

fn load(mem: &GuestMemory, gpa: u64) -> Result<u64, String> {
    mem.load::<u64>(GuestAddress(gpa), Ordering::Relaxed)
        .map_err(|e| format!("reading {gpa:#x}: {e}"))
}

fn store(mem: &GuestMemory, gpa: u64, v: u64) -> Result<(), String> {
    mem.store(v, GuestAddress(gpa), Ordering::Relaxed)
        .map_err(|e| format!("writing {gpa:#x}: {e}"))
}

/// One iteration of the guest's page loop, with the end-of-segment and end-of-pass work
/// the program does after it (see `guest/program.rs`), in the order the control block
/// says.
fn step(
    mem: &GuestMemory,
    index: u32,
    pos: &mut SoftPosition,
    serial: &Serial,
    disk: Option<&Mutex<BlkDevice>>,
) -> Result<(), String> {
    let block = layout::control_block_addr(index);
    // A pass starts with the disk workload (see `guest/program.rs`): one sector per step,
    // through the same device the KVM guest uses, then the read-back of the last and
    // the first sector with the last write.
    let page = layout::request_page_addr(index);
    let count = load(mem, page + disk::SECTOR_COUNT)?;
    if pos.disk < count {
        let dev =
            disk.ok_or_else(|| format!("vcpu{index} has sectors to write and the VM no disk"))?;
        let first = load(mem, page + disk::FIRST_SECTOR)?;
        let pass = load(mem, block + cb::PASS)?.wrapping_add(1);
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        let fail = |e: DriverError| {
            // What the guest program prints before it halts.
            serial.write(index, format!("vcpu{index} {e}\n").as_bytes());
            format!("vcpu{index}: {e}")
        };
        driver::write_sector(mem, &mut d, index, first + pos.disk, pass).map_err(fail)?;
        pos.disk += 1;
        if pos.disk == count {
            driver::check_sector(mem, &mut d, index, first + count - 1, pass).map_err(fail)?;
            driver::check_sector(mem, &mut d, index, first, pass).map_err(fail)?;
        }
        return Ok(());
    }
    let seg_at = |s: u64| block + cb::SEGMENTS + 16 * s;
    let counter = pos.addr + COUNTER_OFFSET;
    store(mem, counter, load(mem, counter)?.wrapping_add(1))?;
    let stride = load(mem, block + cb::STRIDE)?;
    let pass_done = if stride == 0 {
        let end = load(mem, seg_at(pos.segment) + 8)?;
        pos.addr += PAGE_SIZE;
        if pos.addr < end {
            return Ok(());
        }
        pos.segment += 1;
        pos.segment >= load(mem, block + cb::SEGMENT_COUNT)?
    } else {
        // The program keeps the index of the next page; the position keeps its address,
        // so the index is counted back from it. Control-block values come from guest RAM:
        // where they make no sense the vCPU stops with an error, as the program would
        // fault or walk off its share.
        let bad = || format!("vcpu{index}'s control block does not describe its position");
        let segment_pages = |s: u64| -> Result<u64, String> {
            let (start, end) = (load(mem, seg_at(s))?, load(mem, seg_at(s) + 8)?);
            Ok(end.checked_sub(start).ok_or_else(bad)? / PAGE_SIZE)
        };
        let start = load(mem, seg_at(pos.segment))?;
        let mut next = pos.addr.checked_sub(start).ok_or_else(bad)? / PAGE_SIZE;
        for s in 0..pos.segment {
            next = next.checked_add(segment_pages(s)?).ok_or_else(bad)?;
        }
        let pages = load(mem, block + cb::SHARE_PAGES)?;
        next = next.checked_add(stride).ok_or_else(bad)?;
        if next >= pages {
            next -= pages;
        }
        // Back at the first page: every page was visited once.
        let wrapped = next == 0;
        // The segment the next page is in, as the program finds it.
        let count = load(mem, block + cb::SEGMENT_COUNT)?;
        let mut seg = 0;
        loop {
            if seg >= count {
                return Err(bad());
            }
            let len = segment_pages(seg)?;
            if next < len {
                pos.segment = seg;
                pos.addr = load(mem, seg_at(seg))? + next * PAGE_SIZE;
                break;
            }
            next -= len;
            seg += 1;
        }
        wrapped
    };
    if pass_done {
        let pass = load(mem, block + cb::PASS)?.wrapping_add(1);
        store(mem, block + cb::PASS, pass)?;
        let len = load(mem, block + cb::PREFIX_LEN)?.min(cb::PREFIX_MAX) as usize;
        let mut line = vec![0u8; len];
        mem.read_slice(&mut line, GuestAddress(block + cb::PREFIX))
            .map_err(|e| format!("reading the report prefix: {e}"))?;
        line.extend_from_slice(pass.to_string().as_bytes());
        line.push(b'\n');
        serial.write(index, &line);
        pos.disk = 0;
        pos.segment = 0;
        pos.addr = load(mem, seg_at(0))?;
    } else if stride == 0 {
        pos.addr = load(mem, seg_at(pos.segment))?;
    }
    Ok(())
}

/// The body of a software vCPU thread.
pub(crate) fn vcpu_thread(
    vcpu: Arc<SoftVcpu>,
    mem: Arc<GuestMemory>,
    ctl: Arc<RunControl>,
    serial: Arc<Serial>,
    disk: Option<Arc<Mutex<BlkDevice>>>,
) {
    let n = vcpu.index;
    let _ = vcpu.thread.set(std::thread::current());
    vcpu.counters.record_thread();
    if ctl.park_point() == Parked::Exit {
        return;
    }
    // Requests made available before the pause (or on the source of a migration) are
    // taken by vCPU 0 each time it resumes, on this thread, which may wait for a
    // post-copy page; the VMM's resume does not touch the queue.
    let take_pending = || {
        if let (0, Some(d)) = (n, &disk) {
            d.lock().unwrap_or_else(|e| e.into_inner()).process_all();
        }
    };
    take_pending();
    let mut pos = vcpu.position();
    let mut slice_start = Instant::now();
    let mut run_start = Instant::now();
    let mut since_check = 0u32;
    // Pacing: `paced` pages done since `pace_start`.
    let mut pace_start = Instant::now();
    let mut paced = 0u64;
    // No segment to walk: the program halts for good (see `guest::PROGRAM`). Read again
    // after each pause, as RAM may have been replaced meanwhile (an incoming migration).
    let halted = |mem: &GuestMemory| {
        load(mem, layout::control_block_addr(n) + cb::SEGMENT_COUNT).map(|c| c == 0)
    };
    let mut idle = match halted(&mem) {
        Ok(i) => i,
        Err(e) => {
            ctl.fail(format!("software vcpu{n} stopped: {e}"));
            return;
        }
    };
    loop {
        if idle {
            // Like `hlt` with interrupts off: nothing but the VMM's kick wakes it.
            while !vcpu.kick.load(Ordering::SeqCst) {
                std::thread::park();
            }
        } else if let Err(e) = step(&mem, n, &mut pos, &serial, disk.as_deref()) {
            *vcpu.pos.lock().unwrap_or_else(|e| e.into_inner()) = pos;
            ctl.fail(format!("software vcpu{n} stopped: {e}"));
            return;
        }
        since_check += 1;
        let kicked = vcpu.kick.load(Ordering::Relaxed);
        if !kicked && since_check < CHECK_EVERY {
            continue;
        }
        paced += u64::from(since_check);
        since_check = 0;
        let pace = ctl.software_pace_ns();
        if pace > 0 {
            let due = pace_start + Duration::from_nanos(pace.saturating_mul(paced));
            let now = Instant::now();
            if due > now {
                // Parked rather than asleep, so that a pause is not kept waiting for the
                // end of a pacing delay (with a slow pace, many milliseconds).
                let mut now = now;
                while due > now && !vcpu.kick.load(Ordering::SeqCst) {
                    std::thread::park_timeout(due - now);
                    now = Instant::now();
                }
            } else if now - due > TIMESLICE {
                // Far behind (descheduled): start over rather than run flat out.
                (pace_start, paced) = (now, 0);
            }
        }
        vcpu.counters.add_run(run_start.elapsed());
        if kicked {
            vcpu.kick.store(false, Ordering::SeqCst);
            vcpu.counters.exits.fetch_add(1, Ordering::Relaxed);
            *vcpu.pos.lock().unwrap_or_else(|e| e.into_inner()) = pos;
            match ctl.park_point() {
                Parked::Exit => return,
                Parked::Resumed => {
                    take_pending();
                    pos = vcpu.position();
                    idle = match halted(&mem) {
                        Ok(i) => i,
                        Err(e) => {
                            ctl.fail(format!("software vcpu{n} stopped: {e}"));
                            return;
                        }
                    };
                    slice_start = Instant::now();
                    (pace_start, paced) = (slice_start, 0);
                }
                Parked::Continue => {}
            }
        }
        if ctl.throttle_pct() == 0 {
            slice_start = Instant::now();
        } else if slice_start.elapsed() >= TIMESLICE {
            ctl.throttle(&mut slice_start, &vcpu.counters);
            (pace_start, paced) = (slice_start, 0);
        }
        run_start = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Order, VmConfig};
    use crate::serial::Console;

    /// Steps software vCPUs through two whole passes from a fresh image and checks that
    /// they visit their pages in the order the oracle expects, print each pass, and come
    /// back to where they started.
    #[test]
    fn software_vcpus_walk_in_the_workloads_order() {
        for order in [Order::Sequential, Order::Scattered] {
            // Three vCPUs over two regions (one share crosses the hole), 1281 pages.
            let w = Workload::new(&VmConfig {
                mem_bytes: 8 << 20,
                ram_regions: 2,
                vcpus: 3,
                working_set_bytes: 1281 * PAGE_SIZE,
                order,
                ..VmConfig::default()
            })
            .unwrap();
            assert!((0..3).any(|v| w.segments(v).len() == 2));
            let ranges: Vec<_> = w
                .regions()
                .iter()
                .map(|&(b, s)| (GuestAddress(b), s as usize))
                .collect();
            let mem = GuestMemory::from_ranges(&ranges).unwrap();
            crate::guest::write_image(&mem, &w).unwrap();
            let lines = std::sync::Arc::new(Mutex::new(Vec::new()));
            let l = lines.clone();
            let serial = Serial::new(
                3,
                Console::Callback(Arc::new(move |line| {
                    l.lock().unwrap().push(line.text.clone())
                })),
            );
            for v in 0..3 {
                let start = SoftVcpu::new(v, &w).position();
                let mut pos = start;
                let expected: Vec<u64> = w.walk(v).collect();
                for pass in 1..=2u64 {
                    let mut visited = Vec::with_capacity(expected.len());
                    for _ in 0..expected.len() {
                        visited.push(pos.addr);
                        step(&mem, v, &mut pos, &serial, None).unwrap();
                    }
                    assert_eq!(visited, expected, "{order} vCPU {v}, pass {pass}");
                    assert_eq!(pos, start, "{order} vCPU {v} is back at its first page");
                    assert_eq!(crate::oracle::pass_of(&mem, v).unwrap(), pass);
                    let last = lines.lock().unwrap().last().cloned();
                    assert_eq!(last, Some(format!("vcpu{v} pass {pass}")));
                }
                // Half a pass further, the oracle agrees on how far it got.
                for _ in 0..expected.len() / 2 {
                    step(&mem, v, &mut pos, &serial, None).unwrap();
                }
                assert_eq!(pos.addr, expected[expected.len() / 2]);
                let r = crate::oracle::check(&mem, &w).unwrap();
                assert_eq!(r.vcpus[v as usize].visited, expected.len() / 2);
            }
        }
    }

    #[test]
    fn a_control_block_that_lost_its_share_stops_a_scattered_walk() {
        let w = Workload::new(&VmConfig {
            mem_bytes: 8 << 20,
            working_set_bytes: 64 * PAGE_SIZE,
            order: Order::Scattered,
            ..VmConfig::default()
        })
        .unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        crate::guest::write_image(&mem, &w).unwrap();
        let serial = Serial::new(1, Console::Discard);
        let mut pos = SoftVcpu::new(0, &w).position();
        // Pages beyond the segments: the next index is in no segment.
        store(&mem, layout::control_block_addr(0) + cb::SHARE_PAGES, 1000).unwrap();
        store(&mem, layout::control_block_addr(0) + cb::STRIDE, 200).unwrap();
        let e = step(&mem, 0, &mut pos, &serial, None).unwrap_err();
        assert!(e.contains("control block"), "{e}");
    }
}
