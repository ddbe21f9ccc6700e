//! The fault-injection run: three real brokers under load from idempotent `acks=all` producers
//! and two committing members of one consumer group, while a seeded schedule kills (`kill -9`),
//! pauses (SIGSTOP longer than an election timeout), isolates (iptables between the brokers' own
//! loopback addresses, when run as root), degrades their links (delay, jitter, loss and
//! duplicates, as root), steps their wall clocks (libfaketime), cuts the power of (losing every
//! byte not fsynced) and fails the fsyncs of brokers: partition leaders, the metadata leader,
//! the group coordinator; and once cuts the power of the whole cluster. After healing, the recorded
//! history, with every replica's log as read from the stopped brokers' files, is checked against
//! the brief's invariants (`keel_tests::faults::check`).
//!
//! It runs twice: with the topic fsyncing every batch (the default durability), and with
//! flushing left to the OS (`flush.messages` > 1), which is promised nothing across power
//! losses and so runs without them.
//!
//! `cargo test` runs a short schedule of each. Longer runs and replays:
//!   KEEL_FAULT_FLUSH=fsync|os KEEL_FAULT_SEED=S KEEL_FAULT_COUNT=N cargo test -p keel-tests --test faults -- --nocapture

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::{
    Client, ClientError, GroupConfig, OffsetReset, PartitionInfo, ProducerConfig, ProducerRecord,
    RebalanceListener,
};
use keel_proto::v1::admin_service_client::AdminServiceClient;
use keel_proto::v1::groups_service_client::GroupsServiceClient;
use keel_proto::v1::{DescribeTopicRequest, FindCoordinatorRequest};
use keel_tests::bit_rot::{flip_batch, sealed_segments};
use keel_tests::broker::{http_get, metric};
use keel_tests::cluster::{ClusterProc, NetPartition, replica_batches, replica_values};
use keel_tests::fake_clock::FakeClock;
use keel_tests::faults::retention::{
    CounterTotal, RETENTION_DELETED_METRIC, metric_value, retention_can_delete,
};
use keel_tests::faults::{
    Batch, CommitOutcome, Fault, FaultKind, History, Kinds, Member, MemberEvent, OffsetsEntry,
    Outcome, Params, Replicas, Target, check, first_pass, first_pass_pairs, new_replicas, schedule,
    schedule_pairs, wipes_wanted,
};
use keel_tests::link_degrade::DegradedLinks;
use keel_tests::proxy::FaultProxy;
use keel_tests::records::read_partition;

#[path = "faults/inject.rs"]
mod inject;

const TOPIC: &str = "jepsen";
const PARTITIONS: u32 = 3;
const GROUP: &str = "checker";
/// The brokers' internal topic of committed offsets: its replicas are compared too.
const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// The name the checker's report gives the metadata log's copies.
const METADATA_LOG: &str = "metadata log";
const WAIT: Duration = Duration::from_secs(90);

/// (group, partition) to the committed offsets observed, in order: (when seen in µs, offset).
type Commits = BTreeMap<(String, u32), Vec<(u64, u64)>>;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Every send, acknowledgement, error, poll, commit and fault of the run, one line each with
/// the milliseconds since the start, written as it happens (to `KEEL_FAULT_HISTORY`, else into
/// the run's directory, and kept next to the broker logs when the run fails).
#[derive(Clone)]
struct Events {
    started: Instant,
    out: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
}

impl Events {
    fn create(path: &std::path::Path, started: Instant) -> Self {
        let file = std::fs::File::create(path).expect("history file");
        Self {
            started,
            out: Arc::new(Mutex::new(std::io::BufWriter::new(file))),
        }
    }

    fn log(&self, what: std::fmt::Arguments<'_>) {
        use std::io::Write as _;
        let ms = self.started.elapsed().as_millis();
        let mut out = self.out.lock().expect("lock");
        let _ = writeln!(out, "{ms} {what}");
    }

    fn flush(&self) {
        use std::io::Write as _;
        let _ = self.out.lock().expect("lock").flush();
    }

    /// Microseconds since the start: the clock of the history's member events.
    fn us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
}

/// What the producers wrote: each value's outcome, and the key of each keyed one.
#[derive(Default)]
struct Writes {
    outcomes: Mutex<BTreeMap<String, Outcome>>,
    keys: Mutex<BTreeMap<String, String>>,
}

/// One producer's loop: unique values, some keyed, some to fixed partitions.
async fn produce(
    client: Client,
    name: &'static str,
    keyed: bool,
    stop: Arc<AtomicBool>,
    writes: Arc<Writes>,
    acked_at: Arc<Mutex<Vec<Instant>>>,
    events: Events,
) {
    let producer = client
        .producer(ProducerConfig::default().delivery_timeout(Duration::from_secs(60)))
        .expect("producer");
    let mut seq = 0u64;
    let mut pending = Vec::new();
    let settle = |value: String, r: Result<keel_client::RecordMetadata, ClientError>| {
        let outcome = match r {
            Ok(m) => {
                acked_at.lock().expect("lock").push(Instant::now());
                let offset = m.offset.expect("acks=all gives offsets");
                events.log(format_args!("ack {value} {}@{offset}", m.partition));
                Outcome::Acked {
                    partition: m.partition,
                    offset,
                }
            }
            Err(e) if e.is_definite() => {
                events.log(format_args!("refused {value}: {e}"));
                Outcome::Refused
            }
            Err(e) => {
                events.log(format_args!("unknown {value}: {e}"));
                Outcome::Unknown
            }
        };
        writes.outcomes.lock().expect("lock").insert(value, outcome);
    };
    while !stop.load(Ordering::Relaxed) {
        let value = format!("{name}-{seq:08}");
        let mut record = ProducerRecord::new(TOPIC, value.clone());
        record = if keyed {
            let key = format!("k{}", seq % 16);
            writes
                .keys
                .lock()
                .expect("lock")
                .insert(value.clone(), key.clone());
            record.key(key)
        } else {
            record.partition((seq % u64::from(PARTITIONS)) as u32)
        };
        events.log(format_args!("send {value}"));
        match producer.send(record).await {
            Ok(ack) => pending.push((value, ack)),
            Err(e) => settle(value, Err(e)),
        }
        seq += 1;
        if pending.len() >= 64 {
            for (value, ack) in pending.drain(..) {
                settle(value, ack.await);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for (value, ack) in pending {
        settle(value, ack.await);
    }
    let _ = producer.close().await;
}

/// A broker whose metadata storage failed exits for its supervisor to restart it: this is the
/// supervisor.
fn restart_exited(
    cluster: &mut ClusterProc,
    timeline: &mut Vec<String>,
    events: &Events,
    started: Instant,
) {
    for n in &mut cluster.nodes {
        if let Some(status) = n.reap_exited() {
            timeline.push(format!(
                "{:>6} ms  broker {} exited ({status}); restarted",
                started.elapsed().as_millis(),
                n.id
            ));
            events.log(format_args!("broker {} exited ({status}); restarted", n.id));
            n.restart();
        }
    }
}

/// Records a member's assignment changes as they happen.
struct Recorder {
    name: &'static str,
    history: Arc<Mutex<Vec<MemberEvent>>>,
    events: Events,
}

impl Recorder {
    fn note(&self, parts: &[(String, u32)], what: &str) {
        let mut h = self.history.lock().expect("lock");
        for (_, p) in parts.iter().filter(|(t, _)| t == TOPIC) {
            let at = self.events.us();
            self.events
                .log(format_args!("{} {what} partition {p}", self.name));
            h.push(if what == "assigned" {
                MemberEvent::Assigned { at, partition: *p }
            } else {
                MemberEvent::Released { at, partition: *p }
            });
        }
    }
}

impl RebalanceListener for Recorder {
    fn on_assigned(&mut self, partitions: &[(String, u32)]) {
        self.note(partitions, "assigned");
    }

    fn on_revoked(&mut self, partitions: &[(String, u32)]) {
        self.note(partitions, "revoked");
    }

    fn on_lost(&mut self, partitions: &[(String, u32)]) {
        self.note(partitions, "lost");
    }
}

/// One member of the test's group: joins after `join_after`, polls, and commits its positions
/// after every poll (no auto-commit). With `leave_every`, it leaves the group that often and
/// joins again two seconds later, so partitions are handed over between the members
/// throughout the run. Everything it does goes to `history`.
async fn member(
    client: Client,
    name: &'static str,
    join_after: Duration,
    leave_every: Option<Duration>,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<MemberEvent>>>,
    events: Events,
) {
    tokio::time::sleep(join_after).await;
    while !stop.load(Ordering::Relaxed) {
        let mut consumer = client
            .group_consumer(
                GroupConfig::new(GROUP)
                    .subscribe([TOPIC])
                    .auto_commit(false)
                    .auto_offset_reset(OffsetReset::Earliest)
                    .session_timeout(Duration::from_secs(6)),
            )
            .expect("group consumer");
        consumer.set_rebalance_listener(Box::new(Recorder {
            name,
            history: Arc::clone(&history),
            events: events.clone(),
        }));
        events.log(format_args!("{name} joins"));
        let joined = Instant::now();
        while !stop.load(Ordering::Relaxed) && leave_every.is_none_or(|d| joined.elapsed() < d) {
            let started = events.us();
            match consumer.poll(Duration::from_millis(200)).await {
                Ok(records) if !records.is_empty() => {
                    let returned = events.us();
                    let records: Vec<(u32, u64, String)> = records
                        .into_iter()
                        .map(|r| {
                            let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                                .into_owned();
                            events
                                .log(format_args!("poll {name} {}@{} {v}", r.partition, r.offset));
                            (r.partition, r.offset, v)
                        })
                        .collect();
                    history.lock().expect("lock").push(MemberEvent::Polled {
                        started,
                        returned,
                        records,
                    });
                }
                Ok(_) => {}
                Err(e) => events.log(format_args!("{name} poll failed: {e}")),
            }
            // The positions `commit_sync` commits: those of every partition held.
            let offsets: Vec<(u32, u64)> = consumer
                .assignment()
                .iter()
                .filter(|(t, _)| t == TOPIC)
                .filter_map(|(t, p)| Some((*p, consumer.position(t, *p)?)))
                .collect();
            let sent = events.us();
            let result = consumer.commit_sync().await;
            let done = events.us();
            let outcome = match &result {
                Ok(()) => CommitOutcome::Ok,
                Err(e) if e.is_definite() => CommitOutcome::Refused,
                Err(_) => CommitOutcome::Unknown,
            };
            match &result {
                Ok(()) => events.log(format_args!("{name} commit ok {offsets:?}")),
                Err(e) => events.log(format_args!("{name} commit {offsets:?} failed: {e}")),
            }
            if !offsets.is_empty() {
                history.lock().expect("lock").push(MemberEvent::Committed {
                    sent,
                    done,
                    offsets,
                    outcome,
                });
            }
        }
        if let Err(e) = consumer.close().await {
            events.log(format_args!("{name} close failed: {e}"));
        }
        events.log(format_args!("{name} left"));
        if !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// Samples every broker's retention counter once a second, adding across restarts.
async fn sample_retention(
    http: Vec<(u32, String)>,
    stop: Arc<AtomicBool>,
    total: Arc<Mutex<CounterTotal>>,
) {
    while !stop.load(Ordering::Relaxed) {
        sample_retention_once(&http, &total).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    sample_retention_once(&http, &total).await;
}

async fn sample_retention_once(http: &[(u32, String)], total: &Mutex<CounterTotal>) {
    for (id, addr) in http {
        let addr = addr.clone();
        // A paused broker accepts the connection and answers nothing: a blocking read with a
        // timeout, off the runtime's workers.
        let text = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
            .await
            .ok()
            .flatten();
        if let Some((200, body)) = text {
            let v = metric_value(&body, RETENTION_DELETED_METRIC).unwrap_or(0.0);
            total.lock().expect("lock").observe(*id, v);
        }
    }
}

async fn leader_of(client: &Client, p: u32) -> Option<u32> {
    let t = client.admin().describe_topic(TOPIC).await.ok()?;
    t.partitions
        .get(p as usize)
        .map(|x| x.leader)
        .filter(|l| *l != 0)
}

async fn resolve(client: &Client, cluster: &ClusterProc, target: Target) -> Option<u32> {
    match target {
        Target::Node(n) => Some(n),
        Target::LeaderOf(p) => leader_of(client, p).await,
        Target::MetadataLeader => client
            .admin()
            .describe_cluster()
            .await
            .ok()
            .map(|c| c.metadata_leader)
            .filter(|l| *l != 0),
        Target::GroupCoordinator => {
            for n in cluster.nodes.iter().filter(|n| n.is_started()) {
                let Ok(ch) = tonic::transport::Channel::from_shared(n.endpoint())
                    .expect("endpoint")
                    .connect()
                    .await
                else {
                    continue;
                };
                if let Ok(r) = GroupsServiceClient::new(ch)
                    .find_coordinator(FindCoordinatorRequest {
                        group_id: GROUP.into(),
                    })
                    .await
                {
                    let id = r.into_inner().coordinator_id;
                    if id != 0 {
                        return Some(id);
                    }
                }
            }
            None
        }
    }
}

async fn all_in_sync(client: &Client) -> bool {
    topic_in_sync(client, TOPIC).await
}

async fn topic_in_sync(client: &Client, topic: &str) -> bool {
    client.admin().describe_topic(topic).await.is_ok_and(|t| {
        t.partitions
            .iter()
            .all(|p| p.leader != 0 && p.in_sync.len() == p.replicas.len())
    })
}

/// A topic as one broker sees it (its own replicas' log starts and high watermarks), asked
/// directly rather than through the clients' proxies.
async fn describe_at(endpoint: String, topic: &str) -> Option<keel_client::TopicInfo> {
    let ch = tonic::transport::Channel::from_shared(endpoint)
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    AdminServiceClient::new(ch)
        .describe_topic(DescribeTopicRequest {
            name: topic.to_owned(),
        })
        .await
        .ok()?
        .into_inner()
        .topic
}

/// Every partition of `topic` as its leader reports it, once every broker that holds a replica
/// has reported a high watermark at least the leader's (so each has the leader's committed
/// entries), with `true`. If that does not happen within `wait`, the leaders' reports of the
/// last attempt with `false`, so that the checker judges the replicas as they are.
async fn leader_reports(
    cluster: &ClusterProc,
    topic: &str,
    wait: Duration,
) -> (BTreeMap<u32, PartitionInfo>, bool) {
    let deadline = Instant::now() + wait;
    let mut best = BTreeMap::new();
    loop {
        let mut views: BTreeMap<u32, keel_client::TopicInfo> = BTreeMap::new();
        for n in &cluster.nodes {
            if let Some(t) = describe_at(n.endpoint(), topic).await {
                views.insert(n.id, t);
            }
        }
        let count = views
            .values()
            .map(|t| t.partitions.len())
            .max()
            .unwrap_or(0);
        let mut leaders = BTreeMap::new();
        let mut caught_up = count > 0;
        for p in 0..count {
            let Some(lead) = views
                .iter()
                .find_map(|(id, t)| t.partitions.get(p).filter(|x| x.leader == *id))
            else {
                caught_up = false;
                continue;
            };
            caught_up &= lead.replicas.iter().all(|r| {
                views
                    .get(r)
                    .and_then(|t| t.partitions.get(p))
                    .is_some_and(|x| x.high_watermark >= lead.high_watermark)
            });
            leaders.insert(p as u32, lead.clone());
        }
        if leaders.len() >= best.len() {
            best = leaders;
        }
        if caught_up && best.len() == count {
            return (best, true);
        }
        if Instant::now() >= deadline {
            return (best, false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How the run's topic makes batches durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushing {
    /// `flush.messages=1` (the default): every replica fsyncs a batch before it counts.
    EveryBatch,
    /// `flush.messages` > 1: flushing left to the OS. It promises to survive crashes of any
    /// minority, not power losses (docs/operations.md, "Durability settings"), so the run
    /// leaves power losses out and checks everything else as strictly.
    Os,
}

impl Flushing {
    fn name(self) -> &'static str {
        match self {
            Self::EveryBatch => "fsync",
            Self::Os => "os",
        }
    }
}

/// A `Reassign`: moves partition `p` to the replica set `pick` chooses among the brokers not
/// decommissioned (as many replicas as it has), without waiting for the move.
async fn reassign(
    client: &Client,
    p: u32,
    pick: u64,
    decommissioned: Option<u32>,
    nodes: u32,
) -> String {
    let Ok(t) = client.admin().describe_topic(TOPIC).await else {
        return format!("partition {p}: not described, not moved");
    };
    let Some(current) = t.partitions.get(p as usize).map(|x| x.replicas.clone()) else {
        return format!("partition {p}: unknown, not moved");
    };
    let brokers: Vec<u32> = (1..=nodes).filter(|b| Some(*b) != decommissioned).collect();
    let to = new_replicas(&current, &brokers, pick);
    match client
        .admin()
        .reassign_partition(TOPIC, p, to.clone())
        .await
    {
        Ok(_) => format!("partition {p} moving from {current:?} to {to:?}"),
        Err(e) => format!("partition {p}: move from {current:?} to {to:?} refused: {e}"),
    }
}

/// A `Decommission` of broker `node`. A partition on every broker has nowhere to go, so it is
/// first shrunk to the others (as an operator would), then the broker's replicas move.
async fn decommission(client: &Client, node: u32) -> String {
    let mut said = Vec::new();
    if let Ok(t) = client.admin().describe_topic(TOPIC).await {
        for (p, x) in t.partitions.iter().enumerate() {
            if x.replicas.len() >= 5 && x.replicas.contains(&node) {
                let to: Vec<u32> = x.replicas.iter().copied().filter(|b| *b != node).collect();
                match client
                    .admin()
                    .reassign_partition(TOPIC, p as u32, to.clone())
                    .await
                {
                    Ok(_) => said.push(format!("partition {p} shrunk to {to:?}")),
                    Err(e) => said.push(format!("partition {p}: shrinking refused: {e}")),
                }
            }
        }
    }
    let deadline = Instant::now() + WAIT;
    loop {
        match client.admin().decommission_broker(node).await {
            Ok(moved) => {
                said.push(format!("broker {node} decommissioned, moving {moved:?}"));
                break;
            }
            Err(e) if Instant::now() < deadline && !e.is_definite() => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("decommissioning broker {node} failed: {e}"),
        }
    }
    said.join("; ")
}

/// Waits (up to `wait`) until every broker's copy of the metadata log ends at the same index
/// and it applied all of it (their `keel_metadata_*_index` metrics); returns the metadata
/// leader and that index (`None` if it did not happen).
async fn metadata_converged(
    client: &Client,
    cluster: &ClusterProc,
    wait: Duration,
) -> (u32, Option<u64>) {
    let deadline = Instant::now() + wait;
    loop {
        let leader = client
            .admin()
            .describe_cluster()
            .await
            .map_or(0, |c| c.metadata_leader);
        let http: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
        let indexes = tokio::task::spawn_blocking(move || {
            http.iter()
                .map(|h| {
                    (
                        metric(h, "keel_metadata_last_log_index"),
                        metric(h, "keel_metadata_applied_index"),
                    )
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let converged = leader != 0
            && indexes.first().is_some_and(|(last, _)| *last > 0.0)
            && indexes
                .iter()
                .all(|(last, applied)| last == applied && *last == indexes[0].0);
        if converged {
            return (leader, Some(indexes[0].0 as u64));
        }
        if Instant::now() >= deadline {
            println!("metadata leader {leader}; (last, applied) index per broker: {indexes:?}");
            return (leader, None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One run at a time: each loads three or five brokers, and two at once on two cores would measure
/// the machine rather than the brokers.
static RUNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `BitFlip`: flips a byte in a sealed segment of one of `node`'s replicas of the test topic
/// and waits (at least `hold`, at most [`WAIT`]) until the broker reports it repaired. Damage
/// the broker never repairs fails the run; damage it served would show in the final comparison
/// of the replicas and in the consumers' checks.
async fn flip_and_await_repair(
    cluster: &ClusterProc,
    node: u32,
    pick: u64,
    hold: Duration,
    events: &Events,
) -> String {
    let dirs: Vec<_> = (0..PARTITIONS)
        .map(|p| cluster.replica_dir(node, TOPIC, p))
        .collect();
    let sealed = sealed_segments(&dirs);
    let Some(file) = sealed.get((pick % sealed.len().max(1) as u64) as usize) else {
        return "no sealed segment yet, nothing flipped".to_owned();
    };
    let http = cluster.nodes[node as usize - 1].http.clone();
    let repaired = || metric(&http, "keel_log_damage_repaired_total");
    let before = repaired();
    let Some(flipped) = flip_batch(file, pick) else {
        return format!("{} holds no batch, nothing flipped", file.display());
    };
    events.log(format_args!(
        "flipped byte {} of {} (batch at offset {})",
        flipped.position,
        flipped.file.display(),
        flipped.base_offset
    ));
    let started = Instant::now();
    loop {
        if repaired() > before {
            let took = started.elapsed().as_millis();
            tokio::time::sleep(hold.saturating_sub(started.elapsed())).await;
            return format!(
                "flipped byte {} of {}, repaired after {took} ms",
                flipped.position,
                flipped
                    .file
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            );
        }
        assert!(
            started.elapsed() < WAIT,
            "broker {node} never repaired the byte flipped at {} of {}",
            flipped.position,
            flipped.file.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_keep_every_invariant() {
    fault_run(Flushing::EveryBatch, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_with_os_flushing_keep_what_it_promises() {
    fault_run(Flushing::Os, 3).await;
}

/// Five brokers, two faults at a time; one partition on all five, the others on three of them,
/// moved and decommissioned under faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_faults_at_once_on_five_brokers_keep_every_invariant() {
    fault_run(Flushing::EveryBatch, 5).await;
}

async fn fault_run(flushing: Flushing, nodes: u32) {
    let _one_at_a_time = RUNS.lock().await;
    if let Ok(only) = std::env::var("KEEL_FAULT_FLUSH")
        && only != flushing.name()
    {
        println!("left out: this run's flushing is not KEEL_FAULT_FLUSH={only}");
        return;
    }
    if let Some(only) = env_u64("KEEL_FAULT_BROKERS")
        && only != u64::from(nodes)
    {
        println!("left out: this run's {nodes} brokers are not KEEL_FAULT_BROKERS={only}");
        return;
    }
    let seed = env_u64("KEEL_FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let net = 100 + (std::process::id() % 100) as u8;
    let ip = |id: u32| format!("127.0.{net}.{id}");
    let isolate = NetPartition::isolate(&ip(250), &[ip(251)])
        .map(NetPartition::heal)
        .is_some();
    // Degraded links: iptables and a netfilter queue this test reads (root).
    let queue = DegradedLinks::queue_for(net);
    let link = if isolate {
        DegradedLinks::probe(queue)
    } else {
        Err("iptables needs root".to_owned())
    };
    // Clock jumps: libfaketime preloaded into the brokers.
    let clock = FakeClock::find();
    let mut skipped = Vec::new();
    if !isolate {
        skipped.push("Isolate, OneWay, CutPair: iptables needs root".to_owned());
    }
    if let Err(why) = &link {
        skipped.push(format!("LinkDegrade: {why}"));
    }
    if let Err(why) = &clock {
        skipped.push(format!("ClockJump: {why}"));
    }
    let power = flushing == Flushing::EveryBatch;
    if !power {
        skipped.push(
            "PowerLoss, PowerLossAll: flush.messages > 1 promises nothing across a power loss"
                .to_owned(),
        );
    }
    let wipe = wipes_wanted(env_u64("KEEL_FAULT_WIPE"));
    if !wipe {
        skipped.push("Wipe: KEEL_FAULT_WIPE=0".to_owned());
    }
    let kinds = Kinds {
        isolate,
        link: link.is_ok(),
        clock: clock.is_ok(),
        wipe,
        power,
    };
    // By default, every kind of fault once, in order (fourteen as root with libfaketime; ten
    // without root); on five brokers, every pair of the first pass.
    let first = if nodes >= 5 {
        first_pass_pairs(kinds).len()
    } else {
        first_pass(kinds).len()
    };
    // The OS-flushing mode's short run is the first six of its kinds (the crashes and cuts
    // of a minority it promises to survive): the fsync run covers every kind, and the
    // binary's three short runs stay under five minutes.
    let first = match flushing {
        Flushing::Os => first.min(6),
        Flushing::EveryBatch => first,
    };
    let count = env_u64("KEEL_FAULT_COUNT").map_or(first, |c| c as usize);
    let faults = if nodes >= 5 {
        schedule_pairs(seed, count, nodes, PARTITIONS, kinds)
    } else {
        schedule(seed, count, nodes, PARTITIONS, kinds)
    };
    println!(
        "fault schedule: {nodes} brokers, seed {seed}, {count} faults, flushing {flushing} (replay: KEEL_FAULT_BROKERS={nodes} KEEL_FAULT_FLUSH={flushing} KEEL_FAULT_SEED={seed} KEEL_FAULT_COUNT={count}{no_wipe} cargo test -p keel-tests --test faults -- --nocapture)",
        flushing = flushing.name(),
        no_wipe = if wipe { "" } else { " KEEL_FAULT_WIPE=0" },
    );
    for s in &skipped {
        println!("  left out: {s}");
    }
    for f in &faults {
        println!("  {f}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = if isolate {
        ClusterProc::own_addresses(nodes, net)
    } else {
        ClusterProc::loopback_addresses(nodes)
    };
    // Clients reach every broker through a proxy that can lose responses: the brokers
    // advertise the proxies, and talk to each other directly.
    let mut proxies = Vec::new();
    for a in &addrs {
        proxies.push(FaultProxy::start(a.clone()).await.expect("proxy"));
    }
    let advertised: Vec<String> = proxies.iter().map(FaultProxy::addr).collect();
    // `--fault-fs`: the brokers keep their data on the storage crate's simulated disk, which
    // can lose everything not fsynced (power loss) and fail fsyncs.
    // With clock jumps in the schedule, every broker runs with libfaketime preloaded (the
    // target is resolved only when the fault fires), its offset 0 until then, read from its
    // own file. Measured: no difference in throughput at offset 0 (docs/testing.md).
    let clock_file = |id: u32| dir.path().join(format!("node-{id}.faketime"));
    let fake_clock = clock.ok().filter(|_| {
        faults.iter().any(|f| {
            f.kind == FaultKind::ClockJump || f.also.is_some_and(|a| a.kind == FaultKind::ClockJump)
        })
    });
    let mut cluster = ClusterProc::start_at_with_env(
        dir.path(),
        addrs,
        |id| {
            vec![
                "--advertise".to_owned(),
                advertised[id as usize - 1].clone(),
                "--fault-fs".to_owned(),
            ]
        },
        |id| {
            fake_clock
                .as_ref()
                .map(|c| c.env(&clock_file(id)))
                .unwrap_or_default()
        },
    );
    let client = Client::connect(&advertised).await.expect("client");
    client
        .admin()
        .create_topic(
            TOPIC,
            PARTITIONS,
            3,
            // Keeps everything: a log start above 0 is then a violation, not retention.
            [
                ("retention.ms".to_owned(), "-1".to_owned()),
                ("retention.bytes".to_owned(), "-1".to_owned()),
                // Small segments: rolls throughout the run, and sealed segments to flip bits in.
                ("segment.bytes".to_owned(), "262144".to_owned()),
                (
                    "flush.messages".to_owned(),
                    match flushing {
                        Flushing::EveryBatch => "1",
                        Flushing::Os => "10000",
                    }
                    .to_owned(),
                ),
            ]
            .into(),
        )
        .await
        .expect("create topic");
    if nodes >= 5 {
        // One partition on every broker (RF 5); the others stay on three of the five.
        let all: Vec<u32> = (1..=nodes).collect();
        client
            .admin()
            .reassign_partition(TOPIC, 0, all)
            .await
            .expect("partition 0 on every broker");
        let deadline = Instant::now() + WAIT;
        while !all_in_sync(&client).await {
            assert!(
                Instant::now() < deadline,
                "partition 0 never reached five replicas"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let means = inject::Means {
        nodes,
        ip: Box::new(move |id| format!("127.0.{net}.{id}")),
        queue,
        clock_file: {
            let dir = dir.path().to_path_buf();
            Box::new(move |id| dir.join(format!("node-{id}.faketime")))
        },
        seed,
    };
    // A decommissioned broker takes no replica in later moves.
    let mut decommissioned: Option<u32> = None;

    let history = std::env::var_os("KEEL_FAULT_HISTORY")
        .map_or_else(|| dir.path().join("history.log"), std::path::PathBuf::from);
    let events = Events::create(&history, Instant::now());
    println!("event history: {}", history.display());
    // Keeps the history beside the preserved broker logs of a failed run.
    let keep_history = |logs: &std::path::Path| {
        events.flush();
        let _ = std::fs::copy(&history, logs.join("history.log"));
    };

    let stop = Arc::new(AtomicBool::new(false));
    let writes: Arc<Writes> = Arc::default();
    let acked_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let producers: Vec<_> = [("keyed", true), ("fixed", false)]
        .into_iter()
        .map(|(name, keyed)| {
            tokio::spawn(produce(
                client.clone(),
                name,
                keyed,
                Arc::clone(&stop),
                Arc::clone(&writes),
                Arc::clone(&acked_at),
                events.clone(),
            ))
        })
        .collect();

    // Two members of one group that commit what they read: m1 stays, m2 joins a little later
    // and then leaves and joins again every 20 s, so partitions change hands throughout the
    // run. An observer polls the group's committed offsets as the coordinator (whichever it
    // is) reports them.
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let members: Vec<(&'static str, Arc<Mutex<Vec<MemberEvent>>>)> = ["m1", "m2"]
        .into_iter()
        .map(|name| (name, Arc::default()))
        .collect();
    let member_tasks: Vec<_> = members
        .iter()
        .map(|(name, history)| {
            let (join_after, leave_every) = if *name == "m1" {
                (Duration::ZERO, None)
            } else {
                (Duration::from_secs(3), Some(Duration::from_secs(20)))
            };
            tokio::spawn(member(
                client.clone(),
                name,
                join_after,
                leave_every,
                Arc::clone(&consumer_stop),
                Arc::clone(history),
                events.clone(),
            ))
        })
        .collect();
    let commits: Arc<Mutex<Commits>> = Arc::default();
    let observer = {
        let (client, commits, stop, events) = (
            client.clone(),
            Arc::clone(&commits),
            Arc::clone(&consumer_stop),
            events.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(offsets) = client.admin().fetch_offsets(GROUP, &[]).await {
                    let at = events.us();
                    let mut c = commits.lock().expect("lock");
                    for o in offsets.into_iter().filter(|o| o.topic == TOPIC) {
                        let seen = c.entry((GROUP.to_owned(), o.partition)).or_default();
                        if seen.last().map(|(_, offset)| *offset) != Some(o.offset) {
                            events.log(format_args!("committed {}@{}", o.partition, o.offset));
                            seen.push((at, o.offset));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // Whether retention deleted anything, from the brokers' own counter.
    let retention_deleted: Arc<Mutex<CounterTotal>> = Arc::default();
    let sampler = tokio::spawn(sample_retention(
        cluster
            .nodes
            .iter()
            .map(|n| (n.id, n.http.clone()))
            .collect(),
        Arc::clone(&consumer_stop),
        Arc::clone(&retention_deleted),
    ));

    // The schedule.
    let started = Instant::now();
    let mut timeline = Vec::new();
    // Per fault kind: each fault's time from its start until every replica is in sync again.
    let mut windows: Vec<(FaultKind, Instant, Instant)> = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        let Fault {
            after_ms,
            kind,
            target,
            hold_ms,
            lose_responses,
            params,
            also,
        } = *f;
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        let resolved = if kind == FaultKind::PowerLossAll {
            Some(0)
        } else {
            resolve(&client, &cluster, target).await
        };
        let Some(node) = resolved else {
            timeline.push(format!(
                "{:>6} ms  {f}: no such broker now, skipped",
                started.elapsed().as_millis()
            ));
            continue;
        };
        let at = started.elapsed().as_millis();
        let fault_start = Instant::now();
        let hold = Duration::from_millis(hold_ms);
        let mut what = if kind == FaultKind::PowerLossAll {
            "every broker".to_owned()
        } else {
            format!("broker {node} ({target:?}){params}")
        };
        if let Some(n) = lose_responses {
            what.push_str(&format!(
                ", with responses lost on the clients' link to broker {n}"
            ));
        }
        events.log(format_args!("fault {kind:?} {what} for {hold_ms} ms"));
        // A second fault during the hold that takes no replica down: the clients' link to a
        // broker loses responses, so they retry into the failover the first fault causes.
        let overlap = lose_responses.into_iter().collect::<Vec<u32>>();
        // What the fault did, for the timeline (a degraded link's packets, a flip's repair).
        let mut outcome: Option<String> = None;
        // The second of two faults at once: another broker, resolved now.
        let second = match also {
            Some(a) => {
                let n = resolve(&client, &cluster, a.target)
                    .await
                    .unwrap_or(node % nodes + 1);
                let n = if n == node { node % nodes + 1 } else { n };
                what.push_str(&format!(
                    " and {:?} broker {n} ({:?}){}",
                    a.kind, a.target, a.params
                ));
                Some((a, n))
            }
            None => None,
        };
        if kind.is_simple() || matches!(kind, FaultKind::Reassign | FaultKind::Decommission) {
            // A move or a decommission starts first; the broker faults of the step (the first
            // if it is one, the second of a pair) then hold together and heal together.
            let change = match kind {
                FaultKind::Reassign => {
                    let Params::Move { pick } = params else {
                        unreachable!("a move has its pick")
                    };
                    let Target::LeaderOf(p) = target else {
                        unreachable!("a move targets its partition's leader")
                    };
                    Some(reassign(&client, p, pick, decommissioned, nodes).await)
                }
                FaultKind::Decommission => {
                    decommissioned = Some(node);
                    Some(decommission(&client, node).await)
                }
                _ => None,
            };
            if let Some(c) = &change {
                events.log(format_args!("{kind:?}: {c}"));
            }
            let broker_faults = kind
                .is_simple()
                .then_some((kind, node, params))
                .into_iter()
                .chain(second.map(|(a, n)| (a.kind, n, a.params)));
            let mut held = Vec::new();
            for (j, (k, n, p)) in broker_faults.enumerate() {
                // Tells the packets' fates of the step's degraded links apart.
                let salt = (i as u64 + 1) << (32 * j);
                held.push(inject::start(&mut cluster, &means, k, n, p, salt));
            }
            let losing = [inject::losing(&held), overlap].concat();
            inject::hold(&proxies, &losing, hold).await;
            let said: Vec<String> = change
                .into_iter()
                .chain(
                    held.into_iter()
                        .rev()
                        .filter_map(|h| inject::heal(&mut cluster, h)),
                )
                .collect();
            outcome = (!said.is_empty()).then(|| said.join("; "));
        } else {
            let overlap = inject::hold(&proxies, &overlap, hold);
            let action = async {
                match kind {
                    FaultKind::KillWhileCatchingUp => {
                        cluster.node(node).kill9();
                        tokio::time::sleep(hold).await;
                        // Started again without waiting: the second fault lands while it catches up.
                        cluster.node(node).relaunch();
                        let other = leader_of(&client, 0)
                            .await
                            .filter(|l| *l != node)
                            .unwrap_or(node % nodes + 1);
                        events.log(format_args!(
                            "broker {node} restarted and catching up; killing broker {other}"
                        ));
                        cluster.node(other).kill9();
                        tokio::time::sleep(hold).await;
                        cluster.node(other).restart();
                        outcome = Some(format!("then broker {other} while it caught up"));
                    }
                    FaultKind::BitFlip => {
                        let Params::Flip { pick } = params else {
                            unreachable!("a bit flip has its pick")
                        };
                        outcome =
                            Some(flip_and_await_repair(&cluster, node, pick, hold, &events).await);
                    }
                    FaultKind::Wipe => {
                        let b = cluster.node(node);
                        b.kill9();
                        std::fs::remove_dir_all(&b.data_dir).expect("wipe the data directory");
                        b.relaunch();
                        // Refused by the others, it stops by itself.
                        let deadline = Instant::now() + WAIT;
                        let status = loop {
                            if let Some(s) = cluster.node(node).reap_exited() {
                                break s;
                            }
                            if Instant::now() >= deadline {
                                let logs = cluster.preserve_logs();
                                panic!(
                                    "seed {seed}: broker {node} ran on a wiped data directory without being refused; logs in {}",
                                    logs.display()
                                );
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        };
                        events.log(format_args!(
                            "wiped broker {node} was refused and stopped ({status})"
                        ));
                        tokio::time::sleep(hold).await;
                        let deadline = Instant::now() + WAIT;
                        loop {
                            match client.admin().replace_broker(node).await {
                                Ok(rebuilt) => {
                                    events.log(format_args!(
                                        "replaced broker {node}: rebuilding {rebuilt:?}"
                                    ));
                                    break;
                                }
                                Err(e) if Instant::now() < deadline => {
                                    events
                                        .log(format_args!("replace-broker {node}: {e}; retrying"));
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                }
                                Err(e) => panic!("seed {seed}: replace-broker {node} failed: {e}"),
                            }
                        }
                        cluster.node(node).relaunch();
                    }
                    FaultKind::PowerLossAll => {
                        for n in &mut cluster.nodes {
                            n.power_loss();
                        }
                        tokio::time::sleep(hold).await;
                        for n in &mut cluster.nodes {
                            n.relaunch();
                        }
                        for n in &cluster.nodes {
                            n.wait_ready();
                        }
                    }
                    other => unreachable!("{other:?} is simple or a change"),
                }
            };
            tokio::join!(action, overlap);
        }
        let outcome = outcome.map_or_else(String::new, |s| format!(": {s}"));
        timeline.push(format!(
            "{at:>6} ms  {kind:?} {what} for {hold_ms} ms{outcome}"
        ));
        events.log(format_args!("healed {kind:?} {what}"));
        restart_exited(&mut cluster, &mut timeline, &events, started);
        // One fault at a time: wait until the broker is back and caught up.
        let deadline = Instant::now() + WAIT;
        while !all_in_sync(&client).await {
            restart_exited(&mut cluster, &mut timeline, &events, started);
            if Instant::now() >= deadline {
                let logs = cluster.preserve_logs();
                keep_history(&logs);
                panic!(
                    "the cluster did not heal after {f} (seed {seed}); broker logs in {}",
                    logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        windows.push((kind, fault_start, Instant::now()));
    }
    let fault_time = started.elapsed();

    // Quiet period, then stop the writers and let the consumer catch up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer task");
    }
    let mut final_log = BTreeMap::new();
    for p in 0..PARTITIONS {
        final_log.insert(p, read_partition(&client, TOPIC, p, false).await);
    }
    let total: usize = final_log.values().map(BTreeMap::len).sum();
    let deadline = Instant::now() + WAIT;
    loop {
        // The furthest offset of each partition any member got.
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        for (_, history) in &members {
            for e in history.lock().expect("lock").iter() {
                if let MemberEvent::Polled { records, .. } = e {
                    for (p, o, _) in records {
                        last.insert(*p, (*o).max(last.get(p).copied().unwrap_or(0)));
                    }
                }
            }
        }
        let caught_up = (0..PARTITIONS).all(|p| {
            let end = final_log[&p].keys().next_back().copied();
            end.is_none() || last.get(&p).copied() == end
        });
        if caught_up {
            break;
        }
        if Instant::now() >= deadline {
            let logs = cluster.preserve_logs();
            keep_history(&logs);
            panic!(
                "seed {seed}: the group's members never caught up (consumed up to {last:?}); broker logs and the event history in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer_stop.store(true, Ordering::Relaxed);
    for t in member_tasks {
        t.await.expect("member task");
    }
    observer.await.expect("observer task");
    sampler.await.expect("retention sampler task");

    // The replicas of both topics, once every partition is in sync and every replica has
    // reported its leader's high watermark.
    let deadline = Instant::now() + WAIT;
    while !(topic_in_sync(&client, TOPIC).await && topic_in_sync(&client, OFFSETS_TOPIC).await) {
        restart_exited(&mut cluster, &mut timeline, &events, started);
        if Instant::now() >= deadline {
            let logs = cluster.preserve_logs();
            keep_history(&logs);
            panic!(
                "seed {seed}: the replicas were not in sync at the end; broker logs and the event history in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut leaders = BTreeMap::new();
    for topic in [TOPIC, OFFSETS_TOPIC] {
        let (reports, caught_up) = leader_reports(&cluster, topic, Duration::from_secs(20)).await;
        if !caught_up {
            println!(
                "note: not every replica of {topic} reported its leader's high watermark; the checker judges the files as they are"
            );
        }
        leaders.insert(topic, reports);
    }
    assert_eq!(
        leaders[TOPIC].len(),
        PARTITIONS as usize,
        "a partition of {TOPIC} without a leader reporting it: {:?}",
        leaders[TOPIC]
    );
    // Records below a log start are excused only if the topic lets retention delete and the
    // brokers say it deleted something. The test topic keeps everything.
    let deleted_bytes = retention_deleted.lock().expect("lock").total();
    let config = client
        .admin()
        .describe_topic(TOPIC)
        .await
        .expect("describe")
        .config;
    let can_delete = retention_can_delete(config.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let retention_ran = deleted_bytes > 0.0;
    println!(
        "retention: {TOPIC} {} delete, the brokers deleted {deleted_bytes} bytes",
        if can_delete { "may" } else { "may not" }
    );
    let log_start: BTreeMap<u32, u64> = leaders[TOPIC]
        .iter()
        .map(|(p, info)| (*p, info.log_start_offset))
        .collect();

    // The metadata log, once every broker's copy ends at the same index and applied all of it.
    let (meta_leader, meta_index) = metadata_converged(&client, &cluster, WAIT).await;
    if meta_index.is_none() {
        println!(
            "note: the brokers' metadata logs did not converge; the checker judges the files as they are"
        );
    }

    // Every replica's copy, from the files of the stopped brokers.
    for n in &mut cluster.nodes {
        let status = n.terminate();
        assert!(status.success(), "broker {} exited with {status}", n.id);
    }
    let mut replicas = BTreeMap::new();
    for (topic, reports) in &leaders {
        // The offsets topic deletes its old segments once it wrote a compacted image.
        let retention = retention_ran && (can_delete || *topic == OFFSETS_TOPIC);
        for (p, info) in reports {
            let logs = info
                .replicas
                .iter()
                .map(|b| {
                    let rows = replica_batches(&cluster.replica_dir(*b, topic, *p));
                    (*b, rows.into_iter().map(Batch::from).collect())
                })
                .collect();
            replicas.insert(
                ((*topic).to_owned(), *p),
                Replicas {
                    leader: info.leader,
                    high_watermark: info.high_watermark,
                    retention_deleted: retention,
                    logs,
                },
            );
        }
    }

    // The metadata log is snapshotted and purged on its own schedule on each broker, so the
    // copies are compared from the first Raft index both hold; every broker must hold the
    // leader's copy up to the index they all had (the brokers stopping one after another
    // write more: leadership moves, and the metadata hears of it).
    let meta_logs: BTreeMap<u32, Vec<Batch>> = cluster
        .nodes
        .iter()
        .map(|n| {
            let rows = replica_batches(&cluster.metadata_log_dir(n.id));
            (n.id, rows.into_iter().map(Batch::from).collect())
        })
        .collect();
    let meta_end = meta_logs
        .get(&meta_leader)
        .and_then(|log| {
            log.iter()
                .rev()
                .filter(|b| meta_index.is_none_or(|i| b.raft_index <= i))
                .find(|b| b.has_data())
        })
        .map_or(0, |b| b.next_offset);
    replicas.insert(
        (METADATA_LOG.to_owned(), 0),
        Replicas {
            leader: meta_leader,
            high_watermark: meta_end,
            retention_deleted: true,
            logs: meta_logs,
        },
    );
    println!(
        "replicas compared with their leader's copy: {} partitions of {TOPIC} and {OFFSETS_TOPIC}, and the metadata log",
        replicas.len() - 1
    );
    // The group's commits as its coordinators wrote them: every offsets partition's final
    // leader copy (the group's is one of them; the others hold nothing of it).
    let mut offsets_log: BTreeMap<String, Vec<OffsetsEntry>> = BTreeMap::new();
    offsets_log.insert(GROUP.to_owned(), Vec::new());
    for (p, info) in &leaders[OFFSETS_TOPIC] {
        for value in replica_values(&cluster.replica_dir(info.leader, OFFSETS_TOPIC, *p)) {
            if let Some((group, entry)) = OffsetsEntry::parse(&value, TOPIC) {
                offsets_log.entry(group).or_default().push(entry);
            }
        }
    }
    println!(
        "offsets log: {} records of group {GROUP}",
        offsets_log[GROUP].len()
    );
    let members: BTreeMap<String, Member> = members
        .iter()
        .map(|(name, history)| {
            let events = history.lock().expect("lock").clone();
            let count = |f: fn(&MemberEvent) -> bool| events.iter().filter(|e| f(e)).count();
            println!(
                "{name}: {} assignments, {} polls with records, {} commits",
                count(|e| matches!(e, MemberEvent::Assigned { .. })),
                count(|e| matches!(e, MemberEvent::Polled { .. })),
                count(|e| matches!(e, MemberEvent::Committed { .. })),
            );
            (
                (*name).to_owned(),
                Member {
                    group: GROUP.to_owned(),
                    events,
                },
            )
        })
        .collect();
    let history = History {
        topic: TOPIC.to_owned(),
        writes: writes.outcomes.lock().expect("lock").clone(),
        keys: writes.keys.lock().expect("lock").clone(),
        final_log,
        log_start,
        retention_deleted: if can_delete && retention_ran {
            (0..PARTITIONS).collect()
        } else {
            Default::default()
        },
        members,
        commits: commits.lock().expect("lock").clone(),
        replicas,
        offsets_log,
    };
    let report = check(&history);
    // Availability: the share of one-second slots of the fault period with an acknowledgement.
    let slots = fault_time.as_secs().max(1);
    let acked: std::collections::BTreeSet<u64> = acked_at
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|t| t.checked_duration_since(started))
        .map(|d| d.as_secs())
        .filter(|s| *s < slots)
        .collect();
    println!("fault timeline (seed {seed}):");
    for t in &timeline {
        println!("  {t}");
    }
    println!(
        "availability by fault kind (one-second slots with an acknowledgement, from each fault's start until every replica was in sync again):"
    );
    for (kind, share, secs) in availability_by_kind(&windows, &acked_at.lock().expect("lock")) {
        println!("  {kind:?}: {:.1}% of {secs} s", 100.0 * share);
    }
    let dropped: u64 = proxies.iter().map(FaultProxy::dropped).sum();
    println!(
        "{total} records in the log; {report}; {dropped} responses dropped on client links; availability {:.1}% of {slots} s",
        100.0 * acked.len() as f64 / slots as f64
    );
    events.flush();
    if !report.ok() {
        let logs = cluster.preserve_logs();
        keep_history(&logs);
        panic!(
            "seed {seed}: {report}; broker logs and the event history in {}",
            logs.display()
        );
    }
    assert!(report.acknowledged > 0, "nothing was acknowledged");
}

/// For each fault kind, in the order first seen: the share of one-second slots of its faults'
/// windows (start to back in sync) with at least one acknowledgement, and their length.
fn availability_by_kind(
    windows: &[(FaultKind, Instant, Instant)],
    acked_at: &[Instant],
) -> Vec<(FaultKind, f64, u64)> {
    let mut kinds: Vec<FaultKind> = Vec::new();
    for (k, _, _) in windows {
        if !kinds.contains(k) {
            kinds.push(*k);
        }
    }
    kinds
        .into_iter()
        .map(|kind| {
            let (mut slots, mut with_ack) = (0u64, 0u64);
            for (_, from, to) in windows.iter().filter(|(k, _, _)| *k == kind) {
                // Started seconds count: a 1.6 s window is two slots.
                let secs = to.duration_since(*from).as_millis().div_ceil(1000).max(1) as u64;
                let hit: std::collections::BTreeSet<u64> = acked_at
                    .iter()
                    .filter_map(|t| t.checked_duration_since(*from))
                    .map(|d| d.as_secs())
                    .filter(|s| *s < secs)
                    .collect();
                slots += secs;
                with_ack += hit.len() as u64;
            }
            (kind, with_ack as f64 / slots as f64, slots)
        })
        .collect()
}
