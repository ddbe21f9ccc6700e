//! Quiescence of idle partition groups, and broker-level liveness.
//!
//! An idle Raft group still costs its ticks and heartbeats: with 1,000 partition replicas per
//! broker that is most of a core. So a leader whose partition has had no write for
//! [`QUIET_AFTER`], and whose voters all hold its whole log, stops the group's ticker (no
//! heartbeats, no election timer) and says so in the one message per peer broker that every
//! broker sends every [`BEAT`]: "I lead these groups, in these terms, and they are quiet". A
//! follower that hears this from the leader of its group (in a term at least its own) stops its
//! ticker too. The first write wakes the leader's group; the followers wake when the leader stops
//! listing the group, or when they have not heard from the leader's broker for [`BEAT_TIMEOUT`]
//! (it died or is cut off): their election timer has long expired, so they elect at once.
//!
//! Safety does not depend on any of this (Raft never needs heartbeats to be safe); it only
//! changes when elections can start. The same per-peer beats give each broker a view of which
//! peers it can reach, which a quiet leader uses in place of the heartbeat acknowledgements it
//! no longer receives when deciding whether it may still serve clients.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a quiet leader keeps its ticker (heartbeats) running after it first lists a group
/// as quiet, so that its followers hear the beat and stop their election timers before the
/// heartbeats stop.
pub const LEADER_SLEEP_DELAY: Duration = Duration::from_millis(500);

/// How often a broker sends its beat to every peer.
pub const BEAT: Duration = Duration::from_millis(150);
/// A peer not heard from for this long is treated as unreachable.
pub const BEAT_TIMEOUT: Duration = Duration::from_millis(600);
/// A leader's group goes quiet after this long without a write.
pub const QUIET_AFTER: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When a peer's last beat arrived, and the (group, term) pairs it said it leads quietly.
type QuietBeat = (Instant, HashSet<(u64, u64)>);

/// What this broker knows of its peers, from their beats and the answers to its own.
#[derive(Debug, Default)]
pub struct Liveness {
    contact: Mutex<HashMap<u32, Instant>>,
    quiet: Mutex<HashMap<u32, QuietBeat>>,
}

impl Liveness {
    pub fn heard_from(&self, peer: u32) {
        lock(&self.contact).insert(peer, Instant::now());
    }

    pub fn beat_from(&self, peer: u32, quiet_groups: HashSet<(u64, u64)>) {
        let now = Instant::now();
        lock(&self.contact).insert(peer, now);
        lock(&self.quiet).insert(peer, (now, quiet_groups));
    }

    /// True when `peer` was heard from within [`BEAT_TIMEOUT`].
    pub fn reachable(&self, peer: u32) -> bool {
        self.heard_within(peer, BEAT_TIMEOUT)
    }

    /// True when `peer` was heard from within `window`.
    pub fn heard_within(&self, peer: u32, window: Duration) -> bool {
        lock(&self.contact)
            .get(&peer)
            .is_some_and(|t| t.elapsed() < window)
    }

    /// True when this broker (`me`) plus the reachable peers among `voters` form a majority.
    pub fn majority_reachable(&self, me: u32, voters: &[u32]) -> bool {
        let reachable = voters
            .iter()
            .filter(|v| **v == me || self.reachable(**v))
            .count();
        reachable * 2 > voters.len()
    }

    /// The leader broker that, in a fresh beat, declares `group` quiet in a term of at least
    /// `term`.
    pub fn quiet_leader(&self, group: u64, term: u64) -> Option<u32> {
        lock(&self.quiet).iter().find_map(|(peer, (at, groups))| {
            (at.elapsed() < BEAT_TIMEOUT && groups.iter().any(|(g, t)| *g == group && *t >= term))
                .then_some(*peer)
        })
    }

    /// True while `peer`'s fresh beats still declare `group` quiet in a term of at least
    /// `term` (a follower that has seen a later term must not sleep under an old leader).
    pub fn still_quiet(&self, peer: u32, group: u64, term: u64) -> bool {
        lock(&self.quiet).get(&peer).is_some_and(|(at, groups)| {
            at.elapsed() < BEAT_TIMEOUT && groups.iter().any(|(g, t)| *g == group && *t >= term)
        })
    }
}

/// What a leading replica's group looks like to its quiescence pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leading {
    /// The group is quiet.
    pub quiet: bool,
    /// It went quiet as a follower, under another leader (it leads now: a transfer).
    pub quiet_under_other: bool,
    /// How long it has been quiet.
    pub quiet_for: Duration,
    /// How long since its last write.
    pub idle_for: Duration,
    /// A membership change (a reassignment, a replaced broker's removal) is in progress.
    pub changing: bool,
    /// Every voter holds the whole committed log, and there are no learners.
    pub all_caught_up: bool,
}

/// What the leader's quiescence pass does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderStep {
    /// Wake the group and run its ticker.
    Wake,
    /// Keep (or start) the ticker.
    Tick,
    /// Stop the ticker: quiet long enough for the followers to have heard it in the beats.
    Sleep,
    /// Declare the group quiet (the beats list it from now on); the ticker runs on until
    /// [`LEADER_SLEEP_DELAY`].
    GoQuiet,
    /// Nothing to change.
    Hold,
}

/// The leader's side of quiescence, decided.
pub fn leader_step(l: Leading) -> LeaderStep {
    if l.quiet && (l.quiet_under_other || l.changing) {
        // A membership change writes log entries, which the Raft core accepts only from a
        // leader whose lease a quorum renewed within an election timeout; a group without
        // heartbeats has none. Asleep through a change, the leader was refused for good.
        return LeaderStep::Wake;
    }
    if l.quiet {
        return if l.quiet_for >= LEADER_SLEEP_DELAY {
            LeaderStep::Sleep
        } else {
            LeaderStep::Hold
        };
    }
    if l.changing || l.idle_for < QUIET_AFTER {
        return LeaderStep::Tick;
    }
    if l.all_caught_up {
        LeaderStep::GoQuiet
    } else {
        LeaderStep::Hold
    }
}

/// A replica's quiescence state, shared by the produce path and the cluster loops.
#[derive(Debug)]
pub struct Activity {
    quiet: AtomicBool,
    /// Whether the group's ticker runs (elections, heartbeats).
    ticking: AtomicBool,
    /// A replica restarted from existing data: its ticker stays off until it knows whether its
    /// group's leader declares the group quiet, so that it does not depose an idle leader.
    pending: AtomicBool,
    started: Instant,
    /// The leader broker whose beats keep this follower quiet.
    quiet_leader: Mutex<Option<u32>>,
    quiet_since: Mutex<Instant>,
    last_write: Mutex<Instant>,
}

impl Activity {
    /// A replica whose ticker is running (`ticking`), or one restarted from existing data whose
    /// ticker is off until [`Activity::pending`] is resolved.
    pub fn new(ticking: bool) -> Self {
        let now = Instant::now();
        Self {
            quiet: AtomicBool::new(false),
            ticking: AtomicBool::new(ticking),
            pending: AtomicBool::new(!ticking),
            started: now,
            quiet_leader: Mutex::new(None),
            quiet_since: Mutex::new(now),
            last_write: Mutex::new(now),
        }
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Acquire)
    }

    pub fn is_ticking(&self) -> bool {
        self.ticking.load(Ordering::Acquire)
    }

    /// Records whether the ticker runs now.
    pub fn set_ticking(&self, on: bool) -> bool {
        self.ticking.swap(on, Ordering::AcqRel) != on
    }

    /// True while a restarted replica has not decided yet; false (for good) once it has, or
    /// once `grace` has passed since it started.
    pub fn pending(&self, grace: Duration) -> bool {
        if !self.pending.load(Ordering::Acquire) {
            return false;
        }
        if self.started.elapsed() >= grace {
            self.pending.store(false, Ordering::Release);
            return false;
        }
        true
    }

    pub fn resolve_pending(&self) {
        self.pending.store(false, Ordering::Release);
    }

    /// Records a write; returns true when the group was quiet (the caller wakes it).
    pub fn wrote(&self) -> bool {
        *lock(&self.last_write) = Instant::now();
        self.pending.store(false, Ordering::Release);
        let was = self.quiet.swap(false, Ordering::AcqRel);
        *lock(&self.quiet_leader) = None;
        was
    }

    pub fn idle_for(&self) -> Duration {
        lock(&self.last_write).elapsed()
    }

    /// Marks the group quiet (as leader: `leader` None; as follower: the leader's broker).
    pub fn set_quiet(&self, leader: Option<u32>) -> bool {
        *lock(&self.quiet_leader) = leader;
        let changed = !self.quiet.swap(true, Ordering::AcqRel);
        if changed {
            *lock(&self.quiet_since) = Instant::now();
        }
        changed
    }

    /// How long the group has been quiet.
    pub fn quiet_for(&self) -> Duration {
        lock(&self.quiet_since).elapsed()
    }

    /// Marks the group awake; returns true if it was quiet.
    pub fn wake(&self) -> bool {
        *lock(&self.quiet_leader) = None;
        self.pending.store(false, Ordering::Release);
        self.quiet.swap(false, Ordering::AcqRel)
    }

    pub fn quiet_leader(&self) -> Option<u32> {
        *lock(&self.quiet_leader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_counts_this_broker_and_reachable_peers() {
        let l = Liveness::default();
        assert!(!l.majority_reachable(1, &[1, 2, 3]));
        l.heard_from(2);
        assert!(l.majority_reachable(1, &[1, 2, 3]));
        assert!(l.majority_reachable(1, &[1]));
        assert!(!l.majority_reachable(1, &[1, 2, 3, 4]));
    }

    #[test]
    fn quiet_groups_are_found_by_group_and_term() {
        let l = Liveness::default();
        l.beat_from(2, HashSet::from([(7, 3)]));
        assert_eq!(l.quiet_leader(7, 3), Some(2));
        assert_eq!(l.quiet_leader(7, 2), Some(2));
        assert_eq!(
            l.quiet_leader(7, 4),
            None,
            "a follower in a later term stays awake"
        );
        assert!(l.still_quiet(2, 7, 3));
        assert!(
            !l.still_quiet(2, 7, 4),
            "not under a leader of an older term"
        );
        l.beat_from(2, HashSet::new());
        assert!(!l.still_quiet(2, 7, 3));
    }

    const SETTLED: Leading = Leading {
        quiet: false,
        quiet_under_other: false,
        quiet_for: Duration::ZERO,
        idle_for: QUIET_AFTER,
        changing: false,
        all_caught_up: true,
    };

    #[test]
    fn an_idle_caught_up_leader_goes_quiet_then_stops_its_ticker() {
        assert_eq!(leader_step(SETTLED), LeaderStep::GoQuiet);
        let quiet = Leading {
            quiet: true,
            ..SETTLED
        };
        assert_eq!(leader_step(quiet), LeaderStep::Hold);
        assert_eq!(
            leader_step(Leading {
                quiet_for: LEADER_SLEEP_DELAY,
                ..quiet
            }),
            LeaderStep::Sleep
        );
    }

    #[test]
    fn a_leader_stays_awake_while_written_lagged_or_changing() {
        let written = Leading {
            idle_for: QUIET_AFTER / 2,
            ..SETTLED
        };
        assert_eq!(leader_step(written), LeaderStep::Tick);
        let lagging = Leading {
            all_caught_up: false,
            ..SETTLED
        };
        assert_eq!(leader_step(lagging), LeaderStep::Hold);
        let changing = Leading {
            changing: true,
            all_caught_up: false,
            ..SETTLED
        };
        assert_eq!(leader_step(changing), LeaderStep::Tick);
    }

    /// Seed 6 of the fault run with wipes: groups asleep when a broker was wiped could not take
    /// it out of their voters (the Raft core refused the change for the sleeping leader's
    /// expired lease), so its replacement never registered.
    #[test]
    fn a_quiet_leader_wakes_for_a_membership_change_and_a_transfer() {
        let asleep = Leading {
            quiet: true,
            quiet_for: LEADER_SLEEP_DELAY * 10,
            idle_for: QUIET_AFTER * 10,
            ..SETTLED
        };
        assert_eq!(leader_step(asleep), LeaderStep::Sleep);
        assert_eq!(
            leader_step(Leading {
                changing: true,
                ..asleep
            }),
            LeaderStep::Wake
        );
        assert_eq!(
            leader_step(Leading {
                quiet_under_other: true,
                ..asleep
            }),
            LeaderStep::Wake
        );
    }

    #[test]
    fn a_write_wakes_a_quiet_group_once() {
        let a = Activity::new(true);
        assert!(!a.wrote());
        assert!(a.set_quiet(None));
        assert!(a.is_quiet());
        assert!(a.wrote());
        assert!(!a.wrote());
    }
}
