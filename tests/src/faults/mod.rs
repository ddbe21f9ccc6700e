//! The fault-injection suite's pure parts: a seeded fault schedule and the checker that
//! verifies the brief's invariants from a recorded history (`history.rs`, `check/`), and
//! whether retention ran (`retention.rs`). No IO, so all of it is unit-tested and a failing run
//! can be replayed from its printed seed.

use std::fmt;

mod check;
mod history;
pub mod retention;

pub use check::{Report, check};
pub use history::{Batch, CommitOutcome, History, Member, MemberEvent, Outcome, Replicas};

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

/// Which fault kinds a run may use: those that need iptables (root) only with `isolate`;
/// wiped brokers only with `wipe` (opt-in, `KEEL_FAULT_WIPE=1`, until the stall it found is
/// fixed: see docs/testing.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds {
    pub isolate: bool,
    pub wipe: bool,
}

/// Every fault kind in use, in the order a schedule's first faults go through them; the rare
/// ones (a wiped broker, a whole-cluster power loss) last. A run of at least this many faults
/// covers every kind.
pub fn first_pass(kinds: Kinds) -> Vec<FaultKind> {
    let Kinds { isolate, wipe } = kinds;
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
    if wipe {
        kinds.push(FaultKind::Wipe);
    }
    kinds.push(FaultKind::PowerLossAll);
    kinds
}

/// `count` faults, one at a time: apart from `PowerLossAll`, at most one broker of three is
/// down or cut off, so a majority remains. The first faults go through every kind and every
/// target kind, so even a short schedule covers them all; the rest are random, with a
/// whole-cluster power loss and a wiped broker rarer than the others. After the first pass, the first fault and
/// then about half of the others that take a broker down or cut it off also lose responses on
/// the clients' link to a broker while they hold (drawn from a second stream, so a seed's main
/// schedule is the same with or without overlaps).
pub fn schedule(
    seed: u64,
    count: usize,
    nodes: u32,
    partitions: u32,
    use_kinds: Kinds,
) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut over = Rng::new(seed ^ 0x6f76_6572_6c61_7073);
    let kinds = first_pass(use_kinds);
    // The kinds drawn at random after the first pass (the rare ones are drawn apart).
    let first = kinds
        .iter()
        .filter(|k| !matches!(k, FaultKind::Wipe | FaultKind::PowerLossAll))
        .count();
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
                    1 if use_kinds.wipe => FaultKind::Wipe,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const ALL: Kinds = Kinds {
        isolate: true,
        wipe: true,
    };

    #[test]
    fn wipes_are_opt_in_and_change_nothing_else_in_the_first_pass() {
        let without = schedule(
            7,
            400,
            3,
            3,
            Kinds {
                isolate: true,
                wipe: false,
            },
        );
        assert!(without.iter().all(|f| f.kind != FaultKind::Wipe));
        // The first pass differs only by the wipe itself.
        assert_eq!(without[..8], schedule(7, 400, 3, 3, ALL)[..8]);
    }

    #[test]
    fn schedules_are_reproducible_and_cover_every_kind_first() {
        let a = schedule(42, 12, 3, 3, ALL);
        assert_eq!(a, schedule(42, 12, 3, 3, ALL));
        assert_ne!(a, schedule(43, 12, 3, 3, ALL));
        let kinds: BTreeSet<String> = a[..10].iter().map(|f| format!("{:?}", f.kind)).collect();
        assert_eq!(kinds.len(), 10, "every kind in the first ten: {a:?}");
        assert_eq!(a[8].kind, FaultKind::Wipe);
        assert_eq!(a[9].kind, FaultKind::PowerLossAll);
        assert!(a.iter().all(|f| f.hold_ms >= 1500));
        assert!(a[..4].iter().any(|f| f.target == Target::GroupCoordinator));
        let no_net = schedule(
            1,
            20,
            3,
            3,
            Kinds {
                isolate: false,
                wipe: true,
            },
        );
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
        let long = schedule(7, 400, 3, 3, ALL);
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
