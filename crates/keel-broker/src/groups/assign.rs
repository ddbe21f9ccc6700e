//! Computing a group's target assignment.
//!
//! Every strategy obeys the same contract, which the reconciler relies on: each partition of a
//! topic that at least one member subscribes to goes to exactly one member subscribed to that
//! topic, nothing else is assigned, and every member appears in the result (with an empty set if
//! nothing matches), so "no partitions" and "not a member" are never confused. The output depends
//! only on the input, never on iteration order of hash maps or the order of `members`, so every
//! replica of the coordinator computes the same target.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::{Assignment, MemberSpec, Strategy, TopicPartition};

/// Computes the target assignment of `partitions` (topic name to partition count) over
/// `members`. Only [`Strategy::Sticky`] looks at `previous`; the others are functions of the
/// membership alone, as in Kafka.
///
/// Members that share a member id are merged (their subscriptions united) rather than rejected,
/// so a caller's bookkeeping slip cannot make assignment fail or hand one id two entries.
pub fn assign(
    strategy: Strategy,
    members: &[MemberSpec],
    partitions: &BTreeMap<String, u32>,
    previous: &Assignment,
) -> Assignment {
    let mut slots = slots(members);
    match strategy {
        Strategy::Range => range(&mut slots, partitions),
        Strategy::RoundRobin => round_robin(&mut slots, partitions),
        Strategy::Sticky => sticky(&mut slots, partitions, previous),
    }
    slots
        .into_iter()
        .map(|s| (s.member_id.to_owned(), s.owned))
        .collect()
}

/// One member while an assignment is being built.
struct Slot<'a> {
    member_id: &'a str,
    instance_id: Option<&'a str>,
    subscribed: BTreeSet<&'a str>,
    owned: BTreeSet<TopicPartition>,
}

impl Slot<'_> {
    fn subscribes(&self, topic: &str) -> bool {
        self.subscribed.contains(topic)
    }

    fn load(&self) -> usize {
        self.owned.len()
    }
}

/// The members in Kafka's assignor order: static members first, by instance id, then dynamic
/// ones by member id. Sorting static members on the id that survives a restart is what lets range
/// and round-robin give a restarted static member its old partitions back.
fn slots(members: &[MemberSpec]) -> Vec<Slot<'_>> {
    let mut by_id: BTreeMap<&str, Slot<'_>> = BTreeMap::new();
    for m in members {
        let slot = by_id.entry(m.member_id.as_str()).or_insert_with(|| Slot {
            member_id: &m.member_id,
            instance_id: None,
            subscribed: BTreeSet::new(),
            owned: BTreeSet::new(),
        });
        if slot.instance_id.is_none() {
            slot.instance_id = m.instance_id.as_deref();
        }
        slot.subscribed
            .extend(m.subscribed.iter().map(String::as_str));
    }
    let mut slots: Vec<Slot<'_>> = by_id.into_values().collect();
    slots.sort_by_key(|s| (s.instance_id.is_none(), s.instance_id, s.member_id));
    slots
}

/// Every partition that must be assigned: those of topics with at least one subscriber, in
/// topic-then-partition order.
fn assignable(slots: &[Slot<'_>], partitions: &BTreeMap<String, u32>) -> BTreeSet<TopicPartition> {
    partitions
        .iter()
        .filter(|(topic, _)| slots.iter().any(|s| s.subscribes(topic)))
        .flat_map(|(topic, &count)| (0..count).map(|p| TopicPartition::new(topic.as_str(), p)))
        .collect()
}

/// Kafka's RangeAssignor: per topic, the subscribers in order each take a contiguous run, the
/// first `count % n` one partition more than the rest.
fn range(slots: &mut [Slot<'_>], partitions: &BTreeMap<String, u32>) {
    for (topic, &count) in partitions {
        let mut subscribers: Vec<&mut Slot<'_>> =
            slots.iter_mut().filter(|s| s.subscribes(topic)).collect();
        let n = subscribers.len();
        if n == 0 {
            continue;
        }
        let per = count as usize / n;
        let extra = count as usize % n;
        let mut next = 0..count;
        for (k, slot) in subscribers.iter_mut().enumerate() {
            let len = per + usize::from(k < extra);
            for p in next.by_ref().take(len) {
                slot.owned.insert(TopicPartition::new(topic.as_str(), p));
            }
        }
    }
}

/// Kafka's RoundRobinAssignor: all partitions in order, dealt to the members in a circle, skipping
/// a member that does not subscribe to the partition's topic (the deal then continues after the
/// member that took it, not after the one skipped).
fn round_robin(slots: &mut [Slot<'_>], partitions: &BTreeMap<String, u32>) {
    let n = slots.len();
    let mut cursor = 0;
    for tp in assignable(slots, partitions) {
        let taker = (0..n)
            .map(|step| (cursor + step) % n)
            .find(|&i| slots.get(i).is_some_and(|s| s.subscribes(&tp.topic)));
        if let Some(i) = taker
            && let Some(slot) = slots.get_mut(i)
        {
            slot.owned.insert(tp);
            cursor = i + 1;
        }
    }
}

/// Cooperative-sticky: keep what each member already had, hand out what is free, then move the
/// fewest partitions needed to even the load.
///
/// 1. Each member keeps its previous partitions that still exist and that it still subscribes
///    to. If `previous` claims a partition for two members, the first in member order keeps it.
/// 2. Free partitions (new, orphaned by a departed member, or dropped in step 1) go one by one to
///    the least loaded eligible member, those with the fewest eligible members first so that
///    narrowly subscribed partitions are not crowded out.
/// 3. While some member has at least two more partitions than another member that subscribes
///    to one of them, one such partition moves from the most loaded member to the least loaded
///    eligible one.
///
/// With uniform subscriptions this ends with loads differing by at most one, and it moves only
/// partitions in excess of a member's final load, which is the minimum: step 2 only ever raises
/// the least loaded, so no member receives a free partition and later gives one away, and step 3
/// takes from the top and gives to the bottom, so no member both gives and receives.
///
/// With heterogeneous subscriptions step 3 is a greedy best effort: it stops when no single move
/// between an overloaded member and an eligible underloaded one exists, which can leave loads
/// further apart than an optimal (and much costlier, flow-based) balancing would.
///
/// Each move in step 3 lowers the sum of squared loads by at least two, so it terminates; and it
/// stops exactly when no move is possible, so running it again on its own output (as `previous`)
/// changes nothing.
fn sticky(slots: &mut [Slot<'_>], partitions: &BTreeMap<String, u32>, previous: &Assignment) {
    let mut free = assignable(slots, partitions);

    for slot in slots.iter_mut() {
        let Some(prev) = previous.get(slot.member_id) else {
            continue;
        };
        for tp in prev {
            if slot.subscribes(&tp.topic) && free.remove(tp) {
                slot.owned.insert(tp.clone());
            }
        }
    }

    let eligible = |slots: &[Slot<'_>], tp: &TopicPartition| {
        slots.iter().filter(|s| s.subscribes(&tp.topic)).count()
    };
    let mut free: Vec<(usize, TopicPartition)> = free
        .into_iter()
        .map(|tp| (eligible(slots, &tp), tp))
        .collect();
    free.sort();
    for (_, tp) in free {
        let taker = slots
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.subscribes(&tp.topic))
            .min_by_key(|(i, s)| (s.load(), *i));
        if let Some((_, slot)) = taker {
            slot.owned.insert(tp);
        }
    }

    while let Some((from, to, tp)) = next_move(slots) {
        if let Some(slot) = slots.get_mut(from) {
            slot.owned.remove(&tp);
        }
        if let Some(slot) = slots.get_mut(to) {
            slot.owned.insert(tp);
        }
    }
}

/// The move step 3 of [`sticky`] makes next, if any: from the most loaded member that can give
/// to someone at least two below it, to the least loaded such member, the donor's last partition
/// the receiver subscribes to. Ties go to member order, for determinism.
fn next_move(slots: &[Slot<'_>]) -> Option<(usize, usize, TopicPartition)> {
    let mut donors: Vec<(usize, &Slot<'_>)> = slots.iter().enumerate().collect();
    donors.sort_by_key(|(i, s)| (Reverse(s.load()), *i));
    let mut receivers = donors.clone();
    receivers.sort_by_key(|(i, s)| (s.load(), *i));
    for &(d, donor) in &donors {
        for &(r, receiver) in &receivers {
            if receiver.load() + 2 > donor.load() {
                break;
            }
            let movable = donor
                .owned
                .iter()
                .rev()
                .find(|tp| receiver.subscribes(&tp.topic));
            if let Some(tp) = movable {
                return Some((d, r, tp.clone()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};
    use proptest::strategy::Strategy as _;

    fn tp(topic: &str, partition: u32) -> TopicPartition {
        TopicPartition::new(topic, partition)
    }

    fn parts(topics: &[(&str, u32)]) -> BTreeMap<String, u32> {
        topics.iter().map(|&(t, n)| (t.to_owned(), n)).collect()
    }

    fn set(tps: &[(&str, u32)]) -> BTreeSet<TopicPartition> {
        tps.iter().map(|&(t, p)| tp(t, p)).collect()
    }

    fn members(ids: &[&str], topics: &[&str]) -> Vec<MemberSpec> {
        ids.iter()
            .map(|id| MemberSpec::new(*id, topics.iter().copied()))
            .collect()
    }

    fn get<'a>(a: &'a Assignment, id: &str) -> &'a BTreeSet<TopicPartition> {
        a.get(id).expect("member present")
    }

    fn loads(a: &Assignment) -> (usize, usize) {
        let min = a.values().map(BTreeSet::len).min().unwrap_or(0);
        let max = a.values().map(BTreeSet::len).max().unwrap_or(0);
        (min, max)
    }

    /// Partitions that changed owner (or lost it) going from `before` to `after`.
    fn moved(before: &Assignment, after: &Assignment) -> BTreeSet<TopicPartition> {
        let owner_after: BTreeMap<&TopicPartition, &String> = after
            .iter()
            .flat_map(|(m, ps)| ps.iter().map(move |p| (p, m)))
            .collect();
        before
            .iter()
            .flat_map(|(m, ps)| ps.iter().map(move |p| (p, m)))
            .filter(|(p, m)| owner_after.get(p) != Some(m))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// The contract every strategy keeps; `Err` names the first violation.
    fn check_valid(
        out: &Assignment,
        members: &[MemberSpec],
        partitions: &BTreeMap<String, u32>,
    ) -> Result<(), String> {
        let ids: BTreeSet<&str> = members.iter().map(|m| m.member_id.as_str()).collect();
        let keys: BTreeSet<&str> = out.keys().map(String::as_str).collect();
        if ids != keys {
            return Err(format!("members {ids:?} but assignment keys {keys:?}"));
        }
        let mut seen = BTreeSet::new();
        for (id, ps) in out {
            let subscribed: BTreeSet<&str> = members
                .iter()
                .filter(|m| &m.member_id == id)
                .flat_map(|m| m.subscribed.iter().map(String::as_str))
                .collect();
            for p in ps {
                if !subscribed.contains(p.topic.as_str()) {
                    return Err(format!("{id} got {p} without subscribing"));
                }
                if partitions.get(&p.topic).is_none_or(|&n| p.partition >= n) {
                    return Err(format!("{id} got nonexistent {p}"));
                }
                if !seen.insert(p.clone()) {
                    return Err(format!("{p} assigned twice"));
                }
            }
        }
        let wanted: BTreeSet<TopicPartition> = partitions
            .iter()
            .filter(|(t, _)| members.iter().any(|m| m.subscribed.contains(*t)))
            .flat_map(|(t, &n)| (0..n).map(|p| tp(t, p)))
            .collect();
        if seen != wanted {
            let missing: Vec<String> = wanted.difference(&seen).map(|p| p.to_string()).collect();
            return Err(format!("unassigned: {missing:?}"));
        }
        Ok(())
    }

    #[test]
    fn every_strategy_splits_one_topic_evenly() {
        let ms = members(&["a", "b", "c"], &["t"]);
        let ps = parts(&[("t", 6)]);
        for st in Strategy::ALL {
            let out = assign(st, &ms, &ps, &Assignment::new());
            assert_eq!(check_valid(&out, &ms, &ps), Ok(()), "{st}");
            assert!(out.values().all(|s| s.len() == 2), "{st}: {out:?}");
        }
    }

    /// Hand-checked assignments from scratch: (case, strategy, members, partitions, each
    /// member's share).
    #[test]
    fn fresh_assignments_match_worked_examples() {
        type Share = (&'static str, &'static [(&'static str, u32)]);
        type Case = (
            &'static str,
            Strategy,
            Vec<MemberSpec>,
            Vec<(&'static str, u32)>,
            Vec<Share>,
        );
        let cases: Vec<Case> = vec![
            (
                "range gives contiguous runs, the extra to the first members",
                Strategy::Range,
                members(&["c", "a", "b"], &["t", "u"]),
                vec![("t", 7), ("u", 2)],
                vec![
                    ("a", &[("t", 0), ("t", 1), ("t", 2), ("u", 0)]),
                    ("b", &[("t", 3), ("t", 4), ("u", 1)]),
                    ("c", &[("t", 5), ("t", 6)]),
                ],
            ),
            (
                "range only counts the subscribers of each topic",
                Strategy::Range,
                vec![
                    MemberSpec::new("a", ["t"]),
                    MemberSpec::new("b", ["t", "u"]),
                    MemberSpec::new("c", ["v"]),
                ],
                vec![("t", 3), ("u", 2)],
                vec![
                    ("a", &[("t", 0), ("t", 1)]),
                    ("b", &[("t", 2), ("u", 0), ("u", 1)]),
                    ("c", &[]),
                ],
            ),
            (
                "range orders static members by instance id",
                Strategy::Range,
                vec![
                    MemberSpec::new("a", ["t"]),
                    MemberSpec::new("z-restarted", ["t"]).with_instance_id("i1"),
                    MemberSpec::new("m", ["t"]).with_instance_id("i2"),
                ],
                vec![("t", 3)],
                vec![
                    ("z-restarted", &[("t", 0)]),
                    ("m", &[("t", 1)]),
                    ("a", &[("t", 2)]),
                ],
            ),
            (
                "round robin deals across two topics",
                Strategy::RoundRobin,
                members(&["b", "a"], &["t", "u"]),
                vec![("t", 3), ("u", 2)],
                vec![
                    ("a", &[("t", 0), ("t", 2), ("u", 1)]),
                    ("b", &[("t", 1), ("u", 0)]),
                ],
            ),
            (
                // t0 a, t1 b, t2 a (c skipped), u0 b, u1 c, u2 b (a skipped).
                "round robin skips members not subscribed",
                Strategy::RoundRobin,
                vec![
                    MemberSpec::new("a", ["t"]),
                    MemberSpec::new("b", ["t", "u"]),
                    MemberSpec::new("c", ["u"]),
                ],
                vec![("t", 3), ("u", 3)],
                vec![
                    ("a", &[("t", 0), ("t", 2)]),
                    ("b", &[("t", 1), ("u", 0), ("u", 2)]),
                    ("c", &[("u", 1)]),
                ],
            ),
        ];
        for (case, strategy, ms, ps, want) in cases {
            let ps = parts(&ps);
            let out = assign(strategy, &ms, &ps, &Assignment::new());
            assert_eq!(check_valid(&out, &ms, &ps), Ok(()), "{case}");
            for (id, share) in want {
                assert_eq!(get(&out, id), &set(share), "{case}: {id}");
            }
        }
    }

    #[test]
    fn members_without_matching_topics_get_an_empty_entry() {
        let ms = vec![
            MemberSpec::new("a", ["t"]),
            MemberSpec::new("b", ["gone"]),
            MemberSpec::new("c", Vec::<String>::new()),
        ];
        let ps = parts(&[("t", 2), ("unsubscribed", 4)]);
        for st in Strategy::ALL {
            let out = assign(st, &ms, &ps, &Assignment::new());
            assert_eq!(check_valid(&out, &ms, &ps), Ok(()), "{st}");
            assert_eq!(get(&out, "a").len(), 2);
            assert!(get(&out, "b").is_empty() && get(&out, "c").is_empty());
        }
        for st in Strategy::ALL {
            assert!(assign(st, &[], &ps, &Assignment::new()).is_empty());
        }
    }

    #[test]
    fn duplicate_member_ids_are_merged() {
        let ms = vec![MemberSpec::new("a", ["t"]), MemberSpec::new("a", ["u"])];
        let ps = parts(&[("t", 1), ("u", 1)]);
        for st in Strategy::ALL {
            let out = assign(st, &ms, &ps, &Assignment::new());
            assert_eq!(out.len(), 1);
            assert_eq!(get(&out, "a"), &set(&[("t", 0), ("u", 0)]), "{st}");
        }
    }

    #[test]
    fn sticky_join_example_moves_the_minimum_to_the_new_member() {
        let ps = parts(&[("t", 6)]);
        let three = members(&["a", "b", "c"], &["t"]);
        let before = assign(Strategy::Sticky, &three, &ps, &Assignment::new());
        let four = members(&["a", "b", "c", "d"], &["t"]);
        let after = assign(Strategy::Sticky, &four, &ps, &before);
        assert_eq!(check_valid(&after, &four, &ps), Ok(()));
        let moved = moved(&before, &after);
        assert!((1..=2).contains(&moved.len()), "moved {moved:?}");
        assert!(!get(&after, "d").is_empty());
        assert_eq!(&moved, get(&after, "d"), "only moves to the newcomer");
        let (min, max) = loads(&after);
        assert!(max - min <= 1);
    }

    #[test]
    fn sticky_leave_example_moves_only_the_leavers_partitions() {
        let ps = parts(&[("t", 7), ("u", 5)]);
        let four = members(&["a", "b", "c", "d"], &["t", "u"]);
        let before = assign(Strategy::Sticky, &four, &ps, &Assignment::new());
        let three = members(&["a", "c", "d"], &["t", "u"]);
        let after = assign(Strategy::Sticky, &three, &ps, &before);
        assert_eq!(check_valid(&after, &three, &ps), Ok(()));
        assert_eq!(&moved(&before, &after), get(&before, "b"));
        let (min, max) = loads(&after);
        assert!(max - min <= 1);
    }

    #[test]
    fn sticky_drops_what_is_no_longer_valid() {
        let ms = vec![MemberSpec::new("a", ["t"]), MemberSpec::new("b", ["u"])];
        let ps = parts(&[("t", 2), ("u", 1)]);
        let mut previous = Assignment::new();
        // a no longer subscribes to u, t5 does not exist, b no longer subscribes to t, and "gone"
        // has left.
        previous.insert("a".into(), set(&[("t", 0), ("u", 0), ("t", 5)]));
        previous.insert("b".into(), set(&[("t", 0), ("u", 0)]));
        previous.insert("gone".into(), set(&[("t", 1)]));
        let out = assign(Strategy::Sticky, &ms, &ps, &previous);
        assert_eq!(check_valid(&out, &ms, &ps), Ok(()));
        assert_eq!(get(&out, "a"), &set(&[("t", 0), ("t", 1)]));
        assert_eq!(get(&out, "b"), &set(&[("u", 0)]));
    }

    #[test]
    fn sticky_rebalances_a_lopsided_previous() {
        let ms = members(&["a", "b", "c"], &["t"]);
        let ps = parts(&[("t", 9)]);
        let mut previous = Assignment::new();
        previous.insert("a".into(), (0..9).map(|p| tp("t", p)).collect());
        let out = assign(Strategy::Sticky, &ms, &ps, &previous);
        assert_eq!(check_valid(&out, &ms, &ps), Ok(()));
        assert!(out.values().all(|s| s.len() == 3));
        assert_eq!(moved(&previous, &out).len(), 6);
        assert!(get(&out, "a").is_subset(get(&previous, "a")));
    }

    #[test]
    fn sticky_balances_heterogeneous_subscriptions_where_it_can() {
        // c can only take u, so a and b share t; the lone u partition is c's.
        let ms = vec![
            MemberSpec::new("a", ["t", "u"]),
            MemberSpec::new("b", ["t", "u"]),
            MemberSpec::new("c", ["u"]),
        ];
        let ps = parts(&[("t", 4), ("u", 2)]);
        let out = assign(Strategy::Sticky, &ms, &ps, &Assignment::new());
        assert_eq!(check_valid(&out, &ms, &ps), Ok(()));
        assert_eq!(get(&out, "a").len(), 2);
        assert_eq!(get(&out, "b").len(), 2);
        assert_eq!(get(&out, "c"), &set(&[("u", 0), ("u", 1)]));
    }

    #[test]
    fn sticky_handles_empty_inputs() {
        let out = assign(
            Strategy::Sticky,
            &members(&["a"], &["t"]),
            &BTreeMap::new(),
            &Assignment::new(),
        );
        assert_eq!(out.len(), 1);
        assert!(get(&out, "a").is_empty());
        let out = assign(
            Strategy::Sticky,
            &members(&["a", "b"], &["t"]),
            &parts(&[("t", 0)]),
            &Assignment::new(),
        );
        assert!(out.values().all(BTreeSet::is_empty));
    }

    /// Topic names the generators draw from; the last never has partitions, so subscriptions
    /// to missing topics are exercised.
    const TOPICS: [&str; 5] = ["t0", "t1", "t2", "t3", "missing"];

    fn subscription(mask: u8) -> Vec<&'static str> {
        TOPICS
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, t)| *t)
            .collect()
    }

    fn arb_partitions() -> impl proptest::strategy::Strategy<Value = BTreeMap<String, u32>> {
        prop::collection::vec(1u32..=12, 1..=4).prop_map(|counts| {
            counts
                .into_iter()
                .enumerate()
                .filter_map(|(i, n)| TOPICS.get(i).map(|t| ((*t).to_owned(), n)))
                .collect()
        })
    }

    /// 1–6 members in shuffled order, some static; `masks` picks their subscriptions.
    fn arb_members(uniform: bool) -> impl proptest::strategy::Strategy<Value = Vec<MemberSpec>> {
        (
            prop::collection::vec((any::<u8>(), any::<Option<u8>>()), 1..=6),
            any::<u8>(),
        )
            .prop_map(move |(specs, shared)| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (mask, instance))| {
                        let mask = if uniform { shared } else { mask };
                        let m = MemberSpec::new(format!("m{i}"), subscription(mask));
                        match instance {
                            Some(n) if n % 2 == 0 => m.with_instance_id(format!("i{n}")),
                            _ => m,
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .prop_shuffle()
    }

    /// A previous assignment that may be arbitrarily wrong: unknown members, missing partitions,
    /// one partition claimed by several members.
    fn arb_previous() -> impl proptest::strategy::Strategy<Value = Assignment> {
        prop::collection::vec((0usize..8, 0usize..5, 0u32..14), 0..40).prop_map(|claims| {
            let mut a = Assignment::new();
            for (m, t, p) in claims {
                if let Some(topic) = TOPICS.get(t) {
                    a.entry(format!("m{m}")).or_default().insert(tp(topic, p));
                }
            }
            a
        })
    }

    proptest! {
        /// Coverage, disjointness and subscription are what the reconciler and consumers rely
        /// on, whatever the strategy or the state of `previous`.
        #[test]
        fn every_strategy_covers_each_partition_once(
            ms in arb_members(false),
            ps in arb_partitions(),
            previous in arb_previous(),
        ) {
            for st in Strategy::ALL {
                let out = assign(st, &ms, &ps, &previous);
                prop_assert_eq!(check_valid(&out, &ms, &ps), Ok(()), "{}", st);
                // Input order of members must not matter.
                let mut reversed = ms.clone();
                reversed.reverse();
                prop_assert_eq!(&assign(st, &reversed, &ps, &previous), &out);
            }
        }

        #[test]
        fn uniform_subscriptions_are_balanced(
            ms in arb_members(true),
            ps in arb_partitions(),
            previous in arb_previous(),
        ) {
            for st in [Strategy::RoundRobin, Strategy::Sticky] {
                let out = assign(st, &ms, &ps, &previous);
                let (min, max) = loads(&out);
                prop_assert!(max - min <= 1, "{}: {:?}", st, out);
            }
        }

        /// Re-running sticky on an unchanged group must not move anything, or every heartbeat
        /// that recomputes the target would churn partitions.
        #[test]
        fn sticky_is_a_fixed_point_of_itself(
            ms in arb_members(false),
            ps in arb_partitions(),
            previous in arb_previous(),
        ) {
            let once = assign(Strategy::Sticky, &ms, &ps, &previous);
            let twice = assign(Strategy::Sticky, &ms, &ps, &once);
            prop_assert_eq!(twice, once);
        }

        #[test]
        fn sticky_leave_moves_only_the_leavers_partitions(
            ms in arb_members(true),
            ps in arb_partitions(),
            previous in arb_previous(),
            leaver in any::<prop::sample::Index>(),
        ) {
            let before = assign(Strategy::Sticky, &ms, &ps, &previous);
            let gone = leaver.index(ms.len());
            let rest: Vec<MemberSpec> = ms
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, m)| m.clone())
                .collect();
            let after = assign(Strategy::Sticky, &rest, &ps, &before);
            let left = ms.get(gone).map(|m| m.member_id.clone()).unwrap_or_default();
            let theirs = before.get(&left).cloned().unwrap_or_default();
            prop_assert_eq!(moved(&before, &after), theirs);
        }

        #[test]
        fn sticky_join_moves_only_to_the_newcomer(
            ms in arb_members(true),
            ps in arb_partitions(),
            previous in arb_previous(),
        ) {
            let before = assign(Strategy::Sticky, &ms, &ps, &previous);
            let mut more = ms.clone();
            let topics = ms.first().map(|m| m.subscribed.clone()).unwrap_or_default();
            more.push(MemberSpec { member_id: "new".into(), instance_id: None, subscribed: topics });
            let after = assign(Strategy::Sticky, &more, &ps, &before);
            let gained = after.get("new").cloned().unwrap_or_default();
            prop_assert_eq!(moved(&before, &after), gained);
            let (min, max) = loads(&after);
            prop_assert!(max - min <= 1);
        }
    }
}
