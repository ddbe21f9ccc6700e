//! `keel`: the operator's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keel: a distributed, partitioned, replicated commit log.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local cluster of brokers as child processes.
    Up {
        /// Number of brokers.
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// Data directory; each broker uses a subdirectory.
        #[arg(long, default_value = "./.keel-data")]
        data_dir: std::path::PathBuf,
        /// gRPC port of broker 1; broker i listens on base+i-1 and serves metrics on base+100+i-1.
        #[arg(long, default_value_t = 9292)]
        base_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Up { .. } => {
            eprintln!("keel up: not yet available: the broker lands with the [broker] issue");
            ExitCode::from(1)
        }
    }
}
