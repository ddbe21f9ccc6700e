//! Committed offsets as the group coordinator will keep them: the records it writes to its
//! partition of the internal offsets topic, and the state they fold into.
//!
//! The offsets topic is an ordinary replicated partition, so commits are as durable as records
//! and a new coordinator (the partition's new leader) rebuilds this state by folding the
//! partition's log from its start ([`OffsetsState::apply`]). Folding is deterministic and
//! idempotent per record, so every replica that folds the same log agrees.
//!
//! The log must not grow without bound: [`OffsetsState::compacted`] is the shortest list of
//! records that folds into the current state; the coordinator writes it as one batch and then
//! lets retention delete everything before it (the Raft retention snapshot of the [cluster]
//! issue), so the log holds at most one compacted image plus the commits since.
//!
//! Invariant 5 of the brief ("a group's committed offsets never move backwards except by an
//! explicit reset") is enforced twice: [`OffsetsState::check_commit`] refuses such a commit
//! before it is written, and `apply` ignores one that is in the log anyway (written by a
//! coordinator that had not yet folded a newer commit), so no replica ever moves backwards.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::TopicPartition;

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The next offset to consume (Kafka's convention).
    pub offset: u64,
    /// Free-form text the committer attached.
    pub metadata: String,
    /// When it was committed (the coordinator's clock), for expiry of empty groups.
    pub committed_at_ms: i64,
}

/// A record of the offsets topic. The partition is chosen by the group id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OffsetsRecord {
    /// A member's commit (already checked against fencing and against moving backwards).
    Commit {
        group: String,
        partition: TopicPartition,
        offset: u64,
        metadata: String,
        committed_at_ms: i64,
    },
    /// An operator's reset (`keel group reset-offsets`): may move offsets backwards.
    Reset {
        group: String,
        offsets: Vec<(TopicPartition, u64)>,
        at_ms: i64,
    },
    /// Deletes a group and all its offsets (`keel group delete`, or expiry).
    DeleteGroup { group: String },
}

impl OffsetsRecord {
    /// The group the record belongs to (it decides the offsets-topic partition).
    pub fn group(&self) -> &str {
        match self {
            Self::Commit { group, .. }
            | Self::Reset { group, .. }
            | Self::DeleteGroup { group } => group,
        }
    }
}

/// Why a commit is refused before it is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error(
        "committing offset {offset} for {partition} would move group {group:?} backwards from {current}; use reset-offsets to rewind"
    )]
    Backwards {
        group: String,
        partition: TopicPartition,
        offset: u64,
        current: u64,
    },
}

/// The committed offsets of every group of one offsets-topic partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetsState {
    groups: BTreeMap<String, BTreeMap<TopicPartition, Committed>>,
}

impl OffsetsState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one record of the log.
    pub fn apply(&mut self, record: &OffsetsRecord) {
        match record {
            OffsetsRecord::Commit {
                group,
                partition,
                offset,
                metadata,
                committed_at_ms,
            } => {
                let offsets = self.groups.entry(group.clone()).or_default();
                match offsets.get_mut(partition) {
                    // Never backwards (see the module docs); an equal offset refreshes the
                    // metadata and the time, which keeps an active group from expiring.
                    Some(c) if *offset < c.offset => {}
                    Some(c) => {
                        c.offset = *offset;
                        c.metadata.clone_from(metadata);
                        c.committed_at_ms = *committed_at_ms;
                    }
                    None => {
                        offsets.insert(
                            partition.clone(),
                            Committed {
                                offset: *offset,
                                metadata: metadata.clone(),
                                committed_at_ms: *committed_at_ms,
                            },
                        );
                    }
                }
            }
            OffsetsRecord::Reset {
                group,
                offsets,
                at_ms,
            } => {
                let g = self.groups.entry(group.clone()).or_default();
                for (p, o) in offsets {
                    g.insert(
                        p.clone(),
                        Committed {
                            offset: *o,
                            metadata: String::new(),
                            committed_at_ms: *at_ms,
                        },
                    );
                }
            }
            OffsetsRecord::DeleteGroup { group } => {
                self.groups.remove(group);
            }
        }
    }

    /// Refuses a commit that would move the group's offset for the partition backwards.
    pub fn check_commit(
        &self,
        group: &str,
        partition: &TopicPartition,
        offset: u64,
    ) -> Result<(), CommitError> {
        match self.committed(group, partition) {
            Some(c) if offset < c.offset => Err(CommitError::Backwards {
                group: group.to_owned(),
                partition: partition.clone(),
                offset,
                current: c.offset,
            }),
            _ => Ok(()),
        }
    }

    pub fn committed(&self, group: &str, partition: &TopicPartition) -> Option<&Committed> {
        self.groups.get(group).and_then(|g| g.get(partition))
    }

    /// Every committed offset of a group, in partition order.
    pub fn group_offsets(&self, group: &str) -> Option<&BTreeMap<TopicPartition, Committed>> {
        self.groups.get(group)
    }

    /// The groups that have committed offsets here.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    /// Groups whose newest commit is older than `retention_ms` before `now_ms` and that have no
    /// members now (`active` says which do): the coordinator deletes them with
    /// [`OffsetsRecord::DeleteGroup`] (Kafka's `offsets.retention.minutes` for empty groups).
    pub fn expired_groups(
        &self,
        now_ms: i64,
        retention_ms: i64,
        active: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        self.groups
            .iter()
            .filter(|(g, offsets)| {
                !active(g)
                    && offsets
                        .values()
                        .map(|c| c.committed_at_ms)
                        .max()
                        .is_none_or(|newest| newest.saturating_add(retention_ms) < now_ms)
            })
            .map(|(g, _)| g.clone())
            .collect()
    }

    /// The shortest list of records that folds into this state: one reset per group (a reset
    /// sets offsets as they are, without the backwards check, and records the commit times as
    /// the newest time of the group, which is all expiry looks at).
    pub fn compacted(&self) -> Vec<OffsetsRecord> {
        let mut out = Vec::new();
        for (group, offsets) in &self.groups {
            // Per commit time, so the image keeps each partition's own time.
            let mut by_time: BTreeMap<i64, Vec<(TopicPartition, u64)>> = BTreeMap::new();
            for (p, c) in offsets {
                by_time
                    .entry(c.committed_at_ms)
                    .or_default()
                    .push((p.clone(), c.offset));
            }
            for (at_ms, offsets) in by_time {
                out.push(OffsetsRecord::Reset {
                    group: group.clone(),
                    offsets,
                    at_ms,
                });
            }
            // Metadata strings survive compaction as commits of the same offset.
            for (p, c) in offsets {
                if !c.metadata.is_empty() {
                    out.push(OffsetsRecord::Commit {
                        group: group.clone(),
                        partition: p.clone(),
                        offset: c.offset,
                        metadata: c.metadata.clone(),
                        committed_at_ms: c.committed_at_ms,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tp(p: u32) -> TopicPartition {
        TopicPartition::new("orders", p)
    }

    fn commit(group: &str, p: u32, offset: u64, at: i64) -> OffsetsRecord {
        OffsetsRecord::Commit {
            group: group.into(),
            partition: tp(p),
            offset,
            metadata: String::new(),
            committed_at_ms: at,
        }
    }

    #[test]
    fn commits_never_move_backwards_except_by_reset() {
        let mut s = OffsetsState::new();
        s.apply(&commit("g", 0, 10, 1));
        assert!(s.check_commit("g", &tp(0), 9).is_err());
        assert!(s.check_commit("g", &tp(0), 10).is_ok());
        // In the log anyway (an older coordinator wrote it): ignored.
        s.apply(&commit("g", 0, 5, 2));
        assert_eq!(s.committed("g", &tp(0)).map(|c| c.offset), Some(10));
        s.apply(&OffsetsRecord::Reset {
            group: "g".into(),
            offsets: vec![(tp(0), 3)],
            at_ms: 3,
        });
        assert_eq!(s.committed("g", &tp(0)).map(|c| c.offset), Some(3));
        s.apply(&OffsetsRecord::DeleteGroup { group: "g".into() });
        assert!(s.group_offsets("g").is_none());
    }

    #[test]
    fn empty_groups_expire_after_retention() {
        let mut s = OffsetsState::new();
        s.apply(&commit("old", 0, 1, 1_000));
        s.apply(&commit("busy", 0, 1, 1_000));
        s.apply(&commit("new", 0, 1, 9_000));
        assert_eq!(
            s.expired_groups(10_000, 5_000, |g| g == "busy"),
            vec!["old".to_owned()]
        );
    }

    #[test]
    fn records_round_trip_as_json() {
        let r = commit("g", 2, 7, 5);
        let json = serde_json::to_string(&r).expect("encode");
        assert!(json.contains("\"type\":\"commit\""), "{json}");
        let back: OffsetsRecord = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, r);
        assert_eq!(back.group(), "g");
    }

    fn record() -> impl Strategy<Value = OffsetsRecord> {
        let group = prop_oneof![Just("a".to_owned()), Just("b".to_owned())];
        prop_oneof![
            6 => (group.clone(), 0u32..3, 0u64..50, 0i64..100, prop_oneof![Just(String::new()), Just("m".to_owned())]).prop_map(
                |(group, p, offset, at, metadata)| OffsetsRecord::Commit {
                    group,
                    partition: tp(p),
                    offset,
                    metadata,
                    committed_at_ms: at,
                }
            ),
            1 => (group.clone(), proptest::collection::vec((0u32..3, 0u64..50), 1..3), 0i64..100).prop_map(
                |(group, offsets, at_ms)| OffsetsRecord::Reset {
                    group,
                    offsets: offsets.into_iter().map(|(p, o)| (tp(p), o)).collect(),
                    at_ms,
                }
            ),
            1 => group.prop_map(|group| OffsetsRecord::DeleteGroup { group }),
        ]
    }

    proptest! {
        /// Folding the compacted image gives the same state, and so does folding the image
        /// followed by the rest of a log, wherever it was cut.
        #[test]
        fn compaction_preserves_the_state(log in proptest::collection::vec(record(), 0..60), cut in 0usize..60) {
            let mut full = OffsetsState::new();
            for r in &log { full.apply(r); }
            let mut image = OffsetsState::new();
            for r in full.compacted() { image.apply(&r); }
            prop_assert_eq!(&image, &full);

            let cut = cut.min(log.len());
            let mut head = OffsetsState::new();
            for r in &log[..cut] { head.apply(r); }
            let mut resumed = OffsetsState::new();
            for r in head.compacted() { resumed.apply(&r); }
            for r in &log[cut..] { resumed.apply(r); }
            prop_assert_eq!(&resumed, &full);
        }

        /// Between resets and deletes, a partition's committed offset never decreases.
        #[test]
        fn offsets_only_move_forward_between_resets(log in proptest::collection::vec(record(), 0..60)) {
            let mut s = OffsetsState::new();
            for r in &log {
                let before = s.clone();
                s.apply(r);
                if let OffsetsRecord::Commit { group, partition, .. } = r {
                    let was = before.committed(group, partition).map(|c| c.offset);
                    let now = s.committed(group, partition).map(|c| c.offset);
                    prop_assert!(now >= was, "{:?} -> {:?}", was, now);
                }
            }
        }
    }
}
