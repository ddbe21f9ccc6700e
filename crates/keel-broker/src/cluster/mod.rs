//! A broker as a member of a cluster: the metadata Raft group, one Raft group per hosted
//! partition replica, and the loops that keep them in step.
//!
//! - Admin requests become [`Command`]s proposed to the metadata group (forwarded to its leader
//!   by any broker); every broker applies them in the same order ([`MetadataSm`]).
//! - The reconciler follows the applied metadata: it starts a Raft replica for each partition
//!   assigned to this broker, stops those that are no longer, and publishes the topic table
//!   the gRPC services read.
//! - Each partition leader reports its leadership and in-sync replicas to the metadata (only
//!   when they change), so that any broker can tell clients where a partition's leader is;
//!   it also carries out reassignments (Raft membership changes) and hands leadership back to
//!   the preferred replica once that one has caught up.

pub mod meta;
pub mod meta_sm;
pub mod quiet;
pub mod sm;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_log::fs::Fs;
use keel_log::{LogConfig, SystemClock};
use keel_proto::v1::BrokerInfo;
use keel_raft::{KeelLogStore, PartitionSm, RaftRegistry, RaftTransport, TransportConfig};
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, Instant as _, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{BrokerError, Result};
use crate::metadata::ClusterMeta;
use crate::partition::{Partition, RaftReplica};
use crate::registry::{Placement, Registry, Topic};
use crate::topic_config::Resolved;
use meta::{ClusterState, Command, LeaderReport, META_GROUP, Refusal, Reply, partition_group};
use meta_sm::{MetadataSm, encode_command};
use quiet::{Activity, BEAT, Liveness, QUIET_AFTER};
use sm::{BrokerRaft, BrokerSm};

/// How long an admin request waits for the metadata group (leader election included).
/// Whether a Raft core stopped because something failed (not because it was shut down on
/// purpose, which must not bring it back).
fn stopped_by_failure(
    running: &std::result::Result<(), openraft::error::Fatal<keel_raft::KeelRaft>>,
) -> bool {
    matches!(
        running,
        Err(openraft::error::Fatal::StorageError(_) | openraft::error::Fatal::Panicked)
    )
}

/// The least time between two restarts of one replica whose Raft core keeps stopping.
const RESTART_BACKOFF: Duration = Duration::from_secs(3);

const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// A broker is alive when the metadata leader heard from it this recently.
const ALIVE_WITHIN: Duration = Duration::from_secs(3);
/// How often leaders report and the controller checks its duties.
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// How long a reassignment waits for a new replica to catch up before it retries.
const LEARNER_CATCH_UP: Duration = Duration::from_secs(60);
/// How long a leader keeps leadership before handing it to a caught-up preferred replica.
const PREFERRED_AFTER: Duration = Duration::from_secs(5);

/// What one broker asks another over `Forward`.
#[derive(Debug, Serialize, Deserialize)]
enum ForwardRequest {
    /// Propose a metadata command (the receiver must lead the metadata group).
    Propose(Command),
    /// Which brokers the metadata leader hears from.
    Liveness,
    /// The metadata leader's commit index: everything up to it is what the cluster knows now.
    ReadIndex,
    /// A broker's periodic beat: it is alive, and leads these (group, term)s quietly.
    Beat { from: u32, quiet: Vec<(u64, u64)> },
}

#[derive(Debug, Serialize, Deserialize)]
enum ForwardReply {
    Outcome(std::result::Result<Reply, Refusal>),
    NotLeader(Option<u64>),
    Liveness(BTreeMap<u32, bool>),
    Error(crate::error::RemoteError),
    /// The metadata leader's commit index (for a read-index catch-up).
    Committed(u64),
}

/// Raft timing of partition groups. Elections start after 0.4–0.8 s without a leader, which
/// bounds failover; heartbeats every 100 ms keep leases well inside that. Only active groups
/// pay for this: idle ones are quiet (see [`quiet`]).
fn partition_raft_config() -> Result<Arc<Config>> {
    raft_config(Config {
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

fn meta_raft_config() -> Result<Arc<Config>> {
    raft_config(Config {
        cluster_name: "keel-metadata".into(),
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 100,
        ..Config::default()
    })
}

/// Validates a group's config, with pre-vote on: a replica that restarts or reconnects with a
/// stale log must not bump the term and depose a healthy leader.
fn raft_config(c: Config) -> Result<Arc<Config>> {
    Config {
        enable_pre_vote: Some(true),
        ..c
    }
    .validate()
    .map(Arc::new)
    .map_err(|e| BrokerError::Internal(format!("raft config: {e}")))
}

fn raft_err(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable {
        message: format!("{what}: {e}"),
        definite: false,
    }
}

fn storage_err(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Storage {
        message: format!("{what}: {e}"),
        definite: true,
    }
}

/// A hosted partition replica and what the leader loop remembers about it.
struct Hosted {
    partition: Arc<Partition>,
    topic_id: u64,
    /// When this replica last became leader (for the preferred-leader hand-back).
    leader_since: Option<Instant>,
    /// A membership change in progress (reassignment).
    changing: bool,
    /// The commit index at the previous leader pass: a follower is in sync when it holds
    /// everything committed by then (caught up within one pass, as Kafka's ISR is caught up
    /// within `replica.lag.time.max.ms`).
    prev_committed: u64,
}

/// This broker's part of the cluster.
pub struct ClusterNode {
    pub id: u32,
    pub advertise: String,
    /// Where the other brokers reach this one (see `BrokerMeta::peer_address`).
    pub peer_address: String,
    data_dir: PathBuf,
    /// All storage goes through it: the real filesystem, or `CrashFs` in the fault suite.
    fs: Arc<dyn Fs>,
    transport: RaftTransport,
    rafts: RaftRegistry<BrokerSm>,
    meta_raft: BrokerRaft,
    meta_sm: MetadataSm,
    meta_store: KeelLogStore,
    partition_config: Arc<Config>,
    hosted: tokio::sync::Mutex<HashMap<u64, Hosted>>,
    /// Set when the metadata group's Raft core stopped on a failure (a failed fsync, a full
    /// disk): the broker cannot take part in the cluster any more and exits, for its
    /// supervisor to restart it, as a database does after a failed fsync.
    fatal: watch::Sender<Option<String>>,
    /// Serialises reconciliations.
    reconciling: tokio::sync::Mutex<()>,
    /// When each partition replica was last restarted after its Raft core stopped on a
    /// storage error, so a disk that stays full is retried every few seconds, not in a loop.
    restarted: Mutex<HashMap<u64, Instant>>,
    /// Leader reports sent and not yet visible in the metadata, to avoid re-sending them.
    reported: Mutex<HashMap<u64, LeaderReport>>,
    liveness: Arc<Liveness>,
    reporting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.id)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
}

impl ClusterNode {
    /// Opens the metadata group's storage and starts its Raft node. With `initial_cluster`,
    /// the broker with the lowest id initialises the group over all of them (once).
    pub async fn start(
        id: u32,
        advertise: String,
        data_dir: &Path,
        initial_cluster: &[(u32, String)],
        joining: bool,
        local_address: Option<std::net::IpAddr>,
        fs: Arc<dyn Fs>,
    ) -> Result<Arc<Self>> {
        let transport = RaftTransport::new(
            u64::from(id),
            TransportConfig {
                local_address,
                ..TransportConfig::default()
            },
        );
        let rafts: RaftRegistry<BrokerSm> = RaftRegistry::new(u64::from(id));
        let meta_dir = data_dir.join("metadata");
        let (meta_store, meta_sm) = {
            let (dir, fs) = (meta_dir.clone(), Arc::clone(&fs));
            blocking(move || {
                let store = KeelLogStore::open_with(
                    &dir,
                    LogConfig {
                        segment_bytes: 16 << 20,
                        ..LogConfig::default()
                    },
                    Arc::clone(&fs),
                    Arc::new(SystemClock),
                )
                .map_err(|e| storage_err("opening the metadata log", e))?;
                let sm = MetadataSm::open(&dir, fs)
                    .map_err(|e| storage_err("opening the metadata snapshot", e))?;
                Ok((store, sm))
            })
            .await?
        };
        let meta_raft = BrokerRaft::new(
            u64::from(id),
            meta_raft_config()?,
            transport.group::<Vec<u8>>(META_GROUP),
            meta_store.clone(),
            BrokerSm::Meta(meta_sm.clone()),
        )
        .await
        .map_err(|e| raft_err("starting the metadata group", e))?;
        rafts.register(META_GROUP, meta_raft.clone());

        // Peers reach this broker at its --initial-cluster entry when it has one (which may be a
        // name only the brokers' network resolves), clients at its advertised address.
        let peer_address = initial_cluster
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| advertise.clone(), |(_, a)| a.clone());
        let node = Arc::new(Self {
            id,
            peer_address,
            advertise,
            data_dir: data_dir.to_path_buf(),
            fs,
            transport,
            rafts,
            meta_raft,
            meta_sm,
            meta_store,
            partition_config: partition_raft_config()?,
            hosted: tokio::sync::Mutex::new(HashMap::new()),
            fatal: watch::channel(None).0,
            reconciling: tokio::sync::Mutex::new(()),
            restarted: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
            liveness: Arc::new(Liveness::default()),
            reporting: tokio::sync::Mutex::new(()),
        });
        {
            let weak = Arc::downgrade(&node);
            node.rafts
                .set_forward_handler(Arc::new(move |group, payload| {
                    let weak = weak.clone();
                    Box::pin(async move {
                        let Some(node) = weak.upgrade() else {
                            return Err(tonic::Status::unavailable("broker is stopping"));
                        };
                        node.handle_forward(group, payload).await
                    })
                }));
        }

        {
            let (mut metrics, fatal) = (node.meta_raft.metrics(), node.fatal.clone());
            tokio::spawn(async move {
                while metrics.changed().await.is_ok() {
                    let running = metrics.borrow_watched().running_state.clone();
                    if stopped_by_failure(&running) {
                        let why = match running {
                            Err(e) => e.to_string(),
                            Ok(()) => String::new(),
                        };
                        tracing::error!(error = %why, "the metadata group's Raft core stopped on a failure");
                        fatal.send_replace(Some(format!("the metadata group stopped: {why}")));
                        return;
                    }
                }
            });
        }

        if let Some(lowest) = initial_cluster.iter().map(|(i, _)| *i).min()
            && lowest == id
            && !node
                .meta_raft
                .is_initialized()
                .await
                .map_err(|e| raft_err("metadata group", e))?
        {
            let members: BTreeMap<u64, BasicNode> = initial_cluster
                .iter()
                .map(|(i, a)| (u64::from(*i), BasicNode::new(a.clone())))
                .collect();
            tracing::info!(?members, "initialising the metadata group");
            if let Err(e) = node.meta_raft.initialize(members).await {
                tracing::warn!(error = %e, "metadata group initialisation refused");
            }
        } else if initial_cluster.is_empty()
            && !joining
            && !node
                .meta_raft
                .is_initialized()
                .await
                .map_err(|e| raft_err("metadata group", e))?
        {
            // A cluster of one (a broker started with --join is added by the cluster).
            let members =
                BTreeMap::from([(u64::from(id), BasicNode::new(node.peer_address.clone()))]);
            if let Err(e) = node.meta_raft.initialize(members).await {
                tracing::warn!(error = %e, "metadata group initialisation refused");
            }
        }
        Ok(node)
    }

    /// Resolves with the reason once this broker can no longer serve (see `fatal`).
    pub async fn failed(&self) -> String {
        let mut rx = self.fatal.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// The tonic service carrying Raft traffic for every group on this broker.
    pub fn raft_service(
        &self,
    ) -> keel_raft::wire::pb::raft_service_server::RaftServiceServer<keel_raft::RaftServer<BrokerSm>>
    {
        self.rafts.service()
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.meta_sm.state()
    }

    pub fn metadata_leader(&self) -> Option<u32> {
        self.meta_raft
            .metrics()
            .borrow_watched()
            .current_leader
            .map(|l| l as u32)
    }

    /// Asks a known broker (`--join`) to register this one; the metadata leader then adds it
    /// to the metadata group as a learner.
    pub async fn join(&self, via: &str) -> Result<()> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let req = ForwardRequest::Propose(Command::RegisterBroker {
            id: self.id,
            address: self.advertise.clone(),
            peer_address: self.peer_address.clone(),
        });
        let payload = Bytes::from(
            serde_json::to_vec(&req).map_err(|e| BrokerError::Internal(e.to_string()))?,
        );
        let mut addr = via.to_owned();
        let mut target = 0u64;
        loop {
            // Target 0 is "whoever answers at this address": ask for its id first.
            let reply = self
                .transport
                .forward(
                    &addr,
                    target,
                    META_GROUP,
                    payload.clone(),
                    Duration::from_secs(5),
                )
                .await;
            match reply.map(|b| serde_json::from_slice::<ForwardReply>(&b)) {
                Ok(Ok(ForwardReply::Outcome(r))) => return r.map(drop).map_err(BrokerError::from),
                Ok(Ok(ForwardReply::NotLeader(Some(l)))) => {
                    let s = self.state();
                    if let Some(b) = s.brokers.get(&(l as u32)) {
                        b.peer().clone_into(&mut addr);
                    }
                    target = l;
                }
                other => {
                    if let Err(status) = &other
                        && status.code() == tonic::Code::FailedPrecondition
                        && let Some(id) = status
                            .message()
                            .rsplit(' ')
                            .next()
                            .and_then(|s| s.parse::<u64>().ok())
                    {
                        target = id;
                        continue;
                    }
                    tracing::debug!(?other, "join attempt failed");
                    if Instant::now() > deadline {
                        return Err(BrokerError::Unavailable {
                            message: format!("could not join the cluster through {via}"),
                            definite: true,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Proposes a metadata command and waits until it is applied (on the metadata leader, which
    /// may be another broker); returns its outcome.
    pub async fn propose(&self, cmd: Command) -> Result<()> {
        self.propose_for_reply(cmd).await.map(drop)
    }

    /// Steps 2 and 3 of converting a single-node data directory (see `legacy`): installs its
    /// catalogue in the metadata group, then marks the conversion done.
    pub async fn adopt_legacy(&self, catalogue: ClusterMeta, data_dir: &Path) -> Result<()> {
        self.propose(Command::AdoptSingleNode {
            broker: meta::BrokerMeta {
                id: self.id,
                address: self.advertise.clone(),
                peer_address: self.peer_address.clone(),
                decommissioning: false,
            },
            catalogue,
        })
        .await?;
        let dir = data_dir.to_path_buf();
        blocking(move || crate::legacy::finish(&dir)).await
    }

    /// [`ClusterNode::propose`], returning what the command answered.
    pub async fn propose_for_reply(&self, cmd: Command) -> Result<Reply> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let mut metrics = self.meta_raft.metrics();
        loop {
            let leader = metrics.borrow_watched().current_leader;
            match leader {
                Some(l) if l == u64::from(self.id) => match self.propose_local(&cmd).await {
                    Ok(r) => return r.map_err(BrokerError::from),
                    Err(None) => {}
                    Err(Some(e)) => return Err(e),
                },
                Some(l) => {
                    let addr = metrics
                        .borrow_watched()
                        .membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.addr.clone());
                    if let Some(addr) = addr {
                        let payload = serde_json::to_vec(&ForwardRequest::Propose(cmd.clone()))
                            .map_err(|e| BrokerError::Internal(e.to_string()))?;
                        let reply = self
                            .transport
                            .forward(&addr, l, META_GROUP, Bytes::from(payload), PROPOSE_TIMEOUT)
                            .await;
                        match reply.map(|b| serde_json::from_slice::<ForwardReply>(&b)) {
                            Ok(Ok(ForwardReply::Outcome(r))) => {
                                return r.map_err(BrokerError::from);
                            }
                            Ok(Ok(ForwardReply::Error(e))) => {
                                // The leader's verdict, as it raised it: only what an election
                                // or a restart may clear is worth proposing again.
                                let e = BrokerError::from(e);
                                if !e.kind().is_retriable() {
                                    return Err(e);
                                }
                                tracing::debug!(error = %e, "forwarded proposal failed");
                            }
                            other => tracing::debug!(?other, "forwarding a proposal failed"),
                        }
                    }
                }
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BrokerError::Unavailable {
                    message: "the metadata group has no reachable leader".into(),
                    definite: false,
                });
            }
            // Wait for a leadership change, or retry shortly.
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(200)), metrics.changed()).await;
        }
    }

    /// Proposes on this broker, the metadata leader. `Err(None)`: not the leader any more.
    async fn propose_local(
        &self,
        cmd: &Command,
    ) -> std::result::Result<std::result::Result<Reply, Refusal>, Option<BrokerError>> {
        let data = encode_command(cmd).map_err(|e| Some(BrokerError::Internal(e.to_string())))?;
        match self.meta_raft.client_write(data).await {
            Ok(resp) => Ok(self
                .meta_sm
                .take_outcome(resp.log_id.index)
                .unwrap_or(Ok(Reply::Done))),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(None),
            Err(e) => Err(Some(raft_err("metadata group", e))),
        }
    }

    async fn handle_forward(
        &self,
        group: u64,
        payload: Bytes,
    ) -> std::result::Result<Bytes, tonic::Status> {
        if group != META_GROUP {
            return Err(tonic::Status::invalid_argument(format!(
                "forwarding is only for the metadata group, not group {group}"
            )));
        }
        let req: ForwardRequest = serde_json::from_slice(&payload)
            .map_err(|e| tonic::Status::invalid_argument(format!("forward payload: {e}")))?;
        let reply = match req {
            ForwardRequest::Propose(cmd) => match self.propose_local(&cmd).await {
                Ok(outcome) => ForwardReply::Outcome(outcome),
                // Not the leader: pass it on (a joining broker knows no leader address yet).
                Err(None) => match self.propose_for_reply(cmd).await {
                    Ok(r) => ForwardReply::Outcome(Ok(r)),
                    Err(e) => ForwardReply::Error(e.into()),
                },
                Err(Some(e)) => ForwardReply::Error(e.into()),
            },
            ForwardRequest::ReadIndex => {
                match self
                    .read_index(Instant::now() + Duration::from_secs(2))
                    .await
                {
                    Some(i) => ForwardReply::Committed(i),
                    None => ForwardReply::NotLeader(
                        self.meta_raft.metrics().borrow_watched().current_leader,
                    ),
                }
            }
            ForwardRequest::Beat { from, quiet } => {
                self.liveness.beat_from(from, quiet.into_iter().collect());
                ForwardReply::Outcome(Ok(Reply::Done))
            }
            ForwardRequest::Liveness => match self.local_liveness() {
                Some(l) => ForwardReply::Liveness(l),
                None => ForwardReply::NotLeader(
                    self.meta_raft.metrics().borrow_watched().current_leader,
                ),
            },
        };
        serde_json::to_vec(&reply)
            .map(Bytes::from)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }

    /// On the metadata leader: which brokers acknowledged its heartbeats recently.
    fn local_liveness(&self) -> Option<BTreeMap<u32, bool>> {
        let m = self.meta_raft.metrics();
        let m = m.borrow_watched();
        if m.state != ServerState::Leader {
            return None;
        }
        let hb = m.heartbeat.clone().unwrap_or_default();
        let state = self.state();
        Some(
            state
                .brokers
                .keys()
                .map(|b| {
                    let alive = *b == self.id
                        || hb
                            .get(&u64::from(*b))
                            .and_then(|i| i.as_ref())
                            .is_some_and(|i| (**i).elapsed() < ALIVE_WITHIN);
                    (*b, alive)
                })
                .collect(),
        )
    }

    /// The cluster's brokers and whether the metadata leader hears from them.
    pub async fn brokers(&self) -> Vec<BrokerInfo> {
        let state = self.state();
        let liveness = match self.local_liveness() {
            Some(l) => Some(l),
            None => self.remote_liveness().await,
        };
        state
            .brokers
            .values()
            .map(|b| BrokerInfo {
                id: b.id,
                address: b.address.clone(),
                alive: liveness
                    .as_ref()
                    .map_or(b.id == self.id, |l| l.get(&b.id).copied().unwrap_or(false)),
            })
            .collect()
    }

    async fn remote_liveness(&self) -> Option<BTreeMap<u32, bool>> {
        let leader = self.metadata_leader()?;
        let addr = self.state().brokers.get(&leader)?.peer().to_owned();
        let payload = serde_json::to_vec(&ForwardRequest::Liveness).ok()?;
        let reply = self
            .transport
            .forward(
                &addr,
                u64::from(leader),
                META_GROUP,
                Bytes::from(payload),
                Duration::from_secs(2),
            )
            .await
            .ok()?;
        match serde_json::from_slice(&reply).ok()? {
            ForwardReply::Liveness(l) => Some(l),
            _ => None,
        }
    }

    /// Number of brokers in the metadata group (voters and learners).
    pub fn metadata_members(&self) -> u32 {
        self.meta_raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .nodes()
            .count() as u32
    }

    /// Number of brokers new replicas can be placed on.
    pub fn placeable_brokers(&self) -> u32 {
        self.state().placeable_brokers().len() as u32
    }

    /// Starts (or keeps) a Raft replica for every partition assigned here, stops the others,
    /// and publishes the topic table to `registry`.
    pub async fn reconcile(&self, registry: &Registry) -> Result<()> {
        let _guard = self.reconciling.lock().await;
        let state = self.state();
        // Decide under the lock, do the slow work (opening logs, stopping groups) outside it:
        // the beat and leader loops need the lock too, and a broker whose beats stall for a
        // large create or delete would look dead to its peers.
        let (gone, to_start, crashed) = {
            let mut hosted = self.hosted.lock().await;
            let mut wanted: HashMap<u64, (String, u32)> = HashMap::new();
            for t in state.topics.values() {
                for (p, pm) in t.partitions.iter().enumerate() {
                    let group = partition_group(t.meta.id, p as u32);
                    // A replica the metadata moved away stays until the leader has removed it
                    // from the group (it reports the new voters without this broker); a
                    // removed voter may never learn its removal from the group itself.
                    let moved_off = pm.leader.is_some_and(|l| l != self.id)
                        && !pm.voters.is_empty()
                        && !pm.voters.contains(&self.id);
                    if pm.replicas.contains(&self.id) || (hosted.contains_key(&group) && !moved_off)
                    {
                        wanted.insert(group, (t.meta.name.clone(), p as u32));
                    }
                }
            }
            let gone: Vec<(u64, Hosted)> = hosted
                .keys()
                .filter(|g| !wanted.contains_key(g))
                .copied()
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|g| hosted.remove(&g).map(|h| (g, h)))
                .collect();
            // A replica whose Raft core stopped (a storage error: the disk filled up, an fsync
            // failed) is stopped and opened again, which cuts a torn tail by CRC and resumes
            // replication once the disk works again.
            let crashed: Vec<(u64, Hosted)> = {
                let mut restarted = self
                    .restarted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let due: Vec<u64> = hosted
                    .iter()
                    .filter(|(g, h)| {
                        wanted.contains_key(*g)
                            && stopped_by_failure(
                                &h.partition
                                    .raft()
                                    .raft
                                    .metrics()
                                    .borrow_watched()
                                    .running_state,
                            )
                            && restarted
                                .get(*g)
                                .is_none_or(|t| t.elapsed() >= RESTART_BACKOFF)
                    })
                    .map(|(g, _)| *g)
                    .collect();
                due.into_iter()
                    .filter_map(|g| {
                        restarted.insert(g, Instant::now());
                        hosted.remove(&g).map(|h| (g, h))
                    })
                    .collect()
            };
            for (g, h) in &crashed {
                tracing::warn!(group = g, topic = %h.partition.topic, partition = h.partition.id, "restarting a partition replica whose Raft core stopped");
            }
            let to_start: Vec<(u64, String, u32)> = wanted
                .into_iter()
                .filter(|(g, _)| !hosted.contains_key(g))
                .map(|(g, (name, p))| (g, name, p))
                .collect();
            (gone, to_start, crashed)
        };
        // Stop replicas no longer wanted (topic deleted or moved away).
        for (g, h) in gone {
            self.stop_replica(g, &h, true).await;
        }
        for (g, h) in crashed {
            self.stop_replica(g, &h, false).await;
        }
        // Start new ones.
        for (group, name, p) in to_start {
            let Some(t) = state.topics.get(&name) else {
                continue;
            };
            match self.start_replica(t, p, &state).await {
                Ok(partition) => {
                    self.hosted.lock().await.insert(
                        group,
                        Hosted {
                            partition,
                            topic_id: t.meta.id,
                            leader_since: None,
                            changing: false,
                            prev_committed: u64::MAX,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(topic = %name, partition = p, error = %e, "could not start a partition replica");
                }
            }
        }
        let hosted = self.hosted.lock().await;
        // Publish the topic table.
        let mut topics = HashMap::new();
        for t in state.topics.values() {
            let config = match t.meta.config.resolve() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(topic = %t.meta.name, error = %e, "invalid topic config in metadata");
                    continue;
                }
            };
            let mut partitions = Vec::with_capacity(t.partitions.len());
            let mut placement = Vec::with_capacity(t.partitions.len());
            for (p, pm) in t.partitions.iter().enumerate() {
                let group = partition_group(t.meta.id, p as u32);
                let local = hosted.get(&group).map(|h| Arc::clone(&h.partition));
                if let Some(l) = &local
                    && let Err(e) = l.apply_config(&config)
                {
                    tracing::warn!(topic = %t.meta.name, partition = p, error = %e, "could not apply topic config");
                }
                partitions.push(local);
                placement.push(Placement {
                    replicas: pm.replicas.clone(),
                    leader: pm
                        .leader
                        .and_then(|l| state.brokers.get(&l).map(|b| (l, b.address.clone()))),
                    in_sync: pm.in_sync.clone(),
                });
            }
            topics.insert(
                t.meta.name.clone(),
                Arc::new(Topic::new(t.meta.clone(), config, partitions, placement)),
            );
        }
        // Keep the Topic objects of unchanged topics (subscriptions compare partitions by
        // pointer, and they are the same).
        registry.replace_all(topics);
        Ok(())
    }

    fn partition_dir(&self, t: &meta::TopicState, p: u32) -> PathBuf {
        self.data_dir
            .join("topics")
            .join(t.meta.dir_name())
            .join(p.to_string())
    }

    async fn start_replica(
        &self,
        t: &meta::TopicState,
        p: u32,
        state: &ClusterState,
    ) -> Result<Arc<Partition>> {
        let group = partition_group(t.meta.id, p);
        let config = t.meta.config.resolve()?;
        let dir = self.partition_dir(t, p);
        let log_config = config.log_config();
        let sync = config.flush_every_batch();
        let (hwm_tx, _) = watch::channel(0u64);
        let (store, sm) = {
            let (hwm_tx, fs) = (hwm_tx.clone(), Arc::clone(&self.fs));
            blocking(move || {
                let store = KeelLogStore::open_with(&dir, log_config, fs, Arc::new(SystemClock))
                    .map_err(|e| storage_err("opening a partition log", e))?;
                store.set_sync_appends(sync);
                let sm = PartitionSm::open(&store, hwm_tx)
                    .map_err(|e| storage_err("opening a partition state machine", e))?;
                Ok((store, sm))
            })
            .await?
        };
        let raft = BrokerRaft::new(
            u64::from(self.id),
            Arc::clone(&self.partition_config),
            self.transport.group::<Vec<u8>>(group),
            store.clone(),
            BrokerSm::Partition(sm.clone()),
        )
        .await
        .map_err(|e| raft_err("starting a partition group", e))?;
        self.rafts.register(group, raft.clone());
        let is_init = raft
            .is_initialized()
            .await
            .map_err(|e| raft_err("partition group", e))?;
        // A replica restarted from existing data keeps its ticker off until it knows whether
        // its group's leader declares the group quiet (see `quiet`): otherwise its election
        // timer would depose every idle leader of the groups it shares. The only voter of its
        // group has no leader to hear from: it elects itself on its first tick.
        let sole_voter = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            m.membership_config
                .membership()
                .voter_ids()
                .eq([u64::from(self.id)])
        };
        let wait_for_beats = is_init && !sole_voter;
        if wait_for_beats {
            raft.runtime_config().tick(false);
        }
        if !is_init {
            // Every initial replica initialises with the same membership, the one the topic
            // was created with (`initial`, never changed): the entries are identical, so
            // whichever is elected first leads. A replica added later by a reassignment is not
            // in that set and joins as a learner instead; and since a reassignment is refused
            // until the first leader is reported, two disjoint sets never both initialise.
            let initial = t.partitions.get(p as usize).and_then(|pm| {
                let set = if pm.initial.is_empty() {
                    &pm.replicas
                } else {
                    &pm.initial
                };
                (pm.leader.is_none() && set.contains(&self.id)).then(|| set.clone())
            });
            if let Some(set) = initial {
                let members: BTreeMap<u64, BasicNode> = set
                    .iter()
                    .filter_map(|r| {
                        state
                            .brokers
                            .get(r)
                            .map(|b| (u64::from(*r), BasicNode::new(b.peer().to_owned())))
                    })
                    .collect();
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!(topic = %t.meta.name, partition = p, error = %e, "partition group already initialised");
                }
            }
        }
        tracing::info!(topic = %t.meta.name, partition = p, group, "started partition replica");
        Ok(Arc::new(Partition::replicated(
            Arc::from(t.meta.name.as_str()),
            p,
            RaftReplica {
                raft,
                store,
                sm,
                group,
                node_id: u64::from(self.id),
                activity: Arc::new(Activity::new(!wait_for_beats)),
                liveness: Arc::clone(&self.liveness),
                clients: {
                    let sm = self.meta_sm.clone();
                    crate::partition::ClientAddresses(Arc::new(move |id| {
                        sm.state().brokers.get(&id).map(|b| b.address.clone())
                    }))
                },
            },
            hwm_tx,
        )))
    }

    async fn stop_replica(&self, group: u64, h: &Hosted, delete_files: bool) {
        let r = h.partition.raft();
        self.rafts.unregister(group);
        if let Err(e) = r.raft.shutdown().await {
            tracing::warn!(group, error = %e, "partition group did not shut down cleanly");
        }
        let store = r.store.clone();
        let dir = store.dir().to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.checkpoint() {
                tracing::warn!(error = %e, "final checkpoint failed");
            }
            if delete_files && let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a replica's files");
            }
        })
        .await;
        tracing::info!(topic = %h.partition.topic, partition = h.partition.id, "stopped partition replica");
    }

    /// Whether a hosted replica's Raft core has stopped (see `reconcile`).
    async fn has_stopped_replica(&self) -> bool {
        self.hosted.lock().await.values().any(|h| {
            stopped_by_failure(
                &h.partition
                    .raft()
                    .raft
                    .metrics()
                    .borrow_watched()
                    .running_state,
            )
        })
    }

    /// One pass of the leader duties: report leadership and in-sync replicas, carry out
    /// reassignments, hand leadership to the preferred replica.
    async fn leader_pass(self: &Arc<Self>) {
        let state = self.state();
        let mut reports = Vec::new();
        let mut under_replicated = 0u64;
        let mut hosted = self.hosted.lock().await;
        for (group, h) in hosted.iter_mut() {
            let r = h.partition.raft();
            let m = r.raft.metrics().borrow_watched().clone();
            let leading = m.state == ServerState::Leader;
            let labels = [
                ("topic", h.partition.topic.to_string()),
                ("partition", h.partition.id.to_string()),
            ];
            metrics::gauge!("keel_partition_is_leader", &labels).set(if leading {
                1.0
            } else {
                0.0
            });
            self.quiet_pass(r, &m, leading, h.changing);
            if !leading {
                h.leader_since = None;
                // A new leader knows nothing of its followers' progress yet: its first pass
                // counts as in sync only those holding everything committed at that moment.
                h.prev_committed = u64::MAX;
                continue;
            }
            let since = *h.leader_since.get_or_insert_with(Instant::now);
            let committed = m.cluster_committed.map_or(0, |c| c.index);
            let caught_up_to = std::mem::replace(&mut h.prev_committed, committed).min(committed);
            let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
            let replication = m.replication.clone().unwrap_or_default();
            let mut in_sync: Vec<u32> = voters
                .iter()
                .filter(|v| {
                    **v == u64::from(self.id)
                        || replication
                            .get(v)
                            .and_then(|x| x.as_ref())
                            .is_some_and(|matched| matched.index >= caught_up_to)
                })
                .map(|v| *v as u32)
                .collect();
            in_sync.sort_unstable();
            metrics::gauge!("keel_partition_in_sync_replicas", &labels).set(in_sync.len() as f64);
            metrics::gauge!("keel_partition_replicas", &labels).set(voters.len() as f64);
            if in_sync.len() < voters.len() {
                under_replicated += 1;
            }
            let Some(t) = state.topic_by_id(h.topic_id) else {
                continue;
            };
            let Some(pm) = t.partitions.get(h.partition.id as usize) else {
                continue;
            };
            // Reported voters come from the committed membership: a replica deletes its data
            // when it is reported gone, which must never happen on a change that may not
            // commit.
            let voter_list: Vec<u32> = m
                .committed_membership_config
                .membership()
                .voter_ids()
                .map(|v| v as u32)
                .collect();
            let report = LeaderReport {
                topic_id: h.topic_id,
                partition: h.partition.id,
                leader: self.id,
                term: m.current_term,
                in_sync: in_sync.clone(),
                voters: voter_list.clone(),
            };
            let current = pm.leader == Some(self.id)
                && pm.leader_term == m.current_term
                && pm.in_sync == in_sync
                && pm.voters == voter_list;
            let already_sent = self
                .reported
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(group)
                .is_some_and(|r| *r == report);
            if !current && !already_sent {
                reports.push(report);
            }
            // Reassignment: make the group's voters the metadata's replica set.
            let target: BTreeSet<u64> = pm.replicas.iter().map(|b| u64::from(*b)).collect();
            if target != voters && !h.changing && !target.is_empty() {
                h.changing = true;
                let raft = r.raft.clone();
                let nodes: BTreeMap<u64, BasicNode> = target
                    .iter()
                    .filter_map(|b| {
                        state
                            .brokers
                            .get(&(*b as u32))
                            .map(|x| (*b, BasicNode::new(x.peer().to_owned())))
                    })
                    .collect();
                let node = Arc::clone(self);
                let g = *group;
                tokio::spawn(async move {
                    node.change_replicas(g, raft, nodes).await;
                });
                continue;
            }
            // Preferred leader: hand back once it has caught up.
            if let Some(&preferred) = pm.replicas.first()
                && preferred != self.id
                && in_sync.contains(&preferred)
                && since.elapsed() > PREFERRED_AFTER
                && !h.changing
            {
                tracing::info!(topic = %h.partition.topic, partition = h.partition.id, to = preferred, "handing leadership to the preferred replica");
                h.leader_since = Some(Instant::now());
                if let Err(e) = r.raft.trigger().transfer_leader(u64::from(preferred)).await {
                    tracing::warn!(error = %e, "leader transfer failed");
                }
            }
        }
        let quiet = hosted
            .values()
            .filter(|h| h.partition.raft().activity.is_quiet())
            .count();
        drop(hosted);
        metrics::gauge!("keel_under_replicated_partitions").set(under_replicated as f64);
        metrics::gauge!("keel_quiet_partitions").set(quiet as f64);
        if !reports.is_empty() {
            {
                let mut sent = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
                for r in &reports {
                    sent.insert(partition_group(r.topic_id, r.partition), r.clone());
                }
            }
            let node = Arc::clone(self);
            tokio::spawn(async move {
                // One report in flight at a time, so they apply in the order they were made.
                let _in_order = node.reporting.lock().await;
                if let Err(e) = node
                    .propose(Command::Leaders {
                        reports: reports.clone(),
                    })
                    .await
                {
                    tracing::debug!(error = %e, "leader report failed; retrying");
                    let mut sent = node.reported.lock().unwrap_or_else(PoisonError::into_inner);
                    for r in &reports {
                        sent.remove(&partition_group(r.topic_id, r.partition));
                    }
                }
            });
        }
    }

    /// Puts an idle group to sleep or wakes it (see [`quiet`]).
    fn quiet_pass(
        &self,
        r: &RaftReplica,
        m: &openraft::RaftMetrics<keel_raft::KeelRaft>,
        leading: bool,
        changing: bool,
    ) {
        let a = &r.activity;
        let tick = |on: bool| {
            if a.set_ticking(on) {
                r.raft.runtime_config().tick(on);
            }
        };
        if leading {
            a.resolve_pending();
            if a.is_quiet() && a.quiet_leader().is_some() {
                // Quiet as a follower, leader now (a transfer): wake up.
                a.wake();
                tick(true);
                return;
            }
            if a.is_quiet() {
                // Listed in the beats since `quiet_for`; stop heartbeating once the followers
                // have had time to hear it and stop their own election timers.
                if a.quiet_for() >= quiet::LEADER_SLEEP_DELAY {
                    tick(false);
                }
                return;
            }
            if changing || a.idle_for() < QUIET_AFTER {
                tick(true);
                return;
            }
            let last = m.last_log_index;
            let committed = m.cluster_committed.map(|c| c.index);
            let replication = m.replication.clone().unwrap_or_default();
            let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
            let all_caught_up = committed == last
                && voters.iter().all(|v| {
                    *v == r.node_id
                        || replication
                            .get(v)
                            .and_then(|x| x.as_ref())
                            .is_some_and(|x| Some(x.index) == last)
                });
            // Learners (a reassignment) keep the group awake until they are voters.
            let learners = m.membership_config.membership().learner_ids().count();
            if all_caught_up && learners == 0 {
                a.set_quiet(None);
            }
            return;
        }
        // A follower sleeps only under the leader it follows (or has not heard of yet since a
        // restart), while that leader's broker keeps declaring the group quiet in a term at
        // least this replica's own.
        let under = |l: u32| {
            u64::from(l) != r.node_id
                && m.current_leader.is_none_or(|cl| cl == u64::from(l))
                && self.liveness.still_quiet(l, r.group, m.current_term)
        };
        if a.is_quiet() {
            if !a.quiet_leader().is_some_and(under) {
                a.wake();
                tick(true);
            }
            return;
        }
        if let Some(l) = self.liveness.quiet_leader(r.group, m.current_term)
            && under(l)
        {
            a.resolve_pending();
            a.set_quiet(Some(l));
            tick(false);
            return;
        }
        // A restarted replica that no beat claims wakes once the beats had time to arrive.
        if !a.pending(quiet::BEAT_TIMEOUT) {
            tick(true);
        }
    }

    /// Sends this broker's beat to every peer: it is alive, and these groups it leads are quiet.
    async fn beat(&self) {
        let mut quiet = Vec::new();
        for h in self.hosted.lock().await.values() {
            let r = h.partition.raft();
            if r.activity.is_quiet() && r.activity.quiet_leader().is_none() {
                let m = r.raft.metrics();
                let m = m.borrow_watched();
                if m.state == ServerState::Leader {
                    quiet.push((r.group, m.current_term));
                }
            }
        }
        let Ok(payload) = serde_json::to_vec(&ForwardRequest::Beat {
            from: self.id,
            quiet,
        }) else {
            return;
        };
        let payload = Bytes::from(payload);
        let peers: Vec<(u32, String)> = self
            .state()
            .brokers
            .values()
            .filter(|b| b.id != self.id)
            .map(|b| (b.id, b.peer().to_owned()))
            .collect();
        let sends = peers.into_iter().map(|(id, addr)| {
            let payload = payload.clone();
            async move {
                let r = self
                    .transport
                    .forward(&addr, u64::from(id), META_GROUP, payload, BEAT * 3)
                    .await;
                if r.is_ok() {
                    self.liveness.heard_from(id);
                }
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Moves a partition group to `nodes` as voters: adds the new ones as learners (waiting
    /// until they caught up), then switches the voter set (joint consensus inside openraft).
    async fn change_replicas(&self, group: u64, raft: BrokerRaft, nodes: BTreeMap<u64, BasicNode>) {
        let voters: BTreeSet<u64> = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let mut ok = true;
        for (id, node) in &nodes {
            if voters.contains(id) {
                continue;
            }
            tracing::info!(group, learner = id, "adding a replica");
            // Bounded: a target broker that is down must not wedge the partition's
            // reassignments; the next leader pass retries.
            match tokio::time::timeout(LEARNER_CATCH_UP, raft.add_learner(*id, node.clone(), true))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(group, learner = id, error = %e, "adding a learner failed");
                    ok = false;
                    break;
                }
                Err(_) => {
                    tracing::warn!(group, learner = id, timeout = ?LEARNER_CATCH_UP, "a new replica did not catch up in time; retrying later");
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            let ids: BTreeSet<u64> = nodes.keys().copied().collect();
            match raft.change_membership(ids, false).await {
                Ok(_) => {
                    tracing::info!(group, voters = ?nodes.keys().collect::<Vec<_>>(), "replicas changed")
                }
                Err(e) => tracing::warn!(group, error = %e, "membership change failed"),
            }
        }
        if let Some(h) = self.hosted.lock().await.get_mut(&group) {
            h.changing = false;
        }
    }

    /// The metadata leader's duty: every registered broker is in the metadata group (new
    /// brokers join as learners, so they receive the metadata without weakening the quorum).
    async fn controller_pass(&self) {
        let m = self.meta_raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return;
        }
        let members: BTreeSet<u64> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        for b in self.state().brokers.values() {
            if !members.contains(&u64::from(b.id)) {
                tracing::info!(
                    broker = b.id,
                    "adding a broker to the metadata group as a learner"
                );
                if let Err(e) = self
                    .meta_raft
                    .add_learner(u64::from(b.id), BasicNode::new(b.peer().to_owned()), false)
                    .await
                {
                    tracing::warn!(broker = b.id, error = %e, "adding a metadata learner failed");
                }
            }
        }
    }

    /// Runs the reconciler, the self-registration and the leader/controller loops until
    /// `shutdown`.
    pub fn spawn_loops(
        self: &Arc<Self>,
        registry: Arc<dyn RegistryHolder>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        {
            let node = Arc::clone(self);
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(BEAT);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => {
                            if *shutdown.borrow() {
                                return;
                            }
                        }
                        _ = tick.tick() => node.beat().await,
                    }
                }
            });
        }
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let mut state_rx = node.meta_sm.subscribe();
            let mut tick = tokio::time::interval(REPORT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut registered = false;
            let mut register_task: Option<tokio::task::JoinHandle<Result<()>>> = None;
            if let Err(e) = node.reconcile(registry.registry()).await {
                tracing::error!(error = %e, "reconcile failed");
            }
            loop {
                tokio::select! {
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() {
                            return;
                        }
                    }
                    changed = state_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if let Err(e) = node.reconcile(registry.registry()).await {
                            tracing::error!(error = %e, "reconcile failed");
                        }
                    }
                    _ = tick.tick() => {
                        if !registered {
                            let me = node.state().brokers.get(&node.id).map(|b| (b.address.clone(), b.peer().to_owned()));
                            if me == Some((node.advertise.clone(), node.peer_address.clone())) {
                                registered = true;
                            } else if register_task.as_ref().is_none_or(|t| t.is_finished()) {
                                let n = Arc::clone(&node);
                                register_task = Some(tokio::spawn(async move {
                                    n.propose(Command::RegisterBroker { id: n.id, address: n.advertise.clone(), peer_address: n.peer_address.clone() }).await
                                }));
                            }
                        }
                        node.controller_pass().await;
                        node.leader_pass().await;
                        if node.has_stopped_replica().await
                            && let Err(e) = node.reconcile(registry.registry()).await
                        {
                            tracing::error!(error = %e, "reconcile failed");
                        }
                    }
                }
            }
        })
    }

    /// Hands over leaderships (bounded wait), then stops every Raft group and checkpoints the
    /// logs.
    /// Hands every leadership this broker holds (partitions and metadata) to a caught-up
    /// voter and waits for it (at most 3 s). Called while the gRPC port still serves, since
    /// the Raft traffic of the handover runs over it.
    pub async fn hand_over(&self) {
        let hosted: Vec<(u64, Arc<Partition>)> = self
            .hosted
            .lock()
            .await
            .iter()
            .map(|(g, h)| (*g, Arc::clone(&h.partition)))
            .collect();
        let mut transferring = Vec::new();
        for (_, p) in &hosted {
            let r = p.raft();
            let m = r.raft.metrics().borrow_watched().clone();
            if m.state != ServerState::Leader {
                continue;
            }
            let committed = m.cluster_committed.map_or(0, |c| c.index);
            let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
            let to = m
                .replication
                .unwrap_or_default()
                .into_iter()
                .find_map(|(id, matched)| {
                    (id != u64::from(self.id)
                        && voters.contains(&id)
                        && matched.is_some_and(|x| x.index >= committed))
                    .then_some(id)
                });
            if let Some(to) = to {
                // A quiet group must be awake to hand over.
                if r.activity.set_ticking(true) {
                    r.raft.runtime_config().tick(true);
                }
                if r.raft.trigger().transfer_leader(to).await.is_ok() {
                    transferring.push(r.raft.clone());
                }
            }
        }
        if let Some(to) = self.meta_transfer_target() {
            let _ = self.meta_raft.trigger().transfer_leader(to).await;
            transferring.push(self.meta_raft.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for raft in transferring {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = raft
                .wait(Some(left))
                .metrics(|m| m.state != ServerState::Leader, "leadership handed over")
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
                leader_since: None,
                changing: false,
                prev_committed: 0,
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

    fn meta_transfer_target(&self) -> Option<u64> {
        let m = self.meta_raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return None;
        }
        let committed = m.cluster_committed.map_or(0, |c| c.index);
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        m.replication
            .unwrap_or_default()
            .into_iter()
            .find_map(|(id, matched)| {
                (id != u64::from(self.id)
                    && voters.contains(&id)
                    && matched.is_some_and(|x| x.index >= committed))
                .then_some(id)
            })
    }

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
        let reached =
            |what: &'static str,
             id: fn(&openraft::RaftMetrics<keel_raft::KeelRaft>) -> Option<u64>| {
                let raft = r.raft.clone();
                async move {
                    raft.wait(Some(Duration::from_secs(30)))
                        .metrics(move |m| id(m).is_some_and(|i| i >= point.index), what)
                        .await
                        .map(|_| ())
                        .map_err(|e| raft_err(what, e))
                }
            };
        r.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| raft_err("retention snapshot", e))?;
        reached("retention snapshot", |m| m.snapshot.map(|s| s.index)).await?;
        r.raft
            .trigger()
            .purge_log(point.index)
            .await
            .map_err(|e| raft_err("retention purge", e))?;
        reached("retention purge", |m| m.purged.map(|s| s.index)).await?;
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

    /// Waits (at most `timeout`) until this broker knows the current metadata: the metadata
    /// group has a leader and this broker has applied everything it knows to be committed; then
    /// publishes the topic table. Readiness waits for this, so that a restarted broker does not
    /// answer "unknown topic" for a topic it simply has not replayed yet. A broker that cannot
    /// reach a metadata majority becomes ready anyway when the time is up, with what it has.
    pub async fn wait_ready(&self, registry: &Registry, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut caught_up = false;
        while !caught_up && Instant::now() < deadline {
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
        let rafts: Vec<BrokerRaft> = self
            .hosted
            .lock()
            .await
            .values()
            .map(|h| h.partition.raft().raft.clone())
            .collect();
        for raft in rafts {
            let sole = raft
                .metrics()
                .borrow_watched()
                .membership_config
                .membership()
                .voter_ids()
                .eq([me]);
            if !sole {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = raft
                .wait(Some(left))
                .metrics(|m| m.current_leader == Some(me), "the sole voter leads")
                .await;
        }
    }

    /// The metadata leader's read index, confirmed by a quorum (None: not the leader, or no
    /// quorum before `deadline`).
    async fn read_index(&self, deadline: Instant) -> Option<u64> {
        let left = deadline.saturating_duration_since(Instant::now());
        let read = tokio::time::timeout(
            left,
            self.meta_raft
                .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex),
        )
        .await
        .ok()?
        .ok()?;
        Some(read.index())
    }

    /// One read-index round: asks the metadata leader for its commit index and waits (until
    /// `deadline`) until this broker has applied up to it. True when it has.
    async fn catch_up_once(&self, deadline: Instant) -> bool {
        let (leader, addr) = {
            let m = self.meta_raft.metrics();
            let m = m.borrow_watched();
            let Some(l) = m.current_leader else {
                return false;
            };
            let addr = m
                .membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone());
            (l, addr)
        };
        let index = if leader == u64::from(self.id) {
            // Right after a restart openraft may believe this broker still leads (from its
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
            let Ok(payload) = serde_json::to_vec(&ForwardRequest::ReadIndex) else {
                return false;
            };
            let reply = self
                .transport
                .forward(
                    &addr,
                    leader,
                    META_GROUP,
                    Bytes::from(payload),
                    Duration::from_secs(2),
                )
                .await;
            match reply.map(|b| serde_json::from_slice::<ForwardReply>(&b)) {
                Ok(Ok(ForwardReply::Committed(i))) => i,
                _ => return false,
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        self.meta_raft
            .wait(Some(left))
            .metrics(
                move |m| m.last_applied.is_some_and(|a| a.index >= index),
                "metadata applied up to the leader's commit",
            )
            .await
            .is_ok()
    }

    /// The leader this broker knows for a hosted partition's group (id, address).
    pub fn hosted_leader(&self, p: &Partition) -> Option<(u32, String)> {
        p.leader_hint()
    }
}

/// Gives the loops access to the broker's topic registry without a reference cycle.
pub trait RegistryHolder: Send + Sync + 'static {
    fn registry(&self) -> &Registry;
}
