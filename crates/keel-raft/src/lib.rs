//! Keel's openraft glue: a partition's Raft log *is* its keel-log.
//!
//! [`KeelLogStore`] implements openraft's `RaftLogStorage` over [`keel_log::Log`]: one Raft
//! entry is one record batch, whose header carries the entry's term and index; blank and
//! membership entries are control batches that take no offsets (see [`codec`]).

pub mod codec;
mod log_store;
pub mod state_file;
pub mod types;

pub use log_store::{DEFAULT_MAX_READ_BYTES, KeelLogReader, KeelLogStore, log_err};
pub use types::{AppendAck, BatchData, Entry, KeelRaft, LogId, Vote, log_id};
