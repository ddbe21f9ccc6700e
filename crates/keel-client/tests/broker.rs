//! The client against a real in-process broker on 127.0.0.1 with an ephemeral port.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TestBroker, shutdown};
use futures::StreamExt;
use keel_batch::{BatchBuilder, RecordRef};
use keel_client::{
    Acks, Client, ClientError, Compression, ConsumerConfig, ConsumerRecord, OffsetReset,
    OffsetSpec, ProducerConfig, ProducerRecord, SeekTo, partition_for_key,
};

async fn poll_n(
    consumer: &mut keel_client::Consumer,
    n: usize,
    limit: Duration,
) -> Vec<ConsumerRecord> {
    common::collect(n, limit, async || {
        consumer
            .poll(Duration::from_millis(500))
            .await
            .expect("poll")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_round_trip_and_errors() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let admin = client.admin();

    let mut configs = BTreeMap::new();
    configs.insert("retention.ms".to_owned(), "3600000".to_owned());
    let t = admin
        .create_topic("orders", 2, 0, configs)
        .await
        .expect("create");
    assert_eq!(t.name, "orders");
    assert_eq!(t.partitions.len(), 2);
    assert_eq!(
        t.config.get("retention.ms").map(String::as_str),
        Some("3600000")
    );

    let err = admin
        .create_topic("orders", 1, 0, BTreeMap::new())
        .await
        .expect_err("exists");
    assert!(matches!(err, ClientError::TopicExists { .. }), "{err:?}");
    assert!(err.is_definite());

    let err = admin.describe_topic("nope").await.expect_err("unknown");
    assert!(matches!(err, ClientError::UnknownTopic { .. }), "{err:?}");
    let err = admin
        .create_topic("bad/name", 1, 0, BTreeMap::new())
        .await
        .expect_err("bad name");
    assert!(
        matches!(err, ClientError::InvalidArgument { .. }),
        "{err:?}"
    );

    let names: Vec<String> = admin
        .list_topics()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["orders".to_owned()]);

    let mut set = BTreeMap::new();
    set.insert("retention.ms".to_owned(), "7200000".to_owned());
    let t = admin
        .alter_topic_config("orders", set, Vec::new())
        .await
        .expect("alter");
    assert_eq!(
        t.config.get("retention.ms").map(String::as_str),
        Some("7200000")
    );

    let t = admin.add_partitions("orders", 4).await.expect("grow");
    assert_eq!(t.partitions.len(), 4);
    assert_eq!(client.partition_count("orders").await.expect("count"), 4);

    let cluster = admin.describe_cluster().await.expect("cluster");
    assert_eq!(cluster.brokers.len(), 1);
    assert_eq!(cluster.brokers[0].address, broker.addr);

    admin.delete_topic("orders").await.expect("delete");
    let err = client.partition_count("orders").await.expect_err("deleted");
    assert!(matches!(err, ClientError::UnknownTopic { .. }), "{err:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_consume_everything_in_order() {
    let (broker, client) = TestBroker::with_topic("events", 3).await;

    for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let producer = client
            .producer(
                ProducerConfig::default()
                    .compression(compression)
                    .batch_size(4096),
            )
            .expect("producer");
        let mut acks = Vec::new();
        for i in 0..300u32 {
            let mut rec =
                ProducerRecord::new("events", format!("value-{i}")).header("i", i.to_string());
            if i % 3 == 0 {
                rec = rec.key(format!("key-{i}"));
            }
            acks.push((i, producer.send(rec).await.expect("send")));
        }
        producer.flush().await.expect("flush");
        let mut per_partition: HashMap<u32, Vec<u64>> = HashMap::new();
        for (i, ack) in acks {
            let md = ack.await.expect("acknowledged");
            if i % 3 == 0 {
                assert_eq!(
                    md.partition,
                    partition_for_key(format!("key-{i}").as_bytes(), 3)
                );
            }
            per_partition
                .entry(md.partition)
                .or_default()
                .push(md.offset.expect("offset with acks=all"));
        }
        // Acknowledged offsets of one send() task are unique and increasing per partition.
        for offsets in per_partition.values() {
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        }
        producer.close().await.expect("close");
    }

    let mut consumer =
        client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)));
    consumer.assign(&[("events", 0), ("events", 1), ("events", 2)]);
    for p in 0..3 {
        consumer
            .seek("events", p, SeekTo::Beginning)
            .await
            .expect("seek");
    }
    let records = poll_n(&mut consumer, 900, Duration::from_secs(20)).await;
    assert_eq!(records.len(), 900);
    let mut by_partition: HashMap<u32, Vec<&ConsumerRecord>> = HashMap::new();
    for r in &records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut total = 0;
    for (p, rs) in &by_partition {
        // Contiguous from 0: nothing skipped, nothing repeated.
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "partition {p}");
        }
        assert_eq!(consumer.position("events", *p), Some(rs.len() as u64));
        total += rs.len();
    }
    assert_eq!(total, 900);
    let r = &records[0];
    assert!(r.value.as_deref().is_some_and(|v| v.starts_with(b"value-")));
    assert_eq!(r.headers.len(), 1);
    assert_eq!(&*r.topic, "events");

    // Nothing new: a poll times out empty.
    let started = Instant::now();
    let empty = consumer
        .poll(Duration::from_millis(300))
        .await
        .expect("poll");
    assert!(empty.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Streaming a partition from the beginning yields the same records.
    let expected: Vec<u64> = by_partition[&0].iter().map(|r| r.offset).collect();
    let stream = consumer.subscribe_stream("events", 0, SeekTo::Beginning);
    let streamed: Vec<u64> = tokio::time::timeout(
        Duration::from_secs(10),
        stream
            .take(expected.len())
            .map(|r| r.expect("record").offset)
            .collect::<Vec<_>>(),
    )
    .await
    .expect("stream in time");
    assert_eq!(streamed, expected);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeks_offsets_and_resets() {
    let (broker, client) = TestBroker::with_topic("log", 1).await;
    // acks=all: the high watermark (what ListOffsets reports as latest) covers the records
    // once they are acknowledged; with acks=leader it follows after the background fsync.
    let producer = client
        .producer(ProducerConfig::default().acks(Acks::All))
        .expect("producer");
    let mut acks = Vec::new();
    for i in 0..10i64 {
        let rec = ProducerRecord::new("log", format!("{i}")).timestamp_ms(1_000 + i * 10);
        acks.push(producer.send(rec).await.expect("send"));
    }
    for (i, a) in acks.into_iter().enumerate() {
        let md = a.await.expect("ack");
        assert_eq!(md.offset, Some(i as u64));
        assert_eq!(md.partition, 0);
    }

    let earliest = client
        .list_offsets("log", 0, OffsetSpec::Earliest)
        .await
        .expect("earliest");
    let latest = client
        .list_offsets("log", 0, OffsetSpec::Latest)
        .await
        .expect("latest");
    assert_eq!((earliest.offset, latest.offset), (0, 10));

    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign(&[("log", 0)]);
    consumer
        .seek("log", 0, SeekTo::Timestamp(1_045))
        .await
        .expect("seek ts");
    assert_eq!(consumer.position("log", 0), Some(5));
    let rs = poll_n(&mut consumer, 5, Duration::from_secs(5)).await;
    assert_eq!(rs.first().map(|r| r.offset), Some(5));
    assert_eq!(rs.len(), 5);

    consumer
        .seek("log", 0, SeekTo::Offset(3))
        .await
        .expect("seek");
    let rs = poll_n(&mut consumer, 7, Duration::from_secs(5)).await;
    assert_eq!(
        rs.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (3..10).collect::<Vec<_>>()
    );

    // The default reset (latest) starts a fresh consumer at the end.
    let mut fresh = client.consumer(ConsumerConfig::default());
    fresh.assign(&[("log", 0)]);
    assert!(
        fresh
            .poll(Duration::from_millis(200))
            .await
            .expect("poll")
            .is_empty()
    );
    assert_eq!(fresh.position("log", 0), Some(10));

    // Out of range with reset=none is an error; with earliest it restarts at the log start.
    let mut strict =
        client.consumer(ConsumerConfig::default().auto_offset_reset(OffsetReset::None));
    strict.assign(&[("log", 0)]);
    let err = strict
        .poll(Duration::from_millis(200))
        .await
        .expect_err("no offset");
    assert!(matches!(err, ClientError::NoOffset { .. }), "{err:?}");
    strict
        .seek("log", 0, SeekTo::Offset(1_000))
        .await
        .expect("seek");
    let err = strict
        .poll(Duration::from_secs(2))
        .await
        .expect_err("out of range");
    assert!(
        matches!(err, ClientError::OffsetOutOfRange { .. }),
        "{err:?}"
    );

    let mut lenient =
        client.consumer(ConsumerConfig::default().auto_offset_reset(OffsetReset::Earliest));
    lenient.assign(&[("log", 0)]);
    lenient
        .seek("log", 0, SeekTo::Offset(1_000))
        .await
        .expect("seek");
    let rs = poll_n(&mut lenient, 10, Duration::from_secs(5)).await;
    assert_eq!(rs.first().map(|r| r.offset), Some(0));

    // Unknown topics and partitions fail at send time.
    let err = producer
        .send(ProducerRecord::new("missing", "x"))
        .await
        .expect_err("unknown topic");
    assert!(matches!(err, ClientError::UnknownTopic { .. }), "{err:?}");
    let err = producer
        .send(ProducerRecord::new("log", "x").partition(5))
        .await
        .expect_err("unknown partition");
    assert!(
        matches!(err, ClientError::UnknownPartition { .. }),
        "{err:?}"
    );
    producer.close().await.expect("close");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_level_send_batch_and_live_subscription() {
    let (broker, client) = TestBroker::with_topic("raw", 1).await;
    let producer = client
        .producer(ProducerConfig::default())
        .expect("producer");

    let consumer = client.consumer(ConsumerConfig::default());
    // Subscribed before anything exists, so records arrive through the live long poll.
    let mut live = consumer.subscribe_stream("raw", 0, SeekTo::Offset(0));

    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..4u8 {
        b.push(&RecordRef {
            timestamp: 5,
            key: None,
            value: Some(&[i]),
            headers: &[],
        })
        .expect("push");
    }
    let batch = Bytes::from(b.build().expect("build"));
    let first = tokio::spawn(async move {
        let r = live.next().await;
        (r, live)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ack = producer
        .send_batch("raw", 0, batch.clone(), Acks::All)
        .await
        .expect("send_batch");
    assert_eq!(
        (ack.partition, ack.base_offset, ack.record_count),
        (0, 0, 4)
    );
    let ack = producer
        .send_batch("raw", 0, batch, Acks::All)
        .await
        .expect("send_batch");
    assert_eq!(ack.base_offset, 4);

    let (r, mut live) = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(r.expect("item").expect("record").offset, 0);
    let rest: Vec<u64> = tokio::time::timeout(Duration::from_secs(10), async {
        let mut v = Vec::new();
        while v.len() < 7 {
            v.push(live.next().await.expect("item").expect("record").offset);
        }
        v
    })
    .await
    .expect("in time");
    assert_eq!(rest, (1..8).collect::<Vec<_>>());

    // A corrupt batch is rejected by the broker, definitely.
    let mut bad = BatchBuilder::new(Compression::None);
    bad.push(&RecordRef {
        timestamp: 5,
        key: None,
        value: Some(b"x"),
        headers: &[],
    })
    .expect("push");
    let mut bad = bad.build().expect("build");
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let err = producer
        .send_batch("raw", 0, Bytes::from(bad), Acks::All)
        .await
        .expect_err("corrupt");
    assert!(err.is_definite(), "{err:?}");
    assert!(!err.is_retriable(), "{err:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_back_pressure_and_drop_delivers() {
    let (broker, client) = TestBroker::with_topic("bp", 2).await;
    // 64 KiB of buffer for 2 MiB of records: send() must wait for acks to free memory.
    let producer = client
        .producer(
            ProducerConfig::default()
                .buffer_memory(64 * 1024)
                .batch_size(16 * 1024)
                .linger(Duration::from_millis(1)),
        )
        .expect("producer");
    let value = Bytes::from(vec![b'x'; 1000]);
    let mut acks = Vec::new();
    for _ in 0..2000 {
        acks.push(
            producer
                .send(ProducerRecord::new("bp", value.clone()))
                .await
                .expect("send"),
        );
    }
    // Dropping the producer still delivers what it buffered.
    drop(producer);
    let mut count = HashMap::new();
    for a in acks {
        let md = tokio::time::timeout(Duration::from_secs(20), a)
            .await
            .expect("in time")
            .expect("ack");
        *count.entry(md.partition).or_insert(0) += 1;
    }
    assert_eq!(count.values().sum::<usize>(), 2000);
    // The sticky partitioner spread batches over both partitions.
    assert_eq!(count.len(), 2, "{count:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_consumer_ride_out_a_broker_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = |listen: SocketAddr| keel_broker::start(common::config(dir.path(), listen));
    let broker = start(common::any_port()).await.expect("start");
    let addr = broker.grpc_addr;
    let client = Client::connect(&[addr.to_string()]).await.expect("connect");
    client
        .admin()
        .create_topic("r", 1, 0, BTreeMap::new())
        .await
        .expect("create");
    let producer = client
        .producer(ProducerConfig::default())
        .expect("producer");
    producer
        .send(ProducerRecord::new("r", "before"))
        .await
        .expect("send")
        .await
        .expect("ack");
    let mut consumer =
        client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)));
    consumer.assign(&[("r", 0)]);
    consumer
        .seek("r", 0, SeekTo::Beginning)
        .await
        .expect("seek");
    assert_eq!(
        poll_n(&mut consumer, 1, Duration::from_secs(5)).await.len(),
        1
    );

    shutdown(broker).await;
    // Sent while the broker is down: retried until it is back.
    let pending = producer
        .send(ProducerRecord::new("r", "during"))
        .await
        .expect("send");
    let polled = consumer
        .poll(Duration::from_millis(300))
        .await
        .expect("poll while down");
    assert!(polled.is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let broker = start(addr).await.expect("restart on the same port");

    let md = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("in time")
        .expect("acknowledged after restart");
    assert_eq!(md.offset, Some(1));
    let rs = poll_n(&mut consumer, 1, Duration::from_secs(20)).await;
    assert_eq!(rs.first().map(|r| r.offset), Some(1));
    assert_eq!(
        rs.first().and_then(|r| r.value.clone()),
        Some(Bytes::from_static(b"during"))
    );
    producer.close().await.expect("close");
    shutdown(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_broker_limit_fails_alone() {
    let (broker, client) = TestBroker::with_topic("big", 2).await;
    let producer = client
        .producer(ProducerConfig::default().linger(Duration::from_millis(50)))
        .expect("producer");
    let small_before = producer
        .send(ProducerRecord::new("big", "a").partition(0))
        .await
        .expect("send");
    // Over the broker's 16 MiB request limit, under the client's 64 MiB one.
    let big = producer
        .send(ProducerRecord::new("big", vec![0u8; 17 << 20]).partition(1))
        .await
        .expect("send");
    let small_after = producer
        .send(ProducerRecord::new("big", "b").partition(0))
        .await
        .expect("send");
    let err = tokio::time::timeout(Duration::from_secs(20), big)
        .await
        .expect("in time")
        .expect_err("too large for the broker");
    assert!(
        matches!(err, ClientError::MessageTooLarge { .. }),
        "{err:?}"
    );
    for small in [small_before, small_after] {
        let md = tokio::time::timeout(Duration::from_secs(20), small)
            .await
            .expect("in time")
            .expect("small records are delivered");
        assert_eq!(md.partition, 0);
    }
    producer.close().await.expect("close");
    broker.stop().await;
}
