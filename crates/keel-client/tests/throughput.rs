//! Throughput smoke test against an in-process broker. Ignored by default (it measures, it does
//! not check correctness); run with
//! `cargo test --release -p keel-client --test throughput -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TestBroker;
use keel_client::{ConsumerConfig, ProducerConfig, ProducerRecord, SeekTo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run explicitly in release mode"]
async fn produce_and_consume_throughput() {
    const RECORDS: usize = 500_000;
    const SIZE: usize = 100;
    const PARTITIONS: u32 = 4;
    let (broker, client) = TestBroker::with_topic("perf", PARTITIONS).await;

    let producer = client
        .producer(ProducerConfig::default())
        .expect("producer");
    let value = Bytes::from(vec![b'x'; SIZE]);
    let started = Instant::now();
    let mut last = None;
    for _ in 0..RECORDS {
        last = Some(
            producer
                .send(ProducerRecord::new("perf", value.clone()))
                .await
                .expect("send"),
        );
    }
    producer.flush().await.expect("flush");
    if let Some(l) = last {
        l.await.expect("ack");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produce: {RECORDS} x {SIZE} B in {secs:.2} s = {:.0} records/s, {:.1} MB/s",
        RECORDS as f64 / secs,
        (RECORDS * SIZE) as f64 / secs / 1e6
    );

    let mut consumer = client.consumer(ConsumerConfig::default());
    let assignment: Vec<(&str, u32)> = (0..PARTITIONS).map(|p| ("perf", p)).collect();
    consumer.assign(&assignment);
    for p in 0..PARTITIONS {
        consumer
            .seek("perf", p, SeekTo::Beginning)
            .await
            .expect("seek");
    }
    let started = Instant::now();
    let mut n = 0;
    while n < RECORDS && started.elapsed() < Duration::from_secs(60) {
        n += consumer
            .poll(Duration::from_secs(1))
            .await
            .expect("poll")
            .len();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "consume: {n} records in {secs:.2} s = {:.0} records/s, {:.1} MB/s",
        n as f64 / secs,
        (n * SIZE) as f64 / secs / 1e6
    );
    assert_eq!(n, RECORDS);
    producer.close().await.expect("close");
    broker.stop().await;
}
