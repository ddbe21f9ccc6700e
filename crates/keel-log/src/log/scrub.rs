//! Finding and mending damage in sealed segments.
//!
//! Recovery validates only what was written after the last checkpoint, so a bit that flips
//! inside a sealed segment is found by the first read of it (reads of sealed segments check
//! every batch's CRC), which marks the segment for the scrub, or by the scrub itself, which
//! reads whole sealed segments in the background so that damage in data nobody reads is found
//! while the other replicas still hold good copies. Damage is never cut: the committed prefix
//! is byte-identical on every replica (batches are stamped once, by the leader), so the damaged
//! batches are written over in place with a healthy replica's copies, checked first by
//! [`plan`], a pure function of the local bytes and the replacement.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_batch::{BatchHeader, parse_verified};

use super::{Log, lock};
use crate::error::{LogError, Result};
use crate::segment::Segment;
use crate::segment_file::SEGMENT_HEADER_LEN;

/// A position between two batches of a segment, and what the next batch there must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Byte position in the segment file.
    pub position: u64,
    pub raft_index: u64,
    pub offset: u64,
    /// The term of the batch before (the next one's term is at least this).
    pub last_term: u64,
}

impl Cursor {
    fn after(position: u64, h: &BatchHeader) -> Self {
        Self {
            position,
            raft_index: h.raft_index + 1,
            offset: h.next_offset(),
            last_term: h.raft_term,
        }
    }
}

/// Damage found in a sealed segment: the first batch at or after `at` that is not intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment (its base offset).
    pub segment: u64,
    pub path: PathBuf,
    /// Where the damage starts and what belongs there.
    pub at: Cursor,
    pub reason: String,
}

/// What one [`Log::repair_segment`] call achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repaired {
    /// The segment is intact again.
    Done { entries: u64, bytes: u64 },
    /// What was written is repaired, and the segment is damaged further on (the replica's
    /// entries ran out first, or other batches are damaged too): call again with the entries
    /// from `next.at.raft_index` on.
    Partial {
        entries: u64,
        bytes: u64,
        next: Damage,
    },
    /// The segment is gone (retention deleted it) or is no longer sealed: nothing to repair.
    Gone,
}

/// Checks the batch at `at` of `bytes` (a segment's data, `bytes.len()` its end): whole, CRC
/// intact, and continuing the log as `at` says.
fn check_batch(bytes: &[u8], at: Cursor) -> std::result::Result<BatchHeader, String> {
    let rest = bytes
        .get(at.position as usize..)
        .ok_or_else(|| "position past the end of the data".to_owned())?;
    let (h, _, _) = parse_verified(rest).map_err(|e| e.to_string())?;
    if h.raft_index != at.raft_index || h.base_offset != at.offset || h.raft_term < at.last_term {
        return Err(format!(
            "batch (offset {}, index {}, term {}) does not continue the log (offset {}, index {}, term at least {})",
            h.base_offset, h.raft_index, h.raft_term, at.offset, at.raft_index, at.last_term
        ));
    }
    Ok(h)
}

/// The first damaged batch of a segment's data, scanning from `from`; `end_index` is the Raft
/// index the segment's data must end before (what its last batch is followed by).
pub(crate) fn first_damage(bytes: &[u8], from: Cursor, end_index: u64) -> Option<(Cursor, String)> {
    let mut at = from;
    while (at.position as usize) < bytes.len() {
        match check_batch(bytes, at) {
            Ok(h) => at = Cursor::after(at.position + h.total_len() as u64, &h),
            Err(why) => return Some((at, why)),
        }
    }
    (at.raft_index != end_index).then(|| {
        (
            at,
            format!(
                "the segment's batches end before index {}, where it should end before {end_index}",
                at.raft_index
            ),
        )
    })
}

/// How much of a healthy replica's batches to write over damaged local bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Bytes of the replacement to write at the damage.
    pub write: usize,
    pub entries: u64,
    /// Where the local bytes continue after the write.
    pub resume: Cursor,
    /// Whether they are still damaged there (the replacement ran out first).
    pub still_damaged: bool,
}

/// Works out what to write over the damage at `at` of `local` (a sealed segment's data, which
/// must end before `end_index`) from `replacement`, whole batches from `at.raft_index` on.
///
/// Every replacement batch must be intact and continue the log exactly where the local one
/// should have been; the write stops at the first local batch that is intact and continues
/// it (or at the segment end). A replacement that would not fit is refused: the replicas differ,
/// and writing it would break the batches after it.
pub(crate) fn plan(
    local: &[u8],
    at: Cursor,
    end_index: u64,
    replacement: &[u8],
) -> std::result::Result<Plan, String> {
    if replacement.is_empty() {
        return Err("the replica sent no entries".to_owned());
    }
    let end = local.len() as u64;
    let (mut cur, mut used, mut entries) = (at, 0usize, 0u64);
    while used < replacement.len() {
        let h = check_batch(
            replacement,
            Cursor {
                position: used as u64,
                ..cur
            },
        )
        .map_err(|why| format!("the replica's entry {}: {why}", cur.raft_index))?;
        let len = h.total_len();
        if cur.position + len as u64 > end {
            return Err(format!(
                "the replica's entry {} ({len} bytes at byte {}) runs past the segment's end at {end}: the replicas differ",
                h.raft_index, cur.position
            ));
        }
        used += len;
        entries += 1;
        cur = Cursor::after(cur.position + len as u64, &h);
        let resynced = if cur.position == end {
            if cur.raft_index != end_index {
                return Err(format!(
                    "the replica's entries fill the segment up to index {}, where it ends before {end_index}: the replicas differ",
                    cur.raft_index
                ));
            }
            true
        } else {
            check_batch(local, cur).is_ok()
        };
        if resynced {
            return Ok(Plan {
                write: used,
                entries,
                resume: cur,
                still_damaged: false,
            });
        }
    }
    Ok(Plan {
        write: used,
        entries,
        resume: cur,
        still_damaged: true,
    })
}

impl Log {
    /// Whole batches from Raft index `index` up to (not including) `end`, at most
    /// `max_bytes` (at least one batch), each checked against its CRC whatever this process
    /// trusts: what a replica sends another to repair damage with.
    pub fn read_verified(&self, index: u64, end: u64, max_bytes: u64) -> Result<bytes::Bytes> {
        let limit = super::ReadLimit {
            max_offset: None,
            max_raft_index: Some(end),
        };
        let slice = self.read_raft(index, max_bytes, limit)?;
        let mut rest = &slice.bytes[..];
        let mut next = index;
        while !rest.is_empty() {
            let (h, raw, _) = parse_verified(rest).map_err(|e| LogError::Corrupt {
                path: self.dir.clone(),
                position: 0,
                reason: format!("entry {next}: {e}"),
            })?;
            next = h.raft_index + 1;
            rest = &rest[raw.len()..];
        }
        Ok(slice.bytes)
    }

    /// The base offsets of the sealed segments (all but the active one), oldest first.
    pub fn sealed_segments(&self) -> Vec<u64> {
        let segs = self.segments();
        let n = segs.len().saturating_sub(1);
        segs[..n].iter().map(|s| s.base_offset).collect()
    }

    /// The bytes of the sealed segment `base` (0 if there is none).
    pub fn segment_bytes(&self, base: u64) -> u64 {
        self.sealed(base).map_or(0, |s| s.data_len())
    }

    /// Sealed segments that a read found damaged since the last call.
    pub fn take_damaged(&self) -> Vec<u64> {
        let segs = self.segments();
        let n = segs.len().saturating_sub(1);
        segs[..n]
            .iter()
            .filter(|s| s.damaged.swap(false, Ordering::AcqRel))
            .map(|s| s.base_offset)
            .collect()
    }

    fn sealed(&self, base: u64) -> Option<Arc<Segment>> {
        let segs = self.segments();
        let n = segs.len().saturating_sub(1);
        segs[..n].iter().find(|s| s.base_offset == base).cloned()
    }

    /// Reads the whole sealed segment `base` and checks every batch, trusting nothing this
    /// process verified before. Returns the first damage, or `None` when the segment is intact
    /// or gone.
    pub fn scrub_segment(&self, base: u64) -> Option<Damage> {
        let seg = self.sealed(base)?;
        let end = seg.data_len();
        let map = seg.log_map();
        let bytes = map.get(..end as usize).unwrap_or(&map[..]);
        let start = Cursor {
            position: SEGMENT_HEADER_LEN,
            raft_index: seg.base_raft_index,
            offset: seg.base_offset,
            last_term: 0,
        };
        let end_index = seg.next_raft_index.load(Ordering::Acquire);
        let (at, reason) = first_damage(bytes, start, end_index)?;
        Some(Damage {
            segment: base,
            path: seg.log_path.clone(),
            at,
            reason,
        })
    }

    /// Writes a healthy replica's copies (`replacement`: whole batches from
    /// `damage.at.raft_index` on) over the damaged bytes of a sealed segment, after checking
    /// them with [`plan`], and makes the write durable. Batches after the damage that are
    /// intact are left alone.
    pub fn repair_segment(&self, damage: &Damage, replacement: &[u8]) -> Result<Repaired> {
        // Serialised with appends, truncations and retention, which change the segment list.
        let _w = lock(&self.writer);
        let Some(seg) = self.sealed(damage.segment) else {
            return Ok(Repaired::Gone);
        };
        let end = seg.data_len();
        let map = seg.log_map();
        let local = map.get(..end as usize).unwrap_or(&map[..]);
        let end_index = seg.next_raft_index.load(Ordering::Acquire);
        let plan = plan(local, damage.at, end_index, replacement).map_err(|reason| {
            LogError::RepairRefused {
                path: seg.log_path.clone(),
                position: damage.at.position,
                reason,
            }
        })?;
        let file = &seg.files[0];
        file.write_all_at(&replacement[..plan.write], damage.at.position)
            .and_then(|()| file.sync_data())
            .map_err(|e| LogError::io("repairing", &seg.log_path, e))?;
        let (entries, bytes) = (plan.entries, plan.write as u64);
        let further = if plan.still_damaged {
            Some((plan.resume, "damaged after the repaired entries".to_owned()))
        } else {
            // Damage further on would otherwise wait for the next scrub of the segment.
            first_damage(local, plan.resume, end_index)
        };
        Ok(match further {
            None => Repaired::Done { entries, bytes },
            Some((at, reason)) => Repaired::Partial {
                entries,
                bytes,
                next: Damage {
                    at,
                    reason,
                    ..damage.clone()
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use keel_batch::{BatchBuilder, Compression, RecordRef, stamp, verify_crc};

    use super::*;

    /// A stamped batch of `n` records at (offset, index, term).
    fn batch(offset: u64, index: u64, term: u64, n: usize) -> Vec<u8> {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..n {
            let value = format!("v{offset}-{i}");
            b.push(&RecordRef {
                timestamp: 1_000 + i as i64,
                value: Some(value.as_bytes()),
                ..RecordRef::default()
            })
            .expect("push");
        }
        let mut bytes = b.build().expect("build");
        let h = BatchHeader::parse(&bytes).expect("header");
        let crc = verify_crc(&h, &bytes).expect("crc");
        stamp(&mut bytes, offset, term, index, crc);
        bytes
    }

    /// A segment's data: the header bytes, then batches of 2 records from index 10, offset 100.
    fn segment(batches: usize) -> (Vec<u8>, Vec<u64>) {
        let mut data = vec![0u8; SEGMENT_HEADER_LEN as usize];
        let mut starts = Vec::new();
        for i in 0..batches as u64 {
            starts.push(data.len() as u64);
            data.extend(batch(100 + 2 * i, 10 + i, 3, 2));
        }
        (data, starts)
    }

    fn start() -> Cursor {
        Cursor {
            position: SEGMENT_HEADER_LEN,
            raft_index: 10,
            offset: 100,
            last_term: 0,
        }
    }

    #[test]
    fn an_intact_segment_has_no_damage() {
        let (data, _) = segment(5);
        assert_eq!(first_damage(&data, start(), 15), None);
    }

    #[test]
    fn a_flipped_bit_is_found_at_its_batch() {
        let (mut data, starts) = segment(5);
        data[starts[3] as usize - 1] ^= 0x10;
        let (at, why) = first_damage(&data, start(), 15).expect("damage");
        assert_eq!(at.position, starts[2]);
        assert_eq!((at.raft_index, at.offset, at.last_term), (12, 104, 3));
        assert!(why.to_lowercase().contains("crc"), "{why}");
    }

    #[test]
    fn a_segment_ending_early_is_damaged() {
        let (data, starts) = segment(5);
        let cut = &data[..starts[4] as usize];
        let (at, why) = first_damage(cut, start(), 15).expect("damage");
        assert_eq!(at.raft_index, 14);
        assert!(why.contains("end"), "{why}");
    }

    #[test]
    fn a_repair_writes_only_the_damaged_batch() {
        let (good, starts) = segment(5);
        let mut local = good.clone();
        local[starts[1] as usize + 60] ^= 0xff;
        let (at, _) = first_damage(&local, start(), 15).expect("damage");
        // The replica sends more than is needed: the plan stops where the local log is intact.
        let replacement = &good[starts[1] as usize..];
        let p = plan(&local, at, 15, replacement).expect("plan");
        assert_eq!(p.entries, 1);
        assert_eq!(p.write as u64, starts[2] - starts[1]);
        assert!(!p.still_damaged);
        local[starts[1] as usize..starts[2] as usize].copy_from_slice(&replacement[..p.write]);
        assert_eq!(local, good);
    }

    #[test]
    fn a_damaged_length_is_repaired_from_the_replicas_lengths() {
        let (good, starts) = segment(4);
        let mut local = good.clone();
        // The length prefix of batch 1 now points into batch 3.
        local[starts[1] as usize + 8..starts[1] as usize + 12].copy_from_slice(&[0, 0, 1, 0]);
        let (at, _) = first_damage(&local, start(), 14).expect("damage");
        assert_eq!(at.position, starts[1]);
        let p = plan(&local, at, 14, &good[starts[1] as usize..]).expect("plan");
        assert_eq!(p.write as u64, starts[2] - starts[1]);
    }

    #[test]
    fn damage_spanning_batches_asks_for_more() {
        let (good, starts) = segment(5);
        let mut local = good.clone();
        for s in &starts[1..3] {
            local[*s as usize + 50] ^= 1;
        }
        let (at, _) = first_damage(&local, start(), 15).expect("damage");
        let one = &good[starts[1] as usize..starts[2] as usize];
        let p = plan(&local, at, 15, one).expect("plan");
        assert_eq!(p.entries, 1);
        assert!(p.still_damaged);
        let next = p.resume;
        assert_eq!((next.position, next.raft_index), (starts[2], 12));
        let p = plan(&local, next, 15, &good[starts[2] as usize..]).expect("plan");
        assert_eq!((p.entries, p.still_damaged), (1, false));
    }

    #[test]
    fn the_last_batch_is_repaired_up_to_the_segment_end() {
        let (good, starts) = segment(3);
        let mut local = good.clone();
        *local.last_mut().expect("byte") ^= 4;
        let (at, _) = first_damage(&local, start(), 13).expect("damage");
        assert_eq!(at.position, starts[2]);
        let p = plan(&local, at, 13, &good[starts[2] as usize..]).expect("plan");
        assert_eq!((p.entries, p.still_damaged), (1, false));
        assert_eq!(p.resume.position, local.len() as u64);
    }

    #[test]
    fn a_replacement_that_does_not_continue_the_log_is_refused() {
        let (good, starts) = segment(4);
        let mut local = good.clone();
        local[starts[1] as usize + 60] ^= 1;
        let (at, _) = first_damage(&local, start(), 14).expect("damage");
        // The replica's copy of the wrong index, of a different length, of another term.
        let wrong_index = &good[starts[2] as usize..];
        assert!(plan(&local, at, 14, wrong_index).is_err());
        let longer = batch(102, 11, 3, 40);
        let err = plan(&local, at, 14, &longer).expect_err("does not fit");
        assert!(err.contains("differ"), "{err}");
        let mut flipped = good[starts[1] as usize..].to_vec();
        flipped[60] ^= 1;
        assert!(plan(&local, at, 14, &flipped).is_err(), "a damaged copy");
        assert!(plan(&local, at, 14, &[]).is_err());
    }
}
