//! Cutting the active segment back at a batch boundary (truncation and discarding unsynced
//! appends): zero-filling the data and dropping index entries past the cut.

use std::sync::atomic::Ordering;

use memmap2::MmapMut;

use super::{ActiveSegment, Tail};
use crate::fs::FileHandle;
use crate::index::{self, ENTRY_LEN};

/// How many of an index's first `n` entries pass `keep`, counting up to the first that fails:
/// index entries are sorted, so the ones past a cut point all come after it.
fn leading(n: usize, keep: impl Fn(usize) -> bool) -> usize {
    (0..n).take_while(|&i| keep(i)).count()
}

impl ActiveSegment {
    /// Cuts the segment at `pos` (a batch boundary): zero-fills the removed bytes (and any
    /// torn garbage up to the next all-zero page) and drops index entries that point past it.
    pub fn cut(&mut self, pos: u64, tail: Tail) {
        let map = &mut self.maps[0];
        let old_end = self.seg.data_len().max(pos);
        let mut zero_to = old_end;
        // Bytes past the old end can be a torn write from before a crash; clear them up to a
        // fully zero 4 KiB page, beyond which this log never wrote.
        const PAGE: u64 = 4096;
        let cap = self.reserved.min(map.len() as u64);
        loop {
            let page_end = ((zero_to / PAGE) + 1) * PAGE;
            let page_end = page_end.min(cap);
            let Some(chunk) = map.get(zero_to as usize..page_end as usize) else {
                break;
            };
            let all_zero = chunk.iter().all(|b| *b == 0);
            zero_to = page_end;
            if all_zero || page_end >= cap {
                break;
            }
        }
        if let Some(region) = map.get_mut(pos as usize..zero_to as usize) {
            region.fill(0);
            self.seg.files[0].wrote_mapped(pos, zero_to.saturating_sub(pos));
        }
        let keep_index = leading(self.seg.index_entries.load(Ordering::Acquire), |i| {
            index::offset_entry(&self.maps[1], i).is_some_and(|e| u64::from(e.position) < pos)
        });
        zero_entries(&mut self.maps[1], &*self.seg.files[1], keep_index);
        self.seg.index_entries.store(keep_index, Ordering::Release);
        let limit = tail.next_offset.saturating_sub(self.seg.base_offset);
        let keep_time = leading(self.seg.time_entries.load(Ordering::Acquire), |i| {
            index::time_entry(&self.maps[2], i).is_some_and(|e| u64::from(e.rel_offset) < limit)
        });
        zero_entries(&mut self.maps[2], &*self.seg.files[2], keep_time);
        self.seg.time_entries.store(keep_time, Ordering::Release);
        self.last_time_ts = self.seg.last_time_entry().map_or(i64::MIN, |e| e.timestamp);
        self.bytes_since_index = match self.seg.last_index_entry() {
            Some(e) => pos.saturating_sub(u64::from(e.position)),
            None => u64::MAX,
        };
        self.seg.publish(tail);
        self.seg.trusted_from.fetch_min(pos, Ordering::AcqRel);
        self.writeback_from = self.writeback_from.min(pos);
    }
}

fn zero_entries(map: &mut MmapMut, file: &dyn FileHandle, keep: usize) {
    let start = keep * ENTRY_LEN;
    let end = map.len();
    if let Some(region) = map.get_mut(start..end) {
        // Entries are contiguous from the start; stop at the first all-zero one.
        let mut zeroed = 0;
        for chunk in region.chunks_mut(ENTRY_LEN) {
            if chunk.iter().all(|b| *b == 0) {
                break;
            }
            chunk.fill(0);
            zeroed += ENTRY_LEN;
        }
        if zeroed > 0 {
            file.wrote_mapped(start as u64, zeroed as u64);
        }
    }
}
