//! The cluster metadata replicated by the metadata Raft group: brokers, topics, partition
//! assignments and the partition leaders the replicas report. Pure logic: commands are applied
//! deterministically on every broker (same state from the same log), and nothing here does IO.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::metadata::{InitRefusal, ProducerIds, TopicMeta};
use crate::topic_config::TopicConfig;

/// Raft group id of the metadata group; partition groups use [`partition_group`].
pub const META_GROUP: u64 = 0;

/// The Raft group id of a partition: topic ids are never reused, so neither are group ids.
pub fn partition_group(topic_id: u64, partition: u32) -> u64 {
    (topic_id << 16) | u64::from(partition)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerMeta {
    pub id: u32,
    /// Where clients reach it (its `--advertise` address).
    pub address: String,
    /// Where the other brokers reach it, when that differs from `address` (its
    /// `--initial-cluster` entry: inside a container network, clients use a published port
    /// while peers use the container's name). Empty: `address`.
    #[serde(default)]
    pub peer_address: String,
    /// Set by a decommission: no new replicas go there and its replicas move away.
    #[serde(default)]
    pub decommissioning: bool,
    /// The storage id of its data directory (see `storage_identity`), registered at its first
    /// start; empty until then. Peers refuse Raft messages from another directory.
    #[serde(default)]
    pub storage_id: String,
    /// Set by `replace-broker` (its directory was wiped or replaced): it is removed from every
    /// group's voters, and rejoins as a new replica once it registers its new storage.
    #[serde(default)]
    pub replacing: bool,
    /// The metadata leader keeps this broker a voter of the metadata group (set when a
    /// replaced voter is taken out, so that it is promoted again once it caught up).
    #[serde(default)]
    pub metadata_voter: bool,
    /// A replaced metadata voter that the metadata group has not removed yet (the metadata
    /// leader clears it with `MetadataVoterRemoved`); its new directory waits until then.
    #[serde(default)]
    pub leaving_metadata_voters: bool,
}

impl BrokerMeta {
    /// The address other brokers use.
    pub fn peer(&self) -> &str {
        if self.peer_address.is_empty() {
            &self.address
        } else {
            &self.peer_address
        }
    }
}

/// One partition's placement and the leader its replicas last reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// Voters of the partition's Raft group; the first is the preferred leader.
    pub replicas: Vec<u32>,
    /// Last reported leader, with the Raft term it leads in (reports of older terms lose).
    pub leader: Option<u32>,
    pub leader_term: u64,
    /// Voters caught up to the commit index, as the leader last reported.
    pub in_sync: Vec<u32>,
    /// The Raft group's voters, as the leader last reported (differs from `replicas` while a
    /// reassignment is under way).
    #[serde(default)]
    pub voters: Vec<u32>,
    /// The replica set the group was created with, never changed: only these replicas may
    /// initialise the group, all with this membership, so that two disjoint sets can never
    /// both initialise it (as a reassignment before the first election could otherwise cause).
    #[serde(default)]
    pub initial: Vec<u32>,
    /// Records below this offset may be deleted on every replica (the next retention round
    /// does it): set by the group coordinator after it wrote a compacted image of its offsets
    /// partition. Only ever grows.
    #[serde(default)]
    pub delete_before: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicState {
    pub meta: TopicMeta,
    pub partitions: Vec<PartitionMeta>,
    /// The proposer's id for the create request, so a retried proposal is recognised.
    #[serde(default)]
    pub request_id: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub brokers: BTreeMap<u32, BrokerMeta>,
    pub next_topic_id: u64,
    pub topics: BTreeMap<String, TopicState>,
    #[serde(default)]
    pub producers: ProducerIds,
    /// Chosen once by the first metadata leader; every data directory records it, and a
    /// directory of another cluster is refused.
    #[serde(default)]
    pub cluster_id: String,
}

/// A report from a partition leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderReport {
    pub topic_id: u64,
    pub partition: u32,
    pub leader: u32,
    pub term: u64,
    pub in_sync: Vec<u32>,
    #[serde(default)]
    pub voters: Vec<u32>,
}

/// A change to the metadata: the entries of the metadata Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    RegisterBroker {
        id: u32,
        address: String,
        #[serde(default)]
        peer_address: String,
    },
    CreateTopic {
        /// Chosen by the proposer; a retry of the same proposal carries the same id.
        #[serde(default)]
        request_id: u64,
        name: String,
        config: TopicConfig,
        replication_factor: u32,
        /// Replica set of each partition, chosen by the proposer (see [`assign`]).
        assignments: Vec<Vec<u32>>,
    },
    DeleteTopic {
        name: String,
        /// Deletes only this incarnation of the topic: a retried delete finds it gone and
        /// succeeds, and never deletes a topic re-created in between.
        #[serde(default)]
        topic_id: Option<u64>,
    },
    AlterConfig {
        name: String,
        config: TopicConfig,
    },
    AddPartitions {
        name: String,
        /// The partition count the proposer saw; applied only from that count, so a retried
        /// proposal does not add the partitions twice.
        #[serde(default)]
        from_count: Option<u32>,
        assignments: Vec<Vec<u32>>,
    },
    /// Sets a partition's replica set (reassignment target; the partition's leader carries it
    /// out through Raft membership changes).
    Reassign {
        name: String,
        partition: u32,
        replicas: Vec<u32>,
    },
    Decommission {
        id: u32,
    },
    Leaders {
        reports: Vec<LeaderReport>,
    },
    /// Lets retention delete a partition's records below `before` (Kafka's DeleteRecords).
    DeleteRecords {
        name: String,
        /// The incarnation meant, so a retry never touches a re-created topic.
        topic_id: u64,
        partition: u32,
        before: u64,
    },
    /// Installs the catalogue of a single-node broker's data directory being converted into
    /// a cluster of one (see `legacy`): registers the broker and adds its topics, with their
    /// ids, each partition on that broker alone, and its producer ids. Repeating it changes
    /// nothing; it is refused where other topics exist.
    AdoptSingleNode {
        broker: BrokerMeta,
        catalogue: crate::metadata::ClusterMeta,
    },
    /// Names the cluster; applied only while it has no id (the first proposal wins).
    SetClusterId {
        cluster_id: String,
    },
    /// Records the storage id of broker `id`'s data directory: at its first start, or after
    /// a `ReplaceBroker`. Refused when another directory is registered for it.
    RegisterStorage {
        id: u32,
        storage_id: String,
    },
    /// Broker `id`'s data directory was lost: take it out of every group's voters, then let a
    /// new directory register (see [`BrokerMeta::replacing`]).
    ReplaceBroker {
        id: u32,
        /// It was a voter of the metadata group, and becomes one again once it caught up.
        metadata_voter: bool,
    },
    /// The metadata group no longer counts replaced broker `id` among its voters.
    MetadataVoterRemoved {
        id: u32,
    },
    /// Hands out an idempotent producer id and epoch (see [`ProducerIds::init`]).
    InitProducer {
        request_id: u64,
        instance: Option<String>,
        bump: Option<(i64, i16)>,
    },
}

/// Why a command was refused when applied (same answer on every broker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    TopicExists(String),
    UnknownTopic(String),
    Invalid {
        field: String,
        message: String,
    },
    Producer(InitRefusal),
    /// A replaced broker's new directory must wait: its groups are still removing it.
    Replacing(String),
}

/// What an applied command answers beyond success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Producer { id: i64, epoch: i16 },
}

/// The outcome of applying one command.
pub type Outcome = Result<Reply, Refusal>;

impl ClusterState {
    /// The initial state: the given brokers and no topics.
    pub fn new() -> Self {
        Self {
            next_topic_id: 1,
            ..Self::default()
        }
    }

    /// Applies a command. Refused commands change nothing.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        if let Command::InitProducer {
            request_id,
            instance,
            bump,
        } = cmd
        {
            return self
                .producers
                .init(*request_id, instance.as_deref(), *bump)
                .map(|(id, epoch)| Reply::Producer { id, epoch })
                .map_err(Refusal::Producer);
        }
        self.apply_change(cmd).map(|()| Reply::Done)
    }

    fn apply_change(&mut self, cmd: &Command) -> Result<(), Refusal> {
        match cmd {
            Command::RegisterBroker {
                id,
                address,
                peer_address,
            } => {
                let b = self.brokers.entry(*id).or_insert_with(|| BrokerMeta {
                    id: *id,
                    address: address.clone(),
                    ..BrokerMeta::default()
                });
                b.address.clone_from(address);
                b.peer_address.clone_from(peer_address);
                Ok(())
            }
            Command::CreateTopic {
                request_id,
                name,
                config,
                replication_factor,
                assignments,
            } => {
                if let Some(t) = self.topics.get(name) {
                    if *request_id != 0 && t.request_id == *request_id {
                        return Ok(());
                    }
                    return Err(Refusal::TopicExists(name.clone()));
                }
                self.check_assignments(assignments)?;
                let meta = TopicMeta {
                    name: name.clone(),
                    id: self.next_topic_id,
                    partitions: assignments.len() as u32,
                    replication_factor: *replication_factor,
                    config: config.clone(),
                };
                self.next_topic_id += 1;
                let partitions = assignments
                    .iter()
                    .map(|r| PartitionMeta {
                        replicas: r.clone(),
                        initial: r.clone(),
                        ..PartitionMeta::default()
                    })
                    .collect();
                self.topics.insert(
                    name.clone(),
                    TopicState {
                        meta,
                        partitions,
                        request_id: *request_id,
                    },
                );
                Ok(())
            }
            Command::DeleteTopic { name, topic_id } => match (self.topics.get(name), topic_id) {
                (Some(t), Some(id)) if t.meta.id != *id => Ok(()),
                (Some(_), _) => {
                    self.topics.remove(name);
                    Ok(())
                }
                (None, Some(_)) => Ok(()),
                (None, None) => Err(Refusal::UnknownTopic(name.clone())),
            },
            Command::AlterConfig { name, config } => {
                let t = self.topic_mut(name)?;
                t.meta.config = config.clone();
                Ok(())
            }
            Command::AddPartitions {
                name,
                from_count,
                assignments,
            } => {
                self.check_assignments(assignments)?;
                let t = self.topic_mut(name)?;
                if let Some(from) = from_count {
                    let target = from + assignments.len() as u32;
                    if t.meta.partitions == target {
                        return Ok(());
                    }
                    if t.meta.partitions != *from {
                        return Err(Refusal::Invalid {
                            field: "partitions".into(),
                            message: format!(
                                "the topic has {} partitions now, not {from}",
                                t.meta.partitions
                            ),
                        });
                    }
                }
                t.meta.partitions += assignments.len() as u32;
                t.partitions
                    .extend(assignments.iter().map(|r| PartitionMeta {
                        replicas: r.clone(),
                        initial: r.clone(),
                        ..PartitionMeta::default()
                    }));
                Ok(())
            }
            Command::Reassign {
                name,
                partition,
                replicas,
            } => {
                self.check_assignments(std::slice::from_ref(replicas))?;
                let t = self.topic_mut(name)?;
                let count = t.partitions.len();
                let p =
                    t.partitions
                        .get_mut(*partition as usize)
                        .ok_or_else(|| Refusal::Invalid {
                            field: "partition".into(),
                            message: format!(
                                "{partition} is not below the partition count {count}"
                            ),
                        })?;
                if p.leader.is_none() {
                    return Err(Refusal::Invalid {
                        field: "partition".into(),
                        message: format!(
                            "partition {partition} has not elected its first leader yet; retry once it has"
                        ),
                    });
                }
                p.replicas.clone_from(replicas);
                p.in_sync.retain(|b| replicas.contains(b));
                Ok(())
            }
            Command::DeleteRecords {
                name,
                topic_id,
                partition,
                before,
            } => {
                let t = self.topic_mut(name)?;
                if t.meta.id != *topic_id {
                    return Err(Refusal::UnknownTopic(name.clone()));
                }
                if let Some(p) = t.partitions.get_mut(*partition as usize) {
                    p.delete_before = p.delete_before.max(*before);
                }
                Ok(())
            }
            Command::Decommission { id } => {
                self.broker_mut(*id)?.decommissioning = true;
                Ok(())
            }
            Command::AdoptSingleNode { broker, catalogue } => self.adopt(broker, catalogue),
            Command::SetClusterId { cluster_id } => {
                if self.cluster_id.is_empty() {
                    cluster_id.clone_into(&mut self.cluster_id);
                }
                Ok(())
            }
            Command::RegisterStorage { id, storage_id } => self.register_storage(*id, storage_id),
            Command::ReplaceBroker { id, metadata_voter } => {
                let b = self.broker_mut(*id)?;
                b.replacing = true;
                b.metadata_voter |= *metadata_voter;
                b.leaving_metadata_voters |= *metadata_voter;
                Ok(())
            }
            Command::MetadataVoterRemoved { id } => {
                self.broker_mut(*id)?.leaving_metadata_voters = false;
                Ok(())
            }
            // Answered by `apply`.
            Command::InitProducer { .. } => Ok(()),
            Command::Leaders { reports } => {
                for r in reports {
                    let Some(t) = self.topics.values_mut().find(|t| t.meta.id == r.topic_id) else {
                        continue;
                    };
                    let Some(p) = t.partitions.get_mut(r.partition as usize) else {
                        continue;
                    };
                    if r.term < p.leader_term {
                        continue;
                    }
                    p.leader = Some(r.leader);
                    p.leader_term = r.term;
                    p.in_sync.clone_from(&r.in_sync);
                    p.voters.clone_from(&r.voters);
                }
                Ok(())
            }
        }
    }

    fn broker_mut(&mut self, id: u32) -> Result<&mut BrokerMeta, Refusal> {
        self.brokers.get_mut(&id).ok_or_else(|| Refusal::Invalid {
            field: "broker_id".into(),
            message: format!("broker {id} is not a member of the cluster"),
        })
    }

    /// See [`Command::RegisterStorage`]. A replaced broker's new directory is accepted only
    /// once no partition group counts the broker among its voters any more (the old directory
    /// may have voted and acknowledged entries the new one does not hold).
    fn register_storage(&mut self, id: u32, storage_id: &str) -> Result<(), Refusal> {
        let still_voter: Vec<String> = self
            .topics
            .values()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.voters.contains(&id))
                    .map(|(i, _)| format!("{}/{i}", t.meta.name))
            })
            .take(3)
            .collect();
        let b = self.broker_mut(id)?;
        if b.replacing && b.leaving_metadata_voters {
            return Err(Refusal::Replacing(format!(
                "broker {id} is being replaced but is still a voter of the cluster metadata (it is being removed); retry shortly"
            )));
        }
        if b.storage_id == storage_id {
            // The directory the cluster knows (a replacement of a broker whose directory
            // survived after all: its data is real, it simply rejoins).
            b.replacing = false;
            return Ok(());
        }
        if b.storage_id.is_empty() {
            storage_id.clone_into(&mut b.storage_id);
            return Ok(());
        }
        if !b.replacing {
            return Err(Refusal::Invalid {
                field: "storage_id".into(),
                message: format!(
                    "broker {id} started with data directory {storage_id}, but the cluster knows it with {}: the directory was wiped or replaced, so the broker has forgotten its votes and log and may not rejoin as the voter it was; run `keel cluster replace-broker {id}`, then start it again",
                    b.storage_id
                ),
            });
        }
        if !still_voter.is_empty() {
            return Err(Refusal::Replacing(format!(
                "broker {id} is being replaced but is still a voter of {} (its groups are removing it); retry shortly",
                still_voter.join(", ")
            )));
        }
        storage_id.clone_into(&mut b.storage_id);
        b.replacing = false;
        Ok(())
    }

    fn adopt(
        &mut self,
        broker: &BrokerMeta,
        catalogue: &crate::metadata::ClusterMeta,
    ) -> Result<(), Refusal> {
        let same = |t: &TopicState| {
            catalogue
                .topics
                .get(&t.meta.name)
                .is_some_and(|c| c.id == t.meta.id)
        };
        if let Some(other) = self.topics.values().find(|t| !same(t)) {
            return Err(Refusal::Invalid {
                field: "topics".into(),
                message: format!(
                    "the cluster already has topic {} (id {}), which the single-node catalogue does not",
                    other.meta.name, other.meta.id
                ),
            });
        }
        self.brokers
            .entry(broker.id)
            .or_insert_with(|| broker.clone());
        for tm in catalogue.topics.values() {
            self.topics
                .entry(tm.name.clone())
                .or_insert_with(|| TopicState {
                    meta: tm.clone(),
                    partitions: (0..tm.partitions)
                        .map(|_| PartitionMeta {
                            replicas: vec![broker.id],
                            initial: vec![broker.id],
                            ..PartitionMeta::default()
                        })
                        .collect(),
                    request_id: 0,
                });
        }
        self.next_topic_id = self.next_topic_id.max(catalogue.next_topic_id);
        if self.producers == ProducerIds::default() {
            self.producers = catalogue.producers.clone();
        }
        Ok(())
    }

    fn topic_mut(&mut self, name: &str) -> Result<&mut TopicState, Refusal> {
        self.topics
            .get_mut(name)
            .ok_or_else(|| Refusal::UnknownTopic(name.to_owned()))
    }

    fn check_assignments(&self, assignments: &[Vec<u32>]) -> Result<(), Refusal> {
        for (p, replicas) in assignments.iter().enumerate() {
            let distinct: BTreeSet<u32> = replicas.iter().copied().collect();
            if replicas.is_empty() || distinct.len() != replicas.len() {
                return Err(Refusal::Invalid {
                    field: "replicas".into(),
                    message: format!(
                        "partition {p}: replicas {replicas:?} must be distinct and not empty"
                    ),
                });
            }
            if let Some(b) = replicas.iter().find(|b| !self.brokers.contains_key(b)) {
                return Err(Refusal::Invalid {
                    field: "replicas".into(),
                    message: format!("partition {p}: broker {b} is not a member of the cluster"),
                });
            }
        }
        Ok(())
    }

    /// Brokers new replicas may go to, by id.
    pub fn placeable_brokers(&self) -> Vec<u32> {
        self.brokers
            .values()
            .filter(|b| !b.decommissioning)
            .map(|b| b.id)
            .collect()
    }

    pub fn topic_by_id(&self, id: u64) -> Option<&TopicState> {
        self.topics.values().find(|t| t.meta.id == id)
    }
}

/// Chooses replica sets for `count` new partitions starting at partition `first`: replicas
/// rotate over the brokers so that preferred leaders (the first replica) and replicas spread
/// evenly, counting the replicas and leaderships the brokers already hold (`load`).
pub fn assign(
    brokers: &[u32],
    load: &BTreeMap<u32, (u32, u32)>,
    count: u32,
    rf: u32,
) -> Vec<Vec<u32>> {
    let mut load: BTreeMap<u32, (u32, u32)> = brokers
        .iter()
        .map(|b| (*b, load.get(b).copied().unwrap_or_default()))
        .collect();
    let rf = (rf as usize).min(brokers.len());
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        // Leader: fewest leaderships, then fewest replicas, then lowest id.
        let Some(leader) = load
            .iter()
            .min_by_key(|(id, (leaders, replicas))| (*leaders, *replicas, **id))
            .map(|(id, _)| *id)
        else {
            break;
        };
        let mut replicas = vec![leader];
        let mut others: Vec<(u32, u32)> = load
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(id, (_, r))| (*r, *id))
            .collect();
        // Followers: fewest replicas; ties broken by the distance after the leader's id, so
        // that equal loads still rotate.
        others.sort_by_key(|(r, id)| (*r, id.wrapping_sub(leader).wrapping_sub(1)));
        replicas.extend(others.iter().take(rf.saturating_sub(1)).map(|(_, id)| *id));
        for (i, b) in replicas.iter().enumerate() {
            if let Some(l) = load.get_mut(b) {
                l.1 += 1;
                if i == 0 {
                    l.0 += 1;
                }
            }
        }
        out.push(replicas);
    }
    out
}

/// (leaderships, replicas) each broker holds by assignment (preferred leaders).
pub fn load_of(state: &ClusterState) -> BTreeMap<u32, (u32, u32)> {
    let mut load: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
    for t in state.topics.values() {
        for p in &t.partitions {
            for (i, b) in p.replicas.iter().enumerate() {
                let l = load.entry(*b).or_default();
                l.1 += 1;
                if i == 0 {
                    l.0 += 1;
                }
            }
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(brokers: &[u32]) -> ClusterState {
        let mut s = ClusterState::new();
        for b in brokers {
            s.apply(&Command::RegisterBroker {
                id: *b,
                address: format!("127.0.0.1:{}", 9000 + b),
                peer_address: String::new(),
            })
            .expect("register");
        }
        s
    }

    /// A create proposal with the default config.
    fn create_topic(
        request_id: u64,
        name: &str,
        replication_factor: u32,
        assignments: Vec<Vec<u32>>,
    ) -> Command {
        Command::CreateTopic {
            request_id,
            name: name.into(),
            config: TopicConfig::default(),
            replication_factor,
            assignments,
        }
    }

    #[test]
    fn adopting_a_single_node_catalogue_keeps_ids_and_repeats_harmlessly() {
        let topic = |name: &str, id: u64, partitions: u32| TopicMeta {
            name: name.into(),
            id,
            partitions,
            replication_factor: 1,
            config: TopicConfig::default(),
        };
        let mut catalogue = crate::metadata::ClusterMeta {
            broker_id: 7,
            next_topic_id: 5,
            ..Default::default()
        };
        catalogue.topics.insert("a".into(), topic("a", 2, 3));
        catalogue.topics.insert("b".into(), topic("b", 4, 1));
        catalogue.producers.next_id = 9;
        let broker = BrokerMeta {
            id: 7,
            address: "127.0.0.1:9292".into(),
            ..BrokerMeta::default()
        };
        let cmd = Command::AdoptSingleNode {
            broker: broker.clone(),
            catalogue: catalogue.clone(),
        };
        let mut s = ClusterState::new();
        s.apply(&cmd).expect("adopt");
        assert_eq!(s.brokers.get(&7), Some(&broker));
        assert_eq!(s.topics["a"].meta.id, 2);
        assert_eq!(s.topics["a"].partitions.len(), 3);
        assert!(
            s.topics["a"]
                .partitions
                .iter()
                .all(|p| p.replicas == vec![7] && p.initial == vec![7] && p.leader.is_none())
        );
        assert_eq!(s.next_topic_id, 5);
        assert_eq!(s.producers.next_id, 9);
        // A retry after a crash changes nothing.
        let before = s.clone();
        s.apply(&cmd).expect("repeat");
        assert_eq!(s, before);
        // New topics get fresh ids after the adopted ones.
        s.apply(&create_topic(1, "c", 1, vec![vec![7]]))
            .expect("create");
        assert_eq!(s.topics["c"].meta.id, 5);
        // A cluster with topics of its own refuses the catalogue, changing nothing.
        let before = s.clone();
        assert!(matches!(s.apply(&cmd), Err(Refusal::Invalid { .. })));
        assert_eq!(s, before);
    }

    #[test]
    fn assignment_spreads_leaders_and_replicas_evenly() {
        let brokers = [1, 2, 3];
        let a = assign(&brokers, &BTreeMap::new(), 6, 3);
        let mut leaders = BTreeMap::new();
        for r in &a {
            assert_eq!(r.len(), 3);
            *leaders.entry(r[0]).or_insert(0) += 1;
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
        // rf above the broker count is capped by the caller's validation; here it is clamped.
        assert!(
            assign(&[1], &BTreeMap::new(), 2, 3)
                .iter()
                .all(|r| r == &vec![1])
        );
    }

    #[test]
    fn assignment_accounts_for_existing_load() {
        let mut s = state(&[1, 2, 3]);
        let first = assign(&[1, 2, 3], &load_of(&s), 1, 1);
        s.apply(&create_topic(1, "a", 1, first.clone()))
            .expect("create");
        let next = assign(&[1, 2, 3], &load_of(&s), 2, 1);
        let mut used: Vec<u32> = first.iter().chain(&next).map(|r| r[0]).collect();
        used.sort_unstable();
        assert_eq!(used, vec![1, 2, 3]);
    }

    #[test]
    fn commands_apply_deterministically_and_refusals_change_nothing() {
        let mut s = state(&[1, 2]);
        let create = create_topic(7, "t", 2, vec![vec![1, 2], vec![2, 1]]);
        s.apply(&create).expect("create");
        let before = s.clone();
        assert_eq!(
            s.apply(&create),
            Ok(Reply::Done),
            "a retried create is recognised"
        );
        let other = create_topic(9, "t", 2, vec![vec![1, 2]]);
        assert_eq!(s.apply(&other), Err(Refusal::TopicExists("t".into())));
        assert_eq!(
            s.apply(&create_topic(8, "u", 1, vec![vec![7]])),
            Err(Refusal::Invalid {
                field: "replicas".into(),
                message: "partition 0: broker 7 is not a member of the cluster".into()
            })
        );
        assert_eq!(s, before);
        let id = s.topics["t"].meta.id;
        let report = |term, leader| Command::Leaders {
            reports: vec![LeaderReport {
                topic_id: id,
                partition: 1,
                leader,
                term,
                in_sync: vec![1, 2],
                voters: vec![1, 2],
            }],
        };
        s.apply(&report(3, 2)).expect("report");
        s.apply(&report(2, 1)).expect("stale report is ignored");
        assert_eq!(s.topics["t"].partitions[1].leader, Some(2));
        s.apply(&Command::DeleteTopic {
            name: "t".into(),
            topic_id: None,
        })
        .expect("delete");
        assert!(s.topics.is_empty());
        assert_eq!(s.next_topic_id, 2, "topic ids are never reused");
    }

    #[test]
    fn reassignment_waits_for_the_first_leader_and_keeps_the_initial_set() {
        let mut s = state(&[1, 2, 3, 4]);
        s.apply(&create_topic(3, "t", 2, vec![vec![1, 2]]))
            .expect("create");
        let reassign = Command::Reassign {
            name: "t".into(),
            partition: 0,
            replicas: vec![3, 4],
        };
        assert!(
            matches!(s.apply(&reassign), Err(Refusal::Invalid { .. })),
            "no reassignment before the group elected its first leader"
        );
        let id = s.topics["t"].meta.id;
        s.apply(&Command::Leaders {
            reports: vec![LeaderReport {
                topic_id: id,
                partition: 0,
                leader: 1,
                term: 1,
                in_sync: vec![1, 2],
                voters: vec![1, 2],
            }],
        })
        .expect("report");
        s.apply(&reassign).expect("reassign");
        let p = &s.topics["t"].partitions[0];
        assert_eq!(p.replicas, vec![3, 4]);
        assert_eq!(p.initial, vec![1, 2], "the initial set never changes");
    }

    #[test]
    fn retried_proposals_apply_once() {
        let mut s = state(&[1]);
        let create = create_topic(5, "t", 1, vec![vec![1]]);
        s.apply(&create).expect("create");
        let add = Command::AddPartitions {
            name: "t".into(),
            from_count: Some(1),
            assignments: vec![vec![1], vec![1]],
        };
        s.apply(&add).expect("add");
        s.apply(&add).expect("a retried add is a no-op");
        assert_eq!(s.topics["t"].meta.partitions, 3);
        let id = s.topics["t"].meta.id;
        let delete = Command::DeleteTopic {
            name: "t".into(),
            topic_id: Some(id),
        };
        s.apply(&delete).expect("delete");
        s.apply(&create).expect("re-create under a new id");
        s.apply(&delete)
            .expect("a retried delete of the old incarnation is a no-op");
        assert!(s.topics.contains_key("t"), "the new incarnation survives");
    }

    #[test]
    fn the_first_cluster_id_wins() {
        let mut s = state(&[1]);
        for id in ["c1", "c2"] {
            s.apply(&Command::SetClusterId {
                cluster_id: id.into(),
            })
            .expect("set");
        }
        assert_eq!(s.cluster_id, "c1");
    }

    #[test]
    fn a_wiped_broker_registers_again_only_after_it_was_replaced_and_left_every_group() {
        let mut s = state(&[1, 2, 3]);
        let register = |id: &str| Command::RegisterStorage {
            id: 2,
            storage_id: id.into(),
        };
        s.apply(&register("old")).expect("first start");
        s.apply(&register("old"))
            .expect("a restart with the same directory");
        let refused = s.apply(&register("new"));
        assert!(
            matches!(&refused, Err(Refusal::Invalid { field, message })
                if field == "storage_id" && message.contains("replace-broker 2")),
            "{refused:?}"
        );
        assert_eq!(s.brokers[&2].storage_id, "old", "a refusal changes nothing");

        s.apply(&create_topic(3, "t", 1, vec![vec![1, 2, 3]]))
            .expect("create");
        let id = s.topics["t"].meta.id;
        let report = |voters: Vec<u32>| Command::Leaders {
            reports: vec![LeaderReport {
                topic_id: id,
                partition: 0,
                leader: 1,
                term: 1,
                in_sync: voters.clone(),
                voters,
            }],
        };
        s.apply(&report(vec![1, 2, 3])).expect("report");
        s.apply(&Command::ReplaceBroker {
            id: 2,
            metadata_voter: true,
        })
        .expect("replace");
        assert!(s.brokers[&2].replacing && s.brokers[&2].metadata_voter);
        let waiting = s.apply(&register("new"));
        assert!(
            matches!(&waiting, Err(Refusal::Replacing(message)) if message.contains("cluster metadata")),
            "{waiting:?}"
        );
        s.apply(&Command::MetadataVoterRemoved { id: 2 })
            .expect("removed from the metadata voters");
        let waiting = s.apply(&register("new"));
        assert!(
            matches!(&waiting, Err(Refusal::Replacing(message)) if message.contains("still a voter of t/0")),
            "{waiting:?}"
        );
        s.apply(&report(vec![1, 3])).expect("report");
        s.apply(&register("new"))
            .expect("registered once out of every group");
        let b = &s.brokers[&2];
        assert_eq!((b.storage_id.as_str(), b.replacing), ("new", false));
        assert!(matches!(
            s.apply(&Command::ReplaceBroker {
                id: 9,
                metadata_voter: false
            }),
            Err(Refusal::Invalid { .. })
        ));
    }

    #[test]
    fn group_ids_are_distinct_per_partition() {
        assert_ne!(partition_group(1, 0), META_GROUP);
        assert_ne!(partition_group(1, 1), partition_group(2, 1));
    }
}
