//! The metadata group's state machine: applies [`Command`]s to a [`ClusterState`], publishes
//! each new state on a watch channel (the broker's reconciler follows it) and snapshots the
//! whole state, which is small, so the metadata log is compacted.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures::StreamExt;
use keel_batch::{BatchBuilder, Compression, RecordRef, decode_records};
use keel_log::fs::Fs;
use keel_raft::state_file::StateFile;
use keel_raft::types::{Snapshot, SnapshotMeta, StoredMembership};
use keel_raft::{AppendAck, BatchData, KeelRaft, LogId};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::meta::{ClusterState, Command, Outcome, Reply};

/// How many outcomes of recent commands are kept for their proposers to collect.
const OUTCOMES_KEPT: usize = 4096;
const SNAPSHOT_FILE: &str = "meta-snapshot";

/// Encodes a command as the data of a metadata Raft entry: a one-record batch, JSON value.
pub fn encode_command(cmd: &Command) -> io::Result<BatchData> {
    let json = serde_json::to_vec(cmd).map_err(io::Error::other)?;
    let mut b = BatchBuilder::new(Compression::None);
    b.push(&RecordRef {
        timestamp: 0,
        key: None,
        value: Some(&json),
        headers: &[],
    })
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(BatchData::new(b.build().map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    })?))
}

fn decode_command(batch: &Bytes) -> io::Result<Command> {
    let records = decode_records(batch, 64 << 20)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let value = records
        .first()
        .and_then(|r| r.value.as_ref())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty metadata command"))?;
    serde_json::from_slice(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

#[derive(Debug)]
struct Inner {
    state: ClusterState,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    outcomes: BTreeMap<u64, Outcome>,
    snapshot: Option<StoredSnapshot>,
}

/// The metadata state machine (cheap to clone).
#[derive(Debug, Clone)]
pub struct MetadataSm {
    inner: Arc<Mutex<Inner>>,
    file: Arc<StateFile>,
    fs: Arc<dyn Fs>,
    tx: watch::Sender<Arc<ClusterState>>,
}

impl MetadataSm {
    /// Opens the state machine of the metadata store in `dir`, starting from its last
    /// snapshot (openraft re-applies the committed entries after it). Blocking.
    pub fn open(dir: &Path, fs: Arc<dyn Fs>) -> io::Result<Self> {
        let file = StateFile::new(dir, SNAPSHOT_FILE);
        let stored: Option<StoredSnapshot> = file.load(&*fs)?;
        let (state, last_applied, membership) = match &stored {
            Some(s) => (
                serde_json::from_slice(&s.data)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                s.meta.last_log_id,
                s.meta.last_membership.clone(),
            ),
            None => (ClusterState::new(), None, StoredMembership::default()),
        };
        let (tx, _) = watch::channel(Arc::new(state.clone()));
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                state,
                last_applied,
                membership,
                outcomes: BTreeMap::new(),
                snapshot: stored,
            })),
            file: Arc::new(file),
            fs,
            tx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Follows the applied state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.tx.subscribe()
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.tx.borrow().clone()
    }

    /// The outcome of the command applied at `index` (collected once by its proposer).
    pub fn take_outcome(&self, index: u64) -> Option<Outcome> {
        self.lock().outcomes.remove(&index)
    }
}

impl RaftSnapshotBuilder<KeelRaft> for MetadataSm {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot<Vec<u8>>, io::Error> {
        let stored = {
            let g = self.lock();
            StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: g.last_applied,
                    last_membership: g.membership.clone(),
                },
                data: serde_json::to_vec(&g.state).map_err(io::Error::other)?,
            }
        };
        let (file, s, fs) = (Arc::clone(&self.file), stored.clone(), Arc::clone(&self.fs));
        tokio::task::spawn_blocking(move || file.store(&*fs, &Some(s)))
            .await
            .map_err(io::Error::other)??;
        self.lock().snapshot = Some(stored.clone());
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: stored.data,
        })
    }
}

impl RaftStateMachine<KeelRaft> for MetadataSm {
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
            {
                let mut g = self.lock();
                g.last_applied = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    }
                    EntryPayload::Normal(batch) => {
                        let outcome = match decode_command(batch.bytes()) {
                            Ok(cmd) => g.state.apply(&cmd),
                            Err(e) => {
                                // Every replica decodes the same bytes, so they all skip it.
                                tracing::error!(index = entry.log_id.index, error = %e, "undecodable metadata command skipped");
                                Ok(Reply::Done)
                            }
                        };
                        g.outcomes.insert(entry.log_id.index, outcome);
                        while g.outcomes.len() > OUTCOMES_KEPT {
                            g.outcomes.pop_first();
                        }
                        changed = true;
                    }
                }
            }
            if let Some(r) = responder {
                r.send(AppendAck::default());
            }
        }
        if changed {
            let state = Arc::new(self.lock().state.clone());
            self.tx.send_replace(state);
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
        let state: ClusterState = serde_json::from_slice(&snapshot)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        };
        let (file, s, fs) = (Arc::clone(&self.file), stored.clone(), Arc::clone(&self.fs));
        tokio::task::spawn_blocking(move || file.store(&*fs, &Some(s)))
            .await
            .map_err(io::Error::other)??;
        {
            let mut g = self.lock();
            g.state = state.clone();
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
            g.snapshot = Some(stored);
        }
        self.tx.send_replace(Arc::new(state));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Vec<u8>>>, io::Error> {
        Ok(self.lock().snapshot.clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}
