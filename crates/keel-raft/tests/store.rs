//! Keel-specific behaviour of the Raft log store: restarts, offsets, corruption, crashes.

mod support;

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use keel_batch::{BatchBuilder, BatchHeader, Compression, RecordRef};
use keel_log::LogConfig;
use keel_raft::state_file::StateFile;
use keel_raft::types::{Membership, Payload};
use keel_raft::{BatchData, Entry, KeelLogStore, KeelRaft, LogId, Vote, log_id};
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use support::disk::CrashDisk;
use support::small_config;

fn data_batch(tag: &str, records: usize) -> BatchData {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..records {
        let v = format!("{tag}-{i}");
        b.push(&RecordRef {
            timestamp: 1_000 + i as i64,
            key: None,
            value: Some(v.as_bytes()),
            headers: &[],
        })
        .expect("push");
    }
    BatchData::new(b.build().expect("build"))
}

fn normal(term: u64, index: u64, tag: &str, records: usize) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: Payload::Normal(data_batch(tag, records)),
    }
}

fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: Payload::Blank,
    }
}

fn membership(term: u64, index: u64, voters: &[u64]) -> Entry {
    let set: BTreeSet<u64> = voters.iter().copied().collect();
    Entry {
        log_id: log_id(term, index),
        payload: Payload::Membership(Membership::new_with_defaults(vec![set], [])),
    }
}

/// Appends and waits for the durability callback.
async fn append(store: &mut KeelLogStore, entries: Vec<Entry>) -> io::Result<()> {
    let (tx, rx) = KeelRaft::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    rx.await
        .map_err(|_| io::Error::other("append callback dropped"))?
}

async fn all_entries(store: &mut KeelLogStore) -> io::Result<Vec<Entry>> {
    store.get_log_reader().await.try_get_log_entries(0..).await
}

fn open(dir: &Path) -> io::Result<KeelLogStore> {
    KeelLogStore::open(dir, small_config())
}

/// The header of a normal entry's batch.
fn header(e: &Entry) -> io::Result<BatchHeader> {
    let Payload::Normal(b) = &e.payload else {
        panic!("not a normal entry: {:?}", e.payload)
    };
    BatchHeader::parse(b.bytes()).map_err(io::Error::other)
}

/// A store in `dir` holding two entries, purged to `point` past its end, as after installing a
/// snapshot ahead of the log; `snapshot_offset` is the offset that snapshot continues at.
async fn purged_past_the_end(
    dir: &Path,
    point: LogId,
    snapshot_offset: Option<u64>,
) -> io::Result<KeelLogStore> {
    let mut store = open(dir)?;
    append(&mut store, vec![blank(1, 0), normal(1, 1, "x", 2)]).await?;
    if let Some(offset) = snapshot_offset {
        store.set_snapshot_offset(point, offset);
    }
    store.purge(point).await?;
    Ok(store)
}

fn vote(term: u64, node: u64, committed: bool) -> Vote {
    if committed {
        Vote::new_committed(term, node)
    } else {
        Vote::new(term, node)
    }
}

#[tokio::test]
async fn normal_entries_take_contiguous_offsets_and_control_entries_none() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = open(dir.path())?;
    append(
        &mut store,
        vec![
            membership(1, 0, &[1, 2, 3]),
            blank(1, 1),
            normal(1, 2, "a", 3),
            normal(1, 3, "b", 5),
            blank(2, 4),
            normal(2, 5, "c", 1),
        ],
    )
    .await?;
    let entries = all_entries(&mut store).await?;
    assert_eq!(entries.len(), 6);
    let mut offsets = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.log_id.index, i as u64);
        if let Payload::Normal(b) = &e.payload {
            let h = BatchHeader::parse(b.bytes()).map_err(io::Error::other)?;
            assert_eq!(
                (h.raft_index, h.raft_term),
                (e.log_id.index, e.log_id.leader_id.term)
            );
            offsets.push((h.base_offset, h.next_offset()));
        }
    }
    assert_eq!(offsets, vec![(0, 3), (3, 8), (8, 9)]);
    assert!(matches!(&entries[0].payload, Payload::Membership(m)
        if m.voter_ids().collect::<Vec<_>>() == vec![1, 2, 3]));
    assert!(matches!(entries[1].payload, Payload::Blank));
    assert!(matches!(entries[4].payload, Payload::Blank));
    assert_eq!(store.log().log_end_offset(), 9);
    Ok(())
}

#[tokio::test]
async fn a_control_batch_is_not_a_valid_normal_payload() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = open(dir.path())?;
    let control = keel_batch::control_batch(&[1], 0).map_err(io::Error::other)?;
    let e = Entry {
        log_id: log_id(1, 0),
        payload: Payload::Normal(BatchData::new(control)),
    };
    let err = store
        .append(vec![e], IOFlushed::noop())
        .await
        .expect_err("control batch as data");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    Ok(())
}

#[tokio::test]
async fn restart_preserves_vote_committed_entries_and_purge_point() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut entries = vec![membership(1, 0, &[1])];
    // Enough data to span several 4 KiB segments.
    for i in 1..60 {
        entries.push(normal(1, i, &format!("e{i}"), 4));
    }
    {
        let mut store = open(dir.path())?;
        store.save_vote(&vote(3, 1, true)).await?;
        append(&mut store, entries.clone()).await?;
        store.save_committed(Some(log_id(1, 50))).await?;
        store.purge(log_id(1, 20)).await?;
        assert!(store.log().segment_count() > 1);
        // Dropped without a clean close.
    }
    let mut store = open(dir.path())?;
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.read_vote().await?, Some(vote(3, 1, true)));
    assert_eq!(store.read_committed().await?, Some(log_id(1, 50)));
    let st = store.get_log_state().await?;
    assert_eq!(st.last_purged_log_id, Some(log_id(1, 20)));
    assert_eq!(st.last_log_id, Some(log_id(1, 59)));
    let got = all_entries(&mut store).await?;
    assert_eq!(got.len(), 39);
    assert_eq!(got[0].log_id, log_id(1, 21));
    // The purge removed whole segments below the first kept entry's offset.
    let first_kept = header(&got[0])?;
    assert_eq!(store.log().log_start_offset(), first_kept.base_offset);
    assert!(store.log().first_raft_index() <= 21);
    // The same bytes come back (modulo stamping).
    for (g, e) in got.iter().zip(&entries[21..]) {
        assert_eq!(g.log_id, e.log_id);
        let (Payload::Normal(a), Payload::Normal(b)) = (&g.payload, &e.payload) else {
            panic!("payload kinds differ");
        };
        assert_eq!(a.bytes().len(), b.bytes().len());
        assert_eq!(a.bytes()[73..], b.bytes()[73..]);
    }
    // And the log continues where it ended.
    append(&mut store, vec![blank(2, 60), normal(2, 61, "after", 2)]).await?;
    assert_eq!(
        store.get_log_state().await?.last_log_id,
        Some(log_id(2, 61))
    );
    Ok(())
}

#[tokio::test]
async fn purge_past_the_end_survives_restart_and_appends_continue() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let mut store = purged_past_the_end(dir.path(), log_id(4, 100), None).await?;
        let st = store.get_log_state().await?;
        assert_eq!(st.last_purged_log_id, Some(log_id(4, 100)));
        assert_eq!(st.last_log_id, Some(log_id(4, 100)));
    }
    let mut store = open(dir.path())?;
    let st = store.get_log_state().await?;
    assert_eq!(st.last_purged_log_id, Some(log_id(4, 100)));
    assert_eq!(st.last_log_id, Some(log_id(4, 100)));
    assert!(all_entries(&mut store).await?.is_empty());
    // Offsets continue from the old log end.
    append(&mut store, vec![normal(5, 101, "y", 3)]).await?;
    let got = all_entries(&mut store).await?;
    assert_eq!(got.len(), 1);
    let h = header(&got[0])?;
    assert_eq!((h.base_offset, h.raft_index, h.raft_term), (2, 101, 5));
    Ok(())
}

#[tokio::test]
async fn an_interrupted_purge_is_finished_on_open() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let mut store = open(dir.path())?;
        append(&mut store, vec![blank(1, 0), blank(1, 1)]).await?;
    }
    // The purge point was recorded, then the process died before the log was cut.
    #[derive(serde::Serialize)]
    struct PurgeRecord {
        log_id: LogId,
        next_offset: u64,
    }
    let record = PurgeRecord {
        log_id: log_id(2, 9),
        next_offset: 77,
    };
    StateFile::new(dir.path(), "raft-purged").store(&keel_log::fs::RealFs, &Some(record))?;
    let mut store = open(dir.path())?;
    let st = store.get_log_state().await?;
    assert_eq!(st.last_purged_log_id, Some(log_id(2, 9)));
    assert_eq!(st.last_log_id, Some(log_id(2, 9)));
    assert_eq!(store.log().next_raft_index(), 10);
    assert_eq!(store.log().log_end_offset(), 77);
    append(&mut store, vec![blank(2, 10)]).await?;
    Ok(())
}

#[tokio::test]
async fn a_corrupt_vote_file_refuses_to_open() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let mut store = open(dir.path())?;
        store.save_vote(&vote(7, 2, false)).await?;
    }
    let path = dir.path().join("raft-vote");
    let mut bytes = std::fs::read(&path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes)?;
    let err = open(dir.path()).expect_err("corrupt vote accepted");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("raft-vote"), "{err}");

    // A truncated file is corrupt too, not "no vote".
    std::fs::write(&path, &bytes[..5])?;
    assert!(open(dir.path()).is_err());
    Ok(())
}

#[tokio::test]
async fn a_corrupt_purge_file_refuses_to_open_and_a_corrupt_committed_file_is_ignored()
-> io::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let mut store = open(dir.path())?;
        append(&mut store, vec![blank(1, 0), blank(1, 1), blank(1, 2)]).await?;
        store.save_committed(Some(log_id(1, 2))).await?;
        store.purge(log_id(1, 0)).await?;
    }
    std::fs::write(dir.path().join("raft-committed"), b"garbage")?;
    let mut store = open(dir.path())?;
    assert_eq!(store.read_committed().await?, None);
    drop(store);
    std::fs::write(dir.path().join("raft-purged"), b"garbage")?;
    assert_eq!(
        open(dir.path()).expect_err("corrupt purge").kind(),
        io::ErrorKind::InvalidData
    );
    Ok(())
}

#[tokio::test]
async fn truncate_then_append_a_new_term() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = open(dir.path())?;
    let mut entries = vec![blank(1, 0)];
    for i in 1..40 {
        entries.push(normal(1, i, "t", 3));
    }
    append(&mut store, entries).await?;
    store.truncate_after(Some(log_id(1, 10))).await?;
    assert_eq!(store.log().log_end_offset(), 30);
    append(&mut store, vec![blank(3, 11), normal(3, 12, "n", 1)]).await?;
    let got = all_entries(&mut store).await?;
    assert_eq!(got.len(), 13);
    assert_eq!(got[12].log_id, log_id(3, 12));
    assert_eq!(header(&got[12])?.base_offset, 30);

    // A hole is refused.
    assert!(
        store
            .append(vec![blank(3, 20)], IOFlushed::noop())
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn limited_reads_respect_the_byte_budget() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = open(dir.path())?;
    let big = |i| normal(1, i, &"z".repeat(2000), 200);
    let entries: Vec<Entry> = (0..20).map(big).collect();
    let one = entries[0].payload.clone();
    let Payload::Normal(b) = one else {
        panic!("not normal")
    };
    let per_entry = b.bytes().len() as u64;
    append(&mut store, entries).await?;
    let mut r = store.get_log_reader().await;
    let got = r.limited_get_log_entries(0, 20).await?;
    assert!(!got.is_empty() && got.len() < 20, "got {}", got.len());
    assert!(got.len() as u64 * per_entry <= keel_raft::DEFAULT_MAX_READ_BYTES + per_entry);
    assert_eq!(r.try_get_log_entries(0..20).await?.len(), 20);
    Ok(())
}

/// Acknowledged appends, the vote and the purge point survive a power loss.
#[tokio::test]
async fn acknowledged_state_survives_power_loss() -> io::Result<()> {
    let disk = CrashDisk::new()?;
    {
        let mut store = disk.open()?;
        store.save_vote(&vote(2, 1, true)).await?;
        let mut entries = vec![membership(2, 0, &[1])];
        for i in 1..30 {
            entries.push(normal(2, i, "p", 5));
        }
        append(&mut store, entries).await?;
        store.purge(log_id(2, 5)).await?;
    }
    disk.fs.crash()?;
    let mut store = disk.open()?;
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.read_vote().await?, Some(vote(2, 1, true)));
    let st = store.get_log_state().await?;
    assert_eq!(st.last_purged_log_id, Some(log_id(2, 5)));
    assert_eq!(st.last_log_id, Some(log_id(2, 29)));
    assert_eq!(all_entries(&mut store).await?.len(), 24);
    Ok(())
}

#[tokio::test]
async fn log_config_is_taken_over_by_the_store() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = LogConfig {
        retention_bytes: Some(1),
        ..small_config()
    };
    let store = KeelLogStore::open(dir.path(), cfg)?;
    // Retention is the store's (through purge); appends never flush on their own.
    let c = store.log().config();
    assert_eq!(c.retention_bytes, None);
    assert_eq!(c.retention_ms, None);
    Ok(())
}

/// A follower installing a snapshot ahead of its log continues at the snapshot's offsets.
#[tokio::test]
async fn purge_after_snapshot_install_continues_at_the_snapshot_offset() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        // The state machine installs a snapshot of index 50 at offset 1234, then openraft purges.
        let store = purged_past_the_end(dir.path(), log_id(3, 50), Some(1234)).await?;
        assert_eq!(store.log().log_end_offset(), 1234);
        assert_eq!(store.log().log_start_offset(), 1234);
        // A crash now is fine: the purge record carries the offset.
    }
    let mut store = open(dir.path())?;
    assert_eq!(store.log().log_end_offset(), 1234);
    append(&mut store, vec![normal(3, 51, "y", 4)]).await?;
    let got = all_entries(&mut store).await?;
    let h = header(&got[0])?;
    assert_eq!((h.base_offset, h.raft_index), (1234, 51));
    Ok(())
}

/// Uncommitted entries are copied out of the mapping; committed ones are served zero-copy and
/// both read back identically.
#[tokio::test]
async fn committed_and_uncommitted_reads_agree() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = open(dir.path())?;
    let entries: Vec<Entry> = (0..10).map(|i| normal(1, i, "c", 3)).collect();
    append(&mut store, entries).await?;
    let before = all_entries(&mut store).await?;
    store.save_committed(Some(log_id(1, 4))).await?;
    let after = all_entries(&mut store).await?;
    assert_eq!(before, after);
    // Truncating the uncommitted tail does not change entries already read.
    store.truncate_after(Some(log_id(1, 4))).await?;
    append(&mut store, vec![normal(2, 5, "other", 1)]).await?;
    assert_eq!(before[5..], after[5..]);
    assert_ne!(all_entries(&mut store).await?[5], before[5]);
    Ok(())
}
