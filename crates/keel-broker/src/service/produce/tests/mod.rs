//! Produce validation, rule by rule (`rules`): each refusal names its field (or batch) and
//! limit; and by property (`properties`): what is accepted is within the limits and CRC-valid.
//! Partitions are a table here ([`Fake`]), so no broker runs.

mod properties;
mod rules;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use keel_batch::{
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
