//! `keel`: run brokers and local clusters, manage topics, produce, consume, benchmark.
//!
//! Exit status: 0 success, 1 failure (one line on stderr), 2 usage error.

mod bench_cmd;
mod bench_group;
mod broker_cmd;
mod cluster_cmd;
mod common;
mod consume_cmd;
mod fault_disk;
mod group_cmd;
mod output;
mod probe_cmd;
mod produce_cmd;
mod record_format;
mod telemetry;
mod topic_cmd;
mod up_cmd;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use common::{ClientOpts, UsageError};

/// Keel: a distributed, partitioned, replicated commit log.
///
/// Client commands find the cluster through --brokers HOST:PORT[,HOST:PORT...], else the
/// KEEL_BROKERS environment variable, else 127.0.0.1:9292. Exit status: 0 success, 1 failure
/// (one line on stderr says what went wrong), 2 usage error.
#[derive(Debug, Parser)]
#[command(name = "keel", version = VERSION, about, long_about)]
struct Cli {
    /// Also accepted before the command: `keel --brokers H:P topic list`.
    #[arg(long, hide = true, value_name = "HOST:PORT[,HOST:PORT...]", value_parser = common::parse_brokers)]
    brokers: Option<common::Brokers>,
    #[command(subcommand)]
    command: Command,
}

/// A build that can put a broker on the simulated disk says so, so that the fault run's harness
/// can tell it needs another build before starting brokers that would refuse `--fault-fs`.
const VERSION: &str = if cfg!(feature = "fault-fs") {
    concat!(env!("CARGO_PKG_VERSION"), " (fault-fs)")
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one broker in the foreground (SIGTERM/SIGINT stop it gracefully).
    Broker(broker_cmd::BrokerArgs),
    /// Start a local cluster of brokers as child processes.
    Up(up_cmd::UpArgs),
    /// Create, list, describe, alter and delete topics.
    #[command(subcommand)]
    Topic(topic_cmd::TopicCommand),
    /// Show the cluster's brokers and metadata leader.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCommand),
    Produce(produce_cmd::ProduceArgs),
    Consume(consume_cmd::ConsumeArgs),
    /// Inspect and manage consumer groups.
    #[command(subcommand)]
    Group(group_cmd::GroupCommand),
    /// Benchmark producing, consuming, or both end to end.
    Bench(BenchCmd),
    /// Exit 0 if a broker's /readyz (or /healthz) answers 200: for container health checks.
    Probe(probe_cmd::ProbeArgs),
}

#[derive(Debug, clap::Args)]
struct BenchCmd {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: bench_cmd::BenchCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(b) = cli.brokers.clone() {
        if matches!(cli.command, Command::Broker(_) | Command::Up(_)) {
            Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--brokers is for client commands, not `keel broker` or `keel up`",
                )
                .exit();
        }
        common::set_top_level_brokers(b);
    }
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
    // The trace exporter runs on the runtime, so tracing starts inside it.
    let telemetry = {
        let _in_runtime = runtime.enter();
        match &cli.command {
            Command::Broker(args) => {
                let endpoint = telemetry::otlp_endpoint(args.otlp_endpoint.as_deref());
                telemetry::init(
                    args.log_json,
                    "info",
                    endpoint.as_deref().map(|e| (e, "keel-broker")),
                )
            }
            Command::Up(_) => telemetry::init(false, "info", None),
            // Client commands stay quiet unless something deserves a warning (a consumer
            // position reset by retention, say); RUST_LOG turns on more.
            _ => telemetry::init(false, "warn", None),
        }
    };
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("keel: {e:#}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Broker(args) => broker_cmd::run(args).await,
            Command::Up(args) => up_cmd::run(args).await,
            Command::Topic(cmd) => topic_cmd::run(cmd).await,
            Command::Cluster(cmd) => cluster_cmd::run(cmd).await,
            Command::Produce(args) => produce_cmd::run(args).await,
            Command::Consume(args) => consume_cmd::run(args).await,
            Command::Group(cmd) => group_cmd::run(cmd).await,
            Command::Probe(args) => probe_cmd::run(&args),
            Command::Bench(b) => {
                let client = common::connect(&b.client).await?;
                bench_cmd::run(b.command, client).await
            }
        }
    });
    // Before the runtime goes: the exporter flushes on it.
    runtime.block_on(async move { drop(telemetry) });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<UsageError>() {
                Cli::command()
                    .error(clap::error::ErrorKind::ValueValidation, &u.0)
                    .exit();
            }
            // One line, whatever the error chain holds.
            let msg = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("keel: {msg}");
            ExitCode::from(1)
        }
    }
}
