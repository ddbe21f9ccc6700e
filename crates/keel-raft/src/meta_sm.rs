//! The state machine of a metadata group: openraft's side of it (applied position, membership,
//! snapshots on disk) around a [`MetaMachine`] the broker supplies, which knows what the
//! commands mean. The machine sees command bytes and snapshot bytes only, never an openraft
//! type.
//!
//! A command travels as the value of a one-record batch (so a metadata log is an ordinary keel
//! log); its state is small, so each snapshot is the whole state and the log is compacted.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::StreamExt;
use keel_batch::{BatchBuilder, Compression, RecordRef, decode_records};
use keel_log::fs::Fs;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};

use crate::log_store::blocking;
use crate::state_file::StateFile;
use crate::types::{
    AppendAck, BatchData, KeelRaft, LogId, Snapshot, SnapshotMeta, StoredMembership,
};

const SNAPSHOT_FILE: &str = "meta-snapshot";
/// The largest command a metadata entry may decode to.
const MAX_COMMAND_BYTES: usize = 64 << 20;

/// What a metadata group's commands mean: the broker's side of the state machine.
///
/// Calls come in log order from one task; the methods take `&self` so that the broker can
/// read the state it keeps from other tasks.
pub trait MetaMachine: Send + Sync + 'static {
    /// Applies the command committed at `index` (the bytes given to [`encode_command`]).
    /// Bytes no replica can decode must be skipped alike on every replica.
    fn apply(&self, index: u64, command: &[u8]);
    /// Called after a run of [`MetaMachine::apply`]s, e.g. to publish the new state once.
    fn applied(&self);
    /// The whole state, for a snapshot.
    fn snapshot(&self) -> io::Result<Vec<u8>>;
    /// Replaces the whole state with a snapshot's.
    fn restore(&self, data: &[u8]) -> io::Result<()>;
}

/// Encodes a command as the data of a metadata Raft entry: a one-record batch.
pub fn encode_command(command: &[u8]) -> io::Result<BatchData> {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(&RecordRef {
        timestamp: 0,
        key: None,
        value: Some(command),
        headers: &[],
    })
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    b.build()
        .map(BatchData::new)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn decode_command(batch: &bytes::Bytes) -> io::Result<Vec<u8>> {
    let records = decode_records(batch, MAX_COMMAND_BYTES)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    records
        .into_iter()
        .next()
        .and_then(|r| r.value)
        .map(|v| v.to_vec())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty metadata command"))
}

/// What `meta-snapshot` holds: the current snapshot, as openraft hands it over.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

impl From<StoredSnapshot> for Snapshot<Vec<u8>> {
    fn from(s: StoredSnapshot) -> Self {
        Self {
            meta: s.meta,
            snapshot: s.data,
        }
    }
}

#[derive(Debug)]
struct Position {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<StoredSnapshot>,
}

/// A metadata group's state machine (cheap to clone).
#[derive(Clone)]
pub struct MetaSm {
    position: Arc<Mutex<Position>>,
    machine: Arc<dyn MetaMachine>,
    file: Arc<StateFile>,
    fs: Arc<dyn Fs>,
}

impl std::fmt::Debug for MetaSm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaSm")
            .field("position", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl MetaSm {
    /// Opens the state machine of the metadata store in `dir`: restores `machine` from the
    /// last snapshot (openraft then re-applies the committed entries after it). Blocking.
    pub fn open(dir: &Path, fs: Arc<dyn Fs>, machine: Arc<dyn MetaMachine>) -> io::Result<Self> {
        let file = StateFile::new(dir, SNAPSHOT_FILE);
        let stored: Option<StoredSnapshot> = file.load(&*fs)?;
        let (last_applied, membership) = match &stored {
            Some(s) => {
                machine.restore(&s.data)?;
                (s.meta.last_log_id, s.meta.last_membership.clone())
            }
            None => (None, StoredMembership::default()),
        };
        Ok(Self {
            position: Arc::new(Mutex::new(Position {
                last_applied,
                membership,
                snapshot: stored,
            })),
            machine,
            file: Arc::new(file),
            fs,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Position> {
        self.position.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn store(&self, stored: StoredSnapshot) -> io::Result<()> {
        let (file, s, fs) = (Arc::clone(&self.file), stored.clone(), Arc::clone(&self.fs));
        blocking(move || file.store(&*fs, &Some(s))).await?;
        self.lock().snapshot = Some(stored);
        Ok(())
    }
}

impl RaftSnapshotBuilder<KeelRaft> for MetaSm {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot<Vec<u8>>, io::Error> {
        // Position and state are read together: applies run on the task that builds.
        let meta = {
            let g = self.lock();
            SnapshotMeta {
                last_log_id: g.last_applied,
                last_membership: g.membership.clone(),
            }
        };
        let stored = StoredSnapshot {
            meta,
            data: self.machine.snapshot()?,
        };
        self.store(stored.clone()).await?;
        Ok(stored.into())
    }
}

impl RaftStateMachine<KeelRaft> for MetaSm {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let g = self.lock();
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: futures::Stream<Item = Result<EntryResponder<KeelRaft>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut changed = false;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            match &entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    self.lock().membership = StoredMembership::new(Some(entry.log_id), m.clone());
                }
                EntryPayload::Normal(batch) => {
                    match decode_command(batch.bytes()) {
                        Ok(cmd) => self.machine.apply(entry.log_id.index, &cmd),
                        // Every replica decodes the same bytes, so they all skip it.
                        Err(e) => {
                            tracing::error!(index = entry.log_id.index, error = %e, "undecodable metadata command skipped");
                        }
                    }
                    changed = true;
                }
            }
            self.lock().last_applied = Some(entry.log_id);
            if let Some(r) = responder {
                r.send(AppendAck::default());
            }
        }
        if changed {
            self.machine.applied();
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        };
        // Restored first, which checks the bytes: a snapshot no replica can read is never
        // stored. (A failed store stops the group; it starts again from the old snapshot.)
        self.machine.restore(&stored.data)?;
        self.store(stored.clone()).await?;
        let mut g = self.lock();
        g.last_applied = meta.last_log_id;
        g.membership = meta.last_membership.clone();
        drop(g);
        self.machine.applied();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Vec<u8>>>, io::Error> {
        Ok(self.lock().snapshot.clone().map(Snapshot::from))
    }
}
