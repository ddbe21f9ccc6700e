//! Regression tests from a review: zero-copy `Bytes` handed out by reads point into shared file
//! mappings; truncation and a later seal must never shrink a file under them, and a failed
//! `reset` must not let an append be reported durable without an fsync.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use keel_log::sim::CrashFs;
use keel_log::{FlushPolicy, Log, LogConfig};
use keel_tests::log_util::{ManualClock, batch_of};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024,
        index_interval_bytes: 512,
        flush: FlushPolicy::Os,
        checkpoint_interval_bytes: u64::MAX,
        segment_ms: None,
        retention_ms: None,
        ..LogConfig::default()
    }
}

/// Appends 3-record batches with ~100-byte values until the log has two segments.
fn two_segments(log: &Log) {
    let pad = "x".repeat(100);
    let mut b = 0;
    while log.segment_count() < 2 {
        log.append(&batch_of(&format!("{pad}{b}"), 3, 0), 1)
            .expect("append");
        b += 1;
    }
}

/// `read` returns `Bytes` borrowing the segment's read-only mapping. Truncation zero-fills in
/// place (bytes above the commit point may change under a reader: consumers never read there),
/// but a file is never shrunk below what a reader may hold, so held bytes never fault.
/// Body run in a child process (it would die of SIGBUS).
fn sigbus_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(0);
    let log = Log::open_with(
        dir.path(),
        config(),
        Arc::new(keel_log::fs::RealFs),
        clock.clone(),
    )
    .expect("open");
    two_segments(&log);
    let bases = log.segment_base_offsets();
    // A reader holds the last batch of the first (sealed, ~64 KiB) segment.
    let slice = log.read(bases[1] - 3, 1 << 20).expect("read");
    // Raft truncates into that segment, appends a little, and the segment rolls by age: seal()
    // trims the file to a few hundred bytes, far below what the reader's Bytes cover.
    log.truncate_to(3).expect("truncate");
    let mut cfg = config();
    cfg.segment_ms = Some(Duration::from_millis(1));
    log.set_config(cfg).expect("config");
    clock.set(10);
    log.append(&batch_of("after", 1, 0), 1).expect("append");
    assert_eq!(log.segment_count(), 2, "rolled");
    // The reader now touches its bytes: pages beyond the new end of file -> SIGBUS.
    let sum: u64 = slice.bytes.iter().map(|b| u64::from(*b)).sum();
    println!("sum {sum}");
}

/// Finding: the same sequence, followed by a roll (segment.ms, or segment.bytes lowered by
/// `alter`), makes `seal()` shrink the file below bytes a reader still holds: touching them
/// raises SIGBUS and kills the broker.
#[test]
fn bytes_returned_by_read_stay_mapped_after_truncate_and_reseal() {
    if std::env::var_os("REVIEW_SIGBUS_CHILD").is_some() {
        sigbus_child();
        return;
    }
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "bytes_returned_by_read_stay_mapped_after_truncate_and_reseal",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("REVIEW_SIGBUS_CHILD", "1")
        .output()
        .expect("spawn child");
    assert!(
        out.status.success(),
        "child died: status {:?}, signal {:?}\n{}",
        out.status.code(),
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Finding: when `reset` fails after emptying the segment view (here: a file it must delete
/// cannot be removed), the writer keeps appending to the old, partly deleted active segment and
/// `flush_to` finds no active segment in the view, skips the fsync and reports the append as
/// durable.
#[test]
fn append_after_failed_reset_is_not_reported_durable_without_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = CrashFs::new();
    let mut cfg = config();
    cfg.flush = FlushPolicy::EveryBatch;
    let log =
        Log::open_with(dir.path(), cfg, Arc::new(fs.clone()), ManualClock::new(0)).expect("open");
    log.append(&batch_of("a", 3, 0), 1).expect("append");
    // Make one of the files reset deletes impossible to remove (EISDIR): an IO error.
    let ti = dir.path().join("00000000000000000000.timeindex");
    std::fs::remove_file(&ti).expect("rm");
    std::fs::create_dir(&ti).expect("mkdir");
    assert!(log.reset(100, 100, 1).is_err(), "reset fails");
    let syncs = fs.sync_count();
    match log.append(&batch_of("b", 3, 0), 1) {
        Err(_) => {} // acceptable: the log refuses writes after a failed reset
        Ok(info) => {
            assert!(
                fs.sync_count() > syncs,
                "append at offset {} returned under EveryBatch without any fsync (log end now {})",
                info.base_offset,
                log.log_end_offset()
            );
        }
    }
}
