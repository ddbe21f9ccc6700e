//! GroupsService: consumer-group membership, commits and administration, answered by the
//! group's coordinator (`crate::coordinator`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use keel_proto::v1::groups_service_client::GroupsServiceClient;
use keel_proto::v1::groups_service_server::GroupsService;
use keel_proto::v1::*;
use keel_types::{TopicPattern, validate_topic_name};
use tonic::{Request, Response, Status};

use crate::coordinator::{Shard, catalog, membership_err, now_wall_ms};
use crate::error::{BrokerError, Result};
use crate::groups::live::{HeartbeatRequest, LiveGroup, Subscription};
use crate::groups::{OFFSETS_TOPIC, OffsetsRecord, Strategy, TopicPartition, by_topic};
use crate::state::Shared;

#[derive(Debug, Clone)]
pub struct Groups(pub Shared);

const MAX_ID_LEN: usize = 255;
const MAX_SUBSCRIPTION: usize = 1000;
const MAX_PARTITIONS_LISTED: usize = 100_000;
const MAX_COMMIT_ENTRIES: usize = 1000;
const MAX_METADATA_BYTES: usize = 4096;
const DEFAULT_SESSION_MS: u32 = 10_000;
const MIN_SESSION_MS: u32 = 500;
const MAX_SESSION_MS: u32 = 300_000;

/// INVALID_ARGUMENT about `field` when `count` is over `limit`, worded
/// "{count} {what}; the limit is {limit}{per}" (`per` e.g. " per request").
fn within(field: &'static str, count: usize, limit: usize, what: &str, per: &str) -> Result<()> {
    if count > limit {
        return Err(BrokerError::invalid(
            field,
            format!("{count} {what}; the limit is {limit}{per}"),
        ));
    }
    Ok(())
}

/// Group and instance ids become log keys and metric labels: keep them to a safe alphabet.
fn check_id(field: &'static str, id: &str, required: bool) -> Result<()> {
    if id.is_empty() {
        return if required {
            Err(BrokerError::invalid(field, "must not be empty"))
        } else {
            Ok(())
        };
    }
    within(field, id.len(), MAX_ID_LEN, "characters long", "")?;
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(BrokerError::invalid(
            field,
            "may contain only ASCII letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

fn topic_partitions(field: &'static str, list: &[TopicPartitions]) -> Result<Vec<TopicPartition>> {
    let count: usize = list.iter().map(|t| t.partitions.len()).sum();
    within(field, count, MAX_PARTITIONS_LISTED, "partitions listed", "")?;
    let mut out = Vec::with_capacity(count);
    for t in list {
        validate_topic_name(&t.topic).map_err(|e| BrokerError::invalid(field, e.to_string()))?;
        out.extend(
            t.partitions
                .iter()
                .map(|p| TopicPartition::new(t.topic.clone(), *p)),
        );
    }
    Ok(out)
}

fn to_proto(tps: &BTreeSet<TopicPartition>) -> Vec<TopicPartitions> {
    by_topic(tps)
        .into_iter()
        .map(|(topic, ps)| TopicPartitions {
            topic,
            partitions: ps.into_iter().collect(),
        })
        .collect()
}

fn subscription(topics: &[String], patterns: &[String]) -> Result<Subscription> {
    let count = topics.len() + patterns.len();
    within("topics", count, MAX_SUBSCRIPTION, "topics and patterns", "")?;
    let mut sub = Subscription::default();
    for t in topics {
        validate_topic_name(t).map_err(|e| BrokerError::invalid("topics", e.to_string()))?;
        sub.topics.insert(t.clone());
    }
    for p in patterns {
        sub.patterns.push(
            TopicPattern::parse(p).map_err(|e| BrokerError::invalid("patterns", e.to_string()))?,
        );
    }
    Ok(sub)
}

/// A fresh member id: the group id is not in it (it is long enough already in logs), a
/// random 64-bit value is, so ids are never reused.
fn new_member_id() -> String {
    format!("member-{:016x}", crate::state::request_id())
}

impl Groups {
    async fn heartbeat_inner(&self, r: GroupHeartbeatRequest) -> Result<GroupHeartbeatResponse> {
        check_id("group_id", &r.group_id, true)?;
        check_id("instance_id", &r.instance_id, false)?;
        if r.member_id.len() > MAX_ID_LEN {
            return Err(BrokerError::invalid(
                "member_id",
                format!("longer than {MAX_ID_LEN} characters"),
            ));
        }
        let session = match r.session_timeout_ms {
            0 => DEFAULT_SESSION_MS,
            s if (MIN_SESSION_MS..=MAX_SESSION_MS).contains(&s) => s,
            s => {
                return Err(BrokerError::invalid(
                    "session_timeout_ms",
                    format!("{s} is outside {MIN_SESSION_MS}..={MAX_SESSION_MS}"),
                ));
            }
        };
        let strategy = if r.strategy.is_empty() {
            None
        } else {
            Some(
                r.strategy
                    .parse::<Strategy>()
                    .map_err(|e| BrokerError::invalid("strategy", e.to_string()))?,
            )
        };
        let joining = r.member_id.is_empty();
        let sub = if r.topics.is_empty() && r.patterns.is_empty() {
            if joining {
                return Err(BrokerError::invalid(
                    "topics",
                    "a joining member must subscribe to at least one topic or pattern",
                ));
            }
            None
        } else {
            Some(subscription(&r.topics, &r.patterns)?)
        };
        let owned: BTreeSet<TopicPartition> =
            topic_partitions("owned", &r.owned)?.into_iter().collect();
        let st = &self.0;
        let shard = st.groups.shard(st, &r.group_id).await?;
        let catalog = catalog(&st.registry);
        let now = st.groups.now_ms();
        let mut inner = shard.inner.lock().await;
        let group = inner.groups.entry(r.group_id.clone()).or_insert_with(|| {
            LiveGroup::new(r.group_id.clone()).holding_until(shard.hold_until_ms)
        });
        let ans = group
            .heartbeat(
                HeartbeatRequest {
                    member_id: r.member_id,
                    member_epoch: r.member_epoch,
                    instance_id: (!r.instance_id.is_empty()).then_some(r.instance_id),
                    subscription: sub,
                    owned,
                    session_timeout_ms: u64::from(session),
                    strategy,
                },
                now,
                &catalog,
                new_member_id,
            )
            .map_err(membership_err)?;
        if joining {
            tracing::info!(group = %r.group_id, member = %ans.member_id, group_epoch = ans.group_epoch, "member joined");
        }
        Ok(GroupHeartbeatResponse {
            member_id: ans.member_id,
            member_epoch: ans.member_epoch,
            group_epoch: ans.group_epoch,
            heartbeat_interval_ms: (session / 6).min(3000),
            assignment: to_proto(&ans.assignment),
            revoke: to_proto(&ans.revoke),
            pending: to_proto(&ans.pending),
        })
    }

    async fn commit_inner(&self, r: CommitOffsetsRequest) -> Result<()> {
        check_id("group_id", &r.group_id, true)?;
        let count = r.offsets.len();
        within(
            "offsets",
            count,
            MAX_COMMIT_ENTRIES,
            "entries",
            " per request",
        )?;
        let mut tps = Vec::with_capacity(r.offsets.len());
        for o in &r.offsets {
            validate_topic_name(&o.topic)
                .map_err(|e| BrokerError::invalid("offsets.topic", e.to_string()))?;
            let bytes = o.metadata.len();
            within("offsets.metadata", bytes, MAX_METADATA_BYTES, "bytes", "")?;
            tps.push(TopicPartition::new(o.topic.clone(), o.partition));
        }
        let st = Arc::clone(&self.0);
        let shard = st.groups.shard(&st, &r.group_id).await?;
        // In a task of its own: once appended, the commit must stay covered by the writers'
        // lock until it is applied, even if this request is cancelled (a compaction in
        // between would otherwise fold without it and then undo it).
        tokio::spawn(async move {
            let _writing = shard.writing().await;
            {
                let mut inner = shard.inner.lock().await;
                inner.catch_up(&shard.partition)?;
                match inner.groups.get(&r.group_id) {
                    Some(g) => g.check_commit(&r.member_id, &tps).map_err(membership_err)?,
                    None if r.member_id.is_empty() => {}
                    None => {
                        return Err(BrokerError::UnknownMember(format!(
                            "member {:?} is not a member of group {:?}; rejoin with an empty member id",
                            r.member_id, r.group_id
                        )));
                    }
                }
                for (o, tp) in r.offsets.iter().zip(&tps) {
                    inner
                        .offsets
                        .check_commit(&r.group_id, tp, o.offset)
                        .map_err(|e| BrokerError::OffsetBackwards(e.to_string()))?;
                }
            }
            let now = now_wall_ms();
            let records: Vec<OffsetsRecord> = r
                .offsets
                .into_iter()
                .zip(tps)
                .map(|(o, tp)| OffsetsRecord::Commit {
                    group: r.group_id.clone(),
                    partition: tp,
                    offset: o.offset,
                    metadata: o.metadata,
                    committed_at_ms: now,
                })
                .collect();
            st.groups.append(&shard, &records).await
        })
        .await?
    }

    async fn fetch_inner(&self, r: FetchOffsetsRequest) -> Result<FetchOffsetsResponse> {
        check_id("group_id", &r.group_id, true)?;
        let wanted = topic_partitions("partitions", &r.partitions)?;
        let st = &self.0;
        let shard = st.groups.shard(st, &r.group_id).await?;
        let mut inner = shard.inner.lock().await;
        inner.catch_up(&shard.partition)?;
        let committed = |(tp, c): (&TopicPartition, &crate::groups::Committed)| CommittedOffset {
            topic: tp.topic.clone(),
            partition: tp.partition,
            offset: c.offset,
            metadata: c.metadata.clone(),
            committed_at_ms: c.committed_at_ms,
        };
        let offsets = match inner.offsets.group_offsets(&r.group_id) {
            None => Vec::new(),
            Some(all) if wanted.is_empty() => all.iter().map(committed).collect(),
            Some(all) => wanted
                .iter()
                .filter_map(|tp| all.get_key_value(tp))
                .map(committed)
                .collect(),
        };
        Ok(FetchOffsetsResponse { offsets })
    }

    /// The groups this broker coordinates.
    async fn local_groups(&self) -> Result<Vec<GroupListing>> {
        let st = &self.0;
        let mut out = Vec::new();
        for shard in st.groups.led_shards(st).await? {
            let mut inner = shard.inner.lock().await;
            inner.catch_up(&shard.partition)?;
            let mut names: BTreeSet<String> = inner.offsets.groups().map(str::to_owned).collect();
            names.extend(
                inner
                    .groups
                    .iter()
                    .filter(|(_, g)| !g.is_empty())
                    .map(|(n, _)| n.clone()),
            );
            for name in names {
                let live = inner.groups.get(&name);
                out.push(GroupListing {
                    state: live.map_or("empty", LiveGroup::state_name).to_owned(),
                    members: live.map_or(0, |g| g.members().len()) as u32,
                    coordinator_id: st.id,
                    group_id: name,
                });
            }
        }
        Ok(out)
    }

    async fn list_inner(&self, r: ListGroupsRequest) -> Result<ListGroupsResponse> {
        let st = &self.0;
        let mut groups = self.local_groups().await?;
        if !r.local_only
            && let Ok(topic) = st.registry.get(OFFSETS_TOPIC)
        {
            // Every partition's coordinator must be asked: a listing that silently left one
            // out would look complete.
            let mut peers: BTreeMap<u32, String> = BTreeMap::new();
            for p in 0..topic.partition_count() {
                let leader = match topic.partition(p) {
                    Ok(_) => continue,
                    Err(BrokerError::NotLeader { leader, .. }) => leader,
                    Err(e) => return Err(e),
                };
                let Some((id, client_address)) = leader else {
                    return Err(BrokerError::Unavailable {
                        message: format!(
                            "partition {p} of {OFFSETS_TOPIC} has no known leader; retry"
                        ),
                        definite: true,
                    });
                };
                peers.insert(id, st.peer_address(id).unwrap_or(client_address));
            }
            for (id, address) in peers {
                let resp = GroupsServiceClient::new(st.groups.peer(&address)?)
                    .list_groups(ListGroupsRequest { local_only: true })
                    .await
                    .map_err(|s| {
                        BrokerError::from_peer_read(
                            &s,
                            &format!("could not list the groups of coordinator {id} at {address}"),
                        )
                    })?;
                groups.extend(resp.into_inner().groups);
            }
        }
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        groups.dedup_by(|a, b| a.group_id == b.group_id);
        Ok(ListGroupsResponse { groups })
    }

    async fn describe_inner(&self, r: DescribeGroupRequest) -> Result<DescribeGroupResponse> {
        check_id("group_id", &r.group_id, true)?;
        let st = &self.0;
        let shard = st.groups.shard(st, &r.group_id).await?;
        let (mut resp, mut rows) = {
            let mut inner = shard.inner.lock().await;
            inner.catch_up(&shard.partition)?;
            if !inner.knows(&r.group_id) {
                return Err(BrokerError::UnknownGroup(r.group_id));
            }
            let live = inner.groups.get(&r.group_id).filter(|g| !g.is_empty());
            let mut rows: BTreeMap<TopicPartition, GroupPartitionOffset> = BTreeMap::new();
            if let Some(all) = inner.offsets.group_offsets(&r.group_id) {
                for (tp, c) in all {
                    rows.insert(
                        tp.clone(),
                        GroupPartitionOffset {
                            topic: tp.topic.clone(),
                            partition: tp.partition,
                            committed: Some(c.offset),
                            metadata: c.metadata.clone(),
                            ..Default::default()
                        },
                    );
                }
            }
            let mut members = Vec::new();
            if let Some(g) = live {
                for (id, m) in g.members() {
                    let ms = g.state().member(id);
                    let assigned = ms.map(|s| s.assigned().clone()).unwrap_or_default();
                    for tp in &assigned {
                        rows.entry(tp.clone())
                            .or_insert_with(|| GroupPartitionOffset {
                                topic: tp.topic.clone(),
                                partition: tp.partition,
                                ..Default::default()
                            })
                            .member_id
                            .clone_from(id);
                    }
                    members.push(GroupMember {
                        member_id: id.clone(),
                        instance_id: m.instance_id.clone().unwrap_or_default(),
                        member_epoch: ms.map_or(0, |s| s.epoch()),
                        topics: m.subscription.topics.iter().cloned().collect(),
                        patterns: m
                            .subscription
                            .patterns
                            .iter()
                            .map(|p| p.as_str().to_owned())
                            .collect(),
                        assignment: to_proto(&assigned),
                        revoking: to_proto(&ms.map(|s| s.revoking().clone()).unwrap_or_default()),
                        target: to_proto(g.state().target_of(id)),
                        session_timeout_ms: m.session_timeout_ms as u32,
                    });
                }
            }
            (
                DescribeGroupResponse {
                    group_id: r.group_id.clone(),
                    state: live.map_or("empty", LiveGroup::state_name).to_owned(),
                    strategy: live
                        .map_or(Strategy::default(), LiveGroup::strategy)
                        .to_string(),
                    group_epoch: live.map_or(0, |g| g.state().group_epoch()),
                    coordinator_id: st.id,
                    members,
                    offsets: Vec::new(),
                    total_lag: 0,
                },
                rows,
            )
        };
        let tps: Vec<TopicPartition> = rows.keys().cloned().collect();
        let ends = st.groups.high_watermarks(st, &tps).await;
        for (tp, row) in rows.iter_mut() {
            if let Some(end) = ends.get(tp) {
                row.log_end_offset = Some(*end);
                let lag = end.saturating_sub(row.committed.unwrap_or(0));
                row.lag = Some(lag);
                resp.total_lag += lag;
            }
        }
        resp.offsets = rows.into_values().collect();
        Ok(resp)
    }

    /// Refuses admin changes to a group with members; returns whether it has any offsets.
    /// Called with the shard's writers' lock held, so the check and the write that follows
    /// it are not separated by a compaction.
    async fn check_inactive(shard: &Shard, group: &str) -> Result<bool> {
        let mut inner = shard.inner.lock().await;
        inner.catch_up(&shard.partition)?;
        if let Some(g) = inner.groups.get(group).filter(|g| !g.is_empty()) {
            return Err(BrokerError::GroupNotEmpty {
                group: group.to_owned(),
                members: g.members().len(),
            });
        }
        Ok(inner.offsets.group_offsets(group).is_some())
    }

    async fn delete_inner(&self, r: DeleteGroupRequest) -> Result<()> {
        check_id("group_id", &r.group_id, true)?;
        let st = Arc::clone(&self.0);
        let shard = st.groups.shard(&st, &r.group_id).await?;
        tokio::spawn(async move {
            let _writing = shard.writing().await;
            if !Self::check_inactive(&shard, &r.group_id).await? {
                return Err(BrokerError::UnknownGroup(r.group_id));
            }
            st.groups
                .append(
                    &shard,
                    &[OffsetsRecord::DeleteGroup {
                        group: r.group_id.clone(),
                    }],
                )
                .await?;
            tracing::info!(group = %r.group_id, "group deleted");
            Ok(())
        })
        .await?
    }

    async fn reset_inner(&self, r: ResetOffsetsRequest) -> Result<ResetOffsetsResponse> {
        check_id("group_id", &r.group_id, true)?;
        let st = Arc::clone(&self.0);
        let topic = st.registry.lookup("topic", &r.topic)?;
        let to = r.to.ok_or_else(|| {
            BrokerError::invalid("to", "one of position, offset or timestamp_ms is required")
        })?;
        if let reset_offsets_request::To::Position(p) = to
            && !matches!(
                StartPosition::try_from(p),
                Ok(StartPosition::Earliest | StartPosition::Latest)
            )
        {
            return Err(BrokerError::invalid(
                "position",
                format!("unknown value {p}"),
            ));
        }
        let shard = st.groups.shard(&st, &r.group_id).await?;
        tokio::spawn(async move {
            let _writing = shard.writing().await;
            Self::check_inactive(&shard, &r.group_id).await?;
            let st = &st;
            let lookups = (0..topic.partition_count()).map(|p| {
                let tp = TopicPartition::new(r.topic.clone(), p);
                async move {
                    let spec = match to {
                        reset_offsets_request::To::Position(pos) => {
                            list_offsets_request::Spec::Position(pos)
                        }
                        reset_offsets_request::To::TimestampMs(ts) => {
                            list_offsets_request::Spec::TimestampMs(ts)
                        }
                        reset_offsets_request::To::Offset(_) => {
                            list_offsets_request::Spec::Position(StartPosition::Latest as i32)
                        }
                    };
                    let (found, start, hwm) = st.groups.list_offset(st, &tp, spec).await?;
                    let offset = match to {
                        // Not `clamp`: a leader that just took over may briefly report a
                        // start above its high watermark.
                        reset_offsets_request::To::Offset(o) => o.max(start).min(hwm),
                        _ => found,
                    };
                    Ok::<_, BrokerError>((tp, offset))
                }
            });
            let offsets = futures::future::try_join_all(lookups).await?;
            let at_ms = now_wall_ms();
            st.groups
                .append(
                    &shard,
                    &[OffsetsRecord::Reset {
                        group: r.group_id.clone(),
                        offsets: offsets.clone(),
                        at_ms,
                    }],
                )
                .await?;
            tracing::info!(group = %r.group_id, topic = %r.topic, "group offsets reset");
            Ok(ResetOffsetsResponse {
                offsets: offsets
                    .into_iter()
                    .map(|(tp, offset)| CommittedOffset {
                        topic: tp.topic,
                        partition: tp.partition,
                        offset,
                        metadata: String::new(),
                        committed_at_ms: at_ms,
                    })
                    .collect(),
            })
        })
        .await?
    }
}

#[tonic::async_trait]
impl GroupsService for Groups {
    async fn find_coordinator(
        &self,
        req: Request<FindCoordinatorRequest>,
    ) -> Result<Response<FindCoordinatorResponse>, Status> {
        let r = req.into_inner();
        check_id("group_id", &r.group_id, true)?;
        let found = self.0.groups.find(&self.0, &r.group_id).await?;
        let (coordinator_id, coordinator_address) = found.unwrap_or((0, String::new()));
        Ok(Response::new(FindCoordinatorResponse {
            coordinator_id,
            coordinator_address,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %req.get_ref().group_id))]
    async fn heartbeat(
        &self,
        req: Request<GroupHeartbeatRequest>,
    ) -> Result<Response<GroupHeartbeatResponse>, Status> {
        Ok(Response::new(self.heartbeat_inner(req.into_inner()).await?))
    }

    async fn leave_group(
        &self,
        req: Request<LeaveGroupRequest>,
    ) -> Result<Response<LeaveGroupResponse>, Status> {
        let r = req.into_inner();
        check_id("group_id", &r.group_id, true)?;
        let st = &self.0;
        let shard = st.groups.shard(st, &r.group_id).await?;
        let catalog = catalog(&st.registry);
        let now = st.groups.now_ms();
        let mut inner = shard.inner.lock().await;
        // Leaving twice (a retried call) is not an error.
        if let Some(g) = inner.groups.get_mut(&r.group_id)
            && g.leave(&r.member_id, r.temporary, now, &catalog)
        {
            tracing::info!(group = %r.group_id, member = %r.member_id, temporary = r.temporary, "member left");
        }
        Ok(Response::new(LeaveGroupResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %req.get_ref().group_id))]
    async fn commit_offsets(
        &self,
        req: Request<CommitOffsetsRequest>,
    ) -> Result<Response<CommitOffsetsResponse>, Status> {
        self.commit_inner(req.into_inner()).await?;
        Ok(Response::new(CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        req: Request<FetchOffsetsRequest>,
    ) -> Result<Response<FetchOffsetsResponse>, Status> {
        Ok(Response::new(self.fetch_inner(req.into_inner()).await?))
    }

    async fn list_groups(
        &self,
        req: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        Ok(Response::new(self.list_inner(req.into_inner()).await?))
    }

    async fn describe_group(
        &self,
        req: Request<DescribeGroupRequest>,
    ) -> Result<Response<DescribeGroupResponse>, Status> {
        Ok(Response::new(self.describe_inner(req.into_inner()).await?))
    }

    async fn delete_group(
        &self,
        req: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        self.delete_inner(req.into_inner()).await?;
        Ok(Response::new(DeleteGroupResponse {}))
    }

    async fn reset_offsets(
        &self,
        req: Request<ResetOffsetsRequest>,
    ) -> Result<Response<ResetOffsetsResponse>, Status> {
        Ok(Response::new(self.reset_inner(req.into_inner()).await?))
    }
}
