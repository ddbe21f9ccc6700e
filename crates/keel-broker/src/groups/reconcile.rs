//! Walking a group from what its members own to a new target assignment, cooperatively.
//!
//! An eager rebalance stops every member, takes everything back and hands it all out again, so
//! the whole group stops consuming on every join or leave. Here a partition moves from member A to
//! member B only once A has said it stopped owning it; until then B waits for that one partition
//! while every partition that does not move keeps being consumed throughout. The price is a few
//! extra heartbeat rounds per rebalance.
//!
//! Safety does not depend on the target being sensible: a partition is only ever handed to a
//! member when no other member holds it, so two members never own the same partition even if a
//! target is stale or claims a partition twice (the second claimant just waits).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Assignment, TopicPartition};

/// What one member should do next to move from what it owns toward its target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Owned and still wanted: consumption of these never pauses.
    pub keep: BTreeSet<TopicPartition>,
    /// Owned but no longer wanted: the member must give these up before anyone else may take
    /// them.
    pub revoke: BTreeSet<TopicPartition>,
    /// Wanted, not owned, and owned by nobody: may be taken now.
    pub assign: BTreeSet<TopicPartition>,
    /// Wanted but still owned by another member, which has to revoke them first.
    pub pending: BTreeSet<TopicPartition>,
}

impl Step {
    /// The assignment to report to the member now. Excludes `revoke`, so the member stops
    /// treating those as its own, and `pending`, which would otherwise be owned twice.
    pub fn assignment(&self) -> BTreeSet<TopicPartition> {
        self.keep.union(&self.assign).cloned().collect()
    }
}

/// Splits a member's `target` and `owned` partitions into what it keeps, gives up, takes and waits
/// for. `owned_by_others` is a callback rather than a set so the caller can answer from whatever
/// ownership index it keeps.
pub fn next_step(
    target: &BTreeSet<TopicPartition>,
    owned: &BTreeSet<TopicPartition>,
    owned_by_others: &dyn Fn(&TopicPartition) -> bool,
) -> Step {
    let mut step = Step::default();
    for tp in owned {
        if target.contains(tp) {
            step.keep.insert(tp.clone());
        } else {
            step.revoke.insert(tp.clone());
        }
    }
    for tp in target.difference(owned) {
        if owned_by_others(tp) {
            step.pending.insert(tp.clone());
        } else {
            step.assign.insert(tp.clone());
        }
    }
    step
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The member was never part of a target or has been removed; it has to rejoin, since the
    /// group can no longer vouch for what it owns.
    #[error("unknown member {0:?}")]
    UnknownMember(String),
}

/// The group's view of one member: what it may own, as far as the coordinator knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// Bumped each time the assignment handed to the member changes. A member reports the epoch
    /// of the last assignment it received, which tells a report made with full knowledge (safe to
    /// free what it leaves out) from one made before the latest response reached it (a lost
    /// response or a stale request), which must not free anything.
    epoch: u64,
    /// The assignment last handed to the member.
    assigned: BTreeSet<TopicPartition>,
    /// Told to give these up, not yet confirmed: they stay the member's, so nobody else gets
    /// them while it may still be consuming them.
    revoking: BTreeSet<TopicPartition>,
}

impl MemberState {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn assigned(&self) -> &BTreeSet<TopicPartition> {
        &self.assigned
    }

    pub fn revoking(&self) -> &BTreeSet<TopicPartition> {
        &self.revoking
    }

    /// Whether the member may be consuming `tp`, and so whether anyone else must wait for it.
    pub fn holds(&self, tp: &TopicPartition) -> bool {
        self.assigned.contains(tp) || self.revoking.contains(tp)
    }
}

/// The answer to a member's heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// To be sent back with the member's next report.
    pub member_epoch: u64,
    /// The partitions the member may consume now; never includes `revoke` or `pending`.
    pub assignment: BTreeSet<TopicPartition>,
    /// What the member must stop consuming and then leave out of its next report.
    pub revoke: BTreeSet<TopicPartition>,
    /// Partitions coming to the member once their current owners let go; informational, so a
    /// member can tell "still rebalancing" from "this is all I get".
    pub pending: BTreeSet<TopicPartition>,
}

/// A target assignment and how far each member has got toward it.
///
/// Members join by being named in a target ([`GroupState::set_target`]) and leave through
/// [`GroupState::remove_member`]; computing the target (with [`assign()`](super::assign())) is the
/// caller's job, so that the coordinator decides when a change is worth a new target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// Bumped on every new target, so members and operators can tell which target the group is
    /// converging to.
    group_epoch: u64,
    target: Assignment,
    members: BTreeMap<String, MemberState>,
}

/// What a member not named in the target should own: nothing.
static EMPTY: BTreeSet<TopicPartition> = BTreeSet::new();

impl GroupState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn group_epoch(&self) -> u64 {
        self.group_epoch
    }

    pub fn target(&self) -> &Assignment {
        &self.target
    }

    /// A member's share of the target; empty for a member the target leaves out.
    pub fn target_of(&self, member_id: &str) -> &BTreeSet<TopicPartition> {
        self.target.get(member_id).unwrap_or(&EMPTY)
    }

    pub fn member(&self, member_id: &str) -> Option<&MemberState> {
        self.members.get(member_id)
    }

    pub fn members(&self) -> impl Iterator<Item = (&str, &MemberState)> {
        self.members.iter().map(|(id, m)| (id.as_str(), m))
    }

    /// Installs a new target and returns the new group epoch. Members it names that the group
    /// does not know yet join owning nothing; members it leaves out stay (with nothing to own)
    /// until removed, since only the caller knows whether they are gone or just unassigned.
    /// Nothing moves here: each member moves on its own next heartbeat.
    pub fn set_target(&mut self, target: Assignment) -> u64 {
        for member_id in target.keys() {
            self.members.entry(member_id.clone()).or_default();
        }
        self.target = target;
        self.group_epoch = self.group_epoch.saturating_add(1);
        self.group_epoch
    }

    /// Processes a member's report that it owns `owned` as of `member_epoch` (the epoch of the
    /// last heartbeat answer it received; 0 before the first) and answers with what it may own
    /// now and what it must give up.
    ///
    /// The report frees partitions the member held and left out only if it was made with the
    /// member's current epoch: an older report (a retried or delayed request, or one sent before
    /// a lost answer) may predate an assignment the member has since received, so freeing on its
    /// word could hand a partition to two members. That includes epoch 0: a known member that
    /// restarted is simply handed back what the group still holds for it, and what it no longer
    /// has is freed by its next, current, report. A member therefore has to list everything it
    /// is, or may be, consuming. Partitions it lists that the group never gave it are not granted
    /// on the strength of the report: they are added to `revoke` unless the member's target
    /// grants them anyway (then it may just keep them).
    pub fn heartbeat(
        &mut self,
        member_id: &str,
        member_epoch: u64,
        owned: &BTreeSet<TopicPartition>,
    ) -> Result<Heartbeat, GroupError> {
        let unknown = || GroupError::UnknownMember(member_id.to_owned());
        let member = self.members.get(member_id).ok_or_else(unknown)?;
        let trusted = member_epoch == member.epoch;
        let unexpected: BTreeSet<TopicPartition> = owned
            .iter()
            .filter(|tp| !member.holds(tp))
            .cloned()
            .collect();
        let held: BTreeSet<TopicPartition> = member
            .assigned
            .union(&member.revoking)
            .filter(|tp| !trusted || owned.contains(*tp))
            .cloned()
            .collect();
        let others = |tp: &TopicPartition| {
            self.members
                .iter()
                .any(|(id, m)| id != member_id && m.holds(tp))
        };
        let step = next_step(self.target_of(member_id), &held, &others);

        let member = self.members.get_mut(member_id).ok_or_else(unknown)?;
        let assignment = step.assignment();
        if assignment != member.assigned {
            member.epoch = member.epoch.saturating_add(1);
            member.assigned = assignment.clone();
        }
        member.revoking = step.revoke.clone();
        let mut revoke = step.revoke;
        revoke.extend(unexpected.difference(&assignment).cloned());
        Ok(Heartbeat {
            member_epoch: member.epoch,
            assignment,
            revoke,
            pending: step.pending,
        })
    }

    /// Drops a member (it left, or its session expired and it has stopped consuming). What it
    /// held is free at once, for whichever member's next heartbeat wants it; its share of the
    /// target stays unowned until the caller installs a new target without it.
    pub fn remove_member(&mut self, member_id: &str) -> bool {
        self.target.remove(member_id);
        self.members.remove(member_id).is_some()
    }

    /// The member that holds `tp` (assigned or not yet confirmed revoked), if any.
    pub fn owner_of(&self, tp: &TopicPartition) -> Option<&str> {
        self.members
            .iter()
            .find(|(_, m)| m.holds(tp))
            .map(|(id, _)| id.as_str())
    }

    /// Whether every member owns exactly its target, i.e. the rebalance is over.
    pub fn is_converged(&self) -> bool {
        self.members
            .iter()
            .all(|(id, m)| m.revoking.is_empty() && &m.assigned == self.target_of(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::{MemberSpec, Strategy, assign};
    use proptest::prelude::{TestCaseError, any, prop, prop_assert, prop_assert_eq, prop_oneof};
    use proptest::proptest;
    use proptest::strategy::Strategy as _;

    fn tp(topic: &str, partition: u32) -> TopicPartition {
        TopicPartition::new(topic, partition)
    }

    fn set(ps: &[u32]) -> BTreeSet<TopicPartition> {
        ps.iter().map(|&p| tp("t", p)).collect()
    }

    /// A group whose member "a" joined and confirmed partitions 0 and 1 (at the epoch returned),
    /// and whose target then moves 1 to "b".
    fn moving_1_from_a_to_b() -> (GroupState, u64) {
        let mut g = GroupState::new();
        g.set_target(target(&[("a", &[0, 1])]));
        let first = g.heartbeat("a", 0, &set(&[])).expect("a");
        let e = first.member_epoch;
        let confirmed = g.heartbeat("a", e, &set(&[0, 1])).expect("a");
        assert_eq!(confirmed.member_epoch, e, "nothing changed, no new epoch");
        g.set_target(target(&[("a", &[0]), ("b", &[1])]));
        (g, e)
    }

    fn target(entries: &[(&str, &[u32])]) -> Assignment {
        entries
            .iter()
            .map(|&(id, ps)| (id.to_owned(), set(ps)))
            .collect()
    }

    #[test]
    fn next_step_splits_target_and_owned() {
        let busy = tp("t", 3);
        let step = next_step(&set(&[0, 1, 2, 3]), &set(&[0, 1, 4]), &|p| *p == busy);
        assert_eq!(step.keep, set(&[0, 1]));
        assert_eq!(step.revoke, set(&[4]));
        assert_eq!(step.assign, set(&[2]));
        assert_eq!(step.pending, set(&[3]));
        assert_eq!(step.assignment(), set(&[0, 1, 2]));
    }

    #[test]
    fn a_partition_moves_only_after_its_owner_lets_go() {
        let mut g = GroupState::new();
        assert_eq!(g.set_target(target(&[("a", &[0, 1])])), 1);
        let hb = g.heartbeat("a", 0, &set(&[])).expect("a");
        assert_eq!(hb.assignment, set(&[0, 1]));
        let a_epoch = hb.member_epoch;

        assert_eq!(g.set_target(target(&[("a", &[0]), ("b", &[1])])), 2);
        let hb = g.heartbeat("b", 0, &set(&[])).expect("b");
        assert_eq!(hb.assignment, set(&[]));
        assert_eq!(hb.pending, set(&[1]));

        // a is told to give up 1 but keeps 0 throughout.
        let hb = g.heartbeat("a", a_epoch, &set(&[0, 1])).expect("a");
        assert_eq!(
            (hb.assignment.clone(), hb.revoke.clone()),
            (set(&[0]), set(&[1]))
        );
        let a_epoch = hb.member_epoch;
        assert_eq!(g.owner_of(&tp("t", 1)), Some("a"));

        // Still revoking: b keeps waiting.
        let hb = g.heartbeat("a", a_epoch, &set(&[0, 1])).expect("a");
        assert_eq!(hb.revoke, set(&[1]));
        let hb = g.heartbeat("b", 0, &set(&[])).expect("b");
        assert_eq!(hb.pending, set(&[1]));

        // a confirms; b takes it.
        let hb = g.heartbeat("a", a_epoch, &set(&[0])).expect("a");
        assert_eq!((hb.assignment, hb.revoke), (set(&[0]), set(&[])));
        assert_eq!(g.owner_of(&tp("t", 1)), None);
        let hb = g.heartbeat("b", 0, &set(&[])).expect("b");
        assert_eq!((hb.assignment, hb.pending), (set(&[1]), set(&[])));
        assert_eq!(g.owner_of(&tp("t", 1)), Some("b"));
        assert!(g.is_converged());
    }

    #[test]
    fn a_stale_report_frees_nothing() {
        let (mut g, e1) = moving_1_from_a_to_b();
        // This answer (revoke 1) is lost; a reports again from its old epoch...
        let lost = g.heartbeat("a", e1, &set(&[0, 1])).expect("a");
        assert!(lost.member_epoch > e1);
        // ...and a report at the old epoch that omits 1 must not free it: a may simply not have
        // applied an assignment yet, from the broker's point of view.
        let hb = g.heartbeat("a", e1, &set(&[0])).expect("a");
        assert_eq!(hb.revoke, set(&[1]));
        assert_eq!(g.owner_of(&tp("t", 1)), Some("a"));
        let hb = g.heartbeat("b", 0, &set(&[])).expect("b");
        assert_eq!(hb.pending, set(&[1]));
        // At the current epoch it does.
        g.heartbeat("a", lost.member_epoch, &set(&[0])).expect("a");
        assert_eq!(g.owner_of(&tp("t", 1)), None);
    }

    #[test]
    fn a_late_join_request_does_not_free_what_was_granted_since() {
        let (mut g, _) = moving_1_from_a_to_b();
        // A retry of a's join arrives late, or a restarted: either way it is not a release.
        let hb = g.heartbeat("a", 0, &set(&[])).expect("a");
        assert_eq!((hb.assignment, hb.revoke), (set(&[0]), set(&[1])));
        let e = hb.member_epoch;
        let hb = g.heartbeat("b", 0, &set(&[])).expect("b");
        assert_eq!(hb.pending, set(&[1]));
        // a's current report (a restarted a owns nothing) frees 1; 0 stays a's.
        let hb = g.heartbeat("a", e, &set(&[])).expect("a");
        assert_eq!(hb.assignment, set(&[0]));
        let hb = g.heartbeat("b", 0, &set(&[])).expect("b");
        assert_eq!(hb.assignment, set(&[1]));
    }

    #[test]
    fn removing_a_member_frees_its_partitions_at_once() {
        let mut g = GroupState::new();
        g.set_target(target(&[("a", &[0, 1]), ("b", &[2])]));
        g.heartbeat("a", 0, &set(&[])).expect("a");
        g.heartbeat("b", 0, &set(&[])).expect("b");
        g.set_target(target(&[("a", &[0]), ("b", &[1, 2])]));
        let hb = g.heartbeat("b", 1, &set(&[2])).expect("b");
        assert_eq!(hb.pending, set(&[1]));

        assert!(g.remove_member("a"));
        assert!(!g.remove_member("a"));
        assert_eq!(g.owner_of(&tp("t", 0)), None);
        assert!(!g.target().contains_key("a"));
        let hb = g.heartbeat("b", hb.member_epoch, &set(&[2])).expect("b");
        assert_eq!(hb.assignment, set(&[1, 2]));
        assert_eq!(
            g.heartbeat("a", 0, &set(&[])),
            Err(GroupError::UnknownMember("a".into()))
        );
    }

    #[test]
    fn claims_the_group_never_made_are_revoked_not_granted() {
        let mut g = GroupState::new();
        g.set_target(target(&[("a", &[0]), ("b", &[1])]));
        g.heartbeat("b", 0, &set(&[])).expect("b");
        let hb = g.heartbeat("a", 0, &set(&[0, 1, 7])).expect("a");
        assert_eq!(hb.assignment, set(&[0]));
        assert_eq!(hb.revoke, set(&[1, 7]));
        assert_eq!(g.owner_of(&tp("t", 1)), Some("b"));
        assert_eq!(g.owner_of(&tp("t", 7)), None);
    }

    #[test]
    fn members_left_out_of_the_target_give_everything_back() {
        let mut g = GroupState::new();
        g.set_target(target(&[("a", &[0])]));
        let hb = g.heartbeat("a", 0, &set(&[])).expect("a");
        g.set_target(target(&[("b", &[0])]));
        let hb = g.heartbeat("a", hb.member_epoch, &set(&[0])).expect("a");
        assert_eq!((hb.assignment, hb.revoke), (set(&[]), set(&[0])));
        assert!(!g.is_converged());
        g.heartbeat("a", hb.member_epoch, &set(&[])).expect("a");
        g.heartbeat("b", 0, &set(&[])).expect("b");
        assert!(g.is_converged());
    }

    #[test]
    fn state_round_trips_as_json() {
        let mut g = GroupState::new();
        g.set_target(target(&[("a", &[0, 1]), ("b", &[2])]));
        g.heartbeat("a", 0, &set(&[])).expect("a");
        let json = serde_json::to_string(&g).expect("serialize");
        assert_eq!(
            serde_json::from_str::<GroupState>(&json).expect("deserialize"),
            g
        );
    }

    /// A consumer as the coordinator cannot see it: what it really consumes.
    #[derive(Debug, Default)]
    struct Client {
        epoch: u64,
        assignment: BTreeSet<TopicPartition>,
        /// Told to revoke, still consuming until it acknowledges.
        revoking: BTreeSet<TopicPartition>,
        /// Requests sent so far, for replaying one late.
        sent: Vec<(u64, BTreeSet<TopicPartition>)>,
    }

    impl Client {
        fn owned(&self) -> BTreeSet<TopicPartition> {
            self.assignment.union(&self.revoking).cloned().collect()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join(u8),
        Leave(prop::sample::Index),
        /// An old request of one member (a retry, or one delayed in the network) arrives now; its
        /// answer goes nowhere.
        Replay {
            who: prop::sample::Index,
            which: prop::sample::Index,
        },
        /// Heartbeat of one member; `ack` finishes its revocations first, `lose` drops the answer.
        Beat {
            who: prop::sample::Index,
            ack: bool,
            lose: bool,
        },
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
        prop_oneof![
            1 => any::<u8>().prop_map(Op::Join),
            1 => any::<prop::sample::Index>().prop_map(Op::Leave),
            2 => (any::<prop::sample::Index>(), any::<prop::sample::Index>())
                .prop_map(|(who, which)| Op::Replay { who, which }),
            8 => (any::<prop::sample::Index>(), any::<bool>(), prop::bool::weighted(0.2))
                .prop_map(|(who, ack, lose)| Op::Beat { who, ack, lose }),
        ]
    }

    struct Sim {
        strategy: Strategy,
        partitions: BTreeMap<String, u32>,
        group: GroupState,
        specs: BTreeMap<String, MemberSpec>,
        clients: BTreeMap<String, Client>,
        joined: u32,
    }

    impl Sim {
        fn retarget(&mut self) {
            let specs: Vec<MemberSpec> = self.specs.values().cloned().collect();
            let target = assign(self.strategy, &specs, &self.partitions, self.group.target());
            self.group.set_target(target);
        }

        fn nth(&self, i: prop::sample::Index) -> Option<String> {
            if self.clients.is_empty() {
                return None;
            }
            self.clients
                .keys()
                .nth(i.index(self.clients.len()))
                .cloned()
        }

        fn beat(&mut self, id: &str, ack: bool, lose: bool) -> Result<(), TestCaseError> {
            let Some(client) = self.clients.get_mut(id) else {
                return Ok(());
            };
            if ack {
                client.revoking.clear();
            }
            let owned = client.owned();
            client.sent.push((client.epoch, owned.clone()));
            let hb = self
                .group
                .heartbeat(id, client.epoch, &owned)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(hb.assignment.is_disjoint(&hb.revoke));
            prop_assert!(hb.assignment.is_disjoint(&hb.pending));
            prop_assert!(hb.assignment.is_subset(self.group.target_of(id)));
            if !lose {
                client.revoking = hb.revoke.intersection(&owned).cloned().collect();
                client.assignment = hb.assignment;
                client.epoch = hb.member_epoch;
            }
            Ok(())
        }

        /// No partition is consumed by two clients, and the coordinator accounts every consumed
        /// partition to the client consuming it (so it will not hand it to anyone else).
        fn check_safe(&self) -> Result<(), TestCaseError> {
            let mut seen: BTreeMap<TopicPartition, &str> = BTreeMap::new();
            for (id, client) in &self.clients {
                for p in client.owned() {
                    if let Some(other) = seen.insert(p.clone(), id) {
                        return Err(TestCaseError::fail(format!(
                            "{p} consumed by both {other} and {id}"
                        )));
                    }
                    prop_assert_eq!(self.group.owner_of(&p), Some(id.as_str()), "{}", p);
                }
            }
            Ok(())
        }

        fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
            match op {
                Op::Join(mask) => {
                    let id = format!("m{}", self.joined);
                    self.joined += 1;
                    let topics: Vec<String> = ["t0", "t1", "t2", "t3", "missing"]
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, t)| (*t).to_owned())
                        .collect();
                    self.specs
                        .insert(id.clone(), MemberSpec::new(id.clone(), topics));
                    self.clients.insert(id, Client::default());
                    self.retarget();
                }
                Op::Leave(i) => {
                    if let Some(id) = self.nth(i) {
                        self.clients.remove(&id);
                        self.specs.remove(&id);
                        self.group.remove_member(&id);
                        self.retarget();
                    }
                }
                Op::Replay { who, which } => {
                    let old = self.nth(who).and_then(|id| {
                        let client = self.clients.get(&id)?;
                        if client.sent.is_empty() {
                            return None;
                        }
                        let (epoch, owned) = client.sent.get(which.index(client.sent.len()))?;
                        Some((id, *epoch, owned.clone()))
                    });
                    if let Some((id, epoch, owned)) = old {
                        self.group
                            .heartbeat(&id, epoch, &owned)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                }
                Op::Beat { who, ack, lose } => {
                    if let Some(id) = self.nth(who) {
                        self.beat(&id, ack, lose)?;
                    }
                }
            }
            self.check_safe()
        }
    }

    proptest! {
        /// Random joins, leaves and heartbeats (some answers lost, some revocations slow) never
        /// let two members consume one partition; once members heartbeat and acknowledge
        /// reliably, every one of them ends up with exactly its target.
        #[test]
        fn rebalancing_is_safe_and_converges(
            strategy in prop::sample::select(Strategy::ALL.to_vec()),
            counts in prop::collection::vec(1u32..=12, 1..=4),
            initial in prop::collection::vec(any::<u8>(), 1..=6),
            ops in prop::collection::vec(arb_op(), 0..120),
        ) {
            let partitions = counts
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("t{i}"), *n))
                .collect();
            let mut sim = Sim {
                strategy,
                partitions,
                group: GroupState::new(),
                specs: BTreeMap::new(),
                clients: BTreeMap::new(),
                joined: 0,
            };
            for mask in initial {
                sim.apply(Op::Join(mask))?;
            }
            for op in ops {
                sim.apply(op)?;
            }
            let ids: Vec<String> = sim.clients.keys().cloned().collect();
            for _ in 0..4 {
                for id in &ids {
                    sim.beat(id, true, false)?;
                    sim.check_safe()?;
                }
            }
            prop_assert!(sim.group.is_converged(), "{:?}", sim.group);
            for (id, client) in &sim.clients {
                prop_assert_eq!(&client.assignment, sim.group.target_of(id), "{}", id);
                prop_assert!(client.revoking.is_empty());
            }
            let wanted: usize = sim.group.target().values().map(BTreeSet::len).sum();
            let owned: usize = sim.clients.values().map(|c| c.assignment.len()).sum();
            prop_assert_eq!(owned, wanted);
        }
    }
}
