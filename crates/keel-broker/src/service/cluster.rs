use keel_proto::v1::cluster_service_server::ClusterService;
use keel_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::state::Shared;

#[derive(Debug, Clone)]
pub struct Cluster(pub Shared);

#[tonic::async_trait]
impl ClusterService for Cluster {
    async fn describe_cluster(
        &self,
        _req: Request<DescribeClusterRequest>,
    ) -> Result<Response<DescribeClusterResponse>, Status> {
        Ok(Response::new(DescribeClusterResponse {
            metadata_leader: self.0.metadata_leader(),
            brokers: self.0.brokers().await,
            broker_id: self.0.id,
        }))
    }

    async fn metadata(
        &self,
        req: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        let r = req.into_inner();
        let topics = if r.topics.is_empty() {
            self.0
                .registry
                .list()
                .iter()
                .map(|t| self.0.topic_info(t))
                .collect()
        } else {
            let mut out = Vec::with_capacity(r.topics.len().min(1024));
            for name in &r.topics {
                let topic = self.0.registry.lookup("topics", name)?;
                out.push(self.0.topic_info(&topic));
            }
            out
        };
        Ok(Response::new(MetadataResponse {
            brokers: self.0.known_brokers(),
            topics,
        }))
    }

    async fn decommission_broker(
        &self,
        req: Request<DecommissionBrokerRequest>,
    ) -> Result<Response<DecommissionBrokerResponse>, Status> {
        let moved = self.0.decommission(req.into_inner().broker_id).await?;
        Ok(Response::new(DecommissionBrokerResponse { moved }))
    }

    async fn replace_broker(
        &self,
        req: Request<ReplaceBrokerRequest>,
    ) -> Result<Response<ReplaceBrokerResponse>, Status> {
        let partitions = self.0.replace_broker(req.into_inner().broker_id).await?;
        Ok(Response::new(ReplaceBrokerResponse { partitions }))
    }
}
