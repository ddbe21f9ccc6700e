//! Group administration on [`Admin`]: list, describe, delete, reset, and offsets read and
//! written from outside the group protocol.

use keel_proto::v1::{
    CommittedOffset, DeleteGroupRequest, DescribeGroupRequest, DescribeGroupResponse, GroupListing,
    ListGroupsRequest, ResetOffsetsRequest, StartPosition, reset_offsets_request,
};
use tokio::time::Instant;

use super::coordinator::{GroupCoordinator, by_topic, commits, groups_rpc};
use crate::admin::Admin;
use crate::client::with_timeout;
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
        let max = self.client.inner.config.max_message_size;
        let resp = self
            .client
            .call_any(true, |ch, t| async move {
                groups_rpc(ch, max)
                    .list_groups(with_timeout(ListGroupsRequest { local_only: false }, t))
                    .await
            })
            .await?;
        let mut groups = resp.groups;
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        Ok(groups)
    }

    /// A group's state, members, committed offsets and lag.
    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse> {
        let max = self.client.inner.config.max_message_size;
        self.client
            .call_routed(&GroupCoordinator(group), self.deadline(), true, |ch, t| {
                let req = DescribeGroupRequest {
                    group_id: group.to_owned(),
                };
                async move {
                    groups_rpc(ch, max)
                        .describe_group(with_timeout(req, t))
                        .await
                }
            })
            .await
    }

    /// Deletes a group's committed offsets. Refused (`GroupNotEmpty`) while it has members.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        let max = self.client.inner.config.max_message_size;
        self.client
            .call_routed(&GroupCoordinator(group), self.deadline(), false, |ch, t| {
                let req = DeleteGroupRequest {
                    group_id: group.to_owned(),
                };
                async move { groups_rpc(ch, max).delete_group(with_timeout(req, t)).await }
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
        let max = self.client.inner.config.max_message_size;
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
            .call_routed(&GroupCoordinator(group), self.deadline(), true, |ch, t| {
                let req = req.clone();
                async move {
                    groups_rpc(ch, max)
                        .reset_offsets(with_timeout(req, t))
                        .await
                }
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
