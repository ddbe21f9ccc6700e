//! Opening a log: the one place that decides what on-disk state is trusted.
//!
//! Rules:
//! - Segments before the checkpoint's segment were sealed (trimmed and fsynced) before the
//!   checkpoint was written: their length is their content and their indexes are trusted after
//!   an O(1) sanity check. They are CRC-checked lazily, when first read.
//! - The checkpoint's segment is trusted up to the checkpointed length; everything after that,
//!   and every later segment, is scanned batch by batch (header, CRC, contiguous offsets and
//!   indexes, non-decreasing terms) and its index entries are rebuilt.
//! - An invalid batch at the tail of the last segment is a torn write: the log is cut there
//!   (and the cut zero-filled) with a warning. An invalid batch followed by a later segment is
//!   corruption of data that may have been acknowledged: opening fails with `Corrupt`.
//! - A last segment whose header is invalid was being created when the process died (creation
//!   syncs the header before any append), so it is removed.
//! - Files that are not segments, indexes or the checkpoint are ignored with a warning.
//!
//! Recovery work is therefore proportional to the data written since the last checkpoint, not
//! to the size of the log.

use std::path::Path;
use std::sync::Arc;

use crate::checkpoint::{self, Checkpoint};
use crate::config::LogConfig;
use crate::error::{LogError, Result};
use crate::fs::Fs;
use crate::index::{self, ENTRY_LEN};
use crate::segment::{ActiveSegment, Segment, Tail};
use crate::segment_file::{INDEX_SUFFIX, SEGMENT_HEADER_LEN, TIME_SUFFIX, parse_log_name, paths};

pub(crate) struct Recovered {
    pub segments: Vec<Arc<Segment>>,
    pub active: ActiveSegment,
    pub log_start: u64,
    pub needs_checkpoint: bool,
}

pub(crate) fn recover(
    fs: &dyn Fs,
    dir: &Path,
    config: &LogConfig,
    now_ms: i64,
) -> Result<Recovered> {
    fs.create_dir_all(dir)
        .map_err(|e| LogError::io("creating", dir, e))?;
    checkpoint::remove_tmp(fs, dir);
    let names = fs.list(dir).map_err(|e| LogError::io("listing", dir, e))?;
    let mut bases: Vec<u64> = Vec::new();
    for name in &names {
        if let Some(base) = parse_log_name(name) {
            bases.push(base);
        } else if !(name == checkpoint::FILE
            || name == crate::promise::FILE
            || name.ends_with(INDEX_SUFFIX)
            || name.ends_with(TIME_SUFFIX))
        {
            tracing::warn!(dir = %dir.display(), file = %name, "ignoring unexpected file in log directory");
        }
    }
    bases.sort_unstable();
    let mut cp = checkpoint::read(fs, dir)?;
    if let Some(c) = cp
        && !bases.contains(&c.active_base_offset)
    {
        tracing::warn!(dir = %dir.display(), segment = c.active_base_offset, "checkpoint names a missing segment; scanning every segment");
        cp = None;
    }

    let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
    let mut active: Option<ActiveSegment> = None;
    let mut needs_checkpoint = false;
    let mut prev_tail: Option<Tail> = None;
    let count = bases.len();
    for (i, &base) in bases.iter().enumerate() {
        let is_last = i + 1 == count;
        let seg = match Segment::open(fs, dir, base) {
            Ok((seg, _)) => Arc::new(seg),
            Err(LogError::Corrupt { path, reason, .. })
                if is_last && unfinished_creation(fs, &path, cp.as_ref(), base)? =>
            {
                tracing::warn!(path = %path.display(), %reason, "removing a segment whose creation did not complete");
                for p in paths(dir, base) {
                    if fs.exists(&p) {
                        fs.remove(&p).map_err(|e| LogError::io("removing", &p, e))?;
                    }
                }
                fs.sync_dir(dir)
                    .map_err(|e| LogError::io("syncing directory", dir, e))?;
                needs_checkpoint = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(p) = prev_tail
            && (seg.base_offset != p.next_offset || seg.base_raft_index != p.next_raft_index)
        {
            // After the checkpoint's segment, a segment that does not continue the log is what
            // an interrupted truncation or roll leaves behind (its data was never part of the
            // log recovered so far): drop it and everything after it.
            if cp.is_some_and(|c| base > c.active_base_offset) {
                drop(seg);
                for &later in &bases[i..] {
                    for f in paths(dir, later) {
                        if fs.exists(&f) {
                            fs.remove(&f).map_err(|e| LogError::io("removing", &f, e))?;
                        }
                    }
                }
                fs.sync_dir(dir)
                    .map_err(|e| LogError::io("syncing directory", dir, e))?;
                tracing::warn!(dir = %dir.display(), from_segment = base, log_end = p.next_offset, "removed segments that do not continue the recovered log (interrupted truncation or roll)");
                needs_checkpoint = true;
                break;
            }
            return Err(LogError::Corrupt {
                path: seg.log_path.clone(),
                position: 16,
                reason: format!(
                    "segment starts at offset {} / index {} but the previous one ends at {} / {}",
                    seg.base_offset, seg.base_raft_index, p.next_offset, p.next_raft_index
                ),
            });
        }
        let checkpointed = cp.filter(|c| c.active_base_offset == base);
        let before_checkpoint = cp.is_some_and(|c| base < c.active_base_offset);
        if before_checkpoint {
            let tail = load_sealed(&seg)?;
            prev_tail = Some(tail);
            segments.push(seg);
            continue;
        }
        // From here on the segment is (partly) unverified: scan it with a writable handle.
        let start = match checkpointed {
            Some(c) => {
                let file_len = seg.files[0]
                    .len()
                    .map_err(|e| LogError::io("reading size of", &seg.log_path, e))?;
                if file_len < c.active_data_len {
                    return Err(LogError::Corrupt {
                        path: seg.log_path.clone(),
                        position: file_len,
                        reason: format!(
                            "file holds {file_len} bytes but {} were checkpointed as durable",
                            c.active_data_len
                        ),
                    });
                }
                let index_room =
                    |i: usize| seg.files[i].len().map_or(0, |l| (l as usize) / ENTRY_LEN);
                let c = Checkpoint {
                    index_entries: (c.index_entries as usize).min(index_room(1)) as u32,
                    time_entries: (c.time_entries as usize).min(index_room(2)) as u32,
                    ..c
                };
                let tail = Tail {
                    data_len: c.active_data_len,
                    next_offset: c.next_offset,
                    next_raft_index: c.next_raft_index,
                    last_term: c.last_term,
                    max_timestamp: c.max_timestamp,
                };
                seg.set_loaded(
                    tail,
                    c.index_entries as usize,
                    c.time_entries as usize,
                    c.active_data_len,
                );
                tail
            }
            None => {
                let tail = Tail::empty(
                    seg.base_offset,
                    seg.base_raft_index,
                    prev_tail.map_or(0, |t| t.last_term),
                );
                seg.set_loaded(tail, 0, 0, SEGMENT_HEADER_LEN);
                tail
            }
        };
        let mut writer = ActiveSegment::attach(
            Arc::clone(&seg),
            config.segment_bytes,
            config.index_interval_bytes,
        )?;
        let log = seg.log_map();
        // The writable mapping may extend past the file; scan only what the file holds.
        let in_file = log.get(..writer.reserved() as usize).unwrap_or(&log[..]);
        let (tail, found, stop) = seg.scan(in_file, start);
        drop(log);
        let mut max_ts = start.max_timestamp;
        for (pos, h) in &found {
            if !h.attributes.control {
                max_ts = max_ts.max(h.max_timestamp);
            }
            writer.on_batch(
                *pos,
                h.total_len() as u64,
                h.base_offset,
                h.raft_index,
                max_ts,
            );
        }
        if let Some(reason) = &stop {
            if !is_last {
                return Err(LogError::Corrupt {
                    path: seg.log_path.clone(),
                    position: tail.data_len,
                    reason: format!("{reason}; later segments exist, refusing to truncate"),
                });
            }
            tracing::warn!(path = %seg.log_path.display(), position = tail.data_len, %reason, "truncating torn or corrupt tail of the log");
        }
        writer.cut(tail.data_len, tail);
        writer.trust_from(start.data_len);
        if !found.is_empty() || stop.is_some() || checkpointed.is_none() {
            needs_checkpoint = true;
        }
        prev_tail = Some(tail);
        if is_last {
            active = Some(writer);
        } else {
            writer.finish_time_index();
            seg.seal()?;
        }
        segments.push(seg);
    }

    let active = match active {
        Some(a) => a,
        None => match segments.last() {
            // The last segment was trusted as sealed (the checkpoint's segment was removed
            // above): make it writable again.
            Some(last) => ActiveSegment::attach(
                Arc::clone(last),
                config.segment_bytes,
                config.index_interval_bytes,
            )?,
            None => {
                let (next_offset, next_raft_index, last_term) = cp
                    .map_or((0, 0, 0), |c: Checkpoint| {
                        (c.next_offset, c.next_raft_index, c.last_term)
                    });
                let a = ActiveSegment::create_empty(
                    fs,
                    dir,
                    Tail::empty(next_offset, next_raft_index, last_term),
                    now_ms,
                    config.segment_bytes,
                    config.index_interval_bytes,
                )?;
                segments.push(Arc::clone(&a.seg));
                needs_checkpoint = true;
                a
            }
        },
    };
    let first_base = segments.first().map_or(0, |s| s.base_offset);
    let end = active.seg.tail().next_offset;
    let log_start = cp
        .map_or(first_base, |c| c.log_start_offset.max(first_base))
        .min(end);
    Ok(Recovered {
        segments,
        active,
        log_start,
        needs_checkpoint,
    })
}

/// Loads a segment sealed before the checkpoint: trimmed files, trusted lengths. Its end
/// positions come from its last batch, found through the last index entry (O(1)).
fn load_sealed(seg: &Arc<Segment>) -> Result<Tail> {
    let data_len = seg.files[0]
        .len()
        .map_err(|e| LogError::io("reading size of", &seg.log_path, e))?;
    let idx_map = seg.index_map();
    let time_map = seg.time_map();
    let mut idx_n = index::count_offset_entries(&idx_map);
    let time_n = index::count_time_entries(&time_map).min(time_map.len() / ENTRY_LEN);
    if let Some(last) = idx_n
        .checked_sub(1)
        .and_then(|i| index::offset_entry(&idx_map, i))
        && u64::from(last.position) >= data_len
    {
        tracing::warn!(path = %seg.log_path.display(), "offset index points past the log; ignoring it");
        idx_n = 0;
    }
    let max_ts = time_n
        .checked_sub(1)
        .and_then(|i| index::time_entry(&time_map, i))
        .map_or(i64::MIN, |e| e.timestamp);
    seg.set_loaded(
        Tail {
            data_len,
            next_offset: seg.base_offset,
            next_raft_index: seg.base_raft_index,
            last_term: 0,
            max_timestamp: i64::MIN,
        },
        idx_n,
        time_n,
        data_len,
    );
    let data_len = seg.end_of_data(data_len);
    let mut tail = Tail {
        data_len,
        next_offset: seg.base_offset,
        next_raft_index: seg.base_raft_index,
        last_term: 0,
        max_timestamp: max_ts,
    };
    seg.set_loaded(tail, idx_n, time_n, data_len);
    if let Some(h) = seg.last_batch()? {
        tail.next_offset = h.next_offset();
        tail.next_raft_index = h.raft_index + 1;
        tail.last_term = h.raft_term;
        seg.set_loaded(tail, idx_n, time_n, data_len);
    }
    Ok(tail)
}

/// A last segment with an unreadable header is an interrupted creation only if no checkpoint
/// names it and nothing was ever written after its header; anything else is corruption of data
/// that may have been acknowledged, which must be reported, not deleted.
fn unfinished_creation(
    fs: &dyn Fs,
    path: &Path,
    cp: Option<&Checkpoint>,
    base: u64,
) -> Result<bool> {
    if cp.is_some_and(|c| c.active_base_offset == base) {
        return Ok(false);
    }
    let bytes = fs
        .open(path)
        .and_then(|f| f.read_all())
        .map_err(|e| LogError::io("reading", path, e))?;
    Ok(bytes
        .get(SEGMENT_HEADER_LEN as usize..)
        .is_none_or(|rest| rest.iter().all(|b| *b == 0)))
}
