//! The periodic sweep: session expiry, following topic changes, and the housekeeping of
//! expired groups, compaction and lag metrics.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Coordinator, OffsetsHost, Shard, ShardState, catalog, now_wall_ms};
use crate::error::Result;
use crate::groups::{OffsetsRecord, TopicPartition};

/// Bounds on the sweep's own writes, so one stuck partition never stalls the others.
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(10);

impl Coordinator {
    /// Runs every few hundred milliseconds: expires sessions and follows topic changes;
    /// with `housekeeping`, also (in a task of its own, so a slow write never delays session
    /// expiry) expires old groups' offsets, writes compacted images and exports lag.
    pub async fn sweep<H: OffsetsHost + 'static>(self: &Arc<Self>, host: &H, housekeeping: bool) {
        self.prune(host);
        let catalog = catalog(host.registry());
        let now = self.now_ms();
        let wall = now_wall_ms();
        let mut expired: Vec<(Arc<Shard>, Vec<OffsetsRecord>)> = Vec::new();
        for shard in self.sweepable_shards(host).await {
            let mut inner = shard.inner.lock().await;
            if let Err(e) = inner.catch_up(&shard.partition) {
                tracing::warn!(error = %e, "coordinator could not fold its offsets partition");
                continue;
            }
            let ShardState {
                groups,
                last_active_ms,
                ..
            } = &mut *inner;
            for (name, g) in groups.iter_mut() {
                for m in g.expire(now, &catalog) {
                    tracing::info!(group = %name, member = %m, "member session expired");
                }
                g.refresh(now, &catalog);
                if !g.is_empty() {
                    last_active_ms.insert(name.clone(), wall);
                }
            }
            groups.retain(|_, g| !g.is_empty());
            if housekeeping {
                let retention = self.offsets_retention_ms;
                let since = inner.loaded_at_ms;
                let (groups, last_active) = (&inner.groups, &inner.last_active_ms);
                let deletions: Vec<OffsetsRecord> = inner
                    .offsets
                    .expired_groups(wall, retention, |g| {
                        groups.contains_key(g)
                            || last_active
                                .get(g)
                                .copied()
                                .unwrap_or(since)
                                .max(since)
                                .saturating_add(retention)
                                > wall
                    })
                    .into_iter()
                    .map(|group| OffsetsRecord::DeleteGroup { group })
                    .collect();
                drop(inner);
                expired.push((shard, deletions));
            }
        }
        if !housekeeping {
            return;
        }
        // At most one housekeeping round at a time.
        let Ok(_one) = self.housekeeping.try_lock() else {
            return;
        };
        let host = host.clone();
        let groups = Arc::clone(self);
        tokio::spawn(async move {
            let Ok(_one) = groups.housekeeping.try_lock() else {
                return;
            };
            for (shard, deletions) in expired {
                for d in &deletions {
                    tracing::info!(group = %d.group(), "deleting the offsets of a group empty for longer than the retention");
                }
                bounded(
                    "delete expired group offsets",
                    groups.write(&shard, &deletions),
                )
                .await;
                bounded(
                    "compact an offsets partition",
                    groups.compact(&host, &shard),
                )
                .await;
            }
            groups.export_lag(&host).await;
        });
    }

    /// `keel_consumer_group_lag{group,topic,partition}` and `keel_consumer_group_lag_sum{group}`
    /// for the groups this broker coordinates.
    async fn export_lag(&self, host: &impl OffsetsHost) {
        for shard in self.shards() {
            if shard.partition.current_term() != shard.term {
                continue;
            }
            let groups: Vec<(String, BTreeMap<TopicPartition, u64>)> = {
                let inner = shard.inner.lock().await;
                inner
                    .offsets
                    .groups()
                    .filter_map(|g| {
                        inner.offsets.group_offsets(g).map(|o| {
                            (
                                g.to_owned(),
                                o.iter().map(|(tp, c)| (tp.clone(), c.offset)).collect(),
                            )
                        })
                    })
                    .collect()
            };
            for (group, offsets) in groups {
                let tps: Vec<TopicPartition> = offsets.keys().cloned().collect();
                let ends = self.high_watermarks(host, &tps).await;
                let mut sum = 0u64;
                for (tp, committed) in &offsets {
                    if let Some(end) = ends.get(tp) {
                        let lag = end.saturating_sub(*committed);
                        sum += lag;
                        metrics::gauge!(
                            "keel_consumer_group_lag",
                            "group" => group.clone(),
                            "topic" => tp.topic.clone(),
                            "partition" => tp.partition.to_string()
                        )
                        .set(lag as f64);
                    }
                }
                metrics::gauge!("keel_consumer_group_lag_sum", "group" => group.clone())
                    .set(sum as f64);
            }
        }
    }
}

/// Runs one housekeeping write for at most [`HOUSEKEEPING_TIMEOUT`]; a failure is logged and
/// left for the next round.
async fn bounded(what: &str, write: impl Future<Output = Result<()>>) {
    match tokio::time::timeout(HOUSEKEEPING_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not {what}"),
        Err(_) => tracing::warn!("timed out: {what}"),
    }
}
