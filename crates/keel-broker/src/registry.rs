//! Topics and their partitions on this broker, kept in step with the persisted metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use keel_types::validate_topic_name;
use tokio::sync::Mutex;

use crate::error::{BrokerError, Result};
use crate::metadata::{self, ClusterMeta, TopicMeta};
use crate::partition::Partition;
use crate::topic_config::{Resolved, TopicConfig};

/// Upper bound on partitions per topic.
pub const MAX_PARTITIONS: u32 = 10_000;

#[derive(Debug)]
pub struct Topic {
    pub meta: TopicMeta,
    pub config: Resolved,
    /// This broker's replica of each partition (`None`: hosted elsewhere).
    pub partitions: Vec<Option<Arc<Partition>>>,
    /// Where each partition lives, as the cluster metadata says.
    pub placement: Vec<Placement>,
    /// The partition keyless records without an explicit partition go to.
    sticky: AtomicU32,
}

/// A partition's replicas and its last reported leader.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub replicas: Vec<u32>,
    pub leader: Option<(u32, String)>,
    pub in_sync: Vec<u32>,
}

impl Topic {
    pub fn new(
        meta: TopicMeta,
        config: Resolved,
        partitions: Vec<Option<Arc<Partition>>>,
        placement: Vec<Placement>,
    ) -> Self {
        Self {
            meta,
            config,
            partitions,
            placement,
            sticky: AtomicU32::new(0),
        }
    }

    /// A single-node broker's topic: every partition is local and led here.
    fn local(meta: TopicMeta, config: Resolved, partitions: Vec<Arc<Partition>>, id: u32) -> Self {
        let placement = partitions
            .iter()
            .map(|_| Placement {
                replicas: vec![id],
                leader: None,
                in_sync: vec![id],
            })
            .collect();
        Self::new(
            meta,
            config,
            partitions.into_iter().map(Some).collect(),
            placement,
        )
    }

    pub fn partition_count(&self) -> u32 {
        self.placement.len() as u32
    }

    /// This broker's replica of partition `id`, if it may serve produce and fetch requests
    /// for it (it leads it); NOT_LEADER with the best known leader otherwise.
    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>> {
        let Some(slot) = self.partitions.get(id as usize) else {
            return Err(BrokerError::UnknownPartition {
                topic: self.meta.name.clone(),
                partition: id,
                count: self.partition_count(),
            });
        };
        let hint = self
            .placement
            .get(id as usize)
            .and_then(|p| p.leader.clone());
        match slot {
            Some(p) => {
                p.ensure_leader(hint)?;
                Ok(p)
            }
            None => Err(BrokerError::NotLeader {
                topic: self.meta.name.clone(),
                partition: id,
                leader: hint,
            }),
        }
    }

    /// This broker's replicas of the topic's partitions.
    pub fn local_partitions(&self) -> impl Iterator<Item = &Arc<Partition>> {
        self.partitions.iter().flatten()
    }

    /// The sticky partition for keyless records; moves on after each batch that used it.
    pub fn next_sticky(&self) -> u32 {
        let n = self.partition_count().max(1);
        self.sticky.fetch_add(1, Ordering::Relaxed) % n
    }
}

/// Checks a new topic's name.
pub fn validate_create_name(name: &str) -> Result<()> {
    validate_topic_name(name).map_err(|e| BrokerError::invalid("name", e.to_string()))
}

/// A new topic's partition count: 0 means 1, at most [`MAX_PARTITIONS`].
pub fn create_partitions(partitions: u32) -> Result<u32> {
    let partitions = partitions.max(1);
    if partitions > MAX_PARTITIONS {
        return Err(BrokerError::invalid(
            "partitions",
            format!("{partitions} exceeds the limit of {MAX_PARTITIONS}"),
        ));
    }
    Ok(partitions)
}

/// A new topic's replication factor: 0 means as many brokers as there are, at most 3; never
/// more than there are brokers.
pub fn create_replication_factor(requested: u32, live_brokers: u32) -> Result<u32> {
    let rf = if requested == 0 {
        live_brokers.clamp(1, 3)
    } else {
        requested
    };
    if rf > live_brokers {
        return Err(BrokerError::invalid(
            "replication_factor",
            format!("{rf} exceeds the number of live brokers ({live_brokers})"),
        ));
    }
    Ok(rf)
}

/// The topics of this broker.
#[derive(Debug)]
pub struct Registry {
    data_dir: PathBuf,
    broker_id: u32,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises metadata changes and their persistence.
    meta: Mutex<ClusterMeta>,
    /// The producers' current epochs (a copy of `meta.producers.epochs` readable without
    /// waiting), for fencing on the produce path.
    producer_epochs: std::sync::RwLock<BTreeMap<i64, i16>>,
}

fn topics_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("topics")
}

fn open_partitions(
    data_dir: &Path,
    meta: &TopicMeta,
    cfg: &Resolved,
    from: u32,
) -> Result<Vec<Arc<Partition>>> {
    let dir = topics_dir(data_dir).join(meta.dir_name());
    let name: Arc<str> = Arc::from(meta.name.as_str());
    (from..meta.partitions)
        .map(|p| Partition::open(&dir.join(p.to_string()), Arc::clone(&name), p, cfg).map(Arc::new))
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
}

impl Registry {
    /// Loads the metadata and opens (recovering) every partition.
    pub fn open(data_dir: &Path, broker_id: u32) -> Result<Self> {
        std::fs::create_dir_all(topics_dir(data_dir)).map_err(|e| BrokerError::Storage {
            message: format!("creating {}: {e}", data_dir.display()),
            definite: true,
        })?;
        let meta = metadata::load(data_dir, broker_id)?;
        metadata::store(data_dir, &meta)?;
        let mut topics = HashMap::new();
        for tm in meta.topics.values() {
            let config = tm.config.resolve()?;
            let partitions = open_partitions(data_dir, tm, &config, 0)?;
            topics.insert(
                tm.name.clone(),
                Arc::new(Topic::local(tm.clone(), config, partitions, broker_id)),
            );
        }
        tracing::info!(topics = topics.len(), "opened topics");
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            broker_id,
            topics: RwLock::new(topics),
            producer_epochs: std::sync::RwLock::new(meta.producers.epochs.clone()),
            meta: Mutex::new(meta),
        })
    }

    pub fn get(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))
    }

    /// Looks a topic up after checking the name's syntax (so bad names get INVALID_ARGUMENT
    /// naming the request `field`).
    pub fn lookup(&self, field: &'static str, name: &str) -> Result<Arc<Topic>> {
        validate_topic_name(name).map_err(|e| BrokerError::invalid(field, e.to_string()))?;
        self.get(name)
    }

    pub fn list(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<Arc<Topic>> = self
            .topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        v
    }

    fn install(&self, topic: Topic) -> Arc<Topic> {
        let t = Arc::new(topic);
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(t.meta.name.clone(), Arc::clone(&t));
        t
    }

    /// Hands out a producer id and epoch (a single-node broker's own metadata; see
    /// [`crate::metadata::ProducerIds::init`]), persisted before it is answered.
    pub async fn init_producer(
        &self,
        request_id: u64,
        instance: Option<&str>,
        bump: Option<(i64, i16)>,
    ) -> Result<(i64, i16)> {
        let mut meta = self.meta.lock().await;
        let mut next = meta.clone();
        let grant = next
            .producers
            .init(request_id, instance, bump)
            .map_err(|e| match e {
                crate::metadata::InitRefusal::UnknownProducer(id) => BrokerError::invalid(
                    "producer_id",
                    format!("producer id {id} was never handed out"),
                ),
                crate::metadata::InitRefusal::Fenced {
                    producer_id,
                    epoch,
                    current,
                } => BrokerError::ProducerFenced {
                    producer_id,
                    epoch,
                    current,
                },
            })?;
        let data_dir = self.data_dir.clone();
        let stored = next.clone();
        blocking(move || metadata::store(&data_dir, &stored)).await?;
        *self
            .producer_epochs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next.producers.epochs.clone();
        *meta = next;
        Ok(grant)
    }

    /// The current epoch of a producer id that has one recorded (see [`Registry::init_producer`]).
    pub fn producer_epoch(&self, producer_id: i64) -> Option<i16> {
        self.producer_epochs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&producer_id)
            .copied()
    }

    pub async fn create(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        config: &BTreeMap<String, String>,
        live_brokers: u32,
    ) -> Result<Arc<Topic>> {
        validate_create_name(name)?;
        let partitions = create_partitions(partitions)?;
        let rf = create_replication_factor(replication_factor, live_brokers)?;
        let topic_config = TopicConfig::new(config)?;
        let resolved = topic_config.resolve()?;
        let mut meta = self.meta.lock().await;
        if meta.topics.contains_key(name) {
            return Err(BrokerError::TopicExists(name.to_owned()));
        }
        let tm = TopicMeta {
            name: name.to_owned(),
            id: meta.next_topic_id,
            partitions,
            replication_factor: rf,
            config: topic_config,
        };
        let mut next = meta.clone();
        next.next_topic_id += 1;
        next.topics.insert(name.to_owned(), tm.clone());
        let data_dir = self.data_dir.clone();
        let (parts, next) = blocking(move || {
            let parts = open_partitions(&data_dir, &tm, &resolved, 0)?;
            metadata::store(&data_dir, &next)?;
            Ok((parts, next))
        })
        .await?;
        *meta = next;
        let tm = meta
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::Internal("topic vanished".into()))?;
        tracing::info!(topic = name, partitions, "created topic");
        Ok(self.install(Topic::local(tm, resolved, parts, self.broker_id)))
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        validate_topic_name(name).map_err(|e| BrokerError::invalid("name", e.to_string()))?;
        let mut meta = self.meta.lock().await;
        let Some(tm) = meta.topics.get(name).cloned() else {
            return Err(BrokerError::UnknownTopic(name.to_owned()));
        };
        let mut next = meta.clone();
        next.topics.remove(name);
        let data_dir = self.data_dir.clone();
        let stored = next.clone();
        blocking(move || metadata::store(&data_dir, &stored)).await?;
        *meta = next;
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        // Readers still holding the partitions keep their mappings; the files go now.
        let dir = topics_dir(&self.data_dir).join(tm.dir_name());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a deleted topic's files");
            }
        });
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    pub async fn alter_config(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Arc<Topic>> {
        validate_topic_name(name).map_err(|e| BrokerError::invalid("name", e.to_string()))?;
        let mut meta = self.meta.lock().await;
        let Some(tm) = meta.topics.get(name).cloned() else {
            return Err(BrokerError::UnknownTopic(name.to_owned()));
        };
        let config = tm.config.with_changes(set, remove)?;
        let resolved = config.resolve()?;
        let mut next = meta.clone();
        let new_tm = TopicMeta { config, ..tm };
        next.topics.insert(name.to_owned(), new_tm.clone());
        let data_dir = self.data_dir.clone();
        let stored = next.clone();
        blocking(move || metadata::store(&data_dir, &stored)).await?;
        *meta = next;
        let old = self.get(name)?;
        for p in old.local_partitions() {
            p.apply_config(&resolved)?;
        }
        Ok(self.install(Topic::new(
            new_tm,
            resolved,
            old.partitions.clone(),
            old.placement.clone(),
        )))
    }

    pub async fn add_partitions(&self, name: &str, total: u32) -> Result<Arc<Topic>> {
        validate_topic_name(name).map_err(|e| BrokerError::invalid("name", e.to_string()))?;
        let mut meta = self.meta.lock().await;
        let Some(tm) = meta.topics.get(name).cloned() else {
            return Err(BrokerError::UnknownTopic(name.to_owned()));
        };
        if total <= tm.partitions {
            return Err(BrokerError::invalid(
                "partitions",
                format!(
                    "the topic has {} partitions; the new count {total} must be larger",
                    tm.partitions
                ),
            ));
        }
        if total > MAX_PARTITIONS {
            return Err(BrokerError::invalid(
                "partitions",
                format!("{total} exceeds the limit of {MAX_PARTITIONS}"),
            ));
        }
        let old = self.get(name)?;
        let from = tm.partitions;
        let new_tm = TopicMeta {
            partitions: total,
            ..tm
        };
        let mut next = meta.clone();
        next.topics.insert(name.to_owned(), new_tm.clone());
        let data_dir = self.data_dir.clone();
        let resolved = old.config;
        let (added, next) = {
            let tm = new_tm.clone();
            blocking(move || {
                let added = open_partitions(&data_dir, &tm, &resolved, from)?;
                metadata::store(&data_dir, &next)?;
                Ok((added, next))
            })
            .await?
        };
        *meta = next;
        let mut partitions: Vec<Arc<Partition>> = old.local_partitions().cloned().collect();
        partitions.extend(added);
        Ok(self.install(Topic::local(new_tm, old.config, partitions, self.broker_id)))
    }

    /// Every partition of every topic.
    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.list()
            .iter()
            .flat_map(|t| t.local_partitions().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Replaces the whole topic table (a clustered broker, from the metadata state).
    pub fn replace_all(&self, topics: HashMap<String, Arc<Topic>>) {
        *self
            .topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = topics;
    }
}
