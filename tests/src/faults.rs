//! The fault-injection suite's pure parts: a seeded fault schedule and the checker that
//! verifies the brief's invariants from a recorded history. No IO, so both are unit-tested
//! here and a failing run can be replayed from its printed seed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// SplitMix64: tiny, seedable and the same everywhere, so a schedule is reproducible from its
/// seed without a random-number crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Which broker a fault hits: resolved when it happens, since leaders move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Broker `n` (1-based).
    Node(u32),
    /// The leader of partition `p` of the test topic.
    LeaderOf(u32),
    /// The metadata Raft group's leader.
    MetadataLeader,
    /// The coordinator of the test's consumer group.
    GroupCoordinator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `kill -9`, then a restart after `hold_ms`.
    Kill,
    /// SIGSTOP for `hold_ms` (longer than an election timeout), then SIGCONT.
    Pause,
    /// Cut the broker off the others (both directions) for `hold_ms`.
    Isolate,
    /// An asymmetric cut: the broker's packets to the others are dropped for `hold_ms`, theirs
    /// to it still arrive (it hears the cluster, the cluster never hears it).
    OneWay,
    /// A partial partition: the broker and the next one (by id) cannot reach each other for
    /// `hold_ms`, while the third still reaches both.
    CutPair,
    /// Lose responses on the clients' links to the broker (the request was processed, the
    /// answer never arrives) for `hold_ms`: the clients retry, and idempotent producing must
    /// not write anything twice.
    DropResponses,
    /// Power loss of the broker: every byte it did not fsync is lost, and it is down for
    /// `hold_ms`.
    PowerLoss,
    /// Its fsyncs fail for `hold_ms` (pages that failed are lost to the disk, as on Linux).
    FailFsync,
    /// Power loss of every broker at once, then all restart after `hold_ms`. The one fault
    /// that takes more than a minority down: it tests unavailability and recovery from it.
    PowerLossAll,
    /// The broker loses its data directory (`kill -9`, the directory deleted): started again
    /// it must be refused and stop; after `keel cluster replace-broker` it rejoins and every
    /// replica it had is rebuilt from the others. Down for at least `hold_ms`.
    Wipe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Milliseconds after the previous fault healed.
    pub after_ms: u64,
    pub kind: FaultKind,
    pub target: Target,
    pub hold_ms: u64,
    /// While this fault holds, the clients' link to this broker also loses responses: a
    /// second, overlapping fault that takes no replica down.
    pub lose_responses: Option<u32>,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{}ms {:?} {:?} for {}ms",
            self.after_ms, self.kind, self.target, self.hold_ms
        )?;
        if let Some(n) = self.lose_responses {
            write!(f, " + lost responses on broker {n}")?;
        }
        Ok(())
    }
}

/// Every fault kind, in the order a schedule's first faults go through them: those that need
/// iptables (root) only with `isolate`; the rare ones (a wiped broker, a whole-cluster power
/// loss) last. A run of at least this many faults covers every kind.
pub fn first_pass(isolate: bool) -> Vec<FaultKind> {
    let mut kinds = vec![
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::PowerLoss,
        FaultKind::DropResponses,
        FaultKind::FailFsync,
    ];
    if isolate {
        kinds.extend([FaultKind::Isolate, FaultKind::OneWay, FaultKind::CutPair]);
    }
    kinds.extend([FaultKind::Wipe, FaultKind::PowerLossAll]);
    kinds
}

/// `count` faults, one at a time: apart from `PowerLossAll`, at most one broker of three is
/// down or cut off, so a majority remains. The first faults go through every kind and every
/// target kind, so even a short schedule covers them all; the rest are random, with a
/// whole-cluster power loss and a wiped broker rarer than the others. After the first pass, the first fault and
/// then about half of the others that take a broker down or cut it off also lose responses on
/// the clients' link to a broker while they hold (drawn from a second stream, so a seed's main
/// schedule is the same with or without overlaps).
pub fn schedule(seed: u64, count: usize, nodes: u32, partitions: u32, isolate: bool) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut over = Rng::new(seed ^ 0x6f76_6572_6c61_7073);
    let kinds = first_pass(isolate);
    // The kinds drawn at random after the first pass (the rare ones are drawn apart).
    let first = kinds.len() - 2;
    let targets = |rng: &mut Rng| match rng.range(0, 3) {
        0 => Target::Node(rng.range(1, u64::from(nodes)) as u32),
        1 => Target::LeaderOf(rng.range(0, u64::from(partitions.max(1)) - 1) as u32),
        2 => Target::MetadataLeader,
        _ => Target::GroupCoordinator,
    };
    let fixed_targets = [
        Target::LeaderOf(0),
        Target::MetadataLeader,
        Target::GroupCoordinator,
        Target::Node(nodes),
    ];
    (0..count)
        .map(|i| {
            // Whole-cluster power losses and wiped brokers stay rare after the first pass (a
            // wipe rebuilds every replica the broker had). Drawn so that a seed's schedule is
            // the one it was before wipes existed up to its first wipe.
            let kind = if i < kinds.len() {
                kinds[i]
            } else {
                match rng.range(0, 19) {
                    0 => FaultKind::PowerLossAll,
                    1 => FaultKind::Wipe,
                    _ => kinds[rng.range(0, first as u64 - 1) as usize],
                }
            };
            let target = if i < fixed_targets.len() {
                fixed_targets[i]
            } else {
                targets(&mut rng)
            };
            let overlaps = !matches!(
                kind,
                FaultKind::DropResponses | FaultKind::PowerLossAll | FaultKind::Wipe
            ) && i >= kinds.len()
                && (over.range(0, 1) == 0 || i == kinds.len());
            Fault {
                after_ms: rng.range(500, 2500),
                kind,
                target,
                // Longer than an election timeout (0.4-0.8 s for partitions, 0.6-1.2 s for the
                // metadata group), so leaders really move.
                hold_ms: rng.range(1500, 4000),
                lose_responses: overlaps.then(|| over.range(1, u64::from(nodes)) as u32),
            }
        })
        .collect()
}

/// What one producer's write became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged (`acks=all`) at this partition and offset.
    Acked { partition: u32, offset: u64 },
    /// Failed with an error the broker marked definite: nothing was written.
    Refused,
    /// Failed without a definite answer: it may or may not be in the log.
    Unknown,
}

/// Everything the run observed.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// Every value written (all distinct) and what became of it.
    pub writes: BTreeMap<String, Outcome>,
    /// The final contents of each partition as read through the cluster: offset to value.
    pub final_log: BTreeMap<u32, BTreeMap<u64, String>>,
    /// Each partition's log start when read (records below it were deleted by retention).
    pub log_start: BTreeMap<u32, u64>,
    /// Each consumer's deliveries in the order it saw them: (partition, offset, value).
    pub consumed: BTreeMap<String, Vec<(u32, u64, String)>>,
    /// Each group's committed offsets per partition in the order they were committed.
    pub commits: BTreeMap<(String, u32), Vec<u64>>,
    /// Each replica's committed prefix per partition (a digest per batch), by broker.
    pub replicas: BTreeMap<u32, BTreeMap<u32, Vec<String>>>,
}

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
    let fail = |r: &mut Report, msg: String| r.violations.push(msg);

    // Where each value ended up.
    let mut found: BTreeMap<&str, Vec<(u32, u64)>> = BTreeMap::new();
    for (p, log) in &h.final_log {
        for (o, v) in log {
            found.entry(v.as_str()).or_default().push((*p, *o));
        }
        // Offsets are contiguous from the log start to the end read.
        let start = h.log_start.get(p).copied().unwrap_or(0);
        let mut expect = start;
        for o in log.keys() {
            if *o != expect {
                fail(
                    &mut r,
                    format!("partition {p}: offset {o} follows {expect} (gap or reordering)"),
                );
            }
            expect = o + 1;
        }
    }
    for (value, outcome) in &h.writes {
        let at = found.get(value.as_str());
        match outcome {
            Outcome::Acked { partition, offset } => {
                r.acknowledged += 1;
                let below_start = h.log_start.get(partition).is_some_and(|s| offset < s);
                let here = h
                    .final_log
                    .get(partition)
                    .and_then(|l| l.get(offset))
                    .map(String::as_str);
                if here != Some(value.as_str()) && !below_start {
                    r.lost += 1;
                    fail(
                        &mut r,
                        format!(
                            "acknowledged {value} at {partition}/{offset} but the log holds {here:?} there"
                        ),
                    );
                }
            }
            Outcome::Refused => {
                r.refused += 1;
                if at.is_some() {
                    fail(
                        &mut r,
                        format!("{value} was refused definitely but is in the log at {at:?}"),
                    );
                }
            }
            Outcome::Unknown => {
                r.unknown += 1;
                if at.is_some() {
                    r.unknown_written += 1;
                }
            }
        }
        if at.is_some_and(|a| a.len() > 1) {
            r.duplicated += 1;
            fail(
                &mut r,
                format!(
                    "{value} written more than once: {:?}",
                    at.unwrap_or(&vec![])
                ),
            );
        }
    }
    for (value, places) in &found {
        if !h.writes.contains_key(*value) {
            fail(
                &mut r,
                format!("{value} at {places:?} was never written by this run"),
            );
        }
    }

    // Consumers: per partition in offset order, without skipping, and what they read is what
    // the log holds at that offset.
    for (consumer, seen) in &h.consumed {
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        for (p, o, v) in seen {
            if let Some(prev) = last.get(p) {
                // A redelivery after a rebalance or crash restarts at a committed offset, which
                // is at or below what was seen; a jump forward past unseen offsets is a skip.
                if *o > prev + 1 {
                    let skipped_deleted = h.log_start.get(p).is_some_and(|s| *o <= *s);
                    if !skipped_deleted {
                        fail(&mut r, format!("{consumer} skipped {p}/{}..{o}", prev + 1));
                    }
                }
            }
            last.insert(*p, *o);
            if let Some(actual) = h.final_log.get(p).and_then(|l| l.get(o))
                && actual != v
            {
                fail(
                    &mut r,
                    format!("{consumer} read {v} at {p}/{o}, which holds {actual}"),
                );
            }
        }
    }

    // Each producer's records appear in each partition in the order it sent them: values are
    // `{producer}-{sequence}`, and an idempotent producer's retries must never put a later
    // record before an earlier one (Kafka's ordering guarantee with idempotence).
    for (p, log) in &h.final_log {
        let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (o, v) in log {
            let Some((producer, seq)) = v
                .rsplit_once('-')
                .and_then(|(name, seq)| Some((name, seq.parse::<u64>().ok()?)))
            else {
                continue;
            };
            if let Some((prev_seq, prev_offset)) = last.get(producer)
                && seq < *prev_seq
            {
                fail(
                    &mut r,
                    format!(
                        "partition {p}: {v} at offset {o} follows {producer}-{prev_seq:08} at {prev_offset} (out of send order)"
                    ),
                );
            }
            last.insert(producer, (seq, *o));
        }
    }

    // Committed offsets never move backwards.
    for ((group, p), offsets) in &h.commits {
        for w in offsets.windows(2) {
            if w[1] < w[0] {
                fail(
                    &mut r,
                    format!("group {group} committed {p} at {} after {}", w[1], w[0]),
                );
            }
        }
    }

    // Replicas agree on the committed prefix: the shortest replica's batches are a prefix of
    // every other replica's.
    let partitions: BTreeSet<u32> = h
        .replicas
        .values()
        .flat_map(|m| m.keys().copied())
        .collect();
    for p in partitions {
        let logs: Vec<(u32, &Vec<String>)> = h
            .replicas
            .iter()
            .filter_map(|(b, m)| m.get(&p).map(|l| (*b, l)))
            .collect();
        let Some(shortest) = logs.iter().map(|(_, l)| l.len()).min() else {
            continue;
        };
        for w in logs.windows(2) {
            let (a, la) = w[0];
            let (b, lb) = w[1];
            if la[..shortest] != lb[..shortest] {
                fail(
                    &mut r,
                    format!(
                        "replicas {a} and {b} of partition {p} differ within the first {shortest} batches"
                    ),
                );
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(entries: &[(u64, &str)]) -> BTreeMap<u64, String> {
        entries.iter().map(|(o, v)| (*o, (*v).to_owned())).collect()
    }

    fn history() -> History {
        let mut h = History::default();
        h.writes.insert(
            "a".into(),
            Outcome::Acked {
                partition: 0,
                offset: 0,
            },
        );
        h.writes.insert(
            "b".into(),
            Outcome::Acked {
                partition: 0,
                offset: 1,
            },
        );
        h.writes.insert("c".into(), Outcome::Unknown);
        h.writes.insert("d".into(), Outcome::Refused);
        h.final_log.insert(0, log(&[(0, "a"), (1, "b"), (2, "c")]));
        h
    }

    #[test]
    fn a_clean_history_passes_and_is_counted() {
        let r = check(&history());
        assert!(r.ok(), "{r}");
        assert_eq!(
            (r.acknowledged, r.unknown, r.unknown_written, r.refused),
            (2, 1, 1, 1)
        );
    }

    #[test]
    fn every_invariant_breach_is_reported() {
        let mut h = history();
        // Lost: b's offset holds something else; duplicated: a twice; a gap; a stranger.
        h.final_log.insert(0, log(&[(0, "a"), (1, "a"), (3, "zz")]));
        h.consumed
            .insert("c1".into(), vec![(0, 0, "a".into()), (0, 3, "zz".into())]);
        h.commits.insert(("g".into(), 0), vec![5, 7, 6]);
        h.replicas
            .insert(1, [(0, vec!["x".into(), "y".into()])].into());
        h.replicas
            .insert(2, [(0, vec!["x".into(), "z".into()])].into());
        let r = check(&h);
        assert_eq!(r.lost, 1);
        assert_eq!(r.duplicated, 1);
        let all = r.violations.join("\n");
        for needle in [
            "gap",
            "more than once",
            "never written",
            "skipped",
            "committed 0 at 6 after 7",
            "differ",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
        let refused_written = History {
            writes: [("d".to_owned(), Outcome::Refused)].into(),
            final_log: [(0, log(&[(0, "d")]))].into(),
            ..History::default()
        };
        assert!(!check(&refused_written).ok());
    }

    #[test]
    fn a_producer_s_records_out_of_send_order_are_a_violation() {
        let acked = |offset| Outcome::Acked {
            partition: 0,
            offset,
        };
        let mut h = History::default();
        for (value, offset) in [("p1-00000002", 0), ("p2-00000001", 1), ("p1-00000001", 2)] {
            h.writes.insert(value.into(), acked(offset));
        }
        h.final_log.insert(
            0,
            log(&[(0, "p1-00000002"), (1, "p2-00000001"), (2, "p1-00000001")]),
        );
        let r = check(&h);
        assert_eq!(r.violations.len(), 1, "{r}");
        assert!(r.violations[0].contains("out of send order"), "{r}");
        // Another producer's records in between, and sequence gaps, are fine.
        h.final_log.insert(
            0,
            log(&[(0, "p1-00000001"), (1, "p2-00000001"), (2, "p1-00000002")]),
        );
        h.writes.insert("p1-00000001".into(), acked(0));
        h.writes.insert("p1-00000002".into(), acked(2));
        assert!(check(&h).ok(), "{}", check(&h));
    }

    #[test]
    fn records_below_the_log_start_are_not_lost() {
        let mut h = history();
        h.log_start.insert(0, 1);
        h.final_log.insert(0, log(&[(1, "b"), (2, "c")]));
        assert!(check(&h).ok(), "{}", check(&h));
    }

    #[test]
    fn schedules_are_reproducible_and_cover_every_kind_first() {
        let a = schedule(42, 12, 3, 3, true);
        assert_eq!(a, schedule(42, 12, 3, 3, true));
        assert_ne!(a, schedule(43, 12, 3, 3, true));
        let kinds: BTreeSet<String> = a[..10].iter().map(|f| format!("{:?}", f.kind)).collect();
        assert_eq!(kinds.len(), 10, "every kind in the first ten: {a:?}");
        assert_eq!(a[8].kind, FaultKind::Wipe);
        assert_eq!(a[9].kind, FaultKind::PowerLossAll);
        assert!(a.iter().all(|f| f.hold_ms >= 1500));
        assert!(a[..4].iter().any(|f| f.target == Target::GroupCoordinator));
        let no_net = schedule(1, 20, 3, 3, false);
        assert!(no_net.iter().all(|f| !matches!(
            f.kind,
            FaultKind::Isolate | FaultKind::OneWay | FaultKind::CutPair
        )));
        let no_net_kinds: BTreeSet<String> = no_net[..7]
            .iter()
            .map(|f| format!("{:?}", f.kind))
            .collect();
        assert_eq!(no_net_kinds.len(), 7);
        // The whole-cluster outage stays rare after the first pass.
        let long = schedule(7, 400, 3, 3, true);
        let outages = long[10..]
            .iter()
            .filter(|f| f.kind == FaultKind::PowerLossAll)
            .count();
        assert!(
            (5..=45).contains(&outages),
            "{outages} whole-cluster power losses"
        );
        let wipes = long[10..]
            .iter()
            .filter(|f| f.kind == FaultKind::Wipe)
            .count();
        assert!((5..=45).contains(&wipes), "{wipes} wiped brokers");
        let overlapping = long.iter().filter(|f| f.lose_responses.is_some()).count();
        assert!(
            (100..=250).contains(&overlapping),
            "{overlapping} overlapping faults"
        );
        assert!(long[..10].iter().all(|f| f.lose_responses.is_none()));
        assert!(
            long.iter()
                .all(|f| f.lose_responses.is_none_or(|n| (1..=3).contains(&n)))
        );
        assert!(no_net.iter().all(|f| match f.target {
            Target::Node(n) => (1..=3).contains(&n),
            Target::LeaderOf(p) => p < 3,
            _ => true,
        }));
    }
}
