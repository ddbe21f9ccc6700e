//! Reads: by offset and by Raft index, entry headers, and lookups by timestamp.

use std::sync::Arc;

use keel_batch::{BatchHeader, DEFAULT_MAX_DECOMPRESSED, decode_records};

use super::{Log, ReadLimit, ReadSlice};
use crate::error::{LogError, Result};
use crate::segment::{Key, Segment};

impl Log {
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
}
