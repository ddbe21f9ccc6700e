//! A broker whose fsyncs start failing (the storage crate's simulated disk, `--fault-fs`):
//! its partition replica stops without acknowledging anything it could not make durable, the
//! other two keep acknowledging, and once its metadata log fails too the broker exits with
//! status 1 rather than stay half alive. Restarted (as its supervisor would), it recovers from
//! what its disk holds, catches up, and ends byte-identical to the others.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_client::{Client, ProducerConfig, ProducerRecord};
use keel_tests::cluster::{ClusterProc, assert_acked_and_replicas_identical};

const TOPIC: &str = "flaky";
const WAIT: Duration = Duration::from_secs(60);

async fn produce(client: &Client, from: u64, n: u64, acked: &mut BTreeMap<u64, String>) {
    let producer = client
        .producer(ProducerConfig::default())
        .expect("producer");
    let mut pending = Vec::new();
    for i in from..from + n {
        let v = format!("v{i:08}");
        pending.push((
            v.clone(),
            producer
                .send(ProducerRecord::new(TOPIC, v).partition(0))
                .await
                .expect("send"),
        ));
    }
    for (v, ack) in pending {
        let m = ack
            .await
            .expect("a majority with working disks acknowledges");
        acked.insert(m.offset.expect("offset"), v);
    }
    producer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_fsyncs_stop_the_broker_cleanly_and_it_recovers_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = ClusterProc::start_with(dir.path(), 3, &["--fault-fs"]);
    let client = keel_tests::cluster::client(&cluster).await;
    client
        .admin()
        .create_topic(TOPIC, 1, 3, BTreeMap::new())
        .await
        .expect("create");
    let mut acked = BTreeMap::new();
    produce(&client, 0, 2000, &mut acked).await;

    // Broker 3's fsyncs fail from now on. Writes go on through the other two.
    cluster.node(3).toggle_failing_fsyncs();
    produce(&client, 2000, 2000, &mut acked).await;
    // A new topic is a metadata entry every voter must make durable: broker 3 cannot, and exits.
    client
        .admin()
        .create_topic("poke", 1, 3, BTreeMap::new())
        .await
        .expect("create");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = cluster.node(3).reap_exited() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "broker 3 kept running with failing metadata storage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1), "broker 3 exited with {status}");
    let log = std::fs::read_to_string(dir.path().join("node-3.broker-3.log")).expect("log");
    assert!(
        log.contains("the metadata group stopped"),
        "broker 3 did not say why it exited"
    );
    assert!(
        log.contains("log poisoned"),
        "broker 3's log was not poisoned"
    );

    // Restarted with a working disk, it recovers and catches up.
    cluster.node(3).restart();
    produce(&client, 4000, 1000, &mut acked).await;
    let deadline = Instant::now() + WAIT;
    while !client
        .admin()
        .describe_topic(TOPIC)
        .await
        .is_ok_and(|t| t.partitions[0].in_sync.len() == 3)
    {
        assert!(Instant::now() < deadline, "broker 3 never caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Nothing acknowledged was lost, and the replicas are byte-identical.
    assert_acked_and_replicas_identical(&mut cluster, &client, TOPIC, 0, &acked).await;
}
