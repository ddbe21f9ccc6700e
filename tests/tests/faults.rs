//! The fault-injection run: real brokers under load from idempotent `acks=all` producers and
//! two committing members of one consumer group (`faults/load.rs`), while a seeded schedule
//! kills (`kill -9`), pauses (SIGSTOP longer than an election timeout), isolates (iptables
//! between the brokers' own loopback addresses, when run as root), degrades their links (delay,
//! jitter, loss and duplicates, as root), steps their wall clocks (libfaketime), cuts the power
//! of (losing every byte not fsynced), fails the fsyncs of, wipes and flips bits on brokers
//! (`faults/inject.rs`, `faults/changes.rs`): partition leaders, the metadata leader, the group
//! coordinator; and once cuts the power of the whole cluster. After healing, the recorded
//! history, with every replica's log as read from the stopped brokers' files and the group's
//! commits from the offsets topic, is checked against the brief's invariants
//! (`keel_tests::faults::check`).
//!
//! Three runs: three brokers with the topic fsyncing every batch (the default durability);
//! three with flushing left to the OS (`flush.messages` > 1), which is promised nothing across
//! power losses and so runs without them; and five brokers, two faults at a time, with
//! partitions moved and a broker decommissioned under faults.
//!
//! `cargo test` runs a short schedule of each. Longer runs and replays:
//!   KEEL_FAULT_BROKERS=3|5 KEEL_FAULT_FLUSH=fsync|os KEEL_FAULT_SEED=S KEEL_FAULT_COUNT=N cargo test -p keel-tests --test faults -- --nocapture

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::Client;
use keel_tests::cluster::{
    ClusterProc, NetPartition, replica_batches, replica_entries, replica_values,
};
use keel_tests::fake_clock::FakeClock;
use keel_tests::faults::retention::{CounterTotal, retention_can_delete};
use keel_tests::faults::{
    Batch, Fault, FaultKind, History, Kinds, Member, MemberEvent, MetadataCopies, OffsetsEntry,
    Params, Replicas, Target, check, first_pass, first_pass_pairs, schedule, schedule_pairs,
    wipes_wanted,
};
use keel_tests::link_degrade::DegradedLinks;
use keel_tests::proxy::FaultProxy;
use keel_tests::records::read_partition;

#[path = "faults/changes.rs"]
mod changes;
#[path = "faults/inject.rs"]
mod inject;
#[path = "faults/load.rs"]
mod load;
#[path = "faults/observe.rs"]
mod observe;

use changes::{decommission, flip_and_await_repair, reassign};
use load::{Events, Writes, member, produce};
use observe::{
    all_in_sync, leader_of, leader_reports, metadata_converged, metadata_voters, resolve,
    sample_retention, topic_in_sync,
};

pub(crate) const TOPIC: &str = "jepsen";
pub(crate) const PARTITIONS: u32 = 3;
pub(crate) const GROUP: &str = "checker";
/// The brokers' internal topic of committed offsets: its replicas are compared too.
const OFFSETS_TOPIC: &str = "__consumer_offsets";
pub(crate) const WAIT: Duration = Duration::from_secs(90);

/// (group, partition) to the committed offsets observed, in order: (when seen in µs, offset).
type Commits = BTreeMap<(String, u32), Vec<(u64, u64)>>;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
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

/// One run at a time: each loads three or five brokers, and two at once on two cores would measure
/// the machine rather than the brokers.
static RUNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    // Healed also means the metadata group has all its voters back (a replaced broker is
    // promoted again once caught up): a second wipe before that would leave it without a
    // majority of what remains, which no single fault may do.
    let deadline = Instant::now() + WAIT;
    let mut voters_at_start = 0;
    while voters_at_start < nodes.min(3) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        voters_at_start = metadata_voters(&cluster).await;
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
                                Err(e) => {
                                    let logs = cluster.preserve_logs();
                                    keep_history(&logs);
                                    panic!(
                                        "seed {seed}: replace-broker {node} failed: {e}; broker logs and the event history in {}",
                                        logs.display()
                                    )
                                }
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
        while !(all_in_sync(&client).await && metadata_voters(&cluster).await >= voters_at_start) {
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

    // The metadata log's copies, compared by Raft index (checker: `metadata.rs`).
    let metadata = MetadataCopies {
        leader: meta_leader,
        applied_by_all: meta_index,
        logs: cluster
            .nodes
            .iter()
            .map(|n| {
                let rows = replica_entries(&cluster.metadata_log_dir(n.id));
                (
                    n.id,
                    rows.into_iter()
                        .map(|(i, term, crc)| Batch::from((i, term, 0, 0, crc)))
                        .collect(),
                )
            })
            .collect(),
    };
    println!(
        "replicas compared with their leader's copy: {} partitions of {TOPIC} and {OFFSETS_TOPIC}, and the metadata log up to Raft index {meta_index:?}",
        replicas.len()
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
        metadata: Some(metadata),
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
