//! The promise: a small file naming the end of what this log ever reported durable, written
//! after each successful flush and before the flush returns.
//!
//! Recovery trusts the data up to the last checkpoint and scans the rest; an invalid batch at
//! the tail is cut as a torn write. That is right for bytes no sync covered, but a bit flip
//! or a lost write in the synced tail looks the same, and the cut then silently drops entries
//! this replica already acknowledged. Raft's safety rests on a replica never forgetting an
//! entry it acknowledged (it would vote for a candidate without it). The promise tells the
//! two cases apart: a recovered log that ends before the promise lost promised entries, and
//! the replica above it must not vote until it has them back (see keel-raft's `repair`).
//!
//! ```text
//! file "promise", two slots of 512 bytes (separate sectors: a torn write damages one slot)
//! off len field                  (within a slot)
//!   0   8 magic "KEELPRM1"
//!   8   8 sequence               the valid slot with the higher sequence is the promise
//!  16   8 next_raft_index        every entry below it was reported durable
//!  24   8 last_term              term of the entry at next_raft_index - 1 (0: none)
//!  32   4 crc32c of bytes 0..32
//! ```
//!
//! Each update writes the slot the current promise is not in, then fdatasyncs: one extra
//! small sync per flush, after the data's own (it must never claim more than is on disk).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{LogError, Result};
use crate::fs::{FileHandle, Fs};
use crate::le;

pub(crate) const FILE: &str = "promise";
const MAGIC: &[u8; 8] = b"KEELPRM1";
const SLOT: u64 = 512;
const SLOT_LEN: usize = 36;

/// The end of the prefix a log promised: every entry below `next_raft_index` was reported
/// durable, the last of them in `last_term`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Promised {
    pub next_raft_index: u64,
    pub last_term: u64,
}

fn encode(seq: u64, p: Promised) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&p.next_raft_index.to_le_bytes());
    b[24..32].copy_from_slice(&p.last_term.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u64, Promised)> {
    let b = b.get(..SLOT_LEN)?;
    if &b[0..8] != MAGIC || crc32c::crc32c(&b[0..32]) != le::u32_at(b, 32) {
        return None;
    }
    Some((
        le::u64_at(b, 8),
        Promised {
            next_raft_index: le::u64_at(b, 16),
            last_term: le::u64_at(b, 24),
        },
    ))
}

/// The promise in the file's bytes: the valid slot with the higher sequence. `None` if no
/// slot is valid.
fn pick(bytes: &[u8]) -> Option<(u64, Promised)> {
    let slot = |i: u64| bytes.get((i * SLOT) as usize..).and_then(decode);
    match (slot(0), slot(1)) {
        (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The promise file of one log, and what it holds.
#[derive(Debug)]
pub(crate) struct PromiseFile {
    path: PathBuf,
    file: Arc<dyn FileHandle>,
    seq: u64,
    value: Option<Promised>,
    /// Bumped by every truncation and reset: a flush that read the log's end before one
    /// must not promise that end (see `Log::flush_to`).
    epoch: u64,
}

impl PromiseFile {
    /// Opens the file, creating it (durably) if the log has none yet. A file whose slots are
    /// both unreadable is reported and treated as no promise: it only ever narrows what
    /// recovery would accept, so losing it weakens a check and never loses data.
    pub fn open(fs: &dyn Fs, dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let (file, bytes) = if fs.exists(&path) {
            let f = fs
                .open(&path)
                .map_err(|e| LogError::io("opening", &path, e))?;
            let bytes = f
                .read_all()
                .map_err(|e| LogError::io("reading", &path, e))?;
            (f, bytes)
        } else {
            let f = fs
                .create(&path)
                .map_err(|e| LogError::io("creating", &path, e))?;
            f.sync_data()
                .map_err(|e| LogError::io("syncing", &path, e))?;
            fs.sync_dir(dir)
                .map_err(|e| LogError::io("syncing directory", dir, e))?;
            (f, Vec::new())
        };
        let found = pick(&bytes);
        if found.is_none() && !bytes.is_empty() {
            tracing::warn!(path = %path.display(), "promise file unreadable; recovery cannot tell a torn tail from lost acknowledged entries this time");
        }
        Ok(Self {
            path,
            file,
            seq: found.map_or(0, |(s, _)| s),
            value: found.map(|(_, p)| p),
            epoch: 0,
        })
    }

    pub fn value(&self) -> Option<Promised> {
        self.value
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Makes `p` the promise, durably. Called after the data it names was synced.
    pub fn store(&mut self, p: Promised) -> Result<()> {
        if self.value == Some(p) {
            return Ok(());
        }
        let seq = self.seq + 1;
        self.file
            .write_all_at(&encode(seq, p), (seq % 2) * SLOT)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| LogError::io("writing", &self.path, e))?;
        self.seq = seq;
        self.value = Some(p);
        Ok(())
    }

    /// Raises the promise to `p` if it is further along.
    pub fn advance(&mut self, p: Promised) -> Result<()> {
        if self
            .value
            .is_some_and(|v| v.next_raft_index >= p.next_raft_index)
        {
            return Ok(());
        }
        self.store(p)
    }

    /// Lowers the promise to `p` before a truncation removes entries past it: entries a
    /// leader tells this replica to remove were never committed, so they stop being promised.
    pub fn lower_for_truncation(&mut self, p: Promised) -> Result<()> {
        self.epoch += 1;
        if self
            .value
            .is_some_and(|v| v.next_raft_index > p.next_raft_index)
        {
            return self.store(p);
        }
        Ok(())
    }

    /// A reset discards the log without unpromising anything: entries promised past the new
    /// start must still come back before this replica votes.
    pub fn on_reset(&mut self) {
        self.epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u64, t: u64) -> Promised {
        Promised {
            next_raft_index: i,
            last_term: t,
        }
    }

    fn file(slots: &[(u64, [u8; SLOT_LEN])]) -> Vec<u8> {
        let mut b = vec![0u8; 2 * SLOT as usize];
        for (i, s) in slots {
            let at = (*i * SLOT) as usize;
            b[at..at + SLOT_LEN].copy_from_slice(s);
        }
        b
    }

    #[test]
    fn the_newer_valid_slot_wins() {
        let b = file(&[(0, encode(4, p(10, 2))), (1, encode(5, p(12, 3)))]);
        assert_eq!(pick(&b), Some((5, p(12, 3))));
        let b = file(&[(0, encode(6, p(14, 3))), (1, encode(5, p(12, 3)))]);
        assert_eq!(pick(&b), Some((6, p(14, 3))));
    }

    #[test]
    fn a_torn_slot_leaves_the_other() {
        let mut newer = encode(5, p(12, 3));
        for i in 0..SLOT_LEN {
            newer[i] ^= 0x04;
            let b = file(&[(0, encode(4, p(10, 2))), (1, newer)]);
            assert_eq!(pick(&b), Some((4, p(10, 2))), "flip at {i}");
            newer[i] ^= 0x04;
        }
    }

    #[test]
    fn nothing_valid_is_no_promise() {
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&[0u8; 1024]), None);
        assert_eq!(pick(&encode(1, p(3, 1))[..20]), None);
    }
}
