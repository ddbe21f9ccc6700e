//! Starting this broker's node: opening the metadata group, initialising it (a new cluster, or
//! a cluster of one), joining a running cluster, and adopting a single-node data directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_log::fs::Fs;
use keel_log::{LogConfig, SystemClock};
use keel_raft::{
    GroupConfig, GroupSm, Identity, KeelLogStore, MetaSm, RaftTransport, Replica, TransportConfig,
};
use tokio::sync::watch;

use super::forward::{ForwardReply, ForwardRequest, PROPOSE_TIMEOUT};
use super::meta::{self, Command, META_GROUP};
use super::meta_machine::MetadataMachine;
use super::quiet::Liveness;
use super::{ClusterNode, blocking, raft_err, storage_err};
use crate::error::{BrokerError, Result};
use crate::metadata::ClusterMeta;
use crate::storage_identity::StorageIdentity;

fn config_err(e: keel_raft::ReplicaError) -> BrokerError {
    BrokerError::Internal(e.to_string())
}

impl ClusterNode {
    /// Opens the metadata group's storage and starts its Raft node. With `initial_cluster`,
    /// the broker with the lowest id initialises the group over all of them (once); with
    /// neither `initial_cluster` nor `join`, the broker is a cluster of one. `storage` is the
    /// data directory's identity, stamped on and checked against every Raft message.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        id: u32,
        advertise: String,
        data_dir: &Path,
        initial_cluster: &[(u32, String)],
        join: Option<&str>,
        local_address: Option<std::net::IpAddr>,
        fs: Arc<dyn Fs>,
        storage: StorageIdentity,
    ) -> Result<Arc<Self>> {
        let identity = Identity::new(&storage.storage_id, &storage.cluster_id);
        let transport = RaftTransport::with_identity(
            u64::from(id),
            TransportConfig {
                local_address,
                ..TransportConfig::default()
            },
            identity.clone(),
        );
        let rafts = keel_raft::Registry::new(u64::from(id));
        rafts.set_identity(identity);
        let metadata = MetadataMachine::default();
        let (meta_store, meta_sm) = {
            let (dir, fs, machine) = (data_dir.join("metadata"), Arc::clone(&fs), metadata.clone());
            blocking(move || {
                let store = KeelLogStore::open_with(
                    &dir,
                    LogConfig {
                        segment_bytes: 16 << 20,
                        ..LogConfig::default()
                    },
                    Arc::clone(&fs),
                    Arc::new(SystemClock),
                )
                .map_err(|e| storage_err("opening the metadata log", e))?;
                let sm = MetaSm::open(&dir, fs, Arc::new(machine))
                    .map_err(|e| storage_err("opening the metadata snapshot", e))?;
                Ok((store, sm))
            })
            .await?
        };
        let meta_raft = Replica::start(
            u64::from(id),
            &GroupConfig::metadata().map_err(config_err)?,
            transport.group::<Vec<u8>>(META_GROUP),
            meta_store.clone(),
            GroupSm::Meta(meta_sm),
        )
        .await
        .map_err(|e| raft_err("starting the metadata group", e))?;
        meta_raft.serve_in(&rafts, META_GROUP);

        // Peers reach this broker at its --initial-cluster entry when it has one (which may be a
        // name only the brokers' network resolves), clients at its advertised address.
        let peer_address = initial_cluster
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| advertise.clone(), |(_, a)| a.clone());
        // Where to reach the cluster before the metadata says who leads it.
        let seeds = initial_cluster
            .iter()
            .filter(|(i, _)| *i != id)
            .map(|(_, a)| a.clone())
            .chain(join.map(str::to_owned))
            .collect();
        let node = Arc::new(Self {
            id,
            peer_address,
            advertise,
            data_dir: data_dir.to_path_buf(),
            fs,
            seeds,
            storage: Mutex::new(storage),
            registering: Mutex::new(None),
            identity_io: tokio::sync::Mutex::new(()),
            transport,
            rafts,
            meta_raft,
            metadata,
            meta_store,
            partition_config: GroupConfig::partition().map_err(config_err)?,
            hosted: tokio::sync::Mutex::new(HashMap::new()),
            fatal: watch::channel(None).0,
            reconciling: tokio::sync::Mutex::new(()),
            restarted: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
            liveness: Arc::new(Liveness::default()),
            reporting: tokio::sync::Mutex::new(()),
        });
        {
            let weak = Arc::downgrade(&node);
            node.rafts
                .set_forward_handler(Arc::new(move |group, payload| {
                    let weak = weak.clone();
                    Box::pin(async move {
                        let Some(node) = weak.upgrade() else {
                            return Err(tonic::Status::unavailable("broker is stopping"));
                        };
                        node.handle_forward(group, payload).await
                    })
                }));
        }
        {
            let (failed, fatal) = (node.meta_raft.failed(), node.fatal.clone());
            tokio::spawn(async move {
                if let Some(why) = failed.await {
                    tracing::error!(error = %why, "the metadata group's Raft core stopped on a failure");
                    fatal.send_replace(Some(format!(
                        "the metadata group stopped: {why}; exiting so that a restart recovers from disk"
                    )));
                }
            });
        }
        tokio::spawn(Arc::clone(&node).probe_seeds());
        tokio::spawn(Arc::clone(&node).register_at_start());
        node.initialise_metadata(initial_cluster, join.is_some())
            .await?;
        Ok(node)
    }

    /// Initialises the metadata group once: over `initial_cluster` on its lowest id, or as a
    /// cluster of one (a broker started with `--join` is added by the cluster instead).
    async fn initialise_metadata(
        &self,
        initial_cluster: &[(u32, String)],
        joining: bool,
    ) -> Result<()> {
        let members: BTreeMap<u64, String> = match initial_cluster.iter().map(|(i, _)| *i).min() {
            Some(lowest) if lowest == self.id => initial_cluster
                .iter()
                .map(|(i, a)| (u64::from(*i), a.clone()))
                .collect(),
            None if !joining => BTreeMap::from([(u64::from(self.id), self.peer_address.clone())]),
            _ => return Ok(()),
        };
        if self
            .meta_raft
            .is_initialized()
            .await
            .map_err(|e| raft_err("metadata group", e))?
        {
            return Ok(());
        }
        if members.len() > 1
            && let Some(existing) = self.existing_cluster().await
        {
            // A data directory wiped (or new) while the cluster runs: initialising would start
            // a second metadata group beside the real one.
            tracing::warn!(cluster_id = %existing, "the other brokers already form a cluster: not initialising a new one");
            return Ok(());
        }
        tracing::info!(?members, "initialising the metadata group");
        if let Err(e) = self.meta_raft.initialize(members).await {
            tracing::warn!(error = %e, "metadata group initialisation refused");
        }
        Ok(())
    }

    /// The id of the cluster the seeds already belong to, if one answers with one.
    async fn existing_cluster(&self) -> Option<String> {
        let probe = serde_json::to_vec(&ForwardRequest::ClusterId).ok()?;
        for via in &self.seeds {
            // Target 0 is "whoever answers": its first answer names its id.
            let mut target = 0u64;
            for _ in 0..2 {
                let reply = self
                    .transport
                    .forward(
                        via,
                        target,
                        META_GROUP,
                        Bytes::from(probe.clone()),
                        Duration::from_secs(2),
                    )
                    .await;
                match reply.map(|b| serde_json::from_slice::<ForwardReply>(&b)) {
                    Ok(Ok(ForwardReply::ClusterId(id))) if !id.is_empty() => return Some(id),
                    Err(status) => match answering_node(&status) {
                        Some(id) => target = id,
                        None => break,
                    },
                    _ => break,
                }
            }
        }
        None
    }

    /// Asks a known broker (`--join`) to register this one; the metadata leader then adds it
    /// to the metadata group as a learner.
    pub async fn join(&self, via: &str) -> Result<()> {
        self.propose_via(
            via,
            Command::RegisterBroker {
                id: self.id,
                address: self.advertise.clone(),
                peer_address: self.peer_address.clone(),
            },
        )
        .await
    }

    /// Proposes `cmd` through the broker at `via`, following its leader hints: for a broker
    /// that does not know the metadata (yet) and so cannot tell who leads.
    pub(super) async fn propose_via(&self, via: &str, cmd: Command) -> Result<()> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let req = ForwardRequest::Propose(Box::new(cmd));
        let payload = Bytes::from(
            serde_json::to_vec(&req).map_err(|e| BrokerError::Internal(e.to_string()))?,
        );
        let mut addr = via.to_owned();
        let mut target = 0u64;
        loop {
            // Target 0 is "whoever answers at this address": ask for its id first.
            let reply = self
                .transport
                .forward(
                    &addr,
                    target,
                    META_GROUP,
                    payload.clone(),
                    Duration::from_secs(5),
                )
                .await;
            match reply.map(|b| serde_json::from_slice::<ForwardReply>(&b)) {
                Ok(Ok(ForwardReply::Outcome(r))) => return r.map(drop).map_err(BrokerError::from),
                Ok(Ok(ForwardReply::NotLeader(Some(l)))) => {
                    let s = self.state();
                    if let Some(b) = s.brokers.get(&(l as u32)) {
                        b.peer().clone_into(&mut addr);
                    }
                    target = l;
                }
                other => {
                    if let Err(status) = &other
                        && let Some(id) = answering_node(status)
                    {
                        target = id;
                        continue;
                    }
                    tracing::debug!(?other, "join attempt failed");
                    if Instant::now() > deadline {
                        return Err(BrokerError::Unavailable {
                            message: format!("could not join the cluster through {via}"),
                            definite: true,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Steps 2 and 3 of converting a single-node data directory (see `legacy`): installs its
    /// catalogue in the metadata group, then marks the conversion done.
    pub async fn adopt_legacy(&self, catalogue: ClusterMeta, data_dir: &Path) -> Result<()> {
        self.propose(Command::AdoptSingleNode {
            broker: meta::BrokerMeta {
                id: self.id,
                address: self.advertise.clone(),
                peer_address: self.peer_address.clone(),
                ..meta::BrokerMeta::default()
            },
            catalogue,
        })
        .await?;
        let dir = data_dir.to_path_buf();
        blocking(move || crate::legacy::finish(&dir)).await
    }
}

/// The node id a broker answered with when a forwarded request named the wrong one (target 0
/// means "whoever answers at this address"): the Raft service's FAILED_PRECONDITION
/// "forwarded request for node X reached node Y" ends with Y.
fn answering_node(status: &tonic::Status) -> Option<u64> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    status.message().rsplit(' ').next()?.parse().ok()
}
