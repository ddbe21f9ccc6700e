//! The group consumer: a [`Consumer`] whose assignment the group's coordinator decides.
//!
//! Three parties share a [`Membership`]:
//! - the heartbeat task joins, heartbeats, and records what the coordinator grants and revokes;
//! - `poll` turns that into consuming: it stops revoked partitions (committing them first),
//!   drops lost ones, and starts new ones at their committed offsets;
//! - the commit task sends commits one at a time, so they reach the coordinator in the order
//!   they were made and a later commit never lands before an earlier one.
//!
//! This file holds the consumer's public API and the state the three share; the heartbeat task
//! is in `heartbeat.rs`, how `poll` applies assignment changes in `assignment.rs`, and the commit
//! queue and task in `commit.rs`.

mod assignment;
mod commit;
mod heartbeat;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use commit::CommitFuture;
use commit::{CommitJob, CommitKind, commit_loop};
use heartbeat::heartbeat_loop;

use super::coordinator::commits;
use super::membership::{HeartbeatTemplate, Membership, Part, Phase};
use super::{GroupConfig, RebalanceListener};
use crate::client::Client;
use crate::consumer::{Consumer, ConsumerRecord, OffsetReset};
use crate::error::{ClientError, Result};
use crate::util::{lock, millis_u32};

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
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        lock(&self.shared.state).phase = Phase::Stopped;
        self.heartbeat_task.abort();
        // The commit task finishes the commits already queued, then ends with the channel.
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
