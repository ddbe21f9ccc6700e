//! A member's bookkeeping, shared by the heartbeat task (which talks to the coordinator) and
//! `poll` (which starts and stops consuming partitions). Pure data, no I/O, so every transition
//! is unit-tested.
//!
//! The rule that keeps a partition from being consumed by two members: a partition stays in
//! `consuming` until `poll` has stopped fetching it (and committed it), a partition `poll` is
//! about to start stays in `starting` until it was started (or given up), and every heartbeat
//! reports `consuming ∪ starting ∪ assigned` as owned. The coordinator hands a partition to
//! another member only after a report, made with the current epoch, leaves it out; and `poll`
//! starts only partitions that are still assigned when it starts them.
//!
//! The session lease: the coordinator removes a member that sent no heartbeat for its session
//! timeout. The member counts the same timeout from when it *sent* its last heartbeat that got
//! an answer (never later than the coordinator's own count, which starts when that heartbeat
//! arrived), and once that has passed it takes every partition as lost.

use std::collections::BTreeSet;
use std::time::Duration;

use keel_proto::v1::{GroupHeartbeatRequest, GroupHeartbeatResponse};
use tokio::time::Instant;

use super::coordinator::{by_topic, flatten};
use crate::error::ClientError;

/// A topic partition.
pub(crate) type Part = (String, u32);

/// How often to heartbeat until the coordinator says otherwise.
pub(crate) const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// A floor for the coordinator's interval, so a bad answer cannot make the task spin.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Heartbeating; joining while `member_id` is empty.
    Active,
    /// The membership is gone (`UNKNOWN_MEMBER`, session expired): rejoining waits until `poll`
    /// has dropped every partition, so the new membership never overlaps the old one.
    Lost,
    /// Left because `poll` was not called within `max_poll_interval`: the next `poll` rejoins.
    Left,
    /// Closed, or a fatal error: no more heartbeats.
    Stopped,
}

/// What `poll` has to do before fetching.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Drop without committing.
    pub lost: Vec<Part>,
    /// Stop, commit (with auto-commit), then release.
    pub revoke: Vec<Part>,
    /// Look up committed offsets and start.
    pub add: Vec<Part>,
    /// The membership the plan was made under; applying it after a loss would mix two
    /// memberships.
    pub generation: u64,
}

impl Plan {
    pub(crate) fn is_empty(&self) -> bool {
        self.lost.is_empty() && self.revoke.is_empty() && self.add.is_empty()
    }
}

#[derive(Debug)]
pub(crate) struct Membership {
    pub member_id: String,
    pub member_epoch: u64,
    /// Bumped each time the membership is lost or left, so that answers to requests made under
    /// an older one are ignored.
    pub generation: u64,
    pub phase: Phase,
    /// What the coordinator last said this member may consume.
    pub assigned: BTreeSet<Part>,
    /// What `poll` is consuming, or has stopped fetching but not yet released.
    pub consuming: BTreeSet<Part>,
    /// What `poll` is about to start (it is looking up their committed offsets): reported as
    /// owned even once revoked, so that the coordinator cannot hand them to another member
    /// before `poll` has seen the revocation.
    pub starting: BTreeSet<Part>,
    /// When the last heartbeat of this membership that got an answer was sent; the membership
    /// is good for `session_timeout` from then. `None` while not joined.
    pub lease_from: Option<Instant>,
    /// Partitions a commit was fenced for: dropped without committing by the next `poll`.
    pub lost_partitions: BTreeSet<Part>,
    /// Every partition in `consuming` has to be dropped without committing.
    pub lose_all: bool,
    pub heartbeat_interval: Duration,
    /// A rejection the consumer cannot recover from (a strategy mismatch, an invalid
    /// subscription); every `poll` returns it.
    pub fatal: Option<ClientError>,
}

impl Default for Membership {
    fn default() -> Self {
        Self {
            member_id: String::new(),
            member_epoch: 0,
            generation: 0,
            phase: Phase::Active,
            assigned: BTreeSet::new(),
            consuming: BTreeSet::new(),
            starting: BTreeSet::new(),
            lease_from: None,
            lost_partitions: BTreeSet::new(),
            lose_all: false,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            fatal: None,
        }
    }
}

/// The parts of a heartbeat that do not change between heartbeats.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeartbeatTemplate {
    pub group_id: String,
    pub instance_id: String,
    pub topics: Vec<String>,
    pub patterns: Vec<String>,
    pub session_timeout_ms: u32,
    pub strategy: String,
}

impl Membership {
    /// Everything this member is or may be consuming: what `poll` has not released, what it is
    /// starting, and what the coordinator granted and `poll` may start at any moment.
    pub(crate) fn owned(&self) -> BTreeSet<Part> {
        self.consuming
            .iter()
            .chain(&self.starting)
            .chain(&self.assigned)
            .cloned()
            .collect()
    }

    /// The next heartbeat. The subscription goes with every heartbeat, so a coordinator that
    /// lost it (a failover) has it again at once.
    pub(crate) fn heartbeat_request(&self, t: &HeartbeatTemplate) -> GroupHeartbeatRequest {
        let owned = self.owned();
        GroupHeartbeatRequest {
            group_id: t.group_id.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.member_epoch,
            instance_id: t.instance_id.clone(),
            topics: t.topics.clone(),
            patterns: t.patterns.clone(),
            owned: by_topic(owned.iter().map(|(t, p)| (t.as_str(), *p))),
            session_timeout_ms: t.session_timeout_ms,
            strategy: t.strategy.clone(),
        }
    }

    /// Applies a heartbeat answer to a request sent under `generation` at `sent_at`. Returns
    /// whether `poll` has something new to do.
    pub(crate) fn on_heartbeat(
        &mut self,
        generation: u64,
        sent_at: Instant,
        resp: &GroupHeartbeatResponse,
    ) -> bool {
        if generation != self.generation || self.phase != Phase::Active {
            // The membership was lost (or left) while the request was out: its answer speaks
            // for a member this one no longer is.
            return false;
        }
        // Heartbeats are sent one at a time, but keep the lease monotonic all the same.
        self.lease_from = Some(self.lease_from.map_or(sent_at, |t| t.max(sent_at)));
        if !resp.member_id.is_empty() {
            self.member_id.clone_from(&resp.member_id);
        }
        self.member_epoch = resp.member_epoch;
        self.heartbeat_interval = match resp.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT_INTERVAL,
            ms => Duration::from_millis(u64::from(ms)).max(MIN_HEARTBEAT_INTERVAL),
        };
        let assigned: BTreeSet<Part> = flatten(&resp.assignment).collect();
        let revoke_now = flatten(&resp.revoke).any(|p| self.consuming.contains(&p));
        let changed = assigned != self.assigned;
        self.assigned = assigned;
        changed || revoke_now || !self.plan().is_empty()
    }

    /// The coordinator no longer knows this member (or it left). `seen` is the generation the
    /// failing request was made under: a second report of the same loss changes nothing.
    /// Returns whether anything changed.
    pub(crate) fn on_lost(&mut self, seen: u64, left: bool) -> bool {
        if seen != self.generation || self.phase == Phase::Stopped {
            return false;
        }
        self.generation += 1;
        self.member_id.clear();
        self.member_epoch = 0;
        self.assigned.clear();
        // Not started yet, so nothing to drop: `adopted` refuses them (the generation moved).
        self.starting.clear();
        self.lease_from = None;
        self.lost_partitions.clear();
        self.lose_all = !self.consuming.is_empty();
        self.phase = if left {
            Phase::Left
        } else if self.lose_all {
            Phase::Lost
        } else {
            Phase::Active
        };
        true
    }

    /// A commit was fenced for these partitions: the coordinator does not count them as this
    /// member's, so `poll` drops them without committing.
    pub(crate) fn on_fenced(&mut self, generation: u64, parts: &[Part]) -> bool {
        if generation != self.generation {
            return false;
        }
        let before = self.lost_partitions.len();
        self.lost_partitions.extend(
            parts
                .iter()
                .filter(|p| self.consuming.contains(*p))
                .cloned(),
        );
        self.lost_partitions.len() != before
    }

    /// What `poll` should do now.
    pub(crate) fn plan(&self) -> Plan {
        let generation = self.generation;
        if self.lose_all {
            return Plan {
                lost: self.consuming.iter().cloned().collect(),
                generation,
                ..Plan::default()
            };
        }
        let lost: Vec<Part> = self
            .consuming
            .intersection(&self.lost_partitions)
            .cloned()
            .collect();
        let revoke = self
            .consuming
            .difference(&self.assigned)
            .filter(|p| !self.lost_partitions.contains(*p))
            .cloned()
            .collect();
        let add = if self.phase == Phase::Active {
            self.assigned.difference(&self.consuming).cloned().collect()
        } else {
            Vec::new()
        };
        Plan {
            lost,
            revoke,
            add,
            generation,
        }
    }

    /// `poll` stopped consuming `parts` (revoked or lost). Returns whether the heartbeat task
    /// should report at once.
    pub(crate) fn released(&mut self, parts: &[Part]) -> bool {
        let mut any = false;
        for p in parts {
            any |= self.consuming.remove(p);
            self.lost_partitions.remove(p);
        }
        if self.lose_all && self.consuming.is_empty() {
            self.lose_all = false;
            if self.phase == Phase::Lost {
                self.phase = Phase::Active;
            }
        }
        any
    }

    /// `poll` is about to start `parts` (planned under `generation`): keeps those still granted
    /// (and not consumed yet) in `starting`, and returns them; `None` if the membership changed
    /// since the plan.
    pub(crate) fn begin_start(&mut self, generation: u64, parts: &[Part]) -> Option<Vec<Part>> {
        if generation != self.generation || self.lose_all || self.phase != Phase::Active {
            return None;
        }
        let parts: Vec<Part> = parts
            .iter()
            .filter(|p| self.assigned.contains(*p) && !self.consuming.contains(*p))
            .cloned()
            .collect();
        self.starting.extend(parts.iter().cloned());
        Some(parts)
    }

    /// `poll` has looked up where `parts` (from [`begin_start`](Self::begin_start) under
    /// `generation`) start. Moves the ones still granted to `consuming` and returns them (the
    /// ones `poll` may start); the others were revoked meanwhile and are given up. `None` (and
    /// nothing started) if the membership changed meanwhile.
    pub(crate) fn adopted(&mut self, generation: u64, parts: &[Part]) -> Option<Vec<Part>> {
        if generation != self.generation || self.lose_all {
            return None;
        }
        let mut adopted = Vec::with_capacity(parts.len());
        for p in parts {
            self.starting.remove(p);
            if self.assigned.contains(p) {
                self.consuming.insert(p.clone());
                adopted.push(p.clone());
            }
        }
        Some(adopted)
    }

    /// `poll` gave up starting `parts` (a lookup failed, or it was cancelled). Returns whether
    /// the heartbeat task should report at once (a partition no longer granted was still
    /// reported as owned).
    pub(crate) fn start_abandoned(&mut self, generation: u64, parts: &[Part]) -> bool {
        if generation != self.generation {
            return false;
        }
        let mut report = false;
        for p in parts {
            if self.starting.remove(p) && !self.assigned.contains(p) && !self.consuming.contains(p)
            {
                report = true;
            }
        }
        report
    }

    /// When the lease runs out, if this member has joined: past it the coordinator may have
    /// removed the member and handed its partitions to others.
    pub(crate) fn lease_expiry(&self, session_timeout: Duration) -> Option<Instant> {
        if self.phase != Phase::Active || self.member_id.is_empty() {
            return None;
        }
        self.lease_from.map(|t| t + session_timeout)
    }

    /// `poll` was called after the member left for exceeding `max_poll_interval`: join again.
    pub(crate) fn resume(&mut self) -> bool {
        if self.phase == Phase::Left && !self.lose_all {
            self.phase = Phase::Active;
            return true;
        }
        false
    }

    /// Whether the heartbeat task should send heartbeats (else it waits to be woken).
    #[cfg(test)]
    pub(crate) fn wants_heartbeat(&self) -> bool {
        self.phase == Phase::Active
    }
}

#[cfg(test)]
mod tests {
    use keel_proto::v1::TopicPartitions;

    use super::*;

    fn p(n: u32) -> Part {
        ("t".to_owned(), n)
    }

    fn tps(ps: &[u32]) -> Vec<TopicPartitions> {
        if ps.is_empty() {
            return Vec::new();
        }
        vec![TopicPartitions {
            topic: "t".into(),
            partitions: ps.to_vec(),
        }]
    }

    fn answer(epoch: u64, assignment: &[u32], revoke: &[u32]) -> GroupHeartbeatResponse {
        GroupHeartbeatResponse {
            member_id: "m1".into(),
            member_epoch: epoch,
            group_epoch: 1,
            heartbeat_interval_ms: 1000,
            assignment: tps(assignment),
            revoke: tps(revoke),
            pending: Vec::new(),
        }
    }

    fn owned_of(req: &GroupHeartbeatRequest) -> Vec<Part> {
        flatten(&req.owned).collect()
    }

    /// A member granted `assignment` when it joined (at epoch 1), and its first plan.
    fn joined(assignment: &[u32]) -> (Membership, Plan) {
        let mut m = Membership::default();
        m.on_heartbeat(0, Instant::now(), &answer(1, assignment, &[]));
        let plan = m.plan();
        (m, plan)
    }

    /// What `poll` does with a plan's additions when the offset lookup is instant.
    fn start(m: &mut Membership, plan: &Plan) -> Option<Vec<Part>> {
        let parts = m.begin_start(plan.generation, &plan.add)?;
        m.adopted(plan.generation, &parts)
    }

    #[test]
    fn join_assign_then_revoke() {
        let t = HeartbeatTemplate {
            group_id: "g".into(),
            topics: vec!["t".into()],
            ..Default::default()
        };
        let mut m = Membership::default();
        let req = m.heartbeat_request(&t);
        assert_eq!((req.member_id.as_str(), req.member_epoch), ("", 0));
        assert!(req.owned.is_empty());
        assert_eq!(req.topics, vec!["t".to_owned()]);

        assert!(m.on_heartbeat(0, Instant::now(), &answer(1, &[0, 1], &[])));
        assert_eq!(m.member_id, "m1");
        assert_eq!(m.heartbeat_interval, Duration::from_secs(1));
        // Granted but not started yet: reported as owned all the same, so the coordinator
        // cannot hand them to someone else while poll is about to start them.
        assert_eq!(owned_of(&m.heartbeat_request(&t)), vec![p(0), p(1)]);
        let plan = m.plan();
        assert_eq!(plan.add, vec![p(0), p(1)]);
        assert!(plan.revoke.is_empty() && plan.lost.is_empty());
        assert_eq!(start(&mut m, &plan), Some(plan.add.clone()));
        assert!(m.plan().is_empty());

        // Same answer again: nothing to do.
        assert!(!m.on_heartbeat(0, Instant::now(), &answer(1, &[0, 1], &[])));

        // Told to give up 1: still reported until poll releases it.
        assert!(m.on_heartbeat(0, Instant::now(), &answer(2, &[0], &[1])));
        let req = m.heartbeat_request(&t);
        assert_eq!(req.member_epoch, 2);
        assert_eq!(owned_of(&req), vec![p(0), p(1)]);
        let plan = m.plan();
        assert_eq!(plan.revoke, vec![p(1)]);
        assert!(plan.add.is_empty());
        assert!(m.released(&plan.revoke));
        assert_eq!(owned_of(&m.heartbeat_request(&t)), vec![p(0)]);
        assert!(m.plan().is_empty());
    }

    #[test]
    fn lost_membership_waits_for_poll_before_rejoining() {
        let (mut m, plan) = joined(&[0, 1]);
        start(&mut m, &plan);

        assert!(m.on_lost(0, false));
        assert_eq!(m.phase, Phase::Lost);
        assert!(!m.wants_heartbeat());
        assert!(m.member_id.is_empty() && m.member_epoch == 0);
        // A second report of the same loss (the commit path saw it too) is ignored.
        assert!(!m.on_lost(0, false));
        // A late answer to a heartbeat sent before the loss is ignored.
        assert!(!m.on_heartbeat(0, Instant::now(), &answer(3, &[0, 1, 2], &[])));
        assert!(m.assigned.is_empty());

        let plan = m.plan();
        assert_eq!(plan.lost, vec![p(0), p(1)]);
        assert!(plan.revoke.is_empty() && plan.add.is_empty());
        m.released(&plan.lost);
        assert_eq!(m.phase, Phase::Active);
        assert!(m.wants_heartbeat());
        assert!(
            m.heartbeat_request(&HeartbeatTemplate::default())
                .owned
                .is_empty()
        );
    }

    #[test]
    fn loss_while_owning_nothing_rejoins_at_once() {
        let mut m = Membership::default();
        m.on_heartbeat(0, Instant::now(), &answer(1, &[], &[]));
        assert!(m.on_lost(0, false));
        assert_eq!(m.phase, Phase::Active);
        assert!(!m.lose_all);
    }

    #[test]
    fn adoption_under_an_old_membership_is_refused() {
        let (mut m, plan) = joined(&[0]);
        assert_eq!(m.begin_start(plan.generation, &plan.add), Some(vec![p(0)]));
        // The membership is lost while poll looks up committed offsets.
        m.on_lost(0, false);
        assert!(m.starting.is_empty());
        assert_eq!(m.adopted(plan.generation, &plan.add), None);
        assert!(m.consuming.is_empty());
        assert_eq!(m.phase, Phase::Active);
        // Giving up a start of the old membership changes nothing either.
        assert!(!m.start_abandoned(plan.generation, &plan.add));
        // Nor can a plan of the old membership begin.
        assert_eq!(m.begin_start(plan.generation, &plan.add), None);
    }

    /// A partition revoked while `poll` looks up its committed offset: it stays reported as
    /// owned until `poll` is done with the lookup, and then it is not started.
    #[test]
    fn partition_revoked_while_starting_is_held_then_not_started() {
        let t = HeartbeatTemplate::default();
        let (mut m, plan) = joined(&[0, 1]);
        assert_eq!(plan.add, vec![p(0), p(1)]);
        let starting = m
            .begin_start(plan.generation, &plan.add)
            .expect("same membership");
        assert_eq!(starting, vec![p(0), p(1)]);

        // The coordinator takes 1 away while the lookup is out.
        assert!(m.on_heartbeat(0, Instant::now(), &answer(2, &[0], &[1])));
        // The next heartbeat, at the current epoch, still reports it: the coordinator cannot
        // hand it to another member yet.
        let req = m.heartbeat_request(&t);
        assert_eq!(req.member_epoch, 2);
        assert_eq!(owned_of(&req), vec![p(0), p(1)]);

        // The lookup is done: only 0 is started, 1 is given up.
        assert_eq!(m.adopted(plan.generation, &starting), Some(vec![p(0)]));
        assert!(m.starting.is_empty());
        assert_eq!(m.consuming, BTreeSet::from([p(0)]));
        assert_eq!(owned_of(&m.heartbeat_request(&t)), vec![p(0)]);
        assert!(m.plan().is_empty());
    }

    #[test]
    fn partition_revoked_between_plan_and_start_is_not_started() {
        let (mut m, plan) = joined(&[0, 1]);
        m.on_heartbeat(0, Instant::now(), &answer(2, &[0], &[1]));
        assert_eq!(m.begin_start(plan.generation, &plan.add), Some(vec![p(0)]));
        assert_eq!(m.starting, BTreeSet::from([p(0)]));
        assert_eq!(m.adopted(plan.generation, &[p(0)]), Some(vec![p(0)]));
        assert_eq!(m.consuming, BTreeSet::from([p(0)]));
    }

    #[test]
    fn abandoned_start_releases_what_was_revoked_meanwhile() {
        let t = HeartbeatTemplate::default();
        let (mut m, plan) = joined(&[0, 1]);
        let starting = m
            .begin_start(plan.generation, &plan.add)
            .expect("same membership");
        m.on_heartbeat(0, Instant::now(), &answer(2, &[0], &[1]));
        assert_eq!(owned_of(&m.heartbeat_request(&t)), vec![p(0), p(1)]);
        // The lookup failed: 1 is no longer held, and the heartbeat task must say so.
        assert!(m.start_abandoned(plan.generation, &starting));
        assert!(m.starting.is_empty());
        assert_eq!(owned_of(&m.heartbeat_request(&t)), vec![p(0)]);
        // 0 is still granted: the next poll starts it.
        assert_eq!(m.plan().add, vec![p(0)]);
        // Abandoning partitions that are still granted has nothing to report.
        let starting = m
            .begin_start(plan.generation, &[p(0)])
            .expect("same membership");
        assert!(!m.start_abandoned(plan.generation, &starting));
        // Abandoning after adoption (the guard of a start that finished) changes nothing.
        let starting = m
            .begin_start(plan.generation, &[p(0)])
            .expect("same membership");
        assert_eq!(m.adopted(plan.generation, &starting), Some(vec![p(0)]));
        assert!(!m.start_abandoned(plan.generation, &starting));
        assert_eq!(m.consuming, BTreeSet::from([p(0)]));
    }

    #[test]
    fn lease_counts_from_when_the_last_answered_heartbeat_was_sent() {
        let session = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut m = Membership::default();
        // Not joined: no lease to run out.
        assert_eq!(m.lease_expiry(session), None);

        m.on_heartbeat(0, t0, &answer(1, &[0], &[]));
        assert_eq!(m.lease_expiry(session), Some(t0 + session));
        let t1 = t0 + Duration::from_secs(3);
        m.on_heartbeat(0, t1, &answer(1, &[0], &[]));
        assert_eq!(m.lease_expiry(session), Some(t1 + session));
        // An answer to an older request never shortens it.
        m.on_heartbeat(0, t0, &answer(1, &[0], &[]));
        assert_eq!(m.lease_expiry(session), Some(t1 + session));

        // Lost: no lease, and a late answer of the lost membership does not bring one back.
        m.on_lost(0, false);
        assert_eq!(m.lease_expiry(session), None);
        m.on_heartbeat(0, t1 + Duration::from_secs(1), &answer(1, &[0], &[]));
        assert_eq!(m.lease_expiry(session), None);

        // Rejoined: a new lease from the join.
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(m.phase, Phase::Active);
        m.on_heartbeat(1, t2, &answer(1, &[], &[]));
        assert_eq!(m.lease_expiry(session), Some(t2 + session));

        // Left for max_poll_interval: no lease either.
        m.on_lost(1, true);
        assert_eq!(m.lease_expiry(session), None);
    }

    #[test]
    fn leaving_for_max_poll_interval_resumes_on_poll() {
        let (mut m, plan) = joined(&[0]);
        start(&mut m, &plan);
        assert!(m.on_lost(0, true));
        assert_eq!(m.phase, Phase::Left);
        // Partitions must be dropped first.
        assert!(!m.resume());
        let plan = m.plan();
        assert_eq!(plan.lost, vec![p(0)]);
        m.released(&plan.lost);
        assert_eq!(m.phase, Phase::Left);
        assert!(!m.wants_heartbeat());
        assert!(m.resume());
        assert!(m.wants_heartbeat());
    }

    #[test]
    fn fenced_commit_drops_only_those_partitions() {
        let (mut m, plan) = joined(&[0, 1]);
        start(&mut m, &plan);
        assert!(m.on_fenced(0, &[p(1), p(7)]));
        let plan = m.plan();
        assert_eq!(plan.lost, vec![p(1)]);
        assert!(plan.revoke.is_empty());
        assert!(plan.add.is_empty());
        m.released(&plan.lost);
        // Still granted by the coordinator: started again from the committed offset.
        assert_eq!(m.plan().add, vec![p(1)]);
        // A fence reported under an older generation changes nothing.
        assert!(!m.on_fenced(5, &[p(0)]));
    }

    #[test]
    fn stopped_member_ignores_everything() {
        let mut m = Membership {
            phase: Phase::Stopped,
            ..Membership::default()
        };
        assert!(!m.on_heartbeat(0, Instant::now(), &answer(1, &[0], &[])));
        assert!(!m.on_lost(0, false));
        assert!(!m.wants_heartbeat());
        assert!(m.plan().add.is_empty());
    }
}
