//! The leader pass, decided: from a partition replica's [`Status`], what the broker remembers
//! about it and the applied metadata, which in-sync set it has and what to do (report
//! leadership, start a reassignment, hand leadership to the preferred replica).
//!
//! A pure function, run every `REPORT_EVERY` for each hosted replica by `duties.rs`, which
//! carries out the [`Action`]s. Tested here as a Raft engine is tested: input state →
//! expected actions, plus properties that hold for any input.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use keel_raft::Status;

use super::meta::{LeaderReport, PartitionMeta};

/// How long a leader keeps leadership before handing it to a caught-up preferred replica.
pub const PREFERRED_AFTER: Duration = Duration::from_secs(5);

/// A follower whose broker was not heard from (beats, answers) for this long is not in sync,
/// even if it held everything committed: an idle partition commits nothing, so a dead
/// follower would otherwise stay "in sync" and `min.insync.replicas` would not notice it.
/// Beats come every 150 ms; 3 s rides out pauses without flapping the reported set.
pub const IN_SYNC_CONTACT: Duration = Duration::from_secs(3);

/// What the pass remembers about a hosted replica from one pass to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// When this replica last became leader (or last handed leadership back).
    pub leader_since: Option<Instant>,
    /// A membership change is in progress.
    pub changing: bool,
    /// The commit index at the previous pass: a follower is in sync when it holds everything
    /// committed by then (caught up within one pass, as Kafka's ISR is caught up within
    /// `replica.lag.time.max.ms`).
    pub prev_committed: u64,
}

impl Default for Memory {
    fn default() -> Self {
        Self {
            leader_since: None,
            changing: false,
            // A new leader knows nothing of its followers' progress yet: its first pass counts
            // as in sync only those holding everything committed at that moment.
            prev_committed: u64::MAX,
        }
    }
}

/// One replica's part of a pass.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub me: u32,
    pub now: Instant,
    pub topic_id: u64,
    pub partition: u32,
    pub status: &'a Status,
    pub memory: Memory,
    /// The partition in the applied metadata (`None`: its topic is gone).
    pub placement: Option<&'a PartitionMeta>,
    /// The report last sent for this group that the metadata does not show yet.
    pub sent: Option<&'a LeaderReport>,
    /// Brokers being replaced (`replace-broker`): no group keeps them as voters until their
    /// new data directory is registered.
    pub replacing: &'a BTreeSet<u32>,
    /// Brokers not heard from within [`IN_SYNC_CONTACT`]: their replicas are not in sync.
    pub silent: &'a BTreeSet<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Tell the metadata this replica leads, with this in-sync set and these voters.
    Report(LeaderReport),
    /// Make these brokers the group's voters (a reassignment): learners first, then joint
    /// consensus.
    ChangeVoters(BTreeSet<u32>),
    /// Hand leadership to this (preferred, in-sync) replica.
    TransferLeader(u32),
}

/// What the pass decided for one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub memory: Memory,
    /// On a leader: the in-sync voters (sorted) and how many voters there are.
    pub in_sync: Option<(Vec<u32>, usize)>,
    pub actions: Vec<Action>,
}

pub fn decide(input: &Input<'_>) -> Decision {
    let s = input.status;
    let mut memory = input.memory;
    if !s.is_leader() {
        return Decision {
            memory: Memory {
                leader_since: None,
                prev_committed: u64::MAX,
                ..memory
            },
            in_sync: None,
            actions: Vec::new(),
        };
    }
    let since = *memory.leader_since.get_or_insert(input.now);
    let committed = s.committed.unwrap_or(0);
    let caught_up_to = std::mem::replace(&mut memory.prev_committed, committed).min(committed);
    let me = u64::from(input.me);
    let in_sync: Vec<u32> = s
        .voters
        .iter()
        .filter(|v| {
            **v == me
                || (!input.silent.contains(&(**v as u32))
                    && s.matched
                        .get(v)
                        .copied()
                        .flatten()
                        .is_some_and(|matched| matched >= caught_up_to))
        })
        .map(|v| *v as u32)
        .collect();
    let mut decision = Decision {
        memory,
        in_sync: Some((in_sync.clone(), s.voters.len())),
        actions: Vec::new(),
    };
    let Some(pm) = input.placement else {
        return decision;
    };
    // Reported voters come from the committed membership: a replica deletes its data when it
    // is reported gone, which must never happen on a change that may not commit.
    let voters: Vec<u32> = s.committed_voters.iter().map(|v| *v as u32).collect();
    let current = pm.leader == Some(input.me)
        && pm.leader_term == s.term
        && pm.in_sync == in_sync
        && pm.voters == voters;
    let report = LeaderReport {
        topic_id: input.topic_id,
        partition: input.partition,
        leader: input.me,
        term: s.term,
        in_sync: in_sync.clone(),
        voters,
    };
    if !current && input.sent != Some(&report) {
        decision.actions.push(Action::Report(report));
    }
    let target: BTreeSet<u32> = pm
        .replicas
        .iter()
        .copied()
        .filter(|r| !input.replacing.contains(r))
        .collect();
    let voters_now: BTreeSet<u32> = s.voters.iter().map(|v| *v as u32).collect();
    if target != voters_now && !decision.memory.changing && !target.is_empty() {
        decision.memory.changing = true;
        decision.actions.push(Action::ChangeVoters(target));
        return decision;
    }
    if let Some(&preferred) = pm.replicas.first()
        && preferred != input.me
        && !input.replacing.contains(&preferred)
        && in_sync.contains(&preferred)
        && input.now.saturating_duration_since(since) > PREFERRED_AFTER
        && !decision.memory.changing
    {
        decision.memory.leader_since = Some(input.now);
        decision.actions.push(Action::TransferLeader(preferred));
    }
    decision
}

/// A voter other than the leader that holds everything committed: who can take over at once
/// (a graceful shutdown hands leadership to it). `None` unless `s` leads.
pub fn caught_up_successor(s: &Status) -> Option<u64> {
    if !s.is_leader() {
        return None;
    }
    let committed = s.committed.unwrap_or(0);
    s.matched.iter().find_map(|(id, matched)| {
        (*id != s.id && s.voters.contains(id) && matched.is_some_and(|m| m >= committed))
            .then_some(*id)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keel_raft::Role;
    use proptest::prelude::*;

    use super::*;

    fn status(me: u64, role: Role, voters: &[u64], matched: &[(u64, Option<u64>)]) -> Status {
        Status {
            id: me,
            role,
            term: 3,
            leader: (role == Role::Leader).then_some(me),
            last_log_index: Some(10),
            last_applied: None,
            committed: Some(10),
            snapshot: None,
            purged: None,
            voters: voters.iter().copied().collect(),
            learners: BTreeSet::new(),
            committed_voters: voters.iter().copied().collect(),
            addresses: BTreeMap::new(),
            matched: matched.iter().copied().collect(),
            heard_from: BTreeMap::new(),
            quorum_acked: Some(Duration::ZERO),
        }
    }

    fn placement(replicas: &[u32]) -> PartitionMeta {
        PartitionMeta {
            replicas: replicas.to_vec(),
            ..PartitionMeta::default()
        }
    }

    fn leading_since(start: Instant, prev_committed: u64) -> Memory {
        Memory {
            leader_since: Some(start),
            changing: false,
            prev_committed,
        }
    }

    /// The pass of a replica with nothing remembered (just elected), made now; with that time.
    fn first_pass(s: &Status, pm: &PartitionMeta) -> (Decision, Instant) {
        let now = Instant::now();
        (decide(&input(s, Memory::default(), Some(pm), now)), now)
    }

    /// The pass of a replica of placement [1, 2, 3] that has led for `led` (with 10 committed
    /// at its previous pass); with the time of the pass.
    fn pass_after_leading(s: &Status, led: Duration) -> (Decision, Instant) {
        let start = Instant::now();
        let pm = placement(&[1, 2, 3]);
        let at = start + led;
        (
            decide(&input(s, leading_since(start, 10), Some(&pm), at)),
            at,
        )
    }

    fn input<'a>(
        s: &'a Status,
        memory: Memory,
        pm: Option<&'a PartitionMeta>,
        now: Instant,
    ) -> Input<'a> {
        Input {
            me: s.id as u32,
            now,
            topic_id: 7,
            partition: 0,
            status: s,
            memory,
            placement: pm,
            sent: None,
            replacing: &NOBODY,
            silent: &NOBODY,
        }
    }

    #[test]
    fn a_silent_broker_is_not_in_sync_even_when_caught_up() {
        let now = Instant::now();
        let s = status(1, Role::Leader, &[1, 2, 3], &[(2, Some(10)), (3, Some(10))]);
        let pm = placement(&[1, 2, 3]);
        let silent = BTreeSet::from([3]);
        let d = decide(&Input {
            silent: &silent,
            ..input(&s, leading_since(now, 10), Some(&pm), now)
        });
        assert_eq!(d.in_sync, Some((vec![1, 2], 3)));
    }

    static NOBODY: BTreeSet<u32> = BTreeSet::new();

    #[test]
    fn a_replaced_broker_leaves_the_voters_and_returns_once_registered() {
        let now = Instant::now();
        let s = status(1, Role::Leader, &[1, 2, 3], &[(2, Some(10)), (3, Some(10))]);
        let pm = placement(&[2, 1, 3]);
        let replacing = BTreeSet::from([2]);
        let d = decide(&Input {
            replacing: &replacing,
            ..input(
                &s,
                leading_since(now, 10),
                Some(&pm),
                now + PREFERRED_AFTER * 2,
            )
        });
        assert!(
            d.actions
                .contains(&Action::ChangeVoters(BTreeSet::from([1, 3]))),
            "{d:?}"
        );
        // Out of the voters, and not preferred while it is being replaced.
        let s = status(1, Role::Leader, &[1, 3], &[(3, Some(10))]);
        let d = decide(&Input {
            replacing: &replacing,
            ..input(
                &s,
                leading_since(now, 10),
                Some(&pm),
                now + PREFERRED_AFTER * 2,
            )
        });
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::ChangeVoters(_) | Action::TransferLeader(_))),
            "{d:?}"
        );
        // Registered again: back in.
        let d = decide(&input(&s, leading_since(now, 10), Some(&pm), now));
        assert!(
            d.actions
                .contains(&Action::ChangeVoters(BTreeSet::from([1, 2, 3]))),
            "{d:?}"
        );
    }

    #[test]
    fn a_follower_forgets_its_leadership_and_does_nothing() {
        let s = status(1, Role::Follower, &[1, 2, 3], &[]);
        let now = Instant::now();
        let memory = leading_since(now, 4);
        let pm = placement(&[1, 2, 3]);
        let d = decide(&input(&s, memory, Some(&pm), now));
        assert_eq!(d.memory, Memory::default());
        assert_eq!(d.in_sync, None);
        assert!(d.actions.is_empty());
    }

    #[test]
    fn a_new_leader_counts_in_sync_only_followers_holding_everything_committed() {
        let s = status(1, Role::Leader, &[1, 2, 3], &[(2, Some(10)), (3, Some(9))]);
        let (d, now) = first_pass(&s, &placement(&[1, 2, 3]));
        assert_eq!(d.in_sync, Some((vec![1, 2], 3)));
        assert_eq!(d.memory.prev_committed, 10);
        assert_eq!(d.memory.leader_since, Some(now));
        assert_eq!(
            d.actions,
            vec![Action::Report(LeaderReport {
                topic_id: 7,
                partition: 0,
                leader: 1,
                term: 3,
                in_sync: vec![1, 2],
                voters: vec![1, 2, 3],
            })]
        );
    }

    #[test]
    fn a_follower_is_in_sync_when_it_holds_what_was_committed_one_pass_ago() {
        let s = status(1, Role::Leader, &[1, 2, 3], &[(2, Some(8)), (3, Some(7))]);
        let pm = placement(&[1, 2, 3]);
        let memory = leading_since(Instant::now(), 8);
        let d = decide(&input(&s, memory, Some(&pm), Instant::now()));
        assert_eq!(d.in_sync, Some((vec![1, 2], 3)));
    }

    #[test]
    fn nothing_is_reported_when_the_metadata_already_says_it_or_it_was_sent() {
        let s = status(1, Role::Leader, &[1], &[]);
        let mut pm = placement(&[1]);
        let (d, now) = first_pass(&s, &pm);
        let Some(Action::Report(report)) = d.actions.first().cloned() else {
            panic!("expected a report, got {:?}", d.actions);
        };
        let mut sent = input(&s, d.memory, Some(&pm), now);
        sent.sent = Some(&report);
        assert!(decide(&sent).actions.is_empty());
        pm.leader = Some(1);
        pm.leader_term = 3;
        pm.in_sync = vec![1];
        pm.voters = vec![1];
        assert!(
            decide(&input(&s, d.memory, Some(&pm), now))
                .actions
                .is_empty()
        );
    }

    #[test]
    fn a_new_replica_set_starts_one_membership_change() {
        let s = status(1, Role::Leader, &[1, 2, 3], &[(2, Some(10)), (3, Some(10))]);
        let pm = placement(&[1, 2, 4]);
        let (d, now) = first_pass(&s, &pm);
        assert!(d.memory.changing);
        assert_eq!(
            d.actions.last(),
            Some(&Action::ChangeVoters([1, 2, 4].into()))
        );
        // While it runs, no second change and no hand-back.
        let again = decide(&input(&s, d.memory, Some(&pm), now + PREFERRED_AFTER * 2));
        assert!(again.actions.iter().all(|a| matches!(a, Action::Report(_))));
    }

    #[test]
    fn leadership_goes_back_to_the_preferred_replica_once_it_is_in_sync_for_a_while() {
        let s = status(2, Role::Leader, &[1, 2, 3], &[(1, Some(10)), (3, Some(10))]);
        let (early, _) = pass_after_leading(&s, PREFERRED_AFTER / 2);
        assert!(!early.actions.contains(&Action::TransferLeader(1)));
        let (late, at) = pass_after_leading(&s, PREFERRED_AFTER + Duration::from_millis(1));
        assert!(late.actions.contains(&Action::TransferLeader(1)));
        assert_eq!(late.memory.leader_since, Some(at));
    }

    #[test]
    fn no_hand_back_to_a_preferred_replica_that_lags() {
        let s = status(2, Role::Leader, &[1, 2, 3], &[(1, Some(3)), (3, Some(10))]);
        let (d, _) = pass_after_leading(&s, PREFERRED_AFTER * 2);
        assert_eq!(d.in_sync, Some((vec![2, 3], 3)));
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::TransferLeader(_)))
        );
    }

    #[test]
    fn a_topic_gone_from_the_metadata_gets_no_report() {
        let s = status(1, Role::Leader, &[1], &[]);
        let d = decide(&input(&s, Memory::default(), None, Instant::now()));
        assert_eq!(d.in_sync, Some((vec![1], 1)));
        assert!(d.actions.is_empty());
    }

    #[test]
    fn the_successor_is_a_caught_up_voter_other_than_the_leader() {
        let s = status(
            1,
            Role::Leader,
            &[1, 2, 3],
            &[(2, Some(9)), (3, Some(10)), (4, Some(10))],
        );
        assert_eq!(caught_up_successor(&s), Some(3));
        let behind = status(1, Role::Leader, &[1, 2], &[(2, Some(9))]);
        assert_eq!(caught_up_successor(&behind), None);
        let follower = status(1, Role::Follower, &[1, 2], &[(2, Some(10))]);
        assert_eq!(caught_up_successor(&follower), None);
    }

    fn arb_status() -> impl Strategy<Value = Status> {
        (
            1u64..6,
            prop::bool::ANY,
            prop::collection::btree_set(1u64..6, 1..5),
            prop::collection::btree_map(1u64..6, prop::option::of(0u64..20), 0..5),
            0u64..20,
        )
            .prop_map(|(me, leading, mut voters, matched, committed)| {
                voters.insert(me);
                let mut s = status(
                    me,
                    if leading {
                        Role::Leader
                    } else {
                        Role::Follower
                    },
                    &voters.iter().copied().collect::<Vec<_>>(),
                    &matched.into_iter().collect::<Vec<_>>(),
                );
                s.committed = Some(committed);
                s
            })
    }

    proptest! {
        #[test]
        fn decisions_keep_their_invariants(
            s in arb_status(),
            replicas in prop::collection::vec(1u32..6, 0..4),
            prev in prop::option::of(0u64..20),
            changing in prop::bool::ANY,
            led_for in 0u64..10_000,
            replacing in prop::collection::vec(1u32..6, 0..2),
        ) {
            let start = Instant::now();
            let now = start + Duration::from_millis(led_for);
            let memory = Memory {
                leader_since: Some(start),
                changing,
                prev_committed: prev.unwrap_or(u64::MAX),
            };
            let mut pm = placement(&replicas);
            pm.replicas.dedup();
            let replacing: BTreeSet<u32> = replacing.into_iter().collect();
            let d = decide(&Input { replacing: &replacing, ..input(&s, memory, Some(&pm), now) });
            let me = s.id as u32;
            if !s.is_leader() {
                prop_assert!(d.actions.is_empty());
                prop_assert_eq!(d.in_sync, None);
                return Ok(());
            }
            let (in_sync, voters) = d.in_sync.clone().expect("a leader has an in-sync set");
            prop_assert!(in_sync.contains(&me));
            prop_assert!(in_sync.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(in_sync.iter().all(|v| s.voters.contains(&u64::from(*v))));
            prop_assert_eq!(voters, s.voters.len());
            let changes = d.actions.iter().filter(|a| matches!(a, Action::ChangeVoters(_))).count();
            let transfers: Vec<u32> = d.actions.iter().filter_map(|a| match a {
                Action::TransferLeader(to) => Some(*to),
                _ => None,
            }).collect();
            prop_assert!(changes + transfers.len() <= 1);
            if changing {
                prop_assert_eq!(changes, 0);
                prop_assert!(transfers.is_empty());
            }
            for a in &d.actions {
                if let Action::ChangeVoters(target) = a {
                    prop_assert!(target.iter().all(|b| !replacing.contains(b)));
                }
            }
            for to in transfers {
                prop_assert!(to != me && in_sync.contains(&to) && !replacing.contains(&to));
                prop_assert_eq!(Some(&to), pm.replicas.first());
            }
            for a in &d.actions {
                if let Action::Report(r) = a {
                    prop_assert_eq!(r.leader, me);
                    prop_assert_eq!(r.term, s.term);
                    prop_assert_eq!(&r.in_sync, &in_sync);
                    let committed: Vec<u32> = s.committed_voters.iter().map(|v| *v as u32).collect();
                    prop_assert_eq!(&r.voters, &committed);
                }
            }
        }
    }
}
