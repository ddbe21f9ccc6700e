//! What a fault run can do to its brokers: the kinds of fault, their targets and parameters,
//! and which kinds a run may use.

use std::fmt;

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
    /// The links between the broker and the others get latency, jitter, loss and duplicated
    /// packets (both directions, [`Fault::params`]) for `hold_ms`; the clients' links are
    /// untouched.
    LinkDegrade,
    /// The broker's wall clock steps forward or backward by seconds or hours
    /// ([`Fault::params`]) for `hold_ms`, then steps back; its monotonic clock runs on, as
    /// with an NTP step.
    ClockJump,
    /// A byte flips inside a sealed segment of one of the broker's replicas of the test topic
    /// (bit rot, [`Fault::params`] picks which): the broker must refuse it to readers, find it
    /// (a read or its scrub) and repair it from another replica; the final comparison of the
    /// replicas then finds the bytes as they were. Waits up to `hold_ms` for the repair.
    BitFlip,
    /// The broker is killed (`kill -9`) for `hold_ms` while the load goes on, started again,
    /// and, while it is still catching up, the leader of the first test partition (another
    /// broker: the next one by id if the broker itself leads it) is killed for `hold_ms` too: the
    /// replica that is behind must not lead, and the third broker must take over with
    /// everything acknowledged.
    KillWhileCatchingUp,
    /// The partition whose leader is the target moves to another replica set
    /// ([`Params::Move`] picks which; five-broker runs): the new replicas join as learners and
    /// the voters switch while [`Fault::also`] hits a broker (its leader) in the middle of the
    /// move, for `hold_ms`.
    Reassign,
    /// The broker is decommissioned (every replica it has moves to the others) while
    /// [`Fault::also`] hits another broker; at most once per run, since a decommissioned broker
    /// takes no replicas again. It keeps running (it may still be a metadata voter), and later
    /// faults may still hit it; later moves leave it out.
    Decommission,
}

impl FaultKind {
    /// Kinds that take hold of one broker and are healed after `hold_ms` (and can therefore be
    /// combined: a five-broker run's [`Fault::also`] is one of them).
    pub fn is_simple(self) -> bool {
        matches!(
            self,
            Self::Kill
                | Self::Pause
                | Self::Isolate
                | Self::OneWay
                | Self::CutPair
                | Self::DropResponses
                | Self::PowerLoss
                | Self::FailFsync
                | Self::LinkDegrade
                | Self::ClockJump
        )
    }
}

/// How a link is degraded: per packet, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Netem {
    pub delay_ms: u32,
    /// Each packet's delay is `delay_ms` ± up to this (uniform), so packets are reordered.
    pub jitter_ms: u32,
    pub loss_pct: u32,
    pub duplicate_pct: u32,
}

impl fmt::Display for Netem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delay {}±{} ms, loss {}%, duplicate {}%",
            self.delay_ms, self.jitter_ms, self.loss_pct, self.duplicate_pct
        )
    }
}

/// The parameters of the kinds that have some, drawn from the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Params {
    #[default]
    None,
    Link(Netem),
    /// The wall-clock step in seconds (negative: backward).
    Clock {
        offset_s: i64,
    },
    /// Which sealed segment and byte a `BitFlip` damages (reduced modulo what there is).
    Flip {
        pick: u64,
    },
    /// Which brokers a `Reassign` moves its partition to (see [`new_replicas`]).
    Move {
        pick: u64,
    },
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => Ok(()),
            Self::Link(n) => write!(f, " ({n})"),
            Self::Clock { offset_s } if offset_s.unsigned_abs() >= 3600 => {
                write!(f, " ({:+} h)", offset_s / 3600)
            }
            Self::Clock { offset_s } => write!(f, " ({offset_s:+} s)"),
            Self::Flip { pick } | Self::Move { pick } => write!(f, " (pick {pick:#x})"),
        }
    }
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
    /// The degradation of a `LinkDegrade`, the step of a `ClockJump`.
    pub params: Params,
    /// A second fault on another broker at the same time (five-broker runs): started with
    /// this one and healed with it.
    pub also: Option<Also>,
}

/// The second of two simultaneous faults: a simple kind ([`FaultKind::is_simple`]), on a
/// broker other than the first fault's (resolved when it fires; the next broker by id when
/// both resolve to the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Also {
    pub kind: FaultKind,
    pub target: Target,
    pub params: Params,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{}ms {:?}{} {:?} for {}ms",
            self.after_ms, self.kind, self.params, self.target, self.hold_ms
        )?;
        if let Some(a) = self.also {
            write!(f, " + {:?}{} {:?}", a.kind, a.params, a.target)?;
        }
        if let Some(n) = self.lose_responses {
            write!(f, " + lost responses on broker {n}")?;
        }
        Ok(())
    }
}

/// Which fault kinds a run may use: those that need iptables (root) only with `isolate`;
/// degraded links only with `link` (iptables and a netfilter queue, root); clock jumps only
/// with `clock` (libfaketime installed); wiped brokers only with `wipe` (on unless
/// `KEEL_FAULT_WIPE=0`: see [`wipes_wanted`]); power losses
/// (`PowerLoss`, `PowerLossAll`) only with `power`: a run whose topics leave flushing to the OS
/// (`flush.messages` > 1) is promised nothing across them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds {
    pub isolate: bool,
    pub link: bool,
    pub clock: bool,
    pub wipe: bool,
    pub power: bool,
}

/// Whether a run wipes brokers, from `KEEL_FAULT_WIPE`: yes unless it is `0`. Wipes were
/// opt-in while the replaced broker's removal stalled in groups that were asleep (seed 6,
/// docs/testing.md); `KEEL_FAULT_WIPE=0` replays a seed recorded before they were on.
pub fn wipes_wanted(env: Option<u64>) -> bool {
    env != Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipes_are_on_unless_turned_off() {
        assert!(wipes_wanted(None));
        assert!(wipes_wanted(Some(1)));
        assert!(!wipes_wanted(Some(0)));
    }
}
