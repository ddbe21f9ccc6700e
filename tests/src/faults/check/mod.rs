//! The checker: the brief's invariants verified from a recorded [`History`]. Pure, so every
//! check is unit-tested with a hand-written history that breaks it.
//!
//! - `log.rs`: the writes against the final log (nothing acknowledged lost, nothing twice,
//!   nothing refused written, contiguous offsets, no log start without retention) and the
//!   producers' and keys' order;
//! - `consumers.rs`: each group member's deliveries (starting at the committed offset, without
//!   going back or skipping), exclusive ownership of partitions, the committed offsets the
//!   coordinator answered;
//! - `offsets_log.rs`: every member's commit against the coordinator's log of them;
//! - `replicas.rs`: every replica's committed prefix against the final leader's copy;
//! - `metadata.rs`: every broker's copy of the metadata log against the metadata leader's.

mod consumers;
mod log;
mod metadata;
mod offsets_log;
mod replicas;

use std::fmt;

use super::history::History;

/// The checker's verdict.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub acknowledged: usize,
    pub refused: usize,
    pub unknown: usize,
    /// Acknowledged writes missing from their offset.
    pub lost: usize,
    /// Values found at more than one offset.
    pub duplicated: usize,
    /// Unknown-outcome writes that turned out to be in the log.
    pub unknown_written: usize,
    pub violations: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    fn fail(&mut self, violation: String) {
        self.violations.push(violation);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "acknowledged {}, refused {}, unknown outcome {} (of which written {}), lost {}, duplicated {}, violations {}",
            self.acknowledged,
            self.refused,
            self.unknown,
            self.unknown_written,
            self.lost,
            self.duplicated,
            self.violations.len()
        )?;
        for v in self.violations.iter().take(20) {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

/// Checks the brief's invariants against a history.
pub fn check(h: &History) -> Report {
    let mut r = Report::default();
    log::writes(h, &mut r);
    log::send_order(h, &mut r);
    log::key_partitions(h, &mut r);
    consumers::deliveries(h, &mut r);
    consumers::exclusive_ownership(h, &mut r);
    consumers::observed_commits(h, &mut r);
    offsets_log::logged_commits(h, &mut r);
    replicas::against_the_leader(h, &mut r);
    metadata::against_the_leader(h, &mut r);
    r
}

impl History {
    /// The partition's log start when read (0 when not recorded).
    fn start_of(&self, partition: u32) -> u64 {
        self.log_start.get(&partition).copied().unwrap_or(0)
    }

    /// Whether the record at `offset` of the partition may have been deleted by retention.
    fn deleted_by_retention(&self, partition: u32, offset: u64) -> bool {
        self.retention_deleted.contains(&partition) && offset < self.start_of(partition)
    }
}

/// Building blocks for the checks' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeMap;

    use super::super::history::{History, Outcome};

    pub fn log(entries: &[(u64, &str)]) -> BTreeMap<u64, String> {
        entries.iter().map(|(o, v)| (*o, (*v).to_owned())).collect()
    }

    pub fn acked(partition: u32, offset: u64) -> Outcome {
        Outcome::Acked { partition, offset }
    }

    /// Partition 0 holds a, b (acknowledged) and c (unknown outcome); d was refused.
    pub fn history() -> History {
        let mut h = History {
            topic: "t".into(),
            ..History::default()
        };
        h.writes.insert("a".into(), acked(0, 0));
        h.writes.insert("b".into(), acked(0, 1));
        h.writes.insert("c".into(), Outcome::Unknown);
        h.writes.insert("d".into(), Outcome::Refused);
        h.final_log.insert(0, log(&[(0, "a"), (1, "b"), (2, "c")]));
        h.log_start.insert(0, 0);
        h
    }

    /// Asserts that the history breaks exactly one invariant, the one named by `needle`.
    pub fn only_violation(h: &History, needle: &str) {
        let r = super::check(h);
        assert_eq!(
            r.violations.len(),
            1,
            "expected one violation ({needle}): {r}"
        );
        assert!(
            r.violations[0].contains(needle),
            "{needle} missing from: {r}"
        );
    }

    pub fn passes(h: &History) {
        let r = super::check(h);
        assert!(r.ok(), "{r}");
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn a_clean_history_passes_and_is_counted() {
        let r = check(&history());
        assert!(r.ok(), "{r}");
        assert_eq!(
            (r.acknowledged, r.unknown, r.unknown_written, r.refused),
            (2, 1, 1, 1)
        );
    }
}
