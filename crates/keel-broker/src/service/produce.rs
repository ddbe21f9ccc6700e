//! Produce and ProduceStream.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use keel_log::batch::{
    BatchBuilder, BatchError, Compression, DEFAULT_MAX_DECOMPRESSED, ProducerInfo, RecordRef,
    VerifiedBatch,
};
use keel_proto::v1::produce_batch::Data;
use keel_proto::v1::produce_service_server::ProduceService;
use keel_proto::v1::*;
use keel_types::partition_for_key;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::error::{BrokerError, Result};
use crate::partition::{Appended, Idempotent, Partition, Pending};
use crate::registry::Topic;
use crate::state::Shared;

#[derive(Debug, Clone)]
pub struct Produce(pub Shared);

/// How far a batch may expand when decompressed, relative to `max.message.bytes`.
const MAX_COMPRESSION_RATIO: u64 = 16;

/// One batch ready to append.
struct Prepared {
    partition: Arc<Partition>,
    /// Checked here, once: the log appends it without reading it again.
    batch: VerifiedBatch,
    records: u32,
    /// Index of the request batch it came from.
    source: usize,
    /// For plain records: the input positions of its records within the source batch.
    positions: Option<Vec<usize>>,
    producer: Option<Idempotent>,
}

/// Longest accepted `instance_id`.
const MAX_INSTANCE_ID: usize = 255;

/// Checks a batch's idempotent-producer fields; `None` for a plain batch.
fn idempotent(
    st: &crate::state::BrokerState,
    index: usize,
    producer_id: i64,
    epoch: i64,
    base_sequence: i64,
    records: u32,
) -> Result<Option<Idempotent>> {
    if producer_id < 0 {
        return Ok(None);
    }
    let bad = |field: &'static str, what: String| {
        Err(BrokerError::invalid(
            field,
            format!("batches[{index}]: {what}"),
        ))
    };
    if producer_id == 0 {
        return bad(
            "producer_id",
            "0 is not a producer id (ids start at 1; get one with InitProducer)".into(),
        );
    }
    let Ok(epoch) = i16::try_from(epoch) else {
        return bad("producer_epoch", format!("{epoch} is outside 0..=32767"));
    };
    if epoch < 0 {
        return bad("producer_epoch", format!("{epoch} is outside 0..=32767"));
    }
    let Ok(first) = i32::try_from(base_sequence) else {
        return bad(
            "base_sequence",
            format!("{base_sequence} is outside 0..=2147483647"),
        );
    };
    if first < 0 {
        return bad(
            "base_sequence",
            format!("{first} is outside 0..=2147483647"),
        );
    }
    if let Some(current) = st.producer_epoch(producer_id)
        && epoch < current
    {
        return Err(BrokerError::ProducerFenced {
            producer_id,
            epoch,
            current,
        });
    }
    Ok(Some(Idempotent {
        producer_id,
        epoch,
        first_seq: first,
        last_seq: keel_raft::producers::last_sequence(first, records),
    }))
}

struct Plan {
    timeout: Duration,
    batches: Vec<Prepared>,
    /// Per request batch: its record count (plain records) or `None` (encoded batch).
    sources: Vec<Option<usize>>,
    topic: Arc<Topic>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Produce {
    /// Validates a whole request and encodes plain records, before any side effect.
    fn plan(&self, req: ProduceRequest) -> Result<Plan> {
        let st = &self.0;
        if st.is_shutting_down() {
            return Err(BrokerError::ShuttingDown);
        }
        if req.topic == crate::groups::coordinator::OFFSETS_TOPIC {
            return Err(BrokerError::invalid(
                "topic",
                "__consumer_offsets is internal: only group coordinators write to it",
            ));
        }
        let topic = st.registry.lookup("topic", &req.topic)?;
        // Every level is answered once the batch is committed: the offsets are only known
        // when the Raft group applies it (docs/api.md, "acks").
        if Acks::try_from(req.acks).is_err() {
            return Err(BrokerError::invalid(
                "acks",
                format!("unknown value {}", req.acks),
            ));
        }
        let timeout_ms = match req.timeout_ms {
            0 => 30_000,
            t => {
                let limit = st.limits.max_produce_timeout_ms;
                BrokerError::at_most("timeout_ms", t, limit, "ms")?;
                t
            }
        };
        if req.batches.is_empty() {
            return Err(BrokerError::invalid(
                "batches",
                "at least one batch is required",
            ));
        }
        if req.batches.len() > st.limits.max_batches_per_request {
            return Err(BrokerError::invalid(
                "batches",
                format!(
                    "{} batches exceed the limit of {} per request",
                    req.batches.len(),
                    st.limits.max_batches_per_request
                ),
            ));
        }
        let max_message = topic.config.max_message_bytes;
        // Decompressing is bounded too: a small batch must not expand without limit.
        let max_decompressed = (max_message.saturating_mul(MAX_COMPRESSION_RATIO) as usize)
            .min(DEFAULT_MAX_DECOMPRESSED);
        let mut batches = Vec::with_capacity(req.batches.len());
        let mut sources = Vec::with_capacity(req.batches.len());
        for (i, b) in req.batches.into_iter().enumerate() {
            match b.data {
                None => {
                    return Err(BrokerError::invalid(
                        "batches.data",
                        format!("batches[{i}] sets neither record_batch nor records"),
                    ));
                }
                Some(Data::RecordBatch(bytes)) => {
                    if b.producer.is_some() {
                        return Err(BrokerError::invalid(
                            "batches.producer",
                            format!(
                                "batches[{i}]: an encoded record_batch carries its producer fields in its header"
                            ),
                        ));
                    }
                    let pid = b.partition.ok_or_else(|| {
                        BrokerError::invalid(
                            "batches.partition",
                            format!("batches[{i}]: a record_batch needs an explicit partition"),
                        )
                    })?;
                    let partition = Arc::clone(topic.partition(pid)?);
                    if bytes.len() as u64 > max_message {
                        return Err(BrokerError::TooLarge {
                            what: "record batch",
                            size: bytes.len() as u64,
                            limit: max_message,
                            setting: "max.message.bytes",
                        });
                    }
                    let batch =
                        VerifiedBatch::validate(bytes, max_decompressed).map_err(|e| match e {
                            BatchError::TooLarge { size, limit } => BrokerError::TooLarge {
                                what: "decompressed record batch",
                                size,
                                limit,
                                setting: "16 x max.message.bytes, at most 64 MiB",
                            },
                            other => BrokerError::CorruptBatch {
                                index: i,
                                reason: other.to_string(),
                            },
                        })?;
                    let header = *batch.header();
                    if header.attributes.control {
                        return Err(BrokerError::CorruptBatch {
                            index: i,
                            reason: "control batches are reserved for the broker".into(),
                        });
                    }
                    if u64::from(header.last_offset_delta) + 1 != u64::from(header.record_count) {
                        return Err(BrokerError::CorruptBatch {
                            index: i,
                            reason: format!(
                                "last_offset_delta {} must be record_count - 1 ({})",
                                header.last_offset_delta,
                                header.record_count.saturating_sub(1)
                            ),
                        });
                    }
                    if header.record_count > st.limits.max_records_per_batch {
                        return Err(BrokerError::invalid(
                            "batches.record_batch",
                            format!(
                                "batches[{i}] holds {} records; the limit is {}",
                                header.record_count, st.limits.max_records_per_batch
                            ),
                        ));
                    }
                    let producer = idempotent(
                        st,
                        i,
                        header.producer_id,
                        i64::from(header.producer_epoch),
                        i64::from(header.base_sequence),
                        header.record_count,
                    )?;
                    sources.push(None);
                    batches.push(Prepared {
                        partition,
                        batch,
                        records: header.record_count,
                        source: i,
                        positions: None,
                        producer,
                    });
                }
                Some(Data::Records(list)) => {
                    if list.records.is_empty() {
                        return Err(BrokerError::invalid(
                            "batches.records",
                            format!("batches[{i}] has no records"),
                        ));
                    }
                    if list.records.len() as u64 > u64::from(st.limits.max_records_per_batch) {
                        return Err(BrokerError::invalid(
                            "batches.records",
                            format!(
                                "batches[{i}] holds {} records; the limit is {}",
                                list.records.len(),
                                st.limits.max_records_per_batch
                            ),
                        ));
                    }
                    let producer = match &b.producer {
                        None => None,
                        Some(f) => {
                            if b.partition.is_none() {
                                return Err(BrokerError::invalid(
                                    "batches.partition",
                                    format!(
                                        "batches[{i}]: an idempotent records batch needs an explicit partition"
                                    ),
                                ));
                            }
                            if f.producer_id < 1 {
                                return Err(BrokerError::invalid(
                                    "batches.producer.producer_id",
                                    format!(
                                        "batches[{i}]: {} is not a producer id (they start at 1)",
                                        f.producer_id
                                    ),
                                ));
                            }
                            idempotent(
                                st,
                                i,
                                f.producer_id,
                                i64::from(f.producer_epoch),
                                i64::from(f.base_sequence),
                                list.records.len() as u32,
                            )?
                        }
                    };
                    sources.push(Some(list.records.len()));
                    encode_records(
                        &topic,
                        b.partition,
                        i,
                        list.records,
                        max_message,
                        producer,
                        &mut batches,
                    )?;
                }
            }
        }
        Ok(Plan {
            timeout: Duration::from_millis(u64::from(timeout_ms)),
            batches,
            sources,
            topic,
        })
    }

    /// Appends a plan's batches in order. Returns their pending appends.
    async fn append_all(plan: &Plan) -> Result<Vec<Pending>> {
        let mut infos = Vec::with_capacity(plan.batches.len());
        for b in &plan.batches {
            match b.partition.append_only(b.batch.clone(), b.producer).await {
                Ok(info) => infos.push(info),
                Err(e) if infos.is_empty() => return Err(e),
                Err(e) => return Err(e.after_write()),
            }
        }
        metrics::counter!("keel_produce_batches_total", "topic" => plan.topic.meta.name.clone())
            .increment(plan.batches.len() as u64);
        let records: u64 = plan.batches.iter().map(|b| u64::from(b.records)).sum();
        let bytes: u64 = plan
            .batches
            .iter()
            .map(|b| b.batch.bytes().len() as u64)
            .sum();
        metrics::counter!("keel_produce_records_total", "topic" => plan.topic.meta.name.clone())
            .increment(records);
        metrics::counter!("keel_produce_bytes_total", "topic" => plan.topic.meta.name.clone())
            .increment(bytes);
        Ok(infos)
    }

    /// Waits for durability and builds the response.
    async fn finish(
        plan: Plan,
        pending: Vec<Pending>,
        correlation_id: u64,
    ) -> Result<ProduceResponse> {
        let wait = async {
            let mut done = Vec::with_capacity(pending.len());
            for (i, (b, p)) in plan.batches.iter().zip(pending).enumerate() {
                let r = b.partition.complete(p).await;
                // The first batch's failure before anything else was acknowledged keeps its
                // own definiteness; later ones follow writes that did happen.
                done.push(r.map_err(|e| if i == 0 { e } else { e.after_write() })?);
            }
            Ok::<Vec<Appended>, BrokerError>(done)
        };
        let outcome = match tokio::time::timeout(plan.timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Timeout(plan.timeout.as_millis() as u64)),
        };
        outcome.map(|infos| build_response(&plan, &infos, correlation_id))
    }
}

fn build_response(plan: &Plan, infos: &[Appended], correlation_id: u64) -> ProduceResponse {
    let mut acks: Vec<BatchAck> = plan
        .sources
        .iter()
        .map(|s| BatchAck {
            partition: 0,
            base_offset: 0,
            record_count: 0,
            records: s.map_or_else(Vec::new, |n| vec![RecordPosition::default(); n]),
        })
        .collect();
    let mut seen = vec![false; acks.len()];
    for (b, info) in plan.batches.iter().zip(infos) {
        let Some(ack) = acks.get_mut(b.source) else {
            continue;
        };
        if !seen[b.source] {
            seen[b.source] = true;
            ack.partition = b.partition.id;
            ack.base_offset = info.base_offset;
        }
        ack.record_count += b.records;
        if let Some(positions) = &b.positions {
            for (k, input) in positions.iter().enumerate() {
                if let Some(slot) = ack.records.get_mut(*input) {
                    *slot = RecordPosition {
                        partition: b.partition.id,
                        offset: info.base_offset + k as u64,
                    };
                }
            }
        }
    }
    ProduceResponse {
        correlation_id,
        batches: acks,
        error: None,
    }
}

/// Partitions plain records and encodes them as batches of at most `max_message` bytes.
fn encode_records(
    topic: &Arc<Topic>,
    explicit: Option<u32>,
    source: usize,
    records: Vec<Record>,
    max_message: u64,
    producer: Option<Idempotent>,
    out: &mut Vec<Prepared>,
) -> Result<()> {
    let count = topic.partition_count();
    // Picked only when a keyless record needs it, so keyed traffic does not move it.
    let mut sticky = None;
    let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        let pid = match (explicit, &r.key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, count),
            (None, None) => *sticky.get_or_insert_with(|| topic.next_sticky()),
        };
        by_partition.entry(pid).or_default().push(i);
        for h in &r.headers {
            if h.key.is_empty() {
                return Err(BrokerError::invalid(
                    "records.headers.key",
                    format!("batches[{source}].records[{i}] has an empty header key"),
                ));
            }
        }
    }
    let now = now_ms();
    for (pid, idxs) in by_partition {
        let partition = Arc::clone(topic.partition(pid)?);
        let fresh = || {
            let b = BatchBuilder::new(Compression::None);
            match producer {
                Some(p) => b.producer(ProducerInfo {
                    producer_id: p.producer_id,
                    producer_epoch: p.epoch,
                    base_sequence: p.first_seq,
                }),
                None => b,
            }
        };
        let mut builder = fresh();
        let mut members: Vec<usize> = Vec::new();
        let flush =
            |builder: BatchBuilder, members: Vec<usize>, out: &mut Vec<Prepared>| -> Result<()> {
                let records = builder.len();
                let bytes = builder
                    .build()
                    .map_err(|e| BrokerError::Internal(e.to_string()))?;
                if bytes.len() as u64 > max_message {
                    return Err(BrokerError::TooLarge {
                        what: "record",
                        size: bytes.len() as u64,
                        limit: max_message,
                        setting: "max.message.bytes",
                    });
                }
                // The one check of a batch this broker built (the log does not repeat it).
                let batch = VerifiedBatch::check(Bytes::from(bytes))
                    .map_err(|e| BrokerError::Internal(format!("a batch built here: {e}")))?;
                out.push(Prepared {
                    partition: Arc::clone(&partition),
                    batch,
                    records,
                    source,
                    positions: Some(members),
                    producer,
                });
                Ok(())
            };
        for i in idxs {
            let r = &records[i];
            let headers: Vec<(&str, Option<&[u8]>)> = r
                .headers
                .iter()
                .map(|h| (h.key.as_str(), h.value.as_deref()))
                .collect();
            let rec = RecordRef {
                timestamp: if r.timestamp_ms == 0 {
                    now
                } else {
                    r.timestamp_ms
                },
                key: r.key.as_deref(),
                value: r.value.as_deref(),
                headers: &headers,
            };
            let size = r.key.as_ref().map_or(0, Bytes::len)
                + r.value.as_ref().map_or(0, Bytes::len)
                + r.headers
                    .iter()
                    .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len) + 8)
                    .sum::<usize>()
                + 64;
            if !builder.is_empty() && (builder.size_bytes() + size) as u64 > max_message {
                if producer.is_some() {
                    // One sequence range is one batch.
                    return Err(BrokerError::TooLarge {
                        what: "idempotent records batch",
                        size: (builder.size_bytes() + size) as u64,
                        limit: max_message,
                        setting: "max.message.bytes",
                    });
                }
                let full = std::mem::replace(&mut builder, fresh());
                flush(full, std::mem::take(&mut members), out)?;
            }
            builder
                .push(&rec)
                .map_err(|e| BrokerError::Internal(e.to_string()))?;
            members.push(i);
        }
        flush(builder, members, out)?;
    }
    Ok(())
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProduceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ProduceService for Produce {
    #[tracing::instrument(level = "debug", skip_all, fields(topic = %req.get_ref().topic))]
    async fn produce(
        &self,
        req: Request<ProduceRequest>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let correlation_id = req.correlation_id;
        let plan = self.plan(req)?;
        // In a task of its own: a client that cancels the call must not stop a request midway
        // (an idempotent batch appended but not yet tracked would be written again on retry,
        // and an append whose completion nobody awaits may never be flushed or committed).
        let resp = tokio::spawn(async move {
            let infos = Self::append_all(&plan).await?;
            Self::finish(plan, infos, correlation_id).await
        })
        .await
        .map_err(BrokerError::from)??;
        metrics::histogram!("keel_request_duration_seconds", "rpc" => "Produce")
            .record(started.elapsed().as_secs_f64());
        Ok(Response::new(resp))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn init_producer(
        &self,
        req: Request<InitProducerRequest>,
    ) -> Result<Response<InitProducerResponse>, Status> {
        let req = req.into_inner();
        if self.0.is_shutting_down() {
            return Err(BrokerError::ShuttingDown.into());
        }
        if req.instance_id.len() > MAX_INSTANCE_ID {
            return Err(BrokerError::invalid(
                "instance_id",
                format!(
                    "{} bytes exceed the limit of {MAX_INSTANCE_ID}",
                    req.instance_id.len()
                ),
            )
            .into());
        }
        if req.instance_id.chars().any(char::is_control) {
            return Err(
                BrokerError::invalid("instance_id", "control characters are not allowed").into(),
            );
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
                    )
                    .into());
                }
                Some((id, epoch))
            }
        };
        let instance = (!req.instance_id.is_empty()).then_some(req.instance_id);
        let (producer_id, epoch) = self.0.init_producer(req.request_id, instance, bump).await?;
        Ok(Response::new(InitProducerResponse {
            producer_id,
            producer_epoch: i32::from(epoch),
        }))
    }

    type ProduceStreamStream = ResponseStream;

    async fn produce_stream(
        &self,
        req: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (out_tx, out_rx) = mpsc::channel::<Result<ProduceResponse, Status>>(16);
        // Responses leave in request order; bounded so a client that stops reading stops the
        // broker from reading its requests.
        let (pending_tx, mut pending_rx) = mpsc::channel::<
            Result<oneshot::Receiver<ProduceResponse>, Status>,
        >(self.0.limits.max_in_flight_per_stream);
        let this = self.clone();
        let mut shutdown = self.0.shutdown.clone();
        // Validation (CRC and record checks of every batch) runs in its own task per request,
        // so a stream's requests are checked on all cores; the appends then happen strictly in
        // stream order in the appender below.
        type Planned = (
            tokio::task::JoinHandle<Result<Plan>>,
            oneshot::Sender<ProduceResponse>,
            u64,
            Instant,
        );
        let (plan_tx, mut plan_rx) =
            mpsc::channel::<Planned>(self.0.limits.max_in_flight_per_stream);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = shutdown.wait_for(|s| *s) => Err(BrokerError::ShuttingDown.into()),
                };
                let req = match next {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(status) => {
                        // Undecodable or oversized message, or shutdown: end the stream with
                        // that status after the responses already owed.
                        let _ = pending_tx.send(Err(status)).await;
                        break;
                    }
                };
                let started = Instant::now();
                let correlation_id = req.correlation_id;
                let (tx, rx) = oneshot::channel();
                if pending_tx.send(Ok(rx)).await.is_err() {
                    break;
                }
                let planner = this.clone();
                let plan = tokio::spawn(async move { planner.plan(req) });
                if plan_tx
                    .send((plan, tx, correlation_id, started))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some((plan, tx, correlation_id, started)) = plan_rx.recv().await {
                let failed = move |e: BrokerError| ProduceResponse {
                    correlation_id,
                    batches: Vec::new(),
                    error: Some(e.to_proto()),
                };
                let plan = plan.await.map_err(BrokerError::from).and_then(|p| p);
                // Appends happen here, in stream order; waiting for fsync runs concurrently so
                // later requests share the next group commit.
                match plan {
                    Err(e) => {
                        let _ = tx.send(failed(e));
                    }
                    Ok(plan) => match Self::append_all(&plan).await {
                        Err(e) => {
                            let _ = tx.send(failed(e));
                        }
                        Ok(infos) => {
                            // One span per streamed request, from its append to its answer
                            // (the stream itself can live for hours).
                            let span =
                                tracing::debug_span!("produce", stream = true, correlation_id);
                            tokio::spawn(
                                async move {
                                    let resp = Self::finish(plan, infos, correlation_id)
                                        .await
                                        .unwrap_or_else(failed);
                                    metrics::histogram!("keel_request_duration_seconds", "rpc" => "ProduceStream").record(started.elapsed().as_secs_f64());
                                    let _ = tx.send(resp);
                                }
                                .instrument(span),
                            );
                        }
                    },
                }
            }
        });
        tokio::spawn(async move {
            while let Some(next) = pending_rx.recv().await {
                let item = match next {
                    Ok(rx) => match rx.await {
                        Ok(resp) => Ok(resp),
                        Err(_) => continue,
                    },
                    Err(status) => Err(status),
                };
                let end = item.is_err();
                if out_tx.send(item).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}
