//! Sparse offset and time indexes: fixed-width little-endian entries in memory-mapped files.
//! The functions here are pure lookups over byte slices.
//!
//! Offset index entry (12 bytes): `rel_offset u32, rel_raft_index u32, position u32`, one per
//! `index_interval_bytes` of log, both keys non-decreasing. Positions are never 0 (the segment
//! header comes first), so the zero-filled, preallocated tail of an index marks its end.
//!
//! Time index entry (12 bytes): `max_timestamp i64, rel_offset u32`: the largest timestamp seen
//! in the segment up to and including the batch at `rel_offset`, so timestamps are
//! non-decreasing too.

pub(crate) const ENTRY_LEN: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub rel_offset: u32,
    pub rel_index: u32,
    pub position: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub timestamp: i64,
    pub rel_offset: u32,
}

fn chunk(buf: &[u8], i: usize) -> Option<&[u8; ENTRY_LEN]> {
    buf.get(i * ENTRY_LEN..(i + 1) * ENTRY_LEN)
        .and_then(|s| s.try_into().ok())
}

fn u32_le(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

pub(crate) fn offset_entry(buf: &[u8], i: usize) -> Option<OffsetEntry> {
    chunk(buf, i).map(|c| OffsetEntry {
        rel_offset: u32_le(&c[0..4]),
        rel_index: u32_le(&c[4..8]),
        position: u32_le(&c[8..12]),
    })
}

pub(crate) fn time_entry(buf: &[u8], i: usize) -> Option<TimeEntry> {
    chunk(buf, i).map(|c| {
        let mut t = [0u8; 8];
        t.copy_from_slice(&c[0..8]);
        TimeEntry {
            timestamp: i64::from_le_bytes(t),
            rel_offset: u32_le(&c[8..12]),
        }
    })
}

pub(crate) fn encode_offset_entry(e: OffsetEntry) -> [u8; ENTRY_LEN] {
    let mut out = [0u8; ENTRY_LEN];
    out[0..4].copy_from_slice(&e.rel_offset.to_le_bytes());
    out[4..8].copy_from_slice(&e.rel_index.to_le_bytes());
    out[8..12].copy_from_slice(&e.position.to_le_bytes());
    out
}

pub(crate) fn encode_time_entry(e: TimeEntry) -> [u8; ENTRY_LEN] {
    let mut out = [0u8; ENTRY_LEN];
    out[0..8].copy_from_slice(&e.timestamp.to_le_bytes());
    out[8..12].copy_from_slice(&e.rel_offset.to_le_bytes());
    out
}

/// Number of entries among the first `n` for which `pred` holds, given that it holds for a
/// prefix (a binary search).
fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The last of the first `n` offset entries whose `key` is at most `target`.
pub(crate) fn offset_floor(
    buf: &[u8],
    n: usize,
    key: impl Fn(&OffsetEntry) -> u32,
    target: u32,
) -> Option<OffsetEntry> {
    let count = partition_point(n, |i| {
        offset_entry(buf, i).is_some_and(|e| key(&e) <= target)
    });
    count.checked_sub(1).and_then(|i| offset_entry(buf, i))
}

/// The last of the first `n` time entries with a timestamp strictly below `target`: every batch
/// before its `rel_offset` (and the batch at it) has only older records.
pub(crate) fn time_floor_below(buf: &[u8], n: usize, target: i64) -> Option<TimeEntry> {
    let count = partition_point(n, |i| {
        time_entry(buf, i).is_some_and(|e| e.timestamp < target)
    });
    count.checked_sub(1).and_then(|i| time_entry(buf, i))
}

/// Number of leading non-zero offset entries in a preallocated index file.
pub(crate) fn count_offset_entries(buf: &[u8]) -> usize {
    partition_point(buf.len() / ENTRY_LEN, |i| {
        offset_entry(buf, i).is_some_and(|e| e.position != 0)
    })
}

/// Number of leading time entries before the zero fill. Only the first entry may have a zero
/// timestamp and offset legitimately; after it, entries are non-decreasing and written only when
/// the timestamp grew, so an all-zero entry past index 0 is fill.
pub(crate) fn count_time_entries(buf: &[u8]) -> usize {
    let n = buf.len() / ENTRY_LEN;
    let is_zero = |i: usize| chunk(buf, i).is_none_or(|c| c.iter().all(|b| *b == 0));
    if n == 0 || is_zero(0) {
        // A first entry of exactly (0, 0) is indistinguishable from fill; losing it only makes
        // a time lookup start its scan earlier.
        return 0;
    }
    1 + partition_point(n - 1, |i| !is_zero(i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(entries: &[(u32, u32, u32)], cap: usize) -> Vec<u8> {
        let mut buf = vec![0u8; cap * ENTRY_LEN];
        for (i, (o, r, p)) in entries.iter().enumerate() {
            buf[i * ENTRY_LEN..(i + 1) * ENTRY_LEN].copy_from_slice(&encode_offset_entry(
                OffsetEntry {
                    rel_offset: *o,
                    rel_index: *r,
                    position: *p,
                },
            ));
        }
        buf
    }

    #[test]
    fn floor_lookup_by_offset_and_index() {
        let buf = offsets(
            &[(0, 0, 64), (10, 12, 4000), (10, 13, 8100), (30, 20, 12000)],
            8,
        );
        assert_eq!(count_offset_entries(&buf), 4);
        let by_off = |t| offset_floor(&buf, 4, |e| e.rel_offset, t).map(|e| e.position);
        assert_eq!(by_off(0), Some(64));
        assert_eq!(by_off(9), Some(64));
        // Two entries share offset 10 (a control batch takes none): the later one wins.
        assert_eq!(by_off(10), Some(8100));
        assert_eq!(by_off(29), Some(8100));
        assert_eq!(by_off(1000), Some(12000));
        let by_idx = |t| offset_floor(&buf, 4, |e| e.rel_index, t).map(|e| e.position);
        assert_eq!(by_idx(12), Some(4000));
        assert_eq!(by_idx(19), Some(8100));
        let empty = offsets(&[], 4);
        assert_eq!(count_offset_entries(&empty), 0);
        assert_eq!(offset_floor(&empty, 0, |e| e.rel_offset, 5), None);
    }

    #[test]
    fn time_lookup() {
        let mut buf = vec![0u8; 6 * ENTRY_LEN];
        for (i, (ts, off)) in [(100i64, 0u32), (200, 5), (200, 9), (350, 12)]
            .iter()
            .enumerate()
        {
            buf[i * ENTRY_LEN..(i + 1) * ENTRY_LEN].copy_from_slice(&encode_time_entry(
                TimeEntry {
                    timestamp: *ts,
                    rel_offset: *off,
                },
            ));
        }
        assert_eq!(count_time_entries(&buf), 4);
        assert_eq!(time_floor_below(&buf, 4, 100), None);
        assert_eq!(
            time_floor_below(&buf, 4, 101).map(|e| e.rel_offset),
            Some(0)
        );
        assert_eq!(
            time_floor_below(&buf, 4, 300).map(|e| e.rel_offset),
            Some(9)
        );
        assert_eq!(
            time_floor_below(&buf, 4, 9999).map(|e| e.rel_offset),
            Some(12)
        );
    }
}
