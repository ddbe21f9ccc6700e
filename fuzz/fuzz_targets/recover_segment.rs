//! Arbitrary bytes as the active segment of a log: opening must recover or report corruption,
//! never panic or fault, and whatever it serves must be valid batches.
#![no_main]

use keel_batch::BatchIter;
use keel_log::{Log, LogConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    // A valid segment header followed by the fuzzer's bytes.
    {
        let log = Log::open(dir.path(), LogConfig { segment_bytes: 1 << 16, ..LogConfig::default() })
            .expect("create");
        drop(log);
    }
    let seg = dir.path().join("00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).expect("read");
    let n = data.len().min(bytes.len() - 64);
    bytes[64..64 + n].copy_from_slice(&data[..n]);
    std::fs::write(&seg, &bytes).expect("write");
    if let Ok(log) = Log::open(dir.path(), LogConfig { segment_bytes: 1 << 16, ..LogConfig::default() }) {
        if let Ok(slice) = log.read(log.log_start_offset(), 1 << 20) {
            for item in BatchIter::new(&slice.bytes) {
                assert!(item.is_ok(), "served an invalid batch");
            }
        }
    }
});
