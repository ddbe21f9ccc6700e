//! Converting the data directory of a single-node broker from before every broker ran the
//! metadata group and its partitions as Raft groups (a cluster of one).
//!
//! Such a directory holds `metadata.json` (the topics, their ids and configs, the producer
//! ids) and `topics/<name>-<id>/<partition>/` with a plain keel log in each. The conversion
//! runs at start-up, automatically and resumably:
//!
//! 1. here, before the cluster node starts: each partition's files move into `log/` (where a
//!    replica keeps its log) and the log is adopted as the log of a group whose one voter is
//!    this broker (`keel_raft::adopt_as_single_voter`); both steps skip what is done;
//! 2. then (`ClusterNode::adopt_legacy`) one metadata command installs the catalogue in the
//!    new metadata group, keeping topic ids so that the directories still match;
//! 3. last, `metadata.json` is renamed to `metadata.json.converted`: only then is the
//!    conversion done, so a crash at any earlier point repeats the remaining steps.

use std::path::Path;
use std::sync::Arc;

use keel_log::fs::Fs;
use keel_log::{LogConfig, SystemClock};
use keel_raft::KeelLogStore;

use crate::error::{BrokerError, Result};
use crate::metadata::{self, ClusterMeta};

/// Where `metadata.json` goes once the conversion is complete.
pub const CONVERTED: &str = "metadata.json.converted";

/// The directory a replica keeps its log in (see `keel_raft::KeelLogStore`).
const LOG_DIR: &str = "log";

fn io_err(what: &str, path: &Path, e: std::io::Error) -> BrokerError {
    BrokerError::Storage {
        message: format!(
            "converting a single-node data directory: {what} {}: {e}",
            path.display()
        ),
        definite: true,
    }
}

/// Step 1 for every partition of a single-node data directory, if `data_dir` is one; returns
/// its catalogue for step 2. Blocking.
pub fn convert_partitions(
    data_dir: &Path,
    broker_id: u32,
    peer_address: &str,
    fs: &Arc<dyn Fs>,
) -> Result<Option<ClusterMeta>> {
    let Some(meta) = metadata::load(data_dir, broker_id)? else {
        return Ok(None);
    };
    tracing::info!(dir = %data_dir.display(), topics = meta.topics.len(), "converting a single-node data directory into a cluster of one");
    for tm in meta.topics.values() {
        let topic_dir = data_dir.join("topics").join(tm.dir_name());
        for p in 0..tm.partitions {
            let dir = topic_dir.join(p.to_string());
            move_log_files(&dir)?;
            let store = KeelLogStore::open_with(
                &dir,
                LogConfig::default(),
                Arc::clone(fs),
                Arc::new(SystemClock),
            )
            .map_err(|e| io_err("opening", &dir, e))?;
            keel_raft::adopt_as_single_voter(&store, u64::from(broker_id), peer_address)
                .map_err(|e| io_err("adopting the log of", &dir, e))?;
            store
                .checkpoint()
                .map_err(|e| io_err("checkpointing", &dir, e))?;
        }
    }
    Ok(Some(meta))
}

/// Moves a partition's log files (everything but Raft state files and the `log/` directory)
/// into `log/`, then syncs both directories.
fn move_log_files(dir: &Path) -> Result<()> {
    let log_dir = dir.join(LOG_DIR);
    std::fs::create_dir_all(&log_dir).map_err(|e| io_err("creating", &log_dir, e))?;
    let entries = std::fs::read_dir(dir).map_err(|e| io_err("listing", dir, e))?;
    let mut moved = 0;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("listing", dir, e))?;
        let name = entry.file_name();
        let is_file = entry
            .file_type()
            .map_err(|e| io_err("inspecting", &entry.path(), e))?
            .is_file();
        if !is_file || name.to_string_lossy().starts_with("raft-") {
            continue;
        }
        let to = log_dir.join(&name);
        std::fs::rename(entry.path(), &to).map_err(|e| io_err("moving", &to, e))?;
        moved += 1;
    }
    if moved > 0 {
        for d in [&log_dir, dir] {
            std::fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("syncing", d, e))?;
        }
    }
    Ok(())
}

/// Step 3: marks the conversion done.
pub fn finish(data_dir: &Path) -> Result<()> {
    let from = data_dir.join(metadata::FILE);
    let to = data_dir.join(CONVERTED);
    std::fs::rename(&from, &to).map_err(|e| io_err("renaming", &from, e))?;
    std::fs::File::open(data_dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("syncing", data_dir, e))?;
    tracing::info!(dir = %data_dir.display(), "converted the single-node data directory; its old catalogue is kept as {CONVERTED}");
    Ok(())
}
