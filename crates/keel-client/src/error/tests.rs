//! Unit tests of the error mapping.

use tonic::Status;
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
    let e = ClientError::from_status(&status(Code::NotFound, &[("keel-error", "UNKNOWN_GROUP")]));
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
    let e = ClientError::from_status(&status(Code::NotFound, &[("keel-error", "UNKNOWN_TOPIC")]));
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
