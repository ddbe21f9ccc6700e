use std::io;
use std::path::PathBuf;

use keel_batch::BatchError;

/// Errors of the log. Request errors (`InvalidBatch`, `OffsetOutOfRange`, …) leave the log
/// usable; `Poisoned` and `Corrupt` mean the partition must not acknowledge or serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("batch of {size} bytes exceeds the log's limit of {limit} bytes")]
    BatchTooLarge { size: u64, limit: u64 },
    #[error("offset {offset} is out of range: the log holds [{log_start}, {log_end})")]
    OffsetOutOfRange {
        offset: u64,
        log_start: u64,
        log_end: u64,
    },
    #[error("raft index {index} is out of range: the log holds [{first}, {next})")]
    IndexOutOfRange { index: u64, first: u64, next: u64 },
    #[error("raft log id mismatch: expected index {expected}, got {got}")]
    NonContiguousIndex { expected: u64, got: u64 },
    #[error("raft term {term} is lower than the last term {last}")]
    TermWentBackwards { term: u64, last: u64 },
    #[error("disk full while {action} {path}: {source}")]
    DiskFull {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt data in {path} at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("cannot repair {path} at byte {position}: {reason}")]
    RepairRefused {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("log is poisoned after a failed flush and no longer acknowledges writes: {reason}")]
    Poisoned { reason: String },
    #[error("invalid log configuration: {0}")]
    Config(String),
    #[error("I/O error while {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl LogError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            Self::DiskFull {
                action,
                path,
                source,
            }
        } else {
            Self::Io {
                action,
                path,
                source,
            }
        }
    }

    /// True for errors after which the log refuses further writes.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Poisoned { .. } | Self::Corrupt { .. })
    }
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;
