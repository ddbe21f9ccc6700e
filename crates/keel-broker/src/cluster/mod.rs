//! A broker as a member of a cluster: the metadata Raft group, one Raft group per hosted
//! partition replica, and the loops that keep them in step. A broker started alone is a
//! cluster of one: the same code with one voter per group.
//!
//! - Admin requests become [`Command`]s proposed to the metadata group (forwarded to its leader
//!   by any broker, [`forward`]); every broker applies them in the same order
//!   ([`meta_machine`]).
//! - The reconciler ([`replicas`]) follows the applied metadata: it starts a Raft replica for
//!   each partition assigned to this broker, stops those that are no longer, and publishes the
//!   topic table the gRPC services read.
//! - Each partition leader reports its leadership and in-sync replicas to the metadata (only
//!   when they change), so that any broker can tell clients where a partition's leader is; it
//!   also carries out reassignments and hands leadership back to the preferred replica
//!   ([`leader_pass`] decides, [`duties`] does it).
//! - [`start`] opens the node and joins a cluster, [`readiness`] waits for current metadata,
//!   [`retention`] snapshots and purges partition logs, [`shutdown`] hands leaderships over and
//!   stops the groups.

mod duties;
mod forward;
mod identity;
pub mod leader_pass;
pub mod meta;
pub mod meta_machine;
pub mod quiet;
mod readiness;
mod replicas;
mod retention;
mod scrub;
mod shutdown;
mod start;

pub use scrub::DEFAULT_SCRUB_BYTES_PER_SEC;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use keel_log::fs::Fs;
use keel_proto::v1::BrokerInfo;
use keel_raft::{GroupConfig, KeelLogStore, RaftTransport, Replica};
use tokio::sync::watch;

use crate::error::{BrokerError, Result};
use crate::partition::Partition;
use crate::registry::Registry;
use crate::storage_identity::StorageIdentity;
use meta::{ClusterState, LeaderReport};
use meta_machine::MetadataMachine;
use quiet::Liveness;

/// A hosted partition replica and what the leader pass remembers about it.
struct Hosted {
    partition: Arc<Partition>,
    topic_id: u64,
    memory: leader_pass::Memory,
}

/// This broker's part of the cluster.
pub struct ClusterNode {
    pub id: u32,
    pub advertise: String,
    /// Where the other brokers reach this one (see `BrokerMeta::peer_address`).
    pub peer_address: String,
    data_dir: PathBuf,
    /// All storage goes through it: the real filesystem, or `CrashFs` in the fault suite.
    fs: Arc<dyn Fs>,
    /// Peer addresses from `--initial-cluster` and `--join`: where to propose before the
    /// metadata names a leader.
    seeds: Vec<String>,
    /// The data directory's identity (see `identity`).
    storage: Mutex<StorageIdentity>,
    /// The registration of this directory's storage id in flight, if any.
    registering: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Serialises rewrites of the storage identity file.
    identity_io: tokio::sync::Mutex<()>,
    transport: RaftTransport,
    rafts: keel_raft::Registry,
    meta_raft: Replica,
    metadata: MetadataMachine,
    meta_store: KeelLogStore,
    partition_config: GroupConfig,
    hosted: tokio::sync::Mutex<HashMap<u64, Hosted>>,
    /// Set when the metadata group's Raft core stopped on a failure (a failed fsync, a full
    /// disk): the broker cannot take part in the cluster any more and exits, for its
    /// supervisor to restart it, as a database does after a failed fsync.
    fatal: watch::Sender<Option<String>>,
    /// Serialises reconciliations.
    reconciling: tokio::sync::Mutex<()>,
    /// When each partition replica was last restarted after its Raft core stopped on a
    /// storage error, so a disk that stays full is retried every few seconds, not in a loop.
    restarted: Mutex<HashMap<u64, Instant>>,
    /// Leader reports sent and not yet visible in the metadata, to avoid re-sending them.
    reported: Mutex<HashMap<u64, LeaderReport>>,
    liveness: Arc<Liveness>,
    reporting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.id)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
}

fn raft_err(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable {
        message: format!("{what}: {e}"),
        definite: false,
    }
}

fn storage_err(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Storage {
        message: format!("{what}: {e}"),
        definite: true,
    }
}

impl ClusterNode {
    /// Resolves with the reason once this broker can no longer serve (see `fatal`).
    pub async fn failed(&self) -> String {
        let mut rx = self.fatal.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// The tonic service carrying Raft traffic for every group on this broker.
    pub fn raft_service(&self) -> keel_raft::RaftService {
        self.rafts.service()
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.metadata.state()
    }

    /// The metadata group's voters, as this broker knows them.
    pub fn metadata_voters(&self) -> std::collections::BTreeSet<u32> {
        self.meta_raft
            .status()
            .voters
            .iter()
            .map(|v| *v as u32)
            .collect()
    }

    pub fn metadata_leader(&self) -> Option<u32> {
        self.meta_raft.leader().map(|(l, _)| l as u32)
    }

    /// Number of brokers in the metadata group (voters and learners).
    pub fn metadata_members(&self) -> u32 {
        self.meta_raft.status().addresses.len() as u32
    }

    /// Number of brokers new replicas can be placed on.
    pub fn placeable_brokers(&self) -> u32 {
        self.state().placeable_brokers().len() as u32
    }

    /// The cluster's brokers and whether the metadata leader hears from them.
    pub async fn brokers(&self) -> Vec<BrokerInfo> {
        let state = self.state();
        let liveness = match self.local_liveness() {
            Some(l) => Some(l),
            None => self.remote_liveness().await,
        };
        state
            .brokers
            .values()
            .map(|b| BrokerInfo {
                id: b.id,
                address: b.address.clone(),
                alive: liveness
                    .as_ref()
                    .map_or(b.id == self.id, |l| l.get(&b.id).copied().unwrap_or(false)),
            })
            .collect()
    }

    /// The leader this broker knows for a hosted partition's group (id, address).
    pub fn hosted_leader(&self, p: &Partition) -> Option<(u32, String)> {
        p.leader_hint()
    }
}

/// Gives the loops access to the broker's topic registry without a reference cycle.
pub trait RegistryHolder: Send + Sync + 'static {
    fn registry(&self) -> &Registry;
}
