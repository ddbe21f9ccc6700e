//! `keel cluster status`.

use anyhow::Result;
use clap::{Args, Subcommand};
use keel_client::DescribeClusterResponse;
use serde::Serialize;

use crate::common::{ClientOpts, connect, explain};
use crate::output::{OutputOpts, print_json, print_text, table};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the brokers (id, address, alive) and which one leads the cluster metadata.
    Status(StatusArgs),
    /// Move every partition replica off a broker so that it can be removed.
    Decommission(DecommissionArgs),
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
}

#[derive(Debug, Serialize)]
struct BrokerJson {
    id: u32,
    address: String,
    alive: bool,
}

fn status_json(c: &DescribeClusterResponse) -> StatusJson {
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
    }
}

fn status_table(s: &StatusJson) -> String {
    let rows: Vec<Vec<String>> = s
        .brokers
        .iter()
        .map(|b| {
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
        })
        .collect();
    let mut out = table(&["ID", "ADDRESS", "ALIVE", "ROLE"], &rows);
    if s.metadata_leader.is_none() {
        out.push_str("No metadata leader right now (an election is running).\n");
    }
    out
}

pub async fn run(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Status(a) => {
            let client = connect(&a.client).await?;
            let c = client
                .admin()
                .describe_cluster()
                .await
                .map_err(|e| explain(e, None))?;
            let s = status_json(&c);
            if a.output.json() {
                print_json(&s)
            } else {
                print_text(&status_table(&s))
            }
        }
        ClusterCommand::Decommission(a) => {
            let client = connect(&a.client).await?;
            let moved = client
                .admin()
                .decommission_broker(a.broker_id)
                .await
                .map_err(|e| explain(e, None))?;
            print_text(&format!(
                "Broker {} is being emptied: {} partition replica(s) moving ({})\n",
                a.broker_id,
                moved.len(),
                moved.join(", ")
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
        let s = status_json(&c);
        assert_eq!(
            serde_json::to_value(&s).expect("json"),
            serde_json::json!({"metadata_leader": 1, "brokers": [
                {"id": 1, "address": "127.0.0.1:9292", "alive": true},
                {"id": 2, "address": "127.0.0.1:9293", "alive": false},
            ]})
        );
        assert_eq!(
            status_table(&s),
            "ID  ADDRESS         ALIVE  ROLE\n\
             1   127.0.0.1:9292  yes    metadata leader\n\
             2   127.0.0.1:9293  no     -\n"
        );
    }
}
