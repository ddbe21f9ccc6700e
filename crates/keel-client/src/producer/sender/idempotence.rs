//! The idempotent producer's side of the sender: getting a producer id and epoch, numbering
//! batches per partition, and closing the gaps that batches failing for good leave behind (by
//! renumbering a partition, or by starting a new epoch).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use keel_batch::{ProducerInfo, sequence, set_producer};
use tokio::time::Instant;

use super::outcome::delivery_timeout;
use super::{Event, Sender};
use crate::error::ClientError;
use crate::producer::accumulator::{BatchData, ProducerBatch};
use crate::util::{backoff, lock};

/// An idempotent producer's identity and sequence numbers.
pub(super) struct Idempotence {
    /// Producer id and epoch, once the cluster handed them out.
    pub(super) id: Option<(i64, i16)>,
    /// Next sequence number per partition (in the current epoch).
    pub(super) next_seq: HashMap<(Arc<str>, u32), i32>,
    pub(super) initializing: bool,
    pub(super) init_not_before: Instant,
    pub(super) init_attempts: u32,
    /// The id of the InitProducer request under way, kept across its retries so that a bump
    /// whose answer was lost is not applied twice (which would fence this producer).
    pub(super) init_request: Option<u64>,
    /// A batch failed for good with a sequence number: the epoch must change before anything
    /// more is sent (a new epoch restarts every partition at 0).
    pub(super) reset_wanted: bool,
    /// A newer incarnation exists: every batch fails with this.
    pub(super) fenced: Option<ClientError>,
    /// Partitions whose batch starting at this sequence number failed for good with a
    /// definite error: nothing after it can have been written either (the broker only writes
    /// the next sequence), so once the partition has nothing in flight the later batches are
    /// renumbered from there, without a new epoch.
    pub(super) rewinds: HashMap<(Arc<str>, u32), i32>,
}

impl Idempotence {
    fn ready(&self) -> bool {
        self.id.is_some() && !self.reset_wanted && !self.initializing
    }
}

impl Sender {
    /// Whether batches can be sent now: not while an idempotent producer has no id yet or is
    /// changing epochs. Starts that work when it is due.
    pub(super) fn idempotence_ready(
        &mut self,
        now: Instant,
        wake_at: &mut Option<Instant>,
    ) -> bool {
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
    pub(super) fn sequence(&mut self, batch: &mut ProducerBatch) -> Result<(), ClientError> {
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

    pub(super) fn on_producer_init(&mut self, r: Result<(i64, i16), ClientError>) {
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
    pub(super) fn gave_up(&mut self, batch: &ProducerBatch) {
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
    pub(super) fn apply_rewinds(&mut self) {
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
    pub(super) fn earlier_unresolved(&self, batch: &ProducerBatch) -> bool {
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
}

/// Whether sequence `a` comes strictly before `b`.
fn sequence_before(a: i32, b: i32) -> bool {
    a != b && sequence::at_or_before(a, b)
}
