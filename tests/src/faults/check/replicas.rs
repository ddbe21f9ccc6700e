//! Every replica against the final leader's copy, up to the high watermark.

use super::Report;
use crate::faults::history::{Batch, History, Replicas};

/// The batches of a copy up to (and including) the first data batch that reaches
/// `high_watermark`: the committed prefix. The whole copy when none does (it is short).
fn committed_prefix(log: &[Batch], high_watermark: u64) -> &[Batch] {
    if high_watermark == 0 {
        return &[];
    }
    let end = log
        .iter()
        .position(|b| b.has_data() && b.next_offset >= high_watermark)
        .map_or(log.len(), |i| i + 1);
    &log[..end]
}

/// Where a copy's data ends: the next offset of its last data batch.
fn end_of(prefix: &[Batch]) -> u64 {
    prefix
        .iter()
        .rev()
        .find(|b| b.has_data())
        .map_or(0, |b| b.next_offset)
}

/// For each partition: the final leader's copy holds every offset from 0 (or from where
/// retention cut it) to the high watermark, one batch after another; every replica reaches the
/// high watermark (they were all reported in sync); and every replica's committed prefix is the
/// leader's, batch for batch (Raft index, term, offsets and CRC). When retention may have
/// deleted the start of the log, copies are compared from the first Raft index both hold. For
/// the test topic, the log read through the cluster ends at the leader's high watermark.
pub(super) fn against_the_leader(h: &History, r: &mut Report) {
    for ((topic, p), reps) in &h.replicas {
        let name = format!("{topic}/{p}");
        let hw = reps.high_watermark;
        if *topic == h.topic
            && let Some(log) = h.final_log.get(p)
        {
            let end = log.keys().next_back().map_or(h.start_of(*p), |o| o + 1);
            if end != hw {
                r.fail(format!(
                    "{name}: the log read through the cluster ends at {end}, but the leader's high watermark is {hw}"
                ));
            }
        }
        let Some(leader_log) = reps.logs.get(&reps.leader) else {
            r.fail(format!(
                "{name}: there is no copy of its final leader, broker {}",
                reps.leader
            ));
            continue;
        };
        let lead = committed_prefix(leader_log, hw);
        contiguous(r, &name, reps, lead);
        for (b, log) in &reps.logs {
            let prefix = committed_prefix(log, hw);
            let end = end_of(prefix);
            if end < hw {
                r.fail(format!(
                    "{name}: broker {b}'s copy ends at offset {end}, short of the high watermark {hw}"
                ));
            }
            if *b == reps.leader {
                continue;
            }
            let (mine, theirs) = if reps.retention_deleted {
                from_common_start(prefix, lead)
            } else {
                (prefix, lead)
            };
            if mine != theirs {
                let i = mine
                    .iter()
                    .zip(theirs)
                    .position(|(x, y)| x != y)
                    .unwrap_or(mine.len().min(theirs.len()));
                let show = |l: &[Batch]| l.get(i).map_or("nothing".to_owned(), Batch::to_string);
                r.fail(format!(
                    "{name}: broker {b}'s copy differs from the leader's (broker {}) at its batch {i} of the committed prefix: {} where the leader has {} ({} and {} batches)",
                    reps.leader,
                    show(mine),
                    show(theirs),
                    mine.len(),
                    theirs.len()
                ));
            }
        }
    }
}

/// The leader's data batches follow one another from offset 0 (or from wherever retention
/// left the log).
fn contiguous(r: &mut Report, name: &str, reps: &Replicas, lead: &[Batch]) {
    let mut next: Option<u64> = None;
    for b in lead.iter().filter(|b| b.has_data()) {
        match next {
            None if b.base_offset != 0 && !reps.retention_deleted => r.fail(format!(
                "{name}: the leader's copy (broker {}) starts at offset {}, but retention deleted nothing",
                reps.leader, b.base_offset
            )),
            Some(n) if b.base_offset != n => r.fail(format!(
                "{name}: the leader's copy (broker {}) goes from offset {n} to {} at {b}",
                reps.leader, b.base_offset
            )),
            _ => {}
        }
        next = Some(b.next_offset);
    }
}

/// Both copies from the first Raft index both hold.
fn from_common_start<'a>(a: &'a [Batch], b: &'a [Batch]) -> (&'a [Batch], &'a [Batch]) {
    let first = |l: &[Batch]| l.first().map_or(0, |x| x.raft_index);
    let from = first(a).max(first(b));
    let cut = |l: &'a [Batch]| {
        let i = l
            .iter()
            .position(|x| x.raft_index >= from)
            .unwrap_or(l.len());
        &l[i..]
    };
    (cut(a), cut(b))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;
    use super::*;

    /// Batches of `(raft index, first offset, records)` in term 1, the CRC made from the index.
    fn batches(rows: &[(u64, u64, u64)]) -> Vec<Batch> {
        rows.iter()
            .map(|(i, base, n)| Batch {
                raft_index: *i,
                term: 1,
                base_offset: *base,
                next_offset: base + n,
                crc: *i as u32,
            })
            .collect()
    }

    /// [`history`]'s partition 0 (offsets 0..3) on brokers 1-3, led by broker 1: a Raft entry
    /// without data, then batches of 2 and 1 records, then an uncommitted one.
    fn replicated() -> History {
        let mut h = history();
        let copy = batches(&[(1, 0, 0), (2, 0, 2), (3, 2, 1), (4, 3, 5)]);
        h.replicas.insert(
            ("t".into(), 0),
            Replicas {
                leader: 1,
                high_watermark: 3,
                retention_deleted: false,
                logs: (1..=3).map(|b| (b, copy.clone())).collect(),
            },
        );
        h
    }

    fn logs(h: &mut History) -> &mut Replicas {
        h.replicas
            .get_mut(&("t".to_owned(), 0))
            .expect("partition 0")
    }

    #[test]
    fn identical_committed_prefixes_pass_whatever_follows_them() {
        let mut h = replicated();
        // Broker 3 lacks the uncommitted batch, broker 2 has another one there.
        logs(&mut h)
            .logs
            .insert(3, batches(&[(1, 0, 0), (2, 0, 2), (3, 2, 1)]));
        logs(&mut h).logs.insert(
            2,
            batches(&[(1, 0, 0), (2, 0, 2), (3, 2, 1), (4, 3, 9), (5, 12, 1)]),
        );
        passes(&h);
        assert_eq!(
            committed_prefix(&h.replicas[&("t".to_owned(), 0)].logs[&1], 3).len(),
            3
        );
    }

    #[test]
    fn a_replica_that_differs_from_the_leader_within_the_prefix_is_a_violation() {
        let mut h = replicated();
        let mut other = batches(&[(1, 0, 0), (2, 0, 2), (3, 2, 1)]);
        other[1].crc = 77;
        logs(&mut h).logs.insert(2, other);
        only_violation(
            &h,
            "t/0: broker 2's copy differs from the leader's (broker 1) at its batch 1 of the committed prefix",
        );
    }

    #[test]
    fn a_replica_short_of_the_high_watermark_is_a_violation_even_when_it_is_a_prefix() {
        // The old check compared replicas up to the shortest one, so a short replica passed.
        let mut h = replicated();
        logs(&mut h)
            .logs
            .insert(3, batches(&[(1, 0, 0), (2, 0, 2)]));
        let r = check(&h);
        assert!(
            r.violations.iter().any(|v| v
                .contains("t/0: broker 3's copy ends at offset 2, short of the high watermark 3")),
            "{r}"
        );
        // The leader itself short, the others complete: both the leader's gap and the
        // others' difference show.
        let mut h = replicated();
        logs(&mut h)
            .logs
            .insert(1, batches(&[(1, 0, 0), (2, 0, 2)]));
        let r = check(&h);
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("broker 1's copy ends at offset 2")),
            "{r}"
        );
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("broker 2's copy differs")),
            "{r}"
        );
    }

    #[test]
    fn a_leader_copy_with_a_hole_or_a_late_start_is_a_violation() {
        let mut h = replicated();
        let copy = batches(&[(1, 0, 0), (2, 0, 1), (3, 2, 1)]);
        for b in 1..=3 {
            logs(&mut h).logs.insert(b, copy.clone());
        }
        only_violation(&h, "the leader's copy (broker 1) goes from offset 1 to 2");
        let copy = batches(&[(2, 1, 1), (3, 2, 1)]);
        for b in 1..=3 {
            logs(&mut h).logs.insert(b, copy.clone());
        }
        only_violation(&h, "starts at offset 1, but retention deleted nothing");
        // With retention, copies may start at different entries.
        logs(&mut h).retention_deleted = true;
        logs(&mut h).logs.insert(2, batches(&[(3, 2, 1)]));
        passes(&h);
    }

    #[test]
    fn the_log_read_through_the_cluster_must_end_at_the_high_watermark() {
        let mut h = replicated();
        h.final_log.insert(0, log(&[(0, "a"), (1, "b")]));
        only_violation(
            &h,
            "t/0: the log read through the cluster ends at 2, but the leader's high watermark is 3",
        );
    }

    #[test]
    fn a_missing_leader_copy_is_a_violation() {
        let mut h = replicated();
        logs(&mut h).leader = 4;
        only_violation(&h, "no copy of its final leader, broker 4");
    }
}
