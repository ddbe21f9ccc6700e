//! The run's load and its record: the producers, the group's members and the event history
//! they write as it happens.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::{
    Client, ClientError, GroupConfig, OffsetReset, ProducerConfig, ProducerRecord,
    RebalanceListener,
};
use keel_tests::faults::{CommitOutcome, MemberEvent, Outcome};

use crate::{GROUP, PARTITIONS, TOPIC};

/// Every send, acknowledgement, error, poll, commit and fault of the run, one line each with
/// the milliseconds since the start, written as it happens (to `KEEL_FAULT_HISTORY`, else into
/// the run's directory, and kept next to the broker logs when the run fails).
#[derive(Clone)]
pub(crate) struct Events {
    started: Instant,
    out: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
}

impl Events {
    pub(crate) fn create(path: &std::path::Path, started: Instant) -> Self {
        let file = std::fs::File::create(path).expect("history file");
        Self {
            started,
            out: Arc::new(Mutex::new(std::io::BufWriter::new(file))),
        }
    }

    pub(crate) fn log(&self, what: std::fmt::Arguments<'_>) {
        use std::io::Write as _;
        let ms = self.started.elapsed().as_millis();
        let mut out = self.out.lock().expect("lock");
        let _ = writeln!(out, "{ms} {what}");
    }

    pub(crate) fn flush(&self) {
        use std::io::Write as _;
        let _ = self.out.lock().expect("lock").flush();
    }

    /// Microseconds since the start: the clock of the history's member events.
    pub(crate) fn us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
}

/// What the producers wrote: each value's outcome, and the key of each keyed one.
#[derive(Default)]
pub(crate) struct Writes {
    pub(crate) outcomes: Mutex<BTreeMap<String, Outcome>>,
    pub(crate) keys: Mutex<BTreeMap<String, String>>,
}

/// One producer's loop: unique values, some keyed, some to fixed partitions.
pub(crate) async fn produce(
    client: Client,
    name: &'static str,
    keyed: bool,
    stop: Arc<AtomicBool>,
    writes: Arc<Writes>,
    acked_at: Arc<Mutex<Vec<Instant>>>,
    events: Events,
) {
    let producer = client
        .producer(ProducerConfig::default().delivery_timeout(Duration::from_secs(60)))
        .expect("producer");
    let mut seq = 0u64;
    let mut pending = Vec::new();
    let settle = |value: String, r: Result<keel_client::RecordMetadata, ClientError>| {
        let outcome = match r {
            Ok(m) => {
                acked_at.lock().expect("lock").push(Instant::now());
                let offset = m.offset.expect("acks=all gives offsets");
                events.log(format_args!("ack {value} {}@{offset}", m.partition));
                Outcome::Acked {
                    partition: m.partition,
                    offset,
                }
            }
            Err(e) if e.is_definite() => {
                events.log(format_args!("refused {value}: {e}"));
                Outcome::Refused
            }
            Err(e) => {
                events.log(format_args!("unknown {value}: {e}"));
                Outcome::Unknown
            }
        };
        writes.outcomes.lock().expect("lock").insert(value, outcome);
    };
    while !stop.load(Ordering::Relaxed) {
        let value = format!("{name}-{seq:08}");
        let mut record = ProducerRecord::new(TOPIC, value.clone());
        record = if keyed {
            let key = format!("k{}", seq % 16);
            writes
                .keys
                .lock()
                .expect("lock")
                .insert(value.clone(), key.clone());
            record.key(key)
        } else {
            record.partition((seq % u64::from(PARTITIONS)) as u32)
        };
        events.log(format_args!("send {value}"));
        match producer.send(record).await {
            Ok(ack) => pending.push((value, ack)),
            Err(e) => settle(value, Err(e)),
        }
        seq += 1;
        if pending.len() >= 64 {
            for (value, ack) in pending.drain(..) {
                settle(value, ack.await);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for (value, ack) in pending {
        settle(value, ack.await);
    }
    let _ = producer.close().await;
}

/// Records a member's assignment changes as they happen.
pub(crate) struct Recorder {
    name: &'static str,
    history: Arc<Mutex<Vec<MemberEvent>>>,
    events: Events,
}

impl Recorder {
    fn note(&self, parts: &[(String, u32)], what: &str) {
        let mut h = self.history.lock().expect("lock");
        for (_, p) in parts.iter().filter(|(t, _)| t == TOPIC) {
            let at = self.events.us();
            self.events
                .log(format_args!("{} {what} partition {p}", self.name));
            h.push(if what == "assigned" {
                MemberEvent::Assigned { at, partition: *p }
            } else {
                MemberEvent::Released { at, partition: *p }
            });
        }
    }
}

impl RebalanceListener for Recorder {
    fn on_assigned(&mut self, partitions: &[(String, u32)]) {
        self.note(partitions, "assigned");
    }

    fn on_revoked(&mut self, partitions: &[(String, u32)]) {
        self.note(partitions, "revoked");
    }

    fn on_lost(&mut self, partitions: &[(String, u32)]) {
        self.note(partitions, "lost");
    }
}

/// One member of the test's group: joins after `join_after`, polls, and commits its positions
/// after every poll (no auto-commit). With `leave_every`, it leaves the group that often and
/// joins again two seconds later, so partitions are handed over between the members
/// throughout the run. Everything it does goes to `history`.
pub(crate) async fn member(
    client: Client,
    name: &'static str,
    join_after: Duration,
    leave_every: Option<Duration>,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<MemberEvent>>>,
    events: Events,
) {
    tokio::time::sleep(join_after).await;
    while !stop.load(Ordering::Relaxed) {
        let mut consumer = client
            .group_consumer(
                GroupConfig::new(GROUP)
                    .subscribe([TOPIC])
                    .auto_commit(false)
                    .auto_offset_reset(OffsetReset::Earliest)
                    .session_timeout(Duration::from_secs(6)),
            )
            .expect("group consumer");
        consumer.set_rebalance_listener(Box::new(Recorder {
            name,
            history: Arc::clone(&history),
            events: events.clone(),
        }));
        events.log(format_args!("{name} joins"));
        let joined = Instant::now();
        while !stop.load(Ordering::Relaxed) && leave_every.is_none_or(|d| joined.elapsed() < d) {
            let started = events.us();
            match consumer.poll(Duration::from_millis(200)).await {
                Ok(records) if !records.is_empty() => {
                    let returned = events.us();
                    let records: Vec<(u32, u64, String)> = records
                        .into_iter()
                        .map(|r| {
                            let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                                .into_owned();
                            events
                                .log(format_args!("poll {name} {}@{} {v}", r.partition, r.offset));
                            (r.partition, r.offset, v)
                        })
                        .collect();
                    history.lock().expect("lock").push(MemberEvent::Polled {
                        started,
                        returned,
                        records,
                    });
                }
                Ok(_) => {}
                Err(e) => events.log(format_args!("{name} poll failed: {e}")),
            }
            // The positions `commit_sync` commits: those of every partition held.
            let offsets: Vec<(u32, u64)> = consumer
                .assignment()
                .iter()
                .filter(|(t, _)| t == TOPIC)
                .filter_map(|(t, p)| Some((*p, consumer.position(t, *p)?)))
                .collect();
            let sent = events.us();
            let result = consumer.commit_sync().await;
            let done = events.us();
            let outcome = match &result {
                Ok(()) => CommitOutcome::Ok,
                Err(e) if e.is_definite() => CommitOutcome::Refused,
                Err(_) => CommitOutcome::Unknown,
            };
            match &result {
                Ok(()) => events.log(format_args!("{name} commit ok {offsets:?}")),
                Err(e) => events.log(format_args!("{name} commit {offsets:?} failed: {e}")),
            }
            if !offsets.is_empty() {
                history.lock().expect("lock").push(MemberEvent::Committed {
                    sent,
                    done,
                    offsets,
                    outcome,
                });
            }
        }
        if let Err(e) = consumer.close().await {
            events.log(format_args!("{name} close failed: {e}"));
        }
        events.log(format_args!("{name} left"));
        if !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}
