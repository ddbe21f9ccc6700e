//! The state machine of a partition's Raft group.
//!
//! The partition's data *is* the Raft log ([`KeelLogStore`]), so applying an entry stores
//! nothing: it advances the partition's **high watermark** (the offset after the last applied,
//! i.e. committed, data batch) and tells the producer where its batch landed ([`AppendAck`]).
//!
//! Snapshots are metadata only: `{next_offset}` at a Raft log id, while the data stays in the
//! log. They are cut at the **retention boundary**, never at the last applied entry: openraft
//! sends its current snapshot to a follower that needs purged entries, and a snapshot past the
//! purge point would make that follower skip data the leader still retains. The broker drives
//! compaction (openraft's `SnapshotPolicy::Never`):
//!
//! 1. retention picks the first segment to keep; [`PartitionSm::set_snapshot_point_for_offset`]
//!    (or [`snapshot_point_for_offset`] plus [`PartitionSm::set_snapshot_point`]) records the
//!    last Raft entry before it as the next snapshot point;
//! 2. `Replica::snapshot_to` builds the snapshot there (persisted beside the log);
//! 3. `Replica::purge_to(point.index)` (or `max_in_snapshot_log_to_keep = 0`) purges the log
//!    up to it, which deletes the segments below the boundary.
//!
//! A follower that installs such a snapshot tells the store the offset the log continues from
//! ([`KeelLogStore::set_snapshot_offset`]), so that an empty or short log restarts at the
//! leader's offsets.
//!
//! The current snapshot is persisted in `<store dir>/raft-snapshot` (a [`StateFile`]) and
//! loaded by [`PartitionSm::open`]: after a restart [`RaftStateMachine::applied_state`] is the
//! snapshot's, and openraft re-applies the committed entries after it from the log, which
//! rebuilds the high watermark.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::{Stream, StreamExt};
use keel_batch::BatchHeader;
use keel_log::{Clock, SystemClock};
use openraft::OptionalSend;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::log_store::{KeelLogStore, blocking, log_err};
use crate::producers::{EXPIRY_MS, ProducerTable, SeqBatch, last_sequence};
use crate::state_file::StateFile;
use crate::types::{
    AppendAck, Entry, KeelRaft, LogId, Payload, Snapshot, SnapshotMeta, StoredMembership, log_id,
};

/// Name of the snapshot file in the store directory.
pub const SNAPSHOT_FILE: &str = "raft-snapshot";

/// The application data of a snapshot (`SnapshotData` is its JSON encoding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The partition offset that follows the snapshot's last entry.
    pub next_offset: u64,
    /// The idempotent producers' state, as of the last applied entry when the snapshot was
    /// built (at or after its point: re-applying the entries after the point changes nothing,
    /// see [`ProducerTable`]).
    #[serde(default)]
    pub producers: ProducerTable,
}

impl SnapshotState {
    fn encode(&self) -> io::Result<Vec<u8>> {
        serde_json::to_vec(self)
            .map_err(|e| io::Error::other(format!("encoding snapshot data: {e}")))
    }

    fn decode(data: &[u8]) -> io::Result<Self> {
        serde_json::from_slice(data).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad partition snapshot data: {e}"),
            )
        })
    }
}

/// What `raft-snapshot` holds: the current snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta,
    state: SnapshotState,
}

impl SnapshotRecord {
    fn to_snapshot(&self) -> io::Result<Snapshot<Vec<u8>>> {
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: self.state.encode()?,
        })
    }
}

#[derive(Debug)]
struct State {
    last_applied: Option<LogId>,
    /// The membership in force at the current snapshot's point (or the initial, empty one),
    /// followed by every membership applied after it, oldest first. Never empty.
    ///
    /// It is pruned when a snapshot is taken, not capped by count: a later snapshot point can
    /// be anywhere after the current one, and must name the membership in force there. Its
    /// length is the number of membership changes in the retained log (a handful).
    memberships: Vec<StoredMembership>,
    /// The offset after the last applied data batch.
    next_offset: u64,
    /// Idempotent producers, as of the last applied entry.
    producers: ProducerTable,
    /// When expired producers were last swept (every replica sweeps on its own clock).
    swept: Option<std::time::Instant>,
    /// How long a producer may write nothing here before it is forgotten.
    producer_expiry_ms: i64,
    /// Where the next snapshot is cut, and the offset that follows that entry.
    point: Option<(LogId, u64)>,
    snapshot: Option<SnapshotRecord>,
}

impl State {
    fn snapshot_last(&self) -> Option<LogId> {
        self.snapshot.as_ref().and_then(|s| s.meta.last_log_id)
    }

    fn last_membership(&self) -> StoredMembership {
        self.memberships.last().cloned().unwrap_or_default()
    }

    /// The membership in force at `at`: the latest recorded one with a log id at or before it
    /// (the earliest known one if none is that old).
    fn membership_at(&self, at: Option<LogId>) -> StoredMembership {
        self.memberships
            .iter()
            .rev()
            .find(|m| *m.log_id() <= at)
            .or_else(|| self.memberships.first())
            .cloned()
            .unwrap_or_default()
    }

    /// Forgets memberships that no snapshot at or after `at` can need.
    fn prune_memberships(&mut self, at: Option<LogId>) {
        if let Some(keep) = self.memberships.iter().rposition(|m| *m.log_id() <= at) {
            self.memberships.drain(..keep);
        }
    }

    /// Makes `record` the current snapshot (it is persisted).
    fn set_snapshot(&mut self, record: SnapshotRecord) {
        let at = record.meta.last_log_id;
        self.prune_memberships(at);
        if self.point.is_some_and(|(p, _)| Some(p) <= at) {
            self.point = None;
        }
        self.snapshot = Some(record);
    }
}

#[derive(Debug)]
struct Inner {
    store: KeelLogStore,
    file: StateFile,
    hwm: watch::Sender<u64>,
    state: Mutex<State>,
    /// Serialises writes of the snapshot file (a build runs in its own task, concurrently with
    /// an install), so the file never goes back to an older snapshot.
    persist: tokio::sync::Mutex<()>,
}

/// The state machine of a partition's Raft group: the high watermark, the last applied log id
/// and membership, and metadata-only snapshots cut at the retention boundary.
///
/// Cheap to clone; clones share everything (it is also its own snapshot builder).
#[derive(Debug, Clone)]
pub struct PartitionSm {
    inner: Arc<Inner>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often applying sweeps expired producers.
const PRODUCER_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Moves the high watermark up to `to`; never down.
fn advance(hwm: &watch::Sender<u64>, to: u64) {
    hwm.send_if_modified(|v| {
        if to > *v {
            *v = to;
            true
        } else {
            false
        }
    });
}

impl PartitionSm {
    /// Opens the state machine of the partition whose Raft log is `store`, loading its current
    /// snapshot (if any) from the store directory. `hwm` is the partition's high watermark:
    /// it starts at the snapshot's next offset (the log start offset without a snapshot), and
    /// grows as openraft re-applies the committed entries after it; it never moves backwards.
    ///
    /// A corrupt snapshot file is an error (`InvalidData`): the snapshot may be the only record
    /// of where a purged log continues. Blocking: call it from a blocking context.
    pub fn open(store: &KeelLogStore, hwm: watch::Sender<u64>) -> io::Result<Self> {
        let file = StateFile::new(store.dir(), SNAPSHOT_FILE);
        let record: Option<SnapshotRecord> = file.load(&**store.fs())?;
        let producers = record
            .as_ref()
            .map(|r| r.state.producers.clone())
            .unwrap_or_default();
        let (last_applied, membership, next_offset) = match &record {
            Some(r) => {
                if let Some(last) = r.meta.last_log_id {
                    // A crash between installing a snapshot and purging the log: openraft
                    // finishes that purge on start, and the store must restart the log at the
                    // snapshot's offsets.
                    store.set_snapshot_offset(last, r.state.next_offset);
                }
                (
                    r.meta.last_log_id,
                    r.meta.last_membership.clone(),
                    r.state.next_offset,
                )
            }
            None => (
                None,
                StoredMembership::default(),
                store.log().log_start_offset(),
            ),
        };
        advance(&hwm, next_offset);
        tracing::debug!(dir = %store.dir().display(), last_applied = ?last_applied, next_offset, "opened partition state machine");
        Ok(Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                file,
                hwm,
                state: Mutex::new(State {
                    last_applied,
                    memberships: vec![membership],
                    next_offset,
                    producers,
                    swept: None,
                    producer_expiry_ms: EXPIRY_MS,
                    point: None,
                    snapshot: record,
                }),
                persist: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The offset after the last applied data batch.
    pub fn applied_next_offset(&self) -> u64 {
        lock(&self.inner.state).next_offset
    }

    /// Runs `f` on the applied producer state (one lock for several questions).
    pub fn with_producers<R>(&self, f: impl FnOnce(&ProducerTable) -> R) -> R {
        f(&lock(&self.inner.state).producers)
    }

    /// Sets how long a producer may write nothing before it is forgotten (the topic's
    /// `producer.id.expiration.ms`); applied from the next sweep.
    pub fn set_producer_expiry_ms(&self, ms: i64) {
        lock(&self.inner.state).producer_expiry_ms = ms.max(1);
    }

    /// How many idempotent producers the applied state knows.
    pub fn producer_count(&self) -> usize {
        lock(&self.inner.state).producers.len()
    }

    /// The log id of the last applied entry (or of the snapshot, if nothing was applied since).
    pub fn last_applied(&self) -> Option<LogId> {
        lock(&self.inner.state).last_applied
    }

    /// The current high watermark (the value of the watch given to [`PartitionSm::open`]).
    pub fn high_watermark(&self) -> u64 {
        *self.inner.hwm.borrow()
    }

    /// A receiver of the high watermark.
    pub fn subscribe_high_watermark(&self) -> watch::Receiver<u64> {
        self.inner.hwm.subscribe()
    }

    /// The last log id of the current snapshot, if there is one.
    pub fn snapshot_last_log_id(&self) -> Option<LogId> {
        lock(&self.inner.state).snapshot_last()
    }

    /// The pending snapshot point set by [`PartitionSm::set_snapshot_point`], if any.
    pub fn snapshot_point(&self) -> Option<(LogId, u64)> {
        lock(&self.inner.state).point
    }

    /// Records where the next snapshot is cut: `point` is the last Raft entry whose data
    /// retention deletes, `next_offset` the partition offset that follows it (see
    /// [`snapshot_point_for_offset`]). The next `build_snapshot` (`raft.trigger().snapshot()`)
    /// builds there; until a point is set, openraft's own snapshot requests are declined.
    ///
    /// `point` must be applied and, if the log still holds it, match the log (term and next
    /// offset); `InvalidInput` otherwise. A point the current snapshot already covers is ignored
    /// (`Ok(false)`); `Ok(true)` means the point was recorded. Blocking (reads one header).
    pub fn set_snapshot_point(&self, point: LogId, next_offset: u64) -> io::Result<bool> {
        let log = self.inner.store.log();
        if (log.first_raft_index()..log.next_raft_index()).contains(&point.index) {
            let h = log
                .entry_header(point.index)
                .map_err(|e| log_err(e, &format!("checking snapshot point {point}")))?;
            if h.raft_term != point.leader_id.term || h.next_offset() != next_offset {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "snapshot point {point} (next offset {next_offset}) does not match the log: term {}, next offset {}",
                        h.raft_term,
                        h.next_offset()
                    ),
                ));
            }
        }
        let mut st = lock(&self.inner.state);
        Self::set_point_locked(&mut st, point, next_offset)
    }

    fn set_point_locked(st: &mut State, point: LogId, next_offset: u64) -> io::Result<bool> {
        if st.last_applied.is_none_or(|a| a.index < point.index) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "snapshot point {point} is not applied (last applied {:?})",
                    st.last_applied
                ),
            ));
        }
        if next_offset > st.next_offset {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "snapshot point {point}: offset {next_offset} is past the applied offset {}",
                    st.next_offset
                ),
            ));
        }
        if st.snapshot_last().is_some_and(|s| s.index >= point.index) {
            tracing::debug!(%point, snapshot = ?st.snapshot_last(), "snapshot point already covered");
            return Ok(false);
        }
        st.point = Some((point, next_offset));
        Ok(true)
    }

    /// Sets the snapshot point for a retention that wants the log to start at `offset` (the
    /// base offset of the first segment to keep): the last Raft entry wholly before it, but
    /// not past the last applied entry. Returns the point to pass (as its index) to
    /// `raft.trigger().purge_log` after `raft.trigger().snapshot()`, or `None` if there is
    /// nothing new to snapshot. Blocking (reads a few batch headers).
    pub fn set_snapshot_point_for_offset(&self, offset: u64) -> io::Result<Option<LogId>> {
        let Some((point, next_offset)) = snapshot_point_for_offset(&self.inner.store, offset)?
        else {
            return Ok(None);
        };
        let capped = {
            let st = lock(&self.inner.state);
            match st.last_applied {
                None => return Ok(None),
                // Only committed (applied) entries can be in a snapshot.
                Some(a) if a.index < point.index => Some((a, st.next_offset)),
                Some(_) => None,
            }
        };
        if let Some((a, next)) = capped {
            // The purge deletes by offset: if the entry after a capped point is a control
            // entry starting at the same offset, it could sit at the end of a segment that
            // the purge removes whole, taking a kept entry with it. Wait for a later round.
            let log = self.inner.store.log();
            if a.index + 1 < log.next_raft_index() {
                let h = log
                    .entry_header(a.index + 1)
                    .map_err(|e| log_err(e, "checking the entry after the snapshot point"))?;
                if h.attributes.control && h.base_offset == next {
                    return Ok(None);
                }
            }
        }
        let mut st = lock(&self.inner.state);
        let (point, next_offset) = match st.last_applied {
            None => return Ok(None),
            Some(a) if a.index < point.index => (a, st.next_offset),
            Some(_) => (point, next_offset),
        };
        Ok(Self::set_point_locked(&mut st, point, next_offset)?.then_some(point))
    }

    /// Applies one entry and returns its acknowledgement.
    /// The offsets are read from the entry's header, which the leader's log stamped at append
    /// time: openraft hands the state machine entries it reads back from the log store (a
    /// zero-copy slice of the segment mapping, headers parsed without a second CRC pass, see
    /// `log_store::decode_slice`), never the append's own result, so this 73-byte header read
    /// is the one re-read left. Followers need it anyway: they learn offsets only from it.
    fn apply_entry(&self, entry: &Entry) -> io::Result<AppendAck> {
        let mut st = lock(&self.inner.state);
        let ack = match &entry.payload {
            Payload::Normal(batch) => {
                let h = BatchHeader::parse(batch.bytes()).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("applying entry {}: {e}", entry.log_id),
                    )
                })?;
                if h.base_offset != st.next_offset {
                    tracing::warn!(
                        entry = %entry.log_id,
                        base_offset = h.base_offset,
                        expected = st.next_offset,
                        "applied batch does not continue the applied offsets"
                    );
                }
                st.next_offset = h.next_offset();
                if h.producer_id >= 0 && !h.attributes.control {
                    let first = h.base_sequence;
                    st.producers.record(
                        h.producer_id,
                        h.producer_epoch,
                        SeqBatch {
                            first_seq: first,
                            last_seq: last_sequence(first, h.record_count),
                            base_offset: h.base_offset,
                            next_offset: h.next_offset(),
                        },
                        // This replica's clock, not the producer's: a producer clock far behind
                        // must not expire its own state at once. Replayed entries count as seen
                        // now, which only keeps producers longer.
                        SystemClock.now_ms(),
                    );
                }
                AppendAck {
                    base_offset: h.base_offset,
                    next_offset: h.next_offset(),
                }
            }
            Payload::Blank => AppendAck {
                base_offset: st.next_offset,
                next_offset: st.next_offset,
            },
            Payload::Membership(m) => {
                st.memberships
                    .push(StoredMembership::new(Some(entry.log_id), m.clone()));
                AppendAck {
                    base_offset: st.next_offset,
                    next_offset: st.next_offset,
                }
            }
        };
        st.last_applied = Some(entry.log_id);
        let now = std::time::Instant::now();
        if st
            .swept
            .is_none_or(|t| now.duration_since(t) > PRODUCER_SWEEP)
        {
            st.swept = Some(now);
            let expiry = st.producer_expiry_ms;
            st.producers.expire(SystemClock.now_ms(), expiry);
        }
        drop(st);
        // Before the producer hears back, so a consumer can read what was acknowledged.
        advance(&self.inner.hwm, ack.next_offset);
        Ok(ack)
    }

    /// Durably makes `record` the snapshot file's content, unless the file already holds a
    /// snapshot at or after it. Returns the current snapshot afterwards.
    async fn persist(&self, record: SnapshotRecord) -> io::Result<SnapshotRecord> {
        let _g = self.inner.persist.lock().await;
        {
            let mut st = lock(&self.inner.state);
            if let Some(cur) = st.snapshot.clone()
                && cur.meta.last_log_id >= record.meta.last_log_id
            {
                // Overtaken (an installed snapshot): the point it was built for is covered.
                if st
                    .point
                    .is_some_and(|(p, _)| Some(p) <= cur.meta.last_log_id)
                {
                    st.point = None;
                }
                return Ok(cur);
            }
        }
        self.write_file(&record).await?;
        lock(&self.inner.state).set_snapshot(record.clone());
        Ok(record)
    }

    /// Durably writes `record` to the snapshot file, on the blocking pool. The caller holds
    /// `persist`, so the file never goes back to an older snapshot.
    async fn write_file(&self, record: &SnapshotRecord) -> io::Result<()> {
        let (inner, r) = (Arc::clone(&self.inner), record.clone());
        blocking(move || inner.file.store(&**inner.store.fs(), &r)).await
    }

    /// What the next snapshot is: `Ok(Err(current))` to return the current one as it is.
    fn plan_snapshot(&self) -> io::Result<Result<SnapshotRecord, SnapshotRecord>> {
        let st = lock(&self.inner.state);
        let at = |point: Option<LogId>, next_offset: u64| SnapshotRecord {
            meta: SnapshotMeta {
                last_log_id: point,
                last_membership: st.membership_at(point),
            },
            state: SnapshotState {
                next_offset,
                producers: st.producers.clone(),
            },
        };
        if let Some((point, next_offset)) = st.point {
            return Ok(Ok(at(Some(point), next_offset)));
        }
        if let Some(cur) = &st.snapshot {
            return Ok(Err(cur.clone()));
        }
        // No point and no snapshot: openraft needs one because the log was purged (a snapshot
        // file that was lost); build it at the purge point, with the membership best known.
        if let Some((purged, next_offset)) = self.inner.store.purge_point() {
            if st.last_applied.is_none_or(|a| a < purged) {
                return Err(io::Error::other(format!(
                    "no snapshot and the log is purged up to {purged}, past the last applied {:?}",
                    st.last_applied
                )));
            }
            return Ok(Ok(at(Some(purged), next_offset)));
        }
        // Nothing at all: an empty snapshot, not persisted (it covers no entry).
        Ok(Err(at(None, self.inner.store.log().log_start_offset())))
    }
}

impl RaftSnapshotBuilder<KeelRaft> for PartitionSm {
    type SnapshotData = Vec<u8>;

    /// Builds the snapshot at the point set by [`PartitionSm::set_snapshot_point`] and
    /// persists it. Without a point: the current snapshot if there is one, else one at the
    /// log's purge point, else an empty one (`last_log_id: None`, the earliest known
    /// membership). The broker only triggers snapshots after setting a point.
    async fn build_snapshot(&mut self) -> Result<Snapshot<Vec<u8>>, io::Error> {
        let record = match self.plan_snapshot()? {
            Ok(new) => {
                let point = new.meta.last_log_id;
                let record = self.persist(new).await?;
                tracing::info!(snapshot = ?point, next_offset = record.state.next_offset, "built partition snapshot");
                record
            }
            Err(current) => current,
        };
        record.to_snapshot()
    }
}

impl RaftStateMachine<KeelRaft> for PartitionSm {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let st = lock(&self.inner.state);
        Ok((st.last_applied, st.last_membership()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<KeelRaft>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let ack = self.apply_entry(&entry)?;
            if let Some(r) = responder {
                r.send(ack);
            }
        }
        Ok(())
    }

    /// Declines openraft's own (policy) snapshot requests until the broker set a point; a
    /// forced request (openraft needs a snapshot) always gets a builder.
    async fn try_create_snapshot_builder(&mut self, force: bool) -> Option<Self::SnapshotBuilder> {
        if force || lock(&self.inner.state).point.is_some() {
            Some(self.clone())
        } else {
            None
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let state = SnapshotState::decode(&snapshot)?;
        let next_offset = state.next_offset;
        if let Some(last) = meta.last_log_id {
            // Before openraft purges the log up to `last` (it waits for this install).
            self.inner.store.set_snapshot_offset(last, next_offset);
        }
        let producers = state.producers.clone();
        let record = SnapshotRecord {
            meta: meta.clone(),
            state,
        };
        {
            let _g = self.inner.persist.lock().await;
            self.write_file(&record).await?;
            let mut st = lock(&self.inner.state);
            st.last_applied = meta.last_log_id;
            st.memberships = vec![meta.last_membership.clone()];
            st.next_offset = next_offset;
            st.producers = producers;
            st.point = None;
            st.snapshot = Some(record);
        }
        advance(&self.inner.hwm, next_offset);
        tracing::info!(snapshot = ?meta.last_log_id, next_offset, "installed partition snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Vec<u8>>>, io::Error> {
        let cur = lock(&self.inner.state).snapshot.clone();
        cur.map(|r| r.to_snapshot()).transpose()
    }
}

/// Writes a snapshot at `point` with nothing applied before it but the log's offsets: the
/// state of a log whose entries up to `point` were deleted before it had a state machine
/// (see `adopt`). Blocking.
pub(crate) fn store_snapshot_at(
    store: &KeelLogStore,
    point: LogId,
    next_offset: u64,
) -> io::Result<()> {
    let record = SnapshotRecord {
        meta: SnapshotMeta {
            last_log_id: Some(point),
            last_membership: StoredMembership::default(),
        },
        state: SnapshotState {
            next_offset,
            producers: ProducerTable::default(),
        },
    };
    StateFile::new(store.dir(), SNAPSHOT_FILE).store(&**store.fs(), &record)
}

/// The snapshot point for a retention that wants the log to start at `offset` (the base offset
/// of the first segment to keep): the log id of the last Raft entry wholly before `offset`
/// (every entry after it ends past `offset`, so no record at or after `offset` is dropped),
/// and the partition offset that follows that entry. `None` if that would delete no data
/// (no entry lies before `offset`, or only control entries at the log start do).
///
/// Control entries between the last data batch before `offset` and the first one after it are
/// included in the point, so that purging to it deletes whole segments below `offset`.
/// The point may be past the last applied entry; [`PartitionSm::set_snapshot_point_for_offset`]
/// clamps it. Blocking (a binary search over batch headers).
pub fn snapshot_point_for_offset(
    store: &KeelLogStore,
    offset: u64,
) -> io::Result<Option<(LogId, u64)>> {
    let log = store.log();
    let end = log.log_end_offset();
    if offset > end {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("snapshot point for offset {offset}: past the log end offset {end}"),
        ));
    }
    let (first, next) = (log.first_raft_index(), log.next_raft_index());
    let header = |i: u64| {
        log.entry_header(i)
            .map_err(|e| log_err(e, &format!("reading the header of raft index {i}")))
    };
    // The first entry that ends past `offset`; batch next offsets never decrease with the index.
    let (mut lo, mut hi) = (first, next);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if header(mid)?.next_offset() > offset {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    if lo == first {
        return Ok(None);
    }
    let h = header(lo - 1)?;
    if h.next_offset() <= log.log_start_offset() {
        return Ok(None);
    }
    Ok(Some((log_id(h.raft_term, h.raft_index), h.next_offset())))
}
