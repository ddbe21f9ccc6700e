//! The server side of the broker-to-broker Raft transport.
//!
//! [`RaftRegistry`] maps group ids to the broker's local `Raft` instances; groups are
//! registered when a replica starts and unregistered (before `Raft::shutdown`) when it stops.
//! [`RaftServer`] is the tonic service (`keel.raft.v1.RaftService`) that decodes each request,
//! dispatches it by `group_id`, and encodes openraft's answer. Add
//! [`RaftRegistry::service`] to the broker's tonic router, so Raft traffic shares the gRPC port.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;

use openraft::Raft;
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::RaftError;
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::storage::RaftStateMachine;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::KeelLogStore;
use crate::identity::{Identity, Refused, Stamp};
use crate::repair::refuses_candidate;
use crate::types::{KeelRaft, LogId, Snapshot};
use crate::wire::pb::raft_service_server::{RaftService, RaftServiceServer};
use crate::wire::{self, InstallSnapshot, ReadEntries, pb};

/// The future a [`ForwardHandler`] returns.
pub type ForwardFuture = Pin<Box<dyn Future<Output = Result<Bytes, Status>> + Send>>;

/// Handles `Forward` requests: `(group_id, payload)` to the reply payload. The broker installs
/// one to serve requests other brokers forward to a group leader (metadata commands).
pub type ForwardHandler = Arc<dyn Fn(u64, Bytes) -> ForwardFuture + Send + Sync>;

/// The Raft groups hosted by one broker, by group id.
pub struct RaftRegistry<SM: RaftStateMachine<KeelRaft>> {
    node_id: u64,
    max_message_bytes: usize,
    groups: Arc<RwLock<HashMap<u64, Raft<KeelRaft, SM>>>>,
    forward: Arc<RwLock<Option<ForwardHandler>>>,
    /// Checked on every request (see [`crate::identity`]).
    identity: Arc<RwLock<Identity>>,
    /// Each group's log, where registered with one: votes and leadership transfers are
    /// refused while it misses entries it promised (see [`crate::repair`]).
    logs: Arc<RwLock<HashMap<u64, KeelLogStore>>>,
}

impl<SM: RaftStateMachine<KeelRaft>> Clone for RaftRegistry<SM> {
    fn clone(&self) -> Self {
        Self {
            node_id: self.node_id,
            max_message_bytes: self.max_message_bytes,
            groups: Arc::clone(&self.groups),
            forward: Arc::clone(&self.forward),
            identity: Arc::clone(&self.identity),
            logs: Arc::clone(&self.logs),
        }
    }
}

impl<SM: RaftStateMachine<KeelRaft>> fmt::Debug for RaftRegistry<SM> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftRegistry")
            .field("node_id", &self.node_id)
            .field("groups", &self.group_ids())
            .finish()
    }
}

impl<SM: RaftStateMachine<KeelRaft>> RaftRegistry<SM> {
    /// An empty registry of broker `node_id`, with the default message size limit.
    pub fn new(node_id: u64) -> Self {
        Self::with_max_message_bytes(node_id, wire::DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// An empty registry whose service accepts and sends messages up to `max` bytes.
    pub fn with_max_message_bytes(node_id: u64, max: usize) -> Self {
        Self {
            node_id,
            max_message_bytes: max,
            groups: Arc::default(),
            forward: Arc::default(),
            identity: Arc::default(),
            logs: Arc::default(),
        }
    }

    /// Installs the handler of `Forward` requests.
    pub fn set_forward_handler(&self, handler: ForwardHandler) {
        *self.forward.write().unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Checks requests against `identity` (share the transport's, [`crate::RaftTransport::identity`]).
    pub fn set_identity(&self, identity: Identity) {
        *self
            .identity
            .write()
            .unwrap_or_else(PoisonError::into_inner) = identity;
    }

    /// Refuses a request whose identity stamp disagrees with what this broker knows.
    fn check_identity(&self, stamp: &Stamp) -> Result<(), Status> {
        let identity = self
            .identity
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        identity.check(stamp).map_err(|why| refused(&why))
    }

    /// Starts routing group `group_id`'s messages to `raft`; returns the instance it replaces.
    pub fn register(&self, group_id: u64, raft: Raft<KeelRaft, SM>) -> Option<Raft<KeelRaft, SM>> {
        self.write().insert(group_id, raft)
    }

    /// Like [`RaftRegistry::register`], with the group's log, so that this replica's votes
    /// follow what it promised (see [`crate::repair`]).
    pub fn register_with_log(
        &self,
        group_id: u64,
        raft: Raft<KeelRaft, SM>,
        log: KeelLogStore,
    ) -> Option<Raft<KeelRaft, SM>> {
        self.logs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(group_id, log);
        self.register(group_id, raft)
    }

    /// Stops routing group `group_id` (peers then get NOT_FOUND and back off). Call it before
    /// shutting the returned instance down.
    pub fn unregister(&self, group_id: u64) -> Option<Raft<KeelRaft, SM>> {
        self.logs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&group_id);
        self.write().remove(&group_id)
    }

    /// The last entry group `group_id`'s replica promised, while its log misses it.
    fn missing_promised(&self, group_id: u64) -> Option<LogId> {
        self.logs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group_id)
            .and_then(KeelLogStore::missing_promised)
    }

    pub fn get(&self, group_id: u64) -> Option<Raft<KeelRaft, SM>> {
        self.read().get(&group_id).cloned()
    }

    /// The registered group ids, sorted.
    pub fn group_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.read().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The tonic service to add to the broker's router.
    pub fn service(&self) -> RaftServiceServer<RaftServer<SM>> {
        RaftServiceServer::new(RaftServer {
            registry: self.clone(),
        })
        .max_decoding_message_size(self.max_message_bytes)
        .max_encoding_message_size(self.max_message_bytes)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Raft<KeelRaft, SM>>> {
        self.groups.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Raft<KeelRaft, SM>>> {
        self.groups.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The group a request is for, and its decoded payload.
    fn route<T: DeserializeOwned>(
        &self,
        req: RaftRequest,
    ) -> Result<(u64, Raft<KeelRaft, SM>, T), Status> {
        let req = req.into_inner();
        if req.target != self.node_id {
            return Err(Status::failed_precondition(format!(
                "raft message for node {} reached node {}",
                req.target, self.node_id
            )));
        }
        self.check_identity(&stamp_of(&req))?;
        let raft = self.get(req.group_id).ok_or_else(|| {
            Status::not_found(format!(
                "raft group {} is not hosted on node {}",
                req.group_id, self.node_id
            ))
        })?;
        let msg = wire::decode(&req.payload)
            .map_err(|e| Status::invalid_argument(format!("raft group {}: {e}", req.group_id)))?;
        Ok((req.group_id, raft, msg))
    }
}

/// The `keel.raft.v1.RaftService` implementation over a [`RaftRegistry`].
pub struct RaftServer<SM: RaftStateMachine<KeelRaft>> {
    registry: RaftRegistry<SM>,
}

/// What every method of the Raft service takes...
type RaftRequest = Request<pb::RaftRequest>;
/// ...and what it answers.
type RaftReply = Result<Response<pb::RaftReply>, Status>;

fn reply<T: Serialize>(group_id: u64, resp: &T) -> RaftReply {
    let payload =
        wire::encode(resp).map_err(|e| Status::internal(format!("raft group {group_id}: {e}")))?;
    Ok(Response::new(pb::RaftReply { payload }))
}

impl<SM: RaftStateMachine<KeelRaft>> RaftServer<SM> {
    /// Serves one Raft message: routes the request to its group, hands the decoded message to
    /// `call` with that group's Raft core, and encodes the answer. Every message kind but
    /// `Forward` goes through here, so they all fail alike.
    async fn serve<T, R, E, Fut>(
        &self,
        req: RaftRequest,
        call: impl FnOnce(Raft<KeelRaft, SM>, T) -> Fut + Send,
    ) -> RaftReply
    where
        T: DeserializeOwned + Send,
        R: Serialize,
        E: fmt::Display,
        Fut: Future<Output = Result<R, E>> + Send,
    {
        let (g, raft, msg) = self.registry.route(req)?;
        let resp = call(raft, msg).await.map_err(|e| stopped(g, e))?;
        reply(g, &resp)
    }

    /// Serves a vote or pre-vote request, refusing it without asking openraft while this
    /// replica misses promised entries the candidate lacks too (see [`crate::repair`]). The
    /// refusal carries the promised log id, which tells the candidate a longer log exists.
    async fn serve_vote<Fut>(
        &self,
        req: RaftRequest,
        call: impl FnOnce(Raft<KeelRaft, SM>, VoteRequest<KeelRaft>) -> Fut + Send,
    ) -> RaftReply
    where
        Fut: Future<Output = Result<VoteResponse<KeelRaft>, RaftError<KeelRaft>>> + Send,
    {
        let (g, raft, msg): (u64, _, VoteRequest<KeelRaft>) = self.registry.route(req)?;
        if let Some(promised) = self.registry.missing_promised(g)
            && refuses_candidate(&promised, msg.last_log_id.as_ref())
        {
            metrics::counter!("keel_raft_votes_refused_while_repairing_total").increment(1);
            tracing::info!(group = g, candidate_last = ?msg.last_log_id, %promised, "refused a vote: this replica is repairing entries the candidate does not have");
            return reply(
                g,
                &VoteResponse::<KeelRaft>::new(msg.vote, Some(promised), false),
            );
        }
        let resp = call(raft, msg).await.map_err(|e| stopped(g, e))?;
        reply(g, &resp)
    }
}

fn stamp_of(req: &pb::RaftRequest) -> Stamp {
    Stamp {
        from: req.from,
        cluster_id: req.cluster_id.clone(),
        from_storage: req.from_storage.clone(),
        target_storage: req.target_storage.clone(),
    }
}

/// A refused message: counted, logged at most every few seconds (a refused peer retries
/// constantly), and answered FAILED_PRECONDITION with the reason.
fn refused(why: &Refused) -> Status {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOGGED_S: AtomicU64 = AtomicU64::new(0);
    let kind = match why {
        Refused::ForeignCluster { .. } => "foreign_cluster",
        Refused::ReplacedSender { .. } => "replaced_sender",
        Refused::ReplacedTarget { .. } => "replaced_target",
    };
    metrics::counter!("keel_raft_refused_messages_total", "reason" => kind).increment(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now >= LAST_LOGGED_S.load(Ordering::Relaxed) + 10 {
        LAST_LOGGED_S.store(now, Ordering::Relaxed);
        tracing::error!(reason = kind, "refused a Raft message: {why}");
    }
    Status::failed_precondition(why.to_string())
}

/// The group's Raft core has stopped (shut down or fatal error): peers back off.
fn stopped(group_id: u64, e: impl fmt::Display) -> Status {
    Status::unavailable(format!("raft group {group_id} stopped: {e}"))
}

#[tonic::async_trait]
impl<SM> RaftService for RaftServer<SM>
where
    SM: RaftStateMachine<KeelRaft> + Send + Sync + 'static,
    SM::SnapshotData: DeserializeOwned,
{
    async fn append_entries(&self, req: RaftRequest) -> RaftReply {
        self.serve(
            req,
            |raft, rpc| async move { raft.append_entries(rpc).await },
        )
        .await
    }

    async fn vote(&self, req: RaftRequest) -> RaftReply {
        self.serve_vote(req, |raft, rpc| async move { raft.vote(rpc).await })
            .await
    }

    async fn pre_vote(&self, req: RaftRequest) -> RaftReply {
        self.serve_vote(req, |raft, rpc| async move { raft.pre_vote(rpc).await })
            .await
    }

    async fn install_snapshot(&self, req: RaftRequest) -> RaftReply {
        self.serve(
            req,
            |raft, msg: InstallSnapshot<SM::SnapshotData>| async move {
                let snapshot = Snapshot {
                    meta: msg.meta,
                    snapshot: msg.data,
                };
                raft.install_full_snapshot(msg.vote, snapshot).await
            },
        )
        .await
    }

    async fn forward(&self, req: RaftRequest) -> RaftReply {
        let handler = self
            .registry
            .forward
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Status::unimplemented("this broker accepts no forwarded requests"))?;
        let req = req.into_inner();
        // Forwarded requests are checked for the cluster only: a broker whose data directory
        // was replaced registers its new storage through one (and is told why it is refused).
        // Checked before the target, so that a probe for "whoever answers" learns whether it
        // is of the same cluster.
        self.registry.check_identity(&Stamp {
            from: req.from,
            cluster_id: req.cluster_id.clone(),
            ..Stamp::default()
        })?;
        if req.target != self.registry.node_id {
            return Err(Status::failed_precondition(format!(
                "forwarded request for node {} reached node {}",
                req.target, self.registry.node_id
            )));
        }
        let payload = handler(req.group_id, req.payload).await?;
        Ok(Response::new(pb::RaftReply { payload }))
    }

    async fn read_entries(&self, req: RaftRequest) -> RaftReply {
        let (g, raft, msg): (_, _, ReadEntries) = self.registry.route(req)?;
        let log = self
            .registry
            .logs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&g)
            .map(KeelLogStore::log_arc)
            .ok_or_else(|| Status::not_found(format!("raft group {g} has no log here")))?;
        // Only applied (so committed) entries: they are the same on every replica.
        let applied = raft
            .metrics()
            .borrow_watched()
            .last_applied
            .map(|l| l.index);
        let Some(applied) = applied.filter(|a| msg.from <= *a) else {
            return Err(Status::failed_precondition(format!(
                "raft group {g}: entry {} is not applied on node {} (applied: {applied:?})",
                msg.from, self.registry.node_id
            )));
        };
        let max = msg
            .max_bytes
            .min(self.registry.max_message_bytes as u64 / 2);
        let bytes =
            tokio::task::spawn_blocking(move || log.read_verified(msg.from, applied + 1, max))
                .await
                .map_err(|e| Status::internal(format!("raft group {g}: {e}")))?
                .map_err(|e| match e {
                    keel_log::LogError::Corrupt { .. } => {
                        Status::data_loss(format!("raft group {g}: this copy is damaged too: {e}"))
                    }
                    other => Status::failed_precondition(format!("raft group {g}: {other}")),
                })?;
        Ok(Response::new(pb::RaftReply { payload: bytes }))
    }

    async fn transfer_leader(&self, req: RaftRequest) -> RaftReply {
        let group = req.get_ref().group_id;
        if let Some(promised) = self.registry.missing_promised(group) {
            return Err(Status::failed_precondition(format!(
                "raft group {group}: this replica is repairing entries up to {promised} it lost on disk; it takes no leadership until it has them"
            )));
        }
        self.serve(req, |raft, rpc| async move {
            raft.handle_transfer_leader(rpc).await
        })
        .await
    }
}
