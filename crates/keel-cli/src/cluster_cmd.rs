//! `keel cluster status`, `decommission` and `replace-broker`.

use anyhow::Result;
use clap::{Args, Subcommand};
use keel_client::{DescribeClusterResponse, TopicInfo};
use serde::Serialize;

use crate::common::{ClientOpts, admin_request};
use crate::output::{OutputOpts, print_text, table_of};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the brokers (id, address, alive) and which one leads the cluster metadata.
    Status(StatusArgs),
    /// Move every partition replica off a broker so that it can be removed.
    Decommission(DecommissionArgs),
    /// Let a broker whose data directory was lost (wiped, or a new disk) rejoin: the cluster
    /// stops counting it as a voter, then rebuilds its replicas from the others once it is
    /// started on its new directory.
    ReplaceBroker(ReplaceBrokerArgs),
}

#[derive(Debug, Args)]
pub struct ReplaceBrokerArgs {
    /// Id of the broker whose data directory was lost.
    pub broker_id: u32,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct DecommissionArgs {
    /// Id of the broker to empty.
    pub broker_id: u32,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub output: OutputOpts,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// `keel cluster status --output json`. Field names are part of the CLI contract.
#[derive(Debug, Serialize)]
struct StatusJson {
    /// `null` while no broker leads the metadata (an election is running).
    metadata_leader: Option<u32>,
    brokers: Vec<BrokerJson>,
    /// Partitions with fewer replicas in sync than they have replicas.
    under_replicated: Vec<UnderReplicatedJson>,
}

#[derive(Debug, Serialize)]
struct UnderReplicatedJson {
    topic: String,
    partition: u32,
    leader: Option<u32>,
    replicas: Vec<u32>,
    in_sync: Vec<u32>,
}

fn under_replicated(topics: &[TopicInfo]) -> Vec<UnderReplicatedJson> {
    let mut out = Vec::new();
    for t in topics {
        for p in &t.partitions {
            let missing = p.replicas.iter().any(|r| !p.in_sync.contains(r));
            if missing || p.leader == 0 {
                out.push(UnderReplicatedJson {
                    topic: t.name.clone(),
                    partition: p.partition,
                    leader: (p.leader != 0).then_some(p.leader),
                    replicas: p.replicas.clone(),
                    in_sync: p.in_sync.clone(),
                });
            }
        }
    }
    out
}

#[derive(Debug, Serialize)]
struct BrokerJson {
    id: u32,
    address: String,
    alive: bool,
}

fn status_json(c: &DescribeClusterResponse, topics: &[TopicInfo]) -> StatusJson {
    let mut brokers: Vec<BrokerJson> = c
        .brokers
        .iter()
        .map(|b| BrokerJson {
            id: b.id,
            address: b.address.clone(),
            alive: b.alive,
        })
        .collect();
    brokers.sort_by_key(|b| b.id);
    StatusJson {
        metadata_leader: (c.metadata_leader != 0).then_some(c.metadata_leader),
        brokers,
        under_replicated: under_replicated(topics),
    }
}

fn status_table(s: &StatusJson) -> String {
    let mut out = table_of(&["ID", "ADDRESS", "ALIVE", "ROLE"], s.brokers.iter(), |b| {
        let role = if Some(b.id) == s.metadata_leader {
            "metadata leader"
        } else {
            "-"
        };
        vec![
            b.id.to_string(),
            b.address.clone(),
            if b.alive { "yes" } else { "no" }.to_owned(),
            role.to_owned(),
        ]
    });
    if s.metadata_leader.is_none() {
        out.push_str("No metadata leader right now (an election is running).\n");
    }
    if s.under_replicated.is_empty() {
        out.push_str("All partitions are fully replicated.\n");
    } else {
        out.push_str(&format!(
            "{} under-replicated partition(s):\n",
            s.under_replicated.len()
        ));
        let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        out.push_str(&table_of(
            &["TOPIC", "PARTITION", "LEADER", "REPLICAS", "IN_SYNC"],
            s.under_replicated.iter(),
            |u| {
                vec![
                    u.topic.clone(),
                    u.partition.to_string(),
                    u.leader.map_or("none".into(), |l| l.to_string()),
                    ids(&u.replicas),
                    ids(&u.in_sync),
                ]
            },
        ));
    }
    out
}

pub async fn run(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Status(a) => {
            let (c, topics) = admin_request(&a.client, None, async |admin| {
                Ok((admin.describe_cluster().await?, admin.list_topics().await?))
            })
            .await?;
            let s = status_json(&c, &topics);
            a.output.print(&s, || status_table(&s))
        }
        ClusterCommand::Decommission(a) => {
            let moved = admin_request(&a.client, None, async |admin| {
                admin.decommission_broker(a.broker_id).await
            })
            .await?;
            print_text(&format!(
                "Broker {} is being emptied: {} partition replica(s) moving ({})\n",
                a.broker_id,
                moved.len(),
                moved.join(", ")
            ))
        }
        ClusterCommand::ReplaceBroker(a) => {
            let rebuilt = admin_request(&a.client, None, async |admin| {
                admin.replace_broker(a.broker_id).await
            })
            .await?;
            print_text(&format!(
                "Broker {} is being replaced: start it on its new data directory; {} partition replica(s) will be rebuilt from the others ({})\n",
                a.broker_id,
                rebuilt.len(),
                rebuilt.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_client::BrokerInfo;

    use super::*;

    #[test]
    fn json_and_table() {
        let c = DescribeClusterResponse {
            metadata_leader: 1,
            brokers: vec![
                BrokerInfo {
                    id: 2,
                    address: "127.0.0.1:9293".into(),
                    alive: false,
                },
                BrokerInfo {
                    id: 1,
                    address: "127.0.0.1:9292".into(),
                    alive: true,
                },
            ],
            broker_id: 2,
        };
        let topics = vec![TopicInfo {
            name: "t".into(),
            partitions: vec![
                keel_client::PartitionInfo {
                    partition: 0,
                    leader: 1,
                    replicas: vec![1, 2],
                    in_sync: vec![1, 2],
                    ..Default::default()
                },
                keel_client::PartitionInfo {
                    partition: 1,
                    leader: 1,
                    replicas: vec![2, 1],
                    in_sync: vec![1],
                    ..Default::default()
                },
            ],
            config: Default::default(),
        }];
        let s = status_json(&c, &topics);
        assert_eq!(
            serde_json::to_value(&s).expect("json"),
            serde_json::json!({"metadata_leader": 1, "brokers": [
                {"id": 1, "address": "127.0.0.1:9292", "alive": true},
                {"id": 2, "address": "127.0.0.1:9293", "alive": false},
            ], "under_replicated": [
                {"topic": "t", "partition": 1, "leader": 1, "replicas": [2, 1], "in_sync": [1]},
            ]})
        );
        assert_eq!(
            status_table(&s),
            "ID  ADDRESS         ALIVE  ROLE\n\
             1   127.0.0.1:9292  yes    metadata leader\n\
             2   127.0.0.1:9293  no     -\n\
             1 under-replicated partition(s):\n\
             TOPIC  PARTITION  LEADER  REPLICAS  IN_SYNC\n\
             t      1          1       2,1       1\n"
        );
    }
}
