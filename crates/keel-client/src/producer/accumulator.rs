//! Per-partition batching: records are appended to an open batch; a batch closes when it is full,
//! when `linger` has passed since it opened, or on flush; closed batches wait in order until the
//! partition has a leader and a free in-flight slot. No IO and no clocks of its own (callers pass
//! `now`), so the policy is unit-tested directly.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_batch::{BatchBuilder, Compression, RecordRef};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::RecordMetadata;
use crate::error::{ClientError, Result};

/// A record waiting for its acknowledgement.
#[derive(Debug)]
pub(crate) struct PendingRecord {
    pub(crate) timestamp: i64,
    pub(crate) done: oneshot::Sender<Result<RecordMetadata>>,
}

#[derive(Debug)]
pub(crate) enum BatchData {
    /// Still a builder: encoding (and compressing) happens once, in the sender task, so that
    /// `send` callers never pay for compression while holding the accumulator lock.
    Open(BatchBuilder),
    Built(Bytes),
    /// Transiently, while being built.
    Taken,
}

#[derive(Debug)]
pub(crate) struct ProducerBatch {
    /// Increases in creation order across all partitions; orders a partition's queue and lets
    /// `flush` wait for "everything created before now".
    pub(crate) id: u64,
    pub(crate) topic: Arc<str>,
    pub(crate) partition: u32,
    pub(crate) data: BatchData,
    pub(crate) records: Vec<PendingRecord>,
    /// Estimated bytes, for the batch-size limit.
    pub(crate) bytes: usize,
    pub(crate) created: Instant,
    pub(crate) attempts: u32,
    pub(crate) retry_at: Option<Instant>,
    pub(crate) last_error: Option<ClientError>,
    /// Buffer memory held until the batch completes: this is the producer's back-pressure.
    pub(crate) permit: Option<OwnedSemaphorePermit>,
    /// Idempotent producing: the epoch and first sequence number stamped into the batch,
    /// assigned when it is first sent and kept across retries.
    pub(crate) sequence: Option<(i16, i32)>,
    /// An attempt ended without a definite answer: the batch may be in the log.
    pub(crate) maybe_written: bool,
}

impl ProducerBatch {
    /// The encoded batch, building it on first use.
    pub(crate) fn encoded(&mut self) -> Result<Bytes> {
        match std::mem::replace(&mut self.data, BatchData::Taken) {
            BatchData::Built(b) => {
                self.data = BatchData::Built(b.clone());
                Ok(b)
            }
            BatchData::Open(builder) => {
                let b = Bytes::from(builder.build().map_err(|e| {
                    ClientError::InvalidInput(format!("cannot encode record batch: {e}"))
                })?);
                self.data = BatchData::Built(b.clone());
                Ok(b)
            }
            BatchData::Taken => Err(ClientError::InvalidInput(
                "record batch was already consumed".to_owned(),
            )),
        }
    }
}

#[derive(Debug, Default)]
struct PartitionQueue {
    open: Option<ProducerBatch>,
    /// Closed batches not in flight, in id order (retries go back to their place).
    queue: VecDeque<ProducerBatch>,
    in_flight: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct AccumulatorConfig {
    pub(crate) batch_size: usize,
    pub(crate) linger: Duration,
    pub(crate) compression: Compression,
    pub(crate) max_in_flight: usize,
    pub(crate) delivery_timeout: Duration,
}

#[derive(Debug, Default)]
pub(crate) struct AppendOutcome {
    /// A new batch was opened: the sender must learn its linger deadline.
    pub(crate) opened: bool,
    /// A batch became ready to send.
    pub(crate) closed: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Drained {
    /// Batches to send now, with their leader's address.
    pub(crate) sendable: Vec<(String, ProducerBatch)>,
    /// Batches that waited longer than the delivery timeout without being sent.
    pub(crate) expired: Vec<ProducerBatch>,
    /// Some batch has no known leader.
    pub(crate) need_metadata: bool,
    /// When the next batch becomes sendable by time alone (linger or retry backoff).
    pub(crate) next_wakeup: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Accumulator {
    config: AccumulatorConfig,
    topics: HashMap<Arc<str>, HashMap<u32, PartitionQueue>>,
    next_id: u64,
    /// Ids of batches not completed yet (open, queued or in flight).
    incomplete: BTreeSet<u64>,
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Accumulator {
    pub(crate) fn new(config: AccumulatorConfig) -> Self {
        Self {
            config,
            topics: HashMap::new(),
            next_id: 0,
            incomplete: BTreeSet::new(),
        }
    }

    fn queue(&self, topic: &str, partition: u32) -> Option<&PartitionQueue> {
        self.topics.get(topic).and_then(|t| t.get(&partition))
    }

    fn queue_mut(&mut self, topic: &str, partition: u32) -> &mut PartitionQueue {
        if !self.topics.contains_key(topic) {
            self.topics.insert(Arc::from(topic), HashMap::new());
        }
        self.topics
            .get_mut(topic)
            .map(|t| t.entry(partition).or_default())
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// Whether a record of `size` bytes would open a new batch on this partition.
    pub(crate) fn needs_new_batch(&self, topic: &str, partition: u32, size: usize) -> bool {
        match self.queue(topic, partition).and_then(|q| q.open.as_ref()) {
            None => true,
            Some(b) => b.bytes + size > self.config.batch_size,
        }
    }

    /// Appends one record. A record larger than the batch size gets a batch of its own.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn append(
        &mut self,
        topic: &str,
        partition: u32,
        record: &RecordRef<'_>,
        pending: PendingRecord,
        size: usize,
        permit: OwnedSemaphorePermit,
        now: Instant,
    ) -> Result<AppendOutcome> {
        let config = self.config.clone();
        let mut outcome = AppendOutcome::default();
        let next_id = self.next_id;
        let q = self.queue_mut(topic, partition);
        if q.open
            .as_ref()
            .is_some_and(|b| b.bytes + size > config.batch_size)
            && let Some(b) = q.open.take()
        {
            insert_ordered(&mut q.queue, b);
            outcome.closed = true;
        }
        let batch = match &mut q.open {
            Some(b) => b,
            None => {
                outcome.opened = true;
                // Reserve for a typical batch, not the maximum, so that many mostly idle
                // partitions do not each pin `batch_size` bytes.
                let capacity = config.batch_size.min(64 * 1024).max(size);
                q.open.insert(ProducerBatch {
                    id: next_id,
                    topic: Arc::from(topic),
                    partition,
                    data: BatchData::Open(BatchBuilder::with_capacity(
                        config.compression,
                        capacity,
                    )),
                    records: Vec::new(),
                    bytes: 0,
                    created: now,
                    attempts: 0,
                    retry_at: None,
                    last_error: None,
                    permit: None,
                    sequence: None,
                    maybe_written: false,
                })
            }
        };
        let BatchData::Open(builder) = &mut batch.data else {
            return Err(ClientError::InvalidInput(
                "open batch is already encoded".to_owned(),
            ));
        };
        builder
            .push(record)
            .map_err(|e| ClientError::InvalidInput(format!("cannot add record to batch: {e}")))?;
        batch.records.push(pending);
        batch.bytes += size;
        match &mut batch.permit {
            Some(p) => p.merge(permit),
            None => batch.permit = Some(permit),
        }
        if batch.bytes >= config.batch_size
            && let Some(b) = q.open.take()
        {
            insert_ordered(&mut q.queue, b);
            outcome.closed = true;
        }
        if outcome.opened {
            self.incomplete.insert(next_id);
            self.next_id += 1;
        }
        Ok(outcome)
    }

    /// Closes batches whose linger expired (all of them when `flush`), expires batches that
    /// waited past the delivery timeout, and takes what can be sent now: the front of each
    /// partition's queue, while it has a leader, a free in-flight slot and no pending backoff.
    pub(crate) fn drain(
        &mut self,
        now: Instant,
        flush: bool,
        mut route: impl FnMut(&str, u32) -> Option<String>,
    ) -> Drained {
        let config = &self.config;
        let mut out = Drained::default();
        for (topic, partitions) in &mut self.topics {
            for (&partition, q) in partitions.iter_mut() {
                if let Some(open) = &q.open {
                    let due = open.created + config.linger;
                    if flush || now >= due {
                        if let Some(b) = q.open.take() {
                            insert_ordered(&mut q.queue, b);
                        }
                    } else {
                        out.next_wakeup = earliest(out.next_wakeup, due);
                    }
                }
                let mut i = 0;
                while i < q.queue.len() {
                    if now >= q.queue[i].created + config.delivery_timeout {
                        if let Some(b) = q.queue.remove(i) {
                            out.expired.push(b);
                        }
                    } else {
                        i += 1;
                    }
                }
                while q.in_flight < config.max_in_flight {
                    let Some(front) = q.queue.front() else { break };
                    if let Some(at) = front.retry_at.filter(|&at| at > now) {
                        out.next_wakeup = earliest(out.next_wakeup, at);
                        break;
                    }
                    let Some(addr) = route(topic, partition) else {
                        out.need_metadata = true;
                        break;
                    };
                    if let Some(b) = q.queue.pop_front() {
                        q.in_flight += 1;
                        out.sendable.push((addr, b));
                    }
                }
                // Queued batches expire even while nothing can be sent.
                if let Some(oldest) = q.queue.iter().map(|b| b.created).min() {
                    out.next_wakeup = earliest(out.next_wakeup, oldest + config.delivery_timeout);
                }
            }
        }
        out
    }

    /// Puts a batch that failed retriably back in its place in the queue.
    pub(crate) fn requeue(&mut self, batch: ProducerBatch) {
        let q = self.queue_mut(&batch.topic.clone(), batch.partition);
        q.in_flight = q.in_flight.saturating_sub(1);
        insert_ordered(&mut q.queue, batch);
    }

    /// Whether a batch of this partition created before `id` waits in the queue (a retry).
    pub(crate) fn has_queued_before(&self, topic: &str, partition: u32, id: u64) -> bool {
        self.queue(topic, partition)
            .is_some_and(|q| q.queue.front().is_some_and(|b| b.id < id))
    }

    /// Takes out every queued batch that `pred` selects (for the producer to fail them).
    pub(crate) fn take_queued(
        &mut self,
        mut pred: impl FnMut(&ProducerBatch) -> bool,
    ) -> Vec<ProducerBatch> {
        let mut out = Vec::new();
        for q in self.topics.values_mut().flat_map(|t| t.values_mut()) {
            let mut i = 0;
            while i < q.queue.len() {
                if pred(&q.queue[i])
                    && let Some(b) = q.queue.remove(i)
                {
                    out.push(b);
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    /// Every queued batch (for the producer to renumber them).
    pub(crate) fn queued_mut(&mut self) -> impl Iterator<Item = &mut ProducerBatch> {
        self.topics
            .values_mut()
            .flat_map(|t| t.values_mut())
            .flat_map(|q| q.queue.iter_mut())
    }

    /// Records that a batch taken by `drain` is no longer in flight and is finished (acknowledged
    /// or failed for good). Returns the new lowest incomplete batch id.
    pub(crate) fn finish(&mut self, batch: &ProducerBatch, was_in_flight: bool) -> u64 {
        if was_in_flight
            && let Some(q) = self
                .topics
                .get_mut(&*batch.topic)
                .and_then(|t| t.get_mut(&batch.partition))
        {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        self.incomplete.remove(&batch.id);
        self.min_incomplete()
    }

    /// The lowest id of a batch not yet finished; the next id when all are.
    pub(crate) fn min_incomplete(&self) -> u64 {
        self.incomplete.first().copied().unwrap_or(self.next_id)
    }

    /// The id the next batch will get: every batch created so far has a smaller one.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.incomplete.is_empty()
    }
}

fn insert_ordered(queue: &mut VecDeque<ProducerBatch>, batch: ProducerBatch) {
    let at = queue.partition_point(|b| b.id < batch.id);
    queue.insert(at, batch);
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;

    use super::*;

    fn acc(batch_size: usize, max_in_flight: usize) -> Accumulator {
        Accumulator::new(AccumulatorConfig {
            batch_size,
            linger: Duration::from_millis(5),
            compression: Compression::None,
            max_in_flight,
            delivery_timeout: Duration::from_secs(10),
        })
    }

    /// An accumulator of `batch_size` and `max_in_flight`, what feeds it, and the time it starts.
    fn setup(batch_size: usize, max_in_flight: usize) -> (Accumulator, Harness, Instant) {
        (
            acc(batch_size, max_in_flight),
            Harness::new(),
            Instant::now(),
        )
    }

    struct Harness {
        sem: Arc<Semaphore>,
        receivers: Vec<oneshot::Receiver<Result<RecordMetadata>>>,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                sem: Arc::new(Semaphore::new(1 << 20)),
                receivers: Vec::new(),
            }
        }

        fn append(
            &mut self,
            a: &mut Accumulator,
            p: u32,
            size: usize,
            now: Instant,
        ) -> AppendOutcome {
            let (tx, rx) = oneshot::channel();
            self.receivers.push(rx);
            let value = vec![7u8; size];
            let rec = RecordRef {
                timestamp: 1,
                key: None,
                value: Some(&value),
                headers: &[],
            };
            let permit = self
                .sem
                .clone()
                .try_acquire_many_owned(size as u32)
                .expect("permits");
            a.append(
                "t",
                p,
                &rec,
                PendingRecord {
                    timestamp: 1,
                    done: tx,
                },
                size,
                permit,
                now,
            )
            .expect("append")
        }
    }

    fn route_all(_: &str, _: u32) -> Option<String> {
        Some("b:1".to_owned())
    }

    #[test]
    fn batches_close_when_full_and_oversized_records_go_alone() {
        let (mut a, mut h, now) = setup(100, 5);
        let o = h.append(&mut a, 0, 40, now);
        assert!(o.opened && !o.closed);
        let o = h.append(&mut a, 0, 40, now);
        assert!(!o.opened && !o.closed);
        assert!(a.needs_new_batch("t", 0, 40));
        // 120 > 100: the open batch closes and the new record opens another.
        let o = h.append(&mut a, 0, 40, now);
        assert!(o.opened && o.closed);
        // A 500-byte record closes the open batch and then its own.
        let o = h.append(&mut a, 0, 500, now);
        assert!(o.opened && o.closed);
        assert_eq!(h.sem.available_permits(), (1 << 20) - 620);
        let d = a.drain(now, false, route_all);
        let counts: Vec<usize> = d.sendable.iter().map(|(_, b)| b.records.len()).collect();
        assert_eq!(counts, vec![2, 1, 1]);
        let ids: Vec<u64> = d.sendable.iter().map(|(_, b)| b.id).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        for (_, b) in &d.sendable {
            a.finish(b, true);
        }
        drop(d);
        // Memory comes back when the batches are dropped.
        assert_eq!(h.sem.available_permits(), 1 << 20);
        assert!(a.is_idle());
    }

    #[test]
    fn linger_and_flush() {
        let (mut a, mut h, t0) = setup(1000, 5);
        h.append(&mut a, 0, 10, t0);
        h.append(&mut a, 1, 10, t0 + Duration::from_millis(2));
        let d = a.drain(t0 + Duration::from_millis(1), false, route_all);
        assert!(d.sendable.is_empty());
        assert_eq!(d.next_wakeup, Some(t0 + Duration::from_millis(5)));
        let d = a.drain(t0 + Duration::from_millis(5), false, route_all);
        assert_eq!(d.sendable.len(), 1);
        assert_eq!(d.sendable[0].1.partition, 0);
        assert_eq!(d.next_wakeup, Some(t0 + Duration::from_millis(7)));
        // Flush ignores linger.
        let d = a.drain(t0 + Duration::from_millis(5), true, route_all);
        assert_eq!(d.sendable.len(), 1);
        assert_eq!(d.sendable[0].1.partition, 1);
    }

    #[test]
    fn in_flight_limit_and_ordered_retries() {
        let (mut a, mut h, now) = setup(10, 2);
        for _ in 0..4 {
            h.append(&mut a, 0, 10, now);
        }
        let mut d = a.drain(now, false, route_all);
        assert_eq!(d.sendable.len(), 2);
        assert!(a.drain(now, false, route_all).sendable.is_empty());
        // Batch 0 fails retriably: it goes back in front of batches 2 and 3 with a backoff.
        let (_, mut b0) = d.sendable.remove(0);
        b0.retry_at = Some(now + Duration::from_millis(100));
        a.requeue(b0);
        let d2 = a.drain(now, false, route_all);
        assert!(
            d2.sendable.is_empty(),
            "backoff blocks the partition to keep order"
        );
        assert_eq!(d2.next_wakeup, Some(now + Duration::from_millis(100)));
        let d3 = a.drain(now + Duration::from_millis(100), false, route_all);
        // Batch 1 still in flight, so one slot: batch 0 again.
        let ids: Vec<u64> = d3.sendable.iter().map(|(_, b)| b.id).collect();
        assert_eq!(ids, vec![0]);
    }

    #[test]
    fn waits_for_a_leader_and_expires() {
        let (mut a, mut h, now) = setup(10, 5);
        h.append(&mut a, 0, 10, now);
        let d = a.drain(now, false, |_, _| None);
        assert!(d.need_metadata);
        assert!(d.sendable.is_empty());
        assert_eq!(d.next_wakeup, Some(now + Duration::from_secs(10)));
        let d = a.drain(now + Duration::from_secs(10), false, |_, _| None);
        assert_eq!(d.expired.len(), 1);
        assert_eq!(a.finish(&d.expired[0], false), 1);
        assert!(a.is_idle());
    }

    #[test]
    fn flush_target_tracks_incomplete_batches() {
        let (mut a, mut h, now) = setup(10, 5);
        assert_eq!(a.min_incomplete(), 0);
        h.append(&mut a, 0, 10, now);
        h.append(&mut a, 1, 10, now);
        assert_eq!(a.next_id(), 2);
        let d = a.drain(now, false, route_all);
        let (_, b1) = d.sendable.iter().find(|(_, b)| b.id == 1).expect("batch 1");
        assert_eq!(a.finish(b1, true), 0, "batch 0 still incomplete");
        let (_, b0) = d.sendable.iter().find(|(_, b)| b.id == 0).expect("batch 0");
        assert_eq!(a.finish(b0, true), 2);
    }

    #[test]
    fn encoded_once() {
        let (mut a, mut h, now) = setup(10, 5);
        h.append(&mut a, 0, 10, now);
        let mut d = a.drain(now, false, route_all);
        let (_, b) = &mut d.sendable[0];
        let first = b.encoded().expect("build");
        let again = b.encoded().expect("built");
        assert_eq!(first, again);
        let recs = keel_batch::decode_records(&first, 1 << 20).expect("decode");
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].value.as_deref(), Some(&[7u8; 10][..]));
    }
}
