//! The guest's ABI: the numbers the guest program is assembled against, and that the VMM,
//! the software vCPU and the oracle use to build and read what it sees. This file depends
//! on nothing, because the build script, which assembles the program, compiles it too
//! (see `build.rs`): one definition for both sides.

/// The serial port the guest prints on.
pub const SERIAL_PORT: u16 = 0x3f8;

/// log2 of the page size the guest walks by (4 KiB, x86's base page, the size
/// migration-core numbers pages in).
pub const PAGE_SHIFT: u32 = 12;

/// Offset, in every working-set page, of the u64 counter the guest increments.
pub const COUNTER_OFFSET: u64 = 0;

/// Offsets inside a vCPU control block (see `guest/program.rs` for the code that reads it).
pub mod control_block {
    /// u64: passes completed so far.
    pub const PASS: u64 = 0x00;
    /// u64: number of segments of the vCPU's share.
    pub const SEGMENT_COUNT: u64 = 0x08;
    /// u64: length of the report prefix.
    pub const PREFIX_LEN: u64 = 0x10;
    /// The report prefix, `"vcpuN pass "`.
    pub const PREFIX: u64 = 0x18;
    /// Room for the prefix (the longest, `"vcpu63 pass "`, takes 12 bytes).
    pub const PREFIX_MAX: u64 = 0x18;
    /// u64: the stride of a scattered walk, the distance (in pages of the share) from
    /// one page to the next, modulo [`SHARE_PAGES`]; 0 for a walk in address order.
    pub const STRIDE: u64 = 0x30;
    /// u64: pages in the vCPU's share, for a scattered walk (0 in address order, whose
    /// walk goes by the segments alone).
    pub const SHARE_PAGES: u64 = 0x38;
    /// The segments: `(start, end)` guest-physical address pairs, 16 bytes each.
    pub const SEGMENTS: u64 = 0x40;
    /// The guest's stack grows down from the end of the page and needs at most 20 pushes.
    pub const STACK_RESERVE: u64 = 0x100;
    // The fields follow one another without overlapping.
    const _: () = assert!(PREFIX + PREFIX_MAX <= STRIDE && SHARE_PAGES + 8 <= SEGMENTS);

    /// Most segments a share may have.
    pub const MAX_SEGMENTS: u64 = ((1 << super::PAGE_SHIFT) - STACK_RESERVE - SEGMENTS) / 16;
}

/// The guest's virtio-blk driver: where its rings and buffers are and what the VMM tells
/// it (see `guest/program.rs`, and `src/virtio_blk/driver.rs` for the software vCPU's
/// copy). All of it is in the reserved area below the data pages, which the RAM oracle
/// does not judge page by page; a VM without a disk leaves it all zero, and its guest
/// skips the disk workload because its request page says it has no sectors.
pub mod disk {
    /// The interrupt line (GSI) of the device: ISA IRQ 5, free on this machine (the PIT
    /// has 0, the serial port would have 4).
    pub const IRQ: u32 = 5;
    /// Bytes per sector.
    pub const SECTOR_SIZE: u64 = 512;
    /// The driver's shared page: the fields below, then the available ring.
    pub const DRIVER_PAGE: u64 = 0x1_5000;
    /// u64 in the driver page: guest-physical address of the virtio-mmio window (the VMM
    /// writes it; 0 without a disk).
    pub const MMIO_BASE: u64 = 0x00;
    /// u64 in the driver page: the queue lock, 0 free, 1 held. One request is in flight
    /// at a time, by whichever vCPU holds it.
    pub const LOCK: u64 = 0x08;
    /// u64 in the driver page: 1 once a vCPU has set the device up.
    pub const READY: u64 = 0x10;
    /// Offset of the available ring in the driver page.
    pub const AVAIL_RING: u64 = 0x800;
    /// Guest-physical address of the descriptor table.
    pub const DESC_TABLE: u64 = 0x1_6000;
    /// Guest-physical address of the used ring.
    pub const USED_RING: u64 = 0x1_7000;
    /// Entries of the queue the driver sets up (it uses descriptors 0 to 2 only).
    pub const QUEUE_SIZE: u64 = 8;
    /// vCPU 0's request page; vCPU `i`'s is one page further per `i`, at the same distance
    /// from its control block for every vCPU.
    pub const REQUEST_BASE: u64 = 0x6_0000;
    /// From a vCPU's control block to its request page, the same for every vCPU (the
    /// guest finds its page by adding this to `rsi`).
    pub const REQUEST_DISTANCE: u64 = 0x4_0000;
    /// u64 in a request page: the first sector of the vCPU's share (the VMM writes it).
    pub const FIRST_SECTOR: u64 = 0x00;
    /// u64 in a request page: sectors in the share; 0 for no disk workload.
    pub const SECTOR_COUNT: u64 = 0x08;
    /// u64 in a request page: the vCPU's index, which it writes into its sectors.
    pub const VCPU: u64 = 0x10;
    /// The request header `{ le32 type; le32 reserved; le64 sector }` in a request page.
    pub const HEADER: u64 = 0x100;
    /// The status byte in a request page.
    pub const STATUS: u64 = 0x180;
    /// The sector to write, in a request page.
    pub const WRITE_BUF: u64 = 0x200;
    /// The sector read back, in a request page.
    pub const READ_BUF: u64 = 0x400;
    /// The last u64 of a sector the guest writes: "demodisk", so that a sector holding
    /// anything else is told apart from one of the workload's.
    pub const MAGIC: u64 = u64::from_le_bytes(*b"demodisk");
    /// Offsets of the u64 words of a written sector: the pass, the vCPU, the sector's own
    /// number, the magic; the rest of the sector is zero.
    pub const WORD_PASS: u64 = 0;
    /// See [`WORD_PASS`].
    pub const WORD_VCPU: u64 = 8;
    /// See [`WORD_PASS`].
    pub const WORD_SECTOR: u64 = 16;
    /// See [`WORD_PASS`].
    pub const WORD_MAGIC: u64 = 24;
    // The request page's fields and buffers do not overlap, and it fits a page.
    const _: () = assert!(VCPU + 8 <= HEADER && HEADER + 16 <= STATUS && STATUS < WRITE_BUF);
    const _: () = assert!(WRITE_BUF + SECTOR_SIZE <= READ_BUF && READ_BUF + SECTOR_SIZE <= 0x1000);
    const _: () = assert!(AVAIL_RING + 6 + 2 * QUEUE_SIZE <= 0x1000);
}
