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

use keel_proto::v1::produce_service_client::ProduceServiceClient;
use keel_proto::v1::{ProduceBatch, ProduceRequest, ProduceResponse, produce_batch};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use bytes::Bytes;
use keel_batch::{ProducerInfo, sequence, set_producer};

use super::accumulator::{BatchData, ProducerBatch};
use super::{Acks, ProducerConfig, RecordMetadata, Shared};
use crate::client::Client;
use crate::error::{ClientError, Tp};
use crate::metadata::Route;
use crate::rpc::Stub;
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
    /// The answer to an `InitProducer` request.
    ProducerInit(Result<(i64, i16), ClientError>),
}

/// An idempotent producer's identity and sequence numbers.
struct Idempotence {
    /// Producer id and epoch, once the cluster handed them out.
    id: Option<(i64, i16)>,
    /// Next sequence number per partition (in the current epoch).
    next_seq: HashMap<(Arc<str>, u32), i32>,
    initializing: bool,
    init_not_before: Instant,
    init_attempts: u32,
    /// The id of the InitProducer request under way, kept across its retries so that a bump
    /// whose answer was lost is not applied twice (which would fence this producer).
    init_request: Option<u64>,
    /// A batch failed for good with a sequence number: the epoch must change before anything
    /// more is sent (a new epoch restarts every partition at 0).
    reset_wanted: bool,
    /// A newer incarnation exists: every batch fails with this.
    fenced: Option<ClientError>,
    /// Partitions whose batch starting at this sequence number failed for good with a
    /// definite error: nothing after it can have been written either (the broker only writes
    /// the next sequence), so once the partition has nothing in flight the later batches are
    /// renumbered from there, without a new epoch.
    rewinds: HashMap<(Arc<str>, u32), i32>,
}

impl Idempotence {
    fn ready(&self) -> bool {
        self.id.is_some() && !self.reset_wanted && !self.initializing
    }
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

    /// Whether batches can be sent now: not while an idempotent producer has no id yet or is
    /// changing epochs. Starts that work when it is due.
    fn idempotence_ready(&mut self, now: Instant, wake_at: &mut Option<Instant>) -> bool {
        let in_flight = self.in_flight.len();
        let Some(idem) = &mut self.idem else {
            return true;
        };
        if idem.fenced.is_some() || idem.ready() {
            return true;
        }
        // A new epoch restarts the sequences: only once nothing of the old one is in flight.
        if idem.initializing || (idem.reset_wanted && in_flight > 0) {
            return false;
        }
        if now < idem.init_not_before {
            let at = idem.init_not_before;
            *wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
            return false;
        }
        idem.initializing = true;
        let bump = if idem.reset_wanted { idem.id } else { None };
        let request_id = *idem
            .init_request
            .get_or_insert_with(|| crate::util::random() | 1);
        let client = self.client.clone();
        let instance = self.config.instance_id.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let r = client
                .init_producer(instance.as_deref(), bump, request_id)
                .await;
            let _ = events.send(Event::ProducerInit(r));
        });
        false
    }

    /// Stamps a batch with its producer id, epoch and first sequence number on its first send.
    fn sequence(&mut self, batch: &mut ProducerBatch) -> Result<(), ClientError> {
        let Some(idem) = &mut self.idem else {
            return Ok(());
        };
        let Some((producer_id, epoch)) = idem.id else {
            return Err(ClientError::InvalidInput(
                "idempotent producer has no producer id".into(),
            ));
        };
        if batch.sequence.is_some() {
            return Ok(());
        }
        let count = batch.records.len() as u32;
        let next = idem
            .next_seq
            .entry((Arc::clone(&batch.topic), batch.partition))
            .or_insert(0);
        let first = *next;
        *next = sequence::next(first, count);
        batch.sequence = Some((epoch, first));
        let info = ProducerInfo {
            producer_id,
            producer_epoch: epoch,
            base_sequence: first,
        };
        match &mut batch.data {
            BatchData::Open(builder) => builder.set_producer(info),
            BatchData::Built(bytes) => {
                let mut restamped = bytes.to_vec();
                set_producer(&mut restamped, info).map_err(|e| {
                    ClientError::InvalidInput(format!("cannot renumber a record batch: {e}"))
                })?;
                *bytes = Bytes::from(restamped);
            }
            BatchData::Taken => {}
        }
        Ok(())
    }

    fn on_producer_init(&mut self, r: Result<(i64, i16), ClientError>) {
        let Some(idem) = &mut self.idem else {
            return;
        };
        idem.initializing = false;
        match r {
            Ok(id) => {
                idem.init_request = None;
                let resetting = idem.reset_wanted;
                tracing::debug!(producer_id = id.0, epoch = id.1, resetting, "producer id");
                idem.id = Some(id);
                idem.init_attempts = 0;
                idem.reset_wanted = false;
                idem.next_seq.clear();
                // Sequences of the old epoch mean nothing in the new one.
                idem.rewinds.clear();
                if resetting {
                    self.renumber();
                }
            }
            // Fenced, or refused for a reason a retry cannot fix (an invalid instance id, a
            // broker without idempotence): every batch fails with it. Anything else (a full
            // disk, an internal error) may pass: retried until the records' delivery timeout.
            Err(
                e @ (ClientError::ProducerFenced { .. }
                | ClientError::InvalidArgument { .. }
                | ClientError::InvalidConfig { .. }
                | ClientError::Status {
                    code: tonic::Code::Unimplemented,
                    ..
                }),
            ) => {
                tracing::warn!(error = %e, "InitProducer refused; the producer cannot send");
                idem.init_request = None;
                idem.fenced = Some(e);
            }
            Err(e) => {
                idem.init_attempts += 1;
                let wait = backoff(
                    self.config.retry_backoff,
                    self.config.retry_backoff_max,
                    idem.init_attempts,
                );
                tracing::debug!(error = %e, "InitProducer failed; retrying");
                idem.init_not_before = Instant::now() + wait;
            }
        }
    }

    /// After an epoch change: batches that were numbered in the old epoch get new numbers when
    /// sent, except those an earlier attempt may have written, which fail (renumbering them
    /// could write them twice).
    fn renumber(&mut self) {
        let doubtful = {
            let mut state = lock(&self.shared.state);
            let doubtful = state
                .acc
                .take_queued(|b| b.sequence.is_some() && b.maybe_written);
            for b in state.acc.queued_mut() {
                b.sequence = None;
            }
            doubtful
        };
        for mut b in doubtful {
            // Numbered in the old epoch, which is over: failing it leaves no gap to close.
            b.sequence = None;
            let err = b.last_error.clone().unwrap_or_else(|| ClientError::Unavailable {
                message: "the outcome of an earlier attempt is unknown and the producer changed epochs".into(),
                definite: false,
            });
            let err = delivery_timeout(&b, Some(err));
            self.fail(b, err, false);
        }
    }

    /// A numbered batch fails for good: its partition's sequence now has a gap. Without doubt
    /// about its attempts, the partition renumbers from it; otherwise only a new epoch helps.
    fn gave_up(&mut self, batch: &ProducerBatch) {
        let (Some(idem), Some((epoch, first))) = (&mut self.idem, batch.sequence) else {
            return;
        };
        if batch.maybe_written || idem.id.is_none_or(|(_, e)| e != epoch) {
            idem.reset_wanted = true;
            return;
        }
        idem.rewinds
            .entry((Arc::clone(&batch.topic), batch.partition))
            .and_modify(|s| {
                if sequence_before(first, *s) {
                    *s = first;
                }
            })
            .or_insert(first);
    }

    /// Renumbers the partitions waiting for it once nothing of theirs is in flight.
    fn apply_rewinds(&mut self) {
        let Some(idem) = &mut self.idem else {
            return;
        };
        if idem.rewinds.is_empty() {
            return;
        }
        let due: Vec<((Arc<str>, u32), i32)> = idem
            .rewinds
            .iter()
            .filter(|((t, p), _)| {
                !self
                    .in_flight
                    .values()
                    .any(|f| f.batch.partition == *p && f.batch.topic == *t)
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if due.is_empty() {
            return;
        }
        let mut state = lock(&self.shared.state);
        for ((topic, partition), first) in due {
            idem.rewinds.remove(&(Arc::clone(&topic), partition));
            let behind = |b: &ProducerBatch| {
                b.partition == partition
                    && b.topic == topic
                    && b.sequence.is_some_and(|(_, s)| !sequence_before(s, first))
            };
            // An attempt without a definite answer may still be on its way to the broker (a
            // timed-out request is not cancelled there), and would fit the renumbered
            // sequence: only a new epoch, which fences it, makes renumbering safe then.
            if state.acc.queued_mut().any(|b| behind(b) && b.maybe_written) {
                idem.reset_wanted = true;
                continue;
            }
            idem.next_seq.insert((Arc::clone(&topic), partition), first);
            for b in state.acc.queued_mut() {
                if behind(b) {
                    // Sent after the failed batch and refused each time: never written.
                    b.sequence = None;
                }
            }
        }
    }

    /// Whether a batch of the same partition created before this one is still unresolved (in
    /// flight or queued for a retry): then an out-of-order answer only means that one has not
    /// been written yet.
    fn earlier_unresolved(&self, batch: &ProducerBatch) -> bool {
        self.in_flight.values().any(|f| {
            f.batch.id < batch.id
                && f.batch.partition == batch.partition
                && f.batch.topic == batch.topic
        }) || lock(&self.shared.state).acc.has_queued_before(
            &batch.topic,
            batch.partition,
            batch.id,
        )
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

    fn dispatch(&mut self, addr: String, mut batch: ProducerBatch, now: Instant) {
        if let Some(err) = self.idem.as_ref().and_then(|i| i.fenced.clone()) {
            return self.fail(batch, err, true);
        }
        if let Err(e) = self.sequence(&mut batch) {
            return self.fail(batch, e, true);
        }
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
                producer: None,
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
                let error = run_stream(
                    ProduceServiceClient::open(channel, max),
                    rx,
                    &events,
                    &addr_owned,
                )
                .await;
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

    /// A sent batch failed: retry it if the error is retriable and time remains, else fail it.
    fn on_failure(&mut self, mut batch: ProducerBatch, err: ClientError) {
        self.client
            .note_partition_error(&batch.topic, batch.partition, &err);
        if err.invalidates_metadata() {
            self.refresh_wanted = true;
        }
        if self.idem.is_some() && batch.sequence.is_some() {
            if !err.is_definite() {
                batch.maybe_written = true;
            }
            match &err {
                ClientError::ProducerFenced { .. } => {
                    if let Some(idem) = &mut self.idem {
                        idem.fenced = Some(err.clone());
                    }
                    return self.fail(batch, err, true);
                }
                ClientError::OutOfOrderSequence { .. } => {
                    let rewinding = self.idem.as_ref().is_some_and(|i| {
                        i.rewinds
                            .keys()
                            .any(|(t, p)| *t == batch.topic && *p == batch.partition)
                    });
                    if rewinding {
                        // Behind a batch that failed for good: renumbered once the partition
                        // has nothing in flight.
                    } else if !self.earlier_unresolved(&batch) {
                        // A gap nothing in flight explains (e.g. the partition forgot an idle
                        // producer): only a new epoch closes it. A batch that may already be
                        // written cannot be renumbered and fails.
                        if let Some(idem) = &mut self.idem {
                            idem.reset_wanted = true;
                        }
                        if batch.maybe_written {
                            return self.fail(batch, err, true);
                        }
                    }
                    // Otherwise an earlier batch of the partition is not written yet: this one
                    // follows it once it is.
                    return self.retry(batch, err);
                }
                _ => {}
            }
        }
        // Unknown topic or partition right after a topic change usually means the leader has
        // not caught up with the metadata yet; Kafka retries these too.
        let retriable = err.is_retriable()
            || matches!(
                err,
                ClientError::UnknownPartition { .. } | ClientError::UnknownTopic { .. }
            );
        // Resending a batch that may have been written is safe only when the broker can
        // recognise it (idempotence); otherwise the record fails with the indefinite error.
        let safe = self.idem.is_some() || err.is_definite();
        if !retriable || !safe {
            return self.fail(batch, err, true);
        }
        self.retry(batch, err)
    }

    /// Queues a batch for another attempt after a backoff, unless its delivery time is up.
    fn retry(&mut self, mut batch: ProducerBatch, err: ClientError) {
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
        if !matches!(err, ClientError::ProducerFenced { .. }) {
            self.gave_up(&batch);
        }
        // The last answer may be definite while an earlier attempt may have been written.
        let err = if batch.maybe_written {
            err.indefinite()
        } else {
            err
        };
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

/// Whether sequence `a` comes strictly before `b`.
fn sequence_before(a: i32, b: i32) -> bool {
    a != b && sequence::at_or_before(a, b)
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
