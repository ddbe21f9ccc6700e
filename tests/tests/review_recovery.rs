//! Review findings: recovery and crash-consistency holes in keel-log.
//!
//! Each test builds the exact on-disk state a crash (kill -9 or power loss) leaves at a point
//! inside one log operation, then reopens the log.

use std::path::{Path, PathBuf};

use keel_batch::BatchIter;
use keel_log::{FlushPolicy, Log, LogConfig, LogError};
use keel_tests::log_util::{batch_of, read_all, values};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 512,
        flush: FlushPolicy::Os,
        checkpoint_interval_bytes: u64::MAX,
        segment_ms: None,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn fill(log: &Log, batches: usize) -> Vec<String> {
    let mut want = Vec::new();
    for b in 0..batches {
        let tag = format!("b{b}");
        log.append(&batch_of(&tag, 3, b as i64), 1).expect("append");
        want.extend((0..3).map(|i| format!("{tag}-{i}")));
    }
    want
}

/// Finding: a bit flip in the 64-byte header of the *last* segment is treated as "creation was
/// interrupted" and the whole segment -- acknowledged, checkpointed data -- is deleted on open.
/// With earlier segments present, the log end moves back and the next append reuses offsets.
#[test]
fn corrupt_header_of_last_segment_does_not_silently_drop_acknowledged_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), config()).expect("open");
    fill(&log, 120);
    let end = log.log_end_offset();
    log.close().expect("close");
    let files = log_files(dir.path());
    assert!(files.len() >= 3, "want several segments, got {files:?}");
    let last = files.last().expect("last").clone();
    // Flip one bit of created_at_ms in the last (checkpointed, non-empty) segment's header.
    let mut bytes = std::fs::read(&last).expect("read");
    assert!(bytes.len() > 200, "last segment holds batches");
    bytes[33] ^= 0x01;
    std::fs::write(&last, &bytes).expect("write");

    match Log::open(dir.path(), config()) {
        Err(LogError::Corrupt { .. }) => {} // acceptable: refuse to open
        Err(e) => panic!("unexpected error {e}"),
        Ok(log) => {
            assert_eq!(
                log.log_end_offset(),
                end,
                "open silently deleted {} (acknowledged records {}..{end}) and will reassign their offsets",
                last.display(),
                log.log_end_offset()
            );
        }
    }
}

/// Finding: `truncate` writes the checkpoint naming the (re-attached) segment *before* it deletes
/// the later segments. A crash (kill -9) between the two leaves later segments that no longer
/// continue the log, and the next open fails with `Corrupt` -- the partition cannot start.
#[test]
fn crash_between_truncate_checkpoint_and_segment_deletion_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let saved = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), config()).expect("open");
    let want = fill(&log, 200);
    let bases = log.segment_base_offsets();
    assert!(bases.len() >= 4, "want several segments, got {bases:?}");
    // Truncate into the second segment; remember the files that truncate will delete.
    let cut = bases[1] + 2;
    let doomed: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|b| b > bases[1])
        })
        .collect();
    for p in &doomed {
        std::fs::copy(p, saved.path().join(p.file_name().expect("name"))).expect("save");
    }
    log.truncate_to(cut).expect("truncate");
    drop(log); // kill -9: no close
    // The state of a crash right after checkpoint::write, before delete_files ran.
    for p in &doomed {
        std::fs::copy(saved.path().join(p.file_name().expect("name")), p).expect("restore");
    }
    let log = Log::open(dir.path(), config())
        .unwrap_or_else(|e| panic!("log cannot be opened after a crash inside truncate_to: {e}"));
    assert!(log.log_end_offset() <= cut && want.len() as u64 > cut);
}

/// Finding: `roll` makes the *new* segment durable (file + header + directory fsynced in
/// `ActiveSegment::create`) before `seal` fsyncs the old one. A power loss in between loses the
/// old segment's unflushed tail (allowed under the broker's `Os` log policy and for appends not
/// yet acknowledged under group commit) but keeps the new, empty segment whose base offset no
/// longer continues the log: the next open fails with `Corrupt` and, since `Registry::open`
/// propagates it, the whole broker refuses to start.
///
/// The state is built by hand: checkpoint as of before the roll, the new segment empty, and the
/// old segment without its last (never fsynced) batch.
#[test]
fn power_loss_between_new_segment_creation_and_seal_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), config()).expect("open");
    let mut want = Vec::new();
    let mut b = 0;
    // Fill until the second segment is about to roll.
    let saved_cp = loop {
        let before = log.segment_count();
        let cp = std::fs::read(dir.path().join("checkpoint")).expect("checkpoint");
        let tag = format!("b{b}");
        b += 1;
        log.append(&batch_of(&tag, 3, 0), 1).expect("append");
        if before == 2 && log.segment_count() == 3 {
            break cp;
        }
        want.extend((0..3).map(|i| format!("{tag}-{i}")));
    };
    drop(log);
    let files = log_files(dir.path());
    assert_eq!(files.len(), 3);
    // 1. The checkpoint of the roll was never written.
    std::fs::write(dir.path().join("checkpoint"), &saved_cp).expect("restore checkpoint");
    // 2. The new segment is empty (the crash came before the batch that rolled was written).
    let mut newest = std::fs::read(&files[2]).expect("read");
    newest[64..].fill(0);
    std::fs::write(&files[2], &newest).expect("write");
    // 3. The old segment's last batch was never fsynced: lost.
    let mut old = std::fs::read(&files[1]).expect("read");
    let mut pos = 64usize;
    let mut last_start = 64usize;
    for item in BatchIter::new(&old[64..]) {
        let Ok((_, raw)) = item else { break };
        last_start = pos;
        pos += raw.len();
    }
    old[last_start..].fill(0);
    std::fs::write(&files[1], &old).expect("write");

    let log = Log::open(dir.path(), config()).unwrap_or_else(|e| {
        panic!("a power loss during a segment roll leaves an unopenable log: {e}")
    });
    let got = values(&read_all(&log, 0).expect("read"));
    assert!(
        got.len() + 3 >= want.len(),
        "lost more than the unsynced batch"
    );
}
