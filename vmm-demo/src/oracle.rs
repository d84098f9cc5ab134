//! The oracle: does guest RAM hold exactly what the workload can have written?
//!
//! Each vCPU walks its share of the working set page by page, adding one to the counter of
//! every page, and counts its passes in its control block. It visits the pages of its
//! share in the same order every pass ([`Workload::walk`]: address order, or the
//! scattered permutation of [`layout::Order::Scattered`]). So at any instant when the
//! vCPUs are stopped, with `P` the pass number a vCPU's control block holds, its pages in
//! walking order hold `P + 1, …, P + 1, P, …, P`: the first `k` pages of the walk, those
//! it has already visited in the current pass, one step ahead of the rest, and nothing
//! else (as in QEMU's migration
//! tests, where every page holds pass N or N + 1 with a single step between). Every other
//! data page still holds its initial content, and the program, GDT, page tables and
//! control blocks hold what the VMM wrote (page walks may set accessed and dirty bits).
//!
//! [`check`] verifies all of that over a `GuestMemory` and a [`Workload`], so it runs
//! the same on a source VM and on a destination that received RAM by migration.
//! [`ram_hash`] fingerprints all of RAM, so a source's RAM at switchover can be compared
//! with the destination's. Both read through volatile copies; call them with the vCPUs
//! paused (or not yet started) for a meaningful answer.

use crate::guest::GuestMemory;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use xxhash_rust::xxh3::Xxh3Default;

use crate::guest::{self, GDT, PROGRAM, pte};
use migration_core::PAGE_SIZE;

use crate::layout::{self, COUNTER_OFFSET, Workload};

/// What the oracle found wrong. Each names the page (guest-physical address) and, where
/// one is concerned, the vCPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OracleError {
    /// The guest program was overwritten.
    #[error("guest program at {:#x} differs at byte {offset}", layout::CODE_ADDR)]
    Program {
        /// First differing byte.
        offset: usize,
    },
    /// A GDT descriptor changed.
    #[error("GDT entry {index} is {found:#x}, expected {expected:#x}")]
    Gdt {
        /// Descriptor index.
        index: usize,
        /// What RAM holds.
        found: u64,
        /// What the VMM wrote.
        expected: u64,
    },
    /// A page-table entry changed beyond its accessed and dirty bits.
    #[error(
        "page-table entry at {gpa:#x} is {found:#x}, expected {expected:#x} (accessed and dirty bits aside)"
    )]
    PageTable {
        /// Address of the entry.
        gpa: u64,
        /// What RAM holds.
        found: u64,
        /// What the VMM wrote.
        expected: u64,
    },
    /// A control block's configuration (segments, prefix) changed.
    #[error("vCPU {vcpu}'s control block differs from its configuration at byte {offset:#x}")]
    ControlBlock {
        /// The vCPU.
        vcpu: u32,
        /// First differing byte.
        offset: usize,
    },
    /// A page's counter is behind its vCPU's pass number.
    #[error("vCPU {vcpu}: page {gpa:#x} holds {found}, behind pass {pass}: it lost an increment")]
    Behind {
        /// The vCPU whose share holds the page.
        vcpu: u32,
        /// The page.
        gpa: u64,
        /// Its counter.
        found: u64,
        /// The vCPU's pass number.
        pass: u64,
    },
    /// A page's counter is more than one step ahead of its vCPU's pass number.
    #[error("vCPU {vcpu}: page {gpa:#x} holds {found}, more than one step ahead of pass {pass}")]
    Ahead {
        /// The vCPU whose share holds the page.
        vcpu: u32,
        /// The page.
        gpa: u64,
        /// Its counter.
        found: u64,
        /// The vCPU's pass number.
        pass: u64,
    },
    /// A page the vCPU visited in this pass follows, in walking order, one it had not: the
    /// earlier one lost an increment (or the later one gained one).
    #[error(
        "vCPU {vcpu}: page {gpa:#x} holds {ahead} but {earlier_gpa:#x}, earlier in the walk, holds {pass}: the earlier page lost an increment"
    )]
    Gap {
        /// The vCPU whose share holds the pages.
        vcpu: u32,
        /// The later page, one step ahead.
        gpa: u64,
        /// The earlier page, not incremented.
        earlier_gpa: u64,
        /// The vCPU's pass number.
        pass: u64,
        /// The later page's counter.
        ahead: u64,
    },
    /// A data page's content other than its counter differs from its initial content.
    #[error(
        "page {gpa:#x} differs from its initial content at byte {offset}: {found:#04x}, expected {expected:#04x}"
    )]
    Corrupted {
        /// The page.
        gpa: u64,
        /// First differing byte.
        offset: usize,
        /// What RAM holds.
        found: u8,
        /// The initial content.
        expected: u8,
    },
    /// Guest RAM could not be read.
    #[error("reading guest RAM at {gpa:#x}: {message}")]
    Memory {
        /// The address.
        gpa: u64,
        /// What vm-memory said.
        message: String,
    },
}

/// One vCPU's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuVerdict {
    /// Passes the vCPU completed.
    pub pass: u64,
    /// Pages of its share already visited in the current pass (holding `pass + 1`): the
    /// first `visited` pages of its walk.
    pub visited: usize,
    /// Pages in its share.
    pub pages: usize,
}

/// What a successful check saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OracleReport {
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuVerdict>,
    /// Data pages whose content was checked.
    pub data_pages: usize,
}

impl OracleReport {
    /// The smallest pass number among the vCPUs.
    pub fn min_pass(&self) -> u64 {
        self.vcpus.iter().map(|v| v.pass).min().unwrap_or(0)
    }
}

fn mem_err(gpa: u64, e: vm_memory::GuestMemoryError) -> OracleError {
    OracleError::Memory {
        gpa,
        message: e.to_string(),
    }
}

fn read_u64(mem: &GuestMemory, gpa: u64) -> Result<u64, OracleError> {
    let mut b = [0u8; 8];
    mem.read_slice(&mut b, GuestAddress(gpa))
        .map_err(|e| mem_err(gpa, e))?;
    Ok(u64::from_le_bytes(b))
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    // Equal pages are the rule: one memcmp, and a byte search only for a report.
    if a == b {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Runs `f` over `0..n` split into contiguous ranges, one per core (the guest is paused,
/// so its cores are free), and returns the results in range order.
fn on_all_cores<T: Send>(n: usize, f: impl Fn(std::ops::Range<usize>) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .clamp(1, n.max(1));
    let per = n.div_ceil(threads);
    if threads == 1 {
        return vec![f(0..n)];
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || f(t * per..((t + 1) * per).min(n)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Reads the pass number vCPU `index` has recorded in its control block.
pub fn pass_of(mem: &GuestMemory, index: u32) -> Result<u64, OracleError> {
    read_u64(
        mem,
        layout::control_block_addr(index) + layout::control_block::PASS,
    )
}

/// Checks guest RAM against the workload. See the module documentation for the rules.
pub fn check(mem: &GuestMemory, w: &Workload) -> Result<OracleReport, OracleError> {
    check_reserved(mem, w)?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut expected = vec![0u8; PAGE_SIZE as usize];
    let ctr = COUNTER_OFFSET as usize;
    let mut vcpus = Vec::with_capacity(w.vcpus() as usize);
    for v in 0..w.vcpus() {
        let pass = pass_of(mem, v)?;
        let mut visited = 0usize;
        let mut first_unvisited: Option<u64> = None;
        let mut pages = 0usize;
        for gpa in w.walk(v) {
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| mem_err(gpa, e))?;
            w.initial_page(gpa, &mut expected);
            let found = u64::from_le_bytes(page[ctr..ctr + 8].try_into().unwrap_or_default());
            page[ctr..ctr + 8].fill(0);
            if let Some(offset) = first_difference(&page, &expected) {
                return Err(OracleError::Corrupted {
                    gpa,
                    offset,
                    found: page[offset],
                    expected: expected[offset],
                });
            }
            if found < pass {
                return Err(OracleError::Behind {
                    vcpu: v,
                    gpa,
                    found,
                    pass,
                });
            }
            if found > pass.saturating_add(1) {
                return Err(OracleError::Ahead {
                    vcpu: v,
                    gpa,
                    found,
                    pass,
                });
            }
            if found == pass {
                first_unvisited.get_or_insert(gpa);
            } else if let Some(earlier_gpa) = first_unvisited {
                return Err(OracleError::Gap {
                    vcpu: v,
                    gpa,
                    earlier_gpa,
                    pass,
                    ahead: found,
                });
            } else {
                visited += 1;
            }
            pages += 1;
        }
        vcpus.push(VcpuVerdict {
            pass,
            visited,
            pages,
        });
    }
    let ws = w.working_set();
    let first = w.first_data_page();
    let pages: Vec<(usize, GuestAddress)> =
        w.ram().pages().map(|(p, a)| (p, GuestAddress(a))).collect();
    // Every other data page still holds its initial content: checked on all cores, and
    // the lowest page found wrong is reported.
    let results = on_all_cores(pages.len(), |range| -> Result<usize, OracleError> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut expected = vec![0u8; PAGE_SIZE as usize];
        let mut checked = 0;
        for &(idx, gpa) in &pages[range] {
            if idx < first || ws.contains(&idx) {
                continue;
            }
            mem.read_slice(&mut page, gpa)
                .map_err(|e| mem_err(gpa.0, e))?;
            w.initial_page(gpa.0, &mut expected);
            if let Some(offset) = first_difference(&page, &expected) {
                return Err(OracleError::Corrupted {
                    gpa: gpa.0,
                    offset,
                    found: page[offset],
                    expected: expected[offset],
                });
            }
            checked += 1;
        }
        Ok(checked)
    });
    let mut data_pages = ws.len();
    for r in results {
        data_pages += r?;
    }
    Ok(OracleReport { vcpus, data_pages })
}

fn check_reserved(mem: &GuestMemory, w: &Workload) -> Result<(), OracleError> {
    let mut code = [0u8; PROGRAM.len()];
    mem.read_slice(&mut code, GuestAddress(layout::CODE_ADDR))
        .map_err(|e| mem_err(layout::CODE_ADDR, e))?;
    if let Some(offset) = first_difference(&code, &PROGRAM) {
        return Err(OracleError::Program { offset });
    }
    for (index, &expected) in GDT.iter().enumerate() {
        let found = read_u64(mem, layout::GDT_ADDR + 8 * index as u64)?;
        // The CPU sets the accessed bit of a descriptor it loads.
        if found & !(1 << 40) != expected & !(1 << 40) {
            return Err(OracleError::Gdt {
                index,
                found,
                expected,
            });
        }
    }
    for (gpa, expected) in guest::page_table_entries(w) {
        let found = read_u64(mem, gpa)?;
        if found & !(pte::A | pte::D) != expected {
            return Err(OracleError::PageTable {
                gpa,
                found,
                expected,
            });
        }
    }
    for v in 0..w.vcpus() {
        let cfg = guest::control_block_config(w, v);
        let mut found = vec![0u8; cfg.len()];
        let base = layout::control_block_addr(v);
        mem.read_slice(&mut found, GuestAddress(base))
            .map_err(|e| mem_err(base, e))?;
        // Bytes 0..8 are the pass counter, checked against the pages.
        if let Some(offset) = first_difference(&found[8..], &cfg[8..]) {
            return Err(OracleError::ControlBlock {
                vcpu: v,
                offset: offset + 8,
            });
        }
    }
    Ok(())
}

/// A 64-bit fingerprint of all guest RAM: the XXH3 of each 8 MiB piece (regions in
/// ascending address order, each cut into pieces from its start), hashed on all cores,
/// then the XXH3 of those digests in order.
pub fn ram_hash(mem: &GuestMemory) -> Result<u64, OracleError> {
    const PIECE: u64 = 8 << 20;
    const CHUNK: usize = 1 << 20;
    let mut regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    let pieces: Vec<(u64, u64)> = regions
        .iter()
        .flat_map(|&(base, len)| {
            (0..len.div_ceil(PIECE)).map(move |i| (base + i * PIECE, (len - i * PIECE).min(PIECE)))
        })
        .collect();
    let digests = on_all_cores(pieces.len(), |range| -> Result<Vec<u64>, OracleError> {
        let mut buf = vec![0u8; CHUNK];
        let mut out = Vec::with_capacity(range.len());
        for &(base, len) in &pieces[range] {
            let mut h = Xxh3Default::new();
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(CHUNK as u64) as usize;
                let gpa = base + off;
                mem.read_slice(&mut buf[..n], GuestAddress(gpa))
                    .map_err(|e| mem_err(gpa, e))?;
                h.update(&buf[..n]);
                off += n as u64;
            }
            out.push(h.digest());
        }
        Ok(out)
    });
    let mut h = Xxh3Default::new();
    for d in digests {
        for x in d? {
            h.update(&x.to_le_bytes());
        }
    }
    Ok(h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Fill, Order, VmConfig};

    fn setup(fill: Fill) -> (GuestMemory, Workload) {
        setup_in(fill, Order::Sequential)
    }

    /// Two vCPUs over two regions: one share crosses the hole between them.
    fn setup_in(fill: Fill, order: Order) -> (GuestMemory, Workload) {
        let cfg = VmConfig {
            mem_bytes: 8 << 20,
            ram_regions: 2,
            vcpus: 2,
            working_set_bytes: 5 << 20,
            fill,
            seed: 7,
            order,
            ..VmConfig::default()
        };
        let w = Workload::new(&cfg).unwrap();
        let ranges: Vec<_> = w
            .regions()
            .iter()
            .map(|&(b, s)| (GuestAddress(b), s as usize))
            .collect();
        let mem = GuestMemory::from_ranges(&ranges).unwrap();
        guest::write_image(&mem, &w).unwrap();
        (mem, w)
    }

    /// Does what the guest does: `passes` whole passes of vCPU `v`, then `steps` page
    /// visits of the next one, in the workload's order.
    fn walk(mem: &GuestMemory, w: &Workload, v: u32, passes: u64, steps: usize) {
        let pages: Vec<u64> = w.walk(v).collect();
        walk_pages(mem, v, &pages, passes, steps);
    }

    /// [`walk`] in the order of `pages`.
    fn walk_pages(mem: &GuestMemory, v: u32, pages: &[u64], passes: u64, steps: usize) {
        for _ in 0..passes {
            for &p in pages {
                bump(mem, p, 1);
            }
            let cb = layout::control_block_addr(v);
            let pass = read_u64(mem, cb).unwrap();
            mem.write_obj(pass + 1, GuestAddress(cb)).unwrap();
        }
        for &p in &pages[..steps] {
            bump(mem, p, 1);
        }
    }

    /// vCPU `v`'s pages in address order.
    fn address_order(w: &Workload, v: u32) -> Vec<u64> {
        w.segments(v)
            .iter()
            .flat_map(|&(s, e)| (s..e).step_by(PAGE_SIZE as usize))
            .collect()
    }

    fn bump(mem: &GuestMemory, gpa: u64, by: i64) {
        let v = read_u64(mem, gpa).unwrap();
        mem.write_obj(v.wrapping_add(by as u64), GuestAddress(gpa))
            .unwrap();
    }

    /// The `n`-th page vCPU `v` visits in a pass.
    fn nth_page(w: &Workload, v: u32, n: usize) -> u64 {
        w.walk(v).nth(n).unwrap()
    }

    #[test]
    fn fresh_and_walked_images_pass() {
        for fill in [Fill::Zero, Fill::Random] {
            let (mem, w) = setup(fill);
            let r = check(&mem, &w).unwrap();
            assert_eq!(r.min_pass(), 0);
            walk(&mem, &w, 0, 3, 100);
            walk(&mem, &w, 1, 2, 0);
            let r = check(&mem, &w).unwrap();
            assert_eq!(r.vcpus[0].pass, 3);
            assert_eq!(r.vcpus[0].visited, 100);
            assert_eq!(r.vcpus[1].pass, 2);
            assert_eq!(r.vcpus[1].visited, 0);
            assert_eq!(r.data_pages, w.ram().page_count() - w.first_data_page());
        }
    }

    #[test]
    fn a_page_that_lost_an_increment_is_caught() {
        let (mem, w) = setup(Fill::Random);
        walk(&mem, &w, 0, 2, 10);
        // Inside the visited prefix: a gap.
        let p = nth_page(&w, 0, 4);
        bump(&mem, p, -1);
        assert!(matches!(
            check(&mem, &w),
            Err(OracleError::Gap { vcpu: 0, earlier_gpa, pass: 2, ahead: 3, .. }) if earlier_gpa == p
        ));
        bump(&mem, p, 1);
        // Past the visited prefix: behind the pass number.
        let q = nth_page(&w, 0, 50);
        bump(&mem, q, -1);
        assert_eq!(
            check(&mem, &w),
            Err(OracleError::Behind {
                vcpu: 0,
                gpa: q,
                found: 1,
                pass: 2
            })
        );
    }

    #[test]
    fn scattered_walks_pass_and_are_judged_in_their_own_order() {
        for fill in [Fill::Zero, Fill::Random] {
            let (mem, w) = setup_in(fill, Order::Scattered);
            let r = check(&mem, &w).unwrap();
            assert_eq!(r.min_pass(), 0);
            walk(&mem, &w, 0, 3, 100);
            walk(&mem, &w, 1, 2, w.share(1).len() - 1);
            let r = check(&mem, &w).unwrap();
            assert_eq!((r.vcpus[0].pass, r.vcpus[0].visited), (3, 100));
            assert_eq!(r.vcpus[1].pass, 2);
            assert_eq!(r.vcpus[1].visited, w.share(1).len() - 1);
            assert_eq!(r.data_pages, w.ram().page_count() - w.first_data_page());
        }
    }

    #[test]
    fn a_page_off_by_one_in_scattered_order_is_caught() {
        let (mem, w) = setup_in(Fill::Random, Order::Scattered);
        // vCPU 1's share crosses the hole between the regions: its walk does too.
        assert_eq!(w.segments(1).len(), 2);
        walk(&mem, &w, 1, 2, 10);
        // Inside the visited part of the walk: a gap, named by the first page it left.
        let p = nth_page(&w, 1, 4);
        bump(&mem, p, -1);
        assert!(matches!(
            check(&mem, &w),
            Err(OracleError::Gap { vcpu: 1, earlier_gpa, pass: 2, ahead: 3, .. }) if earlier_gpa == p
        ));
        bump(&mem, p, 1);
        // Past it: behind the pass number.
        let q = nth_page(&w, 1, 50);
        bump(&mem, q, -1);
        assert_eq!(
            check(&mem, &w),
            Err(OracleError::Behind {
                vcpu: 1,
                gpa: q,
                found: 1,
                pass: 2
            })
        );
        bump(&mem, q, 1);
        // The page after the last one visited, one step ahead: the walk has a hole.
        let next = nth_page(&w, 1, 11);
        bump(&mem, next, 1);
        assert!(matches!(
            check(&mem, &w),
            Err(OracleError::Gap { vcpu: 1, gpa, earlier_gpa, .. })
                if gpa == next && earlier_gpa == nth_page(&w, 1, 10)
        ));
        bump(&mem, next, -1);
        // A visited page one step further still.
        let v = nth_page(&w, 1, 0);
        bump(&mem, v, 1);
        assert_eq!(
            check(&mem, &w),
            Err(OracleError::Ahead {
                vcpu: 1,
                gpa: v,
                found: 4,
                pass: 2
            })
        );
        bump(&mem, v, -1);
        check(&mem, &w).unwrap();
    }

    #[test]
    fn a_walk_in_the_wrong_order_is_caught() {
        // Pages visited in address order where the workload says scattered...
        let (mem, w) = setup_in(Fill::Zero, Order::Scattered);
        walk_pages(&mem, 0, &address_order(&w, 0), 1, 10);
        assert!(matches!(
            check(&mem, &w),
            Err(OracleError::Gap { vcpu: 0, .. })
        ));
        // ... and scattered where it says sequential.
        let (mem, w) = setup_in(Fill::Zero, Order::Sequential);
        let (_, scattered) = setup_in(Fill::Zero, Order::Scattered);
        let pages: Vec<u64> = scattered.walk(0).collect();
        walk_pages(&mem, 0, &pages, 1, 10);
        assert!(matches!(
            check(&mem, &w),
            Err(OracleError::Gap { vcpu: 0, .. })
        ));
    }

    #[test]
    fn a_changed_stride_is_caught() {
        let (mem, w) = setup_in(Fill::Zero, Order::Scattered);
        let at = layout::control_block_addr(0) + layout::control_block::STRIDE;
        assert_eq!(read_u64(&mem, at).unwrap(), w.stride(0));
        bump(&mem, at, 2);
        assert_eq!(
            check(&mem, &w),
            Err(OracleError::ControlBlock {
                vcpu: 0,
                offset: layout::control_block::STRIDE as usize
            })
        );
        bump(&mem, at, -2);
        check(&mem, &w).unwrap();
        // A sequential VM's control block holds no stride: a scattered guest's RAM is
        // not mistaken for it.
        let (seq, sw) = setup_in(Fill::Zero, Order::Sequential);
        assert_eq!(read_u64(&seq, at).unwrap(), 0);
        assert!(matches!(
            check(&mem, &sw),
            Err(OracleError::ControlBlock { vcpu: 0, .. })
        ));
    }

    #[test]
    fn a_page_two_steps_ahead_is_caught() {
        let (mem, w) = setup(Fill::Zero);
        walk(&mem, &w, 1, 1, 3);
        let p = nth_page(&w, 1, 1);
        bump(&mem, p, 1);
        assert_eq!(
            check(&mem, &w),
            Err(OracleError::Ahead {
                vcpu: 1,
                gpa: p,
                found: 3,
                pass: 1
            })
        );
    }

    #[test]
    fn a_page_ahead_of_the_walk_is_caught() {
        let (mem, w) = setup(Fill::Zero);
        walk(&mem, &w, 0, 1, 3);
        let p = nth_page(&w, 0, 7);
        bump(&mem, p, 1);
        assert!(matches!(check(&mem, &w), Err(OracleError::Gap { gpa, .. }) if gpa == p));
    }

    #[test]
    fn corrupted_pages_are_caught() {
        for fill in [Fill::Zero, Fill::Random] {
            let (mem, w) = setup(fill);
            let last = w.ram().page_count() - 1;
            let gpa = w.ram().page_to_gpa(last).unwrap();
            let b: u8 = mem.read_obj(GuestAddress(gpa + 123)).unwrap();
            mem.write_obj(b ^ 0x10, GuestAddress(gpa + 123)).unwrap();
            assert_eq!(
                check(&mem, &w),
                Err(OracleError::Corrupted {
                    gpa,
                    offset: 123,
                    found: b ^ 0x10,
                    expected: b
                })
            );
            // Two damaged pages, checked on different cores: the lower one is reported.
            let first = w.working_set().end;
            let low = w.ram().page_to_gpa(first).unwrap();
            let lb: u8 = mem.read_obj(GuestAddress(low + 9)).unwrap();
            mem.write_obj(lb ^ 1, GuestAddress(low + 9)).unwrap();
            assert!(matches!(
                check(&mem, &w),
                Err(OracleError::Corrupted { gpa, offset: 9, .. }) if gpa == low
            ));
            mem.write_obj(lb, GuestAddress(low + 9)).unwrap();
            mem.write_obj(b, GuestAddress(gpa + 123)).unwrap();
            // Beside the counter of a working-set page.
            let p = nth_page(&w, 1, 0);
            mem.write_obj(0xffu8, GuestAddress(p + 4000)).unwrap();
            assert!(matches!(
                check(&mem, &w),
                Err(OracleError::Corrupted { gpa, offset: 4000, .. }) if gpa == p
            ));
        }
    }

    #[test]
    fn reserved_area_damage_is_caught() {
        let (mem, w) = setup(Fill::Zero);
        mem.write_obj(0x90u8, GuestAddress(layout::CODE_ADDR + 5))
            .unwrap();
        assert_eq!(check(&mem, &w), Err(OracleError::Program { offset: 5 }));
        let (mem, w) = setup(Fill::Zero);
        bump(&mem, layout::PD_ADDR + 8 * 3, 1 << 12);
        assert!(matches!(
            check(&mem, &w),
            Err(OracleError::PageTable { .. })
        ));
        // Accessed and dirty bits are the CPU's to set.
        let (mem, w) = setup(Fill::Zero);
        bump(&mem, layout::PD_ADDR + 8 * 3, (pte::A | pte::D) as i64);
        check(&mem, &w).unwrap();
        let cb = layout::control_block_addr(1) + layout::control_block::SEGMENTS;
        bump(&mem, cb, PAGE_SIZE as i64);
        assert!(matches!(
            check(&mem, &w),
            Err(OracleError::ControlBlock { vcpu: 1, .. })
        ));
    }

    #[test]
    fn hash_sees_every_byte() {
        let (mem, w) = setup(Fill::Random);
        let h0 = ram_hash(&mem).unwrap();
        assert_eq!(h0, ram_hash(&mem).unwrap());
        // A byte in the second region, past the hole.
        let gpa = w.regions()[1].0 + 77;
        let b: u8 = mem.read_obj(GuestAddress(gpa)).unwrap();
        mem.write_obj(b.wrapping_add(1), GuestAddress(gpa)).unwrap();
        assert_ne!(h0, ram_hash(&mem).unwrap());
        mem.write_obj(b, GuestAddress(gpa)).unwrap();
        assert_eq!(h0, ram_hash(&mem).unwrap());
    }
}
