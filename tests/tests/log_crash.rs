//! Crash recovery: torn and corrupted tails, corruption inside sealed segments, and power loss
//! (every byte not fsynced is lost) through the storage crate's file-IO seam.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_batch::{BatchHeader, BatchIter};
use keel_log::sim::CrashFs;
use keel_log::{FlushPolicy, Log, LogConfig, LogError, Repaired};
use keel_tests::log_util::{ManualClock, batch_of, read_all, values};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 512,
        flush: FlushPolicy::Os,
        // Checkpoints only at rolls: the whole active segment is "after the checkpoint".
        checkpoint_interval_bytes: u64::MAX,
        ..LogConfig::default()
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// Builds a log of `batches` batches of varying sizes and drops it without a clean close.
/// Returns the expected values per batch.
fn build(dir: &Path, batches: usize) -> Vec<Vec<String>> {
    let log = Log::open(dir, config()).expect("open");
    let mut out = Vec::new();
    for b in 0..batches {
        let n = 1 + (b * 7) % 13;
        let tag = format!("b{b}");
        log.append(&batch_of(&tag, n, b as i64), 1).expect("append");
        out.push((0..n).map(|i| format!("{tag}-{i}")).collect());
    }
    out
}

/// Positions and headers of the batches in a segment file.
fn batches_in(file: &Path) -> Vec<(u64, BatchHeader)> {
    let bytes = std::fs::read(file).expect("read segment");
    let mut pos = 64u64;
    let mut out = Vec::new();
    for item in BatchIter::new(&bytes[64..]) {
        let Ok((h, raw)) = item else { break };
        out.push((pos, h));
        pos += raw.len() as u64;
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("list") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy");
    }
}

/// The values the log must hold after recovery when the active segment keeps only the batches
/// that lie wholly before byte `valid_end`.
fn expected_after(
    all: &[Vec<String>],
    active: &[(u64, BatchHeader)],
    valid_end: u64,
) -> Vec<String> {
    let first_active = active
        .first()
        .map_or(all.len() as u64, |(_, h)| h.raft_index) as usize;
    let kept_active = active
        .iter()
        .take_while(|(pos, h)| pos + h.total_len() as u64 <= valid_end)
        .count();
    all[..first_active + kept_active]
        .iter()
        .flatten()
        .cloned()
        .collect()
}

fn reopen_and_check(dir: &Path, want: &[String]) {
    let log = Log::open(dir, config()).expect("recovery must succeed");
    let got = read_all(&log, 0).expect("read after recovery");
    assert_eq!(values(&got), want);
    assert_eq!(log.log_end_offset(), want.len() as u64);
    // The log keeps working and a second recovery agrees.
    log.append(&batch_of("after", 2, 0), 1)
        .expect("append after recovery");
    drop(log);
    let log = Log::open(dir, config()).expect("second recovery");
    let got = read_all(&log, 0).expect("read");
    assert_eq!(got.len(), want.len() + 2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, rng_seed: RngSeed::Fixed(0x6b65656c), ..ProptestConfig::default() })]

    #[test]
    fn torn_tail_at_any_byte_recovers_the_longest_valid_prefix(batches in 20usize..120, cut in any::<prop::sample::Index>()) {
        let src = tempfile::tempdir().expect("tempdir");
        let all = build(src.path(), batches);
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(src.path(), dir.path());
        let active = segment_files(dir.path()).pop().expect("active segment");
        let in_active = batches_in(&active);
        let data_end = in_active.last().map_or(64, |(p, h)| p + h.total_len() as u64);
        let at = 64 + cut.index((data_end - 64 + 1) as usize) as u64;
        std::fs::OpenOptions::new().write(true).open(&active).expect("open").set_len(at).expect("cut");
        reopen_and_check(dir.path(), &expected_after(&all, &in_active, at));
    }

    #[test]
    fn flipped_bytes_in_the_tail_are_cut_off_never_served(batches in 20usize..120, pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let src = tempfile::tempdir().expect("tempdir");
        let all = build(src.path(), batches);
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(src.path(), dir.path());
        let active = segment_files(dir.path()).pop().expect("active segment");
        let in_active = batches_in(&active);
        let data_end = in_active.last().map_or(64, |(p, h)| p + h.total_len() as u64);
        prop_assume!(data_end > 64);
        let at = 64 + pos.index((data_end - 64) as usize) as u64;
        let mut bytes = std::fs::read(&active).expect("read");
        bytes[at as usize] ^= xor;
        std::fs::write(&active, &bytes).expect("write");
        // Every batch from the damaged one on is gone; everything before it is intact.
        let damaged_start = in_active.iter().rev().find(|(p, _)| *p <= at).map_or(64, |(p, _)| *p);
        reopen_and_check(dir.path(), &expected_after(&all, &in_active, damaged_start));
    }
}

#[test]
fn corruption_inside_a_sealed_segment_is_reported_not_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path(), 400);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "need sealed segments: {files:?}");
    let sealed = files[1].clone();
    let in_sealed = batches_in(&sealed);
    let (pos, victim) = in_sealed[in_sealed.len() / 2];
    let mut bytes = std::fs::read(&sealed).expect("read");
    bytes[pos as usize + 80] ^= 0x40;
    std::fs::write(&sealed, &bytes).expect("write");

    let log = Log::open(dir.path(), config()).expect("opening does not scan sealed segments");
    match log.read(victim.base_offset, 1 << 20) {
        Err(LogError::Corrupt { path, position, .. }) => {
            assert_eq!(path, sealed);
            assert_eq!(position, pos);
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    // Batches before the damaged one in the same segment, and other segments, still read.
    let first = in_sealed[0].1.base_offset;
    let slice = log.read(first, 1).expect("read before the damage");
    assert_eq!(slice.last.map(|h| h.base_offset), Some(first));
    let end = log.log_end_offset();
    assert!(log.read(end - 1, 1 << 20).is_ok());
}

/// Scrubs sealed segment `base` and repairs it from `original` (a healthy replica's copy of
/// the same file) until it is intact; returns how many entries were written.
fn scrub_and_repair(log: &Log, base: u64, original: &[u8]) -> u64 {
    let mut written = 0;
    let mut damage = log.scrub_segment(base).expect("damage found");
    loop {
        let from = damage.at.position as usize;
        match log
            .repair_segment(&damage, &original[from..])
            .expect("repair")
        {
            Repaired::Done { entries, .. } => return written + entries,
            Repaired::Partial { entries, next, .. } => {
                written += entries;
                damage = next;
            }
            Repaired::Gone => panic!("the segment went away"),
        }
    }
}

#[test]
fn a_bit_flip_in_a_sealed_segment_is_found_by_a_scrub_and_repaired_from_a_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let want = build(dir.path(), 400);
    let files = segment_files(dir.path());
    let sealed = files[1].clone();
    let original = std::fs::read(&sealed).expect("read");
    let log = Log::open(dir.path(), config()).expect("open");
    let base = log.sealed_segments()[1];
    assert_eq!(log.scrub_segment(base), None, "intact before the flip");
    // Read everything once: bytes verified before must not be trusted after the flip.
    assert_eq!(values(&read_all(&log, 0).expect("read")), want.concat());

    let in_sealed = batches_in(&sealed);
    let (pos, victim) = in_sealed[in_sealed.len() / 2];
    let mut bytes = original.clone();
    bytes[pos as usize + 80] ^= 0x40;
    std::fs::write(&sealed, &bytes).expect("write");

    // Reads of a sealed segment check every batch, whatever was verified before.
    assert!(
        matches!(
            log.read(victim.base_offset, 1 << 20),
            Err(LogError::Corrupt { .. })
        ),
        "the damaged batch is never served"
    );
    let damage = log.scrub_segment(base).expect("the scrub finds the flip");
    assert_eq!(
        (damage.at.position, damage.at.raft_index),
        (pos, victim.raft_index)
    );
    assert_eq!(scrub_and_repair(&log, base, &original), 1);
    assert!(
        std::fs::read(&sealed).expect("read") == original,
        "the replica's bytes"
    );
    assert_eq!(log.scrub_segment(base), None);
    assert_eq!(values(&read_all(&log, 0).expect("read")), want.concat());
    drop(log);
    let log = Log::open(dir.path(), config()).expect("reopen");
    assert_eq!(values(&read_all(&log, 0).expect("read")), want.concat());
}

#[test]
fn a_read_that_hits_damage_marks_the_segment_for_the_scrub() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path(), 400);
    let sealed = segment_files(dir.path())[1].clone();
    let in_sealed = batches_in(&sealed);
    let (pos, victim) = in_sealed[1];
    let mut bytes = std::fs::read(&sealed).expect("read");
    bytes[pos as usize + 70] ^= 1;
    std::fs::write(&sealed, &bytes).expect("write");
    let log = Log::open(dir.path(), config()).expect("open");
    assert!(log.take_damaged().is_empty());
    assert!(log.read(victim.base_offset, 1 << 20).is_err());
    let base = log.sealed_segments()[1];
    assert_eq!(log.take_damaged(), vec![base]);
    assert!(log.take_damaged().is_empty(), "taken once");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, rng_seed: RngSeed::Fixed(16), ..ProptestConfig::default() })]

    /// Any flips anywhere in a sealed segment's batches (headers, lengths, payloads, several
    /// batches) are found and repaired back to the replica's exact bytes.
    #[test]
    fn any_flips_in_a_sealed_segment_are_repaired_to_the_replicas_bytes(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        which in 0usize..2,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let want = build(dir.path(), 300);
        let sealed = segment_files(dir.path())[which].clone();
        let original = std::fs::read(&sealed).expect("read");
        let in_sealed = batches_in(&sealed);
        let (last_pos, last) = *in_sealed.last().expect("batches");
        let data_end = last_pos as usize + last.total_len();
        let mut bytes = original.clone();
        for (at, xor) in &flips {
            bytes[64 + at.index(data_end - 64)] ^= xor;
        }
        std::fs::write(&sealed, &bytes).expect("write");
        let log = Log::open(dir.path(), config()).expect("open");
        let base = log.sealed_segments()[which];
        let entries = scrub_and_repair(&log, base, &original);
        prop_assert!(entries >= 1 && entries <= flips.len() as u64 + 1);
        let now = std::fs::read(&sealed).expect("read");
        let differs = now.iter().zip(&original).position(|(a, b)| a != b);
        prop_assert_eq!((now.len(), differs), (original.len(), None), "{:?}", flips);
        prop_assert_eq!(values(&read_all(&log, 0).expect("read")), want.concat());
    }
}

/// Flips a byte inside the batch with Raft index `index` of the active segment.
fn flip_in_batch(dir: &Path, index: u64) {
    let active = segment_files(dir).pop().expect("active segment");
    let (pos, h) = batches_in(&active)
        .into_iter()
        .find(|(_, h)| h.raft_index == index)
        .expect("batch to damage");
    let mut bytes = std::fs::read(&active).expect("read");
    bytes[(pos + h.total_len() as u64 - 3) as usize] ^= 0x20;
    std::fs::write(&active, &bytes).expect("write");
}

#[test]
fn a_damaged_flushed_tail_is_reported_as_missing_promised_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), config()).expect("open");
    for b in 0..5 {
        log.append(&batch_of(&format!("b{b}"), 3, 0), 2)
            .expect("append");
    }
    log.flush().expect("flush");
    assert_eq!(
        log.promised().map(|p| (p.next_raft_index, p.last_term)),
        Some((5, 2))
    );
    // Not flushed: losing it is a torn tail, not a broken promise.
    log.append(&batch_of("unflushed", 3, 0), 2).expect("append");
    drop(log);

    flip_in_batch(dir.path(), 4);
    let log = Log::open(dir.path(), config()).expect("recovery cuts the damaged tail");
    assert_eq!(
        log.next_raft_index(),
        4,
        "the damaged batch and the one after it are cut"
    );
    let missing = log
        .missing_promised()
        .expect("the cut took a promised entry");
    assert_eq!((missing.next_raft_index, missing.last_term), (5, 2));
    // A reopen before the repair still knows (the promise is not lowered by recovery).
    drop(log);
    let log = Log::open(dir.path(), config()).expect("reopen");
    assert!(log.missing_promised().is_some());
    // Appending up to the promised end again (what replication from the leader does) ends it.
    log.append(&batch_of("again", 3, 0), 2).expect("append");
    assert_eq!(log.missing_promised(), None);
}

#[test]
fn only_a_damaged_promised_batch_counts_as_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), config()).expect("open");
    for b in 0..5 {
        log.append(&batch_of(&format!("b{b}"), 3, 0), 1)
            .expect("append");
    }
    log.flush().expect("flush");
    log.append(&batch_of("unflushed", 3, 0), 1).expect("append");
    drop(log);
    flip_in_batch(dir.path(), 5);
    let log = Log::open(dir.path(), config()).expect("recovery");
    assert_eq!(log.next_raft_index(), 5);
    assert_eq!(log.missing_promised(), None);
}

#[test]
fn a_truncation_unpromises_what_it_removes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), config()).expect("open");
    for b in 0..6 {
        log.append(&batch_of(&format!("b{b}"), 2, 0), 1)
            .expect("append");
    }
    log.flush().expect("flush");
    log.truncate_after_raft_index(Some(2)).expect("truncate");
    drop(log);
    let log = Log::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.next_raft_index(), 3);
    assert_eq!(log.missing_promised(), None);
    assert_eq!(log.promised().map(|p| p.next_raft_index), Some(3));
}

#[test]
fn a_segment_whose_creation_was_interrupted_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let all = build(dir.path(), 60);
    // A crash between creating the next segment's file and syncing its header.
    let total: usize = all.iter().map(Vec::len).sum();
    let next = dir.path().join(format!("{total:020}.log"));
    std::fs::write(&next, [0u8; 10]).expect("write");
    let want: Vec<String> = all.iter().flatten().cloned().collect();
    reopen_and_check(dir.path(), &want);
    assert!(!next.exists());
}

#[test]
fn stray_files_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let all = build(dir.path(), 30);
    std::fs::write(dir.path().join(".DS_Store"), b"junk").expect("write");
    std::fs::write(dir.path().join("checkpoint.tmp"), b"half").expect("write");
    let want: Vec<String> = all.iter().flatten().cloned().collect();
    reopen_and_check(dir.path(), &want);
    assert!(!dir.path().join("checkpoint.tmp").exists());
}

#[derive(Debug, Clone)]
enum PowerOp {
    Append(usize),
    Flush,
    Crash,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, rng_seed: RngSeed::Fixed(0x706f776572), ..ProptestConfig::default() })]

    /// Power loss at random points: everything flushed (or appended under flush-every-batch)
    /// survives, and what survives is always a prefix of what was appended.
    #[test]
    fn power_loss_keeps_every_flushed_record(
        every_batch in any::<bool>(),
        ops in proptest::collection::vec(prop_oneof![8 => (1usize..20).prop_map(PowerOp::Append), 2 => Just(PowerOp::Flush), 1 => Just(PowerOp::Crash)], 1..80),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = CrashFs::new();
        let mut cfg = config();
        cfg.checkpoint_interval_bytes = 4096;
        cfg.flush = if every_batch { FlushPolicy::EveryBatch } else { FlushPolicy::Os };
        let open = |cfg: &LogConfig| Log::open_with(dir.path(), cfg.clone(), Arc::new(fs.clone()), ManualClock::new(0)).expect("open");
        let mut log = open(&cfg);
        let mut appended: Vec<String> = Vec::new();
        let mut durable = 0usize;
        let mut counter = 0;
        for op in ops.into_iter().chain([PowerOp::Crash]) {
            match op {
                PowerOp::Append(n) => {
                    let tag = format!("p{counter}");
                    counter += 1;
                    log.append(&batch_of(&tag, n, 0), 1).expect("append");
                    appended.extend((0..n).map(|i| format!("{tag}-{i}")));
                    if every_batch {
                        durable = appended.len();
                    }
                }
                PowerOp::Flush => {
                    log.flush().expect("flush");
                    durable = appended.len();
                }
                PowerOp::Crash => {
                    drop(log);
                    fs.crash().expect("crash");
                    log = open(&cfg);
                    let got = values(&read_all(&log, 0).expect("read"));
                    prop_assert!(got.len() >= durable, "lost flushed records: {} < {}", got.len(), durable);
                    // A power loss takes only what no flush covered: never a promised entry.
                    prop_assert_eq!(log.missing_promised(), None);
                    prop_assert_eq!(&got[..], &appended[..got.len()]);
                    appended.truncate(got.len());
                    durable = appended.len();
                }
            }
        }
    }
}
