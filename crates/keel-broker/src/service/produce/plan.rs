//! Validating a produce request: every rule a request must pass before anything is written,
//! as a function of the request and what the broker knows about its topic, without IO.
//!
//! The handler (`super`) looks the topic up, calls [`plan`], and appends what it returns; a
//! request [`plan`] refuses has had no side effect, so its error is definite.

use std::time::Duration;

use keel_batch::{BatchError, DEFAULT_MAX_DECOMPRESSED, VerifiedBatch};
use keel_proto::v1::produce_batch::Data;
use keel_proto::v1::{Acks, ProduceRequest};

use super::encode::encode_records;
use crate::error::{BrokerError, Result};
use crate::groups::OFFSETS_TOPIC;
use crate::partition::Idempotent;

/// How far a batch may expand when decompressed, relative to `max.message.bytes`.
pub const MAX_COMPRESSION_RATIO: u64 = 16;
/// The timeout of a request that sets none.
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;

/// The limits a produce request is checked against: the broker's request limits and the
/// topic's `max.message.bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceLimits {
    pub max_produce_timeout_ms: u32,
    pub max_batches_per_request: usize,
    pub max_records_per_batch: u32,
    /// The topic's `max.message.bytes`: the largest batch, encoded.
    pub max_message_bytes: u64,
}

impl ProduceLimits {
    /// The most a batch may decompress to: a small batch must not expand without limit.
    pub fn max_decompressed(&self) -> usize {
        (self.max_message_bytes.saturating_mul(MAX_COMPRESSION_RATIO) as usize)
            .min(DEFAULT_MAX_DECOMPRESSED)
    }
}

/// What validation asks of the broker: its replicas of the topic's partitions and the
/// producer epochs the metadata records. The handler answers from its state; tests from a
/// table.
pub trait Lookups {
    /// A partition the plan's batches are appended to.
    type Partition: Clone;
    fn partition_count(&self) -> u32;
    /// This broker's writable replica of partition `id`, or why there is none
    /// (UNKNOWN_PARTITION, NOT_LEADER).
    fn partition(&self, id: u32) -> Result<Self::Partition>;
    /// The partition for the next run of keyless records without an explicit partition.
    fn next_sticky(&self) -> u32;
    /// The current epoch of a producer id, if the metadata records one.
    fn producer_epoch(&self, producer_id: i64) -> Option<i16>;
}

/// A request that passed every check: its batches, checked and encoded, ready to append.
#[derive(Debug)]
pub struct Plan<P> {
    pub timeout: Duration,
    /// `acks=all` (or unspecified): the topic's `min.insync.replicas` applies, as in Kafka.
    pub acks_all: bool,
    pub batches: Vec<Prepared<P>>,
    /// Per request batch: its record count (plain records) or `None` (encoded batch).
    pub sources: Vec<Option<usize>>,
}

/// One batch ready to append.
#[derive(Debug)]
pub struct Prepared<P> {
    pub partition: P,
    pub partition_id: u32,
    /// Checked here, once: the log appends it without reading it again.
    pub batch: VerifiedBatch,
    pub records: u32,
    /// Index of the request batch it came from.
    pub source: usize,
    /// For plain records: the input positions of its records within the source batch.
    pub positions: Option<Vec<usize>>,
    pub producer: Option<Idempotent>,
}

/// MESSAGE_TOO_LARGE for `what` of `size` bytes over the topic's `max.message.bytes`.
pub(super) fn over_max_message(what: &'static str, size: u64, limit: u64) -> BrokerError {
    BrokerError::TooLarge {
        what,
        size,
        limit,
        setting: "max.message.bytes",
    }
}

/// Refuses a produce to a topic only the broker writes. Checked before the topic is looked up,
/// so the answer does not depend on whether it exists yet.
pub fn check_writable_topic(name: &str) -> Result<()> {
    if name == OFFSETS_TOPIC {
        return Err(BrokerError::invalid(
            "topic",
            "__consumer_offsets is internal: only group coordinators write to it",
        ));
    }
    Ok(())
}

/// Validates a whole request and encodes its plain records (timestamped `now_ms` where they
/// carry none), before any side effect.
pub fn plan<L: Lookups>(
    req: ProduceRequest,
    limits: &ProduceLimits,
    lookups: &L,
    now_ms: i64,
) -> Result<Plan<L::Partition>> {
    // Every level is answered once the batch is committed: the offsets are only known
    // when the Raft group applies it (docs/api.md, "acks").
    if Acks::try_from(req.acks).is_err() {
        return Err(BrokerError::invalid(
            "acks",
            format!("unknown value {}", req.acks),
        ));
    }
    let timeout_ms = match req.timeout_ms {
        0 => DEFAULT_TIMEOUT_MS,
        t => {
            BrokerError::at_most("timeout_ms", t, limits.max_produce_timeout_ms, "ms")?;
            t
        }
    };
    if req.batches.is_empty() {
        return Err(BrokerError::invalid(
            "batches",
            "at least one batch is required",
        ));
    }
    if req.batches.len() > limits.max_batches_per_request {
        return Err(BrokerError::invalid(
            "batches",
            format!(
                "{} batches exceed the limit of {} per request",
                req.batches.len(),
                limits.max_batches_per_request
            ),
        ));
    }
    let mut batches = Vec::with_capacity(req.batches.len());
    let mut sources = Vec::with_capacity(req.batches.len());
    for (i, b) in req.batches.into_iter().enumerate() {
        match b.data {
            None => {
                return Err(BrokerError::invalid(
                    "batches.data",
                    format!("batches[{i}] sets neither record_batch nor records"),
                ));
            }
            Some(Data::RecordBatch(bytes)) => {
                if b.producer.is_some() {
                    return Err(BrokerError::invalid(
                        "batches.producer",
                        format!(
                            "batches[{i}]: an encoded record_batch carries its producer fields in its header"
                        ),
                    ));
                }
                let pid = b.partition.ok_or_else(|| {
                    BrokerError::invalid(
                        "batches.partition",
                        format!("batches[{i}]: a record_batch needs an explicit partition"),
                    )
                })?;
                let partition = lookups.partition(pid)?;
                let (batch, producer) = check_encoded(i, bytes, limits, lookups)?;
                sources.push(None);
                batches.push(Prepared {
                    partition,
                    partition_id: pid,
                    records: batch.header().record_count,
                    batch,
                    source: i,
                    positions: None,
                    producer,
                });
            }
            Some(Data::Records(list)) => {
                if list.records.is_empty() {
                    return Err(BrokerError::invalid(
                        "batches.records",
                        format!("batches[{i}] has no records"),
                    ));
                }
                records_at_most("batches.records", i, list.records.len() as u64, limits)?;
                let producer = match &b.producer {
                    None => None,
                    Some(f) => {
                        if b.partition.is_none() {
                            return Err(BrokerError::invalid(
                                "batches.partition",
                                format!(
                                    "batches[{i}]: an idempotent records batch needs an explicit partition"
                                ),
                            ));
                        }
                        if f.producer_id < 1 {
                            return Err(BrokerError::invalid(
                                "batches.producer.producer_id",
                                format!(
                                    "batches[{i}]: {} is not a producer id (they start at 1)",
                                    f.producer_id
                                ),
                            ));
                        }
                        idempotent(
                            lookups,
                            i,
                            f.producer_id,
                            i64::from(f.producer_epoch),
                            i64::from(f.base_sequence),
                            list.records.len() as u32,
                        )?
                    }
                };
                sources.push(Some(list.records.len()));
                encode_records(
                    lookups,
                    b.partition,
                    i,
                    list.records,
                    limits.max_message_bytes,
                    producer,
                    now_ms,
                    &mut batches,
                )?;
            }
        }
    }
    Ok(Plan {
        timeout: Duration::from_millis(u64::from(timeout_ms)),
        acks_all: matches!(Acks::try_from(req.acks), Ok(Acks::All | Acks::Unspecified)),
        batches,
        sources,
    })
}

/// Request batch `index` holds `count` records: at most `max_records_per_batch`, whether it came
/// as a record list or encoded (the same message either way).
fn records_at_most(
    field: &'static str,
    index: usize,
    count: u64,
    limits: &ProduceLimits,
) -> Result<()> {
    if count > u64::from(limits.max_records_per_batch) {
        return Err(BrokerError::invalid(
            field,
            format!(
                "batches[{index}] holds {count} records; the limit is {}",
                limits.max_records_per_batch
            ),
        ));
    }
    Ok(())
}

/// Checks request batch `index`, an encoded record batch: its size, CRC and records, that it
/// is a data batch, and its producer fields.
fn check_encoded<L: Lookups>(
    index: usize,
    bytes: bytes::Bytes,
    limits: &ProduceLimits,
    lookups: &L,
) -> Result<(VerifiedBatch, Option<Idempotent>)> {
    let max_message = limits.max_message_bytes;
    if bytes.len() as u64 > max_message {
        return Err(over_max_message(
            "record batch",
            bytes.len() as u64,
            max_message,
        ));
    }
    let batch = VerifiedBatch::validate(bytes, limits.max_decompressed()).map_err(|e| match e {
        BatchError::TooLarge { size, limit } => BrokerError::TooLarge {
            what: "decompressed record batch",
            size,
            limit,
            setting: "16 x max.message.bytes, at most 64 MiB",
        },
        other => BrokerError::CorruptBatch {
            index,
            reason: other.to_string(),
        },
    })?;
    let header = *batch.header();
    if header.attributes.control {
        return Err(BrokerError::CorruptBatch {
            index,
            reason: "control batches are reserved for the broker".into(),
        });
    }
    if u64::from(header.last_offset_delta) + 1 != u64::from(header.record_count) {
        return Err(BrokerError::CorruptBatch {
            index,
            reason: format!(
                "last_offset_delta {} must be record_count - 1 ({})",
                header.last_offset_delta,
                header.record_count.saturating_sub(1)
            ),
        });
    }
    records_at_most(
        "batches.record_batch",
        index,
        u64::from(header.record_count),
        limits,
    )?;
    let producer = idempotent(
        lookups,
        index,
        header.producer_id,
        i64::from(header.producer_epoch),
        i64::from(header.base_sequence),
        header.record_count,
    )?;
    Ok((batch, producer))
}

/// Checks a batch's idempotent-producer fields; `None` for a plain batch (no producer id).
fn idempotent<L: Lookups>(
    lookups: &L,
    index: usize,
    producer_id: i64,
    epoch: i64,
    base_sequence: i64,
    records: u32,
) -> Result<Option<Idempotent>> {
    if producer_id < 0 {
        return Ok(None);
    }
    let bad = |field: &'static str, what: String| {
        Err(BrokerError::invalid(
            field,
            format!("batches[{index}]: {what}"),
        ))
    };
    if producer_id == 0 {
        return bad(
            "producer_id",
            "0 is not a producer id (ids start at 1; get one with InitProducer)".into(),
        );
    }
    let Some(epoch) = i16::try_from(epoch).ok().filter(|e| *e >= 0) else {
        return bad("producer_epoch", format!("{epoch} is outside 0..=32767"));
    };
    let Some(first) = i32::try_from(base_sequence).ok().filter(|s| *s >= 0) else {
        return bad(
            "base_sequence",
            format!("{base_sequence} is outside 0..=2147483647"),
        );
    };
    if let Some(current) = lookups.producer_epoch(producer_id)
        && epoch < current
    {
        return Err(BrokerError::ProducerFenced {
            producer_id,
            epoch,
            current,
        });
    }
    Ok(Some(Idempotent {
        producer_id,
        epoch,
        first_seq: first,
        last_seq: keel_raft::producers::last_sequence(first, records),
    }))
}
