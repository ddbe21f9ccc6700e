//! Regression test from a review: compression bombs. A batch that expands beyond 16 ×
//! max.message.bytes is refused at produce time, and decoded Fetch spends a decompression budget
//! tied to `max_bytes`, so small compressed batches cannot make a read allocate without bound.

use bytes::Bytes;
use keel_batch::{BatchBuilder, Compression, RecordRef};
use keel_proto::v1::produce_batch::Data;
use keel_proto::v1::*;
use keel_tests::broker::BrokerProc;

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_fetch_memory_is_bounded_by_max_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(&tmp.path().join("b1"), 1);
    let mut admin = broker.admin().await;
    admin
        .create_topic(CreateTopicRequest {
            name: "bomb".into(),
            partitions: 1,
            replication_factor: 0,
            config: Default::default(),
        })
        .await
        .expect("create");

    let zstd_batch = |mib: usize| {
        let zeros = vec![0u8; mib << 20];
        let mut b = BatchBuilder::new(Compression::Zstd);
        b.push(&RecordRef {
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(&zeros),
            headers: &[],
        })
        .expect("push");
        Bytes::from(b.build().expect("build"))
    };
    let produce = |batch: Bytes, n: usize| ProduceRequest {
        correlation_id: 1,
        topic: "bomb".into(),
        acks: Acks::All as i32,
        timeout_ms: 0,
        batches: (0..n)
            .map(|_| ProduceBatch {
                partition: Some(0),
                data: Some(Data::RecordBatch(batch.clone())),
                producer: None,
            })
            .collect(),
    };
    let mut producer = broker.producer().await;
    // 60 MiB of zeros compress to a few KiB, far under max.message.bytes, but expand past 16 ×.
    let bomb = zstd_batch(60);
    assert!(bomb.len() < 64 * 1024, "compressed to {} bytes", bomb.len());
    let e = producer
        .produce(produce(bomb, 1))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("decompressed"), "{}", e.message());
    // 12 MiB each is within the bound: accepted.
    let batches = 4;
    producer
        .produce(produce(zstd_batch(12), batches))
        .await
        .expect("produce accepted");

    let pid = broker.pid().expect("pid");
    let before = vm_hwm_kib(pid);
    let mut consumer = broker.consumer().await;
    // A 64 KiB fetch in the default (decoded) format.
    let res = consumer
        .fetch(FetchRequest {
            partitions: vec![FetchPartition {
                topic: "bomb".into(),
                partition: 0,
                offset: 0,
                max_bytes: 64 * 1024,
            }],
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: 64 * 1024,
            format: RecordFormat::Decoded as i32,
        })
        .await;
    let after = vm_hwm_kib(pid);
    let grew_mib = after.saturating_sub(before) / 1024;
    let outcome = match &res {
        Ok(r) => format!(
            "ok, {} records",
            r.get_ref()
                .partitions
                .first()
                .map_or(0, |p| p.records.len())
        ),
        Err(s) => format!("error {:?}: {}", s.code(), s.message()),
    };
    assert!(
        grew_mib < 100,
        "a 64 KiB decoded fetch made the broker's peak RSS grow by {grew_mib} MiB ({outcome})"
    );
    let res = res.unwrap_or_else(|e| panic!("decoded fetch of acknowledged records failed: {e:?}"));
    let p = &res.get_ref().partitions[0];
    // The budget stops after the first batch; the consumer moves on from next_offset.
    assert_eq!(p.records.len(), 1, "{outcome}");
    assert_eq!(p.next_offset, 1);
}
