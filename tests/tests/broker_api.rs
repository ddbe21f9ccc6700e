//! Every RPC of a real `keel broker` process, with its errors.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use keel_batch::{BatchIter, Compression, ProducerInfo, decode_records};
use keel_proto::v1::produce_batch::Data;
use keel_proto::v1::*;
use keel_tests::broker::{BrokerProc, http_get};
use keel_tests::records::encode_batch;
use tonic::Code;

fn topic_req(name: &str, partitions: u32, config: &[(&str, &str)]) -> CreateTopicRequest {
    CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: 0,
        config: config
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

async fn create_topic(broker: &BrokerProc, name: &str, partitions: u32, config: &[(&str, &str)]) {
    broker
        .admin()
        .await
        .create_topic(topic_req(name, partitions, config))
        .await
        .expect("create");
}

fn encoded(values: &[&str]) -> Bytes {
    encoded_with(values, Compression::Lz4)
}

fn encoded_with(values: &[&str], codec: Compression) -> Bytes {
    encode_batch(values, codec, ProducerInfo::default())
}

fn batch_req(topic: &str, partition: u32, batch: Bytes, acks: Acks) -> ProduceRequest {
    ProduceRequest {
        correlation_id: 7,
        topic: topic.into(),
        acks: acks as i32,
        timeout_ms: 0,
        batches: vec![ProduceBatch {
            partition: Some(partition),
            data: Some(Data::RecordBatch(batch)),
            producer: None,
        }],
    }
}

fn records_req(topic: &str, partition: Option<u32>, records: Vec<Record>) -> ProduceRequest {
    ProduceRequest {
        correlation_id: 1,
        topic: topic.into(),
        acks: Acks::All as i32,
        timeout_ms: 0,
        batches: vec![ProduceBatch {
            partition,
            data: Some(Data::Records(RecordList { records })),
            producer: None,
        }],
    }
}

fn rec(key: Option<&str>, value: &str) -> Record {
    Record {
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        headers: vec![RecordHeader {
            key: "h".into(),
            value: Some(Bytes::from_static(b"1")),
        }],
        timestamp_ms: 0,
    }
}

fn meta(s: &tonic::Status, key: &str) -> Option<String> {
    s.metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn fetch_req(topic: &str, partition: u32, offset: u64, format: RecordFormat) -> FetchRequest {
    FetchRequest {
        partitions: vec![FetchPartition {
            topic: topic.into(),
            partition,
            offset,
            max_bytes: 0,
        }],
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 0,
        format: format as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lifecycle_and_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    let mut admin = broker.admin().await;

    let created = admin
        .create_topic(topic_req("orders", 3, &[("retention.ms", "60000")]))
        .await
        .expect("create")
        .into_inner();
    let t = created.topic.expect("topic");
    assert_eq!(t.partitions.len(), 3);
    assert_eq!(t.partitions[0].leader, 1);
    assert_eq!(t.partitions[0].replicas, vec![1]);
    assert_eq!(
        t.config.get("retention.ms").map(String::as_str),
        Some("60000")
    );
    assert_eq!(
        t.config.get("max.message.bytes").map(String::as_str),
        Some("1048576")
    );

    let e = admin
        .create_topic(topic_req("orders", 1, &[]))
        .await
        .expect_err("exists");
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(meta(&e, "keel-error").as_deref(), Some("TOPIC_EXISTS"));

    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "../etc",
        "spaces here",
        "ünïcode",
        &"x".repeat(250),
    ] {
        let e = admin
            .create_topic(topic_req(bad, 1, &[]))
            .await
            .expect_err("bad name");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        assert!(e.message().contains("name"), "{}", e.message());
    }
    let e = admin
        .create_topic(topic_req("cfg", 1, &[("segment.bytes", "12")]))
        .await
        .expect_err("bad config");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("segment.bytes") && e.message().contains("4096"),
        "{}",
        e.message()
    );
    let e = admin
        .create_topic(topic_req("cfg", 1, &[("bogus.key", "1")]))
        .await
        .expect_err("unknown key");
    assert_eq!(meta(&e, "keel-error").as_deref(), Some("INVALID_CONFIG"));
    let e = admin
        .create_topic(topic_req("big", 1_000_000, &[]))
        .await
        .expect_err("too many partitions");
    assert!(e.message().contains("10000"), "{}", e.message());
    let e = admin
        .create_topic(CreateTopicRequest {
            name: "rf".into(),
            partitions: 1,
            replication_factor: 3,
            config: HashMap::new(),
        })
        .await
        .expect_err("rf > brokers");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("replication_factor"),
        "{}",
        e.message()
    );

    let listed = admin
        .list_topics(ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed
            .topics
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["orders"]
    );

    let altered = admin
        .alter_topic_config(AlterTopicConfigRequest {
            name: "orders".into(),
            set: [("retention.bytes".to_owned(), "1000000".to_owned())].into(),
            remove: vec!["retention.ms".into()],
        })
        .await
        .expect("alter")
        .into_inner()
        .topic
        .expect("topic");
    assert_eq!(
        altered.config.get("retention.bytes").map(String::as_str),
        Some("1000000")
    );
    assert_eq!(
        altered.config.get("retention.ms").map(String::as_str),
        Some("604800000")
    );

    let grown = admin
        .add_partitions(AddPartitionsRequest {
            name: "orders".into(),
            partitions: 5,
        })
        .await
        .expect("add")
        .into_inner();
    assert_eq!(grown.topic.expect("topic").partitions.len(), 5);
    let e = admin
        .add_partitions(AddPartitionsRequest {
            name: "orders".into(),
            partitions: 2,
        })
        .await
        .expect_err("shrink");
    assert_eq!(e.code(), Code::InvalidArgument);

    let e = admin
        .describe_topic(DescribeTopicRequest {
            name: "nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(meta(&e, "keel-error").as_deref(), Some("UNKNOWN_TOPIC"));

    admin
        .delete_topic(DeleteTopicRequest {
            name: "orders".into(),
        })
        .await
        .expect("delete");
    let e = admin
        .delete_topic(DeleteTopicRequest {
            name: "orders".into(),
        })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
    // A re-created topic starts empty.
    admin
        .create_topic(topic_req("orders", 1, &[]))
        .await
        .expect("recreate");
    let d = admin
        .describe_topic(DescribeTopicRequest {
            name: "orders".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(d.topic.expect("topic").partitions[0].log_end_offset, 0);

    let mut cluster = broker.cluster().await;
    let c = cluster
        .describe_cluster(DescribeClusterRequest {})
        .await
        .expect("cluster")
        .into_inner();
    assert_eq!(c.metadata_leader, 1);
    assert_eq!(c.brokers[0].address, broker.grpc);
    let m = cluster
        .metadata(MetadataRequest {
            topics: vec!["orders".into()],
        })
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(m.topics[0].partitions[0].leader, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_fetch_both_formats() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "t", 4, &[]).await;
    let mut prod = broker.producer().await;

    for acks in [Acks::All, Acks::Leader, Acks::None, Acks::Unspecified] {
        let r = prod
            .produce(batch_req("t", 0, encoded(&["a", "b"]), acks))
            .await
            .expect("produce")
            .into_inner();
        assert_eq!(r.correlation_id, 7);
        assert_eq!(r.batches[0].record_count, 2);
    }
    // Plain records without a partition: keyed records follow Kafka's murmur2 partitioner.
    let keys = ["alpha", "beta", "gamma", "delta", "epsilon"];
    let records: Vec<Record> = keys
        .iter()
        .map(|k| rec(Some(k), &format!("v-{k}")))
        .collect();
    let r = prod
        .produce(records_req("t", None, records))
        .await
        .expect("produce records")
        .into_inner();
    let positions = &r.batches[0].records;
    assert_eq!(positions.len(), keys.len());
    for (k, pos) in keys.iter().zip(positions) {
        assert_eq!(
            pos.partition,
            keel_types::partition_for_key(k.as_bytes(), 4),
            "{k}"
        );
    }

    let mut cons = broker.consumer().await;
    let f = cons
        .fetch(fetch_req("t", 0, 0, RecordFormat::Decoded))
        .await
        .expect("fetch")
        .into_inner();
    let p = &f.partitions[0];
    assert_eq!(
        p.high_watermark,
        8 + positions.iter().filter(|x| x.partition == 0).count() as u64
    );
    assert_eq!(
        p.records.first().and_then(|r| r.value.clone()),
        Some(Bytes::from_static(b"a"))
    );
    assert!(p.records.windows(2).all(|w| w[1].offset == w[0].offset + 1));

    // Encoded batches from the middle of a batch: the whole batch comes back; CRCs verify.
    let f = cons
        .fetch(fetch_req("t", 0, 1, RecordFormat::Batches))
        .await
        .expect("fetch")
        .into_inner();
    let p = &f.partitions[0];
    let mut offsets = Vec::new();
    for item in BatchIter::new(&p.record_batches) {
        let (h, raw) = item.expect("valid batch");
        assert!(h.base_offset <= 1 || !offsets.is_empty());
        offsets.extend(
            decode_records(&Bytes::copy_from_slice(raw), 1 << 20)
                .expect("decode")
                .iter()
                .map(|r| r.offset),
        );
    }
    assert_eq!(offsets.first(), Some(&0));
    assert_eq!(p.next_offset, p.high_watermark);

    // Timestamps and list offsets.
    let lo = cons
        .list_offsets(ListOffsetsRequest {
            topic: "t".into(),
            partition: 0,
            spec: Some(list_offsets_request::Spec::Position(
                StartPosition::Latest as i32,
            )),
        })
        .await
        .expect("latest")
        .into_inner();
    assert_eq!(lo.offset, p.high_watermark);
    let lo = cons
        .list_offsets(ListOffsetsRequest {
            topic: "t".into(),
            partition: 0,
            spec: Some(list_offsets_request::Spec::TimestampMs(1_600_000_000_000)),
        })
        .await
        .expect("by time")
        .into_inner();
    assert_eq!((lo.offset, lo.timestamp_ms), (0, 1_700_000_000_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_precise_errors_and_the_broker_keeps_serving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "t", 2, &[("max.message.bytes", "10000")]).await;
    let mut prod = broker.producer().await;
    let mut cons = broker.consumer().await;

    let e = prod
        .produce(batch_req("nope", 0, encoded(&["x"]), Acks::All))
        .await
        .expect_err("unknown topic");
    assert_eq!(e.code(), Code::NotFound);
    let e = prod
        .produce(batch_req("bad/name", 0, encoded(&["x"]), Acks::All))
        .await
        .expect_err("bad topic name");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = prod
        .produce(batch_req("t", 9, encoded(&["x"]), Acks::All))
        .await
        .expect_err("unknown partition");
    assert_eq!(
        (e.code(), meta(&e, "keel-error").as_deref()),
        (Code::NotFound, Some("UNKNOWN_PARTITION"))
    );
    let mut corrupt = encoded(&["x", "y"]).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let e = prod
        .produce(batch_req("t", 0, Bytes::from(corrupt), Acks::All))
        .await
        .expect_err("crc");
    assert_eq!(
        (e.code(), meta(&e, "keel-error").as_deref()),
        (Code::InvalidArgument, Some("CORRUPT_BATCH"))
    );
    let e = prod
        .produce(batch_req("t", 0, Bytes::from_static(b"garbage"), Acks::All))
        .await
        .expect_err("garbage");
    assert_eq!(e.code(), Code::InvalidArgument);
    let big = "v".repeat(20_000);
    // The limit applies to the batch as sent (compressed, as in Kafka).
    prod.produce(batch_req("t", 0, encoded(&[&big]), Acks::All))
        .await
        .expect("compresses below the limit");
    let e = prod
        .produce(batch_req(
            "t",
            0,
            encoded_with(&[&big], Compression::None),
            Acks::All,
        ))
        .await
        .expect_err("too large");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("10000") && e.message().contains("max.message.bytes"),
        "{}",
        e.message()
    );
    let e = prod
        .produce(records_req("t", None, vec![rec(None, &big)]))
        .await
        .expect_err("record too large");
    assert_eq!(e.code(), Code::ResourceExhausted);
    let mut no_partition = batch_req("t", 0, encoded(&["x"]), Acks::All);
    no_partition.batches[0].partition = None;
    let e = prod
        .produce(no_partition)
        .await
        .expect_err("partition required");
    assert!(e.message().contains("partition"), "{}", e.message());
    let e = prod
        .produce(ProduceRequest {
            topic: "t".into(),
            ..Default::default()
        })
        .await
        .expect_err("no batches");
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut bad_acks = batch_req("t", 0, encoded(&["x"]), Acks::All);
    bad_acks.acks = 42;
    assert_eq!(
        prod.produce(bad_acks).await.expect_err("acks").code(),
        Code::InvalidArgument
    );
    let control = Bytes::from(keel_batch::control_batch(b"x", 0).expect("control"));
    assert_eq!(
        prod.produce(batch_req("t", 0, control, Acks::All))
            .await
            .expect_err("control")
            .code(),
        Code::InvalidArgument
    );

    prod.produce(batch_req("t", 0, encoded(&["ok"]), Acks::All))
        .await
        .expect("valid produce still works");
    for offset in [3, u64::MAX, i64::MAX as u64] {
        let e = cons
            .fetch(fetch_req("t", 0, offset, RecordFormat::Decoded))
            .await
            .expect_err("out of range");
        assert_eq!(e.code(), Code::OutOfRange);
        assert_eq!(meta(&e, "keel-high-watermark").as_deref(), Some("2"));
        assert!(e.message().contains("0..=2"), "{}", e.message());
    }
    let mut huge = fetch_req("t", 0, 0, RecordFormat::Decoded);
    huge.max_bytes = u32::MAX;
    let e = cons.fetch(huge).await.expect_err("max_bytes");
    assert!(e.message().contains("max_bytes"), "{}", e.message());
    let mut wait = fetch_req("t", 0, 0, RecordFormat::Decoded);
    wait.max_wait_ms = u32::MAX;
    assert_eq!(
        cons.fetch(wait).await.expect_err("max_wait").code(),
        Code::InvalidArgument
    );
    let e = cons
        .fetch(FetchRequest::default())
        .await
        .expect_err("empty fetch");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = cons
        .subscribe(SubscribeRequest {
            topic: "t".into(),
            partition: 0,
            start: None,
            max_bytes: 0,
            format: 0,
        })
        .await
        .expect_err("no start");
    assert_eq!(e.code(), Code::InvalidArgument);

    // Garbage bytes on the port do not hurt other clients.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&broker.grpc).expect("connect");
        let _ = s.write_all(b"\x00\x01\x02GET / HTTP/1.1\r\n\r\nPRI * garbage garbage\xff\xfe");
    }
    let f = cons
        .fetch(fetch_req("t", 0, 0, RecordFormat::Decoded))
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(f.partitions[0].records.len(), 2);
}

/// Raw bytes as a request body: malformed protobuf must be rejected, not crash anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_rejected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "t", 1, &[]).await;
    let channel = broker.channel().await;
    for body in [
        &b"\xff\xff\xff\xff\xff"[..],
        b"\x0a\x80\x80\x80\x80\x10",
        b"\x12\x05ab",
        b"\x08",
        &[0x12, 0x02, 0xff, 0xfe],
    ] {
        let e = keel_tests::raw::unary(
            channel.clone(),
            "/keel.v1.ProduceService/Produce",
            Bytes::copy_from_slice(body),
        )
        .await
        .expect_err("malformed");
        assert!(
            matches!(e.code(), Code::Internal | Code::InvalidArgument),
            "{e:?}"
        );
    }
    // Still serving normal requests.
    let mut prod = broker.producer().await;
    prod.produce(batch_req("t", 0, encoded(&["x"]), Acks::All))
        .await
        .expect("produce after garbage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_and_subscribe_see_new_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "live", 1, &[]).await;
    let mut cons = broker.consumer().await;
    let mut sub = cons
        .subscribe(SubscribeRequest {
            topic: "live".into(),
            partition: 0,
            start: Some(subscribe_request::Start::Position(
                StartPosition::Latest as i32,
            )),
            max_bytes: 0,
            format: RecordFormat::Decoded as i32,
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut waiting = cons.clone();
    let poll = tokio::spawn(async move {
        let mut req = fetch_req("live", 0, 0, RecordFormat::Decoded);
        req.max_wait_ms = 20_000;
        waiting.fetch(req).await
    });
    let mut prod = broker.producer().await;
    prod.produce(batch_req("live", 0, encoded(&["one", "two"]), Acks::All))
        .await
        .expect("produce");
    let polled = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("long poll answered")
        .expect("join")
        .expect("fetch")
        .into_inner();
    assert_eq!(polled.partitions[0].records.len(), 2);
    let msg = tokio::time::timeout(Duration::from_secs(15), sub.message())
        .await
        .expect("streamed")
        .expect("ok")
        .expect("some");
    assert_eq!(
        msg.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        [0, 1]
    );
    prod.produce(batch_req("live", 0, encoded(&["three"]), Acks::All))
        .await
        .expect("produce");
    let msg = tokio::time::timeout(Duration::from_secs(15), sub.message())
        .await
        .expect("streamed")
        .expect("ok")
        .expect("some");
    assert_eq!(msg.records[0].value.as_deref(), Some(&b"three"[..]));
    assert_eq!(msg.next_offset, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stream_pipelines_and_reports_errors_in_band() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "s", 1, &[]).await;
    let mut prod = broker.producer().await;
    let mut reqs: Vec<ProduceRequest> = (0..50)
        .map(|i| {
            let mut r = batch_req("s", 0, encoded(&["a", "b", "c"]), Acks::All);
            r.correlation_id = i;
            r
        })
        .collect();
    reqs[10].topic = "missing".into();
    let mut responses = prod
        .produce_stream(futures::stream::iter(reqs))
        .await
        .expect("stream")
        .into_inner();
    let mut expected_offset = 0;
    for i in 0..50u64 {
        let r = responses.message().await.expect("ok").expect("response");
        assert_eq!(r.correlation_id, i, "responses in request order");
        if i == 10 {
            let e = r.error.expect("in-band error");
            assert_eq!(e.reason, "UNKNOWN_TOPIC");
            assert_eq!(e.code, Code::NotFound as i32);
        } else {
            assert!(r.error.is_none());
            assert_eq!(r.batches[0].base_offset, expected_offset);
            expected_offset += 3;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel().await);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "keel.v1.ProduceService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    create_topic(&broker, "m", 1, &[]).await;
    broker
        .producer()
        .await
        .produce(batch_req("m", 0, encoded(&["x"]), Acks::All))
        .await
        .expect("produce");
    let (code, body) = http_get(&broker.http, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains("keel_produce_records_total{topic=\"m\"} 1"),
        "{body}"
    );
    assert!(body.contains("keel_request_duration_seconds"), "{body}");
    assert!(body.contains("keel_connections"), "{body}");
    assert_eq!(http_get(&broker.http, "/healthz").map(|r| r.0), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_sigterm_and_kill9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "durable", 2, &[]).await;
    let mut acked = 0u64;
    for round in 0..3 {
        let mut prod = broker.producer().await;
        for i in 0..20 {
            let values: Vec<String> = (0..5).map(|k| format!("r{round}-{i}-{k}")).collect();
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            prod.produce(batch_req("durable", 1, encoded(&refs), Acks::All))
                .await
                .expect("produce");
            acked += 5;
        }
        if round == 0 {
            assert!(broker.terminate().success(), "SIGTERM exits 0");
        } else {
            broker.kill9();
        }
        broker.restart();
        let mut cons = broker.consumer().await;
        let mut offset = 0;
        let mut seen = 0;
        loop {
            let f = cons
                .fetch(fetch_req("durable", 1, offset, RecordFormat::Decoded))
                .await
                .expect("fetch")
                .into_inner();
            let p = &f.partitions[0];
            for r in &p.records {
                assert_eq!(r.offset, offset + (r.offset - offset));
            }
            seen += p.records.len() as u64;
            offset = p.next_offset;
            if offset >= p.high_watermark {
                break;
            }
        }
        assert_eq!(
            seen, acked,
            "every acknowledged record is there after round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_stream_message_ends_the_stream_with_a_status() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "s", 1, &[]).await;
    let mut prod = broker.producer().await;
    let ok = batch_req("s", 0, encoded(&["a"]), Acks::All);
    let huge = batch_req("s", 0, Bytes::from(vec![7u8; 20 << 20]), Acks::All);
    let mut responses = prod
        .produce_stream(futures::stream::iter(vec![ok, huge]))
        .await
        .expect("stream")
        .into_inner();
    let first = responses
        .message()
        .await
        .expect("first answered")
        .expect("response");
    assert!(first.error.is_none());
    let e = responses
        .message()
        .await
        .expect_err("stream ends with the decode error");
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ),
        "{e:?}"
    );
    // The broker keeps serving.
    broker
        .producer()
        .await
        .produce(batch_req("s", 0, encoded(&["b"]), Acks::All))
        .await
        .expect("produce");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_streams_exits_cleanly_and_ends_subscriptions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "s", 1, &[]).await;
    let mut cons = broker.consumer().await;
    let mut sub = cons
        .subscribe(SubscribeRequest {
            topic: "s".into(),
            partition: 0,
            start: Some(subscribe_request::Start::Offset(0)),
            max_bytes: 0,
            format: 0,
        })
        .await
        .expect("subscribe")
        .into_inner();
    // A produce stream the client never closes.
    let (tx, rx) = tokio::sync::mpsc::channel::<ProduceRequest>(1);
    let mut prod = broker.producer().await;
    let _open = prod
        .produce_stream(tokio_stream_from(rx))
        .await
        .expect("stream");
    tx.send(batch_req("s", 0, encoded(&["x"]), Acks::All))
        .await
        .expect("send");
    let first = tokio::time::timeout(Duration::from_secs(15), sub.message())
        .await
        .expect("record streamed");
    assert!(first.expect("ok").is_some());
    let status = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("join");
    assert!(status.success(), "exit status {status}");
    let end = tokio::time::timeout(Duration::from_secs(15), sub.message())
        .await
        .expect("subscription ended");
    assert!(end.is_err() || end.is_ok_and(|m| m.is_none()));
    drop(tx);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<ProduceRequest>,
) -> impl futures::Stream<Item = ProduceRequest> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_per_topic_config_and_consumers_are_told() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start_with(
        &tmp.path().join("b1"),
        1,
        &["--retention-check-interval-ms", "50"],
    );
    let cfg = [("segment.bytes", "4096"), ("retention.bytes", "8192")];
    create_topic(&broker, "r", 1, &cfg).await;
    let mut prod = broker.producer().await;
    let value = "x".repeat(200);
    for _ in 0..100 {
        prod.produce(batch_req(
            "r",
            0,
            encoded_with(&[&value, &value], Compression::None),
            Acks::All,
        ))
        .await
        .expect("produce");
    }
    let mut admin = broker.admin().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let start = loop {
        let t = admin
            .describe_topic(DescribeTopicRequest { name: "r".into() })
            .await
            .expect("describe")
            .into_inner();
        let p = &t.topic.expect("topic").partitions[0];
        if p.log_start_offset > 0 {
            break p.log_start_offset;
        }
        assert!(std::time::Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(start < 200);
    let mut cons = broker.consumer().await;
    let e = cons
        .fetch(fetch_req("r", 0, 0, RecordFormat::Decoded))
        .await
        .expect_err("deleted by retention");
    assert_eq!(e.code(), Code::OutOfRange);
    // Retention may have moved on since; the error carries the start at the time.
    let start: u64 = meta(&e, "keel-log-start-offset")
        .and_then(|v| v.parse().ok())
        .filter(|s: &u64| *s >= start)
        .expect("log start offset in the error");
    // Reading from the advertised start works (retrying if one more pass moved it meanwhile).
    let mut start = start;
    for _ in 0..10 {
        match cons
            .fetch(fetch_req("r", 0, start, RecordFormat::Decoded))
            .await
        {
            Ok(f) => {
                let f = f.into_inner();
                assert_eq!(
                    f.partitions[0].records.first().map(|r| r.offset),
                    Some(start)
                );
                return;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::OutOfRange);
                start = meta(&e, "keel-log-start-offset")
                    .and_then(|v| v.parse().ok())
                    .expect("start");
            }
        }
    }
    panic!("the log start kept moving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    let mut client = ServerReflectionClient::new(broker.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.message().await.expect("ok").expect("response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "keel.v1.AdminService",
        "keel.v1.ProduceService",
        "keel.v1.ConsumeService",
        "keel.v1.ClusterService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

fn rss_anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("RssAnon")
}

/// A subscriber that stops reading must not make the broker buffer what it has not taken:
/// the subscription reads ahead only as the transport drains (flow control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_grow_broker_memory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    create_topic(&broker, "slow", 1, &[("flush.messages", "1000000")]).await;
    let mut cons = broker.consumer().await;
    // Opened and never read after the first message.
    let mut sub = cons
        .subscribe(SubscribeRequest {
            topic: "slow".into(),
            partition: 0,
            start: Some(subscribe_request::Start::Offset(0)),
            max_bytes: 0,
            format: RecordFormat::Batches as i32,
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut prod = broker.producer().await;
    prod.produce(batch_req(
        "slow",
        0,
        encoded_with(&["first"], Compression::None),
        Acks::Leader,
    ))
    .await
    .expect("produce");
    tokio::time::timeout(Duration::from_secs(15), sub.message())
        .await
        .expect("first message")
        .expect("ok");
    let pid = broker.pid().expect("pid");
    let before = rss_anon_kib(pid);
    // About 200 MB more for a subscriber that reads nothing.
    let value = "v".repeat(1000);
    let values: Vec<&str> = (0..900).map(|_| value.as_str()).collect();
    let batch = encoded_with(&values, Compression::None);
    for _ in 0..220 {
        prod.produce(batch_req("slow", 0, batch.clone(), Acks::Leader))
            .await
            .expect("produce");
    }
    let after = rss_anon_kib(pid);
    assert!(
        after < before + 64 * 1024,
        "broker anonymous memory grew from {before} KiB to {after} KiB for a stalled subscriber"
    );
    drop(sub);
}
