//! Turning fetched record batches into consumer records. Every batch is CRC-checked before any
//! of its records is returned; records below the requested offset (a batch may start before
//! it) and control batches are skipped.

use std::sync::Arc;

use bytes::Bytes;
use keel_batch::{BatchIter, decode_records};

use super::ConsumerRecord;
use crate::error::{ClientError, Result};

#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub(crate) records: Vec<ConsumerRecord>,
    /// The offset to read next: past the last complete batch decoded.
    pub(crate) next_offset: u64,
}

/// Decodes the batches in `data`, keeping records at or after `from`. A bad batch after good
/// ones ends the data early (the next fetch starts at it and reports it); a bad first batch is
/// an error, so corrupt data is never skipped silently.
pub(crate) fn decode_batches(
    topic: &Arc<str>,
    partition: u32,
    data: &Bytes,
    from: u64,
    max_decompressed: usize,
) -> Result<Decoded> {
    let mut out = Decoded {
        records: Vec::new(),
        next_offset: from,
    };
    let mut pos = 0usize;
    let corrupt = |source| ClientError::CorruptData {
        topic: topic.to_string(),
        partition,
        source,
    };
    for item in BatchIter::new(data) {
        let (header, raw) = match item {
            Ok(b) => b,
            Err(e) if out.next_offset > from => {
                tracing::debug!(%topic, partition, error = %e, "stopping at a bad batch after good ones");
                break;
            }
            Err(e) => return Err(corrupt(e)),
        };
        let start = pos;
        pos += raw.len();
        // Control batches take no offsets; batches wholly below the position need no decoding.
        if header.attributes.control || header.next_offset() <= out.next_offset {
            continue;
        }
        // Re-slicing the shared buffer keeps uncompressed keys and values zero-copy.
        let batch = data.slice(start..pos);
        let records = match decode_records(&batch, max_decompressed) {
            Ok(r) => r,
            Err(e) if out.next_offset > from => {
                tracing::debug!(%topic, partition, error = %e, "stopping at a bad batch after good ones");
                break;
            }
            Err(e) => return Err(corrupt(e)),
        };
        out.records.reserve(records.len());
        for r in records {
            if r.offset < out.next_offset {
                continue;
            }
            out.records.push(ConsumerRecord {
                topic: topic.clone(),
                partition,
                offset: r.offset,
                timestamp_ms: r.timestamp,
                key: r.key,
                value: r.value,
                headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
            });
        }
        out.next_offset = out.next_offset.max(header.next_offset());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use keel_batch::{BatchBuilder, Compression, RecordRef, control_batch};

    use super::*;

    /// An encoded batch of `n` records starting at `base` (stamped as the log would).
    fn batch(base: u64, n: u32, compression: Compression) -> Vec<u8> {
        let mut b = BatchBuilder::new(compression);
        for i in 0..n {
            let v = format!("v{}", base + u64::from(i));
            let headers = [("h", Some(&b"x"[..]))];
            b.push(&RecordRef {
                timestamp: 1000 + i64::from(i),
                key: Some(b"k"),
                value: Some(v.as_bytes()),
                headers: &headers,
            })
            .expect("push");
        }
        let mut out = b.build().expect("build");
        let (_, _, payload_crc) = keel_batch::parse_verified(&out).expect("verify");
        keel_batch::stamp(&mut out, base, 1, 1, payload_crc);
        out
    }

    fn topic() -> Arc<str> {
        Arc::from("t")
    }

    #[test]
    fn skips_below_the_requested_offset_and_advances() {
        let mut data = batch(0, 5, Compression::None);
        data.extend(batch(5, 5, Compression::Lz4));
        data.extend(batch(10, 2, Compression::Zstd));
        let d = decode_batches(&topic(), 3, &Bytes::from(data), 3, 1 << 20).expect("decode");
        let offsets: Vec<u64> = d.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (3..12).collect::<Vec<_>>());
        assert_eq!(d.next_offset, 12);
        let r = &d.records[0];
        assert_eq!(r.partition, 3);
        assert_eq!(r.value.as_deref(), Some(&b"v3"[..]));
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.timestamp_ms, 1003);
        assert_eq!(
            r.headers,
            vec![("h".to_owned(), Some(Bytes::from_static(b"x")))]
        );
    }

    #[test]
    fn control_batches_are_skipped() {
        let mut data = batch(0, 2, Compression::None);
        let mut ctl = control_batch(b"raft", 5).expect("control");
        let (_, _, crc) = keel_batch::parse_verified(&ctl).expect("verify");
        keel_batch::stamp(&mut ctl, 2, 1, 2, crc);
        data.extend(ctl);
        data.extend(batch(2, 1, Compression::None));
        let d = decode_batches(&topic(), 0, &Bytes::from(data), 0, 1 << 20).expect("decode");
        assert_eq!(d.records.len(), 3);
        assert_eq!(d.next_offset, 3);
    }

    #[test]
    fn corruption_is_never_returned() {
        let good = batch(0, 3, Compression::None);
        let mut bad = batch(3, 3, Compression::None);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        // A corrupt first batch is an error.
        let err = decode_batches(&topic(), 0, &Bytes::from(bad.clone()), 3, 1 << 20);
        assert!(
            matches!(err, Err(ClientError::CorruptData { .. })),
            "{err:?}"
        );
        // After good data, decoding stops before the corrupt batch.
        let mut data = good.clone();
        data.extend(bad);
        let d = decode_batches(&topic(), 0, &Bytes::from(data), 0, 1 << 20).expect("decode");
        assert_eq!(d.records.len(), 3);
        assert_eq!(d.next_offset, 3);
        // A torn trailing batch likewise.
        let mut data = good.clone();
        data.extend_from_slice(&good[..good.len() / 2]);
        let d = decode_batches(&topic(), 0, &Bytes::from(data), 0, 1 << 20).expect("decode");
        assert_eq!(d.next_offset, 3);
    }

    #[test]
    fn empty_and_all_old_data() {
        let d = decode_batches(&topic(), 0, &Bytes::new(), 7, 1 << 20).expect("decode");
        assert!(d.records.is_empty());
        assert_eq!(d.next_offset, 7);
        let d = decode_batches(
            &topic(),
            0,
            &Bytes::from(batch(0, 3, Compression::None)),
            3,
            1 << 20,
        )
        .expect("decode");
        assert!(d.records.is_empty());
        assert_eq!(d.next_offset, 3);
    }
}
