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
