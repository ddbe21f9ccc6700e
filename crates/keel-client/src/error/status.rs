//! Parsing a broker failure (a gRPC `Status`, or an error inside a `ProduceStream` answer) into a
//! [`ClientError`], by its `keel-*` metadata or, lacking those, its gRPC code.
//!
//! The broker puts a machine-readable reason in the `keel-error` metadata of every status and
//! says in `keel-definite` whether the request certainly had no effect. The reason, not the gRPC
//! code, decides the variant: several reasons share a code (`NOT_LEADER` and `SHUTTING_DOWN` are
//! both `UNAVAILABLE`). Statuses without a reason come from the transport or from a proxy and are
//! classified by code alone.

use std::error::Error as _;

use keel_types::ErrorReason;
use tonic::{Code, Status};

use super::{ClientError, LeaderHint};

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
            ErrorReason::NotEnoughReplicas => Self::NotEnoughReplicas { message, definite },
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
