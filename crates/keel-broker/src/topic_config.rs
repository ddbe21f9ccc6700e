//! Topic configuration: Kafka's names, validated with errors that name the key and the limit.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_log::{FlushPolicy, LogConfig, MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES};
use serde::{Deserialize, Serialize};

use crate::error::{BrokerError, Result};

/// Hard ceiling for `max.message.bytes`: a batch must fit a gRPC request.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 8 * 1024 * 1024;

/// Effective configuration of a topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Set keys only, as the user gave them (after validation); defaults fill the rest.
    pub overrides: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub max_message_bytes: u64,
    pub min_insync_replicas: u32,
    /// `flush.messages`: 1 means fsync every batch before acks=all is answered.
    pub flush_messages: u64,
    /// `flush.ms`: with `flush.messages` above 1, fsync at least this often (`None`: leave it
    /// to the OS).
    pub flush_ms: Option<u64>,
    /// `producer.id.expiration.ms`: a partition forgets an idempotent producer that wrote
    /// nothing to it for this long (Kafka has it per broker; per topic lets a topic with rare
    /// writers keep its producers longer).
    pub producer_expiration_ms: u64,
}

/// Known keys, their defaults and what they accept.
pub const KEYS: &[(&str, &str, &str)] = &[
    ("cleanup.policy", "delete", "delete"),
    (
        "retention.ms",
        "604800000",
        "-1 (forever) or milliseconds >= 1",
    ),
    ("retention.bytes", "-1", "-1 (unlimited) or bytes >= 1"),
    (
        "segment.bytes",
        "1073741824",
        "bytes between 4096 and 2147483648",
    ),
    ("segment.ms", "604800000", "milliseconds >= 1"),
    (
        "max.message.bytes",
        "1048576",
        "bytes between 1 and 8388608",
    ),
    ("min.insync.replicas", "1", "an integer between 1 and 1024"),
    (
        "flush.messages",
        "1",
        "1 (fsync every batch) or a larger integer (no per-batch fsync)",
    ),
    (
        "flush.ms",
        "-1",
        "-1 (leave flushing to the OS) or milliseconds >= 1; used when flush.messages > 1",
    ),
    ("producer.id.expiration.ms", "86400000", "milliseconds >= 1"),
];

fn parse_i64(key: &str, v: &str) -> Result<i64> {
    v.trim()
        .parse::<i64>()
        .map_err(|_| BrokerError::InvalidConfig {
            key: key.to_owned(),
            message: format!("{v:?} is not an integer"),
        })
}

fn bad(key: &str, v: &str, expect: &str) -> BrokerError {
    BrokerError::InvalidConfig {
        key: key.to_owned(),
        message: format!("{v:?} is out of range: expected {expect}"),
    }
}

fn optional_positive(key: &str, v: &str, expect: &str) -> Result<Option<u64>> {
    match parse_i64(key, v)? {
        -1 => Ok(None),
        n if n >= 1 => Ok(Some(n as u64)),
        _ => Err(bad(key, v, expect)),
    }
}

fn ranged(key: &str, v: &str, lo: u64, hi: u64, expect: &str) -> Result<u64> {
    let n = parse_i64(key, v)?;
    if n < 0 || (n as u64) < lo || (n as u64) > hi {
        return Err(bad(key, v, expect));
    }
    Ok(n as u64)
}

impl TopicConfig {
    /// Validates `set` on top of `self`, removing `remove`, and returns the new config.
    pub fn with_changes(&self, set: &BTreeMap<String, String>, remove: &[String]) -> Result<Self> {
        let mut overrides = self.overrides.clone();
        for key in remove {
            if !KEYS.iter().any(|(k, _, _)| k == key) {
                return Err(unknown(key));
            }
            overrides.remove(key);
        }
        for (k, v) in set {
            overrides.insert(k.clone(), v.clone());
        }
        let cfg = Self { overrides };
        cfg.resolve()?;
        Ok(cfg)
    }

    pub fn new(set: &BTreeMap<String, String>) -> Result<Self> {
        Self {
            overrides: BTreeMap::new(),
        }
        .with_changes(set, &[])
    }

    fn get(&self, key: &str) -> String {
        self.overrides.get(key).cloned().unwrap_or_else(|| {
            KEYS.iter()
                .find(|(k, _, _)| *k == key)
                .map(|(_, d, _)| (*d).to_owned())
                .unwrap_or_default()
        })
    }

    pub fn resolve(&self) -> Result<Resolved> {
        for key in self.overrides.keys() {
            if !KEYS.iter().any(|(k, _, _)| k == key) {
                return Err(unknown(key));
            }
        }
        let expect = |key: &str| {
            KEYS.iter()
                .find(|(k, _, _)| *k == key)
                .map_or("", |(_, _, e)| e)
        };
        let v = |key: &str| self.get(key);
        let policy = v("cleanup.policy");
        if policy != "delete" {
            return Err(BrokerError::InvalidConfig {
                key: "cleanup.policy".into(),
                message: format!(
                    "{policy:?} is not supported: expected \"delete\" (log compaction is not implemented)"
                ),
            });
        }
        Ok(Resolved {
            retention_ms: optional_positive(
                "retention.ms",
                &v("retention.ms"),
                expect("retention.ms"),
            )?,
            retention_bytes: optional_positive(
                "retention.bytes",
                &v("retention.bytes"),
                expect("retention.bytes"),
            )?,
            segment_bytes: ranged(
                "segment.bytes",
                &v("segment.bytes"),
                MIN_SEGMENT_BYTES,
                MAX_SEGMENT_BYTES,
                expect("segment.bytes"),
            )?,
            segment_ms: ranged(
                "segment.ms",
                &v("segment.ms"),
                1,
                i64::MAX as u64,
                expect("segment.ms"),
            )?,
            max_message_bytes: ranged(
                "max.message.bytes",
                &v("max.message.bytes"),
                1,
                MAX_MESSAGE_BYTES_LIMIT,
                expect("max.message.bytes"),
            )?,
            min_insync_replicas: ranged(
                "min.insync.replicas",
                &v("min.insync.replicas"),
                1,
                1024,
                expect("min.insync.replicas"),
            )? as u32,
            flush_messages: ranged(
                "flush.messages",
                &v("flush.messages"),
                1,
                i64::MAX as u64,
                expect("flush.messages"),
            )?,
            flush_ms: optional_positive("flush.ms", &v("flush.ms"), expect("flush.ms"))?,
            producer_expiration_ms: ranged(
                "producer.id.expiration.ms",
                &v("producer.id.expiration.ms"),
                1,
                i64::MAX as u64,
                expect("producer.id.expiration.ms"),
            )?,
        })
    }

    /// Every key with its effective value.
    pub fn effective(&self) -> BTreeMap<String, String> {
        KEYS.iter()
            .map(|(k, _, _)| ((*k).to_owned(), self.get(k)))
            .collect()
    }
}

fn unknown(key: &str) -> BrokerError {
    let known: Vec<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
    BrokerError::InvalidConfig {
        key: key.to_owned(),
        message: format!("unknown config; known keys are {}", known.join(", ")),
    }
}

impl Resolved {
    /// fsync before answering acks=all.
    pub fn flush_every_batch(&self) -> bool {
        self.flush_messages <= 1
    }

    /// The log's configuration. Per-batch fsyncs are driven by the broker (only acks=all
    /// waits for them), so the log itself flushes only on an interval, if at all.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            segment_ms: Some(Duration::from_millis(self.segment_ms)),
            retention_ms: self.retention_ms.map(Duration::from_millis),
            retention_bytes: self.retention_bytes,
            max_batch_bytes: self.max_message_bytes.max(1),
            flush: match (self.flush_every_batch(), self.flush_ms) {
                (false, Some(ms)) => FlushPolicy::Interval(Duration::from_millis(ms)),
                _ => FlushPolicy::Os,
            },
            ..LogConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_and_overrides() {
        let c = TopicConfig::new(&set(&[("retention.ms", "1000")])).expect("valid");
        let r = c.resolve().expect("valid");
        assert_eq!(r.retention_ms, Some(1000));
        assert_eq!(r.max_message_bytes, 1 << 20);
        assert!(r.flush_every_batch());
        assert_eq!(
            c.effective().get("segment.bytes").map(String::as_str),
            Some("1073741824")
        );
        let c2 = c
            .with_changes(
                &set(&[("flush.messages", "10000"), ("flush.ms", "50")]),
                &["retention.ms".into()],
            )
            .expect("valid");
        let r2 = c2.resolve().expect("valid");
        assert_eq!(r2.retention_ms, Some(604_800_000));
        assert_eq!(
            r2.log_config().flush,
            FlushPolicy::Interval(Duration::from_millis(50))
        );
    }

    #[test]
    fn producer_expiration_is_a_topic_config() {
        let r = TopicConfig::new(&set(&[]))
            .expect("valid")
            .resolve()
            .expect("valid");
        assert_eq!(r.producer_expiration_ms, 86_400_000);
        let c = TopicConfig::new(&set(&[("producer.id.expiration.ms", "60000")])).expect("valid");
        assert_eq!(c.resolve().expect("valid").producer_expiration_ms, 60_000);
        let e = TopicConfig::new(&set(&[("producer.id.expiration.ms", "0")])).expect_err("0");
        assert!(e.to_string().contains("producer.id.expiration.ms"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_the_limit() {
        let e = TopicConfig::new(&set(&[("segment.bytes", "10")])).expect_err("too small");
        assert!(
            e.to_string().contains("segment.bytes") && e.to_string().contains("4096"),
            "{e}"
        );
        let e = TopicConfig::new(&set(&[("retention.ms", "soon")])).expect_err("not a number");
        assert!(e.to_string().contains("not an integer"), "{e}");
        let e = TopicConfig::new(&set(&[("no.such", "1")])).expect_err("unknown");
        assert!(
            e.to_string().contains("no.such") && e.to_string().contains("retention.ms"),
            "{e}"
        );
        let e =
            TopicConfig::new(&set(&[("max.message.bytes", "9999999999")])).expect_err("too big");
        assert!(e.to_string().contains("8388608"), "{e}");
        assert!(TopicConfig::new(&set(&[("cleanup.policy", "compact")])).is_err());
    }
}
