//! The fault-injection run: three real brokers under load from idempotent `acks=all` producers
//! and a committing group consumer, while a seeded schedule kills (`kill -9`), pauses
//! (SIGSTOP longer than an election timeout), isolates (iptables between the brokers' own
//! loopback addresses, when run as root), cuts the power of (losing every byte not fsynced)
//! and fails the fsyncs of brokers: partition leaders, the metadata leader, the group
//! coordinator; and once cuts the power of the whole cluster. After healing, the recorded history is checked against the brief's
//! invariants (`keel_tests::faults::check`) and the replicas' logs on disk are compared.
//!
//! `cargo test` runs a short schedule. Longer runs and replays:
//!   KEEL_FAULT_SEED=S KEEL_FAULT_COUNT=N cargo test -p keel-tests --test faults -- --nocapture

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::{Client, ClientError, GroupConfig, OffsetReset, ProducerConfig, ProducerRecord};
use keel_proto::v1::FindCoordinatorRequest;
use keel_proto::v1::groups_service_client::GroupsServiceClient;
use keel_tests::cluster::{ClusterProc, NetPartition, committed_prefix, replica_batches};
use keel_tests::faults::{Fault, FaultKind, History, Outcome, Target, check, first_pass, schedule};
use keel_tests::proxy::FaultProxy;
use keel_tests::records::read_partition;

const TOPIC: &str = "jepsen";
const PARTITIONS: u32 = 3;
const GROUP: &str = "checker";
const WAIT: Duration = Duration::from_secs(90);

/// (group, partition) to the committed offsets observed, in order.
type Commits = BTreeMap<(String, u32), Vec<u64>>;

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
}

/// One producer's loop: unique values, some keyed, some to fixed partitions.
async fn produce(
    client: Client,
    name: &'static str,
    keyed: bool,
    stop: Arc<AtomicBool>,
    writes: Arc<Mutex<BTreeMap<String, Outcome>>>,
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
        writes.lock().expect("lock").insert(value, outcome);
    };
    while !stop.load(Ordering::Relaxed) {
        let value = format!("{name}-{seq:08}");
        let mut record = ProducerRecord::new(TOPIC, value.clone());
        record = if keyed {
            record.key(format!("k{}", seq % 16))
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
    client.admin().describe_topic(TOPIC).await.is_ok_and(|t| {
        t.partitions
            .iter()
            .all(|p| p.leader != 0 && p.in_sync.len() == p.replicas.len())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_keep_every_invariant() {
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
    // By default, every kind of fault once (ten with iptables, seven without), in order.
    let count =
        env_u64("KEEL_FAULT_COUNT").map_or_else(|| first_pass(isolate).len(), |c| c as usize);
    let faults = schedule(seed, count, 3, PARTITIONS, isolate);
    println!(
        "fault schedule: seed {seed}, {count} faults{} (replay: KEEL_FAULT_SEED={seed} KEEL_FAULT_COUNT={count} cargo test -p keel-tests --test faults -- --nocapture)",
        if isolate {
            ""
        } else {
            ", no network faults (iptables needs root)"
        }
    );
    for f in &faults {
        println!("  {f}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = if isolate {
        ClusterProc::own_addresses(3, net)
    } else {
        ClusterProc::loopback_addresses(3)
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
    let mut cluster = ClusterProc::start_at_with(dir.path(), addrs, |id| {
        vec![
            "--advertise".to_owned(),
            advertised[id as usize - 1].clone(),
            "--fault-fs".to_owned(),
        ]
    });
    let client = Client::connect(&advertised).await.expect("client");
    client
        .admin()
        .create_topic(TOPIC, PARTITIONS, 3, BTreeMap::new())
        .await
        .expect("create topic");

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
    let writes: Arc<Mutex<BTreeMap<String, Outcome>>> = Arc::default();
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

    // A group member that commits what it read, and an observer of the group's committed
    // offsets as the coordinator (whichever it is) reports them.
    let consumed: Arc<Mutex<Vec<(u32, u64, String)>>> = Arc::default();
    let commits: Arc<Mutex<Commits>> = Arc::default();
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (client, consumed, stop, events) = (
            client.clone(),
            Arc::clone(&consumed),
            Arc::clone(&consumer_stop),
            events.clone(),
        );
        tokio::spawn(async move {
            let mut member = client
                .group_consumer(
                    GroupConfig::new(GROUP)
                        .subscribe([TOPIC])
                        .auto_commit(false)
                        .auto_offset_reset(OffsetReset::Earliest)
                        .session_timeout(Duration::from_secs(6)),
                )
                .expect("group consumer");
            while !stop.load(Ordering::Relaxed) {
                match member.poll(Duration::from_millis(200)).await {
                    Ok(records) => {
                        let mut seen = consumed.lock().expect("lock");
                        for r in records {
                            let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                                .into_owned();
                            events.log(format_args!("poll {}@{} {v}", r.partition, r.offset));
                            seen.push((r.partition, r.offset, v));
                        }
                    }
                    Err(e) => {
                        events.log(format_args!("poll failed: {e}"));
                        println!("consumer poll: {e}");
                    }
                }
                match member.commit_sync().await {
                    Ok(()) => events.log(format_args!("commit ok")),
                    Err(e) => {
                        events.log(format_args!("commit failed: {e}"));
                        println!("consumer commit: {e}");
                    }
                }
            }
            let _ = member.close().await;
        })
    };
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
                    let mut c = commits.lock().expect("lock");
                    for o in offsets {
                        let seen = c.entry((GROUP.to_owned(), o.partition)).or_default();
                        if seen.last() != Some(&o.offset) {
                            events.log(format_args!("committed {}@{}", o.partition, o.offset));
                            seen.push(o.offset);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The schedule.
    let started = Instant::now();
    let mut timeline = Vec::new();
    for f in &faults {
        let Fault {
            after_ms,
            kind,
            target,
            hold_ms,
            lose_responses,
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
        let hold = Duration::from_millis(hold_ms);
        let mut what = if kind == FaultKind::PowerLossAll {
            "every broker".to_owned()
        } else {
            format!("broker {node} ({target:?})")
        };
        if let Some(n) = lose_responses {
            what.push_str(&format!(
                ", with responses lost on the clients' link to broker {n}"
            ));
        }
        events.log(format_args!("fault {kind:?} {what} for {hold_ms} ms"));
        // A second fault during the hold that takes no replica down: the clients' link to a
        // broker loses responses, so they retry into the failover the first fault causes.
        let overlap = async {
            if let Some(n) = lose_responses {
                let proxy = &proxies[n as usize - 1];
                let until = Instant::now() + hold;
                while Instant::now() < until {
                    proxy.drop_next_response();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let action = async {
            match kind {
                FaultKind::Kill => {
                    cluster.node(node).kill9();
                    tokio::time::sleep(hold).await;
                    cluster.node(node).restart();
                }
                FaultKind::Pause => {
                    let pid = cluster.node(node).pid().expect("running").to_string();
                    let _ = std::process::Command::new("kill")
                        .args(["-STOP", &pid])
                        .status();
                    tokio::time::sleep(hold).await;
                    let _ = std::process::Command::new("kill")
                        .args(["-CONT", &pid])
                        .status();
                }
                FaultKind::DropResponses => {
                    let proxy = &proxies[node as usize - 1];
                    let until = Instant::now() + hold;
                    while Instant::now() < until {
                        proxy.drop_next_response();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                FaultKind::Isolate | FaultKind::OneWay | FaultKind::CutPair => {
                    let others: Vec<String> = (1..=3).filter(|i| *i != node).map(ip).collect();
                    let cut = match kind {
                        FaultKind::Isolate => NetPartition::isolate(&ip(node), &others),
                        FaultKind::OneWay => NetPartition::one_way(&ip(node), &others),
                        // The next broker by id: the third one still sees both.
                        _ => NetPartition::isolate(&ip(node), &[ip(node % 3 + 1)]),
                    }
                    .expect("iptables");
                    tokio::time::sleep(hold).await;
                    cut.heal();
                }
                FaultKind::PowerLoss => {
                    cluster.node(node).power_loss();
                    tokio::time::sleep(hold).await;
                    cluster.node(node).restart();
                }
                FaultKind::FailFsync => {
                    cluster.node(node).toggle_failing_fsyncs();
                    tokio::time::sleep(hold).await;
                    cluster.node(node).toggle_failing_fsyncs();
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
                                events.log(format_args!("replace-broker {node}: {e}; retrying"));
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
            }
        };
        tokio::join!(action, overlap);
        timeline.push(format!("{at:>6} ms  {kind:?} {what} for {hold_ms} ms"));
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
    }
    let fault_time = started.elapsed();

    // Quiet period, then stop the writers and let the consumer catch up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer task");
    }
    let mut final_log = BTreeMap::new();
    let mut log_start = BTreeMap::new();
    for p in 0..PARTITIONS {
        final_log.insert(p, read_partition(&client, TOPIC, p, false).await);
        let t = client
            .admin()
            .describe_topic(TOPIC)
            .await
            .expect("describe");
        log_start.insert(p, t.partitions[p as usize].log_start_offset);
    }
    let total: usize = final_log.values().map(BTreeMap::len).sum();
    let deadline = Instant::now() + WAIT;
    loop {
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        for (p, o, _) in consumed.lock().expect("lock").iter() {
            last.insert(*p, (*o).max(last.get(p).copied().unwrap_or(0)));
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
                "seed {seed}: the group consumer never caught up (consumed up to {last:?}); broker logs and the event history in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer_stop.store(true, Ordering::Relaxed);
    consumer.await.expect("consumer task");
    observer.await.expect("observer task");

    // Every replica's committed prefix, from the files of the stopped brokers.
    let hwm: BTreeMap<u32, u64> = final_log
        .iter()
        .map(|(p, l)| (*p, l.keys().next_back().map_or(0, |o| o + 1)))
        .collect();
    for n in &mut cluster.nodes {
        let status = n.terminate();
        assert!(status.success(), "broker {} exited with {status}", n.id);
    }
    let mut replicas = BTreeMap::new();
    for id in 1..=3u32 {
        let mut per = BTreeMap::new();
        for p in 0..PARTITIONS {
            let rows = replica_batches(&cluster.replica_dir(id, TOPIC, p));
            let prefix: Vec<String> = committed_prefix(&rows, hwm[&p])
                .iter()
                .map(|r| format!("{}:{}:{}:{}:{:08x}", r.0, r.1, r.2, r.3, r.4))
                .collect();
            per.insert(p, prefix);
        }
        replicas.insert(id, per);
    }

    let history = History {
        writes: writes.lock().expect("lock").clone(),
        final_log,
        log_start,
        consumed: [("member".to_owned(), consumed.lock().expect("lock").clone())].into(),
        commits: commits.lock().expect("lock").clone(),
        replicas,
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
