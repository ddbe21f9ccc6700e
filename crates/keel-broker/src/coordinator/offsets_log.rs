//! Writing the offsets log: appending commits, resets and deletions, and compacting it into
//! an image of the current state.

use bytes::Bytes;
use keel_batch::{BatchBuilder, Compression, RecordRef, VerifiedBatch};

use super::{Coordinator, OffsetsHost, Shard, now_wall_ms};
use crate::error::{BrokerError, Result};
use crate::groups::OffsetsRecord;

impl Coordinator {
    /// Appends records to the shard's partition (committed by a majority before it returns)
    /// and folds them back. Callers that check the state before writing hold
    /// [`Shard::writing`] across both.
    pub async fn write(&self, shard: &Shard, records: &[OffsetsRecord]) -> Result<()> {
        let _shared = shard.writers.read().await;
        self.append(shard, records).await
    }

    /// [`Coordinator::write`] for a caller that already holds [`Shard::writing`].
    pub async fn append(&self, shard: &Shard, records: &[OffsetsRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let now = now_wall_ms();
        let mut b = BatchBuilder::new(Compression::None);
        for r in records {
            let value = serde_json::to_vec(r).map_err(|e| BrokerError::Internal(e.to_string()))?;
            b.push(&RecordRef {
                timestamp: now,
                key: Some(r.group().as_bytes()),
                value: Some(&value),
                headers: &[],
            })
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        }
        let batch = Bytes::from(
            b.build()
                .map_err(|e| BrokerError::Internal(e.to_string()))?,
        );
        let limit = 1u64 << 20;
        if batch.len() as u64 > limit {
            return Err(BrokerError::TooLarge {
                what: "offset commit",
                size: batch.len() as u64,
                limit,
                setting: "commit fewer partitions (or shorter metadata) per request",
            });
        }
        let batch = VerifiedBatch::check(batch)
            .map_err(|e| BrokerError::Internal(format!("an offsets batch built here: {e}")))?;
        shard.partition.append(batch).await.map_err(|e| match e {
            BrokerError::NotLeader { leader, topic, .. } => BrokerError::NotCoordinator {
                group: topic,
                coordinator: leader,
            },
            other => other,
        })?;
        shard.inner.lock().await.catch_up(&shard.partition)
    }

    /// Writes the compacted image of a shard once enough records piled up since the last one,
    /// then deletes the log before it (on every replica, through the metadata group).
    ///
    /// Exclusive with every other write of the shard: the image is the state folded up to
    /// offset `start`, and a commit appended between `start` and the image would otherwise be
    /// undone by the image's resets when the log is folded again.
    pub(super) async fn compact(&self, host: &impl OffsetsHost, shard: &Shard) -> Result<()> {
        let same_term = || shard.partition.current_term() == shard.term;
        if !same_term() {
            return Ok(());
        }
        let _exclusive = shard.writers.write().await;
        let (image, start) = {
            let mut inner = shard.inner.lock().await;
            inner.catch_up(&shard.partition)?;
            if inner.since_image < self.compact_records || !same_term() {
                return Ok(());
            }
            (inner.offsets.compacted(), inner.folded_to)
        };
        // Batches of at most ~512 KiB of JSON, so a group with many partitions never makes
        // a batch over the 1 MiB limit (a crash midway leaves the old log, which still folds
        // to the same state).
        let mut batches: Vec<Vec<OffsetsRecord>> = vec![Vec::new()];
        let mut size = 0usize;
        for r in image {
            let len = serde_json::to_vec(&r).map_or(0, |v| v.len()) + 32;
            if size + len > 512 << 10 && batches.last().is_some_and(|b| !b.is_empty()) {
                batches.push(Vec::new());
                size = 0;
            }
            size += len;
            if let Some(b) = batches.last_mut() {
                b.push(r);
            }
        }
        for records in &batches {
            if !same_term() {
                return Err(BrokerError::Unavailable {
                    message: "leadership moved during compaction".into(),
                    definite: false,
                });
            }
            self.append(shard, records).await?;
        }
        host.delete_records_before(&shard.partition.topic, shard.partition.id, start)
            .await?;
        shard.inner.lock().await.since_image = 0;
        tracing::info!(
            partition = shard.partition.id,
            before = start,
            batches = batches.len(),
            "compacted an offsets partition"
        );
        Ok(())
    }
}
