//! A seeded schedule of faults: every kind in use first, then random draws, each stream of
//! draws (kinds and targets, overlaps, parameters) apart, so that adding one leaves the others'
//! draws as they were.

use super::kind::{Also, Fault, FaultKind, Kinds, Netem, Params, Target};

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
/// Every fault kind in use, in the order a schedule's first faults go through them; the rare
/// ones (a wiped broker, a whole-cluster power loss) last. A run of at least this many faults
/// covers every kind.
pub fn first_pass(kinds: Kinds) -> Vec<FaultKind> {
    let Kinds {
        isolate,
        link,
        clock,
        wipe,
        power,
    } = kinds;
    let mut kinds = vec![FaultKind::Kill, FaultKind::Pause];
    if power {
        kinds.push(FaultKind::PowerLoss);
    }
    kinds.extend([FaultKind::DropResponses, FaultKind::FailFsync]);
    if isolate {
        kinds.extend([FaultKind::Isolate, FaultKind::OneWay, FaultKind::CutPair]);
    }
    if link {
        kinds.push(FaultKind::LinkDegrade);
    }
    if clock {
        kinds.push(FaultKind::ClockJump);
    }
    kinds.extend([FaultKind::BitFlip, FaultKind::KillWhileCatchingUp]);
    if wipe {
        kinds.push(FaultKind::Wipe);
    }
    if power {
        kinds.push(FaultKind::PowerLossAll);
    }
    kinds
}

/// `count` faults, one at a time: apart from `PowerLossAll`, at most one broker of three is
/// down or cut off, so a majority remains. The first faults go through every kind and every
/// target kind, so even a short schedule covers them all; the rest are random, with a
/// whole-cluster power loss and a wiped broker rarer than the others. After the first pass, the first fault and
/// then about half of the others that take a broker down or cut it off also lose responses on
/// the clients' link to a broker while they hold (drawn from a second stream, so a seed's main
/// schedule is the same with or without overlaps). The parameters of degraded links and clock
/// jumps come from a third stream, so they do not move the others' draws.
pub fn schedule(
    seed: u64,
    count: usize,
    nodes: u32,
    partitions: u32,
    use_kinds: Kinds,
) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut over = Rng::new(seed ^ 0x6f76_6572_6c61_7073);
    let mut param = Rng::new(seed ^ 0x7061_7261_6d73);
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
                    0 if use_kinds.power => FaultKind::PowerLossAll,
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
                params: params(kind, &mut param),
                also: None,
            }
        })
        .collect()
}

/// A degraded link's or a clock jump's parameters. Links: 50-400 ms of delay each way (so a
/// round trip of 0.1-0.8 s, around the election timeouts), jitter up to half of it, 5-30% loss
/// and 1-5% duplicates. Clocks: forward or backward, by 2-59 s or by 1-12 h (below the default
/// producer-id expiry of 24 h).
fn params(kind: FaultKind, rng: &mut Rng) -> Params {
    match kind {
        FaultKind::LinkDegrade => {
            let delay_ms = rng.range(50, 400) as u32;
            Params::Link(Netem {
                delay_ms,
                jitter_ms: rng.range(0, u64::from(delay_ms / 2)) as u32,
                loss_pct: rng.range(5, 30) as u32,
                duplicate_pct: rng.range(1, 5) as u32,
            })
        }
        FaultKind::ClockJump => {
            let backward = rng.range(0, 1) == 0;
            let secs = if rng.range(0, 1) == 0 {
                rng.range(2, 59)
            } else {
                rng.range(1, 12) * 3600
            } as i64;
            Params::Clock {
                offset_s: if backward { -secs } else { secs },
            }
        }
        FaultKind::BitFlip => Params::Flip {
            pick: rng.next_u64(),
        },
        FaultKind::Reassign => Params::Move {
            pick: rng.next_u64(),
        },
        _ => Params::None,
    }
}

/// The replica set a `Reassign` moves a partition to: as many replicas as it has (at most as
/// many as there are `brokers`), drawn from `brokers` by `pick`; never `current` in the same
/// order (so that at least the preferred leader changes).
pub fn new_replicas(current: &[u32], brokers: &[u32], pick: u64) -> Vec<u32> {
    let mut rng = Rng::new(pick);
    let mut pool = brokers.to_vec();
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.range(0, i as u64) as usize);
    }
    pool.truncate(current.len().min(brokers.len()).max(1));
    if pool == current {
        pool.rotate_left(1);
    }
    pool
}

/// The first pass of a five-broker run: every pair it uses, first and second kind. Each simple
/// kind in use appears, paired so that the two together take two brokers down or cut them off
/// (a majority of an RF 5 partition remains, not of an RF 3 one that had both); then a move of a
/// partition and a decommission, each with a broker killed in the middle.
pub fn first_pass_pairs(kinds: Kinds) -> Vec<(FaultKind, FaultKind)> {
    use FaultKind::*;
    let mut pairs = vec![(Kill, Kill), (Pause, FailFsync)];
    if kinds.power {
        pairs.push((PowerLoss, PowerLoss));
    }
    pairs.push((DropResponses, Kill));
    if kinds.isolate {
        pairs.extend([(Isolate, OneWay), (CutPair, Kill)]);
    }
    if kinds.link {
        pairs.push((LinkDegrade, Pause));
    }
    if kinds.clock {
        pairs.push((ClockJump, Kill));
    }
    pairs.extend([(Reassign, Kill), (Decommission, Kill)]);
    pairs
}

/// `count` faults for five brokers, each two at once: a fault and [`Fault::also`] on another
/// broker. The first faults go through [`first_pass_pairs`]; after it, one in six moves a
/// partition with a broker fault in the middle, the others pair two simple kinds drawn at
/// random (degraded links only first: the run has one netfilter queue). Only the first pass
/// decommissions a broker. Targets, overlapping lost responses and parameters are drawn as in
/// [`schedule`].
pub fn schedule_pairs(
    seed: u64,
    count: usize,
    nodes: u32,
    partitions: u32,
    use_kinds: Kinds,
) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut over = Rng::new(seed ^ 0x6f76_6572_6c61_7073);
    let mut param = Rng::new(seed ^ 0x7061_7261_6d73);
    let pairs = first_pass_pairs(use_kinds);
    let simple: Vec<FaultKind> = first_pass(Kinds {
        wipe: false,
        ..use_kinds
    })
    .into_iter()
    .filter(|k| k.is_simple())
    .collect();
    let seconds: Vec<FaultKind> = simple
        .iter()
        .copied()
        .filter(|k| *k != FaultKind::LinkDegrade)
        .collect();
    let partition = |rng: &mut Rng| rng.range(0, u64::from(partitions.max(1)) - 1) as u32;
    let target = |rng: &mut Rng| match rng.range(0, 3) {
        0 => Target::Node(rng.range(1, u64::from(nodes)) as u32),
        1 => Target::LeaderOf(partition(rng)),
        2 => Target::MetadataLeader,
        _ => Target::GroupCoordinator,
    };
    (0..count)
        .map(|i| {
            let (kind, second) = if i < pairs.len() {
                pairs[i]
            } else if rng.range(0, 5) == 0 {
                (FaultKind::Reassign, FaultKind::Kill)
            } else {
                (
                    simple[rng.range(0, simple.len() as u64 - 1) as usize],
                    seconds[rng.range(0, seconds.len() as u64 - 1) as usize],
                )
            };
            // A move's target is the partition moved (its leader is hit in the middle of it);
            // a decommission's the broker removed.
            let (first_target, second_target) = match kind {
                FaultKind::Reassign => {
                    let p = partition(&mut rng);
                    (Target::LeaderOf(p), Target::LeaderOf(p))
                }
                FaultKind::Decommission => (
                    Target::Node(rng.range(1, u64::from(nodes)) as u32),
                    Target::LeaderOf(partition(&mut rng)),
                ),
                _ => (target(&mut rng), target(&mut rng)),
            };
            let overlaps = kind.is_simple()
                && kind != FaultKind::DropResponses
                && i >= pairs.len()
                && over.range(0, 1) == 0;
            Fault {
                after_ms: rng.range(500, 2500),
                kind,
                target: first_target,
                hold_ms: rng.range(1500, 4000),
                lose_responses: overlaps.then(|| over.range(1, u64::from(nodes)) as u32),
                params: params(kind, &mut param),
                also: Some(Also {
                    kind: second,
                    target: second_target,
                    params: params(second, &mut param),
                }),
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
        link: true,
        clock: true,
        wipe: true,
        power: true,
    };

    #[test]
    fn a_run_without_power_losses_never_schedules_one() {
        let kinds = Kinds {
            power: false,
            ..ALL
        };
        let faults = schedule(11, 500, 3, 3, kinds);
        assert!(
            faults
                .iter()
                .all(|f| !matches!(f.kind, FaultKind::PowerLoss | FaultKind::PowerLossAll))
        );
        let without = first_pass(kinds);
        let missing: Vec<FaultKind> = first_pass(ALL)
            .into_iter()
            .filter(|k| !without.contains(k))
            .collect();
        assert_eq!(missing, [FaultKind::PowerLoss, FaultKind::PowerLossAll]);
    }

    #[test]
    fn a_run_without_wipes_differs_only_by_them_in_the_first_pass() {
        let without = schedule(7, 400, 3, 3, Kinds { wipe: false, ..ALL });
        assert!(without.iter().all(|f| f.kind != FaultKind::Wipe));
        // The first pass differs only by the wipe itself.
        assert_eq!(without[..12], schedule(7, 400, 3, 3, ALL)[..12]);
    }

    #[test]
    fn schedules_are_reproducible_and_cover_every_kind_first() {
        let a = schedule(42, 16, 3, 3, ALL);
        assert_eq!(a, schedule(42, 16, 3, 3, ALL));
        assert_ne!(a, schedule(43, 16, 3, 3, ALL));
        let kinds: BTreeSet<String> = a[..14].iter().map(|f| format!("{:?}", f.kind)).collect();
        assert_eq!(kinds.len(), 14, "every kind in the first fourteen: {a:?}");
        assert_eq!(a[12].kind, FaultKind::Wipe);
        assert_eq!(a[13].kind, FaultKind::PowerLossAll);
        assert!(a.iter().all(|f| f.hold_ms >= 1500));
        assert!(a[..4].iter().any(|f| f.target == Target::GroupCoordinator));
        let no_net = schedule(
            1,
            20,
            3,
            3,
            Kinds {
                isolate: false,
                link: false,
                clock: false,
                wipe: true,
                power: true,
            },
        );
        assert!(no_net.iter().all(|f| !matches!(
            f.kind,
            FaultKind::Isolate
                | FaultKind::OneWay
                | FaultKind::CutPair
                | FaultKind::LinkDegrade
                | FaultKind::ClockJump
        )));
        let no_net_kinds: BTreeSet<String> = no_net[..9]
            .iter()
            .map(|f| format!("{:?}", f.kind))
            .collect();
        assert_eq!(no_net_kinds.len(), 9);
        // The whole-cluster outage stays rare after the first pass.
        let long = schedule(7, 400, 3, 3, ALL);
        let outages = long[12..]
            .iter()
            .filter(|f| f.kind == FaultKind::PowerLossAll)
            .count();
        assert!(
            (5..=45).contains(&outages),
            "{outages} whole-cluster power losses"
        );
        let wipes = long[12..]
            .iter()
            .filter(|f| f.kind == FaultKind::Wipe)
            .count();
        assert!((5..=45).contains(&wipes), "{wipes} wiped brokers");
        let overlapping = long.iter().filter(|f| f.lose_responses.is_some()).count();
        assert!(
            (100..=250).contains(&overlapping),
            "{overlapping} overlapping faults"
        );
        assert!(long[..12].iter().all(|f| f.lose_responses.is_none()));
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

    #[test]
    fn moves_keep_the_replication_factor_and_change_the_set_or_its_leader() {
        let brokers = [1, 2, 4, 5];
        let mut sets = BTreeSet::new();
        for pick in 0..200 {
            let to = new_replicas(&[1, 2, 3], &brokers, pick);
            assert_eq!(to.len(), 3);
            assert!(to.iter().all(|b| brokers.contains(b)), "{to:?}");
            assert_eq!(to.iter().collect::<BTreeSet<_>>().len(), 3, "{to:?}");
            sets.insert(to);
            let all = new_replicas(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5], pick);
            assert_ne!(all, [1, 2, 3, 4, 5]);
            assert_eq!(all.len(), 5);
        }
        assert!(sets.len() > 10, "{} sets", sets.len());
        // More replicas than brokers left: as many as there are.
        assert_eq!(new_replicas(&[1, 2, 3, 4, 5], &[1, 2, 3, 4], 7).len(), 4);
    }

    #[test]
    fn five_broker_schedules_pair_every_simple_kind_then_move_and_decommission() {
        let pairs = first_pass_pairs(ALL);
        let a = schedule_pairs(5, 300, 5, 3, ALL);
        assert_eq!(a, schedule_pairs(5, 300, 5, 3, ALL));
        for (f, (first, second)) in a.iter().zip(&pairs) {
            assert_eq!((f.kind, f.also.map(|x| x.kind)), (*first, Some(*second)));
        }
        let used: BTreeSet<String> = a[..pairs.len()]
            .iter()
            .flat_map(|f| [f.kind, f.also.expect("paired").kind])
            .map(|k| format!("{k:?}"))
            .collect();
        for k in first_pass(ALL)
            .into_iter()
            .filter(|k| k.is_simple())
            .chain([FaultKind::Reassign, FaultKind::Decommission])
        {
            assert!(used.contains(&format!("{k:?}")), "{k:?} missing: {used:?}");
        }
        // Every fault is two at once, a decommission happens once, moves stay a minority.
        assert!(a.iter().all(|f| f.also.is_some_and(|x| x.kind.is_simple())));
        assert_eq!(
            a.iter()
                .filter(|f| f.kind == FaultKind::Decommission)
                .count(),
            1
        );
        let moves = a.iter().filter(|f| f.kind == FaultKind::Reassign).count();
        assert!((25..=80).contains(&moves), "{moves} moves");
        assert!(a.iter().all(|f| match f.kind {
            FaultKind::Reassign => matches!(f.params, Params::Move { .. }),
            _ => f.kind.is_simple() || f.kind == FaultKind::Decommission,
        }));
        // Only one degraded link at a time (one netfilter queue).
        assert!(
            a.iter()
                .all(|f| f.also.is_none_or(|x| x.kind != FaultKind::LinkDegrade))
        );
        assert!(a.iter().all(|f| match f.target {
            Target::Node(n) => (1..=5).contains(&n),
            Target::LeaderOf(p) => p < 3,
            _ => true,
        }));
        // Without root, no cut and no degraded link is drawn.
        let plain = Kinds {
            isolate: false,
            link: false,
            ..ALL
        };
        assert!(schedule_pairs(9, 200, 5, 3, plain).iter().all(|f| {
            [Some(f.kind), f.also.map(|x| x.kind)].iter().all(|k| {
                !matches!(
                    k,
                    Some(
                        FaultKind::Isolate
                            | FaultKind::OneWay
                            | FaultKind::CutPair
                            | FaultKind::LinkDegrade
                    )
                )
            })
        }));
    }

    #[test]
    fn degraded_links_and_clock_jumps_draw_their_parameters_from_the_seed() {
        let long = schedule(11, 400, 3, 3, ALL);
        assert_eq!(long, schedule(11, 400, 3, 3, ALL));
        let (mut links, mut forward, mut backward, mut hours) = (0, 0, 0, 0);
        for f in &long {
            match (f.kind, f.params) {
                (FaultKind::LinkDegrade, Params::Link(n)) => {
                    links += 1;
                    assert!((50..=400).contains(&n.delay_ms), "{f}");
                    assert!(n.jitter_ms <= n.delay_ms / 2, "{f}");
                    assert!((5..=30).contains(&n.loss_pct), "{f}");
                    assert!((1..=5).contains(&n.duplicate_pct), "{f}");
                }
                (FaultKind::ClockJump, Params::Clock { offset_s }) => {
                    let abs = offset_s.unsigned_abs();
                    assert!(
                        (2..=59).contains(&abs)
                            || (abs % 3600 == 0 && (1..=12).contains(&(abs / 3600))),
                        "{f}"
                    );
                    if offset_s > 0 {
                        forward += 1;
                    } else {
                        backward += 1;
                    }
                    hours += usize::from(abs >= 3600);
                }
                (FaultKind::BitFlip, Params::Flip { .. }) => {}
                (FaultKind::LinkDegrade | FaultKind::ClockJump | FaultKind::BitFlip, p) => {
                    panic!("{f}: {p:?}")
                }
                (_, p) => assert_eq!(p, Params::None, "{f}"),
            }
        }
        assert!(links >= 10, "{links} degraded links");
        assert!(
            forward >= 5 && backward >= 5 && hours >= 5,
            "{forward} {backward} {hours}"
        );
        // Without them, the parameters of the others stay empty and their first pass is the
        // kinds before them.
        let without = schedule(
            11,
            12,
            3,
            3,
            Kinds {
                link: false,
                clock: false,
                ..ALL
            },
        );
        assert_eq!(without[..8], long[..8]);
    }
}
