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
    /// Room for the prefix.
    pub const PREFIX_MAX: u64 = 0x28;
    /// The segments: `(start, end)` guest-physical address pairs, 16 bytes each.
    pub const SEGMENTS: u64 = 0x40;
    /// The guest's stack grows down from the end of the page and needs at most 20 pushes.
    pub const STACK_RESERVE: u64 = 0x100;
    /// Most segments a share may have.
    pub const MAX_SEGMENTS: u64 = ((1 << super::PAGE_SHIFT) - STACK_RESERVE - SEGMENTS) / 16;
}
