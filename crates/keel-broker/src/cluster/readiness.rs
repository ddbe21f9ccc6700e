//! Readiness: a broker answers only once it knows the current metadata (a read index from the
//! metadata leader, applied here) and leads the groups it is the only voter of.

use std::time::{Duration, Instant};

use keel_raft::Replica;

use super::ClusterNode;
use super::forward::{ForwardReply, ForwardRequest};
use crate::registry::Registry;

impl ClusterNode {
    /// Waits (at most `timeout`) until this broker knows the current metadata: the metadata
    /// group has a leader and this broker has applied everything it knows to be committed; then
    /// publishes the topic table. Readiness waits for this, so that a restarted broker does not
    /// answer "unknown topic" for a topic it simply has not replayed yet. A broker that cannot
    /// reach a metadata majority becomes ready anyway when the time is up, with what it has.
    pub async fn wait_ready(&self, registry: &Registry, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut caught_up = false;
        // A broker that must stop (its data directory was refused) does not wait.
        while !caught_up && Instant::now() < deadline && self.fatal.borrow().is_none() {
            caught_up = self.catch_up_once(deadline).await;
            if !caught_up {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if !caught_up {
            tracing::warn!("starting without current metadata (no metadata leader reachable)");
        }
        if let Err(e) = self.reconcile(registry).await {
            tracing::error!(error = %e, "reconcile failed");
        }
        self.wait_sole_voters_lead(deadline).await;
    }

    /// Waits (until `deadline`) until every replica that is its group's only voter leads it:
    /// such a replica needs no one else to elect itself, so a broker of a cluster of one
    /// serves its partitions as soon as it answers.
    async fn wait_sole_voters_lead(&self, deadline: Instant) {
        let me = u64::from(self.id);
        let rafts: Vec<Replica> = self
            .hosted
            .lock()
            .await
            .values()
            .map(|h| h.partition.raft().raft.clone())
            .collect();
        for raft in rafts {
            if !raft.status().sole_voter() {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = raft
                .wait_for(left, "the sole voter leads", move |s| s.leader == Some(me))
                .await;
        }
    }

    /// The metadata leader's read index, confirmed by a quorum (None: not the leader, or no
    /// quorum before `deadline`).
    pub(super) async fn read_index(&self, deadline: Instant) -> Option<u64> {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, self.meta_raft.read_index())
            .await
            .ok()?
            .ok()
    }

    /// One read-index round: asks the metadata leader for its commit index and waits (until
    /// `deadline`) until this broker has applied up to it. True when it has.
    async fn catch_up_once(&self, deadline: Instant) -> bool {
        let Some((leader, addr)) = self.meta_raft.leader() else {
            return false;
        };
        let index = if leader == u64::from(self.id) {
            // Right after a restart the Raft core may believe this broker still leads (from its
            // stored vote) before any peer confirmed it: only a quorum-confirmed read index
            // counts.
            match self.read_index(deadline).await {
                Some(i) => i,
                None => return false,
            }
        } else {
            let Some(addr) = addr else {
                return false;
            };
            match self
                .ask(
                    &addr,
                    leader,
                    &ForwardRequest::ReadIndex,
                    Duration::from_secs(2),
                )
                .await
            {
                Some(ForwardReply::Committed(i)) => i,
                _ => return false,
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        self.meta_raft
            .wait_for(
                left,
                "metadata applied up to the leader's commit",
                move |s| s.last_applied.is_some_and(|a| a.index >= index),
            )
            .await
            .is_ok()
    }
}
