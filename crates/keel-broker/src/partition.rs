//! One partition replica on this broker: its log plus a watch of its end, which long polls and
//! subscriptions wait on.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, Weak};

use bytes::Bytes;
use keel_log::{AppendInfo, Log, LogError, ReadLimit, ReadSlice};
use tokio::sync::{Notify, watch};

use crate::error::{BrokerError, Result};
use crate::topic_config::Resolved;

#[derive(Debug)]
pub struct Partition {
    pub topic: Arc<str>,
    pub id: u32,
    log: Arc<Log>,
    /// The high watermark: the end of what is committed. On a single node that is what is
    /// durable under the topic's flush policy: fsynced when `flush.messages` is 1, appended
    /// otherwise (flushing left to the OS or an interval, as in Kafka). The [cluster] issue
    /// sets it from the Raft commit index instead.
    hwm_tx: watch::Sender<u64>,
    flush_every_batch: AtomicBool,
    /// Wakes this partition's background flusher (one task per partition, started on first
    /// use), which fsyncs and then advances the high watermark; wake-ups coalesce.
    flush_wanted: Arc<Notify>,
    flusher: Once,
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Lets the flusher notice the partition is gone and end.
        self.flush_wanted.notify_one();
    }
}

/// Acknowledgement level of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckLevel {
    None,
    Leader,
    All,
}

impl Partition {
    pub fn open(dir: &Path, topic: Arc<str>, id: u32, cfg: &Resolved) -> Result<Self> {
        let log = Log::open(dir, cfg.log_config()).map_err(|e| BrokerError::Storage {
            message: format!("opening {topic}/{id}: {e}"),
            definite: true,
        })?;
        let (hwm_tx, _) = watch::channel(log.log_end_offset());
        Ok(Self {
            topic,
            id,
            log: Arc::new(log),
            hwm_tx,
            flush_every_batch: AtomicBool::new(cfg.flush_every_batch()),
            flush_wanted: Arc::new(Notify::new()),
            flusher: Once::new(),
        })
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    pub fn high_watermark(&self) -> u64 {
        *self.hwm_tx.borrow()
    }

    pub fn log_start_offset(&self) -> u64 {
        self.log.log_start_offset()
    }

    pub fn watch_hwm(&self) -> watch::Receiver<u64> {
        self.hwm_tx.subscribe()
    }

    pub fn apply_config(&self, cfg: &Resolved) -> Result<()> {
        self.flush_every_batch
            .store(cfg.flush_every_batch(), Ordering::Release);
        self.log
            .set_config(cfg.log_config())
            .map_err(|e| BrokerError::Internal(e.to_string()))
    }

    /// Appends a validated batch and waits for the durability `acks` asks for.
    pub async fn append(
        self: &Arc<Self>,
        batch: Bytes,
        acks: AckLevel,
        index: usize,
    ) -> Result<AppendInfo> {
        let info = self.append_only(batch, acks, index).await?;
        self.make_durable(&info, acks, index).await?;
        Ok(info)
    }

    /// Appends a validated batch. It becomes visible to consumers once committed: at once
    /// when the topic leaves flushing to the OS, after the fsync otherwise (started here in the
    /// background, so acks=leader producers are not slowed and their records still show up).
    pub async fn append_only(
        self: &Arc<Self>,
        batch: Bytes,
        acks: AckLevel,
        index: usize,
    ) -> Result<AppendInfo> {
        let log = Arc::clone(&self.log);
        let info = tokio::task::spawn_blocking(move || log.append(&batch, 0))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))?
            .map_err(|e| BrokerError::from_log(e, index))?;
        if self.flush_every_batch.load(Ordering::Acquire) {
            // acks=all waits for its own fsync (`make_durable`), which advances the high
            // watermark; only the others need the background flusher.
            if acks != AckLevel::All {
                self.request_flush();
            }
        } else {
            self.advance_hwm(info.next_offset);
        }
        Ok(info)
    }

    /// Asks the background flusher to fsync what was appended and advance the high watermark
    /// (also used when an acks=all wait was abandoned, so its records still become visible).
    pub fn request_flush(self: &Arc<Self>) {
        self.flusher.call_once(|| {
            tokio::spawn(flusher(
                Arc::downgrade(self),
                Arc::clone(&self.flush_wanted),
            ));
        });
        self.flush_wanted.notify_one();
    }

    fn advance_hwm(&self, to: u64) {
        self.hwm_tx.send_if_modified(|h| {
            let grew = to > *h;
            *h = (*h).max(to);
            grew
        });
    }

    /// fsyncs up to `info` (shared with concurrent callers: group commit in the log) and
    /// advances the high watermark.
    async fn flush(&self, info: &AppendInfo, index: usize) -> Result<()> {
        let log = Arc::clone(&self.log);
        let seq = info.flush_seq;
        tokio::task::spawn_blocking(move || log.flush_to(seq))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))?
            .map_err(|e| BrokerError::from_log(e, index))?;
        self.advance_hwm(info.next_offset);
        Ok(())
    }

    /// With acks=all on a topic that fsyncs every batch, waits for the fsync covering `info`.
    pub async fn make_durable(
        &self,
        info: &AppendInfo,
        acks: AckLevel,
        index: usize,
    ) -> Result<()> {
        if acks != AckLevel::All || !self.flush_every_batch.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush(info, index).await
    }

    /// Checks that `offset` can be read: between the log start and the high watermark.
    pub fn check_offset(&self, offset: u64) -> Result<u64> {
        let (start, hwm) = (self.log_start_offset(), self.high_watermark());
        if offset < start || offset > hwm {
            return Err(self.out_of_range(offset));
        }
        Ok(hwm)
    }

    pub fn out_of_range(&self, offset: u64) -> BrokerError {
        BrokerError::OffsetOutOfRange {
            topic: self.topic.to_string(),
            partition: self.id,
            offset,
            log_start: self.log_start_offset(),
            high_watermark: self.high_watermark(),
        }
    }

    /// Reads committed batches from `offset`. Runs on the caller's thread: reads are served
    /// from the mapping and do not block on IO except for page faults of cold data.
    pub fn read(&self, offset: u64, max_bytes: u64) -> Result<ReadSlice> {
        let hwm = self.check_offset(offset)?;
        self.log
            .read_with(
                offset,
                max_bytes,
                ReadLimit {
                    max_offset: Some(hwm),
                    max_raft_index: None,
                },
            )
            .map(|slice| {
                // Control batches alone take no offsets; returning them would let a long poll
                // answer at once without progress, over and over.
                if slice.last.is_some_and(|h| h.next_offset() > offset) {
                    slice
                } else {
                    ReadSlice {
                        bytes: Bytes::new(),
                        last: None,
                    }
                }
            })
            .map_err(|e| match e {
                LogError::OffsetOutOfRange { offset, .. } => self.out_of_range(offset),
                other => BrokerError::Storage {
                    message: format!("reading {}/{}: {other}", self.topic, self.id),
                    definite: true,
                },
            })
    }

    /// Finds the first offset with a timestamp at or after `ts` (`None`: none is).
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(u64, i64)>> {
        let hwm = self.high_watermark();
        self.log
            .offset_for_timestamp(ts)
            .map(|found| found.filter(|(o, _)| *o < hwm))
            .map_err(|e| BrokerError::Storage {
                message: e.to_string(),
                definite: true,
            })
    }
}

/// The background flusher of one partition: after each wake-up, fsyncs everything appended so
/// far and advances the high watermark to the end observed before the fsync.
async fn flusher(partition: Weak<Partition>, wanted: Arc<Notify>) {
    loop {
        wanted.notified().await;
        let Some(p) = partition.upgrade() else {
            return;
        };
        let end = p.log.log_end_offset();
        let log = Arc::clone(&p.log);
        match tokio::task::spawn_blocking(move || log.flush()).await {
            Ok(Ok(())) => p.advance_hwm(end),
            Ok(Err(e)) => {
                tracing::error!(topic = %p.topic, partition = p.id, error = %e, "background flush failed");
            }
            Err(e) => tracing::error!(error = %e, "background flush task failed"),
        }
    }
}
