//! Fetch, Subscribe and ListOffsets.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use futures::future::select_all;
use keel_batch::{BatchError, BatchIter, decode_records};
use keel_log::ReadSlice;
use keel_proto::v1::consume_service_server::ConsumeService;
use keel_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::{BrokerError, Result};
use crate::partition::Partition;
use crate::state::Shared;

#[derive(Debug, Clone)]
pub struct Consume(pub Shared);

fn decoded(format: i32) -> Result<bool> {
    match RecordFormat::try_from(format) {
        Ok(RecordFormat::Unspecified | RecordFormat::Decoded) => Ok(true),
        Ok(RecordFormat::Batches) => Ok(false),
        Err(_) => Err(BrokerError::invalid(
            "format",
            format!("unknown value {format}"),
        )),
    }
}

/// Decodes the records at or after `from` in a read slice, spending at most `budget` bytes of
/// decompressed data (shared across a request), so a small compressed batch cannot make the
/// broker allocate without bound. The first batch of a request may use up to `first_limit`; a
/// batch larger than that is an error telling the client to fetch raw batches. Returns the
/// records and the offset after the last batch decoded.
fn decode(
    slice: &ReadSlice,
    from: u64,
    budget: &mut u64,
    first_limit: u64,
    first_in_request: &mut bool,
) -> Result<(Vec<ConsumedRecord>, u64)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut next = from;
    for item in BatchIter::new(&slice.bytes) {
        let (h, raw) = item.map_err(|e| BrokerError::Storage {
            message: format!("stored batch failed to decode: {e}"),
            definite: true,
        })?;
        let bytes = slice.bytes.slice(pos..pos + raw.len());
        pos += raw.len();
        if h.attributes.control {
            next = next.max(h.next_offset());
            continue;
        }
        let limit = if *first_in_request {
            first_limit
        } else {
            *budget
        };
        if limit == 0 {
            break;
        }
        let records = match decode_records(&bytes, limit as usize) {
            Ok(r) => r,
            Err(BatchError::TooLarge { .. } | BatchError::Decompress(_)) if !*first_in_request => {
                break;
            }
            Err(BatchError::TooLarge { .. } | BatchError::Decompress(_))
                if h.attributes.compression != keel_batch::Compression::None =>
            {
                return Err(BrokerError::DecodeTooLarge {
                    offset: h.base_offset,
                    limit,
                });
            }
            Err(e) => {
                return Err(BrokerError::Storage {
                    message: format!("stored batch failed to decode: {e}"),
                    definite: true,
                });
            }
        };
        *first_in_request = false;
        let size: u64 = records
            .iter()
            .map(|r| {
                (r.key.as_ref().map_or(0, Bytes::len)
                    + r.value.as_ref().map_or(0, Bytes::len)
                    + r.headers
                        .iter()
                        .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len))
                        .sum::<usize>()
                    + 16) as u64
            })
            .sum();
        *budget = budget.saturating_sub(size);
        next = next.max(h.next_offset());
        out.extend(records.into_iter().filter(|r| r.offset >= from).map(|r| {
            ConsumedRecord {
                offset: r.offset,
                timestamp_ms: r.timestamp,
                key: r.key,
                value: r.value,
                headers: r
                    .headers
                    .into_iter()
                    .map(|h| RecordHeader {
                        key: h.key,
                        value: h.value,
                    })
                    .collect(),
            }
        }));
    }
    Ok((out, next))
}

fn next_offset(slice: &ReadSlice, from: u64) -> u64 {
    slice.last.map_or(from, |h| h.next_offset().max(from))
}

impl Consume {
    fn clamp_bytes(&self, requested: u32, field: &'static str) -> Result<u32> {
        let l = &self.0.limits;
        match requested {
            0 => Ok(l.default_fetch_bytes),
            n => BrokerError::at_most(field, n, l.max_fetch_bytes, "bytes").map(|()| n),
        }
    }

    async fn fetch_inner(&self, r: FetchRequest) -> Result<FetchResponse> {
        let st = &self.0;
        if r.partitions.is_empty() {
            return Err(BrokerError::invalid(
                "partitions",
                "at least one partition is required",
            ));
        }
        if r.partitions.len() > st.limits.max_fetch_partitions {
            return Err(BrokerError::invalid(
                "partitions",
                format!(
                    "{} partitions exceed the limit of {}",
                    r.partitions.len(),
                    st.limits.max_fetch_partitions
                ),
            ));
        }
        BrokerError::at_most("max_wait_ms", r.max_wait_ms, st.limits.max_wait_ms, "ms")?;
        let max_bytes = u64::from(self.clamp_bytes(r.max_bytes, "max_bytes")?);
        let want_decoded = decoded(r.format)?;
        let mut parts: Vec<(Arc<Partition>, FetchPartition)> =
            Vec::with_capacity(r.partitions.len());
        for fp in r.partitions {
            let p = Arc::clone(
                st.registry
                    .lookup("partitions.topic", &fp.topic)?
                    .partition(fp.partition)?,
            );
            p.ready_to_read().await?;
            p.check_offset(fp.offset)?;
            let limit = st.limits.max_fetch_bytes;
            BrokerError::at_most("partitions.max_bytes", fp.max_bytes, limit, "bytes")?;
            parts.push((p, fp));
        }
        let min_bytes = u64::from(r.min_bytes.max(1));
        let deadline = Instant::now() + Duration::from_millis(u64::from(r.max_wait_ms));
        let mut watches: Vec<_> = parts.iter().map(|(p, _)| p.watch_hwm()).collect();
        loop {
            let mut total = 0u64;
            let mut slices = Vec::with_capacity(parts.len());
            for (p, fp) in &parts {
                let budget = max_bytes.saturating_sub(total);
                if budget == 0 {
                    slices.push(None);
                    continue;
                }
                let limit = if fp.max_bytes == 0 {
                    budget
                } else {
                    budget.min(u64::from(fp.max_bytes))
                };
                let slice = p.read(fp.offset, limit)?;
                total += slice.bytes.len() as u64;
                slices.push(Some(slice));
            }
            if total >= min_bytes || Instant::now() >= deadline || st.is_shutting_down() {
                let mut out = Vec::with_capacity(parts.len());
                let mut budget = max_bytes;
                let mut first = true;
                let first_limit = u64::from(st.limits.max_fetch_bytes);
                for ((p, fp), slice) in parts.iter().zip(slices) {
                    let slice = slice.unwrap_or(ReadSlice {
                        bytes: Bytes::new(),
                        last: None,
                    });
                    let (record_batches, records, next) = if want_decoded {
                        let (r, next) =
                            decode(&slice, fp.offset, &mut budget, first_limit, &mut first)?;
                        (Bytes::new(), r, next)
                    } else {
                        (
                            slice.bytes.clone(),
                            Vec::new(),
                            next_offset(&slice, fp.offset),
                        )
                    };
                    out.push(FetchedPartition {
                        topic: fp.topic.clone(),
                        partition: fp.partition,
                        high_watermark: p.high_watermark(),
                        log_start_offset: p.log_start_offset(),
                        next_offset: next,
                        record_batches,
                        records,
                    });
                }
                metrics::counter!("keel_fetch_bytes_total").increment(total);
                return Ok(FetchResponse { partitions: out });
            }
            // Wait for any partition to grow, the deadline, or shutdown.
            let changed = select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
            let mut shutdown = st.shutdown.clone();
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ConsumeService for Consume {
    #[tracing::instrument(level = "debug", skip_all, fields(partitions = req.get_ref().partitions.len()))]
    async fn fetch(&self, req: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        let started = Instant::now();
        let resp = self.fetch_inner(req.into_inner()).await?;
        metrics::counter!("keel_fetch_requests_total").increment(1);
        metrics::histogram!("keel_request_duration_seconds", "rpc" => "Fetch")
            .record(started.elapsed().as_secs_f64());
        Ok(Response::new(resp))
    }

    type SubscribeStream = SubscribeStream;

    #[tracing::instrument(level = "debug", skip_all, fields(topic = %req.get_ref().topic, partition = req.get_ref().partition))]
    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let st = Arc::clone(&self.0);
        let topic = st.registry.lookup("topic", &r.topic)?;
        let p = Arc::clone(topic.partition(r.partition)?);
        p.ready_to_read().await?;
        let max_bytes = u64::from(self.clamp_bytes(r.max_bytes, "max_bytes")?);
        let want_decoded = decoded(r.format)?;
        let mut pos = match r.start {
            Some(subscribe_request::Start::Offset(o)) => {
                p.check_offset(o)?;
                o
            }
            Some(subscribe_request::Start::TimestampMs(ts)) => p
                .offset_for_timestamp(ts)?
                .map_or_else(|| p.high_watermark(), |(o, _)| o),
            Some(subscribe_request::Start::Position(pos)) => match StartPosition::try_from(pos) {
                Ok(StartPosition::Earliest) => p.log_start_offset(),
                Ok(StartPosition::Latest) => p.high_watermark(),
                _ => {
                    return Err(BrokerError::invalid(
                        "position",
                        format!("must be EARLIEST or LATEST, got {pos}"),
                    )
                    .into());
                }
            },
            None => {
                return Err(
                    BrokerError::invalid("start", "set offset, position or timestamp_ms").into(),
                );
            }
        };
        // Capacity 1: the task reads the next message only once the previous one was taken by
        // the transport, which HTTP/2 flow control only does as fast as the client reads.
        let (tx, rx) = mpsc::channel::<Result<SubscribeResponse, Status>>(1);
        let mut hwm = p.watch_hwm();
        let mut shutdown = st.shutdown.clone();
        let topic_name = r.topic.clone();
        tokio::spawn(async move {
            loop {
                if st.registry.get(&topic_name).map_or(true, |t| {
                    !t.partitions
                        .get(p.id as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|q| Arc::ptr_eq(q, &p))
                }) {
                    let _ = tx
                        .send(Err(BrokerError::UnknownTopic(topic_name.clone()).into()))
                        .await;
                    return;
                }
                let slice = match p.read(pos, max_bytes) {
                    Ok(s) => s,
                    Err(e) => {
                        // Retention may have deleted `pos`: the consumer is told, not skipped.
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if slice.last.is_some() {
                    let (record_batches, records, next) = if want_decoded {
                        let (mut budget, mut first) = (max_bytes, true);
                        match decode(
                            &slice,
                            pos,
                            &mut budget,
                            u64::from(st.limits.max_fetch_bytes),
                            &mut first,
                        ) {
                            Ok((r, next)) => (Bytes::new(), r, next),
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        }
                    } else {
                        (slice.bytes.clone(), Vec::new(), next_offset(&slice, pos))
                    };
                    let msg = SubscribeResponse {
                        partition: p.id,
                        high_watermark: p.high_watermark(),
                        log_start_offset: p.log_start_offset(),
                        next_offset: next,
                        record_batches,
                        records,
                    };
                    pos = next;
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    continue;
                }
                tokio::select! {
                    r = hwm.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => {
                        let _ = tx.send(Err(BrokerError::ShuttingDown.into())).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    // Re-check periodically so a deleted topic ends its subscriptions.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_offsets(
        &self,
        req: Request<ListOffsetsRequest>,
    ) -> Result<Response<ListOffsetsResponse>, Status> {
        let r = req.into_inner();
        let p = Arc::clone(
            self.0
                .registry
                .lookup("topic", &r.topic)?
                .partition(r.partition)?,
        );
        p.ready_to_read().await?;
        let (offset, timestamp_ms) = match r.spec {
            Some(list_offsets_request::Spec::Position(pos)) => match StartPosition::try_from(pos) {
                Ok(StartPosition::Earliest) => (p.log_start_offset(), 0),
                Ok(StartPosition::Latest) => (p.high_watermark(), 0),
                _ => {
                    return Err(BrokerError::invalid(
                        "position",
                        format!("must be EARLIEST or LATEST, got {pos}"),
                    )
                    .into());
                }
            },
            Some(list_offsets_request::Spec::TimestampMs(ts)) => {
                let p2 = Arc::clone(&p);
                let found = tokio::task::spawn_blocking(move || p2.offset_for_timestamp(ts))
                    .await
                    .map_err(BrokerError::from)??;
                found.unwrap_or((p.high_watermark(), 0))
            }
            None => return Err(BrokerError::invalid("spec", "set position or timestamp_ms").into()),
        };
        Ok(Response::new(ListOffsetsResponse {
            offset,
            timestamp_ms,
            log_start_offset: p.log_start_offset(),
            high_watermark: p.high_watermark(),
        }))
    }
}
