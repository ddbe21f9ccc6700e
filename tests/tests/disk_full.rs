//! A broker whose disk fills up: its replicas stop (Raft refuses to go on after a failed
//! write), the other two keep acknowledging, and once space returns the broker restarts the
//! stopped replicas by itself, cuts any torn tail by CRC, catches up, and ends byte-identical
//! to the others. A single broker (a one-voter replica) reports the full disk to producers as
//! `DISK_FULL`, like any other. Needs root (a small tmpfs is the full disk); skipped otherwise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_client::{ProducerConfig, ProducerRecord};
use keel_proto::v1::produce_batch::Data;
use keel_proto::v1::{Acks, CreateTopicRequest, ProduceBatch, ProduceRequest};
use keel_tests::broker::BrokerProc;
use keel_tests::cluster::{ClusterProc, assert_acked_and_replicas_identical};
use keel_tests::records::encode_batch;

const TOPIC: &str = "filling";
const WAIT: Duration = Duration::from_secs(60);

/// Unmounts the tmpfs however the test ends, so the temporary directory can be removed.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A new directory `name` below `parent` that is a tmpfs of `size`, unmounted when dropped;
/// `None` (the test skips) when this process may not mount (needs root).
fn tmpfs(parent: &std::path::Path, name: &str, size: &str) -> Option<Mounted> {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("skipping the full-disk test: cannot mount a tmpfs (needs root)");
        return None;
    }
    Some(Mounted(dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_only_that_replica_and_it_recovers_once_space_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mounted) = tmpfs(dir.path(), "node-3", "96m") else {
        return;
    };
    let node3 = mounted.0.clone();
    let mut cluster = ClusterProc::start(dir.path(), 3);
    let client = keel_tests::cluster::client(&cluster).await;
    client
        .admin()
        .create_topic(
            TOPIC,
            1,
            3,
            [("segment.bytes".to_owned(), "4194304".to_owned())].into(),
        )
        .await
        .expect("create");

    // Write until broker 3 has stopped its replica for lack of space; keep every ack.
    let producer = client
        .producer(ProducerConfig::default())
        .expect("producer");
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let value = "x".repeat(900);
    let mut i = 0u64;
    let deadline = Instant::now() + WAIT;
    let mut full = false;
    while !full {
        assert!(Instant::now() < deadline, "broker 3's disk never filled up");
        let mut pending = Vec::new();
        for _ in 0..2000 {
            let v = format!("{i:08}-{value}");
            pending.push((
                v.clone(),
                producer
                    .send(ProducerRecord::new(TOPIC, v).partition(0))
                    .await
                    .expect("send"),
            ));
            i += 1;
        }
        for (v, ack) in pending {
            let m = ack.await.expect("the two brokers with space acknowledge");
            acked.insert(m.offset.expect("offset"), v);
        }
        full = client
            .admin()
            .describe_topic(TOPIC)
            .await
            .is_ok_and(|t| !t.partitions[0].in_sync.contains(&3));
    }
    println!(
        "broker 3 fell out of sync with a full disk after {} records",
        acked.len()
    );
    assert!(
        cluster.node(3).is_running(),
        "a full disk must not kill the broker"
    );

    // Space returns: the replica restarts by itself and catches up.
    assert!(
        Command::new("mount")
            .args(["-o", "remount,size=1g"])
            .arg(&node3)
            .status()
            .is_ok_and(|s| s.success()),
        "growing the tmpfs"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let synced = client
            .admin()
            .describe_topic(TOPIC)
            .await
            .is_ok_and(|t| t.partitions[0].in_sync.len() == 3);
        if synced {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "broker 3 never caught up after space returned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    producer.close().await.expect("close");

    // Nothing acknowledged was lost, and the replicas are byte-identical.
    assert_acked_and_replicas_identical(&mut cluster, &client, TOPIC, 0, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_broker_with_a_full_disk_answers_disk_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(data) = tmpfs(dir.path(), "data", "48m") else {
        return;
    };
    let broker = BrokerProc::start(&data.0, 1);
    broker
        .admin()
        .await
        .create_topic(CreateTopicRequest {
            name: TOPIC.into(),
            partitions: 1,
            replication_factor: 0,
            config: [("segment.bytes".to_owned(), "4194304".to_owned())].into(),
        })
        .await
        .expect("create");
    let value = "x".repeat(60_000);
    let values: Vec<&str> = (0..16).map(|_| value.as_str()).collect();
    let batch = encode_batch(&values, keel_batch::Compression::None, Default::default());
    let mut producer = broker.producer().await;
    let deadline = Instant::now() + WAIT;
    let status = loop {
        assert!(Instant::now() < deadline, "the disk never filled up");
        let req = ProduceRequest {
            correlation_id: 1,
            topic: TOPIC.into(),
            acks: Acks::All as i32,
            timeout_ms: 0,
            batches: vec![ProduceBatch {
                partition: Some(0),
                data: Some(Data::RecordBatch(batch.clone())),
                producer: None,
            }],
        };
        match producer.produce(req).await {
            Ok(_) => {}
            Err(status) => break status,
        }
    };
    let reason = status
        .metadata()
        .get("keel-error")
        .and_then(|v| v.to_str().ok());
    assert_eq!(reason, Some("DISK_FULL"), "{status:?}");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
}
