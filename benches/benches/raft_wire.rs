//! What the broker-to-broker Raft transport costs per replicated byte: an AppendEntries
//! payload of eight 1000-record batches (~888 KB) encoded to CBOR and wrapped in the gRPC
//! envelope, then decoded, against a plain copy of the same bytes.
//!
//! This decides whether replication should carry batches as protobuf `bytes` fields of their
//! own (no CBOR copy on either side): see docs/benchmarks.md, "Raft transport encoding".
//!
//! `cargo bench -p keel-benches --bench raft_wire`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_batch::{BatchBuilder, Compression, RecordRef};
use keel_raft::wire::{self, pb};
use keel_raft::{BatchData, Entry, log_id};
use openraft::EntryPayload;
use prost::Message;

fn batch() -> Bytes {
    let value = [7u8; 100];
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..1000 {
        b.push(&RecordRef {
            timestamp: i,
            key: None,
            value: Some(&value),
            headers: &[],
        })
        .expect("record fits");
    }
    Bytes::from(b.build().expect("batch builds"))
}

fn entries() -> Vec<Entry> {
    let b = batch();
    (1..=8)
        .map(|i| Entry {
            log_id: log_id(1, i),
            payload: EntryPayload::Normal(BatchData::new(b.clone())),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let entries = entries();
    let total: usize = entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(b) => b.bytes().len(),
            _ => 0,
        })
        .sum();
    let mut g = c.benchmark_group("raft_wire");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("copy_baseline", |b| {
        let flat: Vec<u8> = entries
            .iter()
            .flat_map(|e| match &e.payload {
                EntryPayload::Normal(b) => b.bytes().to_vec(),
                _ => Vec::new(),
            })
            .collect();
        b.iter(|| black_box(flat.clone()));
    });
    g.bench_function("encode", |b| {
        b.iter(|| {
            let payload = wire::encode(black_box(&entries)).expect("encodes");
            pb::RaftRequest {
                group_id: 1,
                target: 2,
                payload,
                ..pb::RaftRequest::default()
            }
            .encode_to_vec()
        });
    });
    let message = Bytes::from(
        pb::RaftRequest {
            group_id: 1,
            target: 2,
            payload: wire::encode(&entries).expect("encodes"),
            ..pb::RaftRequest::default()
        }
        .encode_to_vec(),
    );
    g.bench_function("decode", |b| {
        b.iter(|| {
            let req = pb::RaftRequest::decode(black_box(message.clone())).expect("decodes");
            wire::decode::<Vec<Entry>>(&req.payload).expect("decodes")
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
