//! The client side of the broker-to-broker Raft transport.
//!
//! [`RaftTransport`] is one per broker. It caches the tonic [`Channel`]s of every peer address
//! (created with `connect_lazy`, so a peer that is down costs nothing until it is used and a
//! channel reconnects by itself), and hands out one [`GroupNetwork`] per Raft group: the
//! `RaftNetworkFactory` given to that group's `Raft::new`. All groups therefore share one
//! HTTP/2 connection per peer for appends and snapshots, and a second one per peer for votes and
//! heartbeats, so elections and leases do not queue behind megabytes of log entries.
//!
//! Errors map onto openraft's so that replication backs off instead of spinning: a deadline is
//! [`Timeout`], anything else (connection refused, peer gone, group not hosted there, group
//! stopped, undecodable reply) is [`Unreachable`], which makes openraft sleep per
//! `Config::backoff` before retrying.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use crate::identity::Identity;
use crate::types::{Entry, KeelRaft, Payload, Snapshot, Vote};
use crate::wire::pb::raft_service_client::RaftServiceClient;
use crate::wire::{self, InstallSnapshot, pb};

/// Settings of the client side of the Raft transport.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Timeout of establishing a TCP connection to a peer.
    pub connect_timeout: Duration,
    /// Largest gRPC message encoded or accepted (must match the peers' server limit).
    pub max_message_bytes: usize,
    /// Byte budget of the entries in one AppendEntries message; larger requests are cut and
    /// the cut is reported to openraft as a partial success.
    pub max_append_bytes: usize,
    /// HTTP/2 PING interval on idle connections, to notice dead peers.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// HTTP/2 flow-control windows of the data connection (appends can be megabytes).
    pub stream_window: u32,
    pub connection_window: u32,
    /// Source address of connections to peers (the broker's own listen address), so that
    /// firewalls and fault-injection rules can tell brokers apart on one host.
    pub local_address: Option<std::net::IpAddr>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            max_message_bytes: wire::DEFAULT_MAX_MESSAGE_BYTES,
            max_append_bytes: wire::DEFAULT_MAX_APPEND_BYTES,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            stream_window: 4 << 20,
            connection_window: 8 << 20,
            local_address: None,
        }
    }
}

/// The two connections to one peer: appends/snapshots, and votes/heartbeats.
#[derive(Clone)]
struct Peer {
    data: Channel,
    control: Channel,
}

struct Inner {
    node_id: u64,
    config: TransportConfig,
    peers: Mutex<HashMap<String, Peer>>,
    /// Stamped on every request (see [`crate::identity`]).
    identity: Identity,
}

/// A broker's Raft client transport: the peer-channel cache shared by all its groups.
#[derive(Clone)]
pub struct RaftTransport {
    inner: Arc<Inner>,
}

impl fmt::Debug for RaftTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftTransport")
            .field("node_id", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

impl RaftTransport {
    /// The transport of broker `node_id` (the Raft node id of all its replicas).
    pub fn new(node_id: u64, config: TransportConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                node_id,
                config,
                peers: Mutex::new(HashMap::new()),
                identity: Identity::default(),
            }),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// The storage identity stamped on this broker's requests; share it with the Raft
    /// service ([`crate::RaftRegistry::set_identity`]) so both sides know the same.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// Replaces the (initially empty) identity: call before any group is started.
    pub fn with_identity(node_id: u64, config: TransportConfig, identity: Identity) -> Self {
        Self {
            inner: Arc::new(Inner {
                node_id,
                config,
                peers: Mutex::new(HashMap::new()),
                identity,
            }),
        }
    }

    /// A request to `target` for group `group_id`, stamped with this broker's identity.
    fn request(&self, group_id: u64, target: u64, payload: bytes::Bytes) -> pb::RaftRequest {
        let stamp = self.inner.identity.stamp(self.inner.node_id, target);
        pb::RaftRequest {
            group_id,
            target,
            payload,
            from: stamp.from,
            cluster_id: stamp.cluster_id,
            from_storage: stamp.from_storage,
            target_storage: stamp.target_storage,
        }
    }

    /// The network factory of group `group_id`, to pass to `Raft::new`. `SD` is the state
    /// machine's snapshot data type.
    pub fn group<SD>(&self, group_id: u64) -> GroupNetwork<SD> {
        GroupNetwork {
            transport: self.clone(),
            group_id,
            _sd: PhantomData,
        }
    }

    /// Drops the cached channels of `addr` (e.g. a broker left the cluster). Clients already
    /// handed out keep working on their clone until openraft replaces them.
    pub fn forget(&self, addr: &str) {
        self.peers().remove(addr);
    }

    /// Number of peer addresses with cached channels.
    pub fn peer_count(&self) -> usize {
        self.peers().len()
    }

    /// Sends a `Forward` request to broker `target` at `addr` (for the leader of `group_id`)
    /// and returns its reply payload.
    pub async fn forward(
        &self,
        addr: &str,
        target: u64,
        group_id: u64,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> Result<bytes::Bytes, tonic::Status> {
        let (mut client, req) = self.unary(addr, target, group_id, payload, timeout, false)?;
        within(timeout, client.forward(req), || {
            format!("forwarding to broker {target} at {addr}")
        })
        .await
    }

    /// Asks broker `target` at `addr` for committed entries of group `group_id` from Raft
    /// index `from` (see `ReadEntries`): raw batches, at most about `max_bytes`.
    pub async fn read_entries(
        &self,
        addr: &str,
        target: u64,
        group_id: u64,
        from: u64,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<bytes::Bytes, tonic::Status> {
        let payload = wire::encode(&wire::ReadEntries { from, max_bytes })
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let (mut client, req) = self.unary(addr, target, group_id, payload, timeout, true)?;
        within(timeout, client.read_entries(req), || {
            format!("reading entries from broker {target} at {addr}")
        })
        .await
    }

    /// A client of `addr` on its data connection (`data`) or its control one, and the
    /// stamped request for one unary call that must answer within `timeout`.
    fn unary(
        &self,
        addr: &str,
        target: u64,
        group_id: u64,
        payload: bytes::Bytes,
        timeout: Duration,
        data: bool,
    ) -> Result<(RaftServiceClient<Channel>, tonic::Request<pb::RaftRequest>), tonic::Status> {
        let peer = self.peer(addr).map_err(tonic::Status::unavailable)?;
        let limit = self.inner.config.max_message_bytes;
        let channel = if data { peer.data } else { peer.control };
        let client = RaftServiceClient::new(channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let mut req = tonic::Request::new(self.request(group_id, target, payload));
        req.set_timeout(timeout);
        Ok((client, req))
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Peer>> {
        self.inner
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn peer(&self, addr: &str) -> Result<Peer, String> {
        if let Some(p) = self.peers().get(addr) {
            return Ok(p.clone());
        }
        let c = &self.inner.config;
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
            .connect_timeout(c.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(c.keepalive_interval)
            .keep_alive_timeout(c.keepalive_timeout)
            .keep_alive_while_idle(true)
            .local_address(c.local_address);
        let data = endpoint
            .clone()
            .initial_stream_window_size(c.stream_window)
            .initial_connection_window_size(c.connection_window)
            .connect_lazy();
        // A separate connection, so votes and heartbeats never wait behind large appends.
        let control = endpoint.connect_lazy();
        let peer = Peer { data, control };
        // Another task may have raced us; keep the first so that all groups share one.
        Ok(self.peers().entry(addr.to_string()).or_insert(peer).clone())
    }
}

/// The reply payload of a unary call, or DEADLINE_EXCEEDED naming `what` after `timeout`.
async fn within(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<pb::RaftReply>, tonic::Status>>,
    what: impl FnOnce() -> String,
) -> Result<bytes::Bytes, tonic::Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r.map(|r| r.into_inner().payload),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "{} timed out after {timeout:?}",
            what()
        ))),
    }
}

/// The `RaftNetworkFactory` of one Raft group on one broker.
pub struct GroupNetwork<SD> {
    transport: RaftTransport,
    group_id: u64,
    _sd: PhantomData<fn() -> SD>,
}

impl<SD> Clone for GroupNetwork<SD> {
    fn clone(&self) -> Self {
        Self {
            transport: self.transport.clone(),
            group_id: self.group_id,
            _sd: PhantomData,
        }
    }
}

impl<SD> GroupNetwork<SD> {
    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    fn client(&self, target: u64, node: &BasicNode, heartbeat: bool) -> PeerClient<SD> {
        let conns = if target == self.transport.node_id() {
            // openraft must never talk to itself (a self-RPC can panic RaftCore).
            Err(format!("refusing to connect node {target} to itself"))
        } else {
            self.transport.peer(&node.addr).map(|p| {
                let limit = self.transport.inner.config.max_message_bytes;
                let client = |ch: Channel| {
                    RaftServiceClient::new(ch)
                        .max_decoding_message_size(limit)
                        .max_encoding_message_size(limit)
                };
                Conns {
                    // A heartbeat client's appends are the heartbeats: send them on the
                    // control connection too.
                    append: client(if heartbeat {
                        p.control.clone()
                    } else {
                        p.data.clone()
                    }),
                    control: client(p.control),
                }
            })
        };
        PeerClient {
            group_id: self.group_id,
            from: self.transport.node_id(),
            transport: self.transport.clone(),
            target,
            conns,
            max_append_bytes: self.transport.inner.config.max_append_bytes,
            _sd: PhantomData,
        }
    }
}

impl<SD> RaftNetworkFactory<KeelRaft> for GroupNetwork<SD>
where
    SD: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Network = PeerClient<SD>;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient<SD> {
        self.client(target, node, false)
    }

    async fn new_heartbeat_client(&mut self, target: u64, node: &BasicNode) -> PeerClient<SD> {
        self.client(target, node, true)
    }
}

struct Conns {
    append: RaftServiceClient<Channel>,
    control: RaftServiceClient<Channel>,
}

#[derive(Clone, Copy, Debug)]
enum Method {
    AppendEntries,
    Vote,
    PreVote,
    InstallSnapshot,
    TransferLeader,
}

impl Method {
    fn rpc_type(self) -> RPCTypes {
        match self {
            Method::AppendEntries => RPCTypes::AppendEntries,
            Method::Vote | Method::PreVote => RPCTypes::Vote,
            Method::InstallSnapshot => RPCTypes::InstallSnapshot,
            Method::TransferLeader => RPCTypes::TransferLeader,
        }
    }
}

/// Why a call failed, before it is shaped into the error type of the calling method.
enum CallError {
    Timeout(Timeout<KeelRaft>),
    Unreachable(Unreachable<KeelRaft>),
}

impl From<CallError> for RPCError<KeelRaft> {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Timeout(t) => RPCError::Timeout(t),
            CallError::Unreachable(u) => RPCError::Unreachable(u),
        }
    }
}

impl From<CallError> for StreamingError<KeelRaft> {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Timeout(t) => StreamingError::Timeout(t),
            CallError::Unreachable(u) => StreamingError::Unreachable(u),
        }
    }
}

/// The network client of one group towards one peer.
pub struct PeerClient<SD> {
    group_id: u64,
    from: u64,
    transport: RaftTransport,
    target: u64,
    /// `Err` for a client that must not connect (to itself, or a malformed address).
    conns: Result<Conns, String>,
    max_append_bytes: usize,
    _sd: PhantomData<fn() -> SD>,
}

impl<SD> PeerClient<SD> {
    fn unreachable(&self, what: impl fmt::Display) -> CallError {
        CallError::Unreachable(Unreachable::from_string(format!(
            "raft group {} node {} -> {}: {what}",
            self.group_id, self.from, self.target
        )))
    }

    /// Sends one request and returns the decoded reply.
    async fn call<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        msg: &T,
        ttl: Duration,
    ) -> Result<R, CallError> {
        let conns = self.conns.as_ref().map_err(|e| self.unreachable(e))?;
        let payload = wire::encode(msg).map_err(|e| self.unreachable(e))?;
        let mut client = match method {
            Method::AppendEntries | Method::InstallSnapshot => conns.append.clone(),
            Method::Vote | Method::PreVote | Method::TransferLeader => conns.control.clone(),
        };
        let mut req =
            tonic::Request::new(self.transport.request(self.group_id, self.target, payload));
        req.set_timeout(ttl);
        let fut = async move {
            match method {
                Method::AppendEntries => client.append_entries(req).await,
                Method::Vote => client.vote(req).await,
                Method::PreVote => client.pre_vote(req).await,
                Method::InstallSnapshot => client.install_snapshot(req).await,
                Method::TransferLeader => client.transfer_leader(req).await,
            }
        };
        let timeout = || {
            CallError::Timeout(Timeout {
                action: method.rpc_type(),
                id: self.from,
                target: self.target,
                timeout: ttl,
            })
        };
        let reply = match tokio::time::timeout(ttl, fut).await {
            Err(_) => return Err(timeout()),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                return Err(timeout());
            }
            Ok(Err(status)) => {
                tracing::debug!(
                    group = self.group_id,
                    target = self.target,
                    ?method,
                    code = ?status.code(),
                    message = status.message(),
                    "raft rpc failed"
                );
                return Err(self.unreachable(format_args!(
                    "{method:?}: {:?}: {}",
                    status.code(),
                    status.message()
                )));
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        wire::decode(&reply.payload).map_err(|e| self.unreachable(format_args!("{method:?}: {e}")))
    }
}

/// Approximate encoded size of an entry, for cutting appends to a byte budget.
fn entry_bytes(e: &Entry) -> usize {
    const OVERHEAD: usize = 48;
    match &e.payload {
        Payload::Normal(b) => b.bytes().len() + OVERHEAD,
        Payload::Blank => OVERHEAD,
        Payload::Membership(_) => OVERHEAD + 256,
    }
}

/// How many leading entries fit in `budget` bytes: at least one when there is any, so an entry
/// larger than the budget still goes (alone); the message limit is the hard bound.
fn entries_within(entries: &[Entry], budget: usize) -> usize {
    let mut used = 0usize;
    for (i, e) in entries.iter().enumerate() {
        used = used.saturating_add(entry_bytes(e));
        if used > budget && i > 0 {
            return i;
        }
    }
    entries.len()
}

/// Cuts `rpc` to the first entries within `budget` bytes. Returns the last log id kept when
/// it cut anything; the commit index sent is capped at it.
fn cut_append(rpc: &mut AppendEntriesRequest<KeelRaft>, budget: usize) -> Option<crate::LogId> {
    let keep = entries_within(&rpc.entries, budget);
    if keep == rpc.entries.len() {
        return None;
    }
    rpc.entries.truncate(keep);
    let last = rpc.entries.last().map(|e| e.log_id)?;
    if rpc.leader_commit.is_some_and(|c| c.index > last.index) {
        rpc.leader_commit = Some(last);
    }
    Some(last)
}

impl<SD> RaftNetworkV2<KeelRaft> for PeerClient<SD>
where
    SD: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type SnapshotData = SD;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<KeelRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<KeelRaft>, RPCError<KeelRaft>> {
        let cut = cut_append(&mut rpc, self.max_append_bytes);
        let resp: AppendEntriesResponse<KeelRaft> = self
            .call(Method::AppendEntries, &rpc, option.soft_ttl())
            .await?;
        Ok(match (cut, resp) {
            // openraft sends the rest, starting after `last`.
            (Some(last), AppendEntriesResponse::Success) => {
                AppendEntriesResponse::PartialSuccess(Some(last))
            }
            (_, resp) => resp,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<KeelRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<KeelRaft>, RPCError<KeelRaft>> {
        Ok(self.call(Method::Vote, &rpc, option.soft_ttl()).await?)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<KeelRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<KeelRaft>, RPCError<KeelRaft>> {
        Ok(self.call(Method::PreVote, &rpc, option.soft_ttl()).await?)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<SD>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<KeelRaft>, StreamingError<KeelRaft>> {
        let msg = InstallSnapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = self.call(Method::InstallSnapshot, &msg, option.soft_ttl()) => Ok(r?),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<KeelRaft>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<KeelRaft>, RPCError<KeelRaft>> {
        Ok(self
            .call(Method::TransferLeader, &req, option.soft_ttl())
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use bytes::Bytes;

    use super::*;
    use crate::{BatchData, log_id};

    fn entry(index: u64, len: usize) -> Entry {
        Entry {
            log_id: log_id(1, index),
            payload: Payload::Normal(BatchData::new(Bytes::from(vec![0u8; len]))),
        }
    }

    fn request(entries: Vec<Entry>, commit: u64) -> AppendEntriesRequest<KeelRaft> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(1, 0)),
            entries,
            leader_commit: Some(log_id(1, commit)),
        }
    }

    #[test]
    fn appends_are_cut_to_the_byte_budget() {
        let mut rpc = request((1..=10).map(|i| entry(i, 1000)).collect(), 9);
        let last = cut_append(&mut rpc, 3500);
        assert_eq!(last, Some(log_id(1, 3)));
        assert_eq!(rpc.entries.len(), 3);
        assert_eq!(rpc.leader_commit, Some(log_id(1, 3)), "commit capped");

        let mut rpc = request((1..=3).map(|i| entry(i, 1000)).collect(), 2);
        assert_eq!(cut_append(&mut rpc, 1 << 20), None);
        assert_eq!(rpc.entries.len(), 3);
        assert_eq!(rpc.leader_commit, Some(log_id(1, 2)));

        // One entry above the budget still goes, alone.
        let mut rpc = request(vec![entry(1, 10_000), entry(2, 10)], 0);
        assert_eq!(cut_append(&mut rpc, 100), Some(log_id(1, 1)));
        assert_eq!(rpc.entries.len(), 1);

        let mut heartbeat = request(Vec::new(), 5);
        assert_eq!(cut_append(&mut heartbeat, 100), None);
    }

    #[test]
    fn openraft_messages_round_trip_as_cbor() -> io::Result<()> {
        let rpc = request(vec![entry(1, 300), entry(2, 5)], 1);
        let bytes = wire::encode(&rpc)?;
        // Batches are byte strings (not number arrays, as in JSON): a constant overhead per
        // entry (field names of the log id and payload) plus the batch itself.
        assert!(
            bytes.len() < 305 + 2 * 80 + 100,
            "encoded {} bytes",
            bytes.len()
        );
        let back: AppendEntriesRequest<KeelRaft> = wire::decode(&bytes)?;
        assert_eq!(back.entries, rpc.entries);
        assert_eq!(back.vote, rpc.vote);
        assert_eq!(back.leader_commit, rpc.leader_commit);
        for resp in [
            AppendEntriesResponse::<KeelRaft>::Success,
            AppendEntriesResponse::PartialSuccess(Some(log_id(2, 7))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(3, 2)),
        ] {
            let back: AppendEntriesResponse<KeelRaft> = wire::decode(&wire::encode(&resp)?)?;
            assert_eq!(back, resp);
        }
        Ok(())
    }
}
