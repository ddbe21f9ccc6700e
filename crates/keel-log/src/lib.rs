//! Keel's partition log.
//!
//! A log is a directory of segments. Each segment is a memory-mapped `.log` file of CRC32C-checked
//! record batches plus a sparse offset index (`.index`, also keyed by Raft index) and a time
//! index (`.timeindex`). The log assigns offsets on append, serves batch-aligned zero-copy reads,
//! finds offsets by timestamp, truncates (for Raft), deletes by retention, flushes according to
//! a durability policy with group commit, and recovers after a crash by validating only what was
//! written after its last checkpoint.
//!
//! The crate is synchronous and does all file IO through the [`fs::Fs`] seam; `sim::CrashFs`
//! (behind the `sim` feature) simulates power loss on top of it. The batch format itself is
//! the `keel-batch` crate.
//!
//! See `docs/storage-format.md` for the byte-exact format.

mod checkpoint;
mod config;
mod error;
pub mod fs;
mod index;
mod le;
mod log;
mod promise;
mod recovery;
mod segment;
mod segment_file;
#[cfg(feature = "sim")]
pub mod sim;

pub use config::{FlushPolicy, LogConfig, MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES};
pub use error::{LogError, Result};
pub use log::{
    AppendInfo, Clock, Cursor, Damage, Log, ReadLimit, ReadSlice, Repaired, RetentionOutcome,
    SystemClock,
};
pub use promise::Promised;
