//! The recovery checkpoint: a small file naming a point up to which the log is known durable
//! and valid, so that opening the log only validates what was written after it.
//!
//! ```text
//! off len field
//!   0   8 magic "KEELCKP1"
//!   8   4 format version (1)
//!  12   8 log_start_offset
//!  20   8 active_base_offset     segment the point is in
//!  28   8 active_data_len        bytes of that segment known valid and durable
//!  36   8 next_offset            at that point
//!  44   8 next_raft_index
//!  52   8 last_term
//!  60   8 max_timestamp          of that segment up to the point
//!  68   4 index_entries          durable offset index entries of that segment
//!  72   4 time_entries
//!  76   4 crc32c of bytes 0..76
//! ```
//!
//! Written to `checkpoint.tmp`, fsynced, renamed over `checkpoint`, directory fsynced.

use std::path::Path;

use crate::error::{LogError, Result};
use crate::fs::Fs;
use crate::le;

pub(crate) const FILE: &str = "checkpoint";
/// What [`crate::fs::write_atomic`] names its temporary file.
const TMP: &str = "checkpoint.tmp";
const MAGIC: &[u8; 8] = b"KEELCKP1";
const LEN: usize = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub log_start_offset: u64,
    pub active_base_offset: u64,
    pub active_data_len: u64,
    pub next_offset: u64,
    pub next_raft_index: u64,
    pub last_term: u64,
    pub max_timestamp: i64,
    pub index_entries: u32,
    pub time_entries: u32,
}

impl Checkpoint {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let words = [
            self.log_start_offset,
            self.active_base_offset,
            self.active_data_len,
            self.next_offset,
            self.next_raft_index,
            self.last_term,
            self.max_timestamp as u64,
        ];
        for (i, w) in words.iter().enumerate() {
            b[12 + i * 8..20 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        b[68..72].copy_from_slice(&self.index_entries.to_le_bytes());
        b[72..76].copy_from_slice(&self.time_entries.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..76]);
        b[76..80].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != LEN || &b[0..8] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| le::u32_at(b, i);
        let u64_at = |i: usize| le::u64_at(b, i);
        if u32_at(8) != 1 || crc32c::crc32c(&b[0..76]) != u32_at(76) {
            return None;
        }
        Some(Self {
            log_start_offset: u64_at(12),
            active_base_offset: u64_at(20),
            active_data_len: u64_at(28),
            next_offset: u64_at(36),
            next_raft_index: u64_at(44),
            last_term: u64_at(52),
            max_timestamp: u64_at(60) as i64,
            index_entries: u32_at(68),
            time_entries: u32_at(72),
        })
    }
}

pub(crate) fn read(fs: &dyn Fs, dir: &Path) -> Result<Option<Checkpoint>> {
    let path = dir.join(FILE);
    if !fs.exists(&path) {
        return Ok(None);
    }
    let f = fs
        .open(&path)
        .map_err(|e| LogError::io("opening", &path, e))?;
    let bytes = f
        .read_all()
        .map_err(|e| LogError::io("reading", &path, e))?;
    let cp = Checkpoint::decode(&bytes);
    if cp.is_none() {
        tracing::warn!(path = %path.display(), "recovery checkpoint unreadable; scanning every segment");
    }
    Ok(cp)
}

pub(crate) fn write(fs: &dyn Fs, dir: &Path, cp: &Checkpoint) -> Result<()> {
    crate::fs::write_atomic(fs, dir, FILE, &cp.encode())
        .map_err(|e| LogError::io("writing", dir.join(FILE), e))
}

pub(crate) fn remove_tmp(fs: &dyn Fs, dir: &Path) {
    let tmp = dir.join(TMP);
    if fs.exists(&tmp) {
        let _ = fs.remove(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let cp = Checkpoint {
            log_start_offset: 1,
            active_base_offset: 2,
            active_data_len: 3,
            next_offset: 4,
            next_raft_index: 5,
            last_term: 6,
            max_timestamp: -7,
            index_entries: 8,
            time_entries: 9,
        };
        let enc = cp.encode();
        assert_eq!(Checkpoint::decode(&enc), Some(cp));
        for i in 0..LEN {
            let mut bad = enc;
            bad[i] ^= 0x10;
            assert_eq!(Checkpoint::decode(&bad), None, "flip at {i}");
        }
        assert_eq!(Checkpoint::decode(&enc[..40]), None);
    }
}
