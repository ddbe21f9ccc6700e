//! `keel consume`: print records of one or all partitions of a topic.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args};
use keel_client::{ClientError, ConsumerConfig, OffsetReset, OffsetSpec, SeekTo};
use tokio::time::Instant;

use crate::common::{ClientOpts, connect, explain, parse_timestamp};
use crate::group_cmd::GROUPS_UNAVAILABLE;
use crate::record_format::{FORMAT_HELP, RecordFormat, parse_format};

/// Print records of a topic, one per line.
///
/// Reads every partition (or --partition P), starting at the end unless told otherwise, and
/// follows the topic until interrupted, unless -n or --timeout-ms says when to stop.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("start").args(["from_beginning", "from_end", "offset", "from_timestamp"])
))]
pub struct ConsumeArgs {
    /// Topic to consume.
    pub topic: String,
    /// Join this consumer group and commit what was printed (consumer groups are not available
    /// yet: this fails).
    #[arg(long, value_name = "G")]
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
    #[command(flatten)]
    pub client: ClientOpts,
}

/// How long one poll waits when following without a timeout; only bounds how often the loop
/// comes round.
const FOLLOW_POLL: Duration = Duration::from_secs(5);

pub async fn run(a: ConsumeArgs) -> Result<()> {
    if a.group.is_some() {
        bail!(GROUPS_UNAVAILABLE);
    }
    let topic = a.topic.as_str();
    let client = connect(&a.client).await?;
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
