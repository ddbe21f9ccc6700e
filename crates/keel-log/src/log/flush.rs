//! Durability: flushes with group commit, recovery checkpoints, and cutting back what a
//! failed sync may not have written.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::truncate::tail_at;
use super::{Log, Writer, lock};
use crate::checkpoint::{self, Checkpoint};
use crate::config::FlushPolicy;
use crate::error::Result;
use crate::promise::Promised;
use crate::segment::Key;

impl Log {
    /// After a failed sync, cuts the active segment back to what the last successful sync
    /// made durable. Linux marks the pages a failed writeback could not write as clean: they
    /// stay readable in the page cache but may never reach the disk, and no later sync retries
    /// them. Leaving them would let a reopened log (the broker restarts a failed replica in
    /// the same process) count as durable what may not be. The zeroes written here are dirty
    /// again, so the next sync that works puts them on disk.
    pub(super) fn discard_unsynced(&self, w: &mut Writer) {
        let keep_next = self.durable_next.load(Ordering::Acquire);
        let seg = Arc::clone(&w.active.seg);
        let end = seg.tail().next_raft_index;
        if keep_next >= end {
            return;
        }
        let published = self.segments();
        // The writer's segment may be missing from the published list (a failed `reset`
        // empties it); it then has no predecessor to take a term from.
        let (segs, k) = match published.iter().position(|s| Arc::ptr_eq(s, &seg)) {
            Some(k) => (&published[..], k),
            None => (std::slice::from_ref(&seg), 0),
        };
        let cut = seg
            .locate(Key::RaftIndex(keep_next.max(seg.base_raft_index)))
            .and_then(|found| match found {
                Some((pos, _)) => Ok(Some((pos, tail_at(segs, k, pos)?))),
                None => Ok(None),
            });
        match cut {
            Ok(Some((pos, tail))) => {
                w.active.cut(pos, tail);
                tracing::warn!(dir = %self.dir.display(), next_raft_index = tail.next_raft_index, discarded_to = end, "discarded appends a failed sync may not have written");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "could not discard appends after a failed sync");
            }
        }
    }

    /// Makes every append that returned so far durable.
    pub fn flush(&self) -> Result<()> {
        self.flush_to(self.append_seq.load(Ordering::Acquire))
    }

    /// Makes appends up to `seq` ([`AppendInfo::flush_seq`]) durable. Concurrent callers share
    /// one fsync (group commit). A failed fsync poisons the log.
    pub fn flush_to(&self, seq: u64) -> Result<()> {
        self.check_poisoned()?;
        if self.flushed_seq.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        {
            let _g = lock(&self.sync_lock);
            if self.flushed_seq.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            self.check_poisoned()?;
            // Read the sequence before choosing the segment: a roll seals (and syncs) the old
            // segment before publishing the new one, so whatever the sequence covers is either
            // in the segment synced here or already durable.
            let current = self.append_seq.load(Ordering::Acquire);
            // The writer's own segment, not the published list (which a failed `reset` can
            // leave empty): never report durability without an fsync.
            // Read under the writer lock, with the promise's epoch: a truncation (which holds
            // that lock) between here and the promise below makes this end stale.
            let (seg, tail, epoch) = {
                let w = lock(&self.writer);
                let epoch = lock(&self.promise).epoch();
                (Arc::clone(&w.active.seg), w.active.seg.tail(), epoch)
            };
            // Every batch in the published tail was written before this sync starts.
            let covered = tail.next_raft_index;
            if let Err(e) = seg.sync_log() {
                let err = self.poison(&e);
                self.discard_unsynced(&mut lock(&self.writer));
                return Err(err);
            }
            self.durable_next.fetch_max(covered, Ordering::AcqRel);
            // Promise what the sync covered before anyone hears it is durable. Failing to
            // record it is treated as a failed sync: an acknowledgement this replica could
            // later forget without noticing is what the promise exists to prevent.
            let promised = {
                let mut promise = lock(&self.promise);
                if promise.epoch() == epoch {
                    promise.advance(Promised {
                        next_raft_index: covered,
                        last_term: tail.last_term,
                    })
                } else {
                    Ok(())
                }
            };
            if let Err(e) = promised {
                return Err(self.poison(&e));
            }
            self.flushed_seq.fetch_max(current, Ordering::AcqRel);
            self.last_flush_ms
                .store(self.clock.now_ms().max(0) as u64, Ordering::Release);
        }
        let interval = lock(&self.writer).config.checkpoint_interval_bytes;
        if self.append_seq.load(Ordering::Acquire) - self.checkpoint_seq.load(Ordering::Acquire)
            >= interval
        {
            let mut w = lock(&self.writer);
            self.checkpoint_locked(&mut w)?;
        }
        Ok(())
    }

    /// Flushes if the interval flush policy says one is due (for a periodic scheduler).
    pub fn flush_if_due(&self) -> Result<bool> {
        let policy = lock(&self.writer).config.flush;
        let due = match policy {
            FlushPolicy::Interval(d) => {
                self.clock.now_ms()
                    >= self.last_flush_ms.load(Ordering::Acquire) as i64
                        + i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            }
            _ => false,
        };
        let dirty =
            self.append_seq.load(Ordering::Acquire) > self.flushed_seq.load(Ordering::Acquire);
        if due && dirty {
            self.flush()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Flushes and writes a recovery checkpoint when `checkpoint_interval_bytes` were appended
    /// since the last one. Under policies that do not flush every batch, a periodic caller (the
    /// broker) keeps crash recovery bounded by that interval rather than by the segment size.
    pub fn checkpoint_if_due(&self) -> Result<bool> {
        let interval = lock(&self.writer).config.checkpoint_interval_bytes;
        let due = || {
            self.append_seq.load(Ordering::Acquire) - self.checkpoint_seq.load(Ordering::Acquire)
                >= interval
        };
        if !due() {
            return Ok(false);
        }
        // Sync outside the writer lock first, so appends wait only for the small remainder.
        self.flush()?;
        if due() {
            self.checkpoint()?;
        }
        Ok(true)
    }

    /// Syncs the active segment with its indexes and records a recovery checkpoint there.
    pub(super) fn checkpoint_locked(&self, w: &mut Writer) -> Result<()> {
        let seq = self.append_seq.load(Ordering::Acquire);
        let seg = Arc::clone(&w.active.seg);
        if let Err(e) = seg.sync_all() {
            let err = self.poison(&e);
            self.discard_unsynced(w);
            return Err(err);
        }
        self.flushed_seq.fetch_max(seq, Ordering::AcqRel);
        let tail = seg.tail();
        self.durable_next
            .fetch_max(tail.next_raft_index, Ordering::AcqRel);
        let cp = Checkpoint {
            log_start_offset: self.log_start_offset(),
            active_base_offset: seg.base_offset,
            active_data_len: tail.data_len,
            next_offset: tail.next_offset,
            next_raft_index: tail.next_raft_index,
            last_term: tail.last_term,
            max_timestamp: tail.max_timestamp,
            index_entries: seg.offset_index_entries() as u32,
            time_entries: seg.time_index_entries() as u32,
        };
        // The data is durable at this point; failing to record the checkpoint (e.g. a full
        // disk) only makes the next recovery longer, so it is reported, not poisoning.
        checkpoint::write(&*self.fs, &self.dir, &cp)?;
        self.checkpoint_seq.store(seq, Ordering::Release);
        Ok(())
    }

    /// Flushes everything and writes a recovery checkpoint at the end of the log, so that an
    /// open right after validates nothing. The log stays usable.
    pub fn checkpoint(&self) -> Result<()> {
        self.check_poisoned()?;
        let mut w = lock(&self.writer);
        self.checkpoint_locked(&mut w)
    }

    /// Flushes everything and writes a checkpoint so that the next open validates nothing.
    pub fn close(self) -> Result<()> {
        self.checkpoint()
    }
}
