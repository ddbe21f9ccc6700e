//! Behaviour of the partition log on real files.

use std::sync::Arc;
use std::time::Duration;

use keel_batch::{Compression, control_batch};
use keel_log::fs::RealFs;
use keel_log::sim::CrashFs;
use keel_log::{FlushPolicy, Log, LogConfig, LogError, ReadLimit};
use keel_tests::log_util::{ManualClock, batch_of, read_all, values};

fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 8 * 1024,
        index_interval_bytes: 256,
        flush: FlushPolicy::Os,
        ..LogConfig::default()
    }
}

#[test]
fn append_assigns_contiguous_offsets_and_reads_back_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    let mut expected = Vec::new();
    for b in 0..200 {
        let info = log
            .append(&batch_of(&format!("b{b}"), 5, 1000 + b), 1)
            .expect("append");
        assert_eq!(info.base_offset, b as u64 * 5);
        assert_eq!(info.raft_index, b as u64);
        for i in 0..5 {
            expected.push(format!("b{b}-{i}"));
        }
    }
    assert!(
        log.segment_count() > 3,
        "segments rolled: {}",
        log.segment_count()
    );
    assert_eq!(log.log_end_offset(), 1000);
    let all = read_all(&log, 0).expect("read");
    assert_eq!(values(&all), expected);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
    }
    // A read from the middle of a batch returns that whole batch.
    let mid = read_all(&log, 503).expect("read");
    assert_eq!(mid.first().map(|r| r.offset), Some(503));
    // Out of range reads are typed errors.
    assert!(matches!(
        log.read(1001, 100),
        Err(LogError::OffsetOutOfRange {
            offset: 1001,
            log_start: 0,
            log_end: 1000
        })
    ));
    assert!(log.read(1000, 100).expect("read at end").last.is_none());
}

#[test]
fn reopen_after_close_and_after_drop_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = Log::open(dir.path(), small_config()).expect("open");
        for b in 0..50 {
            log.append(&batch_of("x", 3, b), 2).expect("append");
        }
        log.close().expect("close");
    }
    {
        let log = Log::open(dir.path(), small_config()).expect("reopen");
        assert_eq!(log.log_end_offset(), 150);
        assert_eq!(log.next_raft_index(), 50);
        assert_eq!(log.last_term(), 2);
        for b in 50..60 {
            log.append(&batch_of("y", 3, b), 3).expect("append");
        }
        // Dropped without close: like a process crash (page cache survives).
    }
    let log = Log::open(dir.path(), small_config()).expect("reopen after drop");
    assert_eq!(log.log_end_offset(), 180);
    assert_eq!(log.last_term(), 3);
    assert_eq!(read_all(&log, 0).expect("read").len(), 180);
}

#[test]
fn term_and_index_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    log.append(&batch_of("a", 1, 0), 5).expect("append");
    assert!(matches!(
        log.append(&batch_of("a", 1, 0), 4),
        Err(LogError::TermWentBackwards { term: 4, last: 5 })
    ));
    assert!(matches!(
        log.append_at(&batch_of("a", 1, 0), 5, 7),
        Err(LogError::NonContiguousIndex {
            expected: 1,
            got: 7
        })
    ));
    log.append_at(&batch_of("a", 1, 0), 5, 1)
        .expect("append_at");
    assert_eq!(log.entry_header(1).expect("header").raft_term, 5);
}

#[test]
fn control_batches_take_no_offsets_and_are_found_by_raft_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    log.append(&control_batch(b"membership", 0).expect("ctl"), 1)
        .expect("append ctl");
    log.append(&batch_of("d", 4, 10), 1).expect("append");
    log.append(&control_batch(b"blank", 0).expect("ctl"), 2)
        .expect("append ctl");
    log.append(&batch_of("e", 2, 11), 2).expect("append");
    assert_eq!(log.log_end_offset(), 6);
    assert_eq!(log.next_raft_index(), 4);
    assert_eq!(
        values(&read_all(&log, 0).expect("read")),
        ["d-0", "d-1", "d-2", "d-3", "e-0", "e-1"]
    );
    let h = log.entry_header(2).expect("entry 2");
    assert!(h.attributes.control);
    assert_eq!(h.base_offset, 4);
    let slice = log
        .read_raft(1, 1, ReadLimit::default())
        .expect("read raft");
    assert_eq!(slice.last.map(|h| h.raft_index), Some(1));
}

#[test]
fn truncate_to_offset_and_raft_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    for b in 0..100 {
        log.append(&batch_of(&format!("t{b}"), 2, b), 1)
            .expect("append");
    }
    let segs_before = log.segment_count();
    // Offset 101 is inside batch 50 (offsets 100, 101): the whole batch goes.
    assert_eq!(log.truncate_to(101).expect("truncate"), 100);
    assert!(log.segment_count() < segs_before);
    assert_eq!(log.next_raft_index(), 50);
    log.append(&batch_of("new", 2, 0), 2)
        .expect("append after truncate");
    let all = read_all(&log, 0).expect("read");
    assert_eq!(all.len(), 102);
    assert_eq!(values(&all[100..]), ["new-0", "new-1"]);
    log.truncate_after_raft_index(Some(9))
        .expect("truncate by index");
    assert_eq!(log.log_end_offset(), 20);
    assert_eq!(log.last_term(), 1);
    drop(log);
    let log = Log::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(log.log_end_offset(), 20);
    assert_eq!(read_all(&log, 0).expect("read").len(), 20);
    log.truncate_after_raft_index(None).expect("truncate all");
    assert_eq!(log.log_end_offset(), 0);
    log.append(&batch_of("z", 1, 0), 3).expect("append");
    assert_eq!(values(&read_all(&log, 0).expect("read")), ["z-0"]);
}

#[test]
fn timestamps_are_found_through_the_time_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    for b in 0..100i64 {
        log.append(&batch_of("ts", 3, 1_000 + b * 10), 1)
            .expect("append");
    }
    assert_eq!(
        log.offset_for_timestamp(0).expect("lookup").map(|(o, _)| o),
        Some(0)
    );
    assert_eq!(
        log.offset_for_timestamp(1_000)
            .expect("lookup")
            .map(|(o, _)| o),
        Some(0)
    );
    assert_eq!(
        log.offset_for_timestamp(1_001)
            .expect("lookup")
            .map(|(o, _)| o),
        Some(3)
    );
    assert_eq!(
        log.offset_for_timestamp(1_500)
            .expect("lookup")
            .map(|(o, _)| o),
        Some(150)
    );
    assert_eq!(
        log.offset_for_timestamp(1_990)
            .expect("lookup")
            .map(|(o, _)| o),
        Some(297)
    );
    assert_eq!(log.offset_for_timestamp(1_991).expect("lookup"), None);
}

#[test]
fn retention_by_time_and_size_deletes_whole_closed_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_000_000);
    let mut cfg = small_config();
    cfg.retention_ms = Some(Duration::from_millis(10_000));
    let log =
        Log::open_with(dir.path(), cfg.clone(), Arc::new(RealFs), clock.clone()).expect("open");
    for b in 0..100i64 {
        log.append(&batch_of("r", 5, 900_000 + b * 1000), 1)
            .expect("append");
    }
    let segs = log.segment_count();
    // Newest record at 999_000; with now = 1_000_000 and 10 s retention, segments whose newest
    // record is before 990_000 go.
    let out = log.apply_retention().expect("retention");
    assert!(
        out.deleted_segments > 0 && out.deleted_segments < segs,
        "{out:?}"
    );
    assert_eq!(log.log_start_offset(), out.log_start_offset);
    assert!(matches!(
        log.read(0, 10),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    let rest = read_all(&log, out.log_start_offset).expect("read");
    assert_eq!(rest.last().map(|r| r.offset), Some(499));
    // Size retention keeps at least retention.bytes.
    cfg.retention_ms = None;
    cfg.retention_bytes = Some(2 * 1024);
    log.set_config(cfg.clone()).expect("config");
    for b in 0..100i64 {
        log.append(&batch_of("more", 5, 999_000 + b), 1)
            .expect("append");
    }
    let before = log.size_bytes();
    let out = log.apply_retention().expect("size retention");
    assert!(out.deleted_segments > 0, "{out:?}");
    assert!(
        log.size_bytes() >= 2 * 1024 && log.size_bytes() < before,
        "size {}",
        log.size_bytes()
    );
    assert!(
        log.size_bytes() < 2 * 1024 + 8 * 1024 + 1024,
        "size {}",
        log.size_bytes()
    );
    let start = log.log_start_offset();
    drop(log);
    let log = Log::open_with(dir.path(), cfg, Arc::new(RealFs), clock).expect("reopen");
    assert_eq!(log.log_start_offset(), start);
}

#[test]
fn delete_before_moves_log_start_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    for b in 0..100 {
        log.append(&batch_of("d", 4, b), 1).expect("append");
    }
    assert_eq!(log.delete_before(250).expect("delete"), 250);
    assert!(matches!(
        log.read(249, 1),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    assert_eq!(
        read_all(&log, 250).expect("read").first().map(|r| r.offset),
        Some(250)
    );
    drop(log);
    let log = Log::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(log.log_start_offset(), 250);
}

#[test]
fn compressed_batches_are_stored_and_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    for codec in [Compression::Lz4, Compression::Zstd] {
        let mut b = keel_batch::BatchBuilder::new(codec);
        for i in 0..100 {
            let v = format!("compressed-{i}");
            b.push(&keel_batch::RecordRef {
                timestamp: 5,
                key: Some(b"k"),
                value: Some(v.as_bytes()),
                headers: &[("h", Some(b"v"))],
            })
            .expect("push");
        }
        log.append(&b.build().expect("build"), 1).expect("append");
    }
    let all = read_all(&log, 0).expect("read");
    assert_eq!(all.len(), 200);
    assert_eq!(all[199].value.as_deref(), Some(&b"compressed-99"[..]));
    assert_eq!(all[5].headers[0].key, "h");
}

#[test]
fn invalid_batches_are_rejected_and_the_log_keeps_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    let good = batch_of("g", 2, 0);
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    assert!(matches!(
        log.append(&bad_crc, 1),
        Err(LogError::InvalidBatch(_))
    ));
    assert!(matches!(
        log.append(&good[..10], 1),
        Err(LogError::InvalidBatch(_))
    ));
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(
        log.append(&trailing, 1),
        Err(LogError::InvalidBatch(_))
    ));
    assert!(matches!(log.append(&[], 1), Err(LogError::InvalidBatch(_))));
    log.append(&good, 1).expect("good append");
    assert_eq!(log.log_end_offset(), 2);
}

#[test]
fn a_batch_larger_than_a_segment_grows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_config()).expect("open");
    let big = batch_of(&"x".repeat(1000), 20, 0);
    assert!(big.len() > 8 * 1024);
    log.append(&big, 1).expect("append big");
    log.append(&batch_of("s", 1, 0), 1).expect("append small");
    log.append(&big, 1).expect("append big again");
    assert_eq!(read_all(&log, 0).expect("read").len(), 41);
    drop(log);
    let log = Log::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(read_all(&log, 0).expect("read").len(), 41);
}

#[test]
fn full_disk_is_a_typed_error_and_the_log_recovers_when_space_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = CrashFs::new();
    let clock = ManualClock::new(0);
    let cfg = small_config();
    let log = Log::open_with(dir.path(), cfg, Arc::new(fs.clone()), clock).expect("open");
    fs.set_space_limit(Some(40 * 1024));
    let mut acked = 0u64;
    let mut saw_full = false;
    for _ in 0..200 {
        match log.append(&batch_of("f", 10, 0), 1) {
            Ok(i) => acked = i.next_offset,
            Err(LogError::DiskFull { .. }) => {
                saw_full = true;
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(saw_full, "the disk never filled");
    assert_eq!(log.log_end_offset(), acked);
    assert_eq!(
        read_all(&log, 0).expect("reads still work").len() as u64,
        acked
    );
    fs.set_space_limit(None);
    log.append(&batch_of("f", 10, 0), 1)
        .expect("append after space returns");
    assert_eq!(read_all(&log, 0).expect("read").len() as u64, acked + 10);
}

#[test]
fn a_failed_fsync_poisons_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = CrashFs::new();
    let mut cfg = small_config();
    cfg.flush = FlushPolicy::EveryBatch;
    let log =
        Log::open_with(dir.path(), cfg, Arc::new(fs.clone()), ManualClock::new(0)).expect("open");
    log.append(&batch_of("p", 1, 0), 1).expect("append");
    fs.fail_syncs(true);
    assert!(matches!(
        log.append(&batch_of("p", 1, 0), 1),
        Err(LogError::Poisoned { .. })
    ));
    fs.fail_syncs(false);
    // Never retried and acknowledged: the log stays poisoned.
    assert!(matches!(
        log.append(&batch_of("p", 1, 0), 1),
        Err(LogError::Poisoned { .. })
    ));
    assert!(matches!(log.flush(), Err(LogError::Poisoned { .. })));
    assert!(log.is_poisoned());
}

/// Linux marks the pages a failed fsync could not write as clean, so they stay readable but
/// may never reach the disk. A log reopened after a failed fsync (the broker restarts the
/// replica in the same process) must not count them as durable: they are cut at the failure.
#[test]
fn a_failed_fsync_discards_what_it_could_not_make_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = CrashFs::new();
    let mut cfg = small_config();
    cfg.flush = FlushPolicy::Os;
    let open = || {
        Log::open_with(
            dir.path(),
            cfg.clone(),
            Arc::new(fs.clone()),
            ManualClock::new(0),
        )
        .expect("open")
    };
    let durable;
    {
        let log = open();
        for b in 0..5 {
            log.append(&batch_of(&format!("a{b}"), 3, b), 1)
                .expect("append");
        }
        log.flush().expect("flush");
        durable = log.log_end_offset();
        for b in 5..9 {
            log.append(&batch_of(&format!("b{b}"), 3, b), 1)
                .expect("append");
        }
        fs.fail_syncs(true);
        assert!(log.flush().is_err());
        fs.fail_syncs(false);
        assert!(log.is_poisoned());
    }
    // An open while fsyncs still fail fails, and cuts nothing of what was durable.
    fs.fail_syncs(true);
    assert!(
        Log::open_with(
            dir.path(),
            cfg.clone(),
            Arc::new(fs.clone()),
            ManualClock::new(0)
        )
        .is_err()
    );
    fs.fail_syncs(false);
    // Reopened in the same process: the appends the failed fsync covered are gone.
    {
        let log = open();
        assert_eq!(log.log_end_offset(), durable);
        log.append(&batch_of("c", 3, 20), 1).expect("append");
        log.flush().expect("flush");
        assert_eq!(log.log_end_offset(), durable + 3);
    }
    // And what the reopened log reported durable survives a power loss.
    fs.crash().expect("crash");
    let log = open();
    assert_eq!(log.log_end_offset(), durable + 3);
    let read = log.read(durable, 1 << 20).expect("read");
    assert!(!read.bytes.is_empty());
}

#[test]
fn every_batch_flush_survives_power_loss_and_os_policy_keeps_a_prefix() {
    for policy in [FlushPolicy::EveryBatch, FlushPolicy::Os] {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = CrashFs::new();
        let mut cfg = small_config();
        cfg.flush = policy;
        let acked;
        {
            let log = Log::open_with(
                dir.path(),
                cfg.clone(),
                Arc::new(fs.clone()),
                ManualClock::new(0),
            )
            .expect("open");
            for b in 0..120 {
                log.append(&batch_of(&format!("p{b}"), 3, b), 1)
                    .expect("append");
            }
            acked = log.log_end_offset();
        }
        fs.crash().expect("crash");
        let log = Log::open_with(dir.path(), cfg, Arc::new(fs.clone()), ManualClock::new(0))
            .expect("reopen");
        let got = read_all(&log, 0).expect("read");
        match policy {
            FlushPolicy::EveryBatch => {
                assert_eq!(got.len() as u64, acked, "acknowledged data lost")
            }
            _ => {
                // Sealed segments were synced; the unsynced tail may be gone, but what is
                // there is a contiguous prefix.
                assert!(got.len() as u64 <= acked);
                assert!(got.len() >= 3, "sealed segments survive");
            }
        }
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
        }
    }
}

#[test]
fn segments_roll_by_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(10_000);
    let mut cfg = small_config();
    cfg.segment_bytes = 1 << 20;
    cfg.segment_ms = Some(Duration::from_millis(1_000));
    let log = Log::open_with(dir.path(), cfg, Arc::new(RealFs), clock.clone()).expect("open");
    log.append(&batch_of("a", 1, 0), 1).expect("append");
    log.append(&batch_of("a", 1, 0), 1).expect("append");
    assert_eq!(log.segment_count(), 1);
    clock.set(11_000);
    log.append(&batch_of("b", 1, 0), 1).expect("append");
    assert_eq!(log.segment_base_offsets(), [0, 2]);
}

#[test]
fn active_segments_reserve_disk_space_in_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LogConfig {
        segment_bytes: 1 << 30,
        flush: FlushPolicy::Os,
        ..LogConfig::default()
    };
    let log = Log::open(dir.path(), cfg.clone()).expect("open");
    log.append(&batch_of("a", 10, 0), 1).expect("append");
    let seg = dir.path().join("00000000000000000000.log");
    let len = std::fs::metadata(&seg).expect("segment").len();
    assert!(
        len <= 16 << 20,
        "a 1 GiB segment reserved {len} bytes up front"
    );
    // Writing past the first chunk reserves more, transparently.
    let big = batch_of(&"v".repeat(1000), 1000, 0);
    for _ in 0..20 {
        log.append(&big, 1).expect("append");
    }
    assert!(std::fs::metadata(&seg).expect("segment").len() > 16 << 20);
    drop(log);
    let log = Log::open(dir.path(), cfg).expect("reopen");
    assert_eq!(read_all(&log, 0).expect("read").len(), 20_010);
}
