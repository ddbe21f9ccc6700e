//! The group members: where each assignment starts, that deliveries neither go back nor skip,
//! that two members never consume one partition at once, and the committed offsets seen.
//!
//! The members commit only their positions after each poll (no auto-commit, nothing on
//! revocation or close) and the group's offsets are never reset, so the members' recorded
//! commits are every commit of the group, and the group's committed offsets only move forward
//! (checked in [`observed_commits`]).

use std::collections::{BTreeMap, BTreeSet};

use super::Report;
use crate::faults::history::{CommitOutcome, History, MemberEvent};

/// Where a member assigned a partition may start it.
struct Start {
    /// The greatest offset surely committed before the assignment; without one, 0 (the run's
    /// reset policy is the earliest offset).
    surely: u64,
    /// Greater offsets of commits that may have landed by then.
    maybe: BTreeSet<u64>,
    /// Offsets of commits sent before the assignment and refused definitely: not a start, but
    /// worth naming when a member starts at one.
    refused: BTreeSet<u64>,
}

/// What the group's committed offset of `partition` could have been when a member that was
/// assigned it at `at` looked it up (just before `at`): the greatest offset surely committed
/// before `at`, or a greater one of a commit that may have landed by then without being known
/// to (sent before `at`, and answered after it or without a definite answer). Committed offsets
/// only move forward, so nothing else can be the group's offset then.
fn committed_at(h: &History, group: &str, partition: u32, at: u64) -> Start {
    let mut surely: Option<u64> = None;
    let mut maybe = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for m in h.members.values().filter(|m| m.group == group) {
        for e in &m.events {
            let MemberEvent::Committed {
                sent,
                done,
                offsets,
                outcome,
            } = e
            else {
                continue;
            };
            let Some(offset) = offsets
                .iter()
                .find(|(p, _)| *p == partition)
                .map(|(_, o)| *o)
            else {
                continue;
            };
            match outcome {
                CommitOutcome::Ok if *done < at => surely = surely.max(Some(offset)),
                CommitOutcome::Ok | CommitOutcome::Unknown if *sent < at => {
                    maybe.insert(offset);
                }
                CommitOutcome::Refused if *sent < at => {
                    refused.insert(offset);
                }
                _ => {}
            }
        }
    }
    let surely = surely.unwrap_or(0);
    maybe.retain(|o| *o > surely);
    Start {
        surely,
        maybe,
        refused,
    }
}

/// One held partition of a member: since when, where it had to start, the last offset it got.
struct Held {
    at: u64,
    start: Start,
    last: Option<u64>,
}

/// For each member: the first record of a partition after each assignment is at the group's
/// committed offset as it was then (which is what makes a handover lose and repeat nothing
/// beyond the last commit), and the later ones follow it one by one: going back within an
/// assignment (say, a silent reset to the earliest offset after `OFFSET_OUT_OF_RANGE`) or
/// skipping forward (unless retention deleted what was skipped) is a violation, as is a record
/// of a partition the member does not hold. What members read is what the log holds there.
pub(super) fn deliveries(h: &History, r: &mut Report) {
    for (name, m) in &h.members {
        let mut held: BTreeMap<u32, Held> = BTreeMap::new();
        for e in &m.events {
            match e {
                MemberEvent::Assigned { at, partition } => {
                    held.insert(
                        *partition,
                        Held {
                            at: *at,
                            start: committed_at(h, &m.group, *partition, *at),
                            last: None,
                        },
                    );
                }
                MemberEvent::Released { partition, .. } => {
                    held.remove(partition);
                }
                MemberEvent::Polled { records, .. } => {
                    for (p, o, v) in records {
                        delivery(h, r, name, held.get_mut(p), (*p, *o, v));
                    }
                }
                MemberEvent::Committed { .. } => {}
            }
        }
    }
}

fn delivery(
    h: &History,
    r: &mut Report,
    name: &str,
    held: Option<&mut Held>,
    (p, o, v): (u32, u64, &str),
) {
    if let Some(actual) = h.final_log.get(&p).and_then(|l| l.get(&o))
        && actual != v
    {
        r.fail(format!("{name} read {v} at {p}/{o}, which holds {actual}"));
    }
    let Some(held) = held else {
        r.fail(format!(
            "{name} got {p}/{o} ({v}) while it did not hold partition {p}"
        ));
        return;
    };
    match held.last {
        None => {
            let Start {
                surely,
                maybe,
                refused,
            } = &held.start;
            let reset_past_deleted = o > *surely && h.deleted_by_retention(p, o - 1);
            if o != *surely && !maybe.contains(&o) && !reset_past_deleted {
                let or = if maybe.is_empty() {
                    String::new()
                } else {
                    format!(" (or one of {maybe:?})")
                };
                let landed = if refused.contains(&o) {
                    format!("; a commit of {o} was refused definitely before: did it land?")
                } else {
                    String::new()
                };
                r.fail(format!(
                    "{name} started partition {p} at {o} after its assignment at {} µs, but the group's committed offset was {surely}{or}{landed}",
                    held.at,
                ));
            }
        }
        Some(last) if o <= last => r.fail(format!(
            "{name} went back on partition {p} from {last} to {o} within one assignment"
        )),
        Some(last) if o > last + 1 && !h.deleted_by_retention(p, o - 1) => {
            r.fail(format!("{name} skipped {p}/{}..{o}", last + 1));
        }
        Some(_) => {}
    }
    held.last = Some(o);
}

/// Two members of a group never consume one partition at the same time. A member surely held
/// a partition from when a poll returned its first records of an assignment to when the poll
/// that returned its last records of that assignment started (between them it consumed the
/// partition without releasing it). A poll of another member that returned records of the
/// partition and lies wholly inside that span is a violation.
pub(super) fn exclusive_ownership(h: &History, r: &mut Report) {
    // (group, partition) to spans (member, from, to) and polls (member, started, returned).
    type Spans<'a> = Vec<(&'a str, u64, u64)>;
    let mut spans: BTreeMap<(&str, u32), Spans<'_>> = BTreeMap::new();
    let mut polls: BTreeMap<(&str, u32), Spans<'_>> = BTreeMap::new();
    for (name, m) in &h.members {
        let group = m.group.as_str();
        let mut open: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        let mut close = |p: u32, span: Option<(u64, u64)>| {
            if let Some((from, to)) = span.filter(|(from, to)| from < to) {
                spans
                    .entry((group, p))
                    .or_default()
                    .push((name.as_str(), from, to));
            }
        };
        for e in &m.events {
            match e {
                MemberEvent::Assigned { partition, .. }
                | MemberEvent::Released { partition, .. } => {
                    close(*partition, open.remove(partition));
                }
                MemberEvent::Polled {
                    started,
                    returned,
                    records,
                } => {
                    let parts: BTreeSet<u32> = records.iter().map(|(p, _, _)| *p).collect();
                    for p in parts {
                        polls.entry((group, p)).or_default().push((
                            name.as_str(),
                            *started,
                            *returned,
                        ));
                        open.entry(p)
                            .and_modify(|span| span.1 = *started)
                            .or_insert((*returned, *started));
                    }
                }
                MemberEvent::Committed { .. } => {}
            }
        }
        for (p, span) in open {
            close(p, Some(span));
        }
    }
    for ((group, p), spans) in &spans {
        let Some(polls) = polls.get(&(*group, *p)) else {
            continue;
        };
        for (holder, from, to) in spans {
            if let Some((other, started, returned)) = polls
                .iter()
                .find(|(m, s, e)| m != holder && s > from && e < to)
            {
                r.fail(format!(
                    "group {group}: {other} consumed partition {p} in a poll from {started} to {returned} µs while {holder} held it (it consumed it from {from} to {to} µs without a rebalance)"
                ));
            }
        }
    }
}

/// The committed offsets the observer saw never move backwards, and each is the offset of a
/// commit a member sent before it was seen and that was not refused definitely.
pub(super) fn observed_commits(h: &History, r: &mut Report) {
    for ((group, p), seen) in &h.commits {
        for w in seen.windows(2) {
            if w[1].1 < w[0].1 {
                r.fail(format!(
                    "group {group} committed {p} at {} after {} (seen at {} µs)",
                    w[1].1, w[0].1, w[1].0
                ));
            }
        }
        let members: Vec<_> = h.members.values().filter(|m| &m.group == group).collect();
        if members.is_empty() {
            continue;
        }
        // Every commit of the partition: (sent, offset, outcome).
        let commits: Vec<(u64, u64, CommitOutcome)> = members
            .iter()
            .flat_map(|m| &m.events)
            .filter_map(|e| match e {
                MemberEvent::Committed {
                    sent,
                    offsets,
                    outcome,
                    ..
                } => offsets
                    .iter()
                    .find(|(q, _)| q == p)
                    .map(|(_, o)| (*sent, *o, *outcome)),
                _ => None,
            })
            .collect();
        for (at, o) in seen {
            let before = || commits.iter().filter(|(s, c, _)| s < at && c == o);
            if before().any(|(_, _, outcome)| *outcome != CommitOutcome::Refused) {
                continue;
            }
            let refused: Vec<u64> = before().map(|(s, _, _)| *s).collect();
            r.fail(if refused.is_empty() {
                format!(
                    "group {group}'s committed offset of partition {p} was seen at {o} at {at} µs, which no member had committed"
                )
            } else {
                format!(
                    "group {group}'s committed offset of partition {p} was seen at {o} at {at} µs, but the only commits of {o} before (sent at {refused:?} µs) were refused definitely"
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;
    use crate::faults::history::{CommitOutcome, History, Member, MemberEvent};

    fn member(events: Vec<MemberEvent>) -> Member {
        Member {
            group: "g".into(),
            events,
        }
    }

    fn assigned(at: u64, partition: u32) -> MemberEvent {
        MemberEvent::Assigned { at, partition }
    }

    fn released(at: u64, partition: u32) -> MemberEvent {
        MemberEvent::Released { at, partition }
    }

    /// A poll of partition 0 from `started` to `started + 5` returning `offsets`, whose values
    /// are those of [`history`]'s log (a, b, c).
    fn polled(started: u64, offsets: &[u64]) -> MemberEvent {
        let value = |o: u64| ["a", "b", "c", "x"][o.min(3) as usize].to_owned();
        MemberEvent::Polled {
            started,
            returned: started + 5,
            records: offsets.iter().map(|o| (0, *o, value(*o))).collect(),
        }
    }

    fn committed(sent: u64, done: u64, offset: u64, outcome: CommitOutcome) -> MemberEvent {
        MemberEvent::Committed {
            sent,
            done,
            offsets: vec![(0, offset)],
            outcome,
        }
    }

    fn with_members(members: &[(&str, Vec<MemberEvent>)]) -> History {
        let mut h = history();
        for (name, events) in members {
            h.members.insert((*name).into(), member(events.clone()));
        }
        h
    }

    #[test]
    fn a_handover_that_starts_at_the_committed_offset_passes() {
        let h = with_members(&[
            (
                "m1",
                vec![
                    assigned(10, 0),
                    polled(20, &[0, 1]),
                    committed(30, 40, 2, CommitOutcome::Ok),
                    released(50, 0),
                ],
            ),
            ("m2", vec![assigned(60, 0), polled(70, &[2])]),
        ]);
        passes(&h);
    }

    #[test]
    fn a_first_delivery_away_from_the_committed_offset_is_a_violation() {
        // m2 starts over at 0 although m1 committed 2 (and, below, goes past it).
        for start in [0, 1] {
            let h = with_members(&[
                (
                    "m1",
                    vec![
                        assigned(10, 0),
                        polled(20, &[0, 1]),
                        committed(30, 40, 2, CommitOutcome::Ok),
                        released(50, 0),
                    ],
                ),
                ("m2", vec![assigned(60, 0), polled(70, &[start])]),
            ]);
            only_violation(
                &h,
                &format!(
                    "m2 started partition 0 at {start} after its assignment at 60 µs, but the group's committed offset was 2"
                ),
            );
        }
        // Nothing committed: the reset policy's start (the earliest offset, 0).
        let h = with_members(&[("m1", vec![assigned(10, 0), polled(20, &[1, 2])])]);
        only_violation(&h, "committed offset was 0");
        let h = with_members(&[("m1", vec![assigned(10, 0), polled(20, &[0, 1, 2])])]);
        passes(&h);
    }

    #[test]
    fn a_commit_that_may_have_landed_is_an_allowed_start() {
        // m1's last commit timed out (it may have landed), or was still in flight when m2 was
        // assigned: m2 may start at either offset. A refused one is not a possible start.
        for (outcome, done, ok) in [
            (CommitOutcome::Unknown, 45, true),
            (CommitOutcome::Ok, 65, true),
            (CommitOutcome::Refused, 45, false),
        ] {
            let h = with_members(&[
                (
                    "m1",
                    vec![
                        assigned(10, 0),
                        polled(20, &[0]),
                        committed(22, 25, 1, CommitOutcome::Ok),
                        polled(26, &[1]),
                        committed(30, done, 2, outcome),
                        released(50, 0),
                    ],
                ),
                ("m2", vec![assigned(60, 0), polled(70, &[2])]),
            ]);
            let r = check(&h);
            assert_eq!(r.ok(), ok, "{outcome:?}: {r}");
            if !ok {
                only_violation(
                    &h,
                    "the group's committed offset was 1; a commit of 2 was refused definitely before: did it land?",
                );
            }
            // The offset surely committed before is allowed in every case.
            let h2 = with_members(&[
                (
                    "m1",
                    vec![
                        assigned(10, 0),
                        polled(20, &[0]),
                        committed(22, 25, 1, CommitOutcome::Ok),
                        polled(26, &[1]),
                        committed(30, done, 2, outcome),
                        released(50, 0),
                    ],
                ),
                ("m2", vec![assigned(60, 0), polled(70, &[1, 2])]),
            ]);
            assert!(check(&h2).ok(), "{outcome:?}: {}", check(&h2));
        }
    }

    #[test]
    fn going_back_or_skipping_within_an_assignment_is_a_violation() {
        // A silent reset to the earliest offset: 0, 1, then 0 again.
        let h = with_members(&[(
            "m1",
            vec![assigned(10, 0), polled(20, &[0, 1]), polled(30, &[0])],
        )]);
        only_violation(
            &h,
            "m1 went back on partition 0 from 1 to 0 within one assignment",
        );
        let h = with_members(&[(
            "m1",
            vec![assigned(10, 0), polled(20, &[0]), polled(30, &[2])],
        )]);
        only_violation(&h, "m1 skipped 0/1..2");
        // Skipping what retention deleted is not.
        let mut h = with_members(&[(
            "m1",
            vec![assigned(10, 0), polled(20, &[0]), polled(30, &[2])],
        )]);
        h.log_start.insert(0, 2);
        h.retention_deleted.insert(0);
        h.final_log.insert(0, log(&[(2, "c")]));
        passes(&h);
        // Going back to the committed offset after a new assignment is a redelivery.
        let h = with_members(&[(
            "m1",
            vec![
                assigned(10, 0),
                polled(20, &[0, 1]),
                committed(30, 40, 1, CommitOutcome::Ok),
                polled(45, &[2]),
                released(50, 0),
                assigned(60, 0),
                polled(70, &[1, 2]),
            ],
        )]);
        passes(&h);
    }

    #[test]
    fn records_of_a_partition_not_held_are_a_violation() {
        let h = with_members(&[(
            "m1",
            vec![
                assigned(10, 0),
                polled(20, &[0]),
                released(30, 0),
                polled(40, &[1]),
            ],
        )]);
        let r = check(&h);
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("m1 got 0/1 (b) while it did not hold partition 0")),
            "{r}"
        );
    }

    #[test]
    fn two_members_consuming_one_partition_at_once_is_a_violation() {
        // m1 consumes partition 0 from 25 to 60 (its first poll returned at 25, its last
        // started at 60); m2 polls it from 40 to 45, both from their committed offsets.
        let h = with_members(&[
            (
                "m1",
                vec![
                    assigned(10, 0),
                    polled(20, &[0]),
                    committed(26, 27, 1, CommitOutcome::Ok),
                    polled(60, &[1, 2]),
                ],
            ),
            ("m2", vec![assigned(35, 0), polled(40, &[1])]),
        ]);
        let r = check(&h);
        assert!(
            r.violations.iter().any(|v| v.contains(
                "group g: m2 consumed partition 0 in a poll from 40 to 45 µs while m1 held it (it consumed it from 25 to 60 µs"
            )),
            "{r}"
        );
        // m1 released it at 30 and got it back at 50: no overlap.
        let h = with_members(&[
            (
                "m1",
                vec![
                    assigned(10, 0),
                    polled(20, &[0]),
                    committed(26, 27, 1, CommitOutcome::Ok),
                    released(30, 0),
                    assigned(50, 0),
                    polled(60, &[2]),
                ],
            ),
            (
                "m2",
                vec![
                    assigned(35, 0),
                    polled(40, &[1]),
                    committed(46, 47, 2, CommitOutcome::Ok),
                    released(48, 0),
                ],
            ),
        ]);
        passes(&h);
        // A poll that only overlaps the span's edges is not surely inside it.
        let h = with_members(&[
            (
                "m1",
                vec![assigned(10, 0), polled(20, &[0]), polled(40, &[1])],
            ),
            ("m2", vec![assigned(10, 0), polled(22, &[0])]),
        ]);
        let r = check(&h);
        assert!(
            r.violations.iter().all(|v| !v.contains("while m1 held it")),
            "{r}"
        );
    }

    #[test]
    fn observed_commits_never_go_back_and_were_sent_and_not_refused_before() {
        let mut h = with_members(&[(
            "m1",
            vec![
                assigned(10, 0),
                polled(20, &[0, 1]),
                committed(30, 40, 2, CommitOutcome::Ok),
                committed(41, 42, 3, CommitOutcome::Refused),
                committed(50, 60, 3, CommitOutcome::Ok),
            ],
        )]);
        h.commits.insert(("g".into(), 0), vec![(35, 2), (70, 3)]);
        passes(&h);
        // Seen before any commit of it was sent.
        h.commits.insert(("g".into(), 0), vec![(25, 2)]);
        only_violation(&h, "seen at 2 at 25 µs, which no member had committed");
        // Seen when the only commit of it sent before had been refused definitely: a later
        // commit of the same offset does not excuse it.
        h.commits.insert(("g".into(), 0), vec![(35, 2), (45, 3)]);
        only_violation(
            &h,
            "seen at 3 at 45 µs, but the only commits of 3 before (sent at [41] µs) were refused definitely",
        );
        h.commits
            .insert(("g".into(), 0), vec![(35, 2), (70, 3), (80, 2)]);
        only_violation(&h, "group g committed 0 at 2 after 3");
    }
}
