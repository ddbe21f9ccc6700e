//! Reading a partition back through the Rust client, for tests that check what was written.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_batch::{BatchBuilder, Compression, ProducerInfo, RecordRef};
use keel_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord, SeekTo};

/// One encoded batch of `values` (no keys or headers, timestamp 1 700 000 000 000) with the
/// given codec and producer fields (`ProducerInfo::default()`: not idempotent).
pub fn encode_batch(values: &[&str], codec: Compression, producer: ProducerInfo) -> Bytes {
    let mut b = BatchBuilder::new(codec).producer(producer);
    for v in values {
        b.push(&RecordRef {
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(v.as_bytes()),
            headers: &[],
        })
        .expect("push");
    }
    Bytes::from(b.build().expect("build"))
}

/// Reads partition `p` of `topic` from its start up to its high watermark, as (offset, UTF-8
/// value), asserting that no offset is delivered twice. With `require_data`, a high watermark
/// of 0 does not end the read (right after a leader change it can read 0 for a moment).
pub async fn read_partition(
    client: &Client,
    topic: &str,
    p: u32,
    require_data: bool,
) -> BTreeMap<u64, String> {
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign(&[(topic, p)]);
    consumer
        .seek(topic, p, SeekTo::Beginning)
        .await
        .expect("seek");
    let mut out = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for r in consumer
            .poll(Duration::from_millis(500))
            .await
            .expect("poll")
        {
            let v =
                String::from_utf8(r.value.map(|b| b.to_vec()).unwrap_or_default()).expect("utf8");
            assert!(
                out.insert(r.offset, v).is_none(),
                "offset {} delivered twice",
                r.offset
            );
        }
        let hwm = consumer.high_watermark(topic, p).unwrap_or(0);
        let enough = hwm > 0 || (!require_data && out.is_empty());
        if enough && consumer.position(topic, p) == Some(hwm) {
            return out;
        }
        assert!(Instant::now() < deadline, "reading {topic}/{p} timed out");
    }
}

/// A producer for tests: short linger and small batches, patient delivery across failovers.
pub fn producer_config() -> ProducerConfig {
    ProducerConfig::default()
        .linger(Duration::from_millis(2))
        .batch_size(8 * 1024)
        .request_timeout(Duration::from_secs(5))
        .delivery_timeout(Duration::from_secs(60))
}

/// Sends `values` to partition 0 of `topic` (acks=all, idempotent) and waits for every
/// acknowledgement; returns (value, offset) pairs.
pub async fn produce_all(client: &Client, topic: &str, values: Vec<String>) -> Vec<(String, u64)> {
    let producer = client.producer(producer_config()).expect("producer");
    let mut pending = Vec::with_capacity(values.len());
    for v in values {
        let fut = producer
            .send(ProducerRecord::new(topic, v.clone().into_bytes()).partition(0))
            .await
            .expect("send");
        pending.push((v, fut));
    }
    let mut out = Vec::with_capacity(pending.len());
    for (v, fut) in pending {
        let md = fut
            .await
            .unwrap_or_else(|e| panic!("record {v} not acknowledged: {e}"));
        out.push((v, md.offset.expect("acks=all returns an offset")));
    }
    producer.close().await.expect("close producer");
    out
}
