//! The group coordinator: the IO around the pure group logic.
//!
//! A group's coordinator is the leader of partition `fnv1a32(group) % N` of the internal topic
//! [`OFFSETS_TOPIC`], so coordinator failover is ordinary partition failover. Each offsets
//! partition this broker leads is a [`Shard`]: the committed offsets folded from that
//! partition's log (rebuilt from the log by a new leader), plus the live membership of its
//! groups (in memory only: members of a coordinator that moved rejoin). Commits, resets and
//! deletions are records appended with `acks=all`, so they are as durable as data records;
//! the shard folds its own writes back from the log, which makes the log the only truth.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_log::batch::{
    BatchBuilder, BatchIter, Compression, RecordRef, VerifiedBatch, decode_records,
};
use keel_proto::v1::consume_service_client::ConsumeServiceClient;
use keel_proto::v1::{ListOffsetsRequest, StartPosition, list_offsets_request};
use tokio::sync::{Mutex as AsyncMutex, OwnedRwLockReadGuard, RwLock};

use super::live::{Catalog, LiveGroup, MembershipError};
use super::{OffsetsRecord, OffsetsState, TopicPartition};
use crate::error::{BrokerError, Result};
use crate::partition::Partition;
use crate::registry::Topic;
use crate::state::BrokerState;

/// The internal topic holding every group's committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Its partition count (fixed once created): each is a Raft group, and their leaders spread
/// the coordinators over the brokers.
pub const OFFSETS_PARTITIONS: u32 = 8;
/// Segments small enough that compaction can delete the old ones soon.
const OFFSETS_SEGMENT_BYTES: &str = "16777216";
/// Committed offsets of a group without members are deleted this long after its last commit
/// (Kafka's `offsets.retention.minutes`, 7 days).
pub const DEFAULT_OFFSETS_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// A compacted image is written once this many records were folded since the last one.
pub const DEFAULT_COMPACT_RECORDS: u64 = 50_000;
/// How long a peer is given to answer a high-watermark or offset lookup.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// FNV-1a (32 bit) of the group id: simple enough for any client to compute the partition.
pub fn shard_of(group: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in group.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// One offsets partition this broker leads, in one leadership term.
#[derive(Debug)]
pub struct Shard {
    pub partition: Arc<Partition>,
    term: u64,
    pub inner: AsyncMutex<ShardState>,
    /// Writes share it; compaction takes it alone. One lock per offsets partition across
    /// leadership terms, so a compaction begun in an earlier term of this broker cannot
    /// interleave with commits of a later one.
    writers: Arc<RwLock<()>>,
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

/// How long a coordinator that took over holds back partitions no member claims.
const TAKEOVER_HOLD_MS: u64 = 5_000;
/// Bounds on the sweep's own writes, so one stuck partition never stalls the others.
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(10);
/// A shard that is not loaded within this is skipped by a sweep (tried again next time).
const SWEEP_LOAD_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Debug, Default)]
pub struct ShardState {
    pub offsets: OffsetsState,
    /// The next offset of the offsets partition to fold.
    folded_to: u64,
    /// Records folded since the last compacted image.
    since_image: u64,
    pub groups: BTreeMap<String, LiveGroup>,
    /// When (wall clock) this state was loaded, and when each group last had members here:
    /// a group's offsets expire only after it has been empty for the retention, counted no
    /// earlier than the load (members of a coordinator that just took over have not rejoined
    /// yet, which must not look like an empty group).
    loaded_at_ms: i64,
    last_active_ms: HashMap<String, i64>,
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

#[derive(Debug)]
pub struct Coordinator {
    shards: Mutex<HashMap<u32, Arc<Shard>>>,
    locks: Mutex<HashMap<u32, Arc<RwLock<()>>>>,
    housekeeping: AsyncMutex<()>,
    creating: AsyncMutex<()>,
    clock: Instant,
    peers: Mutex<HashMap<String, tonic::transport::Channel>>,
    pub offsets_retention_ms: i64,
    compact_records: u64,
}

impl Default for Coordinator {
    fn default() -> Self {
        Self::new(DEFAULT_OFFSETS_RETENTION_MS, DEFAULT_COMPACT_RECORDS)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn now_wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Maps a membership refusal to the broker's error.
pub fn membership_err(e: MembershipError) -> BrokerError {
    match e {
        MembershipError::UnknownMember { .. } => BrokerError::UnknownMember(e.to_string()),
        MembershipError::InconsistentStrategy { .. } => {
            BrokerError::InconsistentStrategy(e.to_string())
        }
        MembershipError::NotOwner { .. } | MembershipError::HasMembers { .. } => {
            BrokerError::FencedMember(e.to_string())
        }
    }
}

impl Coordinator {
    pub fn new(offsets_retention_ms: i64, compact_records: u64) -> Self {
        Self {
            shards: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            housekeeping: AsyncMutex::new(()),
            creating: AsyncMutex::new(()),
            clock: Instant::now(),
            peers: Mutex::new(HashMap::new()),
            offsets_retention_ms,
            compact_records,
        }
    }

    /// Milliseconds of a monotonic clock, for sessions.
    pub fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// The offsets topic, created on first use.
    pub async fn offsets_topic(&self, state: &BrokerState) -> Result<Arc<Topic>> {
        if let Ok(t) = state.registry.get(OFFSETS_TOPIC) {
            return Ok(t);
        }
        let _one = self.creating.lock().await;
        if let Ok(t) = state.registry.get(OFFSETS_TOPIC) {
            return Ok(t);
        }
        let config: BTreeMap<String, String> = [
            ("retention.ms".to_owned(), "-1".to_owned()),
            ("segment.bytes".to_owned(), OFFSETS_SEGMENT_BYTES.to_owned()),
        ]
        .into();
        match state
            .create_topic(OFFSETS_TOPIC, OFFSETS_PARTITIONS, 0, &config)
            .await
        {
            Ok(t) => {
                tracing::info!("created the consumer offsets topic");
                Ok(t)
            }
            // Another broker created it first.
            Err(BrokerError::TopicExists(_)) => state.registry.get(OFFSETS_TOPIC),
            Err(e) => Err(e),
        }
    }

    /// The broker coordinating `group`, if its partition has a leader: `(id, address)`.
    pub async fn find(&self, state: &BrokerState, group: &str) -> Result<Option<(u32, String)>> {
        let topic = self.offsets_topic(state).await?;
        let p = shard_of(group, OFFSETS_PARTITIONS);
        match topic.partition(p) {
            Ok(_) => Ok(Some((state.id, state.advertise.clone()))),
            Err(BrokerError::NotLeader { leader, .. }) => Ok(leader),
            Err(e) => Err(e),
        }
    }

    /// The shard coordinating `group` on this broker, loading it if this broker just became
    /// its leader; `NOT_COORDINATOR` if another broker leads it.
    pub async fn shard(&self, state: &BrokerState, group: &str) -> Result<Arc<Shard>> {
        let topic = self.offsets_topic(state).await?;
        let p = shard_of(group, OFFSETS_PARTITIONS);
        self.shard_at(&topic, p, group).await
    }

    /// The shard of offsets partition `p` (`group` only names the group in errors).
    async fn shard_at(&self, topic: &Topic, p: u32, group: &str) -> Result<Arc<Shard>> {
        let partition = match topic.partition(p) {
            Ok(part) => Arc::clone(part),
            Err(BrokerError::NotLeader { leader, .. }) => {
                return Err(BrokerError::NotCoordinator {
                    group: group.to_owned(),
                    coordinator: leader,
                });
            }
            Err(e) => return Err(e),
        };
        let term = partition.current_term();
        if let Some(s) = lock(&self.shards).get(&p)
            && Arc::ptr_eq(&s.partition, &partition)
            && s.term == term
        {
            return Ok(Arc::clone(s));
        }
        // A new leader must see everything earlier leaders committed before it answers.
        let term = partition.wait_leader_caught_up().await?;
        let writers = Arc::clone(lock(&self.locks).entry(p).or_default());
        let shard = Arc::new(Shard {
            hold_until_ms: if partition.high_watermark() > 0 {
                self.now_ms() + TAKEOVER_HOLD_MS
            } else {
                0
            },
            partition: Arc::clone(&partition),
            term,
            inner: AsyncMutex::new(ShardState {
                loaded_at_ms: now_wall_ms(),
                ..ShardState::default()
            }),
            writers,
        });
        let shard = {
            let mut shards = lock(&self.shards);
            match shards.get(&p) {
                Some(s) if Arc::ptr_eq(&s.partition, &partition) && s.term == term => Arc::clone(s),
                _ => {
                    shards.insert(p, Arc::clone(&shard));
                    shard
                }
            }
        };
        {
            let mut inner = shard.inner.lock().await;
            inner.catch_up(&shard.partition)?;
            tracing::info!(
                partition = p,
                term,
                groups = inner.offsets.groups().count(),
                "coordinator loaded offsets partition"
            );
        }
        Ok(shard)
    }

    /// Loads every offsets partition this broker leads and returns their shards; fails if
    /// one cannot be loaded (a listing must not silently leave it out). Does not create the
    /// topic.
    pub async fn led_shards(&self, state: &BrokerState) -> Result<Vec<Arc<Shard>>> {
        let Ok(topic) = state.registry.get(OFFSETS_TOPIC) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for p in 0..topic.partition_count() {
            if topic.partition(p).is_ok() {
                out.push(self.shard_at(&topic, p, "").await?);
            }
        }
        Ok(out)
    }

    /// The shards a sweep can work on now: a new leader takes its groups over at once, not on
    /// its first request; one still catching up is left for the next sweep.
    async fn sweepable_shards(&self, state: &BrokerState) -> Vec<Arc<Shard>> {
        let Ok(topic) = state.registry.get(OFFSETS_TOPIC) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in 0..topic.partition_count() {
            if topic.partition(p).is_ok()
                && let Ok(Ok(s)) =
                    tokio::time::timeout(SWEEP_LOAD_TIMEOUT, self.shard_at(&topic, p, "")).await
            {
                out.push(s);
            }
        }
        out
    }

    /// Appends records to the shard's partition (committed by a majority before it returns)
    /// and folds them back. Callers that check the state before writing hold
    /// [`Shard::writing`] across both.
    pub async fn write(&self, shard: &Shard, records: &[OffsetsRecord]) -> Result<()> {
        let _shared = shard.writers.read().await;
        self.append(shard, records).await
    }

    /// [`Coordinator::write`] for a caller that already holds [`Shard::writing`].
    pub async fn append(&self, shard: &Shard, records: &[OffsetsRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let now = now_wall_ms();
        let mut b = BatchBuilder::new(Compression::None);
        for r in records {
            let value = serde_json::to_vec(r).map_err(|e| BrokerError::Internal(e.to_string()))?;
            b.push(&RecordRef {
                timestamp: now,
                key: Some(r.group().as_bytes()),
                value: Some(&value),
                headers: &[],
            })
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        }
        let batch = Bytes::from(
            b.build()
                .map_err(|e| BrokerError::Internal(e.to_string()))?,
        );
        let limit = 1u64 << 20;
        if batch.len() as u64 > limit {
            return Err(BrokerError::TooLarge {
                what: "offset commit",
                size: batch.len() as u64,
                limit,
                setting: "commit fewer partitions (or shorter metadata) per request",
            });
        }
        let batch = VerifiedBatch::check(batch)
            .map_err(|e| BrokerError::Internal(format!("an offsets batch built here: {e}")))?;
        shard.partition.append(batch).await.map_err(|e| match e {
            BrokerError::NotLeader { leader, topic, .. } => BrokerError::NotCoordinator {
                group: topic,
                coordinator: leader,
            },
            other => other,
        })?;
        shard.inner.lock().await.catch_up(&shard.partition)
    }

    /// The shards this broker currently holds (for the periodic sweep).
    pub fn shards(&self) -> Vec<Arc<Shard>> {
        lock(&self.shards).values().cloned().collect()
    }

    /// Forgets shards whose partition this broker no longer leads (their members will find
    /// the new coordinator).
    fn prune(&self, state: &BrokerState) {
        let topic = state.registry.get(OFFSETS_TOPIC).ok();
        lock(&self.shards).retain(|p, s| {
            topic.as_ref().is_some_and(|t| {
                t.partition(*p)
                    .is_ok_and(|cur| Arc::ptr_eq(cur, &s.partition))
                    && s.partition.current_term() == s.term
            })
        });
    }

    /// Runs every few hundred milliseconds: expires sessions and follows topic changes;
    /// with `housekeeping`, also (in a task of its own, so a slow write never delays session
    /// expiry) expires old groups' offsets, writes compacted images and exports lag.
    pub async fn sweep(&self, state: &Arc<BrokerState>, housekeeping: bool) {
        self.prune(state);
        let catalog = catalog(state);
        let now = self.now_ms();
        let wall = now_wall_ms();
        let mut expired: Vec<(Arc<Shard>, Vec<OffsetsRecord>)> = Vec::new();
        for shard in self.sweepable_shards(state).await {
            let mut inner = shard.inner.lock().await;
            if let Err(e) = inner.catch_up(&shard.partition) {
                tracing::warn!(error = %e, "coordinator could not fold its offsets partition");
                continue;
            }
            let ShardState {
                groups,
                last_active_ms,
                ..
            } = &mut *inner;
            for (name, g) in groups.iter_mut() {
                for m in g.expire(now, &catalog) {
                    tracing::info!(group = %name, member = %m, "member session expired");
                }
                g.refresh(now, &catalog);
                if !g.is_empty() {
                    last_active_ms.insert(name.clone(), wall);
                }
            }
            groups.retain(|_, g| !g.is_empty());
            if housekeeping {
                let retention = self.offsets_retention_ms;
                let since = inner.loaded_at_ms;
                let (groups, last_active) = (&inner.groups, &inner.last_active_ms);
                let deletions: Vec<OffsetsRecord> = inner
                    .offsets
                    .expired_groups(wall, retention, |g| {
                        groups.contains_key(g)
                            || last_active
                                .get(g)
                                .copied()
                                .unwrap_or(since)
                                .max(since)
                                .saturating_add(retention)
                                > wall
                    })
                    .into_iter()
                    .map(|group| OffsetsRecord::DeleteGroup { group })
                    .collect();
                drop(inner);
                expired.push((shard, deletions));
            }
        }
        if !housekeeping {
            return;
        }
        // At most one housekeeping round at a time.
        let Ok(_one) = self.housekeeping.try_lock() else {
            return;
        };
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let groups = &state.groups;
            let Ok(_one) = groups.housekeeping.try_lock() else {
                return;
            };
            for (shard, deletions) in expired {
                for d in &deletions {
                    tracing::info!(group = %d.group(), "deleting the offsets of a group empty for longer than the retention");
                }
                match tokio::time::timeout(HOUSEKEEPING_TIMEOUT, groups.write(&shard, &deletions))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not delete expired group offsets")
                    }
                    Err(_) => tracing::warn!("deleting expired group offsets timed out"),
                }
                match tokio::time::timeout(HOUSEKEEPING_TIMEOUT, groups.compact(&state, &shard))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not compact an offsets partition")
                    }
                    Err(_) => tracing::warn!("compacting an offsets partition timed out"),
                }
            }
            groups.export_lag(&state).await;
        });
    }

    /// Writes the compacted image of a shard once enough records piled up since the last one,
    /// then deletes the log before it (on every replica, through the metadata group).
    ///
    /// Exclusive with every other write of the shard: the image is the state folded up to
    /// offset `start`, and a commit appended between `start` and the image would otherwise be
    /// undone by the image's resets when the log is folded again.
    async fn compact(&self, state: &BrokerState, shard: &Shard) -> Result<()> {
        let same_term = || shard.partition.current_term() == shard.term;
        if !same_term() {
            return Ok(());
        }
        let _exclusive = shard.writers.write().await;
        let (image, start) = {
            let mut inner = shard.inner.lock().await;
            inner.catch_up(&shard.partition)?;
            if inner.since_image < self.compact_records || !same_term() {
                return Ok(());
            }
            (inner.offsets.compacted(), inner.folded_to)
        };
        // Batches of at most ~512 KiB of JSON, so a group with many partitions never makes
        // a batch over the 1 MiB limit (a crash midway leaves the old log, which still folds
        // to the same state).
        let mut batches: Vec<Vec<OffsetsRecord>> = vec![Vec::new()];
        let mut size = 0usize;
        for r in image {
            let len = serde_json::to_vec(&r).map_or(0, |v| v.len()) + 32;
            if size + len > 512 << 10 && batches.last().is_some_and(|b| !b.is_empty()) {
                batches.push(Vec::new());
                size = 0;
            }
            size += len;
            if let Some(b) = batches.last_mut() {
                b.push(r);
            }
        }
        for records in &batches {
            if !same_term() {
                return Err(BrokerError::Unavailable {
                    message: "leadership moved during compaction".into(),
                    definite: false,
                });
            }
            self.append(shard, records).await?;
        }
        state
            .delete_records_before(&shard.partition.topic, shard.partition.id, start)
            .await?;
        shard.inner.lock().await.since_image = 0;
        tracing::info!(
            partition = shard.partition.id,
            before = start,
            batches = batches.len(),
            "compacted an offsets partition"
        );
        Ok(())
    }

    /// `keel_consumer_group_lag{group,topic,partition}` and `keel_consumer_group_lag_sum{group}`
    /// for the groups this broker coordinates.
    async fn export_lag(&self, state: &BrokerState) {
        for shard in self.shards() {
            if shard.partition.current_term() != shard.term {
                continue;
            }
            let groups: Vec<(String, BTreeMap<TopicPartition, u64>)> = {
                let inner = shard.inner.lock().await;
                inner
                    .offsets
                    .groups()
                    .filter_map(|g| {
                        inner.offsets.group_offsets(g).map(|o| {
                            (
                                g.to_owned(),
                                o.iter().map(|(tp, c)| (tp.clone(), c.offset)).collect(),
                            )
                        })
                    })
                    .collect()
            };
            for (group, offsets) in groups {
                let tps: Vec<TopicPartition> = offsets.keys().cloned().collect();
                let ends = self.high_watermarks(state, &tps).await;
                let mut sum = 0u64;
                for (tp, committed) in &offsets {
                    if let Some(end) = ends.get(tp) {
                        let lag = end.saturating_sub(*committed);
                        sum += lag;
                        metrics::gauge!(
                            "keel_consumer_group_lag",
                            "group" => group.clone(),
                            "topic" => tp.topic.clone(),
                            "partition" => tp.partition.to_string()
                        )
                        .set(lag as f64);
                    }
                }
                metrics::gauge!("keel_consumer_group_lag_sum", "group" => group.clone())
                    .set(sum as f64);
            }
        }
    }

    /// A channel to another broker (at its peer address), kept for reuse.
    pub fn peer(&self, address: &str) -> Result<tonic::transport::Channel> {
        let mut peers = lock(&self.peers);
        if let Some(c) = peers.get(address) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| BrokerError::Internal(format!("peer address {address:?}: {e}")))?
            .connect_timeout(PEER_TIMEOUT)
            .timeout(PEER_TIMEOUT)
            .connect_lazy();
        peers.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Looks up an offset of a partition at its leader (this broker or a peer).
    pub async fn list_offset(
        &self,
        state: &BrokerState,
        tp: &TopicPartition,
        spec: list_offsets_request::Spec,
    ) -> Result<(u64, u64, u64)> {
        let topic = state.registry.lookup("topic", &tp.topic)?;
        match topic.partition(tp.partition) {
            Ok(p) => {
                let (start, hwm) = (p.log_start_offset(), p.high_watermark());
                let offset = match spec {
                    list_offsets_request::Spec::Position(pos)
                        if pos == StartPosition::Earliest as i32 =>
                    {
                        start
                    }
                    list_offsets_request::Spec::Position(_) => hwm,
                    list_offsets_request::Spec::TimestampMs(ts) => {
                        p.offset_for_timestamp(ts)?.map_or(hwm, |(o, _)| o)
                    }
                };
                Ok((offset, start, hwm))
            }
            Err(BrokerError::NotLeader {
                leader: Some((id, address)),
                ..
            }) => {
                // The hint is the leader's client address; a broker talks to its peer address.
                let address = state.peer_address(id).unwrap_or(address);
                let mut client = ConsumeServiceClient::new(self.peer(&address)?);
                let r = tokio::time::timeout(
                    PEER_TIMEOUT,
                    client.list_offsets(ListOffsetsRequest {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        spec: Some(spec),
                    }),
                )
                .await
                .map_err(|_| BrokerError::Unavailable {
                    message: format!("the leader of {tp} at {address} did not answer in time"),
                    definite: true,
                })?
                .map_err(|s| {
                    BrokerError::from_peer_read(
                        &s,
                        &format!("asking the leader of {tp} at {address}"),
                    )
                })?
                .into_inner();
                Ok((r.offset, r.log_start_offset, r.high_watermark))
            }
            Err(e) => Err(e),
        }
    }

    /// High watermarks of partitions, asked of their leaders concurrently; partitions whose
    /// leader could not be asked are left out.
    pub async fn high_watermarks(
        &self,
        state: &BrokerState,
        tps: &[TopicPartition],
    ) -> BTreeMap<TopicPartition, u64> {
        let asks = tps.iter().map(|tp| async move {
            let r = self
                .list_offset(
                    state,
                    tp,
                    list_offsets_request::Spec::Position(StartPosition::Latest as i32),
                )
                .await;
            (tp.clone(), r.ok().map(|(_, _, hwm)| hwm))
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(tp, h)| h.map(|h| (tp, h)))
            .collect()
    }
}

/// Every user topic's partition count (internal topics are never assigned to groups).
pub fn catalog(state: &BrokerState) -> Catalog {
    state
        .registry
        .list()
        .iter()
        .filter(|t| !t.meta.name.starts_with("__"))
        .map(|t| (t.meta.name.clone(), t.partition_count()))
        .collect()
}

/// Partitions grouped by topic, as the API lists them.
pub fn by_topic<'a>(
    tps: impl IntoIterator<Item = &'a TopicPartition>,
) -> BTreeMap<String, BTreeSet<u32>> {
    let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for tp in tps {
        out.entry(tp.topic.clone())
            .or_default()
            .insert(tp.partition);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_fnv1a_of_the_group() {
        // FNV-1a 32 of "" is the offset basis; of "a" a published test vector.
        assert_eq!(shard_of("", u32::MAX), 0x811c_9dc5);
        assert_eq!(shard_of("a", u32::MAX), 0xe40c_292c);
        let spread: BTreeSet<u32> = (0..100).map(|i| shard_of(&format!("g{i}"), 8)).collect();
        assert_eq!(spread.len(), 8);
        assert_eq!(shard_of("x", 0), 0);
    }
}
