//! The group consumer: a [`Consumer`] whose assignment the group's coordinator decides.
//!
//! Three parties share a [`Membership`]:
//! - the heartbeat task joins, heartbeats, and records what the coordinator grants and revokes;
//! - `poll` turns that into consuming: it stops revoked partitions (committing them first),
//!   drops lost ones, and starts new ones at their committed offsets;
//! - the commit task sends commits one at a time, so they reach the coordinator in the order
//!   they were made and a later commit never lands before an earlier one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use keel_proto::v1::{CommittedOffset, OffsetCommit};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::coordinator::{by_topic, commits};
use super::membership::{HeartbeatTemplate, Membership, Part, Phase};
use super::{GroupConfig, RebalanceListener};
use crate::client::{Client, OffsetSpec};
use crate::consumer::{Consumer, ConsumerRecord, OffsetReset, SeekTo};
use crate::error::{ClientError, Result};
use crate::util::{backoff, lock, millis_u32};

/// The least time `poll` gives a committed-offset lookup for new partitions, even when its own
/// timeout is shorter; a lookup that still fails with a retriable error is retried later.
const MIN_LOOKUP_TIME: Duration = Duration::from_secs(2);
/// How long `close` waits for its last commit and for leaving.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// When `poll` was last seen, for `max_poll_interval`.
#[derive(Debug)]
struct PollClock {
    /// A `poll` is running (waiting for records counts as polling).
    active: bool,
    last: Instant,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<Membership>,
    /// Offsets known to be committed, so that commits of positions skip what has not moved.
    committed: Mutex<HashMap<Part, u64>>,
    clock: Mutex<PollClock>,
    /// Wakes the heartbeat task: partitions were released, `poll` resumed, or closing.
    wake_heartbeat: Notify,
    /// Wakes a waiting `poll`: something to reconcile.
    wake_poll: Notify,
}

impl Shared {
    fn lost(&self, generation: u64, left: bool) {
        if lock(&self.state).on_lost(generation, left) {
            self.wake_poll.notify_one();
        }
    }
}

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

/// Marks `poll` active for as long as it runs, also when its future is dropped half-way.
struct PollGuard(Arc<Shared>);

impl PollGuard {
    fn enter(shared: &Arc<Shared>) -> Self {
        {
            let mut c = lock(&shared.clock);
            c.active = true;
            c.last = Instant::now();
        }
        Self(shared.clone())
    }
}

impl Drop for PollGuard {
    fn drop(&mut self) {
        let mut c = lock(&self.0.clock);
        c.active = false;
        c.last = Instant::now();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitKind {
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

struct CommitJob {
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

/// A member of a consumer group: the coordinator assigns it partitions of the topics it
/// subscribes to, sharing them with the group's other members, and it commits how far it got so
/// that whoever consumes a partition next continues from there.
///
/// Created by [`Client::group_consumer`]. A background task joins the group and heartbeats;
/// [`poll`](Self::poll) applies assignment changes (calling the [`RebalanceListener`]) and
/// returns records. `poll` must be called at least every `max_poll_interval`, or the member
/// leaves the group and the next `poll` joins again.
///
/// # Delivery semantics
///
/// Committed offsets decide where a partition's next owner (another member after a rebalance,
/// or this program after a restart) starts reading:
///
/// - **At least once** (the default: `auto_commit`): process each batch `poll` returns before
///   calling `poll` again. Auto-commit only ever commits what earlier polls returned, and
///   commits it before a partition is handed over and on [`close`](Self::close), so a crash
///   redelivers at most what was returned since the last commit, and nothing is skipped. For
///   tighter bounds, turn `auto_commit` off and call [`commit_sync`](Self::commit_sync) after
///   processing each batch.
/// - **At most once**: call [`commit_sync`](Self::commit_sync) right after `poll`, before
///   processing. A crash while processing then skips the rest of that batch instead of
///   redelivering it.
///
/// A partition lost without a handover ([`RebalanceListener::on_lost`]: the session expired,
/// or `poll` came too late) may already be consumed elsewhere; commits for it are refused
/// ([`ClientError::FencedMember`] or [`ClientError::UnknownMember`],
/// [`ClientError::is_membership_lost`]) and its records since the last commit are consumed
/// again by its next owner.
///
/// Dropping a `GroupConsumer` stops its heartbeats without leaving the group, so its
/// partitions wait for its session to time out; call [`close`](Self::close) instead.
pub struct GroupConsumer {
    client: Client,
    config: GroupConfig,
    shared: Arc<Shared>,
    consumer: Consumer,
    listener: Option<Box<dyn RebalanceListener>>,
    commits: Option<mpsc::UnboundedSender<CommitJob>>,
    heartbeat_task: JoinHandle<()>,
    commit_task: Option<JoinHandle<()>>,
    last_auto_commit: Instant,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("group_id", &self.config.group_id)
            .field("membership", &*lock(&self.shared.state))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Joins a consumer group (in the background) as described by `config`. Must be called
    /// inside a tokio runtime: it starts the member's heartbeat and commit tasks.
    pub fn group_consumer(&self, config: GroupConfig) -> Result<GroupConsumer> {
        GroupConsumer::new(self.clone(), config)
    }
}

impl GroupConsumer {
    fn new(client: Client, mut config: GroupConfig) -> Result<Self> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ClientError::InvalidInput(
                "a group consumer must be created inside a tokio runtime".into(),
            )
        })?;
        // Partitions start at positions `start` chose, so the fetching consumer resets only a
        // position that fell out of the log (retention deleted it): to the oldest retained
        // record, never past records that are still there.
        config.consumer.auto_offset_reset = match config.auto_offset_reset {
            OffsetReset::None => OffsetReset::None,
            OffsetReset::Earliest | OffsetReset::Latest => OffsetReset::Earliest,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(Membership::default()),
            committed: Mutex::new(HashMap::new()),
            clock: Mutex::new(PollClock {
                active: false,
                last: Instant::now(),
            }),
            wake_heartbeat: Notify::new(),
            wake_poll: Notify::new(),
        });
        let template = HeartbeatTemplate {
            group_id: config.group_id.clone(),
            instance_id: config.instance_id.clone().unwrap_or_default(),
            topics: config.topics.clone(),
            patterns: config.patterns.clone(),
            session_timeout_ms: millis_u32(config.session_timeout),
            strategy: config.strategy.clone().unwrap_or_default(),
        };
        let heartbeat_task = runtime.spawn(heartbeat_loop(
            client.clone(),
            shared.clone(),
            template,
            config.session_timeout,
            config.max_poll_interval,
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let commit_task = runtime.spawn(commit_loop(
            client.clone(),
            shared.clone(),
            config.group_id.clone(),
            rx,
        ));
        let consumer = client.consumer(config.consumer.clone());
        Ok(Self {
            client,
            config,
            shared,
            consumer,
            listener: None,
            commits: Some(tx),
            heartbeat_task,
            commit_task: Some(commit_task),
            last_auto_commit: Instant::now(),
        })
    }

    pub fn group_id(&self) -> &str {
        &self.config.group_id
    }

    /// Replaces the rebalance listener (none by default).
    pub fn set_rebalance_listener(&mut self, listener: Box<dyn RebalanceListener>) {
        self.listener = Some(listener);
    }

    /// The partitions `poll` currently returns records of.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.consumer.assignment()
    }

    /// The id the coordinator gave this member; `None` until it has joined (and while it
    /// rejoins).
    pub fn member_id(&self) -> Option<String> {
        let s = lock(&self.shared.state);
        (!s.member_id.is_empty()).then(|| s.member_id.clone())
    }

    /// The offset of the next record `poll` returns for an assigned partition, once known.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.consumer.position(topic, partition)
    }

    /// Returns records of the assigned partitions, waiting up to `timeout` for some; an empty
    /// vector means none came (or the member has no partitions yet). Applies assignment changes
    /// first, calling the listener. Fails with the coordinator's rejection when the member
    /// cannot be part of the group (say [`ClientError::InconsistentStrategy`]), and with
    /// [`ClientError::NoOffset`] for a partition without a committed offset when
    /// `auto_offset_reset` is `None`.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        let deadline = Instant::now() + timeout;
        let _active = PollGuard::enter(&self.shared);
        loop {
            self.reconcile(deadline).await?;
            if self.config.auto_commit
                && self.last_auto_commit.elapsed() >= self.config.auto_commit_interval
            {
                self.last_auto_commit = Instant::now();
                // Not awaited: the commit task reports failures, and handles the ones that
                // mean partitions were lost.
                drop(self.enqueue_positions());
            }
            let woken = self.shared.wake_poll.notified();
            if self.consumer.assignment().is_empty() {
                tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                }
            } else {
                let remaining = deadline.saturating_duration_since(Instant::now());
                // The inner poll is cancel-safe: fetches it started are kept and picked up by
                // the next call, and records are only taken out of them by a call that
                // returns them.
                tokio::select! {
                    biased;
                    () = woken => {}
                    r = self.consumer.poll(remaining) => return r,
                }
            }
            if Instant::now() >= deadline {
                self.reconcile(deadline).await?;
                return Ok(Vec::new());
            }
        }
    }

    /// Commits the positions of the assigned partitions that moved since their last commit,
    /// and waits for the answer. Queued behind earlier [`commit_async`](Self::commit_async)
    /// calls.
    pub async fn commit_sync(&mut self) -> Result<()> {
        self.enqueue_positions().await
    }

    /// Queues a commit of the current positions; commits are sent one at a time in the order
    /// they were made.
    pub fn commit_async(&mut self) -> CommitFuture {
        self.enqueue_positions()
    }

    /// Commits `(topic, partition, next offset to consume, metadata)` as given, and waits for
    /// the answer. All or none are committed: if the group's offset of one partition is already
    /// past the one given (a late commit of its previous owner, say), the commit fails with
    /// [`ClientError::OffsetBackwards`] and nothing is committed. See
    /// [`commit_offsets_forward_sync`](Self::commit_offsets_forward_sync) for a commit that
    /// skips those entries instead.
    pub async fn commit_offsets_sync(&mut self, offsets: &[(&str, u32, u64, &str)]) -> Result<()> {
        self.enqueue(commits(offsets), CommitKind::Explicit).await
    }

    /// Moves the group's committed offsets forward to at least `(topic, partition, next offset
    /// to consume, metadata)`, and waits for the answer. Entries the group is already at or past
    /// (another member, or this one earlier, committed as far or further) are left out rather
    /// than failing the commit; the others are committed together. Like the commits of
    /// positions, so it suits committing what was processed: a partition whose previous owner
    /// committed past this member's offset keeps the higher offset.
    pub async fn commit_offsets_forward_sync(
        &mut self,
        offsets: &[(&str, u32, u64, &str)],
    ) -> Result<()> {
        self.enqueue(commits(offsets), CommitKind::Forward).await
    }

    /// Commits (with `auto_commit`), calls the listener's `on_revoked` for every partition,
    /// leaves the group so that its partitions go to the other members at once, and stops the
    /// background tasks. Returns the first failure, after doing all of it.
    pub async fn close(mut self) -> Result<()> {
        let mut first_err = None;
        if self.config.auto_commit
            && let Err(e) = self.enqueue_positions().await
        {
            first_err = Some(e);
        }
        let parts = self.consumer.assignment();
        if !parts.is_empty()
            && let Some(l) = self.listener.as_mut()
        {
            l.on_revoked(&parts);
        }
        let member_id = {
            let mut s = lock(&self.shared.state);
            s.phase = Phase::Stopped;
            std::mem::take(&mut s.member_id)
        };
        self.heartbeat_task.abort();
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        if !member_id.is_empty()
            && let Err(e) = self
                .client
                .leave_group(&self.config.group_id, &member_id, false, deadline)
                .await
        {
            first_err.get_or_insert(e);
        }
        self.commits = None;
        if let Some(task) = self.commit_task.take() {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        first_err.map_or(Ok(()), Err)
    }

    fn enqueue_positions(&mut self) -> CommitFuture {
        let offsets = self.positions(&self.consumer.assignment());
        self.enqueue(offsets, CommitKind::Positions)
    }

    fn positions(&self, parts: &[Part]) -> Vec<OffsetCommit> {
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

    fn enqueue(&mut self, offsets: Vec<OffsetCommit>, kind: CommitKind) -> CommitFuture {
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

    /// Applies what the heartbeat task learned: drops lost partitions, hands over revoked ones,
    /// starts new ones. Repeats while the plan changes (a failed revocation commit can lose
    /// the membership, say), a bounded number of times.
    async fn reconcile(&mut self, poll_deadline: Instant) -> Result<()> {
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

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        lock(&self.shared.state).phase = Phase::Stopped;
        self.heartbeat_task.abort();
        // The commit task finishes the commits already queued, then ends with the channel.
    }
}

/// How often a member asks again while partitions are pending for it.
const PENDING_HEARTBEAT: Duration = Duration::from_millis(100);

/// Keeps the membership alive: joins, heartbeats every `heartbeat_interval_ms` (at once when
/// woken), rejoins after a loss once `poll` has dropped the old partitions, and leaves when
/// `poll` has not been called for `max_poll_interval`. Once `session_timeout` has passed since
/// the last heartbeat that got an answer was sent, it takes the partitions as lost (the
/// coordinator may have removed the member by then), whether or not a heartbeat is out.
async fn heartbeat_loop(
    client: Client,
    shared: Arc<Shared>,
    template: HeartbeatTemplate,
    session_timeout: Duration,
    max_poll_interval: Duration,
) {
    let cfg = client.config().clone();
    let group = template.group_id.as_str();
    let mut next = Instant::now();
    let mut failures = 0u32;
    loop {
        let now = Instant::now();
        let (phase, generation, member_id, interval, lease_end) = {
            let s = lock(&shared.state);
            (
                s.phase,
                s.generation,
                s.member_id.clone(),
                s.heartbeat_interval,
                s.lease_expiry(session_timeout),
            )
        };
        if phase == Phase::Stopped {
            return;
        }
        if lease_end.is_some_and(|t| t <= now) {
            lease_expired(&shared, group, generation);
            continue;
        }
        let overdue_at = {
            let c = lock(&shared.clock);
            (!c.active).then_some(c.last + max_poll_interval)
        };
        if matches!(phase, Phase::Active | Phase::Lost) && overdue_at.is_some_and(|t| t <= now) {
            tracing::warn!(
                group,
                max_poll_interval_ms = max_poll_interval.as_millis(),
                "poll was not called within max_poll_interval; leaving the group until the next poll"
            );
            shared.lost(generation, true);
            if !member_id.is_empty() {
                let deadline = now + cfg.request_timeout.min(session_timeout);
                if let Err(e) = client.leave_group(group, &member_id, false, deadline).await {
                    tracing::debug!(group, error = %e, "leaving the group failed");
                }
            }
            continue;
        }
        if phase == Phase::Active && next <= now {
            let (req, generation, lease_end) = {
                let s = lock(&shared.state);
                (
                    s.heartbeat_request(&template),
                    s.generation,
                    s.lease_expiry(session_timeout),
                )
            };
            let deadline = now + cfg.request_timeout.min(session_timeout);
            let sent_at = Instant::now();
            let call = client.group_heartbeat(req, deadline);
            // A heartbeat that is still out when the lease runs out does not keep the
            // partitions: the coordinator may have removed the member before it arrived.
            let result = match lease_end {
                Some(t) => tokio::select! {
                    r = call => Some(r),
                    () = tokio::time::sleep_until(t) => None,
                },
                None => Some(call.await),
            };
            let Some(result) = result else {
                lease_expired(&shared, group, generation);
                failures += 1;
                next = Instant::now() + backoff(cfg.retry_backoff, cfg.retry_backoff_max, failures);
                continue;
            };
            match result {
                Ok(resp) => {
                    failures = 0;
                    let wake = lock(&shared.state).on_heartbeat(generation, sent_at, &resp);
                    if wake {
                        shared.wake_poll.notify_one();
                    }
                    // Partitions waiting for their previous owner to let go come as soon as
                    // it did: ask again soon instead of a whole interval later, so a
                    // rebalance pauses the moved partitions for less.
                    let interval = lock(&shared.state).heartbeat_interval;
                    next = Instant::now()
                        + if resp.pending.is_empty() {
                            interval
                        } else {
                            interval.min(PENDING_HEARTBEAT)
                        };
                }
                Err(e) if e.is_membership_lost() => {
                    tracing::info!(group, error = %e, "group membership lost; rejoining");
                    shared.lost(generation, false);
                    failures += 1;
                    next = Instant::now()
                        + backoff(cfg.retry_backoff, cfg.retry_backoff_max, failures);
                }
                Err(e) if e.is_retriable() => {
                    failures += 1;
                    tracing::debug!(group, error = %e, "heartbeat failed; retrying");
                    // The lease is checked at the top of the loop (and while sleeping).
                    next = Instant::now()
                        + backoff(cfg.retry_backoff, cfg.retry_backoff_max, failures).min(interval);
                }
                Err(e) => {
                    // Not logged above debug: every `poll` returns it from now on.
                    tracing::debug!(group, error = %e, "the coordinator refused this member");
                    {
                        let mut s = lock(&shared.state);
                        s.fatal = Some(e);
                        s.phase = Phase::Stopped;
                    }
                    shared.wake_poll.notify_one();
                    return;
                }
            }
            continue;
        }
        // Sleep until the next heartbeat is due (or, when not heartbeating, until woken), but
        // wake in time to notice a missed poll.
        let mut wake_at = if phase == Phase::Active {
            next
        } else {
            now + Duration::from_secs(3600)
        };
        // Wake when the lease runs out even if no heartbeat is due before (retries backing
        // off), so the partitions are dropped in time.
        if let Some(t) = lease_end {
            wake_at = wake_at.min(t);
        }
        if matches!(phase, Phase::Active | Phase::Lost)
            && let Some(t) = overdue_at
        {
            wake_at = wake_at.min(t);
        }
        tokio::select! {
            () = tokio::time::sleep_until(wake_at) => {}
            () = shared.wake_heartbeat.notified() => next = Instant::now(),
        }
    }
}

/// Past the session timeout the coordinator may have given the partitions away: consuming them
/// on would only duplicate another member's work.
fn lease_expired(shared: &Shared, group: &str, generation: u64) {
    tracing::warn!(
        group,
        "no heartbeat got through within the session timeout; partitions lost, rejoining"
    );
    shared.lost(generation, false);
}

/// Sends queued commits one at a time.
async fn commit_loop(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientConfig;

    fn assert_send<T: Send>(_: &T) {}

    /// A member of group "g" on a cluster that does not answer: nothing listens on port 1.
    fn unreachable_member() -> GroupConsumer {
        Client::connect_lazy(&["127.0.0.1:1"], ClientConfig::default())
            .expect("client")
            .group_consumer(GroupConfig::new("g").subscribe(["t"]))
            .expect("consumer")
    }

    #[tokio::test]
    async fn consumer_and_its_futures_are_send() {
        let mut c = unreachable_member();
        assert_send(&c);
        assert_send(&c.poll(Duration::ZERO));
        assert_send(&c.commit_sync());
        assert_send(&c.commit_offsets_sync(&[]));
        assert_send(&c.commit_async());
        assert_eq!(c.member_id(), None);
        assert!(c.assignment().is_empty());
    }

    #[tokio::test]
    async fn poll_without_a_coordinator_returns_nothing_and_commits_are_noops() {
        // Nothing listens on port 1: the member never joins, poll just waits out its timeout.
        let mut c = unreachable_member();
        let started = Instant::now();
        let records = c.poll(Duration::from_millis(200)).await.expect("poll");
        assert!(records.is_empty());
        assert!(started.elapsed() < Duration::from_secs(2));
        // No partitions, so nothing to commit and nothing sent.
        c.commit_sync().await.expect("commit");
        c.commit_async().await.expect("commit");
        c.close().await.expect("close");
    }

    /// A forward commit leaves out the partitions the group is already past and commits the
    /// others, where an explicit one fails as a whole; also when the member's knowledge of the
    /// group's offsets is stale and the coordinator answers `OFFSET_BACKWARDS`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forward_commit_drops_what_the_group_is_past() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = keel_broker::BrokerConfig::new(1, dir.path());
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.metrics_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let broker = keel_broker::start(config).await.expect("broker starts");
        let client = Client::connect(&[broker.grpc_addr.to_string()])
            .await
            .expect("client connects");
        let admin = client.admin();
        admin
            .create_topic("t", 2, 0, std::collections::BTreeMap::new())
            .await
            .expect("create");
        admin
            .commit_offsets("g", &[("t", 0, 8, ""), ("t", 1, 2, "")])
            .await
            .expect("commit outside the group");

        let mut c = client
            .group_consumer(GroupConfig::new("g").subscribe(["t"]).auto_commit(false))
            .expect("consumer");
        let started = Instant::now();
        while c.assignment().len() < 2 {
            c.poll(Duration::from_millis(100)).await.expect("poll");
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "not assigned in time"
            );
        }

        let wanted = [("t", 0, 5, ""), ("t", 1, 6, "")];
        assert!(matches!(
            c.commit_offsets_sync(&wanted).await,
            Err(ClientError::OffsetBackwards { .. })
        ));
        // Forget what the member knows of partition 0, so that the commit goes out with it and
        // comes back `OFFSET_BACKWARDS`.
        lock(&c.shared.committed).remove(&("t".to_owned(), 0));
        c.commit_offsets_forward_sync(&wanted)
            .await
            .expect("forward commit");
        let mut got: Vec<(u32, u64)> = admin
            .fetch_offsets("g", &[])
            .await
            .expect("fetch")
            .iter()
            .map(|o| (o.partition, o.offset))
            .collect();
        got.sort_unstable();
        assert_eq!(got, vec![(0, 8), (1, 6)]);
        // Nothing left to commit: nothing sent.
        c.commit_offsets_forward_sync(&[("t", 0, 7, ""), ("t", 1, 6, "")])
            .await
            .expect("nothing to commit");

        c.close().await.expect("close");
        tokio::time::timeout(Duration::from_secs(20), broker.shutdown())
            .await
            .expect("broker shut down in time")
            .expect("clean shutdown");
    }

    #[test]
    fn group_consumer_needs_a_runtime() {
        let client =
            Client::connect_lazy(&["127.0.0.1:1"], ClientConfig::default()).expect("client");
        assert!(matches!(
            client.group_consumer(GroupConfig::new("g").subscribe(["t"])),
            Err(ClientError::InvalidInput(_))
        ));
    }
}
