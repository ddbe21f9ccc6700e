//! A data directory written by a single-node broker from before every broker formed a cluster
//! (a `metadata.json` catalogue and plain partition logs) keeps working: the broker converts
//! it at start-up into a cluster of one, with the same topics, ids, offsets and records, the
//! idempotent producers' state, and the start that retention had already deleted.
//!
//! The old layout is written here the way the old broker wrote it: the catalogue as JSON,
//! the logs through `keel_log::Log::append` (term 0, the next Raft index).

use std::path::Path;

use bytes::Bytes;
use keel_batch::{Compression, ProducerInfo};
use keel_client::Client;
use keel_log::{Log, LogConfig};
use keel_proto::v1::produce_batch::Data;
use keel_proto::v1::{Acks, CreateTopicRequest, ListTopicsRequest, ProduceBatch, ProduceRequest};
use keel_tests::broker::BrokerProc;
use keel_tests::records::{encode_batch, read_partition};

const PRODUCER: i64 = 7;

/// Values of about 110 bytes, so that ten make a batch of over 1 KB and a 4 KiB segment holds
/// three batches.
fn values(partition: u32, from: usize, to: usize) -> Vec<String> {
    (from..to)
        .map(|i| format!("p{partition}-v{i:04}-{}", "x".repeat(100)))
        .collect()
}

fn batch(values: &[String], producer: ProducerInfo) -> Bytes {
    let v: Vec<&str> = values.iter().map(String::as_str).collect();
    encode_batch(&v, Compression::None, producer)
}

/// The old single-node layout: topic `old` (id 2, two partitions) and `gone`'s id retired.
/// Partition 0 has ten batches of ten records in 4 KiB segments, those below offset 40 deleted as
/// by retention; its last batch is an idempotent producer's. Partition 1 is empty.
fn write_old_layout(dir: &Path) -> Bytes {
    let catalogue = serde_json::json!({
        "broker_id": 1,
        "next_topic_id": 3,
        "topics": {
            "old": {
                "name": "old",
                "id": 2,
                "partitions": 2,
                "replication_factor": 1,
                // The records carry a 2023 timestamp (`keel_tests::records`): without
                // `retention.ms=-1` the broker's first retention pass may delete them by time
                // before the test looks, which made this test flaky.
                "config": { "overrides": { "segment.bytes": "4096", "retention.ms": "-1" } }
            }
        },
        "producers": {
            "next_id": 8,
            "epochs": {},
            "instances": {},
            "recent": [],
            "last_grant": {}
        }
    });
    std::fs::write(
        dir.join("metadata.json"),
        serde_json::to_vec_pretty(&catalogue).expect("json"),
    )
    .expect("write catalogue");
    let config = LogConfig {
        segment_bytes: 4096,
        ..LogConfig::default()
    };
    let log = Log::open(dir.join("topics/old-2/0"), config.clone()).expect("open log");
    let mut last = Bytes::new();
    for b in 0..10 {
        let producer = if b == 9 {
            ProducerInfo {
                producer_id: PRODUCER,
                producer_epoch: 0,
                base_sequence: 0,
            }
        } else {
            ProducerInfo::default()
        };
        last = batch(&values(0, b * 10, b * 10 + 10), producer);
        log.append(&last, 0).expect("append");
    }
    assert!(log.delete_before(40).expect("delete") > 0);
    assert_eq!(log.log_start_offset(), 40);
    log.checkpoint().expect("checkpoint");
    drop(log);
    let empty = Log::open(dir.join("topics/old-2/1"), config).expect("open log");
    empty.checkpoint().expect("checkpoint");
    last
}

async fn produce(b: &BrokerProc, topic: &str, partition: u32, bytes: Bytes) -> (u64, u32) {
    let r = b
        .producer()
        .await
        .produce(ProduceRequest {
            correlation_id: 1,
            topic: topic.into(),
            acks: Acks::All as i32,
            timeout_ms: 0,
            batches: vec![ProduceBatch {
                partition: Some(partition),
                data: Some(Data::RecordBatch(bytes)),
                producer: None,
            }],
        })
        .await
        .expect("produce")
        .into_inner();
    let ack = &r.batches[0];
    (ack.base_offset, ack.record_count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_data_directory_is_converted_into_a_cluster_of_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let last_idempotent = write_old_layout(dir.path());

    let mut b = BrokerProc::start(dir.path(), 1);
    b.wait_ready();
    let client = Client::connect(&[b.grpc.clone()]).await.expect("client");
    let topics = b
        .admin()
        .await
        .list_topics(ListTopicsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .topics;
    assert_eq!(topics.len(), 1, "{topics:?}");
    let old = &topics[0];
    assert_eq!(old.name, "old");
    assert_eq!(old.partitions.len(), 2);
    assert_eq!(
        old.config.get("segment.bytes").map(String::as_str),
        Some("4096")
    );
    let p0 = &old.partitions[0];
    assert_eq!((p0.leader, p0.replicas.clone()), (1, vec![1]));
    assert_eq!((p0.log_start_offset, p0.high_watermark), (40, 100));

    // Every record that was there is there, at its offset.
    let read = read_partition(&client, "old", 0, true).await;
    let expected: Vec<(u64, String)> = (40..100).zip(values(0, 40, 100)).collect();
    assert_eq!(read.into_iter().collect::<Vec<_>>(), expected);
    assert!(read_partition(&client, "old", 1, false).await.is_empty());

    // The idempotent producer's last batch is recognised as a duplicate: its state was rebuilt.
    assert_eq!(
        produce(&b, "old", 0, last_idempotent.clone()).await,
        (90, 10)
    );
    // Offsets continue, and the producer's sequence too.
    let next = ProducerInfo {
        producer_id: PRODUCER,
        producer_epoch: 0,
        base_sequence: 10,
    };
    assert_eq!(
        produce(&b, "old", 0, batch(&values(0, 100, 105), next)).await,
        (100, 5)
    );
    assert_eq!(
        produce(
            &b,
            "old",
            1,
            batch(&values(1, 0, 3), ProducerInfo::default())
        )
        .await,
        (0, 3)
    );

    // The old catalogue is kept aside, and a new topic gets the next id (no reuse of 1 or 2).
    assert!(!dir.path().join("metadata.json").exists());
    assert!(dir.path().join("metadata.json.converted").exists());
    b.admin()
        .await
        .create_topic(CreateTopicRequest {
            name: "fresh".into(),
            partitions: 1,
            ..Default::default()
        })
        .await
        .expect("create");
    assert!(dir.path().join("topics/fresh-3/0/log").is_dir());

    // A restart finds everything as it was, and converts nothing again.
    assert_eq!(b.terminate().code(), Some(0));
    b.restart();
    b.wait_ready();
    let client = Client::connect(&[b.grpc.clone()]).await.expect("client");
    let read = read_partition(&client, "old", 0, true).await;
    assert_eq!(read.len(), 65);
    assert_eq!(read.get(&40), values(0, 40, 41).first());
    assert_eq!(read.get(&104), values(0, 104, 105).first());
    assert_eq!(read_partition(&client, "old", 1, true).await.len(), 3);
    assert_eq!(produce(&b, "old", 0, last_idempotent).await, (90, 10));
    assert!(dir.path().join("metadata.json.converted").exists());
    assert_eq!(b.terminate().code(), Some(0));
}
