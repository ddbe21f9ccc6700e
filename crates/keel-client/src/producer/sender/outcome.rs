//! What becomes of a sent batch: acknowledged (its records' futures get their offsets), retried
//! after a backoff when the error allows it and time remains, or failed for good.

use tokio::time::Instant;

use super::Sender;
use crate::error::ClientError;
use crate::producer::RecordMetadata;
use crate::producer::accumulator::ProducerBatch;
use crate::util::{backoff, backoff_cap, lock};

impl Sender {
    /// A sent batch failed: retry it if the error is retriable and time remains, else fail it.
    pub(super) fn on_failure(&mut self, mut batch: ProducerBatch, err: ClientError) {
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

    pub(super) fn complete(&mut self, batch: ProducerBatch, base_offset: Option<u64>) {
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

    pub(super) fn fail(&mut self, batch: ProducerBatch, err: ClientError, was_in_flight: bool) {
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

pub(super) fn delivery_timeout(batch: &ProducerBatch, err: Option<ClientError>) -> ClientError {
    ClientError::DeliveryTimeout {
        elapsed_ms: u64::try_from(batch.created.elapsed().as_millis()).unwrap_or(u64::MAX),
        last_error: err.or_else(|| batch.last_error.clone()).map(Box::new),
    }
}
