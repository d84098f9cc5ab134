//! `vmm-demo`: run a guest whose RAM proves, page by page, that nothing was lost.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm_demo::cli::{self, RunArgs};

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
    /// Run a guest for a duration or a number of passes, then pause it, run the oracle and
    /// print a summary. Exits with 0 when verified, 2 when the oracle failed.
    Run(RunArgs),
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
                    match serde_json::to_string(&report) {
                        Ok(j) => println!("{j}"),
                        Err(e) => {
                            eprintln!("vmm-demo run: encoding the report: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    println!("{report}");
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
    }
}
