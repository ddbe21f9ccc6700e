//! What the metadata says of a topic and of idempotent producers, and the catalogue a
//! single-node broker kept in `metadata.json` before every broker ran the metadata Raft group
//! (read once, when such a data directory is converted: see `legacy`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{BrokerError, Result};
use crate::topic_config::TopicConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub name: String,
    /// Never reused, so a re-created topic never sees an old topic's files.
    pub id: u64,
    pub partitions: u32,
    pub replication_factor: u32,
    pub config: TopicConfig,
}

impl TopicMeta {
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.name, self.id)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub broker_id: u32,
    pub next_topic_id: u64,
    pub topics: BTreeMap<String, TopicMeta>,
    #[serde(default)]
    pub producers: ProducerIds,
}

/// Producer ids and epochs handed out to idempotent producers. Ids are never reused; an
/// identity (instance id) keeps its id across incarnations, each with a higher epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerIds {
    /// The next fresh id (0 stands for 1: ids start at 1).
    pub next_id: i64,
    /// The current epoch of every id whose epoch is not 0 or that belongs to an identity.
    pub epochs: BTreeMap<i64, i16>,
    /// Identity to producer id.
    pub instances: BTreeMap<String, i64>,
    /// Answers to recent requests, so a retried request gets the same answer.
    pub recent: std::collections::VecDeque<(u64, i64, i16)>,
    /// The last grant of each id that has an epoch recorded, with its request id: a retried
    /// bump must get its answer however many other requests came in between (a second bump
    /// would fence the very producer that asked).
    #[serde(default)]
    pub last_grant: BTreeMap<i64, (u64, i16)>,
}

/// Why a producer could not be (re)initialised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitRefusal {
    /// The id was never handed out.
    UnknownProducer(i64),
    /// The epoch asked to bump from is not the current one: a newer incarnation exists.
    Fenced {
        producer_id: i64,
        epoch: i16,
        current: i16,
    },
}

const RECENT_INITS: usize = 256;

impl ProducerIds {
    /// The current epoch of `producer_id`, when it is not a never-bumped anonymous id.
    pub fn epoch_of(&self, producer_id: i64) -> Option<i16> {
        self.epochs.get(&producer_id).copied()
    }

    /// Hands out a producer id and epoch: for an identity, its id with the next epoch (fencing
    /// the previous incarnation); with `bump`, the same id with the next epoch if `bump` names
    /// the current one; otherwise a fresh id. A retried `request_id` gets the same answer.
    pub fn init(
        &mut self,
        request_id: u64,
        instance: Option<&str>,
        bump: Option<(i64, i16)>,
    ) -> Result<(i64, i16), InitRefusal> {
        if request_id != 0
            && let Some(&(_, id, epoch)) = self.recent.iter().find(|r| r.0 == request_id)
        {
            return Ok((id, epoch));
        }
        let known = instance.and_then(|i| self.instances.get(i).copied());
        if request_id != 0
            && let Some(id) = known.or(bump.map(|b| b.0))
            && let Some(&(r, epoch)) = self.last_grant.get(&id)
            && r == request_id
        {
            return Ok((id, epoch));
        }
        let grant = match (known, bump) {
            // A new incarnation of the identity.
            (Some(id), None) => self.next_epoch(id),
            // An incarnation restarting its sequences: only the current one may, or a zombie
            // could take the identity back from its replacement.
            (Some(id), Some((bump_id, epoch))) => {
                let current = self.epochs.get(&id).copied().unwrap_or(0);
                if bump_id != id || epoch != current {
                    return Err(InitRefusal::Fenced {
                        producer_id: bump_id,
                        epoch,
                        current,
                    });
                }
                self.next_epoch(id)
            }
            (None, Some((id, epoch))) => {
                if id <= 0 || id >= self.next_id.max(1) {
                    return Err(InitRefusal::UnknownProducer(id));
                }
                let current = self.epochs.get(&id).copied().unwrap_or(0);
                if epoch != current {
                    return Err(InitRefusal::Fenced {
                        producer_id: id,
                        epoch,
                        current,
                    });
                }
                self.next_epoch(id)
            }
            (None, None) => {
                let id = self.fresh_id();
                if instance.is_some() {
                    self.epochs.insert(id, 0);
                }
                (id, 0)
            }
        };
        if let Some(i) = instance {
            self.instances.insert(i.to_owned(), grant.0);
        }
        if self.epochs.contains_key(&grant.0) {
            self.last_grant.insert(grant.0, (request_id, grant.1));
        }
        self.recent.push_back((request_id, grant.0, grant.1));
        while self.recent.len() > RECENT_INITS {
            self.recent.pop_front();
        }
        Ok(grant)
    }

    fn fresh_id(&mut self) -> i64 {
        let id = self.next_id.max(1);
        self.next_id = id + 1;
        id
    }

    /// The next epoch of `id`; a fresh id once the epoch space is used up.
    fn next_epoch(&mut self, id: i64) -> (i64, i16) {
        let current = self.epochs.get(&id).copied().unwrap_or(0);
        if current == i16::MAX {
            let fresh = self.fresh_id();
            self.epochs.insert(fresh, 0);
            return (fresh, 0);
        }
        self.epochs.insert(id, current + 1);
        (id, current + 1)
    }
}

/// The catalogue file of a single-node broker before the conversion.
pub const FILE: &str = "metadata.json";

/// Loads the catalogue of a single-node broker's data directory, if it has one. Refuses a
/// data directory that belongs to another broker id.
pub fn load(data_dir: &Path, broker_id: u32) -> Result<Option<ClusterMeta>> {
    let path = data_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let meta: ClusterMeta = serde_json::from_slice(&bytes).map_err(|e| {
                BrokerError::Internal(format!("{} is unreadable: {e}", path.display()))
            })?;
            if meta.broker_id != broker_id {
                return Err(BrokerError::Internal(format!(
                    "{} belongs to broker {}, not {broker_id}",
                    data_dir.display(),
                    meta.broker_id
                )));
            }
            Ok(Some(meta))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BrokerError::Internal(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod producer_id_tests {
    use super::*;

    #[test]
    fn ids_are_fresh_identities_bump_and_retries_repeat() {
        let mut p = ProducerIds::default();
        assert_eq!(p.init(1, None, None), Ok((1, 0)));
        assert_eq!(p.init(2, None, None), Ok((2, 0)));
        assert_eq!(
            p.init(2, None, None),
            Ok((2, 0)),
            "a retry gets the same answer"
        );
        assert_eq!(p.init(3, Some("svc-a"), None), Ok((3, 0)));
        assert_eq!(p.init(4, Some("svc-a"), None), Ok((3, 1)));
        assert_eq!(p.epoch_of(3), Some(1));
        // Bumping an anonymous id needs its current epoch.
        assert_eq!(p.init(5, None, Some((1, 0))), Ok((1, 1)));
        assert_eq!(
            p.init(6, None, Some((1, 0))),
            Err(InitRefusal::Fenced {
                producer_id: 1,
                epoch: 0,
                current: 1
            })
        );
        assert_eq!(
            p.init(7, None, Some((99, 0))),
            Err(InitRefusal::UnknownProducer(99))
        );
        // A retried bump gets its answer even after many other requests.
        for r in 100..400 {
            assert!(p.init(r, None, None).is_ok());
        }
        assert_eq!(p.init(5, None, Some((1, 0))), Ok((1, 1)));
        // An identity's older incarnation cannot bump itself past its replacement.
        assert_eq!(p.init(9, Some("svc-a"), Some((3, 1))), Ok((3, 2)));
        assert_eq!(
            p.init(10, Some("svc-a"), Some((3, 1))),
            Err(InitRefusal::Fenced {
                producer_id: 3,
                epoch: 1,
                current: 2
            })
        );
        p.epochs.insert(2, i16::MAX);
        assert_eq!(p.init(8, None, Some((2, i16::MAX))), Ok((304, 0)));
    }
}
