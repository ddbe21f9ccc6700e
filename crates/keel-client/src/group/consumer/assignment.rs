//! How `poll` applies what the heartbeat task learned: it drops lost partitions, hands over
//! revoked ones (committing them first) and starts new ones at their committed offsets.

use std::sync::Arc;
use std::time::Duration;

use keel_proto::v1::CommittedOffset;
use tokio::time::Instant;

use super::commit::CommitKind;
use super::{GroupConsumer, Shared};
use crate::client::OffsetSpec;
use crate::consumer::{OffsetReset, SeekTo};
use crate::error::{ClientError, Result};
use crate::group::coordinator::by_topic;
use crate::group::membership::Part;
use crate::util::lock;

/// The least time `poll` gives a committed-offset lookup for new partitions, even when its own
/// timeout is shorter; a lookup that still fails with a retriable error is retried later.
const MIN_LOOKUP_TIME: Duration = Duration::from_secs(2);

/// Keeps partitions `poll` is starting in [`Membership::starting`] until they are adopted; if
/// the start fails or is cancelled, gives them up (and has the heartbeat task report the ones
/// revoked meanwhile as gone).
struct StartGuard {
    shared: Arc<Shared>,
    generation: u64,
    parts: Vec<Part>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if lock(&self.shared.state).start_abandoned(self.generation, &self.parts) {
            self.shared.wake_heartbeat.notify_one();
        }
    }
}

impl GroupConsumer {
    /// Applies what the heartbeat task learned: drops lost partitions, hands over revoked ones,
    /// starts new ones. Repeats while the plan changes (a failed revocation commit can lose
    /// the membership, say), a bounded number of times.
    pub(super) async fn reconcile(&mut self, poll_deadline: Instant) -> Result<()> {
        for _ in 0..4 {
            let plan = {
                let s = lock(&self.shared.state);
                if let Some(e) = &s.fatal {
                    return Err(e.clone());
                }
                s.plan()
            };
            if plan.is_empty() {
                break;
            }
            if !plan.lost.is_empty() {
                self.stop(&plan.lost);
                if let Some(l) = self.listener.as_mut() {
                    l.on_lost(&plan.lost);
                }
                self.release(&plan.lost);
            }
            if !plan.revoke.is_empty() {
                self.revoke(&plan.revoke).await;
            }
            if !plan.add.is_empty() && !self.start(plan.add, plan.generation, poll_deadline).await?
            {
                break;
            }
        }
        if lock(&self.shared.state).resume() {
            self.shared.wake_heartbeat.notify_one();
        }
        Ok(())
    }

    /// Stops fetching `parts`. Records of theirs already fetched are discarded with their
    /// partition state, so `poll` never returns them.
    fn stop(&mut self, parts: &[Part]) {
        let keep: Vec<Part> = self
            .consumer
            .assignment()
            .into_iter()
            .filter(|p| !parts.contains(p))
            .collect();
        self.consumer.assign(&keep);
    }

    /// Tells the heartbeat task `parts` are no longer consumed, so that it reports them gone
    /// at once.
    fn release(&mut self, parts: &[Part]) {
        if lock(&self.shared.state).released(parts) {
            self.shared.wake_heartbeat.notify_one();
        }
    }

    async fn revoke(&mut self, parts: &[Part]) {
        let offsets = self.positions(parts);
        self.stop(parts);
        let mut lost = false;
        if self.config.auto_commit && !offsets.is_empty() {
            match self.enqueue(offsets, CommitKind::Positions).await {
                Ok(()) => {}
                Err(e) if e.is_membership_lost() => lost = true,
                Err(e) => tracing::warn!(group = %self.config.group_id, error = %e,
                    "committing revoked partitions failed; their records since the last commit \
                     will be consumed again by their next owner"),
            }
        }
        if let Some(l) = self.listener.as_mut() {
            if lost {
                l.on_lost(parts);
            } else {
                l.on_revoked(parts);
            }
        }
        self.release(parts);
    }

    /// Starts consuming newly assigned partitions from their committed offsets, or per
    /// `auto_offset_reset` for those without one. Returns false when they could not be started
    /// yet (a lookup failed with a retriable error, or the membership changed meanwhile); a
    /// later `poll` tries again.
    async fn start(
        &mut self,
        parts: Vec<Part>,
        generation: u64,
        poll_deadline: Instant,
    ) -> Result<bool> {
        // Only what is still granted; held in `starting` (reported as owned) until adopted or
        // given up, also when this future is dropped or fails half-way.
        let Some(parts) = lock(&self.shared.state).begin_start(generation, &parts) else {
            return Ok(false);
        };
        if parts.is_empty() {
            // All revoked since the plan: plan again.
            return Ok(true);
        }
        let _starting = StartGuard {
            shared: self.shared.clone(),
            generation,
            parts: parts.clone(),
        };
        let budget = self.client.config().request_timeout;
        let now = Instant::now();
        let deadline = poll_deadline.max(now + MIN_LOOKUP_TIME).min(now + budget);
        let group = self.config.group_id.as_str();
        let wanted = by_topic(parts.iter().map(|(t, p)| (t.as_str(), *p)));
        let committed = match self
            .client
            .fetch_group_offsets(group, wanted, deadline)
            .await
        {
            Ok(c) => c,
            Err(e) if retry_later(&e) => {
                tracing::debug!(group, error = %e, "committed offsets lookup failed; retrying later");
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let mut starts: Vec<(Part, u64)> = Vec::with_capacity(parts.len());
        let mut missing: Vec<Part> = Vec::new();
        for p in &parts {
            match committed
                .iter()
                .find(|c| c.topic == p.0 && c.partition == p.1)
            {
                Some(c) => starts.push((p.clone(), c.offset)),
                None => missing.push(p.clone()),
            }
        }
        let spec = match self.config.auto_offset_reset {
            OffsetReset::Earliest => OffsetSpec::Earliest,
            OffsetReset::Latest => OffsetSpec::Latest,
            OffsetReset::None => {
                return match missing.first() {
                    Some((topic, partition)) => Err(ClientError::NoOffset {
                        topic: topic.clone(),
                        partition: *partition,
                        detail: Some(format!("group {group:?} has no committed offset for it")),
                    }),
                    None => self.adopt(parts, generation, starts, &committed).await,
                };
            }
        };
        let lookups = missing.iter().map(|(topic, partition)| {
            let client = self.client.clone();
            async move {
                tokio::time::timeout_at(deadline, client.list_offsets(topic, *partition, spec))
                    .await
                    .unwrap_or_else(|_| {
                        Err(ClientError::timeout(format!(
                            "offset lookup for {topic}/{partition} timed out"
                        )))
                    })
            }
        });
        for (p, r) in missing.iter().zip(futures::future::join_all(lookups).await) {
            match r {
                Ok(r) => starts.push((p.clone(), r.offset)),
                Err(e) if retry_later(&e) => {
                    tracing::debug!(group, error = %e, "offset lookup failed; retrying later");
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        self.adopt(parts, generation, starts, &committed).await
    }

    async fn adopt(
        &mut self,
        parts: Vec<Part>,
        generation: u64,
        starts: Vec<(Part, u64)>,
        committed: &[CommittedOffset],
    ) -> Result<bool> {
        // Partitions revoked while their offsets were looked up are not started: the
        // coordinator may hand them to another member as soon as they are reported gone.
        let Some(parts) = lock(&self.shared.state).adopted(generation, &parts) else {
            return Ok(false);
        };
        if parts.len() < starts.len() {
            // Some were given up: report them gone at once.
            self.shared.wake_heartbeat.notify_one();
        }
        if parts.is_empty() {
            return Ok(true);
        }
        let mut all = self.consumer.assignment();
        all.extend(parts.iter().cloned());
        self.consumer.assign(&all);
        {
            let mut known = lock(&self.shared.committed);
            for p in &parts {
                known.remove(p);
            }
            for c in committed {
                let p = (c.topic.clone(), c.partition);
                if parts.contains(&p) {
                    known.insert(p, c.offset);
                }
            }
        }
        for ((topic, partition), offset) in starts {
            if !parts.iter().any(|p| p.0 == topic && p.1 == partition) {
                continue;
            }
            self.consumer
                .seek(&topic, partition, SeekTo::Offset(offset))
                .await?;
        }
        if let Some(l) = self.listener.as_mut() {
            l.on_assigned(&parts);
        }
        Ok(true)
    }
}

/// Failures that starting a partition waits out: the coordinator or a leader is moving, or the
/// topic was just deleted (the coordinator takes it out of the assignment shortly).
fn retry_later(e: &ClientError) -> bool {
    e.is_retriable()
        || matches!(
            e,
            ClientError::UnknownTopic { .. } | ClientError::UnknownPartition { .. }
        )
}
