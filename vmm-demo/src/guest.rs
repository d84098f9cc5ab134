//! The guest: a 64-bit program assembled at build time from readable source, and the RAM
//! image the VMM builds around it (GDT, identity-mapped page tables, control blocks,
//! initial data).
//!
//! The program's source is `guest/program.rs` (assembly written with iced-x86's code
//! assembler, which `build.rs` runs); the numbers it shares with the VMM are in [`abi`].
//! Each vCPU enters [`PROGRAM`] in long mode with `rsi` pointing at its control block
//! (see [`layout::control_block`]) and `rsp` at the end of that page, interrupts off. It
//! then walks its share of the working set forever: one `add qword [page], 1` per page,
//! in address order or in the scattered order of [`layout::Order`] (its control block
//! says which), and after each full pass it increments its pass counter and prints
//! `"vcpuN pass <decimal>\n"` on the serial port 0x3f8, one `out` per byte. A vCPU with no
//! share (an idle guest: no working set) halts instead, for good: with interrupts off,
//! `hlt` waits forever, and KVM parks the vCPU thread in the kernel, so an idle guest takes
//! no CPU (as an idle guest of QEMU's migration tests, halted, does not).
//!
//! The software vCPU ([`crate::software`]) does the same thing step for step from Rust.

use migration_core::PAGE_SIZE;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{self, PDPT_ADDR, PML4_ADDR, Workload, control_block as cb};

pub mod abi;

/// Guest RAM as the VMM maps it: `vm-memory`'s mmap with a dirty bitmap, so that the
/// pages the VMM itself writes (the virtio-blk device completing a request: the used ring,
/// a read's data, the status byte) are known to a migration; KVM's dirty log sees only
/// what the guest writes through its page tables.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub use abi::SERIAL_PORT;

include!(concat!(env!("OUT_DIR"), "/guest_program.rs"));

// The program has one page, below the control blocks.
const _: () = assert!(PROGRAM.len() as u64 <= PAGE_SIZE);
const _: () = assert!(layout::CODE_ADDR + PAGE_SIZE <= layout::CONTROL_BASE);

/// The offset of the program's label `name` from its first byte.
pub fn label(name: &str) -> Option<u64> {
    PROGRAM_LABELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, offset)| offset)
}

/// GDT selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// GDT selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// GDT selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x18;

/// Packs a GDT descriptor from its base, limit (20 bits) and the 12 bits of flags and
/// access byte (`0xa09b` for 64-bit code: G, L, present, code exec/read accessed).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
}

/// The GDT: null, code, data, TSS.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, DPL 0
    gdt_entry(0xc093, 0, 0xfffff), // data, read/write
    gdt_entry(0x808b, 0, 0xfffff), // busy 64-bit TSS (VMX wants a usable TR)
];

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// Accessed: the CPU sets it.
    pub const A: u64 = 1 << 5;
    /// Dirty: the CPU sets it on leaf entries.
    pub const D: u64 = 1 << 6;
    /// Leaf: a 2 MiB page in a page directory.
    pub const PS: u64 = 1 << 7;
}

/// Number of page directories (GiB of identity map) a layout needs.
pub fn page_directories(w: &Workload) -> u64 {
    w.mapped_end().div_ceil(1 << 30).max(1)
}

/// The page-table entries the VMM writes: `(guest-physical address of the entry, value)`.
/// The guest's page walks may later set the accessed and dirty bits, nothing else.
pub fn page_table_entries(w: &Workload) -> Vec<(u64, u64)> {
    let pds = page_directories(w);
    let mut out = Vec::with_capacity(1 + pds as usize * 513);
    out.push((PML4_ADDR, PDPT_ADDR | pte::P | pte::RW));
    for g in 0..pds {
        let pd = layout::PD_ADDR + g * PAGE_SIZE;
        out.push((PDPT_ADDR + 8 * g, pd | pte::P | pte::RW));
        for j in 0..512u64 {
            let addr = (g << 30) | (j << 21);
            out.push((pd + 8 * j, addr | pte::P | pte::RW | pte::PS));
        }
    }
    out
}

/// The fixed part of vCPU `index`'s control block, from its first byte to its last
/// segment, with the pass counter at zero: segments, report prefix and, for a scattered
/// walk, its stride and the share's page count. The stack at the end of the page is not
/// in it.
pub fn control_block_config(w: &Workload, index: u32) -> Vec<u8> {
    let segs = w.segments(index);
    let prefix = Workload::report_prefix(index);
    let mut b = vec![0u8; (cb::SEGMENTS as usize) + 16 * segs.len()];
    let put = |b: &mut [u8], off: u64, v: u64| {
        b[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes())
    };
    put(&mut b, cb::SEGMENT_COUNT, segs.len() as u64);
    put(&mut b, cb::PREFIX_LEN, prefix.len() as u64);
    // Left 0 in address order, so that a sequential VM's RAM image is what it always was.
    let stride = w.stride(index);
    if stride != 0 {
        put(&mut b, cb::STRIDE, stride);
        put(&mut b, cb::SHARE_PAGES, w.share(index).len() as u64);
    }
    b[cb::PREFIX as usize..cb::PREFIX as usize + prefix.len()].copy_from_slice(prefix.as_bytes());
    for (i, &(s, e)) in segs.iter().enumerate() {
        put(&mut b, cb::SEGMENTS + 16 * i as u64, s);
        put(&mut b, cb::SEGMENTS + 16 * i as u64 + 8, e);
    }
    b
}

/// The words the VMM writes for the guest's disk driver, as `(guest-physical address,
/// value)`: the MMIO window's address in the driver page and, in each request page of a
/// vCPU with sectors, its first sector, sector count and index. Empty without a disk
/// workload (the reserved area is then all zero, as it always was).
pub fn disk_config_words(w: &Workload) -> Vec<(u64, u64)> {
    use abi::disk;
    let mut out = Vec::new();
    if let Some(base) = w.mmio_base() {
        out.push((disk::DRIVER_PAGE + disk::MMIO_BASE, base));
    }
    for i in 0..w.vcpus() {
        let share = w.disk_share(i);
        if share.is_empty() {
            continue;
        }
        let page = layout::request_page_addr(i);
        out.push((page + disk::FIRST_SECTOR, share.start));
        out.push((page + disk::SECTOR_COUNT, share.end - share.start));
        out.push((page + disk::VCPU, u64::from(i)));
    }
    out
}

/// Writes the whole initial RAM image: GDT, page tables, program, control blocks (pass 0),
/// the disk driver's configuration and the initial content of every data page.
pub fn write_image(mem: &GuestMemory, w: &Workload) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + 8 * i as u64))?;
    }
    for (addr, v) in page_table_entries(w) {
        mem.write_obj(v, GuestAddress(addr))?;
    }
    mem.write_slice(&PROGRAM, GuestAddress(layout::CODE_ADDR))?;
    for i in 0..w.vcpus() {
        let base = layout::control_block_addr(i);
        mem.write_slice(&control_block_config(w, i), GuestAddress(base))?;
    }
    for (addr, v) in disk_config_words(w) {
        mem.write_obj(v, GuestAddress(addr))?;
    }
    if w.config().fill == layout::Fill::Zero {
        // Fresh anonymous memory is already zero, and so are the counters: leaving it
        // untouched keeps it unallocated.
        return Ok(());
    }
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for (idx, gpa) in w.ram().pages() {
        if idx < w.first_data_page() {
            continue;
        }
        w.initial_page(gpa, &mut page);
        mem.write_slice(&page, GuestAddress(gpa))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_usual_encodings() {
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[3], 0x008f_8b00_0000_ffff);
    }

    /// Two stretches of the listing the program was hand-assembled from before it had a
    /// source (Intel syntax, checked with GNU as and objdump), each with jumps inside it
    /// only: the walk in address order and the pass report. The assembled program must
    /// hold them unchanged, so a sequential walk is what it always was.
    #[rustfmt::skip]
    const WALK_IN_ADDRESS_ORDER: [u8; 40] = [
        0x48, 0x8d, 0x5e, 0x40,                   // lea  rbx, [rsi+0x40]
        0x48, 0x8b, 0x4e, 0x08,                   // mov  rcx, [rsi+0x08]
        0x48, 0x8b, 0x3b,                         // mov  rdi, [rbx]
        0x48, 0x8b, 0x53, 0x08,                   // mov  rdx, [rbx+8]
        0x48, 0x83, 0x07, 0x01,                   // add  qword [rdi], 1
        0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add  rdi, 0x1000
        0x48, 0x39, 0xd7,                         // cmp  rdi, rdx
        0x72, 0xf0,                               // jb   page_loop
        0x48, 0x83, 0xc3, 0x10,                   // add  rbx, 16
        0x48, 0xff, 0xc9,                         // dec  rcx
        0x75, 0xe0,                               // jnz  seg_loop
    ];
    #[rustfmt::skip]
    const PASS_REPORT: [u8; 68] = [
        0x48, 0xff, 0x06,                         // inc  qword [rsi]
        0x48, 0x8d, 0x5e, 0x18,                   // lea  rbx, [rsi+0x18]
        0x48, 0x8b, 0x4e, 0x10,                   // mov  rcx, [rsi+0x10]
        0x66, 0xba, 0xf8, 0x03,                   // mov  dx, 0x3f8
        0x8a, 0x03,                               // mov  al, [rbx]
        0xee,                                     // out  dx, al
        0x48, 0xff, 0xc3,                         // inc  rbx
        0x48, 0xff, 0xc9,                         // dec  rcx
        0x75, 0xf5,                               // jnz  prefix_loop
        0x48, 0x8b, 0x06,                         // mov  rax, [rsi]
        0xb9, 0x0a, 0x00, 0x00, 0x00,             // mov  ecx, 10
        0x45, 0x31, 0xc0,                         // xor  r8d, r8d
        0x31, 0xd2,                               // xor  edx, edx
        0x48, 0xf7, 0xf1,                         // div  rcx
        0x80, 0xc2, 0x30,                         // add  dl, '0'
        0x52,                                     // push rdx
        0x49, 0xff, 0xc0,                         // inc  r8
        0x48, 0x85, 0xc0,                         // test rax, rax
        0x75, 0xef,                               // jnz  div_loop
        0x66, 0xba, 0xf8, 0x03,                   // mov  dx, 0x3f8
        0x58,                                     // pop  rax
        0xee,                                     // out  dx, al
        0x49, 0xff, 0xc8,                         // dec  r8
        0x75, 0xf9,                               // jnz  digit_loop
        0xb0, 0x0a,                               // mov  al, '\n'
        0xee,                                     // out  dx, al
    ];

    fn at(name: &str) -> usize {
        label(name).unwrap_or_else(|| panic!("no label {name}")) as usize
    }

    #[test]
    fn the_walk_in_address_order_and_the_report_are_the_hand_assembled_ones() {
        let walk = at("in_address_order");
        assert_eq!(PROGRAM[walk..walk + 40], WALK_IN_ADDRESS_ORDER);
        assert_eq!(at("report"), walk + 40, "the report follows the walk");
        let report = at("report");
        assert_eq!(PROGRAM[report..report + 68], PASS_REPORT);
        // The entry is the same too: an idle vCPU halts at once.
        assert_eq!(
            PROGRAM[..10],
            [0x48, 0x83, 0x7e, 0x08, 0x00, 0x75, 0x03, 0xf4, 0xeb, 0xfd]
        );
        assert_eq!(at("idle"), 7);
    }

    #[test]
    fn the_program_starts_at_its_entry_and_its_labels_are_in_it_in_order() {
        assert_eq!(at("entry"), 0);
        let offsets: Vec<u64> = PROGRAM_LABELS.iter().map(|&(_, o)| o).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{PROGRAM_LABELS:?}"
        );
        assert!(offsets.iter().all(|&o| o < PROGRAM.len() as u64));
        assert_eq!(label("nowhere"), None);
    }
}
