//! `vmm-demo`: run a guest whose RAM proves, page by page, that nothing was lost, and
//! live-migrate it between two processes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm_demo::cli::{self, RunArgs};
use vmm_demo::commands::{self, DemoArgs, DestinationArgs, MigrateArgs};

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
    /// when verified, 2 when the oracle failed.
    Run(RunArgs),
    /// Wait for one incoming migration, check the guest before running it (oracle and RAM
    /// hash against the source's), run it for a while, check again and report. Exits with
    /// 0 when verified, 1 otherwise.
    Destination(DestinationArgs),
    /// Ask a running `vmm-demo run --control unix:PATH` to migrate its guest to a
    /// destination. Exits with 0 when the destination runs the guest, 1 otherwise (the
    /// guest then runs on the source).
    Migrate(MigrateArgs),
    /// Start a source and a destination as two processes on this host, migrate the guest
    /// from one to the other, verify it and print a summary.
    Demo(DemoArgs),
}

fn print_json(v: &impl serde::Serialize, what: &str) -> bool {
    match serde_json::to_string(v) {
        Ok(j) => {
            println!("{j}");
            true
        }
        Err(e) => {
            eprintln!("vmm-demo {what}: encoding the report: {e}");
            false
        }
    }
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
        Command::Run(args) => match cli::run(&args) {
            Ok(report) => {
                if args.json {
                    if !print_json(&report, "run") {
                        return ExitCode::FAILURE;
                    }
                } else {
                    println!("{report}");
                    if let Some(m) = &report.migration {
                        println!(
                            "migrated to {}: the guest runs there; this copy stayed paused ({:.0} ms, downtime {:.1} ms)",
                            m.to, m.total_ms, m.downtime_ms
                        );
                    }
                }
                if report.verified {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                }
            }
            Err(e) => {
                eprintln!("vmm-demo run: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Destination(args) => {
            let report = commands::destination_command(&args);
            if args.json {
                print_json(&report, "destination");
            } else {
                match &report.error {
                    None => println!(
                        "destination: {} guest verified at switchover (oracle{}) and after running: passes {:?} -> {:?}",
                        report.guest.as_deref().unwrap_or("?"),
                        if report.hash_checked {
                            " and RAM hash"
                        } else {
                            ""
                        },
                        report.passes_at_switchover,
                        report.passes_at_end
                    ),
                    Some(e) => println!(
                        "destination: {}: {e}",
                        if report.ran_guest {
                            "NOT verified"
                        } else {
                            "migration refused, the guest was not run here"
                        }
                    ),
                }
            }
            if let Some(e) = &report.error {
                eprintln!("vmm-demo destination: {e}");
            }
            if report.verified {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Migrate(args) => match commands::migrate_command(&args) {
            Ok(v) => {
                if args.json {
                    println!("{v}");
                } else {
                    println!(
                        "migrated to {}: {:.0} ms, downtime {:.1} ms, {} bytes on the wire, {} passes",
                        args.to,
                        v["total_ms"].as_f64().unwrap_or(0.0),
                        v["downtime_ms"].as_f64().unwrap_or(0.0),
                        v["bytes_on_wire"],
                        v["iterations"]
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                if args.json {
                    println!("{}", serde_json::json!({"error": e}));
                }
                eprintln!("vmm-demo migrate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => match commands::demo_command(&args) {
            Ok(v) => {
                if args.json {
                    println!("{v}");
                } else {
                    println!("{}", commands::demo_summary(&v));
                }
                if v["verified"].as_bool() == Some(true) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                if args.json {
                    println!("{}", serde_json::json!({"error": e, "verified": false}));
                }
                eprintln!("vmm-demo demo: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
