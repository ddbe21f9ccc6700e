//! The idempotent-producer state of one partition: for each producer id, its epoch and the
//! sequence ranges and offsets of its last [`WINDOW`] batches.
//!
//! It is a function of the partition's log: every replica derives it by [`ProducerTable::record`]
//! of each data batch in log order (the Raft state machine does so as it applies), so it
//! survives failover and restarts without being stored, and snapshots carry it for a follower
//! that catches up past purged entries. The leader consults it ([`ProducerTable::check`]) before
//! it appends, to answer a retried batch with its original offsets instead of writing it again.
//!
//! `record` is idempotent and ignores batches older than what it holds, so a table taken later
//! than the point it is restored at (a snapshot carries the table as of the last applied entry,
//! not as of the snapshot point) comes out the same once the entries after the point are
//! re-applied. Pure logic, no IO.

use std::collections::{BTreeMap, VecDeque};

use keel_batch::sequence::{self, at_or_before};
use serde::{Deserialize, Serialize};

/// The last sequence number of a batch of `count` records starting at `first`.
pub use keel_batch::sequence::last as last_sequence;

/// Batches remembered per producer. A client may have at most this many requests in flight
/// per partition, so every batch it could still retry is in the window.
pub const WINDOW: usize = 5;

/// The default of the topic config `producer.id.expiration.ms`: a partition forgets a producer
/// that wrote nothing to it for this long (Kafka's
/// `producer.id.expiration.ms` default, a day); far longer than any delivery timeout.
pub const EXPIRY_MS: i64 = 24 * 60 * 60 * 1000;

/// Stands for "not known yet" in the offsets of a batch appended but not yet committed.
const PENDING: u64 = u64::MAX;

fn next_sequence(s: i32) -> i32 {
    sequence::next(s, 1)
}

/// One written batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqBatch {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: u64,
    pub next_offset: u64,
}

impl SeqBatch {
    /// A batch appended by this leader whose offsets are not known until it commits.
    pub fn pending(first_seq: i32, last_seq: i32) -> Self {
        Self {
            first_seq,
            last_seq,
            base_offset: PENDING,
            next_offset: PENDING,
        }
    }

    pub fn is_pending(&self) -> bool {
        self.base_offset == PENDING
    }
}

/// What a partition knows of one producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Oldest first; never empty; at most [`WINDOW`].
    pub batches: VecDeque<SeqBatch>,
    /// When this replica last saw a batch of the producer (its own clock, milliseconds since
    /// the epoch), for expiry.
    pub last_timestamp: i64,
}

impl ProducerEntry {
    fn new(epoch: i16, batch: SeqBatch, timestamp: i64) -> Self {
        Self {
            epoch,
            batches: VecDeque::from([batch]),
            last_timestamp: timestamp,
        }
    }

    fn last_seq(&self) -> Option<i32> {
        self.batches.back().map(|b| b.last_seq)
    }

    /// The verdict on a batch `(epoch, first..=last)` from this producer.
    pub fn check(&self, epoch: i16, first: i32, last: i32) -> Verdict {
        if epoch < self.epoch {
            return Verdict::Fenced {
                current: self.epoch,
            };
        }
        if epoch > self.epoch {
            // A new incarnation starts every partition's sequence over.
            return if first == 0 {
                Verdict::Append
            } else {
                Verdict::OutOfOrder {
                    expected: 0,
                    got: first,
                }
            };
        }
        if let Some(b) = self
            .batches
            .iter()
            .find(|b| b.first_seq == first && b.last_seq == last)
        {
            return Verdict::Duplicate(*b);
        }
        let expected = self.last_seq().map_or(first, next_sequence);
        if first == expected {
            Verdict::Append
        } else {
            Verdict::OutOfOrder {
                expected,
                got: first,
            }
        }
    }

    /// Adds a batch that is in the log (see [`ProducerTable::record`]).
    fn record(&mut self, epoch: i16, batch: SeqBatch, timestamp: i64) {
        if epoch < self.epoch {
            // Admitted before the newer epoch reached this partition: it is in the log, but
            // the newer incarnation's state is what matters from now on.
            return;
        }
        if epoch > self.epoch {
            *self = Self::new(epoch, batch, timestamp);
            return;
        }
        self.last_timestamp = self.last_timestamp.max(timestamp);
        if let Some(b) = self
            .batches
            .iter_mut()
            .find(|b| b.first_seq == batch.first_seq)
        {
            // Already known; a pending projection learns the offsets.
            if b.is_pending() && !batch.is_pending() {
                *b = batch;
            }
            return;
        }
        // Re-applied after a snapshot taken later than its point: offsets only grow along the
        // log, so a batch that starts before the newest known one ends is from the past.
        // (Offsets, not sequences, decide this: sequences restart when a replica forgot the
        // producer.)
        if !batch.is_pending()
            && self
                .batches
                .iter()
                .rev()
                .find(|b| !b.is_pending())
                .is_some_and(|b| batch.base_offset < b.next_offset)
        {
            return;
        }
        match self.last_seq() {
            Some(last) if batch.first_seq == next_sequence(last) => {
                self.batches.push_back(batch);
                if self.batches.len() > WINDOW {
                    self.batches.pop_front();
                }
            }
            // A pending projection of a batch the window has moved past.
            Some(last) if batch.is_pending() && at_or_before(batch.last_seq, last) => {}
            // A gap: the leader admitted it without knowing the earlier batches (it had
            // forgotten the producer, which then started over). What follows continues here.
            _ => self.batches = VecDeque::from([batch]),
        }
    }
}

/// The leader's decision on an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New and in sequence: write it.
    Append,
    /// Already written: answer with these offsets (pending: wait until it commits).
    Duplicate(SeqBatch),
    /// A gap or a sequence that does not continue the producer's: nothing is written.
    OutOfOrder { expected: i32, got: i32 },
    /// A newer epoch of this producer id has written here.
    Fenced { current: i16 },
}

/// The verdict on the first batch of a producer the partition does not know.
pub fn first_batch(first: i32) -> Verdict {
    if first == 0 {
        Verdict::Append
    } else {
        Verdict::OutOfOrder {
            expected: 0,
            got: first,
        }
    }
}

/// Every producer a partition knows, by producer id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerTable {
    producers: BTreeMap<i64, ProducerEntry>,
}

impl ProducerTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    /// The verdict on a batch. A producer the partition does not know (new here, or expired)
    /// must start at sequence 0: then a batch that follows one refused as a whole is never
    /// written, which lets the client renumber what follows a definite failure.
    pub fn check(&self, producer_id: i64, epoch: i16, first: i32, last: i32) -> Verdict {
        match self.producers.get(&producer_id) {
            Some(e) => e.check(epoch, first, last),
            None => first_batch(first),
        }
    }

    /// Records a data batch of the log, in log order. Idempotent, and batches older than the
    /// producer's window or epoch change nothing.
    pub fn record(&mut self, producer_id: i64, epoch: i16, batch: SeqBatch, timestamp: i64) {
        match self.producers.get_mut(&producer_id) {
            Some(e) => e.record(epoch, batch, timestamp),
            None => {
                self.producers
                    .insert(producer_id, ProducerEntry::new(epoch, batch, timestamp));
            }
        }
    }

    /// Forgets producers whose last batch is older than `max_idle_ms` before `now_ms`; returns
    /// how many. A retry from a forgotten producer is written again, so the idle time must be
    /// far longer than any client's delivery timeout.
    pub fn expire(&mut self, now_ms: i64, max_idle_ms: i64) -> usize {
        let before = self.producers.len();
        self.producers
            .retain(|_, e| e.last_timestamp.saturating_add(max_idle_ms) >= now_ms);
        before - self.producers.len()
    }

    /// This producer's entry with `pending` batches (appended, not yet committed, oldest first)
    /// laid over it: what the log will hold once they commit.
    pub fn project(&self, producer_id: i64, pending: &[(i16, i32, i32)]) -> Option<ProducerEntry> {
        let mut entry = self.producers.get(&producer_id).cloned();
        for &(epoch, first, last) in pending {
            let b = SeqBatch::pending(first, last);
            match &mut entry {
                Some(e) => e.record(epoch, b, i64::MIN),
                None => entry = Some(ProducerEntry::new(epoch, b, i64::MIN)),
            }
        }
        entry
    }

    /// The verdict on a batch with `pending` (the leader's appended, not yet applied batches
    /// of that producer, oldest first) laid over the table.
    pub fn check_with_pending(
        &self,
        producer_id: i64,
        epoch: i16,
        first: i32,
        last: i32,
        pending: &[(i16, i32, i32)],
    ) -> Verdict {
        if pending.is_empty() {
            return self.check(producer_id, epoch, first, last);
        }
        self.project(producer_id, pending)
            .map_or_else(|| first_batch(first), |e| e.check(epoch, first, last))
    }

    /// Whether a pending batch is now reflected by the committed state (so the leader can stop
    /// tracking it): its sequence is in or before the window of its epoch, or the epoch moved on.
    pub fn covers(&self, producer_id: i64, epoch: i16, last: i32) -> bool {
        self.producers.get(&producer_id).is_some_and(|e| {
            e.epoch > epoch
                || (e.epoch == epoch && e.last_seq().is_some_and(|l| at_or_before(last, l)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(first: i32, count: u32, base: u64) -> SeqBatch {
        SeqBatch {
            first_seq: first,
            last_seq: last_sequence(first, count),
            base_offset: base,
            next_offset: base + u64::from(count),
        }
    }

    fn out_of_order(expected: i32, got: i32) -> Verdict {
        Verdict::OutOfOrder { expected, got }
    }

    #[test]
    fn duplicates_gaps_and_fencing() {
        let mut t = ProducerTable::new();
        assert_eq!(t.check(7, 0, 0, 9), Verdict::Append);
        t.record(7, 0, b(0, 10, 100), 1);
        assert_eq!(t.check(7, 0, 0, 9), Verdict::Duplicate(b(0, 10, 100)));
        assert_eq!(t.check(7, 0, 10, 19), Verdict::Append);
        assert_eq!(t.check(7, 0, 11, 19), out_of_order(10, 11));
        // Same first sequence, different length: not the batch that was written.
        assert_eq!(t.check(7, 0, 0, 4), out_of_order(10, 0));
        // A new epoch starts at 0 and fences the old one.
        assert_eq!(t.check(7, 1, 5, 9), out_of_order(0, 5));
        assert_eq!(t.check(7, 1, 0, 0), Verdict::Append);
        t.record(7, 1, b(0, 1, 110), 2);
        assert_eq!(t.check(7, 0, 10, 19), Verdict::Fenced { current: 1 });
        // Unknown producers start at 0.
        assert_eq!(t.check(8, 3, 0, 50), Verdict::Append);
        assert_eq!(t.check(8, 3, 42, 50), out_of_order(0, 42));
    }

    #[test]
    fn window_evicts_the_oldest() {
        let mut t = ProducerTable::new();
        for i in 0..7u32 {
            t.record(1, 0, b((i * 2) as i32, 2, u64::from(i) * 2), 0);
        }
        let e = t.get(1).expect("entry");
        assert_eq!(e.batches.len(), WINDOW);
        assert_eq!(e.batches.front().map(|b| b.first_seq), Some(4));
        // Evicted batches are not duplicates any more, and not appendable either.
        assert!(matches!(t.check(1, 0, 0, 1), Verdict::OutOfOrder { .. }));
        assert_eq!(t.check(1, 0, 4, 5), Verdict::Duplicate(b(4, 2, 4)));
    }

    #[test]
    fn sequences_wrap() {
        let mut t = ProducerTable::new();
        let first = i32::MAX - 1;
        assert_eq!(last_sequence(first, 4), 1);
        t.record(1, 0, b(first, 4, 0), 0);
        assert_eq!(t.check(1, 0, 2, 3), Verdict::Append);
        assert!(t.covers(1, 0, i32::MAX));
        assert!(!t.covers(1, 0, 2));
    }

    #[test]
    fn record_is_idempotent_and_ignores_the_past() {
        let mut t = ProducerTable::new();
        for i in 0..8u32 {
            t.record(1, 0, b(i as i32, 1, u64::from(i)), 0);
        }
        let before = t.clone();
        // Re-applying everything (a restore from a later table) changes nothing.
        for i in 0..8u32 {
            t.record(1, 0, b(i as i32, 1, u64::from(i)), 0);
        }
        assert_eq!(t, before);
        // An older epoch changes nothing.
        t.record(1, -1, b(100, 1, 9), 0);
        assert_eq!(t, before);
    }

    #[test]
    fn projection_and_expiry() {
        let mut t = ProducerTable::new();
        t.record(1, 0, b(0, 2, 0), 1_000);
        let p = t.project(1, &[(0, 2, 3), (0, 4, 4)]).expect("entry");
        assert_eq!(p.check(0, 5, 5), Verdict::Append);
        assert!(matches!(p.check(0, 2, 3), Verdict::Duplicate(d) if d.is_pending()));
        assert!(t.covers(1, 0, 1));
        assert!(!t.covers(1, 0, 3));
        t.record(2, 0, b(0, 1, 2), 5_000);
        assert_eq!(t.expire(6_000, 2_000), 1);
        assert!(t.get(1).is_none() && t.get(2).is_some());
    }

    /// One step of a producer against a partition leader.
    #[derive(Debug, Clone)]
    enum Step {
        /// Send the next new batch of this many records.
        Send(u32),
        /// Resend one of the last few sent batches (a retry after a lost answer).
        Retry(usize),
        /// Send a batch with a sequence the producer never reached.
        Skip(u32),
        /// A new incarnation: the epoch goes up and sequences restart.
        Bump,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u32..50).prop_map(Step::Send),
            3 => (0usize..WINDOW).prop_map(Step::Retry),
            1 => (1u32..5).prop_map(Step::Skip),
            1 => Just(Step::Bump),
        ]
    }

    proptest! {
        /// A leader that appends only what `check` calls new never writes a batch twice, answers
        /// every retry within the window with the original offsets, rejects gaps and keeps
        /// offsets contiguous; replaying the log into a fresh table gives the same table.
        #[test]
        fn the_leader_never_writes_twice(steps in proptest::collection::vec(step(), 1..80)) {
            let mut t = ProducerTable::new();
            let mut log: Vec<(i16, SeqBatch)> = Vec::new();
            let mut end = 0u64;
            let (mut epoch, mut next_seq) = (0i16, 0i32);
            let mut sent: Vec<(i16, i32, u32)> = Vec::new();
            for s in steps {
                let (e, first, count) = match s {
                    Step::Send(n) => { let r = (epoch, next_seq, n); next_seq = last_sequence(next_seq, n) + 1; sent.push(r); r }
                    Step::Retry(k) if k < sent.len() => sent[sent.len() - 1 - k],
                    Step::Retry(_) => continue,
                    Step::Skip(gap) => (epoch, next_seq + gap as i32, 1),
                    Step::Bump => { epoch += 1; next_seq = 0; sent.clear(); continue; }
                };
                let last = last_sequence(first, count);
                match t.check(1, e, first, last) {
                    Verdict::Append => {
                        prop_assert!(!log.iter().any(|(le, lb)| *le == e && lb.first_seq == first), "written twice");
                        let batch = SeqBatch { first_seq: first, last_seq: last, base_offset: end, next_offset: end + u64::from(count) };
                        end += u64::from(count);
                        t.record(1, e, batch, 0);
                        log.push((e, batch));
                    }
                    Verdict::Duplicate(d) => {
                        let orig = log.iter().find(|(le, lb)| *le == e && lb.first_seq == first).map(|(_, b)| *b);
                        prop_assert_eq!(Some(d), orig);
                    }
                    Verdict::OutOfOrder { .. } => {
                        prop_assert!(matches!(s, Step::Skip(_)) || log.iter().any(|(le, lb)| *le == e && lb.first_seq == first), "an in-order batch was rejected");
                    }
                    Verdict::Fenced { .. } => prop_assert!(false, "the current epoch was fenced"),
                }
            }
            let mut w = 0u64;
            for (_, b) in &log {
                prop_assert_eq!(b.base_offset, w);
                w = b.next_offset;
            }
            let mut replay = ProducerTable::new();
            for (e, b) in &log { replay.record(1, *e, *b, 0); }
            prop_assert_eq!(&replay, &t);
            // A table restored from the end and fed the whole log again is the same too.
            let mut restored = t.clone();
            for (e, b) in &log { restored.record(1, *e, *b, 0); }
            prop_assert_eq!(&restored, &t);
        }
    }
}
