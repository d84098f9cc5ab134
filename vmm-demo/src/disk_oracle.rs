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
//! fresh sparse image the demo creates (only the image's data extents are read, so a
//! large sparse image costs what was written). [`disk_hash`] fingerprints the image's
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
    /// A sector outside the working set is not its initial (zero) content.
    #[error(
        "sector {sector}, outside the working set, differs from its initial zero at byte {offset}"
    )]
    Untouched {
        /// The sector.
        sector: u64,
        /// The first non-zero byte in it.
        offset: usize,
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
    /// Bytes outside the working set read (the image's data extents there) and found zero.
    pub untouched_bytes_checked: u64,
}

/// The pass a workload sector holds (0: never written), or why it is not one.
fn pass_in(buf: &[u8], vcpu: u32, sector: u64) -> Result<u64, DiskOracleError> {
    let word = |i: usize| u64::from_le_bytes(buf[8 * i..8 * i + 8].try_into().unwrap_or_default());
    let words = [word(0), word(1), word(2), word(3)];
    if buf.iter().all(|&b| b == 0) {
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
            let found = pass_in(&buf, v, s)?;
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
    // Outside the working set: zero wherever the image holds data.
    let from = w.disk_working_set().end * SECTOR_SIZE;
    let mut chunk = vec![0u8; 64 << 10];
    let mut untouched = 0u64;
    for (start, end) in data_extents(img, from)? {
        let mut at = start.max(from);
        while at < end {
            let n = ((end - at) as usize).min(chunk.len());
            img.read_at(&mut chunk[..n], at)
                .map_err(DiskOracleError::Disk)?;
            if let Some(i) = chunk[..n].iter().position(|&b| b != 0) {
                let byte = at + i as u64;
                return Err(DiskOracleError::Untouched {
                    sector: byte / SECTOR_SIZE,
                    offset: (byte % SECTOR_SIZE) as usize,
                });
            }
            untouched += n as u64;
            at += n as u64;
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
        let cfg = VmConfig {
            mem_bytes: 4 << 20,
            vcpus: 2,
            working_set_bytes: 16 << 12,
            disk_sectors: 64,
            disk_working_set: 10,
            ..VmConfig::default()
        };
        let w = Workload::new(&cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        DiskImage::create_sparse(&path, 64 * 512).unwrap();
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
                offset: 0
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
}
