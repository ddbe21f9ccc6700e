//! One offsets partition this broker leads: the state folded from its log and the live
//! groups it coordinates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use keel_batch::{BatchIter, decode_records};
use tokio::sync::{Mutex as AsyncMutex, OwnedRwLockReadGuard, RwLock};

use crate::error::{BrokerError, Result};
use crate::groups::live::LiveGroup;
use crate::groups::{OffsetsRecord, OffsetsState};
use crate::partition::Partition;

/// One offsets partition this broker leads, in one leadership term.
#[derive(Debug)]
pub struct Shard {
    pub partition: Arc<Partition>,
    pub(super) term: u64,
    pub inner: AsyncMutex<ShardState>,
    /// Writes share it; compaction takes it alone. One lock per offsets partition across
    /// leadership terms, so a compaction begun in an earlier term of this broker cannot
    /// interleave with commits of a later one.
    pub(super) writers: Arc<RwLock<()>>,
    /// Groups created before this (monotonic ms) hand out only claimed partitions; see
    /// `LiveGroup::holding_until`. 0 when the partition was empty at load (no earlier
    /// coordinator can have had members with commits).
    pub hold_until_ms: u64,
}

impl Shard {
    /// Held by a writer from its check of the state to the end of its write, so compaction
    /// never runs in between. Owned, so that a writer running in a task of its own keeps it
    /// even if the request that started it is cancelled.
    pub async fn writing(&self) -> OwnedRwLockReadGuard<()> {
        Arc::clone(&self.writers).read_owned().await
    }
}

#[derive(Debug, Default)]
pub struct ShardState {
    pub offsets: OffsetsState,
    /// The next offset of the offsets partition to fold.
    pub(super) folded_to: u64,
    /// Records folded since the last compacted image.
    pub(super) since_image: u64,
    pub groups: BTreeMap<String, LiveGroup>,
    /// When (wall clock) this state was loaded, and when each group last had members here:
    /// a group's offsets expire only after it has been empty for the retention, counted no
    /// earlier than the load (members of a coordinator that just took over have not rejoined
    /// yet, which must not look like an empty group).
    pub(super) loaded_at_ms: i64,
    pub(super) last_active_ms: HashMap<String, i64>,
}

impl ShardState {
    /// Folds the committed records this state has not seen yet.
    pub fn catch_up(&mut self, p: &Partition) -> Result<()> {
        loop {
            let hwm = p.high_watermark();
            let start = p.log_start_offset();
            if self.folded_to < start {
                self.folded_to = start;
            }
            if self.folded_to >= hwm {
                return Ok(());
            }
            let slice = p.read(self.folded_to, 4 << 20)?;
            if slice.bytes.is_empty() {
                return Ok(());
            }
            let mut pos = 0usize;
            for item in BatchIter::new(&slice.bytes) {
                let (h, raw) = item.map_err(|e| BrokerError::Storage {
                    message: format!("offsets partition {}: {e}", p.id),
                    definite: true,
                })?;
                let bytes = slice.bytes.slice(pos..pos + raw.len());
                pos += raw.len();
                if !h.attributes.control {
                    let records =
                        decode_records(&bytes, 64 << 20).map_err(|e| BrokerError::Storage {
                            message: format!("offsets partition {}: {e}", p.id),
                            definite: true,
                        })?;
                    for r in records.iter().filter(|r| r.offset >= self.folded_to) {
                        match r
                            .value
                            .as_deref()
                            .map(serde_json::from_slice::<OffsetsRecord>)
                        {
                            Some(Ok(rec)) => {
                                self.offsets.apply(&rec);
                                self.since_image += 1;
                            }
                            // Only coordinators write here; a record that does not parse
                            // came from a newer version and is skipped, not fatal.
                            _ => tracing::warn!(
                                partition = p.id,
                                offset = r.offset,
                                "skipping an offsets record that does not parse"
                            ),
                        }
                    }
                }
                self.folded_to = self.folded_to.max(h.next_offset());
            }
        }
    }

    /// Whether the group has members, offsets, or both.
    pub fn knows(&self, group: &str) -> bool {
        self.groups.get(group).is_some_and(|g| !g.is_empty())
            || self.offsets.group_offsets(group).is_some()
    }
}
