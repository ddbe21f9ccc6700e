//! Storage identity on the Raft transport: which cluster a message belongs to and which data
//! directory sent it and is meant to receive it.
//!
//! A Raft voter's safety rests on its disk: it must remember its vote and every entry it
//! acknowledged. A broker whose data directory was wiped or replaced has forgotten both, so it
//! must not take part in the groups it belonged to as if nothing happened (it could vote twice
//! in a term, or help elect a leader without acknowledged entries). Each data directory
//! therefore carries a random storage id, written at its first start, and the cluster records
//! the storage id each broker registered. Every Raft message says which cluster it is from,
//! which storage sent it and which storage the sender expects at the target; the receiver
//! refuses a message whose cluster or storage ids disagree with what it knows. Unknown values
//! (empty: a new cluster, a broker not registered yet) are not checked.
//!
//! [`check`] is the pure decision; [`Identity`] holds what this broker knows.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

/// What a Raft message says about identities (the fields of `RaftRequest`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    /// Node id of the sender.
    pub from: u64,
    pub cluster_id: String,
    /// Storage id of the sender's data directory.
    pub from_storage: String,
    /// Storage id the sender expects the target to have.
    pub target_storage: String,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "storage identity: message from cluster {theirs}, but this broker's data directory belongs to cluster {ours}"
    )]
    ForeignCluster { theirs: String, ours: String },
    #[error(
        "storage identity: broker {node} sent from data directory {sent}, but the cluster knows it with data directory {known}: its directory was wiped or replaced, so it has forgotten its votes and log; replace it with `keel cluster replace-broker {node}`"
    )]
    ReplacedSender {
        node: u64,
        sent: String,
        known: String,
    },
    #[error(
        "storage identity: the sender expects data directory {expected} here, but this broker's is {ours}: this directory was wiped or replaced; replace the broker with `keel cluster replace-broker`"
    )]
    ReplacedTarget { expected: String, ours: String },
}

/// What this broker knows: its own cluster and storage ids, and the storage id registered for
/// each peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    pub cluster_id: String,
    pub storage_id: String,
    pub peers: HashMap<u64, String>,
}

/// Decides whether a message with `stamp` may be served by a broker that knows `known`.
pub fn check(known: &Known, stamp: &Stamp) -> Result<(), Refused> {
    let both = |a: &str, b: &str| !a.is_empty() && !b.is_empty() && a != b;
    if both(&stamp.cluster_id, &known.cluster_id) {
        return Err(Refused::ForeignCluster {
            theirs: stamp.cluster_id.clone(),
            ours: known.cluster_id.clone(),
        });
    }
    if both(&stamp.target_storage, &known.storage_id) {
        return Err(Refused::ReplacedTarget {
            expected: stamp.target_storage.clone(),
            ours: known.storage_id.clone(),
        });
    }
    if let Some(registered) = known.peers.get(&stamp.from)
        && both(&stamp.from_storage, registered)
    {
        return Err(Refused::ReplacedSender {
            node: stamp.from,
            sent: stamp.from_storage.clone(),
            known: registered.clone(),
        });
    }
    Ok(())
}

/// The identities one broker's transport and Raft service share (cheap to clone).
#[derive(Clone, Default)]
pub struct Identity {
    known: Arc<RwLock<Known>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.read().fmt(f)
    }
}

impl Identity {
    /// The identity of a broker whose data directory has `storage_id`, in cluster
    /// `cluster_id` (empty while it does not know it yet).
    pub fn new(storage_id: &str, cluster_id: &str) -> Self {
        Self {
            known: Arc::new(RwLock::new(Known {
                cluster_id: cluster_id.to_owned(),
                storage_id: storage_id.to_owned(),
                peers: HashMap::new(),
            })),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn cluster_id(&self) -> String {
        self.read().cluster_id.clone()
    }

    pub fn storage_id(&self) -> String {
        self.read().storage_id.clone()
    }

    /// Learns the cluster id (once the metadata records one).
    pub fn set_cluster_id(&self, cluster_id: &str) {
        if self.read().cluster_id != cluster_id {
            cluster_id.clone_into(&mut self.write().cluster_id);
        }
    }

    /// The storage ids the metadata records for the peers (node id to storage id; brokers
    /// without one are not checked).
    pub fn set_peers(&self, peers: HashMap<u64, String>) {
        // Called every tick with what is usually unchanged: the write lock (which every Raft
        // message's check would wait on) only when something changed.
        if self.read().peers != peers {
            self.write().peers = peers;
        }
    }

    /// The stamp of a message from node `from` to node `target`.
    pub fn stamp(&self, from: u64, target: u64) -> Stamp {
        let k = self.read();
        Stamp {
            from,
            cluster_id: k.cluster_id.clone(),
            from_storage: k.storage_id.clone(),
            target_storage: k.peers.get(&target).cloned().unwrap_or_default(),
        }
    }

    /// Whether a message with `stamp` may be served here.
    pub fn check(&self, stamp: &Stamp) -> Result<(), Refused> {
        check(&self.read(), stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Known {
        Known {
            cluster_id: "c1".into(),
            storage_id: "s-me".into(),
            peers: HashMap::from([(2, "s-two".into())]),
        }
    }

    fn stamp(cluster: &str, from_storage: &str, target_storage: &str) -> Stamp {
        Stamp {
            from: 2,
            cluster_id: cluster.into(),
            from_storage: from_storage.into(),
            target_storage: target_storage.into(),
        }
    }

    #[test]
    fn matching_and_unknown_ids_pass() {
        let k = known();
        assert_eq!(check(&k, &stamp("c1", "s-two", "s-me")), Ok(()));
        // A new cluster: nothing is known yet on either side.
        assert_eq!(check(&k, &stamp("", "", "")), Ok(()));
        assert_eq!(
            check(&Known::default(), &stamp("c1", "s-two", "s-me")),
            Ok(())
        );
        // A sender the metadata has no storage id for yet.
        let s = Stamp {
            from: 3,
            ..stamp("c1", "s-three", "s-me")
        };
        assert_eq!(check(&k, &s), Ok(()));
    }

    #[test]
    fn another_cluster_is_refused() {
        let err = check(&known(), &stamp("c2", "s-two", "s-me"));
        assert!(
            matches!(err, Err(Refused::ForeignCluster { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn a_wiped_sender_is_refused() {
        let err = check(&known(), &stamp("c1", "s-two-new", ""));
        assert_eq!(
            err,
            Err(Refused::ReplacedSender {
                node: 2,
                sent: "s-two-new".into(),
                known: "s-two".into()
            })
        );
        let message = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("replace-broker 2"), "{message}");
    }

    #[test]
    fn a_message_for_the_directory_this_one_replaced_is_refused() {
        let err = check(&known(), &stamp("c1", "s-two", "s-me-before"));
        assert!(
            matches!(err, Err(Refused::ReplacedTarget { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn stamps_carry_what_is_known() {
        let id = Identity::new("s-me", "");
        id.set_cluster_id("c1");
        id.set_peers(HashMap::from([(2, "s-two".into())]));
        assert_eq!(
            id.stamp(1, 2),
            Stamp {
                from: 1,
                cluster_id: "c1".into(),
                from_storage: "s-me".into(),
                target_storage: "s-two".into()
            }
        );
        assert_eq!(id.stamp(1, 3).target_storage, "");
    }
}
