//! What the metadata group's commands mean on this broker: applies [`Command`]s to a
//! [`ClusterState`], keeps each command's outcome for its proposer, and publishes each new
//! state on a watch channel (the reconciler follows it). keel-raft's `MetaSm` runs it.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_raft::{BatchData, MetaMachine};
use tokio::sync::watch;

use super::meta::{ClusterState, Command, Outcome, Reply};

/// How many outcomes of recent commands are kept for their proposers to collect.
const OUTCOMES_KEPT: usize = 4096;

/// Encodes a command as the data of a metadata Raft entry (JSON, in a one-record batch).
pub fn encode_command(cmd: &Command) -> io::Result<BatchData> {
    let json = serde_json::to_vec(cmd).map_err(io::Error::other)?;
    keel_raft::encode_command(&json)
}

#[derive(Debug)]
struct Applied {
    state: ClusterState,
    outcomes: BTreeMap<u64, Outcome>,
}

/// The cluster metadata as applied on this broker (cheap to clone).
#[derive(Debug, Clone)]
pub struct MetadataMachine {
    applied: Arc<Mutex<Applied>>,
    tx: watch::Sender<Arc<ClusterState>>,
}

impl Default for MetadataMachine {
    fn default() -> Self {
        let state = ClusterState::new();
        Self {
            tx: watch::channel(Arc::new(state.clone())).0,
            applied: Arc::new(Mutex::new(Applied {
                state,
                outcomes: BTreeMap::new(),
            })),
        }
    }
}

impl MetadataMachine {
    fn lock(&self) -> MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Follows the applied state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.tx.subscribe()
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.tx.borrow().clone()
    }

    /// The outcome of the command applied at `index` (collected once by its proposer).
    pub fn take_outcome(&self, index: u64) -> Option<Outcome> {
        self.lock().outcomes.remove(&index)
    }
}

impl MetaMachine for MetadataMachine {
    fn apply(&self, index: u64, command: &[u8]) {
        let mut g = self.lock();
        let outcome = match serde_json::from_slice::<Command>(command) {
            Ok(cmd) => g.state.apply(&cmd),
            Err(e) => {
                // Every replica decodes the same bytes, so they all skip it.
                tracing::error!(index, error = %e, "undecodable metadata command skipped");
                Ok(Reply::Done)
            }
        };
        g.outcomes.insert(index, outcome);
        while g.outcomes.len() > OUTCOMES_KEPT {
            g.outcomes.pop_first();
        }
    }

    fn applied(&self) {
        let state = Arc::new(self.lock().state.clone());
        self.tx.send_replace(state);
    }

    fn snapshot(&self) -> io::Result<Vec<u8>> {
        serde_json::to_vec(&self.lock().state).map_err(io::Error::other)
    }

    fn restore(&self, data: &[u8]) -> io::Result<()> {
        let state: ClusterState = serde_json::from_slice(data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.lock().state = state;
        self.applied();
        Ok(())
    }
}
