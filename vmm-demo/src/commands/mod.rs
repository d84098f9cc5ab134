//! What each command does, one module per command: [`run`] (and its control socket,
//! [`server`]), [`destination`], [`migrate`] and [`demo`]. The arguments are in
//! [`crate::cli`], the reports in [`crate::report`], the control protocol in
//! [`crate::protocol`].

pub mod demo;
pub mod destination;
pub mod migrate;
mod progress;
pub mod run;
pub mod server;

use crate::cli::GuestChoice;
use crate::error::Error;
use crate::serial::Console;
use crate::vm::{GuestKind, kvm_available};

/// The guest kind `choice` gives on this machine.
pub fn guest_kind(choice: GuestChoice) -> Result<GuestKind, Error> {
    match choice {
        GuestChoice::Auto => Ok(GuestKind::best_available()),
        GuestChoice::Software => Ok(GuestKind::Software),
        GuestChoice::Kvm if kvm_available() => Ok(GuestKind::Kvm),
        GuestChoice::Kvm => Err(Error::KvmUnavailable),
    }
}

/// The guest's disk from the command line: the first `--disk`, if it is an existing file
/// (a raw image; other `--disk`s, and URIs, only feed the storage-policy check). Returns
/// its path with `config` given its size and the disk working set (`working_set`
/// sectors, at most the disk, none for an idle guest).
pub fn guest_disk(
    disks: &[String],
    working_set: u64,
    config: &mut crate::layout::VmConfig,
) -> Result<Option<std::path::PathBuf>, Error> {
    let Some(first) = disks.first() else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(first);
    if !path.is_file() {
        return Ok(None);
    }
    let img = crate::virtio_blk::DiskImage::open(&path).map_err(Error::Disk)?;
    config.disk_sectors = img.sectors();
    config.disk_working_set = if config.working_set_bytes == 0 {
        0
    } else {
        working_set.min(img.sectors())
    };
    Ok(Some(path))
}

/// Where the guest's console goes: nowhere with `quiet`, standard error when standard
/// output carries JSON, else standard output.
fn console(quiet: bool, json: bool) -> Console {
    if quiet {
        Console::Discard
    } else if json {
        Console::Stderr
    } else {
        Console::Stdout
    }
}
