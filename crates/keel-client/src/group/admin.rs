//! Group administration on [`Admin`]: list, describe, delete, reset, and offsets read and
//! written from outside the group protocol.

use keel_proto::v1::groups_service_client::GroupsServiceClient;
use keel_proto::v1::{
    CommittedOffset, DeleteGroupRequest, DescribeGroupRequest, DescribeGroupResponse, GroupListing,
    ListGroupsRequest, ResetOffsetsRequest, StartPosition, reset_offsets_request,
};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::coordinator::{by_topic, commits};
use crate::admin::Admin;
use crate::error::Result;

/// Where [`Admin::reset_offsets`] moves a group's committed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// Each partition's log start offset.
    Earliest,
    /// Each partition's high watermark.
    Latest,
    /// This offset, clamped into each partition's retained range.
    Offset(u64),
    /// The first record at or after this time (ms since the epoch), or the high watermark.
    Timestamp(i64),
}

impl Admin {
    fn deadline(&self) -> Instant {
        Instant::now() + self.client.inner.config.request_timeout
    }

    /// Every group of the cluster, by group id.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let req = ListGroupsRequest { local_only: false };
        let attempt = self
            .client
            .attempt(req, |mut s: GroupsServiceClient<Channel>, r| async move {
                s.list_groups(r).await
            });
        let mut groups = self.client.call_any(true, attempt).await?.groups;
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        Ok(groups)
    }

    /// A group's state, members, committed offsets and lag.
    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse> {
        let req = DescribeGroupRequest {
            group_id: group.to_owned(),
        };
        self.client
            .call_coordinator(group, self.deadline(), true, req, |mut s, r| async move {
                s.describe_group(r).await
            })
            .await
    }

    /// Deletes a group's committed offsets. Refused (`GroupNotEmpty`) while it has members.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        let req = DeleteGroupRequest {
            group_id: group.to_owned(),
        };
        self.client
            .call_coordinator(group, self.deadline(), false, req, |mut s, r| async move {
                s.delete_group(r).await
            })
            .await?;
        Ok(())
    }

    /// Moves the group's committed offsets of every partition of `topic`, backwards too, and
    /// returns the offsets now committed. Refused (`GroupNotEmpty`) while it has members.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<CommittedOffset>> {
        let to = match to {
            ResetTo::Earliest => {
                reset_offsets_request::To::Position(StartPosition::Earliest as i32)
            }
            ResetTo::Latest => reset_offsets_request::To::Position(StartPosition::Latest as i32),
            ResetTo::Offset(o) => reset_offsets_request::To::Offset(o),
            ResetTo::Timestamp(ts) => reset_offsets_request::To::TimestampMs(ts),
        };
        let req = ResetOffsetsRequest {
            group_id: group.to_owned(),
            topic: topic.to_owned(),
            to: Some(to),
        };
        // Repeating a reset lands on the same target, so ambiguous failures are retried.
        let resp = self
            .client
            .call_coordinator(group, self.deadline(), true, req, |mut s, r| async move {
                s.reset_offsets(r).await
            })
            .await?;
        let mut offsets = resp.offsets;
        offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(offsets)
    }

    /// The group's committed offsets for `partitions`, or for every partition it committed when
    /// `partitions` is empty. Partitions without a committed offset are left out.
    pub async fn fetch_offsets(
        &self,
        group: &str,
        partitions: &[(String, u32)],
    ) -> Result<Vec<CommittedOffset>> {
        let wanted = by_topic(partitions.iter().map(|(t, p)| (t.as_str(), *p)));
        self.client
            .fetch_group_offsets(group, wanted, self.deadline())
            .await
    }

    /// Commits offsets (`(topic, partition, next offset to consume, metadata)`) from outside the
    /// group protocol: allowed only while the group has no members (`FencedMember` otherwise).
    /// All or none are committed.
    pub async fn commit_offsets(
        &self,
        group: &str,
        offsets: &[(&str, u32, u64, &str)],
    ) -> Result<()> {
        self.client
            .commit_group_offsets(group, "", 0, commits(offsets), self.deadline())
            .await
    }
}
