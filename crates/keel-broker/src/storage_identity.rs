//! The identity of a broker's data directory: which broker and cluster it belongs to, and a
//! random storage id written at its first start (see `keel_raft::identity` for why).
//!
//! Kept in `<data-dir>/storage-identity`, a CRC-checked state file. A directory of an earlier
//! version (data, no identity file) gets one on its next start: its data is its own.

use std::path::Path;
use std::sync::Arc;

use keel_log::fs::Fs;
use keel_raft::state_file::StateFile;
use serde::{Deserialize, Serialize};

use crate::error::{BrokerError, Result};

/// Name of the identity file in the data directory.
pub const FILE: &str = "storage-identity";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageIdentity {
    pub broker_id: u32,
    /// Random, 128 bits in hex; never reused.
    pub storage_id: String,
    /// The cluster the directory belongs to; empty until the broker has learned it.
    #[serde(default)]
    pub cluster_id: String,
}

/// A new random id: 128 bits from the OS, in hex.
pub fn random_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| BrokerError::Internal(format!("no randomness for a new id: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn storage_err(action: &str, e: std::io::Error) -> BrokerError {
    BrokerError::Storage {
        message: format!("{action}: {e}"),
        definite: true,
    }
}

/// The identity of `data_dir`, created on its first start. Refuses a directory that belongs
/// to another broker id.
pub fn load_or_create(
    fs: &Arc<dyn Fs>,
    data_dir: &Path,
    broker_id: u32,
) -> Result<StorageIdentity> {
    fs.create_dir_all(data_dir)
        .map_err(|e| storage_err(&format!("creating {}", data_dir.display()), e))?;
    let file = StateFile::new(data_dir, FILE);
    match file
        .load::<StorageIdentity>(&**fs)
        .map_err(|e| storage_err("reading the storage identity", e))?
    {
        Some(id) if id.broker_id != broker_id => Err(BrokerError::invalid(
            "data_dir",
            format!(
                "data directory {} belongs to broker {}, not broker {broker_id}: start it with --id {} or give this broker its own directory",
                data_dir.display(),
                id.broker_id,
                id.broker_id
            ),
        )),
        Some(id) => Ok(id),
        None => {
            let id = StorageIdentity {
                broker_id,
                storage_id: random_id()?,
                cluster_id: String::new(),
            };
            file.store(&**fs, &id)
                .map_err(|e| storage_err("writing the storage identity", e))?;
            tracing::info!(storage_id = %id.storage_id, dir = %data_dir.display(), "new data directory: wrote its storage identity");
            Ok(id)
        }
    }
}

/// Records the cluster the directory belongs to, once learned from the metadata. A directory
/// that already belongs to another cluster is refused.
pub fn record_cluster(
    fs: &Arc<dyn Fs>,
    data_dir: &Path,
    identity: &mut StorageIdentity,
    cluster_id: &str,
) -> Result<()> {
    if identity.cluster_id == cluster_id || cluster_id.is_empty() {
        return Ok(());
    }
    if !identity.cluster_id.is_empty() {
        return Err(foreign_cluster(data_dir, &identity.cluster_id, cluster_id));
    }
    let mut updated = identity.clone();
    cluster_id.clone_into(&mut updated.cluster_id);
    StateFile::new(data_dir, FILE)
        .store(&**fs, &updated)
        .map_err(|e| storage_err("recording the cluster id", e))?;
    *identity = updated;
    Ok(())
}

pub fn foreign_cluster(data_dir: &Path, ours: &str, theirs: &str) -> BrokerError {
    BrokerError::invalid(
        "data_dir",
        format!(
            "data directory {} belongs to cluster {ours}, but this cluster is {theirs}: start the broker with an empty data directory to join this cluster",
            data_dir.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_log::fs::RealFs;

    fn fs() -> Arc<dyn Fs> {
        Arc::new(RealFs)
    }

    #[test]
    fn first_start_writes_an_identity_that_later_starts_read() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| BrokerError::Internal(e.to_string()))?;
        let first = load_or_create(&fs(), dir.path(), 3)?;
        assert_eq!(first.broker_id, 3);
        assert_eq!(first.storage_id.len(), 32);
        assert_eq!(load_or_create(&fs(), dir.path(), 3)?, first);
        let other = tempfile::tempdir().map_err(|e| BrokerError::Internal(e.to_string()))?;
        assert_ne!(
            load_or_create(&fs(), other.path(), 3)?.storage_id,
            first.storage_id
        );
        Ok(())
    }

    #[test]
    fn another_brokers_directory_is_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| BrokerError::Internal(e.to_string()))?;
        load_or_create(&fs(), dir.path(), 1)?;
        let err = load_or_create(&fs(), dir.path(), 2)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("belongs to broker 1")),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn the_cluster_is_recorded_once_and_another_is_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| BrokerError::Internal(e.to_string()))?;
        let mut id = load_or_create(&fs(), dir.path(), 1)?;
        record_cluster(&fs(), dir.path(), &mut id, "c1")?;
        assert_eq!(load_or_create(&fs(), dir.path(), 1)?.cluster_id, "c1");
        record_cluster(&fs(), dir.path(), &mut id, "c1")?;
        let err = record_cluster(&fs(), dir.path(), &mut id, "c2")
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("belongs to cluster c1")),
            "{err:?}"
        );
        assert_eq!(load_or_create(&fs(), dir.path(), 1)?.cluster_id, "c1");
        Ok(())
    }
}
