//! Cluster measurements that need real broker processes and kills:
//!
//! - `failover [--kills N]`: three brokers, one partition with three replicas, a producer
//!   sending one small `acks=all` batch after another; the partition leader is killed with
//!   SIGKILL N times (restarted and caught up in between). Reports, for each kill, the time from
//!   the kill to the first batch acknowledged by the new leader, then p50 and max.
//! - `idle [--partitions N]`: three brokers hosting N partitions with three replicas each (so N
//!   replicas per broker), no traffic; reports each broker's CPU use over 30 s.
//!
//! Usage: `cargo run --release -p keel-benches --bin keel-cluster-bench -- failover` (it uses
//! the `keel` binary next to itself: build it with `cargo build --release --bin keel`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_batch::{BatchBuilder, Compression, RecordRef};
use keel_client::{Acks, Client, ProducerConfig};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Node {
    id: u32,
    addr: String,
    metrics: String,
    dir: PathBuf,
    initial: String,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self, keel: &Path) -> Result<(), Error> {
        let log = std::fs::File::create(self.dir.with_extension("log"))?;
        let child = Command::new(keel)
            .args([
                "broker",
                "--id",
                &self.id.to_string(),
                "--listen",
                &self.addr,
            ])
            .args([
                "--metrics-listen",
                &self.metrics,
                "--initial-cluster",
                &self.initial,
            ])
            .arg("--data-dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_cluster(dir: &Path, keel: &Path) -> Result<Vec<Node>, Error> {
    let addrs: Vec<String> = (0..3)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    let initial = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let mut n = Node {
            id: i as u32 + 1,
            addr: a.clone(),
            metrics: format!("127.0.0.1:{}", free_port()?),
            dir: dir.join(format!("node-{}", i + 1)),
            initial: initial.clone(),
            child: None,
        };
        n.spawn(keel)?;
        nodes.push(n);
    }
    Ok(nodes)
}

async fn leader_of(client: &Client, topic: &str) -> Option<u32> {
    let t = client.admin().describe_topic(topic).await.ok()?;
    t.partitions.first().map(|p| p.leader).filter(|l| *l != 0)
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn batch() -> Result<Bytes, Error> {
    let mut b = BatchBuilder::new(Compression::None);
    let v = [7u8; 100];
    for _ in 0..10 {
        b.push(&RecordRef {
            timestamp: 0,
            key: None,
            value: Some(&v),
            headers: &[],
        })?;
    }
    Ok(Bytes::from(b.build()?))
}

fn keel_bin() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().ok_or("no parent")?.join("keel");
    if !bin.exists() {
        return Err(format!(
            "{} is missing: cargo build --release --bin keel",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn failover(kills: usize) -> Result<(), Error> {
    let keel = keel_bin()?;
    let dir = tempfile::tempdir()?;
    let mut nodes = start_cluster(dir.path(), &keel)?;
    let brokers: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let client = wait_for("the cluster", Duration::from_secs(30), || async {
        Client::connect(&brokers).await.ok()
    })
    .await?;
    wait_for("topic creation", Duration::from_secs(30), || async {
        client
            .admin()
            .create_topic("failover", 1, 3, BTreeMap::new())
            .await
            .ok()
    })
    .await?;
    let producer = client.producer(
        ProducerConfig::default()
            .request_timeout(Duration::from_millis(500))
            .delivery_timeout(Duration::from_secs(30)),
    )?;
    let payload = batch()?;
    let mut times = Vec::new();
    for k in 0..kills {
        let leader = wait_for("a leader", Duration::from_secs(30), || {
            leader_of(&client, "failover")
        })
        .await?;
        // Warm: writes flow through the current leader.
        for _ in 0..20 {
            producer
                .send_batch("failover", 0, payload.clone(), Acks::All)
                .await?;
        }
        let killed_at = Instant::now();
        nodes[leader as usize - 1].kill9();
        loop {
            match producer
                .send_batch("failover", 0, payload.clone(), Acks::All)
                .await
            {
                Ok(_) => break,
                Err(_) if killed_at.elapsed() < Duration::from_secs(30) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let took = killed_at.elapsed().as_secs_f64() * 1000.0;
        println!(
            "kill {}: leader {leader} killed, first acknowledged write after {took:.0} ms",
            k + 1
        );
        times.push(took);
        nodes[leader as usize - 1].spawn(&keel)?;
        // Let it rejoin and catch up before the next kill.
        wait_for(
            "the killed broker to be in sync",
            Duration::from_secs(60),
            || async {
                let t = client.admin().describe_topic("failover").await.ok()?;
                let p = t.partitions.first()?;
                (p.leader != 0 && p.in_sync.len() == 3).then_some(())
            },
        )
        .await?;
    }
    times.sort_by(f64::total_cmp);
    println!(
        "failover over {} kills: p50 {:.0} ms, max {:.0} ms",
        times.len(),
        percentile(&times, 0.5),
        times.last().copied().unwrap_or(0.0)
    );
    Ok(())
}

/// `keel_quiet_partitions` from a broker's metrics endpoint (0 if unreadable).
fn quiet_partitions(metrics_addr: &str) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(metrics_addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET /metrics HTTP/1.0\r\nHost: {metrics_addr}\r\n\r\n").is_err() {
        return 0;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix("keel_quiet_partitions "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn cpu_ticks(pid: u32) -> Result<u64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = f.get(11).ok_or("stat")?.parse()?;
    let stime: u64 = f.get(12).ok_or("stat")?.parse()?;
    Ok(utime + stime)
}

async fn idle(partitions: u32, seconds: u64) -> Result<(), Error> {
    let keel = keel_bin()?;
    let dir = tempfile::tempdir()?;
    let nodes = start_cluster(dir.path(), &keel)?;
    let brokers: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let client = wait_for("the cluster", Duration::from_secs(30), || async {
        Client::connect(&brokers).await.ok()
    })
    .await?;
    let per_topic = 100.min(partitions);
    let topics = partitions.div_ceil(per_topic);
    for t in 0..topics {
        let name = format!("idle-{t}");
        // Small segments: every replica reserves disk ahead of its active segment (up to
        // 16 MiB), which for 3,000 replicas on one machine would be 48 GB.
        let config = BTreeMap::from([("segment.bytes".to_owned(), "1048576".to_owned())]);
        let started = Instant::now();
        wait_for("topic creation", Duration::from_secs(120), || async {
            match client
                .admin()
                .create_topic(&name, per_topic, 3, config.clone())
                .await
            {
                // An earlier attempt that timed out on the client may have succeeded.
                Ok(_) | Err(keel_client::ClientError::TopicExists { .. }) => Some(()),
                Err(e) => {
                    eprintln!("creating {name}: {e}");
                    None
                }
            }
        })
        .await?;
        eprintln!("created {name} in {:?}", started.elapsed());
    }
    wait_for(
        "every partition to have a leader",
        Duration::from_secs(300),
        || async {
            let ts = client.admin().list_topics().await.ok()?;
            let led: usize = ts
                .iter()
                .map(|t| t.partitions.iter().filter(|p| p.leader != 0).count())
                .sum();
            (led as u32 >= topics * per_topic).then_some(())
        },
    )
    .await?;
    // Measure once every group has gone quiet (leaders elected, handed back, replicas caught
    // up, no writes): the steady state of an idle cluster.
    let want = u64::from(topics * per_topic);
    wait_for(
        "every replica to go quiet",
        Duration::from_secs(300),
        || async {
            let quiet: Vec<u64> = nodes.iter().map(|n| quiet_partitions(&n.metrics)).collect();
            quiet.iter().all(|q| *q >= want).then_some(())
        },
    )
    .await?;
    let hz = 100.0; // USER_HZ
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| cpu_ticks(n.pid().unwrap_or(0)))
        .collect::<Result<_, _>>()?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after: Vec<u64> = nodes
        .iter()
        .map(|n| cpu_ticks(n.pid().unwrap_or(0)))
        .collect::<Result<_, _>>()?;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let pct = (a - b) as f64 / hz / seconds as f64 * 100.0;
        println!(
            "broker {}: {} idle partition replicas, {pct:.1}% of one core over {seconds} s",
            i + 1,
            topics * per_topic
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("failover") => failover(flag("--kills", 10) as usize).await,
        Some("idle") => idle(flag("--partitions", 1000) as u32, flag("--seconds", 30)).await,
        _ => Err(
            "usage: keel-cluster-bench failover [--kills N] | idle [--partitions N] [--seconds S]"
                .into(),
        ),
    }
}
