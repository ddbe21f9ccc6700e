//! Truncation (for Raft) and reset, and recomputing a segment's tail at a cut point.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Log, lock};
use crate::error::{LogError, Result};
use crate::promise::Promised;
use crate::segment::{ActiveSegment, Key, Segment, Tail};
use crate::segment_file::SEGMENT_HEADER_LEN;

impl Log {
    /// Removes every batch that holds `offset` or lies after it. Returns the new log end.
    pub fn truncate_to(&self, offset: u64) -> Result<u64> {
        self.truncate(Key::Offset(offset))?;
        Ok(self.log_end_offset())
    }

    /// Removes every entry with a Raft index above `last_kept` (all of them for `None`).
    pub fn truncate_after_raft_index(&self, last_kept: Option<u64>) -> Result<()> {
        let key = match last_kept {
            Some(i) => Key::RaftIndex(i + 1),
            None => Key::RaftIndex(0),
        };
        self.truncate(key)
    }

    fn truncate(&self, key: Key) -> Result<()> {
        self.check_poisoned()?;
        let mut w = lock(&self.writer);
        let segs = self.segments();
        let pick = |s: &Arc<Segment>| match key {
            Key::Offset(o) => s.base_offset < o,
            Key::RaftIndex(i) => s.base_raft_index <= i,
        };
        let mut k = segs.partition_point(pick).saturating_sub(1);
        let mut found = None;
        while k < segs.len() {
            if let Some((pos, _)) = segs[k].locate(key)? {
                found = Some(pos);
                break;
            }
            k += 1;
        }
        let Some(pos) = found else {
            return Ok(());
        };
        let seg = Arc::clone(&segs[k]);
        let tail = tail_at(&segs, k, pos)?;
        // Unpromise what goes before it goes: a crash after the cut must not find a promise
        // past the end of the log (recovery would take the truncation for lost entries).
        let lowered = lock(&self.promise).lower_for_truncation(Promised {
            next_raft_index: tail.next_raft_index,
            last_term: tail.last_term,
        });
        if let Err(e) = lowered {
            return Err(self.poison(&e));
        }
        let removed: Vec<Arc<Segment>> = segs[k + 1..].to_vec();
        if !Arc::ptr_eq(&w.active.seg, &seg) {
            w.active = ActiveSegment::attach(
                Arc::clone(&seg),
                w.config.segment_bytes,
                w.config.index_interval_bytes,
            )?;
        }
        // Later segments go first (durably), then the cut, then the checkpoint: a crash in
        // between leaves a log that recovery reads as the old one or the new one, never a gap.
        self.set_segments(segs[..=k].to_vec());
        if let Err(e) = self.delete_files(&removed) {
            return Err(self.poison(&e));
        }
        w.active.cut(pos, tail);
        self.durable_next
            .fetch_min(tail.next_raft_index, Ordering::AcqRel);
        let end = tail.next_offset;
        if self.log_start_offset() > end {
            self.log_start.store(end, Ordering::Release);
        }
        tracing::info!(dir = %self.dir.display(), log_end = end, next_raft_index = tail.next_raft_index, removed_segments = removed.len(), "log truncated");
        self.checkpoint_locked(&mut w)
    }

    /// Discards the whole log and restarts it empty at the given positions (e.g. after a
    /// follower installs a snapshot beyond its log).
    pub fn reset(&self, next_offset: u64, next_raft_index: u64, last_term: u64) -> Result<()> {
        self.check_poisoned()?;
        let mut w = lock(&self.writer);
        lock(&self.promise).on_reset();
        let old = self.segments();
        self.set_segments(Vec::new());
        if let Err(e) = self.delete_files(&old) {
            return Err(self.poison(&e));
        }
        let now = self.clock.now_ms();
        let next = match ActiveSegment::create_empty(
            &*self.fs,
            &self.dir,
            Tail::empty(next_offset, next_raft_index, last_term),
            now,
            w.config.segment_bytes,
            w.config.index_interval_bytes,
        ) {
            Ok(n) => n,
            Err(e) => return Err(self.poison(&e)),
        };
        self.set_segments(vec![Arc::clone(&next.seg)]);
        w.active = next;
        self.durable_next.store(next_raft_index, Ordering::Release);
        self.log_start.store(next_offset, Ordering::Release);
        self.checkpoint_locked(&mut w)
    }
}

/// The tail of `segs[k]` if it ended just before the batch at `pos`, taking the last term from
/// the segment before it.
pub(super) fn tail_at(segs: &[Arc<Segment>], k: usize, pos: u64) -> Result<Tail> {
    let prev_term = match k.checked_sub(1) {
        Some(p) => segs[p].last_batch()?.map_or(0, |h| h.raft_term),
        None => 0,
    };
    tail_before(&segs[k], pos, prev_term)
}

/// The segment's tail if it ended just before the batch at `pos`.
fn tail_before(seg: &Segment, pos: u64, prev_term: u64) -> Result<Tail> {
    let mut tail = Tail {
        data_len: SEGMENT_HEADER_LEN,
        next_offset: seg.base_offset,
        next_raft_index: seg.base_raft_index,
        last_term: prev_term,
        max_timestamp: seg.last_time_entry().map_or(i64::MIN, |e| e.timestamp),
    };
    if pos <= SEGMENT_HEADER_LEN {
        tail.max_timestamp = i64::MIN;
        return Ok(tail);
    }
    // Recompute from the last index entry before the cut and the batches after it.
    let keep_limit = pos;
    let mut max_ts = i64::MIN;
    let mut cursor = SEGMENT_HEADER_LEN;
    let n = seg.offset_index_entries();
    let idx = seg.index_map();
    for i in (0..n).rev() {
        if let Some(e) = crate::index::offset_entry(&idx, i)
            && u64::from(e.position) < keep_limit
        {
            cursor = u64::from(e.position);
            break;
        }
    }
    let (bytes, last) = seg.read_from(cursor, keep_limit - cursor, false, |_| false)?;
    for item in keel_batch::BatchIter::new(&bytes) {
        let (h, _) = item.map_err(|e| LogError::Corrupt {
            path: seg.log_path.clone(),
            position: cursor,
            reason: e.to_string(),
        })?;
        if !h.attributes.control {
            max_ts = max_ts.max(h.max_timestamp);
        }
    }
    // Time entries at or before the cursor cover everything earlier.
    let time_n = seg.time_index_entries();
    let tmap = seg.time_map();
    for i in (0..time_n).rev() {
        if let Some(e) = crate::index::time_entry(&tmap, i) {
            let off = seg.base_offset + u64::from(e.rel_offset);
            if last.is_some_and(|l| off <= l.last_offset()) {
                max_ts = max_ts.max(e.timestamp);
                break;
            }
        }
    }
    if let Some(l) = last {
        tail = Tail {
            data_len: pos,
            next_offset: l.next_offset(),
            next_raft_index: l.raft_index + 1,
            last_term: l.raft_term,
            max_timestamp: max_ts,
        };
    }
    Ok(tail)
}
