//! Appending to the log: the append entry points, segment rolls.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_batch::{BatchError, BatchHeader, VerifiedBatch, parse_verified};

use super::{AppendInfo, Log, Writer, lock};
use crate::config::FlushPolicy;
use crate::error::{LogError, Result};
use crate::segment::{ActiveSegment, Segment, Tail};

impl Log {
    /// Appends one encoded batch, assigning its offsets and the next Raft index. The batch must
    /// be exactly one valid batch (header checks and CRC are verified here).
    pub fn append(&self, batch: &[u8], term: u64) -> Result<AppendInfo> {
        self.append_inner(batch, term, None)
    }

    /// Appends a batch that must receive Raft index `index` (a follower replicating the leader).
    pub fn append_at(&self, batch: &[u8], term: u64, index: u64) -> Result<AppendInfo> {
        self.append_inner(batch, term, Some(index))
    }

    /// Appends like [`Log::append_at`] (`index: None`: the next index) but never flushes,
    /// whatever the policy: for callers that make appends durable themselves with
    /// [`Log::flush_to`] (e.g. Raft acknowledging a whole `append` call after one fsync).
    pub fn append_deferred(
        &self,
        batch: &[u8],
        term: u64,
        index: Option<u64>,
    ) -> Result<AppendInfo> {
        self.append_with(batch, term, index, false)
    }

    /// [`Log::append_deferred`] of a batch already checked ([`VerifiedBatch`]): its bytes are
    /// not read again before they are copied in.
    pub fn append_verified_deferred(
        &self,
        batch: &VerifiedBatch,
        term: u64,
        index: Option<u64>,
    ) -> Result<AppendInfo> {
        self.check_poisoned()?;
        self.append_checked(
            batch.bytes(),
            batch.header(),
            batch.payload_crc(),
            term,
            index,
            false,
        )
    }

    fn append_inner(&self, batch: &[u8], term: u64, index: Option<u64>) -> Result<AppendInfo> {
        self.append_with(batch, term, index, true)
    }

    fn append_with(
        &self,
        batch: &[u8],
        term: u64,
        index: Option<u64>,
        apply_policy: bool,
    ) -> Result<AppendInfo> {
        self.check_poisoned()?;
        let (header, exact, payload_crc) = parse_verified(batch)?;
        if exact.len() != batch.len() {
            return Err(LogError::InvalidBatch(BatchError::BadLength {
                length: header.batch_length,
                reason: "bytes follow the batch",
            }));
        }
        self.append_checked(batch, &header, payload_crc, term, index, apply_policy)
    }

    /// Appends one whole batch whose header, length and CRC were checked.
    fn append_checked(
        &self,
        batch: &[u8],
        header: &BatchHeader,
        payload_crc: u32,
        term: u64,
        index: Option<u64>,
        apply_policy: bool,
    ) -> Result<AppendInfo> {
        let header = *header;
        let len = batch.len() as u64;
        let mut w = lock(&self.writer);
        if len > w.config.max_batch_bytes {
            return Err(LogError::BatchTooLarge {
                size: len,
                limit: w.config.max_batch_bytes,
            });
        }
        let mut tail = w.active.seg.tail();
        if let Some(i) = index
            && i != tail.next_raft_index
        {
            return Err(LogError::NonContiguousIndex {
                expected: tail.next_raft_index,
                got: i,
            });
        }
        if term < tail.last_term {
            return Err(LogError::TermWentBackwards {
                term,
                last: tail.last_term,
            });
        }
        let now = self.clock.now_ms();
        if self.should_roll(&w, &header, len, now) {
            self.roll(&mut w, now)?;
            tail = w.active.seg.tail();
        }
        w.active.grow(tail.data_len + len)?;
        w.active.append(
            batch,
            &header,
            payload_crc,
            tail.next_offset,
            term,
            tail.next_raft_index,
        )?;
        let seq = self.append_seq.fetch_add(len, Ordering::AcqRel) + len;
        let flush = w.config.flush;
        if flush != FlushPolicy::EveryBatch {
            w.active.kick_writeback();
        }
        drop(w);
        let info = AppendInfo {
            base_offset: tail.next_offset,
            next_offset: tail.next_offset + header.offset_count(),
            raft_index: tail.next_raft_index,
            raft_term: term,
            max_timestamp: header.max_timestamp,
            flush_seq: seq,
        };
        if !apply_policy {
            return Ok(info);
        }
        match flush {
            FlushPolicy::EveryBatch => self.flush_to(seq)?,
            FlushPolicy::Interval(d) => {
                let due = self.last_flush_ms.load(Ordering::Acquire) as i64
                    + i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                if now >= due {
                    self.flush_to(seq)?;
                }
            }
            FlushPolicy::Os => {}
        }
        Ok(info)
    }

    fn should_roll(&self, w: &Writer, header: &BatchHeader, len: u64, now: i64) -> bool {
        let seg = &w.active.seg;
        let tail = seg.tail();
        // A segment that took no offsets cannot roll: the next would have the same name.
        if tail.next_offset == seg.base_offset {
            return false;
        }
        let too_big = tail.data_len + len > w.config.segment_bytes;
        let too_old = w.config.segment_ms.is_some_and(|d| {
            now.saturating_sub(seg.created_at_ms)
                >= i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
        });
        let rel_overflow = tail.next_offset + header.offset_count() - seg.base_offset
            > u64::from(u32::MAX)
            || tail.next_raft_index + 1 - seg.base_raft_index > u64::from(u32::MAX);
        too_big || too_old || rel_overflow
    }

    /// Seals the active segment and starts a new one. The new segment is created first, so a
    /// full disk leaves the log exactly as it was.
    fn roll(&self, w: &mut Writer, now: i64) -> Result<()> {
        // The old segment must be durable before the new one is: after a power loss, a new
        // segment next to an old one missing its unflushed tail would not continue it.
        if let Err(e) = w.active.seg.sync_log() {
            let err = self.poison(&e);
            self.discard_unsynced(w);
            return Err(err);
        }
        let tail = w.active.seg.tail();
        self.durable_next
            .fetch_max(tail.next_raft_index, Ordering::AcqRel);
        let next = ActiveSegment::create_empty(
            &*self.fs,
            &self.dir,
            Tail::empty(tail.next_offset, tail.next_raft_index, tail.last_term),
            now,
            w.config.segment_bytes,
            w.config.index_interval_bytes,
        )?;
        w.active.finish_time_index();
        if let Err(e) = w.active.seg.seal() {
            return Err(self.poison(&e));
        }
        let mut segs: Vec<Arc<Segment>> = self.segments().iter().cloned().collect();
        segs.push(Arc::clone(&next.seg));
        w.active = next;
        self.set_segments(segs);
        tracing::debug!(dir = %self.dir.display(), base_offset = tail.next_offset, "rolled segment");
        self.checkpoint_locked(w)
    }
}
