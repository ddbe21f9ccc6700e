//! Validating an InitProducer request, without IO: the producer's identity and the id and
//! epoch it asks to bump.

use keel_proto::v1::InitProducerRequest;

use crate::error::{BrokerError, Result};

/// Longest accepted `instance_id`.
pub const MAX_INSTANCE_ID: usize = 255;

/// What an InitProducer request asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitProducer {
    /// The stable identity whose previous incarnations are fenced; `None` for a fresh id.
    pub instance: Option<String>,
    /// The current id and epoch of a producer starting over.
    pub bump: Option<(i64, i16)>,
    pub request_id: u64,
}

/// Checks the identity (length, no control characters) and the id and epoch to bump.
pub fn check_init_producer(req: InitProducerRequest) -> Result<InitProducer> {
    if req.instance_id.len() > MAX_INSTANCE_ID {
        return Err(BrokerError::invalid(
            "instance_id",
            format!(
                "{} bytes exceed the limit of {MAX_INSTANCE_ID}",
                req.instance_id.len()
            ),
        ));
    }
    if req.instance_id.chars().any(char::is_control) {
        return Err(BrokerError::invalid(
            "instance_id",
            "control characters are not allowed",
        ));
    }
    let bump = match req.producer_id {
        None => None,
        Some(id) => {
            let epoch = i16::try_from(req.producer_epoch)
                .ok()
                .filter(|e| *e >= 0)
                .ok_or_else(|| {
                    BrokerError::invalid(
                        "producer_epoch",
                        format!("{} is outside 0..=32767", req.producer_epoch),
                    )
                })?;
            if id <= 0 {
                return Err(BrokerError::invalid(
                    "producer_id",
                    format!("{id} is not a producer id (they start at 1)"),
                ));
            }
            Some((id, epoch))
        }
    };
    Ok(InitProducer {
        instance: (!req.instance_id.is_empty()).then_some(req.instance_id),
        bump,
        request_id: req.request_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(instance_id: &str, producer_id: Option<i64>, epoch: i32) -> InitProducerRequest {
        InitProducerRequest {
            instance_id: instance_id.into(),
            producer_id,
            producer_epoch: epoch,
            request_id: 5,
        }
    }

    #[track_caller]
    fn refused(req: InitProducerRequest) -> (&'static str, String) {
        match check_init_producer(req) {
            Err(BrokerError::InvalidArgument { field, message }) => (field, message),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_fresh_producer_has_no_identity_and_nothing_to_bump() {
        assert_eq!(
            check_init_producer(request("", None, 0)).expect("valid"),
            InitProducer {
                instance: None,
                bump: None,
                request_id: 5,
            }
        );
    }

    #[test]
    fn the_instance_id_is_bounded_and_printable() {
        let longest = "i".repeat(MAX_INSTANCE_ID);
        let ok = check_init_producer(request(&longest, None, 0)).expect("valid");
        assert_eq!(ok.instance.as_deref(), Some(longest.as_str()));

        let (field, message) = refused(request(&"i".repeat(MAX_INSTANCE_ID + 1), None, 0));
        assert_eq!(field, "instance_id");
        assert_eq!(message, "256 bytes exceed the limit of 255");

        let (field, message) = refused(request("svc\n1", None, 0));
        assert_eq!(field, "instance_id");
        assert_eq!(message, "control characters are not allowed");
    }

    #[test]
    fn a_bump_needs_a_producer_id_and_an_epoch_in_range() {
        let ok = check_init_producer(request("", Some(7), 32_767)).expect("valid");
        assert_eq!(ok.bump, Some((7, 32_767)));

        for epoch in [-1, 32_768] {
            let (field, message) = refused(request("", Some(7), epoch));
            assert_eq!(field, "producer_epoch");
            assert_eq!(message, format!("{epoch} is outside 0..=32767"));
        }
        for id in [0, -3] {
            let (field, message) = refused(request("", Some(id), 0));
            assert_eq!(field, "producer_id");
            assert_eq!(
                message,
                format!("{id} is not a producer id (they start at 1)")
            );
        }
    }
}
