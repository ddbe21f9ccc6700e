//! A cluster of real `keel broker` processes on loopback ports (`--initial-cluster`), and
//! helpers to find partition leaders and compare replicas' logs on disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_batch::BatchIter;
use keel_log::{Log, LogConfig, ReadLimit};
use keel_proto::v1::{DescribeTopicRequest, TopicInfo};

use crate::broker::{BrokerProc, free_port};

/// N brokers started with the same `--initial-cluster`.
pub struct ClusterProc {
    pub dir: PathBuf,
    pub nodes: Vec<BrokerProc>,
}

impl ClusterProc {
    /// Starts brokers 1..=n with data in `dir/node-<i>`.
    pub fn start(dir: &Path, n: u32) -> Self {
        Self::start_with(dir, n, &[])
    }

    pub fn start_with(dir: &Path, n: u32, extra: &[&str]) -> Self {
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        Self::start_at(dir, addrs, extra)
    }

    /// Brokers on their own loopback addresses (`127.0.<net>.<id>`): their connections to each
    /// other carry those as source addresses, so [`NetPartition`] can cut them apart.
    pub fn start_own_addresses(dir: &Path, n: u32, net: u8) -> Self {
        Self::start_at(dir, Self::own_addresses(n, net), &[])
    }

    /// `n` free gRPC addresses, `127.0.<net>.<id>:PORT`, for [`ClusterProc::start_at_with`].
    pub fn own_addresses(n: u32, net: u8) -> Vec<String> {
        (1..=n)
            .map(|i| {
                let ip = format!("127.0.{net}.{i}");
                let port = std::net::TcpListener::bind((ip.as_str(), 0))
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .expect("free port");
                format!("{ip}:{port}")
            })
            .collect()
    }

    /// `n` free gRPC addresses on 127.0.0.1.
    pub fn loopback_addresses(n: u32) -> Vec<String> {
        (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect()
    }

    fn start_at(dir: &Path, addrs: Vec<String>, extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Self::start_at_with(dir, addrs, |_| extra.clone())
    }

    /// Brokers 1..=n on `addrs`, each with its own extra arguments (e.g. an `--advertise`
    /// address that differs from the peer address).
    pub fn start_at_with(
        dir: &Path,
        addrs: Vec<String>,
        extra: impl Fn(u32) -> Vec<String>,
    ) -> Self {
        Self::start_at_with_env(dir, addrs, extra, |_| Vec::new())
    }

    /// Like [`ClusterProc::start_at_with`], with each broker's environment variables too
    /// (kept for its restarts).
    pub fn start_at_with_env(
        dir: &Path,
        addrs: Vec<String>,
        extra: impl Fn(u32) -> Vec<String>,
        env: impl Fn(u32) -> Vec<(String, String)>,
    ) -> Self {
        let n = addrs.len() as u32;
        let initial = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let id = i as u32 + 1;
                let own = extra(id);
                let mut args: Vec<&str> = vec!["--initial-cluster", &initial];
                args.extend(own.iter().map(String::as_str));
                BrokerProc::launch_on_env(
                    &dir.join(format!("node-{id}")),
                    id,
                    a.clone(),
                    &args,
                    env(id),
                )
            })
            .collect::<Vec<_>>();
        let c = Self {
            dir: dir.to_path_buf(),
            nodes,
        };
        for n in &c.nodes {
            if !n.ready_within(Duration::from_secs(30)) {
                let logs = c.preserve_logs();
                panic!(
                    "broker {} was not ready within 30 s of the cluster's start; logs in {}",
                    n.id,
                    logs.display()
                );
            }
        }
        c.wait_all_alive(n as usize);
        c
    }

    /// Waits until the metadata leader hears from `n` brokers.
    pub fn wait_all_alive(&self, n: usize) {
        let endpoint = self.nodes[0].endpoint();
        // Its own thread and runtime: callers may be inside an async test.
        let ok = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let alive = rt.block_on(async {
                    let ch = tonic::transport::Channel::from_shared(endpoint.clone())
                        .ok()?
                        .connect()
                        .await
                        .ok()?;
                    let r = keel_proto::v1::cluster_service_client::ClusterServiceClient::new(ch)
                        .describe_cluster(keel_proto::v1::DescribeClusterRequest {})
                        .await
                        .ok()?
                        .into_inner();
                    Some(
                        r.metadata_leader != 0 && r.brokers.iter().filter(|b| b.alive).count() >= n,
                    )
                });
                if alive == Some(true) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
        .join()
        .unwrap_or(false);
        assert!(ok, "the brokers did not all join the cluster within 30 s");
    }

    /// Restarts every stopped node at once and waits until all are ready (a whole-cluster
    /// restart: no single node can get current metadata alone).
    pub fn restart_stopped(&mut self) {
        for n in self.nodes.iter_mut().filter(|n| !n.is_started()) {
            n.relaunch();
        }
        for n in &self.nodes {
            n.wait_ready();
        }
    }

    /// The `--brokers` list of every node.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.grpc.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn broker_list(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.grpc.clone()).collect()
    }

    pub fn node(&mut self, id: u32) -> &mut BrokerProc {
        &mut self.nodes[id as usize - 1]
    }

    /// Describes a topic through the first running node that answers.
    pub async fn describe(&self, topic: &str) -> Option<TopicInfo> {
        self.describe_via(topic, |_| true).await
    }

    /// Describes a topic as node `id` sees it (its own replica's offsets).
    pub async fn describe_on(&self, id: u32, topic: &str) -> Option<TopicInfo> {
        self.describe_via(topic, |n| n.id == id).await
    }

    async fn describe_via(
        &self,
        topic: &str,
        pick: impl Fn(&BrokerProc) -> bool,
    ) -> Option<TopicInfo> {
        for n in self.nodes.iter().filter(|n| n.is_started() && pick(n)) {
            let Ok(ch) = tonic::transport::Channel::from_shared(n.endpoint())
                .expect("endpoint")
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await
            else {
                continue;
            };
            let mut admin = keel_proto::v1::admin_service_client::AdminServiceClient::new(ch);
            if let Ok(r) = admin
                .describe_topic(DescribeTopicRequest {
                    name: topic.to_owned(),
                })
                .await
                && let Some(t) = r.into_inner().topic
            {
                return Some(t);
            }
        }
        None
    }

    /// Waits until a running broker leads `topic`/`partition` (as the replicas say) and
    /// returns its id.
    pub async fn wait_leader(&self, topic: &str, partition: u32, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.describe(topic).await
                && let Some(p) = t.partitions.get(partition as usize)
                && p.leader != 0
                && self
                    .nodes
                    .get(p.leader as usize - 1)
                    .is_some_and(BrokerProc::is_started)
            {
                return p.leader;
            }
            assert!(
                Instant::now() < deadline,
                "no leader for {topic}/{partition} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Copies the brokers' log files out of the (temporary) data directory, so a failing
    /// test can name where to read them; returns that directory.
    pub fn preserve_logs(&self) -> PathBuf {
        let out = std::env::temp_dir().join(format!(
            "keel-test-logs-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ));
        let _ = std::fs::create_dir_all(&out);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.filter_map(Result::ok) {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let _ = std::fs::copy(&p, out.join(e.file_name()));
                }
            }
        }
        // KEEL_TEST_KEEP_DATA keeps the brokers' data directories too, for replaying a failure
        // against what was on disk (they can be large).
        if std::env::var_os("KEEL_TEST_KEEP_DATA").is_some() {
            let _ = std::process::Command::new("cp")
                .arg("-a")
                .arg(&self.dir)
                .arg(out.join("data"))
                .status();
        }
        out
    }

    /// The log directory of a partition replica on node `id`.
    pub fn replica_dir(&self, id: u32, topic: &str, partition: u32) -> PathBuf {
        let topics = self.dir.join(format!("node-{id}")).join("topics");
        let prefix = format!("{topic}-");
        let dir = std::fs::read_dir(&topics)
            .expect("topics dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(&prefix))
                    .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()))
            })
            .unwrap_or_else(|| panic!("no replica of {topic} on node {id}"));
        dir.join(partition.to_string()).join("log")
    }
}

impl ClusterProc {
    /// Where broker `id` keeps its copy of the metadata log.
    pub fn metadata_log_dir(&self, id: u32) -> PathBuf {
        self.dir
            .join(format!("node-{id}"))
            .join("metadata")
            .join("log")
    }
}

/// One batch of a replica's log: (raft index, raft term, base offset, next offset, crc).
pub type BatchRow = (u64, u64, u64, u64, u32);

/// Calls `f` with every batch of a stopped replica's log (header and bytes), data and control
/// alike, in log order, read with keel-log's own recovery (so a torn tail is cut, exactly as
/// the broker would).
fn each_batch(log_dir: &Path, mut f: impl FnMut(&keel_batch::BatchHeader, &[u8])) {
    let log = Log::open(log_dir, LogConfig::default()).expect("open replica log");
    let mut next = log.first_raft_index();
    while next < log.next_raft_index() {
        let slice = log
            .read_raft(next, 1 << 20, ReadLimit::default())
            .expect("read replica log");
        let mut last = None;
        for item in BatchIter::new(&slice.bytes) {
            let (h, bytes) = item.expect("valid batch");
            f(&h, bytes);
            last = Some(h.raft_index);
        }
        match last {
            Some(i) => next = i + 1,
            None => break,
        }
    }
}

/// Every batch of a stopped replica's log, data and control alike (see [`each_batch`]).
pub fn replica_batches(log_dir: &Path) -> Vec<BatchRow> {
    let mut out = Vec::new();
    each_batch(log_dir, |h, _| {
        out.push((
            h.raft_index,
            h.raft_term,
            h.base_offset,
            h.next_offset(),
            h.crc,
        ));
    });
    out
}

/// Every entry of a Raft log kept by a replica (the metadata log): (raft index, raft term,
/// CRC of the batch's records), in log order. The records' CRC, not the whole batch's: a log
/// restamps offsets locally (a replica that installed a snapshot numbers them from 0), and the
/// entry is the same.
pub fn replica_entries(log_dir: &Path) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::new();
    each_batch(log_dir, |h, bytes| {
        let (_, _, records_crc) = keel_batch::parse_verified(bytes).expect("CRC-checked batch");
        out.push((h.raft_index, h.raft_term, records_crc));
    });
    out
}

/// The values of every record of a replica's log, in log order (batches CRC-checked).
pub fn replica_values(log_dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    each_batch(log_dir, |_, bytes| {
        let batch = bytes::Bytes::copy_from_slice(bytes);
        for r in keel_batch::decode_records(&batch, 64 << 20).expect("decodable records") {
            out.extend(r.value.map(|v| v.to_vec()));
        }
    });
    out
}

/// The batches of each replica up to (and including) the last batch holding `upto_offset - 1`.
pub fn committed_prefix(rows: &[BatchRow], upto_offset: u64) -> Vec<BatchRow> {
    let end = rows
        .iter()
        .position(|r| r.3 >= upto_offset && r.3 > r.2)
        .map_or(rows.len(), |i| i + 1);
    rows[..end].to_vec()
}

/// Groups rows by node id (helper for assertion messages).
/// Checks that every acknowledged record (offset to value) reads back at its offset, then stops
/// the brokers and checks that the partition's committed prefix is byte-identical on every
/// replica.
pub async fn assert_acked_and_replicas_identical(
    cluster: &mut ClusterProc,
    client: &keel_client::Client,
    topic: &str,
    partition: u32,
    acked: &BTreeMap<u64, String>,
) {
    let log = crate::records::read_partition(client, topic, partition, true).await;
    for (o, v) in acked {
        assert_eq!(log.get(o), Some(v), "acknowledged record at offset {o}");
    }
    let hwm = log.keys().next_back().map_or(0, |o| o + 1);
    for n in &mut cluster.nodes {
        let status = n.terminate();
        assert!(status.success(), "broker {} exited with {status}", n.id);
    }
    let ids: Vec<u32> = cluster.nodes.iter().map(|n| n.id).collect();
    let prefix = |id: u32| {
        committed_prefix(
            &replica_batches(&cluster.replica_dir(id, topic, partition)),
            hwm,
        )
    };
    let first = prefix(ids[0]);
    for id in &ids[1..] {
        assert_eq!(
            prefix(*id),
            first,
            "broker {id}'s replica of {topic}/{partition} differs from broker {}'s",
            ids[0]
        );
    }
}

pub fn by_node(rows: Vec<(u32, Vec<BatchRow>)>) -> BTreeMap<u32, Vec<BatchRow>> {
    rows.into_iter().collect()
}

/// Drops traffic between one address and others with iptables (Linux, root); the rules are
/// removed on [`NetPartition::heal`] or drop.
pub struct NetPartition {
    rules: Vec<(String, String)>,
}

impl NetPartition {
    /// Cuts `ip` off from `others` in both directions. `None` when iptables cannot be used
    /// here (not Linux, not root): callers skip the test.
    pub fn isolate(ip: &str, others: &[String]) -> Option<Self> {
        let pairs: Vec<(&str, &str)> = others
            .iter()
            .flat_map(|o| [(ip, o.as_str()), (o.as_str(), ip)])
            .collect();
        Self::drop_packets(&pairs)
    }

    /// An asymmetric cut: packets from `ip` to each of `others` are dropped, the other
    /// direction still flows (so `ip` hears its peers but they never hear back).
    pub fn one_way(ip: &str, others: &[String]) -> Option<Self> {
        let pairs: Vec<(&str, &str)> = others.iter().map(|o| (ip, o.as_str())).collect();
        Self::drop_packets(&pairs)
    }

    /// Drops every packet from the first address of each pair to the second.
    fn drop_packets(pairs: &[(&str, &str)]) -> Option<Self> {
        let mut p = Self { rules: Vec::new() };
        for (src, dst) in pairs {
            let ok = std::process::Command::new("iptables")
                .args(["-w", "-I", "INPUT", "-s", src, "-d", dst, "-j", "DROP"])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
            p.rules.push(((*src).to_owned(), (*dst).to_owned()));
        }
        Some(p)
    }

    pub fn heal(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        for (src, dst) in self.rules.drain(..) {
            let _ = std::process::Command::new("iptables")
                .args(["-w", "-D", "INPUT", "-s", &src, "-d", &dst, "-j", "DROP"])
                .status();
        }
    }
}

impl Drop for NetPartition {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A client of every broker of `cluster`.
pub async fn client(cluster: &ClusterProc) -> keel_client::Client {
    keel_client::Client::connect(&cluster.broker_list())
        .await
        .expect("connect to the cluster")
}

/// Three brokers in `dir`, a client, and a topic with default config.
pub async fn cluster_with_topic(
    dir: &Path,
    topic: &str,
    partitions: u32,
    replication_factor: u32,
) -> (ClusterProc, keel_client::Client) {
    let cluster = ClusterProc::start(dir, 3);
    let client = client(&cluster).await;
    client
        .admin()
        .create_topic(topic, partitions, replication_factor, BTreeMap::new())
        .await
        .expect("create topic");
    (cluster, client)
}
