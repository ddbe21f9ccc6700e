//! Topic administration. Any broker answers; the client retries on another broker when one is
//! down, but repeats a topic change only when the broker said it had no effect.

use std::collections::BTreeMap;

use keel_proto::v1::admin_service_client::AdminServiceClient;
use keel_proto::v1::{
    AddPartitionsRequest, AlterTopicConfigRequest, CreateTopicRequest, DecommissionBrokerRequest,
    DeleteTopicRequest, DescribeClusterRequest, DescribeClusterResponse, DescribeTopicRequest,
    ListTopicsRequest, ReassignPartitionRequest, TopicInfo,
};
use tonic::transport::Channel;

use crate::client::{Client, cluster_rpc, with_timeout};
use crate::error::{ClientError, Result};

/// Admin operations, from [`Client::admin`].
#[derive(Debug, Clone)]
pub struct Admin {
    pub(crate) client: Client,
}

fn admin_rpc(ch: Channel, max: usize) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(ch)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

fn topic_of(t: Option<TopicInfo>, op: &str) -> Result<TopicInfo> {
    t.ok_or_else(|| ClientError::Protocol(format!("{op} response has no topic")))
}

impl Admin {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    fn max(&self) -> usize {
        self.client.inner.config.max_message_size
    }

    /// Creates a topic. `partitions` or `replication_factor` 0 mean the broker's default.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        configs: BTreeMap<String, String>,
    ) -> Result<TopicInfo> {
        let max = self.max();
        let req = CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            replication_factor,
            config: configs.into_iter().collect(),
        };
        let resp = self
            .client
            .call_any(false, |ch, t| {
                let req = req.clone();
                async move { admin_rpc(ch, max).create_topic(with_timeout(req, t)).await }
            })
            .await?;
        self.topics_changed().await;
        topic_of(resp.topic, "CreateTopic")
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let max = self.max();
        self.client
            .call_any(false, |ch, t| {
                let req = DeleteTopicRequest {
                    name: name.to_owned(),
                };
                async move { admin_rpc(ch, max).delete_topic(with_timeout(req, t)).await }
            })
            .await?;
        self.topics_changed().await;
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let max = self.max();
        let resp = self
            .client
            .call_any(true, |ch, t| async move {
                admin_rpc(ch, max)
                    .list_topics(with_timeout(ListTopicsRequest {}, t))
                    .await
            })
            .await?;
        Ok(resp.topics)
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let max = self.max();
        let resp = self
            .client
            .call_any(true, |ch, t| {
                let req = DescribeTopicRequest {
                    name: name.to_owned(),
                };
                async move {
                    admin_rpc(ch, max)
                        .describe_topic(with_timeout(req, t))
                        .await
                }
            })
            .await?;
        topic_of(resp.topic, "DescribeTopic")
    }

    /// Sets the keys in `set` and resets the keys in `remove` to their defaults.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<TopicInfo> {
        let max = self.max();
        let req = AlterTopicConfigRequest {
            name: name.to_owned(),
            set: set.into_iter().collect(),
            remove,
        };
        // Setting a config to a value is idempotent, so a retry after an ambiguous failure is
        // harmless.
        let resp = self
            .client
            .call_any(true, |ch, t| {
                let req = req.clone();
                async move {
                    admin_rpc(ch, max)
                        .alter_topic_config(with_timeout(req, t))
                        .await
                }
            })
            .await?;
        topic_of(resp.topic, "AlterTopicConfig")
    }

    /// Grows `name` to `total_partitions` partitions.
    pub async fn add_partitions(&self, name: &str, total_partitions: u32) -> Result<TopicInfo> {
        let max = self.max();
        let resp = self
            .client
            .call_any(false, |ch, t| {
                let req = AddPartitionsRequest {
                    name: name.to_owned(),
                    partitions: total_partitions,
                };
                async move {
                    admin_rpc(ch, max)
                        .add_partitions(with_timeout(req, t))
                        .await
                }
            })
            .await?;
        self.topics_changed().await;
        topic_of(resp.topic, "AddPartitions")
    }

    /// Moves partition `partition` of `name` to `replicas` (the first is the preferred leader).
    pub async fn reassign_partition(
        &self,
        name: &str,
        partition: u32,
        replicas: Vec<u32>,
    ) -> Result<TopicInfo> {
        let max = self.max();
        let resp = self
            .client
            .call_any(false, |ch, t| {
                let req = ReassignPartitionRequest {
                    name: name.to_owned(),
                    partition,
                    replicas: replicas.clone(),
                };
                async move {
                    admin_rpc(ch, max)
                        .reassign_partition(with_timeout(req, t))
                        .await
                }
            })
            .await?;
        self.topics_changed().await;
        topic_of(resp.topic, "ReassignPartition")
    }

    /// Moves every replica off broker `id`; returns the partitions moved ("topic/partition").
    pub async fn decommission_broker(&self, id: u32) -> Result<Vec<String>> {
        let max = self.max();
        let resp = self
            .client
            .call_any(false, |ch, t| async move {
                cluster_rpc(ch, max)
                    .decommission_broker(with_timeout(
                        DecommissionBrokerRequest { broker_id: id },
                        t,
                    ))
                    .await
            })
            .await?;
        self.topics_changed().await;
        Ok(resp.moved)
    }

    pub async fn describe_cluster(&self) -> Result<DescribeClusterResponse> {
        let max = self.max();
        self.client
            .call_any(true, |ch, t| async move {
                cluster_rpc(ch, max)
                    .describe_cluster(with_timeout(DescribeClusterRequest {}, t))
                    .await
            })
            .await
    }

    /// Producers and consumers of this client should see the change at once rather than after
    /// an error. A failed refresh is not the caller's problem: the change itself succeeded.
    async fn topics_changed(&self) {
        if let Err(e) = self.client.refresh_metadata().await {
            tracing::debug!(error = %e, "metadata refresh after a topic change failed");
        }
    }
}
