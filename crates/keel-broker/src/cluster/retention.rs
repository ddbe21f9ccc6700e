//! Retention of a partition: a snapshot of its state machine at the retention boundary, then a
//! purge of its Raft log up to it, which deletes whole segments.

use std::sync::Arc;
use std::time::Duration;

use super::meta::partition_group;
use super::{ClusterNode, blocking, raft_err, storage_err};
use crate::error::Result;
use crate::partition::Partition;
use crate::topic_config::Resolved;

/// How long retention waits for its snapshot and its purge.
const RETENTION_WAIT: Duration = Duration::from_secs(30);

impl ClusterNode {
    /// Retention of a replicated partition: snapshot its state machine at the retention
    /// boundary (the last entry wholly before the first segment to keep), then purge the Raft
    /// log up to it, which deletes those segments. A follower that needs purged entries later
    /// receives that snapshot and continues from the boundary with ordinary replication.
    pub async fn retain(&self, p: &Arc<Partition>, cfg: &Resolved) -> Result<u64> {
        let r = p.raft();
        let (log, sm) = (Arc::clone(p.log()), r.sm.clone());
        let (ms, bytes) = (cfg.retention_ms, cfg.retention_bytes);
        let floor = self.delete_floor(p, r.group);
        if ms.is_none() && bytes.is_none() && floor <= log.log_start_offset() {
            return Ok(0);
        }
        let before = log.size_bytes();
        let point = blocking(move || {
            let start = log
                .retention_boundary(ms.map(Duration::from_millis), bytes)
                .max(floor.min(log.log_end_offset()));
            if start <= log.log_start_offset() {
                return Ok(None);
            }
            sm.set_snapshot_point_for_offset(start)
                .map_err(|e| storage_err("choosing the retention snapshot point", e))
        })
        .await?;
        let Some(point) = point else {
            return Ok(0);
        };
        r.raft
            .snapshot_to(point.index, RETENTION_WAIT)
            .await
            .map_err(|e| raft_err("retention snapshot", e))?;
        r.raft
            .purge_to(point.index, RETENTION_WAIT)
            .await
            .map_err(|e| raft_err("retention purge", e))?;
        let deleted = before.saturating_sub(p.log().size_bytes());
        tracing::info!(topic = %p.topic, partition = p.id, upto = %point, deleted, "retention purged the raft log");
        Ok(deleted)
    }

    /// The offset below which the metadata lets this partition's records go (DeleteRecords).
    fn delete_floor(&self, p: &Partition, group: u64) -> u64 {
        let state = self.state();
        state
            .topics
            .get(p.topic.as_ref())
            .filter(|t| partition_group(t.meta.id, p.id) == group)
            .and_then(|t| t.partitions.get(p.id as usize))
            .map_or(0, |pm| pm.delete_before)
    }
}
