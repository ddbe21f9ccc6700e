//! Errors that cross from one broker to another (a forwarded metadata proposal, a read asked of
//! a partition's leader) keep their type: the reason, definiteness and hints a client would have
//! seen from the broker that raised them, not a string.

use keel_types::ErrorReason;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tonic::Status;

use super::BrokerError;

/// A broker error as another broker raised it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    #[serde(serialize_with = "reason_str", deserialize_with = "reason_parse")]
    pub reason: ErrorReason,
    pub message: String,
    pub definite: bool,
    /// `NOT_LEADER` / `NOT_COORDINATOR`: the broker to go to instead (id, client address).
    #[serde(default)]
    pub leader: Option<(u32, String)>,
    /// `OFFSET_OUT_OF_RANGE`: the partition's valid range.
    #[serde(default)]
    pub log_start_offset: Option<u64>,
    #[serde(default)]
    pub high_watermark: Option<u64>,
}

// The reason travels as its `keel-error` string, the same stable form clients see.
fn reason_str<S: Serializer>(r: &ErrorReason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

// A reason only a newer broker knows is still an error whose outcome this one cannot judge.
fn reason_parse<'de, D: Deserializer<'de>>(d: D) -> Result<ErrorReason, D::Error> {
    let s = String::deserialize(d)?;
    Ok(ErrorReason::parse(&s).unwrap_or(ErrorReason::Internal))
}

impl From<&BrokerError> for RemoteError {
    fn from(e: &BrokerError) -> Self {
        let range = e.offset_range();
        Self {
            reason: e.kind(),
            message: e.to_string(),
            definite: e.is_definite(),
            leader: e.leader_hint().map(|(id, a)| (id, a.to_owned())),
            log_start_offset: range.map(|r| r.0),
            high_watermark: range.map(|r| r.1),
        }
    }
}

impl From<BrokerError> for RemoteError {
    fn from(e: BrokerError) -> Self {
        Self::from(&e)
    }
}

impl From<RemoteError> for BrokerError {
    fn from(e: RemoteError) -> Self {
        Self::Remote(e)
    }
}

impl BrokerError {
    /// Maps the status of a read (list offsets, list groups) that this broker asked of another
    /// one. A Keel answer keeps its reason and hints; a status without `keel-error` is the peer
    /// being unreachable, which is worth retrying and changed nothing.
    pub fn from_peer_read(status: &Status, context: &str) -> Self {
        let md = status.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok());
        match get("keel-error").and_then(ErrorReason::parse) {
            Some(reason) => Self::Remote(RemoteError {
                reason,
                message: status.message().to_owned(),
                definite: get("keel-definite")
                    .map_or_else(|| reason.definite_by_default(), |d| d == "true"),
                leader: get("keel-leader-id")
                    .and_then(|id| id.parse().ok())
                    .zip(get("keel-leader-address").map(str::to_owned)),
                log_start_offset: get("keel-log-start-offset").and_then(|o| o.parse().ok()),
                high_watermark: get("keel-high-watermark").and_then(|o| o.parse().ok()),
            }),
            None => Self::Unavailable {
                message: format!("{context}: {}", status.message()),
                definite: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> Vec<BrokerError> {
        vec![
            BrokerError::TopicExists("t".into()),
            BrokerError::NotLeader {
                topic: "t".into(),
                partition: 0,
                leader: Some((2, "h:2".into())),
            },
            BrokerError::NotCoordinator {
                group: "g".into(),
                coordinator: Some((3, "h:3".into())),
            },
            BrokerError::OffsetOutOfRange {
                topic: "t".into(),
                partition: 1,
                offset: 99,
                log_start: 5,
                high_watermark: 10,
            },
            BrokerError::ProducerFenced {
                producer_id: 7,
                epoch: 1,
                current: 2,
            },
            BrokerError::Unavailable {
                message: "no leader".into(),
                definite: false,
            },
            BrokerError::DiskFull("no space".into()).after_write(),
            BrokerError::Timeout(5),
        ]
    }

    /// What a client sees of an error: its status, metadata included.
    fn seen(e: &BrokerError) -> (tonic::Code, String, Vec<(String, String)>) {
        let s = e.to_status();
        let mut md: Vec<(String, String)> = s
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.to_string(), v.to_str().ok()?.to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        md.sort();
        (s.code(), s.message().to_owned(), md)
    }

    #[test]
    fn forwarded_errors_keep_reason_definiteness_and_hints() {
        for e in examples() {
            let wire = serde_json::to_vec(&RemoteError::from(&e)).expect("serialize");
            let back: RemoteError = serde_json::from_slice(&wire).expect("deserialize");
            let back = BrokerError::from(back);
            assert_eq!(back.kind(), e.kind(), "{e}");
            assert_eq!(back.is_definite(), e.is_definite(), "{e}");
            assert_eq!(seen(&back), seen(&e), "{e}");
        }
    }

    #[test]
    fn peer_statuses_keep_their_reason() {
        for e in examples() {
            let back = BrokerError::from_peer_read(&e.to_status(), "asking a peer");
            assert_eq!(seen(&back), seen(&e), "{e}");
        }
        let e = BrokerError::from_peer_read(&Status::unavailable("refused"), "asking h:1");
        assert_eq!(e.kind(), ErrorReason::Unavailable);
        assert!(e.to_string().contains("asking h:1: refused"), "{e}");
    }

    #[test]
    fn a_reason_from_a_newer_broker_is_internal() {
        let wire = br#"{"reason":"NEW_THING","message":"m","definite":false}"#;
        let e: RemoteError = serde_json::from_slice(wire).expect("deserialize");
        assert_eq!(e.reason, ErrorReason::Internal);
    }
}
