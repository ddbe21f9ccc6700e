//! One segment: a `.log` file of batches plus its `.index` and `.timeindex`, all memory-mapped.
//!
//! Readers and the single writer never share a mapping: the writer writes through its own
//! `MmapMut` while readers hold read-only `Mmap`s of the same file, so no Rust reference ever
//! aliases memory being written. The writer publishes the end of valid data with a release store
//! after the bytes are in place; readers only touch bytes below the end they loaded (acquire).
//!
//! Files are only ever shrunk to the published end (when a segment is sealed), never below a
//! range a reader can reach, so a mapping never faults. Truncation zero-fills instead.
//!
//! This module holds the shared read side (`Segment`), its bounds (`Tail`), opening, syncing
//! and sealing; lookups, recovery scans and the writer side live in the submodules.

mod active;
mod cut;
mod index_writer;
mod read;
mod scan;

pub(crate) use active::ActiveSegment;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use memmap2::Mmap;

use crate::error::{LogError, Result};
use crate::fs::{FileHandle, Fs};
use crate::index::{self, ENTRY_LEN, OffsetEntry, TimeEntry};
use crate::segment_file::{SEGMENT_HEADER_LEN, SegmentHeader, paths};

/// What a lookup searches for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Key {
    /// The first batch holding this offset or, for control batches, based at or after it.
    Offset(u64),
    /// The batch with this Raft index.
    RaftIndex(u64),
}

/// The shared, read side of a segment.
#[derive(Debug)]
pub(crate) struct Segment {
    pub base_offset: u64,
    pub base_raft_index: u64,
    pub created_at_ms: i64,
    pub log_path: PathBuf,
    pub files: [Arc<dyn FileHandle>; 3],
    maps: RwLock<[Arc<Mmap>; 3]>,
    data_len: AtomicU64,
    /// The largest end ever published: readers may hold bytes up to it, so the file is never
    /// shrunk below it (a truncation zero-fills instead).
    max_published: AtomicU64,
    index_entries: AtomicUsize,
    time_entries: AtomicUsize,
    /// Batches at positions `>= trusted_from` were CRC-checked when written or recovered.
    trusted_from: AtomicU64,
    /// Batches below this position were CRC-checked by an earlier read.
    verified_upto: AtomicU64,
    pub next_offset: AtomicU64,
    pub next_raft_index: AtomicU64,
    pub last_term: AtomicU64,
    pub max_timestamp: AtomicI64,
    /// Set when a read found a batch of this segment damaged, for the scrub to look at.
    pub damaged: AtomicBool,
    /// Not writable (sealed, or loaded and not attached as the active segment): every read
    /// checks the CRC of each batch it touches, trusting nothing verified before, since a bit
    /// may flip on disk long after. Reads of the active segment, where the tail readers are,
    /// trust what this process wrote or verified.
    sealed: AtomicBool,
}

/// Summary of a segment's content, as computed by a scan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tail {
    pub data_len: u64,
    pub next_offset: u64,
    pub next_raft_index: u64,
    pub last_term: u64,
    pub max_timestamp: i64,
}

impl Tail {
    /// The tail of a segment holding no batches: the next batch continues at these positions.
    pub fn empty(next_offset: u64, next_raft_index: u64, last_term: u64) -> Self {
        Self {
            data_len: SEGMENT_HEADER_LEN,
            next_offset,
            next_raft_index,
            last_term,
            max_timestamp: i64::MIN,
        }
    }
}

impl Segment {
    pub fn data_len(&self) -> u64 {
        self.data_len.load(Ordering::Acquire)
    }

    pub fn size_bytes(&self) -> u64 {
        self.data_len()
    }

    fn map(&self, i: usize) -> Arc<Mmap> {
        let maps = self
            .maps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&maps[i])
    }

    fn corrupt(&self, position: u64, reason: impl Into<String>) -> LogError {
        self.damaged.store(true, Ordering::Release);
        LogError::Corrupt {
            path: self.log_path.clone(),
            position,
            reason: reason.into(),
        }
    }

    pub fn offset_index_entries(&self) -> usize {
        self.index_entries.load(Ordering::Acquire)
    }

    pub fn time_index_entries(&self) -> usize {
        self.time_entries.load(Ordering::Acquire)
    }

    pub fn last_time_entry(&self) -> Option<TimeEntry> {
        let n = self.time_entries.load(Ordering::Acquire);
        index::time_entry(&self.map(2), n.checked_sub(1)?)
    }

    pub fn last_index_entry(&self) -> Option<OffsetEntry> {
        let n = self.index_entries.load(Ordering::Acquire);
        index::offset_entry(&self.map(1), n.checked_sub(1)?)
    }

    pub fn tail(&self) -> Tail {
        Tail {
            data_len: self.data_len(),
            next_offset: self.next_offset.load(Ordering::Acquire),
            next_raft_index: self.next_raft_index.load(Ordering::Acquire),
            last_term: self.last_term.load(Ordering::Acquire),
            max_timestamp: self.max_timestamp.load(Ordering::Acquire),
        }
    }

    fn publish(&self, tail: Tail) {
        self.next_offset.store(tail.next_offset, Ordering::Release);
        self.next_raft_index
            .store(tail.next_raft_index, Ordering::Release);
        self.last_term.store(tail.last_term, Ordering::Release);
        self.max_timestamp
            .store(tail.max_timestamp, Ordering::Release);
        self.max_published
            .fetch_max(tail.data_len, Ordering::AcqRel);
        self.data_len.store(tail.data_len, Ordering::Release);
    }

    /// Opens an existing segment's files and maps them read-only. Content bounds are set by
    /// the caller (from a checkpoint, the file length or a scan).
    pub fn open(fs: &dyn Fs, dir: &std::path::Path, base_offset: u64) -> Result<(Self, Vec<u8>)> {
        let [log_p, idx_p, time_p] = paths(dir, base_offset);
        let log = fs
            .open(&log_p)
            .map_err(|e| LogError::io("opening", &log_p, e))?;
        let idx = open_or_create(fs, &idx_p)?;
        let time = open_or_create(fs, &time_p)?;
        let log_len = log
            .len()
            .map_err(|e| LogError::io("reading size of", &log_p, e))?;
        let mut head = vec![0u8; SEGMENT_HEADER_LEN as usize];
        let header = if log_len >= SEGMENT_HEADER_LEN {
            let map = log
                .map_read(SEGMENT_HEADER_LEN)
                .map_err(|e| LogError::io("mapping", &log_p, e))?;
            head.copy_from_slice(&map);
            SegmentHeader::decode(&head)
        } else {
            Err("file shorter than the segment header".to_owned())
        };
        let header = header.map_err(|reason| LogError::Corrupt {
            path: log_p.clone(),
            position: 0,
            reason,
        })?;
        if header.base_offset != base_offset {
            return Err(LogError::Corrupt {
                path: log_p,
                position: 16,
                reason: format!(
                    "segment header says base offset {}, file name says {base_offset}",
                    header.base_offset
                ),
            });
        }
        let maps = [map_read(&*log)?, map_read(&*idx)?, map_read(&*time)?];
        let seg = Self::new(header, log_p, [log, idx, time], maps);
        Ok((seg, head))
    }

    fn new(
        header: SegmentHeader,
        log_path: PathBuf,
        files: [Arc<dyn FileHandle>; 3],
        maps: [Arc<Mmap>; 3],
    ) -> Self {
        Self {
            base_offset: header.base_offset,
            base_raft_index: header.base_raft_index,
            created_at_ms: header.created_at_ms,
            log_path,
            files,
            maps: RwLock::new(maps),
            data_len: AtomicU64::new(SEGMENT_HEADER_LEN),
            max_published: AtomicU64::new(SEGMENT_HEADER_LEN),
            index_entries: AtomicUsize::new(0),
            time_entries: AtomicUsize::new(0),
            trusted_from: AtomicU64::new(SEGMENT_HEADER_LEN),
            verified_upto: AtomicU64::new(SEGMENT_HEADER_LEN),
            next_offset: AtomicU64::new(header.base_offset),
            next_raft_index: AtomicU64::new(header.base_raft_index),
            last_term: AtomicU64::new(0),
            max_timestamp: AtomicI64::new(i64::MIN),
            damaged: AtomicBool::new(false),
            sealed: AtomicBool::new(true),
        }
    }

    /// Whether reads may trust what this process wrote or verified (see `sealed`).
    pub(crate) fn set_writable(&self, writable: bool) {
        self.sealed.store(!writable, Ordering::Release);
    }

    fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Sets the bounds of a segment whose content was established by the caller.
    pub fn set_loaded(
        &self,
        tail: Tail,
        index_entries: usize,
        time_entries: usize,
        trusted_from: u64,
    ) {
        self.index_entries.store(index_entries, Ordering::Release);
        self.time_entries.store(time_entries, Ordering::Release);
        self.trusted_from.store(trusted_from, Ordering::Release);
        self.publish(tail);
    }

    /// Reads the raw bytes of the mapped log file (for recovery scans).
    pub fn log_map(&self) -> Arc<Mmap> {
        self.map(0)
    }

    pub fn index_map(&self) -> Arc<Mmap> {
        self.map(1)
    }

    pub fn time_map(&self) -> Arc<Mmap> {
        self.map(2)
    }

    pub fn sync_all(&self) -> Result<()> {
        for f in &self.files {
            f.sync_data()
                .map_err(|e| LogError::io("flushing", f.path(), e))?;
        }
        Ok(())
    }

    pub fn sync_log(&self) -> Result<()> {
        let f = &self.files[0];
        f.sync_data()
            .map_err(|e| LogError::io("flushing", f.path(), e))
    }

    /// Trims the files of a segment that will not be written again to their content, and
    /// makes everything durable.
    pub fn seal(&self) -> Result<()> {
        let lens = [
            self.data_len()
                .max(self.max_published.load(Ordering::Acquire)),
            (self.index_entries.load(Ordering::Acquire) * ENTRY_LEN) as u64,
            (self.time_entries.load(Ordering::Acquire) * ENTRY_LEN) as u64,
        ];
        for (f, len) in self.files.iter().zip(lens) {
            f.set_len(len)
                .map_err(|e| LogError::io("trimming", f.path(), e))?;
            f.sync_data()
                .map_err(|e| LogError::io("flushing", f.path(), e))?;
        }
        self.set_writable(false);
        Ok(())
    }
}

fn open_or_create(fs: &dyn Fs, path: &std::path::Path) -> Result<Arc<dyn FileHandle>> {
    if fs.exists(path) {
        fs.open(path).map_err(|e| LogError::io("opening", path, e))
    } else {
        fs.create(path)
            .map_err(|e| LogError::io("creating", path, e))
    }
}

fn map_read(f: &dyn FileHandle) -> Result<Arc<Mmap>> {
    let len = f
        .len()
        .map_err(|e| LogError::io("reading size of", f.path(), e))?;
    f.map_read(len)
        .map(Arc::new)
        .map_err(|e| LogError::io("mapping", f.path(), e))
}
