//! The faults that change the cluster rather than hold a broker: moving a partition,
//! decommissioning a broker, flipping a byte in a sealed segment.

use std::time::{Duration, Instant};

use keel_client::Client;
use keel_tests::bit_rot::{flip_batch, sealed_segments};
use keel_tests::broker::metric;
use keel_tests::cluster::ClusterProc;
use keel_tests::faults::new_replicas;

use crate::load::Events;
use crate::{PARTITIONS, TOPIC, WAIT};

/// A `Reassign`: moves partition `p` to the replica set `pick` chooses among the brokers not
/// decommissioned (as many replicas as it has), without waiting for the move.
pub(crate) async fn reassign(
    client: &Client,
    p: u32,
    pick: u64,
    decommissioned: Option<u32>,
    nodes: u32,
) -> String {
    let Ok(t) = client.admin().describe_topic(TOPIC).await else {
        return format!("partition {p}: not described, not moved");
    };
    let Some(current) = t.partitions.get(p as usize).map(|x| x.replicas.clone()) else {
        return format!("partition {p}: unknown, not moved");
    };
    let brokers: Vec<u32> = (1..=nodes).filter(|b| Some(*b) != decommissioned).collect();
    let to = new_replicas(&current, &brokers, pick);
    match client
        .admin()
        .reassign_partition(TOPIC, p, to.clone())
        .await
    {
        Ok(_) => format!("partition {p} moving from {current:?} to {to:?}"),
        Err(e) => format!("partition {p}: move from {current:?} to {to:?} refused: {e}"),
    }
}

/// A `Decommission` of broker `node`. A partition on every broker has nowhere to go, so it is
/// first shrunk to the others (as an operator would), then the broker's replicas move.
pub(crate) async fn decommission(client: &Client, node: u32) -> String {
    let mut said = Vec::new();
    if let Ok(t) = client.admin().describe_topic(TOPIC).await {
        for (p, x) in t.partitions.iter().enumerate() {
            if x.replicas.len() >= 5 && x.replicas.contains(&node) {
                let to: Vec<u32> = x.replicas.iter().copied().filter(|b| *b != node).collect();
                match client
                    .admin()
                    .reassign_partition(TOPIC, p as u32, to.clone())
                    .await
                {
                    Ok(_) => said.push(format!("partition {p} shrunk to {to:?}")),
                    Err(e) => said.push(format!("partition {p}: shrinking refused: {e}")),
                }
            }
        }
    }
    let deadline = Instant::now() + WAIT;
    loop {
        match client.admin().decommission_broker(node).await {
            Ok(moved) => {
                said.push(format!("broker {node} decommissioned, moving {moved:?}"));
                break;
            }
            Err(e) if Instant::now() < deadline && !e.is_definite() => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("decommissioning broker {node} failed: {e}"),
        }
    }
    said.join("; ")
}

/// A `BitFlip`: flips a byte in a sealed segment of one of `node`'s replicas of the test topic
/// and waits (at least `hold`, at most [`WAIT`]) until the broker reports it repaired. Damage
/// the broker never repairs fails the run; damage it served would show in the final comparison
/// of the replicas and in the consumers' checks.
pub(crate) async fn flip_and_await_repair(
    cluster: &ClusterProc,
    node: u32,
    pick: u64,
    hold: Duration,
    events: &Events,
) -> String {
    let dirs: Vec<_> = (0..PARTITIONS)
        .map(|p| cluster.replica_dir(node, TOPIC, p))
        .collect();
    let sealed = sealed_segments(&dirs);
    let Some(file) = sealed.get((pick % sealed.len().max(1) as u64) as usize) else {
        return "no sealed segment yet, nothing flipped".to_owned();
    };
    let http = cluster.nodes[node as usize - 1].http.clone();
    let repaired = || metric(&http, "keel_log_damage_repaired_total");
    let before = repaired();
    let Some(flipped) = flip_batch(file, pick) else {
        return format!("{} holds no batch, nothing flipped", file.display());
    };
    events.log(format_args!(
        "flipped byte {} of {} (batch at offset {})",
        flipped.position,
        flipped.file.display(),
        flipped.base_offset
    ));
    let started = Instant::now();
    loop {
        if repaired() > before {
            let took = started.elapsed().as_millis();
            tokio::time::sleep(hold.saturating_sub(started.elapsed())).await;
            return format!(
                "flipped byte {} of {}, repaired after {took} ms",
                flipped.position,
                flipped
                    .file
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            );
        }
        assert!(
            started.elapsed() < WAIT,
            "broker {node} never repaired the byte flipped at {} of {}",
            flipped.position,
            flipped.file.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
