//! Topic names follow Kafka's rules (`org.apache.kafka.common.internals.Topic.validate`), so names
//! valid in Kafka are valid here and the name can be used as a directory name safely.

pub const MAX_TOPIC_NAME_LEN: usize = 249;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name cannot be \".\" or \"..\"")]
    Dots,
    #[error("topic name is {0} characters long; the limit is {MAX_TOPIC_NAME_LEN}")]
    TooLong(usize),
    #[error(
        "topic name {0:?} contains a character other than ASCII letters, digits, '.', '_' and '-'"
    )]
    IllegalChar(String),
}

pub fn validate_topic_name(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() {
        return Err(TopicNameError::Empty);
    }
    if name == "." || name == ".." {
        return Err(TopicNameError::Dots);
    }
    if name.len() > MAX_TOPIC_NAME_LEN {
        return Err(TopicNameError::TooLong(name.len()));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(TopicNameError::IllegalChar(name.chars().take(64).collect()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_rules() {
        for ok in ["a", "orders.v1", "A_b-C.9", &"x".repeat(249)] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_topic_name(""), Err(TopicNameError::Empty));
        assert_eq!(validate_topic_name("."), Err(TopicNameError::Dots));
        assert_eq!(validate_topic_name(".."), Err(TopicNameError::Dots));
        assert_eq!(
            validate_topic_name(&"x".repeat(250)),
            Err(TopicNameError::TooLong(250))
        );
        for bad in ["a/b", "../x", "a b", "naïve", "a\0b", "topic*", "é"] {
            assert!(
                matches!(
                    validate_topic_name(bad),
                    Err(TopicNameError::IllegalChar(_))
                ),
                "{bad}"
            );
        }
    }
}
