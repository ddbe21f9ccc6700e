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
        let Some(wait) = poll_wait(idle, last_record) else {
            break;
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

/// How long the next poll may wait: what is left of `--timeout-ms` since the last record, or
/// `None` once that has run out (the command stops); without a timeout, one follow interval.
fn poll_wait(idle: Option<Duration>, last_record: Instant) -> Option<Duration> {
    match idle {
        Some(idle) => {
            let left = (last_record + idle).saturating_duration_since(Instant::now());
            (!left.is_zero()).then_some(left)
        }
        None => Some(FOLLOW_POLL),
    }
}

/// `consume --group`: prints what the group assigns and, after each batch is printed and
/// flushed, commits exactly what was printed (so `-n` stopping half-way through a batch leaves
/// the rest for the next consumer). A write that fails half-way (the reader went away) commits
/// only the records whose text was written in full.
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
    // Unbuffered, so that what a write reports written has reached the reader's pipe (or the
    // file) and nothing is left in a buffer that a failure would lose: commits follow it.
    let mut stdout = unbuffered_stdout()?;
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
    let mut batch = Batch::default();
    let result: Result<()> = async {
        while printed < limit {
            let Some(wait) = poll_wait(idle, last_record) else {
                break;
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
            batch.clear();
            for r in records
                .iter()
                .take(usize::try_from(limit - printed).unwrap_or(usize::MAX))
            {
                batch.push(&a.format, r);
                printed += 1;
            }
            let (written, outcome) = write_counting(&mut stdout, &batch.buf);
            // Only records whose text was written in full count as printed: after a failed
            // write that is a prefix of the batch (possibly empty).
            let done = batch.written(written);
            match outcome {
                Ok(()) => commit_printed(&mut consumer, &done, a.no_commit).await?,
                // The reader went away (`| head`): commit what it got, and stop.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    commit_printed(&mut consumer, &done, a.no_commit).await?;
                    return Ok(());
                }
                Err(e) => {
                    if let Err(c) = commit_printed(&mut consumer, &done, a.no_commit).await {
                        tracing::warn!(error = %c, "committing what was printed failed");
                    }
                    return Err(e).context("writing to stdout");
                }
            }
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

/// The next offset to commit for each partition.
type NextOffsets = BTreeMap<(Arc<str>, u32), u64>;

/// A batch of rendered records, and where each one's text ends.
#[derive(Debug, Default)]
struct Batch {
    buf: Vec<u8>,
    /// Per record in `buf` order: the end of its text in `buf`, its partition and the offset
    /// after it.
    ends: Vec<(usize, (Arc<str>, u32), u64)>,
}

impl Batch {
    fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }

    fn push(&mut self, format: &RecordFormat, r: &ConsumerRecord) {
        format.render(r, &mut self.buf);
        self.ends
            .push((self.buf.len(), (r.topic.clone(), r.partition), r.offset + 1));
    }

    /// The next offset of each partition, counting only the records whose text is entirely
    /// within the first `written` bytes of `buf`.
    fn written(&self, written: usize) -> NextOffsets {
        let mut next = NextOffsets::new();
        for (end, part, after) in &self.ends {
            if *end > written {
                break;
            }
            let e = next.entry(part.clone()).or_insert(0);
            *e = (*e).max(*after);
        }
        next
    }
}

/// Standard output without a user-space buffer (a duplicate of its descriptor), so that bytes
/// a write accepted have left the process.
fn unbuffered_stdout() -> Result<std::fs::File> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("opening stdout")?;
    Ok(std::fs::File::from(fd))
}

/// Writes all of `buf` and flushes; returns how many bytes were written, also when it fails.
fn write_counting(w: &mut impl Write, buf: &[u8]) -> (usize, std::io::Result<()>) {
    let mut done = 0;
    while done < buf.len() {
        match w.write(&buf[done..]) {
            Ok(0) => {
                return (
                    done,
                    Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "failed to write the whole batch",
                    )),
                );
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Err(e)),
        }
    }
    (done, w.flush())
}

/// Commits `next`. Entries the group has already committed past (a late commit of a
/// partition's previous owner) are left out, and the rest committed.
async fn commit_printed(
    consumer: &mut keel_client::GroupConsumer,
    next: &NextOffsets,
    no_commit: bool,
) -> Result<()> {
    if no_commit || next.is_empty() {
        return Ok(());
    }
    let offsets: Vec<(&str, u32, u64, &str)> =
        next.iter().map(|((t, p), o)| (&**t, *p, *o, "")).collect();
    match consumer.commit_offsets_forward_sync(&offsets).await {
        Ok(()) => Ok(()),
        // The partitions went to another member (this one's session expired, say): it starts
        // from the last commit, so these records are printed again there; or (rarely, as the
        // client drops entries the group is already past and retries) that member committed
        // past them meanwhile. Keep consuming what the group assigns now.
        Err(e) if e.is_membership_lost() || matches!(e, ClientError::OffsetBackwards { .. }) => {
            tracing::warn!(error = %explain_msg(&e, None), "commit refused; the partitions moved to another member");
            Ok(())
        }
        Err(e) => Err(explain(e, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: &Arc<str>, partition: u32, offset: u64, value: &str) -> ConsumerRecord {
        ConsumerRecord {
            topic: topic.clone(),
            partition,
            offset,
            timestamp_ms: 0,
            key: None,
            value: Some(value.as_bytes().to_vec().into()),
            headers: Vec::new(),
        }
    }

    fn batch() -> (Batch, Arc<str>) {
        let t: Arc<str> = Arc::from("t");
        let format = parse_format("%p:%o:%v").expect("format");
        let mut b = Batch::default();
        // Two partitions interleaved, as a poll returns them.
        for r in [
            rec(&t, 0, 10, "a"),
            rec(&t, 1, 20, "bb"),
            rec(&t, 0, 11, "c"),
            rec(&t, 1, 21, "d"),
        ] {
            b.push(&format, &r);
        }
        (b, t)
    }

    #[test]
    fn only_records_written_in_full_are_committed() {
        let (b, t) = batch();
        let text = String::from_utf8(b.buf.clone()).expect("utf-8");
        assert_eq!(text, "0:10:a\n1:20:bb\n0:11:c\n1:21:d\n");
        let at = |n: usize| -> Vec<(u32, u64)> {
            b.written(n)
                .into_iter()
                .map(|((topic, p), o)| {
                    assert_eq!(topic, t);
                    (p, o)
                })
                .collect()
        };
        assert_eq!(at(0), vec![]);
        // Half of the first line.
        assert_eq!(at(3), vec![]);
        // The first line without its newline is not printed yet.
        assert_eq!(at(6), vec![]);
        assert_eq!(at(7), vec![(0, 11)]);
        // Into the third record: partition 1's first record is in, partition 0's second not.
        assert_eq!(at(20), vec![(0, 11), (1, 21)]);
        assert_eq!(at(b.buf.len() - 1), vec![(0, 12), (1, 21)]);
        assert_eq!(at(b.buf.len()), vec![(0, 12), (1, 22)]);
    }

    /// Accepts up to `room` bytes, a few at a time (with an interruption), then fails.
    struct Pipe {
        got: Vec<u8>,
        room: usize,
        interrupted: bool,
        flushes: usize,
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.room - self.got.len()).min(5);
            if n == 0 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_reports_how_much_was_written() {
        let (b, _) = batch();
        let mut pipe = Pipe {
            got: Vec::new(),
            room: 18,
            interrupted: false,
            flushes: 0,
        };
        let (n, r) = write_counting(&mut pipe, &b.buf);
        assert_eq!(n, 18);
        assert_eq!(pipe.got, b.buf[..18]);
        assert_eq!(
            r.expect_err("broken pipe").kind(),
            std::io::ErrorKind::BrokenPipe
        );
        assert_eq!(pipe.flushes, 0);
        // Two whole lines made it.
        assert_eq!(b.written(n).len(), 2);
        assert_eq!(
            b.written(n).values().copied().collect::<Vec<_>>(),
            vec![11, 21]
        );

        let mut pipe = Pipe {
            got: Vec::new(),
            room: usize::MAX,
            interrupted: false,
            flushes: 0,
        };
        let (n, r) = write_counting(&mut pipe, &b.buf);
        assert!(r.is_ok());
        assert_eq!(n, b.buf.len());
        assert_eq!(pipe.got, b.buf);
        assert_eq!(pipe.flushes, 1);
    }

    #[test]
    fn a_write_of_nothing_is_an_error() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (n, r) = write_counting(&mut Full, b"x\n");
        assert_eq!(n, 0);
        assert_eq!(r.expect_err("zero").kind(), std::io::ErrorKind::WriteZero);
        // An empty batch writes nothing and succeeds.
        assert!(matches!(write_counting(&mut Full, b""), (0, Ok(()))));
    }
}
