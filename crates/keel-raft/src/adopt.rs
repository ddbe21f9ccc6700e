//! Adopting a log written without Raft as the log of a group with one voter.
//!
//! Before every broker ran its partitions as Raft groups, a broker started alone appended
//! batches to plain keel logs: every batch has term 0 and the next Raft index, which is
//! exactly what a Raft log of term-0 entries looks like. Adopting such a log adds what Raft
//! needs beside it, in an order that a crash at any point can resume:
//!
//! 1. where retention already deleted the log's start, a purge record and a snapshot at the
//!    last deleted entry, so that openraft finds the state machine at least at the purge point;
//! 2. a membership entry naming the one voter, appended after the last batch and fsynced;
//! 3. last, the committed hint covering the whole log: its presence marks the adoption done.
//!
//! On its first start the group applies every entry (which rebuilds the idempotent producers'
//! state from the whole log), elects its voter and goes on as any other group.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use openraft::BasicNode;

use crate::codec;
use crate::log_store::{KeelLogStore, log_err};
use crate::state_machine::store_snapshot_at;
use crate::types::{Membership, Payload, log_id};

/// Makes `store`'s log, written without Raft, the log of a group whose only voter is `node`
/// (reached at `addr`). Returns whether anything was done: `false` if the log already belongs
/// to a Raft group. Blocking.
pub fn adopt_as_single_voter(store: &KeelLogStore, node: u64, addr: &str) -> io::Result<bool> {
    if store.committed_hint().is_some() {
        return Ok(false);
    }
    let log = store.log();
    if log.last_term() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: the log has Raft terms but no committed hint; it is not a log written without Raft",
                store.dir().display()
            ),
        ));
    }
    let (first, next) = (log.first_raft_index(), log.next_raft_index());
    if first > 0 && store.purge_point().is_none() {
        let point = log_id(0, first - 1);
        let next_offset = if next > first {
            log.entry_header(first)
                .map_err(|e| log_err(e, "reading the first retained batch"))?
                .base_offset
        } else {
            log.log_end_offset()
        };
        // The snapshot first: a purge record without one would leave openraft a purged log
        // and a state machine that never applied it.
        store_snapshot_at(store, point, next_offset)?;
        store.record_purge(point, next_offset)?;
    }
    let adopted_before = next > first
        && store
            .entries(next - 1, next)?
            .first()
            .is_some_and(|e| matches!(e.payload, Payload::Membership(_)));
    if !adopted_before {
        let membership = Membership::new(
            vec![BTreeSet::from([node])],
            BTreeMap::from([(node, BasicNode::new(addr))]),
        )
        .map_err(|e| io::Error::other(format!("a one-voter membership: {e}")))?;
        let payload = Payload::Membership(membership);
        let batch = codec::encode(&payload, 0)?;
        log.append_deferred(batch.as_slice(), 0, Some(next))
            .map_err(|e| log_err(e, "appending the membership entry"))?;
        log.flush()
            .map_err(|e| log_err(e, "flushing the membership entry"))?;
    }
    store.store_committed(log_id(0, log.next_raft_index() - 1))?;
    tracing::info!(dir = %store.dir().display(), entries = log.next_raft_index() - first, "adopted a log written without Raft as a one-voter group's log");
    Ok(true)
}
