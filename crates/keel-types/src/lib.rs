//! Pure rules shared by Keel's broker and client. No IO.

mod names;
mod partitioner;
mod pattern;
mod reason;

pub use names::{MAX_TOPIC_NAME_LEN, TopicNameError, validate_topic_name};
pub use partitioner::{murmur2, partition_for_key};
pub use pattern::{PatternError, TopicPattern};
pub use reason::{ErrorReason, UnknownReason};
