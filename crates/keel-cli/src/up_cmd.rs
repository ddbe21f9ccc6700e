//! `keel up`: a local cluster of brokers as child processes of this one.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::process::{Child, Command};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of brokers.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Data directory; broker i uses DIR/broker-i. Reused when run again.
    #[arg(long, default_value = "./.keel-data")]
    pub data_dir: PathBuf,
    /// gRPC port of broker 1; broker i listens on base+i-1 and serves metrics on base+100+i-1.
    #[arg(long, default_value_t = 9292)]
    pub base_port: u16,
}

pub async fn run(args: UpArgs) -> Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let last = u32::from(args.base_port) + 100 + u32::from(args.nodes) - 1;
    if last > u32::from(u16::MAX) {
        bail!(
            "--base-port {} leaves no room for {} brokers and their metrics ports",
            args.base_port,
            args.nodes
        );
    }
    let exe = std::env::current_exe().context("locating the keel executable")?;
    let grpc = |i: u16| format!("127.0.0.1:{}", args.base_port + i - 1);
    let metrics = |i: u16| format!("127.0.0.1:{}", args.base_port + 100 + i - 1);
    let cluster: Vec<String> = (1..=args.nodes)
        .map(|i| format!("{i}={}", grpc(i)))
        .collect();
    let mut children: Vec<(u16, Child)> = Vec::new();
    for i in 1..=args.nodes {
        let dir = args.data_dir.join(format!("broker-{i}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("broker")
            .arg("--id")
            .arg(i.to_string())
            .arg("--data-dir")
            .arg(&dir)
            .arg("--listen")
            .arg(grpc(i))
            .arg("--metrics-listen")
            .arg(metrics(i))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if args.nodes > 1 {
            cmd.arg("--initial-cluster").arg(cluster.join(","));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting broker {i}"))?;
        children.push((i, child));
        println!(
            "broker {i}: grpc {}  metrics http://{}/metrics  data {}",
            grpc(i),
            metrics(i),
            dir.display()
        );
    }
    println!(
        "cluster up: --brokers {}",
        (1..=args.nodes).map(grpc).collect::<Vec<_>>().join(",")
    );
    println!("press Ctrl-C to stop");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let exited = async {
        let (i, status) = futures_first_exit(&mut children).await;
        (i, status)
    };
    let failure = tokio::select! {
        _ = term.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        (i, status) = exited => Some(format!("broker {i} exited unexpectedly ({status})")),
    };
    // Graceful stop: SIGTERM to every broker, then wait for each.
    for (_, child) in &children {
        if let Some(pid) = child.id() {
            // SAFETY-free alternative to libc::kill: the `kill` utility sends SIGTERM.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for (i, child) in &mut children {
        match tokio::time::timeout(std::time::Duration::from_secs(30), child.wait()).await {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => eprintln!("broker {i} exited with {s}"),
            Ok(Err(e)) => eprintln!("broker {i}: {e}"),
            Err(_) => {
                eprintln!("broker {i} did not stop in 30 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
    match failure {
        Some(f) => bail!(f),
        None => Ok(()),
    }
}

async fn futures_first_exit(children: &mut [(u16, Child)]) -> (u16, String) {
    let waits = children.iter_mut().map(|(i, c)| {
        let i = *i;
        Box::pin(async move {
            let status = c
                .wait()
                .await
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            (i, status)
        })
    });
    futures::future::select_all(waits).await.0
}
