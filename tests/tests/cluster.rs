//! Real three-broker clusters on loopback: leader and follower crashes (`kill -9`) under
//! `acks=all`, catch-up, byte-identical replicas, metadata leader loss and whole-cluster
//! restarts. Every wait is on a condition with a bound, never a fixed sleep.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keel_client::{Client, ConsumerConfig, ProducerRecord, SeekTo};
use keel_tests::broker::metric;
use keel_tests::cluster::{
    ClusterProc, NetPartition, client, cluster_with_topic, committed_prefix, replica_batches,
};
use keel_tests::records::{produce_all, producer_config, read_partition};

const WAIT: Duration = Duration::from_secs(30);

/// Reads partition 0 from the beginning up to its high watermark.
async fn read_all(client: &Client, topic: &str) -> BTreeMap<u64, String> {
    read_partition(client, topic, 0, true).await
}

/// Every acknowledged record is at its offset, offsets run 0..n with no gap.
fn check_acknowledged(acks: &[(String, u64)], log: &BTreeMap<u64, String>) {
    let offsets: Vec<u64> = log.keys().copied().collect();
    let expected: Vec<u64> = (0..offsets.len() as u64).collect();
    assert_eq!(offsets, expected, "offsets are not contiguous from 0");
    for (v, o) in acks {
        assert_eq!(
            log.get(o),
            Some(v),
            "acknowledged record {v} is not at its offset {o}"
        );
    }
    let distinct: BTreeSet<u64> = acks.iter().map(|(_, o)| *o).collect();
    assert_eq!(
        distinct.len(),
        acks.len(),
        "two records acknowledged at one offset"
    );
}

/// Stops every node gracefully, then compares the replicas' logs on disk up to `hwm`.
async fn assert_replicas_identical(cluster: &mut ClusterProc, topic: &str, hwm: u64) {
    // Every running replica first applies the whole committed prefix (leadership may have
    // moved since, e.g. back to a preferred replica, leaving the old leader a follower).
    let running: Vec<u32> = cluster
        .nodes
        .iter()
        .filter(|n| n.is_started())
        .map(|n| n.id)
        .collect();
    for id in running {
        wait_caught_up(cluster, topic, id, hwm).await;
    }
    for n in &mut cluster.nodes {
        if n.is_started() {
            assert!(
                n.terminate().success(),
                "broker {} did not exit cleanly",
                n.id
            );
        }
    }
    let logs: Vec<(u32, Vec<_>)> = (1..=cluster.nodes.len() as u32)
        .map(|id| {
            let rows = replica_batches(&cluster.replica_dir(id, topic, 0));
            (id, committed_prefix(&rows, hwm))
        })
        .collect();
    let tails: Vec<String> = logs
        .iter()
        .map(|(id, rows)| {
            format!(
                "replica {id}: {} batches, last {:?}",
                rows.len(),
                rows.last()
            )
        })
        .collect();
    let complete = logs
        .iter()
        .all(|(_, rows)| rows.last().is_some_and(|r| r.3 >= hwm));
    let identical = logs.iter().all(|(_, rows)| *rows == logs[0].1);
    if !(complete && identical) {
        let kept = cluster.preserve_logs();
        panic!(
            "replicas disagree on the committed prefix up to offset {hwm} (complete: {complete}, identical: {identical}): {tails:?}; broker logs kept in {}",
            kept.display()
        );
    }
}

/// Waits until the partition leader reports broker `id` in sync for partition 0. Only a
/// leader's own answer counts (brokers are ready only once their metadata is current, but a
/// follower's view of the leader's report can lag).
async fn wait_in_sync(cluster: &ClusterProc, topic: &str, id: u32) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        for n in cluster.nodes.iter().filter(|n| n.is_started()) {
            // Broker `id` itself leading counts too: the preferred-leader hand-back gives the
            // leadership back to it once it has caught up, and then nobody else reports it.
            if let Some(t) = cluster.describe_on(n.id, topic).await
                && t.partitions[0].leader == n.id
                && t.partitions[0].in_sync.contains(&id)
            {
                return;
            }
        }
        if std::time::Instant::now() >= deadline {
            let logs = cluster.preserve_logs();
            panic!(
                "broker {id} never caught up on {topic}; broker logs in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until broker `id`'s own replica of partition 0 has applied everything up to `hwm`
/// (its high watermark, which only committed batches it holds advance).
async fn wait_caught_up(cluster: &ClusterProc, topic: &str, id: u32, hwm: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(t) = cluster.describe_on(id, topic).await
            && t.partitions[0].high_watermark >= hwm
        {
            return;
        }
        if std::time::Instant::now() >= deadline {
            let kept = cluster.preserve_logs();
            panic!(
                "broker {id} never caught up on {topic} to offset {hwm}; broker logs kept in {}",
                kept.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw `acks=all` Produce of one record to partition 0 (no client, so no retries).
fn one_record(topic: &str, value: &str) -> keel_proto::v1::ProduceRequest {
    keel_proto::v1::ProduceRequest {
        topic: topic.into(),
        acks: keel_proto::v1::Acks::All as i32,
        batches: vec![keel_proto::v1::ProduceBatch {
            partition: Some(0),
            data: Some(keel_proto::v1::produce_batch::Data::Records(
                keel_proto::v1::RecordList {
                    records: vec![keel_proto::v1::Record {
                        value: Some(value.as_bytes().to_vec().into()),
                        ..Default::default()
                    }],
                },
            )),
            producer: None,
        }],
        ..Default::default()
    }
}

fn values(from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("value-{i:06}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_under_acks_all_loses_nothing_and_replicas_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, client) = cluster_with_topic(dir.path(), "orders", 1, 3).await;
    let leader = cluster.wait_leader("orders", 0, WAIT).await;

    let mut acks = produce_all(&client, "orders", values(0, 2000)).await;
    // Kill the leader while the next records are in flight.
    let c2 = client.clone();
    let writer = tokio::spawn(async move { produce_all(&c2, "orders", values(2000, 6000)).await });
    let t0 = std::time::Instant::now();
    while !writer.is_finished() && t0.elapsed() < Duration::from_millis(30) {
        tokio::task::yield_now().await;
    }
    cluster.node(leader).kill9();
    acks.extend(writer.await.expect("writer task"));
    let new_leader = cluster.wait_leader("orders", 0, WAIT).await;
    assert_ne!(new_leader, leader, "a live broker took over");

    let log = read_all(&client, "orders").await;
    check_acknowledged(&acks, &log);
    // The producer is idempotent (the default): batches retried across the failover were
    // written once.
    assert_eq!(log.len(), 6000, "every record exactly once");

    // The old leader comes back as a follower and catches up.
    cluster.node(leader).restart();
    let hwm = log.len() as u64;
    wait_in_sync(&cluster, "orders", leader).await;
    assert_replicas_identical(&mut cluster, "orders", hwm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_follower_catches_up_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, client) = cluster_with_topic(dir.path(), "events", 1, 3).await;
    let leader = cluster.wait_leader("events", 0, WAIT).await;
    let follower = (1..=3).find(|i| *i != leader).expect("a follower");

    let mut acks = produce_all(&client, "events", values(0, 1000)).await;
    cluster.node(follower).kill9();
    // With one replica of three down, acks=all still succeeds (a majority remains).
    acks.extend(produce_all(&client, "events", values(1000, 4000)).await);
    cluster.node(follower).restart();
    acks.extend(produce_all(&client, "events", values(4000, 5000)).await);

    let log = read_all(&client, "events").await;
    check_acknowledged(&acks, &log);
    assert_eq!(
        log.len(),
        5000,
        "no record was duplicated without a failure"
    );
    let hwm = log.len() as u64;
    wait_in_sync(&cluster, "events", follower).await;
    assert_replicas_identical(&mut cluster, "events", hwm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_leader_loss_and_whole_cluster_restart_keep_topics_and_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = ClusterProc::start(dir.path(), 3);
    let client = client(&cluster).await;
    let admin = client.admin();
    admin
        .create_topic("a", 3, 3, BTreeMap::new())
        .await
        .expect("create a");
    let meta_leader = admin
        .describe_cluster()
        .await
        .expect("describe cluster")
        .metadata_leader;
    assert!(meta_leader != 0, "a metadata leader is elected");

    // Create topics while the metadata leader dies: each create either succeeds or fails
    // cleanly; the ones that succeeded exist afterwards.
    let c2 = client.clone();
    let creator = tokio::spawn(async move {
        let admin = c2.admin();
        let mut created = Vec::new();
        for i in 0..6 {
            let name = format!("t{i}");
            if admin
                .create_topic(&name, 1, 3, BTreeMap::new())
                .await
                .is_ok()
            {
                created.push(name);
            }
        }
        created
    });
    cluster.node(meta_leader).kill9();
    let created = creator.await.expect("creator");
    assert!(
        !created.is_empty(),
        "creates succeed once a new metadata leader is elected"
    );
    let target = created.last().expect("a created topic").clone();
    let acks = produce_all(&client, &target, values(0, 500)).await;

    // Restart the whole cluster: topics and acknowledged data survive.
    for n in &mut cluster.nodes {
        if n.is_started() {
            assert!(n.terminate().success());
        }
    }
    cluster.restart_stopped();
    let client = Client::connect(&cluster.broker_list())
        .await
        .expect("reconnect");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let topics: BTreeSet<String> = client
            .admin()
            .list_topics()
            .await
            .map(|ts| ts.into_iter().map(|t| t.name).collect())
            .unwrap_or_default();
        if created.iter().all(|t| topics.contains(t)) && topics.contains("a") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "topics missing after restart: {topics:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_leader(&target, 0, WAIT).await;
    let log = read_all(&client, &target).await;
    check_acknowledged(&acks, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_retention_catches_up_by_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster =
        ClusterProc::start_with(dir.path(), 3, &["--retention-check-interval-ms", "200"]);
    let client = client(&cluster).await;
    let config: BTreeMap<String, String> =
        [("segment.bytes", "4096"), ("retention.bytes", "16384")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    client
        .admin()
        .create_topic("ret", 1, 3, config)
        .await
        .expect("create topic");
    let leader = cluster.wait_leader("ret", 0, WAIT).await;
    let follower = (1..=3).find(|i| *i != leader).expect("a follower");
    let mut acks = produce_all(&client, "ret", values(0, 10)).await;
    cluster.node(follower).kill9();

    // Enough data for retention to delete segments the stopped follower never received.
    acks.extend(produce_all(&client, "ret", values(10, 3000)).await);
    // Retention runs on each replica by itself: wait for both live ones.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut purged = true;
        for id in (1..=3).filter(|i| *i != follower) {
            let start = cluster
                .describe_on(id, "ret")
                .await
                .map_or(0, |t| t.partitions[0].log_start_offset);
            purged &= start > 100;
        }
        if purged {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    cluster.node(follower).restart();
    wait_in_sync(&cluster, "ret", follower).await;
    acks.extend(produce_all(&client, "ret", values(3000, 3100)).await);
    wait_in_sync(&cluster, "ret", follower).await;

    // Consumers see the retained suffix, every acknowledged record in it at its offset.
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign(&[("ret", 0)]);
    consumer
        .seek("ret", 0, SeekTo::Beginning)
        .await
        .expect("seek");
    let mut log = BTreeMap::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        for r in consumer
            .poll(Duration::from_millis(500))
            .await
            .expect("poll")
        {
            log.insert(
                r.offset,
                String::from_utf8(r.value.map(|b| b.to_vec()).unwrap_or_default()).expect("utf8"),
            );
        }
        let hwm = consumer.high_watermark("ret", 0).unwrap_or(0);
        if hwm >= 3100 && consumer.position("ret", 0) == Some(hwm) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "reading timed out");
    }
    let first = *log.keys().next().expect("records");
    assert!(first > 0, "retention deleted the oldest records");
    let offsets: Vec<u64> = log.keys().copied().collect();
    assert_eq!(
        offsets,
        (first..first + log.len() as u64).collect::<Vec<_>>()
    );
    for (v, o) in acks.iter().filter(|(_, o)| *o >= first) {
        assert_eq!(log.get(o), Some(v), "acknowledged {v} missing at {o}");
    }
    let hwm = first + log.len() as u64;
    for id in 1..=3 {
        wait_caught_up(&cluster, "ret", id, hwm).await;
    }

    for n in &mut cluster.nodes {
        assert!(n.terminate().success());
    }
    let rows: Vec<Vec<_>> = (1..=3)
        .map(|id| committed_prefix(&replica_batches(&cluster.replica_dir(id, "ret", 0)), hwm))
        .collect();
    let f = &rows[follower as usize - 1];
    assert!(
        f.first().is_some_and(|r| r.2 > 0),
        "the follower restarted from a snapshot, not from offset 0: {:?}",
        f.first()
    );
    // Where the replicas overlap (by Raft index), they are byte-identical.
    let from = rows
        .iter()
        .filter_map(|r| r.first().map(|x| x.0))
        .max()
        .expect("rows");
    let tail = |r: &Vec<keel_tests::cluster::BatchRow>| -> Vec<_> {
        r.iter().filter(|x| x.0 >= from).copied().collect()
    };
    assert!(!tail(&rows[0]).is_empty());
    assert_eq!(tail(&rows[0]), tail(&rows[1]));
    assert_eq!(tail(&rows[0]), tail(&rows[2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reassign_under_load_keeps_every_acknowledged_record_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, client) = cluster_with_topic(dir.path(), "moving", 1, 2).await;
    let leader = cluster.wait_leader("moving", 0, WAIT).await;
    let before = cluster
        .describe("moving")
        .await
        .expect("describe")
        .partitions[0]
        .replicas
        .clone();
    let outsider = (1..=3)
        .find(|b| !before.contains(b))
        .expect("a broker without a replica");
    let removed = *before.iter().find(|b| **b != leader).expect("a follower");
    let target = vec![leader, outsider];

    let c2 = client.clone();
    let writer = tokio::spawn(async move { produce_all(&c2, "moving", values(0, 4000)).await });
    let moved = client
        .admin()
        .reassign_partition("moving", 0, target.clone())
        .await
        .expect("reassign");
    assert_eq!(moved.partitions[0].replicas, target);
    let mut acks = writer.await.expect("writer");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let p = cluster
            .describe("moving")
            .await
            .expect("describe")
            .partitions[0]
            .clone();
        let mut in_sync = p.in_sync.clone();
        in_sync.sort_unstable();
        let mut want = target.clone();
        want.sort_unstable();
        if p.replicas == target && in_sync == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reassignment did not finish: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    acks.extend(produce_all(&client, "moving", values(4000, 5000)).await);
    let log = read_all(&client, "moving").await;
    check_acknowledged(&acks, &log);
    assert_eq!(log.len(), 5000, "no record was written twice");

    // The replica that was moved away is stopped and its files removed.
    let topics_dir = dir.path().join(format!("node-{removed}")).join("topics");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = std::fs::read_dir(&topics_dir)
            .map(|d| {
                d.filter_map(Result::ok).any(|e| {
                    e.file_name().to_string_lossy().starts_with("moving-")
                        && e.path().join("0").exists()
                })
            })
            .unwrap_or(false);
        if !left {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "broker {removed} still holds the moved replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let hwm = log.len() as u64;
    wait_caught_up(&cluster, "moving", outsider, hwm).await;
    for n in &mut cluster.nodes {
        assert!(n.terminate().success());
    }
    let a = committed_prefix(
        &replica_batches(&cluster.replica_dir(leader, "moving", 0)),
        hwm,
    );
    let b = committed_prefix(
        &replica_batches(&cluster.replica_dir(outsider, "moving", 0)),
        hwm,
    );
    assert_eq!(a, b, "the new replica is byte-identical to the leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_partition_minority_stops_acknowledging_and_nothing_acknowledged_is_lost() {
    let net = 100 + (std::process::id() % 100) as u8;
    let ip = |id: u32| format!("127.0.{net}.{id}");
    match NetPartition::isolate(&ip(250), &[ip(251)]) {
        Some(probe) => probe.heal(),
        None => {
            eprintln!("skipping: iptables is not usable here (needs Linux and root)");
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = ClusterProc::start_own_addresses(dir.path(), 3, net);
    let client = client(&cluster).await;
    client
        .admin()
        .create_topic("split", 1, 3, BTreeMap::new())
        .await
        .expect("create topic");
    let leader = cluster.wait_leader("split", 0, WAIT).await;
    let mut acks = produce_all(&client, "split", values(0, 500)).await;

    let others: Vec<u32> = (1..=3).filter(|i| *i != leader).collect();
    let cut = NetPartition::isolate(
        &ip(leader),
        &others.iter().map(|i| ip(*i)).collect::<Vec<_>>(),
    )
    .expect("iptables worked a moment ago");

    // The isolated leader cannot acknowledge an acks=all write.
    let mut direct = cluster.node(leader).producer().await;
    let minority = direct
        .produce(keel_proto::v1::ProduceRequest {
            timeout_ms: 3000,
            ..one_record("split", "minority-write")
        })
        .await;
    assert!(
        minority.is_err(),
        "the minority side acknowledged a write: {minority:?}"
    );

    // The majority side elects a leader and keeps acknowledging.
    let majority: Vec<String> = others
        .iter()
        .map(|i| cluster.node(*i).grpc.clone())
        .collect();
    let majority_client = Client::connect(&majority).await.expect("connect");
    acks.extend(produce_all(&majority_client, "split", values(500, 1500)).await);

    cut.heal();
    wait_in_sync(&cluster, "split", leader).await;
    acks.extend(produce_all(&client, "split", values(1500, 1600)).await);
    let log = read_all(&client, "split").await;
    check_acknowledged(&acks, &log);
    assert!(
        !log.values().any(|v| v == "minority-write"),
        "a write the minority never acknowledged became visible"
    );
    let hwm = log.len() as u64;
    wait_in_sync(&cluster, "split", leader).await;
    assert_replicas_identical(&mut cluster, "split", hwm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_broker_takes_over_a_decommissioned_brokers_replicas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, client) = cluster_with_topic(dir.path(), "dec", 2, 3).await;
    cluster.wait_leader("dec", 0, WAIT).await;
    let mut acks = produce_all(&client, "dec", values(0, 1000)).await;

    // Broker 4 joins through one broker that is not the metadata leader (which must pass the
    // registration on).
    let meta_leader = client
        .admin()
        .describe_cluster()
        .await
        .expect("describe cluster")
        .metadata_leader;
    let via = (1..=3u32).find(|i| *i != meta_leader).expect("a follower");
    let join_addr = cluster.node(via).grpc.clone();
    let joiner = keel_tests::broker::BrokerProc::start_with(
        &dir.path().join("node-4"),
        4,
        &["--join", &join_addr],
    );
    cluster.nodes.push(joiner);
    cluster.wait_all_alive(4);

    // Empty broker 2: its replicas move, and with 3 other brokers each lands on broker 4.
    let moved = client
        .admin()
        .decommission_broker(2)
        .await
        .expect("decommission");
    assert_eq!(moved, vec!["dec/0".to_owned(), "dec/1".to_owned()]);
    acks.extend(produce_all(&client, "dec", values(1000, 2000)).await);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let t = client
            .admin()
            .describe_topic("dec")
            .await
            .expect("describe");
        let done = t.partitions.iter().all(|p| {
            let mut s = p.in_sync.clone();
            s.sort_unstable();
            s == vec![1, 3, 4] && !p.replicas.contains(&2)
        });
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas did not move off broker 2: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New topics avoid the decommissioned broker.
    let t = client
        .admin()
        .create_topic("after", 3, 3, BTreeMap::new())
        .await
        .expect("create after decommission");
    assert!(
        t.partitions.iter().all(|p| !p.replicas.contains(&2)),
        "{t:?}"
    );
    // Broker 2 can now stop without under-replicating anything.
    assert!(cluster.node(2).terminate().success());
    acks.extend(produce_all(&client, "dec", values(2000, 2500)).await);
    let log = read_all(&client, "dec").await;
    let ours: Vec<(String, u64)> = acks.clone();
    check_acknowledged(&ours, &log);
}

/// Reads partition `p` from the beginning up to its high watermark: offset → value.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_no_produce_and_loses_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, client) = cluster_with_topic(dir.path(), "roll", 3, 3).await;
    for p in 0..3 {
        cluster.wait_leader("roll", p, WAIT).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let producer = client.producer(producer_config()).expect("producer");
            let mut pending = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let v = format!("roll-{i:08}");
                let p = (i % 3) as u32;
                let fut = producer
                    .send(ProducerRecord::new("roll", v.clone().into_bytes()).partition(p))
                    .await
                    .expect("send");
                pending.push((v, p, fut));
                i += 1;
                if i.is_multiple_of(200) {
                    tokio::task::yield_now().await;
                }
            }
            let mut acks = Vec::with_capacity(pending.len());
            for (v, p, fut) in pending {
                let md = fut.await.unwrap_or_else(|e| {
                    panic!("record {v} failed during the rolling restart: {e}")
                });
                acks.push((v, p, md.offset.expect("offset")));
            }
            producer.close().await.expect("close");
            acks
        })
    };

    // Restart every broker in turn with SIGTERM, waiting for it to catch up before the next.
    for id in 1..=3u32 {
        let status = cluster.node(id).terminate();
        assert!(status.success(), "broker {id} exit status {status}");
        cluster.node(id).relaunch();
        cluster.node(id).wait_ready();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let mut caught_up = true;
            for p in 0..3u32 {
                let leader_hwm = {
                    let mut hwm = None;
                    for n in cluster
                        .nodes
                        .iter()
                        // The leader's own answer; it may be broker `id` itself after the
                        // preferred-leader hand-back, and then it is caught up by definition.
                        .filter(|n| n.is_started())
                    {
                        if let Some(t) = cluster.describe_on(n.id, "roll").await
                            && t.partitions[p as usize].leader == n.id
                        {
                            hwm = Some(t.partitions[p as usize].high_watermark);
                        }
                    }
                    hwm
                };
                let mine = cluster
                    .describe_on(id, "roll")
                    .await
                    .map(|t| t.partitions[p as usize].high_watermark);
                caught_up &= match (leader_hwm, mine) {
                    (Some(l), Some(m)) => m + 5000 >= l,
                    _ => false,
                };
            }
            if caught_up {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "broker {id} did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.store(true, Ordering::Release);
    let acks = writer.await.expect("writer");
    assert!(
        acks.len() > 1000,
        "the producer kept writing ({} records)",
        acks.len()
    );

    for p in 0..3u32 {
        let log = read_partition(&client, "roll", p, false).await;
        let offsets: Vec<u64> = log.keys().copied().collect();
        assert_eq!(
            offsets,
            (0..log.len() as u64).collect::<Vec<_>>(),
            "partition {p} has a gap"
        );
        for (v, _, o) in acks.iter().filter(|(_, q, _)| *q == p) {
            assert_eq!(
                log.get(o),
                Some(v),
                "acknowledged {v} missing from {p} at {o}"
            );
        }
    }
}

/// `keel_quiet_partitions` of a broker (0 if unreadable).
fn quiet_partitions(node: &keel_tests::broker::BrokerProc) -> u64 {
    keel_tests::broker::http_get(&node.http, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find_map(|l| l.strip_prefix("keel_quiet_partitions "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_partition_goes_quiet_and_its_first_write_succeeds_without_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, client) = cluster_with_topic(dir.path(), "sleepy", 1, 3).await;
    let leader = cluster.wait_leader("sleepy", 0, WAIT).await;
    let acks = produce_all(&client, "sleepy", values(0, 100)).await;

    // Every replica goes quiet once the partition is idle (no ticks, no heartbeats).
    let deadline = std::time::Instant::now() + WAIT;
    while !cluster.nodes.iter().all(|n| quiet_partitions(n) >= 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the partition never went quiet"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cluster.wait_leader("sleepy", 0, WAIT).await,
        leader,
        "going quiet does not move leadership"
    );

    // One raw Produce to the quiet leader, no client retries: it must succeed.
    let mut direct = cluster.node(leader).producer().await;
    let resp = direct
        .produce(one_record("sleepy", "wake-up"))
        .await
        .expect("the first write to a quiet partition is accepted");
    assert_eq!(resp.into_inner().batches[0].base_offset, 100);

    // A restarted follower does not depose the quiet leader, and catches up.
    let deadline = std::time::Instant::now() + WAIT;
    while !cluster.nodes.iter().all(|n| quiet_partitions(n) >= 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the partition never went quiet again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not the preferred replica: leadership may legitimately go back to that one (the
    // preferred-leader hand-back) at any time, but never to the restarted follower.
    let preferred = cluster
        .describe("sleepy")
        .await
        .expect("describe")
        .partitions[0]
        .replicas[0];
    let follower = (1..=3)
        .find(|i| *i != leader && *i != preferred)
        .expect("a follower");
    assert!(cluster.node(follower).terminate().success());
    cluster.node(follower).restart();
    wait_caught_up(&cluster, "sleepy", follower, 101).await;
    let now = cluster.wait_leader("sleepy", 0, WAIT).await;
    assert!(
        now == leader || now == preferred,
        "the restarted follower {follower} took the leadership from {leader}"
    );
    let log = read_all(&client, "sleepy").await;
    check_acknowledged(&acks, &log);
    assert_eq!(log.get(&100).map(String::as_str), Some("wake-up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_insync_replicas_refuses_acks_all_while_a_replica_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = ClusterProc::start(dir.path(), 3);
    let client = client(&cluster).await;
    client
        .admin()
        .create_topic(
            "strict",
            1,
            3,
            BTreeMap::from([("min.insync.replicas".to_owned(), "3".to_owned())]),
        )
        .await
        .expect("create topic");
    let leader = cluster.wait_leader("strict", 0, WAIT).await;
    wait_in_sync_count(&cluster, "strict", 3).await;
    let acked = produce_all(&client, "strict", values(0, 100)).await;

    // A follower goes down: the leader counts two replicas in sync, fewer than 3.
    let follower = (1..=3u32).find(|i| *i != leader).expect("a follower");
    cluster.node(follower).kill9();
    wait_in_sync_count(&cluster, "strict", 2).await;
    let producer = client
        .producer(producer_config().delivery_timeout(Duration::from_secs(3)))
        .expect("producer");
    let refused = producer
        .send(ProducerRecord::new("strict", b"refused".to_vec()).partition(0))
        .await
        .expect("send")
        .await;
    let err = refused.expect_err("written with two of three replicas in sync");
    assert!(
        format!("{err:?}").contains("NotEnoughReplicas")
            && err.to_string().contains("min.insync.replicas=3"),
        "{err:?}"
    );
    producer.close().await.expect("close producer");

    // Back in sync, writes go through again, and the refused record was never written.
    cluster.node(follower).restart();
    wait_in_sync_count(&cluster, "strict", 3).await;
    let more = produce_all(&client, "strict", values(100, 200)).await;
    let log = read_all(&client, "strict").await;
    assert_eq!(
        log.len(),
        200,
        "only the acknowledged records are in the log"
    );
    for (v, o) in acked.iter().chain(&more) {
        assert_eq!(log.get(o), Some(v));
    }
}

/// Waits until the partition's leader reports `n` replicas in sync.
async fn wait_in_sync_count(cluster: &ClusterProc, topic: &str, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(t) = cluster.describe(topic).await
            && t.partitions[0].leader != 0
            && t.partitions[0].in_sync.len() == n
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{topic}/0 never had {n} replicas in sync"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A follower whose acknowledged, fsynced tail is damaged on disk (recovery cuts it as if it
/// were a torn write) must not help elect a leader without those entries: with the only
/// healthy copy's broker down, it neither stands for election nor votes for the replica that
/// never had them, so the partition waits instead of losing acknowledged records. Once the
/// healthy broker is back, it leads, the damaged replica catches up and votes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_acknowledged_entries_does_not_vote_until_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = ClusterProc::start(dir.path(), 3);
    let client = client(&cluster).await;
    client
        .admin()
        .create_topic("promised", 1, 3, BTreeMap::new())
        .await
        .expect("create topic");
    let healthy = cluster.wait_leader("promised", 0, WAIT).await;
    wait_in_sync_count(&cluster, "promised", 3).await;
    let others: Vec<u32> = (1..=3u32).filter(|i| *i != healthy).collect();
    let (damaged, behind) = (others[0], others[1]);
    let mut acked = produce_all(&client, "promised", values(0, 100)).await;

    // One follower falls behind; the other acknowledges everything that follows.
    cluster.node(behind).kill9();
    acked.extend(produce_all(&client, "promised", values(100, 300)).await);
    cluster.node(damaged).kill9();
    cluster.node(healthy).kill9();
    let lost = damage_last_data_batch(&cluster.replica_dir(damaged, "promised", 0));
    assert!(lost > 0, "the damaged batch held records");

    // Without the healthy broker: the damaged replica (the longer log of the two) would win
    // an election with the other's vote and lose the records it cut. It must not.
    cluster.node(damaged).relaunch();
    cluster.node(behind).relaunch();
    cluster.node(damaged).wait_ready();
    cluster.node(behind).wait_ready();
    let refusals = |c: &ClusterProc| {
        metric(
            &c.nodes[damaged as usize - 1].http,
            "keel_raft_votes_refused_while_repairing_total",
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < deadline {
        for id in [damaged, behind] {
            if let Some(t) = cluster.describe_on(id, "promised").await {
                let leader = t.partitions[0].leader;
                assert!(
                    leader != damaged && leader != behind,
                    "broker {leader} leads while the damaged replica is repairing"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refusals(&cluster) > 0.0,
        "the behind replica asked for votes and was refused"
    );
    assert_eq!(
        metric(
            &cluster.nodes[damaged as usize - 1].http,
            "keel_raft_repairing_groups"
        ),
        1.0
    );

    // The healthy broker returns, leads, and every acknowledged record is there.
    cluster.node(healthy).restart();
    cluster.wait_leader("promised", 0, WAIT).await;
    check_acknowledged(&acked, &read_all(&client, "promised").await);
    let http = cluster.nodes[damaged as usize - 1].http.clone();
    keel_tests::broker::wait_until("the damaged replica to repair", WAIT, || {
        metric(&http, "keel_raft_repaired_groups_total") >= 1.0
            && metric(&http, "keel_raft_repairing_groups") == 0.0
    });

    // Repaired, it votes again: without the healthy broker, the other two elect a leader.
    cluster.node(healthy).kill9();
    let leader = cluster.wait_leader("promised", 0, WAIT).await;
    assert_ne!(leader, healthy);
    acked.extend(produce_all(&client, "promised", values(300, 320)).await);
    check_acknowledged(&acked, &read_all(&client, "promised").await);
}

/// Flips a byte inside the last batch that holds records in a stopped replica's active
/// segment; returns how many records it held.
fn damage_last_data_batch(log_dir: &std::path::Path) -> u64 {
    let mut segments: Vec<_> = std::fs::read_dir(log_dir)
        .expect("list replica")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let active = segments.pop().expect("an active segment");
    let mut bytes = std::fs::read(&active).expect("read segment");
    let mut pos = 64usize;
    let mut last = None;
    for item in keel_batch::BatchIter::new(&bytes[64..]) {
        let Ok((h, raw)) = item else { break };
        if h.next_offset() > h.base_offset {
            last = Some((pos, raw.len(), h.next_offset() - h.base_offset));
        }
        pos += raw.len();
    }
    let (at, len, records) = last.expect("a batch with records");
    bytes[at + len - 5] ^= 0x41;
    std::fs::write(&active, &bytes).expect("write segment");
    records
}
