//! Writing the active segment's sparse offset and time indexes.

use std::sync::atomic::Ordering;

use super::ActiveSegment;
use crate::index::{self, ENTRY_LEN, OffsetEntry, TimeEntry};

impl ActiveSegment {
    /// Adds sparse index entries, when due, for a batch of `len` bytes at `pos` (used by append
    /// and recovery). `max_ts` is the segment's maximum timestamp including this batch.
    pub fn on_batch(&mut self, pos: u64, len: u64, base_offset: u64, raft_index: u64, max_ts: i64) {
        if self.bytes_since_index >= self.index_interval {
            self.add_index_entry(pos, base_offset, raft_index, max_ts);
        }
        self.bytes_since_index = self.bytes_since_index.saturating_add(len);
    }

    fn add_index_entry(&mut self, pos: u64, base_offset: u64, raft_index: u64, max_ts: i64) {
        let rel_offset = (base_offset - self.seg.base_offset) as u32;
        let n = self.seg.index_entries.load(Ordering::Acquire);
        if n >= self.index_capacity {
            // The index is only sparse: a full one makes lookups scan further, nothing more.
            return;
        }
        let entry = index::encode_offset_entry(OffsetEntry {
            rel_offset,
            rel_index: (raft_index - self.seg.base_raft_index) as u32,
            position: pos as u32,
        });
        if let Some(dst) = self.maps[1].get_mut(n * ENTRY_LEN..(n + 1) * ENTRY_LEN) {
            dst.copy_from_slice(&entry);
            self.seg.files[1].wrote_mapped((n * ENTRY_LEN) as u64, ENTRY_LEN as u64);
            self.seg.index_entries.store(n + 1, Ordering::Release);
        }
        self.bytes_since_index = 0;
        if max_ts > self.last_time_ts {
            self.add_time_entry(max_ts, rel_offset);
        }
    }

    fn add_time_entry(&mut self, ts: i64, rel_offset: u32) {
        let n = self.seg.time_entries.load(Ordering::Acquire);
        if n >= self.index_capacity {
            return;
        }
        let entry = index::encode_time_entry(TimeEntry {
            timestamp: ts,
            rel_offset,
        });
        if let Some(dst) = self.maps[2].get_mut(n * ENTRY_LEN..(n + 1) * ENTRY_LEN) {
            dst.copy_from_slice(&entry);
            self.seg.files[2].wrote_mapped((n * ENTRY_LEN) as u64, ENTRY_LEN as u64);
            self.seg.time_entries.store(n + 1, Ordering::Release);
            self.last_time_ts = ts;
        }
    }

    /// Records the segment's final maximum timestamp so a sealed segment knows it without a
    /// scan.
    pub fn finish_time_index(&mut self) {
        let tail = self.seg.tail();
        if tail.max_timestamp > self.last_time_ts && tail.next_offset > self.seg.base_offset {
            let last = (tail.next_offset - 1 - self.seg.base_offset) as u32;
            self.add_time_entry(tail.max_timestamp, last);
        }
    }
}
