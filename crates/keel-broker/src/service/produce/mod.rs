//! Produce, ProduceStream and InitProducer: the gRPC handlers around the pure validation in
//! [`plan`] and [`init_producer`].
//!
//! The handler looks the topic up, has [`plan::plan`] check and encode the request, appends the
//! planned batches in order, waits for them to commit, and answers ([`response`]).

mod encode;
pub mod init_producer;
pub mod plan;
mod response;
#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use keel_proto::v1::produce_service_server::ProduceService;
use keel_proto::v1::*;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use self::init_producer::{InitProducer, check_init_producer};
use self::plan::{Lookups, Plan, ProduceLimits};
use self::response::build_response;
use crate::error::{BrokerError, Result};
use crate::partition::{Appended, Partition, Pending};
use crate::registry::Topic;
use crate::state::{BrokerState, Shared};

#[derive(Debug, Clone)]
pub struct Produce(pub Shared);

/// A validated request and the topic it writes (for metrics).
struct Accepted {
    plan: Plan<Arc<Partition>>,
    topic: Arc<Topic>,
}

/// The broker's answers to validation's questions about one topic.
struct TopicLookups<'a> {
    state: &'a BrokerState,
    topic: &'a Topic,
}

impl Lookups for TopicLookups<'_> {
    type Partition = Arc<Partition>;

    fn partition_count(&self) -> u32 {
        self.topic.partition_count()
    }

    fn partition(&self, id: u32) -> Result<Arc<Partition>> {
        self.topic.partition(id).map(Arc::clone)
    }

    fn next_sticky(&self) -> u32 {
        self.topic.next_sticky()
    }

    fn producer_epoch(&self, producer_id: i64) -> Option<i16> {
        self.state.producer_epoch(producer_id)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Produce {
    /// Looks the topic up and validates the whole request, before any side effect.
    fn plan(&self, req: ProduceRequest) -> Result<Accepted> {
        let st = &self.0;
        if st.is_shutting_down() {
            return Err(BrokerError::ShuttingDown);
        }
        plan::check_writable_topic(&req.topic)?;
        let topic = st.registry.lookup("topic", &req.topic)?;
        let limits = ProduceLimits {
            max_produce_timeout_ms: st.limits.max_produce_timeout_ms,
            max_batches_per_request: st.limits.max_batches_per_request,
            max_records_per_batch: st.limits.max_records_per_batch,
            max_message_bytes: topic.config.max_message_bytes,
        };
        let lookups = TopicLookups {
            state: st,
            topic: &topic,
        };
        let plan = plan::plan(req, &limits, &lookups, now_ms())?;
        Ok(Accepted { plan, topic })
    }

    /// Appends a plan's batches in order. Returns their pending appends.
    async fn append_all(accepted: &Accepted) -> Result<Vec<Pending>> {
        let Accepted { plan, topic } = accepted;
        let mut infos = Vec::with_capacity(plan.batches.len());
        for b in &plan.batches {
            let admitted = if plan.acks_all {
                b.partition
                    .check_min_insync(topic.config.min_insync_replicas)
            } else {
                Ok(())
            };
            let appended = match admitted {
                Ok(()) => b.partition.append_only(b.batch.clone(), b.producer).await,
                Err(e) => Err(e),
            };
            match appended {
                Ok(info) => infos.push(info),
                Err(e) if infos.is_empty() => return Err(e),
                Err(e) => return Err(e.after_write()),
            }
        }
        metrics::counter!("keel_produce_batches_total", "topic" => topic.meta.name.clone())
            .increment(plan.batches.len() as u64);
        let records: u64 = plan.batches.iter().map(|b| u64::from(b.records)).sum();
        let bytes: u64 = plan
            .batches
            .iter()
            .map(|b| b.batch.bytes().len() as u64)
            .sum();
        metrics::counter!("keel_produce_records_total", "topic" => topic.meta.name.clone())
            .increment(records);
        metrics::counter!("keel_produce_bytes_total", "topic" => topic.meta.name.clone())
            .increment(bytes);
        Ok(infos)
    }

    /// Waits for durability and builds the response.
    async fn finish(
        accepted: Accepted,
        pending: Vec<Pending>,
        correlation_id: u64,
    ) -> Result<ProduceResponse> {
        let plan = accepted.plan;
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
        let InitProducer {
            instance,
            bump,
            request_id,
        } = check_init_producer(req)?;
        let (producer_id, epoch) = self.0.init_producer(request_id, instance, bump).await?;
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
            tokio::task::JoinHandle<Result<Accepted>>,
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
