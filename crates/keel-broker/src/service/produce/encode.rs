//! Encoding a request's plain records: each record goes to its partition (explicit, by key, or
//! sticky), and each partition's records become batches of at most `max.message.bytes`.

use std::collections::BTreeMap;

use bytes::Bytes;
use keel_batch::{BatchBuilder, Compression, ProducerInfo, RecordRef, VerifiedBatch};
use keel_proto::v1::Record;
use keel_types::partition_for_key;

use super::plan::{Lookups, Prepared, over_max_message};
use crate::error::{BrokerError, Result};
use crate::partition::Idempotent;

/// What a record adds to a batch besides its key, value and headers (an upper bound on its
/// varints and attributes), and per header.
const RECORD_OVERHEAD: usize = 64;
const HEADER_OVERHEAD: usize = 8;

/// Partitions plain records of request batch `source` and encodes them as batches of at most
/// `max_message` bytes, appended to `out`.
#[allow(clippy::too_many_arguments)] // each is one fact about the batch, named at the call
pub fn encode_records<L: Lookups>(
    lookups: &L,
    explicit: Option<u32>,
    source: usize,
    records: Vec<Record>,
    max_message: u64,
    producer: Option<Idempotent>,
    now_ms: i64,
    out: &mut Vec<Prepared<L::Partition>>,
) -> Result<()> {
    let count = lookups.partition_count();
    // Picked only when a keyless record needs it, so keyed traffic does not move it.
    let mut sticky = None;
    let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        let pid = match (explicit, &r.key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, count),
            (None, None) => *sticky.get_or_insert_with(|| lookups.next_sticky()),
        };
        by_partition.entry(pid).or_default().push(i);
        for h in &r.headers {
            if h.key.is_empty() {
                return Err(BrokerError::invalid(
                    "records.headers.key",
                    format!("batches[{source}].records[{i}] has an empty header key"),
                ));
            }
        }
    }
    for (pid, idxs) in by_partition {
        let partition = lookups.partition(pid)?;
        let fresh = || {
            let b = BatchBuilder::new(Compression::None);
            match producer {
                Some(p) => b.producer(ProducerInfo {
                    producer_id: p.producer_id,
                    producer_epoch: p.epoch,
                    base_sequence: p.first_seq,
                }),
                None => b,
            }
        };
        let mut builder = fresh();
        let mut members: Vec<usize> = Vec::new();
        let flush = |builder: BatchBuilder,
                     members: Vec<usize>,
                     out: &mut Vec<Prepared<L::Partition>>|
         -> Result<()> {
            let records = builder.len();
            let bytes = builder
                .build()
                .map_err(|e| BrokerError::Internal(e.to_string()))?;
            if bytes.len() as u64 > max_message {
                return Err(over_max_message("record", bytes.len() as u64, max_message));
            }
            // The one check of a batch this broker built (the log does not repeat it).
            let batch = VerifiedBatch::check(Bytes::from(bytes))
                .map_err(|e| BrokerError::Internal(format!("a batch built here: {e}")))?;
            out.push(Prepared {
                partition: partition.clone(),
                partition_id: pid,
                batch,
                records,
                source,
                positions: Some(members),
                producer,
            });
            Ok(())
        };
        for i in idxs {
            let r = &records[i];
            let headers: Vec<(&str, Option<&[u8]>)> = r
                .headers
                .iter()
                .map(|h| (h.key.as_str(), h.value.as_deref()))
                .collect();
            let rec = RecordRef {
                timestamp: if r.timestamp_ms == 0 {
                    now_ms
                } else {
                    r.timestamp_ms
                },
                key: r.key.as_deref(),
                value: r.value.as_deref(),
                headers: &headers,
            };
            let size = r.key.as_ref().map_or(0, Bytes::len)
                + r.value.as_ref().map_or(0, Bytes::len)
                + r.headers
                    .iter()
                    .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len) + HEADER_OVERHEAD)
                    .sum::<usize>()
                + RECORD_OVERHEAD;
            if !builder.is_empty() && (builder.size_bytes() + size) as u64 > max_message {
                if producer.is_some() {
                    // One sequence range is one batch.
                    return Err(over_max_message(
                        "idempotent records batch",
                        (builder.size_bytes() + size) as u64,
                        max_message,
                    ));
                }
                let full = std::mem::replace(&mut builder, fresh());
                flush(full, std::mem::take(&mut members), out)?;
            }
            builder
                .push(&rec)
                .map_err(|e| BrokerError::Internal(e.to_string()))?;
            members.push(i);
        }
        flush(builder, members, out)?;
    }
    Ok(())
}
