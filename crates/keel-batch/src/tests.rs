use bytes::Bytes;
use proptest::prelude::*;

use super::*;

type Hdrs = Vec<(String, Option<Vec<u8>>)>;
type Rec = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Hdrs);

fn build(codec: Compression, recs: &[Rec]) -> Vec<u8> {
    let mut b = BatchBuilder::new(codec);
    for (ts, k, v, hs) in recs {
        let hs: Vec<(&str, Option<&[u8]>)> =
            hs.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        b.push(&RecordRef {
            timestamp: *ts,
            key: k.as_deref(),
            value: v.as_deref(),
            headers: &hs,
        })
        .expect("push");
    }
    b.build().expect("build")
}

fn codec() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        Just(Compression::Lz4),
        Just(Compression::Zstd)
    ]
}

fn record() -> impl Strategy<Value = Rec> {
    (
        -1_000_000i64..4_000_000_000_000,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        proptest::collection::vec(
            (
                "[a-z]{0,8}",
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            ),
            0..3,
        ),
    )
}

proptest! {
    #[test]
    fn encode_decode_roundtrip(codec in codec(), recs in proptest::collection::vec(record(), 1..40), base in 0u64..1_000_000) {
        let mut batch = build(codec, &recs);
        let (_, _, payload_crc) = parse_verified(&batch)?;
        stamp(&mut batch, base, 7, 9, payload_crc);
        let batch = Bytes::from(batch);
        let (h, _, _) = parse_verified(&batch)?;
        prop_assert_eq!(h.base_offset, base);
        prop_assert_eq!(h.raft_term, 7);
        prop_assert_eq!(h.raft_index, 9);
        prop_assert_eq!(h.record_count as usize, recs.len());
        prop_assert_eq!(h.attributes.compression, codec);
        prop_assert_eq!(h.max_timestamp, recs.iter().map(|r| r.0).max().unwrap_or(0));
        prop_assert!(validate_records(&batch, DEFAULT_MAX_DECOMPRESSED).is_ok());
        let out = decode_records(&batch, DEFAULT_MAX_DECOMPRESSED)?;
        prop_assert_eq!(out.len(), recs.len());
        for (i, (got, want)) in out.iter().zip(&recs).enumerate() {
            prop_assert_eq!(got.offset, base + i as u64);
            prop_assert_eq!(got.timestamp, want.0);
            prop_assert_eq!(got.key.as_deref(), want.1.as_deref());
            prop_assert_eq!(got.value.as_deref(), want.2.as_deref());
            let hs: Hdrs = got.headers.iter().map(|h| (h.key.clone(), h.value.as_ref().map(|v| v.to_vec()))).collect();
            prop_assert_eq!(&hs, &want.3);
        }
    }

    #[test]
    fn any_single_bit_flip_is_detected(recs in proptest::collection::vec(record(), 1..5), pos in any::<prop::sample::Index>(), bit in 0u8..8, base in any::<u64>()) {
        let mut batch = build(Compression::None, &recs);
        let (_, _, payload_crc) = parse_verified(&batch)?;
        stamp(&mut batch, base >> 2, base % 1000, base % 7777, payload_crc);
        prop_assert!(parse_verified(&batch).is_ok());
        let i = pos.index(batch.len());
        batch[i] ^= 1 << bit;
        let b = Bytes::from(batch);
        prop_assert!(decode_records(&b, DEFAULT_MAX_DECOMPRESSED).is_err());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let b = Bytes::from(bytes);
        let _ = decode_records(&b, 1 << 20);
        let _ = BatchIter::new(&b).count();
    }

    /// Mutations of a valid batch with its CRC recomputed exercise the record parser itself.
    #[test]
    fn mutated_batches_with_fixed_crc_never_panic(codec in codec(), recs in proptest::collection::vec(record(), 1..5), edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut batch = build(codec, &recs);
        for (i, v) in edits {
            let i = i.index(batch.len());
            batch[i] = v;
        }
        if batch.len() > 9 {
            let crc = crc32c::crc32c(&batch[9..]);
            batch[5..9].copy_from_slice(&crc.to_le_bytes());
        }
        let b = Bytes::from(batch);
        // The allocation-free validator and the decoder agree on every input.
        prop_assert_eq!(validate_records(&b, 1 << 20).is_ok(), decode_records(&b, 1 << 20).is_ok());
    }
}

#[test]
fn control_batches_take_no_offsets() {
    let mut batch = control_batch(b"membership", 5).expect("control");
    let (_, _, crc) = parse_verified(&batch).expect("valid");
    stamp(&mut batch, 42, 3, 10, crc);
    let (h, _, _) = parse_verified(&batch).expect("valid");
    assert!(h.attributes.control);
    assert_eq!(h.offset_count(), 0);
    assert_eq!(h.next_offset(), 42);
    assert_eq!(&batch[HEADER_LEN..], b"membership");
    assert!(
        decode_records(&Bytes::from(batch), 1024)
            .expect("decodes")
            .is_empty()
    );
}

#[test]
fn empty_builder_is_an_error() {
    assert_eq!(
        BatchBuilder::new(Compression::None).build(),
        Err(BatchError::Empty)
    );
}

#[test]
fn compression_bomb_is_refused() {
    let big = vec![b'a'; 1 << 20];
    let batch = build(Compression::Zstd, &[(0, None, Some(big.clone()), vec![])]);
    let b = Bytes::from(batch);
    assert!(matches!(
        decode_records(&b, 64 * 1024),
        Err(BatchError::Decompress(_) | BatchError::TooLarge { .. })
    ));
    let batch = build(Compression::Lz4, &[(0, None, Some(big), vec![])]);
    assert!(matches!(
        decode_records(&Bytes::from(batch), 64 * 1024),
        Err(BatchError::TooLarge { .. })
    ));
}

#[test]
fn header_rejects_bad_fields() {
    let batch = build(Compression::None, &[(1, None, Some(b"v".to_vec()), vec![])]);
    let mut bad = batch.clone();
    bad[4] = 9;
    assert_eq!(
        BatchHeader::parse(&bad),
        Err(BatchError::UnsupportedMagic(9))
    );
    let mut bad = batch.clone();
    bad[0..4].copy_from_slice(&3u32.to_le_bytes());
    assert!(matches!(
        BatchHeader::parse(&bad),
        Err(BatchError::BadLength { .. })
    ));
    assert!(matches!(
        parse_verified(&batch[..batch.len() - 1]),
        Err(BatchError::Truncated { .. })
    ));
}

#[test]
fn set_producer_restamps_fields_and_crc() {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(&RecordRef {
        timestamp: 5,
        key: None,
        value: Some(b"v"),
        headers: &[],
    })
    .expect("push");
    let mut bytes = b.build().expect("build");
    let info = ProducerInfo {
        producer_id: 9,
        producer_epoch: 2,
        base_sequence: 40,
    };
    set_producer(&mut bytes, info).expect("restamp");
    let h = validate_records(&bytes, 1 << 20).expect("still valid");
    assert_eq!(
        (h.producer_id, h.producer_epoch, h.base_sequence),
        (9, 2, 40)
    );
}
