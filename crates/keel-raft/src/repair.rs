//! A replica that lost entries it had promised stays out of elections until it has them back.
//!
//! keel-log records, after every flush, the end of what it reported durable (its promise). If
//! recovery finds less (a bit flip or a lost write in the synced tail, cut as if it were a torn
//! write), this replica acknowledged entries it no longer holds. Raft's safety rests on the
//! opposite: a replica that acknowledged an entry votes only for candidates that have it. Left
//! alone, it would vote for a candidate missing a committed entry (and a quorum of such votes
//! elects a leader that overwrites it), or stand for election itself.
//!
//! So while entries are missing, the replica is a learner in all but membership:
//! - it does not stand for election (openraft's `elect` is off) and refuses leadership
//!   transfers;
//! - it grants a vote (or pre-vote) only to a candidate whose last log id is at least the
//!   promised one: exactly the candidates it would have granted with its log intact, so a
//!   group that needs its vote (two replicas out of three repairing) still elects the healthy
//!   one;
//! - it keeps replicating: its append acknowledgements are for entries it really holds.
//!
//! Once appends from the leader carry it past the promised end, it votes and stands again.
//! A group with no other voter has no one to repair from: it goes on without the lost entries,
//! loudly (the alternative is a partition that never serves again).

use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver as _;

use crate::KeelLogStore;
use crate::group_sm::GroupSm;
use crate::types::{KeelRaft, LogId};

type Raft = openraft::Raft<KeelRaft, GroupSm>;

/// How often a repairing replica checks whether it has caught up.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// Whether a replica missing entries up to `promised` must refuse a candidate whose last log id
/// is `candidate_last`: unless the candidate's log is at least as up to date as the one this
/// replica promised, granting could elect a leader without entries this replica acknowledged.
pub(crate) fn refuses_candidate(promised: &LogId, candidate_last: Option<&LogId>) -> bool {
    candidate_last.is_none_or(|c| c < promised)
}

/// Keeps `raft` out of elections while its log misses promised entries, and lets it back in
/// once it has them (see the module docs). `node` is this replica's id.
pub(crate) fn guard(raft: &Raft, store: &KeelLogStore, node: u64) {
    let Some(promised) = store.missing_promised() else {
        return;
    };
    let recovered = store.log().next_raft_index();
    let group_dir = store.dir().display().to_string();
    tracing::warn!(group = %group_dir, promised = %promised, recovered_next_index = recovered, "this replica lost entries it had acknowledged: it will not vote for a candidate without them, nor stand for election, until the leader has sent them again");
    metrics::gauge!("keel_raft_repairing_groups").increment(1.0);
    raft.runtime_config().elect(false);
    let raft = raft.clone();
    let store = store.clone();
    tokio::spawn(async move {
        let outcome = loop {
            if store.missing_promised().is_none() {
                break Some(true);
            }
            {
                let metrics = raft.metrics();
                let m = metrics.borrow_watched();
                if m.state == ServerState::Shutdown || m.running_state.is_err() {
                    break None;
                }
                let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
                if voters == [node] {
                    break Some(false);
                }
            }
            tokio::time::sleep(CHECK_EVERY).await;
        };
        metrics::gauge!("keel_raft_repairing_groups").decrement(1.0);
        match outcome {
            Some(true) => {
                metrics::counter!("keel_raft_repaired_groups_total").increment(1);
                tracing::info!(group = %group_dir, promised = %promised, next_index = store.log().next_raft_index(), "repaired: the entries this replica had lost came back from the leader; it votes again");
            }
            Some(false) => {
                tracing::error!(group = %group_dir, promised = %promised, next_index = store.log().next_raft_index(), "no other voter to repair from: this group goes on without the entries its only replica lost");
            }
            None => return,
        }
        raft.runtime_config().elect(true);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::log_id;

    #[test]
    fn only_candidates_with_the_promised_log_get_a_vote() {
        let promised = log_id(3, 100);
        assert!(refuses_candidate(&promised, None));
        assert!(refuses_candidate(&promised, Some(&log_id(3, 99))));
        assert!(refuses_candidate(&promised, Some(&log_id(2, 500))));
        assert!(!refuses_candidate(&promised, Some(&log_id(3, 100))));
        assert!(!refuses_candidate(&promised, Some(&log_id(3, 101))));
        assert!(!refuses_candidate(&promised, Some(&log_id(4, 50))));
    }
}
