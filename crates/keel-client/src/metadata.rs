//! The routing cache: which broker leads each partition, and where brokers are. Pure data; the
//! client fills it from `ClusterService.Metadata` and corrects it from leader hints.

use std::collections::HashMap;
use std::time::Instant;

use keel_proto::v1::MetadataResponse;

use crate::error::LeaderHint;

/// Result of looking up where to send a partition's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Leader {
        id: u32,
        address: String,
    },
    /// The partition exists but has no leader right now (election), or its leader's address is
    /// unknown.
    NoLeader,
    UnknownPartition {
        count: u32,
    },
    UnknownTopic,
}

#[derive(Debug, Default)]
pub(crate) struct MetadataCache {
    brokers: HashMap<u32, String>,
    /// Leader broker id per partition, 0 when leaderless.
    topics: HashMap<String, Vec<u32>>,
    /// Bumped on every full refresh, so concurrent refreshers can tell they were beaten to it.
    pub(crate) generation: u64,
    pub(crate) refreshed_at: Option<Instant>,
}

impl MetadataCache {
    /// Replaces the cache with a full answer (all topics).
    pub(crate) fn apply(&mut self, resp: &MetadataResponse, now: Instant) {
        self.brokers = resp
            .brokers
            .iter()
            .filter(|b| !b.address.is_empty())
            .map(|b| (b.id, b.address.clone()))
            .collect();
        self.topics = resp
            .topics
            .iter()
            .map(|t| {
                // Partitions are numbered densely from 0, so the count is the list's length;
                // sizing by the largest number would let one bad entry allocate gigabytes.
                let mut leaders = vec![0; t.partitions.len()];
                for p in &t.partitions {
                    if let Some(l) = leaders.get_mut(p.partition as usize) {
                        *l = p.leader;
                    }
                }
                (t.name.clone(), leaders)
            })
            .collect();
        self.generation += 1;
        self.refreshed_at = Some(now);
    }

    pub(crate) fn partition_count(&self, topic: &str) -> Option<u32> {
        self.topics.get(topic).map(|p| p.len() as u32)
    }

    pub(crate) fn route(&self, topic: &str, partition: u32) -> Route {
        let Some(leaders) = self.topics.get(topic) else {
            return Route::UnknownTopic;
        };
        match leaders.get(partition as usize) {
            None => Route::UnknownPartition {
                count: leaders.len() as u32,
            },
            Some(0) => Route::NoLeader,
            Some(&id) => match self.brokers.get(&id) {
                Some(address) => Route::Leader {
                    id,
                    address: address.clone(),
                },
                None => Route::NoLeader,
            },
        }
    }

    pub(crate) fn has_leader(&self, topic: &str, partition: u32) -> bool {
        matches!(self.route(topic, partition), Route::Leader { .. })
    }

    /// Believes a broker's `NOT_LEADER` hint until the next refresh: the hint is at least as fresh
    /// as the cache, and following it saves a metadata round trip during a leader change.
    pub(crate) fn apply_hint(&mut self, topic: &str, partition: u32, hint: &LeaderHint) {
        if let Some(addr) = &hint.address {
            self.brokers.insert(hint.id, addr.clone());
        }
        if let Some(l) = self
            .topics
            .get_mut(topic)
            .and_then(|p| p.get_mut(partition as usize))
        {
            *l = hint.id;
        }
    }

    /// Marks a partition leaderless, so its next request waits for a refresh instead of going
    /// back to a broker that just refused it.
    pub(crate) fn forget_leader(&mut self, topic: &str, partition: u32) {
        if let Some(l) = self
            .topics
            .get_mut(topic)
            .and_then(|p| p.get_mut(partition as usize))
        {
            *l = 0;
        }
    }

    pub(crate) fn broker_addresses(&self) -> Vec<String> {
        let mut ids: Vec<_> = self.brokers.iter().collect();
        ids.sort();
        ids.into_iter().map(|(_, a)| a.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use keel_proto::v1::{BrokerInfo, PartitionInfo, TopicInfo};

    use super::*;

    fn resp() -> MetadataResponse {
        MetadataResponse {
            brokers: vec![
                BrokerInfo {
                    id: 1,
                    address: "a:1".into(),
                    alive: true,
                },
                BrokerInfo {
                    id: 2,
                    address: "a:2".into(),
                    alive: true,
                },
            ],
            topics: vec![TopicInfo {
                name: "t".into(),
                partitions: vec![
                    PartitionInfo {
                        partition: 0,
                        leader: 1,
                        ..Default::default()
                    },
                    PartitionInfo {
                        partition: 1,
                        leader: 0,
                        ..Default::default()
                    },
                    PartitionInfo {
                        partition: 2,
                        leader: 9,
                        ..Default::default()
                    },
                ],
                config: Default::default(),
            }],
        }
    }

    #[test]
    fn routes() {
        let mut m = MetadataCache::default();
        m.apply(&resp(), Instant::now());
        assert_eq!(m.generation, 1);
        assert_eq!(m.partition_count("t"), Some(3));
        assert_eq!(
            m.route("t", 0),
            Route::Leader {
                id: 1,
                address: "a:1".into()
            }
        );
        assert_eq!(m.route("t", 1), Route::NoLeader);
        // Leader id without a known address.
        assert_eq!(m.route("t", 2), Route::NoLeader);
        assert_eq!(m.route("t", 3), Route::UnknownPartition { count: 3 });
        assert_eq!(m.route("u", 0), Route::UnknownTopic);
    }

    #[test]
    fn hints_override_until_refresh() {
        let mut m = MetadataCache::default();
        m.apply(&resp(), Instant::now());
        m.apply_hint(
            "t",
            0,
            &LeaderHint {
                id: 3,
                address: Some("a:3".into()),
            },
        );
        assert_eq!(
            m.route("t", 0),
            Route::Leader {
                id: 3,
                address: "a:3".into()
            }
        );
        m.apply_hint(
            "t",
            1,
            &LeaderHint {
                id: 2,
                address: None,
            },
        );
        assert_eq!(
            m.route("t", 1),
            Route::Leader {
                id: 2,
                address: "a:2".into()
            }
        );
        m.forget_leader("t", 1);
        assert_eq!(m.route("t", 1), Route::NoLeader);
        m.apply(&resp(), Instant::now());
        assert_eq!(
            m.route("t", 0),
            Route::Leader {
                id: 1,
                address: "a:1".into()
            }
        );
    }
}
