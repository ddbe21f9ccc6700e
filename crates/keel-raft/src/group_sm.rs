//! One state machine type for every Raft group a broker hosts (the Raft transport's registry
//! routes all groups through one type): a metadata group's or a partition's.

use std::io;

use openraft::OptionalSend;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};

use crate::meta_sm::MetaSm;
use crate::state_machine::PartitionSm;
use crate::types::{KeelRaft, LogId, Snapshot, SnapshotMeta, StoredMembership};

#[derive(Debug, Clone)]
pub enum GroupSm {
    Meta(MetaSm),
    Partition(PartitionSm),
}

impl RaftSnapshotBuilder<KeelRaft> for GroupSm {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot<Vec<u8>>, io::Error> {
        match self {
            Self::Meta(m) => m.build_snapshot().await,
            Self::Partition(p) => p.build_snapshot().await,
        }
    }
}

impl RaftStateMachine<KeelRaft> for GroupSm {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        match self {
            Self::Meta(m) => m.applied_state().await,
            Self::Partition(p) => p.applied_state().await,
        }
    }

    async fn apply<S>(&mut self, entries: S) -> Result<(), io::Error>
    where
        S: futures::Stream<Item = Result<EntryResponder<KeelRaft>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        match self {
            Self::Meta(m) => m.apply(entries).await,
            Self::Partition(p) => p.apply(entries).await,
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
        match self {
            Self::Meta(m) => m.install_snapshot(meta, snapshot).await,
            Self::Partition(p) => p.install_snapshot(meta, snapshot).await,
        }
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Vec<u8>>>, io::Error> {
        match self {
            Self::Meta(m) => m.get_current_snapshot().await,
            Self::Partition(p) => p.get_current_snapshot().await,
        }
    }
}
