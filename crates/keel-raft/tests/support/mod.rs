//! Test support: a minimal in-memory state machine, a store builder for openraft's suite, an
//! in-process network between Raft nodes; helpers that drive a group's nodes ([`group`]) and
//! a store on a disk that can lose power ([`disk`]).
#![allow(dead_code)]

pub mod disk;
pub mod group;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use keel_batch::{BatchBuilder, BatchHeader, BatchIter, Compression, RecordRef};
use keel_log::LogConfig;
use keel_log::ReadLimit;
use keel_raft::types::Snapshot;
use keel_raft::types::{SnapshotMeta, StoredMembership, Vote};
use keel_raft::{AppendAck, BatchData, KeelLogStore, KeelRaft, LogId};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::log::StoreBuilder;
use openraft::type_config::TypeConfigExt;
use openraft::{BasicNode, EntryPayload, OptionalSend, Raft, StorageError};
use serde::{Deserialize, Serialize};

/// What the test state machine tracks; a snapshot is this, as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmState {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    /// The offset after the last applied data batch.
    pub next_offset: u64,
    pub batches: u64,
}

#[derive(Debug, Default)]
struct SmInner {
    state: SmState,
    snapshot: Option<Snapshot<Vec<u8>>>,
}

/// Applies entries, tracks last applied and membership; snapshots are JSON of [`SmState`].
#[derive(Debug, Clone, Default)]
pub struct MemStateMachine {
    inner: Arc<Mutex<SmInner>>,
}

impl MemStateMachine {
    pub fn state(&self) -> SmState {
        self.inner.lock().expect("sm lock").state.clone()
    }
}

impl RaftSnapshotBuilder<KeelRaft> for MemStateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot<Vec<u8>>, io::Error> {
        let mut g = self.inner.lock().expect("sm lock");
        let data = serde_json::to_vec(&g.state).map_err(io::Error::other)?;
        let meta = SnapshotMeta {
            last_log_id: g.state.last_applied,
            last_membership: g.state.last_membership.clone(),
        };
        let snapshot = Snapshot {
            meta,
            snapshot: data,
        };
        g.snapshot = Some(snapshot.clone());
        Ok(snapshot)
    }
}

impl RaftStateMachine<KeelRaft> for MemStateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let g = self.inner.lock().expect("sm lock");
        Ok((g.state.last_applied, g.state.last_membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: futures::Stream<Item = Result<EntryResponder<KeelRaft>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let ack = {
                let mut g = self.inner.lock().expect("sm lock");
                let st = &mut g.state;
                st.last_applied = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => AppendAck {
                        base_offset: st.next_offset,
                        next_offset: st.next_offset,
                    },
                    EntryPayload::Membership(m) => {
                        st.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        AppendAck {
                            base_offset: st.next_offset,
                            next_offset: st.next_offset,
                        }
                    }
                    EntryPayload::Normal(batch) => {
                        let h = BatchHeader::parse(batch.bytes())
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        st.next_offset = h.next_offset();
                        st.batches += 1;
                        AppendAck {
                            base_offset: h.base_offset,
                            next_offset: h.next_offset(),
                        }
                    }
                }
            };
            if let Some(r) = responder {
                r.send(ack);
            }
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
        let state: SmState = serde_json::from_slice(&snapshot)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut g = self.inner.lock().expect("sm lock");
        g.state = state;
        g.state.last_applied = meta.last_log_id;
        g.state.last_membership = meta.last_membership.clone();
        g.snapshot = Some(Snapshot {
            meta: meta.clone(),
            snapshot,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Vec<u8>>>, io::Error> {
        Ok(self.inner.lock().expect("sm lock").snapshot.clone())
    }
}

/// Small segments so tests cross segment boundaries.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

/// Builds a store in a fresh temporary directory (the guard) and an empty state machine.
pub struct Builder;

impl StoreBuilder<KeelRaft, KeelLogStore, MemStateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, KeelLogStore, MemStateMachine), StorageError<KeelRaft>> {
        let dir =
            tempfile::tempdir().map_err(|e| StorageError::read(KeelRaft::err_from_error(&e)))?;
        let store = KeelLogStore::open(dir.path(), small_config())
            .map_err(|e| StorageError::read(KeelRaft::err_from_error(&e)))?;
        Ok((dir, store, MemStateMachine::default()))
    }
}

/// A batch of `records` records with values `{tag}-{i}`.
#[allow(dead_code)] // not every test binary that includes `support` uses it
pub fn batch(tag: &str, records: usize) -> BatchData {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..records {
        let v = format!("{tag}-{i}");
        b.push(&RecordRef {
            timestamp: 7,
            key: None,
            value: Some(v.as_bytes()),
            headers: &[],
        })
        .expect("push");
    }
    BatchData::new(b.build().expect("build"))
}

/// (raft index, raft term, base offset, next offset, control, crc) of every batch in the log:
/// replicas must agree on all of it, control batches included (their bytes are deterministic).
pub type Row = (u64, u64, u64, u64, bool, u32);

#[allow(dead_code)]
pub fn layout(store: &KeelLogStore) -> Vec<Row> {
    let log = store.log();
    let mut out: Vec<Row> = Vec::new();
    let mut next = log.first_raft_index();
    while next < log.next_raft_index() {
        let slice = log
            .read_raft(next, u64::MAX, ReadLimit::default())
            .expect("read");
        for item in BatchIter::new(&slice.bytes) {
            let (h, _) = item.expect("batch");
            out.push((
                h.raft_index,
                h.raft_term,
                h.base_offset,
                h.next_offset(),
                h.attributes.control,
                h.crc,
            ));
        }
        next = out.last().map_or(next, |l| l.0 + 1);
    }
    out
}

/// An in-process network: every node of a group is a `Raft` in this map; a node that is not
/// in it is down (`Unreachable`).
pub struct Router<SM: RaftStateMachine<KeelRaft>> {
    pub nodes: Arc<Mutex<HashMap<u64, Raft<KeelRaft, SM>>>>,
}

impl<SM: RaftStateMachine<KeelRaft>> Clone for Router<SM> {
    fn clone(&self) -> Self {
        Self {
            nodes: Arc::clone(&self.nodes),
        }
    }
}

impl<SM: RaftStateMachine<KeelRaft>> Default for Router<SM> {
    fn default() -> Self {
        Self {
            nodes: Arc::default(),
        }
    }
}

impl<SM: RaftStateMachine<KeelRaft>> Router<SM> {
    pub fn get(&self, id: u64) -> Option<Raft<KeelRaft, SM>> {
        self.nodes.lock().expect("router").get(&id).cloned()
    }

    pub fn insert(&self, id: u64, raft: Raft<KeelRaft, SM>) {
        self.nodes.lock().expect("router").insert(id, raft);
    }

    pub fn remove(&self, id: u64) -> Option<Raft<KeelRaft, SM>> {
        self.nodes.lock().expect("router").remove(&id)
    }
}

/// A connection from one node to `target` through a [`Router`].
pub struct RouterClient<SM: RaftStateMachine<KeelRaft>> {
    router: Router<SM>,
    target: u64,
}

fn unreachable(msg: impl ToString) -> Unreachable<KeelRaft> {
    Unreachable::from_string(msg)
}

impl<SM: RaftStateMachine<KeelRaft>> RouterClient<SM> {
    /// The target node, if it is up.
    fn target(&self) -> Result<Raft<KeelRaft, SM>, Unreachable<KeelRaft>> {
        self.router
            .get(self.target)
            .ok_or_else(|| unreachable("down"))
    }
}

impl<SM> RaftNetworkFactory<KeelRaft> for Router<SM>
where
    SM: RaftStateMachine<KeelRaft, SnapshotData = Vec<u8>>,
{
    type Network = RouterClient<SM>;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> RouterClient<SM> {
        RouterClient {
            router: self.clone(),
            target,
        }
    }
}

impl<SM> RaftNetworkV2<KeelRaft> for RouterClient<SM>
where
    SM: RaftStateMachine<KeelRaft, SnapshotData = Vec<u8>>,
{
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<KeelRaft>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<KeelRaft>, RPCError<KeelRaft>> {
        let n = self.target().map_err(RPCError::Unreachable)?;
        n.append_entries(rpc)
            .await
            .map_err(|e| RPCError::Unreachable(unreachable(e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<KeelRaft>,
        _option: RPCOption,
    ) -> Result<VoteResponse<KeelRaft>, RPCError<KeelRaft>> {
        let n = self.target().map_err(RPCError::Unreachable)?;
        n.vote(rpc)
            .await
            .map_err(|e| RPCError::Unreachable(unreachable(e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<KeelRaft>, StreamingError<KeelRaft>> {
        let n = self.target().map_err(StreamingError::Unreachable)?;
        n.install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| StreamingError::Unreachable(unreachable(e)))
    }
}

/// One test per case of openraft's storage suite, so a failure names the case. `$builder`
/// builds the store and state machine; a type alias `S` for the suite must be in scope.
#[allow(unused_macros)] // only the suite test binaries use it
macro_rules! storage_suite_cases {
    ($module:ident, $builder:expr; $($name:ident),* $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> io::Result<()> {
                    let (_guard, store, sm) = $builder
                        .build()
                        .await
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    S::$name(store, sm).await
                }
            )*
        }
    };
}

/// The cases of openraft's storage suite that exercise the state machine (membership, initial
/// state, apply), in one list for every state machine under test; `$extra` adds cases of the
/// log store only.
#[allow(unused_macros)] // only the suite test binaries use it
macro_rules! state_machine_suite_cases {
    ($module:ident, $builder:expr; $($extra:ident),* $(,)?) => {
        storage_suite_cases!(
            $module,
            $builder;
            last_membership_in_log_initial,
            last_membership_in_log,
            last_membership_in_log_multi_step,
            get_membership_initial,
            get_membership_from_log_and_empty_sm,
            get_membership_from_empty_log_and_sm,
            get_membership_from_log_le_sm_last_applied,
            get_membership_from_log_gt_sm_last_applied_1,
            get_membership_from_log_gt_sm_last_applied_2,
            get_initial_state_without_init,
            get_initial_state_membership_from_empty_log_and_sm,
            get_initial_state_membership_from_sm_inlog_is_smaller,
            get_initial_state_membership_from_log_insm_is_smaller,
            get_initial_state_with_state,
            get_initial_state_last_log_gt_sm,
            get_initial_state_last_log_lt_sm,
            get_initial_state_re_apply_committed,
            last_applied_state,
            apply_single,
            apply_multiple,
            $($extra),*
        );
    };
}
