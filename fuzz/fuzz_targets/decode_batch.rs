//! Batch decoding takes untrusted bytes: it must return a value or an error, never panic, and a
//! batch that decodes must re-verify.
#![no_main]

use bytes::Bytes;
use keel_batch::{BatchIter, decode_records, parse_verified};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let _ = decode_records(&bytes, 1 << 20);
    for item in BatchIter::new(data) {
        let Ok((_, raw)) = item else { break };
        assert!(parse_verified(raw).is_ok());
    }
});
