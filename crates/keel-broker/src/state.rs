//! State shared by the gRPC services.

use std::sync::Arc;

use keel_proto::v1::{BrokerInfo, PartitionInfo, TopicInfo};
use tokio::sync::watch;

use crate::registry::{Registry, Topic};

/// Request limits, enforced before anything is allocated from a request's claims.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest gRPC message the broker decodes.
    pub max_request_bytes: usize,
    /// Largest response a fetch or subscription message may carry (plus one batch).
    pub max_fetch_bytes: u32,
    pub default_fetch_bytes: u32,
    pub max_wait_ms: u32,
    pub max_batches_per_request: usize,
    pub max_records_per_batch: u32,
    pub max_fetch_partitions: usize,
    pub max_produce_timeout_ms: u32,
    /// Produce requests a ProduceStream may have in flight before the broker stops reading it.
    pub max_in_flight_per_stream: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 16 << 20,
            max_fetch_bytes: 16 << 20,
            default_fetch_bytes: 1 << 20,
            max_wait_ms: 60_000,
            max_batches_per_request: 10_000,
            max_records_per_batch: 1_000_000,
            max_fetch_partitions: 10_000,
            max_produce_timeout_ms: 300_000,
            max_in_flight_per_stream: 256,
        }
    }
}

#[derive(Debug)]
pub struct BrokerState {
    pub id: u32,
    pub advertise: String,
    pub registry: Registry,
    pub limits: Limits,
    pub shutdown: watch::Receiver<bool>,
}

impl BrokerState {
    pub fn brokers(&self) -> Vec<BrokerInfo> {
        vec![BrokerInfo {
            id: self.id,
            address: self.advertise.clone(),
            alive: true,
        }]
    }

    pub fn live_brokers(&self) -> u32 {
        1
    }

    pub fn topic_info(&self, topic: &Topic) -> TopicInfo {
        TopicInfo {
            name: topic.meta.name.clone(),
            partitions: topic
                .partitions
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.id,
                    leader: self.id,
                    replicas: vec![self.id],
                    in_sync: vec![self.id],
                    log_start_offset: p.log_start_offset(),
                    log_end_offset: p.log().log_end_offset(),
                    high_watermark: p.high_watermark(),
                })
                .collect(),
            config: topic.meta.config.effective().into_iter().collect(),
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

pub type Shared = Arc<BrokerState>;
