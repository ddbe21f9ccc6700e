//! The writes against the final log, and the order of each producer's and each key's records.

use std::collections::BTreeMap;

use super::Report;
use crate::faults::history::{History, Outcome};

/// Every acknowledged write is at its offset (unless retention deleted it), no value is in the
/// log twice, nothing refused or never written is in it, offsets are contiguous from the log
/// start, and the log starts at 0 unless retention deleted records.
pub(super) fn writes(h: &History, r: &mut Report) {
    for (p, start) in &h.log_start {
        if *start > 0 && !h.retention_deleted.contains(p) {
            r.fail(format!(
                "partition {p} starts at offset {start}, but retention deleted nothing: offsets 0..{start} are gone"
            ));
        }
    }
    // Where each value ended up.
    let mut found: BTreeMap<&str, Vec<(u32, u64)>> = BTreeMap::new();
    for (p, log) in &h.final_log {
        for (o, v) in log {
            found.entry(v.as_str()).or_default().push((*p, *o));
        }
        // Offsets are contiguous from the log start to the end read.
        let mut expect = h.start_of(*p);
        for o in log.keys() {
            if *o != expect {
                r.fail(format!(
                    "partition {p}: offset {o} follows {expect} (gap or reordering)"
                ));
            }
            expect = o + 1;
        }
    }
    for (value, outcome) in &h.writes {
        let at = found.get(value.as_str());
        match outcome {
            Outcome::Acked { partition, offset } => {
                r.acknowledged += 1;
                let here = h
                    .final_log
                    .get(partition)
                    .and_then(|l| l.get(offset))
                    .map(String::as_str);
                if here != Some(value.as_str()) && !h.deleted_by_retention(*partition, *offset) {
                    r.lost += 1;
                    r.fail(format!(
                        "acknowledged {value} at {partition}/{offset} but the log holds {here:?} there"
                    ));
                }
            }
            Outcome::Refused => {
                r.refused += 1;
                if let Some(at) = at {
                    r.fail(format!(
                        "{value} was refused definitely but is in the log at {at:?}"
                    ));
                }
            }
            Outcome::Unknown => {
                r.unknown += 1;
                if at.is_some() {
                    r.unknown_written += 1;
                }
            }
        }
        if let Some(at) = at.filter(|a| a.len() > 1) {
            r.duplicated += 1;
            r.fail(format!("{value} written more than once: {at:?}"));
        }
    }
    for (value, places) in &found {
        if !h.writes.contains_key(*value) {
            r.fail(format!(
                "{value} at {places:?} was never written by this run"
            ));
        }
    }
}

/// `{producer}-{sequence}` of a value.
fn producer_and_sequence(value: &str) -> Option<(&str, u64)> {
    let (name, seq) = value.rsplit_once('-')?;
    Some((name, seq.parse().ok()?))
}

/// Each producer's records appear in each partition in the order it sent them: values are
/// `{producer}-{sequence}`, and an idempotent producer's retries must never put a later record
/// before an earlier one (Kafka's ordering guarantee with idempotence). Records with the same
/// key therefore keep their producer's send order too; a keyed record out of order is reported
/// with its key and the record of that key it overtook.
pub(super) fn send_order(h: &History, r: &mut Report) {
    for (p, log) in &h.final_log {
        // The last (sequence, offset) per producer, and per (producer, key).
        let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        let mut last_of_key: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
        for (o, v) in log {
            let Some((producer, seq)) = producer_and_sequence(v) else {
                continue;
            };
            let key = h.keys.get(v).map(String::as_str);
            let overtaken_in_key = key
                .and_then(|k| last_of_key.get(&(producer, k)))
                .filter(|(prev, _)| seq < *prev);
            if let (Some(k), Some((prev_seq, prev_offset))) = (key, overtaken_in_key) {
                r.fail(format!(
                    "partition {p}, key {k}: {v} at offset {o} follows {producer}-{prev_seq:08} at {prev_offset} (out of send order)"
                ));
            } else if let Some((prev_seq, prev_offset)) = last.get(producer)
                && seq < *prev_seq
            {
                r.fail(format!(
                    "partition {p}: {v} at offset {o} follows {producer}-{prev_seq:08} at {prev_offset} (out of send order)"
                ));
            }
            last.insert(producer, (seq, *o));
            if let Some(k) = key {
                last_of_key.insert((producer, k), (seq, *o));
            }
        }
    }
}

/// All records of a key are in one partition (the partitioner is a function of the key and the
/// partition count, which the run does not change), so that their order is kept for consumers.
pub(super) fn key_partitions(h: &History, r: &mut Report) {
    // Key to partition to one of its values there.
    let mut partitions: BTreeMap<&str, BTreeMap<u32, &str>> = BTreeMap::new();
    let in_log = h
        .final_log
        .iter()
        .flat_map(|(p, log)| log.values().map(move |v| (*p, v)));
    let acked = h.writes.iter().filter_map(|(v, outcome)| match outcome {
        Outcome::Acked { partition, .. } => Some((*partition, v)),
        _ => None,
    });
    for (p, v) in in_log.chain(acked) {
        if let Some(k) = h.keys.get(v) {
            partitions
                .entry(k.as_str())
                .or_default()
                .entry(p)
                .or_insert(v.as_str());
        }
    }
    for (k, by_partition) in partitions.into_iter().filter(|(_, m)| m.len() > 1) {
        r.fail(format!(
            "key {k} is in more than one partition (partition: a record there): {by_partition:?}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;
    use crate::faults::history::Outcome;

    #[test]
    fn every_write_breach_is_reported() {
        let mut h = history();
        // Lost: b's offset holds something else; duplicated: a twice; a gap; a stranger.
        h.final_log.insert(0, log(&[(0, "a"), (1, "a"), (3, "zz")]));
        let r = check(&h);
        assert_eq!(r.lost, 1);
        assert_eq!(r.duplicated, 1);
        let all = r.violations.join("\n");
        for needle in [
            "gap",
            "more than once",
            "never written",
            "holds Some(\"a\")",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
        let mut refused_written = history();
        refused_written
            .final_log
            .insert(0, log(&[(0, "a"), (1, "b"), (2, "d")]));
        only_violation(&refused_written, "refused definitely");
    }

    #[test]
    fn records_below_the_log_start_are_excused_only_when_retention_deleted_them() {
        let mut h = history();
        h.log_start.insert(0, 1);
        h.final_log.insert(0, log(&[(1, "b"), (2, "c")]));
        h.retention_deleted.insert(0);
        passes(&h);
        // The same log without retention: the start is a violation and a is lost.
        h.retention_deleted.clear();
        let r = check(&h);
        assert_eq!(r.lost, 1, "{r}");
        assert_eq!(r.violations.len(), 2, "{r}");
        assert!(
            r.violations[0].contains("starts at offset 1, but retention deleted nothing"),
            "{r}"
        );
        // A log start above 0 without retention is a violation even when nothing acknowledged
        // was below it.
        let mut h = history();
        h.writes.insert("a".into(), Outcome::Unknown);
        h.log_start.insert(0, 1);
        h.final_log.insert(0, log(&[(1, "b"), (2, "c")]));
        only_violation(&h, "retention deleted nothing");
    }

    #[test]
    fn a_producer_s_records_out_of_send_order_are_a_violation() {
        let mut h = History::default();
        for (value, offset) in [("p1-00000002", 0), ("p2-00000001", 1), ("p1-00000001", 2)] {
            h.writes.insert(value.into(), acked(0, offset));
        }
        h.final_log.insert(
            0,
            log(&[(0, "p1-00000002"), (1, "p2-00000001"), (2, "p1-00000001")]),
        );
        only_violation(&h, "out of send order");
        // Another producer's records in between, and sequence gaps, are fine.
        h.final_log.insert(
            0,
            log(&[(0, "p1-00000001"), (1, "p2-00000001"), (2, "p1-00000002")]),
        );
        h.writes.insert("p1-00000001".into(), acked(0, 0));
        h.writes.insert("p1-00000002".into(), acked(0, 2));
        passes(&h);
    }

    #[test]
    fn a_key_s_records_out_of_send_order_are_reported_with_the_key() {
        let mut h = History::default();
        let values = [
            (0, "k-00000003", "k1"),
            (1, "k-00000004", "k2"),
            (2, "k-00000001", "k1"),
        ];
        for (offset, value, key) in values {
            h.writes.insert(value.into(), acked(0, offset));
            h.keys.insert(value.into(), key.into());
        }
        h.final_log.insert(
            0,
            values
                .iter()
                .map(|(o, v, _)| (*o, (*v).to_owned()))
                .collect(),
        );
        only_violation(
            &h,
            "partition 0, key k1: k-00000001 at offset 2 follows k-00000003 at 0",
        );
        // In send order per key, with the keys interleaved: fine.
        h.keys.insert("k-00000001".into(), "k2".into());
        h.keys.insert("k-00000004".into(), "k1".into());
        h.keys.insert("k-00000003".into(), "k3".into());
        let r = check(&h);
        assert!(
            r.violations.iter().all(|v| !v.contains("key")),
            "only the producer's order is broken now: {r}"
        );
    }

    #[test]
    fn a_key_in_two_partitions_is_a_violation() {
        let mut h = History::default();
        for (p, value) in [(0, "k-00000001"), (1, "k-00000002")] {
            h.writes.insert(value.into(), acked(p, 0));
            h.keys.insert(value.into(), "k7".into());
            h.final_log.insert(p, log(&[(0, value)]));
        }
        only_violation(&h, "key k7 is in more than one partition");
        // An acknowledged record lost from its partition still counts where it was acked.
        h.final_log.insert(1, log(&[(0, "x-00000001")]));
        h.writes.insert("x-00000001".into(), Outcome::Unknown);
        let r = check(&h);
        assert!(r.violations.iter().any(|v| v.contains("key k7")), "{r}");
        // Different keys in different partitions: fine.
        let mut h = History::default();
        for (p, value, key) in [(0, "k-00000001", "k1"), (1, "k-00000002", "k2")] {
            h.writes.insert(value.into(), acked(p, 0));
            h.keys.insert(value.into(), key.into());
            h.final_log.insert(p, log(&[(0, value)]));
        }
        passes(&h);
    }
}
