//! Storage identity with real brokers: a broker whose data directory was wiped is refused
//! (it stops, saying why) until `keel cluster replace-broker`, after which it rejoins, its
//! replica is rebuilt byte for byte and nothing acknowledged is lost; a data directory of
//! another cluster is refused too; and a wiped broker is taken out of, and rebuilt in, the
//! groups that were asleep (idle) when it was lost.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_tests::broker::{BrokerProc, keel_bin, wait_until};
use keel_tests::cluster::{assert_acked_and_replicas_identical, cluster_with_topic};
use keel_tests::records::produce_all;

const WAIT: Duration = Duration::from_secs(60);

/// What a data directory's `storage-identity` file records (`None` before the broker wrote
/// one): a CRC-checked state file, `KEELRST1`, a little-endian length, then JSON.
fn identity(data_dir: &Path) -> Option<Identity> {
    let bytes = std::fs::read(data_dir.join("storage-identity")).ok()?;
    let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
    let v: serde_json::Value = serde_json::from_slice(bytes.get(12..12 + len)?).ok()?;
    Some(Identity {
        cluster_id: v["cluster_id"].as_str()?.to_owned(),
    })
}

struct Identity {
    cluster_id: String,
}

fn values(from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("value-{i:06}")).collect()
}

/// Waits until the broker process exits by itself; returns its log.
fn wait_stopped(b: &mut BrokerProc) -> String {
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = b.reap_exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "broker {} kept running", b.id);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "broker {} stopped with {status}", b.id);
    std::fs::read_to_string(b.data_dir.with_extension(format!("broker-{}.log", b.id)))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_broker_is_refused_until_replaced_then_rebuilt_and_a_foreign_directory_is_refused()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, client) = cluster_with_topic(dir.path(), "ids", 1, 3).await;
    cluster.wait_leader("ids", 0, WAIT).await;
    let dirs: Vec<_> = (1..=3).map(|i| cluster.node(i).data_dir.clone()).collect();
    wait_until("every directory to record the cluster id", WAIT, || {
        let ids: Vec<String> = dirs
            .iter()
            .filter_map(|d| identity(d))
            .map(|i| i.cluster_id)
            .collect();
        ids.len() == 3 && !ids[0].is_empty() && ids.iter().all(|c| *c == ids[0])
    });
    let cluster_id = identity(&dirs[0]).map(|i| i.cluster_id).unwrap_or_default();
    let mut acked = produce_all(&client, "ids", values(0, 500)).await;

    // Broker 1, the lowest id (which initialised the cluster), loses its directory. Started
    // again, it does not initialise a second cluster: it is refused and stops, saying why.
    cluster.node(1).kill9();
    std::fs::remove_dir_all(&dirs[0]).expect("wipe broker 1");
    cluster.node(1).relaunch();
    let log = wait_stopped(cluster.node(1));
    assert!(
        log.contains("was wiped or replaced") && log.contains("keel cluster replace-broker 1"),
        "broker 1's log does not say why it stopped:\n{log}"
    );
    assert!(
        log.contains("already form a cluster: not initialising"),
        "broker 1 initialised a new metadata group:\n{log}"
    );
    // Two of three voters keep acknowledging.
    acked.extend(produce_all(&client, "ids", values(500, 1000)).await);

    let out = Command::new(keel_bin())
        .args([
            "cluster",
            "replace-broker",
            "1",
            "--brokers",
            &cluster.brokers(),
        ])
        .output()
        .expect("keel cluster replace-broker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ids/0"),
        "replace-broker: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // On its new directory it registers, rejoins as a new replica and catches up.
    cluster.node(1).relaunch();
    let deadline = Instant::now() + WAIT;
    loop {
        let t = client
            .admin()
            .describe_topic("ids")
            .await
            .expect("describe");
        let mut in_sync = t.partitions[0].in_sync.clone();
        in_sync.sort_unstable();
        if in_sync == vec![1, 2, 3] {
            break;
        }
        if Instant::now() > deadline {
            let logs = cluster.preserve_logs();
            panic!(
                "broker 1 never caught up: {t:?}; logs in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until("the new directory to record the cluster", WAIT, || {
        identity(&dirs[0]).is_some_and(|i| i.cluster_id == cluster_id)
    });
    // It was a voter of the metadata group and is one again once caught up.
    let metrics = cluster.node(2).http.clone();
    wait_until("broker 1 to be a metadata voter again", WAIT, || {
        keel_tests::broker::http_get(&metrics, "/metrics")
            .is_some_and(|(_, body)| body.lines().any(|l| l == "keel_metadata_voters 3"))
    });
    acked.extend(produce_all(&client, "ids", values(1000, 1500)).await);
    let acked: BTreeMap<u64, String> = acked.into_iter().map(|(v, o)| (o, v)).collect();
    assert_acked_and_replicas_identical(&mut cluster, &client, "ids", 0, &acked).await;

    // A directory of another cluster (a single broker's) given to broker 2 is refused.
    let other = dir.path().join("other");
    let mut single = BrokerProc::start(&other, 2);
    wait_until("the single broker to name its cluster", WAIT, || {
        identity(&other).is_some_and(|i| !i.cluster_id.is_empty())
    });
    assert!(single.terminate().success());
    std::fs::remove_dir_all(&dirs[1]).expect("remove broker 2's directory");
    std::fs::rename(&other, &dirs[1]).expect("give broker 2 the other cluster's directory");
    for id in [1, 3] {
        cluster.node(id).relaunch();
    }
    cluster.node(2).relaunch();
    let log = wait_stopped(cluster.node(2));
    assert!(
        log.contains(&format!(
            "belongs to cluster {}",
            identity(&dirs[1]).map(|i| i.cluster_id).unwrap_or_default()
        )),
        "broker 2's log does not say why it stopped:\n{log}"
    );
    for id in [1, 3] {
        assert!(cluster.node(id).terminate().success());
    }
}

/// Every partition of `topics`, as the cluster reports it: `(topic/partition, leader,
/// replicas, in-sync set)` where the leader is missing or a replica is out of sync.
async fn out_of_sync(
    client: &keel_client::Client,
    topics: &[&str],
) -> Vec<(String, u32, Vec<u32>, Vec<u32>)> {
    let mut lagging = Vec::new();
    for topic in topics {
        let Ok(t) = client.admin().describe_topic(topic).await else {
            lagging.push(((*topic).to_owned(), 0, Vec::new(), Vec::new()));
            continue;
        };
        for (i, p) in t.partitions.iter().enumerate() {
            let mut replicas = p.replicas.clone();
            let mut in_sync = p.in_sync.clone();
            replicas.sort_unstable();
            in_sync.sort_unstable();
            if p.leader == 0 || in_sync != replicas {
                lagging.push((format!("{topic}/{i}"), p.leader, replicas, in_sync));
            }
        }
    }
    lagging
}

/// The stall seed 6 of the fault run with wipes found (docs/testing.md): an idle partition's
/// group goes to sleep (no heartbeats), and a sleeping leader's lease has expired, so the Raft
/// core refused the membership change that takes a replaced broker out of the voters, on every
/// retry. The offsets partitions led by the brokers that were not wiped, idle since the
/// coordinators settled on their preferred replicas, never let the replaced broker register
/// again. Here every group is asleep when the coordinator's broker is wiped; after
/// `replace-broker` every partition, `__consumer_offsets` included, must be whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_coordinator_is_replaced_in_groups_that_were_asleep() {
    const OFFSETS: &str = "__consumer_offsets";
    // Generous for a debug build on two cores; a healthy rebuild of these small partitions
    // takes a few seconds.
    const HEAL: Duration = Duration::from_secs(45);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, client) = cluster_with_topic(dir.path(), "sleepy", 3, 3).await;
    cluster.wait_leader("sleepy", 0, WAIT).await;
    let acked = produce_all(&client, "sleepy", values(0, 200)).await;
    // Committing offsets creates the offsets topic; the groups land on several partitions.
    let groups: Vec<String> = (0..6).map(|i| format!("sleeper-{i}")).collect();
    for (i, g) in groups.iter().enumerate() {
        let deadline = Instant::now() + WAIT;
        while let Err(e) = client
            .admin()
            .commit_offsets(g, &[("sleepy", 0, 10 + i as u64, "")])
            .await
        {
            assert!(Instant::now() < deadline, "committing for {g}: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The coordinators settle on their preferred replicas (the hand-back), then every group
    // goes to sleep.
    let deadline = Instant::now() + WAIT;
    let offsets = loop {
        if let Ok(t) = client.admin().describe_topic(OFFSETS).await
            && t.partitions.iter().all(|p| {
                p.replicas.first() == Some(&p.leader) && p.in_sync.len() == p.replicas.len()
            })
        {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the offsets partitions did not settle on their preferred leaders"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let hosted = 3 + offsets.partitions.len();
    let metrics: Vec<String> = (1..=3).map(|i| cluster.node(i).http.clone()).collect();
    wait_until("every replica to be asleep", WAIT, || {
        metrics
            .iter()
            .all(|m| keel_tests::broker::metric(m, "keel_quiet_partitions") >= hosted as f64)
    });
    // Wipe the broker leading the first offsets partition: the others lead sleeping groups
    // that count it among their voters.
    let wiped = offsets.partitions[0].leader;
    assert!(
        offsets.partitions.iter().any(|p| p.leader != wiped),
        "every offsets partition is led by broker {wiped}: {offsets:?}"
    );
    let wiped_dir = cluster.node(wiped).data_dir.clone();
    cluster.node(wiped).kill9();
    std::fs::remove_dir_all(&wiped_dir).expect("wipe the coordinator's broker");
    cluster.node(wiped).relaunch();
    wait_stopped(cluster.node(wiped));
    let deadline = Instant::now() + WAIT;
    let rebuilt = loop {
        match client.admin().replace_broker(wiped).await {
            Ok(rebuilt) => break rebuilt,
            Err(e) => {
                assert!(Instant::now() < deadline, "replace-broker {wiped}: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert!(
        rebuilt.iter().any(|p| p.starts_with(OFFSETS)),
        "replace-broker rebuilds no offsets partition: {rebuilt:?}"
    );
    cluster.node(wiped).relaunch();
    let started = Instant::now();
    loop {
        let lagging = out_of_sync(&client, &["sleepy", OFFSETS]).await;
        if lagging.is_empty() {
            break;
        }
        if started.elapsed() > HEAL {
            let logs = cluster.preserve_logs();
            panic!(
                "not whole {HEAL:?} after replacing broker {wiped} (partition, leader, replicas, in sync): {lagging:?}; logs in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "every partition whole {:?} after broker {wiped} was replaced",
        started.elapsed()
    );
    // Nothing committed was lost, on the topic or in the groups' offsets.
    for (i, g) in groups.iter().enumerate() {
        let committed = client
            .admin()
            .fetch_offsets(g, &[("sleepy".to_owned(), 0)])
            .await
            .unwrap_or_else(|e| panic!("fetching {g}'s offsets: {e}"));
        assert_eq!(
            committed.iter().map(|c| c.offset).collect::<Vec<_>>(),
            vec![10 + i as u64],
            "{g}"
        );
    }
    // Stops the brokers to compare their replicas.
    let acked: BTreeMap<u64, String> = acked.into_iter().map(|(v, o)| (o, v)).collect();
    assert_acked_and_replicas_identical(&mut cluster, &client, "sleepy", 0, &acked).await;
}
