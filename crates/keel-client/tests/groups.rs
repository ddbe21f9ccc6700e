//! The group consumer and group admin calls against a real in-process broker.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestBroker;
use keel_client::{
    Client, ClientError, ConsumerRecord, GroupConfig, GroupConsumer, OffsetReset, ProducerConfig,
    ProducerRecord, RebalanceListener, ResetTo,
};

/// Every listener call, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Assigned(Vec<(String, u32)>),
    Revoked(Vec<(String, u32)>),
    Lost(Vec<(String, u32)>),
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Event>>>);

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.0.lock().expect("lock").clone()
    }
}

impl RebalanceListener for Recorder {
    fn on_assigned(&mut self, p: &[(String, u32)]) {
        self.0
            .lock()
            .expect("lock")
            .push(Event::Assigned(p.to_vec()));
    }
    fn on_revoked(&mut self, p: &[(String, u32)]) {
        self.0
            .lock()
            .expect("lock")
            .push(Event::Revoked(p.to_vec()));
    }
    fn on_lost(&mut self, p: &[(String, u32)]) {
        self.0.lock().expect("lock").push(Event::Lost(p.to_vec()));
    }
}

async fn produce(client: &Client, topic: &str, n: usize, tag: &str) {
    let producer = client
        .producer(ProducerConfig::default())
        .expect("producer");
    let mut acks = Vec::new();
    for i in 0..n {
        let rec = ProducerRecord::new(topic, format!("{tag}-{i}")).key(format!("k{i}"));
        acks.push(producer.send(rec).await.expect("send"));
    }
    for a in acks {
        a.await.expect("ack");
    }
    producer.close().await.expect("close");
}

/// Polls `consumers` in turn until `n` records came, or `limit` passed.
async fn poll_all(
    consumers: &mut [&mut GroupConsumer],
    n: usize,
    limit: Duration,
) -> Vec<ConsumerRecord> {
    common::collect(n, limit, async || {
        let mut out = Vec::new();
        for c in consumers.iter_mut() {
            out.extend(c.poll(Duration::from_millis(200)).await.expect("poll"));
        }
        out
    })
    .await
}

/// Polls until `cond` holds for the consumers' assignments.
async fn settle(
    consumers: &mut [&mut GroupConsumer],
    limit: Duration,
    cond: impl Fn(&[Vec<(String, u32)>]) -> bool,
) {
    let start = Instant::now();
    loop {
        for c in consumers.iter_mut() {
            c.poll(Duration::from_millis(100)).await.expect("poll");
        }
        let assignments: Vec<_> = consumers.iter().map(|c| c.assignment()).collect();
        if cond(&assignments) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "group did not settle: {assignments:?}"
        );
    }
}

fn config(group: &str, topic: &str) -> GroupConfig {
    GroupConfig::new(group)
        .subscribe([topic])
        .auto_offset_reset(OffsetReset::Earliest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_share_hand_over_and_commit() {
    let (broker, client) = TestBroker::with_topic("orders", 4).await;
    produce(&client, "orders", 40, "a").await;

    let mut one = client
        .group_consumer(config("g", "orders"))
        .expect("consumer");
    let events = Recorder::default();
    one.set_rebalance_listener(Box::new(events.clone()));
    let first = poll_all(&mut [&mut one], 40, Duration::from_secs(20)).await;
    assert_eq!(first.len(), 40, "one member reads everything");
    assert_eq!(one.assignment().len(), 4);
    assert!(one.member_id().is_some());

    // A second member: two partitions move to it, after `one` committed them.
    let mut two = client
        .group_consumer(config("g", "orders"))
        .expect("consumer");
    settle(&mut [&mut one, &mut two], Duration::from_secs(20), |a| {
        a[0].len() == 2 && a[1].len() == 2
    })
    .await;
    assert!(
        events
            .events()
            .iter()
            .any(|e| matches!(e, Event::Revoked(p) if p.len() == 2)),
        "{:?}",
        events.events()
    );

    // Nothing is read twice: the moved partitions start where `one` stopped.
    produce(&client, "orders", 40, "b").await;
    let second = poll_all(&mut [&mut one, &mut two], 40, Duration::from_secs(20)).await;
    let values: BTreeSet<String> = second
        .iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(second.len(), 40, "{values:?}");
    assert!(values.iter().all(|v| v.starts_with("b-")), "{values:?}");

    // Closing commits (auto-commit) and leaves: `two` takes everything at once.
    one.close().await.expect("close");
    settle(&mut [&mut two], Duration::from_secs(20), |a| {
        a[0].len() == 4
    })
    .await;
    two.commit_sync().await.expect("commit");
    let committed = client
        .admin()
        .fetch_offsets("g", &[])
        .await
        .expect("fetch offsets");
    let total: u64 = committed.iter().map(|c| c.offset).sum();
    assert_eq!(total, 80, "{committed:?}");

    let d = client.admin().describe_group("g").await.expect("describe");
    assert_eq!(d.members.len(), 1);
    assert_eq!(d.total_lag, 0);
    assert!(matches!(
        client.admin().delete_group("g").await,
        Err(ClientError::GroupNotEmpty { .. })
    ));
    two.close().await.expect("close");
    client.admin().delete_group("g").await.expect("delete");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_polling_leaves_and_rejoins() {
    let (broker, client) = TestBroker::with_topic("t", 2).await;
    let mut c = client
        .group_consumer(config("slow", "t").max_poll_interval(Duration::from_secs(1)))
        .expect("consumer");
    let events = Recorder::default();
    c.set_rebalance_listener(Box::new(events.clone()));
    settle(&mut [&mut c], Duration::from_secs(20), |a| a[0].len() == 2).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    // Left: no members, and with nothing committed the group is gone altogether.
    match client.admin().describe_group("slow").await {
        Ok(d) => assert!(d.members.is_empty(), "{d:?}"),
        Err(ClientError::UnknownGroup { .. }) => {}
        Err(e) => panic!("describe: {e}"),
    }

    // The next poll drops what it had (lost, not revoked) and joins again.
    settle(&mut [&mut c], Duration::from_secs(20), |a| a[0].len() == 2).await;
    let ev = events.events();
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Lost(p) if p.len() == 2)),
        "{ev:?}"
    );
    assert!(matches!(ev.last(), Some(Event::Assigned(_))), "{ev:?}");
    c.close().await.expect("close");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_offsets_outside_the_group_protocol() {
    let (broker, client) = TestBroker::with_topic("t", 2).await;
    let admin = client.admin();
    produce(&client, "t", 20, "x").await;

    admin
        .commit_offsets("ops", &[("t", 0, 3, "by hand"), ("t", 1, 4, "")])
        .await
        .expect("commit");
    let got = admin
        .fetch_offsets("ops", &[("t".to_owned(), 0)])
        .await
        .expect("fetch");
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].offset, got[0].metadata.as_str()), (3, "by hand"));
    assert!(matches!(
        admin.commit_offsets("ops", &[("t", 0, 1, "")]).await,
        Err(ClientError::OffsetBackwards { .. })
    ));

    let reset = admin
        .reset_offsets("ops", "t", ResetTo::Earliest)
        .await
        .expect("reset");
    assert_eq!(
        reset.iter().map(|c| c.offset).collect::<Vec<_>>(),
        vec![0, 0]
    );
    let reset = admin
        .reset_offsets("ops", "t", ResetTo::Latest)
        .await
        .expect("reset");
    assert_eq!(reset.iter().map(|c| c.offset).sum::<u64>(), 20);

    let listed = admin.list_groups().await.expect("list");
    assert!(listed.iter().any(|g| g.group_id == "ops"), "{listed:?}");

    // A member starts where the reset put the group: at the end.
    let mut c = client.group_consumer(config("ops", "t")).expect("consumer");
    settle(&mut [&mut c], Duration::from_secs(20), |a| a[0].len() == 2).await;
    assert_eq!(
        c.position("t", 0).unwrap_or(0) + c.position("t", 1).unwrap_or(0),
        20
    );
    c.close().await.expect("close");

    admin.delete_group("ops").await.expect("delete");
    assert!(
        admin
            .fetch_offsets("ops", &[])
            .await
            .expect("fetch")
            .is_empty()
    );
    broker.stop().await;
}
