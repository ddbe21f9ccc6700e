//! The metadata log's copies against the metadata leader's, by Raft index (its entries carry no
//! partition offsets). Each broker snapshots the metadata and drops the start of its copy on
//! its own schedule (a wiped broker's copy may hold nothing but what came after its snapshot),
//! so a copy is judged on the entries it holds: each is the leader's entry at that index, they
//! follow one another, and a copy that holds any reaches the index every broker had applied.

use std::collections::BTreeMap;

use super::Report;
use crate::faults::history::{Batch, History};

const NAME: &str = "metadata log";

pub(super) fn against_the_leader(h: &History, r: &mut Report) {
    let Some(m) = &h.metadata else {
        return;
    };
    let Some(lead) = m.logs.get(&m.leader) else {
        r.fail(format!(
            "{NAME}: there is no copy of its final leader, broker {}",
            m.leader
        ));
        return;
    };
    // Entries written after every broker agreed (the brokers stopping one after another write
    // more) are not compared.
    let upto = m.applied_by_all.unwrap_or(u64::MAX);
    let held = |log: &[Batch]| -> Vec<Batch> {
        log.iter()
            .filter(|b| b.raft_index <= upto)
            .copied()
            .collect()
    };
    let leader_entries: BTreeMap<u64, Batch> =
        held(lead).into_iter().map(|b| (b.raft_index, b)).collect();
    for (b, log) in &m.logs {
        let mine = held(log);
        for w in mine.windows(2) {
            if w[1].raft_index != w[0].raft_index + 1 {
                r.fail(format!(
                    "{NAME}: broker {b}'s copy goes from Raft index {} to {}",
                    w[0].raft_index, w[1].raft_index
                ));
            }
        }
        if let (Some(last), Some(all)) = (mine.last(), m.applied_by_all)
            && last.raft_index < all
        {
            r.fail(format!(
                "{NAME}: broker {b}'s copy ends at Raft index {}, before {all}, which every broker had applied",
                last.raft_index
            ));
        }
        if *b == m.leader {
            continue;
        }
        if let Some((x, l)) = mine.iter().find_map(|x| {
            leader_entries
                .get(&x.raft_index)
                .filter(|l| *l != x)
                .map(|l| (x, l))
        }) {
            r.fail(format!(
                "{NAME}: broker {b}'s copy differs from the leader's (broker {}) at Raft index {}: {x} where the leader has {l}",
                m.leader, x.raft_index
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use crate::faults::history::{Batch, MetadataCopies};

    /// Entries `from..=to` in term 1 (one record each at offset 0, as the metadata log writes
    /// them), the CRC made from the index.
    fn entries(from: u64, to: u64) -> Vec<Batch> {
        (from..=to)
            .map(|i| Batch {
                raft_index: i,
                term: 1,
                base_offset: 0,
                next_offset: 1,
                crc: i as u32,
            })
            .collect()
    }

    fn with_copies(copies: &[(u32, Vec<Batch>)]) -> crate::faults::History {
        let mut h = history();
        h.metadata = Some(MetadataCopies {
            leader: 1,
            applied_by_all: Some(10),
            logs: copies.iter().cloned().collect(),
        });
        h
    }

    #[test]
    fn copies_that_start_late_or_hold_only_a_snapshot_pass() {
        let r = super::super::check(&with_copies(&[
            (1, entries(1, 12)),
            // Snapshotted up to 5; nothing but its snapshot (a wiped broker); entries after
            // the index all had applied are not compared.
            (2, entries(6, 10)),
            (3, Vec::new()),
        ]));
        assert!(r.ok(), "{r}");
    }

    #[test]
    fn a_differing_entry_a_gap_and_a_short_copy_are_caught() {
        let mut other = entries(3, 10);
        other[2].crc = 99;
        only_violation(
            &with_copies(&[(1, entries(1, 10)), (2, other)]),
            "broker 2's copy differs from the leader's (broker 1) at Raft index 5",
        );
        let mut gap = entries(3, 10);
        gap.remove(3);
        only_violation(
            &with_copies(&[(1, entries(1, 10)), (2, gap)]),
            "broker 2's copy goes from Raft index 5 to 7",
        );
        only_violation(
            &with_copies(&[(1, entries(1, 10)), (2, entries(1, 8))]),
            "broker 2's copy ends at Raft index 8, before 10, which every broker had applied",
        );
        only_violation(
            &with_copies(&[(2, entries(1, 10))]),
            "there is no copy of its final leader, broker 1",
        );
    }
}
