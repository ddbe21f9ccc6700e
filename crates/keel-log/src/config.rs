use std::time::Duration;

use crate::error::{LogError, Result};

/// When appended data is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// fsync before `append` returns (concurrent appenders share one fsync: group commit).
    EveryBatch,
    /// fsync when this much time has passed since the last flush, checked on append and by
    /// [`crate::Log::flush_if_due`]. Data acknowledged in between can be lost on power failure.
    Interval(Duration),
    /// Never fsync on append; the OS writes back dirty pages. Segments are still fsynced when
    /// they are sealed and on close. Survives process crashes, not power loss.
    Os,
}

/// Configuration of one log. Names mirror the Kafka topic configs they implement.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `segment.bytes`: roll the active segment when the next batch would not fit.
    pub segment_bytes: u64,
    /// `segment.ms`: roll the active segment when it is older than this (and not empty).
    pub segment_ms: Option<Duration>,
    /// `retention.ms`: closed segments whose newest record is older than this are deleted.
    pub retention_ms: Option<Duration>,
    /// `retention.bytes`: oldest closed segments are deleted while the log is larger.
    pub retention_bytes: Option<u64>,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Largest batch the log accepts.
    pub max_batch_bytes: u64,
    pub flush: FlushPolicy,
    /// Write a recovery checkpoint after this many newly flushed bytes, bounding the work of
    /// recovery after a crash.
    pub checkpoint_interval_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 30,
            segment_ms: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_ms: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: None,
            index_interval_bytes: 4096,
            max_batch_bytes: 64 << 20,
            flush: FlushPolicy::EveryBatch,
            checkpoint_interval_bytes: 64 << 20,
        }
    }
}

/// Segments are addressed with 32-bit positions.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 31;
pub const MIN_SEGMENT_BYTES: u64 = 4096;

impl LogConfig {
    pub fn validate(&self) -> Result<()> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(LogError::Config(format!(
                "segment.bytes must be between {MIN_SEGMENT_BYTES} and {MAX_SEGMENT_BYTES}, got {}",
                self.segment_bytes
            )));
        }
        if self.index_interval_bytes == 0 {
            return Err(LogError::Config(
                "index interval must be at least 1 byte".into(),
            ));
        }
        if self.max_batch_bytes == 0 || self.max_batch_bytes > MAX_SEGMENT_BYTES / 2 {
            return Err(LogError::Config(format!(
                "max batch size must be between 1 and {} bytes, got {}",
                MAX_SEGMENT_BYTES / 2,
                self.max_batch_bytes
            )));
        }
        if let FlushPolicy::Interval(d) = self.flush
            && d.is_zero()
        {
            return Err(LogError::Config(
                "flush interval must be positive (use EveryBatch)".into(),
            ));
        }
        Ok(())
    }
}
