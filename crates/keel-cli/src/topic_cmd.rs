//! `keel topic create|list|describe|delete|alter|add-partitions`.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::{ArgGroup, Args, Subcommand};
use keel_client::{PartitionInfo, TopicInfo};
use serde::Serialize;

use crate::common::{ClientOpts, ListArgs, admin_request, parse_key_value, usage};
use crate::output::{OutputOpts, id_list, print_text, table_of};

/// Config keys as documented in `--help` (the broker validates them).
const CONFIG_HELP: &str = "Topic config (repeatable). Keys: retention.ms, retention.bytes, \
    segment.bytes, segment.ms, cleanup.policy, max.message.bytes, min.insync.replicas, \
    flush.messages, flush.ms, producer.id.expiration.ms; `keel topic describe` shows every \
    value, defaults included";

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topics with their partition counts and replication factors.
    List(ListArgs),
    /// Show a topic's partitions (leader, replicas, in-sync replicas, offsets) and config.
    Describe(DescribeArgs),
    /// Delete a topic and all its records.
    Delete(NameArgs),
    /// Change a topic's config.
    Alter(AlterArgs),
    /// Grow a topic to more partitions (existing records stay where they are).
    AddPartitions(AddPartitionsArgs),
    /// Move a partition to other brokers while it keeps serving.
    Reassign(ReassignArgs),
}

#[derive(Debug, Args)]
pub struct ReassignArgs {
    /// Topic name.
    pub name: String,
    /// The partition to move.
    #[arg(long)]
    pub partition: u32,
    /// The new replicas, comma-separated broker ids; the first is the preferred leader.
    #[arg(long, value_delimiter = ',', required = true)]
    pub replicas: Vec<u32>,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Topic name: 1 to 249 of [a-zA-Z0-9._-], not "." or "..".
    pub name: String,
    /// Number of partitions [default: 1, the broker's default].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub partitions: Option<u32>,
    /// Replicas of each partition [default: the number of live brokers, at most 3].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub replication_factor: Option<u32>,
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value, help = CONFIG_HELP)]
    pub configs: Vec<(String, String)>,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Topic name.
    pub name: String,
    #[command(flatten)]
    pub output: OutputOpts,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// Topic name.
    pub name: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("change").required(true).multiple(true).args(["configs", "delete_configs"])))]
pub struct AlterArgs {
    /// Topic name.
    pub name: String,
    /// Set a config key (repeatable). Keys: retention.ms, retention.bytes, segment.bytes,
    /// segment.ms, cleanup.policy, max.message.bytes, min.insync.replicas, flush.messages,
    /// flush.ms, producer.id.expiration.ms.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub configs: Vec<(String, String)>,
    /// Reset a config key to its default (repeatable).
    #[arg(long = "delete-config", value_name = "KEY")]
    pub delete_configs: Vec<String>,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct AddPartitionsArgs {
    /// Topic name.
    pub name: String,
    /// The new total number of partitions (more than the topic has now).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub partitions: u32,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// `keel topic describe --output json`. Field names are part of the CLI contract.
#[derive(Debug, Serialize)]
pub struct TopicJson {
    pub name: String,
    pub partitions: Vec<PartitionJson>,
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub struct PartitionJson {
    pub partition: u32,
    /// `null` while the partition has no leader (an election is running).
    pub leader: Option<u32>,
    pub replicas: Vec<u32>,
    pub in_sync: Vec<u32>,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
    pub high_watermark: u64,
}

/// `keel topic list --output json`: `{"topics":[{"name":…,"partitions":3,"replication_factor":3}]}`.
#[derive(Debug, Serialize)]
struct TopicListJson {
    topics: Vec<TopicSummaryJson>,
}

#[derive(Debug, Serialize)]
struct TopicSummaryJson {
    name: String,
    partitions: usize,
    replication_factor: usize,
}

fn sorted_partitions(t: &TopicInfo) -> Vec<&PartitionInfo> {
    let mut parts: Vec<&PartitionInfo> = t.partitions.iter().collect();
    parts.sort_by_key(|p| p.partition);
    parts
}

fn replication_factor(t: &TopicInfo) -> usize {
    t.partitions
        .iter()
        .map(|p| p.replicas.len())
        .max()
        .unwrap_or(0)
}

fn topic_json(t: &TopicInfo) -> TopicJson {
    TopicJson {
        name: t.name.clone(),
        partitions: sorted_partitions(t)
            .into_iter()
            .map(|p| PartitionJson {
                partition: p.partition,
                leader: (p.leader != 0).then_some(p.leader),
                replicas: p.replicas.clone(),
                in_sync: p.in_sync.clone(),
                log_start_offset: p.log_start_offset,
                log_end_offset: p.log_end_offset,
                high_watermark: p.high_watermark,
            })
            .collect(),
        config: t
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn describe_table(t: &TopicInfo) -> String {
    let rf = replication_factor(t);
    let mut out = format!(
        "Topic {}: {} partition{}, replication factor {rf}\n\n",
        t.name,
        t.partitions.len(),
        if t.partitions.len() == 1 { "" } else { "s" }
    );
    out.push_str(&table_of(
        &[
            "PARTITION",
            "LEADER",
            "REPLICAS",
            "IN-SYNC",
            "LOG-START",
            "LOG-END",
            "HIGH-WATERMARK",
        ],
        sorted_partitions(t),
        |p| {
            vec![
                p.partition.to_string(),
                if p.leader == 0 {
                    "none".to_owned()
                } else {
                    p.leader.to_string()
                },
                id_list(&p.replicas),
                id_list(&p.in_sync),
                p.log_start_offset.to_string(),
                p.log_end_offset.to_string(),
                p.high_watermark.to_string(),
            ]
        },
    ));
    let config: BTreeMap<&String, &String> = t.config.iter().collect();
    out.push('\n');
    out.push_str(&table_of(&["CONFIG", "VALUE"], config, |(k, v)| {
        vec![k.clone(), v.clone()]
    }));
    out
}

/// Config pairs as a map, refusing a key given twice (which one was meant?).
fn config_map(pairs: Vec<(String, String)>) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        if map.insert(k.clone(), v).is_some() {
            return Err(usage(format!("--config {k} is given more than once")));
        }
    }
    Ok(map)
}

pub async fn run(cmd: TopicCommand) -> Result<()> {
    match cmd {
        TopicCommand::Create(a) => {
            let configs = config_map(a.configs)?;
            let t = admin_request(&a.client, Some(&a.name), async |admin| {
                admin
                    .create_topic(
                        &a.name,
                        a.partitions.unwrap_or(0),
                        a.replication_factor.unwrap_or(0),
                        configs,
                    )
                    .await
            })
            .await?;
            print_text(&format!(
                "Created topic {:?} with {} partition{}, replication factor {}\n",
                t.name,
                t.partitions.len(),
                if t.partitions.len() == 1 { "" } else { "s" },
                replication_factor(&t)
            ))
        }
        TopicCommand::List(a) => {
            let mut topics =
                admin_request(&a.client, None, async |admin| admin.list_topics().await).await?;
            topics.sort_by(|x, y| x.name.cmp(&y.name));
            let json = TopicListJson {
                topics: topics
                    .iter()
                    .map(|t| TopicSummaryJson {
                        name: t.name.clone(),
                        partitions: t.partitions.len(),
                        replication_factor: replication_factor(t),
                    })
                    .collect(),
            };
            a.output.print(&json, || {
                table_of(
                    &["NAME", "PARTITIONS", "REPLICATION-FACTOR"],
                    topics.iter(),
                    |t| {
                        vec![
                            t.name.clone(),
                            t.partitions.len().to_string(),
                            replication_factor(t).to_string(),
                        ]
                    },
                )
            })
        }
        TopicCommand::Describe(a) => {
            let t = admin_request(&a.client, Some(&a.name), async |admin| {
                admin.describe_topic(&a.name).await
            })
            .await?;
            a.output.print(&topic_json(&t), || describe_table(&t))
        }
        TopicCommand::Delete(a) => {
            admin_request(&a.client, Some(&a.name), async |admin| {
                admin.delete_topic(&a.name).await
            })
            .await?;
            print_text(&format!("Deleted topic {:?}\n", a.name))
        }
        TopicCommand::Alter(a) => {
            let set = config_map(a.configs)?;
            let mut remove: Vec<String> = Vec::new();
            for k in a.delete_configs {
                if set.contains_key(&k) {
                    return Err(usage(format!(
                        "{k} is given to both --config and --delete-config"
                    )));
                }
                if !remove.contains(&k) {
                    remove.push(k);
                }
            }
            let keys: Vec<String> = set.keys().cloned().chain(remove.iter().cloned()).collect();
            let t = admin_request(&a.client, Some(&a.name), async |admin| {
                admin.alter_topic_config(&a.name, set, remove).await
            })
            .await?;
            let now: Vec<String> = keys
                .iter()
                .map(|k| {
                    let v = t.config.get(k).map_or("(unset)", String::as_str);
                    format!("{k}={v}")
                })
                .collect();
            print_text(&format!("Altered topic {:?}: {}\n", t.name, now.join(", ")))
        }
        TopicCommand::AddPartitions(a) => {
            let t = admin_request(&a.client, Some(&a.name), async |admin| {
                admin.add_partitions(&a.name, a.partitions).await
            })
            .await?;
            print_text(&format!(
                "Topic {:?} now has {} partitions\n",
                t.name,
                t.partitions.len()
            ))
        }
        TopicCommand::Reassign(a) => {
            let t = admin_request(&a.client, Some(&a.name), async |admin| {
                admin
                    .reassign_partition(&a.name, a.partition, a.replicas.clone())
                    .await
            })
            .await?;
            let replicas = t
                .partitions
                .get(a.partition as usize)
                .map(|p| p.replicas.clone())
                .unwrap_or_default();
            print_text(&format!(
                "Partition {}/{} is moving to replicas {replicas:?}; `keel topic describe {}` shows it done when in_sync equals replicas\n",
                t.name, a.partition, t.name
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TopicInfo {
        TopicInfo {
            name: "orders".into(),
            partitions: vec![
                PartitionInfo {
                    partition: 1,
                    leader: 0,
                    replicas: vec![2, 3, 1],
                    in_sync: vec![2, 3],
                    log_start_offset: 0,
                    log_end_offset: 5,
                    high_watermark: 4,
                },
                PartitionInfo {
                    partition: 0,
                    leader: 1,
                    replicas: vec![1, 2, 3],
                    in_sync: vec![1, 2, 3],
                    log_start_offset: 0,
                    log_end_offset: 42,
                    high_watermark: 42,
                },
            ],
            config: [("retention.ms".to_owned(), "1000".to_owned())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn describe_json_shape() {
        let v = serde_json::to_value(topic_json(&info())).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "name": "orders",
                "partitions": [
                    {"partition": 0, "leader": 1, "replicas": [1, 2, 3], "in_sync": [1, 2, 3],
                     "log_start_offset": 0, "log_end_offset": 42, "high_watermark": 42},
                    {"partition": 1, "leader": null, "replicas": [2, 3, 1], "in_sync": [2, 3],
                     "log_start_offset": 0, "log_end_offset": 5, "high_watermark": 4},
                ],
                "config": {"retention.ms": "1000"},
            })
        );
    }

    #[test]
    fn describe_table_layout() {
        let t = describe_table(&info());
        let want = "\
Topic orders: 2 partitions, replication factor 3

PARTITION  LEADER  REPLICAS  IN-SYNC  LOG-START  LOG-END  HIGH-WATERMARK
0          1       1,2,3     1,2,3    0          42       42
1          none    2,3,1     2,3      0          5        4

CONFIG        VALUE
retention.ms  1000
";
        assert_eq!(t, want);
    }

    #[test]
    fn duplicate_config_keys_are_usage_errors() {
        let e = config_map(vec![("a".into(), "1".into()), ("a".into(), "2".into())]);
        assert!(e.is_err());
        assert!(config_map(vec![("a".into(), "1".into())]).is_ok());
    }
}
