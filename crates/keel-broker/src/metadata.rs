//! The cluster metadata of a single-node broker: topics, their ids, partition counts and
//! configs, persisted atomically as JSON. The [cluster] issue replaces this store with the
//! metadata Raft group; the rest of the broker only sees [`ClusterMeta`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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
}

const FILE: &str = "metadata.json";

/// Loads the metadata of `data_dir`, or a fresh one for a new broker. Refuses a data directory
/// that belongs to another broker id.
pub fn load(data_dir: &Path, broker_id: u32) -> Result<ClusterMeta> {
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
            Ok(meta)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClusterMeta {
            broker_id,
            next_topic_id: 1,
            topics: BTreeMap::new(),
        }),
        Err(e) => Err(BrokerError::Internal(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

/// Writes the metadata atomically: temporary file, fsync, rename, directory fsync.
pub fn store(data_dir: &Path, meta: &ClusterMeta) -> Result<()> {
    let io = |what: &str, p: &Path, e: std::io::Error| BrokerError::Storage {
        message: format!("{what} {}: {e}", p.display()),
        definite: true,
    };
    let tmp: PathBuf = data_dir.join(format!("{FILE}.tmp"));
    let path = data_dir.join(FILE);
    let bytes =
        serde_json::to_vec_pretty(meta).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(&bytes).map_err(|e| io("writing", &tmp, e))?;
    f.sync_all().map_err(|e| io("flushing", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming", &path, e))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", data_dir, e))
}
