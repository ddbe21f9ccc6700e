//! What the coordinator needs from the rest of the broker, and nothing more: the topic table,
//! where brokers are, and the two metadata operations on the offsets topic. The services'
//! handle on the broker state implements it; the coordinator never sees that state, so the
//! dependency points one way.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use crate::error::Result;
use crate::registry::{Registry, Topic};

/// Cloned into the sweep's background task, so a cheap handle (an `Arc`).
pub trait OffsetsHost: Clone + Send + Sync {
    /// This broker's topics and its replicas of their partitions.
    fn registry(&self) -> &Registry;
    /// This broker's id and client address (the answer to "who coordinates").
    fn broker(&self) -> (u32, String);
    /// Where broker `id` is reached by other brokers (its peer address), if known.
    fn peer_address(&self, id: u32) -> Option<String>;
    /// Creates a topic with the default replication factor (TOPIC_EXISTS if another broker
    /// created it first).
    fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        config: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Arc<Topic>>> + Send;
    /// Lets a partition's records below `before` be deleted on every replica.
    fn delete_records_before(
        &self,
        name: &str,
        partition: u32,
        before: u64,
    ) -> impl Future<Output = Result<()>> + Send;
}
