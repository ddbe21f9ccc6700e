//! An in-process three-replica group over the keel-log store: client writes get their offsets
//! from the log, every replica assigns the same offsets, and a restarted follower catches up
//! from its own log.

mod support;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_raft::KeelLogStore;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use support::{MemStateMachine, batch, layout, small_config};

type Router = support::Router<MemStateMachine>;

fn config() -> Arc<Config> {
    let c = Config {
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        snapshot_policy: SnapshotPolicy::Never,
        ..Config::default()
    };
    Arc::new(c.validate().expect("config"))
}

async fn start(router: &Router, id: u64, dir: &Path) -> io::Result<KeelLogStore> {
    let store = KeelLogStore::open(dir, small_config())?;
    let raft = Raft::new(
        id,
        config(),
        router.clone(),
        store.clone(),
        MemStateMachine::default(),
    )
    .await
    .map_err(|e| io::Error::other(e.to_string()))?;
    router.insert(id, raft);
    Ok(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_agree_on_offsets_and_a_restarted_follower_catches_up() -> io::Result<()> {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let router = Router::default();
    let mut stores = BTreeMap::new();
    for id in 1..=3u64 {
        stores.insert(id, start(&router, id, dirs[id as usize - 1].path()).await?);
    }
    let n1 = router.get(1).expect("n1");
    n1.initialize(BTreeMap::from_iter(
        (1..=3u64).map(|i| (i, BasicNode::default())),
    ))
    .await
    .map_err(|e| io::Error::other(e.to_string()))?;
    let timeout = Some(Duration::from_secs(10));
    let m = n1
        .wait(timeout)
        .metrics(|m| m.current_leader.is_some(), "leader elected")
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    let leader_id = m.current_leader.expect("leader");
    let leader = router.get(leader_id).expect("leader node");
    leader
        .wait(timeout)
        .metrics(
            |m| m.state == openraft::ServerState::Leader && m.last_applied.is_some(),
            "leader ready",
        )
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;

    let mut expect_offset = 0;
    for i in 0..20u64 {
        let n = (i % 5 + 1) as usize;
        let resp = leader
            .client_write(batch(&format!("w{i}"), n))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        assert_eq!(resp.data.base_offset, expect_offset, "write {i}");
        expect_offset += n as u64;
        assert_eq!(resp.data.next_offset, expect_offset);
    }
    let last = leader
        .metrics()
        .borrow_watched()
        .last_applied
        .expect("applied")
        .index;
    for id in 1..=3u64 {
        router
            .get(id)
            .expect("node")
            .wait(timeout)
            .applied_index_at_least(Some(last), "all applied")
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    let reference = layout(&stores[&leader_id]);
    assert_eq!(reference.iter().filter(|l| !l.4).count(), 20);
    for id in 1..=3u64 {
        assert_eq!(layout(&stores[&id]), reference, "replica {id} differs");
        assert_eq!(stores[&id].log().log_end_offset(), expect_offset);
    }

    // Restart a follower from its directory while the others keep writing.
    let follower = (1..=3u64).find(|&i| i != leader_id).expect("follower");
    let f = router.remove(follower).expect("f");
    f.shutdown()
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    drop(f);
    stores.remove(&follower);
    for i in 20..30u64 {
        leader
            .client_write(batch(&format!("w{i}"), 2))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    let store = start(&router, follower, dirs[follower as usize - 1].path()).await?;
    stores.insert(follower, store);
    let last = leader
        .metrics()
        .borrow_watched()
        .last_applied
        .expect("applied")
        .index;
    router
        .get(follower)
        .expect("restarted")
        .wait(timeout)
        .applied_index_at_least(Some(last), "restarted follower caught up")
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    assert_eq!(layout(&stores[&follower]), layout(&stores[&leader_id]));

    for id in 1..=3u64 {
        if let Some(n) = router.get(id) {
            n.shutdown()
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
    }
    Ok(())
}
