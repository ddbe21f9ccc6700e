//! The producer's background task: takes sendable batches from the accumulator, pipelines them
//! over one `ProduceStream` per leader broker, matches answers by correlation id, and retries or
//! fails batches.
//!
//! One task owns all in-flight state, so no locks are held across awaits; each broker stream
//! has a small reader task that only forwards answers (and the stream's end) as events.
//!
//! This file holds the task's state and its loop (draining the accumulator, handling events,
//! request deadlines, metadata refreshes); building and sending requests over the broker streams
//! is in `stream.rs`, what becomes of an answered or failed batch in `outcome.rs`, and the
//! idempotent producer's id, epoch and sequence numbers in `idempotence.rs`.

mod idempotence;
mod outcome;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_proto::v1::{ProduceRequest, ProduceResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::accumulator::ProducerBatch;
use super::{Acks, ProducerConfig, Shared};
use crate::client::Client;
use crate::error::{ClientError, Tp};
use crate::metadata::Route;
use crate::util::{lock, read};
use idempotence::Idempotence;
use outcome::delivery_timeout;

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
    /// The answer to an `InitProducer` request.
    ProducerInit(Result<(i64, i16), ClientError>),
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
    idem: Option<Idempotence>,
}

impl Sender {
    pub(crate) fn new(client: Client, config: ProducerConfig, shared: Arc<Shared>) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            client,
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
            idem: config.is_idempotent().then(|| Idempotence {
                id: None,
                next_seq: HashMap::new(),
                initializing: false,
                init_not_before: Instant::now(),
                init_attempts: 0,
                init_request: None,
                reset_wanted: false,
                fenced: None,
                rewinds: HashMap::new(),
            }),
            config,
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            let now = Instant::now();
            let flush = self.shared.flushing();
            let mut wake_at = None;
            // Rewinds first: one may decide that a new epoch is needed, which readiness starts.
            self.apply_rewinds();
            let ready = self.idempotence_ready(now, &mut wake_at);
            let rewinding: Vec<(Arc<str>, u32)> = self
                .idem
                .as_ref()
                .map(|i| i.rewinds.keys().cloned().collect())
                .unwrap_or_default();
            let drained = {
                let mut state = lock(&self.shared.state);
                let metadata = read(&self.client.inner.metadata);
                state.acc.drain(now, flush, |t, p| {
                    if !ready || rewinding.iter().any(|(rt, rp)| **rt == *t && *rp == p) {
                        return None;
                    }
                    match metadata.route(t, p) {
                        Route::Leader { address, .. } => Some(address),
                        _ => None,
                    }
                })
            };
            for batch in drained.expired {
                let err = delivery_timeout(&batch, None);
                self.fail(batch, err, false);
            }
            if drained.need_metadata && ready {
                self.refresh_wanted = true;
            }
            for (addr, batch) in drained.sendable {
                self.dispatch(addr, batch, now);
            }
            if let Some(w) = drained.next_wakeup {
                wake_at = Some(wake_at.map_or(w, |x: Instant| x.min(w)));
            }
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
                        let mut batch = f.batch;
                        batch.maybe_written = true;
                        self.fail(batch, err, true);
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
            Event::ProducerInit(r) => self.on_producer_init(r),
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
}
