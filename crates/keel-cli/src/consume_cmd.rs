//! `keel consume`: print records of one or all partitions of a topic, or, with `--group`, of
//! the partitions a consumer group assigns.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args};
use keel_client::{
    Client, ClientError, ConsumerConfig, ConsumerRecord, GroupConfig, OffsetReset, OffsetSpec,
    SeekTo, is_pattern,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::common::{ClientOpts, connect, explain, explain_msg, parse_timestamp, usage};
use crate::record_format::{FORMAT_HELP, RecordFormat, parse_format};

/// Print records of a topic, one per line.
///
/// Reads every partition (or --partition P), starting at the end unless told otherwise, and
/// follows the topic until interrupted, unless -n or --timeout-ms says when to stop.
///
/// With --group G it joins consumer group G instead and prints the partitions the group assigns
/// it, starting at the group's committed offsets, and commits what it printed; TOPIC may then
/// be a pattern (`orders.*`, `audit.#`: `*` one word, `#` any number of words). SIGINT and
/// SIGTERM stop it after committing, leaving the group.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("start").args(["from_beginning", "from_end", "offset", "from_timestamp"])
))]
pub struct ConsumeArgs {
    /// Topic to consume; with --group, also a pattern (`orders.*`, `audit.#`).
    pub topic: String,
    /// Join this consumer group: print the partitions it assigns, from its committed offsets,
    /// and commit what was printed.
    #[arg(long, value_name = "G", conflicts_with_all = ["partition", "offset", "from_timestamp"])]
    pub group: Option<String>,
    /// Consume only this partition [default: every partition].
    #[arg(long, value_name = "P")]
    pub partition: Option<u32>,
    /// Start at the oldest retained record of each partition.
    #[arg(long)]
    pub from_beginning: bool,
    /// Start at the end of each partition: only records produced from now on [default].
    #[arg(long)]
    pub from_end: bool,
    /// Start at offset N (of --partition, or of every partition); an offset outside a
    /// partition's retained range is an error.
    #[arg(long, value_name = "N")]
    pub offset: Option<u64>,
    /// Start at the first record with a timestamp at or after TS: milliseconds since the epoch
    /// or RFC 3339 (2024-05-01T12:00:00Z).
    #[arg(long, value_name = "TS", value_parser = parse_timestamp)]
    pub from_timestamp: Option<i64>,
    /// Stop after COUNT records (exit 0).
    #[arg(short = 'n', long = "count", value_name = "COUNT")]
    pub count: Option<u64>,
    /// Stop once T ms pass without a new record (exit 0).
    #[arg(long, value_name = "T")]
    pub timeout_ms: Option<u64>,
    #[arg(long, value_name = "FMT", default_value = "%v", value_parser = parse_format, help = FORMAT_HELP)]
    pub format: RecordFormat,
    /// With --group: do not commit offsets.
    #[arg(long)]
    pub no_commit: bool,
    /// With --group: the member's session timeout; without a heartbeat for this long its
    /// partitions go to the other members [default: 10000].
    #[arg(long, value_name = "MS", requires = "group", value_parser = clap::value_parser!(u64).range(500..=300_000))]
    pub session_timeout_ms: Option<u64>,
    /// With --group: static membership. A member that restarts with the same id within its
    /// session timeout gets its partitions back without a rebalance.
    #[arg(long, value_name = "ID", requires = "group")]
    pub instance_id: Option<String>,
    /// With --group: how the group spreads partitions over members [default: the group's,
    /// sticky for a new group].
    #[arg(long, value_name = "STRATEGY", requires = "group", value_parser = ["range", "roundrobin", "sticky"])]
    pub strategy: Option<String>,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// How long one poll waits when following without a timeout; only bounds how often the loop
/// comes round.
const FOLLOW_POLL: Duration = Duration::from_secs(5);

pub async fn run(a: ConsumeArgs) -> Result<()> {
    if a.group.is_some() && is_pattern(&a.topic) {
        keel_types::TopicPattern::parse(&a.topic)
            .map_err(|e| anyhow::anyhow!("invalid topic pattern {:?}: {e}", a.topic))?;
    }
    let client = connect(&a.client).await?;
    if let Some(group) = a.group.clone() {
        return run_group(&a, client, group).await;
    }
    let topic = a.topic.as_str();
    let count = client
        .partition_count(topic)
        .await
        .map_err(|e| explain(e, Some(topic)))?;
    let partitions: Vec<u32> = match a.partition {
        Some(p) if p < count => vec![p],
        Some(p) => bail!(
            "partition {p} of topic {topic:?} does not exist (it has {count} partition{})",
            if count == 1 { "" } else { "s" }
        ),
        None => (0..count).collect(),
    };

    // Where each partition starts, looked up concurrently.
    let spec = if a.from_beginning || a.offset.is_some() {
        OffsetSpec::Earliest
    } else if let Some(ts) = a.from_timestamp {
        OffsetSpec::Timestamp(ts)
    } else {
        OffsetSpec::Latest
    };
    let lookups = partitions
        .iter()
        .map(|&p| client.list_offsets(topic, p, spec));
    let answers = futures::future::try_join_all(lookups)
        .await
        .map_err(|e| explain(e, Some(topic)))?;
    let mut starts = Vec::with_capacity(partitions.len());
    for (&p, r) in partitions.iter().zip(answers) {
        let start = match a.offset {
            Some(o) if o < r.log_start_offset || o > r.high_watermark => bail!(
                "offset {o} is out of range for {topic}/{p}: valid offsets are {}..={}",
                r.log_start_offset,
                r.high_watermark
            ),
            Some(o) => o,
            None => r.offset,
        };
        starts.push((p, start));
    }

    // Should retention delete records under the position, carry on from the oldest retained
    // record (the client logs a warning).
    let mut consumer =
        client.consumer(ConsumerConfig::default().auto_offset_reset(OffsetReset::Earliest));
    let assignment: Vec<(&str, u32)> = partitions.iter().map(|&p| (topic, p)).collect();
    consumer.assign(&assignment);
    for (p, offset) in starts {
        consumer
            .seek(topic, p, SeekTo::Offset(offset))
            .await
            .map_err(|e| explain(e, Some(topic)))?;
    }

    let limit = a.count.unwrap_or(u64::MAX);
    let idle = a.timeout_ms.map(Duration::from_millis);
    let mut printed = 0u64;
    let mut last_record = Instant::now();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut stdout = std::io::stdout();
    while printed < limit {
        let wait = match idle {
            Some(idle) => {
                let left = (last_record + idle).saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                left
            }
            None => FOLLOW_POLL,
        };
        let records = consumer
            .poll(wait)
            .await
            .map_err(|e| explain(e, Some(topic)))?;
        if records.is_empty() {
            // The consumer retries fetches of a deleted topic quietly (it may come back); a
            // command line should say so and stop. The consumer refreshes the metadata after
            // such an error, so this check costs nothing while the topic exists.
            if let Err(e @ ClientError::UnknownTopic { .. }) = client.partition_count(topic).await {
                return Err(explain(e, Some(topic)));
            }
            continue;
        }
        last_record = Instant::now();
        buf.clear();
        for r in &records {
            if printed == limit {
                break;
            }
            a.format.render(r, &mut buf);
            printed += 1;
        }
        match stdout.write_all(&buf).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // The reader went away (`| head`): nothing more to print to.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
    Ok(())
}

/// `consume --group`: prints what the group assigns and, after each batch is printed and
/// flushed, commits exactly what was printed (so `-n` stopping half-way through a batch leaves
/// the rest for the next consumer).
async fn run_group(a: &ConsumeArgs, client: Client, group: String) -> Result<()> {
    let topic = a.topic.as_str();
    if !is_pattern(topic) {
        // A typo should fail at once rather than wait for a topic that may never appear.
        client
            .partition_count(topic)
            .await
            .map_err(|e| explain(e, Some(topic)))?;
    }
    let mut config = GroupConfig::new(group)
        .subscribe([topic])
        .auto_commit(false)
        .auto_offset_reset(if a.from_beginning {
            OffsetReset::Earliest
        } else {
            OffsetReset::Latest
        });
    if let Some(ms) = a.session_timeout_ms {
        config = config.session_timeout(Duration::from_millis(ms));
    }
    if let Some(id) = &a.instance_id {
        config = config.instance_id(id.clone());
    }
    if let Some(s) = &a.strategy {
        config = config.strategy(s.clone());
    }
    let mut consumer = client.group_consumer(config).map_err(|e| match e {
        // An invalid pattern or group id, caught before anything was sent.
        ClientError::InvalidInput(m) => usage(m),
        e => explain(e, Some(topic)),
    })?;
    // Installed before the first poll so that a signal at any point ends the loop (after the
    // current batch is printed and committed) instead of killing the process mid-commit.
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;

    let limit = a.count.unwrap_or(u64::MAX);
    let idle = a.timeout_ms.map(Duration::from_millis);
    let mut printed = 0u64;
    let mut last_record = Instant::now();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut stdout = std::io::stdout();
    let result: Result<()> = async {
        while printed < limit {
            let wait = match idle {
                Some(idle) => {
                    let left = (last_record + idle).saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    left
                }
                None => FOLLOW_POLL,
            };
            let records = tokio::select! {
                r = consumer.poll(wait) => r.map_err(|e| explain(e, Some(topic)))?,
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
            };
            if records.is_empty() {
                continue;
            }
            last_record = Instant::now();
            buf.clear();
            let mut next: BTreeMap<(Arc<str>, u32), u64> = BTreeMap::new();
            for r in records
                .iter()
                .take(usize::try_from(limit - printed).unwrap_or(usize::MAX))
            {
                a.format.render(r, &mut buf);
                printed += 1;
                note(&mut next, r);
            }
            match stdout.write_all(&buf).and_then(|()| stdout.flush()) {
                Ok(()) => {}
                // The reader went away (`| head`): what it got is what it read; commit that.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    commit_printed(&mut consumer, &next, a.no_commit).await?;
                    return Ok(());
                }
                Err(e) => return Err(e).context("writing to stdout"),
            }
            commit_printed(&mut consumer, &next, a.no_commit).await?;
        }
        Ok(())
    }
    .await;
    // Leave even after a failure, so the group need not wait out the session timeout.
    let closed = consumer.close().await;
    result?;
    if let Err(e) = closed {
        tracing::warn!(error = %e, "leaving the group failed; its partitions move once the session times out");
    }
    Ok(())
}

/// Records the offset after `r` as its partition's next.
fn note(next: &mut BTreeMap<(Arc<str>, u32), u64>, r: &ConsumerRecord) {
    let e = next.entry((r.topic.clone(), r.partition)).or_insert(0);
    *e = (*e).max(r.offset + 1);
}

async fn commit_printed(
    consumer: &mut keel_client::GroupConsumer,
    next: &BTreeMap<(Arc<str>, u32), u64>,
    no_commit: bool,
) -> Result<()> {
    if no_commit || next.is_empty() {
        return Ok(());
    }
    let offsets: Vec<(&str, u32, u64, &str)> =
        next.iter().map(|((t, p), o)| (&**t, *p, *o, "")).collect();
    match consumer.commit_offsets_sync(&offsets).await {
        Ok(()) => Ok(()),
        // The partitions went to another member (this one's session expired, say): it starts
        // from the last commit, so these records are printed again there; or that member has
        // already committed past them. Keep consuming what the group assigns now.
        Err(e) if e.is_membership_lost() || matches!(e, ClientError::OffsetBackwards { .. }) => {
            tracing::warn!(error = %explain_msg(&e, None), "commit refused; the partitions moved to another member");
            Ok(())
        }
        Err(e) => Err(explain(e, None)),
    }
}
