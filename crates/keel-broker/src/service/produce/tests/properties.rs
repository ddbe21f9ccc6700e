//! Properties of what validation accepts and how it refuses.

use super::*;

fn arb_record() -> impl Strategy<Value = Record> {
    (
        proptest::option::of("[a-z]{0,6}"),
        0usize..3000,
        proptest::collection::vec(("[a-z]{1,4}", 0usize..40), 0..3),
    )
        .prop_map(|(key, len, headers)| Record {
            key: key.map(|k| Bytes::from(k.into_bytes())),
            value: Some(Bytes::from(vec![b'v'; len])),
            headers: headers
                .into_iter()
                .map(|(k, n)| RecordHeader {
                    key: k,
                    value: Some(Bytes::from(vec![b'h'; n])),
                })
                .collect(),
            timestamp_ms: 0,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever plain records a request carries, an accepted plan's batches fit
    /// `max.message.bytes`, are CRC-valid, and hold every input record once, in the partition
    /// its key (or the request) names.
    #[test]
    fn accepted_records_fit_the_limits_and_are_crc_valid(
        batches in proptest::collection::vec(
            (proptest::option::of(0u32..4), proptest::collection::vec(arb_record(), 1..12)),
            1..4,
        ),
        max_message in 512u64..8192,
    ) {
        let limits = ProduceLimits { max_message_bytes: max_message, ..limits() };
        let req = request(
            batches
                .iter()
                .map(|(p, list)| records(*p, list.clone()))
                .collect(),
        );
        match plan(req, &limits, &Fake::new(4), NOW) {
            Ok(accepted) => {
                let mut seen: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                for b in &accepted.batches {
                    prop_assert!(b.batch.bytes().len() as u64 <= max_message);
                    prop_assert!(VerifiedBatch::check(b.batch.bytes().clone()).is_ok());
                    let positions = b.positions.as_ref().expect("positions");
                    prop_assert_eq!(positions.len() as u32, b.records);
                    let (explicit, list) = &batches[b.source];
                    for i in positions {
                        let want = match (explicit, &list[*i].key) {
                            (Some(p), _) => Some(*p),
                            (None, Some(k)) => Some(partition_for_key(k, 4)),
                            (None, None) => None,
                        };
                        if let Some(want) = want {
                            prop_assert_eq!(b.partition_id, want);
                        }
                    }
                    seen.entry(b.source).or_default().extend(positions);
                }
                for (source, (_, list)) in batches.iter().enumerate() {
                    let mut got = seen.remove(&source).unwrap_or_default();
                    got.sort_unstable();
                    prop_assert_eq!(got, (0..list.len()).collect::<Vec<_>>());
                }
            }
            // The only refusal these requests can earn: one record alone over the limit.
            Err(BrokerError::TooLarge { what, limit, .. }) => {
                prop_assert_eq!(what, "record");
                prop_assert_eq!(limit, max_message);
            }
            Err(other) => prop_assert!(false, "unexpected refusal {other:?}"),
        }
    }

    /// A flipped byte in one encoded batch either leaves it valid (a field outside the CRC) or
    /// is refused naming that batch; whatever is accepted is CRC-valid.
    #[test]
    fn a_damaged_batch_is_refused_by_its_index(
        count in 1usize..4,
        damaged in 0usize..4,
        at in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let damaged = damaged % count;
        let mut batches = Vec::new();
        for i in 0..count {
            let mut bytes = encoded(i + 1, None, Compression::None).to_vec();
            if i == damaged {
                let at = at.index(bytes.len());
                bytes[at] ^= flip;
            }
            batches.push(batch(0, Bytes::from(bytes)));
        }
        match run(request(batches)) {
            Ok(accepted) => {
                for b in &accepted.batches {
                    prop_assert!(VerifiedBatch::check(b.batch.bytes().clone()).is_ok());
                }
            }
            Err(BrokerError::CorruptBatch { index, .. }) => prop_assert_eq!(index, damaged),
            Err(BrokerError::InvalidArgument { message, .. }) => {
                prop_assert!(message.contains(&format!("batches[{damaged}]")), "{}", message);
            }
            Err(BrokerError::TooLarge { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected refusal {other:?}"),
        }
    }

    /// The first batch, in request order, to a partition this broker does not serve is the
    /// one the refusal names.
    #[test]
    fn a_refusal_names_the_first_partition_not_served(
        targets in proptest::collection::vec(0u32..6, 1..8),
        encoded_batches in proptest::collection::vec(any::<bool>(), 8),
    ) {
        let mut fake = Fake::new(4);
        fake.not_led.insert(1);
        let req = request(
            targets
                .iter()
                .zip(&encoded_batches)
                .map(|(p, enc)| if *enc {
                    batch(*p, encoded(1, None, Compression::None))
                } else {
                    values(Some(*p), 1)
                })
                .collect(),
        );
        let first_bad = targets.iter().copied().find(|p| *p == 1 || *p >= 4);
        match (plan(req, &limits(), &fake, NOW), first_bad) {
            (Ok(_), None) => {}
            (Err(BrokerError::NotLeader { partition, .. }), Some(p)) => prop_assert_eq!(partition, p),
            (Err(BrokerError::UnknownPartition { partition, .. }), Some(p)) => {
                prop_assert_eq!(partition, p)
            }
            (other, want) => prop_assert!(false, "got {other:?}, expected a refusal naming {want:?}"),
        }
    }
}
