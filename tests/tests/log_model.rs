//! Property test: random sequences of append / read / truncate / reopen / retention against a
//! simple in-memory model of the log, on real files.

use std::sync::Arc;

use keel_batch::{BatchIter, control_batch};
use keel_log::fs::RealFs;
use keel_log::{FlushPolicy, Log, LogConfig, ReadLimit};
use keel_tests::log_util::{ManualClock, batch_of, read_all, values};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append {
        records: usize,
        control: bool,
        bump_term: bool,
    },
    Read {
        at: u16,
        max_bytes: u16,
    },
    ReadRaft {
        at: u16,
    },
    TruncateTo {
        at: u16,
    },
    TruncateAfterIndex {
        at: u16,
    },
    Reopen {
        clean: bool,
    },
    DeleteBefore {
        at: u16,
    },
    RetainBytes {
        bytes: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (1usize..30, prop::bool::weighted(0.1), prop::bool::weighted(0.1))
            .prop_map(|(records, control, bump_term)| Op::Append { records, control, bump_term }),
        3 => (any::<u16>(), any::<u16>()).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        2 => any::<u16>().prop_map(|at| Op::ReadRaft { at }),
        1 => any::<u16>().prop_map(|at| Op::TruncateTo { at }),
        1 => any::<u16>().prop_map(|at| Op::TruncateAfterIndex { at }),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
        1 => any::<u16>().prop_map(|at| Op::DeleteBefore { at }),
        1 => any::<u16>().prop_map(|bytes| Op::RetainBytes { bytes }),
    ]
}

#[derive(Debug, Clone)]
struct Entry {
    base_offset: u64,
    raft_index: u64,
    term: u64,
    values: Vec<String>,
}

impl Entry {
    fn next_offset(&self) -> u64 {
        self.base_offset + self.values.len() as u64
    }
}

#[derive(Debug, Default)]
struct Model {
    entries: Vec<Entry>,
    log_start: u64,
    term: u64,
    counter: u64,
}

impl Model {
    fn end(&self) -> u64 {
        self.entries.last().map_or(0, Entry::next_offset)
    }
    fn next_index(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.raft_index + 1)
    }
    fn readable_values(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.entries {
            for (i, v) in e.values.iter().enumerate() {
                if e.base_offset + i as u64 >= self.log_start {
                    out.push(v.clone());
                }
            }
        }
        out
    }
    /// Mirrors `Log::truncate_to`: drop batches holding `offset` or after it. Entries below
    /// `first_index` (the log's first Raft index) were already deleted with their segments and
    /// stay gone: the log keeps counting indexes after them (a Raft index is never reused),
    /// even when a control entry among them sat at `offset`.
    fn truncate_to(&mut self, offset: u64, first_index: u64) {
        self.entries.retain(|e| {
            e.raft_index < first_index || !(e.next_offset() > offset || e.base_offset >= offset)
        });
        self.log_start = self.log_start.min(self.end());
    }
}

fn pick(at: u16, lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        lo
    } else {
        lo + u64::from(at) % (hi - lo + 1)
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 200,
        flush: FlushPolicy::Os,
        retention_ms: None,
        checkpoint_interval_bytes: 3000,
        ..LogConfig::default()
    }
}

fn check(log: &Log, model: &Model) -> Result<(), TestCaseError> {
    if log.log_start_offset() != model.log_start || log.log_end_offset() != model.end() {
        eprintln!(
            "MISMATCH log start {} end {} segs {:?}; model start {} end {} entries {:?}",
            log.log_start_offset(),
            log.log_end_offset(),
            log.segment_base_offsets(),
            model.log_start,
            model.end(),
            model
                .entries
                .iter()
                .map(|e| (e.base_offset, e.values.len(), e.raft_index))
                .collect::<Vec<_>>()
        );
    }
    prop_assert_eq!(log.log_end_offset(), model.end());
    prop_assert_eq!(log.next_raft_index(), model.next_index());
    prop_assert_eq!(log.log_start_offset(), model.log_start);
    // The term of an entry in a deleted segment is not kept once every later entry is gone.
    if let Some(last) = model
        .entries
        .last()
        .filter(|e| e.raft_index >= log.first_raft_index())
    {
        prop_assert_eq!(log.last_term(), last.term);
    }
    let got = read_all(log, model.log_start).map_err(|e| TestCaseError::fail(e.to_string()))?;
    if values(&got) != model.readable_values() {
        let s = log.read(model.log_start, 1 << 20).expect("read");
        let hs: Vec<_> = BatchIter::new(&s.bytes)
            .map(|r| r.map(|(h, _)| (h.base_offset, h.offset_count(), h.raft_index)))
            .collect();
        eprintln!(
            "READ MISMATCH start {} segs {:?} first read {:?}",
            model.log_start,
            log.segment_base_offsets(),
            hs
        );
    }
    prop_assert_eq!(values(&got), model.readable_values());
    for (i, r) in got.iter().enumerate() {
        prop_assert_eq!(r.offset, model.log_start + i as u64);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(1_000);
        let open = || Log::open_with(dir.path(), config(), Arc::new(RealFs), clock.clone());
        let mut log = open().expect("open");
        let mut m = Model { term: 1, ..Model::default() };
        for op in ops {
            match op {
                Op::Append { records, control, bump_term } => {
                    if bump_term { m.term += 1; }
                    let (bytes, vals) = if control {
                        (control_batch(b"ctl", 0).expect("ctl"), Vec::new())
                    } else {
                        let tag = format!("v{}", m.counter);
                        m.counter += 1;
                        let vals = (0..records).map(|i| format!("{tag}-{i}")).collect();
                        (batch_of(&tag, records, m.counter as i64), vals)
                    };
                    let info = log.append(&bytes, m.term).expect("append");
                    prop_assert_eq!(info.base_offset, m.end());
                    prop_assert_eq!(info.raft_index, m.next_index());
                    m.entries.push(Entry { base_offset: info.base_offset, raft_index: info.raft_index, term: m.term, values: vals });
                }
                Op::Read { at, max_bytes } => {
                    let offset = pick(at, m.log_start, m.end());
                    let slice = log.read(offset, u64::from(max_bytes)).expect("read");
                    let got: Vec<_> = BatchIter::new(&slice.bytes).map(|r| r.expect("valid batch").0).collect();
                    // Every returned batch is the model's entry with that Raft index, in order.
                    for (g, w) in got.iter().zip(got.iter().skip(1)) {
                        prop_assert_eq!(w.raft_index, g.raft_index + 1);
                    }
                    for h in &got {
                        let e = m.entries.iter().find(|e| e.raft_index == h.raft_index);
                        prop_assert!(e.is_some_and(|e| e.base_offset == h.base_offset && e.values.len() as u64 == h.offset_count()));
                    }
                    // The first batch with records is the one holding `offset` (or the first after).
                    let want = m.entries.iter().find(|e| !e.values.is_empty() && e.next_offset() > offset);
                    let first_data = got.iter().find(|h| h.offset_count() > 0);
                    prop_assert_eq!(first_data.map(|h| h.raft_index), want.map(|e| e.raft_index));
                }
                Op::ReadRaft { at } => {
                    let first_idx = log.first_raft_index();
                    let idx = pick(at, first_idx, m.next_index());
                    let slice = log.read_raft(idx, 1, ReadLimit::default()).expect("read raft");
                    if idx < m.next_index() {
                        prop_assert_eq!(slice.last.map(|h| h.raft_index), Some(idx));
                    } else {
                        prop_assert!(slice.last.is_none());
                    }
                }
                Op::TruncateTo { at } => {
                    let offset = pick(at, m.log_start, m.end());
                    let first_index = log.first_raft_index();
                    log.truncate_to(offset).expect("truncate");
                    m.truncate_to(offset, first_index);
                }
                Op::TruncateAfterIndex { at } => {
                    let first_idx = log.first_raft_index();
                    if m.next_index() > first_idx {
                        let keep = pick(at, first_idx, m.next_index() - 1);
                        log.truncate_after_raft_index(Some(keep)).expect("truncate");
                        m.entries.retain(|e| e.raft_index <= keep);
                        m.log_start = m.log_start.min(m.end());
                    }
                }
                Op::Reopen { clean } => {
                    if clean { log.close().expect("close"); } else { drop(log); }
                    log = open().expect("reopen");
                }
                Op::DeleteBefore { at } => {
                    let offset = pick(at, m.log_start, m.end());
                    log.delete_before(offset).expect("delete_before");
                    m.log_start = m.log_start.max(offset.min(m.end()));
                }
                Op::RetainBytes { bytes } => {
                    let mut cfg = config();
                    cfg.retention_bytes = Some(u64::from(bytes) * 2);
                    log.set_config(cfg).expect("config");
                    let before = log.size_bytes();
                    let out = log.apply_retention().expect("retention");
                    log.set_config(config()).expect("config");
                    prop_assert!(out.log_start_offset >= m.log_start);
                    if out.deleted_segments > 0 {
                        prop_assert!(before - out.deleted_bytes >= u64::from(bytes) * 2);
                    }
                    m.log_start = out.log_start_offset;
                }
            }
            check(&log, &m)?;
        }
    }
}
