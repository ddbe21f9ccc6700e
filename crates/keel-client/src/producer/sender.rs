//! The producer's background task: takes sendable batches from the accumulator, pipelines them
//! over one `ProduceStream` per leader broker, matches answers by correlation id, and retries or
//! fails batches.
//!
//! One task owns all in-flight state, so no locks are held across awaits; each broker stream
//! has a small reader task that only forwards answers (and the stream's end) as events.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_proto::v1::{ProduceBatch, ProduceRequest, ProduceResponse, produce_batch};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::accumulator::ProducerBatch;
use super::{Acks, ProducerConfig, RecordMetadata, Shared, produce_rpc};
use crate::client::Client;
use crate::error::{ClientError, Tp};
use crate::metadata::Route;
use crate::util::{backoff, backoff_cap, lock, millis_u32, read};

/// Grace beyond `request_timeout` before the client gives up on an answer, so that the broker's
/// own `TIMEOUT` (which says what happened) normally arrives first.
const RESPONSE_GRACE: Duration = Duration::from_secs(2);

enum Event {
    Response {
        resp: ProduceResponse,
    },
    Closed {
        conn: u64,
        addr: String,
        error: ClientError,
    },
    MetadataRefreshed,
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<ProduceRequest>,
}

struct InFlight {
    batch: ProducerBatch,
    conn: u64,
    addr: String,
    deadline: Instant,
}

pub(crate) struct Sender {
    client: Client,
    config: ProducerConfig,
    shared: Arc<Shared>,
    conns: HashMap<String, Conn>,
    next_conn: u64,
    in_flight: HashMap<u64, InFlight>,
    next_correlation: u64,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    refreshing: bool,
    refresh_wanted: bool,
    refresh_not_before: Instant,
}

impl Sender {
    pub(crate) fn new(client: Client, config: ProducerConfig, shared: Arc<Shared>) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            client,
            config,
            shared,
            conns: HashMap::new(),
            next_conn: 0,
            in_flight: HashMap::new(),
            next_correlation: 0,
            events_tx,
            events_rx,
            refreshing: false,
            refresh_wanted: false,
            refresh_not_before: Instant::now(),
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            let now = Instant::now();
            let flush = self.shared.flushing();
            let drained = {
                let mut state = lock(&self.shared.state);
                let metadata = read(&self.client.inner.metadata);
                state
                    .acc
                    .drain(now, flush, |t, p| match metadata.route(t, p) {
                        Route::Leader { address, .. } => Some(address),
                        _ => None,
                    })
            };
            for batch in drained.expired {
                let err = delivery_timeout(&batch, None);
                self.fail(batch, err, false);
            }
            if drained.need_metadata {
                self.refresh_wanted = true;
            }
            for (addr, batch) in drained.sendable {
                self.dispatch(addr, batch, now);
            }
            let mut wake_at = drained.next_wakeup;
            self.expire_requests(now, &mut wake_at);
            self.maybe_refresh(now, &mut wake_at);

            if self.shared.closing.load(Ordering::Acquire)
                && lock(&self.shared.state).acc.is_idle()
                && self.in_flight.is_empty()
            {
                break;
            }
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                Some(ev) = self.events_rx.recv() => {
                    self.handle(ev);
                    // Batch up whatever else arrived, so one loop turn drains many answers.
                    while let Ok(ev) = self.events_rx.try_recv() {
                        self.handle(ev);
                    }
                }
                () = self.shared.wake.notified() => {}
                () = sleep => {}
            }
        }
        tracing::debug!("producer sender stopped");
    }

    fn dispatch(&mut self, addr: String, mut batch: ProducerBatch, now: Instant) {
        let bytes = match batch.encoded() {
            Ok(b) => b,
            Err(e) => return self.fail(batch, e, true),
        };
        let (conn_id, tx) = match self.conn(&addr) {
            Ok(c) => (c.id, c.tx.clone()),
            Err(e) => return self.on_failure(batch, e),
        };
        let correlation_id = self.next_correlation;
        self.next_correlation += 1;
        let req = ProduceRequest {
            correlation_id,
            topic: batch.topic.to_string(),
            acks: self.config.acks.to_proto() as i32,
            timeout_ms: millis_u32(self.config.request_timeout),
            batches: vec![ProduceBatch {
                partition: Some(batch.partition),
                data: Some(produce_batch::Data::RecordBatch(bytes)),
            }],
        };
        if tx.send(req).is_err() {
            // The stream task ended before we noticed; nothing was sent on it.
            self.drop_conn(&addr, conn_id);
            let err = ClientError::Unavailable {
                message: format!("produce stream to {addr} closed"),
                definite: true,
            };
            return self.on_failure(batch, err);
        }
        self.in_flight.insert(
            correlation_id,
            InFlight {
                batch,
                conn: conn_id,
                addr,
                deadline: now + self.config.request_timeout + RESPONSE_GRACE,
            },
        );
    }

    /// The produce stream to `addr`, opened on first use.
    fn conn(&mut self, addr: &str) -> Result<&Conn, ClientError> {
        if !self.conns.contains_key(addr) {
            let channel = self.client.channel(addr)?;
            let (tx, rx) = mpsc::unbounded_channel();
            let id = self.next_conn;
            self.next_conn += 1;
            let max = self.client.inner.config.max_message_size;
            let events = self.events_tx.clone();
            let addr_owned = addr.to_owned();
            tokio::spawn(async move {
                let error = run_stream(produce_rpc(channel, max), rx, &events, &addr_owned).await;
                let _ = events.send(Event::Closed {
                    conn: id,
                    addr: addr_owned,
                    error,
                });
            });
            self.conns.insert(addr.to_owned(), Conn { id, tx });
        }
        self.conns
            .get(addr)
            .ok_or_else(|| ClientError::InvalidInput(format!("no connection to {addr}")))
    }

    /// Forgets a stream so that the next batch for `addr` opens a new one. Dropping the request
    /// sender half-closes the old stream; answers already owed still arrive on it.
    fn drop_conn(&mut self, addr: &str, id: u64) {
        if self.conns.get(addr).is_some_and(|c| c.id == id) {
            self.conns.remove(addr);
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Response { resp } => {
                let Some(f) = self.in_flight.remove(&resp.correlation_id) else {
                    // Answer to a request we already timed out and retried.
                    return;
                };
                if let Some(e) = &resp.error {
                    let err = ClientError::from_proto(e);
                    return self.on_failure(f.batch, err);
                }
                match resp.batches.first() {
                    Some(ack) => {
                        if ack.partition != f.batch.partition
                            || ack.record_count as usize != f.batch.records.len()
                        {
                            tracing::warn!(
                                topic = %f.batch.topic,
                                partition = f.batch.partition,
                                ack_partition = ack.partition,
                                ack_count = ack.record_count,
                                sent = f.batch.records.len(),
                                "produce ack does not match the batch sent"
                            );
                        }
                        let base = (self.config.acks != Acks::None).then_some(ack.base_offset);
                        self.complete(f.batch, base);
                    }
                    None => {
                        let err = ClientError::Protocol(format!(
                            "produce answer for {} has no batch ack",
                            Tp(&f.batch.topic, f.batch.partition)
                        ));
                        self.fail(f.batch, err, true);
                    }
                }
            }
            Event::Closed { conn, addr, error } => {
                self.drop_conn(&addr, conn);
                let mut ids: Vec<u64> = self
                    .in_flight
                    .iter()
                    .filter(|(_, f)| f.conn == conn)
                    .map(|(&id, _)| id)
                    .collect();
                ids.sort_unstable();
                if !ids.is_empty() {
                    tracing::debug!(%addr, error = %error, in_flight = ids.len(), "produce stream closed");
                }
                // The broker answers what it owes before ending a stream, so a rejection that
                // ends it (e.g. a message over its size limit) belongs to the oldest unanswered
                // request. The ones behind it were never read and are merely interrupted.
                let interrupted = ClientError::Unavailable {
                    message: format!("produce stream to {addr} ended early: {error}"),
                    definite: false,
                };
                for (n, id) in ids.into_iter().enumerate() {
                    if let Some(f) = self.in_flight.remove(&id) {
                        let err = if n == 0 || error.is_retriable() {
                            error.clone()
                        } else {
                            interrupted.clone()
                        };
                        self.on_failure(f.batch, err);
                    }
                }
            }
            Event::MetadataRefreshed => {
                self.refreshing = false;
                self.refresh_not_before = Instant::now() + self.config.retry_backoff;
            }
        }
    }

    /// Requests without an answer past their deadline are retried on a fresh stream: the old
    /// one may be stuck behind a dead connection that keepalive has not caught yet.
    fn expire_requests(&mut self, now: Instant, wake_at: &mut Option<Instant>) {
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(f) = self.in_flight.remove(&id) {
                self.drop_conn(&f.addr, f.conn);
                let err = ClientError::timeout(format!(
                    "no produce answer from {} within {} ms",
                    f.addr,
                    (self.config.request_timeout + RESPONSE_GRACE).as_millis()
                ));
                self.on_failure(f.batch, err);
            }
        }
        if let Some(d) = self.in_flight.values().map(|f| f.deadline).min() {
            *wake_at = Some(wake_at.map_or(d, |w| w.min(d)));
        }
    }

    /// Starts a metadata refresh when one is wanted, at most one at a time and not more often
    /// than `retry_backoff`, so an election does not turn into a metadata request storm.
    fn maybe_refresh(&mut self, now: Instant, wake_at: &mut Option<Instant>) {
        if !self.refresh_wanted || self.refreshing {
            return;
        }
        if now < self.refresh_not_before {
            let at = self.refresh_not_before;
            *wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
            return;
        }
        self.refresh_wanted = false;
        self.refreshing = true;
        let client = self.client.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let generation = client.generation();
            if let Err(e) = client.refresh(generation).await {
                tracing::debug!(error = %e, "producer metadata refresh failed");
            }
            let _ = events.send(Event::MetadataRefreshed);
        });
    }

    /// A sent batch failed: retry it if the error is retriable and time remains, else fail it.
    fn on_failure(&mut self, mut batch: ProducerBatch, err: ClientError) {
        self.client
            .note_partition_error(&batch.topic, batch.partition, &err);
        if err.invalidates_metadata() {
            self.refresh_wanted = true;
        }
        // Unknown topic or partition right after a topic change usually means the leader has
        // not caught up with the metadata yet; Kafka retries these too.
        let retriable = err.is_retriable()
            || matches!(
                err,
                ClientError::UnknownPartition { .. } | ClientError::UnknownTopic { .. }
            );
        if !retriable {
            return self.fail(batch, err, true);
        }
        let now = Instant::now();
        if now.duration_since(batch.created) >= self.config.delivery_timeout {
            let err = delivery_timeout(&batch, Some(err));
            return self.fail(batch, err, true);
        }
        batch.attempts += 1;
        let wait = backoff(
            self.config.retry_backoff,
            backoff_cap(&err, self.config.retry_backoff_max),
            batch.attempts,
        );
        tracing::debug!(
            topic = %batch.topic,
            partition = batch.partition,
            attempt = batch.attempts,
            error = %err,
            "retrying batch"
        );
        batch.retry_at = Some(now + wait);
        batch.last_error = Some(err);
        lock(&self.shared.state).acc.requeue(batch);
    }

    fn complete(&mut self, batch: ProducerBatch, base_offset: Option<u64>) {
        self.finish(&batch, true);
        let ProducerBatch {
            topic,
            partition,
            records,
            ..
        } = batch;
        for (i, r) in records.into_iter().enumerate() {
            let _ = r.done.send(Ok(RecordMetadata {
                topic: topic.clone(),
                partition,
                offset: base_offset.map(|b| b + i as u64),
                timestamp_ms: r.timestamp,
            }));
        }
    }

    fn fail(&mut self, batch: ProducerBatch, err: ClientError, was_in_flight: bool) {
        self.finish(&batch, was_in_flight);
        tracing::debug!(topic = %batch.topic, partition = batch.partition, error = %err, "batch failed");
        for r in batch.records {
            let _ = r.done.send(Err(err.clone()));
        }
    }

    fn finish(&mut self, batch: &ProducerBatch, was_in_flight: bool) {
        let mut state = lock(&self.shared.state);
        let min = state.acc.finish(batch, was_in_flight);
        // Published under the lock so that values never go backwards.
        self.shared.min_incomplete.send_replace(min);
    }
}

fn delivery_timeout(batch: &ProducerBatch, err: Option<ClientError>) -> ClientError {
    ClientError::DeliveryTimeout {
        elapsed_ms: u64::try_from(batch.created.elapsed().as_millis()).unwrap_or(u64::MAX),
        last_error: err.or_else(|| batch.last_error.clone()).map(Box::new),
    }
}

/// Runs one `ProduceStream`: requests flow in from `rx`, answers go out as events. Returns why
/// the stream ended.
async fn run_stream(
    mut rpc: keel_proto::v1::produce_service_client::ProduceServiceClient<
        tonic::transport::Channel,
    >,
    rx: mpsc::UnboundedReceiver<ProduceRequest>,
    events: &mpsc::UnboundedSender<Event>,
    addr: &str,
) -> ClientError {
    let mut answers = match rpc.produce_stream(UnboundedReceiverStream::new(rx)).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => return ClientError::from_status_at(&status, addr),
    };
    loop {
        match answers.message().await {
            Ok(Some(resp)) => {
                if events.send(Event::Response { resp }).is_err() {
                    return ClientError::ProducerClosed;
                }
            }
            // The broker ends the stream after the client half-closes it, or when it shuts
            // down; either way, whatever is still unanswered is in doubt.
            Ok(None) => {
                return ClientError::Unavailable {
                    message: format!("produce stream to {addr} ended"),
                    definite: false,
                };
            }
            Err(status) => return ClientError::from_status_at(&status, addr),
        }
    }
}
