//! Keel's broker: topics of partitions (each a `keel_log::Log`) served over gRPC, plus a
//! Prometheus/health HTTP port. Single-node until the [cluster] issue puts each partition under
//! Raft; every request and response already carries what the cluster needs (leaders, acks, high
//! watermarks, broker ids).

pub mod cluster;
mod conn;
pub mod error;
pub mod groups;
mod http;
pub mod metadata;
pub mod partition;
pub mod registry;
mod server;
pub mod service;
pub mod state;
pub mod topic_config;

pub use error::BrokerError;
pub use server::{BrokerConfig, BrokerHandle, start};
pub use state::Limits;
