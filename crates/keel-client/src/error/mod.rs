//! Client errors: the [`ClientError`] type and what it tells about a failed request (whether it
//! is retriable, whether it certainly had no effect, the broker's reason and hints).
//!
//! Broker failures are mapped to variants in `status.rs`; the unit tests are in `tests.rs`.

use std::fmt;

use keel_batch::BatchError;
use keel_types::ErrorReason;
use tonic::Code;

mod status;

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Where the broker says a partition's leader is, from a `NOT_LEADER` error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub id: u32,
    /// The leader's advertised address, when the broker knows it.
    pub address: Option<String>,
}

/// Everything that can go wrong in the client.
///
/// Variants that mirror a broker reason carry `definite`: `true` when the broker guarantees the
/// request had no effect (so a retry cannot duplicate anything), `false` when a write may have
/// happened anyway.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("invalid argument: {message}")]
    InvalidArgument { message: String, definite: bool },
    #[error("invalid topic config: {message}")]
    InvalidConfig { message: String, definite: bool },
    #[error("{message}")]
    UnknownTopic { message: String, definite: bool },
    #[error("{message}")]
    UnknownPartition { message: String, definite: bool },
    #[error("{message}")]
    TopicExists { message: String, definite: bool },
    #[error("{message}")]
    OffsetOutOfRange {
        message: String,
        log_start_offset: Option<u64>,
        high_watermark: Option<u64>,
        definite: bool,
    },
    #[error("{message}")]
    NotLeader {
        message: String,
        leader: Option<LeaderHint>,
        definite: bool,
    },
    #[error("{message}")]
    MessageTooLarge { message: String, definite: bool },
    #[error("{message}")]
    CorruptBatch { message: String, definite: bool },
    #[error("{message}")]
    DiskFull { message: String, definite: bool },
    /// `acks=all` on a partition with fewer replicas in sync than `min.insync.replicas`:
    /// nothing was written. Retried by the producer until its delivery timeout.
    #[error("{message}")]
    NotEnoughReplicas { message: String, definite: bool },
    /// An idempotent batch did not continue its producer's sequence on the partition (nothing
    /// was written). The producer retries it when an earlier batch of the partition is still
    /// unresolved; otherwise the batch fails and the producer starts a new epoch.
    #[error("{message}")]
    OutOfOrderSequence { message: String, definite: bool },
    /// A newer incarnation of this producer (same instance id) exists. Fatal for the producer.
    #[error("{message}")]
    ProducerFenced { message: String, definite: bool },
    #[error("{message}")]
    Storage { message: String, definite: bool },
    #[error("{message}")]
    Timeout { message: String, definite: bool },
    #[error("{message}")]
    ShuttingDown { message: String, definite: bool },
    #[error("broker internal error: {message}")]
    Internal { message: String, definite: bool },
    /// The broker could not be reached or the connection broke. `definite` is true only when the
    /// connection was never established, so the request was never sent.
    #[error("{message}")]
    Unavailable { message: String, definite: bool },
    /// A status this client has no variant for (e.g. `PERMISSION_DENIED`, or a reason string
    /// from a newer broker).
    #[error("{code:?}: {message}")]
    Status {
        code: Code,
        reason: Option<String>,
        message: String,
        definite: bool,
    },
    /// The broker answered with bytes that are not valid record batches (CRC mismatch, torn
    /// batch). Never surfaced as records.
    #[error("corrupt record data from {topic}/{partition}: {source}")]
    CorruptData {
        topic: String,
        partition: u32,
        #[source]
        source: BatchError,
    },
    /// The broker's answer broke the API contract (a missing field, a wrong count).
    #[error("unexpected response from the broker: {0}")]
    Protocol(String),
    /// The caller passed something this client rejects before contacting any broker.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("record of about {size} bytes exceeds the limit of {limit} bytes ({setting})")]
    RecordTooLarge {
        size: usize,
        limit: usize,
        setting: &'static str,
    },
    /// The producer gave up on a record after `delivery_timeout`.
    #[error("record not delivered within {elapsed_ms} ms{}", last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    DeliveryTimeout {
        elapsed_ms: u64,
        last_error: Option<Box<ClientError>>,
    },
    #[error("the producer is closed")]
    ProducerClosed,
    #[error("the group consumer is closed")]
    ConsumerClosed,
    /// A group call reached a broker that does not coordinate the group. Retried by the client
    /// (it asks `FindCoordinator` or follows `coordinator`); seen only when retries ran out.
    #[error("{message}")]
    NotCoordinator {
        message: String,
        coordinator: Option<LeaderHint>,
        definite: bool,
    },
    /// The coordinator does not know this group member (its session expired, or it left): the
    /// member has lost its partitions and must rejoin.
    #[error("{message}")]
    UnknownMember { message: String, definite: bool },
    /// A commit for a partition the member no longer owns, or a commit from outside the group
    /// protocol while the group has members.
    #[error("{message}")]
    FencedMember { message: String, definite: bool },
    /// Deleting a group or resetting its offsets while it has members.
    #[error("{message}")]
    GroupNotEmpty { message: String, definite: bool },
    #[error("{message}")]
    UnknownGroup { message: String, definite: bool },
    /// A member asked for another assignment strategy than the group uses.
    #[error("{message}")]
    InconsistentStrategy { message: String, definite: bool },
    /// A commit would move a committed offset backwards (only a reset may).
    #[error("{message}")]
    OffsetBackwards { message: String, definite: bool },
    /// A consumer has no position for a partition and `auto_offset_reset` is `None`.
    #[error("no valid offset for {topic}/{partition} and auto_offset_reset is none{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    NoOffset {
        topic: String,
        partition: u32,
        detail: Option<String>,
    },
}

impl ClientError {
    /// True for conditions that go away on their own: leadership moving, a broker restarting or
    /// unreachable, a replication timeout. The client retries these itself; seeing one means its
    /// retry budget ran out.
    pub fn is_retriable(&self) -> bool {
        match self.kind() {
            Some(reason) => reason.is_retriable(),
            // No broker verdict: a transport failure is transient, and so is a status a proxy
            // (or a newer broker's unknown reason) sends as UNAVAILABLE.
            None => {
                matches!(self, Self::Unavailable { .. })
                    || matches!(self, Self::Status { code, .. } if *code == Code::Unavailable)
            }
        }
    }

    /// True when a retry should come soon because the request waits for a leader or
    /// coordinator election (or an unreachable broker to be replaced).
    pub(crate) fn awaits_election(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
            || self.kind().is_some_and(ErrorReason::awaits_election)
    }

    /// True when the failed request certainly had no effect on the broker. Errors raised by the
    /// client before sending anything are definite; a delivery timeout is not (an earlier attempt
    /// may have been written).
    pub fn is_definite(&self) -> bool {
        match self {
            Self::InvalidArgument { definite, .. }
            | Self::InvalidConfig { definite, .. }
            | Self::UnknownTopic { definite, .. }
            | Self::UnknownPartition { definite, .. }
            | Self::TopicExists { definite, .. }
            | Self::OffsetOutOfRange { definite, .. }
            | Self::NotLeader { definite, .. }
            | Self::MessageTooLarge { definite, .. }
            | Self::CorruptBatch { definite, .. }
            | Self::DiskFull { definite, .. }
            | Self::NotEnoughReplicas { definite, .. }
            | Self::OutOfOrderSequence { definite, .. }
            | Self::ProducerFenced { definite, .. }
            | Self::Storage { definite, .. }
            | Self::Timeout { definite, .. }
            | Self::ShuttingDown { definite, .. }
            | Self::Internal { definite, .. }
            | Self::Unavailable { definite, .. }
            | Self::NotCoordinator { definite, .. }
            | Self::UnknownMember { definite, .. }
            | Self::FencedMember { definite, .. }
            | Self::GroupNotEmpty { definite, .. }
            | Self::UnknownGroup { definite, .. }
            | Self::InconsistentStrategy { definite, .. }
            | Self::OffsetBackwards { definite, .. }
            | Self::Status { definite, .. } => *definite,
            Self::DeliveryTimeout { .. } | Self::CorruptData { .. } | Self::Protocol(_) => false,
            Self::InvalidInput(_)
            | Self::RecordTooLarge { .. }
            | Self::ProducerClosed
            | Self::ConsumerClosed
            | Self::NoOffset { .. } => true,
        }
    }

    /// The same error, no longer claiming that nothing was written (an earlier attempt of the
    /// same request may have been).
    pub fn indefinite(self) -> Self {
        match self {
            Self::InvalidArgument { message, .. } => Self::InvalidArgument {
                message,
                definite: false,
            },
            Self::InvalidConfig { message, .. } => Self::InvalidConfig {
                message,
                definite: false,
            },
            Self::UnknownTopic { message, .. } => Self::UnknownTopic {
                message,
                definite: false,
            },
            Self::UnknownPartition { message, .. } => Self::UnknownPartition {
                message,
                definite: false,
            },
            Self::TopicExists { message, .. } => Self::TopicExists {
                message,
                definite: false,
            },
            Self::OffsetOutOfRange {
                message,
                log_start_offset,
                high_watermark,
                ..
            } => Self::OffsetOutOfRange {
                message,
                log_start_offset,
                high_watermark,
                definite: false,
            },
            Self::NotLeader {
                message, leader, ..
            } => Self::NotLeader {
                message,
                leader,
                definite: false,
            },
            Self::MessageTooLarge { message, .. } => Self::MessageTooLarge {
                message,
                definite: false,
            },
            Self::CorruptBatch { message, .. } => Self::CorruptBatch {
                message,
                definite: false,
            },
            Self::DiskFull { message, .. } => Self::DiskFull {
                message,
                definite: false,
            },
            Self::NotEnoughReplicas { message, .. } => Self::NotEnoughReplicas {
                message,
                definite: false,
            },
            Self::OutOfOrderSequence { message, .. } => Self::OutOfOrderSequence {
                message,
                definite: false,
            },
            Self::ProducerFenced { message, .. } => Self::ProducerFenced {
                message,
                definite: false,
            },
            Self::Storage { message, .. } => Self::Storage {
                message,
                definite: false,
            },
            Self::Timeout { message, .. } => Self::Timeout {
                message,
                definite: false,
            },
            Self::ShuttingDown { message, .. } => Self::ShuttingDown {
                message,
                definite: false,
            },
            Self::Internal { message, .. } => Self::Internal {
                message,
                definite: false,
            },
            Self::Unavailable { message, .. } => Self::Unavailable {
                message,
                definite: false,
            },
            Self::NotCoordinator {
                message,
                coordinator,
                ..
            } => Self::NotCoordinator {
                message,
                coordinator,
                definite: false,
            },
            Self::UnknownMember { message, .. } => Self::UnknownMember {
                message,
                definite: false,
            },
            Self::FencedMember { message, .. } => Self::FencedMember {
                message,
                definite: false,
            },
            Self::GroupNotEmpty { message, .. } => Self::GroupNotEmpty {
                message,
                definite: false,
            },
            Self::UnknownGroup { message, .. } => Self::UnknownGroup {
                message,
                definite: false,
            },
            Self::InconsistentStrategy { message, .. } => Self::InconsistentStrategy {
                message,
                definite: false,
            },
            Self::OffsetBackwards { message, .. } => Self::OffsetBackwards {
                message,
                definite: false,
            },
            Self::Status {
                code,
                reason,
                message,
                ..
            } => Self::Status {
                code,
                reason,
                message,
                definite: false,
            },
            other if other.is_definite() => Self::DeliveryTimeout {
                elapsed_ms: 0,
                last_error: Some(Box::new(other)),
            },
            other => other,
        }
    }

    /// The broker's reason, when the error came from a broker and this client knows the
    /// reason.
    pub fn kind(&self) -> Option<ErrorReason> {
        Some(match self {
            Self::InvalidArgument { .. } => ErrorReason::InvalidArgument,
            Self::InvalidConfig { .. } => ErrorReason::InvalidConfig,
            Self::UnknownTopic { .. } => ErrorReason::UnknownTopic,
            Self::UnknownPartition { .. } => ErrorReason::UnknownPartition,
            Self::TopicExists { .. } => ErrorReason::TopicExists,
            Self::OffsetOutOfRange { .. } => ErrorReason::OffsetOutOfRange,
            Self::NotLeader { .. } => ErrorReason::NotLeader,
            Self::MessageTooLarge { .. } => ErrorReason::MessageTooLarge,
            Self::CorruptBatch { .. } => ErrorReason::CorruptBatch,
            Self::DiskFull { .. } => ErrorReason::DiskFull,
            Self::NotEnoughReplicas { .. } => ErrorReason::NotEnoughReplicas,
            Self::OutOfOrderSequence { .. } => ErrorReason::OutOfOrderSequence,
            Self::ProducerFenced { .. } => ErrorReason::ProducerFenced,
            Self::Storage { .. } => ErrorReason::StorageError,
            Self::Timeout { .. } => ErrorReason::Timeout,
            Self::ShuttingDown { .. } => ErrorReason::ShuttingDown,
            Self::Internal { .. } => ErrorReason::Internal,
            Self::NotCoordinator { .. } => ErrorReason::NotCoordinator,
            Self::UnknownMember { .. } => ErrorReason::UnknownMember,
            Self::FencedMember { .. } => ErrorReason::FencedMember,
            Self::GroupNotEmpty { .. } => ErrorReason::GroupNotEmpty,
            Self::UnknownGroup { .. } => ErrorReason::UnknownGroup,
            Self::InconsistentStrategy { .. } => ErrorReason::InconsistentStrategy,
            Self::OffsetBackwards { .. } => ErrorReason::OffsetBackwards,
            Self::Status {
                reason: Some(r), ..
            } => return ErrorReason::parse(r),
            _ => return None,
        })
    }

    /// The broker's reason string, when the error came from a broker (also one this client
    /// does not know).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Status { reason, .. } => reason.as_deref(),
            other => other.kind().map(ErrorReason::as_str),
        }
    }

    /// The leader named by a `NOT_LEADER` error.
    pub fn leader_hint(&self) -> Option<&LeaderHint> {
        match self {
            Self::NotLeader { leader, .. } => leader.as_ref(),
            _ => None,
        }
    }

    /// The coordinator named by a `NOT_COORDINATOR` error.
    pub fn coordinator_hint(&self) -> Option<&LeaderHint> {
        match self {
            Self::NotCoordinator { coordinator, .. } => coordinator.as_ref(),
            _ => None,
        }
    }

    /// True when a group member has lost its membership or some of its partitions
    /// (`UNKNOWN_MEMBER`, `FENCED_MEMBER`): what it consumed since its last commit will be
    /// consumed again by whichever member gets those partitions.
    pub fn is_membership_lost(&self) -> bool {
        matches!(self, Self::UnknownMember { .. } | Self::FencedMember { .. })
    }

    /// True when cached routing may be wrong: the client refreshes metadata before retrying.
    pub(crate) fn invalidates_metadata(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. }
                | Self::ShuttingDown { .. }
                | Self::Unavailable { .. }
                | Self::UnknownTopic { .. }
                | Self::UnknownPartition { .. }
        ) || matches!(self, Self::Status { code, .. } if *code == Code::Unavailable)
    }

    pub(crate) fn timeout(message: impl Into<String>) -> Self {
        Self::Timeout {
            message: message.into(),
            definite: false,
        }
    }
}

/// A partition named in messages.
pub(crate) struct Tp<'a>(pub &'a str, pub u32);

impl fmt::Display for Tp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

#[cfg(test)]
mod tests;
