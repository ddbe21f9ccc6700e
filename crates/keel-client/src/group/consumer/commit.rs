//! Commits: the queue `poll`, `commit_*` and revocations put offsets on, and the task that sends
//! them to the coordinator one at a time, in the order they were made.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use keel_proto::v1::OffsetCommit;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{GroupConsumer, Shared};
use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::group::coordinator::by_topic;
use crate::group::membership::Part;
use crate::util::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommitKind {
    /// The consumer's positions: entries that have not moved since the last commit are left
    /// out, and an entry another member already committed past is dropped rather than failing
    /// the commit.
    Positions,
    /// Offsets the caller chose: sent as given.
    Explicit,
    /// Offsets the caller chose, as the least the group's offsets should be: handled like
    /// `Positions` (entries the group is already at or past are dropped).
    Forward,
}

impl CommitKind {
    /// Whether entries the group's committed offset is already at or past are dropped (rather
    /// than sent, or failing the whole commit with `OFFSET_BACKWARDS`).
    fn drops_stale(self) -> bool {
        matches!(self, Self::Positions | Self::Forward)
    }
}

pub(super) struct CommitJob {
    offsets: Vec<OffsetCommit>,
    kind: CommitKind,
    /// The membership the offsets were read under.
    generation: u64,
    reply: oneshot::Sender<Result<()>>,
}

/// The outcome of a queued commit ([`GroupConsumer::commit_async`]). Commits are sent whether
/// or not this is awaited; a failure nobody awaits is logged.
#[must_use = "the commit is sent anyway; await this to learn whether it succeeded"]
#[derive(Debug)]
pub struct CommitFuture {
    rx: oneshot::Receiver<Result<()>>,
}

impl Future for CommitFuture {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => Poll::Ready(Err(ClientError::ConsumerClosed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl GroupConsumer {
    pub(super) fn enqueue_positions(&mut self) -> CommitFuture {
        let offsets = self.positions(&self.consumer.assignment());
        self.enqueue(offsets, CommitKind::Positions)
    }

    pub(super) fn positions(&self, parts: &[Part]) -> Vec<OffsetCommit> {
        parts
            .iter()
            .filter_map(|(topic, partition)| {
                let offset = self.consumer.position(topic, *partition)?;
                Some(OffsetCommit {
                    topic: topic.clone(),
                    partition: *partition,
                    offset,
                    metadata: String::new(),
                })
            })
            .collect()
    }

    pub(super) fn enqueue(&mut self, offsets: Vec<OffsetCommit>, kind: CommitKind) -> CommitFuture {
        let (reply, rx) = oneshot::channel();
        let generation = lock(&self.shared.state).generation;
        let job = CommitJob {
            offsets,
            kind,
            generation,
            reply,
        };
        match &self.commits {
            Some(tx) => {
                if let Err(mpsc::error::SendError(job)) = tx.send(job) {
                    let _ = job.reply.send(Err(ClientError::ConsumerClosed));
                }
            }
            None => {
                let _ = job.reply.send(Err(ClientError::ConsumerClosed));
            }
        }
        CommitFuture { rx }
    }
}

/// Sends queued commits one at a time.
pub(super) async fn commit_loop(
    client: Client,
    shared: Arc<Shared>,
    group: String,
    mut jobs: mpsc::UnboundedReceiver<CommitJob>,
) {
    while let Some(job) = jobs.recv().await {
        let result = commit(
            &client,
            &shared,
            &group,
            job.offsets,
            job.kind,
            job.generation,
        )
        .await;
        if let Err(e) = &result
            && job.reply.is_closed()
        {
            tracing::warn!(group, error = %e, "offset commit failed");
        }
        let _ = job.reply.send(result);
    }
}

async fn commit(
    client: &Client,
    shared: &Shared,
    group: &str,
    mut offsets: Vec<OffsetCommit>,
    kind: CommitKind,
    generation: u64,
) -> Result<()> {
    let (member_id, member_epoch) = {
        let s = lock(&shared.state);
        if s.generation != generation {
            return Err(ClientError::UnknownMember {
                message: format!(
                    "the membership in group {group:?} was lost before the commit was sent"
                ),
                definite: true,
            });
        }
        (s.member_id.clone(), s.member_epoch)
    };
    let key = |o: &OffsetCommit| (o.topic.clone(), o.partition);
    let unmoved = |known: &HashMap<Part, u64>, o: &OffsetCommit| {
        known.get(&key(o)).is_some_and(|&c| o.offset <= c)
    };
    if kind.drops_stale() {
        let known = lock(&shared.committed);
        offsets.retain(|o| !unmoved(&known, o));
    }
    if offsets.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + client.config().request_timeout;
    let mut resolved_backwards = false;
    loop {
        let sent = offsets.clone();
        match client
            .commit_group_offsets(group, &member_id, member_epoch, sent, deadline)
            .await
        {
            Ok(()) => {
                let mut known = lock(&shared.committed);
                for o in &offsets {
                    let c = known.entry(key(o)).or_insert(o.offset);
                    *c = (*c).max(o.offset);
                }
                return Ok(());
            }
            // The group's offset is already past one of ours: an earlier owner (from before
            // this member got the partition back) committed further. That partition has
            // nothing to commit; the others still do, since a commit is all or none.
            Err(ClientError::OffsetBackwards { .. })
                if kind.drops_stale() && !resolved_backwards =>
            {
                resolved_backwards = true;
                let parts = by_topic(offsets.iter().map(|o| (o.topic.as_str(), o.partition)));
                let current = client.fetch_group_offsets(group, parts, deadline).await?;
                let mut known = lock(&shared.committed);
                for c in current {
                    let e = known.entry((c.topic, c.partition)).or_insert(c.offset);
                    *e = (*e).max(c.offset);
                }
                let before = offsets.len();
                offsets.retain(|o| !unmoved(&known, o));
                tracing::debug!(
                    group,
                    dropped = before - offsets.len(),
                    "the group's offsets were already past some of the commit; committing the rest"
                );
                if offsets.is_empty() {
                    return Ok(());
                }
            }
            Err(e @ ClientError::FencedMember { .. }) => {
                let parts: Vec<Part> = offsets.iter().map(key).collect();
                if lock(&shared.state).on_fenced(generation, &parts) {
                    shared.wake_poll.notify_one();
                }
                return Err(e);
            }
            Err(e @ ClientError::UnknownMember { .. }) => {
                shared.lost(generation, false);
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
}
