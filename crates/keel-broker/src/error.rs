//! Broker errors and their single mapping to gRPC statuses.
//!
//! Every status carries ASCII metadata that clients in any language can read:
//! `keel-error` (a stable reason), `keel-definite` (`true` when nothing was written), and for
//! some reasons `keel-leader-id` / `keel-leader-address` or `keel-log-start-offset` /
//! `keel-high-watermark`. `docs/api.md` lists them.

use keel_log::LogError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("invalid config {key}: {message}")]
    InvalidConfig { key: String, message: String },
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("unknown partition {partition} of topic {topic:?}, which has {count} partitions")]
    UnknownPartition {
        topic: String,
        partition: u32,
        count: u32,
    },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error(
        "offset {offset} of {topic}/{partition} is out of range: valid offsets are {log_start}..={high_watermark}"
    )]
    OffsetOutOfRange {
        topic: String,
        partition: u32,
        offset: u64,
        log_start: u64,
        high_watermark: u64,
    },
    #[error("this broker is not the leader of {topic}/{partition}")]
    NotLeader {
        topic: String,
        partition: u32,
        leader: Option<(u32, String)>,
    },
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes ({setting})")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
        setting: &'static str,
    },
    #[error(
        "the record batch at offset {offset} decompresses to more than {limit} bytes; fetch it with RECORD_FORMAT_BATCHES"
    )]
    DecodeTooLarge { offset: u64, limit: u64 },
    #[error("corrupt record batch in batches[{index}]: {reason}")]
    CorruptBatch { index: usize, reason: String },
    /// An idempotent batch whose sequence does not continue its producer's on this partition
    /// (a gap, or a batch too old to be in the window): nothing was written.
    #[error(
        "out of order sequence for producer {producer_id} on {topic}/{partition}: expected base sequence {expected}, got {got}"
    )]
    OutOfOrderSequence {
        topic: String,
        partition: u32,
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    /// A newer incarnation (epoch) of the producer id exists: this one may not write.
    #[error("producer {producer_id} epoch {epoch} is fenced by epoch {current}")]
    ProducerFenced {
        producer_id: i64,
        epoch: i16,
        current: i16,
    },
    /// A group request reached a broker that does not coordinate the group.
    #[error("this broker is not the coordinator of group {group:?}")]
    NotCoordinator {
        group: String,
        coordinator: Option<(u32, String)>,
    },
    #[error("{0}")]
    UnknownMember(String),
    #[error("{0}")]
    FencedMember(String),
    #[error("{0}")]
    InconsistentStrategy(String),
    #[error("group {group:?} has {members} active members; stop them first")]
    GroupNotEmpty { group: String, members: usize },
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("{0}")]
    OffsetBackwards(String),
    #[error("disk full: {0}")]
    DiskFull(String),
    #[error("storage error: {message}")]
    Storage { message: String, definite: bool },
    #[error("timed out after {0} ms waiting for acknowledgement; the write may still complete")]
    Timeout(u64),
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The cluster cannot serve the request now (no leader, a Raft group stopped, leadership
    /// moved while waiting); retrying later may succeed.
    #[error("unavailable: {message}")]
    Unavailable { message: String, definite: bool },
    #[error("internal error: {0}")]
    Internal(String),
    /// An error after part of the request took effect (earlier batches, or this batch while
    /// waiting for it to become durable): same reason and code, never definite.
    #[error("{0} (after some of this request was written)")]
    AfterWrite(Box<BrokerError>),
}

impl BrokerError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// The stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Self::InvalidConfig { .. } => "INVALID_CONFIG",
            Self::UnknownTopic(_) => "UNKNOWN_TOPIC",
            Self::UnknownPartition { .. } => "UNKNOWN_PARTITION",
            Self::TopicExists(_) => "TOPIC_EXISTS",
            Self::OffsetOutOfRange { .. } => "OFFSET_OUT_OF_RANGE",
            Self::NotLeader { .. } => "NOT_LEADER",
            Self::TooLarge { .. } | Self::DecodeTooLarge { .. } => "MESSAGE_TOO_LARGE",
            Self::CorruptBatch { .. } => "CORRUPT_BATCH",
            Self::OutOfOrderSequence { .. } => "OUT_OF_ORDER_SEQUENCE",
            Self::ProducerFenced { .. } => "PRODUCER_FENCED",
            Self::NotCoordinator { .. } => "NOT_COORDINATOR",
            Self::UnknownMember(_) => "UNKNOWN_MEMBER",
            Self::FencedMember(_) => "FENCED_MEMBER",
            Self::InconsistentStrategy(_) => "INCONSISTENT_STRATEGY",
            Self::GroupNotEmpty { .. } => "GROUP_NOT_EMPTY",
            Self::UnknownGroup(_) => "UNKNOWN_GROUP",
            Self::OffsetBackwards(_) => "OFFSET_BACKWARDS",
            Self::DiskFull(_) => "DISK_FULL",
            Self::Storage { .. } => "STORAGE_ERROR",
            Self::Timeout(_) => "TIMEOUT",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::Unavailable { .. } => "UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
            Self::AfterWrite(inner) => inner.reason(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. }
            | Self::InvalidConfig { .. }
            | Self::CorruptBatch { .. } => Code::InvalidArgument,
            Self::UnknownTopic(_) | Self::UnknownPartition { .. } => Code::NotFound,
            Self::TopicExists(_) => Code::AlreadyExists,
            Self::OutOfOrderSequence { .. }
            | Self::ProducerFenced { .. }
            | Self::UnknownMember(_)
            | Self::FencedMember(_)
            | Self::InconsistentStrategy(_)
            | Self::GroupNotEmpty { .. }
            | Self::OffsetBackwards(_) => Code::FailedPrecondition,
            Self::UnknownGroup(_) => Code::NotFound,
            Self::OffsetOutOfRange { .. } => Code::OutOfRange,
            Self::NotLeader { .. }
            | Self::NotCoordinator { .. }
            | Self::ShuttingDown
            | Self::Unavailable { .. } => Code::Unavailable,
            Self::TooLarge { .. } | Self::DecodeTooLarge { .. } | Self::DiskFull(_) => {
                Code::ResourceExhausted
            }
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Storage { .. } | Self::Internal(_) => Code::Internal,
            Self::AfterWrite(inner) => inner.code(),
        }
    }

    /// True when the request had no effect, so a retry cannot duplicate anything.
    pub fn is_definite(&self) -> bool {
        match self {
            Self::Storage { definite, .. } | Self::Unavailable { definite, .. } => *definite,
            Self::Timeout(_) | Self::Internal(_) | Self::AfterWrite(_) => false,
            _ => true,
        }
    }

    /// Maps a storage error from an append or read. `DiskFull` is raised before any byte is
    /// written; poisoning after a failed flush leaves the batch possibly durable.
    pub fn from_log(e: LogError, index: usize) -> Self {
        match e {
            LogError::InvalidBatch(b) => Self::CorruptBatch {
                index,
                reason: b.to_string(),
            },
            LogError::BatchTooLarge { size, limit } => Self::TooLarge {
                what: "record batch",
                size,
                limit,
                setting: "max.message.bytes",
            },
            LogError::DiskFull { .. } => Self::DiskFull(e.to_string()),
            LogError::Poisoned { .. } => Self::Storage {
                message: e.to_string(),
                definite: false,
            },
            other => Self::Storage {
                message: other.to_string(),
                definite: false,
            },
        }
    }

    /// Marks an error raised after some of the request was written.
    pub fn after_write(self) -> Self {
        match self {
            Self::AfterWrite(_) => self,
            other => Self::AfterWrite(Box::new(other)),
        }
    }

    /// The status with Keel's metadata. This is the only place statuses are built.
    pub fn to_status(&self) -> Status {
        let mut status = Status::new(self.code(), self.to_string());
        let md = status.metadata_mut();
        insert(md, "keel-error", self.reason());
        insert(
            md,
            "keel-definite",
            if self.is_definite() { "true" } else { "false" },
        );
        match self {
            Self::NotLeader {
                leader: Some((id, addr)),
                ..
            }
            | Self::NotCoordinator {
                coordinator: Some((id, addr)),
                ..
            } => {
                insert(md, "keel-leader-id", &id.to_string());
                insert(md, "keel-leader-address", addr);
            }
            Self::OffsetOutOfRange {
                log_start,
                high_watermark,
                ..
            } => {
                insert(md, "keel-log-start-offset", &log_start.to_string());
                insert(md, "keel-high-watermark", &high_watermark.to_string());
            }
            _ => {}
        }
        status
    }

    /// The error as carried inside a stream message.
    pub fn to_proto(&self) -> keel_proto::v1::Error {
        let (leader_id, leader_address) = match self {
            Self::NotLeader {
                leader: Some((id, addr)),
                ..
            } => (*id, addr.clone()),
            _ => (0, String::new()),
        };
        keel_proto::v1::Error {
            code: self.code() as i32,
            reason: self.reason().to_owned(),
            message: self.to_string(),
            leader_id,
            leader_address,
            definite: self.is_definite(),
        }
    }
}

fn insert(md: &mut tonic::metadata::MetadataMap, key: &'static str, value: &str) {
    if let Ok(v) = value.parse() {
        md.insert(key, v);
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        e.to_status()
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_reason_and_hints() {
        let s = BrokerError::OffsetOutOfRange {
            topic: "t".into(),
            partition: 1,
            offset: 99,
            log_start: 5,
            high_watermark: 10,
        }
        .to_status();
        assert_eq!(s.code(), Code::OutOfRange);
        assert!(s.message().contains("5..=10"));
        let md = s.metadata();
        assert_eq!(
            md.get("keel-error").and_then(|v| v.to_str().ok()),
            Some("OFFSET_OUT_OF_RANGE")
        );
        assert_eq!(
            md.get("keel-high-watermark").and_then(|v| v.to_str().ok()),
            Some("10")
        );
        assert_eq!(
            md.get("keel-definite").and_then(|v| v.to_str().ok()),
            Some("true")
        );

        let s = BrokerError::NotLeader {
            topic: "t".into(),
            partition: 0,
            leader: Some((2, "127.0.0.1:9293".into())),
        }
        .to_status();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.metadata()
                .get("keel-leader-address")
                .and_then(|v| v.to_str().ok()),
            Some("127.0.0.1:9293")
        );
        assert_eq!(
            BrokerError::Timeout(5)
                .to_status()
                .metadata()
                .get("keel-definite")
                .and_then(|v| v.to_str().ok()),
            Some("false")
        );
    }
}
