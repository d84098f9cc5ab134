//! Where everything lives in guest-physical memory, and what the workload is.
//!
//! ```text
//! 0x0000_0000  (unused, so that a null pointer faults nowhere useful)
//! 0x0000_1000  GDT: null, 64-bit code, data, TSS descriptors
//! 0x0000_2000  PML4
//! 0x0000_3000  PDPT
//! 0x0000_4000  page directories, one per GiB mapped (2 MiB pages), up to 16 GiB
//! 0x0001_4000  the guest program (one page)
//! 0x0002_0000  one control block page per vCPU (pass counter, segments, stack), up to 64
//! 0x0010_0000  data pages: the working set first, then pages that keep their initial content
//! ```
//!
//! RAM may be split into several regions with a hole between them (as real machines have
//! around the PCI hole), so that page numbering, memory slots and a vCPU's share that
//! straddles two regions are all exercised. Everything below [`DATA_START`] is the
//! *reserved* area the VMM builds; everything above is *data*, whose content the oracle
//! knows exactly.

use std::ops::Range;

use migration_core::PAGE_SIZE;
use migration_core::layout::{LayoutError, RamLayout};
use serde::{Deserialize, Serialize};

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the PML4 (CR3).
pub const PML4_ADDR: u64 = 0x2000;
/// Guest-physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0x3000;
/// Guest-physical address of the first page directory.
pub const PD_ADDR: u64 = 0x4000;
/// Guest-physical memory the identity map covers: the end of RAM must lie below.
pub const MAX_GUEST_PHYS: u64 = 16 << 30;
/// Guest-physical address of the guest program.
pub const CODE_ADDR: u64 = 0x1_4000;
/// Guest-physical address of vCPU 0's control block; vCPU `i`'s is one page further per `i`.
pub const CONTROL_BASE: u64 = 0x2_0000;
/// Most vCPUs a VM may have (their control blocks must fit below [`DATA_START`]).
pub const MAX_VCPUS: u32 = 64;
/// First guest-physical address of data pages.
pub const DATA_START: u64 = 0x10_0000;
/// Guest-physical hole left between two RAM regions.
pub const REGION_GAP: u64 = 2 << 20;
/// Most RAM regions a VM may have.
pub const MAX_REGIONS: u32 = 8;

pub use crate::guest::abi::{COUNTER_OFFSET, control_block, disk};

// The disk driver's pages lie in the reserved area, clear of the program, the control
// blocks and the data pages.
const _: () = assert!(CODE_ADDR + PAGE_SIZE <= disk::DRIVER_PAGE);
const _: () = assert!(disk::DESC_TABLE >= disk::DRIVER_PAGE + PAGE_SIZE);
const _: () = assert!(disk::USED_RING >= disk::DESC_TABLE + PAGE_SIZE);
const _: () = assert!(disk::USED_RING + PAGE_SIZE <= CONTROL_BASE);
const _: () = assert!(CONTROL_BASE + MAX_VCPUS as u64 * PAGE_SIZE <= disk::REQUEST_BASE);
const _: () = assert!(disk::REQUEST_BASE + MAX_VCPUS as u64 * PAGE_SIZE <= DATA_START);

const _: () = assert!(disk::REQUEST_BASE - CONTROL_BASE == disk::REQUEST_DISTANCE);

/// Guest-physical address of vCPU `index`'s disk request page.
pub fn request_page_addr(index: u32) -> u64 {
    disk::REQUEST_BASE + u64::from(index) * PAGE_SIZE
}

/// Bytes of guest-physical address space the virtio-mmio window takes.
pub const MMIO_WINDOW: u64 = 0x1000;

// The guest walks by the page size migration-core numbers pages in.
const _: () = assert!(1u64 << crate::guest::abi::PAGE_SHIFT == PAGE_SIZE);

/// Guest-physical address of vCPU `index`'s control block.
pub fn control_block_addr(index: u32) -> u64 {
    CONTROL_BASE + u64::from(index) * PAGE_SIZE
}

/// What data pages hold before the guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// All zero: RAM a migration can send as zero pages (counters aside).
    Zero,
    /// Pseudo-random from the seed and the address: RAM no compressor can shrink.
    Random,
}

/// In which order each vCPU visits the pages of its share, once per pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// In address order, segment by segment: neighbours one after the other, what a
    /// dirty-page tracker and a prefetcher handle best.
    #[default]
    Sequential,
    /// A fixed pseudo-random permutation of the share's pages, the same every pass (see
    /// [`scatter_stride`]): consecutive visits land far apart, so that after a post-copy
    /// switch almost every visit faults on a page the destination does not hold yet.
    Scattered,
}

impl Order {
    /// `"sequential"` or `"scattered"`, the name `--order` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Sequential => "sequential",
            Order::Scattered => "scattered",
        }
    }
}

impl std::fmt::Display for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stride of a scattered walk over a share of `pages` pages: the walk's `i`-th visit
/// is page `(i * stride) mod pages` of the share (numbered in address order). The stride
/// is coprime with `pages`, so the walk is a permutation: it visits every page once and
/// is back at page 0 after exactly `pages` visits, which is how the guest knows a pass is
/// over. It is the first such number from `pages / φ` (φ the golden ratio) up: steps of
/// about 0.62 of the share put each visit far from the last ones and spread the visits of
/// a pass as evenly as any stride can (the three-distance theorem). 0 for no pages.
pub fn scatter_stride(pages: u64) -> u64 {
    if pages <= 1 {
        return pages;
    }
    // 2^64 / φ: the fraction of `pages` taken, in 64-bit fixed point.
    const INV_PHI: u128 = 0x9e37_79b9_7f4a_7c15;
    // Below `pages` (the fraction is below 1) and at least 1 (pages / φ >= 1.2).
    let mut s = ((u128::from(pages) * INV_PHI) >> 64) as u64;
    // pages - 1 is coprime with pages: the search ends there at the latest.
    while gcd(s, pages) != 1 {
        s += 1;
    }
    s
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The shape of the VM and of its workload. Source and destination of a migration must
/// agree on it; the `machine` device-state blob carries it so the destination can check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Bytes of guest RAM, a multiple of 2 MiB per region.
    pub mem_bytes: u64,
    /// Number of RAM regions, each its own memory slot, with a hole between two.
    pub ram_regions: u32,
    /// Number of vCPUs, each walking its own share of the working set.
    pub vcpus: u32,
    /// Bytes of the working set the vCPUs keep dirtying, a multiple of the page size; 0 for
    /// an idle guest, whose vCPUs halt.
    pub working_set_bytes: u64,
    /// Initial content of data pages.
    pub fill: Fill,
    /// Seed of the pseudo-random content.
    pub seed: u64,
    /// Order of each pass over a vCPU's share (sequential when a description leaves it
    /// out, as those from before scattered walks do).
    #[serde(default)]
    pub order: Order,
    /// Sectors (512 bytes) of the VM's virtio-blk disk; 0 for a VM without a disk (as
    /// descriptions from before the disk leave it).
    #[serde(default)]
    pub disk_sectors: u64,
    /// Sectors the vCPUs write every pass, split among them as the RAM working set is;
    /// the first ones of the disk. 0: the guest does no disk I/O.
    #[serde(default)]
    pub disk_working_set: u64,
    /// Percentage of the disk outside its working set that holds a seeded pattern from
    /// the start (see `disk_oracle::prefill`), the rest zero; 0 for a disk that starts
    /// zero (as descriptions from before the fill leave it).
    #[serde(default)]
    pub disk_prefill_percent: u8,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_bytes: 64 << 20,
            ram_regions: 1,
            vcpus: 1,
            working_set_bytes: 4 << 20,
            fill: Fill::Random,
            seed: 0x5eed_0f0a_c1e5,
            order: Order::Sequential,
            disk_sectors: 0,
            disk_working_set: 0,
            disk_prefill_percent: 0,
        }
    }
}

/// A [`VmConfig`] that cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("{0} vCPUs: a VM has 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    /// Region count out of range.
    #[error("{0} RAM regions: a VM has 1 to {MAX_REGIONS}")]
    Regions(u32),
    /// RAM does not split into 2 MiB-aligned regions.
    #[error(
        "{mem_bytes} bytes of RAM do not split into {regions} regions of a whole number of 2 MiB"
    )]
    RamSplit {
        /// Requested RAM.
        mem_bytes: u64,
        /// Requested regions.
        regions: u32,
    },
    /// RAM too small for the reserved area plus one data page per vCPU.
    #[error("the first RAM region of {0} bytes leaves no data pages above {DATA_START:#x}")]
    TooSmall(u64),
    /// RAM ends above what the identity map covers.
    #[error("RAM would end at {0:#x}, above the {MAX_GUEST_PHYS:#x} the page tables map")]
    TooLarge(u64),
    /// Working set not page aligned, smaller than one page per vCPU (but for none at all,
    /// an idle guest), or larger than the data pages.
    #[error(
        "working set of {bytes} bytes: it must be a multiple of {PAGE_SIZE}, 0 (an idle guest) or at least one page per vCPU, and at most the {data_bytes} bytes of data pages"
    )]
    WorkingSet {
        /// Requested working set.
        bytes: u64,
        /// Bytes of data pages available.
        data_bytes: u64,
    },
    /// A share would cross more region boundaries than a control block has room for.
    #[error("vCPU {0}'s share needs more segments than its control block holds")]
    Segments(u32),
    /// The disk's prefilled share is not a percentage.
    #[error("a disk prefill of {0} %: it is 0 to 100")]
    DiskPrefill(u8),
    /// The disk working set does not fit the disk or the vCPUs.
    #[error(
        "disk working set of {sectors} sectors on a disk of {disk_sectors}: it must be 0 or at least one sector per vCPU, at most the disk, and needs a disk and a RAM working set"
    )]
    DiskWorkingSet {
        /// Requested sectors.
        sectors: u64,
        /// Sectors of the disk.
        disk_sectors: u64,
    },
    /// The virtio-mmio window would lie beyond what the identity map covers.
    #[error(
        "the disk's MMIO window at {0:#x} lies above the {MAX_GUEST_PHYS:#x} the page tables map"
    )]
    MmioTooHigh(u64),
    /// The resulting RAM layout is invalid.
    #[error("RAM layout: {0}")]
    Layout(#[from] LayoutError),
}

/// The validated layout of a VM built from a [`VmConfig`]: RAM regions, each vCPU's share
/// of the working set, and the initial content of every data page. Everything the oracle
/// needs to judge guest RAM, on either side of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    config: VmConfig,
    ram: RamLayout,
    regions: Vec<(u64, u64)>,
    first_data_page: usize,
    working_set: Range<usize>,
    shares: Vec<Range<usize>>,
    segments: Vec<Vec<(u64, u64)>>,
    strides: Vec<u64>,
    disk_shares: Vec<Range<u64>>,
    mmio_base: Option<u64>,
}

impl Workload {
    /// Validates `config` and lays the VM out.
    pub fn new(config: &VmConfig) -> Result<Workload, ConfigError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(config.vcpus));
        }
        if config.ram_regions == 0 || config.ram_regions > MAX_REGIONS {
            return Err(ConfigError::Regions(config.ram_regions));
        }
        let n = u64::from(config.ram_regions);
        let two_mib = 2u64 << 20;
        if config.mem_bytes == 0 || config.mem_bytes % (n * two_mib) != 0 {
            return Err(ConfigError::RamSplit {
                mem_bytes: config.mem_bytes,
                regions: config.ram_regions,
            });
        }
        let region_size = config.mem_bytes / n;
        if region_size <= DATA_START {
            return Err(ConfigError::TooSmall(region_size));
        }
        let regions: Vec<(u64, u64)> = (0..n)
            .map(|k| (k * (region_size + REGION_GAP), region_size))
            .collect();
        let end = regions.last().map(|&(b, s)| b + s).unwrap_or(0);
        if end > MAX_GUEST_PHYS {
            return Err(ConfigError::TooLarge(end));
        }
        let ram = RamLayout::new(PAGE_SIZE, &regions)?;
        let first_data_page = (DATA_START / PAGE_SIZE) as usize;
        let data_pages = ram.page_count() - first_data_page;
        let ws = config.working_set_bytes;
        let ws_pages = (ws / PAGE_SIZE) as usize;
        // No working set is an idle guest: every vCPU halts. Otherwise each vCPU walks a
        // share of at least one page.
        if ws % PAGE_SIZE != 0
            || ws_pages > data_pages
            || (ws_pages != 0 && ws_pages < config.vcpus as usize)
        {
            return Err(ConfigError::WorkingSet {
                bytes: ws,
                data_bytes: data_pages as u64 * PAGE_SIZE,
            });
        }
        let working_set = first_data_page..first_data_page + ws_pages;
        let vcpus = config.vcpus as usize;
        let (per, extra) = (ws_pages / vcpus, ws_pages % vcpus);
        let mut shares = Vec::with_capacity(vcpus);
        let mut segments = Vec::with_capacity(vcpus);
        let mut strides = Vec::with_capacity(vcpus);
        let mut start = working_set.start;
        for i in 0..vcpus {
            let len = per + usize::from(i < extra);
            let share = start..start + len;
            start += len;
            let segs: Vec<(u64, u64)> = ram
                .split_at_regions(share.clone())
                .map(|(gpa, pages)| (gpa, gpa + pages.len() as u64 * PAGE_SIZE))
                .collect();
            if segs.len() as u64 > control_block::MAX_SEGMENTS {
                return Err(ConfigError::Segments(i as u32));
            }
            strides.push(match config.order {
                Order::Sequential => 0,
                Order::Scattered => scatter_stride(len as u64),
            });
            shares.push(share);
            segments.push(segs);
        }
        // The disk's working set: sectors from 0, split as the pages are. It needs pages to
        // walk too (an idle guest's vCPUs halt before any disk I/O).
        let dws = config.disk_working_set;
        if dws > config.disk_sectors
            || (dws != 0 && (dws < u64::from(config.vcpus) || ws_pages == 0))
        {
            return Err(ConfigError::DiskWorkingSet {
                sectors: dws,
                disk_sectors: config.disk_sectors,
            });
        }
        if config.disk_prefill_percent > 100 {
            return Err(ConfigError::DiskPrefill(config.disk_prefill_percent));
        }
        let (dper, dextra) = (dws / n_vcpus(config), dws % n_vcpus(config));
        let mut disk_shares = Vec::with_capacity(vcpus);
        let mut first = 0u64;
        for i in 0..config.vcpus {
            let len = dper + u64::from(u64::from(i) < dextra);
            disk_shares.push(first..first + len);
            first += len;
        }
        // The MMIO window sits one hole above the last region, 2 MiB aligned like it.
        let mmio_base = if config.disk_sectors == 0 {
            None
        } else {
            let base = end + REGION_GAP;
            if base + MMIO_WINDOW > MAX_GUEST_PHYS {
                return Err(ConfigError::MmioTooHigh(base));
            }
            Some(base)
        };
        Ok(Workload {
            config: config.clone(),
            ram,
            regions,
            first_data_page,
            working_set,
            shares,
            segments,
            strides,
            disk_shares,
            mmio_base,
        })
    }

    /// Guest-physical address of the virtio-mmio window of the disk, if the VM has one.
    pub fn mmio_base(&self) -> Option<u64> {
        self.mmio_base
    }

    /// The end of what the identity map must cover: RAM and the MMIO window.
    pub fn mapped_end(&self) -> u64 {
        let ram_end = self.regions.last().map(|&(b, s)| b + s).unwrap_or(0);
        self.mmio_base.map_or(ram_end, |m| m + MMIO_WINDOW)
    }

    /// The sectors vCPU `index` writes every pass (empty without a disk workload).
    pub fn disk_share(&self, index: u32) -> Range<u64> {
        self.disk_shares[index as usize].clone()
    }

    /// All sectors the vCPUs write.
    pub fn disk_working_set(&self) -> Range<u64> {
        0..self.config.disk_working_set
    }

    /// The configuration this layout was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Page geometry of guest RAM.
    pub fn ram(&self) -> &RamLayout {
        &self.ram
    }

    /// RAM regions as `(guest base, size)`, ascending.
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.config.vcpus
    }

    /// Dense page index of the first data page.
    pub fn first_data_page(&self) -> usize {
        self.first_data_page
    }

    /// Dense page indices of the working set.
    pub fn working_set(&self) -> Range<usize> {
        self.working_set.clone()
    }

    /// Dense page indices of vCPU `index`'s share, in address order.
    pub fn share(&self, index: u32) -> Range<usize> {
        self.shares[index as usize].clone()
    }

    /// vCPU `index`'s share as guest-physical `(start, end)` segments, one per region it
    /// touches, in address order.
    pub fn segments(&self, index: u32) -> &[(u64, u64)] {
        &self.segments[index as usize]
    }

    /// The order of every vCPU's walk.
    pub fn order(&self) -> Order {
        self.config.order
    }

    /// The stride of vCPU `index`'s scattered walk ([`scatter_stride`] of its share), as
    /// its control block holds it: 0 in sequential order or for an empty share.
    pub fn stride(&self, index: u32) -> u64 {
        self.strides[index as usize]
    }

    /// The guest-physical address of page `n` of vCPU `index`'s share, counted in address
    /// order, if the share has that many pages.
    pub fn share_page(&self, index: u32, n: u64) -> Option<u64> {
        let share = self.share(index);
        let page = share.start.checked_add(usize::try_from(n).ok()?)?;
        if page >= share.end {
            return None;
        }
        self.ram.page_to_gpa(page)
    }

    /// The guest-physical addresses of vCPU `index`'s pages in the order one pass visits
    /// them: address order, or the scattered permutation.
    pub fn walk(&self, index: u32) -> impl Iterator<Item = u64> + '_ {
        let pages = self.share(index).len() as u64;
        let stride = self.stride(index);
        (0..pages).filter_map(move |i| {
            let n = match self.config.order {
                Order::Sequential => i,
                // Below 2^64 · 2^64: no overflow in u128, and the result is below `pages`.
                Order::Scattered => (u128::from(i) * u128::from(stride) % u128::from(pages)) as u64,
            };
            self.share_page(index, n)
        })
    }

    /// The prefix vCPU `index` prints before its pass number.
    pub fn report_prefix(index: u32) -> String {
        format!("vcpu{index} pass ")
    }

    /// Fills `buf` (one page) with the initial content of the data page at `gpa`,
    /// counter included (zero in working-set pages).
    pub fn initial_page(&self, gpa: u64, buf: &mut [u8]) {
        fill_page(self.config.fill, self.config.seed, gpa, buf);
        let in_ws = self
            .ram
            .gpa_to_page(gpa)
            .is_some_and(|p| self.working_set.contains(&p));
        if in_ws {
            let off = COUNTER_OFFSET as usize;
            buf[off..off + 8].fill(0);
        }
    }
}

fn n_vcpus(c: &VmConfig) -> u64 {
    u64::from(c.vcpus.max(1))
}

/// SplitMix64: a fast, well-mixed function of its input, enough to make RAM that no
/// compressor shrinks and that the oracle can regenerate anywhere.
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the content `fill` gives the bytes starting at guest-physical `gpa`
/// (8-byte aligned; `buf`'s length a multiple of 8).
pub fn fill_page(fill: Fill, seed: u64, gpa: u64, buf: &mut [u8]) {
    match fill {
        Fill::Zero => buf.fill(0),
        Fill::Random => {
            for (i, word) in buf.chunks_exact_mut(8).enumerate() {
                let v = splitmix64(seed ^ (gpa + 8 * i as u64));
                word.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_lays_out() {
        let w = Workload::new(&VmConfig::default()).unwrap();
        assert_eq!(w.ram().ram_bytes(), 64 << 20);
        assert_eq!(w.working_set().len(), 1024);
        assert_eq!(w.segments(0), &[(DATA_START, DATA_START + (4 << 20))]);
    }

    #[test]
    fn shares_split_at_region_holes() {
        let cfg = VmConfig {
            mem_bytes: 8 << 20,
            ram_regions: 2,
            vcpus: 3,
            working_set_bytes: 5 << 20,
            ..VmConfig::default()
        };
        let w = Workload::new(&cfg).unwrap();
        assert_eq!(w.regions(), &[(0, 4 << 20), ((6 << 20), 4 << 20)]);
        let total: usize = (0..3).map(|i| w.share(i).len()).sum();
        assert_eq!(total, 1280);
        // The share running from 2.7 MiB over the 4 MiB boundary has two segments.
        let crossing = (0..3).find(|&i| w.segments(i).len() == 2).unwrap();
        let segs = w.segments(crossing);
        assert_eq!(segs[0].1, 4 << 20);
        assert_eq!(segs[1].0, 6 << 20);
        let pages: u64 = segs.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum();
        assert_eq!(pages as usize, w.share(crossing).len());
    }

    #[test]
    fn no_working_set_is_an_idle_guest_with_no_segments() {
        let w = Workload::new(&VmConfig {
            working_set_bytes: 0,
            vcpus: 2,
            ..VmConfig::default()
        })
        .unwrap();
        assert!(w.working_set().is_empty());
        for v in 0..2 {
            assert!(w.share(v).is_empty());
            assert!(w.segments(v).is_empty());
        }
        // One page for two vCPUs is still refused: one would have nothing to walk.
        assert!(
            Workload::new(&VmConfig {
                working_set_bytes: PAGE_SIZE,
                vcpus: 2,
                ..VmConfig::default()
            })
            .is_err()
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let base = VmConfig::default();
        let bad = [
            VmConfig {
                vcpus: 0,
                ..base.clone()
            },
            VmConfig {
                mem_bytes: 3 << 20,
                ..base.clone()
            },
            VmConfig {
                mem_bytes: 1 << 20,
                ram_regions: 1,
                ..base.clone()
            },
            VmConfig {
                working_set_bytes: 100,
                ..base.clone()
            },
            VmConfig {
                working_set_bytes: 64 << 20,
                ..base.clone()
            },
            VmConfig {
                mem_bytes: 32 << 30,
                ..base.clone()
            },
        ];
        for cfg in bad {
            assert!(Workload::new(&cfg).is_err(), "{cfg:?} accepted");
        }
    }

    #[test]
    fn scattered_walks_are_permutations_of_every_share_size() {
        assert_eq!(scatter_stride(0), 0);
        for n in 1..=4096u64 {
            let s = scatter_stride(n);
            assert_eq!(gcd(s, n), 1, "{n} pages, stride {s}");
            assert!(s >= 1 && (s < n || n == 1), "{n} pages, stride {s}");
            // Far from address order once a share has a few pages: about n / φ.
            if n >= 16 {
                assert!(n / 2 < s && s < 3 * n / 4, "{n} pages, stride {s}");
            }
            // The recurrence the guest program and the software vCPU step by (the next
            // index one stride on, modulo n; the pass over when it is back at 0) gives
            // the closed form the oracle uses, and visits every page once.
            let mut seen = vec![false; n as usize];
            let mut next = 0u64;
            for i in 0..n {
                assert_eq!(next, i * s % n, "{n} pages, step {i}");
                assert!(!seen[next as usize], "{n} pages: page {next} twice");
                seen[next as usize] = true;
                next += s;
                if next >= n {
                    next -= n;
                }
                assert_eq!(next == 0, i == n - 1, "{n} pages: back at 0 after step {i}");
            }
        }
    }

    #[test]
    fn a_scattered_workload_walks_every_page_of_each_share_once() {
        let cfg = VmConfig {
            mem_bytes: 8 << 20,
            ram_regions: 2,
            vcpus: 3,
            working_set_bytes: 5 << 20,
            order: Order::Scattered,
            ..VmConfig::default()
        };
        let w = Workload::new(&cfg).unwrap();
        let sequential = Workload::new(&VmConfig {
            order: Order::Sequential,
            ..cfg
        })
        .unwrap();
        for v in 0..3 {
            let share = w.share(v);
            let mut walk: Vec<u64> = w.walk(v).collect();
            assert_eq!(walk.len(), share.len());
            // It starts where address order does, then strays far from it.
            assert_eq!(walk[0], w.segments(v)[0].0);
            assert_eq!(
                walk[1],
                w.share_page(v, w.stride(v)).unwrap(),
                "vCPU {v}'s second page is one stride on"
            );
            assert_ne!(walk, sequential.walk(v).collect::<Vec<_>>());
            walk.sort_unstable();
            let pages: Vec<u64> = share
                .clone()
                .map(|p| w.ram().page_to_gpa(p).unwrap())
                .collect();
            assert_eq!(walk, pages, "vCPU {v}");
            assert_eq!(w.share_page(v, share.len() as u64), None);
            assert_eq!(sequential.stride(v), 0);
        }
        // Idle: no share, no stride.
        let idle = Workload::new(&VmConfig {
            working_set_bytes: 0,
            ..cfg
        })
        .unwrap();
        assert_eq!(idle.stride(0), 0);
        assert_eq!(idle.walk(0).count(), 0);
    }

    #[test]
    fn every_report_prefix_fits_its_room() {
        let longest = Workload::report_prefix(MAX_VCPUS - 1);
        assert!(
            longest.len() as u64 <= control_block::PREFIX_MAX,
            "{longest:?}"
        );
    }

    #[test]
    fn random_fill_is_deterministic_and_address_dependent() {
        let mut a = [0u8; PAGE_SIZE as usize];
        let mut b = [0u8; PAGE_SIZE as usize];
        fill_page(Fill::Random, 1, 0x20_0000, &mut a);
        fill_page(Fill::Random, 1, 0x20_0000, &mut b);
        assert_eq!(a, b);
        fill_page(Fill::Random, 1, 0x20_1000, &mut b);
        assert_ne!(a, b);
        fill_page(Fill::Zero, 1, 0x20_0000, &mut b);
        assert!(b.iter().all(|&x| x == 0));
    }
}
