//! The disk oracle: does the image hold exactly what the guest's disk workload can have
//! written?
//!
//! Each pass of a vCPU with sectors begins with its disk workload (see
//! `guest/program.rs`): it writes, in order, every sector of its share with `{pass being
//! made, vCPU, sector number, "demodisk"}` and zeroes after, then walks its RAM. So at any
//! instant the vCPUs are stopped, with `P` the pass counter in the vCPU's control block
//! (the one the RAM oracle reads), its sectors in order hold `P + 1, …, P + 1, P, …, P`: a
//! prefix one step ahead, nothing else; a sector never written (pass 0) is all zero. And
//! since the disk comes first in a pass, a vCPU that has not written its whole share yet
//! has not visited a page of the pass either: the disk's step and the RAM's agree.
//! A request in flight at the switch (made available on the source, completed on the
//! destination) leaves its sector at `P` or `P + 1`, both of which the rule allows.
//!
//! Every sector outside the working set still holds its initial content: zero, as in the
//! fresh sparse image the demo creates, except in the pieces a prefill wrote ([`prefill`]:
//! a pattern made from the seed, so the oracle on either side knows it without a copy of
//! the original). Only the image's data extents and the prefilled pieces are read, so a
//! large sparse image costs what it holds. A working-set sector not written yet holds its
//! initial content too, which counts as pass 0. [`disk_hash`] fingerprints the image's
//! content (holes and zero runs hash alike) for the comparison at a pre-copy switch.

use std::os::fd::AsRawFd;

use serde::Serialize;
use xxhash_rust::xxh3::Xxh3Default;

use crate::guest::GuestMemory;
use crate::guest::abi::disk;
use crate::layout::Workload;
use crate::oracle::{self, OracleError, OracleReport};
use crate::virtio_blk::{DiskError, DiskImage, SECTOR_SIZE};

/// What the disk oracle found wrong. Each names the sector and, where one is concerned,
/// the vCPU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskOracleError {
    /// A working-set sector holds something no pass of its vCPU writes there.
    #[error(
        "vCPU {vcpu}: sector {sector} holds {words:x?} (pass, vCPU, sector, magic), not a sector of its own workload"
    )]
    Foreign {
        /// The vCPU whose share holds the sector.
        vcpu: u32,
        /// The sector.
        sector: u64,
        /// Its first four words.
        words: [u64; 4],
    },
    /// A sector is behind its vCPU's pass, or more than one step ahead.
    #[error("vCPU {vcpu}: sector {sector} holds pass {found}, the vCPU is at pass {pass}")]
    WrongPass {
        /// The vCPU.
        vcpu: u32,
        /// The sector.
        sector: u64,
        /// The pass it holds.
        found: u64,
        /// The vCPU's pass counter.
        pass: u64,
    },
    /// A sector of this pass follows, in the share's order, one that is not.
    #[error(
        "vCPU {vcpu}: sector {sector} holds pass {ahead} but sector {earlier}, written before it, holds {pass}: the earlier write was lost"
    )]
    Gap {
        /// The vCPU.
        vcpu: u32,
        /// The later sector.
        sector: u64,
        /// The earlier one.
        earlier: u64,
        /// The vCPU's pass counter.
        pass: u64,
        /// The later sector's pass.
        ahead: u64,
    },
    /// The disk and RAM disagree on where the vCPU is in its pass.
    #[error(
        "vCPU {vcpu}: {written} of its {sectors} sectors hold this pass, yet {visited} of its pages do: a pass writes the disk before its RAM"
    )]
    Inconsistent {
        /// The vCPU.
        vcpu: u32,
        /// Sectors one step ahead.
        written: u64,
        /// Sectors in its share.
        sectors: u64,
        /// Pages one step ahead.
        visited: usize,
    },
    /// A sector outside the working set is not its initial content.
    #[error(
        "sector {sector}, outside the working set, differs from its initial content ({initial}) at byte {offset}"
    )]
    Untouched {
        /// The sector.
        sector: u64,
        /// The first byte in it that differs.
        offset: usize,
        /// What it should hold: "zero" or "the seeded prefill".
        initial: &'static str,
    },
    /// The image could not be read.
    #[error("reading the disk")]
    Disk(#[source] DiskError),
    /// The image's extents could not be listed.
    #[error("listing the data extents of the disk image at byte {offset}")]
    Extents {
        /// Where.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// A pass counter could not be read from RAM.
    #[error("reading the pass counters")]
    Ram(#[source] OracleError),
}

/// One vCPU's disk verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiskVerdict {
    /// Its pass counter.
    pub pass: u64,
    /// Sectors of its share holding `pass + 1`: the first ones.
    pub written: u64,
    /// Sectors in its share.
    pub sectors: u64,
}

/// What a successful disk check saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskReport {
    /// Per vCPU.
    pub vcpus: Vec<DiskVerdict>,
    /// Working-set sectors checked.
    pub sectors_checked: u64,
    /// Bytes outside the working set read (the image's data extents and prefilled pieces
    /// there) and found as they started.
    pub untouched_bytes_checked: u64,
}

/// The prefill's unit: pieces of this size are wholly pattern or wholly zero.
pub const PREFILL_PIECE: u64 = 1 << 20;

/// Whether piece `piece` is prefilled when `percent` % of them are: spread evenly, so
/// that 50 % is every other piece (the odd ones) and 100 % all of them.
pub fn prefilled(piece: u64, percent: u8) -> bool {
    let p = u128::from(percent);
    let k = u128::from(piece);
    k * p / 100 != (k + 1) * p / 100
}

/// The prefill pattern of the bytes at `offset..offset + buf.len()` (`offset` and the
/// length multiples of 8): a word of SplitMix64 per 8 bytes, from the seed and the word's
/// position, so that any piece can be made or checked alone and no two disks made with
/// different seeds agree.
pub fn prefill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    debug_assert!(offset % 8 == 0 && buf.len() % 8 == 0);
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let mut z = (seed ^ 0xd15c_f111_0000_0000)
            .wrapping_add((offset / 8 + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

/// Writes the prefill of `percent` % made from `seed` into `img`, a fresh (all-zero)
/// image: the pieces [`prefilled`] names, the last one cut at the end of the disk.
/// Returns the bytes written.
pub fn prefill(img: &DiskImage, percent: u8, seed: u64) -> Result<u64, DiskError> {
    let size = img.sectors() * SECTOR_SIZE;
    let mut buf = vec![0u8; PREFILL_PIECE as usize];
    let mut written = 0;
    for piece in (0..size.div_ceil(PREFILL_PIECE)).filter(|&k| prefilled(k, percent)) {
        let at = piece * PREFILL_PIECE;
        let n = (size - at).min(PREFILL_PIECE) as usize;
        prefill_pattern(seed, at, &mut buf[..n]);
        img.write_at(&buf[..n], at)?;
        written += n as u64;
    }
    img.flush()?;
    Ok(written)
}

/// What a disk with this workload held before the guest ran.
#[derive(Debug, Clone, Copy)]
struct Initial {
    percent: u8,
    seed: u64,
}

impl Initial {
    fn of(w: &Workload) -> Initial {
        Initial {
            percent: w.config().disk_prefill_percent,
            seed: w.config().seed,
        }
    }

    fn filled(&self, at: u64) -> bool {
        prefilled(at / PREFILL_PIECE, self.percent)
    }

    /// The first byte of `buf`, read at `at` and within one piece, that differs from the
    /// initial content, and what that content is.
    fn differs(&self, buf: &[u8], at: u64, scratch: &mut Vec<u8>) -> Option<(u64, &'static str)> {
        if self.filled(at) {
            scratch.resize(buf.len(), 0);
            prefill_pattern(self.seed, at, scratch);
            let i = buf.iter().zip(scratch.iter()).position(|(a, b)| a != b)?;
            Some((at + i as u64, "the seeded prefill"))
        } else {
            let i = buf.iter().position(|&b| b != 0)?;
            Some((at + i as u64, "zero"))
        }
    }
}

/// The pass a workload sector holds (0: never written, its initial content), or why it
/// is not one.
fn pass_in(
    buf: &[u8],
    vcpu: u32,
    sector: u64,
    initial: &Initial,
    scratch: &mut Vec<u8>,
) -> Result<u64, DiskOracleError> {
    let word = |i: usize| u64::from_le_bytes(buf[8 * i..8 * i + 8].try_into().unwrap_or_default());
    let words = [word(0), word(1), word(2), word(3)];
    if initial
        .differs(buf, sector * SECTOR_SIZE, scratch)
        .is_none()
    {
        return Ok(0);
    }
    let ours = words[0] != 0
        && words[1] == u64::from(vcpu)
        && words[2] == sector
        && words[3] == disk::MAGIC
        && buf[32..].iter().all(|&b| b == 0);
    if !ours {
        return Err(DiskOracleError::Foreign {
            vcpu,
            sector,
            words,
        });
    }
    Ok(words[0])
}

/// The data extents of the image from byte `from`, as `(start, end)`.
fn data_extents(img: &DiskImage, from: u64) -> Result<Vec<(u64, u64)>, DiskOracleError> {
    let fd = img.file().as_raw_fd();
    let size = img.sectors() * SECTOR_SIZE;
    let mut out = Vec::new();
    let mut at = from;
    while at < size {
        let seek = |whence, off: u64| -> Result<Option<u64>, DiskOracleError> {
            // SAFETY: lseek on a descriptor we own; it only moves the file offset, which
            // nothing else uses (all I/O is positioned).
            let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                // ENXIO: no data past `off`.
                if e.raw_os_error() == Some(libc::ENXIO) {
                    return Ok(None);
                }
                return Err(DiskOracleError::Extents {
                    offset: off,
                    source: e,
                });
            }
            Ok(Some(r as u64))
        };
        let Some(start) = seek(libc::SEEK_DATA, at)? else {
            break;
        };
        let end = seek(libc::SEEK_HOLE, start)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        out.push((start, end));
        at = end;
    }
    Ok(out)
}

/// Checks the image against the workload and the pass counters in `mem`, and, given the
/// RAM oracle's report on the same instant, that disk and RAM agree. See the module docs.
pub fn check(
    img: &DiskImage,
    mem: &GuestMemory,
    w: &Workload,
    ram: Option<&OracleReport>,
) -> Result<DiskReport, DiskOracleError> {
    let initial = Initial::of(w);
    let mut scratch = Vec::new();
    let mut buf = vec![0u8; SECTOR_SIZE as usize];
    let mut vcpus = Vec::with_capacity(w.vcpus() as usize);
    let mut sectors_checked = 0;
    for v in 0..w.vcpus() {
        let pass = oracle::pass_of(mem, v).map_err(DiskOracleError::Ram)?;
        let share = w.disk_share(v);
        let mut written = 0u64;
        let mut first_behind: Option<u64> = None;
        for s in share.clone() {
            img.read_at(&mut buf, s * SECTOR_SIZE)
                .map_err(DiskOracleError::Disk)?;
            let found = pass_in(&buf, v, s, &initial, &mut scratch)?;
            if found != pass && found != pass.wrapping_add(1) {
                return Err(DiskOracleError::WrongPass {
                    vcpu: v,
                    sector: s,
                    found,
                    pass,
                });
            }
            if found == pass {
                first_behind.get_or_insert(s);
            } else if let Some(earlier) = first_behind {
                return Err(DiskOracleError::Gap {
                    vcpu: v,
                    sector: s,
                    earlier,
                    pass,
                    ahead: found,
                });
            } else {
                written += 1;
            }
            sectors_checked += 1;
        }
        let sectors = share.end - share.start;
        if let Some(r) = ram.and_then(|r| r.vcpus.get(v as usize)) {
            if written < sectors && r.visited > 0 {
                return Err(DiskOracleError::Inconsistent {
                    vcpu: v,
                    written,
                    sectors,
                    visited: r.visited,
                });
            }
        }
        vcpus.push(DiskVerdict {
            pass,
            written,
            sectors,
        });
    }
    // Outside the working set: as it started, wherever the image holds data (zero but in
    // prefilled pieces) and in every prefilled piece (a hole there lost the pattern).
    let from = w.disk_working_set().end * SECTOR_SIZE;
    let size = img.sectors() * SECTOR_SIZE;
    let mut chunk = vec![0u8; 64 << 10];
    let mut untouched = 0u64;
    let mut check_range = |start: u64, end: u64| -> Result<(), DiskOracleError> {
        let mut at = start;
        while at < end {
            // Chunks never straddle a piece, so that each is all pattern or all zero.
            let piece_end = (at / PREFILL_PIECE + 1) * PREFILL_PIECE;
            let n = (end.min(piece_end) - at).min(chunk.len() as u64) as usize;
            img.read_at(&mut chunk[..n], at)
                .map_err(DiskOracleError::Disk)?;
            if let Some((byte, what)) = initial.differs(&chunk[..n], at, &mut scratch) {
                return Err(DiskOracleError::Untouched {
                    sector: byte / SECTOR_SIZE,
                    offset: (byte % SECTOR_SIZE) as usize,
                    initial: what,
                });
            }
            untouched += n as u64;
            at += n as u64;
        }
        Ok(())
    };
    for (start, end) in data_extents(img, from)? {
        // Data in prefilled pieces is checked with them below.
        let mut at = start.max(from);
        while at < end {
            let piece_end = ((at / PREFILL_PIECE + 1) * PREFILL_PIECE).min(end);
            if !initial.filled(at) {
                check_range(at, piece_end)?;
            }
            at = piece_end;
        }
    }
    for piece in (0..size.div_ceil(PREFILL_PIECE)).filter(|&k| prefilled(k, initial.percent)) {
        let start = (piece * PREFILL_PIECE).max(from);
        let end = ((piece + 1) * PREFILL_PIECE).min(size);
        if start < end {
            check_range(start, end)?;
        }
    }
    Ok(DiskReport {
        vcpus,
        sectors_checked,
        untouched_bytes_checked: untouched,
    })
}

/// A 64-bit fingerprint of the image's content: the XXH3 of the offset and bytes of every
/// 64 KiB piece that is not all zero, in order. Holes and written zeroes hash alike, so
/// two images with the same content have the same hash however they are allocated.
pub fn disk_hash(img: &DiskImage) -> Result<u64, DiskOracleError> {
    const PIECE: u64 = 64 << 10;
    let mut h = Xxh3Default::new();
    let mut chunk = vec![0u8; PIECE as usize];
    let mut last = None;
    for (start, end) in data_extents(img, 0)? {
        // Pieces are aligned, so that where extents begin does not change the hash.
        let mut at = start - start % PIECE;
        while at < end {
            if last == Some(at) {
                at += PIECE;
                continue;
            }
            let size = img.sectors() * SECTOR_SIZE;
            let n = (size - at).min(PIECE) as usize;
            img.read_at(&mut chunk[..n], at)
                .map_err(DiskOracleError::Disk)?;
            if chunk[..n].iter().any(|&b| b != 0) {
                h.update(&at.to_le_bytes());
                h.update(&chunk[..n]);
            }
            last = Some(at);
            at += PIECE;
        }
    }
    Ok(h.digest())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::layout::{self, VmConfig};
    use crate::virtio_blk::{BlkDevice, driver};

    struct Rig {
        mem: Arc<GuestMemory>,
        dev: BlkDevice,
        w: Workload,
        _dir: tempfile::TempDir,
    }

    /// Two vCPUs, 10 working-set sectors of a 64-sector disk.
    fn rig() -> Rig {
        rig_with(64, 0)
    }

    /// Two vCPUs, 10 working-set sectors of a disk of `sectors`, `prefill` % of it
    /// prefilled.
    fn rig_with(sectors: u64, prefill_percent: u8) -> Rig {
        let cfg = VmConfig {
            mem_bytes: 4 << 20,
            vcpus: 2,
            working_set_bytes: 16 << 12,
            disk_sectors: sectors,
            disk_working_set: 10,
            disk_prefill_percent: prefill_percent,
            ..VmConfig::default()
        };
        let w = Workload::new(&cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        DiskImage::create_sparse(&path, sectors * 512).unwrap();
        prefill(&DiskImage::open(&path).unwrap(), prefill_percent, cfg.seed).unwrap();
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
        crate::guest::write_image(&mem, &w).unwrap();
        let mut dev = BlkDevice::new(mem.clone(), DiskImage::open(&path).unwrap(), None);
        dev.resume();
        Rig {
            mem,
            dev,
            w,
            _dir: dir,
        }
    }

    fn set_pass(r: &Rig, v: u32, p: u64) {
        r.mem
            .write_obj(p, GuestAddress(layout::control_block_addr(v)))
            .unwrap();
    }

    /// vCPU `v` writes the first `k` sectors of its share for pass `pass`.
    fn write(r: &mut Rig, v: u32, pass: u64, k: u64) {
        let share = r.w.disk_share(v);
        for s in share.start..share.start + k {
            driver::write_sector(&r.mem, &mut r.dev, v, s, pass).unwrap();
        }
    }

    #[test]
    fn a_fresh_disk_and_passes_in_progress_pass() {
        let mut r = rig();
        let c = check(r.dev.disk(), &r.mem, &r.w, None).unwrap();
        assert_eq!(c.sectors_checked, 10);
        assert_eq!(
            c.vcpus[0],
            DiskVerdict {
                pass: 0,
                written: 0,
                sectors: 5
            }
        );
        let h0 = disk_hash(r.dev.disk()).unwrap();
        // vCPU 0 done with pass 1's disk, vCPU 1 three sectors into it.
        write(&mut r, 0, 1, 5);
        write(&mut r, 1, 1, 3);
        let c = check(r.dev.disk(), &r.mem, &r.w, None).unwrap();
        assert_eq!((c.vcpus[0].written, c.vcpus[1].written), (5, 3));
        assert_ne!(disk_hash(r.dev.disk()).unwrap(), h0);
        // Pass 1 counted: vCPU 0's sectors now hold its pass.
        set_pass(&r, 0, 1);
        let c = check(r.dev.disk(), &r.mem, &r.w, None).unwrap();
        assert_eq!(
            c.vcpus[0],
            DiskVerdict {
                pass: 1,
                written: 0,
                sectors: 5
            }
        );
    }

    #[test]
    fn lost_misplaced_and_stray_writes_are_caught() {
        let mut r = rig();
        write(&mut r, 0, 1, 5);
        set_pass(&r, 0, 1);
        write(&mut r, 0, 2, 3);
        // Sector 1 goes back to pass 1: a lost write inside the prefix.
        driver::write_sector(&r.mem, &mut r.dev, 0, 1, 1).unwrap();
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, None),
            Err(DiskOracleError::Gap {
                vcpu: 0,
                sector: 2,
                earlier: 1,
                ..
            })
        ));
        driver::write_sector(&r.mem, &mut r.dev, 0, 1, 2).unwrap();
        // Two steps ahead.
        driver::write_sector(&r.mem, &mut r.dev, 0, 0, 3).unwrap();
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, None),
            Err(DiskOracleError::WrongPass {
                sector: 0,
                found: 3,
                pass: 1,
                ..
            })
        ));
        driver::write_sector(&r.mem, &mut r.dev, 0, 0, 2).unwrap();
        check(r.dev.disk(), &r.mem, &r.w, None).unwrap();
        // vCPU 1 writing into vCPU 0's share.
        driver::write_sector(&r.mem, &mut r.dev, 1, 4, 1).unwrap();
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, None),
            Err(DiskOracleError::Foreign {
                vcpu: 0,
                sector: 4,
                ..
            })
        ));
        driver::write_sector(&r.mem, &mut r.dev, 0, 4, 1).unwrap();
        check(r.dev.disk(), &r.mem, &r.w, None).unwrap();
        // Outside the working set.
        driver::write_sector(&r.mem, &mut r.dev, 1, 40, 1).unwrap();
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, None),
            Err(DiskOracleError::Untouched {
                sector: 40,
                offset: 0,
                initial: "zero"
            })
        ));
    }

    #[test]
    fn disk_and_ram_must_agree_on_the_step() {
        let mut r = rig();
        write(&mut r, 0, 1, 2);
        let ram = oracle::check(&r.mem, &r.w).unwrap();
        check(r.dev.disk(), &r.mem, &r.w, Some(&ram)).unwrap();
        // A page visited in pass 1 while the disk is not done: the order is broken.
        let first = r.w.walk(0).next().unwrap();
        r.mem.write_obj(1u64, GuestAddress(first)).unwrap();
        let ram = oracle::check(&r.mem, &r.w).unwrap();
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, Some(&ram)),
            Err(DiskOracleError::Inconsistent {
                vcpu: 0,
                written: 2,
                sectors: 5,
                visited: 1
            })
        ));
        write(&mut r, 0, 1, 5);
        check(r.dev.disk(), &r.mem, &r.w, Some(&ram)).unwrap();
    }

    #[test]
    fn the_hash_is_of_content_not_allocation() {
        let mut r = rig();
        let h0 = disk_hash(r.dev.disk()).unwrap();
        // Zeroes written where there was a hole: same content, same hash.
        r.dev.disk().write_at(&[0u8; 4096], 8192).unwrap();
        assert_eq!(disk_hash(r.dev.disk()).unwrap(), h0);
        write(&mut r, 1, 1, 1);
        let h1 = disk_hash(r.dev.disk()).unwrap();
        assert_ne!(h1, h0);
        assert_eq!(disk_hash(r.dev.disk()).unwrap(), h1);
    }

    #[test]
    fn a_prefill_spreads_evenly() {
        for percent in 0..=100u8 {
            let n = (0..100).filter(|&k| prefilled(k, percent)).count();
            assert_eq!(n, usize::from(percent), "{percent} %");
            let n = (0..1000).filter(|&k| prefilled(k, percent)).count();
            assert_eq!(n, 10 * usize::from(percent), "{percent} % of 1000");
        }
        let half: Vec<u64> = (0..8).filter(|&k| prefilled(k, 50)).collect();
        assert_eq!(half, [1, 3, 5, 7]);
        // The pattern is of the position and the seed, whichever way it is cut.
        let mut whole = vec![0u8; 4096];
        prefill_pattern(7, 8192, &mut whole);
        let mut tail = vec![0u8; 1024];
        prefill_pattern(7, 8192 + 3072, &mut tail);
        assert_eq!(&whole[3072..], &tail[..]);
        let mut other = vec![0u8; 4096];
        prefill_pattern(8, 8192, &mut other);
        assert_ne!(whole, other);
        assert!(whole.chunks(512).all(|s| s.iter().any(|&b| b != 0)));
    }

    /// 3 MiB and a sector: the last piece is cut short.
    const PREFILL_DISK: u64 = 3 * 2048 + 1;

    #[test]
    fn a_prefilled_disk_checks_and_a_lost_or_changed_piece_is_caught() {
        // All of it: the working set starts as the pattern too, which is pass 0.
        let mut r = rig_with(PREFILL_DISK, 100);
        let c = check(r.dev.disk(), &r.mem, &r.w, None).unwrap();
        assert_eq!(c.untouched_bytes_checked, (PREFILL_DISK - 10) * 512);
        assert_eq!((c.vcpus[0].pass, c.vcpus[0].written), (0, 0));
        write(&mut r, 0, 1, 2);
        assert_eq!(
            check(r.dev.disk(), &r.mem, &r.w, None).unwrap().vcpus[0].written,
            2
        );
        // The cut-short last sector, lost.
        r.dev
            .disk()
            .write_at(&[0u8; 512], (PREFILL_DISK - 1) * 512)
            .unwrap();
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, None),
            Err(DiskOracleError::Untouched {
                sector,
                offset: 0,
                initial: "the seeded prefill"
            }) if sector == PREFILL_DISK - 1
        ));

        // Half: pieces 1 and 3 (its one sector) are pattern, 0 and 2 zero.
        let r = rig_with(PREFILL_DISK, 50);
        let c = check(r.dev.disk(), &r.mem, &r.w, None).unwrap();
        assert_eq!(c.untouched_bytes_checked, PREFILL_PIECE + 512);
        // A hole punched where the pattern was (a mirror that skipped a piece).
        let f = r.dev.disk().file();
        // SAFETY: fallocate on a descriptor the image owns, inside its size.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (PREFILL_PIECE + 65536) as libc::off_t,
                4096,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, None),
            Err(DiskOracleError::Untouched {
                sector: 2176,
                initial: "the seeded prefill",
                ..
            })
        ));
        let r = rig_with(PREFILL_DISK, 50);
        // A byte of the pattern changed, in a piece's last sector.
        let at = 2 * PREFILL_PIECE - 7;
        let mut b = [0u8];
        r.dev.disk().read_at(&mut b, at).unwrap();
        r.dev.disk().write_at(&[!b[0]], at).unwrap();
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, None),
            Err(DiskOracleError::Untouched {
                sector: 4095,
                offset: 505,
                ..
            })
        ));
        // Data where the disk started zero.
        let r = rig_with(PREFILL_DISK, 50);
        r.dev
            .disk()
            .write_at(&[1u8; 512], 2 * PREFILL_PIECE + 512)
            .unwrap();
        assert!(matches!(
            check(r.dev.disk(), &r.mem, &r.w, None),
            Err(DiskOracleError::Untouched {
                sector: 4097,
                offset: 0,
                initial: "zero"
            })
        ));
    }

    #[test]
    fn the_oracle_must_know_the_prefill_it_checks() {
        let r = rig_with(PREFILL_DISK, 50);
        // The same image judged as a zero disk, and as one prefilled with another seed.
        for cfg in [
            VmConfig {
                disk_prefill_percent: 0,
                ..r.w.config().clone()
            },
            VmConfig {
                seed: r.w.config().seed + 1,
                ..r.w.config().clone()
            },
        ] {
            let w = Workload::new(&cfg).unwrap();
            assert!(matches!(
                check(r.dev.disk(), &r.mem, &w, None),
                Err(DiskOracleError::Untouched { sector: 2048, .. })
            ));
        }
        assert!(matches!(
            Workload::new(&VmConfig {
                disk_prefill_percent: 101,
                ..r.w.config().clone()
            }),
            Err(crate::layout::ConfigError::DiskPrefill(101))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Whatever the fill, one byte changed anywhere outside the working set is found,
        /// at its sector and offset, and nothing else is.
        #[test]
        fn any_changed_byte_outside_the_working_set_is_found(
            percent in 0u8..=100,
            at in (10 * 512u64)..(PREFILL_DISK * 512),
            flip in 1u8..=255,
        ) {
            let r = rig_with(PREFILL_DISK, percent);
            proptest::prop_assert!(check(r.dev.disk(), &r.mem, &r.w, None).is_ok());
            let mut b = [0u8];
            r.dev.disk().read_at(&mut b, at).unwrap();
            r.dev.disk().write_at(&[b[0] ^ flip], at).unwrap();
            match check(r.dev.disk(), &r.mem, &r.w, None) {
                Err(DiskOracleError::Untouched { sector, offset, .. }) => {
                    proptest::prop_assert_eq!((sector, offset as u64), (at / 512, at % 512));
                }
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }
}
