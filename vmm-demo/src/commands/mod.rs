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
