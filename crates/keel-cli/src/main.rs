//! `keel`: run brokers and local clusters, manage topics, produce, consume, benchmark.
//!
//! Exit status: 0 success, 1 failure (one line on stderr), 2 usage error.

mod bench_cmd;
mod broker_cmd;
mod up_cmd;

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
    /// Run one broker in the foreground (SIGTERM/SIGINT stop it gracefully).
    Broker(broker_cmd::BrokerArgs),
    /// Start a local cluster of brokers as child processes.
    Up(up_cmd::UpArgs),
    /// Benchmark producing, consuming, or both end to end.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Broker(args) => {
                init_tracing(args.log_json);
                broker_cmd::run(args).await
            }
            Command::Up(args) => {
                init_tracing(false);
                up_cmd::run(args).await
            }
            Command::Bench(cmd) => {
                let brokers: Vec<String> = std::env::var("KEEL_BROKERS")
                    .unwrap_or_else(|_| "127.0.0.1:9292".into())
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                let client = keel_client::Client::connect(&brokers).await?;
                bench_cmd::run(cmd, client).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {e:#}");
            ExitCode::from(1)
        }
    }
}
