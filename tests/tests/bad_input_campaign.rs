//! A bad-input campaign against a live three-broker cluster carrying a normal load: random
//! and mutated protobuf on every RPC (the internal Raft service included), absurd field
//! values, a thousand idle connections and a subscriber that never reads. The brokers must
//! keep serving the load without an error, answer every bad call with a gRPC status (never a
//! crash or a dropped connection), stay in sync, and not grow their memory without bound.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_client::{ProducerConfig, ProducerRecord};
use keel_proto::v1::*;
use keel_tests::cluster::ClusterProc;
use keel_tests::faults::Rng;
use keel_tests::raw;
use prost::Message;
use tonic::Code;

const TOPIC: &str = "load";

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Valid requests of each public RPC, to be mutated.
fn seeds() -> Vec<(&'static str, Bytes)> {
    let produce = ProduceRequest {
        topic: TOPIC.into(),
        acks: Acks::All as i32,
        batches: vec![ProduceBatch {
            partition: Some(0),
            data: Some(produce_batch::Data::Records(RecordList {
                records: vec![Record {
                    key: Some(Bytes::from_static(b"k")),
                    value: Some(Bytes::from_static(b"v")),
                    ..Default::default()
                }],
            })),
            producer: None,
        }],
        ..Default::default()
    };
    let fetch = FetchRequest {
        partitions: vec![FetchPartition {
            topic: TOPIC.into(),
            partition: 0,
            offset: 0,
            max_bytes: 0,
        }],
        max_wait_ms: 0,
        ..Default::default()
    };
    let enc = |m: &dyn Fn(&mut Vec<u8>)| {
        let mut v = Vec::new();
        m(&mut v);
        Bytes::from(v)
    };
    vec![
        (
            "/keel.v1.ProduceService/Produce",
            enc(&|v| produce.encode(v).expect("encode")),
        ),
        (
            "/keel.v1.ConsumeService/Fetch",
            enc(&|v| fetch.encode(v).expect("encode")),
        ),
        (
            "/keel.v1.ConsumeService/ListOffsets",
            enc(&|v| {
                ListOffsetsRequest {
                    topic: TOPIC.into(),
                    partition: 0,
                    spec: Some(list_offsets_request::Spec::TimestampMs(0)),
                }
                .encode(v)
                .expect("encode")
            }),
        ),
        (
            "/keel.v1.AdminService/CreateTopic",
            enc(&|v| {
                CreateTopicRequest {
                    name: "fuzzed".into(),
                    partitions: 1,
                    replication_factor: 1,
                    config: Default::default(),
                }
                .encode(v)
                .expect("encode")
            }),
        ),
        (
            "/keel.v1.AdminService/DescribeTopic",
            enc(&|v| {
                DescribeTopicRequest { name: TOPIC.into() }
                    .encode(v)
                    .expect("encode")
            }),
        ),
        (
            "/keel.v1.ClusterService/Metadata",
            enc(&|v| {
                MetadataRequest {
                    topics: vec![TOPIC.into()],
                }
                .encode(v)
                .expect("encode")
            }),
        ),
        (
            "/keel.v1.GroupsService/Heartbeat",
            enc(&|v| {
                GroupHeartbeatRequest {
                    group_id: "fuzz".into(),
                    topics: vec![TOPIC.into()],
                    ..Default::default()
                }
                .encode(v)
                .expect("encode")
            }),
        ),
        (
            "/keel.v1.GroupsService/CommitOffsets",
            enc(&|v| {
                CommitOffsetsRequest {
                    group_id: "fuzz".into(),
                    offsets: vec![OffsetCommit {
                        topic: TOPIC.into(),
                        partition: 0,
                        offset: 1,
                        metadata: String::new(),
                    }],
                    ..Default::default()
                }
                .encode(v)
                .expect("encode")
            }),
        ),
        (
            "/keel.v1.ProduceService/InitProducer",
            enc(&|v| {
                InitProducerRequest {
                    instance_id: "fuzz".into(),
                    ..Default::default()
                }
                .encode(v)
                .expect("encode")
            }),
        ),
    ]
}

/// Broker-to-broker paths: only random bytes go there (a well-formed forged vote is a matter
/// of authentication, not of input validation).
const INTERNAL: [&str; 4] = [
    "/keel.raft.v1.RaftService/AppendEntries",
    "/keel.raft.v1.RaftService/Vote",
    "/keel.raft.v1.RaftService/InstallSnapshot",
    "/keel.raft.v1.RaftService/Forward",
];

fn mutate(rng: &mut Rng, seed: &Bytes) -> Bytes {
    let mut v = seed.to_vec();
    match rng.range(0, 4) {
        0 => {
            // Flip a few bytes.
            for _ in 0..rng.range(1, 4) {
                if !v.is_empty() {
                    let i = rng.range(0, v.len() as u64 - 1) as usize;
                    v[i] ^= rng.range(1, 255) as u8;
                }
            }
        }
        1 => v.truncate(rng.range(0, v.len() as u64) as usize),
        2 => v.extend((0..rng.range(1, 64)).map(|_| rng.next_u64() as u8)),
        // A huge length prefix on a field.
        3 => v
            .splice(0..0, [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f])
            .for_each(drop),
        _ => {
            v = (0..rng.range(0, 200))
                .map(|_| rng.next_u64() as u8)
                .collect()
        }
    }
    Bytes::from(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_campaign_leaves_the_cluster_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = ClusterProc::start(dir.path(), 3);
    let client = keel_tests::cluster::client(&cluster).await;
    client
        .admin()
        .create_topic(TOPIC, 3, 3, BTreeMap::new())
        .await
        .expect("create");

    // The normal load.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let load = {
        let (client, stop, acked) = (client.clone(), Arc::clone(&stop), Arc::clone(&acked));
        tokio::spawn(async move {
            let producer = client
                .producer(ProducerConfig::default())
                .expect("producer");
            let mut i = 0u64;
            let mut pending = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                pending.push(
                    producer
                        .send(ProducerRecord::new(TOPIC, format!("load-{i}")))
                        .await
                        .expect("send"),
                );
                i += 1;
                if pending.len() >= 32 {
                    for a in pending.drain(..) {
                        a.await.expect("a normal write failed during the campaign");
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            for a in pending {
                a.await.expect("a normal write failed during the campaign");
                acked.fetch_add(1, Ordering::Relaxed);
            }
            producer.close().await.expect("close");
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the load did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_before: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| rss_kib(n.pid().expect("pid")))
        .collect();

    // A subscriber that never reads, and a thousand idle connections, held throughout.
    let leader = client
        .admin()
        .describe_topic(TOPIC)
        .await
        .expect("describe")
        .partitions[0]
        .leader;
    let mut stalled = cluster.nodes[leader as usize - 1].consumer().await;
    let _unread = stalled
        .subscribe(SubscribeRequest {
            topic: TOPIC.into(),
            partition: 0,
            start: Some(subscribe_request::Start::Position(
                StartPosition::Earliest as i32,
            )),
            ..Default::default()
        })
        .await
        .expect("subscribe");
    let mut idle = Vec::new();
    for i in 0..1000 {
        let n = &cluster.nodes[i % 3];
        idle.push(
            tokio::net::TcpStream::connect(n.grpc.as_str())
                .await
                .expect("idle connection"),
        );
    }

    // Random and mutated messages on every RPC of every broker.
    let mut rng = Rng::new(0x6b65_656c);
    let seeds = seeds();
    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    for n in &cluster.nodes {
        let channel = n.channel().await;
        for _ in 0..150 {
            let (path, seed) = &seeds[rng.range(0, seeds.len() as u64 - 1) as usize];
            let body = mutate(&mut rng, seed);
            let code = match raw::unary(channel.clone(), path, body).await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            };
            assert_ne!(
                code,
                Code::Unknown,
                "{path}: not a gRPC status (a dropped connection?)"
            );
            *by_code.entry(format!("{code:?}")).or_default() += 1;
        }
        for path in INTERNAL {
            for _ in 0..20 {
                let body: Bytes = (0..rng.range(0, 300))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                let code = match raw::unary(channel.clone(), path, body).await {
                    Ok(_) => Code::Ok,
                    Err(s) => s.code(),
                };
                assert_ne!(code, Code::Unknown, "{path}: not a gRPC status");
                *by_code.entry(format!("internal {code:?}")).or_default() += 1;
            }
        }
    }
    println!("answers to malformed calls by code: {by_code:?}");

    // Absurd values in well-formed requests get precise errors, from the partition's leader
    // as it is now: under the campaign's load leadership can move (a leader that misses its
    // quorum acknowledgements steps aside), and a moved leader answers NOT_LEADER first.
    for (req, want) in [
        (
            FetchRequest {
                partitions: vec![FetchPartition {
                    topic: TOPIC.into(),
                    partition: 0,
                    offset: u64::MAX,
                    max_bytes: 0,
                }],
                ..Default::default()
            },
            Code::OutOfRange,
        ),
        (
            FetchRequest {
                partitions: vec![FetchPartition {
                    topic: TOPIC.into(),
                    partition: u32::MAX,
                    offset: 0,
                    max_bytes: 0,
                }],
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            FetchRequest {
                partitions: vec![FetchPartition {
                    topic: "x".repeat(10_000),
                    partition: 0,
                    offset: 0,
                    max_bytes: 0,
                }],
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            FetchRequest {
                partitions: vec![FetchPartition {
                    topic: TOPIC.into(),
                    partition: 0,
                    offset: 0,
                    max_bytes: u32::MAX,
                }],
                max_wait_ms: u32::MAX,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (FetchRequest::default(), Code::InvalidArgument),
    ] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let e = loop {
            let leader = client
                .admin()
                .describe_topic(TOPIC)
                .await
                .expect("describe")
                .partitions[0]
                .leader;
            let mut consume = cluster.nodes[leader as usize - 1].consumer().await;
            let e = consume.fetch(req.clone()).await.expect_err("refused");
            let not_leader = e
                .metadata()
                .get("keel-error")
                .is_some_and(|r| r == "NOT_LEADER");
            if !not_leader || Instant::now() >= deadline {
                break e;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(e.code(), want, "{e}");
    }
    let mut admin = cluster.nodes[2].admin().await;
    for name in ["", "a/b", &"n".repeat(300), "..", "bad name"] {
        let e = admin
            .create_topic(CreateTopicRequest {
                name: name.into(),
                partitions: 1,
                replication_factor: 1,
                config: Default::default(),
            })
            .await
            .expect_err("bad name");
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}: {e}");
    }
    let e = admin
        .create_topic(CreateTopicRequest {
            name: "many".into(),
            partitions: u32::MAX,
            replication_factor: 1,
            config: Default::default(),
        })
        .await
        .expect_err("too many partitions");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // The load went on without a single failure; the brokers are alive, in sync, and did
    // not balloon.
    let before = acked.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < before + 200 {
        assert!(
            Instant::now() < deadline,
            "the load stalled after the campaign"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    drop(idle);
    let mut cluster = cluster;
    for (i, n) in cluster.nodes.iter_mut().enumerate() {
        assert!(n.is_running(), "broker {} died", n.id);
        let rss = rss_kib(n.pid().expect("pid"));
        println!(
            "broker {}: RSS {} MiB before the campaign, {} MiB after",
            n.id,
            rss_before[i] / 1024,
            rss / 1024
        );
        assert!(
            rss < rss_before[i] + 256 * 1024,
            "broker {} grew from {} to {} KiB",
            n.id,
            rss_before[i],
            rss
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let synced = client.admin().describe_topic(TOPIC).await.is_ok_and(|t| {
            t.partitions
                .iter()
                .all(|p| p.leader != 0 && p.in_sync.len() == 3)
        });
        if synced {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas not in sync after the campaign"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} records acknowledged during the campaign",
        acked.load(Ordering::Relaxed)
    );
}
