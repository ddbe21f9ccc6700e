//! The partition log: an ordered set of segments with one writer and any number of readers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use bytes::Bytes;

use crate::checkpoint::{self, Checkpoint};
use crate::config::{FlushPolicy, LogConfig};
use crate::error::{LogError, Result};
use crate::fs::{Fs, RealFs};
use crate::segment::{ActiveSegment, Key, Segment, Tail};
use crate::segment_file::{SEGMENT_HEADER_LEN, paths};
use keel_batch::{
    BatchError, BatchHeader, DEFAULT_MAX_DECOMPRESSED, VerifiedBatch, decode_records,
    parse_verified,
};

/// Source of wall-clock time in milliseconds since the epoch (injected so tests control it).
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// First offset of the batch (for a control batch: the next offset, which it does not take).
    pub base_offset: u64,
    /// The log end offset after the append.
    pub next_offset: u64,
    pub raft_index: u64,
    pub raft_term: u64,
    pub max_timestamp: i64,
    /// Sequence number to pass to [`Log::flush_to`] to make exactly this append durable.
    pub flush_seq: u64,
}

/// Batches returned by a read: zero-copy bytes of the segment mapping.
#[derive(Debug, Clone)]
pub struct ReadSlice {
    /// Zero or more whole batches.
    pub bytes: Bytes,
    /// Header of the last batch returned, if any.
    pub last: Option<BatchHeader>,
}

impl ReadSlice {
    fn empty() -> Self {
        Self {
            bytes: Bytes::new(),
            last: None,
        }
    }
}

/// Upper bounds for a read, e.g. the high watermark.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadLimit {
    /// Do not return batches at or above this offset.
    pub max_offset: Option<u64>,
    /// Do not return batches at or above this Raft index.
    pub max_raft_index: Option<u64>,
}

/// What a retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub deleted_segments: usize,
    pub deleted_bytes: u64,
    pub log_start_offset: u64,
}

pub(crate) struct Writer {
    pub config: LogConfig,
    pub active: ActiveSegment,
}

/// A segmented, memory-mapped partition log. Appends are serialised; reads run concurrently
/// with appends, flushes and retention.
#[derive(Debug)]
pub struct Log {
    pub(crate) dir: PathBuf,
    pub(crate) fs: Arc<dyn Fs>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) writer: Mutex<Writer>,
    pub(crate) view: RwLock<Arc<Vec<Arc<Segment>>>>,
    pub(crate) log_start: AtomicU64,
    /// Bytes ever appended by this process: a sequence for group commit.
    pub(crate) append_seq: AtomicU64,
    pub(crate) flushed_seq: AtomicU64,
    pub(crate) checkpoint_seq: AtomicU64,
    pub(crate) last_flush_ms: AtomicU64,
    sync_lock: Mutex<()>,
    /// Next Raft index past what the last successful sync made durable: a failed sync cuts
    /// the log back to it (see `discard_unsynced`).
    durable_next: AtomicU64,
    poisoned: AtomicBool,
    poison_reason: Mutex<Option<String>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Log {
    /// Opens (or creates) the log in `dir` on the real filesystem.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Self> {
        Self::open_with(dir, config, Arc::new(RealFs), Arc::new(SystemClock))
    }

    /// Opens the log with an explicit filesystem and clock, recovering after a crash.
    pub fn open_with(
        dir: impl AsRef<Path>,
        config: LogConfig,
        fs: Arc<dyn Fs>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let recovered = crate::recovery::recover(&*fs, &dir, &config, clock.now_ms())?;
        let log = Self {
            dir,
            fs,
            clock,
            writer: Mutex::new(Writer {
                config,
                active: recovered.active,
            }),
            view: RwLock::new(Arc::new(recovered.segments)),
            log_start: AtomicU64::new(recovered.log_start),
            append_seq: AtomicU64::new(0),
            flushed_seq: AtomicU64::new(0),
            checkpoint_seq: AtomicU64::new(0),
            last_flush_ms: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            // Unknown until recovery is done: a failed sync while opening discards nothing
            // (the open fails, and the next one recovers from the files again).
            durable_next: AtomicU64::new(u64::MAX),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
        };
        if recovered.needs_checkpoint {
            let mut w = lock(&log.writer);
            log.checkpoint_locked(&mut w)?;
        }
        // What recovery kept is durable: it was checkpointed, or synced just now.
        let next = lock(&log.writer).active.seg.tail().next_raft_index;
        log.durable_next.store(next, Ordering::Release);
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn segments(&self) -> Arc<Vec<Arc<Segment>>> {
        Arc::clone(&self.view.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set_segments(&self, segs: Vec<Arc<Segment>>) {
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(segs);
    }

    fn active(&self) -> Option<Arc<Segment>> {
        self.segments().last().cloned()
    }

    fn tail(&self) -> Tail {
        self.active().map_or(Tail::empty(0, 0, 0), |s| s.tail())
    }

    /// First offset still readable.
    pub fn log_start_offset(&self) -> u64 {
        self.log_start.load(Ordering::Acquire)
    }

    /// The offset the next record will get.
    pub fn log_end_offset(&self) -> u64 {
        self.tail().next_offset
    }

    /// The Raft index of the first entry still in the log.
    pub fn first_raft_index(&self) -> u64 {
        self.segments().first().map_or(0, |s| s.base_raft_index)
    }

    /// The Raft index the next entry will get.
    pub fn next_raft_index(&self) -> u64 {
        self.tail().next_raft_index
    }

    /// Term of the last entry (0 for an empty log).
    pub fn last_term(&self) -> u64 {
        self.tail().last_term
    }

    /// Bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments().iter().map(|s| s.size_bytes()).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments().len()
    }

    /// Base offsets of the segments, oldest first.
    pub fn segment_base_offsets(&self) -> Vec<u64> {
        self.segments().iter().map(|s| s.base_offset).collect()
    }

    pub fn config(&self) -> LogConfig {
        lock(&self.writer).config.clone()
    }

    /// Changes the configuration; segment size applies from the next roll.
    pub fn set_config(&self, config: LogConfig) -> Result<()> {
        config.validate()?;
        lock(&self.writer).config = config;
        Ok(())
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.is_poisoned() {
            let reason = lock(&self.poison_reason)
                .clone()
                .unwrap_or_else(|| "unknown".into());
            return Err(LogError::Poisoned { reason });
        }
        Ok(())
    }

    fn poison(&self, err: &LogError) -> LogError {
        let reason = err.to_string();
        tracing::error!(dir = %self.dir.display(), error = %reason, "log poisoned: a flush failed, no further writes are acknowledged");
        lock(&self.poison_reason).get_or_insert(reason.clone());
        self.poisoned.store(true, Ordering::Release);
        LogError::Poisoned { reason }
    }

    /// After a failed sync, cuts the active segment back to what the last successful sync
    /// made durable. Linux marks the pages a failed writeback could not write as clean: they
    /// stay readable in the page cache but may never reach the disk, and no later sync retries
    /// them. Leaving them would let a reopened log (the broker restarts a failed replica in
    /// the same process) count as durable what may not be. The zeroes written here are dirty
    /// again, so the next sync that works puts them on disk.
    fn discard_unsynced(&self, w: &mut Writer) {
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
            let seg = Arc::clone(&lock(&self.writer).active.seg);
            // Every batch in the published tail was written before this sync starts.
            let covered = seg.tail().next_raft_index;
            if let Err(e) = seg.sync_log() {
                let err = self.poison(&e);
                self.discard_unsynced(&mut lock(&self.writer));
                return Err(err);
            }
            self.durable_next.fetch_max(covered, Ordering::AcqRel);
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
    fn checkpoint_locked(&self, w: &mut Writer) -> Result<()> {
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

    fn out_of_range(&self, offset: u64) -> LogError {
        LogError::OffsetOutOfRange {
            offset,
            log_start: self.log_start_offset(),
            log_end: self.log_end_offset(),
        }
    }

    /// Reads whole batches from the one holding `offset`, up to `max_bytes` (at least one batch
    /// when any is there). Reading at the log end returns nothing.
    pub fn read(&self, offset: u64, max_bytes: u64) -> Result<ReadSlice> {
        self.read_with(offset, max_bytes, ReadLimit::default())
    }

    /// Like [`Log::read`], stopping before batches at or above the given limits.
    pub fn read_with(&self, offset: u64, max_bytes: u64, limit: ReadLimit) -> Result<ReadSlice> {
        let start = self.log_start_offset();
        let end = self.log_end_offset();
        if offset < start || offset > end {
            return Err(self.out_of_range(offset));
        }
        let segs = self.segments();
        // Retention may have moved the start between the check above and loading the list.
        if offset < self.log_start_offset() || segs.first().is_some_and(|s| offset < s.base_offset)
        {
            return Err(self.out_of_range(offset));
        }
        let first = segs
            // A control batch at the end of the previous segment can share the offset a
            // segment starts at; start one segment early and let the lookup move on.
            .partition_point(|s| s.base_offset < offset)
            .saturating_sub(1);
        self.read_segments(&segs[first..], Key::Offset(offset), max_bytes, limit)
    }

    /// Reads whole batches starting at Raft index `index`.
    pub fn read_raft(&self, index: u64, max_bytes: u64, limit: ReadLimit) -> Result<ReadSlice> {
        let (first_idx, next_idx) = (self.first_raft_index(), self.next_raft_index());
        if index < first_idx || index > next_idx {
            return Err(LogError::IndexOutOfRange {
                index,
                first: first_idx,
                next: next_idx,
            });
        }
        let segs = self.segments();
        let first = segs
            .partition_point(|s| s.base_raft_index <= index)
            .saturating_sub(1);
        self.read_segments(&segs[first..], Key::RaftIndex(index), max_bytes, limit)
    }

    fn read_segments(
        &self,
        segs: &[Arc<Segment>],
        key: Key,
        max_bytes: u64,
        limit: ReadLimit,
    ) -> Result<ReadSlice> {
        let stop = |h: &BatchHeader| {
            limit.max_offset.is_some_and(|m| h.base_offset >= m)
                || limit.max_raft_index.is_some_and(|m| h.raft_index >= m)
        };
        let by_offset = matches!(key, Key::Offset(_));
        for (i, seg) in segs.iter().enumerate() {
            if let Some((pos, _)) = seg.locate(key)? {
                let (bytes, last, advanced) =
                    seg.read_batches(pos, max_bytes.max(1), by_offset, stop)?;
                // Control batches at the end of a segment take no offsets: a reader by offset
                // gets the next segment's data instead, so it always makes progress.
                let stuck = by_offset && !advanced;
                if stuck && i + 1 < segs.len() {
                    continue;
                }
                return Ok(ReadSlice { bytes, last });
            }
        }
        Ok(ReadSlice::empty())
    }

    /// The header of the entry with Raft index `index`.
    pub fn entry_header(&self, index: u64) -> Result<BatchHeader> {
        let slice = self.read_raft(index, 1, ReadLimit::default())?;
        match slice.last {
            Some(h) if h.raft_index == index => Ok(h),
            _ => Err(LogError::IndexOutOfRange {
                index,
                first: self.first_raft_index(),
                next: self.next_raft_index(),
            }),
        }
    }

    /// The offset and timestamp of the first record with a timestamp at or after `ts`, or
    /// `None` if every record is older.
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(u64, i64)>> {
        let start = self.log_start_offset();
        for seg in self.segments().iter() {
            let Some((pos, _)) = seg.locate_timestamp(ts)? else {
                continue;
            };
            let (bytes, _) = seg.read_from(pos, 1, false, |_| false)?;
            let records = decode_records(&bytes, DEFAULT_MAX_DECOMPRESSED).map_err(|e| {
                LogError::Corrupt {
                    path: seg.log_path.clone(),
                    position: pos,
                    reason: e.to_string(),
                }
            })?;
            if let Some(r) = records
                .iter()
                .find(|r| r.timestamp >= ts && r.offset >= start)
            {
                return Ok(Some((r.offset, r.timestamp)));
            }
        }
        Ok(None)
    }

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

    /// Advances the log start to `offset` (clamped to the log end) and deletes the segments
    /// wholly below it. Returns the new log start.
    pub fn delete_before(&self, offset: u64) -> Result<u64> {
        self.check_poisoned()?;
        let mut w = lock(&self.writer);
        let offset = offset.min(self.log_end_offset());
        if offset <= self.log_start_offset() {
            return Ok(self.log_start_offset());
        }
        self.log_start.store(offset, Ordering::Release);
        let segs = self.segments();
        let k = (0..segs.len().saturating_sub(1))
            .take_while(|i| segs.get(i + 1).is_some_and(|n| n.base_offset <= offset))
            .count();
        let removed = segs[..k].to_vec();
        self.set_segments(segs[k..].to_vec());
        self.checkpoint_locked(&mut w)?;
        drop(w);
        self.delete_files(&removed)?;
        Ok(offset)
    }

    /// The log start offset that retention by `retention_ms` / `retention_bytes` would give:
    /// the base offset of the first closed segment to keep (the current start when nothing
    /// would go). Deletes nothing: a replicated log deletes through its Raft group (snapshot at
    /// this boundary, then purge), whose own settings have retention off.
    pub fn retention_boundary(
        &self,
        retention_ms: Option<std::time::Duration>,
        retention_bytes: Option<u64>,
    ) -> u64 {
        let now = self.clock.now_ms();
        let segs = self.segments();
        let mut total: u64 = segs.iter().map(|s| s.size_bytes()).sum();
        let mut k = 0;
        while k + 1 < segs.len() {
            let s = &segs[k];
            let expired = retention_ms.is_some_and(|r| {
                let age = i64::try_from(r.as_millis()).unwrap_or(i64::MAX);
                s.max_timestamp.load(Ordering::Acquire) < now.saturating_sub(age)
            });
            let oversize =
                retention_bytes.is_some_and(|r| total.saturating_sub(s.size_bytes()) >= r);
            if !(expired || oversize) {
                break;
            }
            total -= s.size_bytes();
            k += 1;
        }
        segs.get(k)
            .map_or(0, |s| s.base_offset)
            .max(self.log_start_offset())
    }

    /// Deletes closed segments past `retention.ms` or beyond `retention.bytes`, oldest first.
    /// Readers still holding a deleted segment keep a valid mapping until they finish.
    pub fn apply_retention(&self) -> Result<RetentionOutcome> {
        self.check_poisoned()?;
        let now = self.clock.now_ms();
        let w = lock(&self.writer);
        let segs = self.segments();
        let mut total: u64 = segs.iter().map(|s| s.size_bytes()).sum();
        let mut k = 0;
        while k + 1 < segs.len() {
            let s = &segs[k];
            let expired = w.config.retention_ms.is_some_and(|r| {
                let age = i64::try_from(r.as_millis()).unwrap_or(i64::MAX);
                s.max_timestamp.load(Ordering::Acquire) < now.saturating_sub(age)
            });
            let oversize = w
                .config
                .retention_bytes
                .is_some_and(|r| total.saturating_sub(s.size_bytes()) >= r);
            if !(expired || oversize) {
                break;
            }
            total -= s.size_bytes();
            k += 1;
        }
        if k == 0 {
            return Ok(RetentionOutcome {
                log_start_offset: self.log_start_offset(),
                ..Default::default()
            });
        }
        let removed = segs[..k].to_vec();
        let new_start = segs[k].base_offset.max(self.log_start_offset());
        self.log_start.store(new_start, Ordering::Release);
        self.set_segments(segs[k..].to_vec());
        // No checkpoint needed: a start at a segment boundary is recovered from the files, so
        // appends wait only for this list swap, not for any IO.
        drop(w);
        let deleted_bytes = removed.iter().map(|s| s.size_bytes()).sum();
        self.delete_files(&removed)?;
        tracing::info!(dir = %self.dir.display(), deleted_segments = k, deleted_bytes, log_start = new_start, "retention deleted segments");
        Ok(RetentionOutcome {
            deleted_segments: k,
            deleted_bytes,
            log_start_offset: new_start,
        })
    }

    fn delete_files(&self, segs: &[Arc<Segment>]) -> Result<()> {
        if segs.is_empty() {
            return Ok(());
        }
        for s in segs {
            for p in paths(&self.dir, s.base_offset) {
                if self.fs.exists(&p) {
                    self.fs
                        .remove(&p)
                        .map_err(|e| LogError::io("removing", &p, e))?;
                }
            }
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| LogError::io("syncing directory", &self.dir, e))
    }
}

/// The tail of `segs[k]` if it ended just before the batch at `pos`, taking the last term from
/// the segment before it.
fn tail_at(segs: &[Arc<Segment>], k: usize, pos: u64) -> Result<Tail> {
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
