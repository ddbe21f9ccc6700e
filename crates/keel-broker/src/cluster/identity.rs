//! Storage identity duties (see `keel_raft::identity` for why they exist): keeping the Raft
//! transport's view of the cluster id and the peers' storage ids in step with the metadata,
//! recording the cluster id in the data directory, naming a new cluster, registering this
//! directory's storage id, and, on the metadata leader, taking replaced brokers out of the
//! metadata group's voters and promoting them again once they caught up.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError};

use std::time::Duration;

use super::ClusterNode;
use super::forward::ForwardRequest;
use super::meta::{Command, META_GROUP};
use crate::error::BrokerError;
use crate::storage_identity;

impl ClusterNode {
    /// This broker's part, every tick. Returns whether this directory is registered.
    pub(super) async fn identity_pass(self: &Arc<Self>) -> bool {
        let state = self.state();
        let meta = self.meta_raft.status();
        metrics::gauge!("keel_metadata_voters").set(meta.voters.len() as f64);
        // How far this broker's copy of the metadata log goes and what it applied: equal on
        // every broker once the metadata is replicated (the fault run compares the copies then).
        metrics::gauge!("keel_metadata_last_log_index")
            .set(meta.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("keel_metadata_applied_index")
            .set(meta.last_applied.map_or(0, |p| p.index) as f64);
        let identity = self.transport.identity();
        identity.set_peers(
            state
                .brokers
                .values()
                .filter(|b| b.id != self.id && !b.storage_id.is_empty())
                .map(|b| (u64::from(b.id), b.storage_id.clone()))
                .collect::<HashMap<_, _>>(),
        );
        if !state.cluster_id.is_empty() {
            self.record_cluster(&state.cluster_id).await;
        }
        let mine = self.storage_id();
        let registered = state
            .brokers
            .get(&self.id)
            .is_some_and(|b| b.storage_id == mine && !b.replacing);
        if !registered {
            self.register_storage(mine);
        }
        registered
    }

    /// Runs this broker's part from the start, before the periodic duties (which begin once
    /// the broker is ready): a broker whose directory is refused stops at once rather than
    /// after the readiness wait. Ends once the directory is registered or the broker stops.
    pub(super) async fn register_at_start(self: Arc<Self>) {
        loop {
            if self.identity_pass().await || self.fatal.borrow().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn storage_id(&self) -> String {
        self.storage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .storage_id
            .clone()
    }

    /// Writes the cluster id into the data directory the first time it is learned; a
    /// directory of another cluster stops the broker.
    async fn record_cluster(&self, cluster_id: &str) {
        // One writer at a time: the start-up registration and the periodic duties both get
        // here, and two concurrent rewrites of the file race on its temporary file.
        let _one_writer = self.identity_io.lock().await;
        let mut storage = self
            .storage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if storage.cluster_id == cluster_id {
            return;
        }
        let (fs, dir, id) = (
            Arc::clone(&self.fs),
            self.data_dir.clone(),
            cluster_id.to_owned(),
        );
        let recorded = super::blocking(move || {
            storage_identity::record_cluster(&fs, &dir, &mut storage, &id).map(|()| storage)
        })
        .await;
        match recorded {
            Ok(storage) => {
                tracing::info!(cluster_id, "recorded the cluster id in the data directory");
                self.transport.identity().set_cluster_id(cluster_id);
                *self.storage.lock().unwrap_or_else(PoisonError::into_inner) = storage;
            }
            // A directory of another cluster: stop. A failed write is retried next time.
            Err(e @ BrokerError::InvalidArgument { .. }) => self.stop_for(e.to_string()),
            Err(e) => {
                tracing::error!(error = %e, "could not record the cluster id in the data directory; retrying");
            }
        }
    }

    /// Proposes this directory's storage id (one attempt at a time). Refused because another
    /// directory is registered for this broker, the broker stops: it must not take part
    /// until an operator replaced it.
    fn register_storage(self: &Arc<Self>, storage_id: String) {
        let mut registering = self
            .registering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if registering.as_ref().is_some_and(|t| !t.is_finished()) || self.fatal.borrow().is_some() {
            return;
        }
        let node = Arc::clone(self);
        *registering = Some(tokio::spawn(async move {
            let cmd = Command::RegisterStorage {
                id: node.id,
                storage_id,
            };
            // A broker that does not know the metadata (a wiped directory) asks its seeds; a
            // broker alone waits for its own metadata.
            let known = node.state().brokers.contains_key(&node.id);
            if !known && node.seeds.is_empty() {
                return;
            }
            let result = if known {
                node.propose(cmd).await
            } else {
                let mut last = Ok(());
                for via in &node.seeds {
                    last = node.propose_via(via, cmd.clone()).await;
                    if !matches!(last, Err(BrokerError::Unavailable { .. })) {
                        break;
                    }
                }
                last
            };
            match result {
                Ok(()) => tracing::info!("registered this data directory's storage id"),
                Err(BrokerError::InvalidArgument {
                    field: "storage_id",
                    message,
                }) => node.stop_for(message),
                Err(e) => {
                    tracing::info!(error = %e, "registering this data directory's storage id; retrying");
                }
            }
        }));
    }

    /// At start, for a directory that belongs to a cluster: asks the seeds (`--initial-cluster`,
    /// `--join`) whether they are of the same cluster. When a majority of the cluster's brokers
    /// refuse this one as foreign, its directory is of another cluster and the broker stops.
    /// Fewer refusals stop nothing: one foreign seed must not stop a healthy broker (and the
    /// refusals keep a foreign broker out either way).
    pub(super) async fn probe_seeds(self: Arc<Self>) {
        let ours = self
            .storage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cluster_id
            .clone();
        if ours.is_empty() || self.seeds.is_empty() {
            return;
        }
        let Ok(probe) = serde_json::to_vec(&ForwardRequest::Liveness) else {
            return;
        };
        // A majority of the cluster's brokers: the seeds and this one.
        let majority = self.seeds.len().div_ceil(2) + 1;
        for _ in 0..30 {
            let mut refused = Vec::new();
            for via in &self.seeds {
                let reply = self
                    .transport
                    .forward(
                        via,
                        0,
                        META_GROUP,
                        bytes::Bytes::from(probe.clone()),
                        Duration::from_secs(2),
                    )
                    .await;
                match reply {
                    Err(status)
                        if status
                            .message()
                            .starts_with("storage identity: message from cluster") =>
                    {
                        refused.push(status.message().to_owned());
                    }
                    // Another node id at this address answers FAILED_PRECONDITION too: it is
                    // of this cluster, which is all the probe asks.
                    Ok(_) => return,
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => return,
                    Err(_) => {}
                }
            }
            if refused.len() >= majority {
                self.stop_for(format!(
                    "this broker's data directory {} belongs to cluster {ours}, but the brokers it was told to join belong to another ({}); start it with the data directory of this cluster, or an empty one to join as a new broker",
                    self.data_dir.display(),
                    refused.first().map_or("", String::as_str)
                ));
                return;
            }
            // Not decided yet (seeds still starting): ask again.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Stops the broker for good with `why` (it exits, saying so).
    fn stop_for(&self, why: String) {
        tracing::error!("{why}");
        self.fatal.send_replace(Some(why));
    }

    /// The metadata leader's part: name a new cluster, take replaced brokers out of the
    /// metadata group's voters, and promote brokers that should be voters once caught up.
    pub(super) async fn metadata_identity_pass(&self) {
        let s = self.meta_raft.status();
        if !s.is_leader() {
            return;
        }
        let state = self.state();
        if state.cluster_id.is_empty() {
            match storage_identity::random_id() {
                Ok(cluster_id) => {
                    if let Err(e) = self.propose(Command::SetClusterId { cluster_id }).await {
                        tracing::debug!(error = %e, "naming the cluster failed; retrying");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot name the cluster"),
            }
        }
        let voters: BTreeSet<u64> = s.voters.clone();
        let replaced: BTreeSet<u64> = state
            .brokers
            .values()
            .filter(|b| b.replacing)
            .map(|b| u64::from(b.id))
            .filter(|id| voters.contains(id))
            .collect();
        if !replaced.is_empty() {
            let keep: BTreeSet<u64> = voters.difference(&replaced).copied().collect();
            if keep.is_empty() {
                return;
            }
            tracing::warn!(removed = ?replaced, "taking replaced brokers out of the metadata group's voters");
            if let Err(e) = self.meta_raft.change_voters(keep).await {
                tracing::warn!(error = %e, "removing replaced metadata voters failed");
            }
            return;
        }
        // Out of the (committed) voters: the new directory may register.
        for b in state
            .brokers
            .values()
            .filter(|b| b.leaving_metadata_voters && !s.committed_voters.contains(&u64::from(b.id)))
        {
            if let Err(e) = self
                .propose(Command::MetadataVoterRemoved { id: b.id })
                .await
            {
                tracing::debug!(error = %e, "recording a removed metadata voter failed; retrying");
            }
        }
        let committed = s.committed.unwrap_or(0);
        let promote: BTreeSet<u64> = state
            .brokers
            .values()
            .filter(|b| b.metadata_voter && !b.replacing)
            .map(|b| u64::from(b.id))
            .filter(|id| {
                s.learners.contains(id)
                    && s.matched
                        .get(id)
                        .copied()
                        .flatten()
                        .is_some_and(|m| m >= committed)
            })
            .collect();
        if !promote.is_empty() {
            tracing::info!(promoted = ?promote, "a replaced broker caught up: a metadata voter again");
            let all: BTreeSet<u64> = voters.union(&promote).copied().collect();
            if let Err(e) = self.meta_raft.change_voters(all).await {
                tracing::warn!(error = %e, "promoting a metadata learner failed");
            }
        }
    }
}
