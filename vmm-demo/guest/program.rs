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

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;

use crate::abi::{self, control_block as cb};

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

    // A vCPU with no share (an idle guest) halts for good: with interrupts off, `hlt`
    // waits forever and KVM parks the vCPU thread in the kernel, so the guest takes no CPU.
    a.set_label(&mut entry)?;
    a.cmp(qword_ptr(rsi + cb::SEGMENT_COUNT), 0)?;
    a.jne(pass_loop)?;
    a.set_label(&mut idle)?;
    a.hlt()?;
    a.jmp(idle)?;

    // One pass in address order: every page of every segment in turn. The order is
    // looked at once a pass, so this loop stays what it was before scattered walks.
    a.set_label(&mut pass_loop)?;
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

    let named = [
        ("entry", entry),
        ("idle", idle),
        ("pass_loop", pass_loop),
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
