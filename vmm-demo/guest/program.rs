//! The guest program, written as Intel-syntax assembly with iced-x86's code assembler.
//!
//! `build.rs` assembles it when vmm-demo is built and hands the bytes and the offsets of
//! the labels to `src/guest.rs`; nothing here is compiled into the VMM itself. The
//! numbers it is assembled against (control-block offsets, page size, serial port) come
//! from `src/guest/abi.rs`, the same file the VMM, the software vCPU and the oracle use.
//!
//! Each vCPU enters at `entry` in long mode with `rsi` at its control block and `rsp` at
//! the end of that page, interrupts off. It uses rax, rbx, rcx, rdx, rbp, rdi, r8 and
//! the stack, nothing else (the state tests rely on r9-r15 keeping what was loaded).
//!
//! A pass visits every page of the vCPU's share once, in one of two orders, which the
//! control block says: in address order, segment by segment (`STRIDE` 0), or scattered:
//! the `i`-th page visited is page `(i * STRIDE) mod SHARE_PAGES` of the share (pages
//! numbered in address order across its segments), the stride being coprime with the
//! page count so that this visits each page once. The walk keeps the next page in r8
//! (as its offset in the share, in bytes) and steps it by the stride, modulo the share's
//! size, so the pass is over when it comes back to 0.
//! The code uses relative jumps only, so it runs wherever it is loaded.
//!
//! With a disk (the vCPU's request page gives it sectors, see `abi::disk`), each pass
//! starts with the disk workload: the vCPU writes the pass it is making into every sector
//! of its share, one virtio-blk request per sector, then reads back its last and first
//! sector and checks them. Its driver is small: one queue of 8 entries, one request in
//! flight at a time across the vCPUs (whoever holds the lock in the driver page owns the
//! three descriptors), completion seen by polling the used ring, after which the vCPU
//! reads InterruptStatus and acknowledges the interrupt the device raised (interrupts
//! are off, so it is never delivered; acknowledging it is what proves the device's
//! interrupt path ran). Whichever vCPU first takes the lock sets the device up: the
//! virtio-mmio magic, version and device id, VIRTIO_F_VERSION_1 and no other feature,
//! the queue. Anything wrong (no device, a status byte other than OK, no interrupt, a
//! sector read back with another content) prints `vcpuN disk error: ...` and halts the
//! vCPU for good.

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;

use crate::abi::{self, control_block as cb, disk};

// virtio-mmio registers (virtio 1.x, section 4.2.2) and status bits the driver uses.
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;
const S_ACKNOWLEDGE: i32 = 1;
const S_DRIVER: i32 = 2;
const S_DRIVER_OK: i32 = 4;
const S_FEATURES_OK: i32 = 8;
const T_IN: i32 = 0;
const T_OUT: i32 = 1;

/// What a vCPU prints (after `"vcpuN "`) when its disk workload fails, before it halts.
pub const MSG_NO_DEVICE: &[u8] = b"disk error: no virtio-blk device as expected\n";
/// See [`MSG_NO_DEVICE`].
pub const MSG_IO_ERROR: &[u8] = b"disk error: a request failed\n";
/// See [`MSG_NO_DEVICE`].
pub const MSG_NO_INTERRUPT: &[u8] = b"disk error: a request completed without an interrupt\n";
/// See [`MSG_NO_DEVICE`].
pub const MSG_BAD_SECTOR: &[u8] =
    b"disk error: a sector read back does not hold what was written\n";

/// The assembled program.
pub struct Program {
    /// Machine code, to be loaded at `layout::CODE_ADDR`.
    pub bytes: Vec<u8>,
    /// Each label's name and offset from the first byte, in program order.
    pub labels: Vec<(&'static str, u64)>,
}

/// Assembles the guest program.
pub fn assemble() -> Result<Program, IcedError> {
    let page = 1i32 << abi::PAGE_SHIFT;
    let port = i32::from(abi::SERIAL_PORT);
    let mut a = CodeAssembler::new(64)?;
    let mut entry = a.create_label();
    let mut idle = a.create_label();
    let mut pass_loop = a.create_label();
    let mut in_address_order = a.create_label();
    let mut seg_loop = a.create_label();
    let mut page_loop = a.create_label();
    let mut prefix_loop = a.create_label();
    let mut div_loop = a.create_label();
    let mut digit_loop = a.create_label();
    let mut report = a.create_label();
    let mut scatter_pass = a.create_label();
    let mut one_segment = a.create_label();
    let mut many_segments = a.create_label();
    let mut find_segment = a.create_label();
    let mut in_segment = a.create_label();
    let mut walk = a.create_label();
    let mut disk_pass = a.create_label();
    let mut write_loop = a.create_label();
    let mut read_back = a.create_label();
    let mut do_request = a.create_label();
    let mut take_lock = a.create_label();
    let mut locked = a.create_label();
    let mut set_up = a.create_label();
    let mut out_request = a.create_label();
    let mut data_flags = a.create_label();
    let mut wait_used = a.create_label();
    let mut completed = a.create_label();
    let mut no_device = a.create_label();
    let mut io_error = a.create_label();
    let mut no_interrupt = a.create_label();
    let mut bad_sector = a.create_label();
    let mut disk_fail = a.create_label();
    let mut fail_prefix = a.create_label();
    let mut fail_message = a.create_label();
    let mut halt = a.create_label();
    let mut msg_no_device = a.create_label();
    let mut msg_io_error = a.create_label();
    let mut msg_no_interrupt = a.create_label();
    let mut msg_bad_sector = a.create_label();

    // A vCPU with no share (an idle guest) halts for good: with interrupts off, `hlt`
    // waits forever and KVM parks the vCPU thread in the kernel, so the guest takes no CPU.
    a.set_label(&mut entry)?;
    a.cmp(qword_ptr(rsi + cb::SEGMENT_COUNT), 0)?;
    a.jne(pass_loop)?;
    a.set_label(&mut idle)?;
    a.hlt()?;
    a.jmp(idle)?;

    // A pass begins with the disk workload, if the vCPU has sectors (rbp: its request
    // page, which the disk code keeps).
    a.set_label(&mut pass_loop)?;
    a.lea(rbp, ptr(rsi + disk::REQUEST_DISTANCE))?;
    a.cmp(qword_ptr(rbp + disk::SECTOR_COUNT), 0)?;
    a.je(walk)?;
    a.call(disk_pass)?;

    // One pass in address order: every page of every segment in turn. The order is
    // looked at once a pass, so this loop stays what it was before scattered walks.
    a.set_label(&mut walk)?;
    a.cmp(qword_ptr(rsi + cb::STRIDE), 0)?;
    a.jne(scatter_pass)?;
    a.set_label(&mut in_address_order)?;
    a.lea(rbx, ptr(rsi + cb::SEGMENTS))?; // the first segment
    a.mov(rcx, qword_ptr(rsi + cb::SEGMENT_COUNT))?;
    a.set_label(&mut seg_loop)?;
    a.mov(rdi, qword_ptr(rbx))?; // segment start
    a.mov(rdx, qword_ptr(rbx + 8))?; // segment end
    a.set_label(&mut page_loop)?;
    a.add(qword_ptr(rdi + abi::COUNTER_OFFSET), 1)?; // the page's counter
    a.add(rdi, page)?;
    a.cmp(rdi, rdx)?;
    a.jb(page_loop)?;
    a.add(rbx, 16)?; // the next segment
    a.dec(rcx)?;
    a.jnz(seg_loop)?;

    // The pass is done: count it, then print "<prefix><pass>\n", one `out` per byte.
    a.set_label(&mut report)?;
    a.inc(qword_ptr(rsi + cb::PASS))?;
    a.lea(rbx, ptr(rsi + cb::PREFIX))?;
    a.mov(rcx, qword_ptr(rsi + cb::PREFIX_LEN))?;
    a.mov(dx, port)?;
    a.set_label(&mut prefix_loop)?;
    a.mov(al, byte_ptr(rbx))?;
    a.out(dx, al)?;
    a.inc(rbx)?;
    a.dec(rcx)?;
    a.jnz(prefix_loop)?;
    // The pass number in decimal: digits pushed last first, then popped and printed.
    a.mov(rax, qword_ptr(rsi + cb::PASS))?;
    a.mov(ecx, 10)?;
    a.xor(r8d, r8d)?; // digit count
    a.set_label(&mut div_loop)?;
    a.xor(edx, edx)?;
    a.div(rcx)?; // rax = quotient, rdx = remainder
    a.add(dl, i32::from(b'0'))?;
    a.push(rdx)?;
    a.inc(r8)?;
    a.test(rax, rax)?;
    a.jnz(div_loop)?;
    a.mov(dx, port)?;
    a.set_label(&mut digit_loop)?;
    a.pop(rax)?;
    a.out(dx, al)?;
    a.dec(r8)?;
    a.jnz(digit_loop)?;
    a.mov(al, i32::from(b'\n'))?;
    a.out(dx, al)?;
    a.jmp(pass_loop)?;

    // One scattered pass. r8 is the offset of the next page in the share, in bytes,
    // as if its segments were laid end to end; rbp the stride and rdx the share's size,
    // both in bytes too. Under nested virtualisation every guest instruction costs
    // about as much as a memory access, so the loops are kept short: one for a share in
    // one segment (almost all of them), where the page is the segment's start plus the
    // offset, and one that looks the page up among the segments each time.
    a.set_label(&mut scatter_pass)?;
    a.mov(rbp, qword_ptr(rsi + cb::STRIDE))?;
    a.shl(rbp, abi::PAGE_SHIFT)?;
    a.mov(rdx, qword_ptr(rsi + cb::SHARE_PAGES))?;
    a.shl(rdx, abi::PAGE_SHIFT)?;
    a.xor(r8d, r8d)?;
    a.cmp(qword_ptr(rsi + cb::SEGMENT_COUNT), 1)?;
    a.jne(many_segments)?;
    a.mov(rcx, qword_ptr(rsi + cb::SEGMENTS))?; // the only segment's start
    a.set_label(&mut one_segment)?;
    a.add(qword_ptr(rcx + r8 + abi::COUNTER_OFFSET), 1)?; // the page's counter
    // The next offset: one stride on, modulo the share's size (both below it, so one
    // subtraction brings the sum back). Only a wrap can bring it back to 0, the first
    // page, and then every page was visited once.
    a.add(r8, rbp)?;
    a.cmp(r8, rdx)?;
    a.jb(one_segment)?;
    a.sub(r8, rdx)?;
    a.jnz(one_segment)?;
    a.jmp(report)?;

    a.set_label(&mut many_segments)?;
    a.lea(rbx, ptr(rsi + cb::SEGMENTS))?;
    a.mov(rax, r8)?; // the offset within the segment looked at
    a.set_label(&mut find_segment)?;
    a.mov(rdi, qword_ptr(rbx))?;
    a.add(rdi, rax)?; // the page, if it is in this segment
    a.cmp(rdi, qword_ptr(rbx + 8))?;
    a.jb(in_segment)?;
    a.sub(rax, qword_ptr(rbx + 8))?; // past it: the segment's length off the offset
    a.add(rax, qword_ptr(rbx))?;
    a.add(rbx, 16)?;
    a.jmp(find_segment)?;
    a.set_label(&mut in_segment)?;
    a.add(qword_ptr(rdi + abi::COUNTER_OFFSET), 1)?;
    a.add(r8, rbp)?; // the next offset, as above
    a.cmp(r8, rdx)?;
    a.jb(many_segments)?;
    a.sub(r8, rdx)?;
    a.jnz(many_segments)?;
    a.jmp(report)?;

    // ---- The disk workload (rbp: the request page). ----
    // Every sector of the share gets {pass being made, vCPU, its own number, MAGIC} in
    // its first 32 bytes (the rest of the write buffer is zero, as the VMM left it).
    a.set_label(&mut disk_pass)?;
    a.mov(r8, qword_ptr(rbp + disk::FIRST_SECTOR))?;
    a.set_label(&mut write_loop)?;
    a.lea(rdi, ptr(rbp + disk::WRITE_BUF))?;
    a.mov(rax, qword_ptr(rsi + cb::PASS))?;
    a.inc(rax)?; // the pass being made
    a.mov(qword_ptr(rdi + disk::WORD_PASS), rax)?;
    a.mov(rax, qword_ptr(rbp + disk::VCPU))?;
    a.mov(qword_ptr(rdi + disk::WORD_VCPU), rax)?;
    a.mov(qword_ptr(rdi + disk::WORD_SECTOR), r8)?;
    a.mov(rax, disk::MAGIC)?;
    a.mov(qword_ptr(rdi + disk::WORD_MAGIC), rax)?;
    a.mov(eax, T_OUT)?;
    a.call(do_request)?;
    a.inc(r8)?;
    a.mov(rax, qword_ptr(rbp + disk::FIRST_SECTOR))?;
    a.add(rax, qword_ptr(rbp + disk::SECTOR_COUNT))?;
    a.cmp(r8, rax)?;
    a.jb(write_loop)?;
    // Read back the last sector written and the first.
    a.dec(r8)?;
    a.call(read_back)?;
    a.mov(r8, qword_ptr(rbp + disk::FIRST_SECTOR))?;
    a.call(read_back)?;
    a.ret()?;

    // Reads sector r8 into the read buffer and checks it holds what this pass wrote.
    a.set_label(&mut read_back)?;
    a.lea(rdi, ptr(rbp + disk::READ_BUF))?;
    a.mov(eax, T_IN)?;
    a.call(do_request)?;
    a.mov(rax, qword_ptr(rsi + cb::PASS))?;
    a.inc(rax)?;
    a.cmp(qword_ptr(rdi + disk::WORD_PASS), rax)?;
    a.jne(bad_sector)?;
    a.mov(rax, qword_ptr(rbp + disk::VCPU))?;
    a.cmp(qword_ptr(rdi + disk::WORD_VCPU), rax)?;
    a.jne(bad_sector)?;
    a.cmp(qword_ptr(rdi + disk::WORD_SECTOR), r8)?;
    a.jne(bad_sector)?;
    a.mov(rax, disk::MAGIC)?;
    a.cmp(qword_ptr(rdi + disk::WORD_MAGIC), rax)?;
    a.jne(bad_sector)?;
    a.ret()?;

    // One request: type in eax, one sector at rdi, sector number in r8. Returns once the
    // device completed it with status OK. Keeps rsi, rbp, rdi and r8; uses rax, rbx, rcx,
    // rdx.
    a.set_label(&mut do_request)?;
    a.mov(dword_ptr(rbp + disk::HEADER), eax)?; // type
    a.mov(dword_ptr(rbp + disk::HEADER + 4), 0)?; // reserved
    a.mov(qword_ptr(rbp + disk::HEADER + 8), r8)?; // sector
    a.mov(byte_ptr(rbp + disk::STATUS), 0xff)?; // so that a status never written shows
    a.mov(ecx, eax)?;
    a.mov(rbx, disk::DRIVER_PAGE)?;
    // The queue lock: xchg with memory is atomic; spin politely while another vCPU has it.
    a.set_label(&mut take_lock)?;
    a.mov(eax, 1)?;
    a.xchg(qword_ptr(rbx + disk::LOCK), rax)?;
    a.test(rax, rax)?;
    a.jz(locked)?;
    a.pause()?;
    a.jmp(take_lock)?;
    a.set_label(&mut locked)?;
    a.mov(rdx, qword_ptr(rbx + disk::MMIO_BASE))?;
    a.cmp(qword_ptr(rbx + disk::READY), 0)?;
    a.jne(out_request)?;
    a.call(set_up)?;
    // The chain, descriptors 0 to 2: the header (device-readable), the sector
    // (device-writable for a read), the status byte (device-writable). Each descriptor is
    // {le64 addr; le32 len; le16 flags; le16 next}: flags and next are written as one
    // dword, NEXT = 1, WRITE = 2.
    a.set_label(&mut out_request)?;
    a.push(rbx)?;
    a.mov(rbx, disk::DESC_TABLE)?;
    a.lea(rax, ptr(rbp + disk::HEADER))?;
    a.mov(qword_ptr(rbx), rax)?;
    a.mov(dword_ptr(rbx + 8), 16)?;
    a.mov(dword_ptr(rbx + 12), 0x0001_0001)?; // NEXT, next 1
    a.mov(qword_ptr(rbx + 16), rdi)?;
    a.mov(dword_ptr(rbx + 24), disk::SECTOR_SIZE as i32)?;
    a.mov(eax, 0x0002_0001)?; // NEXT, next 2 ...
    a.cmp(ecx, T_IN)?;
    a.jne(data_flags)?;
    a.or(eax, 2)?; // ... and WRITE for a read
    a.set_label(&mut data_flags)?;
    a.mov(dword_ptr(rbx + 28), eax)?;
    a.lea(rax, ptr(rbp + disk::STATUS))?;
    a.mov(qword_ptr(rbx + 32), rax)?;
    a.mov(dword_ptr(rbx + 40), 1)?;
    a.mov(dword_ptr(rbx + 44), 2)?; // WRITE, no next
    a.pop(rbx)?;
    // Head 0 into the available ring at idx % size, then idx + 1: x86 keeps stores in
    // order, so the device never sees the index before the entry.
    a.movzx(eax, word_ptr(rbx + disk::AVAIL_RING + 2))?;
    a.mov(ecx, eax)?;
    a.and(ecx, (disk::QUEUE_SIZE - 1) as i32)?;
    a.mov(word_ptr(rbx + rcx * 2 + disk::AVAIL_RING + 4), 0)?;
    a.inc(eax)?;
    a.mov(word_ptr(rbx + disk::AVAIL_RING + 2), ax)?;
    a.mov(dword_ptr(rdx + QUEUE_NOTIFY), 0)?; // queue 0
    // Completion: the used ring's index catches up with the available one.
    a.mov(rcx, disk::USED_RING)?;
    a.set_label(&mut wait_used)?;
    a.cmp(word_ptr(rcx + 2), ax)?;
    a.je(completed)?;
    a.pause()?;
    a.jmp(wait_used)?;
    a.set_label(&mut completed)?;
    // The device raised its interrupt before it moved the used ring: acknowledge it.
    a.mov(eax, dword_ptr(rdx + INTERRUPT_STATUS))?;
    a.test(eax, 1)?;
    a.jz(no_interrupt)?;
    a.mov(dword_ptr(rdx + INTERRUPT_ACK), eax)?;
    a.mov(qword_ptr(rbx + disk::LOCK), 0)?;
    a.cmp(byte_ptr(rbp + disk::STATUS), 0)?;
    a.jne(io_error)?;
    a.ret()?;

    // Sets the device up (rbx: the driver page, rdx: the MMIO window; uses eax).
    a.set_label(&mut set_up)?;
    a.cmp(dword_ptr(rdx + MAGIC_VALUE), 0x7472_6976)?; // "virt"
    a.jne(no_device)?;
    a.cmp(dword_ptr(rdx + VERSION), 2)?; // the modern transport
    a.jne(no_device)?;
    a.cmp(dword_ptr(rdx + DEVICE_ID), 2)?; // a block device
    a.jne(no_device)?;
    a.mov(dword_ptr(rdx + STATUS), 0)?; // reset
    a.mov(dword_ptr(rdx + STATUS), S_ACKNOWLEDGE)?;
    a.mov(dword_ptr(rdx + STATUS), S_ACKNOWLEDGE | S_DRIVER)?;
    a.mov(dword_ptr(rdx + DEVICE_FEATURES_SEL), 1)?;
    a.mov(eax, dword_ptr(rdx + DEVICE_FEATURES))?;
    a.test(eax, 1)?; // VIRTIO_F_VERSION_1, feature bit 32
    a.jz(no_device)?;
    a.mov(dword_ptr(rdx + DRIVER_FEATURES_SEL), 1)?;
    a.mov(dword_ptr(rdx + DRIVER_FEATURES), 1)?;
    a.mov(dword_ptr(rdx + DRIVER_FEATURES_SEL), 0)?;
    a.mov(dword_ptr(rdx + DRIVER_FEATURES), 0)?;
    a.mov(
        dword_ptr(rdx + STATUS),
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
    )?;
    a.mov(eax, dword_ptr(rdx + STATUS))?;
    a.test(eax, S_FEATURES_OK)?; // the device accepted the features
    a.jz(no_device)?;
    a.mov(dword_ptr(rdx + QUEUE_SEL), 0)?;
    a.cmp(dword_ptr(rdx + QUEUE_NUM_MAX), disk::QUEUE_SIZE as i32)?;
    a.jb(no_device)?;
    a.mov(dword_ptr(rdx + QUEUE_NUM), disk::QUEUE_SIZE as i32)?;
    a.mov(dword_ptr(rdx + QUEUE_DESC_LOW), disk::DESC_TABLE as i32)?;
    a.mov(dword_ptr(rdx + QUEUE_DESC_HIGH), 0)?;
    a.mov(
        dword_ptr(rdx + QUEUE_AVAIL_LOW),
        (disk::DRIVER_PAGE + disk::AVAIL_RING) as i32,
    )?;
    a.mov(dword_ptr(rdx + QUEUE_AVAIL_HIGH), 0)?;
    a.mov(dword_ptr(rdx + QUEUE_USED_LOW), disk::USED_RING as i32)?;
    a.mov(dword_ptr(rdx + QUEUE_USED_HIGH), 0)?;
    a.mov(dword_ptr(rdx + QUEUE_READY), 1)?;
    a.mov(
        dword_ptr(rdx + STATUS),
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    )?;
    a.mov(qword_ptr(rbx + disk::READY), 1)?;
    a.ret()?;

    // Failures: "vcpuN " (the report prefix without its "pass "), the message, and the
    // vCPU halts for good.
    a.set_label(&mut no_device)?;
    a.lea(rbx, ptr(msg_no_device))?;
    a.mov(ecx, MSG_NO_DEVICE.len() as i32)?;
    a.jmp(disk_fail)?;
    a.set_label(&mut io_error)?;
    a.lea(rbx, ptr(msg_io_error))?;
    a.mov(ecx, MSG_IO_ERROR.len() as i32)?;
    a.jmp(disk_fail)?;
    a.set_label(&mut no_interrupt)?;
    a.lea(rbx, ptr(msg_no_interrupt))?;
    a.mov(ecx, MSG_NO_INTERRUPT.len() as i32)?;
    a.jmp(disk_fail)?;
    a.set_label(&mut bad_sector)?;
    a.lea(rbx, ptr(msg_bad_sector))?;
    a.mov(ecx, MSG_BAD_SECTOR.len() as i32)?;
    a.set_label(&mut disk_fail)?;
    a.push(rbx)?;
    a.push(rcx)?;
    a.lea(rbx, ptr(rsi + cb::PREFIX))?;
    a.mov(rcx, qword_ptr(rsi + cb::PREFIX_LEN))?;
    a.sub(rcx, 5)?; // without "pass "
    a.mov(dx, port)?;
    a.set_label(&mut fail_prefix)?;
    a.mov(al, byte_ptr(rbx))?;
    a.out(dx, al)?;
    a.inc(rbx)?;
    a.dec(rcx)?;
    a.jnz(fail_prefix)?;
    a.pop(rcx)?;
    a.pop(rbx)?;
    a.set_label(&mut fail_message)?;
    a.mov(al, byte_ptr(rbx))?;
    a.out(dx, al)?;
    a.inc(rbx)?;
    a.dec(rcx)?;
    a.jnz(fail_message)?;
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.set_label(&mut msg_no_device)?;
    a.db(MSG_NO_DEVICE)?;
    a.set_label(&mut msg_io_error)?;
    a.db(MSG_IO_ERROR)?;
    a.set_label(&mut msg_no_interrupt)?;
    a.db(MSG_NO_INTERRUPT)?;
    a.set_label(&mut msg_bad_sector)?;
    a.db(MSG_BAD_SECTOR)?;

    let named = [
        ("entry", entry),
        ("idle", idle),
        ("pass_loop", pass_loop),
        ("walk", walk),
        ("in_address_order", in_address_order),
        ("seg_loop", seg_loop),
        ("page_loop", page_loop),
        ("report", report),
        ("prefix_loop", prefix_loop),
        ("div_loop", div_loop),
        ("digit_loop", digit_loop),
        ("scatter_pass", scatter_pass),
        ("one_segment", one_segment),
        ("many_segments", many_segments),
        ("find_segment", find_segment),
        ("in_segment", in_segment),
        ("disk_pass", disk_pass),
        ("write_loop", write_loop),
        ("read_back", read_back),
        ("do_request", do_request),
        ("take_lock", take_lock),
        ("wait_used", wait_used),
        ("set_up", set_up),
        ("disk_fail", disk_fail),
    ];
    // Assembled at 0: label addresses are offsets into the program.
    let r = a.assemble_options(0, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let mut labels = Vec::with_capacity(named.len());
    for (name, l) in named {
        labels.push((name, r.label_ip(&l)?));
    }
    Ok(Program {
        bytes: r.inner.code_buffer,
        labels,
    })
}
