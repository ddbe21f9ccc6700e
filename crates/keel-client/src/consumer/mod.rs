//! The consumer: manual partition assignment, positions, and long-poll fetching grouped by
//! leader broker.
//!
//! Fetches run as futures owned by the consumer, so one still running when `poll` returns (its
//! timeout passed first) is picked up by the next `poll` instead of being wasted. A fetch's
//! answer is applied only if the partition's position is still the offset it asked for, which
//! makes `seek` during a fetch safe.

mod decode;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use keel_proto::v1::consume_service_client::ConsumeServiceClient;
use keel_proto::v1::{FetchPartition, FetchRequest, FetchResponse, RecordFormat};
use tokio::time::Instant;

use crate::client::{Client, OffsetSpec, unary, with_timeout};
use crate::error::{ClientError, Result, Tp};
use crate::metadata::Route;
use crate::rpc::Stub;
use crate::util::{backoff, millis_u32, read};

pub use stream::RecordStream;

/// What to do when a consumer has no valid position for a partition: at first use, or when
/// its position fell out of the log (retention deleted it, or it is past the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// Start from the oldest retained record (records in between were deleted by retention).
    Earliest,
    /// Start from the end: only records produced from now on.
    #[default]
    Latest,
    /// Fail `poll` with an error until the caller seeks.
    None,
}

/// Where [`Consumer::seek`] and [`Consumer::subscribe_stream`] start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    Beginning,
    End,
    Offset(u64),
    /// The first record with a timestamp at or after this (ms since the epoch), or the end.
    Timestamp(i64),
}

/// Consumer settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// How long the broker may hold a fetch waiting for `min_bytes`.
    pub max_wait: Duration,
    pub min_bytes: u32,
    /// Limit of one fetch response (the broker caps it at 16 MiB).
    pub max_bytes: u32,
    /// Limit per partition within a fetch; 0 means `max_bytes`.
    pub max_partition_bytes: u32,
    pub auto_offset_reset: OffsetReset,
    /// Added to `max_wait` to bound how long a fetch may take before it is retried.
    pub request_timeout: Duration,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// Largest decompressed size accepted for one batch (a compression bomb is an error).
    pub max_decompressed_batch: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_millis(500),
            min_bytes: 1,
            max_bytes: 8 * 1024 * 1024,
            max_partition_bytes: 1024 * 1024,
            auto_offset_reset: OffsetReset::Latest,
            request_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            max_decompressed_batch: keel_batch::DEFAULT_MAX_DECOMPRESSED,
        }
    }
}

setters!(ConsumerConfig {
    auto_offset_reset: OffsetReset,
    max_wait: Duration,
    min_bytes: u32,
    max_bytes: u32,
    max_partition_bytes: u32,
});

/// A record as consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Shared by all records of a partition, so consuming does not allocate a string per record.
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

#[derive(Debug)]
struct PartitionState {
    topic: Arc<str>,
    partition: u32,
    /// The next offset to return; `None` until set by `seek` or `auto_offset_reset`.
    position: Option<u64>,
    /// A fetch that named several partitions was refused as out of range: which partition
    /// cannot be told, so each checks its position against the log's bounds.
    validate: bool,
    fetching: bool,
    retry_at: Option<Instant>,
    attempts: u32,
    high_watermark: Option<u64>,
}

struct FetchOutcome {
    requested: Vec<(Arc<str>, u32, u64)>,
    result: Result<FetchResponse>,
}

/// Reads records from assigned partitions. Not shareable between tasks (`poll` takes
/// `&mut self`); create one per reading task, from the same [`Client`] to share connections.
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    partitions: Vec<PartitionState>,
    fetches: FuturesUnordered<BoxFuture<'static, FetchOutcome>>,
    /// An error met after records were already collected in a `poll`; reported by the next one
    /// so those records are not lost.
    pending_error: Option<ClientError>,
    need_refresh: bool,
    /// Where the next fetch round starts in `partitions`. The broker fills a fetch in request
    /// order until its byte budget is spent, so a fixed order could starve the last partitions.
    rotation: usize,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(client: Client, config: ConsumerConfig) -> Self {
        Self {
            client,
            config,
            partitions: Vec::new(),
            fetches: FuturesUnordered::new(),
            pending_error: None,
            need_refresh: false,
            rotation: 0,
        }
    }

    /// Replaces the assignment. Partitions that stay assigned keep their positions; new ones
    /// start per `auto_offset_reset` unless sought.
    pub fn assign(&mut self, partitions: &[(impl AsRef<str>, u32)]) {
        let mut old: HashMap<(String, u32), PartitionState> = self
            .partitions
            .drain(..)
            .map(|s| ((s.topic.to_string(), s.partition), s))
            .collect();
        for (topic, partition) in partitions {
            let key = (topic.as_ref().to_owned(), *partition);
            if self
                .partitions
                .iter()
                .any(|s| *s.topic == key.0 && s.partition == key.1)
            {
                continue;
            }
            let state = old.remove(&key).unwrap_or_else(|| PartitionState {
                topic: Arc::from(key.0.as_str()),
                partition: *partition,
                position: None,
                validate: false,
                fetching: false,
                retry_at: None,
                attempts: 0,
                high_watermark: None,
            });
            self.partitions.push(state);
        }
    }

    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.partitions
            .iter()
            .map(|s| (s.topic.to_string(), s.partition))
            .collect()
    }

    fn state(&self, topic: &str, partition: u32) -> Option<&PartitionState> {
        self.partitions
            .iter()
            .find(|s| &*s.topic == topic && s.partition == partition)
    }

    fn state_mut(&mut self, topic: &str, partition: u32) -> Option<&mut PartitionState> {
        self.partitions
            .iter_mut()
            .find(|s| &*s.topic == topic && s.partition == partition)
    }

    /// The offset of the next record `poll` returns for a partition, once known.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.state(topic, partition).and_then(|s| s.position)
    }

    /// The partition's high watermark as of the last fetch (for lag: `hw - position`).
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<u64> {
        self.state(topic, partition).and_then(|s| s.high_watermark)
    }

    /// Moves an assigned partition's position. `Beginning`, `End` and `Timestamp` ask the
    /// partition leader (`ListOffsets`).
    pub async fn seek(&mut self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        if self.state(topic, partition).is_none() {
            return Err(ClientError::InvalidInput(format!(
                "cannot seek {}: partition is not assigned",
                Tp(topic, partition)
            )));
        }
        // The lookup owns a client clone: borrowing `self` across the await would make this
        // future `!Send` (the consumer is not `Sync`).
        let client = self.client.clone();
        let offset = match to {
            SeekTo::Offset(o) => o,
            SeekTo::Beginning => lookup(client, topic, partition, OffsetSpec::Earliest).await?,
            SeekTo::End => lookup(client, topic, partition, OffsetSpec::Latest).await?,
            SeekTo::Timestamp(ts) => {
                lookup(client, topic, partition, OffsetSpec::Timestamp(ts)).await?
            }
        };
        if let Some(s) = self.state_mut(topic, partition) {
            s.position = Some(offset);
            s.validate = false;
            s.retry_at = None;
            s.attempts = 0;
        }
        Ok(())
    }

    /// Returns the records available on the assigned partitions, waiting up to `timeout` for
    /// some to arrive; an empty vector means none did. Positions advance past what is returned.
    /// Retriable failures (leader changes, broker restarts) are retried inside; other failures
    /// are returned.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        if self.partitions.is_empty() {
            return Err(ClientError::InvalidInput(
                "poll without assigned partitions".into(),
            ));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.need_refresh {
                self.need_refresh = false;
                if let Err(e) = self.client.refresh(self.client.generation()).await {
                    tracing::debug!(error = %e, "consumer metadata refresh failed");
                }
            }
            self.resolve_positions(deadline).await?;
            self.start_fetches(deadline);
            let mut out = Vec::new();
            if self.fetches.is_empty() {
                let wake = self
                    .partitions
                    .iter()
                    .filter_map(|s| s.retry_at)
                    .min()
                    .map_or(deadline, |r| r.min(deadline));
                tokio::time::sleep_until(wake).await;
            } else {
                match tokio::time::timeout_at(deadline, self.fetches.next()).await {
                    Ok(Some(outcome)) => {
                        self.apply(outcome, &mut out);
                        while let Some(Some(outcome)) = self.fetches.next().now_or_never() {
                            self.apply(outcome, &mut out);
                        }
                    }
                    Ok(None) => {}
                    Err(_) => return Ok(out),
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
            if let Some(e) = self.pending_error.take() {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Ok(out);
            }
        }
    }

    /// Gives every partition without a valid position one, per `auto_offset_reset`, and checks
    /// positions flagged by an ambiguous out-of-range error.
    async fn resolve_positions(&mut self, poll_deadline: Instant) -> Result<()> {
        let now = Instant::now();
        let todo: Vec<(Arc<str>, u32, Option<u64>)> = self
            .partitions
            .iter()
            .filter(|s| (s.position.is_none() || s.validate) && s.retry_at.is_none_or(|r| r <= now))
            .map(|s| {
                (
                    s.topic.clone(),
                    s.partition,
                    s.position.filter(|_| s.validate),
                )
            })
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let reset = self.config.auto_offset_reset;
        if reset == OffsetReset::None
            && let Some((topic, partition, None)) = todo.iter().find(|t| t.2.is_none())
        {
            return Err(ClientError::NoOffset {
                topic: topic.to_string(),
                partition: *partition,
                detail: None,
            });
        }
        // ListOffsets answers bounds as well as the asked offset, so one request per partition
        // serves both resetting and validating.
        let spec = match reset {
            OffsetReset::Latest => OffsetSpec::Latest,
            _ => OffsetSpec::Earliest,
        };
        let lookups = todo.iter().map(|(topic, partition, _)| {
            let client = self.client.clone();
            let topic = topic.clone();
            let partition = *partition;
            // Give a lookup at least a second even if the poll's timeout is shorter, or a
            // zero-timeout poll could never start.
            let deadline = poll_deadline.max(Instant::now() + Duration::from_secs(1));
            async move {
                tokio::time::timeout_at(deadline, client.list_offsets(&topic, partition, spec))
                    .await
                    .unwrap_or_else(|_| {
                        Err(ClientError::timeout(format!(
                            "offset lookup for {} timed out",
                            Tp(&topic, partition)
                        )))
                    })
            }
        });
        let results = futures::future::join_all(lookups).await;
        for ((topic, partition, validating), result) in todo.into_iter().zip(results) {
            let resp = match result {
                Ok(r) => r,
                Err(e) if e.is_retriable() => {
                    self.back_off(&topic, partition, &e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(s) = self.state_mut(&topic, partition) else {
                continue;
            };
            s.validate = false;
            s.attempts = 0;
            s.retry_at = None;
            s.high_watermark = Some(resp.high_watermark);
            match validating {
                Some(p) if (resp.log_start_offset..=resp.high_watermark).contains(&p) => {}
                Some(p) => {
                    if reset == OffsetReset::None {
                        return Err(ClientError::NoOffset {
                            topic: topic.to_string(),
                            partition,
                            detail: Some(format!(
                                "position {p} is outside {}..={}",
                                resp.log_start_offset, resp.high_watermark
                            )),
                        });
                    }
                    tracing::warn!(%topic, partition, position = p, new_position = resp.offset,
                        log_start = resp.log_start_offset, high_watermark = resp.high_watermark,
                        "position out of range; reset per auto_offset_reset");
                    s.position = Some(resp.offset);
                }
                None => s.position = Some(resp.offset),
            }
        }
        Ok(())
    }

    fn back_off(&mut self, topic: &str, partition: u32, err: &ClientError) {
        let (base, max) = (self.config.retry_backoff, self.config.retry_backoff_max);
        if err.invalidates_metadata() {
            self.need_refresh = true;
        }
        if let Some(s) = self.state_mut(topic, partition) {
            s.attempts += 1;
            s.retry_at = Some(Instant::now() + backoff(base, max, s.attempts));
            tracing::debug!(%topic, partition, attempt = s.attempts, error = %err, "backing off partition");
        }
    }

    /// Starts one fetch per leader broker for the partitions that are ready.
    fn start_fetches(&mut self, poll_deadline: Instant) {
        let now = Instant::now();
        let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
        let mut leaderless = Vec::new();
        {
            let metadata = read(&self.client.inner.metadata);
            let n = self.partitions.len();
            self.rotation = self.rotation.wrapping_add(1);
            for k in 0..n {
                let i = (self.rotation + k) % n;
                let s = &self.partitions[i];
                if s.fetching || s.validate || s.position.is_none() {
                    continue;
                }
                if s.retry_at.is_some_and(|r| r > now) {
                    continue;
                }
                match metadata.route(&s.topic, s.partition) {
                    Route::Leader { address, .. } => groups.entry(address).or_default().push(i),
                    _ => leaderless.push(i),
                }
            }
        }
        for i in leaderless {
            let (topic, partition) = (
                self.partitions[i].topic.clone(),
                self.partitions[i].partition,
            );
            let err = ClientError::Unavailable {
                message: format!("{} has no known leader", Tp(&topic, partition)),
                definite: true,
            };
            self.back_off(&topic, partition, &err);
        }
        let max_wait = self
            .config
            .max_wait
            .min(poll_deadline.saturating_duration_since(now))
            .min(Duration::from_secs(60));
        let max_message = self.client.inner.config.max_message_size;
        for (addr, members) in groups {
            let channel = match self.client.channel(&addr) {
                Ok(c) => c,
                Err(e) => {
                    self.pending_error.get_or_insert(e);
                    continue;
                }
            };
            let mut requested = Vec::with_capacity(members.len());
            let mut partitions = Vec::with_capacity(members.len());
            for i in members {
                let s = &mut self.partitions[i];
                let Some(offset) = s.position else { continue };
                s.fetching = true;
                requested.push((s.topic.clone(), s.partition, offset));
                partitions.push(FetchPartition {
                    topic: s.topic.to_string(),
                    partition: s.partition,
                    offset,
                    max_bytes: self.config.max_partition_bytes,
                });
            }
            let req = FetchRequest {
                partitions,
                max_wait_ms: millis_u32(max_wait),
                min_bytes: self.config.min_bytes,
                max_bytes: self.config.max_bytes,
                format: RecordFormat::Batches as i32,
            };
            let timeout = max_wait + self.config.request_timeout;
            self.fetches.push(
                async move {
                    let mut rpc = ConsumeServiceClient::open(channel, max_message);
                    let call = rpc.fetch(with_timeout(req, timeout));
                    let result = unary(&addr, timeout, call).await;
                    FetchOutcome { requested, result }
                }
                .boxed(),
            );
        }
    }

    /// Applies one fetch answer: decodes records for partitions whose position has not moved
    /// since the fetch was sent, or handles its error. Never fails: an error met after records
    /// were collected waits in `pending_error`.
    fn apply(&mut self, outcome: FetchOutcome, out: &mut Vec<ConsumerRecord>) {
        let FetchOutcome { requested, result } = outcome;
        for (topic, partition, _) in &requested {
            if let Some(s) = self.state_mut(topic, *partition) {
                s.fetching = false;
            }
        }
        let resp = match result {
            Ok(r) => r,
            Err(e) => return self.fetch_failed(&requested, e),
        };
        let max_decompressed = self.config.max_decompressed_batch;
        for fp in resp.partitions {
            let Some((topic, _, offset)) = requested
                .iter()
                .find(|(t, p, _)| **t == *fp.topic && *p == fp.partition)
            else {
                continue;
            };
            let Some(s) = self.state_mut(topic, fp.partition) else {
                continue;
            };
            if s.position != Some(*offset) {
                // Sought elsewhere while the fetch was running.
                continue;
            }
            s.high_watermark = Some(fp.high_watermark);
            match decode::decode_batches(
                topic,
                fp.partition,
                &fp.record_batches,
                *offset,
                max_decompressed,
            ) {
                Ok(d) => {
                    s.position = Some(d.next_offset);
                    s.attempts = 0;
                    s.retry_at = None;
                    out.extend(d.records);
                }
                Err(e) => {
                    let (topic, partition) = (topic.clone(), fp.partition);
                    self.back_off(&topic, partition, &e);
                    self.pending_error.get_or_insert(e);
                }
            }
        }
    }

    fn fetch_failed(&mut self, requested: &[(Arc<str>, u32, u64)], e: ClientError) {
        // A leader hint or out-of-range bounds can be attributed only when the request named a
        // single partition: the Fetch answer has no per-partition errors.
        let single = match requested {
            [one] => Some(one),
            _ => None,
        };
        for (topic, partition, _) in requested {
            if single.is_some() {
                self.client.note_partition_error(topic, *partition, &e);
            } else if e.invalidates_metadata() {
                self.client.note_partition_error(
                    topic,
                    *partition,
                    &ClientError::Unavailable {
                        message: String::new(),
                        definite: true,
                    },
                );
            }
        }
        if let ClientError::OffsetOutOfRange {
            log_start_offset,
            high_watermark,
            ..
        } = &e
        {
            let reset = self.config.auto_offset_reset;
            match (single, log_start_offset, high_watermark) {
                (Some((topic, partition, offset)), Some(start), Some(hw)) => {
                    let Some(s) = self.state_mut(topic, *partition) else {
                        return;
                    };
                    if s.position != Some(*offset) {
                        return;
                    }
                    let to = match reset {
                        OffsetReset::Earliest => *start,
                        OffsetReset::Latest => *hw,
                        OffsetReset::None => {
                            self.pending_error.get_or_insert(e);
                            return;
                        }
                    };
                    tracing::warn!(%topic, partition, position = offset, new_position = to,
                        log_start = start, high_watermark = hw,
                        "position out of range; reset per auto_offset_reset");
                    s.position = Some(to);
                    s.high_watermark = Some(*hw);
                }
                _ => {
                    for (topic, partition, offset) in requested {
                        if let Some(s) = self.state_mut(topic, *partition)
                            && s.position == Some(*offset)
                        {
                            s.validate = true;
                        }
                    }
                }
            }
            return;
        }
        let retry_quietly = e.is_retriable()
            || matches!(
                e,
                ClientError::UnknownTopic { .. } | ClientError::UnknownPartition { .. }
            );
        for (topic, partition, _) in requested {
            self.back_off(topic, *partition, &e);
        }
        if !retry_quietly {
            self.pending_error.get_or_insert(e);
        }
    }

    /// Streams one partition from `start` with `ConsumeService.Subscribe`, independent of this
    /// consumer's assignment and positions. The stream reconnects by itself (resuming after the
    /// last record it yielded) on retriable errors, applies `auto_offset_reset` when its
    /// position falls out of the log, and ends after yielding a non-retriable error.
    pub fn subscribe_stream(&self, topic: &str, partition: u32, start: SeekTo) -> RecordStream {
        RecordStream::new(
            self.client.clone(),
            self.config.clone(),
            topic,
            partition,
            start,
        )
    }
}

async fn lookup(client: Client, topic: &str, partition: u32, spec: OffsetSpec) -> Result<u64> {
    Ok(client.list_offsets(topic, partition, spec).await?.offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientConfig;

    fn consumer() -> Consumer {
        consumer_with(ConsumerConfig::default())
    }

    fn consumer_with(config: ConsumerConfig) -> Consumer {
        Client::connect_lazy(&["127.0.0.1:1"], ClientConfig::default())
            .expect("client")
            .consumer(config)
    }

    /// The partitions retain offsets 9 to 20.
    fn out_of_range() -> ClientError {
        ClientError::OffsetOutOfRange {
            message: "x".into(),
            log_start_offset: Some(9),
            high_watermark: Some(20),
            definite: true,
        }
    }

    #[test]
    fn assign_keeps_positions_of_remaining_partitions() {
        let mut c = consumer();
        c.assign(&[("a", 0), ("a", 1), ("a", 1)]);
        assert_eq!(
            c.assignment(),
            vec![("a".to_owned(), 0), ("a".to_owned(), 1)]
        );
        if let Some(s) = c.state_mut("a", 1) {
            s.position = Some(42);
        }
        c.assign(&[("a", 1), ("b", 0)]);
        assert_eq!(c.position("a", 1), Some(42));
        assert_eq!(c.position("b", 0), None);
        assert_eq!(c.position("a", 0), None);
    }

    #[tokio::test]
    async fn seek_to_offset_needs_no_broker_and_unassigned_fails() {
        let mut c = consumer();
        c.assign(&[("a", 0)]);
        c.seek("a", 0, SeekTo::Offset(7)).await.expect("seek");
        assert_eq!(c.position("a", 0), Some(7));
        assert!(matches!(
            c.seek("a", 1, SeekTo::Offset(1)).await,
            Err(ClientError::InvalidInput(_))
        ));
    }

    #[test]
    fn ambiguous_out_of_range_marks_partitions_for_validation() {
        let mut c = consumer();
        c.assign(&[("a", 0), ("a", 1)]);
        for s in &mut c.partitions {
            s.position = Some(5);
        }
        let requested = vec![(Arc::from("a"), 0, 5), (Arc::from("a"), 1, 5)];
        c.fetch_failed(&requested, out_of_range());
        assert!(c.partitions.iter().all(|s| s.validate));
        assert!(c.pending_error.is_none());
    }

    #[test]
    fn single_partition_out_of_range_resets_per_policy() {
        for (reset, want) in [
            (OffsetReset::Earliest, Some(9)),
            (OffsetReset::Latest, Some(20)),
            (OffsetReset::None, Some(5)),
        ] {
            let mut c = consumer_with(ConsumerConfig::default().auto_offset_reset(reset));
            c.assign(&[("a", 0)]);
            c.partitions[0].position = Some(5);
            c.fetch_failed(&[(Arc::from("a"), 0, 5)], out_of_range());
            assert_eq!(c.position("a", 0), want, "{reset:?}");
            assert_eq!(c.pending_error.is_some(), reset == OffsetReset::None);
        }
    }

    #[test]
    fn retriable_fetch_errors_back_off_silently() {
        let mut c = consumer();
        c.assign(&[("a", 0)]);
        c.partitions[0].position = Some(1);
        c.fetch_failed(
            &[(Arc::from("a"), 0, 1)],
            ClientError::NotLeader {
                message: "moved".into(),
                leader: None,
                definite: true,
            },
        );
        assert!(c.pending_error.is_none());
        assert!(c.partitions[0].retry_at.is_some());
        assert!(c.need_refresh);
        c.fetch_failed(
            &[(Arc::from("a"), 0, 1)],
            ClientError::InvalidArgument {
                message: "bad".into(),
                definite: true,
            },
        );
        assert!(c.pending_error.is_some());
    }
}
