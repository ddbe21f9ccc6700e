//! Topics and their partitions on this broker, as the reconciler last built them from the
//! cluster metadata.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use keel_types::validate_topic_name;

use crate::error::{BrokerError, Result};
use crate::metadata::TopicMeta;
use crate::partition::Partition;
use crate::topic_config::Resolved;

/// Upper bound on partitions per topic.
pub const MAX_PARTITIONS: u32 = 10_000;

#[derive(Debug)]
pub struct Topic {
    pub meta: TopicMeta,
    pub config: Resolved,
    /// This broker's replica of each partition (`None`: hosted elsewhere).
    pub partitions: Vec<Option<Arc<Partition>>>,
    /// Where each partition lives, as the cluster metadata says.
    pub placement: Vec<Placement>,
    /// The partition keyless records without an explicit partition go to.
    sticky: AtomicU32,
}

/// A partition's replicas and its last reported leader.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub replicas: Vec<u32>,
    pub leader: Option<(u32, String)>,
    pub in_sync: Vec<u32>,
}

impl Topic {
    pub fn new(
        meta: TopicMeta,
        config: Resolved,
        partitions: Vec<Option<Arc<Partition>>>,
        placement: Vec<Placement>,
    ) -> Self {
        Self {
            meta,
            config,
            partitions,
            placement,
            sticky: AtomicU32::new(0),
        }
    }

    pub fn partition_count(&self) -> u32 {
        self.placement.len() as u32
    }

    /// The error for a request naming partition `id`, which this topic does not have.
    pub fn unknown_partition(&self, id: u32) -> BrokerError {
        BrokerError::UnknownPartition {
            topic: self.meta.name.clone(),
            partition: id,
            count: self.partition_count(),
        }
    }

    /// This broker's replica of partition `id`, if it may serve produce and fetch requests
    /// for it (it leads it); NOT_LEADER with the best known leader otherwise.
    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>> {
        let Some(slot) = self.partitions.get(id as usize) else {
            return Err(self.unknown_partition(id));
        };
        let hint = self
            .placement
            .get(id as usize)
            .and_then(|p| p.leader.clone());
        match slot {
            Some(p) => {
                p.ensure_leader(hint)?;
                Ok(p)
            }
            None => Err(BrokerError::NotLeader {
                topic: self.meta.name.clone(),
                partition: id,
                leader: hint,
            }),
        }
    }

    /// This broker's replicas of the topic's partitions.
    pub fn local_partitions(&self) -> impl Iterator<Item = &Arc<Partition>> {
        self.partitions.iter().flatten()
    }

    /// The sticky partition for keyless records; moves on after each batch that used it.
    pub fn next_sticky(&self) -> u32 {
        let n = self.partition_count().max(1);
        self.sticky.fetch_add(1, Ordering::Relaxed) % n
    }
}

/// Checks a new topic's name.
pub fn validate_create_name(name: &str) -> Result<()> {
    validate_topic_name(name).map_err(|e| BrokerError::invalid("name", e.to_string()))
}

/// A new topic's partition count: 0 means 1, at most [`MAX_PARTITIONS`].
pub fn create_partitions(partitions: u32) -> Result<u32> {
    let partitions = partitions.max(1);
    if partitions > MAX_PARTITIONS {
        return Err(BrokerError::invalid(
            "partitions",
            format!("{partitions} exceeds the limit of {MAX_PARTITIONS}"),
        ));
    }
    Ok(partitions)
}

/// A new topic's replication factor: 0 means as many brokers as there are, at most 3; never
/// more than there are brokers.
pub fn create_replication_factor(requested: u32, live_brokers: u32) -> Result<u32> {
    let rf = if requested == 0 {
        live_brokers.clamp(1, 3)
    } else {
        requested
    };
    if rf > live_brokers {
        return Err(BrokerError::invalid(
            "replication_factor",
            format!("{rf} exceeds the number of live brokers ({live_brokers})"),
        ));
    }
    Ok(rf)
}

/// The topics of this broker.
#[derive(Debug, Default)]
pub struct Registry {
    topics: RwLock<HashMap<String, Arc<Topic>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))
    }

    /// Looks a topic up after checking the name's syntax (so bad names get INVALID_ARGUMENT
    /// naming the request `field`).
    pub fn lookup(&self, field: &'static str, name: &str) -> Result<Arc<Topic>> {
        validate_topic_name(name).map_err(|e| BrokerError::invalid(field, e.to_string()))?;
        self.get(name)
    }

    pub fn list(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<Arc<Topic>> = self
            .topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        v
    }

    /// Every partition of every topic.
    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.list()
            .iter()
            .flat_map(|t| t.local_partitions().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Replaces the whole topic table (from the metadata state).
    pub fn replace_all(&self, topics: HashMap<String, Arc<Topic>>) {
        *self
            .topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = topics;
    }
}
