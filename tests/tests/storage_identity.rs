//! Storage identity with real brokers: a broker whose data directory was wiped is refused
//! (it stops, saying why) until `keel cluster replace-broker`, after which it rejoins, its
//! replica is rebuilt byte for byte and nothing acknowledged is lost; a data directory of
//! another cluster is refused too.

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
