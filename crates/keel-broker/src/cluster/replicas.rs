//! Reconciling this broker's partition replicas with the applied metadata: starting a Raft
//! replica for each partition assigned here, stopping (and deleting) those moved away,
//! restarting those whose Raft core stopped on a storage error, and publishing the topic table.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use keel_log::SystemClock;
use keel_raft::{GroupSm, KeelLogStore, PartitionSm, Replica};
use tokio::sync::watch;

use super::meta::{self, ClusterState, partition_group};
use super::quiet::Activity;
use super::{ClusterNode, Hosted, blocking, leader_pass, raft_err, storage_err};
use crate::error::Result;
use crate::partition::{Partition, RaftReplica};
use crate::registry::{Placement, Registry, Topic};

/// The least time between two restarts of one replica whose Raft core keeps stopping.
const RESTART_BACKOFF: Duration = Duration::from_secs(3);

impl ClusterNode {
    /// Starts (or keeps) a Raft replica for every partition assigned here, stops the others,
    /// and publishes the topic table to `registry`.
    pub async fn reconcile(&self, registry: &Registry) -> Result<()> {
        let _guard = self.reconciling.lock().await;
        let state = self.state();
        // Decide under the lock, do the slow work (opening logs, stopping groups) outside it:
        // the beat and leader loops need the lock too, and a broker whose beats stall for a
        // large create or delete would look dead to its peers.
        let (gone, to_start, crashed) = {
            let mut hosted = self.hosted.lock().await;
            let mut wanted: HashMap<u64, (String, u32)> = HashMap::new();
            for t in state.topics.values() {
                for (p, pm) in t.partitions.iter().enumerate() {
                    let group = partition_group(t.meta.id, p as u32);
                    // A replica the metadata moved away stays until the leader has removed it
                    // from the group (it reports the new voters without this broker); a
                    // removed voter may never learn its removal from the group itself.
                    let moved_off = pm.leader.is_some_and(|l| l != self.id)
                        && !pm.voters.is_empty()
                        && !pm.voters.contains(&self.id);
                    if pm.replicas.contains(&self.id) || (hosted.contains_key(&group) && !moved_off)
                    {
                        wanted.insert(group, (t.meta.name.clone(), p as u32));
                    }
                }
            }
            let gone: Vec<(u64, Hosted)> = hosted
                .keys()
                .filter(|g| !wanted.contains_key(g))
                .copied()
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|g| hosted.remove(&g).map(|h| (g, h)))
                .collect();
            // A replica whose Raft core stopped (a storage error: the disk filled up, an fsync
            // failed) is stopped and opened again, which cuts a torn tail by CRC and resumes
            // replication once the disk works again.
            let crashed: Vec<(u64, Hosted)> = {
                let mut restarted = self
                    .restarted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let due: Vec<u64> = hosted
                    .iter()
                    .filter(|(g, h)| {
                        wanted.contains_key(*g)
                            && h.partition.raft().raft.failure().is_some()
                            && restarted
                                .get(*g)
                                .is_none_or(|t| t.elapsed() >= RESTART_BACKOFF)
                    })
                    .map(|(g, _)| *g)
                    .collect();
                due.into_iter()
                    .filter_map(|g| {
                        restarted.insert(g, Instant::now());
                        hosted.remove(&g).map(|h| (g, h))
                    })
                    .collect()
            };
            for (g, h) in &crashed {
                tracing::warn!(group = g, topic = %h.partition.topic, partition = h.partition.id, "restarting a partition replica whose Raft core stopped");
            }
            let to_start: Vec<(u64, String, u32)> = wanted
                .into_iter()
                .filter(|(g, _)| !hosted.contains_key(g))
                .map(|(g, (name, p))| (g, name, p))
                .collect();
            (gone, to_start, crashed)
        };
        // Stop replicas no longer wanted (topic deleted or moved away).
        for (g, h) in gone {
            self.stop_replica(g, &h, true).await;
        }
        for (g, h) in crashed {
            self.stop_replica(g, &h, false).await;
        }
        // Start new ones.
        for (group, name, p) in to_start {
            let Some(t) = state.topics.get(&name) else {
                continue;
            };
            match self.start_replica(t, p, &state).await {
                Ok(partition) => {
                    self.hosted.lock().await.insert(
                        group,
                        Hosted {
                            partition,
                            topic_id: t.meta.id,
                            memory: leader_pass::Memory::default(),
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(topic = %name, partition = p, error = %e, "could not start a partition replica");
                }
            }
        }
        let hosted = self.hosted.lock().await;
        // Publish the topic table.
        let mut topics = HashMap::new();
        for t in state.topics.values() {
            let config = match t.meta.config.resolve() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(topic = %t.meta.name, error = %e, "invalid topic config in metadata");
                    continue;
                }
            };
            let mut partitions = Vec::with_capacity(t.partitions.len());
            let mut placement = Vec::with_capacity(t.partitions.len());
            for (p, pm) in t.partitions.iter().enumerate() {
                let group = partition_group(t.meta.id, p as u32);
                let local = hosted.get(&group).map(|h| Arc::clone(&h.partition));
                if let Some(l) = &local
                    && let Err(e) = l.apply_config(&config)
                {
                    tracing::warn!(topic = %t.meta.name, partition = p, error = %e, "could not apply topic config");
                }
                partitions.push(local);
                placement.push(Placement {
                    replicas: pm.replicas.clone(),
                    leader: pm
                        .leader
                        .and_then(|l| state.brokers.get(&l).map(|b| (l, b.address.clone()))),
                    in_sync: pm.in_sync.clone(),
                });
            }
            topics.insert(
                t.meta.name.clone(),
                Arc::new(Topic::new(t.meta.clone(), config, partitions, placement)),
            );
        }
        // Keep the Topic objects of unchanged topics (subscriptions compare partitions by
        // pointer, and they are the same).
        registry.replace_all(topics);
        Ok(())
    }

    fn partition_dir(&self, t: &meta::TopicState, p: u32) -> PathBuf {
        self.data_dir
            .join("topics")
            .join(t.meta.dir_name())
            .join(p.to_string())
    }

    async fn start_replica(
        &self,
        t: &meta::TopicState,
        p: u32,
        state: &ClusterState,
    ) -> Result<Arc<Partition>> {
        let group = partition_group(t.meta.id, p);
        let config = t.meta.config.resolve()?;
        let dir = self.partition_dir(t, p);
        let log_config = config.log_config();
        let sync = config.flush_every_batch();
        let (hwm_tx, _) = watch::channel(0u64);
        let (store, sm) = {
            let (hwm_tx, fs) = (hwm_tx.clone(), Arc::clone(&self.fs));
            blocking(move || {
                let store = KeelLogStore::open_with(&dir, log_config, fs, Arc::new(SystemClock))
                    .map_err(|e| storage_err("opening a partition log", e))?;
                store.set_sync_appends(sync);
                let sm = PartitionSm::open(&store, hwm_tx)
                    .map_err(|e| storage_err("opening a partition state machine", e))?;
                Ok((store, sm))
            })
            .await?
        };
        let raft = Replica::start(
            u64::from(self.id),
            &self.partition_config,
            self.transport.group::<Vec<u8>>(group),
            store.clone(),
            GroupSm::Partition(sm.clone()),
        )
        .await
        .map_err(|e| raft_err("starting a partition group", e))?;
        raft.serve_in(&self.rafts, group);
        let is_init = raft
            .is_initialized()
            .await
            .map_err(|e| raft_err("partition group", e))?;
        // A replica restarted from existing data keeps its ticker off until it knows whether
        // its group's leader declares the group quiet (see `quiet`): otherwise its election
        // timer would depose every idle leader of the groups it shares. The only voter of its
        // group has no leader to hear from: it elects itself on its first tick.
        let wait_for_beats = is_init && !raft.status().sole_voter();
        if wait_for_beats {
            raft.set_ticking(false);
        }
        if !is_init {
            // Every initial replica initialises with the same membership, the one the topic
            // was created with (`initial`, never changed): the entries are identical, so
            // whichever is elected first leads. A replica added later by a reassignment is not
            // in that set and joins as a learner instead; and since a reassignment is refused
            // until the first leader is reported, two disjoint sets never both initialise.
            let initial = t.partitions.get(p as usize).and_then(|pm| {
                let set = if pm.initial.is_empty() {
                    &pm.replicas
                } else {
                    &pm.initial
                };
                (pm.leader.is_none() && set.contains(&self.id)).then(|| set.clone())
            });
            if let Some(set) = initial {
                let members: BTreeMap<u64, String> = set
                    .iter()
                    .filter_map(|r| {
                        state
                            .brokers
                            .get(r)
                            .map(|b| (u64::from(*r), b.peer().to_owned()))
                    })
                    .collect();
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!(topic = %t.meta.name, partition = p, error = %e, "partition group already initialised");
                }
            }
        }
        tracing::info!(topic = %t.meta.name, partition = p, group, "started partition replica");
        Ok(Arc::new(Partition::replicated(
            Arc::from(t.meta.name.as_str()),
            p,
            RaftReplica {
                raft,
                store,
                sm,
                group,
                node_id: u64::from(self.id),
                activity: Arc::new(Activity::new(!wait_for_beats)),
                liveness: Arc::clone(&self.liveness),
                clients: {
                    let metadata = self.metadata.clone();
                    crate::partition::ClientAddresses(Arc::new(move |id| {
                        metadata.state().brokers.get(&id).map(|b| b.address.clone())
                    }))
                },
            },
            hwm_tx,
        )))
    }

    pub(super) async fn stop_replica(&self, group: u64, h: &Hosted, delete_files: bool) {
        let r = h.partition.raft();
        self.rafts.unregister(group);
        if let Err(e) = r.raft.shutdown().await {
            tracing::warn!(group, error = %e, "partition group did not shut down cleanly");
        }
        let store = r.store.clone();
        let dir = store.dir().to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.checkpoint() {
                tracing::warn!(error = %e, "final checkpoint failed");
            }
            if delete_files && let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a replica's files");
            }
        })
        .await;
        tracing::info!(topic = %h.partition.topic, partition = h.partition.id, "stopped partition replica");
    }

    /// Whether a hosted replica's Raft core has stopped (see `reconcile`).
    pub(super) async fn has_stopped_replica(&self) -> bool {
        self.hosted
            .lock()
            .await
            .values()
            .any(|h| h.partition.raft().raft.failure().is_some())
    }
}
