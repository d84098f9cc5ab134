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

/// Creates the sparse image `args` describe and writes its prefill; returns the bytes
/// prefilled. An image half made is removed.
pub fn make_disk(args: &crate::cli::MakeDiskArgs) -> Result<u64, Error> {
    create_disk(&args.path, args.size, args.prefill, args.seed)
}

/// A new sparse image at `path` of `bytes`, `percent` % prefilled from `seed`
/// ([`crate::disk_oracle::prefill`]); returns the bytes prefilled. Removed again if the
/// prefill fails, so that no half-made image is left to be taken for a whole one.
pub fn create_disk(
    path: &std::path::Path,
    bytes: u64,
    percent: u8,
    seed: u64,
) -> Result<u64, Error> {
    use crate::virtio_blk::DiskImage;
    DiskImage::create_sparse(path, bytes).map_err(Error::Disk)?;
    let filled =
        DiskImage::open(path).and_then(|img| crate::disk_oracle::prefill(&img, percent, seed));
    if filled.is_err() {
        let _ = std::fs::remove_file(path);
    }
    filled.map_err(Error::Disk)
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
