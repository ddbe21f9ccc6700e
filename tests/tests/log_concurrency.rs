//! Readers, group-committing appenders and retention running at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use keel_log::sim::CrashFs;
use keel_log::{FlushPolicy, Log, LogConfig, LogError};
use keel_tests::log_util::{ManualClock, batch_of, read_all};

#[test]
fn readers_see_a_consistent_prefix_while_appends_and_retention_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LogConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 512,
        flush: FlushPolicy::Os,
        retention_ms: None,
        retention_bytes: Some(64 * 1024),
        ..LogConfig::default()
    };
    let log = Arc::new(Log::open(dir.path(), cfg).expect("open"));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let log = Arc::clone(&log);
        thread::spawn(move || {
            for b in 0..3000 {
                log.append(&batch_of(&format!("w{b}"), 4, b), 1)
                    .expect("append");
            }
        })
    };
    let retention = {
        let (log, done) = (Arc::clone(&log), Arc::clone(&done));
        thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                log.apply_retention().expect("retention");
                thread::yield_now();
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (log, done) = (Arc::clone(&log), Arc::clone(&done));
            thread::spawn(move || {
                let mut reads = 0;
                while !done.load(Ordering::Acquire) {
                    let start = log.log_start_offset();
                    match read_all(&log, start) {
                        Ok(recs) => {
                            for (i, r) in recs.iter().enumerate() {
                                assert_eq!(r.offset, start + i as u64, "offsets contiguous");
                                let b = r.offset / 4;
                                let want = format!("w{b}-{}", r.offset % 4);
                                assert_eq!(r.value.as_deref(), Some(want.as_bytes()));
                            }
                            reads += 1;
                        }
                        // Retention may delete the start between reading it and reading.
                        Err(LogError::OffsetOutOfRange { .. }) => {}
                        Err(e) => panic!("read failed: {e}"),
                    }
                }
                reads
            })
        })
        .collect();
    writer.join().expect("writer");
    done.store(true, Ordering::Release);
    retention.join().expect("retention");
    for r in readers {
        assert!(r.join().expect("reader") > 0);
    }
    assert_eq!(log.log_end_offset(), 12_000);
    assert!(log.log_start_offset() > 0);
}

#[test]
fn concurrent_appenders_share_fsyncs_under_flush_every_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = CrashFs::new();
    let cfg = LogConfig {
        segment_bytes: 1 << 20,
        flush: FlushPolicy::EveryBatch,
        checkpoint_interval_bytes: u64::MAX,
        ..LogConfig::default()
    };
    let log = Arc::new(
        Log::open_with(
            dir.path(),
            cfg.clone(),
            Arc::new(fs.clone()),
            ManualClock::new(0),
        )
        .expect("open"),
    );
    let syncs_before = fs.segment_sync_count();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for b in 0..100 {
                    log.append(&batch_of(&format!("t{t}-{b}"), 2, 0), 1)
                        .expect("append");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("appender");
    }
    let syncs = fs.segment_sync_count() - syncs_before;
    // Every append returned only after an fsync covering it; no more than one per append
    // (each also writes the small promise file, counted apart).
    assert!(syncs <= 400, "{syncs} fsyncs for 400 appends");
    drop(log);
    fs.crash().expect("power loss");
    let log = Log::open_with(dir.path(), cfg, Arc::new(fs), ManualClock::new(0)).expect("reopen");
    assert_eq!(
        read_all(&log, 0).expect("read").len(),
        800,
        "acknowledged appends survive"
    );
}

#[test]
fn interval_flush_policy_flushes_when_due() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = CrashFs::new();
    let clock = ManualClock::new(1_000);
    let cfg = LogConfig {
        flush: FlushPolicy::Interval(Duration::from_millis(100)),
        checkpoint_interval_bytes: u64::MAX,
        segment_bytes: 1 << 20,
        ..LogConfig::default()
    };
    let log =
        Log::open_with(dir.path(), cfg.clone(), Arc::new(fs.clone()), clock.clone()).expect("open");
    // The first append is due (no flush yet); later ones within the interval are not.
    log.append(&batch_of("a", 1, 0), 1).expect("append");
    let after_first = fs.sync_count();
    log.append(&batch_of("b", 1, 0), 1).expect("append");
    assert_eq!(fs.sync_count(), after_first, "not due yet");
    assert!(!log.flush_if_due().expect("flush_if_due"));
    clock.set(1_200);
    assert!(log.flush_if_due().expect("flush_if_due"));
    log.append(&batch_of("c", 1, 0), 1).expect("append");
    drop(log);
    fs.crash().expect("power loss");
    let log = Log::open_with(dir.path(), cfg, Arc::new(fs), clock).expect("reopen");
    // a and b were flushed by flush_if_due; c was appended within the interval and is lost.
    assert_eq!(read_all(&log, 0).expect("read").len(), 2);
}

#[test]
fn checkpoint_if_due_bounds_recovery_under_the_os_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = CrashFs::new();
    let cfg = LogConfig {
        flush: FlushPolicy::Os,
        checkpoint_interval_bytes: 4096,
        segment_bytes: 1 << 20,
        ..LogConfig::default()
    };
    let log = Log::open_with(
        dir.path(),
        cfg.clone(),
        Arc::new(fs.clone()),
        ManualClock::new(0),
    )
    .expect("open");
    assert!(!log.checkpoint_if_due().expect("nothing due"));
    for b in 0..100 {
        log.append(&batch_of(&format!("c{b}"), 5, 0), 1)
            .expect("append");
    }
    assert!(log.checkpoint_if_due().expect("due"));
    assert!(!log.checkpoint_if_due().expect("not due again"));
    drop(log);
    // Everything up to the checkpoint survives a power loss.
    fs.crash().expect("power loss");
    let log = Log::open_with(dir.path(), cfg, Arc::new(fs), ManualClock::new(0)).expect("reopen");
    assert_eq!(read_all(&log, 0).expect("read").len(), 500);
}
