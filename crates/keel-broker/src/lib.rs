//! Keel's broker: topics of partitions served over gRPC, plus a Prometheus/health HTTP port.
//! Every broker is a member of a cluster (a cluster of one when started alone): a metadata
//! Raft group holds the catalogue and each partition replica is a member of its own Raft group
//! whose log is the partition's `keel_log::Log`.

pub mod cluster;
mod conn;
pub mod coordinator;
pub mod error;
pub mod groups;
mod http;
mod legacy;
pub mod metadata;
pub mod partition;
pub mod registry;
mod server;
pub mod service;
pub mod state;
pub mod storage_identity;
pub mod topic_config;

pub use error::BrokerError;
pub use server::{BrokerConfig, BrokerHandle, start};
pub use state::Limits;
