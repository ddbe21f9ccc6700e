//! Topic administration. Any broker answers; the client retries on another broker when one is
//! down, but repeats a topic change only when the broker said it had no effect.

use std::collections::BTreeMap;

use keel_proto::v1::admin_service_client::AdminServiceClient;
use keel_proto::v1::cluster_service_client::ClusterServiceClient;
use keel_proto::v1::{
    AddPartitionsRequest, AlterTopicConfigRequest, CreateTopicRequest, DecommissionBrokerRequest,
    DeleteTopicRequest, DescribeClusterRequest, DescribeClusterResponse, DescribeTopicRequest,
    ListTopicsRequest, ReassignPartitionRequest, ReplaceBrokerRequest, TopicInfo,
};
use tonic::Request;
use tonic::transport::Channel;

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::rpc::Answer;

/// Admin operations, from [`Client::admin`].
#[derive(Debug, Clone)]
pub struct Admin {
    pub(crate) client: Client,
}

/// What an admin request does, which decides how it is retried and what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Reads, or sets something to a value: repeating it is harmless, so ambiguous failures
    /// are retried.
    Idempotent,
    /// Changes topics or partitions: not repeated after an ambiguous failure (it may have taken
    /// effect), and once done this client's producers and consumers see it at once.
    Change,
}

fn topic_of(t: Option<TopicInfo>, op: &str) -> Result<TopicInfo> {
    t.ok_or_else(|| ClientError::Protocol(format!("{op} response has no topic")))
}

impl Admin {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Runs an admin request that any broker answers; `send` picks the method.
    async fn call<Req: Clone, T, Fut: Answer<T>>(
        &self,
        kind: Kind,
        req: Req,
        send: impl Fn(AdminServiceClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<T> {
        let attempt = self.client.attempt(req, send);
        let resp = self
            .client
            .call_any(kind == Kind::Idempotent, attempt)
            .await?;
        if kind == Kind::Change {
            self.topics_changed().await;
        }
        Ok(resp)
    }

    /// Creates a topic. `partitions` or `replication_factor` 0 mean the broker's default.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        configs: BTreeMap<String, String>,
    ) -> Result<TopicInfo> {
        let req = CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            replication_factor,
            config: configs.into_iter().collect(),
        };
        let resp = self
            .call(Kind::Change, req, |mut s, r| async move {
                s.create_topic(r).await
            })
            .await?;
        topic_of(resp.topic, "CreateTopic")
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let req = DeleteTopicRequest {
            name: name.to_owned(),
        };
        self.call(Kind::Change, req, |mut s, r| async move {
            s.delete_topic(r).await
        })
        .await?;
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let resp = self
            .call(
                Kind::Idempotent,
                ListTopicsRequest {},
                |mut s, r| async move { s.list_topics(r).await },
            )
            .await?;
        Ok(resp.topics)
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let req = DescribeTopicRequest {
            name: name.to_owned(),
        };
        let resp = self
            .call(Kind::Idempotent, req, |mut s, r| async move {
                s.describe_topic(r).await
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
        let req = AlterTopicConfigRequest {
            name: name.to_owned(),
            set: set.into_iter().collect(),
            remove,
        };
        // Setting a config to a value is idempotent, so a retry after an ambiguous failure is
        // harmless.
        let resp = self
            .call(Kind::Idempotent, req, |mut s, r| async move {
                s.alter_topic_config(r).await
            })
            .await?;
        topic_of(resp.topic, "AlterTopicConfig")
    }

    /// Grows `name` to `total_partitions` partitions.
    pub async fn add_partitions(&self, name: &str, total_partitions: u32) -> Result<TopicInfo> {
        let req = AddPartitionsRequest {
            name: name.to_owned(),
            partitions: total_partitions,
        };
        let resp = self
            .call(Kind::Change, req, |mut s, r| async move {
                s.add_partitions(r).await
            })
            .await?;
        topic_of(resp.topic, "AddPartitions")
    }

    /// Moves partition `partition` of `name` to `replicas` (the first is the preferred leader).
    pub async fn reassign_partition(
        &self,
        name: &str,
        partition: u32,
        replicas: Vec<u32>,
    ) -> Result<TopicInfo> {
        let req = ReassignPartitionRequest {
            name: name.to_owned(),
            partition,
            replicas,
        };
        let resp = self
            .call(Kind::Change, req, |mut s, r| async move {
                s.reassign_partition(r).await
            })
            .await?;
        topic_of(resp.topic, "ReassignPartition")
    }

    /// Moves every replica off broker `id`; returns the partitions moved ("topic/partition").
    pub async fn decommission_broker(&self, id: u32) -> Result<Vec<String>> {
        let req = DecommissionBrokerRequest { broker_id: id };
        let attempt = self
            .client
            .attempt(req, |mut s: ClusterServiceClient<Channel>, r| async move {
                s.decommission_broker(r).await
            });
        let resp = self.client.call_any(false, attempt).await?;
        self.topics_changed().await;
        Ok(resp.moved)
    }

    /// Replaces broker `id`, whose data directory was lost: the cluster rebuilds its replicas
    /// once it is started on its new directory. Returns the partitions rebuilt
    /// ("topic/partition").
    pub async fn replace_broker(&self, id: u32) -> Result<Vec<String>> {
        let req = ReplaceBrokerRequest { broker_id: id };
        let attempt = self
            .client
            .attempt(req, |mut s: ClusterServiceClient<Channel>, r| async move {
                s.replace_broker(r).await
            });
        Ok(self.client.call_any(false, attempt).await?.partitions)
    }

    pub async fn describe_cluster(&self) -> Result<DescribeClusterResponse> {
        let attempt = self.client.attempt(
            DescribeClusterRequest {},
            |mut s: ClusterServiceClient<Channel>, r| async move { s.describe_cluster(r).await },
        );
        self.client.call_any(true, attempt).await
    }

    /// Producers and consumers of this client should see the change at once rather than after
    /// an error. A failed refresh is not the caller's problem: the change itself succeeded.
    async fn topics_changed(&self) {
        if let Err(e) = self.client.refresh_metadata().await {
            tracing::debug!(error = %e, "metadata refresh after a topic change failed");
        }
    }
}
