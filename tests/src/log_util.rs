//! Helpers for tests of the partition log.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use keel_batch::{BatchBuilder, BatchIter, Compression, Record, RecordRef, decode_records};
use keel_log::{Clock, Log, LogError};

/// A clock the test moves by hand.
#[derive(Debug, Default)]
pub struct ManualClock(pub AtomicI64);

impl ManualClock {
    pub fn new(ms: i64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(ms)))
    }
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Builds a batch whose values are `"{tag}-{i}"` for `i` in `0..n`, with timestamp `ts`.
pub fn batch_of(tag: &str, n: usize, ts: i64) -> Vec<u8> {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..n {
        let v = format!("{tag}-{i}");
        b.push(&RecordRef {
            timestamp: ts,
            key: None,
            value: Some(v.as_bytes()),
            headers: &[],
        })
        .expect("push");
    }
    b.build().expect("build")
}

/// Reads every record of the log from `from`, following batches across segments.
pub fn read_all(log: &Log, from: u64) -> Result<Vec<Record>, LogError> {
    let mut out = Vec::new();
    let mut offset = from;
    while offset < log.log_end_offset() {
        let slice = log.read(offset, 1 << 20)?;
        let Some(last) = slice.last else { break };
        for item in BatchIter::new(&slice.bytes) {
            let (h, raw) = item.map_err(LogError::InvalidBatch)?;
            if h.attributes.control {
                continue;
            }
            let recs = decode_records(&Bytes::copy_from_slice(raw), 1 << 26)?;
            out.extend(recs.into_iter().filter(|r| r.offset >= offset));
        }
        if last.next_offset() <= offset {
            break;
        }
        offset = last.next_offset();
    }
    Ok(out)
}

/// The values of records as strings.
pub fn values(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect()
}
