//! A group's live membership as its coordinator keeps it: members, their subscriptions and
//! sessions, static identities, and when to compute a new target assignment.
//!
//! Pure (time is passed in as milliseconds of a monotonic clock, topics as a catalogue of
//! partition counts), so the rules are unit-tested without a broker. Membership is not
//! persisted: a new coordinator starts with no members, and members that get `UnknownMember`
//! rejoin, reporting what they still consume, which the new target then prefers to keep
//! where it is.

use std::collections::{BTreeMap, BTreeSet};

use keel_types::TopicPattern;

use super::{Assignment, GroupState, MemberSpec, Strategy, TopicPartition, assign};

/// Topic name to partition count: what the coordinator knows exists.
pub type Catalog = BTreeMap<String, u32>;

/// What a member consumes: topics by name, and patterns that also pick up topics created later.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    pub topics: BTreeSet<String>,
    pub patterns: Vec<TopicPattern>,
}

impl Subscription {
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty() && self.patterns.is_empty()
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.topics.contains(topic) || self.patterns.iter().any(|p| p.matches(topic))
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub instance_id: Option<String>,
    pub subscription: Subscription,
    pub session_timeout_ms: u64,
    pub last_seen_ms: u64,
    /// What the member said it consumes when it (re)joined: a member coming back after a
    /// coordinator change keeps these if balance allows, instead of a reshuffle.
    claimed: BTreeSet<TopicPartition>,
}

/// Why a membership request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("member {member:?} is not a member of group {group:?}; rejoin with an empty member id")]
    UnknownMember { group: String, member: String },
    #[error(
        "group {group:?} uses the {current} assignment strategy; this member asked for {asked}"
    )]
    InconsistentStrategy {
        group: String,
        current: Strategy,
        asked: Strategy,
    },
    #[error("member {member:?} of group {group:?} does not own {partition}; its commit is refused")]
    NotOwner {
        group: String,
        member: String,
        partition: TopicPartition,
    },
    #[error("group {group:?} has {members} active members; only they may commit")]
    HasMembers { group: String, members: usize },
}

/// A heartbeat as the coordinator received it, validated.
#[derive(Debug, Clone)]
pub struct HeartbeatRequest {
    /// Empty to join.
    pub member_id: String,
    pub member_epoch: u64,
    pub instance_id: Option<String>,
    /// `None`: unchanged (only allowed after joining).
    pub subscription: Option<Subscription>,
    pub owned: BTreeSet<TopicPartition>,
    pub session_timeout_ms: u64,
    pub strategy: Option<Strategy>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    pub member_id: String,
    pub member_epoch: u64,
    pub group_epoch: u64,
    pub assignment: BTreeSet<TopicPartition>,
    pub revoke: BTreeSet<TopicPartition>,
    pub pending: BTreeSet<TopicPartition>,
}

#[derive(Debug, Clone, Default)]
pub struct LiveGroup {
    name: String,
    strategy: Strategy,
    state: GroupState,
    members: BTreeMap<String, Member>,
    /// Static instance id to the member id currently holding it.
    statics: BTreeMap<String, String>,
    /// The subscribed partitions the current target was computed from.
    partitions: Catalog,
    /// Until then (a coordinator that just took over) only partitions some member claims to
    /// hold are handed out: the owners of the others are probably still consuming them under
    /// the old coordinator and will rejoin within a heartbeat interval.
    hold_until_ms: u64,
    /// Partitions members claimed while the hold lasts.
    hold_claims: BTreeSet<TopicPartition>,
    /// The current target leaves out unclaimed partitions because of the hold.
    held_back: bool,
}

impl LiveGroup {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// A group on a coordinator that just took over: see `hold_until_ms`.
    pub fn holding_until(mut self, until_ms: u64) -> Self {
        self.hold_until_ms = until_ms;
        self
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn state(&self) -> &GroupState {
        &self.state
    }

    pub fn members(&self) -> &BTreeMap<String, Member> {
        &self.members
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `empty`, `stable` or `reconciling`, as `ListGroups` and `DescribeGroup` report it.
    pub fn state_name(&self) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self.state.is_converged() {
            "stable"
        } else {
            "reconciling"
        }
    }

    /// Joins, or processes a heartbeat of, a member. `new_member_id` names a joining member.
    pub fn heartbeat(
        &mut self,
        req: HeartbeatRequest,
        now_ms: u64,
        catalog: &Catalog,
        new_member_id: impl FnOnce() -> String,
    ) -> Result<HeartbeatAnswer, MembershipError> {
        if let Some(asked) = req.strategy
            && asked != self.strategy
        {
            let others = self.members.keys().any(|m| *m != req.member_id);
            if others {
                return Err(MembershipError::InconsistentStrategy {
                    group: self.name.clone(),
                    current: self.strategy,
                    asked,
                });
            }
            self.strategy = asked;
        }
        let mut retarget = false;
        let member_id = if req.member_id.is_empty() {
            retarget = true;
            self.join(&req, now_ms, new_member_id)
        } else {
            let Some(m) = self.members.get_mut(&req.member_id) else {
                return Err(MembershipError::UnknownMember {
                    group: self.name.clone(),
                    member: req.member_id,
                });
            };
            m.last_seen_ms = now_ms;
            m.session_timeout_ms = req.session_timeout_ms;
            if let Some(sub) = &req.subscription
                && *sub != m.subscription
            {
                m.subscription = sub.clone();
                retarget = true;
            }
            req.member_id.clone()
        };
        if retarget
            || self.resolve(catalog) != self.partitions
            || (self.held_back && now_ms >= self.hold_until_ms)
        {
            self.retarget(catalog, now_ms);
        }
        let hb = self
            .state
            .heartbeat(&member_id, req.member_epoch, &req.owned)
            .map_err(|_| MembershipError::UnknownMember {
                group: self.name.clone(),
                member: member_id.clone(),
            })?;
        Ok(HeartbeatAnswer {
            member_id,
            member_epoch: hb.member_epoch,
            group_epoch: self.state.group_epoch(),
            assignment: hb.assignment,
            revoke: hb.revoke,
            pending: hb.pending,
        })
    }

    /// Adds a joining member and returns its id. A static member whose instance id is held
    /// replaces the holder: it takes over the holder's share of the target (the partitions
    /// are freed now and handed to it on this very heartbeat), so nobody else moves.
    fn join(
        &mut self,
        req: &HeartbeatRequest,
        now_ms: u64,
        new_member_id: impl FnOnce() -> String,
    ) -> String {
        let member_id = new_member_id();
        let member = Member {
            instance_id: req.instance_id.clone(),
            subscription: req.subscription.clone().unwrap_or_default(),
            session_timeout_ms: req.session_timeout_ms,
            last_seen_ms: now_ms,
            claimed: req.owned.clone(),
        };
        if let Some(instance) = &req.instance_id
            && let Some(old) = self.statics.insert(instance.clone(), member_id.clone())
        {
            let share = self.state.target_of(&old).clone();
            self.members.remove(&old);
            self.state.remove_member(&old);
            let mut target = self.state.target().clone();
            target.insert(member_id.clone(), share);
            self.members.insert(member_id.clone(), member);
            self.state.set_target(target);
            return member_id;
        }
        self.members.insert(member_id.clone(), member);
        member_id
    }

    /// A member leaves. A static member leaving `temporary` keeps its place (and partitions)
    /// until its session times out, so a restart does not move anything.
    pub fn leave(
        &mut self,
        member_id: &str,
        temporary: bool,
        now_ms: u64,
        catalog: &Catalog,
    ) -> bool {
        let Some(m) = self.members.get(member_id) else {
            return false;
        };
        if temporary && m.instance_id.is_some() {
            return true;
        }
        self.remove(member_id);
        self.retarget(catalog, now_ms);
        true
    }

    fn remove(&mut self, member_id: &str) {
        if let Some(m) = self.members.remove(member_id)
            && let Some(i) = m.instance_id
            && self.statics.get(&i).is_some_and(|held| held == member_id)
        {
            self.statics.remove(&i);
        }
        self.state.remove_member(member_id);
    }

    /// Removes the members whose session ran out; returns them.
    pub fn expire(&mut self, now_ms: u64, catalog: &Catalog) -> Vec<String> {
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.last_seen_ms.saturating_add(m.session_timeout_ms) < now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.remove(id);
        }
        if !gone.is_empty() {
            self.retarget(catalog, now_ms);
        }
        gone
    }

    /// Recomputes the target if the subscribed topics or their partition counts changed (a
    /// topic created that a pattern matches, partitions added, a topic deleted).
    pub fn refresh(&mut self, now_ms: u64, catalog: &Catalog) -> bool {
        let hold_over = self.held_back && now_ms >= self.hold_until_ms;
        if self.members.is_empty() || (!hold_over && self.resolve(catalog) == self.partitions) {
            return false;
        }
        self.retarget(catalog, now_ms);
        true
    }

    /// Whether a member may commit `tp` now: it is assigned it or still giving it up.
    pub fn check_commit(
        &self,
        member_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<(), MembershipError> {
        if member_id.is_empty() {
            if self.members.is_empty() {
                return Ok(());
            }
            return Err(MembershipError::HasMembers {
                group: self.name.clone(),
                members: self.members.len(),
            });
        }
        let Some(m) = self
            .state
            .member(member_id)
            .filter(|_| self.members.contains_key(member_id))
        else {
            return Err(MembershipError::UnknownMember {
                group: self.name.clone(),
                member: member_id.to_owned(),
            });
        };
        match partitions.iter().find(|tp| !m.holds(tp)) {
            Some(tp) => Err(MembershipError::NotOwner {
                group: self.name.clone(),
                member: member_id.to_owned(),
                partition: tp.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The subscribed topics' partition counts.
    fn resolve(&self, catalog: &Catalog) -> Catalog {
        catalog
            .iter()
            .filter(|(t, _)| self.members.values().any(|m| m.subscription.matches(t)))
            .map(|(t, n)| (t.clone(), *n))
            .collect()
    }

    fn retarget(&mut self, catalog: &Catalog, now_ms: u64) {
        let partitions = self.resolve(catalog);
        let specs: Vec<MemberSpec> = self
            .members
            .iter()
            .map(|(id, m)| MemberSpec {
                member_id: id.clone(),
                instance_id: m.instance_id.clone(),
                subscribed: partitions
                    .keys()
                    .filter(|t| m.subscription.matches(t))
                    .cloned()
                    .collect(),
            })
            .collect();
        // Sticky starts from the current target; partitions nobody is targeted for go to the
        // member that claims to hold them (a member rejoining after a coordinator change).
        let mut previous: Assignment = self.state.target().clone();
        let targeted: BTreeSet<&TopicPartition> = previous.values().flatten().collect();
        let mut extra: Vec<(String, TopicPartition)> = Vec::new();
        for (id, m) in &self.members {
            for tp in &m.claimed {
                if !targeted.contains(tp) {
                    extra.push((id.clone(), tp.clone()));
                }
            }
        }
        for (id, tp) in extra {
            previous.entry(id).or_default().insert(tp);
        }
        let mut target = assign(self.strategy, &specs, &partitions, &previous);
        self.held_back = false;
        if now_ms < self.hold_until_ms {
            for m in self.members.values() {
                self.hold_claims.extend(m.claimed.iter().cloned());
            }
            let held = self
                .state
                .members()
                .flat_map(|(_, m)| m.assigned().iter().chain(m.revoking()));
            let mut allowed = self.hold_claims.clone();
            allowed.extend(held.cloned());
            for share in target.values_mut() {
                let before = share.len();
                share.retain(|tp| allowed.contains(tp));
                self.held_back |= share.len() != before;
            }
        } else {
            self.hold_claims.clear();
        }
        for m in self.members.values_mut() {
            m.claimed.clear();
        }
        self.state.set_target(target);
        self.partitions = partitions;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(topics: &[(&str, u32)]) -> Catalog {
        topics.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()
    }

    fn sub(topics: &[&str], patterns: &[&str]) -> Subscription {
        Subscription {
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            patterns: patterns
                .iter()
                .map(|p| TopicPattern::parse(p).expect("pattern"))
                .collect(),
        }
    }

    /// What a new member sends first: no id yet, epoch 0, its subscription and what it claims.
    fn join_request(s: Subscription, owned: BTreeSet<TopicPartition>) -> HeartbeatRequest {
        HeartbeatRequest {
            member_id: String::new(),
            member_epoch: 0,
            instance_id: None,
            subscription: Some(s),
            owned,
            session_timeout_ms: 1000,
            strategy: None,
        }
    }

    fn join(g: &mut LiveGroup, id: &str, s: Subscription, cat: &Catalog) -> HeartbeatAnswer {
        g.heartbeat(join_request(s, BTreeSet::new()), 0, cat, || id.to_owned())
            .expect("join")
    }

    /// A member of the previous coordinator's time joining again with the partitions it held.
    fn rejoin(
        g: &mut LiveGroup,
        id: &str,
        claim: &BTreeSet<TopicPartition>,
        now: u64,
        cat: &Catalog,
    ) -> HeartbeatAnswer {
        let req = HeartbeatRequest {
            session_timeout_ms: 5000,
            ..join_request(sub(&["t"], &[]), claim.clone())
        };
        g.heartbeat(req, now, cat, || id.to_owned())
            .expect("rejoin")
    }

    fn beat(
        g: &mut LiveGroup,
        a: &HeartbeatAnswer,
        now: u64,
        cat: &Catalog,
    ) -> Result<HeartbeatAnswer, MembershipError> {
        let owned = a.assignment.clone();
        g.heartbeat(
            HeartbeatRequest {
                member_id: a.member_id.clone(),
                member_epoch: a.member_epoch,
                instance_id: None,
                subscription: None,
                owned,
                session_timeout_ms: 1000,
                strategy: None,
            },
            now,
            cat,
            || unreachable!("not a join"),
        )
    }

    #[test]
    fn members_converge_to_disjoint_cover_and_a_leaver_is_replaced() {
        let cat = catalog(&[("orders", 6)]);
        let mut g = LiveGroup::new("g");
        let mut a = join(&mut g, "a", sub(&["orders"], &[]), &cat);
        let mut b = join(&mut g, "b", sub(&["orders"], &[]), &cat);
        let mut c = join(&mut g, "c", sub(&["orders"], &[]), &cat);
        for now in 1..10 {
            a = beat(&mut g, &a, now, &cat).expect("a");
            b = beat(&mut g, &b, now, &cat).expect("b");
            c = beat(&mut g, &c, now, &cat).expect("c");
        }
        assert_eq!(g.state_name(), "stable");
        let all: BTreeSet<_> = [&a, &b, &c]
            .iter()
            .flat_map(|x| x.assignment.iter().cloned())
            .collect();
        assert_eq!(all.len(), 6);
        assert_eq!(
            a.assignment.len() + b.assignment.len() + c.assignment.len(),
            6
        );

        // c's session runs out: a and b share its partitions and keep their own.
        let (a_before, b_before) = (a.assignment.clone(), b.assignment.clone());
        for now in 10..1100 {
            if now % 100 == 0 {
                a = beat(&mut g, &a, now, &cat).expect("a");
                b = beat(&mut g, &b, now, &cat).expect("b");
            }
        }
        assert_eq!(g.expire(1100, &cat), vec!["c".to_owned()]);
        a = beat(&mut g, &a, 1101, &cat).expect("a");
        b = beat(&mut g, &b, 1101, &cat).expect("b");
        assert!(a.assignment.is_superset(&a_before));
        assert!(b.assignment.is_superset(&b_before));
        assert_eq!(a.assignment.len() + b.assignment.len(), 6);
        assert!(matches!(
            beat(&mut g, &c, 1102, &cat),
            Err(MembershipError::UnknownMember { .. })
        ));
    }

    #[test]
    fn pattern_picks_up_new_topics() {
        let mut cat = catalog(&[("order.eu", 2), ("other", 2)]);
        let mut g = LiveGroup::new("g");
        let a = join(&mut g, "a", sub(&[], &["order.#"]), &cat);
        let a = beat(&mut g, &a, 1, &cat).expect("a");
        assert_eq!(a.assignment.len(), 2);
        cat.insert("order.us".into(), 3);
        assert!(g.refresh(3, &cat));
        let a = beat(&mut g, &a, 2, &cat).expect("a");
        assert_eq!(a.assignment.len(), 5);
        assert!(!g.refresh(3, &cat));
    }

    #[test]
    fn commits_are_fenced_to_owners() {
        let cat = catalog(&[("t", 2)]);
        let mut g = LiveGroup::new("g");
        let a = join(&mut g, "a", sub(&["t"], &[]), &cat);
        let a = beat(&mut g, &a, 1, &cat).expect("a");
        let tp0 = TopicPartition::new("t", 0);
        assert!(g.check_commit("a", std::slice::from_ref(&tp0)).is_ok());
        assert!(matches!(
            g.check_commit("", std::slice::from_ref(&tp0)),
            Err(MembershipError::HasMembers { .. })
        ));
        assert!(matches!(
            g.check_commit("zombie", std::slice::from_ref(&tp0)),
            Err(MembershipError::UnknownMember { .. })
        ));
        // b joins; whatever a gives up, it can no longer commit once it confirmed.
        let _b = join(&mut g, "b", sub(&["t"], &[]), &cat);
        let a2 = beat(&mut g, &a, 2, &cat).expect("a");
        assert_eq!(a2.revoke.len(), 1);
        let gone = a2.revoke.iter().next().cloned().expect("revoked");
        assert!(g.check_commit("a", std::slice::from_ref(&gone)).is_ok());
        let _ = beat(&mut g, &a2, 3, &cat).expect("a confirms");
        assert!(matches!(
            g.check_commit("a", std::slice::from_ref(&gone)),
            Err(MembershipError::NotOwner { .. })
        ));
        assert!(g.leave("a", false, 4, &cat));
        assert!(g.leave("b", false, 4, &cat));
        assert!(g.check_commit("", &[tp0]).is_ok());
    }

    #[test]
    fn static_member_restart_takes_its_place_back() {
        let cat = catalog(&[("t", 4)]);
        let mut g = LiveGroup::new("g");
        let req = |id: &str, epoch, owned: BTreeSet<TopicPartition>| HeartbeatRequest {
            member_id: id.to_owned(),
            member_epoch: epoch,
            instance_id: Some("i1".into()),
            subscription: Some(sub(&["t"], &[])),
            owned,
            session_timeout_ms: 1000,
            strategy: None,
        };
        let s1 = g
            .heartbeat(req("", 0, BTreeSet::new()), 0, &cat, || "s1".into())
            .expect("join");
        let mut b = join(&mut g, "b", sub(&["t"], &[]), &cat);
        let mut s = s1;
        for now in 1..6 {
            s = g
                .heartbeat(
                    req(&s.member_id, s.member_epoch, s.assignment.clone()),
                    now,
                    &cat,
                    || unreachable!(),
                )
                .expect("s");
            b = beat(&mut g, &b, now, &cat).expect("b");
        }
        let (mine, theirs) = (s.assignment.clone(), b.assignment.clone());
        assert_eq!(mine.len(), 2);
        // Restart: a new process with the same instance id.
        let s2 = g
            .heartbeat(req("", 0, BTreeSet::new()), 10, &cat, || "s2".into())
            .expect("rejoin");
        assert_eq!(s2.member_id, "s2");
        assert_eq!(s2.assignment, mine);
        let b2 = beat(&mut g, &b, 11, &cat).expect("b");
        assert_eq!(b2.assignment, theirs);
        assert!(b2.revoke.is_empty());
        assert!(!g.members().contains_key("s1"));
    }

    #[test]
    fn a_new_coordinator_hands_out_only_claimed_partitions_at_first() {
        let cat = catalog(&[("t", 4)]);
        let mut g = LiveGroup::new("g").holding_until(1000);
        let claim: BTreeSet<TopicPartition> =
            [TopicPartition::new("t", 0), TopicPartition::new("t", 1)].into();
        let a = rejoin(&mut g, "a", &claim, 10, &cat);
        assert_eq!(
            a.assignment, claim,
            "only what it claims while others may rejoin"
        );
        // Another old member rejoins with its partitions.
        let claim_b: BTreeSet<TopicPartition> = [TopicPartition::new("t", 2)].into();
        let b = rejoin(&mut g, "b", &claim_b, 20, &cat);
        assert!(b.assignment.is_subset(&claim_b));
        // After the hold, the unclaimed partition is assigned too.
        assert!(g.refresh(1000, &cat));
        let a = beat(&mut g, &a, 1001, &cat).expect("a");
        let b = beat(&mut g, &b, 1001, &cat).expect("b");
        let a = beat(&mut g, &a, 1002, &cat).expect("a");
        let b = beat(&mut g, &b, 1002, &cat).expect("b");
        assert_eq!(a.assignment.len() + b.assignment.len(), 4);
    }

    #[test]
    fn strategy_must_agree() {
        let cat = catalog(&[("t", 1)]);
        let mut g = LiveGroup::new("g");
        let _a = join(&mut g, "a", sub(&["t"], &[]), &cat);
        let r = g.heartbeat(
            HeartbeatRequest {
                strategy: Some(Strategy::Range),
                ..join_request(sub(&["t"], &[]), BTreeSet::new())
            },
            1,
            &cat,
            || "b".into(),
        );
        assert!(matches!(
            r,
            Err(MembershipError::InconsistentStrategy { .. })
        ));
    }
}
