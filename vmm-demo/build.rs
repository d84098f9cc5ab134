//! Assembles the guest program (`guest/program.rs`) into `$OUT_DIR/guest_program.rs`,
//! which `src/guest.rs` includes: the machine code and the offsets of its labels. A
//! program that does not assemble fails the build, so the VMM never carries one.

use std::fmt::Write as _;
use std::path::PathBuf;

// The VMM's definition of the guest ABI, shared rather than copied; the program reads
// only some of it.
#[allow(dead_code)]
#[path = "src/guest/abi.rs"]
mod abi;
#[path = "guest/program.rs"]
mod program;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=guest/program.rs");
    println!("cargo::rerun-if-changed=src/guest/abi.rs");
    let p = program::assemble()?;
    let mut out = String::new();
    writeln!(
        out,
        "/// The guest program: machine code assembled at build time from `guest/program.rs`."
    )?;
    writeln!(out, "pub const PROGRAM: [u8; {}] = [", p.bytes.len())?;
    for line in p.bytes.chunks(16) {
        let bytes: Vec<String> = line.iter().map(|b| format!("{b:#04x}")).collect();
        writeln!(out, "    {},", bytes.join(", "))?;
    }
    writeln!(out, "];")?;
    writeln!(
        out,
        "/// The program's labels: each name and its offset from the first byte, in program order."
    )?;
    writeln!(
        out,
        "pub const PROGRAM_LABELS: [(&str, u64); {}] = [",
        p.labels.len()
    )?;
    for (name, offset) in &p.labels {
        writeln!(out, "    ({name:?}, {offset:#x}),")?;
    }
    writeln!(out, "];")?;
    let dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    std::fs::write(dir.join("guest_program.rs"), out)?;
    Ok(())
}
