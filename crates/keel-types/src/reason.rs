//! The reasons a client sees in the `keel-error` metadata of a failed call (and in
//! `Error.reason` of a stream message), defined once for the broker that raises them and the
//! clients that branch on them. `docs/api.md` (section 2.2) documents each one; the strings are
//! a stable wire contract with clients in other languages.

use std::fmt;
use std::str::FromStr;

/// A stable, machine-readable reason for a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    InvalidArgument,
    InvalidConfig,
    CorruptBatch,
    UnknownTopic,
    UnknownPartition,
    TopicExists,
    OffsetOutOfRange,
    NotLeader,
    Unavailable,
    NotEnoughReplicas,
    MessageTooLarge,
    OutOfOrderSequence,
    ProducerFenced,
    NotCoordinator,
    UnknownMember,
    FencedMember,
    InconsistentStrategy,
    GroupNotEmpty,
    UnknownGroup,
    OffsetBackwards,
    DiskFull,
    StorageError,
    Timeout,
    ShuttingDown,
    Internal,
}

/// gRPC status codes (`google.rpc.Code`) as numbers: this crate has no gRPC dependency, and the
/// numbers are what the wire and `docs/api.md` use.
mod code {
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const ALREADY_EXISTS: i32 = 6;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

impl ErrorReason {
    /// Every reason, in the order of `docs/api.md`'s table.
    pub const ALL: [Self; 25] = [
        Self::InvalidArgument,
        Self::InvalidConfig,
        Self::CorruptBatch,
        Self::UnknownTopic,
        Self::UnknownPartition,
        Self::TopicExists,
        Self::OffsetOutOfRange,
        Self::NotLeader,
        Self::Unavailable,
        Self::NotEnoughReplicas,
        Self::MessageTooLarge,
        Self::OutOfOrderSequence,
        Self::ProducerFenced,
        Self::NotCoordinator,
        Self::UnknownMember,
        Self::FencedMember,
        Self::InconsistentStrategy,
        Self::GroupNotEmpty,
        Self::UnknownGroup,
        Self::OffsetBackwards,
        Self::DiskFull,
        Self::StorageError,
        Self::Timeout,
        Self::ShuttingDown,
        Self::Internal,
    ];

    /// The `keel-error` string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::InvalidConfig => "INVALID_CONFIG",
            Self::CorruptBatch => "CORRUPT_BATCH",
            Self::UnknownTopic => "UNKNOWN_TOPIC",
            Self::UnknownPartition => "UNKNOWN_PARTITION",
            Self::TopicExists => "TOPIC_EXISTS",
            Self::OffsetOutOfRange => "OFFSET_OUT_OF_RANGE",
            Self::NotLeader => "NOT_LEADER",
            Self::NotEnoughReplicas => "NOT_ENOUGH_REPLICAS",
            Self::Unavailable => "UNAVAILABLE",
            Self::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Self::OutOfOrderSequence => "OUT_OF_ORDER_SEQUENCE",
            Self::ProducerFenced => "PRODUCER_FENCED",
            Self::NotCoordinator => "NOT_COORDINATOR",
            Self::UnknownMember => "UNKNOWN_MEMBER",
            Self::FencedMember => "FENCED_MEMBER",
            Self::InconsistentStrategy => "INCONSISTENT_STRATEGY",
            Self::GroupNotEmpty => "GROUP_NOT_EMPTY",
            Self::UnknownGroup => "UNKNOWN_GROUP",
            Self::OffsetBackwards => "OFFSET_BACKWARDS",
            Self::DiskFull => "DISK_FULL",
            Self::StorageError => "STORAGE_ERROR",
            Self::Timeout => "TIMEOUT",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::Internal => "INTERNAL",
        }
    }

    /// The reason named by a `keel-error` string; `None` for a string this build does not know
    /// (a newer broker may add reasons).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The gRPC status code (`google.rpc.Code` number) the broker sends with this reason.
    /// Several reasons share a code, which is why clients branch on the reason.
    pub const fn grpc_code(self) -> i32 {
        match self {
            Self::InvalidArgument | Self::InvalidConfig | Self::CorruptBatch => {
                code::INVALID_ARGUMENT
            }
            Self::UnknownTopic | Self::UnknownPartition | Self::UnknownGroup => code::NOT_FOUND,
            Self::TopicExists => code::ALREADY_EXISTS,
            Self::OffsetOutOfRange => code::OUT_OF_RANGE,
            Self::OutOfOrderSequence
            | Self::ProducerFenced
            | Self::UnknownMember
            | Self::FencedMember
            | Self::InconsistentStrategy
            | Self::GroupNotEmpty
            | Self::OffsetBackwards => code::FAILED_PRECONDITION,
            Self::NotLeader
            | Self::NotCoordinator
            | Self::ShuttingDown
            | Self::Unavailable
            | Self::NotEnoughReplicas => code::UNAVAILABLE,
            Self::MessageTooLarge | Self::DiskFull => code::RESOURCE_EXHAUSTED,
            Self::Timeout => code::DEADLINE_EXCEEDED,
            Self::StorageError | Self::Internal => code::INTERNAL,
        }
    }

    /// True for conditions that go away on their own (leadership moving, a broker restarting
    /// or unreachable, a replication timeout), so a client retries them itself. A full disk
    /// needs an operator and is left to the caller.
    pub const fn is_retriable(self) -> bool {
        matches!(
            self,
            Self::NotLeader
                | Self::NotCoordinator
                | Self::ShuttingDown
                | Self::Unavailable
                | Self::Timeout
                | Self::NotEnoughReplicas
        )
    }

    /// True when the retry should come soon: the request is waiting for a leader (or
    /// coordinator) election, which takes about a second, so backing off to a long maximum would
    /// add most of that again after the new leader is up.
    pub const fn awaits_election(self) -> bool {
        matches!(
            self,
            Self::NotLeader | Self::NotCoordinator | Self::Unavailable
        )
    }

    /// Whether the request certainly had no effect, when an error does not say (`keel-definite`
    /// missing): only reasons that can follow a write, or whose outcome is unknown, are not.
    pub const fn definite_by_default(self) -> bool {
        !matches!(
            self,
            Self::Timeout | Self::StorageError | Self::Internal | Self::Unavailable
        )
    }
}

impl fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `keel-error` string this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown keel-error reason {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for ErrorReason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for r in ErrorReason::ALL {
            assert!(seen.insert(r.as_str()), "{r} twice");
            assert_eq!(ErrorReason::parse(r.as_str()), Some(r));
            assert_eq!(r.as_str().parse::<ErrorReason>(), Ok(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(ErrorReason::parse("NEW_THING"), None);
        assert!("".parse::<ErrorReason>().is_err());
    }

    #[test]
    fn retriable_reasons_are_the_transient_ones() {
        let retriable: Vec<_> = ErrorReason::ALL
            .into_iter()
            .filter(|r| r.is_retriable())
            .collect();
        assert_eq!(
            retriable,
            [
                ErrorReason::NotLeader,
                ErrorReason::Unavailable,
                ErrorReason::NotEnoughReplicas,
                ErrorReason::NotCoordinator,
                ErrorReason::Timeout,
                ErrorReason::ShuttingDown,
            ]
        );
        // Waiting for an election is a special case of retriable.
        for r in ErrorReason::ALL {
            assert!(!r.awaits_election() || r.is_retriable(), "{r}");
        }
        assert!(!ErrorReason::DiskFull.is_retriable());
    }

    #[test]
    fn codes_match_the_documented_table() {
        assert_eq!(ErrorReason::NotLeader.grpc_code(), 14);
        assert_eq!(ErrorReason::DiskFull.grpc_code(), 8);
        assert_eq!(ErrorReason::OffsetOutOfRange.grpc_code(), 11);
        assert_eq!(ErrorReason::StorageError.grpc_code(), 13);
        assert_eq!(ErrorReason::Timeout.grpc_code(), 4);
        assert!(!ErrorReason::Timeout.definite_by_default());
        assert!(ErrorReason::DiskFull.definite_by_default());
    }
}
