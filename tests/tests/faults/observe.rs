//! What the run asks the cluster: where a fault's target is now, whether every replica is in
//! sync, each partition as its leader reports it, the metadata log's convergence and the
//! retention counter.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::{Client, PartitionInfo};
use keel_proto::v1::admin_service_client::AdminServiceClient;
use keel_proto::v1::groups_service_client::GroupsServiceClient;
use keel_proto::v1::{DescribeTopicRequest, FindCoordinatorRequest};
use keel_tests::broker::{http_get, metric};
use keel_tests::cluster::ClusterProc;
use keel_tests::faults::Target;
use keel_tests::faults::retention::{CounterTotal, RETENTION_DELETED_METRIC, metric_value};

use crate::{GROUP, TOPIC};

/// Samples every broker's retention counter once a second, adding across restarts.
pub(crate) async fn sample_retention(
    http: Vec<(u32, String)>,
    stop: Arc<AtomicBool>,
    total: Arc<Mutex<CounterTotal>>,
) {
    while !stop.load(Ordering::Relaxed) {
        sample_retention_once(&http, &total).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    sample_retention_once(&http, &total).await;
}

pub(crate) async fn sample_retention_once(http: &[(u32, String)], total: &Mutex<CounterTotal>) {
    for (id, addr) in http {
        let addr = addr.clone();
        // A paused broker accepts the connection and answers nothing: a blocking read with a
        // timeout, off the runtime's workers.
        let text = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
            .await
            .ok()
            .flatten();
        if let Some((200, body)) = text {
            let v = metric_value(&body, RETENTION_DELETED_METRIC).unwrap_or(0.0);
            total.lock().expect("lock").observe(*id, v);
        }
    }
}

pub(crate) async fn leader_of(client: &Client, p: u32) -> Option<u32> {
    let t = client.admin().describe_topic(TOPIC).await.ok()?;
    t.partitions
        .get(p as usize)
        .map(|x| x.leader)
        .filter(|l| *l != 0)
}

pub(crate) async fn resolve(client: &Client, cluster: &ClusterProc, target: Target) -> Option<u32> {
    match target {
        Target::Node(n) => Some(n),
        Target::LeaderOf(p) => leader_of(client, p).await,
        Target::MetadataLeader => client
            .admin()
            .describe_cluster()
            .await
            .ok()
            .map(|c| c.metadata_leader)
            .filter(|l| *l != 0),
        Target::GroupCoordinator => {
            for n in cluster.nodes.iter().filter(|n| n.is_started()) {
                let Ok(ch) = tonic::transport::Channel::from_shared(n.endpoint())
                    .expect("endpoint")
                    .connect()
                    .await
                else {
                    continue;
                };
                if let Ok(r) = GroupsServiceClient::new(ch)
                    .find_coordinator(FindCoordinatorRequest {
                        group_id: GROUP.into(),
                    })
                    .await
                {
                    let id = r.into_inner().coordinator_id;
                    if id != 0 {
                        return Some(id);
                    }
                }
            }
            None
        }
    }
}

pub(crate) async fn all_in_sync(client: &Client) -> bool {
    topic_in_sync(client, TOPIC).await
}

pub(crate) async fn topic_in_sync(client: &Client, topic: &str) -> bool {
    client.admin().describe_topic(topic).await.is_ok_and(|t| {
        t.partitions
            .iter()
            .all(|p| p.leader != 0 && p.in_sync.len() == p.replicas.len())
    })
}

/// A topic as one broker sees it (its own replicas' log starts and high watermarks), asked
/// directly rather than through the clients' proxies.
pub(crate) async fn describe_at(endpoint: String, topic: &str) -> Option<keel_client::TopicInfo> {
    let ch = tonic::transport::Channel::from_shared(endpoint)
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    AdminServiceClient::new(ch)
        .describe_topic(DescribeTopicRequest {
            name: topic.to_owned(),
        })
        .await
        .ok()?
        .into_inner()
        .topic
}

/// Every partition of `topic` as its leader reports it, once every broker that holds a replica
/// has reported a high watermark at least the leader's (so each has the leader's committed
/// entries), with `true`. If that does not happen within `wait`, the leaders' reports of the
/// last attempt with `false`, so that the checker judges the replicas as they are.
pub(crate) async fn leader_reports(
    cluster: &ClusterProc,
    topic: &str,
    wait: Duration,
) -> (BTreeMap<u32, PartitionInfo>, bool) {
    let deadline = Instant::now() + wait;
    let mut best = BTreeMap::new();
    loop {
        let mut views: BTreeMap<u32, keel_client::TopicInfo> = BTreeMap::new();
        for n in &cluster.nodes {
            if let Some(t) = describe_at(n.endpoint(), topic).await {
                views.insert(n.id, t);
            }
        }
        let count = views
            .values()
            .map(|t| t.partitions.len())
            .max()
            .unwrap_or(0);
        let mut leaders = BTreeMap::new();
        let mut caught_up = count > 0;
        for p in 0..count {
            let Some(lead) = views
                .iter()
                .find_map(|(id, t)| t.partitions.get(p).filter(|x| x.leader == *id))
            else {
                caught_up = false;
                continue;
            };
            caught_up &= lead.replicas.iter().all(|r| {
                views
                    .get(r)
                    .and_then(|t| t.partitions.get(p))
                    .is_some_and(|x| x.high_watermark >= lead.high_watermark)
            });
            leaders.insert(p as u32, lead.clone());
        }
        if leaders.len() >= best.len() {
            best = leaders;
        }
        if caught_up && best.len() == count {
            return (best, true);
        }
        if Instant::now() >= deadline {
            return (best, false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (up to `wait`) until every broker's copy of the metadata log ends at the same index
/// and it applied all of it (their `keel_metadata_*_index` metrics); returns the metadata
/// leader and that index (`None` if it did not happen).
pub(crate) async fn metadata_converged(
    client: &Client,
    cluster: &ClusterProc,
    wait: Duration,
) -> (u32, Option<u64>) {
    let deadline = Instant::now() + wait;
    loop {
        let leader = client
            .admin()
            .describe_cluster()
            .await
            .map_or(0, |c| c.metadata_leader);
        let http: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
        let indexes = tokio::task::spawn_blocking(move || {
            http.iter()
                .map(|h| {
                    (
                        metric(h, "keel_metadata_last_log_index"),
                        metric(h, "keel_metadata_applied_index"),
                    )
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let converged = leader != 0
            && indexes.first().is_some_and(|(last, _)| *last > 0.0)
            && indexes
                .iter()
                .all(|(last, applied)| last == applied && *last == indexes[0].0);
        if converged {
            return (leader, Some(indexes[0].0 as u64));
        }
        if Instant::now() >= deadline {
            println!("metadata leader {leader}; (last, applied) index per broker: {indexes:?}");
            return (leader, None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The most metadata voters any broker reports (`keel_metadata_voters`): a replaced broker is
/// out of the metadata group's voters until it has caught up and been promoted again.
pub(crate) async fn metadata_voters(cluster: &ClusterProc) -> u32 {
    let http: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
    tokio::task::spawn_blocking(move || {
        http.iter()
            .map(|h| metric(h, "keel_metadata_voters") as u32)
            .max()
            .unwrap_or(0)
    })
    .await
    .unwrap_or(0)
}
