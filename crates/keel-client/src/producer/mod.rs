//! The batching producer.
//!
//! `send` appends a record to its partition's open batch and returns at once with a future for
//! the acknowledgement. A background sender task closes batches (full, `linger` elapsed, or
//! flush), encodes them, and pipelines them over one `ProduceStream` per leader broker with up to
//! `max_in_flight` requests per partition. Retriable failures are retried with backoff until
//! `delivery_timeout`.
//!
//! **Idempotence** is on by default with `acks = All` (as in Kafka 3+): the producer gets a
//! producer id and epoch from the cluster ([`ProducerConfig::instance_id`] keeps one identity
//! across restarts and fences older incarnations), numbers each partition's records from 0, and
//! the partition leader writes a retried batch only once, answering the retry with the original
//! offsets. Batches of a partition are written in order even across retries. A batch that fails
//! for good leaves a gap in its partition's sequence: the producer then waits for its requests
//! in flight, starts a new epoch and renumbers the batches not yet written (any whose earlier
//! attempt may have been written fail instead, with the error of that attempt).
//!
//! Without idempotence (turned off, or `acks` other than `All`), the producer retries only
//! failures the broker reports as definite (nothing written); an ambiguous one (a timeout, a
//! broken connection) fails the batch's records with that error, since they may or may not have
//! been written. With `max_in_flight > 1` a retried batch can then land after a later one.

mod accumulator;
mod pipeline;
mod sender;

pub use pipeline::BatchPipeline;

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use keel_batch::{Compression, HEADER_LEN, RecordRef};
use keel_proto::v1::produce_service_client::ProduceServiceClient;
use keel_proto::v1::{BatchAck, ProduceBatch, ProduceRequest, produce_batch};
use tokio::sync::{Notify, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::client::{Client, PartitionLeader};
use crate::error::{ClientError, Result, Tp};
use crate::partitioner::{StickyPartitioner, partition_for_key};
use crate::util::{lock, millis_u32, now_ms, read};
use accumulator::{Accumulator, AccumulatorConfig, PendingRecord};

/// How many replicas must have a batch before the broker acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Kafka's `acks=0`. The broker answers it as [`Acks::All`]; the producer does not report
    /// the offsets it was given.
    None,
    /// Kafka's `acks=1`. The broker answers it as [`Acks::All`] (the offsets are only known once
    /// the batch is committed).
    Leader,
    /// Acknowledged once the batch is committed on a majority of replicas under the topic's
    /// flush policy. Survives the failure of a minority of replicas.
    #[default]
    All,
}

impl Acks {
    pub(crate) fn to_proto(self) -> keel_proto::v1::Acks {
        match self {
            Self::None => keel_proto::v1::Acks::None,
            Self::Leader => keel_proto::v1::Acks::Leader,
            Self::All => keel_proto::v1::Acks::All,
        }
    }
}

impl FromStr for Acks {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" | "0" => Ok(Self::None),
            "leader" | "1" => Ok(Self::Leader),
            "all" | "-1" => Ok(Self::All),
            _ => Err(ClientError::InvalidInput(format!(
                "unknown acks {s:?} (expected all, leader or none)"
            ))),
        }
    }
}

/// Producer settings. Defaults follow Kafka's producer where Keel has the same knob.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProducerConfig {
    pub acks: Acks,
    /// A batch is sent once it holds this many (uncompressed) bytes. A single larger record
    /// gets a batch of its own.
    pub batch_size: usize,
    /// How long a batch may wait for more records before it is sent.
    pub linger: Duration,
    /// Bytes of records buffered and not yet acknowledged; `send` waits when it is full.
    pub buffer_memory: usize,
    pub compression: Compression,
    /// Requests in flight per partition. 1 keeps strict order across retries.
    pub max_in_flight: usize,
    /// How long the broker may wait for the acks level, and how long the client waits for an
    /// answer before it retries.
    pub request_timeout: Duration,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// Time from `send` until a record fails for good if it could not be acknowledged.
    pub delivery_timeout: Duration,
    /// Idempotent producing (see the module docs). Takes effect with `acks = All` only, and then
    /// needs `max_in_flight` of at most 5.
    pub idempotence: bool,
    /// A stable identity for an idempotent producer (e.g. a service instance name): a producer
    /// started with the same one gets the same producer id with a newer epoch, and this one's
    /// writes then fail with [`ClientError::ProducerFenced`].
    pub instance_id: Option<String>,
}

/// The most requests an idempotent producer may have in flight per partition: the broker
/// remembers this many batches per producer to recognise retries.
pub const MAX_IDEMPOTENT_IN_FLIGHT: usize = 5;

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            acks: Acks::All,
            batch_size: 256 * 1024,
            linger: Duration::from_millis(5),
            buffer_memory: 32 * 1024 * 1024,
            compression: Compression::None,
            max_in_flight: 5,
            request_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(120),
            idempotence: true,
            instance_id: None,
        }
    }
}

setters!(ProducerConfig {
    acks: Acks,
    batch_size: usize,
    linger: Duration,
    buffer_memory: usize,
    compression: Compression,
    max_in_flight: usize,
    request_timeout: Duration,
    delivery_timeout: Duration,
    idempotence: bool,
});

impl ProducerConfig {
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Whether batches are sent idempotently.
    pub fn is_idempotent(&self) -> bool {
        self.idempotence && self.acks == Acks::All
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ClientError::InvalidInput(m));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be at least 1".into());
        }
        // Permits are taken with `acquire_many(u32)`.
        if self.buffer_memory == 0 || self.buffer_memory > u32::MAX as usize {
            return bad(format!(
                "buffer_memory must be between 1 and {} bytes",
                u32::MAX
            ));
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout must be positive".into());
        }
        if self.delivery_timeout <= self.linger {
            return bad("delivery_timeout must be longer than linger".into());
        }
        if self.is_idempotent() && self.max_in_flight > MAX_IDEMPOTENT_IN_FLIGHT {
            return bad(format!(
                "max_in_flight must be at most {MAX_IDEMPOTENT_IN_FLIGHT} with idempotence (or turn idempotence off)"
            ));
        }
        if self
            .instance_id
            .as_ref()
            .is_some_and(|i| i.is_empty() || i.len() > 255 || i.chars().any(char::is_control))
        {
            return bad("instance_id must be 1 to 255 bytes without control characters".into());
        }
        Ok(())
    }
}

/// A record to send. Build with [`ProducerRecord::new`] and the setters, or fill the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    pub topic: String,
    /// `None` picks one: by key hash when there is a key, sticky otherwise.
    pub partition: Option<u32>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// Header keys are UTF-8 (as in Kafka); values are bytes or null.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the epoch; `None` means now.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            value: Some(value.into()),
            ..Self::default()
        }
    }

    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), Some(value.into())));
        self
    }

    pub fn timestamp_ms(mut self, ts: i64) -> Self {
        self.timestamp_ms = Some(ts);
        self
    }

    /// Upper bound of the encoded size: varints take at most 5 (lengths) or 10 (timestamp
    /// delta) bytes. Used for memory accounting and batch sizing.
    fn estimated_size(&self) -> usize {
        let opt = |b: &Option<Bytes>| 5 + b.as_ref().map_or(0, Bytes::len);
        let headers: usize = self.headers.iter().map(|(k, v)| 5 + k.len() + opt(v)).sum();
        5 + 1 + 10 + 5 + opt(&self.key) + opt(&self.value) + 5 + headers
    }
}

/// Where a record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    pub topic: Arc<str>,
    pub partition: u32,
    /// `None` with [`Acks::None`], where the producer does not report offsets (as Kafka's
    /// `acks=0` cannot).
    pub offset: Option<u64>,
    /// The record's timestamp as written (the producer's clock when not given).
    pub timestamp_ms: i64,
}

/// Resolves when the record is acknowledged, or fails with the reason it never will be.
#[derive(Debug)]
#[must_use = "a record's delivery can fail; await the future to find out"]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Result<RecordMetadata>>,
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            // The sender task is gone without answering: the runtime shut down under it.
            Poll::Ready(Err(_)) => Poll::Ready(Err(ClientError::ProducerClosed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// State shared by `send` callers and the sender task.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Wakes the sender: a batch opened or closed, a flush started, the producer closed.
    pub(crate) wake: Notify,
    pub(crate) memory: Arc<Semaphore>,
    pub(crate) flushing: AtomicUsize,
    pub(crate) closing: AtomicBool,
    /// Lowest id of a batch not yet finished; `flush` waits for it to pass its target.
    pub(crate) min_incomplete: watch::Sender<u64>,
}

pub(crate) struct State {
    pub(crate) acc: Accumulator,
    pub(crate) sticky: StickyPartitioner,
}

impl Shared {
    fn flushing(&self) -> bool {
        self.flushing.load(Ordering::Acquire) > 0 || self.closing.load(Ordering::Acquire)
    }
}

/// A Kafka-style batching producer, from [`Client::producer`]. Cheap to clone; clones share
/// batches and connections. Dropping the last clone sends what is buffered in the background;
/// call [`close`](Self::close) to wait for it.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<ProducerInner>,
}

struct ProducerInner {
    client: Client,
    config: ProducerConfig,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for ProducerInner {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.memory.close();
        self.shared.wake.notify_one();
    }
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Decrements the flush count even if the flushing future is dropped.
struct FlushGuard<'a>(&'a AtomicUsize);

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Producer {
    pub(crate) fn new(client: Client, config: ProducerConfig) -> Result<Self> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ClientError::InvalidInput("a producer must be created inside a tokio runtime".into())
        })?;
        let acc = Accumulator::new(AccumulatorConfig {
            batch_size: config.batch_size,
            linger: config.linger,
            compression: config.compression,
            max_in_flight: config.max_in_flight,
            delivery_timeout: config.delivery_timeout,
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                acc,
                sticky: StickyPartitioner::default(),
            }),
            wake: Notify::new(),
            memory: Arc::new(Semaphore::new(config.buffer_memory)),
            flushing: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            min_incomplete: watch::Sender::new(0),
        });
        let task = runtime
            .spawn(sender::Sender::new(client.clone(), config.clone(), shared.clone()).run());
        Ok(Self {
            inner: Arc::new(ProducerInner {
                client,
                config,
                shared,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// Queues a record and returns a future for its acknowledgement. Waits only when the
    /// producer's buffer memory is full (back-pressure) or the topic's metadata is not cached
    /// yet. Fails at once for an unknown topic or partition, a record too large to ever send,
    /// or a closed producer.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        let shared = &self.inner.shared;
        if shared.closing.load(Ordering::Acquire) {
            return Err(ClientError::ProducerClosed);
        }
        let size = record.estimated_size();
        let config = &self.inner.config;
        if size > config.buffer_memory {
            return Err(ClientError::RecordTooLarge {
                size,
                limit: config.buffer_memory,
                setting: "buffer_memory",
            });
        }
        let max_message = self.inner.client.inner.config.max_message_size;
        // Room for the request envelope around the batch.
        if size + HEADER_LEN + 1024 > max_message {
            return Err(ClientError::RecordTooLarge {
                size,
                limit: max_message.saturating_sub(HEADER_LEN + 1024),
                setting: "max_message_size",
            });
        }
        if record
            .headers
            .iter()
            .any(|(k, _)| k.len() > i32::MAX as usize)
        {
            return Err(ClientError::InvalidInput("header key too long".into()));
        }
        let count = self.inner.client.partition_count(&record.topic).await?;
        if let Some(p) = record.partition
            && p >= count
        {
            return Err(ClientError::UnknownPartition {
                message: format!(
                    "unknown partition {p} of topic {:?}, which has {count} partitions",
                    record.topic
                ),
                definite: true,
            });
        }
        let permit = shared
            .memory
            .clone()
            .acquire_many_owned(size as u32)
            .await
            .map_err(|_| ClientError::ProducerClosed)?;
        let (tx, rx) = oneshot::channel();
        let timestamp = record.timestamp_ms.unwrap_or_else(now_ms);
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        let rec = RecordRef {
            timestamp,
            key: record.key.as_deref(),
            value: record.value.as_deref(),
            headers: &headers,
        };
        let outcome = {
            let mut state = lock(&shared.state);
            let State { acc, sticky } = &mut *state;
            let partition = match (record.partition, &record.key) {
                (Some(p), _) => p,
                (None, Some(key)) => partition_for_key(key, count),
                (None, None) => {
                    let metadata = &self.inner.client.inner.metadata;
                    sticky.partition(
                        &record.topic,
                        count,
                        |p| acc.needs_new_batch(&record.topic, p, size),
                        |p| read(metadata).has_leader(&record.topic, p),
                    )
                }
            };
            acc.append(
                &record.topic,
                partition,
                &rec,
                PendingRecord {
                    timestamp,
                    done: tx,
                },
                size,
                permit,
                Instant::now(),
            )?
        };
        if outcome.opened || outcome.closed {
            shared.wake.notify_one();
        }
        Ok(DeliveryFuture { rx })
    }

    /// Sends everything buffered now and waits until every record sent before this call is
    /// acknowledged or failed (the failures are reported by their futures).
    pub async fn flush(&self) -> Result<()> {
        let shared = &self.inner.shared;
        let target = lock(&shared.state).acc.next_id();
        shared.flushing.fetch_add(1, Ordering::AcqRel);
        let _guard = FlushGuard(&shared.flushing);
        shared.wake.notify_one();
        let mut rx = shared.min_incomplete.subscribe();
        rx.wait_for(|&min| min >= target)
            .await
            .map(|_| ())
            .map_err(|_| ClientError::ProducerClosed)
    }

    /// Stops accepting records, delivers what is buffered and waits for the sender task to
    /// finish. Sends from other clones fail with [`ClientError::ProducerClosed`] afterwards.
    pub async fn close(&self) -> Result<()> {
        let shared = &self.inner.shared;
        shared.closing.store(true, Ordering::Release);
        shared.memory.close();
        shared.wake.notify_one();
        let task = lock(&self.inner.task).take();
        if let Some(task) = task {
            task.await.map_err(|e| {
                ClientError::InvalidInput(format!("producer sender task failed: {e}"))
            })?;
        } else {
            // Another clone is closing: wait for the same end.
            let target = lock(&shared.state).acc.next_id();
            let mut rx = shared.min_incomplete.subscribe();
            let _ = rx.wait_for(|&min| min >= target).await;
        }
        Ok(())
    }

    /// Low-level: sends one already encoded batch (see `keel_batch::BatchBuilder`) to a
    /// partition's leader with a unary `Produce`, bypassing batching. Retries only failures
    /// the broker reports as definite (e.g. `NOT_LEADER`), so it never duplicates a batch.
    /// Meant for benchmarks and tools that build batches themselves.
    pub async fn send_batch(
        &self,
        topic: &str,
        partition: u32,
        encoded_batch: Bytes,
        acks: Acks,
    ) -> Result<BatchAck> {
        let config = &self.inner.config;
        let timeout_ms = millis_u32(config.request_timeout);
        let deadline = Instant::now() + config.delivery_timeout;
        let req = ProduceRequest {
            correlation_id: 0,
            topic: topic.to_owned(),
            acks: acks.to_proto() as i32,
            timeout_ms,
            batches: vec![ProduceBatch {
                partition: Some(partition),
                data: Some(produce_batch::Data::RecordBatch(encoded_batch)),
                producer: None,
            }],
        };
        let client = &self.inner.client;
        let attempt = client.attempt(req, |mut s: ProduceServiceClient<Channel>, r| async move {
            s.produce(r).await
        });
        let leader = PartitionLeader(topic, partition);
        let resp = client
            .call_routed(&leader, deadline, false, attempt)
            .await?;
        resp.batches.into_iter().next().ok_or_else(|| {
            ClientError::Protocol(format!(
                "Produce to {} answered without a batch ack",
                Tp(topic, partition)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_is_an_upper_bound() {
        let rec = ProducerRecord::new("t", vec![1u8; 300])
            .key("k")
            .header("h", "v")
            .timestamp_ms(i64::MAX);
        let headers = [("h", Some(&b"v"[..]))];
        let mut b = keel_batch::BatchBuilder::new(Compression::None);
        let r = RecordRef {
            timestamp: i64::MAX,
            key: Some(b"k"),
            value: Some(&[1u8; 300]),
            headers: &headers,
        };
        b.push(&r).expect("push");
        assert!(b.size_bytes() - HEADER_LEN <= rec.estimated_size());
    }

    #[test]
    fn acks_parse() {
        assert_eq!("all".parse::<Acks>().ok(), Some(Acks::All));
        assert_eq!("leader".parse::<Acks>().ok(), Some(Acks::Leader));
        assert_eq!("none".parse::<Acks>().ok(), Some(Acks::None));
        assert!("most".parse::<Acks>().is_err());
    }

    #[test]
    fn config_validation() {
        assert!(ProducerConfig::default().validate().is_ok());
        assert!(ProducerConfig::default().batch_size(0).validate().is_err());
        assert!(
            ProducerConfig::default()
                .max_in_flight(0)
                .validate()
                .is_err()
        );
        assert!(
            ProducerConfig::default()
                .max_in_flight(6)
                .validate()
                .is_err()
        );
        assert!(
            ProducerConfig::default()
                .max_in_flight(6)
                .idempotence(false)
                .validate()
                .is_ok()
        );
        assert!(
            ProducerConfig::default()
                .buffer_memory(usize::MAX)
                .validate()
                .is_err()
        );
    }

    #[tokio::test]
    async fn oversized_records_fail_before_any_io() {
        let client = Client::connect_lazy(&["127.0.0.1:1"], Default::default()).expect("client");
        let p = client
            .producer(ProducerConfig::default().buffer_memory(1000))
            .expect("producer");
        let err = p
            .send(ProducerRecord::new("t", vec![0u8; 2000]))
            .await
            .err();
        assert!(
            matches!(
                err,
                Some(ClientError::RecordTooLarge {
                    setting: "buffer_memory",
                    ..
                })
            ),
            "{err:?}"
        );
        p.close().await.expect("close");
        let err = p.send(ProducerRecord::new("t", "x")).await.err();
        assert!(matches!(err, Some(ClientError::ProducerClosed)), "{err:?}");
    }
}
