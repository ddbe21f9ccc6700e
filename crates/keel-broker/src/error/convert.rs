//! Conversions from the errors of lower layers into [`BrokerError`], so that call sites
//! propagate with `?` and every layer's error maps to the same reason everywhere.

use std::io;

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
                    _ => "request",
                },
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_types::ErrorReason;

    use super::*;

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
