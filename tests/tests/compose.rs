//! The Docker compose deployment (`deploy/docker-compose.yml`), tested as a user runs it: the
//! image from `deploy/build-image.sh`, three brokers on a private network, the host's client
//! going through the published ports only. While a producer writes with `acks=all`, the leader
//! of a partition is killed (`docker kill`) and a broker is cut off its network (`docker network
//! disconnect`); after both come back every acknowledged record is there and every replica is
//! in sync again. Skipped, with the reason printed, where no Docker engine answers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord, SeekTo};

const PROJECT: &str = "keeldeploytest";
const BROKERS: [&str; 3] = ["127.0.0.1:9292", "127.0.0.1:9293", "127.0.0.1:9294"];
const WAIT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `docker-compose` (v1) where installed, else the `docker compose` plugin.
fn compose() -> Command {
    let file = repo().join("deploy/docker-compose.yml");
    let mut c = if Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Command::new("docker-compose")
    } else {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    };
    c.arg("-f").arg(file).args(["-p", PROJECT]);
    c
}

fn container(service: &str) -> String {
    let out = run(compose().args(["ps", "-q", service]));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Tears the cluster down (volumes too) however the test ends.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = compose()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn all_in_sync(client: &Client, topic: &str) -> bool {
    client.admin().describe_topic(topic).await.is_ok_and(|t| {
        t.partitions
            .iter()
            .all(|p| p.leader != 0 && p.replicas.len() == 3 && p.in_sync.len() == p.replicas.len())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_keeps_acknowledged_records_through_a_kill_and_a_network_cut() {
    if !Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("skipping the compose deployment test: no Docker engine answers `docker info`");
        return;
    }
    run(Command::new(repo().join("deploy/build-image.sh")).arg("keel:local"));
    let _down = Down;
    let _ = compose().args(["down", "-v", "--remove-orphans"]).output();
    run(compose().args(["up", "-d"]));

    let client = Client::connect(&BROKERS).await.expect("client");
    wait_for("three live brokers through the published ports", || async {
        client.admin().describe_cluster().await.is_ok_and(|c| {
            c.metadata_leader != 0 && c.brokers.iter().filter(|b| b.alive).count() == 3
        })
    })
    .await;
    let info = client.admin().describe_cluster().await.expect("describe");
    for b in &info.brokers {
        assert!(
            BROKERS.contains(&b.address.as_str()),
            "brokers advertise the published ports, not network-internal names: {b:?}"
        );
    }
    let topic = "deploy";
    client
        .admin()
        .create_topic(topic, 3, 3, BTreeMap::new())
        .await
        .expect("create topic");
    wait_for("the topic in sync", || all_in_sync(&client, topic)).await;

    // A producer that keeps writing with acks=all and records what was acknowledged.
    let acked: Arc<Mutex<Vec<(u32, u64, String)>>> = Arc::default();
    let failed = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let producer_task = {
        let (client, acked, failed, stop) = (
            client.clone(),
            Arc::clone(&acked),
            Arc::clone(&failed),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            let producer = client
                .producer(ProducerConfig::default())
                .expect("producer");
            let mut i = 0u64;
            let mut pending = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let value = format!("v{i:08}");
                let ack = producer
                    .send(ProducerRecord::new(topic, value.clone()).key(format!("k{}", i % 64)))
                    .await
                    .expect("send");
                pending.push((value, ack));
                if pending.len() >= 50 {
                    for (value, ack) in pending.drain(..) {
                        match ack.await {
                            Ok(m) => acked.lock().expect("lock").push((
                                m.partition,
                                m.offset.expect("acks=all gives an offset"),
                                value,
                            )),
                            Err(e) => failed.lock().expect("lock").push(e.to_string()),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                i += 1;
            }
            for (value, ack) in pending {
                match ack.await {
                    Ok(m) => acked.lock().expect("lock").push((
                        m.partition,
                        m.offset.expect("offset"),
                        value,
                    )),
                    Err(e) => failed.lock().expect("lock").push(e.to_string()),
                }
            }
            producer.close().await.expect("close");
        })
    };
    let acked_now = || acked.lock().expect("lock").len();
    wait_for("records flowing", || async { acked_now() > 500 }).await;

    // Kill the leader of partition 0.
    let leader = client
        .admin()
        .describe_topic(topic)
        .await
        .expect("describe")
        .partitions[0]
        .leader;
    let victim = format!("keel-{leader}");
    run(Command::new("docker").args(["kill", &container(&victim)]));
    let before = acked_now();
    wait_for("writes going on without the killed leader", || async {
        acked_now() > before + 1000
    })
    .await;
    run(compose().args(["start", &victim]));
    wait_for("the killed broker back in sync", || {
        all_in_sync(&client, topic)
    })
    .await;

    // Cut another broker off the network while writes go on, then reconnect it.
    let cut = format!("keel-{}", leader % 3 + 1);
    let network = format!("{PROJECT}_keel");
    let id = container(&cut);
    run(Command::new("docker").args(["network", "disconnect", &network, &id]));
    let before = acked_now();
    wait_for("writes going on without the cut broker", || async {
        acked_now() > before + 1000
    })
    .await;
    run(Command::new("docker").args(["network", "connect", "--alias", &cut, &network, &id]));
    let before = acked_now();
    wait_for("more writes after the reconnect", || async {
        acked_now() > before + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    producer_task.await.expect("producer task");
    wait_for("every replica in sync again", || {
        all_in_sync(&client, topic)
    })
    .await;

    // Every acknowledged record is readable at its offset.
    let acked = acked.lock().expect("lock").clone();
    let failures = failed.lock().expect("lock").clone();
    println!(
        "{} records acknowledged, {} failed ({:?})",
        acked.len(),
        failures.len(),
        failures.first()
    );
    let mut want: BTreeMap<(u32, u64), String> = BTreeMap::new();
    for (p, o, v) in acked {
        assert!(
            want.insert((p, o), v).is_none(),
            "offset {o} of {p} acknowledged twice"
        );
    }
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign(&[(topic, 0), (topic, 1), (topic, 2)]);
    for p in 0..3 {
        consumer
            .seek(topic, p, SeekTo::Beginning)
            .await
            .expect("seek");
    }
    let mut got: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    while !want.keys().all(|k| got.contains_key(k)) {
        assert!(Instant::now() < deadline, "acknowledged records missing");
        for r in consumer
            .poll(Duration::from_millis(500))
            .await
            .expect("poll")
        {
            let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
            got.insert((r.partition, r.offset), v);
        }
    }
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "record at {k:?}");
    }
}
