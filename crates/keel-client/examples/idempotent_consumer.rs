//! An idempotent consumer: at-least-once delivery from the group, exactly-once effect in the
//! consumer's own store, by remembering the id of every record it has applied *in the same
//! write* as the effect itself.
//!
//! Each record's key is its id (e.g. an order id). The store is an append-only file of
//! `id<TAB>effect` lines, fsynced before the group commit: after a crash between the store
//! write and the commit, the records are delivered again, found in the store, and skipped.
//!
//! Run against `keel up`: `cargo run --example idempotent_consumer -- orders ./applied.tsv`
//! (topic and store path; defaults `orders` and `applied.tsv`).

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use keel_client::{Client, GroupConfig, OffsetReset};

/// The consumer's own data: what it applied, keyed by record id.
struct Store {
    file: std::fs::File,
    applied: HashSet<Vec<u8>>,
}

impl Store {
    fn open(path: &Path) -> std::io::Result<Self> {
        let mut applied = HashSet::new();
        if let Ok(f) = std::fs::File::open(path) {
            for line in BufReader::new(f).split(b'\n') {
                let line = line?;
                // A torn last line (a crash mid-write) has no tab: it was never applied.
                if let Some(tab) = line.iter().position(|b| *b == b'\t') {
                    applied.insert(line[..tab].to_vec());
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file, applied })
    }

    /// Applies a record unless its id was applied before. Returns whether it was new.
    fn apply(&mut self, id: &[u8], value: &[u8]) -> std::io::Result<bool> {
        if self.applied.contains(id) {
            return Ok(false);
        }
        let mut line = id.to_vec();
        line.push(b'\t');
        line.extend_from_slice(value);
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.applied.insert(id.to_vec());
        Ok(true)
    }

    /// Makes everything applied so far durable; must happen before the group commit.
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "orders".into());
    let path = args.next().unwrap_or_else(|| "applied.tsv".into());
    let mut store = Store::open(Path::new(&path))?;

    let client = Client::connect(&["127.0.0.1:9292"]).await?;
    let config = GroupConfig::new("order-applier")
        .subscribe([topic.as_str()])
        .auto_offset_reset(OffsetReset::Earliest)
        // Commits are ours: only after the store is synced.
        .auto_commit(false);
    let mut consumer = client.group_consumer(config)?;
    loop {
        let records = consumer.poll(Duration::from_secs(1)).await?;
        if records.is_empty() {
            continue;
        }
        let (mut new, mut repeated) = (0, 0);
        for r in &records {
            let (Some(id), Some(value)) = (r.key.as_deref(), r.value.as_deref()) else {
                continue;
            };
            if store.apply(id, value)? {
                new += 1;
            } else {
                repeated += 1;
            }
        }
        store.sync()?;
        // A crash before this line redelivers these records; the store skips them.
        consumer.commit_sync().await?;
        println!("applied {new} records, skipped {repeated} already applied");
    }
}
