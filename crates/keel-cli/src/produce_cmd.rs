//! `keel produce`: one record per line of standard input, through the batching producer.
//!
//! A thread reads stdin (so a slow terminal never blocks the runtime) and hands lines over in
//! chunks of whatever is already buffered: bulk input moves in large chunks, a line typed at a
//! terminal is sent at once. Every line is handed to `Producer::send` without waiting for
//! earlier acknowledgements; the acknowledgements are awaited in input order, so `--verbose`
//! prints each `PARTITION OFFSET` line as soon as its record and all before it are acknowledged.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::builder::NonEmptyStringValueParser;
use clap::{Args, ValueEnum};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use keel_client::{Acks, ClientError, ProducerConfig, ProducerRecord, RecordMetadata};
use tokio::sync::mpsc;

use crate::common::{ClientOpts, connect, explain, explain_msg, parse_key_value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AcksLevel {
    /// Committed on a majority of the replicas (survives the loss of a minority).
    All,
    /// Appended by the partition leader.
    Leader,
    /// Accepted by the broker; no offsets are known.
    None,
}

impl From<AcksLevel> for Acks {
    fn from(a: AcksLevel) -> Self {
        match a {
            AcksLevel::All => Acks::All,
            AcksLevel::Leader => Acks::Leader,
            AcksLevel::None => Acks::None,
        }
    }
}

/// Produce one record per line of standard input.
///
/// The trailing "\n" (or "\r\n") of each line is stripped; an empty line is a record with an
/// empty value. Records are batched and pipelined. Exits 0 only when every record was
/// acknowledged at the --acks level; on the first failure it stops reading input and exits 1
/// naming the line.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to produce to.
    pub topic: String,
    /// Key of every record [default: none].
    #[arg(long, conflicts_with = "key_separator")]
    pub key: Option<String>,
    /// Partition for every record [default: by key hash; records without a key go to one
    /// partition per batch].
    #[arg(long)]
    pub partition: Option<u32>,
    /// Acknowledgement level.
    #[arg(long, value_enum, default_value = "all")]
    pub acks: AcksLevel,
    /// Read each line as KEY<SEP>VALUE, split at the first SEP. A line without SEP is an error
    /// that names its line number: the lines before it are produced, nothing after it is read.
    #[arg(long, value_name = "SEP", value_parser = NonEmptyStringValueParser::new())]
    pub key_separator: Option<String>,
    /// Header added to every record (repeatable).
    #[arg(long = "header", value_name = "K=V", value_parser = parse_key_value)]
    pub headers: Vec<(String, String)>,
    /// Print "PARTITION OFFSET" for each acknowledged record, one line per input line in input
    /// order, as soon as it is acknowledged (OFFSET is -1 with --acks none, where the broker
    /// answers before assigning offsets).
    #[arg(long, short)]
    pub verbose: bool,
    /// Turn off idempotent producing (on by default with --acks all: a batch retried after a
    /// lost answer or a leader change is written once).
    #[arg(long)]
    pub no_idempotence: bool,
    /// Stable producer identity: a later `keel produce` with the same one fences this one.
    #[arg(long, value_name = "ID")]
    pub instance_id: Option<String>,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// Lines handed from the reader thread: a chunk of lines, or the read error that ended input.
type Chunk = std::io::Result<Vec<Vec<u8>>>;

/// Largest number of lines per chunk.
const CHUNK_LINES: usize = 1024;

fn read_stdin(tx: mpsc::Sender<Chunk>) {
    let stdin = std::io::stdin();
    let mut reader = BufReader::with_capacity(256 * 1024, stdin.lock());
    let mut chunk = Vec::new();
    loop {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                chunk.push(line);
                // Send now unless another whole line is already buffered: no latency for
                // interactive input, few hand-overs for bulk input.
                if (chunk.len() >= CHUNK_LINES || !reader.buffer().contains(&b'\n'))
                    && tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                if !chunk.is_empty() && tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err() {
                    return;
                }
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(Ok(chunk));
    }
}

/// Everything a record gets besides its line.
struct Template {
    topic: String,
    partition: Option<u32>,
    key: Option<Bytes>,
    separator: Option<Vec<u8>>,
    headers: Vec<(String, Option<Bytes>)>,
}

impl Template {
    /// The record for one line, or `None` when the line lacks the key separator.
    fn record(&self, line: Vec<u8>) -> Option<ProducerRecord> {
        let line = Bytes::from(line);
        let (key, value) = match &self.separator {
            Some(sep) => {
                let at = line.windows(sep.len()).position(|w| w == sep.as_slice())?;
                (Some(line.slice(..at)), line.slice(at + sep.len()..))
            }
            None => (self.key.clone(), line),
        };
        Some(ProducerRecord {
            topic: self.topic.clone(),
            partition: self.partition,
            key,
            value: Some(value),
            headers: self.headers.clone(),
            timestamp_ms: None,
        })
    }
}

type Ack = BoxFuture<'static, (u64, keel_client::Result<RecordMetadata>)>;

/// Outcome bookkeeping, in input order.
#[derive(Default)]
struct Progress {
    /// The first line whose record failed, with why.
    failed: Option<(u64, ClientError)>,
    /// Records after the failed one that were already sent: acknowledged, failed.
    after_failure: (u64, u64),
}

pub async fn run(a: ProduceArgs) -> Result<()> {
    let client = connect(&a.client).await?;
    // Fail before reading any input when the topic or partition does not exist.
    let count = client
        .partition_count(&a.topic)
        .await
        .map_err(|e| explain(e, Some(&a.topic)))?;
    if let Some(p) = a.partition
        && p >= count
    {
        bail!(
            "partition {p} of topic {:?} does not exist (it has {count} partition{})",
            a.topic,
            if count == 1 { "" } else { "s" }
        );
    }
    let mut config = ProducerConfig::default()
        .acks(a.acks.into())
        .linger(Duration::from_millis(5))
        .idempotence(!a.no_idempotence);
    if let Some(id) = a.instance_id {
        config = config.instance_id(id);
    }
    let producer = client.producer(config).map_err(|e| explain(e, None))?;
    let template = Template {
        topic: a.topic.clone(),
        partition: a.partition,
        key: a.key.map(Bytes::from),
        separator: a.key_separator.map(String::into_bytes),
        headers: a
            .headers
            .into_iter()
            .map(|(k, v)| (k, Some(Bytes::from(v))))
            .collect(),
    };

    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    // A plain thread, not spawn_blocking: a read blocked on a terminal must not hold up the
    // runtime's shutdown when produce ends early.
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || read_stdin(tx))
        .context("starting the stdin reader")?;

    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut acks: FuturesOrdered<Ack> = FuturesOrdered::new();
    let mut progress = Progress::default();
    let mut lines = 0u64;
    let mut reading = true;
    // Why reading stopped early, if it did for a reason of its own (not a failed record).
    let mut input_error: Option<String> = None;

    loop {
        tokio::select! {
            biased;
            Some((line, result)) = acks.next(), if !acks.is_empty() => {
                settle(&mut progress, line, result, a.verbose, &mut out)?;
                while let Some(Some((line, result))) = acks.next().now_or_never() {
                    settle(&mut progress, line, result, a.verbose, &mut out)?;
                }
                if a.verbose {
                    out.flush().context("writing to stdout")?;
                }
                if progress.failed.is_some() {
                    reading = false;
                }
            }
            chunk = rx.recv(), if reading => match chunk {
                None => reading = false,
                Some(Err(e)) => {
                    input_error = Some(format!("reading stdin after line {lines}: {e}"));
                    reading = false;
                }
                Some(Ok(chunk)) => {
                    for text in chunk {
                        lines += 1;
                        let line = lines;
                        let Some(record) = template.record(text) else {
                            input_error = Some(missing_separator(line, &template));
                            reading = false;
                            break;
                        };
                        match producer.send(record).await {
                            Ok(ack) => acks.push_back(ack.map(move |r| (line, r)).boxed()),
                            Err(e) => {
                                acks.push_back(futures::future::ready((line, Err(e))).boxed());
                                reading = false;
                                break;
                            }
                        }
                    }
                }
            },
            else => break,
        }
    }
    drop(rx);
    out.flush().context("writing to stdout")?;
    // Every acknowledgement is in; this only stops the sender task.
    producer.close().await.map_err(|e| explain(e, None))?;

    if let Some((line, e)) = progress.failed {
        let (ok, failed) = progress.after_failure;
        let mut msg = format!(
            "the record from line {line} was not produced: {}",
            explain_msg(&e, Some(&a.topic))
        );
        if ok + failed > 0 {
            msg.push_str(&format!(
                " ({ok} of the {} records sent after it were acknowledged)",
                ok + failed
            ));
        }
        bail!(msg);
    }
    if let Some(msg) = input_error {
        bail!(msg);
    }
    Ok(())
}

fn missing_separator(line: u64, t: &Template) -> String {
    let sep = String::from_utf8_lossy(t.separator.as_deref().unwrap_or_default());
    let before = line - 1;
    format!(
        "line {line} has no key separator {sep:?}; the {before} line{} before it {} produced, \
         nothing after it was read",
        if before == 1 { "" } else { "s" },
        if before == 1 { "was" } else { "were" },
    )
}

fn settle(
    progress: &mut Progress,
    line: u64,
    result: keel_client::Result<RecordMetadata>,
    verbose: bool,
    out: &mut impl Write,
) -> Result<()> {
    match (result, progress.failed.is_some()) {
        (Ok(meta), false) => {
            if verbose {
                let offset = meta.offset.map_or(-1, |o| o as i64);
                writeln!(out, "{} {offset}", meta.partition).context("writing to stdout")?;
            }
        }
        (Err(e), false) => progress.failed = Some((line, e)),
        (Ok(_), true) => progress.after_failure.0 += 1,
        (Err(_), true) => progress.after_failure.1 += 1,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(sep: Option<&str>, key: Option<&str>) -> Template {
        Template {
            topic: "t".into(),
            partition: None,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            separator: sep.map(|s| s.as_bytes().to_vec()),
            headers: vec![("h".into(), Some(Bytes::from_static(b"1")))],
        }
    }

    #[test]
    fn lines_to_records() {
        let t = template(Some("::"), None);
        let r = t.record(b"k::v::w".to_vec()).expect("record");
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.value.as_deref(), Some(&b"v::w"[..]));
        assert_eq!(r.headers.len(), 1);
        let r = t.record(b"::v".to_vec()).expect("record");
        assert_eq!(r.key.as_deref(), Some(&b""[..]));
        assert!(t.record(b"no separator".to_vec()).is_none());
        assert!(t.record(b":".to_vec()).is_none());

        let t = template(None, Some("fixed"));
        let r = t.record(b"a:b".to_vec()).expect("record");
        assert_eq!(r.key.as_deref(), Some(&b"fixed"[..]));
        assert_eq!(r.value.as_deref(), Some(&b"a:b"[..]));
        let r = template(None, None).record(Vec::new()).expect("record");
        assert_eq!(r.key, None);
        assert_eq!(r.value.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn separator_message() {
        let t = template(Some(":"), None);
        assert_eq!(
            missing_separator(3, &t),
            "line 3 has no key separator \":\"; the 2 lines before it were produced, nothing \
             after it was read"
        );
        assert!(missing_separator(2, &t).contains("the 1 line before it was produced"));
    }
}
