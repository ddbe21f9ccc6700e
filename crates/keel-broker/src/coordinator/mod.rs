//! The group coordinator: the IO around the pure group logic of `crate::groups`.
//!
//! A group's coordinator is the leader of partition `fnv1a32(group) % N` of the internal topic
//! [`OFFSETS_TOPIC`], so coordinator failover is ordinary partition failover. Each offsets
//! partition this broker leads is a [`Shard`]: the committed offsets folded from that
//! partition's log (rebuilt from the log by a new leader), plus the live membership of its
//! groups (in memory only: members of a coordinator that moved rejoin). Commits, resets and
//! deletions are records appended with `acks=all`, so they are as durable as data records;
//! the shard folds its own writes back from the log, which makes the log the only truth.
//!
//! The coordinator reaches the rest of the broker only through [`OffsetsHost`]: the broker
//! state holds the coordinator and implements the host, so dependencies point one way
//! (state -> coordinator -> groups).

mod host;
mod offsets_log;
mod peers;
mod shard;
mod sweep;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex as AsyncMutex, RwLock};

pub use self::host::OffsetsHost;
pub use self::shard::{Shard, ShardState};
use crate::error::{BrokerError, Result};
use crate::groups::live::{Catalog, MembershipError};
use crate::groups::{OFFSETS_PARTITIONS, OFFSETS_TOPIC, shard_of};
use crate::registry::{Registry, Topic};

/// Segments small enough that compaction can delete the old ones soon.
const OFFSETS_SEGMENT_BYTES: &str = "16777216";
/// Committed offsets of a group without members are deleted this long after its last commit
/// (Kafka's `offsets.retention.minutes`, 7 days).
pub const DEFAULT_OFFSETS_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// A compacted image is written once this many records were folded since the last one.
pub const DEFAULT_COMPACT_RECORDS: u64 = 50_000;
/// How long a coordinator that took over holds back partitions no member claims.
const TAKEOVER_HOLD_MS: u64 = 5_000;
/// A shard that is not loaded within this is skipped by a sweep (tried again next time).
const SWEEP_LOAD_TIMEOUT: Duration = Duration::from_millis(300);

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
    pub async fn offsets_topic(&self, host: &impl OffsetsHost) -> Result<Arc<Topic>> {
        if let Ok(t) = host.registry().get(OFFSETS_TOPIC) {
            return Ok(t);
        }
        let _one = self.creating.lock().await;
        if let Ok(t) = host.registry().get(OFFSETS_TOPIC) {
            return Ok(t);
        }
        let config: BTreeMap<String, String> = [
            ("retention.ms".to_owned(), "-1".to_owned()),
            ("segment.bytes".to_owned(), OFFSETS_SEGMENT_BYTES.to_owned()),
        ]
        .into();
        match host
            .create_topic(OFFSETS_TOPIC, OFFSETS_PARTITIONS, &config)
            .await
        {
            Ok(t) => {
                tracing::info!("created the consumer offsets topic");
                Ok(t)
            }
            // Another broker created it first.
            Err(BrokerError::TopicExists(_)) => host.registry().get(OFFSETS_TOPIC),
            Err(e) => Err(e),
        }
    }

    /// The broker coordinating `group`, if its partition has a leader: `(id, address)`.
    pub async fn find(
        &self,
        host: &impl OffsetsHost,
        group: &str,
    ) -> Result<Option<(u32, String)>> {
        let topic = self.offsets_topic(host).await?;
        let p = shard_of(group, OFFSETS_PARTITIONS);
        match topic.partition(p) {
            Ok(_) => Ok(Some(host.broker())),
            Err(BrokerError::NotLeader { leader, .. }) => Ok(leader),
            Err(e) => Err(e),
        }
    }

    /// The shard coordinating `group` on this broker, loading it if this broker just became
    /// its leader; `NOT_COORDINATOR` if another broker leads it.
    pub async fn shard(&self, host: &impl OffsetsHost, group: &str) -> Result<Arc<Shard>> {
        let topic = self.offsets_topic(host).await?;
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
    pub async fn led_shards(&self, host: &impl OffsetsHost) -> Result<Vec<Arc<Shard>>> {
        let Ok(topic) = host.registry().get(OFFSETS_TOPIC) else {
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
    async fn sweepable_shards(&self, host: &impl OffsetsHost) -> Vec<Arc<Shard>> {
        let Ok(topic) = host.registry().get(OFFSETS_TOPIC) else {
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

    /// The shards this broker currently holds (for the periodic sweep).
    pub fn shards(&self) -> Vec<Arc<Shard>> {
        lock(&self.shards).values().cloned().collect()
    }

    /// Forgets shards whose partition this broker no longer leads (their members will find
    /// the new coordinator).
    fn prune(&self, host: &impl OffsetsHost) {
        let topic = host.registry().get(OFFSETS_TOPIC).ok();
        lock(&self.shards).retain(|p, s| {
            topic.as_ref().is_some_and(|t| {
                t.partition(*p)
                    .is_ok_and(|cur| Arc::ptr_eq(cur, &s.partition))
                    && s.partition.current_term() == s.term
            })
        });
    }
}

/// Every user topic's partition count (internal topics are never assigned to groups).
pub fn catalog(registry: &Registry) -> Catalog {
    registry
        .list()
        .iter()
        .filter(|t| !t.meta.name.starts_with("__"))
        .map(|t| (t.meta.name.clone(), t.partition_count()))
        .collect()
}
