//! Proposing metadata commands and the broker-to-broker `Forward` calls: a proposal made on
//! any broker reaches the metadata leader; brokers ask the leader which brokers it hears from
//! and its read index, and send each other beats.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_raft::ReplicaError;
use serde::{Deserialize, Serialize};

use super::meta::{Command, META_GROUP, Refusal, Reply};
use super::meta_machine::encode_command;
use super::{ClusterNode, raft_err};
use crate::error::{BrokerError, Result};

/// How long an admin request waits for the metadata group (leader election included).
pub(super) const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// A broker is alive when the metadata leader heard from it this recently.
const ALIVE_WITHIN: Duration = Duration::from_secs(3);

/// What one broker asks another over `Forward`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ForwardRequest {
    /// Propose a metadata command (the receiver must lead the metadata group). Boxed: the
    /// other requests are a few bytes (the JSON is the same).
    Propose(Box<Command>),
    /// Which brokers the metadata leader hears from.
    Liveness,
    /// The metadata leader's commit index: everything up to it is what the cluster knows now.
    ReadIndex,
    /// A broker's periodic beat: it is alive, and leads these (group, term)s quietly.
    Beat { from: u32, quiet: Vec<(u64, u64)> },
    /// The cluster id the receiver knows (empty if none yet): asked before initialising a
    /// new metadata group.
    ClusterId,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ForwardReply {
    Outcome(std::result::Result<Reply, Refusal>),
    NotLeader(Option<u64>),
    Liveness(BTreeMap<u32, bool>),
    Error(crate::error::RemoteError),
    /// The metadata leader's commit index (for a read-index catch-up).
    Committed(u64),
    ClusterId(String),
}

impl ClusterNode {
    /// Proposes a metadata command and waits until it is applied (on the metadata leader, which
    /// may be another broker).
    pub async fn propose(&self, cmd: Command) -> Result<()> {
        self.propose_for_reply(cmd).await.map(drop)
    }

    /// [`ClusterNode::propose`], returning what the command answered.
    pub async fn propose_for_reply(&self, cmd: Command) -> Result<Reply> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let mut watch = self.meta_raft.watch();
        loop {
            match self.meta_raft.leader() {
                Some((l, _)) if l == u64::from(self.id) => match self.propose_local(&cmd).await {
                    Ok(r) => return r.map_err(BrokerError::from),
                    Err(None) => {}
                    Err(Some(e)) => return Err(e),
                },
                Some((l, Some(addr))) => {
                    let payload =
                        serde_json::to_vec(&ForwardRequest::Propose(Box::new(cmd.clone())))
                            .map_err(|e| BrokerError::Internal(e.to_string()))?;
                    let reply = self
                        .transport
                        .forward(&addr, l, META_GROUP, Bytes::from(payload), PROPOSE_TIMEOUT)
                        .await;
                    match reply.map(|b| serde_json::from_slice::<ForwardReply>(&b)) {
                        Ok(Ok(ForwardReply::Outcome(r))) => return r.map_err(BrokerError::from),
                        Ok(Ok(ForwardReply::Error(e))) => {
                            // The leader's verdict, as it raised it: only what an election or a
                            // restart may clear is worth proposing again.
                            let e = BrokerError::from(e);
                            if !e.kind().is_retriable() {
                                return Err(e);
                            }
                            tracing::debug!(error = %e, "forwarded proposal failed");
                        }
                        other => tracing::debug!(?other, "forwarding a proposal failed"),
                    }
                }
                _ => {}
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
                tokio::time::timeout(left.min(Duration::from_millis(200)), watch.changed()).await;
        }
    }

    /// Proposes on this broker, the metadata leader. `Err(None)`: not the leader any more.
    async fn propose_local(
        &self,
        cmd: &Command,
    ) -> std::result::Result<std::result::Result<Reply, Refusal>, Option<BrokerError>> {
        let data = encode_command(cmd).map_err(|e| Some(BrokerError::Internal(e.to_string())))?;
        match self.meta_raft.write(data).await {
            Ok(index) => Ok(self.metadata.take_outcome(index).unwrap_or(Ok(Reply::Done))),
            Err(ReplicaError::NotLeader { .. }) => Err(None),
            Err(e) => Err(Some(raft_err("metadata group", e))),
        }
    }

    pub(super) async fn handle_forward(
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
        let not_leader = || ForwardReply::NotLeader(self.meta_raft.leader().map(|(l, _)| l));
        let reply = match req {
            ForwardRequest::Propose(cmd) => match self.propose_local(&cmd).await {
                Ok(outcome) => ForwardReply::Outcome(outcome),
                // Not the leader: pass it on (a joining broker knows no leader address yet).
                Err(None) => match self.propose_for_reply(*cmd).await {
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
                    None => not_leader(),
                }
            }
            ForwardRequest::Beat { from, quiet } => {
                self.liveness.beat_from(from, quiet.into_iter().collect());
                ForwardReply::Outcome(Ok(Reply::Done))
            }
            ForwardRequest::ClusterId => ForwardReply::ClusterId(self.state().cluster_id.clone()),
            ForwardRequest::Liveness => match self.local_liveness() {
                Some(l) => ForwardReply::Liveness(l),
                None => not_leader(),
            },
        };
        serde_json::to_vec(&reply)
            .map(Bytes::from)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }

    /// Sends a `Forward` request to broker `to` at `addr` and decodes its reply.
    pub(super) async fn ask(
        &self,
        addr: &str,
        to: u64,
        req: &ForwardRequest,
        timeout: Duration,
    ) -> Option<ForwardReply> {
        let payload = serde_json::to_vec(req).ok()?;
        let reply = self
            .transport
            .forward(addr, to, META_GROUP, Bytes::from(payload), timeout)
            .await
            .ok()?;
        serde_json::from_slice(&reply).ok()
    }

    /// On the metadata leader: which brokers acknowledged its heartbeats recently.
    pub(super) fn local_liveness(&self) -> Option<BTreeMap<u32, bool>> {
        let s = self.meta_raft.status();
        if !s.is_leader() {
            return None;
        }
        let state = self.state();
        Some(
            state
                .brokers
                .keys()
                .map(|b| {
                    let alive = *b == self.id
                        || s.heard_from
                            .get(&u64::from(*b))
                            .copied()
                            .flatten()
                            .is_some_and(|age| age < ALIVE_WITHIN);
                    (*b, alive)
                })
                .collect(),
        )
    }

    pub(super) async fn remote_liveness(&self) -> Option<BTreeMap<u32, bool>> {
        let leader = self.metadata_leader()?;
        let addr = self.state().brokers.get(&leader)?.peer().to_owned();
        match self
            .ask(
                &addr,
                u64::from(leader),
                &ForwardRequest::Liveness,
                Duration::from_secs(2),
            )
            .await?
        {
            ForwardReply::Liveness(l) => Some(l),
            _ => None,
        }
    }
}
