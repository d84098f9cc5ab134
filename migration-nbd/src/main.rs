//! `migration-nbd`: serve a raw file over NBD, or copy between files and NBD exports.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use migration_nbd::copy::{self, CopyOptions, Endpoint};
use migration_nbd::{Address, ExportConfig, Listener, Server, ServerConfig};

#[derive(Parser)]
#[command(name = "migration-nbd", version, about = "NBD server and copy tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve PATH as an NBD export until killed.
    Serve {
        /// Raw file or block device to export.
        path: PathBuf,
        /// Where to listen: tcp:HOST:PORT or unix:PATH.
        #[arg(long)]
        listen: Address,
        /// Export name ("" is the default export).
        #[arg(long, default_value = "")]
        export: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Bypass the page cache for aligned I/O (O_DIRECT).
        #[arg(long)]
        direct: bool,
        /// More exports from the same server, as NAME=PATH (repeatable).
        #[arg(long = "add-export", value_name = "NAME=PATH")]
        add_export: Vec<String>,
        /// Worker threads per connection (0: run requests on the connection's thread).
        #[arg(long, default_value_t = ServerConfig::default().workers_per_connection)]
        workers: usize,
        /// Payload bytes one connection may hold at once.
        #[arg(long, default_value_t = ServerConfig::default().in_flight_bytes)]
        in_flight_bytes: usize,
        /// Print the bound address (tcp:HOST:PORT or unix:PATH) on stdout once listening,
        /// for scripts that ask for port 0.
        #[arg(long)]
        print_address: bool,
    },
    /// Copy SRC to DST; each is a file or an NBD URI (nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH). Holes stay holes.
    Copy {
        /// Source.
        src: Endpoint,
        /// Destination (a file is created or truncated to the source size).
        dst: Endpoint,
        /// NBD connections per side, when the server offers multi-conn.
        #[arg(long, default_value_t = CopyOptions::default().connections)]
        connections: usize,
        /// Requests in flight per connection.
        #[arg(long, default_value_t = CopyOptions::default().requests)]
        requests: usize,
        /// Bytes per request.
        #[arg(long, default_value_t = CopyOptions::default().request_size)]
        request_size: u32,
        /// The destination already reads as zeroes: do not zero its holes.
        #[arg(long)]
        destination_is_zero: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migration-nbd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Serve {
            path,
            listen,
            export,
            read_only,
            direct,
            add_export,
            workers,
            in_flight_bytes,
            print_address,
        } => {
            let mut exports = vec![ExportConfig {
                read_only,
                direct,
                ..ExportConfig::new(export, path)
            }];
            for spec in add_export {
                let (name, p) = spec
                    .split_once('=')
                    .ok_or_else(|| format!("--add-export {spec:?}: expected NAME=PATH"))?;
                exports.push(ExportConfig {
                    read_only,
                    direct,
                    ..ExportConfig::new(name, p)
                });
            }
            let config = ServerConfig {
                workers_per_connection: workers,
                in_flight_bytes,
                ..ServerConfig::default()
            };
            let server = Server::new(exports, config)?;
            let listener = Listener::bind(&listen)?;
            eprintln!(
                "migration-nbd: serving {} export(s) on {}",
                server.exports().len(),
                listener.local_address()?
            );
            if print_address {
                use std::io::Write;
                let mut out = std::io::stdout();
                writeln!(out, "{}", listener.local_address()?)?;
                out.flush()?;
            }
            server.serve(&listener)?;
            Ok(())
        }
        Command::Copy {
            src,
            dst,
            connections,
            requests,
            request_size,
            destination_is_zero,
        } => {
            let opts = CopyOptions {
                connections,
                requests,
                request_size,
                destination_is_zero,
            };
            let summary = copy::copy(&src, &dst, &opts)?;
            println!("{summary}");
            Ok(())
        }
    }
}
