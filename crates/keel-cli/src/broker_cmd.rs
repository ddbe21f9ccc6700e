//! `keel broker`: one broker in the foreground. Configuration comes from flags, then `KEEL_*`
//! environment variables, then an optional TOML file (`--config`), then defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use keel_broker::{BrokerConfig, start};
use serde::Deserialize;

use crate::fault_disk::FaultDisk;

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Broker id, unique in the cluster (>= 1). [env: KEEL_ID] [toml: id]
    #[arg(long, env = "KEEL_ID")]
    pub id: Option<u32>,
    /// Data directory. [env: KEEL_DATA_DIR] [toml: data_dir]
    #[arg(long, env = "KEEL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:9292]. [env: KEEL_LISTEN] [toml: listen]
    #[arg(long, env = "KEEL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address clients are told to use [default: the listen address]. [env: KEEL_ADVERTISE]
    #[arg(long, env = "KEEL_ADVERTISE")]
    pub advertise: Option<String>,
    /// Prometheus /metrics, /healthz and /readyz [default: 127.0.0.1:9392]. [env: KEEL_METRICS_LISTEN]
    #[arg(long, env = "KEEL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Initial cluster members as 1=ADDR,2=ADDR,3=ADDR: the addresses brokers reach each other
    /// at (clients are sent to each broker's --advertise address, which may differ). [env: KEEL_INITIAL_CLUSTER]
    #[arg(long, env = "KEEL_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Join a running cluster through this broker. [env: KEEL_JOIN]
    #[arg(long, env = "KEEL_JOIN")]
    pub join: Option<String>,
    /// Optional TOML config file with the same keys (snake_case). [env: KEEL_CONFIG]
    #[arg(long, env = "KEEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// How often retention runs, in ms [default: 300000]. [env: KEEL_RETENTION_CHECK_INTERVAL_MS]
    #[arg(long, env = "KEEL_RETENTION_CHECK_INTERVAL_MS")]
    pub retention_check_interval_ms: Option<u64>,
    /// Bytes per second the background scrub reads to check every sealed segment against its
    /// CRCs and repair damage from a replica; 0 turns the background pass off (damage a read
    /// finds is still repaired) [default: 4194304]. [env: KEEL_SCRUB_BYTES_PER_SEC]
    #[arg(long, env = "KEEL_SCRUB_BYTES_PER_SEC")]
    pub scrub_bytes_per_sec: Option<u64>,
    /// How long the committed offsets of a consumer group without members are kept after its
    /// last commit, in ms [default: 604800000, 7 days]. [env: KEEL_OFFSETS_RETENTION_MS]
    #[arg(long, env = "KEEL_OFFSETS_RETENTION_MS")]
    pub offsets_retention_ms: Option<u64>,
    /// A group coordinator writes a compacted image of its offsets partition (and lets the log
    /// before it go) after this many records [default: 50000].
    /// [env: KEEL_OFFSETS_COMPACT_RECORDS]
    #[arg(long, env = "KEEL_OFFSETS_COMPACT_RECORDS")]
    pub offsets_compact_records: Option<u64>,
    /// Export traces (the produce, fetch, admin and group request spans) over OTLP/gRPC to
    /// this collector, e.g. http://127.0.0.1:4317 [default: $OTEL_EXPORTER_OTLP_ENDPOINT, else
    /// off]. KEEL_OTLP_FILTER picks the spans (default keel_broker=debug,keel_raft=info,warn).
    /// [env: KEEL_OTLP_ENDPOINT]
    #[arg(long, env = "KEEL_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log as JSON lines instead of text. [env: KEEL_LOG_JSON]
    #[arg(long, env = "KEEL_LOG_JSON")]
    pub log_json: bool,
    /// For the fault suite only: keep the data on a simulated filesystem that models the disk.
    /// SIGUSR1 is then a power loss (every byte not yet fsynced is lost and the process dies
    /// as with kill -9), and SIGUSR2 switches failing fsyncs on and off. Needs a build with the
    /// `fault-fs` feature.
    #[arg(long, hide = true)]
    pub fault_fs: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u32>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    metrics_listen: Option<SocketAddr>,
    initial_cluster: Option<String>,
    join: Option<String>,
    retention_check_interval_ms: Option<u64>,
    scrub_bytes_per_sec: Option<u64>,
    offsets_retention_ms: Option<u64>,
    offsets_compact_records: Option<u64>,
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// Parses `1=ADDR,2=ADDR`.
pub fn parse_cluster(s: &str) -> Result<Vec<(u32, String)>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (id, addr) = p
                .split_once('=')
                .with_context(|| format!("--initial-cluster entry {p:?} is not ID=ADDR"))?;
            let id: u32 = id
                .trim()
                .parse()
                .with_context(|| format!("--initial-cluster id {id:?} is not a number"))?;
            Ok((id, addr.trim().to_owned()))
        })
        .collect()
}

impl BrokerArgs {
    pub fn resolve(self) -> Result<BrokerConfig> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let id = self
            .id
            .or(file.id)
            .context("--id is required (or KEEL_ID, or `id` in the config file)")?;
        if id == 0 {
            bail!("--id must be at least 1");
        }
        let data_dir = self.data_dir.or(file.data_dir).context(
            "--data-dir is required (or KEEL_DATA_DIR, or `data_dir` in the config file)",
        )?;
        let mut cfg = BrokerConfig::new(id, data_dir);
        if let Some(l) = self.listen.or(file.listen) {
            cfg.listen = l;
        }
        cfg.advertise = self.advertise.or(file.advertise);
        if let Some(m) = self.metrics_listen.or(file.metrics_listen) {
            cfg.metrics_listen = m;
        }
        if let Some(c) = self.initial_cluster.or(file.initial_cluster) {
            cfg.initial_cluster = parse_cluster(&c)?;
        }
        cfg.join = self.join.or(file.join);
        if let Some(ms) = self
            .retention_check_interval_ms
            .or(file.retention_check_interval_ms)
        {
            if ms == 0 {
                bail!("--retention-check-interval-ms must be at least 1");
            }
            cfg.retention_check_interval = Duration::from_millis(ms);
        }
        if let Some(rate) = self.scrub_bytes_per_sec.or(file.scrub_bytes_per_sec) {
            cfg.scrub_bytes_per_sec = rate;
        }
        if let Some(ms) = self.offsets_retention_ms.or(file.offsets_retention_ms) {
            if ms == 0 || ms > i64::MAX as u64 {
                bail!("--offsets-retention-ms must be at least 1");
            }
            cfg.offsets_retention_ms = ms as i64;
        }
        if let Some(n) = self
            .offsets_compact_records
            .or(file.offsets_compact_records)
        {
            if n < 100 {
                bail!("--offsets-compact-records must be at least 100");
            }
            cfg.offsets_compact_records = n;
        }
        Ok(cfg)
    }
}

/// Runs a broker until SIGTERM or SIGINT, then shuts it down gracefully.
pub async fn run(args: BrokerArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let fault_disk = args.fault_fs.then(FaultDisk::open).transpose()?;
    let mut cfg = args.resolve()?;
    if let Some(disk) = &fault_disk {
        disk.install(&mut cfg);
    }
    // Handlers first: a fault signal during recovery must not end the process by default.
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;
    let handle = start(cfg).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            why = handle.failed() => bail!("{why}"),
            _ = usr1.recv(), if fault_disk.is_some() => {
                if let Some(disk) = &fault_disk {
                    disk.power_loss();
                }
            }
            _ = usr2.recv(), if fault_disk.is_some() => {
                if let Some(disk) = &fault_disk {
                    disk.toggle_failing_syncs();
                }
            }
        }
    }
    handle.shutdown().await.map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_initial_cluster() {
        let c = parse_cluster("1=127.0.0.1:9292, 2=127.0.0.1:9293").expect("valid");
        assert_eq!(
            c,
            vec![
                (1, "127.0.0.1:9292".to_owned()),
                (2, "127.0.0.1:9293".to_owned())
            ]
        );
        assert!(parse_cluster("1:abc").is_err());
        assert!(parse_cluster("x=abc").is_err());
    }
}
