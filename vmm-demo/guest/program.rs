//! The guest program, written as Intel-syntax assembly with iced-x86's code assembler.
//!
//! `build.rs` assembles it when vmm-demo is built and hands the bytes and the offsets of
//! the labels to `src/guest.rs`; nothing here is compiled into the VMM itself. The
//! numbers it is assembled against (control-block offsets, page size, serial port) come
//! from `src/guest/abi.rs`, the same file the VMM, the software vCPU and the oracle use.
//!
//! Each vCPU enters at `entry` in long mode with `rsi` at its control block and `rsp` at
//! the end of that page, interrupts off. It uses rax, rbx, rcx, rdx, rdi, r8 and the
//! stack, nothing else (the state tests rely on r9-r15 keeping what was loaded).
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
    let mut seg_loop = a.create_label();
    let mut page_loop = a.create_label();
    let mut prefix_loop = a.create_label();
    let mut div_loop = a.create_label();
    let mut digit_loop = a.create_label();

    // A vCPU with no share (an idle guest) halts for good: with interrupts off, `hlt`
    // waits forever and KVM parks the vCPU thread in the kernel, so the guest takes no CPU.
    a.set_label(&mut entry)?;
    a.cmp(qword_ptr(rsi + cb::SEGMENT_COUNT), 0)?;
    a.jne(pass_loop)?;
    a.set_label(&mut idle)?;
    a.hlt()?;
    a.jmp(idle)?;

    // One pass: every page of every segment, in address order.
    a.set_label(&mut pass_loop)?;
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

    let named = [
        ("entry", entry),
        ("idle", idle),
        ("pass_loop", pass_loop),
        ("seg_loop", seg_loop),
        ("page_loop", page_loop),
        ("prefix_loop", prefix_loop),
        ("div_loop", div_loop),
        ("digit_loop", digit_loop),
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
