//! One test per validation rule: which field or batch, which limit.

use super::*;

// Request-level rules.

#[test]
fn the_offsets_topic_is_not_writable() {
    let (field, message) = match check_writable_topic("__consumer_offsets") {
        Err(BrokerError::InvalidArgument { field, message }) => (field, message),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    };
    assert_eq!(field, "topic");
    assert!(message.contains("internal"), "{message}");
    assert!(check_writable_topic("orders").is_ok());
}

#[test]
fn an_unknown_acks_value_is_refused() {
    let mut req = request(vec![values(Some(0), 1)]);
    req.acks = 9;
    let (field, message) = invalid(run(req));
    assert_eq!(field, "acks");
    assert_eq!(message, "unknown value 9");
    for acks in [Acks::Unspecified, Acks::None, Acks::Leader, Acks::All] {
        let mut req = request(vec![values(Some(0), 1)]);
        req.acks = acks as i32;
        assert!(run(req).is_ok(), "{acks:?}");
    }
}

#[test]
fn the_timeout_defaults_to_30s_and_is_bounded() {
    let accepted = run(request(vec![values(Some(0), 1)])).expect("plan");
    assert_eq!(accepted.timeout.as_millis(), 30_000);

    let mut req = request(vec![values(Some(0), 1)]);
    req.timeout_ms = 300_000;
    assert_eq!(run(req).expect("plan").timeout.as_millis(), 300_000);

    let mut req = request(vec![values(Some(0), 1)]);
    req.timeout_ms = 300_001;
    let (field, message) = invalid(run(req));
    assert_eq!(field, "timeout_ms");
    assert_eq!(message, "300001 exceeds the limit of 300000 ms");
}

#[test]
fn a_request_needs_one_batch_and_at_most_the_limit() {
    let (field, message) = invalid(run(request(Vec::new())));
    assert_eq!(field, "batches");
    assert_eq!(message, "at least one batch is required");

    let ten = (0..10).map(|_| values(Some(0), 1)).collect();
    assert_eq!(run(request(ten)).expect("plan").batches.len(), 10);
    let eleven = (0..11).map(|_| values(Some(0), 1)).collect();
    let (field, message) = invalid(run(request(eleven)));
    assert_eq!(field, "batches");
    assert_eq!(message, "11 batches exceed the limit of 10 per request");
}

#[test]
fn a_batch_without_data_is_named_by_index() {
    let empty = ProduceBatch {
        partition: Some(0),
        data: None,
        producer: None,
    };
    let (field, message) = invalid(run(request(vec![values(Some(0), 1), empty])));
    assert_eq!(field, "batches.data");
    assert_eq!(message, "batches[1] sets neither record_batch nor records");
}

// Encoded record batches.

#[test]
fn an_encoded_batch_is_accepted_once_checked() {
    let bytes = encoded(3, None, Compression::None);
    let accepted = run(request(vec![batch(2, bytes.clone())])).expect("plan");
    assert_eq!(accepted.sources, vec![None]);
    let [b] = &accepted.batches[..] else {
        panic!("one batch expected");
    };
    assert_eq!((b.partition, b.partition_id, b.records), (2, 2, 3));
    assert_eq!(b.batch.bytes(), &bytes);
    assert_eq!(
        (b.source, b.positions.as_ref(), b.producer),
        (0, None, None)
    );
}

#[test]
fn an_encoded_batch_carries_no_separate_producer_fields() {
    let mut b = batch(0, encoded(1, None, Compression::None));
    b.producer = Some(idempotent_fields(1, 0, 0));
    let (field, message) = invalid(run(request(vec![b])));
    assert_eq!(field, "batches.producer");
    assert!(message.starts_with("batches[0]:"), "{message}");
}

#[test]
fn an_encoded_batch_needs_an_explicit_partition() {
    let mut b = batch(0, encoded(1, None, Compression::None));
    b.partition = None;
    let (field, message) = invalid(run(request(vec![values(None, 1), b])));
    assert_eq!(field, "batches.partition");
    assert_eq!(
        message,
        "batches[1]: a record_batch needs an explicit partition"
    );
}

#[test]
fn an_encoded_batch_to_a_partition_not_served_here_names_it() {
    let mut fake = Fake::new(4);
    fake.not_led.insert(1);
    let bytes = encoded(1, None, Compression::None);
    match plan(
        request(vec![batch(7, bytes.clone())]),
        &limits(),
        &fake,
        NOW,
    ) {
        Err(BrokerError::UnknownPartition {
            partition, count, ..
        }) => assert_eq!((partition, count), (7, 4)),
        other => panic!("expected UNKNOWN_PARTITION, got {other:?}"),
    }
    match plan(request(vec![batch(1, bytes)]), &limits(), &fake, NOW) {
        Err(BrokerError::NotLeader {
            partition, leader, ..
        }) => assert_eq!((partition, leader), (1, Some((2, "b2:9092".into())))),
        other => panic!("expected NOT_LEADER, got {other:?}"),
    }
}

#[test]
fn an_encoded_batch_over_max_message_bytes_is_too_large() {
    let mut small = limits();
    let bytes = encoded(50, None, Compression::None);
    small.max_message_bytes = bytes.len() as u64 - 1;
    let r = plan(
        request(vec![batch(0, bytes.clone())]),
        &small,
        &Fake::new(1),
        NOW,
    );
    let (what, size, limit) = too_large(r);
    assert_eq!(what, "record batch");
    assert_eq!((size, limit), (bytes.len() as u64, bytes.len() as u64 - 1));
    small.max_message_bytes = bytes.len() as u64;
    assert!(plan(request(vec![batch(0, bytes)]), &small, &Fake::new(1), NOW).is_ok());
}

#[test]
fn decompressing_is_bounded_by_16_times_max_message_bytes() {
    // Zeros compress well: a small batch that expands past 16 x 4096 bytes.
    let mut b = BatchBuilder::new(Compression::Zstd);
    let zeros = vec![0u8; 100_000];
    b.push(&RecordRef {
        timestamp: NOW,
        key: None,
        value: Some(&zeros),
        headers: &[],
    })
    .expect("push");
    let bytes = Bytes::from(b.build().expect("build"));
    assert!(bytes.len() < 4096);
    let (what, _, limit) = too_large(run(request(vec![batch(0, bytes)])));
    assert_eq!(what, "decompressed record batch");
    assert_eq!(limit, 16 * 4096);
    assert_eq!(limits().max_decompressed(), 16 * 4096);
    let huge = ProduceLimits {
        max_message_bytes: u64::MAX,
        ..limits()
    };
    assert_eq!(huge.max_decompressed(), DEFAULT_MAX_DECOMPRESSED);
}

#[test]
fn a_batch_with_a_bad_crc_is_corrupt_and_named_by_index() {
    let good = encoded(2, None, Compression::None);
    let mut bad = good.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let (index, reason) = corrupt(run(request(vec![
        batch(0, good),
        batch(1, Bytes::from(bad)),
    ])));
    assert_eq!(index, 1);
    assert!(reason.contains("CRC32C mismatch"), "{reason}");
}

#[test]
fn a_control_batch_is_reserved_for_the_broker() {
    let control = Bytes::from(control_batch(b"membership", NOW).expect("control batch"));
    let (index, reason) = corrupt(run(request(vec![batch(0, control)])));
    assert_eq!(index, 0);
    assert_eq!(reason, "control batches are reserved for the broker");
}

#[test]
fn an_encoded_batch_over_the_record_limit_is_refused() {
    let at_limit = encoded(100, None, Compression::None);
    assert!(run(request(vec![batch(0, at_limit)])).is_ok());
    let over = encoded(101, None, Compression::None);
    let (field, message) = invalid(run(request(vec![batch(0, over)])));
    assert_eq!(field, "batches.record_batch");
    assert_eq!(message, "batches[0] holds 101 records; the limit is 100");
}

#[test]
fn an_encoded_batch_carries_its_idempotent_fields_in_its_header() {
    let bytes = encoded(3, Some(producer_info(9, 2, 10)), Compression::None);
    let accepted = run(request(vec![batch(0, bytes)])).expect("plan");
    assert_eq!(
        accepted.batches[0].producer,
        Some(Idempotent {
            producer_id: 9,
            epoch: 2,
            first_seq: 10,
            last_seq: 12,
        })
    );
}

#[test]
fn encoded_idempotent_fields_are_range_checked() {
    let cases = [
        (
            producer_info(0, 0, 0),
            "producer_id",
            "0 is not a producer id",
        ),
        (
            producer_info(5, -1, 0),
            "producer_epoch",
            "-1 is outside 0..=32767",
        ),
        (
            producer_info(5, 0, -2),
            "base_sequence",
            "-2 is outside 0..=2147483647",
        ),
    ];
    for (info, want_field, want) in cases {
        let bytes = encoded(1, Some(info), Compression::None);
        let (field, message) = invalid(run(request(vec![values(Some(0), 1), batch(0, bytes)])));
        assert_eq!(field, want_field);
        assert!(message.starts_with("batches[1]: "), "{message}");
        assert!(message.contains(want), "{message}");
    }
}

#[test]
fn an_older_producer_epoch_is_fenced() {
    let mut fake = Fake::new(1);
    fake.epochs.insert(9, 3);
    let old = encoded(1, Some(producer_info(9, 2, 0)), Compression::None);
    match plan(request(vec![batch(0, old)]), &limits(), &fake, NOW) {
        Err(BrokerError::ProducerFenced {
            producer_id,
            epoch,
            current,
        }) => assert_eq!((producer_id, epoch, current), (9, 2, 3)),
        other => panic!("expected PRODUCER_FENCED, got {other:?}"),
    }
    for epoch in [3, 4] {
        let current = encoded(1, Some(producer_info(9, epoch, 0)), Compression::None);
        assert!(plan(request(vec![batch(0, current)]), &limits(), &fake, NOW).is_ok());
    }
}

// Plain records.

#[test]
fn a_records_batch_needs_records_within_the_limit() {
    let (field, message) = invalid(run(request(vec![values(Some(0), 0)])));
    assert_eq!(field, "batches.records");
    assert_eq!(message, "batches[0] has no records");

    assert!(run(request(vec![values(Some(0), 100)])).is_ok());
    let (field, message) = invalid(run(request(vec![values(Some(0), 101)])));
    assert_eq!(field, "batches.records");
    assert_eq!(message, "batches[0] holds 101 records; the limit is 100");
}

#[test]
fn an_idempotent_records_batch_needs_a_partition_and_a_producer_id() {
    let mut b = values(None, 1);
    b.producer = Some(idempotent_fields(1, 0, 0));
    let (field, message) = invalid(run(request(vec![b])));
    assert_eq!(field, "batches.partition");
    assert!(message.contains("idempotent records batch"), "{message}");

    let mut b = values(Some(0), 1);
    b.producer = Some(idempotent_fields(0, 0, 0));
    let (field, message) = invalid(run(request(vec![b])));
    assert_eq!(field, "batches.producer.producer_id");
    assert_eq!(
        message,
        "batches[0]: 0 is not a producer id (they start at 1)"
    );
}

#[test]
fn idempotent_records_fields_are_range_checked() {
    for (fields, want_field) in [
        (idempotent_fields(1, 32_768, 0), "producer_epoch"),
        (idempotent_fields(1, -1, 0), "producer_epoch"),
        (idempotent_fields(1, 0, -1), "base_sequence"),
    ] {
        let mut b = values(Some(0), 1);
        b.producer = Some(fields);
        let (field, _) = invalid(run(request(vec![b])));
        assert_eq!(field, want_field);
    }
    let mut b = values(Some(3), 4);
    b.producer = Some(idempotent_fields(1, 0, 100));
    let accepted = run(request(vec![b])).expect("plan");
    let [p] = &accepted.batches[..] else {
        panic!("one batch expected");
    };
    assert_eq!(p.partition_id, 3);
    assert_eq!(
        p.producer,
        Some(Idempotent {
            producer_id: 1,
            epoch: 0,
            first_seq: 100,
            last_seq: 103,
        })
    );
    let header = p.batch.header();
    assert_eq!(
        (
            header.producer_id,
            header.producer_epoch,
            header.base_sequence
        ),
        (1, 0, 100)
    );
}

#[test]
fn a_header_key_must_not_be_empty() {
    let mut bad = record(None, "v");
    bad.headers.push(RecordHeader {
        key: String::new(),
        value: None,
    });
    let (field, message) = invalid(run(request(vec![records(
        Some(0),
        vec![record(None, "ok"), bad],
    )])));
    assert_eq!(field, "records.headers.key");
    assert_eq!(message, "batches[0].records[1] has an empty header key");
}

#[test]
fn a_records_batch_to_a_partition_not_served_here_names_it() {
    match run(request(vec![values(Some(9), 1)])) {
        Err(BrokerError::UnknownPartition { partition, .. }) => assert_eq!(partition, 9),
        other => panic!("expected UNKNOWN_PARTITION, got {other:?}"),
    }
}

#[test]
fn a_record_larger_than_max_message_bytes_is_too_large() {
    let big = "x".repeat(5000);
    let (what, _, limit) = too_large(run(request(vec![records(
        Some(0),
        vec![record(None, &big)],
    )])));
    assert_eq!((what, limit), ("record", 4096));
}

#[test]
fn an_idempotent_records_batch_must_fit_one_batch() {
    let half = "x".repeat(2500);
    let mut b = records(Some(0), vec![record(None, &half), record(None, &half)]);
    b.producer = Some(idempotent_fields(1, 0, 0));
    let (what, _, limit) = too_large(run(request(vec![b])));
    assert_eq!((what, limit), ("idempotent records batch", 4096));
}

#[test]
fn plain_records_split_into_batches_that_fit() {
    let third = "x".repeat(1500);
    let list: Vec<Record> = (0..5).map(|_| record(None, &third)).collect();
    let accepted = run(request(vec![records(Some(1), list)])).expect("plan");
    assert!(accepted.batches.len() >= 3, "{}", accepted.batches.len());
    let mut positions = Vec::new();
    for b in &accepted.batches {
        assert!(b.batch.bytes().len() as u64 <= 4096);
        assert_eq!(b.partition_id, 1);
        positions.extend(b.positions.clone().expect("positions"));
    }
    assert_eq!(positions, vec![0, 1, 2, 3, 4]);
    assert_eq!(accepted.sources, vec![Some(5)]);
}

#[test]
fn records_go_to_their_key_partition_and_keyless_ones_share_a_sticky_one() {
    let fake = Fake::new(4);
    fake.sticky.set(2);
    let list = vec![
        record(Some("alpha"), "1"),
        record(None, "2"),
        record(Some("beta"), "3"),
        record(None, "4"),
    ];
    let accepted = plan(request(vec![records(None, list)]), &limits(), &fake, NOW).expect("plan");
    let mut placed = BTreeMap::new();
    for b in &accepted.batches {
        for i in b.positions.as_ref().expect("positions") {
            placed.insert(*i, b.partition_id);
        }
    }
    assert_eq!(placed[&0], partition_for_key(b"alpha", 4));
    assert_eq!(placed[&2], partition_for_key(b"beta", 4));
    assert_eq!((placed[&1], placed[&3]), (2, 2));
    // One sticky pick per request batch that needs one.
    assert_eq!(fake.sticky.get(), 3);
}

#[test]
fn records_without_a_timestamp_get_the_time_of_the_request() {
    let mut dated = record(None, "b");
    dated.timestamp_ms = 42;
    let accepted = run(request(vec![records(
        Some(0),
        vec![record(None, "a"), dated],
    )]))
    .expect("plan");
    let decoded = decode_records(accepted.batches[0].batch.bytes(), 1 << 20).expect("decode");
    let stamps: Vec<i64> = decoded.iter().map(|r| r.timestamp).collect();
    assert_eq!(stamps, vec![NOW, 42]);
}

#[test]
fn the_response_acks_each_request_batch_in_order() {
    let fake = Fake::new(4);
    let list = vec![record(Some("alpha"), "1"), record(Some("beta"), "2")];
    let accepted = plan(
        request(vec![
            batch(3, encoded(2, None, Compression::None)),
            records(None, list),
        ]),
        &limits(),
        &fake,
        NOW,
    )
    .expect("plan");
    let infos: Vec<Appended> = accepted
        .batches
        .iter()
        .enumerate()
        .map(|(i, b)| Appended {
            base_offset: 100 * (i as u64 + 1),
            next_offset: 100 * (i as u64 + 1) + u64::from(b.records),
        })
        .collect();
    let resp = build_response(&accepted, &infos, 7);
    assert_eq!(resp.correlation_id, 7);
    assert_eq!(resp.batches.len(), 2);
    let encoded_ack = &resp.batches[0];
    assert_eq!((encoded_ack.partition, encoded_ack.base_offset), (3, 100));
    assert_eq!(encoded_ack.record_count, 2);
    assert!(encoded_ack.records.is_empty());
    let records_ack = &resp.batches[1];
    assert_eq!(records_ack.record_count, 2);
    let alpha = partition_for_key(b"alpha", 4);
    let beta = partition_for_key(b"beta", 4);
    assert_eq!(records_ack.records[0].partition, alpha);
    assert_eq!(records_ack.records[1].partition, beta);
    for p in &records_ack.records {
        assert!(p.offset >= 200);
    }
}
