//! Broker errors and their single mapping to gRPC statuses.
//!
//! Every status carries ASCII metadata that clients in any language can read:
//! `keel-error` (a stable reason), `keel-definite` (`true` when nothing was written), and for
//! some reasons `keel-leader-id` / `keel-leader-address` or `keel-log-start-offset` /
//! `keel-high-watermark`. `docs/api.md` lists them. The reasons themselves, their gRPC codes and
//! whether they are definite by default are [`ErrorReason`], shared with the client;
//! [`BrokerError::kind`] is the one place a broker error picks its reason.

mod convert;
mod remote;

use keel_types::ErrorReason;
use tonic::{Code, Status};

pub use remote::RemoteError;

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
    /// `acks=all` on a partition with fewer replicas in sync than its topic's
    /// `min.insync.replicas`: the batch was not written.
    #[error(
        "partition {topic}/{partition} has {in_sync} replica(s) in sync, fewer than min.insync.replicas={required}; the batch was not written"
    )]
    NotEnoughReplicas {
        topic: String,
        partition: u32,
        in_sync: u32,
        required: u32,
    },
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
    /// An error raised by another broker (a forwarded proposal, a read asked of a partition's
    /// leader), kept as it was raised there: reason, definiteness and hints.
    #[error("{}", .0.message)]
    Remote(RemoteError),
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

    /// Rejects `value` of `field` when it is over `limit`; `unit` names what the numbers count
    /// ("ms", "bytes").
    pub fn at_most(
        field: &'static str,
        value: impl Into<u64>,
        limit: impl Into<u64>,
        unit: &str,
    ) -> Result<()> {
        let (value, limit) = (value.into(), limit.into());
        if value <= limit {
            return Ok(());
        }
        Err(Self::invalid(
            field,
            format!("{value} exceeds the limit of {limit} {unit}"),
        ))
    }

    /// The reason a client sees. This is the only mapping from broker errors to reasons; the
    /// gRPC code and the default definiteness follow from the reason.
    pub fn kind(&self) -> ErrorReason {
        match self {
            Self::InvalidArgument { .. } => ErrorReason::InvalidArgument,
            Self::InvalidConfig { .. } => ErrorReason::InvalidConfig,
            Self::UnknownTopic(_) => ErrorReason::UnknownTopic,
            Self::UnknownPartition { .. } => ErrorReason::UnknownPartition,
            Self::TopicExists(_) => ErrorReason::TopicExists,
            Self::OffsetOutOfRange { .. } => ErrorReason::OffsetOutOfRange,
            Self::NotLeader { .. } => ErrorReason::NotLeader,
            Self::TooLarge { .. } | Self::DecodeTooLarge { .. } => ErrorReason::MessageTooLarge,
            Self::CorruptBatch { .. } => ErrorReason::CorruptBatch,
            Self::OutOfOrderSequence { .. } => ErrorReason::OutOfOrderSequence,
            Self::ProducerFenced { .. } => ErrorReason::ProducerFenced,
            Self::NotCoordinator { .. } => ErrorReason::NotCoordinator,
            Self::UnknownMember(_) => ErrorReason::UnknownMember,
            Self::FencedMember(_) => ErrorReason::FencedMember,
            Self::InconsistentStrategy(_) => ErrorReason::InconsistentStrategy,
            Self::GroupNotEmpty { .. } => ErrorReason::GroupNotEmpty,
            Self::UnknownGroup(_) => ErrorReason::UnknownGroup,
            Self::OffsetBackwards(_) => ErrorReason::OffsetBackwards,
            Self::DiskFull(_) => ErrorReason::DiskFull,
            Self::NotEnoughReplicas { .. } => ErrorReason::NotEnoughReplicas,
            Self::Storage { .. } => ErrorReason::StorageError,
            Self::Timeout(_) => ErrorReason::Timeout,
            Self::ShuttingDown => ErrorReason::ShuttingDown,
            Self::Unavailable { .. } => ErrorReason::Unavailable,
            Self::Internal(_) => ErrorReason::Internal,
            Self::Remote(r) => r.reason,
            Self::AfterWrite(inner) => inner.kind(),
        }
    }

    /// The stable machine-readable reason (`keel-error`).
    pub fn reason(&self) -> &'static str {
        self.kind().as_str()
    }

    pub fn code(&self) -> Code {
        Code::from_i32(self.kind().grpc_code())
    }

    /// True when the request had no effect, so a retry cannot duplicate anything.
    pub fn is_definite(&self) -> bool {
        match self {
            Self::Storage { definite, .. } | Self::Unavailable { definite, .. } => *definite,
            Self::Remote(r) => r.definite,
            Self::AfterWrite(_) => false,
            other => other.kind().definite_by_default(),
        }
    }

    /// The leader (or coordinator) a client should go to instead: id and address.
    pub fn leader_hint(&self) -> Option<(u32, &str)> {
        match self {
            Self::NotLeader {
                leader: Some((id, addr)),
                ..
            }
            | Self::NotCoordinator {
                coordinator: Some((id, addr)),
                ..
            } => Some((*id, addr)),
            Self::Remote(r) => r.leader.as_ref().map(|(id, a)| (*id, a.as_str())),
            Self::AfterWrite(inner) => inner.leader_hint(),
            _ => None,
        }
    }

    /// The partition's valid offsets (log start, high watermark) of an `OFFSET_OUT_OF_RANGE`.
    pub fn offset_range(&self) -> Option<(u64, u64)> {
        match self {
            Self::OffsetOutOfRange {
                log_start,
                high_watermark,
                ..
            } => Some((*log_start, *high_watermark)),
            Self::Remote(r) => r.log_start_offset.zip(r.high_watermark),
            Self::AfterWrite(inner) => inner.offset_range(),
            _ => None,
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
        if let Some((id, addr)) = self.leader_hint() {
            insert(md, "keel-leader-id", &id.to_string());
            insert(md, "keel-leader-address", addr);
        }
        if let Some((log_start, high_watermark)) = self.offset_range() {
            insert(md, "keel-log-start-offset", &log_start.to_string());
            insert(md, "keel-high-watermark", &high_watermark.to_string());
        }
        status
    }

    /// The error as carried inside a stream message.
    pub fn to_proto(&self) -> keel_proto::v1::Error {
        // Stream errors carry only a partition leader's hint (`NOT_LEADER`), as documented.
        let (leader_id, leader_address) = match (self.kind(), self.leader_hint()) {
            (ErrorReason::NotLeader, Some((id, addr))) => (id, addr.to_owned()),
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
