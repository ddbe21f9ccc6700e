//! Conversions from the errors of lower layers into [`BrokerError`], so that call sites
//! propagate with `?` and every layer's error maps to the same reason everywhere.

use std::{fmt, io};

use keel_log::LogError;

use super::BrokerError;
use crate::cluster::meta::Refusal;
use crate::metadata::InitRefusal;

/// A storage error from an append or a flush. `DiskFull` is raised before any byte is written;
/// anything else may have left the batch written (or durable), so it is not definite.
impl From<LogError> for BrokerError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::InvalidBatch(b) => Self::CorruptBatch {
                index: 0,
                reason: b.to_string(),
            },
            LogError::BatchTooLarge { size, limit } => Self::TooLarge {
                what: "record batch",
                size,
                limit,
                setting: "max.message.bytes",
            },
            LogError::DiskFull { .. } => Self::DiskFull(e.to_string()),
            // Damage on this replica's disk: refused, never served, and repaired from another
            // replica (see `cluster::scrub`), so a retry soon succeeds.
            LogError::Corrupt { .. } => Self::Unavailable {
                message: format!(
                    "{e}; this replica refuses the damaged entries until it has repaired them from another replica"
                ),
                definite: false,
            },
            other => Self::Storage {
                message: other.to_string(),
                definite: false,
            },
        }
    }
}

/// An IO error from writing broker state. A full disk is `DISK_FULL` here as it is from the log,
/// so clients see one reason for it whichever layer ran out of space.
impl From<io::Error> for BrokerError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::StorageFull {
            Self::DiskFull(e.to_string())
        } else {
            Self::Storage {
                message: e.to_string(),
                definite: false,
            }
        }
    }
}

/// A blocking or spawned task of the broker panicked or was cancelled: its outcome is unknown.
impl From<tokio::task::JoinError> for BrokerError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Internal(format!("a broker task failed: {e}"))
    }
}

/// A metadata command the metadata state machine refused (the same answer on every broker).
impl From<Refusal> for BrokerError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::TopicExists(t) => Self::TopicExists(t),
            Refusal::UnknownTopic(t) => Self::UnknownTopic(t),
            Refusal::Producer(InitRefusal::UnknownProducer(id)) => Self::InvalidArgument {
                field: "producer_id",
                message: format!("producer id {id} was never handed out"),
            },
            Refusal::Producer(InitRefusal::Fenced {
                producer_id,
                epoch,
                current,
            }) => Self::ProducerFenced {
                producer_id,
                epoch,
                current,
            },
            Refusal::Invalid { field, message } => Self::InvalidArgument {
                // Field names are `&'static str` so that statuses name fields the API defines;
                // a refusal names one of these (anything else is the request as a whole).
                field: match field.as_str() {
                    "replicas" => "replicas",
                    "partition" => "partition",
                    "broker_id" => "broker_id",
                    "storage_id" => "storage_id",
                    _ => "request",
                },
                message,
            },
            // Retriable: the replaced broker's groups are still removing it.
            Refusal::Replacing(message) => Self::Unavailable {
                message,
                definite: true,
            },
        }
    }
}

/// How `keel_log::LogError::DiskFull` reads. A replica's Raft core that stops on a failed log
/// write keeps only the text of the error (the Raft core stores storage errors as strings), so this
/// is how a stopped replica tells a full disk from other failures. A test below ties it to
/// keel-log's message.
const LOG_DISK_FULL: &str = "disk full while";

impl BrokerError {
    /// A replica's Raft core stopped, so it refused (or dropped) a write; `cause` is why it
    /// stopped, and `voters` how many voters its group has. A full disk that leaves the
    /// partition unable to take writes (this replica is its only voter, as on a single broker)
    /// is `DISK_FULL`, as it is when the log itself reports it. With other voters, one of them
    /// takes over: that is a leader change, `otherwise` (retriable), as is any other cause.
    /// Definiteness is `otherwise`'s: a write the core dropped may have reached other replicas.
    pub fn replica_stopped(cause: &dyn fmt::Display, otherwise: Self, voters: usize) -> Self {
        let cause = cause.to_string();
        if voters > 1 || !cause.contains(LOG_DISK_FULL) {
            return otherwise;
        }
        let full = Self::DiskFull(format!("the replica stopped: {cause}"));
        if otherwise.is_definite() {
            full
        } else {
            full.after_write()
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_types::ErrorReason;

    use super::*;

    #[test]
    fn damaged_bytes_are_refused_as_unavailable_for_a_retry() {
        let log = LogError::Corrupt {
            path: "/d/00000000000000000000.log".into(),
            position: 4096,
            reason: "crc mismatch".into(),
        };
        let e = BrokerError::from(log);
        assert_eq!(e.kind(), ErrorReason::Unavailable);
        assert!(e.to_string().contains("repaired"), "{e}");
    }

    #[test]
    fn a_full_disk_is_disk_full_from_every_layer() {
        let log = LogError::DiskFull {
            action: "allocating",
            path: "/x".into(),
            source: io::Error::from(io::ErrorKind::StorageFull),
        };
        assert_eq!(BrokerError::from(log).kind(), ErrorReason::DiskFull);
        let io = io::Error::new(io::ErrorKind::StorageFull, "no space left on device");
        let e = BrokerError::from(io);
        assert_eq!(e.kind(), ErrorReason::DiskFull);
        assert!(e.is_definite());
        let other = BrokerError::from(io::Error::other("boom"));
        assert_eq!(other.kind(), ErrorReason::StorageError);
        assert!(!other.is_definite());
    }

    #[test]
    fn a_replica_stopped_by_a_full_disk_is_disk_full() {
        let log = LogError::DiskFull {
            action: "allocating",
            path: "/d/log/00000000000000000000.log".into(),
            source: io::Error::from(io::ErrorKind::StorageFull),
        };
        // What the Raft core keeps of the log store's error.
        let fatal = format!("StorageError: when Write Logs: std::io::error::Error: append: {log}");
        let unavailable = |definite| BrokerError::Unavailable {
            message: "t/0: raft group stopped".into(),
            definite,
        };
        let e = BrokerError::replica_stopped(&fatal, unavailable(true), 1);
        assert_eq!(e.kind(), ErrorReason::DiskFull);
        assert!(e.is_definite());
        let e = BrokerError::replica_stopped(&fatal, unavailable(false), 1);
        assert_eq!(e.kind(), ErrorReason::DiskFull);
        assert!(!e.is_definite());
        let e = BrokerError::replica_stopped(&"panicked", unavailable(true), 1);
        assert_eq!(e.kind(), ErrorReason::Unavailable);
        // Another voter takes the partition over: a leader change, which clients retry.
        let e = BrokerError::replica_stopped(&fatal, unavailable(false), 3);
        assert_eq!(e.kind(), ErrorReason::Unavailable);
        assert!(e.kind().is_retriable());
    }

    #[test]
    fn refusals_keep_their_reason() {
        let e = BrokerError::from(Refusal::TopicExists("t".into()));
        assert_eq!(e.kind(), ErrorReason::TopicExists);
        let e = BrokerError::from(Refusal::Producer(InitRefusal::Fenced {
            producer_id: 1,
            epoch: 0,
            current: 1,
        }));
        assert_eq!(e.kind(), ErrorReason::ProducerFenced);
        let e = BrokerError::from(Refusal::Invalid {
            field: "replicas".into(),
            message: "m".into(),
        });
        assert!(matches!(
            e,
            BrokerError::InvalidArgument {
                field: "replicas",
                ..
            }
        ));
    }
}
