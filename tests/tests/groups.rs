//! Consumer groups against real brokers, over the raw gRPC protocol (so any client language
//! gets the same behaviour): assignment, fencing, commits that survive coordinator failover and
//! a whole-cluster restart, admin operations, patterns, static membership and bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use keel_proto::v1::groups_service_client::GroupsServiceClient;
use keel_proto::v1::*;
use keel_tests::broker::BrokerProc;
use keel_tests::cluster::cluster_with_topic;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);

type Tp = (String, u32);

fn flat(list: &[TopicPartitions]) -> BTreeSet<Tp> {
    list.iter()
        .flat_map(|t| t.partitions.iter().map(|p| (t.topic.clone(), *p)))
        .collect()
}

fn listed(tps: &BTreeSet<Tp>) -> Vec<TopicPartitions> {
    let mut by: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (t, p) in tps {
        by.entry(t.clone()).or_default().push(*p);
    }
    by.into_iter()
        .map(|(topic, partitions)| TopicPartitions { topic, partitions })
        .collect()
}

fn reason(s: &tonic::Status) -> String {
    s.metadata()
        .get("keel-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn connect(addr: &str) -> Option<GroupsServiceClient<Channel>> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .ok()?;
    Some(GroupsServiceClient::new(ch))
}

/// The group's coordinator, asked of any of `brokers` until one names a reachable leader.
async fn coordinator(brokers: &[String], group: &str) -> (u32, GroupsServiceClient<Channel>) {
    let deadline = Instant::now() + WAIT;
    loop {
        for b in brokers {
            let Some(mut c) = connect(b).await else {
                continue;
            };
            if let Ok(r) = c
                .find_coordinator(FindCoordinatorRequest {
                    group_id: group.into(),
                })
                .await
            {
                let r = r.into_inner();
                if r.coordinator_id != 0
                    && let Some(cc) = connect(&r.coordinator_address).await
                {
                    return (r.coordinator_id, cc);
                }
            }
        }
        assert!(Instant::now() < deadline, "no coordinator for {group}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every offsets partition is led by its preferred replica, so that coordinators
/// stay put (a leader hands its partition back to the preferred replica a few seconds after
/// it is back in sync).
async fn wait_coordinators_settled(cluster: &keel_tests::cluster::ClusterProc) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = cluster.describe("__consumer_offsets").await
            && t.partitions.iter().all(|p| {
                p.replicas.first() == Some(&p.leader) && p.in_sync.len() == p.replicas.len()
            })
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the offsets partitions did not settle on their preferred leaders"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A group member speaking the protocol by hand: it gives up revoked partitions at once.
struct Member {
    group: String,
    id: String,
    epoch: u64,
    instance: String,
    topics: Vec<String>,
    patterns: Vec<String>,
    owned: BTreeSet<Tp>,
    last: Option<GroupHeartbeatResponse>,
}

impl Member {
    fn new(group: &str, topics: &[&str], patterns: &[&str]) -> Self {
        Self {
            group: group.into(),
            id: String::new(),
            epoch: 0,
            instance: String::new(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            patterns: patterns.iter().map(|t| (*t).to_owned()).collect(),
            owned: BTreeSet::new(),
            last: None,
        }
    }

    async fn beat(
        &mut self,
        c: &mut GroupsServiceClient<Channel>,
    ) -> Result<GroupHeartbeatResponse, tonic::Status> {
        let r = c
            .heartbeat(GroupHeartbeatRequest {
                group_id: self.group.clone(),
                member_id: self.id.clone(),
                member_epoch: self.epoch,
                instance_id: self.instance.clone(),
                topics: self.topics.clone(),
                patterns: self.patterns.clone(),
                owned: listed(&self.owned),
                session_timeout_ms: 2000,
                strategy: String::new(),
            })
            .await?
            .into_inner();
        self.id.clone_from(&r.member_id);
        self.epoch = r.member_epoch;
        self.owned = flat(&r.assignment);
        self.last = Some(r.clone());
        Ok(r)
    }

    fn settled(&self) -> bool {
        self.last
            .as_ref()
            .is_some_and(|r| r.revoke.is_empty() && r.pending.is_empty())
    }
}

/// Heartbeats every member until their assignments are settled, disjoint and cover
/// `partitions` partitions of `topic`.
async fn converge(
    c: &mut GroupsServiceClient<Channel>,
    members: &mut [&mut Member],
    topic: &str,
    partitions: u32,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        for m in members.iter_mut() {
            m.beat(c).await.expect("heartbeat");
        }
        let mut all = BTreeSet::new();
        let mut total = 0;
        for m in members.iter() {
            total += m.owned.len();
            all.extend(m.owned.iter().cloned());
        }
        let want: BTreeSet<Tp> = (0..partitions).map(|p| (topic.to_owned(), p)).collect();
        if all == want && total == want.len() && members.iter().all(|m| m.settled()) {
            return;
        }
        assert!(Instant::now() < deadline, "the group did not converge");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn commit(
    c: &mut GroupsServiceClient<Channel>,
    group: &str,
    member: Option<&Member>,
    offsets: &[(&str, u32, u64)],
) -> Result<(), tonic::Status> {
    c.commit_offsets(CommitOffsetsRequest {
        group_id: group.into(),
        member_id: member.map(|m| m.id.clone()).unwrap_or_default(),
        member_epoch: member.map_or(0, |m| m.epoch),
        offsets: offsets
            .iter()
            .map(|(t, p, o)| OffsetCommit {
                topic: (*t).into(),
                partition: *p,
                offset: *o,
                metadata: format!("m{o}"),
            })
            .collect(),
    })
    .await
    .map(|_| ())
}

async fn fetch_all(brokers: &[String], group: &str) -> BTreeMap<Tp, u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, mut c) = coordinator(brokers, group).await;
        match c
            .fetch_offsets(FetchOffsetsRequest {
                group_id: group.into(),
                partitions: vec![],
            })
            .await
        {
            Ok(r) => {
                return r
                    .into_inner()
                    .offsets
                    .into_iter()
                    .map(|o| ((o.topic, o.partition), o.offset))
                    .collect();
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "fetching offsets kept failing: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_protocol_fencing_failover_and_restart_keep_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cluster, _client) = cluster_with_topic(dir.path(), "orders", 6, 3).await;
    let brokers = cluster.broker_list();
    let g = "billing";
    coordinator(&brokers, g).await;
    wait_coordinators_settled(&cluster).await;
    let (coord_id, mut c) = coordinator(&brokers, g).await;

    let (mut a, mut b, mut m3) = (
        Member::new(g, &["orders"], &[]),
        Member::new(g, &["orders"], &[]),
        Member::new(g, &["orders"], &[]),
    );
    converge(&mut c, &mut [&mut a, &mut b, &mut m3], "orders", 6).await;
    for m in [&a, &b, &m3] {
        assert_eq!(m.owned.len(), 2, "sticky spreads 6 partitions 2-2-2");
    }

    // Commits: owners may, others are fenced, offsets never go backwards.
    let pa = a.owned.iter().next().cloned().expect("a owns");
    let pb = b.owned.iter().next().cloned().expect("b owns");
    commit(&mut c, g, Some(&a), &[("orders", pa.1, 5)])
        .await
        .expect("owner commits");
    let e = commit(&mut c, g, Some(&a), &[("orders", pb.1, 5)])
        .await
        .expect_err("not the owner");
    assert_eq!(reason(&e), "FENCED_MEMBER", "{e}");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let e = commit(
        &mut c,
        g,
        Some(&Member::new(g, &[], &[])),
        &[("orders", pa.1, 6)],
    )
    .await
    .expect_err("not a member");
    assert_eq!(
        reason(&e),
        "FENCED_MEMBER",
        "an empty member id is refused while the group has members: {e}"
    );
    let mut zombie = Member::new(g, &[], &[]);
    zombie.id = "member-0000000000000000".into();
    let e = commit(&mut c, g, Some(&zombie), &[("orders", pa.1, 6)])
        .await
        .expect_err("unknown member");
    assert_eq!(reason(&e), "UNKNOWN_MEMBER", "{e}");
    let e = commit(&mut c, g, Some(&a), &[("orders", pa.1, 4)])
        .await
        .expect_err("backwards");
    assert_eq!(reason(&e), "OFFSET_BACKWARDS", "{e}");

    // Admin changes are refused while members are active.
    let e = c
        .delete_group(DeleteGroupRequest { group_id: g.into() })
        .await
        .expect_err("active group");
    assert_eq!(reason(&e), "GROUP_NOT_EMPTY", "{e}");
    let e = c
        .reset_offsets(ResetOffsetsRequest {
            group_id: g.into(),
            topic: "orders".into(),
            to: Some(reset_offsets_request::To::Offset(0)),
        })
        .await
        .expect_err("active group");
    assert_eq!(reason(&e), "GROUP_NOT_EMPTY", "{e}");

    let d = c
        .describe_group(DescribeGroupRequest { group_id: g.into() })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(d.state, "stable");
    assert_eq!(d.members.len(), 3);
    assert_eq!(d.coordinator_id, coord_id);
    let row = d
        .offsets
        .iter()
        .find(|o| o.partition == pa.1)
        .expect("row of the committed partition");
    assert_eq!(row.committed, Some(5));
    assert_eq!(row.member_id, a.id);
    assert_eq!(row.log_end_offset, Some(0), "nothing was produced");
    assert_eq!(d.offsets.len(), 6, "every assigned partition has a row");

    // The third member stops heartbeating (a crash): the others take its partitions within
    // the session timeout, keeping their own.
    let (a_before, b_before) = (a.owned.clone(), b.owned.clone());
    let crashed = Instant::now();
    let deadline = crashed + WAIT;
    loop {
        a.beat(&mut c).await.expect("a");
        b.beat(&mut c).await.expect("b");
        if a.owned.len() + b.owned.len() == 6 && a.settled() && b.settled() {
            break;
        }
        assert!(Instant::now() < deadline, "the survivors never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = crashed.elapsed();
    assert!(a.owned.is_superset(&a_before) && b.owned.is_superset(&b_before));
    println!("takeover after a member stopped: {took:?} (session timeout 2 s)");

    // Commit every partition, then kill the coordinator with -9: the new coordinator
    // rebuilds the offsets from the replicated log.
    let mut want = BTreeMap::new();
    for m in [&a, &b] {
        let offs: Vec<(&str, u32, u64)> = m
            .owned
            .iter()
            .map(|(_, p)| ("orders", *p, 10 + u64::from(*p)))
            .collect();
        commit(&mut c, g, Some(m), &offs).await.expect("commit");
        for (_, p, o) in offs {
            want.insert(("orders".to_owned(), p), o);
        }
    }
    assert_eq!(fetch_all(&brokers, g).await, want);
    cluster.node(coord_id).kill9();
    let live: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.is_started())
        .map(|n| n.grpc.clone())
        .collect();
    let (new_id, mut c2) = coordinator(&live, g).await;
    assert_ne!(new_id, coord_id);
    assert_eq!(
        fetch_all(&live, g).await,
        want,
        "commits survive kill -9 of the coordinator"
    );
    // Members of the old coordinator are unknown to the new one and must rejoin.
    let e = a
        .beat(&mut c2)
        .await
        .expect_err("membership is not carried over");
    assert_eq!(reason(&e), "UNKNOWN_MEMBER", "{e}");
    cluster.node(coord_id).restart();

    // A whole-cluster restart, every broker killed with -9.
    for id in 1..=3 {
        cluster.node(id).kill9();
    }
    cluster.restart_stopped();
    wait_coordinators_settled(&cluster).await;
    assert_eq!(
        fetch_all(&brokers, g).await,
        want,
        "commits survive a whole-cluster restart"
    );

    // Now without members: reset (also backwards) and delete are allowed.
    let (_, mut c) = coordinator(&brokers, g).await;
    let r = c
        .reset_offsets(ResetOffsetsRequest {
            group_id: g.into(),
            topic: "orders".into(),
            to: Some(reset_offsets_request::To::Position(
                StartPosition::Earliest as i32,
            )),
        })
        .await
        .expect("reset")
        .into_inner();
    assert_eq!(r.offsets.len(), 6);
    assert!(r.offsets.iter().all(|o| o.offset == 0));
    assert!(fetch_all(&brokers, g).await.values().all(|o| *o == 0));
    let mut lister = connect(&brokers[2]).await.expect("connect");
    let deadline = Instant::now() + WAIT;
    let listed: Vec<String> = loop {
        match lister
            .list_groups(ListGroupsRequest { local_only: false })
            .await
        {
            Ok(r) => {
                break r
                    .into_inner()
                    .groups
                    .into_iter()
                    .map(|l| l.group_id)
                    .collect();
            }
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("list: {e}"),
        }
    };
    assert!(listed.contains(&g.to_owned()), "{listed:?}");
    c.delete_group(DeleteGroupRequest { group_id: g.into() })
        .await
        .expect("delete");
    let e = c
        .describe_group(DescribeGroupRequest { group_id: g.into() })
        .await
        .expect_err("deleted");
    assert_eq!(reason(&e), "UNKNOWN_GROUP");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(fetch_all(&brokers, g).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_static_members_and_bad_input_on_one_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProc::start(dir.path(), 1);
    let mut admin = broker.admin().await;
    let create = |name: &str, partitions: u32| CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: 1,
        config: Default::default(),
    };
    admin
        .create_topic(create("order.eu", 2))
        .await
        .expect("create");
    admin
        .create_topic(create("audit", 1))
        .await
        .expect("create");
    let brokers = vec![broker.grpc.clone()];
    let (_, mut c) = coordinator(&brokers, "shop").await;

    // A pattern subscription picks up a topic created after the member joined.
    let mut m = Member::new("shop", &[], &["order.#"]);
    converge(&mut c, &mut [&mut m], "order.eu", 2).await;
    admin
        .create_topic(create("order.us", 3))
        .await
        .expect("create");
    let deadline = Instant::now() + WAIT;
    while m.owned.len() != 5 {
        assert!(Instant::now() < deadline, "order.us was never assigned");
        tokio::time::sleep(Duration::from_millis(100)).await;
        m.beat(&mut c).await.expect("beat");
    }
    assert!(!m.owned.iter().any(|(t, _)| t == "audit"));

    // Static membership: a restarted instance gets its partitions back; nobody else moves.
    let mut s1 = Member::new("static", &["order.eu", "order.us"], &[]);
    s1.instance = "worker-1".into();
    let mut other = Member::new("static", &["order.eu", "order.us"], &[]);
    let deadline = Instant::now() + WAIT;
    loop {
        s1.beat(&mut c).await.expect("s1");
        other.beat(&mut c).await.expect("other");
        if s1.owned.len() + other.owned.len() == 5 && s1.settled() && other.settled() {
            break;
        }
        assert!(Instant::now() < deadline, "static group did not converge");
    }
    let (mine, theirs) = (s1.owned.clone(), other.owned.clone());
    let mut s1b = Member::new("static", &["order.eu", "order.us"], &[]);
    s1b.instance = "worker-1".into();
    s1b.beat(&mut c).await.expect("restarted instance joins");
    assert_eq!(s1b.owned, mine, "the same partitions, at once");
    other.beat(&mut c).await.expect("other");
    assert_eq!(other.owned, theirs);
    assert!(other.settled(), "no rebalance for the others");
    let e = s1
        .beat(&mut c)
        .await
        .expect_err("the old incarnation is gone");
    assert_eq!(reason(&e), "UNKNOWN_MEMBER");

    // Bad input: precise errors, and the broker keeps serving.
    let bad =
        |group: &str, session: u32, strategy: &str, topics: Vec<String>| GroupHeartbeatRequest {
            group_id: group.into(),
            session_timeout_ms: session,
            strategy: strategy.into(),
            topics,
            ..Default::default()
        };
    let t = vec!["audit".to_owned()];
    for (req, field) in [
        (bad("", 0, "", t.clone()), "group_id"),
        (bad("a b", 0, "", t.clone()), "group_id"),
        (bad(&"g".repeat(300), 0, "", t.clone()), "group_id"),
        (bad("g", 10, "", t.clone()), "session_timeout_ms"),
        (bad("g", 0, "uniform", t.clone()), "strategy"),
        (bad("g", 0, "", vec![]), "topics"),
        (bad("g", 0, "", vec!["bad/name".into()]), "topics"),
    ] {
        let e = c.heartbeat(req).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains(field), "{field}: {e}");
    }
    let e = c
        .heartbeat(GroupHeartbeatRequest {
            group_id: "g2".into(),
            patterns: vec!["order.##x".into()],
            ..Default::default()
        })
        .await
        .expect_err("bad pattern");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = c
        .commit_offsets(CommitOffsetsRequest {
            group_id: "g3".into(),
            offsets: (0..1001)
                .map(|p| OffsetCommit {
                    topic: "audit".into(),
                    partition: p,
                    offset: 1,
                    metadata: String::new(),
                })
                .collect(),
            ..Default::default()
        })
        .await
        .expect_err("too many");
    assert!(e.message().contains("offsets"), "{e}");
    let e = c
        .commit_offsets(CommitOffsetsRequest {
            group_id: "g3".into(),
            offsets: vec![OffsetCommit {
                topic: "audit".into(),
                partition: 0,
                offset: 1,
                metadata: "x".repeat(5000),
            }],
            ..Default::default()
        })
        .await
        .expect_err("metadata too long");
    assert!(e.message().contains("metadata"), "{e}");
    // Clients cannot write into, or delete, the offsets topic.
    let e = broker
        .producer()
        .await
        .produce(ProduceRequest {
            topic: "__consumer_offsets".into(),
            batches: vec![ProduceBatch {
                partition: Some(0),
                data: Some(produce_batch::Data::Records(RecordList {
                    records: vec![Record {
                        value: Some(b"x".to_vec().into()),
                        ..Default::default()
                    }],
                })),
                producer: None,
            }],
            ..Default::default()
        })
        .await
        .expect_err("internal topic");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = admin
        .delete_topic(DeleteTopicRequest {
            name: "__consumer_offsets".into(),
        })
        .await
        .expect_err("internal topic");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = admin
        .add_partitions(AddPartitionsRequest {
            name: "__consumer_offsets".into(),
            partitions: 16,
        })
        .await
        .expect_err("internal topic");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = admin
        .alter_topic_config(AlterTopicConfigRequest {
            name: "__consumer_offsets".into(),
            set: [("retention.ms".to_owned(), "1000".to_owned())].into(),
            remove: vec![],
        })
        .await
        .expect_err("internal topic");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    // A member-less commit works for a group without members, and survives a restart.
    commit(&mut c, "offline", None, &[("audit", 0, 7)])
        .await
        .expect("standalone commit");
    drop(c);
    let mut broker = broker;
    broker.kill9();
    broker.restart();
    broker.wait_ready();
    let got = fetch_all(&brokers, "offline").await;
    assert_eq!(got.get(&("audit".to_owned(), 0)), Some(&7));
}

/// Like a real client: follows the coordinator when it moves (a preferred-leader hand-back
/// moves it a few seconds after the offsets topic is created) and rejoins when the new one
/// does not know the member.
async fn beat_following(
    m: &mut Member,
    c: &mut GroupsServiceClient<Channel>,
    brokers: &[String],
) -> GroupHeartbeatResponse {
    let deadline = Instant::now() + WAIT;
    loop {
        match m.beat(c).await {
            Ok(r) => return r,
            Err(e) if reason(&e) == "UNKNOWN_MEMBER" => {
                m.id.clear();
                m.epoch = 0;
            }
            Err(e) if e.code() == tonic::Code::Unavailable => {
                *c = coordinator(brokers, &m.group).await.1;
            }
            Err(e) => panic!("heartbeat: {e}"),
        }
        assert!(Instant::now() < deadline, "no heartbeat got through");
    }
}

async fn commit_following(
    m: &mut Member,
    c: &mut GroupsServiceClient<Channel>,
    brokers: &[String],
    offsets: &[(&str, u32, u64)],
) {
    let deadline = Instant::now() + WAIT;
    loop {
        match commit(c, &m.group.clone(), Some(m), offsets).await {
            Ok(()) => return,
            Err(e) if e.code() == tonic::Code::Unavailable || reason(&e) == "UNKNOWN_MEMBER" => {
                beat_following(m, c, brokers).await;
                beat_following(m, c, brokers).await;
            }
            Err(e) => panic!("commit: {e}"),
        }
        assert!(Instant::now() < deadline, "no commit got through");
    }
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_log_is_compacted_and_empty_groups_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = keel_tests::cluster::ClusterProc::start_with(
        dir.path(),
        3,
        &[
            "--offsets-compact-records",
            "100",
            "--retention-check-interval-ms",
            "200",
            "--offsets-retention-ms",
            "3000",
        ],
    );
    let client = keel_tests::cluster::client(&cluster).await;
    client
        .admin()
        .create_topic("t", 4, 3, BTreeMap::new())
        .await
        .expect("create");
    let brokers = cluster.broker_list();
    coordinator(&brokers, "busy").await;
    wait_coordinators_settled(&cluster).await;
    let (_, mut c) = coordinator(&brokers, "busy").await;
    let mut m = Member::new("busy", &["t"], &[]);
    converge(&mut c, &mut [&mut m], "t", 4).await;
    // "idle" may have another coordinator than "busy".
    let (_, mut ci) = coordinator(&brokers, "idle").await;
    commit(&mut ci, "idle", None, &[("t", 0, 1)])
        .await
        .expect("idle commit");
    drop(ci);

    // Enough commits for several compacted images.
    let mut want = BTreeMap::new();
    for i in 0..400u64 {
        let p = (i % 4) as u32;
        commit_following(&mut m, &mut c, &brokers, &[("t", p, i)]).await;
        want.insert(("t".to_owned(), p), i);
        if i % 50 == 0 {
            beat_following(&mut m, &mut c, &brokers).await;
        }
    }
    let shard = fnv1a("busy") % 8;
    let deadline = Instant::now() + WAIT;
    loop {
        beat_following(&mut m, &mut c, &brokers).await;
        let mut starts = Vec::new();
        for id in 1..=3 {
            let t = cluster
                .describe_on(id, "__consumer_offsets")
                .await
                .expect("offsets topic");
            starts.push(t.partitions[shard as usize].log_start_offset);
        }
        if starts.iter().all(|s| *s > 0) {
            println!("offsets partition {shard} log start on each replica: {starts:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the offsets log was never cut: {starts:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(fetch_all(&brokers, "busy").await, want);

    // The member-less group expires; the busy one (it has a member) does not.
    let deadline = Instant::now() + WAIT;
    while !fetch_all(&brokers, "idle").await.is_empty() {
        beat_following(&mut m, &mut c, &brokers).await;
        assert!(Instant::now() < deadline, "the empty group never expired");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(fetch_all(&brokers, "busy").await, want);

    // The coordinator exports the group's lag to Prometheus.
    let deadline = Instant::now() + WAIT;
    loop {
        let (id, _) = coordinator(&brokers, "busy").await;
        let metrics = keel_tests::broker::http_get(&cluster.node(id).http, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if metrics.contains("keel_consumer_group_lag_sum{group=\"busy\"}")
            && metrics
                .contains("keel_consumer_group_lag{group=\"busy\",topic=\"t\",partition=\"0\"}")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no lag metrics for the group");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The image is all a new coordinator needs, also after a whole-cluster restart.
    drop(c);
    for id in 1..=3 {
        cluster.node(id).kill9();
    }
    cluster.restart_stopped();
    // The member comes back at once, so the group (with its 3 s retention) stays active.
    let (_, mut c) = coordinator(&brokers, "busy").await;
    beat_following(&mut m, &mut c, &brokers).await;
    assert_eq!(fetch_all(&brokers, "busy").await, want);
}
