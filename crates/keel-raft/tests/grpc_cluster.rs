//! Three brokers in one process, each a tonic server on 127.0.0.1 hosting Raft groups 1 and 2
//! over the keel-log store, talking through the gRPC Raft transport: all replicas agree on
//! every batch and offset, and when the broker leading group 1 goes away, the other two elect a
//! new leader, accept writes, and keep every acknowledged entry.

mod support;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use keel_raft::wire::pb::RaftRequest;
use keel_raft::wire::pb::raft_service_client::RaftServiceClient;
use keel_raft::{Identity, KeelLogStore, KeelRaft, RaftRegistry, RaftTransport, TransportConfig};
use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::VoteRequest;
use openraft::{BasicNode, Config, Raft};
use support::group::{WAIT, err, raft_config, temp_dirs, wait_applied, wait_ready_leader};
use support::{MemStateMachine, Row, batch, layout, small_config};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

type Node = Raft<KeelRaft, MemStateMachine>;

const GROUPS: [u64; 2] = [1, 2];
const BROKERS: [u64; 3] = [1, 2, 3];

/// One broker: a Raft server on its own port and one replica of each group.
struct Broker {
    id: u64,
    registry: RaftRegistry<MemStateMachine>,
    stores: BTreeMap<u64, KeelLogStore>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Broker {
    async fn start(id: u64, listener: TcpListener, dir: &Path) -> io::Result<Self> {
        // A tiny append budget (a batch here is ~100 bytes), so that appends carrying several
        // entries are cut and reported to openraft as partial successes.
        let transport = RaftTransport::new(
            id,
            TransportConfig {
                max_append_bytes: 400,
                ..TransportConfig::default()
            },
        );
        let registry = RaftRegistry::new(id);
        let mut stores = BTreeMap::new();
        for g in GROUPS {
            let store = KeelLogStore::open(dir.join(format!("group-{g}")), small_config())?;
            let config = raft_config(100, 500..1000, Config::default());
            let network = transport.group::<Vec<u8>>(g);
            let sm = MemStateMachine::default();
            let raft = Raft::new(id, config, network, store.clone(), sm)
                .await
                .map_err(err)?;
            registry.register(g, raft);
            stores.insert(g, store);
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(registry.service())
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        Ok(Self {
            id,
            registry,
            stores,
            stop: Some(stop),
            server,
        })
    }

    fn raft(&self, g: u64) -> Node {
        self.registry.get(g).expect("group registered")
    }

    /// Unregisters and shuts down every group, then stops the server.
    async fn shutdown(&mut self) -> io::Result<()> {
        for g in GROUPS {
            if let Some(raft) = self.registry.unregister(g) {
                raft.shutdown().await.map_err(err)?;
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(Duration::from_secs(5), &mut self.server).await {
            Ok(joined) => joined.map_err(err)?.map_err(err),
            Err(_) => {
                self.server.abort();
                Err(err("server did not stop within 5 s"))
            }
        }
    }
}

/// A client write that the leader acknowledged: its log id and offsets.
#[derive(Debug, Clone, Copy)]
struct Acked {
    term: u64,
    index: u64,
    base_offset: u64,
    next_offset: u64,
}

/// Waits (bounded) until `brokers` agree on a leader of group `g` that is not `not`, and that
/// leader has committed an entry of its own term; returns the leader's broker id.
async fn wait_leader(brokers: &[&Broker], g: u64, not: Option<u64>) -> io::Result<u64> {
    let ok = |id: u64| brokers.iter().any(|b| b.id == id) && Some(id) != not;
    let m = brokers[0]
        .raft(g)
        .wait(WAIT)
        .metrics(
            |m| m.current_leader.is_some_and(ok),
            "a leader among the live brokers",
        )
        .await
        .map_err(err)?;
    let leader = m.current_leader.expect("leader");
    let b = brokers
        .iter()
        .find(|b| b.id == leader)
        .expect("leader broker");
    wait_ready_leader(&b.raft(g)).await?;
    Ok(leader)
}

/// Writes `count` batches to group `g` concurrently, so that replication carries several entries
/// per AppendEntries (and the small `max_append_bytes` of the test cuts them), then checks that
/// the acknowledged offsets are contiguous in log order.
async fn write(
    leader: &Node,
    g: u64,
    from: u64,
    count: u64,
    acked: &mut Vec<Acked>,
) -> io::Result<()> {
    let writes = (from..from + count).map(|i| {
        let n = i % 4 + 1;
        async move {
            let resp = leader
                .client_write(batch(&format!("g{g}-w{i}"), n as usize))
                .await
                .map_err(err)?;
            assert_eq!(
                resp.data.next_offset,
                resp.data.base_offset + n,
                "write {i}"
            );
            Ok::<_, io::Error>(Acked {
                term: resp.log_id.committed_leader_id().term,
                index: resp.log_id.index,
                base_offset: resp.data.base_offset,
                next_offset: resp.data.next_offset,
            })
        }
    });
    let mut new = futures::future::try_join_all(writes).await?;
    new.sort_by_key(|a| a.index);
    for a in new {
        let expect = acked.last().map_or(0, |p| p.next_offset);
        assert_eq!(a.base_offset, expect, "group {g}: offsets are contiguous");
        acked.push(a);
    }
    Ok(())
}

/// Waits until every broker in `brokers` applied group `g` up to `index`, then checks that
/// they hold identical logs that contain every acknowledged write. Returns the common layout.
async fn check_group(
    brokers: &[&Broker],
    g: u64,
    index: u64,
    acked: &[Acked],
) -> io::Result<Vec<Row>> {
    for b in brokers {
        wait_applied(&b.raft(g), index).await?;
    }
    let reference = layout(&brokers[0].stores[&g]);
    for b in brokers {
        assert_eq!(
            layout(&b.stores[&g]),
            reference,
            "group {g}: broker {} differs from broker {}",
            b.id,
            brokers[0].id
        );
    }
    let data: Vec<&Row> = reference.iter().filter(|r| !r.4).collect();
    assert_eq!(data.len(), acked.len(), "group {g}: data batches");
    for (row, a) in data.iter().zip(acked) {
        assert_eq!(
            (row.0, row.1, row.2, row.3),
            (a.index, a.term, a.base_offset, a.next_offset),
            "group {g}: acknowledged write missing or moved"
        );
    }
    Ok(reference)
}

fn last_index(acked: &[Acked]) -> u64 {
    acked.last().map_or(0, |a| a.index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_two_groups_over_grpc_survive_losing_a_leader() -> io::Result<()> {
    let dirs = temp_dirs(BROKERS.len())?;
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in BROKERS {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = l.local_addr()?;
        members.insert(id, BasicNode::new(addr.to_string()));
        listeners.push(l);
    }
    let mut brokers = Vec::new();
    for ((id, l), dir) in BROKERS.into_iter().zip(listeners).zip(&dirs) {
        brokers.push(Broker::start(id, l, dir.path()).await?);
    }
    // Group 1 is initialised from broker 1, group 2 from broker 2 (same member set).
    for g in GROUPS {
        brokers[g as usize - 1]
            .raft(g)
            .initialize(members.clone())
            .await
            .map_err(err)?;
    }

    let mut acked: BTreeMap<u64, Vec<Acked>> = BTreeMap::new();
    let mut leaders = BTreeMap::new();
    {
        let all: Vec<&Broker> = brokers.iter().collect();
        for g in GROUPS {
            let leader = wait_leader(&all, g, None).await?;
            leaders.insert(g, leader);
            let node = all[leader as usize - 1].raft(g);
            write(&node, g, 0, 12, acked.entry(g).or_default()).await?;
        }
        for g in GROUPS {
            let a = &acked[&g];
            check_group(&all, g, last_index(a), a).await?;
        }
    }
    let before: BTreeMap<u64, Vec<Row>> = GROUPS
        .iter()
        .map(|&g| (g, layout(&brokers[0].stores[&g])))
        .collect();

    // The broker leading group 1 goes away: its server and both of its replicas.
    let gone = leaders[&1];
    brokers[gone as usize - 1].shutdown().await?;

    {
        let live: Vec<&Broker> = brokers.iter().filter(|b| b.id != gone).collect();
        for g in GROUPS {
            let not = (leaders[&g] == gone).then_some(gone);
            let leader = wait_leader(&live, g, not).await?;
            assert_ne!(leader, gone);
            let node = live
                .iter()
                .find(|b| b.id == leader)
                .expect("leader")
                .raft(g);
            write(&node, g, 12, 6, acked.get_mut(&g).expect("acked")).await?;
        }
        for g in GROUPS {
            let a = &acked[&g];
            let after = check_group(&live, g, last_index(a), a).await?;
            assert!(
                after.starts_with(&before[&g]),
                "group {g}: the log before the failover is a prefix of the log after it"
            );
            assert_eq!(a.len(), 18);
        }
    }

    for b in brokers.iter_mut().filter(|b| b.id != gone) {
        b.shutdown().await?;
    }
    Ok(())
}

/// Server and client edge cases: unknown group, wrong target, self-connection, dead peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_rejects_bad_routes_and_reports_unreachable_peers() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut broker = Broker::start(1, listener, dir.path()).await?;

    let mut client = RaftServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(err)?;
    let vote = VoteRequest::<KeelRaft>::new(keel_raft::Vote::new(1, 2), None);
    let payload = keel_raft::wire::encode(&vote)?;
    let garbage = bytes::Bytes::from_static(b"\xff not cbor");
    for (what, group_id, target, payload, code) in [
        ("unknown group", 99, 1, &payload, tonic::Code::NotFound),
        (
            "wrong target",
            1,
            7,
            &payload,
            tonic::Code::FailedPrecondition,
        ),
        ("garbage", 1, 1, &garbage, tonic::Code::InvalidArgument),
    ] {
        let request = RaftRequest {
            group_id,
            target,
            payload: payload.clone(),
            ..RaftRequest::default()
        };
        let status = client.vote(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status}");
    }
    let reply = client
        .vote(RaftRequest {
            group_id: 1,
            target: 1,
            payload: payload.clone(),
            ..RaftRequest::default()
        })
        .await
        .map_err(err)?;
    let resp: openraft::raft::VoteResponse<KeelRaft> =
        keel_raft::wire::decode(&reply.into_inner().payload)?;
    assert!(resp.is_granted_to(&keel_raft::Vote::new(1, 2)), "{resp:?}");

    let option = RPCOption::new(Duration::from_secs(2));
    let transport = RaftTransport::new(1, TransportConfig::default());
    let mut net = transport.group::<Vec<u8>>(1);
    // A client to itself never connects.
    let mut me = net.new_client(1, &BasicNode::new(addr.to_string())).await;
    let r = me.vote(vote.clone(), option.clone()).await;
    assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
    assert_eq!(transport.peer_count(), 0);

    // A peer that is down is Unreachable (openraft backs off), not a hang or a panic.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut peer = net.new_client(2, &BasicNode::new(dead.to_string())).await;
    let r = peer.vote(vote.clone(), option.clone()).await;
    assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");

    // Clients of all groups to one address share the cached channels.
    let mut other = transport.group::<Vec<u8>>(2);
    let _ = other.new_client(2, &BasicNode::new(dead.to_string())).await;
    let _ = net
        .new_heartbeat_client(2, &BasicNode::new(dead.to_string()))
        .await;
    assert_eq!(transport.peer_count(), 1);

    // Storage identity: once the broker knows its cluster and its peers' data directories, a
    // message from another cluster, from a wiped peer, or meant for a directory this one
    // replaced is refused with the reason; matching or unknown ids pass.
    let identity = Identity::new("s1", "c1");
    identity.set_peers(std::collections::HashMap::from([(2, "s2".to_owned())]));
    broker.registry.set_identity(identity);
    let stamped = |cluster: &str, from_storage: &str, target_storage: &str| RaftRequest {
        group_id: 1,
        target: 1,
        payload: payload.clone(),
        from: 2,
        cluster_id: cluster.to_owned(),
        from_storage: from_storage.to_owned(),
        target_storage: target_storage.to_owned(),
    };
    for (what, request) in [
        ("another cluster", stamped("c2", "s2", "s1")),
        ("a wiped sender", stamped("c1", "s2-new", "")),
        ("a replaced target", stamped("c1", "s2", "s1-old")),
    ] {
        let status = client.vote(request).await.expect_err(what);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{what}");
        assert!(
            status.message().starts_with("storage identity:"),
            "{what}: {status}"
        );
    }
    for request in [stamped("c1", "s2", "s1"), stamped("", "", "")] {
        client.vote(request).await.map_err(err)?;
    }
    // Through the transport, a refused message is Unreachable (openraft backs off) and says why.
    let wiped =
        RaftTransport::with_identity(2, TransportConfig::default(), Identity::new("s2-new", "c1"));
    let mut net = wiped.group::<Vec<u8>>(1);
    let mut to_one = net.new_client(1, &BasicNode::new(addr.to_string())).await;
    let r = to_one.vote(vote.clone(), option.clone()).await;
    let text = format!("{r:?}");
    assert!(
        matches!(r, Err(RPCError::Unreachable(_))) && text.contains("replace-broker"),
        "{text}"
    );

    broker.shutdown().await
}
