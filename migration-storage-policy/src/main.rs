//! `migration-storage-policy`: is this disk setup safe to live-migrate, and why.
//!
//! Exit status of `check`: 0 safe (or safe in practice), 1 unsafe, 2 bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use migration_storage_policy::{
    CacheMode, DiskSpec, Error, ImageFormat, NfsExport, Plan, RuleId, StorageKind, check_plan,
};

#[derive(Parser)]
#[command(
    name = "migration-storage-policy",
    version,
    about = "Decides whether a VM's disks are safe to live-migrate, and explains why"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check one disk (flags) or a whole VM (--plan). Exit 0 safe, 1 unsafe, 2 bad input.
    Check(CheckArgs),
    /// List every rule with its source and reasoning.
    Rules {
        /// Print the rules as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct CheckArgs {
    /// Image path, block device or QEMU URI (rbd:, nbd://, iscsi://, gluster://); what is
    /// not given is detected from it.
    #[arg(long, value_name = "PATH")]
    path: Option<String>,
    /// Storage kind (overrides detection).
    #[arg(long, value_enum, value_name = "KIND")]
    storage: Option<StorageKind>,
    /// Cache mode; QEMU's default is writeback.
    #[arg(long, value_enum, value_name = "MODE")]
    cache: Option<CacheMode>,
    /// Image format: raw, qcow2 or qed (overrides header detection).
    #[arg(long, value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// How the NFS server exports it (assumed sync, the Linux default).
    #[arg(long, value_enum, value_name = "sync|async")]
    nfs_export: Option<NfsExport>,
    /// The image will be resized online during the migration.
    #[arg(long)]
    online_resize: bool,
    /// The guest only reads the disk.
    #[arg(long)]
    read_only: bool,
    /// Other guests write the disk too.
    #[arg(long)]
    shareable: bool,
    /// The disk is copied to the destination (storage migration over NBD).
    #[arg(long)]
    copy_storage: bool,
    /// The disk's name in the report.
    #[arg(long, default_value = "disk0")]
    name: String,
    /// A TOML plan with several disks and the two hosts, instead of the disk flags.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["path", "storage", "cache", "format", "nfs_export", "online_resize", "read_only", "shareable", "copy_storage", "name"]
    )]
    plan: Option<PathBuf>,
    /// Source and destination run on this same host (two processes of one machine): a
    /// local file is then the same file for both. Adds to a plan's `same_host`.
    #[arg(long)]
    same_host: bool,
    /// Print one JSON object instead of the explanation.
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> Result<ImageFormat, String> {
    s.parse::<ImageFormat>().map_err(|e| e.to_string())
}

const EXIT_UNSAFE: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

fn bad_input(e: &Error, json: bool) -> ExitCode {
    if json {
        println!("{}", serde_json::json!({ "error": e.to_string() }));
    }
    eprintln!("migration-storage-policy: {e}");
    ExitCode::from(EXIT_BAD_INPUT)
}

fn check(args: CheckArgs) -> ExitCode {
    let mut plan = match &args.plan {
        Some(file) => match Plan::from_file(file) {
            Ok(p) => p,
            Err(e) => return bad_input(&e, args.json),
        },
        None => Plan::single(DiskSpec {
            name: args.name.clone(),
            path: args.path.clone(),
            storage: args.storage,
            cache: args.cache,
            format: args.format,
            nfs_export: args.nfs_export,
            online_resize: args.online_resize,
            read_only: args.read_only,
            shareable: args.shareable,
            copied: args.copy_storage,
            ..DiskSpec::default()
        }),
    };
    plan.same_host |= args.same_host;
    let report = match check_plan(&plan) {
        Ok(r) => r,
        Err(e) => return bad_input(&e, args.json),
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("migration-storage-policy: cannot encode the report: {e}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    } else {
        print!("{report}");
    }
    if report.is_safe() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNSAFE)
    }
}

fn rules(json: bool) -> ExitCode {
    if json {
        let all: Vec<_> = RuleId::ALL.iter().map(|r| r.info()).collect();
        match serde_json::to_string_pretty(&all) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("migration-storage-policy: {e}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    } else {
        for r in RuleId::ALL {
            let i = r.info();
            println!("{}: {}", r, i.title);
            println!("  source: {}", i.source);
            println!("  why: {}", i.reasoning);
            println!();
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    // clap exits with 2 on a usage error (unknown kind, bad flag) and 0 for --help.
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(args),
        Command::Rules { json } => rules(json),
    }
}
