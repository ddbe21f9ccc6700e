//! Produce validation, rule by rule: each refusal names its field (or batch) and limit, and
//! what is accepted is within the limits and CRC-valid. Partitions are a table here
//! ([`Fake`]), so no broker runs.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use keel_log::batch::{
    BatchBuilder, Compression, DEFAULT_MAX_DECOMPRESSED, ProducerInfo, RecordRef, VerifiedBatch,
    control_batch, decode_records,
};
use keel_proto::v1::produce_batch::Data;
use keel_proto::v1::{
    Acks, ProduceBatch, ProduceRequest, ProducerFields, Record, RecordHeader, RecordList,
};
use keel_types::partition_for_key;
use proptest::prelude::*;

use super::plan::{Lookups, Plan, ProduceLimits, check_writable_topic, plan};
use super::response::build_response;
use crate::error::{BrokerError, Result};
use crate::partition::{Appended, Idempotent};

const NOW: i64 = 1_700_000_000_000;

/// Partitions `0..count`, of which `not_led` are led elsewhere; producer epochs from a table.
struct Fake {
    count: u32,
    not_led: BTreeSet<u32>,
    epochs: BTreeMap<i64, i16>,
    sticky: Cell<u32>,
}

impl Fake {
    fn new(count: u32) -> Self {
        Self {
            count,
            not_led: BTreeSet::new(),
            epochs: BTreeMap::new(),
            sticky: Cell::new(0),
        }
    }
}

impl Lookups for Fake {
    type Partition = u32;

    fn partition_count(&self) -> u32 {
        self.count
    }

    fn partition(&self, id: u32) -> Result<u32> {
        if id >= self.count {
            return Err(BrokerError::UnknownPartition {
                topic: "t".into(),
                partition: id,
                count: self.count,
            });
        }
        if self.not_led.contains(&id) {
            return Err(BrokerError::NotLeader {
                topic: "t".into(),
                partition: id,
                leader: Some((2, "b2:9092".into())),
            });
        }
        Ok(id)
    }

    fn next_sticky(&self) -> u32 {
        let n = self.sticky.get();
        self.sticky.set(n + 1);
        n % self.count
    }

    fn producer_epoch(&self, producer_id: i64) -> Option<i16> {
        self.epochs.get(&producer_id).copied()
    }
}

fn limits() -> ProduceLimits {
    ProduceLimits {
        max_produce_timeout_ms: 300_000,
        max_batches_per_request: 10,
        max_records_per_batch: 100,
        max_message_bytes: 4096,
    }
}

fn request(batches: Vec<ProduceBatch>) -> ProduceRequest {
    ProduceRequest {
        correlation_id: 7,
        topic: "t".into(),
        acks: Acks::All as i32,
        timeout_ms: 0,
        batches,
    }
}

fn record(key: Option<&str>, value: &str) -> Record {
    Record {
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        headers: Vec::new(),
        timestamp_ms: 0,
    }
}

fn records(partition: Option<u32>, list: Vec<Record>) -> ProduceBatch {
    ProduceBatch {
        partition,
        data: Some(Data::Records(RecordList { records: list })),
        producer: None,
    }
}

fn values(partition: Option<u32>, n: usize) -> ProduceBatch {
    records(
        partition,
        (0..n).map(|i| record(None, &format!("v{i}"))).collect(),
    )
}

/// An encoded batch of `n` small records.
fn encoded(n: usize, producer: Option<ProducerInfo>, compression: Compression) -> Bytes {
    let mut b = BatchBuilder::new(compression);
    if let Some(p) = producer {
        b = b.producer(p);
    }
    for i in 0..n {
        let value = format!("v{i}");
        b.push(&RecordRef {
            timestamp: NOW,
            key: None,
            value: Some(value.as_bytes()),
            headers: &[],
        })
        .expect("push");
    }
    Bytes::from(b.build().expect("build"))
}

fn batch(partition: u32, bytes: Bytes) -> ProduceBatch {
    ProduceBatch {
        partition: Some(partition),
        data: Some(Data::RecordBatch(bytes)),
        producer: None,
    }
}

fn run(req: ProduceRequest) -> Result<Plan<u32>> {
    plan(req, &limits(), &Fake::new(4), NOW)
}

/// The field and message of an INVALID_ARGUMENT refusal.
#[track_caller]
fn invalid(r: Result<Plan<u32>>) -> (&'static str, String) {
    match r {
        Err(BrokerError::InvalidArgument { field, message }) => (field, message),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[track_caller]
fn too_large(r: Result<Plan<u32>>) -> (&'static str, u64, u64) {
    match r {
        Err(BrokerError::TooLarge {
            what, size, limit, ..
        }) => (what, size, limit),
        other => panic!("expected MESSAGE_TOO_LARGE, got {other:?}"),
    }
}

#[track_caller]
fn corrupt(r: Result<Plan<u32>>) -> (usize, String) {
    match r {
        Err(BrokerError::CorruptBatch { index, reason }) => (index, reason),
        other => panic!("expected CORRUPT_BATCH, got {other:?}"),
    }
}

fn idempotent_fields(producer_id: i64, epoch: i32, base_sequence: i32) -> ProducerFields {
    ProducerFields {
        producer_id,
        producer_epoch: epoch,
        base_sequence,
    }
}

fn producer_info(producer_id: i64, epoch: i16, base_sequence: i32) -> ProducerInfo {
    ProducerInfo {
        producer_id,
        producer_epoch: epoch,
        base_sequence,
    }
}

// Request-level rules.

#[test]
fn the_offsets_topic_is_not_writable() {
    let (field, message) = match check_writable_topic("__consumer_offsets") {
        Err(BrokerError::InvalidArgument { field, message }) => (field, message),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    };
    assert_eq!(field, "topic");
    assert!(message.contains("internal"), "{message}");
    assert!(check_writable_topic("orders").is_ok());
}

#[test]
fn an_unknown_acks_value_is_refused() {
    let mut req = request(vec![values(Some(0), 1)]);
    req.acks = 9;
    let (field, message) = invalid(run(req));
    assert_eq!(field, "acks");
    assert_eq!(message, "unknown value 9");
    for acks in [Acks::Unspecified, Acks::None, Acks::Leader, Acks::All] {
        let mut req = request(vec![values(Some(0), 1)]);
        req.acks = acks as i32;
        assert!(run(req).is_ok(), "{acks:?}");
    }
}

#[test]
fn the_timeout_defaults_to_30s_and_is_bounded() {
    let accepted = run(request(vec![values(Some(0), 1)])).expect("plan");
    assert_eq!(accepted.timeout.as_millis(), 30_000);

    let mut req = request(vec![values(Some(0), 1)]);
    req.timeout_ms = 300_000;
    assert_eq!(run(req).expect("plan").timeout.as_millis(), 300_000);

    let mut req = request(vec![values(Some(0), 1)]);
    req.timeout_ms = 300_001;
    let (field, message) = invalid(run(req));
    assert_eq!(field, "timeout_ms");
    assert_eq!(message, "300001 exceeds the limit of 300000 ms");
}

#[test]
fn a_request_needs_one_batch_and_at_most_the_limit() {
    let (field, message) = invalid(run(request(Vec::new())));
    assert_eq!(field, "batches");
    assert_eq!(message, "at least one batch is required");

    let ten = (0..10).map(|_| values(Some(0), 1)).collect();
    assert_eq!(run(request(ten)).expect("plan").batches.len(), 10);
    let eleven = (0..11).map(|_| values(Some(0), 1)).collect();
    let (field, message) = invalid(run(request(eleven)));
    assert_eq!(field, "batches");
    assert_eq!(message, "11 batches exceed the limit of 10 per request");
}

#[test]
fn a_batch_without_data_is_named_by_index() {
    let empty = ProduceBatch {
        partition: Some(0),
        data: None,
        producer: None,
    };
    let (field, message) = invalid(run(request(vec![values(Some(0), 1), empty])));
    assert_eq!(field, "batches.data");
    assert_eq!(message, "batches[1] sets neither record_batch nor records");
}

// Encoded record batches.

#[test]
fn an_encoded_batch_is_accepted_once_checked() {
    let bytes = encoded(3, None, Compression::None);
    let accepted = run(request(vec![batch(2, bytes.clone())])).expect("plan");
    assert_eq!(accepted.sources, vec![None]);
    let [b] = &accepted.batches[..] else {
        panic!("one batch expected");
    };
    assert_eq!((b.partition, b.partition_id, b.records), (2, 2, 3));
    assert_eq!(b.batch.bytes(), &bytes);
    assert_eq!(
        (b.source, b.positions.as_ref(), b.producer),
        (0, None, None)
    );
}

#[test]
fn an_encoded_batch_carries_no_separate_producer_fields() {
    let mut b = batch(0, encoded(1, None, Compression::None));
    b.producer = Some(idempotent_fields(1, 0, 0));
    let (field, message) = invalid(run(request(vec![b])));
    assert_eq!(field, "batches.producer");
    assert!(message.starts_with("batches[0]:"), "{message}");
}

#[test]
fn an_encoded_batch_needs_an_explicit_partition() {
    let mut b = batch(0, encoded(1, None, Compression::None));
    b.partition = None;
    let (field, message) = invalid(run(request(vec![values(None, 1), b])));
    assert_eq!(field, "batches.partition");
    assert_eq!(
        message,
        "batches[1]: a record_batch needs an explicit partition"
    );
}

#[test]
fn an_encoded_batch_to_a_partition_not_served_here_names_it() {
    let mut fake = Fake::new(4);
    fake.not_led.insert(1);
    let bytes = encoded(1, None, Compression::None);
    match plan(
        request(vec![batch(7, bytes.clone())]),
        &limits(),
        &fake,
        NOW,
    ) {
        Err(BrokerError::UnknownPartition {
            partition, count, ..
        }) => assert_eq!((partition, count), (7, 4)),
        other => panic!("expected UNKNOWN_PARTITION, got {other:?}"),
    }
    match plan(request(vec![batch(1, bytes)]), &limits(), &fake, NOW) {
        Err(BrokerError::NotLeader {
            partition, leader, ..
        }) => assert_eq!((partition, leader), (1, Some((2, "b2:9092".into())))),
        other => panic!("expected NOT_LEADER, got {other:?}"),
    }
}

#[test]
fn an_encoded_batch_over_max_message_bytes_is_too_large() {
    let mut small = limits();
    let bytes = encoded(50, None, Compression::None);
    small.max_message_bytes = bytes.len() as u64 - 1;
    let r = plan(
        request(vec![batch(0, bytes.clone())]),
        &small,
        &Fake::new(1),
        NOW,
    );
    let (what, size, limit) = too_large(r);
    assert_eq!(what, "record batch");
    assert_eq!((size, limit), (bytes.len() as u64, bytes.len() as u64 - 1));
    small.max_message_bytes = bytes.len() as u64;
    assert!(plan(request(vec![batch(0, bytes)]), &small, &Fake::new(1), NOW).is_ok());
}

#[test]
fn decompressing_is_bounded_by_16_times_max_message_bytes() {
    // Zeros compress well: a small batch that expands past 16 x 4096 bytes.
    let mut b = BatchBuilder::new(Compression::Zstd);
    let zeros = vec![0u8; 100_000];
    b.push(&RecordRef {
        timestamp: NOW,
        key: None,
        value: Some(&zeros),
        headers: &[],
    })
    .expect("push");
    let bytes = Bytes::from(b.build().expect("build"));
    assert!(bytes.len() < 4096);
    let (what, _, limit) = too_large(run(request(vec![batch(0, bytes)])));
    assert_eq!(what, "decompressed record batch");
    assert_eq!(limit, 16 * 4096);
    assert_eq!(limits().max_decompressed(), 16 * 4096);
    let huge = ProduceLimits {
        max_message_bytes: u64::MAX,
        ..limits()
    };
    assert_eq!(huge.max_decompressed(), DEFAULT_MAX_DECOMPRESSED);
}

#[test]
fn a_batch_with_a_bad_crc_is_corrupt_and_named_by_index() {
    let good = encoded(2, None, Compression::None);
    let mut bad = good.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let (index, reason) = corrupt(run(request(vec![
        batch(0, good),
        batch(1, Bytes::from(bad)),
    ])));
    assert_eq!(index, 1);
    assert!(reason.contains("CRC32C mismatch"), "{reason}");
}

#[test]
fn a_control_batch_is_reserved_for_the_broker() {
    let control = Bytes::from(control_batch(b"membership", NOW).expect("control batch"));
    let (index, reason) = corrupt(run(request(vec![batch(0, control)])));
    assert_eq!(index, 0);
    assert_eq!(reason, "control batches are reserved for the broker");
}

#[test]
fn an_encoded_batch_over_the_record_limit_is_refused() {
    let at_limit = encoded(100, None, Compression::None);
    assert!(run(request(vec![batch(0, at_limit)])).is_ok());
    let over = encoded(101, None, Compression::None);
    let (field, message) = invalid(run(request(vec![batch(0, over)])));
    assert_eq!(field, "batches.record_batch");
    assert_eq!(message, "batches[0] holds 101 records; the limit is 100");
}

#[test]
fn an_encoded_batch_carries_its_idempotent_fields_in_its_header() {
    let bytes = encoded(3, Some(producer_info(9, 2, 10)), Compression::None);
    let accepted = run(request(vec![batch(0, bytes)])).expect("plan");
    assert_eq!(
        accepted.batches[0].producer,
        Some(Idempotent {
            producer_id: 9,
            epoch: 2,
            first_seq: 10,
            last_seq: 12,
        })
    );
}

#[test]
fn encoded_idempotent_fields_are_range_checked() {
    let cases = [
        (
            producer_info(0, 0, 0),
            "producer_id",
            "0 is not a producer id",
        ),
        (
            producer_info(5, -1, 0),
            "producer_epoch",
            "-1 is outside 0..=32767",
        ),
        (
            producer_info(5, 0, -2),
            "base_sequence",
            "-2 is outside 0..=2147483647",
        ),
    ];
    for (info, want_field, want) in cases {
        let bytes = encoded(1, Some(info), Compression::None);
        let (field, message) = invalid(run(request(vec![values(Some(0), 1), batch(0, bytes)])));
        assert_eq!(field, want_field);
        assert!(message.starts_with("batches[1]: "), "{message}");
        assert!(message.contains(want), "{message}");
    }
}

#[test]
fn an_older_producer_epoch_is_fenced() {
    let mut fake = Fake::new(1);
    fake.epochs.insert(9, 3);
    let old = encoded(1, Some(producer_info(9, 2, 0)), Compression::None);
    match plan(request(vec![batch(0, old)]), &limits(), &fake, NOW) {
        Err(BrokerError::ProducerFenced {
            producer_id,
            epoch,
            current,
        }) => assert_eq!((producer_id, epoch, current), (9, 2, 3)),
        other => panic!("expected PRODUCER_FENCED, got {other:?}"),
    }
    for epoch in [3, 4] {
        let current = encoded(1, Some(producer_info(9, epoch, 0)), Compression::None);
        assert!(plan(request(vec![batch(0, current)]), &limits(), &fake, NOW).is_ok());
    }
}

// Plain records.

#[test]
fn a_records_batch_needs_records_within_the_limit() {
    let (field, message) = invalid(run(request(vec![values(Some(0), 0)])));
    assert_eq!(field, "batches.records");
    assert_eq!(message, "batches[0] has no records");

    assert!(run(request(vec![values(Some(0), 100)])).is_ok());
    let (field, message) = invalid(run(request(vec![values(Some(0), 101)])));
    assert_eq!(field, "batches.records");
    assert_eq!(message, "batches[0] holds 101 records; the limit is 100");
}

#[test]
fn an_idempotent_records_batch_needs_a_partition_and_a_producer_id() {
    let mut b = values(None, 1);
    b.producer = Some(idempotent_fields(1, 0, 0));
    let (field, message) = invalid(run(request(vec![b])));
    assert_eq!(field, "batches.partition");
    assert!(message.contains("idempotent records batch"), "{message}");

    let mut b = values(Some(0), 1);
    b.producer = Some(idempotent_fields(0, 0, 0));
    let (field, message) = invalid(run(request(vec![b])));
    assert_eq!(field, "batches.producer.producer_id");
    assert_eq!(
        message,
        "batches[0]: 0 is not a producer id (they start at 1)"
    );
}

#[test]
fn idempotent_records_fields_are_range_checked() {
    for (fields, want_field) in [
        (idempotent_fields(1, 32_768, 0), "producer_epoch"),
        (idempotent_fields(1, -1, 0), "producer_epoch"),
        (idempotent_fields(1, 0, -1), "base_sequence"),
    ] {
        let mut b = values(Some(0), 1);
        b.producer = Some(fields);
        let (field, _) = invalid(run(request(vec![b])));
        assert_eq!(field, want_field);
    }
    let mut b = values(Some(3), 4);
    b.producer = Some(idempotent_fields(1, 0, 100));
    let accepted = run(request(vec![b])).expect("plan");
    let [p] = &accepted.batches[..] else {
        panic!("one batch expected");
    };
    assert_eq!(p.partition_id, 3);
    assert_eq!(
        p.producer,
        Some(Idempotent {
            producer_id: 1,
            epoch: 0,
            first_seq: 100,
            last_seq: 103,
        })
    );
    let header = p.batch.header();
    assert_eq!(
        (
            header.producer_id,
            header.producer_epoch,
            header.base_sequence
        ),
        (1, 0, 100)
    );
}

#[test]
fn a_header_key_must_not_be_empty() {
    let mut bad = record(None, "v");
    bad.headers.push(RecordHeader {
        key: String::new(),
        value: None,
    });
    let (field, message) = invalid(run(request(vec![records(
        Some(0),
        vec![record(None, "ok"), bad],
    )])));
    assert_eq!(field, "records.headers.key");
    assert_eq!(message, "batches[0].records[1] has an empty header key");
}

#[test]
fn a_records_batch_to_a_partition_not_served_here_names_it() {
    match run(request(vec![values(Some(9), 1)])) {
        Err(BrokerError::UnknownPartition { partition, .. }) => assert_eq!(partition, 9),
        other => panic!("expected UNKNOWN_PARTITION, got {other:?}"),
    }
}

#[test]
fn a_record_larger_than_max_message_bytes_is_too_large() {
    let big = "x".repeat(5000);
    let (what, _, limit) = too_large(run(request(vec![records(
        Some(0),
        vec![record(None, &big)],
    )])));
    assert_eq!((what, limit), ("record", 4096));
}

#[test]
fn an_idempotent_records_batch_must_fit_one_batch() {
    let half = "x".repeat(2500);
    let mut b = records(Some(0), vec![record(None, &half), record(None, &half)]);
    b.producer = Some(idempotent_fields(1, 0, 0));
    let (what, _, limit) = too_large(run(request(vec![b])));
    assert_eq!((what, limit), ("idempotent records batch", 4096));
}

#[test]
fn plain_records_split_into_batches_that_fit() {
    let third = "x".repeat(1500);
    let list: Vec<Record> = (0..5).map(|_| record(None, &third)).collect();
    let accepted = run(request(vec![records(Some(1), list)])).expect("plan");
    assert!(accepted.batches.len() >= 3, "{}", accepted.batches.len());
    let mut positions = Vec::new();
    for b in &accepted.batches {
        assert!(b.batch.bytes().len() as u64 <= 4096);
        assert_eq!(b.partition_id, 1);
        positions.extend(b.positions.clone().expect("positions"));
    }
    assert_eq!(positions, vec![0, 1, 2, 3, 4]);
    assert_eq!(accepted.sources, vec![Some(5)]);
}

#[test]
fn records_go_to_their_key_partition_and_keyless_ones_share_a_sticky_one() {
    let fake = Fake::new(4);
    fake.sticky.set(2);
    let list = vec![
        record(Some("alpha"), "1"),
        record(None, "2"),
        record(Some("beta"), "3"),
        record(None, "4"),
    ];
    let accepted = plan(request(vec![records(None, list)]), &limits(), &fake, NOW).expect("plan");
    let mut placed = BTreeMap::new();
    for b in &accepted.batches {
        for i in b.positions.as_ref().expect("positions") {
            placed.insert(*i, b.partition_id);
        }
    }
    assert_eq!(placed[&0], partition_for_key(b"alpha", 4));
    assert_eq!(placed[&2], partition_for_key(b"beta", 4));
    assert_eq!((placed[&1], placed[&3]), (2, 2));
    // One sticky pick per request batch that needs one.
    assert_eq!(fake.sticky.get(), 3);
}

#[test]
fn records_without_a_timestamp_get_the_time_of_the_request() {
    let mut dated = record(None, "b");
    dated.timestamp_ms = 42;
    let accepted = run(request(vec![records(
        Some(0),
        vec![record(None, "a"), dated],
    )]))
    .expect("plan");
    let decoded = decode_records(accepted.batches[0].batch.bytes(), 1 << 20).expect("decode");
    let stamps: Vec<i64> = decoded.iter().map(|r| r.timestamp).collect();
    assert_eq!(stamps, vec![NOW, 42]);
}

#[test]
fn the_response_acks_each_request_batch_in_order() {
    let fake = Fake::new(4);
    let list = vec![record(Some("alpha"), "1"), record(Some("beta"), "2")];
    let accepted = plan(
        request(vec![
            batch(3, encoded(2, None, Compression::None)),
            records(None, list),
        ]),
        &limits(),
        &fake,
        NOW,
    )
    .expect("plan");
    let infos: Vec<Appended> = accepted
        .batches
        .iter()
        .enumerate()
        .map(|(i, b)| Appended {
            base_offset: 100 * (i as u64 + 1),
            next_offset: 100 * (i as u64 + 1) + u64::from(b.records),
        })
        .collect();
    let resp = build_response(&accepted, &infos, 7);
    assert_eq!(resp.correlation_id, 7);
    assert_eq!(resp.batches.len(), 2);
    let encoded_ack = &resp.batches[0];
    assert_eq!((encoded_ack.partition, encoded_ack.base_offset), (3, 100));
    assert_eq!(encoded_ack.record_count, 2);
    assert!(encoded_ack.records.is_empty());
    let records_ack = &resp.batches[1];
    assert_eq!(records_ack.record_count, 2);
    let alpha = partition_for_key(b"alpha", 4);
    let beta = partition_for_key(b"beta", 4);
    assert_eq!(records_ack.records[0].partition, alpha);
    assert_eq!(records_ack.records[1].partition, beta);
    for p in &records_ack.records {
        assert!(p.offset >= 200);
    }
}

// Properties.

fn arb_record() -> impl Strategy<Value = Record> {
    (
        proptest::option::of("[a-z]{0,6}"),
        0usize..3000,
        proptest::collection::vec(("[a-z]{1,4}", 0usize..40), 0..3),
    )
        .prop_map(|(key, len, headers)| Record {
            key: key.map(|k| Bytes::from(k.into_bytes())),
            value: Some(Bytes::from(vec![b'v'; len])),
            headers: headers
                .into_iter()
                .map(|(k, n)| RecordHeader {
                    key: k,
                    value: Some(Bytes::from(vec![b'h'; n])),
                })
                .collect(),
            timestamp_ms: 0,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever plain records a request carries, an accepted plan's batches fit
    /// `max.message.bytes`, are CRC-valid, and hold every input record once, in the partition
    /// its key (or the request) names.
    #[test]
    fn accepted_records_fit_the_limits_and_are_crc_valid(
        batches in proptest::collection::vec(
            (proptest::option::of(0u32..4), proptest::collection::vec(arb_record(), 1..12)),
            1..4,
        ),
        max_message in 512u64..8192,
    ) {
        let limits = ProduceLimits { max_message_bytes: max_message, ..limits() };
        let req = request(
            batches
                .iter()
                .map(|(p, list)| records(*p, list.clone()))
                .collect(),
        );
        match plan(req, &limits, &Fake::new(4), NOW) {
            Ok(accepted) => {
                let mut seen: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                for b in &accepted.batches {
                    prop_assert!(b.batch.bytes().len() as u64 <= max_message);
                    prop_assert!(VerifiedBatch::check(b.batch.bytes().clone()).is_ok());
                    let positions = b.positions.as_ref().expect("positions");
                    prop_assert_eq!(positions.len() as u32, b.records);
                    let (explicit, list) = &batches[b.source];
                    for i in positions {
                        let want = match (explicit, &list[*i].key) {
                            (Some(p), _) => Some(*p),
                            (None, Some(k)) => Some(partition_for_key(k, 4)),
                            (None, None) => None,
                        };
                        if let Some(want) = want {
                            prop_assert_eq!(b.partition_id, want);
                        }
                    }
                    seen.entry(b.source).or_default().extend(positions);
                }
                for (source, (_, list)) in batches.iter().enumerate() {
                    let mut got = seen.remove(&source).unwrap_or_default();
                    got.sort_unstable();
                    prop_assert_eq!(got, (0..list.len()).collect::<Vec<_>>());
                }
            }
            // The only refusal these requests can earn: one record alone over the limit.
            Err(BrokerError::TooLarge { what, limit, .. }) => {
                prop_assert_eq!(what, "record");
                prop_assert_eq!(limit, max_message);
            }
            Err(other) => prop_assert!(false, "unexpected refusal {other:?}"),
        }
    }

    /// A flipped byte in one encoded batch either leaves it valid (a field outside the CRC) or
    /// is refused naming that batch; whatever is accepted is CRC-valid.
    #[test]
    fn a_damaged_batch_is_refused_by_its_index(
        count in 1usize..4,
        damaged in 0usize..4,
        at in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let damaged = damaged % count;
        let mut batches = Vec::new();
        for i in 0..count {
            let mut bytes = encoded(i + 1, None, Compression::None).to_vec();
            if i == damaged {
                let at = at.index(bytes.len());
                bytes[at] ^= flip;
            }
            batches.push(batch(0, Bytes::from(bytes)));
        }
        match run(request(batches)) {
            Ok(accepted) => {
                for b in &accepted.batches {
                    prop_assert!(VerifiedBatch::check(b.batch.bytes().clone()).is_ok());
                }
            }
            Err(BrokerError::CorruptBatch { index, .. }) => prop_assert_eq!(index, damaged),
            Err(BrokerError::InvalidArgument { message, .. }) => {
                prop_assert!(message.contains(&format!("batches[{damaged}]")), "{}", message);
            }
            Err(BrokerError::TooLarge { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected refusal {other:?}"),
        }
    }

    /// The first batch, in request order, to a partition this broker does not serve is the
    /// one the refusal names.
    #[test]
    fn a_refusal_names_the_first_partition_not_served(
        targets in proptest::collection::vec(0u32..6, 1..8),
        encoded_batches in proptest::collection::vec(any::<bool>(), 8),
    ) {
        let mut fake = Fake::new(4);
        fake.not_led.insert(1);
        let req = request(
            targets
                .iter()
                .zip(&encoded_batches)
                .map(|(p, enc)| if *enc {
                    batch(*p, encoded(1, None, Compression::None))
                } else {
                    values(Some(*p), 1)
                })
                .collect(),
        );
        let first_bad = targets.iter().copied().find(|p| *p == 1 || *p >= 4);
        match (plan(req, &limits(), &fake, NOW), first_bad) {
            (Ok(_), None) => {}
            (Err(BrokerError::NotLeader { partition, .. }), Some(p)) => prop_assert_eq!(partition, p),
            (Err(BrokerError::UnknownPartition { partition, .. }), Some(p)) => {
                prop_assert_eq!(partition, p)
            }
            (other, want) => prop_assert!(false, "got {other:?}, expected a refusal naming {want:?}"),
        }
    }
}
