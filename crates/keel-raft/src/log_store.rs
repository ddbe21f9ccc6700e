//! `RaftLogStorage` over a keel partition log.
//!
//! Layout of a store directory:
//!
//! ```text
//! <dir>/
//!   log/             the keel-log partition log: one Raft entry per record batch
//!   raft-vote        the vote (CRC-checked JSON; a corrupt file refuses to open)
//!   raft-committed   the last committed log id as far as this replica knows (a hint)
//!   raft-purged      the last purged log id (needed by get_log_state after a restart)
//!   raft-snapshot    the state machine's current snapshot (`PartitionSm`, metadata only)
//! ```
//!
//! The Raft index and term of each entry are the batch header's `raft_index` and `raft_term`.
//! Offsets are assigned by the log; control entries (blank, membership) take none.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use keel_batch::BatchIter;
use keel_log::fs::{Fs, RealFs};
use keel_log::{Clock, Log, LogConfig, LogError, ReadLimit, SystemClock};
use openraft::OptionalSend;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};

use crate::codec::{self, Encoded};
use crate::flusher::Flusher;
use crate::state_file::StateFile;
use crate::types::{Entry, KeelRaft, LogId, Vote, log_id};

const LOG_DIR: &str = "log";
const VOTE_FILE: &str = "raft-vote";
const COMMITTED_FILE: &str = "raft-committed";
const PURGED_FILE: &str = "raft-purged";

/// How often the committed log id hint is persisted (see `save_committed`).
const COMMITTED_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Default cap on the bytes `limited_get_log_entries` returns (replication payloads).
pub const DEFAULT_MAX_READ_BYTES: u64 = 1 << 20;

#[derive(Debug, Default, Clone)]
struct Meta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// The last purge point and the offset the log continues from after it.
    purged: Option<PurgeRecord>,
    /// Set by the state machine when it installs a snapshot: the offset the log must continue
    /// from after that snapshot's last entry, used by a purge past the end of the log.
    snapshot_offset: Option<(LogId, u64)>,
}

/// What `raft-purged` holds: the purge point and the offset the log continues from after it,
/// so that a purge a crash interrupted is finished with the right offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct PurgeRecord {
    log_id: LogId,
    next_offset: u64,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    log: Arc<Log>,
    fs: Arc<dyn Fs>,
    vote_file: StateFile,
    committed_file: StateFile,
    purged_file: StateFile,
    meta: Mutex<Meta>,
    max_read_bytes: u64,
    /// Whether `append` fsyncs before acknowledging (see [`KeelLogStore::set_sync_appends`]).
    sync_appends: AtomicBool,
    /// When the committed log id was last written to `raft-committed` (see `save_committed`).
    committed_saved_at: Mutex<Option<std::time::Instant>>,
    /// Acknowledges synced appends once an fsync covers them.
    flusher: Arc<Flusher>,
}

/// A partition's Raft log storage: a keel log plus the vote, committed and purge point.
#[derive(Debug, Clone)]
pub struct KeelLogStore {
    inner: Arc<Inner>,
}

/// A reader over the same log; sees every entry appended after it was created.
#[derive(Debug, Clone)]
pub struct KeelLogReader {
    inner: Arc<Inner>,
}

fn lock(m: &Mutex<Meta>) -> MutexGuard<'_, Meta> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Converts a keel log error into the `io::Error` openraft expects, keeping its source chain.
pub fn log_err(e: LogError, context: &str) -> io::Error {
    let kind = match &e {
        LogError::Corrupt { .. } => io::ErrorKind::InvalidData,
        LogError::DiskFull { .. } => io::ErrorKind::StorageFull,
        LogError::Io { source, .. } => source.kind(),
        LogError::InvalidBatch(_)
        | LogError::BatchTooLarge { .. }
        | LogError::NonContiguousIndex { .. }
        | LogError::TermWentBackwards { .. }
        | LogError::Config(_) => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    let mut msg = format!("{context}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    io::Error::new(kind, msg)
}

/// Runs blocking storage work on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("storage task failed: {e}")))?
}

impl KeelLogStore {
    /// Opens (or creates) the store in `dir` on the real filesystem.
    ///
    /// The store owns durability and retention of the log: appends never flush on their own
    /// (the store fsyncs once per `append` call, before acknowledging, unless
    /// [`KeelLogStore::set_sync_appends`] turned that off; the configured policy still drives
    /// background flushes) and size/time retention is disabled (data is only removed through
    /// `purge`).
    /// Blocking: call it from a blocking context.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> io::Result<Self> {
        Self::open_with(dir, config, Arc::new(RealFs), Arc::new(SystemClock))
    }

    /// Like [`KeelLogStore::open`] with an explicit filesystem and clock (tests, `CrashFs`).
    pub fn open_with(
        dir: impl AsRef<Path>,
        mut config: LogConfig,
        fs: Arc<dyn Fs>,
        clock: Arc<dyn Clock>,
    ) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs.create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
        let vote_file = StateFile::new(&dir, VOTE_FILE);
        let committed_file = StateFile::new(&dir, COMMITTED_FILE);
        let purged_file = StateFile::new(&dir, PURGED_FILE);

        let vote: Option<Vote> = vote_file.load(&*fs)?;
        let purge_record: Option<PurgeRecord> = purged_file.load(&*fs)?;
        // The committed id is a hint (openraft works without it); losing it is safe.
        let committed: Option<LogId> = match committed_file.load(&*fs) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "ignoring corrupt committed log id");
                None
            }
            Err(e) => return Err(e),
        };

        config.retention_ms = None;
        config.retention_bytes = None;
        let log = Log::open_with(
            dir.join(LOG_DIR),
            config,
            Arc::clone(&fs),
            Arc::clone(&clock),
        )
        .map_err(|e| log_err(e, "opening the partition log"))?;

        // A purge is recorded before the log is cut: finish one a crash interrupted.
        if let Some(r) = purge_record {
            if log.next_raft_index() <= r.log_id.index {
                tracing::info!(dir = %dir.display(), purged = %r.log_id, next_offset = r.next_offset, "finishing an interrupted purge");
                log.reset(r.next_offset, r.log_id.index + 1, r.log_id.leader_id.term)
                    .map_err(|e| log_err(e, "resetting the log to the purge point"))?;
            } else if log.log_start_offset() < r.next_offset {
                log.delete_before(r.next_offset)
                    .map_err(|e| log_err(e, "advancing the log start to the purge point"))?;
            }
        }

        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                log: Arc::new(log),
                fs,
                vote_file,
                committed_file,
                purged_file,
                meta: Mutex::new(Meta {
                    vote,
                    committed,
                    purged: purge_record,
                    snapshot_offset: None,
                }),
                max_read_bytes: DEFAULT_MAX_READ_BYTES,
                sync_appends: AtomicBool::new(true),
                committed_saved_at: Mutex::new(None),
                flusher: Arc::new(Flusher::new()),
            }),
        })
    }

    /// The partition log (for the broker's fetch path: read up to the commit index only).
    pub fn log(&self) -> &Log {
        &self.inner.log
    }

    /// The partition log as a shared handle (for tasks that outlive a borrow of the store).
    pub fn log_arc(&self) -> Arc<Log> {
        Arc::clone(&self.inner.log)
    }

    /// The filesystem the store writes through (state files beside the log use it too).
    pub(crate) fn fs(&self) -> &Arc<dyn Fs> {
        &self.inner.fs
    }

    /// The last purge point and the partition offset the log continues from after it, if the
    /// log was ever purged.
    pub fn purge_point(&self) -> Option<(LogId, u64)> {
        lock(&self.inner.meta)
            .purged
            .map(|r| (r.log_id, r.next_offset))
    }

    /// Chooses whether `append` makes entries durable before acknowledging them (default: on).
    ///
    /// * **On**: every `append` call ends with one `fsync` of the log before openraft's
    ///   `IOFlushed` callback fires, so an entry this replica acknowledged (to its leader, or
    ///   counted towards its own commit as leader) survives a power loss. A committed entry is
    ///   lost only if every replica that stored it loses its disk.
    /// * **Off**: `append` writes the entries to the page cache and acknowledges at once; they
    ///   reach the disk when the OS writes them back or a background flusher (the log's flush
    ///   policy via `Log::flush_if_due`, or `Log::flush`) syncs them. A process crash loses
    ///   nothing (the page cache survives it), but a power loss can lose a tail of entries this
    ///   replica already acknowledged, committed ones included; after it the log recovers to a
    ///   CRC-checked prefix. That is Kafka's default durability: safe as long as replicas do not
    ///   lose power together; if a majority does, committed (and consumed) data can be lost, and
    ///   a replica that forgot entries it acknowledged can weaken Raft's guarantees until it
    ///   has caught up again.
    ///
    /// In both modes the vote and the purge record are always fsynced before they take effect,
    /// so a replica never votes twice in a term and never serves purged entries; the committed
    /// log id is fsynced too, and is clamped on read to the last entry the log still holds.
    pub fn set_sync_appends(&self, on: bool) {
        self.inner.sync_appends.store(on, Ordering::Release);
    }

    /// Whether `append` fsyncs before acknowledging (see [`KeelLogStore::set_sync_appends`]).
    pub fn sync_appends(&self) -> bool {
        self.inner.sync_appends.load(Ordering::Acquire)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Tells the store the partition offset that follows `last`, the last entry of a snapshot
    /// the state machine is installing. openraft purges the log up to `last` after the
    /// snapshot is installed; when that purge passes the end of the local log, the log restarts
    /// empty at `last.index + 1` and must continue at the leader's offsets, which only the
    /// snapshot knows. Without this call it continues at the local log end offset, which is
    /// only right if the snapshot covers no data this replica does not hold.
    pub fn set_snapshot_offset(&self, last: LogId, next_offset: u64) {
        lock(&self.inner.meta).snapshot_offset = Some((last, next_offset));
    }

    /// The last entry this replica ever acknowledged as durable, if its log now ends before it
    /// (entries were lost on disk since: see `crate::repair`).
    pub fn missing_promised(&self) -> Option<LogId> {
        self.inner
            .log
            .missing_promised()
            .map(|p| log_id(p.last_term, p.next_raft_index.saturating_sub(1)))
    }

    /// The committed log id this replica last knew of, if it ever knew one.
    pub fn committed_hint(&self) -> Option<LogId> {
        lock(&self.inner.meta).committed
    }

    /// Records a purge point without cutting the log (the entries up to it are already gone:
    /// see `adopt`), fsynced.
    pub(crate) fn record_purge(&self, log_id: LogId, next_offset: u64) -> io::Result<()> {
        let record = PurgeRecord {
            log_id,
            next_offset,
        };
        self.inner
            .purged_file
            .store(&*self.inner.fs, &Some(record))?;
        lock(&self.inner.meta).purged = Some(record);
        Ok(())
    }

    /// Writes the committed log id hint at once, fsynced.
    pub(crate) fn store_committed(&self, committed: LogId) -> io::Result<()> {
        lock(&self.inner.meta).committed = Some(committed);
        self.inner
            .committed_file
            .store(&*self.inner.fs, &Some(committed))
    }

    /// The entries in `[start, end)` (blocking).
    pub(crate) fn entries(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        self.inner.read_entries(start, end, u64::MAX)
    }

    /// Flushes and checkpoints the log so the next open validates nothing.
    pub fn checkpoint(&self) -> io::Result<()> {
        self.inner
            .log
            .checkpoint()
            .map_err(|e| log_err(e, "checkpointing the log"))?;
        let committed = lock(&self.inner.meta).committed;
        self.inner.committed_file.store(&*self.inner.fs, &committed)
    }
}

impl Inner {
    fn purged(&self) -> Option<LogId> {
        lock(&self.meta).purged.map(|r| r.log_id)
    }

    /// First Raft index that is logically present (entries at or below the purge point may
    /// still be in a segment but are never served).
    fn first_index(&self) -> u64 {
        let physical = self.log.first_raft_index();
        match self.purged() {
            Some(p) => physical.max(p.index + 1),
            None => physical,
        }
    }

    fn log_state(&self) -> LogState<KeelRaft> {
        let purged = self.purged();
        let first = self.first_index();
        let next = self.log.next_raft_index();
        let last = if next > first {
            Some(log_id(self.log.last_term(), next - 1))
        } else {
            purged
        };
        LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        }
    }

    /// Reads the entries in `[start, end)` that are present, up to about `max_bytes` (at least
    /// one entry when any is present).
    fn read_entries(&self, start: u64, end: u64, max_bytes: u64) -> io::Result<Vec<Entry>> {
        let start = start.max(self.first_index());
        let end = end.min(self.log.next_raft_index());
        let mut out = Vec::new();
        let mut idx = start;
        let mut budget = max_bytes;
        let committed = lock(&self.meta).committed.map(|c| c.index);
        while idx < end && budget > 0 {
            let limit = ReadLimit {
                max_offset: None,
                max_raft_index: Some(end),
            };
            let slice = self
                .log
                .read_raft(idx, budget, limit)
                .map_err(|e| log_err(e, &format!("reading raft index {idx}")))?;
            if slice.bytes.is_empty() {
                break;
            }
            budget = budget.saturating_sub(slice.bytes.len() as u64);
            decode_slice(&slice.bytes, &mut idx, &mut out, committed)?;
        }
        Ok(out)
    }

    /// Writes the entries; returns the flush sequence to make durable before acknowledging
    /// them (`None`: appends are not synced, see [`KeelLogStore::set_sync_appends`]).
    fn append_blocking(&self, entries: Vec<Entry>) -> io::Result<Option<u64>> {
        let mut last_seq = None;
        for entry in &entries {
            let (term, index) = (entry.log_id.leader_id.term, entry.log_id.index);
            let next = self.log.next_raft_index();
            if index != next {
                let purged = self.purged();
                let empty = self.first_index() >= next;
                let behind_purge = purged.is_some_and(|p| index <= p.index);
                if !empty || behind_purge {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "append of {} leaves a hole or overwrites: the log's next index is {next}, last purged {purged:?}",
                            entry.log_id
                        ),
                    ));
                }
                // An empty log starts wherever the first entry says.
                let prev_term = purged.map_or(0, |p| p.leader_id.term).min(term);
                self.log
                    .reset(self.log.log_end_offset(), index, prev_term)
                    .map_err(|e| log_err(e, "restarting the empty log"))?;
            }
            // Control batches get a fixed timestamp: every replica encodes them itself, and the
            // committed prefix must be byte-identical on all of them (time retention ignores
            // control batches anyway).
            let encoded = codec::encode(&entry.payload, 0)?;
            let info = match &encoded {
                Encoded::Verified(v) => self.log.append_verified_deferred(v, term, Some(index)),
                other => self
                    .log
                    .append_deferred(other.as_slice(), term, Some(index)),
            }
            .map_err(|e| log_err(e, &format!("appending entry {}", entry.log_id)))?;
            last_seq = Some(info.flush_seq);
        }
        Ok(last_seq.filter(|_| self.sync_appends.load(Ordering::Acquire)))
    }

    fn truncate_blocking(&self, last: Option<LogId>) -> io::Result<()> {
        let purged = self.purged();
        match last {
            Some(id) => {
                if purged.is_some_and(|p| id.index < p.index) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "truncate after {id} would remove purged entries (purged {purged:?})"
                        ),
                    ));
                }
                if id.index + 1 >= self.log.next_raft_index() {
                    return Ok(());
                }
                self.log
                    .truncate_after_raft_index(Some(id.index))
                    .map_err(|e| log_err(e, &format!("truncating after {id}")))
            }
            None => {
                if purged.is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "truncating the whole log would remove purged entries (purged {purged:?})"
                        ),
                    ));
                }
                self.log
                    .truncate_after_raft_index(None)
                    .map_err(|e| log_err(e, "truncating the whole log"))
            }
        }
    }

    fn purge_blocking(&self, upto: LogId) -> io::Result<()> {
        let (purged, hint) = {
            let m = lock(&self.meta);
            (m.purged.map(|r| r.log_id), m.snapshot_offset)
        };
        if purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        let ctx = |e| log_err(e, &format!("purging up to {upto}"));
        let next = self.log.next_raft_index();
        let keep_from = upto.index + 1;
        let past_end = keep_from >= next;
        let next_offset = if past_end {
            match hint {
                Some((id, offset)) if id == upto => offset,
                _ => self.log.log_end_offset(),
            }
        } else if keep_from > self.log.first_raft_index() {
            self.log.entry_header(keep_from).map_err(ctx)?.base_offset
        } else {
            self.log.log_start_offset()
        };
        // Record the purge point first: a crash before the log is cut leaves entries the
        // store no longer serves, and open finishes a purge that passed the log's end.
        let record = PurgeRecord {
            log_id: upto,
            next_offset,
        };
        self.purged_file.store(&*self.fs, &Some(record))?;
        lock(&self.meta).purged = Some(record);

        if past_end {
            // Everything present (and possibly more) is purged: restart the log empty at the
            // next index.
            let empty_at_point = next == keep_from
                && self.log.first_raft_index() == next
                && self.log.log_end_offset() == next_offset;
            if !empty_at_point {
                self.log
                    .reset(next_offset, keep_from, upto.leader_id.term)
                    .map_err(ctx)?;
            }
        } else if next_offset > self.log.log_start_offset() {
            self.log.delete_before(next_offset).map_err(ctx)?;
        }
        Ok(())
    }
}

/// Decodes consecutive batches into entries, checking that their indexes continue from `idx`.
///
/// Entries above the committed index are copied out of the segment mapping: a follower's
/// truncation zero-fills and then reuses their bytes in place, which a zero-copy `Bytes`
/// still held by a replication task would observe. Committed entries are never rewritten,
/// so they are served zero-copy.
fn decode_slice(
    bytes: &Bytes,
    idx: &mut u64,
    out: &mut Vec<Entry>,
    committed: Option<u64>,
) -> io::Result<()> {
    for item in BatchIter::checked_by_log(bytes) {
        let (h, batch) = item.map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reading raft index {idx}: {e}"),
            )
        })?;
        if h.raft_index != *idx {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "expected raft index {idx}, the log returned {}",
                    h.raft_index
                ),
            ));
        }
        let stable = committed.is_some_and(|c| h.raft_index <= c);
        let entry = if stable {
            codec::decode(&h, batch, bytes)?
        } else {
            let owned = Bytes::copy_from_slice(batch);
            codec::decode(&h, &owned, &owned)?
        };
        out.push(entry);
        *idx += 1;
    }
    Ok(())
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<KeelRaft> for KeelLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        // Reads are memory-mapped and short; they run inline.
        self.inner.read_entries(start, end, u64::MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock(&self.inner.meta).vote)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        self.inner
            .read_entries(start, end, self.inner.max_read_bytes)
    }
}

impl RaftLogStorage<KeelRaft> for KeelLogStore {
    type LogReader = KeelLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<KeelRaft>, io::Error> {
        Ok(self.inner.log_state())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        KeelLogReader {
            inner: Arc::clone(&self.inner),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let inner = Arc::clone(&self.inner);
        let v = *vote;
        blocking(move || {
            inner.vote_file.store(&*inner.fs, &Some(v))?;
            lock(&inner.meta).vote = Some(v);
            Ok(())
        })
        .await
    }

    /// The committed id is a hint for restarts (openraft re-applies up to it; an older value
    /// only means the state machine catches up once the group runs again), so it is written at
    /// most once per [`COMMITTED_SAVE_INTERVAL`] and on `checkpoint`, not on every commit: an
    /// atomic file replace costs two fsyncs, which at thousands of commits per second would
    /// dominate a replica's IO.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        lock(&self.inner.meta).committed = committed;
        let due = {
            let mut at = self
                .inner
                .committed_saved_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = at.is_none_or(|t| t.elapsed() >= COMMITTED_SAVE_INTERVAL);
            if due {
                *at = Some(std::time::Instant::now());
            }
            due
        };
        if !due {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let latest = lock(&inner.meta).committed;
            inner.committed_file.store(&*inner.fs, &latest)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let committed = lock(&self.inner.meta).committed;
        // Without synchronous appends a power loss can take entries the (always fsynced)
        // committed id covers; openraft re-applies up to this id on start and must find every
        // entry. The log is a prefix of what it was, so its last entry is committed too.
        let last = self.inner.log_state().last_log_id;
        Ok(match (committed, last) {
            (Some(c), Some(l)) if l.index < c.index => Some(l),
            (Some(_), None) => None,
            (c, _) => c,
        })
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<KeelRaft>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let inner = Arc::clone(&self.inner);
        match blocking(move || inner.append_blocking(entries)).await? {
            Some(seq) => self
                .inner
                .flusher
                .ack_when_durable(&self.inner.log, seq, callback),
            None => self.inner.flusher.ack_in_order(callback),
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.inner.flusher.drained().await;
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.truncate_blocking(last_log_id)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.inner.flusher.drained().await;
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.purge_blocking(log_id)).await
    }
}
