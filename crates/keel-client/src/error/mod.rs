//! Client errors, mapped from the broker's gRPC statuses.
//!
//! The broker puts a machine-readable reason in the `keel-error` metadata of every status and
//! says in `keel-definite` whether the request certainly had no effect. The reason, not the gRPC
//! code, decides the variant: several reasons share a code (`NOT_LEADER` and `SHUTTING_DOWN` are
//! both `UNAVAILABLE`). Statuses without a reason come from the transport or from a proxy and are
//! classified by code alone.

use std::error::Error as _;
use std::fmt;

use keel_batch::BatchError;
use keel_types::ErrorReason;
use tonic::{Code, Status};

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

/// What a broker error says, independent of whether it came as a `Status` or inside a stream
/// message.
struct Parts<'a> {
    code: Code,
    reason: Option<&'a str>,
    message: String,
    definite: bool,
    leader: Option<LeaderHint>,
    log_start_offset: Option<u64>,
    high_watermark: Option<u64>,
}

impl ClientError {
    /// Maps a status returned by a call to the broker at `addr` (named in transport errors so
    /// that "connection refused" says which broker refused).
    pub fn from_status_at(status: &Status, addr: &str) -> Self {
        let e = Self::from_status(status);
        match e {
            Self::Unavailable { message, definite } if status_reason(status).is_none() => {
                Self::Unavailable {
                    message: format!("broker {addr} unavailable: {message}"),
                    definite,
                }
            }
            other => other,
        }
    }

    /// Maps a status by its `keel-*` metadata, falling back to its code.
    pub fn from_status(status: &Status) -> Self {
        let md = status.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok());
        let reason = status_reason(status);
        let message = status.message().to_owned();
        if reason.is_none()
            && let Some(e) = transport_error(status)
        {
            return e;
        }
        let definite = match get("keel-definite") {
            Some("true") => true,
            Some(_) => false,
            // Without the broker's word, only rejections that happen before the request is
            // processed at all are safe to call definite.
            None => reason.map_or_else(|| code_is_definite(status.code()), reason_is_definite),
        };
        let leader = get("keel-leader-id")
            .and_then(|s| s.parse().ok())
            .filter(|&id| id != 0)
            .map(|id| LeaderHint {
                id,
                address: get("keel-leader-address")
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned),
            });
        Self::from_parts(Parts {
            code: status.code(),
            reason,
            message,
            definite,
            leader,
            log_start_offset: get("keel-log-start-offset").and_then(|s| s.parse().ok()),
            high_watermark: get("keel-high-watermark").and_then(|s| s.parse().ok()),
        })
    }

    /// Maps an error carried inside a `ProduceStream` response.
    pub fn from_proto(e: &keel_proto::v1::Error) -> Self {
        let reason = (!e.reason.is_empty()).then_some(e.reason.as_str());
        let code = Code::from_i32(e.code);
        Self::from_parts(Parts {
            code,
            reason,
            message: e.message.clone(),
            // proto3 has no "unset" for bools: a broker that predates the field reads as
            // "may have been written", the safe side.
            definite: e.definite,
            leader: (e.leader_id != 0).then(|| LeaderHint {
                id: e.leader_id,
                address: (!e.leader_address.is_empty()).then(|| e.leader_address.clone()),
            }),
            log_start_offset: None,
            high_watermark: None,
        })
    }

    fn from_parts(p: Parts<'_>) -> Self {
        let Parts {
            code,
            reason,
            message,
            definite,
            leader,
            log_start_offset,
            high_watermark,
        } = p;
        let known = match reason {
            Some(r) => match ErrorReason::parse(r) {
                Some(known) => known,
                // A reason from a newer broker: kept as a string, classified by its code.
                None => {
                    return Self::Status {
                        code,
                        reason: Some(r.to_owned()),
                        message,
                        definite,
                    };
                }
            },
            None => {
                return match code {
                    Code::InvalidArgument => Self::InvalidArgument { message, definite },
                    Code::Unavailable => Self::Unavailable { message, definite },
                    Code::DeadlineExceeded => Self::Timeout { message, definite },
                    // Without Keel's reason, OUT_OF_RANGE is gRPC's message size limit, not an
                    // offset.
                    Code::OutOfRange => Self::MessageTooLarge { message, definite },
                    _ => Self::Status {
                        code,
                        reason: None,
                        message,
                        definite,
                    },
                };
            }
        };
        match known {
            ErrorReason::InvalidArgument => Self::InvalidArgument { message, definite },
            ErrorReason::InvalidConfig => Self::InvalidConfig { message, definite },
            ErrorReason::UnknownTopic => Self::UnknownTopic { message, definite },
            ErrorReason::UnknownPartition => Self::UnknownPartition { message, definite },
            ErrorReason::TopicExists => Self::TopicExists { message, definite },
            ErrorReason::OffsetOutOfRange => Self::OffsetOutOfRange {
                message,
                log_start_offset,
                high_watermark,
                definite,
            },
            ErrorReason::NotLeader => Self::NotLeader {
                message,
                leader,
                definite,
            },
            ErrorReason::MessageTooLarge => Self::MessageTooLarge { message, definite },
            ErrorReason::CorruptBatch => Self::CorruptBatch { message, definite },
            ErrorReason::DiskFull => Self::DiskFull { message, definite },
            ErrorReason::OutOfOrderSequence => Self::OutOfOrderSequence { message, definite },
            ErrorReason::ProducerFenced => Self::ProducerFenced { message, definite },
            ErrorReason::StorageError => Self::Storage { message, definite },
            ErrorReason::Timeout => Self::Timeout { message, definite },
            ErrorReason::ShuttingDown => Self::ShuttingDown { message, definite },
            ErrorReason::Internal => Self::Internal { message, definite },
            ErrorReason::NotCoordinator => Self::NotCoordinator {
                message,
                coordinator: leader,
                definite,
            },
            ErrorReason::UnknownMember => Self::UnknownMember { message, definite },
            ErrorReason::FencedMember => Self::FencedMember { message, definite },
            ErrorReason::GroupNotEmpty => Self::GroupNotEmpty { message, definite },
            ErrorReason::UnknownGroup => Self::UnknownGroup { message, definite },
            ErrorReason::InconsistentStrategy => Self::InconsistentStrategy { message, definite },
            ErrorReason::OffsetBackwards => Self::OffsetBackwards { message, definite },
            // The `Unavailable` variant stands for "no broker verdict" (a transport failure,
            // `reason()` is `None`); the broker's own UNAVAILABLE keeps its reason.
            ErrorReason::Unavailable => Self::Status {
                code,
                reason: Some(known.as_str().to_owned()),
                message,
                definite,
            },
        }
    }

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

fn status_reason(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get("keel-error")
        .and_then(|v| v.to_str().ok())
        .filter(|r| !r.is_empty())
}

/// Statuses that the broker sends are parsed from trailers and have no source; statuses tonic
/// builds from a local IO, HTTP/2 or connect error keep it. A broken connection therefore shows
/// up as `UNKNOWN` or `INTERNAL` with a source, which is a transport failure, not a broker
/// verdict.
fn transport_error(status: &Status) -> Option<ClientError> {
    let mut source = status.source();
    if source.is_none() && status.code() != Code::Unavailable {
        return None;
    }
    let mut never_connected = false;
    while let Some(e) = source {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            never_connected = true;
            break;
        }
        source = e.source();
    }
    Some(ClientError::Unavailable {
        message: describe_status(status),
        definite: never_connected,
    })
}

/// The status message plus the innermost cause, which is where "connection refused" lives.
fn describe_status(status: &Status) -> String {
    let mut root: Option<&dyn std::error::Error> = None;
    let mut source = status.source();
    while let Some(e) = source {
        root = Some(e);
        source = e.source();
    }
    match root.map(ToString::to_string) {
        Some(cause) if !status.message().contains(&cause) && !cause.is_empty() => {
            format!("{} ({cause})", status.message())
        }
        _ => status.message().to_owned(),
    }
}

/// The broker's own rule (`ErrorReason::definite_by_default`) for when it omits the flag; a
/// reason this client does not know is not definite.
fn reason_is_definite(reason: &str) -> bool {
    ErrorReason::parse(reason).is_some_and(ErrorReason::definite_by_default)
}

fn code_is_definite(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::Unimplemented
    )
}

/// A partition named in messages.
pub(crate) struct Tp<'a>(pub &'a str, pub u32);

impl fmt::Display for Tp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    fn status(code: Code, md: &[(&'static str, &'static str)]) -> Status {
        let mut s = Status::new(code, "msg");
        for (k, v) in md {
            s.metadata_mut().insert(*k, MetadataValue::from_static(v));
        }
        s
    }

    #[test]
    fn not_leader_with_hint() {
        let s = status(
            Code::Unavailable,
            &[
                ("keel-error", "NOT_LEADER"),
                ("keel-definite", "true"),
                ("keel-leader-id", "2"),
                ("keel-leader-address", "127.0.0.1:9293"),
            ],
        );
        let e = ClientError::from_status(&s);
        assert!(matches!(e, ClientError::NotLeader { .. }));
        assert!(e.is_retriable());
        assert!(e.is_definite());
        assert!(e.invalidates_metadata());
        assert_eq!(
            e.leader_hint(),
            Some(&LeaderHint {
                id: 2,
                address: Some("127.0.0.1:9293".into())
            })
        );
        assert_eq!(e.reason(), Some("NOT_LEADER"));
    }

    #[test]
    fn group_reasons() {
        let e = ClientError::from_status(&status(
            Code::Unavailable,
            &[
                ("keel-error", "NOT_COORDINATOR"),
                ("keel-definite", "true"),
                ("keel-leader-id", "3"),
                ("keel-leader-address", "127.0.0.1:9294"),
            ],
        ));
        assert!(matches!(e, ClientError::NotCoordinator { .. }), "{e:?}");
        assert!(e.is_retriable());
        assert!(e.is_definite());
        // Not a partition's leader: the partition routing cache must not take it.
        assert_eq!(e.leader_hint(), None);
        assert!(!e.invalidates_metadata());
        assert_eq!(
            e.coordinator_hint(),
            Some(&LeaderHint {
                id: 3,
                address: Some("127.0.0.1:9294".into())
            })
        );
        for (reason, code) in [
            ("UNKNOWN_MEMBER", Code::FailedPrecondition),
            ("FENCED_MEMBER", Code::FailedPrecondition),
        ] {
            let e = ClientError::from_status(&status(code, &[("keel-error", reason)]));
            assert!(e.is_membership_lost(), "{e:?}");
            assert!(!e.is_retriable());
            assert!(e.is_definite());
        }
        let e =
            ClientError::from_status(&status(Code::NotFound, &[("keel-error", "UNKNOWN_GROUP")]));
        assert!(matches!(
            e,
            ClientError::UnknownGroup { definite: true, .. }
        ));
        assert!(!e.is_membership_lost());
        let e = ClientError::from_status(&status(
            Code::FailedPrecondition,
            &[
                ("keel-error", "OFFSET_BACKWARDS"),
                ("keel-definite", "true"),
            ],
        ))
        .indefinite();
        assert!(matches!(
            e,
            ClientError::OffsetBackwards {
                definite: false,
                ..
            }
        ));
    }

    #[test]
    fn reason_beats_code() {
        // SHUTTING_DOWN and NOT_LEADER share UNAVAILABLE; the reason decides.
        let e = ClientError::from_status(&status(
            Code::Unavailable,
            &[("keel-error", "SHUTTING_DOWN"), ("keel-definite", "true")],
        ));
        assert!(matches!(
            e,
            ClientError::ShuttingDown { definite: true, .. }
        ));
        assert!(e.is_retriable());
        let e = ClientError::from_status(&status(
            Code::ResourceExhausted,
            &[("keel-error", "DISK_FULL"), ("keel-definite", "true")],
        ));
        assert!(matches!(e, ClientError::DiskFull { .. }));
        assert!(!e.is_retriable());
        let e = ClientError::from_status(&status(
            Code::ResourceExhausted,
            &[
                ("keel-error", "MESSAGE_TOO_LARGE"),
                ("keel-definite", "true"),
            ],
        ));
        assert!(matches!(e, ClientError::MessageTooLarge { .. }));
    }

    #[test]
    fn out_of_range_bounds() {
        let e = ClientError::from_status(&status(
            Code::OutOfRange,
            &[
                ("keel-error", "OFFSET_OUT_OF_RANGE"),
                ("keel-definite", "true"),
                ("keel-log-start-offset", "5"),
                ("keel-high-watermark", "10"),
            ],
        ));
        match e {
            ClientError::OffsetOutOfRange {
                log_start_offset,
                high_watermark,
                ..
            } => {
                assert_eq!(log_start_offset, Some(5));
                assert_eq!(high_watermark, Some(10));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn definite_flag_is_kept() {
        let e = ClientError::from_status(&status(
            Code::DeadlineExceeded,
            &[("keel-error", "TIMEOUT"), ("keel-definite", "false")],
        ));
        assert!(matches!(
            e,
            ClientError::Timeout {
                definite: false,
                ..
            }
        ));
        assert!(e.is_retriable());
        assert!(!e.is_definite());
        let e = ClientError::from_status(&status(
            Code::Internal,
            &[("keel-error", "STORAGE_ERROR"), ("keel-definite", "true")],
        ));
        assert!(e.is_definite());
        // Missing flag: the broker's own rule.
        let e = ClientError::from_status(&status(Code::Internal, &[("keel-error", "INTERNAL")]));
        assert!(!e.is_definite());
        let e =
            ClientError::from_status(&status(Code::NotFound, &[("keel-error", "UNKNOWN_TOPIC")]));
        assert!(matches!(
            e,
            ClientError::UnknownTopic { definite: true, .. }
        ));
        assert!(!e.is_retriable());
    }

    #[test]
    fn every_reason_maps_to_its_variant() {
        for r in ErrorReason::ALL {
            let s = {
                let mut s = Status::new(Code::Unknown, "m");
                s.metadata_mut()
                    .insert("keel-error", MetadataValue::from_static(r.as_str()));
                s
            };
            let e = ClientError::from_status(&s);
            assert_eq!(e.reason(), Some(r.as_str()), "{e:?}");
            assert_eq!(e.kind(), Some(r), "{e:?}");
            assert_eq!(e.is_retriable(), r.is_retriable(), "{r}");
            // The broker's UNAVAILABLE has no variant of its own (see `from_parts`).
            assert!(
                !matches!(e, ClientError::Status { .. }) || r == ErrorReason::Unavailable,
                "{r}"
            );
        }
        let e = ClientError::from_status(&status(Code::Aborted, &[("keel-error", "NEW_THING")]));
        assert_eq!(e.reason(), Some("NEW_THING"));
        assert!(!e.is_definite());
    }

    #[test]
    fn statuses_without_reason_use_the_code() {
        let e = ClientError::from_status_at(&Status::unavailable("tcp connect error"), "h:1");
        assert!(matches!(e, ClientError::Unavailable { .. }));
        assert!(e.is_retriable());
        assert!(e.to_string().contains("h:1"), "{e}");
        let e = ClientError::from_status(&Status::invalid_argument("bad"));
        assert!(matches!(
            e,
            ClientError::InvalidArgument { definite: true, .. }
        ));
        let e = ClientError::from_status(&Status::deadline_exceeded("slow"));
        assert!(matches!(
            e,
            ClientError::Timeout {
                definite: false,
                ..
            }
        ));
        let e = ClientError::from_status(&Status::out_of_range(
            "Error, decoded message length too large: found 17825829 bytes",
        ));
        assert!(
            matches!(e, ClientError::MessageTooLarge { definite: true, .. }),
            "{e:?}"
        );
        let e = ClientError::from_status(&Status::permission_denied("no"));
        assert!(matches!(
            e,
            ClientError::Status {
                code: Code::PermissionDenied,
                ..
            }
        ));
        assert!(!e.is_retriable());
        // A local transport failure (status with a source) is a broken connection.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let s = Status::from_error(Box::new(io));
        let e = ClientError::from_status(&s);
        assert!(e.is_retriable(), "{e:?}");
        assert!(!e.is_definite());
        // A refused connection never sent the request.
        let s = Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        ))));
        let e = ClientError::from_status_at(&s, "10.0.0.1:9292");
        assert!(
            matches!(e, ClientError::Unavailable { definite: true, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("10.0.0.1:9292"));
    }

    #[test]
    fn stream_errors() {
        let e = ClientError::from_proto(&keel_proto::v1::Error {
            code: Code::Unavailable as i32,
            reason: "NOT_LEADER".into(),
            message: "not leader".into(),
            leader_id: 3,
            leader_address: "h:3".into(),
            definite: true,
        });
        assert_eq!(e.leader_hint().map(|h| h.id), Some(3));
        assert!(e.is_definite());
        let e = ClientError::from_proto(&keel_proto::v1::Error {
            code: Code::DeadlineExceeded as i32,
            reason: "TIMEOUT".into(),
            message: "slow".into(),
            leader_id: 0,
            leader_address: String::new(),
            definite: false,
        });
        assert!(!e.is_definite());
        assert!(e.is_retriable());
    }
}
