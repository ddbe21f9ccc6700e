//! The group's committed offsets as the coordinator wrote them: its partition of the offsets
//! topic, read from the final leader's files, holds every commit (not a sample of what the
//! coordinator answered now and then), so each member's commit can be looked up in it.
//!
//! - every commit a member was told succeeded is in the log (or in a compacted image that
//!   holds it or a later offset): an acknowledged commit is as durable as an acknowledged
//!   record;
//! - every commit in the log (and every offset of an image) is one a member sent and that was
//!   not refused definitely: a definite refusal means nothing was written.

use std::collections::{BTreeMap, BTreeSet};

use super::Report;
use crate::faults::history::{CommitOutcome, History, MemberEvent, OffsetsEntry};

pub(super) fn logged_commits(h: &History, r: &mut Report) {
    for (group, entries) in &h.offsets_log {
        // What the log says, per partition: the offsets written, and the greatest offset the
        // last image holds (an image means the log before it may be gone).
        let mut written: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
        let mut imaged: BTreeMap<u32, u64> = BTreeMap::new();
        for e in entries {
            match e {
                OffsetsEntry::Commit { partition, offset } => {
                    written.entry(*partition).or_default().insert(*offset);
                }
                OffsetsEntry::Image { offsets } => {
                    for (p, o) in offsets {
                        written.entry(*p).or_default().insert(*o);
                        imaged.insert(*p, *o);
                    }
                }
                OffsetsEntry::Deleted => {
                    r.fail(format!(
                        "group {group} was deleted in the offsets log while it had members"
                    ));
                }
            }
        }
        // What the members sent, per partition and offset: whether any such commit was not
        // refused definitely.
        let mut sent: BTreeMap<(u32, u64), bool> = BTreeMap::new();
        for m in h.members.values().filter(|m| &m.group == group) {
            for e in &m.events {
                let MemberEvent::Committed {
                    offsets,
                    outcome,
                    done,
                    ..
                } = e
                else {
                    continue;
                };
                for (p, o) in offsets {
                    let maybe = sent.entry((*p, *o)).or_default();
                    *maybe |= *outcome != CommitOutcome::Refused;
                    if *outcome != CommitOutcome::Ok {
                        continue;
                    }
                    let in_log = written.get(p).is_some_and(|w| w.contains(o));
                    let behind_image = imaged.get(p).is_some_and(|i| i >= o);
                    if !in_log && !behind_image {
                        r.fail(format!(
                            "group {group}: the commit of {o} for partition {p} acknowledged at {done} µs is not in the offsets log"
                        ));
                    }
                }
            }
        }
        for (p, offsets) in &written {
            for o in offsets {
                match sent.get(&(*p, *o)) {
                    Some(true) => {}
                    Some(false) => r.fail(format!(
                        "group {group}: the offsets log holds {o} for partition {p}, but every commit of it was refused definitely"
                    )),
                    None => r.fail(format!(
                        "group {group}: the offsets log holds {o} for partition {p}, which no member committed"
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use crate::faults::history::{CommitOutcome, History, Member, MemberEvent, OffsetsEntry};

    fn commit(sent: u64, offsets: &[(u32, u64)], outcome: CommitOutcome) -> MemberEvent {
        MemberEvent::Committed {
            sent,
            done: sent + 5,
            offsets: offsets.to_vec(),
            outcome,
        }
    }

    /// m commits 2 (ok), 3 (unknown outcome) and 4 (refused) for partition 0; the log holds
    /// 2 and 3.
    fn with_commits(log: Vec<OffsetsEntry>) -> History {
        let mut h = history();
        h.members.insert(
            "m".into(),
            Member {
                group: "g".into(),
                events: vec![
                    MemberEvent::Assigned {
                        at: 10,
                        partition: 0,
                    },
                    commit(20, &[(0, 2)], CommitOutcome::Ok),
                    commit(30, &[(0, 3)], CommitOutcome::Unknown),
                    commit(40, &[(0, 4)], CommitOutcome::Refused),
                ],
            },
        );
        h.offsets_log.insert("g".into(), log);
        h
    }

    fn c(offset: u64) -> OffsetsEntry {
        OffsetsEntry::Commit {
            partition: 0,
            offset,
        }
    }

    #[test]
    fn a_log_with_what_was_acknowledged_and_what_may_have_landed_passes() {
        let r = super::super::check(&with_commits(vec![c(2), c(3)]));
        assert!(r.ok(), "{r}");
        // The acknowledged commit behind a compacted image that holds a later offset.
        let r = super::super::check(&with_commits(vec![OffsetsEntry::Image {
            offsets: vec![(0, 3)],
        }]));
        assert!(r.ok(), "{r}");
    }

    #[test]
    fn an_acknowledged_commit_missing_from_the_log_is_caught() {
        only_violation(
            &with_commits(vec![c(3)]),
            "the commit of 2 for partition 0 acknowledged at 25 µs is not in the offsets log",
        );
        // An image below it does not excuse it.
        let mut h = with_commits(vec![OffsetsEntry::Image {
            offsets: vec![(0, 1)],
        }]);
        if let Some(m) = h.members.get_mut("m") {
            m.events.insert(1, commit(15, &[(0, 1)], CommitOutcome::Ok));
        }
        only_violation(
            &h,
            "the commit of 2 for partition 0 acknowledged at 25 µs is not in the offsets log",
        );
    }

    #[test]
    fn a_logged_commit_that_was_refused_or_never_sent_is_caught() {
        only_violation(
            &with_commits(vec![c(2), c(4)]),
            "holds 4 for partition 0, but every commit of it was refused definitely",
        );
        only_violation(
            &with_commits(vec![c(2), c(9)]),
            "holds 9 for partition 0, which no member committed",
        );
        only_violation(
            &with_commits(vec![c(2), OffsetsEntry::Deleted]),
            "group g was deleted in the offsets log",
        );
    }

    #[test]
    fn offsets_topic_records_parse_as_the_coordinator_writes_them() {
        let commit = br#"{"type":"commit","group":"g","partition":{"topic":"t","partition":2},"offset":7,"metadata":"","committed_at_ms":1}"#;
        assert_eq!(
            OffsetsEntry::parse(commit, "t"),
            Some((
                "g".into(),
                OffsetsEntry::Commit {
                    partition: 2,
                    offset: 7
                }
            ))
        );
        assert_eq!(OffsetsEntry::parse(commit, "other"), None);
        let image = br#"{"type":"reset","group":"g","offsets":[[{"topic":"t","partition":0},5],[{"topic":"u","partition":1},9]],"at_ms":3}"#;
        assert_eq!(
            OffsetsEntry::parse(image, "t"),
            Some((
                "g".into(),
                OffsetsEntry::Image {
                    offsets: vec![(0, 5)]
                }
            ))
        );
        assert_eq!(
            OffsetsEntry::parse(br#"{"type":"delete_group","group":"g"}"#, "t"),
            Some(("g".into(), OffsetsEntry::Deleted))
        );
        assert_eq!(OffsetsEntry::parse(b"not json", "t"), None);
    }
}
