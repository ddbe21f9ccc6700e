//! Routing group calls to their coordinator: a cache of group → coordinator address, filled by
//! `FindCoordinator` (any broker answers) and corrected by `NOT_COORDINATOR` hints.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use keel_proto::v1::groups_service_client::GroupsServiceClient;
use keel_proto::v1::{
    CommitOffsetsRequest, CommittedOffset, FetchOffsetsRequest, FindCoordinatorRequest,
    GroupHeartbeatRequest, GroupHeartbeatResponse, LeaveGroupRequest, OffsetCommit,
    TopicPartitions,
};
use tokio::time::Instant;
use tonic::Request;
use tonic::transport::Channel;

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::retry::Target;
use crate::rpc::Answer;
use crate::util::lock;

/// Where each group's coordinator was last found.
#[derive(Debug, Default)]
pub(crate) struct Coordinators {
    addresses: Mutex<HashMap<String, String>>,
}

impl Coordinators {
    fn get(&self, group: &str) -> Option<String> {
        lock(&self.addresses).get(group).cloned()
    }

    fn set(&self, group: &str, addr: String) {
        lock(&self.addresses).insert(group.to_owned(), addr);
    }

    fn forget(&self, group: &str) {
        lock(&self.addresses).remove(group);
    }
}

/// A group's coordinator, as the coordinator cache knows it: a request to it finds the
/// coordinator when it is not cached, follows `NOT_COORDINATOR` hints and retries until its
/// deadline (see [`Client::call_routed`]).
pub(crate) struct GroupCoordinator<'a>(pub &'a str);

impl fmt::Display for GroupCoordinator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the coordinator of group {:?}", self.0)
    }
}

impl Target for GroupCoordinator<'_> {
    async fn find(&self, client: &Client, deadline: Instant) -> Result<String> {
        let group = self.0;
        match client.inner.coordinators.get(group) {
            Some(a) => Ok(a),
            None => tokio::time::timeout_at(deadline, client.find_coordinator(group))
                .await
                .unwrap_or_else(|_| {
                    Err(ClientError::timeout(format!(
                        "no coordinator found for group {group:?} in time"
                    )))
                }),
        }
    }

    fn failed(&self, client: &Client, err: &ClientError) {
        let coordinators = &client.inner.coordinators;
        match err.coordinator_hint().and_then(|h| h.address.clone()) {
            Some(addr) => coordinators.set(self.0, addr),
            // Any retriable failure may mean the coordinator moved (or its broker is down):
            // ask again rather than hammer the same broker.
            None if err.is_retriable() => coordinators.forget(self.0),
            None => {}
        }
    }
}

impl Client {
    /// Runs a request on `group`'s coordinator until `deadline`; `send` picks the method.
    pub(crate) async fn call_coordinator<Req: Clone, T, Fut: Answer<T>>(
        &self,
        group: &str,
        deadline: Instant,
        idempotent: bool,
        req: Req,
        send: impl Fn(GroupsServiceClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<T> {
        let attempt = self.attempt(req, send);
        self.call_routed(&GroupCoordinator(group), deadline, idempotent, attempt)
            .await
    }

    /// Asks any broker which broker coordinates `group`, and caches the answer.
    pub(crate) async fn find_coordinator(&self, group: &str) -> Result<String> {
        let req = FindCoordinatorRequest {
            group_id: group.to_owned(),
        };
        let attempt = self.attempt(req, |mut s: GroupsServiceClient<Channel>, r| async move {
            s.find_coordinator(r).await
        });
        let resp = self.call_any(true, attempt).await?;
        if resp.coordinator_id == 0 || resp.coordinator_address.is_empty() {
            // The coordinator's partition is electing a leader: worth retrying shortly.
            return Err(ClientError::Unavailable {
                message: format!("group {group:?} has no coordinator right now"),
                definite: true,
            });
        }
        self.inner
            .coordinators
            .set(group, resp.coordinator_address.clone());
        Ok(resp.coordinator_address)
    }

    pub(crate) async fn group_heartbeat(
        &self,
        req: GroupHeartbeatRequest,
        deadline: Instant,
    ) -> Result<GroupHeartbeatResponse> {
        let group = req.group_id.clone();
        // A repeated heartbeat is harmless: the coordinator trusts only reports made with the
        // member's current epoch. A join repeated after a lost answer may leave a ghost member
        // behind, which holds its share of the partitions until its session expires (see
        // `GroupConfig::session_timeout`); not retrying would not help, as the heartbeat task
        // joins again anyway.
        self.call_coordinator(&group, deadline, true, req, |mut s, r| async move {
            s.heartbeat(r).await
        })
        .await
    }

    pub(crate) async fn leave_group(
        &self,
        group: &str,
        member_id: &str,
        temporary: bool,
        deadline: Instant,
    ) -> Result<()> {
        let req = LeaveGroupRequest {
            group_id: group.to_owned(),
            member_id: member_id.to_owned(),
            temporary,
        };
        match self
            .call_coordinator(group, deadline, true, req, |mut s, r| async move {
                s.leave_group(r).await
            })
            .await
        {
            // Already gone (a retry after a lost answer, or the session had expired): the
            // member is out either way.
            Ok(_) | Err(ClientError::UnknownMember { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Commits as `member_id` (empty: from outside the group protocol). Committing the same
    /// offsets twice is harmless, so ambiguous failures are retried.
    pub(crate) async fn commit_group_offsets(
        &self,
        group: &str,
        member_id: &str,
        member_epoch: u64,
        offsets: Vec<OffsetCommit>,
        deadline: Instant,
    ) -> Result<()> {
        let req = CommitOffsetsRequest {
            group_id: group.to_owned(),
            member_id: member_id.to_owned(),
            member_epoch,
            offsets,
        };
        self.call_coordinator(group, deadline, true, req, |mut s, r| async move {
            s.commit_offsets(r).await
        })
        .await?;
        Ok(())
    }

    /// Committed offsets of `group` for `partitions` (empty: every committed partition).
    pub(crate) async fn fetch_group_offsets(
        &self,
        group: &str,
        partitions: Vec<TopicPartitions>,
        deadline: Instant,
    ) -> Result<Vec<CommittedOffset>> {
        let req = FetchOffsetsRequest {
            group_id: group.to_owned(),
            partitions,
        };
        let resp = self
            .call_coordinator(group, deadline, true, req, |mut s, r| async move {
                s.fetch_offsets(r).await
            })
            .await?;
        Ok(resp.offsets)
    }
}

/// `(topic, partition)` pairs grouped by topic, as the API takes them.
pub(crate) fn by_topic<'a>(
    partitions: impl IntoIterator<Item = (&'a str, u32)>,
) -> Vec<TopicPartitions> {
    let mut out: Vec<TopicPartitions> = Vec::new();
    for (topic, partition) in partitions {
        match out.iter_mut().find(|t| t.topic == topic) {
            Some(t) => {
                if !t.partitions.contains(&partition) {
                    t.partitions.push(partition);
                }
            }
            None => out.push(TopicPartitions {
                topic: topic.to_owned(),
                partitions: vec![partition],
            }),
        }
    }
    out
}

/// Offsets to commit, from `(topic, partition, next offset to consume, metadata)`.
pub(crate) fn commits(offsets: &[(&str, u32, u64, &str)]) -> Vec<OffsetCommit> {
    offsets
        .iter()
        .map(|&(topic, partition, offset, metadata)| OffsetCommit {
            topic: topic.to_owned(),
            partition,
            offset,
            metadata: metadata.to_owned(),
        })
        .collect()
}

/// The inverse of [`by_topic`].
pub(crate) fn flatten(list: &[TopicPartitions]) -> impl Iterator<Item = (String, u32)> + '_ {
    list.iter()
        .flat_map(|t| t.partitions.iter().map(|&p| (t.topic.clone(), p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_by_topic_round_trips() {
        let tps = by_topic([("a", 0), ("b", 1), ("a", 2), ("a", 0)]);
        assert_eq!(tps.len(), 2);
        assert_eq!(tps[0].partitions, vec![0, 2]);
        let back: Vec<(String, u32)> = flatten(&tps).collect();
        assert_eq!(
            back,
            vec![("a".into(), 0), ("a".into(), 2), ("b".into(), 1)]
        );
    }
}
