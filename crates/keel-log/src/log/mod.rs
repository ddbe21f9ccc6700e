//! The partition log: an ordered set of segments with one writer and any number of readers.
//!
//! This module holds the `Log` type and its public value types, opening, state accessors and
//! poisoning; the operations live in the submodules named for them.

mod append;
mod flush;
mod read;
mod retention;
mod scrub;
mod truncate;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use bytes::Bytes;

use keel_batch::BatchHeader;

use crate::config::LogConfig;
use crate::error::{LogError, Result};
use crate::fs::{Fs, RealFs};
use crate::promise::{PromiseFile, Promised};
use crate::segment::{ActiveSegment, Segment, Tail};

pub use scrub::{Cursor, Damage, Repaired};

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
    /// The end of what this log ever reported durable (see `crate::promise`).
    pub(crate) promise: Mutex<PromiseFile>,
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
        let promise = PromiseFile::open(&*fs, &dir)?;
        let recovered_next = recovered.active.seg.tail().next_raft_index;
        if let Some(p) = promise.value()
            && p.next_raft_index > recovered_next
        {
            tracing::error!(dir = %dir.display(), promised_next_raft_index = p.next_raft_index, promised_last_term = p.last_term, recovered_next_raft_index = recovered_next, "recovery found less than this log had reported durable: acknowledged entries were lost or corrupted on disk and are missing until a replica supplies them again");
        }
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
            promise: Mutex::new(promise),
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

    /// The end of everything this log ever reported durable (`None` before its first flush).
    pub fn promised(&self) -> Option<Promised> {
        lock(&self.promise).value()
    }

    /// The promise, if the log now ends before it: entries it reported durable are missing
    /// (recovery found them corrupt or torn). They are missing until appends (a replica
    /// repairing from its leader) reach the promised end again.
    pub fn missing_promised(&self) -> Option<Promised> {
        self.promised()
            .filter(|p| p.next_raft_index > self.next_raft_index())
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
}
