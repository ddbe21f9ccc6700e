//! A graceful stop: leaderships handed to caught-up voters first, then every Raft group stopped
//! and every log checkpointed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_raft::Replica;

use super::leader_pass::{Memory, caught_up_successor};
use super::meta::META_GROUP;
use super::{ClusterNode, Hosted};
use crate::partition::Partition;

/// The longest a stopping broker waits for its leaderships to move.
const HAND_OVER_WAIT: Duration = Duration::from_secs(3);

impl ClusterNode {
    /// Hands every leadership this broker holds (partitions and metadata) to a caught-up
    /// voter and waits for it (at most 3 s). Called while the gRPC port still serves, since
    /// the Raft traffic of the handover runs over it.
    pub async fn hand_over(&self) {
        let mut replicas: Vec<(Replica, Option<Arc<Partition>>)> = self
            .hosted
            .lock()
            .await
            .values()
            .map(|h| {
                (
                    h.partition.raft().raft.clone(),
                    Some(Arc::clone(&h.partition)),
                )
            })
            .collect();
        replicas.push((self.meta_raft.clone(), None));
        let mut transferring = Vec::new();
        for (raft, partition) in replicas {
            let Some(to) = caught_up_successor(&raft.status()) else {
                continue;
            };
            // A quiet group must be awake to hand over.
            if let Some(p) = &partition
                && p.raft().activity.set_ticking(true)
            {
                raft.set_ticking(true);
            }
            if raft.transfer_leader(to).await.is_ok() {
                transferring.push(raft);
            }
        }
        let deadline = Instant::now() + HAND_OVER_WAIT;
        for raft in transferring {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = raft
                .wait_for(left, "leadership handed over", |s| !s.is_leader())
                .await;
        }
    }

    /// Stops every Raft group and checkpoints the logs (after [`ClusterNode::hand_over`]).
    pub async fn shutdown(&self) {
        let hosted: Vec<(u64, Arc<Partition>)> = self
            .hosted
            .lock()
            .await
            .iter()
            .map(|(g, h)| (*g, Arc::clone(&h.partition)))
            .collect();
        for (g, p) in hosted {
            let h = Hosted {
                partition: p,
                topic_id: 0,
                memory: Memory::default(),
            };
            self.stop_replica(g, &h, false).await;
        }
        self.rafts.unregister(META_GROUP);
        if let Err(e) = self.meta_raft.shutdown().await {
            tracing::warn!(error = %e, "metadata group did not shut down cleanly");
        }
        let store = self.meta_store.clone();
        let _ = tokio::task::spawn_blocking(move || store.checkpoint()).await;
    }
}
