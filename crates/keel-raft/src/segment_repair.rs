//! Repairing damaged sealed segments of a replica's log from the other members of its group.
//!
//! The log finds the damage (a scrub, or a read that failed a CRC) and checks any replacement
//! before writing it (`Log::repair_segment`); this module picks who to ask and moves the
//! entries. Only committed entries are asked for and served (`ReadEntries` answers up to the
//! sender's applied index), and those are byte-identical on every replica.

use std::time::Duration;

use keel_log::{Damage, LogError, Repaired};
use openraft::async_runtime::WatchReceiver as _;

use crate::network::RaftTransport;
use crate::replica::Replica;

/// How much one `ReadEntries` answer carries: a damaged batch is rarely larger, and a long
/// damaged run takes a few round trips.
const READ_BYTES: u64 = 1 << 20;
/// How long one `ReadEntries` call may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a repair did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentRepair {
    /// The segment is intact again: `entries` entries (`bytes` bytes) were rewritten with the
    /// copies of broker `from`.
    Repaired { entries: u64, bytes: u64, from: u64 },
    /// The segment went away meanwhile (retention), or was cut by a truncation.
    Gone,
    /// Not repaired now (no member could supply the entries yet, or the local copy of them is
    /// not committed yet); the damage stays refused on read and is tried again later.
    Deferred { why: String },
}

/// The order in which to ask the other members: the leader first (it has everything
/// committed), then the other voters, then learners; never this node.
pub(crate) fn donors(me: u64, leader: Option<u64>, voters: &[u64], learners: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = leader.filter(|l| *l != me).into_iter().collect();
    for id in voters.iter().chain(learners) {
        if *id != me && !out.contains(id) {
            out.push(*id);
        }
    }
    out
}

impl Replica {
    /// Repairs `damage` in this replica's log (group `group`) with copies of the damaged
    /// entries from the other members, asking each in [`donors`] order until one supplies them.
    pub async fn repair_segment(
        &self,
        group: u64,
        transport: &RaftTransport,
        damage: Damage,
    ) -> SegmentRepair {
        let (me, leader, voters, learners, addresses, applied) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            let membership = m.membership_config.membership();
            let addresses: Vec<(u64, String)> = membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect();
            (
                m.id,
                m.current_leader,
                membership.voter_ids().collect::<Vec<_>>(),
                membership.learner_ids().collect::<Vec<_>>(),
                addresses,
                m.last_applied.map_or(0, |l| l.index),
            )
        };
        // An entry this replica has not applied may differ from the committed one at its index
        // (an uncommitted entry a later leader replaces); Raft itself sorts those out.
        if damage.at.raft_index > applied {
            return SegmentRepair::Deferred {
                why: format!(
                    "entry {} is not applied here yet (applied up to {applied})",
                    damage.at.raft_index
                ),
            };
        }
        let mut why = String::from("no other member of the group");
        for donor in donors(me, leader, &voters, &learners) {
            let Some(addr) = addresses.iter().find(|(id, _)| *id == donor).map(|a| &a.1) else {
                continue;
            };
            match self
                .repair_from(group, transport, donor, addr, damage.clone())
                .await
            {
                Ok(done) => return done,
                Err(e) => {
                    tracing::warn!(group, donor, error = %e, "could not repair a damaged segment from this member");
                    why = format!("broker {donor}: {e}");
                }
            }
        }
        SegmentRepair::Deferred { why }
    }

    async fn repair_from(
        &self,
        group: u64,
        transport: &RaftTransport,
        donor: u64,
        addr: &str,
        mut damage: Damage,
    ) -> Result<SegmentRepair, String> {
        let (mut entries, mut bytes) = (0, 0);
        loop {
            let copies = transport
                .read_entries(
                    addr,
                    donor,
                    group,
                    damage.at.raft_index,
                    READ_BYTES,
                    READ_TIMEOUT,
                )
                .await
                .map_err(|s| s.message().to_owned())?;
            let log = self.store.log_arc();
            let at = damage.clone();
            let done = tokio::task::spawn_blocking(move || log.repair_segment(&at, &copies))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e: LogError| e.to_string())?;
            match done {
                Repaired::Done {
                    entries: e,
                    bytes: b,
                } => {
                    return Ok(SegmentRepair::Repaired {
                        entries: entries + e,
                        bytes: bytes + b,
                        from: donor,
                    });
                }
                Repaired::Partial {
                    entries: e,
                    bytes: b,
                    next,
                } => {
                    entries += e;
                    bytes += b;
                    damage = next;
                }
                Repaired::Gone => return Ok(SegmentRepair::Gone),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::donors;

    #[test]
    fn the_leader_is_asked_first_and_this_node_never() {
        assert_eq!(donors(2, Some(3), &[1, 2, 3], &[4]), vec![3, 1, 4]);
        assert_eq!(donors(2, Some(2), &[1, 2, 3], &[]), vec![1, 3]);
        assert_eq!(donors(1, None, &[1], &[]), Vec::<u64>::new());
    }
}
