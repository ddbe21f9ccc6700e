//! `keel group list|describe|delete|reset-offsets`.

use anyhow::Result;
use clap::{ArgGroup, Args, Subcommand};
use keel_client::{CommittedOffset, DescribeGroupResponse, GroupListing, ResetTo, TopicPartitions};
use serde::Serialize;

use crate::common::{ClientOpts, ListArgs, admin_request, parse_timestamp};
use crate::output::{OutputOpts, print_text, table_of};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups.
    List(ListArgs),
    /// Show a group's state, members, committed offsets and lag.
    Describe(DescribeArgs),
    /// Delete a group and its committed offsets (it must have no active members).
    Delete(DeleteArgs),
    /// Move a group's committed offsets for a topic (it must have no active members).
    ResetOffsets(ResetArgs),
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Group id.
    pub group: String,
    #[command(flatten)]
    pub output: OutputOpts,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Group id.
    pub group: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("to")
        .required(true)
        .args(["to_earliest", "to_latest", "to_offset", "to_timestamp"])
))]
pub struct ResetArgs {
    /// Group id.
    pub group: String,
    /// Topic whose offsets to reset (every partition of it).
    #[arg(long)]
    pub topic: String,
    /// To the oldest retained record.
    #[arg(long)]
    pub to_earliest: bool,
    /// To the end (the high watermark).
    #[arg(long)]
    pub to_latest: bool,
    /// To this offset (clamped into each partition's retained range).
    #[arg(long, value_name = "N")]
    pub to_offset: Option<u64>,
    /// To the first record at or after this time: milliseconds since the epoch or RFC 3339.
    #[arg(long, value_name = "TS", value_parser = parse_timestamp)]
    pub to_timestamp: Option<i64>,
    #[command(flatten)]
    pub output: OutputOpts,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// `keel group list --output json`: `{"groups":[{"group":…,"state":…,"members":N,"coordinator":ID}]}`.
#[derive(Debug, Serialize)]
struct GroupListJson {
    groups: Vec<GroupSummaryJson>,
}

#[derive(Debug, Serialize)]
struct GroupSummaryJson {
    group: String,
    state: String,
    members: u32,
    /// `null` while the group's coordinator partition has no leader.
    coordinator: Option<u32>,
}

/// `keel group describe --output json`. Field names are part of the CLI contract.
#[derive(Debug, Serialize)]
struct GroupJson {
    group: String,
    state: String,
    members: Vec<MemberJson>,
    offsets: Vec<OffsetJson>,
}

#[derive(Debug, Serialize)]
struct MemberJson {
    member_id: String,
    /// `null` for a member without static membership.
    instance_id: Option<String>,
    member_epoch: u64,
    assignment: Vec<PartitionRefJson>,
}

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct PartitionRefJson {
    topic: String,
    partition: u32,
}

#[derive(Debug, Serialize)]
struct OffsetJson {
    topic: String,
    partition: u32,
    /// `null` when the group has not committed this partition.
    committed: Option<u64>,
    /// `null` when the partition's leader could not be asked.
    log_end_offset: Option<u64>,
    lag: Option<u64>,
    /// `null` when no member is assigned the partition.
    member: Option<String>,
}

/// `keel group reset-offsets --output json`: `{"group":…,"topic":…,"offsets":[{"topic":…,"partition":0,"offset":5}]}`.
#[derive(Debug, Serialize)]
struct ResetJson {
    group: String,
    topic: String,
    offsets: Vec<NewOffsetJson>,
}

#[derive(Debug, Serialize)]
struct NewOffsetJson {
    topic: String,
    partition: u32,
    offset: u64,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn partitions(list: &[TopicPartitions]) -> Vec<PartitionRefJson> {
    let mut out: Vec<PartitionRefJson> = list
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|&p| PartitionRefJson {
                topic: t.topic.clone(),
                partition: p,
            })
        })
        .collect();
    out.sort();
    out
}

fn list_json(groups: &[GroupListing]) -> GroupListJson {
    GroupListJson {
        groups: groups
            .iter()
            .map(|g| GroupSummaryJson {
                group: g.group_id.clone(),
                state: g.state.clone(),
                members: g.members,
                coordinator: (g.coordinator_id != 0).then_some(g.coordinator_id),
            })
            .collect(),
    }
}

fn describe_json(d: &DescribeGroupResponse) -> GroupJson {
    let mut offsets: Vec<OffsetJson> = d
        .offsets
        .iter()
        .map(|o| OffsetJson {
            topic: o.topic.clone(),
            partition: o.partition,
            committed: o.committed,
            log_end_offset: o.log_end_offset,
            lag: o.lag,
            member: non_empty(&o.member_id),
        })
        .collect();
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    GroupJson {
        group: d.group_id.clone(),
        state: d.state.clone(),
        members: d
            .members
            .iter()
            .map(|m| MemberJson {
                member_id: m.member_id.clone(),
                instance_id: non_empty(&m.instance_id),
                member_epoch: m.member_epoch,
                assignment: partitions(&m.assignment),
            })
            .collect(),
        offsets,
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn describe_table(d: &DescribeGroupResponse) -> String {
    let json = describe_json(d);
    let mut out = format!(
        "Group {}: {}, {}, strategy {}, coordinator {}, total lag {}\n",
        d.group_id,
        d.state,
        plural(d.members.len(), "member"),
        if d.strategy.is_empty() {
            "-"
        } else {
            &d.strategy
        },
        if d.coordinator_id == 0 {
            "none".to_owned()
        } else {
            d.coordinator_id.to_string()
        },
        d.total_lag
    );
    if !json.members.is_empty() {
        out.push('\n');
        out.push_str(&table_of(
            &["MEMBER", "INSTANCE", "EPOCH", "ASSIGNMENT"],
            json.members.iter(),
            |m| {
                let assignment: Vec<String> = m
                    .assignment
                    .iter()
                    .map(|p| format!("{}/{}", p.topic, p.partition))
                    .collect();
                vec![
                    m.member_id.clone(),
                    m.instance_id.clone().unwrap_or_else(|| "-".to_owned()),
                    m.member_epoch.to_string(),
                    if assignment.is_empty() {
                        "-".to_owned()
                    } else {
                        assignment.join(",")
                    },
                ]
            },
        ));
    }
    if !json.offsets.is_empty() {
        out.push('\n');
        out.push_str(&table_of(
            &[
                "TOPIC",
                "PARTITION",
                "COMMITTED",
                "LOG-END",
                "LAG",
                "MEMBER",
            ],
            json.offsets.iter(),
            |o| {
                vec![
                    o.topic.clone(),
                    o.partition.to_string(),
                    opt(o.committed),
                    opt(o.log_end_offset),
                    opt(o.lag),
                    o.member.clone().unwrap_or_else(|| "-".to_owned()),
                ]
            },
        ));
    }
    out
}

fn reset_to(a: &ResetArgs) -> ResetTo {
    if a.to_earliest {
        ResetTo::Earliest
    } else if a.to_latest {
        ResetTo::Latest
    } else if let Some(o) = a.to_offset {
        ResetTo::Offset(o)
    } else if let Some(ts) = a.to_timestamp {
        ResetTo::Timestamp(ts)
    } else {
        // clap requires one of the four.
        ResetTo::Latest
    }
}

fn reset_json(group: &str, topic: &str, offsets: &[CommittedOffset]) -> ResetJson {
    ResetJson {
        group: group.to_owned(),
        topic: topic.to_owned(),
        offsets: offsets
            .iter()
            .map(|o| NewOffsetJson {
                topic: o.topic.clone(),
                partition: o.partition,
                offset: o.offset,
            })
            .collect(),
    }
}

pub async fn run(cmd: GroupCommand) -> Result<()> {
    match cmd {
        GroupCommand::List(a) => {
            let groups =
                admin_request(&a.client, None, async |admin| admin.list_groups().await).await?;
            let json = list_json(&groups);
            a.output.print(&json, || {
                table_of(
                    &["GROUP", "STATE", "MEMBERS", "COORDINATOR"],
                    json.groups.iter(),
                    |g| {
                        vec![
                            g.group.clone(),
                            g.state.clone(),
                            g.members.to_string(),
                            g.coordinator
                                .map_or_else(|| "none".to_owned(), |c| c.to_string()),
                        ]
                    },
                )
            })
        }
        GroupCommand::Describe(a) => {
            let d = admin_request(&a.client, None, async |admin| {
                admin.describe_group(&a.group).await
            })
            .await?;
            a.output.print(&describe_json(&d), || describe_table(&d))
        }
        GroupCommand::Delete(a) => {
            admin_request(&a.client, None, async |admin| {
                admin.delete_group(&a.group).await
            })
            .await?;
            print_text(&format!("Deleted group {:?}\n", a.group))
        }
        GroupCommand::ResetOffsets(a) => {
            let offsets = admin_request(&a.client, Some(&a.topic), async |admin| {
                admin.reset_offsets(&a.group, &a.topic, reset_to(&a)).await
            })
            .await?;
            a.output
                .print(&reset_json(&a.group, &a.topic, &offsets), || {
                    table_of(&["TOPIC", "PARTITION", "OFFSET"], offsets.iter(), |o| {
                        vec![
                            o.topic.clone(),
                            o.partition.to_string(),
                            o.offset.to_string(),
                        ]
                    })
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_client::{GroupMember, GroupPartitionOffset};

    use super::*;

    fn described() -> DescribeGroupResponse {
        DescribeGroupResponse {
            group_id: "g".into(),
            state: "stable".into(),
            strategy: "sticky".into(),
            group_epoch: 4,
            coordinator_id: 2,
            members: vec![GroupMember {
                member_id: "m1".into(),
                instance_id: String::new(),
                member_epoch: 3,
                topics: vec!["t".into()],
                patterns: Vec::new(),
                assignment: vec![TopicPartitions {
                    topic: "t".into(),
                    partitions: vec![1, 0],
                }],
                revoking: Vec::new(),
                target: Vec::new(),
                session_timeout_ms: 10_000,
            }],
            offsets: vec![
                GroupPartitionOffset {
                    topic: "t".into(),
                    partition: 1,
                    committed: None,
                    metadata: String::new(),
                    log_end_offset: None,
                    lag: None,
                    member_id: String::new(),
                },
                GroupPartitionOffset {
                    topic: "t".into(),
                    partition: 0,
                    committed: Some(10),
                    metadata: String::new(),
                    log_end_offset: Some(12),
                    lag: Some(2),
                    member_id: "m1".into(),
                },
            ],
            total_lag: 2,
        }
    }

    #[test]
    fn describe_json_shape() {
        let v = serde_json::to_value(describe_json(&described())).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "group": "g",
                "state": "stable",
                "members": [{
                    "member_id": "m1", "instance_id": null, "member_epoch": 3,
                    "assignment": [{"topic": "t", "partition": 0}, {"topic": "t", "partition": 1}],
                }],
                "offsets": [
                    {"topic": "t", "partition": 0, "committed": 10, "log_end_offset": 12,
                     "lag": 2, "member": "m1"},
                    {"topic": "t", "partition": 1, "committed": null, "log_end_offset": null,
                     "lag": null, "member": null},
                ],
            })
        );
    }

    #[test]
    fn describe_table_layout() {
        let want = "\
Group g: stable, 1 member, strategy sticky, coordinator 2, total lag 2

MEMBER  INSTANCE  EPOCH  ASSIGNMENT
m1      -         3      t/0,t/1

TOPIC  PARTITION  COMMITTED  LOG-END  LAG  MEMBER
t      0          10         12       2    m1
t      1          -          -        -    -
";
        assert_eq!(describe_table(&described()), want);
    }

    #[test]
    fn list_json_shape() {
        let v = serde_json::to_value(list_json(&[GroupListing {
            group_id: "g".into(),
            state: "empty".into(),
            members: 0,
            coordinator_id: 0,
        }]))
        .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"groups": [
                {"group": "g", "state": "empty", "members": 0, "coordinator": null}
            ]})
        );
    }
}
