//! State shared by the gRPC services.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::v1::{BrokerInfo, PartitionInfo, TopicInfo};
use tokio::sync::watch;

use crate::cluster::meta::{Command, Reply, assign, load_of};
use crate::cluster::{ClusterNode, RegistryHolder};
use crate::coordinator::{Coordinator, OffsetsHost};
use crate::error::{BrokerError, Result};
use crate::groups::OFFSETS_TOPIC;
use crate::registry::{
    MAX_PARTITIONS, Registry, Topic, create_partitions, create_replication_factor,
    validate_create_name,
};
use crate::topic_config::TopicConfig;

/// Request limits, enforced before anything is allocated from a request's claims.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest gRPC message the broker decodes.
    pub max_request_bytes: usize,
    /// Largest response a fetch or subscription message may carry (plus one batch).
    pub max_fetch_bytes: u32,
    pub default_fetch_bytes: u32,
    pub max_wait_ms: u32,
    pub max_batches_per_request: usize,
    pub max_records_per_batch: u32,
    pub max_fetch_partitions: usize,
    pub max_produce_timeout_ms: u32,
    /// Produce requests a ProduceStream may have in flight before the broker stops reading it.
    pub max_in_flight_per_stream: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 16 << 20,
            max_fetch_bytes: 16 << 20,
            default_fetch_bytes: 1 << 20,
            max_wait_ms: 60_000,
            max_batches_per_request: 10_000,
            max_records_per_batch: 1_000_000,
            max_fetch_partitions: 10_000,
            max_produce_timeout_ms: 300_000,
            max_in_flight_per_stream: 256,
        }
    }
}

#[derive(Debug)]
pub struct BrokerState {
    pub id: u32,
    pub advertise: String,
    pub registry: Registry,
    pub limits: Limits,
    pub shutdown: watch::Receiver<bool>,
    /// This broker's membership of the cluster: of the cluster of one it forms when started
    /// without `--initial-cluster` or `--join`, or of the one it was started into.
    pub cluster: Arc<ClusterNode>,
    /// The consumer groups this broker coordinates.
    pub groups: Arc<Coordinator>,
}

impl RegistryHolder for BrokerState {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// A random id for a proposal, so that the metadata state machine recognises a retry of it.
pub(crate) fn request_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() | 1
}

/// How long an admin request waits for its change to reach this broker's topic table.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);

impl BrokerState {
    /// The brokers as this broker knows them (liveness as the metadata leader sees it).
    pub async fn brokers(&self) -> Vec<BrokerInfo> {
        self.cluster.brokers().await
    }

    /// The brokers without asking anyone about liveness (for metadata responses).
    pub fn known_brokers(&self) -> Vec<BrokerInfo> {
        self.cluster
            .state()
            .brokers
            .values()
            .map(|b| BrokerInfo {
                id: b.id,
                address: b.address.clone(),
                alive: true,
            })
            .collect()
    }

    /// Hands out an idempotent producer id and epoch (through the metadata group in a cluster).
    pub async fn init_producer(
        &self,
        request_id: u64,
        instance: Option<String>,
        bump: Option<(i64, i16)>,
    ) -> Result<(i64, i16)> {
        match self
            .cluster
            .propose_for_reply(Command::InitProducer {
                request_id,
                instance,
                bump,
            })
            .await?
        {
            Reply::Producer { id, epoch } => Ok((id, epoch)),
            Reply::Done => Err(BrokerError::Internal(
                "the metadata group answered a producer request without an id".into(),
            )),
        }
    }

    /// The current epoch of a producer id, if the metadata records one (identities and bumped
    /// ids); a batch with an older epoch is fenced.
    pub fn producer_epoch(&self, producer_id: i64) -> Option<i16> {
        self.cluster.state().producers.epoch_of(producer_id)
    }

    /// Where broker `id` is reached by other brokers (its peer address), if known.
    pub fn peer_address(&self, id: u32) -> Option<String> {
        self.cluster
            .state()
            .brokers
            .get(&id)
            .map(|b| b.peer().to_owned())
    }

    pub fn metadata_leader(&self) -> u32 {
        self.cluster.metadata_leader().unwrap_or(0)
    }

    pub fn live_brokers(&self) -> u32 {
        self.cluster.placeable_brokers()
    }

    pub fn topic_info(&self, topic: &Topic) -> TopicInfo {
        let partitions = topic
            .placement
            .iter()
            .enumerate()
            .map(|(i, pl)| {
                let local = topic.partitions.get(i).and_then(Option::as_ref);
                let leader = match local {
                    Some(p) => p
                        .raft()
                        .raft
                        .leader()
                        .map(|(l, _)| l as u32)
                        .or(pl.leader.as_ref().map(|l| l.0))
                        .unwrap_or(0),
                    None => pl.leader.as_ref().map_or(0, |l| l.0),
                };
                PartitionInfo {
                    partition: i as u32,
                    leader,
                    replicas: pl.replicas.clone(),
                    in_sync: pl.in_sync.clone(),
                    log_start_offset: local.map_or(0, |p| p.log_start_offset()),
                    log_end_offset: local.map_or(0, |p| p.high_watermark()),
                    high_watermark: local.map_or(0, |p| p.high_watermark()),
                }
            })
            .collect();
        TopicInfo {
            name: topic.meta.name.clone(),
            partitions,
            config: topic.meta.config.effective().into_iter().collect(),
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Waits (bounded) until this broker's topic table satisfies `cond`.
    async fn visible(&self, what: &str, cond: impl Fn(&Registry) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + VISIBLE_TIMEOUT;
        while !cond(&self.registry) {
            if tokio::time::Instant::now() > deadline {
                return Err(BrokerError::Unavailable {
                    message: format!("{what} was accepted but has not reached this broker yet"),
                    definite: false,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        config: &BTreeMap<String, String>,
    ) -> Result<Arc<Topic>> {
        let c = &self.cluster;
        validate_create_name(name)?;
        let partitions = create_partitions(partitions)?;
        // Right after a cluster starts, its brokers may not all have registered yet.
        let members = c.metadata_members();
        let _ = self
            .visible("broker registrations", |_| {
                c.placeable_brokers() >= members.min(replication_factor.max(1))
            })
            .await;
        let state = c.state();
        let brokers = state.placeable_brokers();
        let live = brokers.len() as u32;
        let rf = create_replication_factor(replication_factor, live)?;
        let topic_config = TopicConfig::new(config)?;
        let resolved = topic_config.resolve()?;
        if u64::from(resolved.min_insync_replicas) > u64::from(rf) {
            return Err(BrokerError::InvalidConfig {
                key: "min.insync.replicas".into(),
                message: format!(
                    "{} exceeds the replication factor {rf}",
                    resolved.min_insync_replicas
                ),
            });
        }
        if state.topics.contains_key(name) {
            return Err(BrokerError::TopicExists(name.to_owned()));
        }
        let assignments = assign(&brokers, &load_of(&state), partitions, rf);
        c.propose(Command::CreateTopic {
            request_id: request_id(),
            name: name.to_owned(),
            config: topic_config,
            replication_factor: rf,
            assignments,
        })
        .await?;
        self.visible("the new topic", |r| r.get(name).is_ok())
            .await?;
        // Answer once every partition has elected a leader, so that producing right after
        // creating works at once (bounded: a partition whose replicas are down stays leaderless).
        let _ = self
            .visible("the new topic's leaders", |r| {
                r.get(name)
                    .is_ok_and(|t| t.placement.iter().all(|p| p.leader.is_some()))
            })
            .await;
        self.registry.get(name)
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        if name == OFFSETS_TOPIC {
            return Err(BrokerError::invalid(
                "name",
                "__consumer_offsets is internal: deleting it would delete every group's offsets",
            ));
        }
        let topic = self.registry.lookup("name", name)?;
        self.cluster
            .propose(Command::DeleteTopic {
                name: name.to_owned(),
                topic_id: Some(topic.meta.id),
            })
            .await?;
        self.visible("the deletion", |r| r.get(name).is_err()).await
    }

    pub async fn alter_config(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Arc<Topic>> {
        let topic = self.registry.lookup("name", name)?;
        let config = topic.meta.config.with_changes(set, remove)?;
        self.cluster
            .propose(Command::AlterConfig {
                name: name.to_owned(),
                config: config.clone(),
            })
            .await?;
        self.visible("the new config", |r| {
            r.get(name).is_ok_and(|t| t.meta.config == config)
        })
        .await?;
        self.registry.get(name)
    }

    pub async fn add_partitions(&self, name: &str, total: u32) -> Result<Arc<Topic>> {
        let c = &self.cluster;
        let topic = self.registry.lookup("name", name)?;
        let have = topic.partition_count();
        if total <= have {
            return Err(BrokerError::invalid(
                "partitions",
                format!("the topic has {have} partitions; the new count {total} must be larger"),
            ));
        }
        if total > MAX_PARTITIONS {
            return Err(BrokerError::invalid(
                "partitions",
                format!("{total} exceeds the limit of {MAX_PARTITIONS}"),
            ));
        }
        let state = c.state();
        let assignments = assign(
            &state.placeable_brokers(),
            &load_of(&state),
            total - have,
            topic.meta.replication_factor,
        );
        c.propose(Command::AddPartitions {
            name: name.to_owned(),
            from_count: Some(have),
            assignments,
        })
        .await?;
        self.visible("the new partitions", |r| {
            r.get(name).is_ok_and(|t| t.partition_count() == total)
        })
        .await?;
        self.registry.get(name)
    }

    /// Moves a partition to `replicas` (the first is the preferred leader).
    pub async fn reassign(
        &self,
        name: &str,
        partition: u32,
        replicas: Vec<u32>,
    ) -> Result<Arc<Topic>> {
        let topic = self.registry.lookup("name", name)?;
        if partition >= topic.partition_count() {
            return Err(topic.unknown_partition(partition));
        }
        self.cluster
            .propose(Command::Reassign {
                name: name.to_owned(),
                partition,
                replicas: replicas.clone(),
            })
            .await?;
        self.visible("the reassignment", |r| {
            r.get(name).is_ok_and(|t| {
                t.placement
                    .get(partition as usize)
                    .is_some_and(|p| p.replicas == replicas)
            })
        })
        .await?;
        self.registry.get(name)
    }

    /// Lets a partition's records below `before` be deleted by every replica's next retention
    /// round.
    pub async fn delete_records_before(
        &self,
        name: &str,
        partition: u32,
        before: u64,
    ) -> Result<()> {
        let topic = self.registry.lookup("topic", name)?;
        self.cluster
            .propose(Command::DeleteRecords {
                name: name.to_owned(),
                topic_id: topic.meta.id,
                partition,
                before,
            })
            .await
    }

    /// Replaces broker `id`, whose data directory was lost (see `ReplaceBroker` in
    /// cluster.proto); returns the partitions whose replica on it is rebuilt.
    pub async fn replace_broker(&self, id: u32) -> Result<Vec<String>> {
        let c = &self.cluster;
        let state = c.state();
        if !state.brokers.contains_key(&id) {
            return Err(BrokerError::invalid(
                "broker_id",
                format!("broker {id} is not a member of the cluster"),
            ));
        }
        let voters = c.metadata_voters();
        if voters.len() == 1 && voters.contains(&id) {
            return Err(BrokerError::invalid(
                "broker_id",
                format!(
                    "broker {id} is the only voter of the cluster metadata: with its directory lost, start it as a new cluster"
                ),
            ));
        }
        c.propose(Command::ReplaceBroker {
            id,
            metadata_voter: voters.contains(&id),
        })
        .await?;
        let mut partitions = Vec::new();
        for t in state.topics.values() {
            for (p, pm) in t.partitions.iter().enumerate() {
                if pm.replicas.contains(&id) {
                    partitions.push(format!("{}/{p}", t.meta.name));
                }
            }
        }
        tracing::warn!(
            broker = id,
            ?partitions,
            "replacing a broker whose data directory was lost"
        );
        Ok(partitions)
    }

    /// Marks broker `id` as leaving and moves each of its replicas to the least loaded other
    /// broker (keeping the rest of each replica set and its order).
    pub async fn decommission(&self, id: u32) -> Result<Vec<String>> {
        let c = &self.cluster;
        if !c.state().brokers.contains_key(&id) {
            return Err(BrokerError::invalid(
                "broker_id",
                format!("broker {id} is not a member of the cluster"),
            ));
        }
        c.propose(Command::Decommission { id }).await?;
        let mut moved = Vec::new();
        let state = c.state();
        let mut load = load_of(&state);
        for t in state.topics.values() {
            for (p, pm) in t.partitions.iter().enumerate() {
                if !pm.replicas.contains(&id) {
                    continue;
                }
                let Some(to) = state
                    .placeable_brokers()
                    .into_iter()
                    .filter(|b| !pm.replicas.contains(b))
                    .min_by_key(|b| (load.get(b).map_or(0, |l| l.1), *b))
                else {
                    return Err(BrokerError::invalid(
                        "broker_id",
                        format!(
                            "no other broker can take {}/{p}'s replica (replication factor {} needs that many brokers)",
                            t.meta.name,
                            pm.replicas.len()
                        ),
                    ));
                };
                load.entry(to).or_default().1 += 1;
                let replicas: Vec<u32> = pm
                    .replicas
                    .iter()
                    .map(|b| if *b == id { to } else { *b })
                    .collect();
                c.propose(Command::Reassign {
                    name: t.meta.name.clone(),
                    partition: p as u32,
                    replicas,
                })
                .await?;
                moved.push(format!("{}/{p}", t.meta.name));
            }
        }
        Ok(moved)
    }
}

/// The coordinator's view of this broker: its topic table and the metadata operations on the
/// offsets topic.
impl OffsetsHost for Shared {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn broker(&self) -> (u32, String) {
        (self.id, self.advertise.clone())
    }

    fn peer_address(&self, id: u32) -> Option<String> {
        BrokerState::peer_address(self, id)
    }

    /// With the default replication factor.
    fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        config: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Arc<Topic>>> + Send {
        BrokerState::create_topic(self, name, partitions, 0, config)
    }

    fn delete_records_before(
        &self,
        name: &str,
        partition: u32,
        before: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        BrokerState::delete_records_before(self, name, partition, before)
    }
}

pub type Shared = Arc<BrokerState>;
