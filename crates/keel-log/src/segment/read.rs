//! Lookups and zero-copy reads on a segment: locating a batch by offset, Raft index or
//! timestamp (through the sparse indexes), and reading whole batches from the mapping.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use keel_batch::{BatchHeader, verify_crc};
use memmap2::Mmap;

use super::{Key, Segment};
use crate::error::Result;
use crate::index;
use crate::segment_file::SEGMENT_HEADER_LEN;

struct MapOwner(Arc<Mmap>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Segment {
    /// Parses (and, outside the trusted ranges, CRC-checks) the batch at `pos`.
    fn batch_at(&self, log: &[u8], pos: u64, end: u64) -> Result<BatchHeader> {
        let slice = log
            .get(pos as usize..end as usize)
            .ok_or_else(|| self.corrupt(pos, "batch position beyond the segment"))?;
        let header = BatchHeader::parse(slice).map_err(|e| self.corrupt(pos, e.to_string()))?;
        let batch = slice
            .get(..header.total_len())
            .ok_or_else(|| self.corrupt(pos, "batch extends past the end of the segment"))?;
        let trusted = !self.is_sealed()
            && (pos >= self.trusted_from.load(Ordering::Acquire)
                || pos < self.verified_upto.load(Ordering::Acquire));
        if !trusted {
            verify_crc(&header, batch).map_err(|e| self.corrupt(pos, e.to_string()))?;
        }
        Ok(header)
    }

    /// Finds the position of the batch for `key`, or `None` if the segment holds nothing at or
    /// after it. Returns the position and the batch header.
    pub fn locate(&self, key: Key) -> Result<Option<(u64, BatchHeader)>> {
        let end = self.data_len();
        let log = self.map(0);
        let start = self.index_floor(key).unwrap_or(SEGMENT_HEADER_LEN);
        match self.scan_for(&log, key, start, end) {
            Ok(found) => Ok(found),
            // A damaged index entry must not hide data: retry from the segment start, which
            // reports real corruption of the log itself.
            Err(_) if start != SEGMENT_HEADER_LEN => {
                self.scan_for(&log, key, SEGMENT_HEADER_LEN, end)
            }
            Err(e) => Err(e),
        }
    }

    fn index_floor(&self, key: Key) -> Option<u64> {
        let n = self.index_entries.load(Ordering::Acquire);
        let idx = self.map(1);
        let entry = match key {
            Key::Offset(o) => {
                // Control batches share their base offset with the batch after them, so start
                // from the last entry strictly below the target: nothing before it can match.
                let rel = u32::try_from(o.checked_sub(self.base_offset)?).unwrap_or(u32::MAX);
                index::offset_floor(&idx, n, |e| e.rel_offset, rel.checked_sub(1)?)?
            }
            Key::RaftIndex(i) => {
                let rel = u32::try_from(i.checked_sub(self.base_raft_index)?).unwrap_or(u32::MAX);
                index::offset_floor(&idx, n, |e| e.rel_index, rel)?
            }
        };
        Some(u64::from(entry.position))
    }

    fn scan_for(
        &self,
        log: &[u8],
        key: Key,
        mut pos: u64,
        end: u64,
    ) -> Result<Option<(u64, BatchHeader)>> {
        let mut prev: Option<BatchHeader> = None;
        while pos < end {
            let h = self.batch_at(log, pos, end)?;
            if let Some(p) = prev
                && (h.base_offset != p.next_offset() || h.raft_index != p.raft_index + 1)
            {
                return Err(self.corrupt(pos, "batch is not contiguous with its predecessor"));
            }
            let hit = match key {
                Key::Offset(o) => h.next_offset() > o || h.base_offset >= o,
                Key::RaftIndex(i) => h.raft_index >= i,
            };
            if hit {
                return Ok(Some((pos, h)));
            }
            pos += h.total_len() as u64;
            prev = Some(h);
        }
        Ok(None)
    }

    /// Reads whole batches starting at `pos`, up to `max_bytes`, stopping before the first batch
    /// for which `stop` holds. At least one batch is returned when any is there; with
    /// `progress`, control batches do not count toward that, so a reader by offset always gets a
    /// batch that moves it forward. Returns zero-copy bytes of the mapping.
    pub fn read_from(
        &self,
        pos: u64,
        max_bytes: u64,
        progress: bool,
        stop: impl Fn(&BatchHeader) -> bool,
    ) -> Result<(Bytes, Option<BatchHeader>)> {
        let (bytes, last, _) = self.read_batches(pos, max_bytes, progress, stop)?;
        Ok((bytes, last))
    }

    /// [`Segment::read_from`], also saying whether a batch holding records was returned.
    pub fn read_batches(
        &self,
        pos: u64,
        max_bytes: u64,
        progress: bool,
        stop: impl Fn(&BatchHeader) -> bool,
    ) -> Result<(Bytes, Option<BatchHeader>, bool)> {
        let end = self.data_len();
        let map = self.map(0);
        let mut cur = pos;
        let mut last: Option<BatchHeader> = None;
        let mut satisfied = false;
        let mut advanced = false;
        while cur < end {
            let h = self.batch_at(&map, cur, end)?;
            if let Some(p) = last
                && (h.base_offset != p.next_offset() || h.raft_index != p.raft_index + 1)
            {
                return Err(self.corrupt(cur, "batch is not contiguous with its predecessor"));
            }
            if stop(&h) {
                break;
            }
            let len = h.total_len() as u64;
            if satisfied && cur - pos + len > max_bytes {
                break;
            }
            cur += len;
            last = Some(h);
            advanced |= h.offset_count() > 0;
            satisfied |= !progress || advanced;
            if satisfied && cur - pos >= max_bytes {
                break;
            }
        }
        // Remember verified ranges so sequential readers pay for each CRC once.
        if pos <= self.verified_upto.load(Ordering::Acquire) {
            self.verified_upto.fetch_max(cur, Ordering::AcqRel);
        }
        let bytes = Bytes::from_owner(MapOwner(map)).slice(pos as usize..cur as usize);
        Ok((bytes, last, advanced))
    }

    /// The first batch with a record at or after `ts`, found through the time index.
    pub fn locate_timestamp(&self, ts: i64) -> Result<Option<(u64, BatchHeader)>> {
        if self.max_timestamp.load(Ordering::Acquire) < ts {
            return Ok(None);
        }
        let start_offset = {
            let n = self.time_entries.load(Ordering::Acquire);
            let map = self.map(2);
            index::time_floor_below(&map, n, ts).map_or(self.base_offset, |e| {
                self.base_offset + u64::from(e.rel_offset)
            })
        };
        let Some((mut pos, _)) = self.locate(Key::Offset(start_offset))? else {
            return Ok(None);
        };
        let end = self.data_len();
        let map = self.map(0);
        while pos < end {
            let h = self.batch_at(&map, pos, end)?;
            if !h.attributes.control && h.max_timestamp >= ts {
                return Ok(Some((pos, h)));
            }
            pos += h.total_len() as u64;
        }
        Ok(None)
    }

    /// The header of the last batch, found from the last index entry.
    pub fn last_batch(&self) -> Result<Option<BatchHeader>> {
        let end = self.data_len();
        let start = self
            .last_index_entry()
            .map_or(SEGMENT_HEADER_LEN, |e| u64::from(e.position));
        if start >= end {
            return Ok(None);
        }
        let (_, last) = self.read_from(start, end - start, false, |_| false)?;
        Ok(last)
    }
}
