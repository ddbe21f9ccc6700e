//! Keel's openraft glue: a partition's Raft log *is* its keel-log.
//!
//! [`KeelLogStore`] implements openraft's `RaftLogStorage` over [`keel_log::Log`]: one Raft
//! entry is one record batch, whose header carries the entry's term and index; blank and
//! membership entries are control batches that take no offsets (see [`codec`]).
//!
//! Between brokers, Raft messages travel over gRPC ([`wire`]): [`network::RaftTransport`] is
//! the client side (one connection per peer shared by every group), [`server::RaftRegistry`]
//! the server side (dispatch by group id).
//!
//! [`PartitionSm`] is the group's state machine: applying an entry advances the partition's
//! high watermark; snapshots are metadata only, cut at the retention boundary. [`MetaSm`] is
//! a metadata group's, around the broker's [`MetaMachine`].
//!
//! A broker drives its groups through [`Replica`] and reads them as [`Status`] values: every
//! openraft type and trait implementation stays in this crate.

mod adopt;
pub mod codec;
mod flusher;
mod group_sm;
pub mod identity;
mod log_store;
pub mod meta_sm;
pub mod network;
pub mod producers;
mod repair;
pub mod replica;
pub mod segment_repair;
pub mod server;
pub mod state_file;
pub mod state_machine;
pub mod types;
pub mod wire;

pub use adopt::adopt_as_single_voter;
pub use group_sm::GroupSm;
pub use identity::Identity;
pub use log_store::{DEFAULT_MAX_READ_BYTES, KeelLogReader, KeelLogStore, log_err};
pub use meta_sm::{MetaMachine, MetaSm, encode_command};
pub use network::{GroupNetwork, RaftTransport, TransportConfig};
pub use replica::{
    GroupConfig, Position, RaftService, Registry, Replica, ReplicaError, Role, Status, StatusWatch,
    Submitted,
};
pub use server::{RaftRegistry, RaftServer};
pub use state_machine::{PartitionSm, SnapshotState, snapshot_point_for_offset};
pub use types::{AppendAck, BatchData, Entry, KeelRaft, LogId, Vote, log_id};
