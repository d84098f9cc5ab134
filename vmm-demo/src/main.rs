//! `vmm-demo`: run a guest whose RAM proves, page by page, that nothing was lost, and
//! live-migrate it between two processes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm_demo::cli::{DemoArgs, DestinationArgs, MakeDiskArgs, MigrateArgs, RunArgs};
use vmm_demo::error::{Error, chain};
use vmm_demo::protocol::RunState;
use vmm_demo::{commands, exit};

/// A demo VMM on KVM whose guest is its own oracle.
///
/// The guest walks a working set of pages on each vCPU, adding one to a counter in every
/// page, and prints "vcpuN pass P" on its serial port after each pass. At the end the
/// VMM pauses it and checks that every page holds pass N or N+1 of its vCPU, with a
/// single step between, and that the rest of RAM still holds its initial content.
#[derive(Debug, Parser)]
#[command(name = "vmm-demo", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a guest for a duration or a number of passes (or, with --control, until it is
    /// migrated away), then pause it, run the oracle and print a summary. Exits with 0
    /// when verified, 2 when not (the oracle failed, or a failed migration left the guest
    /// paused), 3 when a post-copy lost the guest with its destination.
    Run(RunArgs),
    /// Wait for one incoming migration (pre-copy, post-copy or hybrid), check the guest
    /// (before running it for a pre-copy: oracle and RAM hash against the source's; once
    /// every page arrived for a post-copy: the oracle), run it for a while, check again
    /// and report. Exits with 0 when verified, 4 when a post-copy lost its source after
    /// the commit (the guest ran here and is paused, incomplete), 1 otherwise.
    Destination(DestinationArgs),
    /// Ask a running `vmm-demo run --control unix:PATH` to migrate its guest to a
    /// destination. Exits with 0 when the destination runs the guest, 3 when the guest is
    /// lost (the destination was lost after a post-copy committed), 1 otherwise (the guest
    /// then runs on the source, unless the error says it was left paused).
    Migrate(MigrateArgs),
    /// Start a source and a destination as two processes on this host, migrate the guest
    /// from one to the other, verify it and print a summary.
    Demo(DemoArgs),
    /// Create a sparse raw image for the guest's disk, optionally with part of it holding
    /// the seeded pattern the disk oracle knows (`--disk-prefill`), and print what it
    /// wrote.
    MakeDisk(MakeDiskArgs),
}

/// Prints `v` as one JSON line; false (and why on standard error) if it cannot be.
fn print_json(v: &impl serde::Serialize, command: &str) -> bool {
    match serde_json::to_string(v) {
        Ok(j) => {
            println!("{j}");
            true
        }
        Err(e) => {
            fail(command, &Error::Json(e));
            false
        }
    }
}

fn fail(command: &str, e: &dyn std::error::Error) {
    eprintln!("vmm-demo {command}: {}", chain(e));
}

/// With `--json`, what a command that failed prints instead of its report.
#[derive(serde::Serialize)]
struct Failed {
    error: String,
    verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_phase: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => match commands::run::run(&args) {
            Ok(report) => {
                if args.json {
                    if !print_json(&report, "run") {
                        return ExitCode::FAILURE;
                    }
                } else {
                    println!("{report}");
                }
                if report.verified {
                    ExitCode::SUCCESS
                } else if matches!(report.status, RunState::Lost { .. }) {
                    ExitCode::from(exit::GUEST_LOST)
                } else {
                    ExitCode::from(exit::NOT_VERIFIED)
                }
            }
            Err(e) => {
                fail("run", &e);
                ExitCode::FAILURE
            }
        },
        Command::Destination(args) => {
            let report = commands::destination::destination(&args);
            if args.json {
                print_json(&report, "destination");
            } else {
                println!("{report}");
            }
            if let Some(e) = &report.error {
                eprintln!("vmm-demo destination: {e}");
            }
            if report.paused_after_commit {
                eprintln!(
                    "vmm-demo destination: the guest ran here after the post-copy commit and is now PAUSED, incomplete: the pages it lacks were only on the source"
                );
            }
            ExitCode::from(commands::destination::exit_status(&report))
        }
        Command::Migrate(args) => match commands::migrate::migrate(&args) {
            Ok(report) => {
                if args.json {
                    if !print_json(&report, "migrate") {
                        return ExitCode::FAILURE;
                    }
                } else {
                    println!("{report}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                let reply = match &e {
                    Error::Control(c) => c.reply(),
                    _ => None,
                };
                let failed_phase = reply.and_then(|r| r.failed_phase.clone());
                if args.json {
                    print_json(
                        &Failed {
                            error: chain(&e),
                            verified: false,
                            failed_phase: failed_phase.clone(),
                        },
                        "migrate",
                    );
                }
                fail("migrate", &e);
                if let Some(phase) = &failed_phase {
                    eprintln!("vmm-demo migrate: failed in phase {phase}");
                }
                let status = reply.and_then(|r| r.status.as_ref());
                match status {
                    Some(RunState::Paused { reason }) => {
                        eprintln!(
                            "vmm-demo migrate: the guest is PAUSED on the source, not running: {reason}"
                        );
                        ExitCode::FAILURE
                    }
                    Some(RunState::Lost { reason }) => {
                        eprintln!(
                            "vmm-demo migrate: the guest is LOST, and did NOT migrate: {reason}"
                        );
                        ExitCode::from(exit::GUEST_LOST)
                    }
                    _ => ExitCode::FAILURE,
                }
            }
        },
        Command::MakeDisk(args) => match commands::make_disk(&args) {
            Ok(written) => {
                println!(
                    "{}: {} bytes, {written} of them prefilled ({} %, seed {:#x})",
                    args.path.display(),
                    args.size,
                    args.prefill,
                    args.seed
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                fail("make-disk", &e);
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => match commands::demo::demo(&args) {
            Ok(report) => {
                if args.json {
                    if !print_json(&report, "demo") {
                        return ExitCode::FAILURE;
                    }
                } else {
                    println!("{report}");
                }
                ExitCode::from(commands::demo::exit_status(&report))
            }
            Err(e) => {
                if args.json {
                    print_json(
                        &Failed {
                            error: chain(&e),
                            verified: false,
                            failed_phase: None,
                        },
                        "demo",
                    );
                }
                fail("demo", &e);
                ExitCode::FAILURE
            }
        },
    }
}
