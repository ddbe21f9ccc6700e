//! A broker's handle on one of its Raft groups: the metadata group or a partition's.
//!
//! Everything a broker does with a group goes through [`Replica`]: submitting a batch and
//! learning its offsets, reading leadership and lease, waiting for a condition, membership
//! changes, snapshots and purges. Its state is read as a plain [`Status`], so that the
//! decisions made on it (the leader pass, readiness) are pure functions of values the broker
//! can build in a unit test. No openraft type crosses this boundary.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ClientWriteError, Fatal, ForwardReason, RaftError};
use openraft::impls::ProgressResponder;
use openraft::raft::{ClientWriteResult, ReadPolicy};
use openraft::type_config::alias::{OneshotReceiverOf, WatchReceiverOf};
use openraft::{BasicNode, Config, Instant as _, RaftMetrics, ServerState, SnapshotPolicy};

use crate::KeelLogStore;
use crate::group_sm::GroupSm;
use crate::network::GroupNetwork;
use crate::server::RaftRegistry;
use crate::types::{AppendAck, BatchData, KeelRaft};

type Raft = openraft::Raft<KeelRaft, GroupSm>;

/// The registry that routes Raft traffic to a broker's groups.
pub type Registry = RaftRegistry<GroupSm>;

/// The gRPC service that carries a broker's Raft traffic.
pub type RaftService =
    crate::wire::pb::raft_service_server::RaftServiceServer<crate::server::RaftServer<GroupSm>>;

/// Why an operation on a group did not happen (or may not have).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    /// This replica does not lead; `leader` is the one it knows of.
    #[error("not the leader (leader: {leader:?}){}", if *.lease_expired { LEASE_EXPIRED } else { "" })]
    NotLeader {
        leader: Option<u64>,
        address: Option<String>,
        /// It does lead, but no quorum acknowledged it within its lease (an election timeout),
        /// so the Raft core refuses new entries until one does: a leader whose group was
        /// asleep (no heartbeats while idle) must renew it first (a heartbeat round).
        lease_expired: bool,
    },
    /// The group's Raft core stopped (shut down, or failed: see [`Replica::failure`]).
    #[error("raft group stopped: {0}")]
    Stopped(String),
    /// The leader stepped down after taking the entry: it may still commit.
    #[error("leadership changed before the entry was committed; it may or may not be")]
    Abandoned,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Anything else openraft refused (a membership change in progress, an entry discarded by
    /// a truncation or purge): the outcome of a write is unknown.
    #[error("{0}")]
    Failed(String),
    #[error("invalid raft config: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, ReplicaError>;

/// How a refusal for an expired lease reads: openraft says only "forward to: None", which reads
/// as if no replica led (it misled the diagnosis of a stall: docs/testing.md, seed 6).
const LEASE_EXPIRED: &str =
    "; it leads, but its lease expired: no quorum acknowledged it within an election timeout";

/// What a replica is in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Candidate,
    Follower,
    Learner,
    Stopped,
}

/// A Raft log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub term: u64,
    pub index: u64,
}

/// A replica's state at one moment: what its Raft core last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<Position>,
    /// Committed by a quorum (on a leader; followers learn it with the next append).
    pub committed: Option<u64>,
    pub snapshot: Option<u64>,
    pub purged: Option<u64>,
    /// The voters of the effective membership (joint: both sets).
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    /// The voters of the committed membership: only these may be reported, since a change
    /// that is not committed may never be.
    pub committed_voters: BTreeSet<u64>,
    /// Every member's peer address.
    pub addresses: BTreeMap<u64, String>,
    /// On a leader: the last index each other member holds (None: not known yet).
    pub matched: BTreeMap<u64, Option<u64>>,
    /// On a leader: how long ago each other member last acknowledged a heartbeat.
    pub heard_from: BTreeMap<u64, Option<Duration>>,
    /// On a leader: how long ago a quorum last acknowledged it.
    pub quorum_acked: Option<Duration>,
}

impl Status {
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    /// Whether this replica is its group's only voter (it elects itself).
    pub fn sole_voter(&self) -> bool {
        self.voters.len() == 1 && self.voters.contains(&self.id)
    }

    fn of(m: &RaftMetrics<KeelRaft>) -> Self {
        let membership = m.membership_config.membership();
        Self {
            id: m.id,
            role: match m.state {
                ServerState::Leader => Role::Leader,
                ServerState::Candidate => Role::Candidate,
                ServerState::Follower => Role::Follower,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Stopped,
            },
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| Position {
                term: l.leader_id.term,
                index: l.index,
            }),
            committed: m.cluster_committed.map(|c| c.index),
            snapshot: m.snapshot.map(|s| s.index),
            purged: m.purged.map(|p| p.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            committed_voters: m
                .committed_membership_config
                .membership()
                .voter_ids()
                .collect(),
            addresses: membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| (*id, l.as_ref().map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
            heard_from: m
                .heartbeat
                .as_ref()
                .map(|h| {
                    h.iter()
                        .map(|(id, t)| (*id, t.as_ref().map(|t| (**t).elapsed())))
                        .collect()
                })
                .unwrap_or_default(),
            quorum_acked: m.last_quorum_acked.as_ref().map(|t| (**t).elapsed()),
        }
    }
}

/// The Raft timing and log policy of a kind of group.
#[derive(Debug, Clone)]
pub struct GroupConfig(Arc<Config>);

impl GroupConfig {
    /// The openraft configuration, for keel-raft's own tests of how groups behave with it.
    #[doc(hidden)]
    pub fn openraft_config(&self) -> Config {
        (*self.0).clone()
    }

    /// Partition groups. Elections start after 0.4–0.8 s without a leader, which bounds
    /// failover; heartbeats every 100 ms keep leases well inside that. Only active groups pay
    /// for this: a broker puts idle ones to sleep (quiet groups).
    pub fn partition() -> Result<Self> {
        Self::validated(Config {
            cluster_name: "keel-partition".into(),
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            // Snapshots are cut only at a retention boundary (see PartitionSm); openraft then
            // purges the log up to exactly that point.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 0,
            ..Config::default()
        })
    }

    /// The metadata group: its state is small, so it snapshots every 1000 entries.
    pub fn metadata() -> Result<Self> {
        Self::validated(Config {
            cluster_name: "keel-metadata".into(),
            heartbeat_interval: 150,
            election_timeout_min: 600,
            election_timeout_max: 1200,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 100,
            ..Config::default()
        })
    }

    /// Pre-vote on: a replica that restarts or reconnects with a stale log must not bump the
    /// term and depose a healthy leader.
    ///
    /// Leader restore off: openraft 0.10 by default lets a node that led before a restart lead
    /// again at once, in the same term, without an election. A leader sends entries to its
    /// followers while its own write is still in the page cache; after a power loss it comes
    /// back without them, and leading the same term again it writes different entries under
    /// the same (term, index) that the followers hold, which Raft then never repairs. The
    /// release fault run hit exactly this after whole-cluster power losses (seed
    /// 1796100000000000017: acknowledged records lost, replicas diverging at one index of one
    /// term). A restarted node therefore always starts as a follower; a new election takes a
    /// new term (a sole voter elects itself on its first tick).
    ///
    /// Log reversion allowed: a follower's log can end before what its leader saw it hold,
    /// when recovery found an acknowledged tail damaged on disk (the replica then stays out of
    /// elections until repaired, `crate::repair`), or when a replica of a topic that leaves
    /// flushing to the OS discards what a failed fsync did not make durable (a loss that
    /// setting accepts, docs/operations.md). The leader must then send those entries again.
    /// Without it openraft asserts (panics, in a debug build: the leader's group died in the
    /// fault run, seed 1796654899890456768 with KEEL_FAULT_FLUSH=os) and a release build would
    /// leave the follower's progress above what it holds. The quorum's acknowledged index
    /// never goes back either way.
    fn validated(c: Config) -> Result<Self> {
        Config {
            enable_pre_vote: Some(true),
            enable_leader_restore: Some(false),
            allow_log_reversion: Some(true),
            ..c
        }
        .validate()
        .map(|c| Self(Arc::new(c)))
        .map_err(|e| ReplicaError::Config(e.to_string()))
    }
}

fn failure_of(running: &std::result::Result<(), Fatal<KeelRaft>>) -> Option<String> {
    match running {
        Err(e @ (Fatal::StorageError(_) | Fatal::Panicked)) => Some(e.to_string()),
        _ => None,
    }
}

fn stopped(e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Stopped(e.to_string())
}

fn write_error(e: ClientWriteError<KeelRaft>) -> ReplicaError {
    match e {
        ClientWriteError::ForwardToLeader(f) => ReplicaError::NotLeader {
            lease_expired: f.reason == ForwardReason::LeaseExpired,
            leader: f.leader_id,
            address: f.leader_node.map(|n| n.addr),
        },
        other => ReplicaError::Failed(other.to_string()),
    }
}

fn raft_error<E: std::fmt::Display>(
    e: RaftError<KeelRaft, E>,
    api: impl FnOnce(E) -> ReplicaError,
) -> ReplicaError {
    match e {
        RaftError::APIError(e) => api(e),
        RaftError::Fatal(f) => stopped(f),
    }
}

/// A batch submitted to a group, until it is committed and applied.
pub struct Submitted(OneshotReceiverOf<KeelRaft, ClientWriteResult<KeelRaft>>);

impl std::fmt::Debug for Submitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Submitted")
    }
}

impl Submitted {
    /// Where the batch landed, once applied.
    pub async fn applied(self) -> Result<AppendAck> {
        match self.0.await {
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(e)) => Err(write_error(e)),
            Err(_) => Err(ReplicaError::Abandoned),
        }
    }
}

/// Follows a replica's [`Status`].
pub struct StatusWatch(WatchReceiverOf<KeelRaft, RaftMetrics<KeelRaft>>);

impl StatusWatch {
    /// Waits for the next change; false once the group is gone.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }

    pub fn status(&self) -> Status {
        Status::of(&self.0.borrow_watched())
    }
}

/// A broker's member of one Raft group (cheap to clone).
#[derive(Clone)]
pub struct Replica {
    pub(crate) raft: Raft,
    /// Its log: the vote gate asks it whether entries are missing (see `crate::repair`).
    pub(crate) store: KeelLogStore,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.raft.metrics().borrow_watched().id)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// Starts this broker's replica of a group over its log and state machine.
    pub async fn start(
        node: u64,
        config: &GroupConfig,
        network: GroupNetwork<Vec<u8>>,
        store: KeelLogStore,
        sm: GroupSm,
    ) -> Result<Self> {
        let raft = Raft::new(node, Arc::clone(&config.0), network, store.clone(), sm)
            .await
            .map_err(stopped)?;
        crate::repair::guard(&raft, &store, node);
        Ok(Self { raft, store })
    }

    /// Routes the group's Raft traffic (`group`) to this replica.
    pub fn serve_in(&self, registry: &Registry, group: u64) {
        registry.register_with_log(group, self.raft.clone(), self.store.clone());
    }

    pub fn status(&self) -> Status {
        Status::of(&self.raft.metrics().borrow_watched())
    }

    pub fn watch(&self) -> StatusWatch {
        StatusWatch(self.raft.metrics())
    }

    /// The term this replica is in (cheaper than a whole [`Status`]).
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }

    /// The leader this replica knows of, with its peer address (cheap).
    pub fn leader(&self) -> Option<(u64, Option<String>)> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let l = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&l)
            .map(|n| n.addr.clone());
        Some((l, addr))
    }

    /// Whether this replica leads, how long ago a quorum acknowledged it, and the voters:
    /// what a broker checks on every produce and fetch (cheaper than a whole [`Status`]).
    pub fn lease(&self) -> (bool, Option<Duration>, Vec<u64>) {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        (
            m.state == ServerState::Leader && m.current_leader == Some(m.id),
            m.last_quorum_acked.as_ref().map(|t| (**t).elapsed()),
            m.membership_config.membership().voter_ids().collect(),
        )
    }

    /// Why the group's Raft core stopped, if a failure (a storage error) stopped it; `None`
    /// while it runs or after a deliberate shutdown.
    pub fn failure(&self) -> Option<String> {
        failure_of(&self.raft.metrics().borrow_watched().running_state)
    }

    /// Resolves with the reason once a failure stops the group; with `None` if the group ends
    /// otherwise. The future holds no handle on the group, so it does not keep it alive.
    pub fn failed(&self) -> impl std::future::Future<Output = Option<String>> + Send + 'static {
        let mut m = self.raft.metrics();
        async move {
            while m.changed().await.is_ok() {
                if let Some(why) = failure_of(&m.borrow_watched().running_state) {
                    return Some(why);
                }
            }
            None
        }
    }

    pub async fn is_initialized(&self) -> Result<bool> {
        self.raft.is_initialized().await.map_err(stopped)
    }

    /// Initialises the group with these voters (id to peer address), once.
    pub async fn initialize(&self, voters: BTreeMap<u64, String>) -> Result<()> {
        let members: BTreeMap<u64, BasicNode> = voters
            .into_iter()
            .map(|(id, addr)| (id, BasicNode::new(addr)))
            .collect();
        self.raft
            .initialize(members)
            .await
            .map_err(|e| raft_error(e, |e| ReplicaError::Failed(e.to_string())))
    }

    /// Submits a batch on the leader (in call order); [`Submitted::applied`] then tells where
    /// it landed. The offsets come from the state machine's apply, not from reading the entry
    /// back: openraft answers a write with what its state machine returned for it.
    pub async fn submit(&self, batch: BatchData) -> Result<Submitted> {
        let (responder, rx) = ProgressResponder::complete_only();
        self.raft
            .client_write_ff(batch, Some(responder))
            .await
            .map_err(stopped)?;
        Ok(Submitted(rx))
    }

    /// Writes a batch on the leader and waits until it is applied; returns its Raft index.
    pub async fn write(&self, batch: BatchData) -> Result<u64> {
        self.raft
            .client_write(batch)
            .await
            .map(|resp| resp.log_id.index)
            .map_err(|e| raft_error(e, write_error))
    }

    /// Turns the election and heartbeat timer on or off (quiet groups turn it off).
    pub fn set_ticking(&self, on: bool) {
        self.raft.runtime_config().tick(on);
    }

    /// Sends one round of heartbeats now (a leader renewing its lease).
    pub async fn heartbeat(&self) {
        let _ = self.raft.trigger().heartbeat().await;
    }

    /// Waits until `until` holds for the replica's status (at most `timeout`).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &'static str,
        until: impl Fn(&Status) -> bool + Send + 'static,
    ) -> Result<Status> {
        self.raft
            .wait(Some(timeout))
            .metrics(move |m| until(&Status::of(m)), what)
            .await
            .map(|m| Status::of(&m))
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(..) => ReplicaError::Timeout(what),
                other => stopped(other),
            })
    }

    pub async fn transfer_leader(&self, to: u64) -> Result<()> {
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(stopped)
    }

    /// Adds a learner; with `wait`, returns once it has caught up.
    pub async fn add_learner(&self, id: u64, address: String, wait: bool) -> Result<()> {
        self.raft
            .add_learner(id, BasicNode::new(address), wait)
            .await
            .map(drop)
            .map_err(|e| raft_error(e, write_error))
    }

    /// Makes `voters` the group's voters (joint consensus); members not in it are removed.
    pub async fn change_voters(&self, voters: BTreeSet<u64>) -> Result<()> {
        self.raft
            .change_membership(voters, false)
            .await
            .map(drop)
            .map_err(|e| raft_error(e, write_error))
    }

    /// Cuts a snapshot now and waits until it is in place.
    pub async fn snapshot_to(&self, index: u64, timeout: Duration) -> Result<()> {
        self.raft.trigger().snapshot().await.map_err(stopped)?;
        self.wait_for(timeout, "a snapshot", move |s| {
            s.snapshot.is_some_and(|i| i >= index)
        })
        .await
        .map(drop)
    }

    /// Purges the log up to `index` (covered by a snapshot) and waits until it is done.
    pub async fn purge_to(&self, index: u64, timeout: Duration) -> Result<()> {
        self.raft
            .trigger()
            .purge_log(index)
            .await
            .map_err(stopped)?;
        self.wait_for(timeout, "a purge", move |s| {
            s.purged.is_some_and(|i| i >= index)
        })
        .await
        .map(drop)
    }

    /// On the leader: its commit index once a quorum confirmed it still leads (a read index).
    pub async fn read_index(&self) -> Result<u64> {
        self.raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map(|r| r.index())
            .map_err(|e| raft_error(e, |e| ReplicaError::Failed(e.to_string())))
    }

    pub async fn shutdown(&self) -> Result<()> {
        self.raft.shutdown().await.map_err(stopped)
    }
}
