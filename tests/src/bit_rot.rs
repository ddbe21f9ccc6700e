//! Bit rot for tests: a byte flipped inside a sealed segment of a running broker, written
//! through the file as a disk's damage would show (the broker's mapping sees it at once).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where a byte was flipped, and the file's bytes from before.
pub struct Flipped {
    pub file: PathBuf,
    /// The byte's position in the file.
    pub position: u64,
    /// The first offset of the damaged batch.
    pub base_offset: u64,
    pub original: Vec<u8>,
}

/// The sealed segment files (every `.log` but the newest) of each replica directory.
pub fn sealed_segments(replica_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in replica_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs.pop();
        out.extend(logs);
    }
    out
}

/// Flips a byte near the end of the payload of batch `pick % batches` of `file` (the bits
/// flipped from `pick` too); `None` if the file holds no batch.
pub fn flip_batch(file: &Path, pick: u64) -> Option<Flipped> {
    let original = std::fs::read(file).ok()?;
    let mut batches = Vec::new();
    let mut pos = 64usize;
    for item in keel_batch::BatchIter::new(original.get(64..)?) {
        let Ok((h, raw)) = item else { break };
        batches.push((pos, raw.len(), h.base_offset));
        pos += raw.len();
    }
    let n = batches.len() as u64;
    let (at, len, base_offset) = *batches.get(pick.checked_rem(n)? as usize)?;
    let position = (at + len - 2) as u64;
    let mask = 1u8 << ((pick >> 32) % 8);
    let f = std::fs::OpenOptions::new().write(true).open(file).ok()?;
    f.write_all_at(&[original[position as usize] ^ mask], position)
        .ok()?;
    Some(Flipped {
        file: file.to_path_buf(),
        position,
        base_offset,
        original,
    })
}
