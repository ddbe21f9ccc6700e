//! Deleting old data: `delete_before`, the retention boundary, retention passes, and
//! removing segment files.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Log, RetentionOutcome, lock};
use crate::error::{LogError, Result};
use crate::segment::Segment;
use crate::segment_file::paths;

impl Log {
    /// Advances the log start to `offset` (clamped to the log end) and deletes the segments
    /// wholly below it. Returns the new log start.
    pub fn delete_before(&self, offset: u64) -> Result<u64> {
        self.check_poisoned()?;
        let mut w = lock(&self.writer);
        let offset = offset.min(self.log_end_offset());
        if offset <= self.log_start_offset() {
            return Ok(self.log_start_offset());
        }
        self.log_start.store(offset, Ordering::Release);
        let segs = self.segments();
        let k = (0..segs.len().saturating_sub(1))
            .take_while(|i| segs.get(i + 1).is_some_and(|n| n.base_offset <= offset))
            .count();
        let removed = segs[..k].to_vec();
        self.set_segments(segs[k..].to_vec());
        self.checkpoint_locked(&mut w)?;
        drop(w);
        self.delete_files(&removed)?;
        Ok(offset)
    }

    /// The log start offset that retention by `retention_ms` / `retention_bytes` would give:
    /// the base offset of the first closed segment to keep (the current start when nothing
    /// would go). Deletes nothing: a replicated log deletes through its Raft group (snapshot at
    /// this boundary, then purge), whose own settings have retention off.
    pub fn retention_boundary(
        &self,
        retention_ms: Option<std::time::Duration>,
        retention_bytes: Option<u64>,
    ) -> u64 {
        let now = self.clock.now_ms();
        let segs = self.segments();
        let mut total: u64 = segs.iter().map(|s| s.size_bytes()).sum();
        let mut k = 0;
        while k + 1 < segs.len() {
            let s = &segs[k];
            let expired = retention_ms.is_some_and(|r| {
                let age = i64::try_from(r.as_millis()).unwrap_or(i64::MAX);
                s.max_timestamp.load(Ordering::Acquire) < now.saturating_sub(age)
            });
            let oversize =
                retention_bytes.is_some_and(|r| total.saturating_sub(s.size_bytes()) >= r);
            if !(expired || oversize) {
                break;
            }
            total -= s.size_bytes();
            k += 1;
        }
        segs.get(k)
            .map_or(0, |s| s.base_offset)
            .max(self.log_start_offset())
    }

    /// Deletes closed segments past `retention.ms` or beyond `retention.bytes`, oldest first.
    /// Readers still holding a deleted segment keep a valid mapping until they finish.
    pub fn apply_retention(&self) -> Result<RetentionOutcome> {
        self.check_poisoned()?;
        let now = self.clock.now_ms();
        let w = lock(&self.writer);
        let segs = self.segments();
        let mut total: u64 = segs.iter().map(|s| s.size_bytes()).sum();
        let mut k = 0;
        while k + 1 < segs.len() {
            let s = &segs[k];
            let expired = w.config.retention_ms.is_some_and(|r| {
                let age = i64::try_from(r.as_millis()).unwrap_or(i64::MAX);
                s.max_timestamp.load(Ordering::Acquire) < now.saturating_sub(age)
            });
            let oversize = w
                .config
                .retention_bytes
                .is_some_and(|r| total.saturating_sub(s.size_bytes()) >= r);
            if !(expired || oversize) {
                break;
            }
            total -= s.size_bytes();
            k += 1;
        }
        if k == 0 {
            return Ok(RetentionOutcome {
                log_start_offset: self.log_start_offset(),
                ..Default::default()
            });
        }
        let removed = segs[..k].to_vec();
        let new_start = segs[k].base_offset.max(self.log_start_offset());
        self.log_start.store(new_start, Ordering::Release);
        self.set_segments(segs[k..].to_vec());
        // No checkpoint needed: a start at a segment boundary is recovered from the files, so
        // appends wait only for this list swap, not for any IO.
        drop(w);
        let deleted_bytes = removed.iter().map(|s| s.size_bytes()).sum();
        self.delete_files(&removed)?;
        tracing::info!(dir = %self.dir.display(), deleted_segments = k, deleted_bytes, log_start = new_start, "retention deleted segments");
        Ok(RetentionOutcome {
            deleted_segments: k,
            deleted_bytes,
            log_start_offset: new_start,
        })
    }

    pub(super) fn delete_files(&self, segs: &[Arc<Segment>]) -> Result<()> {
        if segs.is_empty() {
            return Ok(());
        }
        for s in segs {
            for p in paths(&self.dir, s.base_offset) {
                if self.fs.exists(&p) {
                    self.fs
                        .remove(&p)
                        .map_err(|e| LogError::io("removing", &p, e))?;
                }
            }
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| LogError::io("syncing directory", &self.dir, e))
    }
}
