//! The production state machine of a partition group (`PartitionSm`): the high watermark follows
//! applied batches and is rebuilt after a restart; snapshots are cut at a retention point,
//! persisted, and bring a stopped or empty follower to the leader's log and offsets; the store
//! without synchronous appends.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use keel_batch::{BatchIter, DEFAULT_MAX_DECOMPRESSED, decode_records};
use keel_log::LogConfig;
use keel_raft::types::{Membership, Payload};
use keel_raft::{
    AppendAck, Entry, KeelLogStore, KeelRaft, LogId, PartitionSm, SnapshotState, log_id,
    snapshot_point_for_offset,
};
use openraft::storage::{
    IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::{BasicNode, Config, Raft, StorageError};
use support::disk::CrashDisk;
use support::group::{
    WAIT, err, init, node, raft_config, stop, temp_dirs, wait_applied, wait_ready_leader,
};
use support::{Row, batch, layout, small_config};
use tokio::sync::watch;

type Node = Raft<KeelRaft, PartitionSm>;
type Router = support::Router<PartitionSm>;

/// The broker drives snapshots (at the retention point) and purges.
fn config() -> Arc<Config> {
    let purge_all = Config {
        max_in_snapshot_log_to_keep: 0,
        ..Config::default()
    };
    raft_config(50, 200..400, purge_all)
}

/// One replica: its store, state machine and high watermark watch.
struct Replica {
    store: KeelLogStore,
    sm: PartitionSm,
    hwm: watch::Receiver<u64>,
}

impl Replica {
    fn hwm(&self) -> u64 {
        *self.hwm.borrow()
    }
}

/// The state machine over `store`, and a receiver of its high watermark.
fn open_sm(store: &KeelLogStore) -> io::Result<(PartitionSm, watch::Receiver<u64>)> {
    let (tx, hwm) = watch::channel(0);
    Ok((PartitionSm::open(store, tx)?, hwm))
}

/// Opens store and state machine in `dir` (as the broker does, on the blocking pool).
async fn open(dir: &Path, sync_appends: bool) -> io::Result<Replica> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let store = KeelLogStore::open(&dir, small_config())?;
        store.set_sync_appends(sync_appends);
        let (sm, hwm) = open_sm(&store)?;
        Ok(Replica { store, sm, hwm })
    })
    .await
    .map_err(err)?
}

/// Opens a replica and starts its Raft node in `router`.
async fn start(router: &Router, id: u64, dir: &Path, sync_appends: bool) -> io::Result<Replica> {
    let r = open(dir, sync_appends).await?;
    let raft = Raft::new(id, config(), router.clone(), r.store.clone(), r.sm.clone())
        .await
        .map_err(err)?;
    router.insert(id, raft);
    Ok(r)
}

/// Writes `count` batches of `records` records one after the other; each acknowledgement must
/// continue the offsets, and the leader's high watermark must already cover it.
async fn write(
    leader: &Node,
    sm: &Replica,
    tag: &str,
    count: u64,
    records: usize,
) -> io::Result<Vec<(LogId, AppendAck)>> {
    let mut out = Vec::new();
    for i in 0..count {
        let before = sm.sm.applied_next_offset();
        let resp = leader
            .client_write(batch(&format!("{tag}{i}"), records))
            .await
            .map_err(err)?;
        let ack = resp.data;
        assert_eq!(ack.base_offset, before, "{tag}{i}: offsets continue");
        assert_eq!(ack.next_offset, before + records as u64);
        assert_eq!(sm.hwm(), ack.next_offset, "{tag}{i}: high watermark");
        out.push((resp.log_id, ack));
    }
    Ok(out)
}

/// The Raft index of the last acknowledged write.
fn last_index(acks: &[(LogId, AppendAck)]) -> u64 {
    acks.last().map_or(0, |a| a.0.index)
}

/// Sets the snapshot point for a retention keeping `offset` onwards, builds the snapshot there
/// and purges the log up to it; waits until both are persisted. Returns the point.
async fn snapshot_and_purge(n: &Node, r: &Replica, offset: u64) -> io::Result<LogId> {
    let sm = r.sm.clone();
    let point = tokio::task::spawn_blocking(move || sm.set_snapshot_point_for_offset(offset))
        .await
        .map_err(err)??
        .expect("a point before the offset");
    n.trigger().snapshot().await.map_err(err)?;
    n.wait(WAIT)
        .metrics(|m| m.snapshot == Some(point), "snapshot built at the point")
        .await
        .map_err(err)?;
    n.trigger().purge_log(point.index).await.map_err(err)?;
    n.wait(WAIT)
        .metrics(|m| m.purged == Some(point), "log purged to the point")
        .await
        .map_err(err)?;
    assert_eq!(r.sm.snapshot_last_log_id(), Some(point));
    assert_eq!(r.sm.snapshot_point(), None, "the point is consumed");
    assert_eq!(r.store.purge_point(), Some((point, offset)));
    Ok(point)
}

fn rows_after(rows: Vec<Row>, point: LogId) -> Vec<Row> {
    rows.into_iter().filter(|r| r.0 > point.index).collect()
}

/// Every record value in the log from its start, with its offset.
fn read_values(store: &KeelLogStore) -> io::Result<Vec<(u64, String)>> {
    let log = store.log();
    let mut out = Vec::new();
    let mut offset = log.log_start_offset();
    while offset < log.log_end_offset() {
        let from = offset;
        let slice = log.read(offset, u64::MAX).map_err(err)?;
        for item in BatchIter::new(&slice.bytes) {
            let (h, b) = item.map_err(err)?;
            if h.attributes.control {
                continue;
            }
            let bytes: Bytes = slice.bytes.slice_ref(b);
            for rec in decode_records(&bytes, DEFAULT_MAX_DECOMPRESSED).map_err(err)? {
                let v = rec.value.map(|v| String::from_utf8_lossy(&v).into_owned());
                out.push((rec.offset, v.unwrap_or_default()));
            }
            offset = h.next_offset();
        }
        if offset == from {
            return Err(err(format!("reading at offset {offset} makes no progress")));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_high_watermark_follows_writes_and_survives_restarts() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let router = Router::default();
    let r = start(&router, 1, dir.path(), true).await?;
    assert_eq!(r.hwm(), 0);
    init(&router, &[1]).await?;
    let n = node(&router, 1);
    let acks = write(&n, &r, "a", 40, 8).await?;
    let end = acks.last().expect("acks").1.next_offset;
    assert_eq!(end, 320);
    assert_eq!(r.sm.applied_next_offset(), end);
    assert_eq!(r.store.log().log_end_offset(), end);
    assert!(r.store.log().segment_count() >= 2, "writes span segments");
    let last = last_index(&acks);
    assert_eq!(r.sm.last_applied().map(|l| l.index), Some(last));

    // Restart without a snapshot: the committed entries are re-applied from the log.
    stop(&router, 1).await?;
    drop((n, r));
    let r = start(&router, 1, dir.path(), true).await?;
    let n = node(&router, 1);
    wait_applied(&n, last).await?;
    assert_eq!(r.hwm(), end, "high watermark rebuilt");
    assert_eq!(r.sm.applied_next_offset(), end);
    wait_ready_leader(&n).await?;
    let more = write(&n, &r, "b", 3, 2).await?;
    let end = more.last().expect("acks").1.next_offset;

    // Snapshot at the start of the last segment, purge, restart: the high watermark starts at
    // the snapshot and is rebuilt from the entries after it.
    let keep_from = *r
        .store
        .log()
        .segment_base_offsets()
        .last()
        .expect("segments");
    assert!(keep_from > 0);
    let segments = r.store.log().segment_count();
    let point = snapshot_and_purge(&n, &r, keep_from).await?;
    assert_eq!(r.store.log().log_start_offset(), keep_from);
    assert_eq!(r.store.log().segment_count(), 1, "of {segments}");
    assert!(r.store.log().first_raft_index() <= point.index + 1);
    let last = last_index(&more);
    stop(&router, 1).await?;
    drop((n, r));

    let r = open(dir.path(), true).await?;
    assert_eq!(
        r.sm.last_applied(),
        Some(point),
        "applied state is the snapshot's"
    );
    assert_eq!(
        r.hwm(),
        keep_from,
        "the high watermark starts at the snapshot"
    );
    drop(r);
    let r = start(&router, 1, dir.path(), true).await?;
    let n = node(&router, 1);
    wait_applied(&n, last).await?;
    assert_eq!(r.hwm(), end);
    assert_eq!(r.sm.snapshot_last_log_id(), Some(point));
    let values = read_values(&r.store)?;
    assert_eq!(values.first().map(|v| v.0), Some(keep_from));
    assert_eq!(values.last(), Some(&(end - 1, "b2-1".to_owned())));
    stop(&router, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_and_empty_followers_catch_up_through_a_retention_snapshot() -> io::Result<()> {
    let dirs = temp_dirs(4)?;
    let router = Router::default();
    let mut replicas = BTreeMap::new();
    for (id, dir) in (1..=3u64).zip(&dirs) {
        replicas.insert(id, start(&router, id, dir.path(), true).await?);
    }
    let leader = init(&router, &[1, 2, 3]).await?;
    let ln = node(&router, leader);
    let acks = write(&ln, &replicas[&leader], "a", 5, 3).await?;
    let last = last_index(&acks);
    for id in 1..=3u64 {
        wait_applied(&node(&router, id), last).await?;
    }

    // A follower goes down; the leader writes on and compacts at a retention boundary past
    // everything the follower has.
    let lagging = (1..=3u64).find(|&i| i != leader).expect("follower");
    stop(&router, lagging).await?;
    let lagging_next_index = replicas[&lagging].store.log().next_raft_index();
    replicas.remove(&lagging);
    let acks = write(&ln, &replicas[&leader], "b", 60, 8).await?;
    let end = acks.last().expect("acks").1.next_offset;
    let lr = &replicas[&leader];
    let bases = lr.store.log().segment_base_offsets();
    assert!(bases.len() >= 3, "writes span segments: {bases:?}");
    let keep_from = bases[bases.len() / 2];
    let point = snapshot_and_purge(&ln, lr, keep_from).await?;
    assert!(
        point.index >= lagging_next_index,
        "the follower needs purged entries"
    );
    assert_eq!(lr.store.log().log_start_offset(), keep_from);
    assert!(lr.store.log().first_raft_index() <= point.index + 1);
    assert!(
        lr.store.log().read(0, 1).is_err(),
        "data below the point is gone"
    );
    let reference = rows_after(layout(&lr.store), point);
    assert_eq!(
        reference.first().map(|r| (r.0, r.2)),
        Some((point.index + 1, keep_from))
    );

    // The follower comes back with its old log and gets the snapshot, then the entries after it.
    let r = start(&router, lagging, dirs[lagging as usize - 1].path(), true).await?;
    let last = last_index(&acks);
    wait_applied(&node(&router, lagging), last).await?;
    assert_eq!(
        r.sm.snapshot_last_log_id(),
        Some(point),
        "caught up by snapshot"
    );
    assert_eq!(rows_after(layout(&r.store), point), reference);
    assert_eq!(r.store.log().log_start_offset(), keep_from);
    assert_eq!(r.hwm(), end);
    assert_eq!(r.hwm(), lr.hwm());
    replicas.insert(lagging, r);

    // A new replica with an empty store joins as a learner and catches up the same way.
    let r = start(&router, 4, dirs[3].path(), true).await?;
    ln.add_learner(4, BasicNode::default(), true)
        .await
        .map_err(err)?;
    let more = write(&ln, &replicas[&leader], "c", 3, 2).await?;
    let end = more.last().expect("acks").1.next_offset;
    let last = last_index(&more);
    for id in [1, 2, 3, 4] {
        wait_applied(&node(&router, id), last).await?;
    }
    assert_eq!(r.sm.snapshot_last_log_id(), Some(point));
    replicas.insert(4, r);
    let reference = layout(&replicas[&leader].store);
    for (id, r) in &replicas {
        assert_eq!(
            rows_after(layout(&r.store), point),
            rows_after(reference.clone(), point),
            "replica {id} differs from the leader"
        );
        assert_eq!(r.hwm(), end, "replica {id}: high watermark");
        assert_eq!(r.store.log().log_end_offset(), end, "replica {id}");
    }
    assert_eq!(
        read_values(&replicas[&4].store)?,
        read_values(&replicas[&leader].store)?
    );

    // The follower restarts from the snapshot it installed and rebuilds the same watermark.
    stop(&router, lagging).await?;
    replicas.remove(&lagging);
    let r = start(&router, lagging, dirs[lagging as usize - 1].path(), true).await?;
    wait_applied(&node(&router, lagging), last).await?;
    assert_eq!(r.hwm(), end);
    assert_eq!(r.sm.snapshot_last_log_id(), Some(point));

    for id in 1..=4u64 {
        stop(&router, id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_without_fsync_are_acknowledged_and_readable() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let router = Router::default();
    let r = start(&router, 1, dir.path(), false).await?;
    assert!(!r.store.sync_appends());
    init(&router, &[1]).await?;
    let n = node(&router, 1);
    let acks = write(&n, &r, "u", 30, 4).await?;
    let end = acks.last().expect("acks").1.next_offset;
    assert_eq!(r.hwm(), end);
    let values = read_values(&r.store)?;
    assert_eq!(values.len() as u64, end);
    assert_eq!(values[0], (0, "u0-0".to_owned()));
    assert_eq!(values[end as usize - 1], (end - 1, "u29-3".to_owned()));
    r.store.log().flush().map_err(err)?;
    let last = last_index(&acks);
    stop(&router, 1).await?;
    drop((n, r));

    let r = start(&router, 1, dir.path(), false).await?;
    wait_applied(&node(&router, 1), last).await?;
    assert_eq!(r.hwm(), end);
    assert_eq!(read_values(&r.store)?.len() as u64, end);
    stop(&router, 1).await
}

// --- The store and the state machine driven directly -------------------------------------

async fn append(store: &mut KeelLogStore, entries: Vec<Entry>) -> io::Result<()> {
    let (tx, rx) = KeelRaft::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    rx.await
        .map_err(|_| io::Error::other("append callback dropped"))?
}

fn membership(term: u64, index: u64, voters: &[u64]) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: Payload::Membership(Membership::new_with_defaults(
            vec![voters.iter().copied().collect()],
            [],
        )),
    }
}

fn normal(term: u64, index: u64, records: usize) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: Payload::Normal(batch(&format!("n{index}"), records)),
    }
}

/// Applies every entry of the store in `[from, to)`.
async fn apply_from_log(
    store: &mut KeelLogStore,
    sm: &mut PartitionSm,
    from: u64,
    to: u64,
) -> io::Result<()> {
    let entries = store
        .get_log_reader()
        .await
        .try_get_log_entries(from..to)
        .await?;
    let items: Vec<io::Result<_>> = entries.into_iter().map(|e| Ok((e, None))).collect();
    sm.apply(futures::stream::iter(items)).await
}

#[tokio::test]
async fn snapshot_point_for_offset_stops_before_the_offset() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = KeelLogStore::open(dir.path(), LogConfig::default())?;
    assert_eq!(snapshot_point_for_offset(&store, 0)?, None, "empty log");
    // Control entries first (no offsets), then batches of 3 records: [0,3) [3,6) [6,9) ...
    let mut entries = vec![
        membership(1, 0, &[1]),
        Entry {
            log_id: log_id(1, 1),
            payload: Payload::Blank,
        },
    ];
    for i in 2..12 {
        entries.push(normal(1, i, 3));
    }
    append(&mut store, entries).await?;
    assert_eq!(store.log().log_end_offset(), 30);
    let point = |o| snapshot_point_for_offset(&store, o);
    assert_eq!(point(0)?, None, "only control entries lie before offset 0");
    assert_eq!(point(2)?, None, "offset 2 is inside the first batch");
    assert_eq!(point(3)?, Some((log_id(1, 2), 3)));
    assert_eq!(point(5)?, Some((log_id(1, 2), 3)));
    assert_eq!(point(6)?, Some((log_id(1, 3), 6)));
    assert_eq!(point(29)?, Some((log_id(1, 10), 27)));
    assert_eq!(point(30)?, Some((log_id(1, 11), 30)), "the whole log");
    assert_eq!(
        point(31).map_err(|e| e.kind()),
        Err(io::ErrorKind::InvalidInput)
    );
    Ok(())
}

/// An entry with an idempotent producer's batch.
fn idempotent(term: u64, index: u64, producer_id: i64, seq: i32, records: usize) -> Entry {
    let mut b = keel_batch::BatchBuilder::new(keel_batch::Compression::None).producer(
        keel_batch::ProducerInfo {
            producer_id,
            producer_epoch: 0,
            base_sequence: seq,
        },
    );
    for i in 0..records {
        b.push(&keel_batch::RecordRef {
            timestamp: 7,
            key: None,
            value: Some(format!("p{index}-{i}").as_bytes()),
            headers: &[],
        })
        .expect("push");
    }
    Entry {
        log_id: log_id(term, index),
        payload: Payload::Normal(keel_raft::BatchData::new(b.build().expect("build"))),
    }
}

#[tokio::test]
async fn producer_state_is_rebuilt_from_the_log_and_carried_by_snapshots() -> io::Result<()> {
    use keel_raft::producers::{SeqBatch, Verdict};
    let dir = tempfile::tempdir()?;
    let mut store = KeelLogStore::open(dir.path(), small_config())?;
    let (mut sm, _) = open_sm(&store)?;
    // Producer 7 writes batches of 2 records with sequences 0, 2, 4, ...; producer 8 one batch.
    let mut entries = vec![membership(1, 0, &[1])];
    entries.extend((1..9).map(|i| idempotent(1, i, 7, (i as i32 - 1) * 2, 2)));
    entries.push(idempotent(1, 9, 8, 100, 1));
    entries.push(normal(1, 10, 3));
    append(&mut store, entries).await?;
    apply_from_log(&mut store, &mut sm, 0, 11).await?;
    let dup = |sm: &PartitionSm, seq: i32| sm.with_producers(|t| t.check(7, 0, seq, seq + 1));
    assert_eq!(
        dup(&sm, 14),
        Verdict::Duplicate(SeqBatch {
            first_seq: 14,
            last_seq: 15,
            base_offset: 14,
            next_offset: 16
        })
    );
    assert!(
        matches!(dup(&sm, 4), Verdict::OutOfOrder { .. }),
        "evicted from the window"
    );
    assert_eq!(
        sm.with_producers(|t| t.check(7, 0, 16, 16)),
        Verdict::Append
    );
    assert_eq!(sm.producer_count(), 2);

    // A restart replays the log into the same state.
    drop(sm);
    let (mut again, _) = open_sm(&store)?;
    assert_eq!(again.producer_count(), 0);
    apply_from_log(&mut store, &mut again, 0, 11).await?;
    assert_eq!(
        dup(&again, 14),
        Verdict::Duplicate(SeqBatch {
            first_seq: 14,
            last_seq: 15,
            base_offset: 14,
            next_offset: 16
        })
    );

    // A snapshot cut at the retention boundary (before the window) carries the state, and a
    // follower that installs it and re-applies the entries after the point agrees.
    assert_eq!(again.set_snapshot_point_for_offset(6)?, Some(log_id(1, 3)));
    let snap = again.get_snapshot_builder().await.build_snapshot().await?;
    let dir2 = tempfile::tempdir()?;
    let mut store2 = KeelLogStore::open(dir2.path(), small_config())?;
    let (mut follower, _) = open_sm(&store2)?;
    follower
        .install_snapshot(&snap.meta, snap.snapshot.clone())
        .await?;
    store2.purge(log_id(1, 3)).await?;
    assert_eq!(dup(&follower, 14), dup(&again, 14));
    assert_eq!(follower.producer_count(), 2);
    let rest = store
        .get_log_reader()
        .await
        .try_get_log_entries(4..11)
        .await?;
    append(&mut store2, rest).await?;
    apply_from_log(&mut store2, &mut follower, 4, 11).await?;
    for seq in (0..18).step_by(2) {
        assert_eq!(dup(&follower, seq), dup(&again, seq), "sequence {seq}");
    }
    assert_eq!(
        follower.with_producers(|t| t.check(8, 0, 100, 100)),
        again.with_producers(|t| t.check(8, 0, 100, 100))
    );
    Ok(())
}

#[tokio::test]
async fn snapshot_is_persisted_restored_and_installed() -> io::Result<()> {
    let disk = CrashDisk::new()?;
    let mut store = disk.open()?;
    let (mut sm, hwm) = open_sm(&store)?;
    let mut entries = vec![membership(1, 0, &[1])];
    entries.extend((1..10).map(|i| normal(1, i, 2)));
    entries.push(membership(2, 10, &[1, 2]));
    entries.extend((11..20).map(|i| normal(2, i, 2)));
    append(&mut store, entries).await?;
    assert_eq!(store.log().log_end_offset(), 36);

    // Nothing to snapshot yet: openraft's own requests are declined, a forced build is empty.
    assert!(sm.try_create_snapshot_builder(false).await.is_none());
    let empty = sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(empty.meta.last_log_id, None);
    assert!(sm.get_current_snapshot().await?.is_none(), "not persisted");

    apply_from_log(&mut store, &mut sm, 0, 15).await?;
    assert_eq!(*hwm.borrow(), 26);
    assert_eq!(sm.applied_next_offset(), 26);
    let (applied, m) = sm.applied_state().await?;
    assert_eq!(applied, Some(log_id(2, 14)));
    assert_eq!(*m.log_id(), Some(log_id(2, 10)));

    // A point must be applied and match the log.
    let bad = |p, o| sm.set_snapshot_point(p, o).map_err(|e| e.kind());
    assert_eq!(bad(log_id(2, 15), 28), Err(io::ErrorKind::InvalidInput));
    assert_eq!(bad(log_id(1, 8), 14), Err(io::ErrorKind::InvalidInput));
    assert_eq!(bad(log_id(2, 8), 16), Err(io::ErrorKind::InvalidInput));
    // Past the last applied entry, the retention point is clamped to it.
    assert_eq!(sm.set_snapshot_point_for_offset(34)?, Some(log_id(2, 14)));
    // A point before the membership change names the membership in force there.
    assert_eq!(sm.set_snapshot_point_for_offset(16)?, Some(log_id(1, 8)));
    assert!(sm.try_create_snapshot_builder(false).await.is_some());
    let snap = sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 8)));
    assert_eq!(*snap.meta.last_membership.log_id(), Some(log_id(1, 0)));
    let state: SnapshotState = serde_json::from_slice(&snap.snapshot).map_err(err)?;
    assert_eq!(state.next_offset, 16);
    assert_eq!(sm.snapshot_point(), None);
    // Without a new point a build returns the current snapshot; a covered point is ignored.
    assert!(!sm.set_snapshot_point(log_id(1, 5), 10)?);
    let again = sm.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(again.meta, snap.meta);
    store.purge(log_id(1, 8)).await?;
    // Power loss: the snapshot file was fsynced.
    drop((store, sm));
    disk.fs.crash()?;

    let store = disk.open()?;
    let (mut sm, hwm) = open_sm(&store)?;
    assert_eq!(*hwm.borrow(), 16);
    let (applied, m) = sm.applied_state().await?;
    assert_eq!(applied, Some(log_id(1, 8)));
    assert_eq!(*m.log_id(), Some(log_id(1, 0)));
    let cur = sm.get_current_snapshot().await?.expect("snapshot");
    assert_eq!(cur.meta, snap.meta);
    assert_eq!(cur.snapshot, snap.snapshot);

    // Installed on an empty replica: the log restarts at the snapshot's offsets.
    let dir2 = tempfile::tempdir()?;
    let mut store2 = KeelLogStore::open(dir2.path(), small_config())?;
    let (mut sm2, hwm2) = open_sm(&store2)?;
    sm2.install_snapshot(&cur.meta, cur.snapshot.clone())
        .await?;
    assert_eq!(*hwm2.borrow(), 16);
    assert_eq!(sm2.applied_next_offset(), 16);
    store2.purge(log_id(1, 8)).await?;
    assert_eq!(store2.log().log_end_offset(), 16);
    assert_eq!(store2.log().next_raft_index(), 9);
    append(&mut store2, vec![normal(1, 9, 2)]).await?;
    assert_eq!(store2.log().entry_header(9).map_err(err)?.base_offset, 16);
    drop((store2, sm2));
    let store2 = KeelLogStore::open(dir2.path(), small_config())?;
    let (mut sm2, hwm2) = open_sm(&store2)?;
    assert_eq!(sm2.applied_state().await?.0, Some(log_id(1, 8)));
    assert_eq!(*hwm2.borrow(), 16);

    // Garbage snapshot data is refused.
    let r = sm2.install_snapshot(&cur.meta, b"nope".to_vec()).await;
    assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::InvalidData));
    Ok(())
}

#[tokio::test]
async fn appends_skip_the_fsync_only_when_asked_and_restart_after_power_loss() -> io::Result<()> {
    let disk = CrashDisk::new()?;
    {
        let mut store = disk.open()?;
        assert!(store.sync_appends());
        append(&mut store, vec![membership(1, 0, &[1]), normal(1, 1, 2)]).await?;
        let synced = disk.fs.sync_count();
        append(&mut store, vec![normal(1, 2, 2)]).await?;
        assert!(disk.fs.sync_count() > synced, "a synchronous append fsyncs");
        store.set_sync_appends(false);
        let synced = disk.fs.sync_count();
        append(&mut store, (3..8).map(|i| normal(1, i, 2)).collect()).await?;
        assert_eq!(disk.fs.sync_count(), synced, "no fsync");
        assert_eq!(store.log().log_end_offset(), 14);
        store.save_committed(Some(log_id(1, 7))).await?;
    }
    disk.fs.crash()?;
    // The unsynced entries are gone; the committed id, fsynced, is clamped to what is left.
    let mut store = disk.open()?;
    assert_eq!(store.log().next_raft_index(), 3);
    assert_eq!(store.read_committed().await?, Some(log_id(1, 2)));
    Ok(())
}

// --- openraft's storage suite: the cases that do not assume snapshots at the last applied ---

struct SmBuilder;

impl StoreBuilder<KeelRaft, KeelLogStore, PartitionSm, tempfile::TempDir> for SmBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, KeelLogStore, PartitionSm), StorageError<KeelRaft>> {
        let e = |e: io::Error| StorageError::read(KeelRaft::err_from_error(&e));
        let dir = tempfile::tempdir().map_err(e)?;
        let store = KeelLogStore::open(dir.path(), small_config()).map_err(e)?;
        let sm = PartitionSm::open(&store, watch::channel(0).0).map_err(e)?;
        Ok((dir, store, sm))
    }
}

type S = Suite<KeelRaft, KeelLogStore, PartitionSm, SmBuilder, tempfile::TempDir>;

state_machine_suite_cases!(suite, SmBuilder;);
