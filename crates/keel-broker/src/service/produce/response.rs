//! The answer to a produce request: one ack per request batch, built from where its batches
//! were appended.

use keel_proto::v1::{BatchAck, ProduceResponse, RecordPosition};

use super::plan::Plan;
use crate::partition::Appended;

/// One ack per request batch (in request order); a batch of plain records split over
/// partitions or batches reports each record's position in input order.
pub fn build_response<P>(
    plan: &Plan<P>,
    infos: &[Appended],
    correlation_id: u64,
) -> ProduceResponse {
    let mut acks: Vec<BatchAck> = plan
        .sources
        .iter()
        .map(|s| BatchAck {
            partition: 0,
            base_offset: 0,
            record_count: 0,
            records: s.map_or_else(Vec::new, |n| vec![RecordPosition::default(); n]),
        })
        .collect();
    let mut seen = vec![false; acks.len()];
    for (b, info) in plan.batches.iter().zip(infos) {
        let Some(ack) = acks.get_mut(b.source) else {
            continue;
        };
        if !seen[b.source] {
            seen[b.source] = true;
            ack.partition = b.partition_id;
            ack.base_offset = info.base_offset;
        }
        ack.record_count += b.records;
        if let Some(positions) = &b.positions {
            for (k, input) in positions.iter().enumerate() {
                if let Some(slot) = ack.records.get_mut(*input) {
                    *slot = RecordPosition {
                        partition: b.partition_id,
                        offset: info.base_offset + k as u64,
                    };
                }
            }
        }
    }
    ProduceResponse {
        correlation_id,
        batches: acks,
        error: None,
    }
}
