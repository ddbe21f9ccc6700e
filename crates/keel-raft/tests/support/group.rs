//! Driving a test group's Raft nodes: their config, start-up, waits and shutdown, the same
//! for every state machine under test.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use keel_raft::KeelRaft;
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};

use super::Router;

/// How long a test waits for a group to get anywhere.
pub const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// openraft's errors as the `io::Error` the tests return.
pub fn err(e: impl ToString) -> io::Error {
    io::Error::other(e.to_string())
}

/// `n` fresh temporary directories, one a replica.
pub fn temp_dirs(n: usize) -> io::Result<Vec<tempfile::TempDir>> {
    (0..n).map(|_| tempfile::tempdir()).collect()
}

/// A validated config with these timings (ms) and the rest of `rest`; openraft never takes
/// snapshots on its own, the tests (as the broker) decide when.
pub fn raft_config(
    heartbeat_interval: u64,
    election_timeout: Range<u64>,
    rest: Config,
) -> Arc<Config> {
    let c = Config {
        heartbeat_interval,
        election_timeout_min: election_timeout.start,
        election_timeout_max: election_timeout.end,
        snapshot_policy: SnapshotPolicy::Never,
        ..rest
    };
    Arc::new(c.validate().expect("config"))
}

/// Node `id`, which the test knows is running.
pub fn node<SM: RaftStateMachine<KeelRaft>>(router: &Router<SM>, id: u64) -> Raft<KeelRaft, SM> {
    router.get(id).expect("node is running")
}

/// Shuts a node down and takes it out of the network.
pub async fn stop<SM: RaftStateMachine<KeelRaft>>(router: &Router<SM>, id: u64) -> io::Result<()> {
    if let Some(n) = router.remove(id) {
        n.shutdown().await.map_err(err)?;
    }
    Ok(())
}

/// Initialises the group from `members[0]` and waits until a leader committed its blank entry.
pub async fn init<SM: RaftStateMachine<KeelRaft>>(
    router: &Router<SM>,
    members: &[u64],
) -> io::Result<u64> {
    node(router, members[0])
        .initialize(BTreeMap::from_iter(
            members.iter().map(|&i| (i, BasicNode::default())),
        ))
        .await
        .map_err(err)?;
    let m = node(router, members[0])
        .wait(WAIT)
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .map_err(err)?;
    let leader = m.current_leader.expect("leader");
    wait_ready_leader(&node(router, leader)).await?;
    Ok(leader)
}

/// Waits until `n` leads and has committed an entry of its own term (its blank entry), so
/// that it serves writes and reads at once.
pub async fn wait_ready_leader<SM: RaftStateMachine<KeelRaft>>(
    n: &Raft<KeelRaft, SM>,
) -> io::Result<()> {
    n.wait(WAIT)
        .metrics(
            |m| {
                m.state == ServerState::Leader
                    && m.last_applied
                        .is_some_and(|a| m.vote.leader_id().term == a.committed_leader_id().term)
            },
            "leader committed its blank entry",
        )
        .await
        .map_err(err)?;
    Ok(())
}

pub async fn wait_applied<SM: RaftStateMachine<KeelRaft>>(
    n: &Raft<KeelRaft, SM>,
    index: u64,
) -> io::Result<()> {
    n.wait(WAIT)
        .applied_index_at_least(Some(index), "applied")
        .await
        .map_err(err)?;
    Ok(())
}
