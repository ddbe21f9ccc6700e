//! Consumer-group partition assignment for a broker-driven, incremental group protocol (in the
//! style of Kafka's KIP-848).
//!
//! The broker, not an elected client, computes the assignment: it already knows every member's
//! subscription and every topic's partition count, so it can compute a *target* on each change
//! ([`assign()`]) and then walk each member toward it one heartbeat at a time ([`GroupState`]),
//! never handing a partition to a member before the previous owner has confirmed giving it up.
//!
//! Everything here is plain data and pure functions, without IO or async, so that the rules can
//! be unit- and property-tested in isolation and the state persisted as JSON by the coordinator
//! (`crate::coordinator`, the IO shell that reads and writes the offsets topic) that owns it.

pub mod assign;
pub mod live;
pub mod offsets;
pub mod offsets_topic;
pub mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use assign::assign;
pub use offsets::{CommitError, Committed, OffsetsRecord, OffsetsState};
pub use offsets_topic::{OFFSETS_PARTITIONS, OFFSETS_TOPIC, shard_of};
pub use reconcile::{GroupError, GroupState, Heartbeat, MemberState, Step, next_step};

/// The unit of assignment. Ordered by topic, then partition, so every iteration over sets of
/// these (and thus every assignment computed from them) is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

/// Kafka's `topic-partition` form, so logs read the same as a Kafka operator expects.
impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// A member as the assignors need it. Subscriptions are already resolved to topic names (a regex
/// subscription is expanded by the caller), so assignment never depends on what topics exist
/// beyond the partition counts it is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    pub member_id: String,
    /// `group.instance.id` of a static member. A static member that restarts comes back with a
    /// new member id but the same instance id, so the range and round-robin orders sort on it
    /// (as Kafka does) to give the restarted member the same partitions as before.
    pub instance_id: Option<String>,
    pub subscribed: BTreeSet<String>,
}

impl MemberSpec {
    pub fn new<T: Into<String>>(
        member_id: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        Self {
            member_id: member_id.into(),
            instance_id: None,
            subscribed: topics.into_iter().map(Into::into).collect(),
        }
    }

    pub fn with_instance_id(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }
}

/// Member id to the partitions it is assigned. A map keyed by member id (rather than a list) so it
/// serializes as a JSON object and lookups by the heartbeating member are direct.
pub type Assignment = BTreeMap<String, BTreeSet<TopicPartition>>;

/// How [`assign()`] spreads partitions. Named as Kafka's clients name their assignors, so a
/// consumer's `partition.assignment.strategy` maps onto one directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Contiguous ranges per topic: co-partitioned topics land on the same member, which joins
    /// and stream-table lookups rely on.
    Range,
    /// Partitions dealt one at a time: the most even spread, at the cost of moving almost
    /// everything on every membership change.
    RoundRobin,
    /// Even spread that keeps partitions where they are: the default because every partition
    /// that moves pauses consumption while its offsets and caches change hands.
    #[default]
    Sticky,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::Range, Strategy::RoundRobin, Strategy::Sticky];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Range => "range",
            Strategy::RoundRobin => "roundrobin",
            Strategy::Sticky => "sticky",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Partitions grouped by topic, as the API lists them.
pub fn by_topic<'a>(
    tps: impl IntoIterator<Item = &'a TopicPartition>,
) -> BTreeMap<String, BTreeSet<u32>> {
    let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for tp in tps {
        out.entry(tp.topic.clone())
            .or_default()
            .insert(tp.partition);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown assignment strategy {0:?} (expected range, roundrobin or sticky)")]
pub struct UnknownStrategy(pub String);

/// Case-insensitive because the name comes from client configuration, where Kafka is lenient too.
impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip() {
        for st in Strategy::ALL {
            assert_eq!(st.to_string().parse::<Strategy>(), Ok(st));
            let json = serde_json::to_string(&st).expect("serialize");
            assert_eq!(json, format!("\"{st}\""));
            assert_eq!(
                serde_json::from_str::<Strategy>(&json).expect("deserialize"),
                st
            );
        }
        assert_eq!("RoundRobin".parse::<Strategy>(), Ok(Strategy::RoundRobin));
        assert_eq!(" sticky ".parse::<Strategy>(), Ok(Strategy::Sticky));
        assert!("uniform".parse::<Strategy>().is_err());
        assert!("".parse::<Strategy>().is_err());
        assert_eq!(Strategy::default(), Strategy::Sticky);
    }

    #[test]
    fn data_types_round_trip_as_json() {
        let member = MemberSpec::new("m1", ["a", "b"]).with_instance_id("i1");
        let json = serde_json::to_string(&member).expect("serialize");
        assert_eq!(
            serde_json::from_str::<MemberSpec>(&json).expect("deserialize"),
            member
        );

        let mut assignment = Assignment::new();
        assignment.insert(
            "m1".into(),
            [TopicPartition::new("a", 0), TopicPartition::new("b", 3)].into(),
        );
        assignment.insert("m2".into(), BTreeSet::new());
        let json = serde_json::to_string(&assignment).expect("serialize");
        assert_eq!(
            serde_json::from_str::<Assignment>(&json).expect("deserialize"),
            assignment
        );
    }

    #[test]
    fn topic_partition_orders_by_topic_then_partition() {
        let mut v = [
            TopicPartition::new("b", 0),
            TopicPartition::new("a", 10),
            TopicPartition::new("a", 2),
        ];
        v.sort();
        let shown: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["a-2", "a-10", "b-0"]);
    }

    #[test]
    fn by_topic_groups_partitions_under_their_topic() {
        let tps = [
            TopicPartition::new("b", 1),
            TopicPartition::new("a", 3),
            TopicPartition::new("b", 0),
            TopicPartition::new("a", 3),
        ];
        let grouped = by_topic(&tps);
        assert_eq!(grouped.len(), 2);
        assert_eq!(grouped["a"], BTreeSet::from([3]));
        assert_eq!(grouped["b"], BTreeSet::from([0, 1]));
        assert!(by_topic(&[]).is_empty());
    }
}
