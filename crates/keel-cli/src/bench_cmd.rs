//! `keel bench produce|consume|e2e`: load generators that report records/s, MB/s and latency
//! percentiles (hdrhistogram, microsecond resolution).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use keel_batch::{BatchBuilder, Compression, RecordRef};
use keel_client::{
    Acks, Client, ClientError, ConsumerConfig, ProducerConfig, ProducerRecord, SeekTo,
};
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce pre-encoded batches as fast as the brokers take them.
    Produce(BenchArgs),
    /// Consume a topic from the beginning as fast as possible (produces first if it is short).
    Consume(BenchArgs),
    /// Produce at a fixed rate while consuming, measuring produce-to-consume latency.
    E2e(BenchArgs),
    /// Consumer-group commit round trips (one member, one commit in flight).
    Commit(BenchArgs),
    /// Time from a group member's crash until the others own every partition again.
    Rebalance(BenchArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AcksArg {
    All,
    Leader,
    None,
}

impl From<AcksArg> for Acks {
    fn from(a: AcksArg) -> Self {
        match a {
            AcksArg::All => Acks::All,
            AcksArg::Leader => Acks::Leader,
            AcksArg::None => Acks::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Topic to use; created if missing.
    #[arg(long)]
    pub topic: String,
    /// Records to produce (or consume).
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Value size of each record in bytes.
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Records per batch (produce and consume: pre-encoded batches; e2e: the producer's batch
    /// size limit in records).
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Concurrent producers, each on its own partition(s).
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Partitions of the topic if it is created [default: the number of producers].
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Acknowledgement level.
    #[arg(long, value_enum, default_value = "all")]
    pub acks: AcksArg,
    /// Batches in flight per producer.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// produce: stamp batches as an idempotent producer (a producer id per producer task and
    /// per-partition sequence numbers) so the broker checks them for duplicates; e2e: the
    /// batching producer's idempotence.
    #[arg(long, value_enum, default_value = "off")]
    pub idempotence: OnOff,
    /// produce: send each batch as its own unary Produce call (up to --in-flight at once, not
    /// ordered) instead of one ordered stream per producer; not with --idempotence on.
    #[arg(long)]
    pub unary: bool,
    /// e2e only: target produce rate in records/s.
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// e2e only: producer linger in ms.
    #[arg(long, default_value_t = 1)]
    pub linger_ms: u64,
    /// Topic configs for a topic this command creates (KEY=VALUE, repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub configs: Vec<String>,
    /// consume: read as members of this consumer group (a fresh group when only
    /// --consumers is given); commit, rebalance: the group to use [default: a fresh one].
    #[arg(long)]
    pub group: Option<String>,
    /// consume: members of the group sharing the topic (implies a group); rebalance: members
    /// before one crashes.
    #[arg(long)]
    pub consumers: Option<usize>,
    /// Group members' session timeout in ms (rebalance: how long a crash takes to notice).
    #[arg(long, default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// rebalance: crashes to measure.
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    records: u64,
    records_per_sec: f64,
    mb_per_sec: f64,
    latency_ms: Latency,
}

pub(crate) fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("creating histogram")
}

pub(crate) fn report(
    records: u64,
    bytes: u64,
    elapsed: Duration,
    hist: &Histogram<u64>,
    json: bool,
    what: &str,
) -> Result<()> {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let ms = |us: u64| us as f64 / 1000.0;
    let r = Report {
        records,
        records_per_sec: records as f64 / secs,
        mb_per_sec: bytes as f64 / secs / 1e6,
        latency_ms: Latency {
            p50: ms(hist.value_at_quantile(0.50)),
            p99: ms(hist.value_at_quantile(0.99)),
            p999: ms(hist.value_at_quantile(0.999)),
            max: ms(hist.max()),
        },
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{what}: {} records in {:.2} s: {:.0} records/s, {:.1} MB/s; latency ms p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
            r.records,
            secs,
            r.records_per_sec,
            r.mb_per_sec,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.p999,
            r.latency_ms.max
        );
    }
    Ok(())
}

fn validate(a: &BenchArgs) -> Result<()> {
    if a.unary && a.idempotence == OnOff::On {
        bail!(
            "--unary sends batches unordered, which idempotent producing cannot: drop one of them"
        );
    }
    if a.records == 0 || a.batch_size == 0 || a.producers == 0 || a.in_flight == 0 || a.rate == 0 {
        bail!("--records, --batch-size, --producers, --in-flight and --rate must be at least 1");
    }
    if a.partitions == Some(0) {
        bail!("--partitions must be at least 1");
    }
    Ok(())
}

/// Waits (up to 30 s) until every partition of a new topic has an elected leader with all its
/// replicas in sync, led by its preferred replica: the benchmark's pipelines go to one leader
/// and stop on a leader change, which the preferred-leader hand-back a few seconds after a
/// topic is created would otherwise cause in the middle of a measurement. Starts anyway if
/// that does not happen.
async fn settle_leaders(client: &Client, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let settled = client.admin().describe_topic(topic).await.is_ok_and(|t| {
            t.partitions.iter().all(|p| {
                p.leader != 0
                    && p.in_sync.len() == p.replicas.len()
                    && p.replicas
                        .first()
                        .is_none_or(|preferred| *preferred == p.leader)
            })
        });
        if settled {
            // The routes cached while the topic was being created may name no leader or an
            // old one.
            let _ = client.refresh_metadata().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ensure_topic(client: &Client, a: &BenchArgs) -> Result<u32> {
    let partitions = find_or_create_topic(client, a).await?;
    settle_leaders(client, &a.topic).await;
    Ok(partitions)
}

async fn find_or_create_topic(client: &Client, a: &BenchArgs) -> Result<u32> {
    let admin = client.admin();
    match admin.describe_topic(&a.topic).await {
        Ok(t) => Ok(t.partitions.len() as u32),
        Err(ClientError::UnknownTopic { .. }) => {
            let mut configs = BTreeMap::new();
            for kv in &a.configs {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--config {kv:?} is not KEY=VALUE"))?;
                configs.insert(k.to_owned(), v.to_owned());
            }
            let partitions = a.partitions.unwrap_or(a.producers as u32);
            match admin.create_topic(&a.topic, partitions, 0, configs).await {
                Ok(t) => Ok(t.partitions.len() as u32),
                Err(ClientError::TopicExists { .. }) => {
                    Ok(admin.describe_topic(&a.topic).await?.partitions.len() as u32)
                }
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// One pre-encoded batch of `n` records of `size` bytes (not compressible to nothing: a
/// counter pattern, as real payloads are).
fn template_batch(n: usize, size: usize) -> Result<Bytes> {
    let mut b = BatchBuilder::with_capacity(Compression::None, n * (size + 16));
    let now = now_ms();
    for i in 0..n {
        let value: Vec<u8> = (0..size).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
        b.push(&RecordRef {
            timestamp: now,
            key: None,
            value: Some(&value),
            headers: &[],
        })?;
    }
    Ok(Bytes::from(b.build()?))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn produce(
    client: &Client,
    a: &BenchArgs,
    partitions: u32,
) -> Result<(u64, u64, Duration, Histogram<u64>)> {
    let batch = template_batch(a.batch_size, a.record_size)?;
    let batches_total = a.records.div_ceil(a.batch_size as u64);
    let idempotent = a.idempotence == OnOff::On;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..a.producers {
        let share = batches_total / a.producers as u64
            + u64::from((p as u64) < batches_total % a.producers as u64);
        let partition = (p as u32) % partitions;
        if a.unary {
            tasks.push(tokio::spawn(unary_producer(
                client.clone(),
                a.topic.clone(),
                partition,
                a.acks.into(),
                batch.clone(),
                share,
                a.in_flight.max(1),
            )));
            continue;
        }
        // Each producer task pipelines its batches over one ordered stream, as the batching
        // producer does; both modes restamp every batch, so the client's work is the same.
        let mut pipe = client
            .batch_pipeline(&a.topic, partition, a.acks.into(), idempotent)
            .await?;
        let (batch, in_flight) = (batch.clone(), a.in_flight.max(1));
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram()?;
            let mut sent_at = std::collections::VecDeque::new();
            let mut sent = 0u64;
            while sent < share || !sent_at.is_empty() {
                while sent < share && sent_at.len() < in_flight {
                    pipe.send(&batch)?;
                    sent_at.push_back(Instant::now());
                    sent += 1;
                }
                pipe.next_ack().await?;
                if let Some(t) = sent_at.pop_front() {
                    hist.record(t.elapsed().as_micros().max(1) as u64)?;
                }
            }
            anyhow::Ok(hist)
        }));
    }
    let mut hist = histogram()?;
    for t in tasks {
        hist.add(t.await.context("producer task")??)?;
    }
    let elapsed = started.elapsed();
    let records = batches_total * a.batch_size as u64;
    Ok((records, batches_total * batch.len() as u64, elapsed, hist))
}

/// One producer task of `--unary`: concurrent unary Produce calls of the same batch.
async fn unary_producer(
    client: Client,
    topic: String,
    partition: u32,
    acks: Acks,
    batch: Bytes,
    share: u64,
    in_flight: usize,
) -> Result<Histogram<u64>> {
    let producer = client.producer(ProducerConfig::default().acks(acks).idempotence(false))?;
    let mut hist = histogram()?;
    let mut pending = FuturesUnordered::new();
    let mut sent = 0u64;
    loop {
        while sent < share && pending.len() < in_flight {
            let (producer, batch, topic) = (producer.clone(), batch.clone(), topic.clone());
            pending.push(async move {
                let t = Instant::now();
                producer
                    .send_batch(&topic, partition, batch, acks)
                    .await
                    .map(|_| t.elapsed())
            });
            sent += 1;
        }
        match pending.next().await {
            Some(r) => hist.record(r?.as_micros().max(1) as u64)?,
            None => return Ok(hist),
        }
    }
}

pub async fn run(cmd: BenchCommand, client: Client) -> Result<()> {
    match cmd {
        BenchCommand::Produce(a) => {
            validate(&a)?;
            let partitions = ensure_topic(&client, &a).await?;
            let (records, bytes, elapsed, hist) = produce(&client, &a, partitions).await?;
            report(records, bytes, elapsed, &hist, a.json, "produce")
        }
        BenchCommand::Consume(a) => {
            validate(&a)?;
            let partitions = ensure_topic(&client, &a).await?;
            let mut available = 0u64;
            for p in 0..partitions {
                let lo = client
                    .list_offsets(&a.topic, p, keel_client::OffsetSpec::Earliest)
                    .await?;
                available += lo.high_watermark - lo.offset;
            }
            if available < a.records {
                let mut fill = a.clone();
                fill.records = a.records - available;
                produce(&client, &fill, partitions).await?;
            }
            if a.group.is_some() || a.consumers.is_some() {
                return crate::bench_group::group_consume(&client, &a, partitions).await;
            }
            consume(&client, &a, partitions).await
        }
        BenchCommand::Commit(a) => {
            validate(&a)?;
            ensure_topic(&client, &a).await?;
            crate::bench_group::commit(&client, &a).await
        }
        BenchCommand::Rebalance(a) => {
            validate(&a)?;
            let partitions = ensure_topic(&client, &a).await?;
            crate::bench_group::rebalance(&client, &a, partitions).await
        }
        BenchCommand::E2e(a) => {
            validate(&a)?;
            let partitions = ensure_topic(&client, &a).await?;
            e2e(&client, &a, partitions).await
        }
    }
}

async fn consume(client: &Client, a: &BenchArgs, partitions: u32) -> Result<()> {
    let mut consumer = client.consumer(ConsumerConfig::default());
    let assignment: Vec<(&str, u32)> = (0..partitions).map(|p| (a.topic.as_str(), p)).collect();
    consumer.assign(&assignment);
    for p in 0..partitions {
        consumer.seek(&a.topic, p, SeekTo::Beginning).await?;
    }
    let mut hist = histogram()?;
    let (mut records, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    while records < a.records {
        let t = Instant::now();
        let batch = consumer.poll(Duration::from_secs(5)).await?;
        if batch.is_empty() {
            bail!("no more records after {records}; the topic holds fewer than --records");
        }
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
        records += batch.len() as u64;
        bytes += batch
            .iter()
            .map(|r| r.value.as_ref().map_or(0, Bytes::len) as u64)
            .sum::<u64>();
    }
    report(records, bytes, started.elapsed(), &hist, a.json, "consume")
}

/// Produces `--records` at `--rate` with the batching producer while a consumer follows the
/// topic; latency is from just before `send` to the record's arrival at the consumer, both in
/// this process (one monotonic clock).
async fn e2e(client: &Client, a: &BenchArgs, partitions: u32) -> Result<()> {
    let origin = Instant::now();
    let mut consumer =
        client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)));
    let assignment: Vec<(&str, u32)> = (0..partitions).map(|p| (a.topic.as_str(), p)).collect();
    consumer.assign(&assignment);
    for p in 0..partitions {
        consumer.seek(&a.topic, p, SeekTo::End).await?;
    }
    let config = ProducerConfig::default()
        .idempotence(a.idempotence == OnOff::On)
        .acks(a.acks.into())
        .linger(Duration::from_millis(a.linger_ms))
        .batch_size((a.batch_size * (a.record_size + 32)).max(1024));
    let producer = client.producer(config)?;
    let (records, size, rate, topic) = (a.records, a.record_size.max(8), a.rate, a.topic.clone());
    let sender = tokio::spawn(async move {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let mut acks = FuturesUnordered::new();
        let start = Instant::now();
        for i in 0..records {
            let due = start + interval.mul_f64(i as f64);
            tokio::time::sleep_until(due.into()).await;
            let mut value = vec![0u8; size];
            value[..8].copy_from_slice(&(origin.elapsed().as_nanos() as u64).to_le_bytes());
            acks.push(
                producer
                    .send(ProducerRecord::new(topic.as_str(), value))
                    .await?,
            );
            while let Some(Some(r)) = futures::FutureExt::now_or_never(acks.next()) {
                r?;
            }
        }
        while let Some(r) = acks.next().await {
            r?;
        }
        producer.close().await?;
        anyhow::Ok(())
    });
    let mut hist = histogram()?;
    let (mut seen, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    while seen < a.records {
        for r in consumer.poll(Duration::from_secs(10)).await? {
            let Some(v) = r.value.as_ref().filter(|v| v.len() >= 8) else {
                continue;
            };
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&v[..8]);
            let lat_ns =
                (origin.elapsed().as_nanos() as u64).saturating_sub(u64::from_le_bytes(sent));
            hist.record((lat_ns / 1000).max(1))?;
            seen += 1;
            bytes += v.len() as u64;
        }
        if sender.is_finished() && started.elapsed() > Duration::from_secs(3600) {
            break;
        }
    }
    sender.await.context("producer task")??;
    report(seen, bytes, started.elapsed(), &hist, a.json, "e2e")
}
