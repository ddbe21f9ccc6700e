use std::collections::BTreeMap;

use keel_proto::v1::admin_service_server::AdminService;
use keel_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::error::BrokerError;
use crate::groups::OFFSETS_TOPIC;
use crate::state::Shared;

#[derive(Debug, Clone)]
pub struct Admin(pub Shared);

/// The offsets topic is created and configured by the brokers: more partitions would move
/// groups away from their offsets, and retention would delete commits.
fn not_internal(field: &'static str, name: &str) -> Result<(), BrokerError> {
    if name == OFFSETS_TOPIC {
        return Err(BrokerError::invalid(
            field,
            "__consumer_offsets is internal: the brokers create and configure it",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl AdminService for Admin {
    #[tracing::instrument(level = "debug", skip_all, fields(topic = %req.get_ref().name))]
    async fn create_topic(
        &self,
        req: Request<CreateTopicRequest>,
    ) -> Result<Response<CreateTopicResponse>, Status> {
        let r = req.into_inner();
        not_internal("name", &r.name)?;
        let config: BTreeMap<String, String> = r.config.into_iter().collect();
        let topic = self
            .0
            .create_topic(&r.name, r.partitions, r.replication_factor, &config)
            .await?;
        Ok(Response::new(CreateTopicResponse {
            topic: Some(self.0.topic_info(&topic)),
        }))
    }

    async fn delete_topic(
        &self,
        req: Request<DeleteTopicRequest>,
    ) -> Result<Response<DeleteTopicResponse>, Status> {
        self.0.delete_topic(&req.into_inner().name).await?;
        Ok(Response::new(DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _req: Request<ListTopicsRequest>,
    ) -> Result<Response<ListTopicsResponse>, Status> {
        let topics = self
            .0
            .registry
            .list()
            .iter()
            .map(|t| self.0.topic_info(t))
            .collect();
        Ok(Response::new(ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        req: Request<DescribeTopicRequest>,
    ) -> Result<Response<DescribeTopicResponse>, Status> {
        let topic = self.0.registry.lookup("name", &req.into_inner().name)?;
        Ok(Response::new(DescribeTopicResponse {
            topic: Some(self.0.topic_info(&topic)),
        }))
    }

    async fn alter_topic_config(
        &self,
        req: Request<AlterTopicConfigRequest>,
    ) -> Result<Response<AlterTopicConfigResponse>, Status> {
        let r = req.into_inner();
        not_internal("name", &r.name)?;
        let set: BTreeMap<String, String> = r.set.into_iter().collect();
        let topic = self.0.alter_config(&r.name, &set, &r.remove).await?;
        Ok(Response::new(AlterTopicConfigResponse {
            topic: Some(self.0.topic_info(&topic)),
        }))
    }

    async fn add_partitions(
        &self,
        req: Request<AddPartitionsRequest>,
    ) -> Result<Response<AddPartitionsResponse>, Status> {
        let r = req.into_inner();
        not_internal("name", &r.name)?;
        let topic = self.0.add_partitions(&r.name, r.partitions).await?;
        Ok(Response::new(AddPartitionsResponse {
            topic: Some(self.0.topic_info(&topic)),
        }))
    }

    async fn reassign_partition(
        &self,
        req: Request<ReassignPartitionRequest>,
    ) -> Result<Response<ReassignPartitionResponse>, Status> {
        let r = req.into_inner();
        let topic = self.0.reassign(&r.name, r.partition, r.replicas).await?;
        Ok(Response::new(ReassignPartitionResponse {
            topic: Some(self.0.topic_info(&topic)),
        }))
    }
}
