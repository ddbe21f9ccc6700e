//! Idempotent producers against real brokers: retried batches are written once and answered
//! with their original offsets, across lost responses, leader failover and a whole-cluster
//! restart; gaps and stale epochs are refused with definite errors.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use keel_batch::{Compression, ProducerInfo};
use keel_client::{Client, ClientError, ProducerConfig, ProducerRecord};
use keel_proto::v1::produce_batch::Data;
use keel_proto::v1::produce_service_client::ProduceServiceClient;
use keel_proto::v1::{
    Acks, InitProducerRequest, ProduceBatch, ProduceRequest, ProducerFields, Record, RecordList,
};
use keel_tests::broker::{BrokerProc, free_port};
use keel_tests::cluster::{ClusterProc, cluster_with_topic};
use keel_tests::proxy::FaultProxy;
use keel_tests::records::{encode_batch, read_partition};
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);

fn batch(producer_id: i64, epoch: i16, seq: i32, values: &[String]) -> Bytes {
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let producer = ProducerInfo {
        producer_id,
        producer_epoch: epoch,
        base_sequence: seq,
    };
    encode_batch(&values, Compression::None, producer)
}

fn values(from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("v{i:06}")).collect()
}

fn request(topic: &str, bytes: Bytes) -> ProduceRequest {
    ProduceRequest {
        correlation_id: 1,
        topic: topic.into(),
        acks: Acks::All as i32,
        timeout_ms: 0,
        batches: vec![ProduceBatch {
            partition: Some(0),
            data: Some(Data::RecordBatch(bytes)),
            producer: None,
        }],
    }
}

/// A definite refusal: the broker's reason and whether it says nothing was written.
#[derive(Debug, PartialEq, Eq)]
struct Refused {
    reason: String,
    definite: bool,
}

fn refused(s: &tonic::Status) -> Refused {
    let md = |k: &str| {
        s.metadata()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    Refused {
        reason: md("keel-error"),
        definite: md("keel-definite") == "true",
    }
}

fn refusal(reason: &str) -> Refused {
    Refused {
        reason: reason.into(),
        definite: true,
    }
}

async fn init(p: &mut ProduceServiceClient<Channel>, instance: &str) -> (i64, i16) {
    let r = p
        .init_producer(InitProducerRequest {
            instance_id: instance.into(),
            request_id: 0,
            ..Default::default()
        })
        .await
        .expect("init producer")
        .into_inner();
    (r.producer_id, r.producer_epoch as i16)
}

/// Produces one encoded batch on whichever broker leads partition 0, following leader changes;
/// returns its base offset or the broker's definite refusal.
async fn produce_on_leader(
    cluster: &ClusterProc,
    topic: &str,
    bytes: Bytes,
) -> Result<u64, Refused> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let leader = cluster.wait_leader(topic, 0, WAIT).await;
        let mut p = cluster.nodes[leader as usize - 1].producer().await;
        match p.produce(request(topic, bytes.clone())).await {
            Ok(r) => return Ok(r.into_inner().batches[0].base_offset),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => return Err(refused(&s)),
            Err(s) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no leader accepted the batch: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn log_end(cluster: &ClusterProc, topic: &str) -> u64 {
    cluster.describe(topic).await.expect("describe").partitions[0].high_watermark
}

/// Waits until the described high watermark is `want` (a broker may report it a moment late),
/// and asserts it never goes past it.
async fn wait_log_end(cluster: &ClusterProc, topic: &str, want: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let end = log_end(cluster, topic).await;
        assert!(
            end <= want,
            "the log end {end} went past {want}: something was written twice"
        );
        if end == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log end stuck at {end}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn read_all(client: &Client, topic: &str) -> BTreeMap<u64, String> {
    read_partition(client, topic, 0, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_deduplicated_across_failover_and_a_full_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The client is made again after the whole-cluster restart below.
    let (mut cluster, _) = cluster_with_topic(dir.path(), "idem", 1, 3).await;
    let mut any = cluster.nodes[0].producer().await;
    let (pid, epoch) = init(&mut any, "").await;
    assert!(
        pid > 0 && epoch == 0,
        "fresh ids start at epoch 0: {pid}/{epoch}"
    );
    let (other, _) = init(&mut any, "").await;
    assert_ne!(pid, other, "producer ids are unique");

    let first = batch(pid, epoch, 0, &values(0, 5));
    let second = batch(pid, epoch, 5, &values(5, 10));
    assert_eq!(
        produce_on_leader(&cluster, "idem", first.clone()).await,
        Ok(0)
    );
    // The same batch again: answered with its original offset, not written.
    assert_eq!(
        produce_on_leader(&cluster, "idem", first.clone()).await,
        Ok(0)
    );
    wait_log_end(&cluster, "idem", 5).await;
    assert_eq!(
        produce_on_leader(&cluster, "idem", batch(pid, epoch, 7, &values(0, 1))).await,
        Err(refusal("OUT_OF_ORDER_SEQUENCE")),
        "a gap is refused, definitely"
    );

    // The new leader after a kill -9 knows the producer's batches.
    let leader = cluster.wait_leader("idem", 0, WAIT).await;
    cluster.node(leader).kill9();
    let new_leader = cluster.wait_leader("idem", 0, WAIT).await;
    assert_ne!(new_leader, leader);
    assert_eq!(
        produce_on_leader(&cluster, "idem", first.clone()).await,
        Ok(0)
    );
    assert_eq!(
        produce_on_leader(&cluster, "idem", second.clone()).await,
        Ok(5)
    );
    assert_eq!(
        produce_on_leader(&cluster, "idem", second.clone()).await,
        Ok(5)
    );
    cluster.node(leader).restart();

    // And so does every broker after the whole cluster restarts.
    for n in &mut cluster.nodes {
        assert!(n.terminate().success());
    }
    for n in &mut cluster.nodes {
        n.relaunch();
    }
    for n in &cluster.nodes {
        n.wait_ready();
    }
    assert_eq!(
        produce_on_leader(&cluster, "idem", second.clone()).await,
        Ok(5)
    );
    assert_eq!(produce_on_leader(&cluster, "idem", first).await, Ok(0));
    let third = batch(pid, epoch, 10, &values(10, 12));
    assert_eq!(produce_on_leader(&cluster, "idem", third).await, Ok(10));
    wait_log_end(&cluster, "idem", 12).await;

    let client = Client::connect(&cluster.broker_list())
        .await
        .expect("connect");
    let log = read_all(&client, "idem").await;
    let expected: BTreeMap<u64, String> = values(0, 12)
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v))
        .collect();
    assert_eq!(log, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_incarnation_fences_the_older_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cluster, client) = cluster_with_topic(dir.path(), "fence", 1, 3).await;
    let mut p = cluster.nodes[1].producer().await;
    let (pid, e0) = init(&mut p, "billing-1").await;
    assert_eq!(
        produce_on_leader(&cluster, "fence", batch(pid, e0, 0, &values(0, 3))).await,
        Ok(0)
    );
    // Another broker hands the same identity the next epoch.
    let mut p3 = cluster.nodes[2].producer().await;
    let (pid2, e1) = init(&mut p3, "billing-1").await;
    assert_eq!((pid2, e1), (pid, e0 + 1));
    // The old incarnation is refused even on a partition the new one has not written yet.
    let mut fenced = None;
    let deadline = std::time::Instant::now() + WAIT;
    while fenced.is_none() {
        match produce_on_leader(&cluster, "fence", batch(pid, e0, 3, &values(3, 4))).await {
            Err(s) => fenced = Some(s),
            // This broker had not applied the new epoch yet; the next attempt sees it. The
            // old incarnation's batch went in meanwhile, and is a retry from now on.
            Ok(_) => {
                assert!(std::time::Instant::now() < deadline, "never fenced");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(fenced, Some(refusal("PRODUCER_FENCED")));
    // The new incarnation starts over at sequence 0.
    let end = log_end(&cluster, "fence").await;
    assert_eq!(
        produce_on_leader(&cluster, "fence", batch(pid, e1, 0, &values(10, 12))).await,
        Ok(end)
    );

    // The Rust client reports the fencing as fatal for the old producer.
    let old = client
        .producer(ProducerConfig::default().instance_id("payments-1"))
        .expect("producer");
    old.send(ProducerRecord::new("fence", "a").partition(0))
        .await
        .expect("send")
        .await
        .expect("delivered");
    let new = client
        .producer(ProducerConfig::default().instance_id("payments-1"))
        .expect("producer");
    new.send(ProducerRecord::new("fence", "b").partition(0))
        .await
        .expect("send")
        .await
        .expect("delivered");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = old
            .send(ProducerRecord::new("fence", "c").partition(0))
            .await
            .expect("send")
            .await;
        match r {
            Err(ClientError::ProducerFenced { .. }) => break,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the old producer was never fenced: {other:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_batches_can_be_idempotent_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(dir.path(), 1);
    let client = Client::connect(&[broker.endpoint()])
        .await
        .expect("connect");
    client
        .admin()
        .create_topic("plain", 2, 1, BTreeMap::new())
        .await
        .expect("create");
    let mut p = broker.producer().await;
    let (pid, epoch) = init(&mut p, "").await;
    let req = |seq: i32, partition: Option<u32>| ProduceRequest {
        correlation_id: 1,
        topic: "plain".into(),
        acks: Acks::All as i32,
        timeout_ms: 0,
        batches: vec![ProduceBatch {
            partition,
            data: Some(Data::Records(RecordList {
                records: (0..3)
                    .map(|i| Record {
                        value: Some(format!("r{i}").into_bytes().into()),
                        ..Default::default()
                    })
                    .collect(),
            })),
            producer: Some(ProducerFields {
                producer_id: pid,
                producer_epoch: i32::from(epoch),
                base_sequence: seq,
            }),
        }],
    };
    let a = p
        .produce(req(0, Some(1)))
        .await
        .expect("first")
        .into_inner();
    let b = p
        .produce(req(0, Some(1)))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(a.batches[0].base_offset, 0);
    assert_eq!(
        b.batches[0].base_offset, 0,
        "a retry gets the original offset"
    );
    let c = p.produce(req(3, Some(1))).await.expect("next").into_inner();
    assert_eq!(c.batches[0].base_offset, 3);
    let e = p.produce(req(0, None)).await.expect_err("no partition");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("partition"), "{e:?}");
    let e = p
        .init_producer(InitProducerRequest {
            instance_id: "x".repeat(300),
            ..Default::default()
        })
        .await
        .expect_err("too long");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("instance_id"), "{e:?}");
}

/// The broker's answer is lost after it wrote the batch (a proxy cuts the connection as the
/// response passes): the client retries and the broker answers with the original offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_responses_are_retried_without_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grpc = format!("127.0.0.1:{}", free_port());
    let proxy = FaultProxy::start(grpc.clone()).await.expect("proxy");
    let broker = BrokerProc::start_on(dir.path(), 1, grpc, &["--advertise", proxy.addr().as_str()]);
    // The single-node broker keeps its producer state across a restart too.
    let client = Client::connect(&[proxy.addr()]).await.expect("connect");
    client
        .admin()
        .create_topic("lossy", 1, 1, BTreeMap::new())
        .await
        .expect("create");
    let config = ProducerConfig::default()
        .linger(Duration::from_millis(1))
        .request_timeout(Duration::from_secs(5))
        .delivery_timeout(Duration::from_secs(60));
    let producer = client.producer(config.clone()).expect("producer");
    let mut acked: Vec<(String, u64)> = Vec::new();
    let rounds = 12;
    for round in 0..rounds {
        let vals = values(round * 10, round * 10 + 10);
        // Every other round loses the broker's answer to its (only) batch.
        if round % 2 == 1 {
            proxy.drop_next_response();
        }
        let mut futs = Vec::new();
        for v in &vals {
            futs.push(
                producer
                    .send(ProducerRecord::new("lossy", v.clone()).partition(0))
                    .await
                    .expect("send"),
            );
        }
        producer.flush().await.expect("flush");
        for (v, f) in vals.into_iter().zip(futs) {
            let md = f.await.unwrap_or_else(|e| panic!("{v} not delivered: {e}"));
            acked.push((v, md.offset.expect("offset")));
        }
    }
    assert!(
        proxy.dropped() >= (rounds / 2) as u64 - 1,
        "the proxy dropped {} answers",
        proxy.dropped()
    );
    producer.close().await.expect("close");

    // Without idempotence the client does not resend what may have been written: the record
    // fails with an error that says so, and nothing is duplicated.
    let plain = client
        .producer(config.idempotence(false))
        .expect("producer");
    proxy.drop_next_response();
    let lost = plain
        .send(ProducerRecord::new("lossy", "not-retried").partition(0))
        .await
        .expect("send")
        .await
        .expect_err("the answer was lost");
    assert!(!lost.is_definite(), "{lost:?}");
    plain.close().await.expect("close");
    acked.push(("not-retried".into(), (rounds * 10) as u64));
    let log = read_all(&client, "lossy").await;
    assert_eq!(log.len(), rounds * 10 + 1, "every record exactly once");
    let distinct: BTreeSet<&String> = log.values().collect();
    assert_eq!(distinct.len(), log.len(), "no record written twice");
    for (i, (v, o)) in acked.iter().enumerate() {
        assert_eq!(*o, i as u64, "{v} acknowledged at its original offset");
        assert_eq!(log.get(o), Some(v));
    }
    drop(broker);
}

/// A batch the broker refuses as a whole (too large for the topic) leaves a gap in its
/// partition's sequence: the producer renumbers the batches behind it, which are delivered in
/// order, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_behind_a_refused_one_are_renumbered_and_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(dir.path(), 1);
    let client = Client::connect(&[broker.endpoint()])
        .await
        .expect("connect");
    client
        .admin()
        .create_topic(
            "strict",
            1,
            1,
            BTreeMap::from([("max.message.bytes".to_owned(), "2000".to_owned())]),
        )
        .await
        .expect("create");
    let producer = client
        .producer(
            ProducerConfig::default()
                .batch_size(1500)
                .linger(Duration::from_millis(20))
                .request_timeout(Duration::from_secs(5))
                .delivery_timeout(Duration::from_secs(30)),
        )
        .expect("producer");
    let mut small = Vec::new();
    small.push(
        producer
            .send(ProducerRecord::new("strict", "s0").partition(0))
            .await
            .expect("send"),
    );
    let big = producer
        .send(ProducerRecord::new("strict", vec![b'x'; 3000]).partition(0))
        .await
        .expect("send");
    for i in 1..40 {
        small.push(
            producer
                .send(ProducerRecord::new("strict", format!("s{i}")).partition(0))
                .await
                .expect("send"),
        );
    }
    let err = big.await.expect_err("too large for the topic");
    assert!(
        matches!(err, ClientError::MessageTooLarge { .. }),
        "{err:?}"
    );
    let mut offsets = Vec::new();
    for (i, f) in small.into_iter().enumerate() {
        let md = f
            .await
            .unwrap_or_else(|e| panic!("s{i} not delivered: {e}"));
        offsets.push(md.offset.expect("offset"));
    }
    assert_eq!(offsets, (0..40).collect::<Vec<u64>>(), "in order, no gap");
    producer.close().await.expect("close");
    let log = read_all(&client, "strict").await;
    let want: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    assert_eq!(log.into_values().collect::<Vec<_>>(), want);
}
