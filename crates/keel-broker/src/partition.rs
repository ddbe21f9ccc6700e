//! One partition replica on this broker: its log plus a watch of its end, which long polls and
//! subscriptions wait on.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Once, Weak};

use bytes::Bytes;
use keel_log::{AppendInfo, Clock, Log, LogError, ReadLimit, ReadSlice, SystemClock};
use keel_raft::producers::{ProducerTable, SeqBatch, Verdict};
use keel_raft::{BatchData, KeelLogStore, KeelRaft, PartitionSm};
use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::ClientWriteError;
use openraft::impls::ProgressResponder;
use openraft::raft::ClientWriteResult;
use openraft::type_config::alias::OneshotReceiverOf;
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};

use crate::cluster::quiet::{Activity, Liveness};
use crate::cluster::sm::BrokerRaft;

use crate::error::{BrokerError, Result};
use crate::topic_config::Resolved;

#[derive(Debug)]
pub struct Partition {
    pub topic: Arc<str>,
    pub id: u32,
    log: Arc<Log>,
    /// The high watermark: the end of what is committed. On a single node that is what is
    /// durable under the topic's flush policy: fsynced when `flush.messages` is 1, appended
    /// otherwise (flushing left to the OS or an interval, as in Kafka). A replicated partition
    /// advances it when its Raft group applies a committed batch.
    hwm_tx: watch::Sender<u64>,
    backend: Backend,
    /// Serialises idempotent appends: the sequence check and the append must happen in the
    /// same order for a producer, and what is appended but not committed must be visible to
    /// the next check.
    admission: AsyncMutex<Admission>,
    /// The topic's `producer.id.expiration.ms` (a replicated partition's state machine keeps
    /// its own copy).
    producer_expiry_ms: AtomicI64,
}

/// A batch's idempotent-producer fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idempotent {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_seq: i32,
    pub last_seq: i32,
}

/// A batch this broker submitted as leader and has not seen applied.
#[derive(Debug)]
struct PendingBatch {
    p: Idempotent,
    /// The term it was checked in.
    term: u64,
    /// Set when its write came back refused (openraft's "not the leader"): never appended.
    refused: Arc<AtomicBool>,
}

/// The leader's view of idempotent producers beyond the applied state.
#[derive(Debug, Default)]
struct Admission {
    /// Raft: the term these pending batches were appended in.
    term: u64,
    /// Raft: whether everything earlier terms left in the log is applied (then the applied
    /// state plus `pending` is the whole log).
    caught_up: bool,
    /// Raft: batches this broker appended as leader that are not applied yet, oldest first,
    /// with the term they were checked in.
    pending: Vec<PendingBatch>,
    /// Raft: after a term change, the log end when this leader caught up; once applied past
    /// it, pending batches of earlier terms that are still not applied were never appended.
    old_until: Option<u64>,
    /// Local: the table of a single-node partition, where appending is committing.
    local: ProducerTable,
    last_expiry: Option<std::time::Instant>,
}

/// How often a partition sweeps its expired producers.
const EXPIRY_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);
/// How long an idempotent append waits for a new leader to apply what earlier terms left in
/// its log, or for the duplicate it found in flight to commit.
const ADMISSION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug)]
enum Backend {
    /// A single-node broker's partition: the log alone.
    Local {
        flush_every_batch: AtomicBool,
        /// Wakes this partition's background flusher (one task per partition, started on
        /// first use), which fsyncs and then advances the high watermark; wake-ups coalesce.
        flush_wanted: Arc<Notify>,
        flusher: Once,
    },
    /// A replica of a partition's Raft group, whose log is this log.
    Raft(RaftReplica),
}

/// The Raft side of a replicated partition.
#[derive(Debug, Clone)]
pub struct RaftReplica {
    pub raft: BrokerRaft,
    pub store: KeelLogStore,
    pub sm: PartitionSm,
    pub group: u64,
    pub node_id: u64,
    /// Whether the group is quiet (see `cluster::quiet`), and when it was last written.
    pub activity: Arc<Activity>,
    pub liveness: Arc<Liveness>,
    /// Broker id to the address clients use: the Raft membership holds peer addresses, which
    /// clients may not be able to reach.
    pub clients: ClientAddresses,
}

/// Looks up brokers' client addresses (from the cluster metadata).
#[derive(Clone)]
pub struct ClientAddresses(pub Arc<dyn Fn(u32) -> Option<String> + Send + Sync>);

impl std::fmt::Debug for ClientAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientAddresses")
    }
}

impl RaftReplica {
    /// Waits until this leader has applied its whole log as it is now (bounded), and returns
    /// the term it leads in; `None` if it stopped leading or did not get there in time.
    ///
    /// Everything committed is in a leader's log, so afterwards the state machine has seen
    /// every committed entry. Waiting for an applied entry of the leader's own term is not
    /// enough: a leader restarted without losing its term (openraft restores leadership from
    /// the stored vote) already has such entries applied, while its commit index, restored
    /// from a hint written at most once a second, lags its log until the followers answer.
    pub async fn wait_log_applied(&self) -> Option<u64> {
        let (term, last) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.current_term, m.last_log_index)
        };
        let applied = self
            .raft
            .wait(Some(ADMISSION_WAIT))
            .metrics(
                |m| {
                    m.current_term != term
                        || (m.last_applied.is_some_and(|l| l.leader_id.term == term)
                            && m.last_applied.map(|l| l.index) >= last)
                },
                "the leader's log applied",
            )
            .await;
        match applied {
            Ok(m) if m.current_term == term => Some(term),
            _ => None,
        }
    }

    /// Makes sure the leader holds a fresh quorum acknowledgement before a write: openraft
    /// refuses writes on a leader whose lease expired, which is every leader of a quiet group
    /// (no heartbeats while idle). One heartbeat round renews it; bounded, and a failure is
    /// left to the write itself to report.
    async fn fresh_lease(&self) {
        const FRESH: std::time::Duration = std::time::Duration::from_millis(300);
        let (stale, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (
                m.last_quorum_acked
                    .as_ref()
                    .is_none_or(|t| (**t).elapsed() > FRESH),
                m.membership_config.membership().voter_ids().count(),
            )
        };
        if !stale || voters < 2 {
            return;
        }
        let _ = self.raft.trigger().heartbeat().await;
        let _ = self
            .raft
            .wait(Some(std::time::Duration::from_millis(1500)))
            .metrics(
                |m| {
                    m.last_quorum_acked
                        .as_ref()
                        .is_some_and(|t| (**t).elapsed() <= FRESH)
                },
                "a fresh quorum acknowledgement",
            )
            .await;
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Lets the flusher notice the partition is gone and end.
        if let Backend::Local { flush_wanted, .. } = &self.backend {
            flush_wanted.notify_one();
        }
    }
}

/// A leader whose last quorum acknowledgement is older than this (more than an election
/// timeout) refuses produce and fetch requests as not the leader.
const QUORUM_ACK_TIMEOUT_MS: u64 = 1500;

/// Acknowledgement level of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckLevel {
    None,
    Leader,
    All,
}

/// Where an acknowledged batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub next_offset: u64,
}

/// What the admission of an idempotent batch decided.
enum Admitted {
    Written(Pending),
    /// A duplicate of a batch this leader appended in this term and not yet committed.
    InFlight(u64),
}

/// An append in progress: appended locally, or submitted to the Raft group.
#[derive(Debug)]
pub enum Pending {
    Local(AppendInfo),
    /// With, for an idempotent batch, the flag that tells the leader's admission the write was
    /// refused (so a retry of it is new, not a duplicate in flight).
    Raft(
        OneshotReceiverOf<KeelRaft, ClientWriteResult<KeelRaft>>,
        Option<Arc<AtomicBool>>,
        std::time::Instant,
    ),
    /// A retried idempotent batch that is already written (and as durable as `acks` asks).
    Duplicate(Appended),
}

impl Partition {
    pub fn open(dir: &Path, topic: Arc<str>, id: u32, cfg: &Resolved) -> Result<Self> {
        let log = Log::open(dir, cfg.log_config()).map_err(|e| BrokerError::Storage {
            message: format!("opening {topic}/{id}: {e}"),
            definite: true,
        })?;
        let (hwm_tx, _) = watch::channel(log.log_end_offset());
        Ok(Self {
            hwm_tx,
            backend: Backend::Local {
                flush_every_batch: AtomicBool::new(cfg.flush_every_batch()),
                flush_wanted: Arc::new(Notify::new()),
                flusher: Once::new(),
            },
            admission: AsyncMutex::new(Admission {
                local: producers_from_log(&log, &topic, id, expiry_ms(cfg)),
                ..Admission::default()
            }),
            producer_expiry_ms: AtomicI64::new(expiry_ms(cfg)),
            log: Arc::new(log),
            topic,
            id,
        })
    }

    /// A replicated partition over a running Raft replica; `hwm_tx` is the watch its state
    /// machine advances.
    pub fn replicated(
        topic: Arc<str>,
        id: u32,
        replica: RaftReplica,
        hwm_tx: watch::Sender<u64>,
    ) -> Self {
        Self {
            topic,
            id,
            log: replica.store.log_arc(),
            hwm_tx,
            backend: Backend::Raft(replica),
            admission: AsyncMutex::new(Admission::default()),
            producer_expiry_ms: AtomicI64::new(keel_raft::producers::EXPIRY_MS),
        }
    }

    pub fn raft(&self) -> Option<&RaftReplica> {
        match &self.backend {
            Backend::Raft(r) => Some(r),
            Backend::Local { .. } => None,
        }
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    pub fn high_watermark(&self) -> u64 {
        *self.hwm_tx.borrow()
    }

    pub fn log_start_offset(&self) -> u64 {
        self.log.log_start_offset()
    }

    pub fn watch_hwm(&self) -> watch::Receiver<u64> {
        self.hwm_tx.subscribe()
    }

    pub fn apply_config(&self, cfg: &Resolved) -> Result<()> {
        match &self.backend {
            Backend::Local {
                flush_every_batch, ..
            } => flush_every_batch.store(cfg.flush_every_batch(), Ordering::Release),
            Backend::Raft(r) => {
                r.store.set_sync_appends(cfg.flush_every_batch());
                r.sm.set_producer_expiry_ms(expiry_ms(cfg));
            }
        }
        self.producer_expiry_ms
            .store(expiry_ms(cfg), Ordering::Relaxed);
        let mut log_cfg = cfg.log_config();
        if self.raft().is_some() {
            // The Raft group owns deletion: retention goes through a snapshot and a purge.
            log_cfg.retention_ms = None;
            log_cfg.retention_bytes = None;
        }
        self.log
            .set_config(log_cfg)
            .map_err(|e| BrokerError::Internal(e.to_string()))
    }

    /// The leader this replica knows of (id and address), when it is not itself the leader.
    pub fn leader_hint(&self) -> Option<(u32, String)> {
        let r = self.raft()?;
        let m = r.raft.metrics();
        let m = m.borrow_watched();
        let leader = m.current_leader?;
        let address = (r.clients.0)(leader as u32).or_else(|| {
            m.membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.clone())
        })?;
        Some((leader as u32, address))
    }

    /// Fails with NOT_LEADER unless this replica may serve produce and fetch requests.
    pub fn ensure_leader(&self, fallback: Option<(u32, String)>) -> Result<()> {
        let Some(r) = self.raft() else {
            return Ok(());
        };
        let (leading, stale, voters) = {
            let m = r.raft.metrics();
            let m = m.borrow_watched();
            (
                m.current_leader == Some(r.node_id) && m.state == openraft::ServerState::Leader,
                m.last_quorum_acked.as_ref().is_none_or(|t| {
                    (**t).elapsed() > std::time::Duration::from_millis(QUORUM_ACK_TIMEOUT_MS)
                }),
                m.membership_config
                    .membership()
                    .voter_ids()
                    .map(|v| v as u32)
                    .collect::<Vec<_>>(),
            )
        };
        // A quiet group gets no heartbeat acknowledgements; the brokers' own beats stand in.
        let cut_off = stale && !r.liveness.majority_reachable(r.node_id as u32, &voters);
        if leading && !cut_off {
            return Ok(());
        }
        // A leader that has not heard from a majority for longer than an election takes is
        // most likely cut off, with a new leader elsewhere: send clients away rather than let
        // their writes wait for a commit that cannot happen.
        Err(BrokerError::NotLeader {
            topic: self.topic.to_string(),
            partition: self.id,
            leader: if leading {
                fallback.filter(|(id, _)| u64::from(*id) != r.node_id)
            } else {
                self.leader_hint().or(fallback)
            },
        })
    }

    /// The Raft term this replica is in (0 for a single-node partition).
    pub fn current_term(&self) -> u64 {
        self.raft()
            .map_or(0, |r| r.raft.metrics().borrow_watched().current_term)
    }

    /// On a leader, waits until it has applied an entry of its own term, so that everything
    /// earlier leaders committed is applied here too; returns the term. Readers that rebuild
    /// state from the log (the group coordinator) need this before they answer.
    pub async fn wait_leader_caught_up(&self) -> Result<u64> {
        let Some(r) = self.raft() else {
            return Ok(0);
        };
        r.wait_log_applied()
            .await
            .ok_or_else(|| BrokerError::Unavailable {
                message: format!(
                    "{}/{}: the new leader has not applied its log yet",
                    self.topic, self.id
                ),
                definite: true,
            })
    }

    /// Appends a validated batch and waits for the durability `acks` asks for.
    pub async fn append(
        self: &Arc<Self>,
        batch: Bytes,
        acks: AckLevel,
        index: usize,
    ) -> Result<Appended> {
        let pending = self.append_only(batch, acks, index, None).await?;
        self.complete(pending, acks, index).await
    }

    /// Appends an idempotent producer's batch unless it is already in the log (then answers
    /// with its original offsets) or does not continue the producer's sequence.
    ///
    /// Once the check passed, the append and the bookkeeping that makes a retry recognisable
    /// must both happen: callers must not drop this future midway (the produce handlers run
    /// appends in tasks of their own, which a cancelled request does not stop).
    async fn append_idempotent(
        self: &Arc<Self>,
        batch: Bytes,
        acks: AckLevel,
        index: usize,
        p: Idempotent,
    ) -> Result<Pending> {
        let admitted = match &self.backend {
            Backend::Raft(_) => self.admit_raft(batch, p).await?,
            Backend::Local { .. } => self.admit_local(batch, acks, index, p).await?,
        };
        match admitted {
            Admitted::Written(pending) => Ok(pending),
            Admitted::InFlight(term) => {
                let r = self.raft().ok_or_else(|| {
                    BrokerError::Internal("in-flight duplicate on a local partition".into())
                })?;
                self.await_duplicate(r, p, term).await
            }
        }
    }

    /// A single-node partition: appending is committing, so the table is updated at once.
    async fn admit_local(
        self: &Arc<Self>,
        batch: Bytes,
        acks: AckLevel,
        index: usize,
        p: Idempotent,
    ) -> Result<Admitted> {
        let mut adm = self.admission.lock().await;
        let now = std::time::Instant::now();
        if adm
            .last_expiry
            .is_none_or(|t| now.duration_since(t) > EXPIRY_SWEEP)
        {
            adm.last_expiry = Some(now);
            let expiry = self.producer_expiry_ms.load(Ordering::Relaxed);
            adm.local.expire(SystemClock.now_ms(), expiry);
        }
        match adm
            .local
            .check(p.producer_id, p.epoch, p.first_seq, p.last_seq)
        {
            Verdict::Append => {
                let pending = self.append_plain(batch, acks, index).await?;
                if let Pending::Local(info) = &pending {
                    adm.local.record(
                        p.producer_id,
                        p.epoch,
                        SeqBatch {
                            first_seq: p.first_seq,
                            last_seq: p.last_seq,
                            base_offset: info.base_offset,
                            next_offset: info.next_offset,
                        },
                        SystemClock.now_ms(),
                    );
                }
                Ok(Admitted::Written(pending))
            }
            Verdict::Duplicate(b) => {
                drop(adm);
                if acks == AckLevel::All && self.flushes_every_batch() {
                    // The first copy may be appended but not fsynced yet.
                    let log = Arc::clone(&self.log);
                    tokio::task::spawn_blocking(move || log.flush())
                        .await
                        .map_err(|e| BrokerError::Internal(e.to_string()))?
                        .map_err(|e| BrokerError::from_log(e, index))?;
                    self.advance_hwm(b.next_offset);
                }
                Ok(Admitted::Written(Pending::Duplicate(Appended {
                    base_offset: b.base_offset,
                    next_offset: b.next_offset,
                })))
            }
            v => Err(self.refusal(p, v)),
        }
    }

    fn flushes_every_batch(&self) -> bool {
        matches!(&self.backend, Backend::Local { flush_every_batch, .. } if flush_every_batch.load(Ordering::Acquire))
    }

    /// A replicated partition's leader: the applied producer state plus what this leader
    /// appended and is not applied yet.
    async fn admit_raft(self: &Arc<Self>, batch: Bytes, p: Idempotent) -> Result<Admitted> {
        let r = self
            .raft()
            .ok_or_else(|| BrokerError::Internal("not a replicated partition".into()))?;
        let mut adm = self.admission.lock().await;
        r.activity.wrote();
        if r.activity.set_ticking(true) {
            r.raft.runtime_config().tick(true);
        }
        // Before reading the term: renewing the lease may take a heartbeat round, during
        // which leadership can move.
        r.fresh_lease().await;
        let term = r.raft.metrics().borrow_watched().current_term;
        if adm.term != term {
            adm.term = term;
            adm.caught_up = false;
        }
        if !adm.caught_up {
            // A new leader's log may end in batches of earlier terms that commit only with its
            // first entry, or (a leader restarted in its term) in batches it appended before
            // the restart: until those are applied, a retry of one would look new.
            match r.wait_log_applied().await {
                Some(t) if t == term => {
                    adm.caught_up = true;
                    // Batches this broker appended in earlier terms are in the log below this
                    // index if they are anywhere; once it is applied, the ones not applied
                    // were never appended.
                    adm.old_until = Some(r.store.log().next_raft_index());
                }
                _ => {
                    return Err(BrokerError::Unavailable {
                        message: format!(
                            "{}/{}: the new leader has not applied its log yet",
                            self.topic, self.id
                        ),
                        definite: true,
                    });
                }
            }
        }
        let sm = &r.sm;
        let applied_next = sm.last_applied().map_or(0, |l| l.index + 1);
        let old_done = adm.old_until.is_some_and(|u| applied_next >= u);
        if old_done {
            adm.old_until = None;
        }
        let verdict = sm.with_producers(|table| {
            adm.pending.retain(|b| {
                let applied = table.covers(b.p.producer_id, b.p.epoch, b.p.last_seq);
                // Not by age: an appended batch can take arbitrarily long to commit and apply,
                // and dropping it early would let a retry append a second copy.
                let never_appended =
                    (old_done && b.term != term) || b.refused.load(Ordering::Acquire);
                !(applied || never_appended)
            });
            let mine: Vec<(i16, i32, i32)> = adm
                .pending
                .iter()
                .filter(|b| b.p.producer_id == p.producer_id)
                .map(|b| (b.p.epoch, b.p.first_seq, b.p.last_seq))
                .collect();
            table.check_with_pending(p.producer_id, p.epoch, p.first_seq, p.last_seq, &mine)
        });
        match verdict {
            Verdict::Append => {
                let (responder, rx) = ProgressResponder::complete_only();
                r.raft
                    .client_write_ff(BatchData::new(batch), Some(responder))
                    .await
                    .map_err(|e| BrokerError::Unavailable {
                        message: format!("{}/{}: raft group stopped: {e}", self.topic, self.id),
                        definite: true,
                    })?;
                let refused = Arc::new(AtomicBool::new(false));
                adm.pending.push(PendingBatch {
                    p,
                    term,
                    refused: Arc::clone(&refused),
                });
                if r.raft.metrics().borrow_watched().current_term != term {
                    // Leadership moved while submitting: where the batch went is unknown, so
                    // the next check waits for this leader's log to be applied again.
                    adm.caught_up = false;
                    adm.term = 0;
                }
                Ok(Admitted::Written(Pending::Raft(
                    rx,
                    Some(refused),
                    std::time::Instant::now(),
                )))
            }
            Verdict::Duplicate(b) if !b.is_pending() => {
                Ok(Admitted::Written(Pending::Duplicate(Appended {
                    base_offset: b.base_offset,
                    next_offset: b.next_offset,
                })))
            }
            Verdict::Duplicate(_) => Ok(Admitted::InFlight(term)),
            v => Err(self.refusal(p, v)),
        }
    }

    /// Waits until a duplicate of a batch this leader appended commits, for its offsets.
    async fn await_duplicate(&self, r: &RaftReplica, p: Idempotent, term: u64) -> Result<Pending> {
        let mut hwm = r.sm.subscribe_high_watermark();
        let deadline = tokio::time::Instant::now() + ADMISSION_WAIT;
        loop {
            if let Verdict::Duplicate(b) =
                r.sm.with_producers(|t| t.check(p.producer_id, p.epoch, p.first_seq, p.last_seq))
            {
                return Ok(Pending::Duplicate(Appended {
                    base_offset: b.base_offset,
                    next_offset: b.next_offset,
                }));
            }
            let not_yet = |why: &str| BrokerError::Unavailable {
                message: format!(
                    "{}/{}: the first copy of this batch is not committed yet ({why}); retry it",
                    self.topic, self.id
                ),
                definite: false,
            };
            if r.raft.metrics().borrow_watched().current_term != term {
                return Err(not_yet("leadership changed"));
            }
            match tokio::time::timeout_at(deadline, hwm.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(not_yet("timed out waiting")),
            }
        }
    }

    fn refusal(&self, p: Idempotent, v: Verdict) -> BrokerError {
        match v {
            Verdict::Fenced { current } => BrokerError::ProducerFenced {
                producer_id: p.producer_id,
                epoch: p.epoch,
                current,
            },
            Verdict::OutOfOrder { expected, got } => BrokerError::OutOfOrderSequence {
                topic: self.topic.to_string(),
                partition: self.id,
                producer_id: p.producer_id,
                expected,
                got,
            },
            other => BrokerError::Internal(format!("unexpected producer verdict {other:?}")),
        }
    }

    /// Appends a validated batch (a replicated partition: submits it to its Raft group, in
    /// call order). A local partition's batch becomes visible to consumers once committed: at
    /// once when the topic leaves flushing to the OS, after the fsync otherwise (started here
    /// in the background, so acks=leader producers are not slowed and their records still
    /// show up).
    pub async fn append_only(
        self: &Arc<Self>,
        batch: Bytes,
        acks: AckLevel,
        index: usize,
        producer: Option<Idempotent>,
    ) -> Result<Pending> {
        match producer {
            Some(p) => self.append_idempotent(batch, acks, index, p).await,
            None => self.append_plain(batch, acks, index).await,
        }
    }

    async fn append_plain(
        self: &Arc<Self>,
        batch: Bytes,
        acks: AckLevel,
        index: usize,
    ) -> Result<Pending> {
        let flush_every_batch = match &self.backend {
            Backend::Raft(r) => {
                r.activity.wrote();
                if r.activity.set_ticking(true) {
                    r.raft.runtime_config().tick(true);
                }
                r.fresh_lease().await;
                let (responder, rx) = ProgressResponder::complete_only();
                r.raft
                    .client_write_ff(BatchData::new(batch), Some(responder))
                    .await
                    .map_err(|e| BrokerError::Unavailable {
                        message: format!("{}/{}: raft group stopped: {e}", self.topic, self.id),
                        definite: true,
                    })?;
                return Ok(Pending::Raft(rx, None, std::time::Instant::now()));
            }
            Backend::Local {
                flush_every_batch, ..
            } => flush_every_batch.load(Ordering::Acquire),
        };
        let log = Arc::clone(&self.log);
        let info = tokio::task::spawn_blocking(move || log.append(&batch, 0))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))?
            .map_err(|e| BrokerError::from_log(e, index))?;
        if flush_every_batch {
            // acks=all waits for its own fsync (`complete`), which advances the high
            // watermark; only the others need the background flusher.
            if acks != AckLevel::All {
                self.request_flush();
            }
        } else {
            self.advance_hwm(info.next_offset);
        }
        Ok(Pending::Local(info))
    }

    /// Asks the background flusher to fsync what was appended and advance the high watermark
    /// (also used when an acks=all wait was abandoned, so its records still become visible).
    pub fn request_flush(self: &Arc<Self>) {
        if let Backend::Local {
            flush_wanted,
            flusher,
            ..
        } = &self.backend
        {
            flusher.call_once(|| {
                tokio::spawn(flusher_task(Arc::downgrade(self), Arc::clone(flush_wanted)));
            });
            flush_wanted.notify_one();
        }
    }

    fn advance_hwm(&self, to: u64) {
        self.hwm_tx.send_if_modified(|h| {
            let grew = to > *h;
            *h = (*h).max(to);
            grew
        });
    }

    /// fsyncs up to `info` (shared with concurrent callers: group commit in the log) and
    /// advances the high watermark.
    async fn flush(&self, info: &AppendInfo, index: usize) -> Result<()> {
        let log = Arc::clone(&self.log);
        let seq = info.flush_seq;
        tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let r = log.flush_to(seq);
            metrics::histogram!("keel_log_flush_seconds").record(t.elapsed().as_secs_f64());
            r
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
        .map_err(|e| BrokerError::from_log(e, index))?;
        self.advance_hwm(info.next_offset);
        Ok(())
    }

    /// Waits for the durability `acks` asks for: a local partition with acks=all on a topic
    /// that fsyncs every batch waits for the fsync; a replicated one waits for the Raft commit
    /// whatever `acks` says (the offsets are only known then).
    pub async fn complete(
        &self,
        pending: Pending,
        acks: AckLevel,
        index: usize,
    ) -> Result<Appended> {
        match pending {
            Pending::Duplicate(a) => Ok(a),
            Pending::Local(info) => {
                let fsync = matches!(&self.backend, Backend::Local { flush_every_batch, .. } if flush_every_batch.load(Ordering::Acquire));
                if acks == AckLevel::All && fsync {
                    self.flush(&info, index).await?;
                }
                Ok(Appended {
                    base_offset: info.base_offset,
                    next_offset: info.next_offset,
                })
            }
            Pending::Raft(rx, refused, submitted) => match rx.await {
                Ok(Ok(resp)) => {
                    // Submission to applied: replication, the majority's fsyncs, the apply.
                    metrics::histogram!("keel_raft_commit_seconds")
                        .record(submitted.elapsed().as_secs_f64());
                    Ok(Appended {
                        base_offset: resp.data.base_offset,
                        next_offset: resp.data.next_offset,
                    })
                }
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                    if let Some(r) = &refused {
                        r.store(true, Ordering::Release);
                    }
                    Err(BrokerError::NotLeader {
                        topic: self.topic.to_string(),
                        partition: self.id,
                        leader: f
                            .leader_id
                            .zip(f.leader_node.map(|n| n.addr))
                            .map(|(id, a)| (id as u32, a)),
                    })
                }
                // Discarded entries (a truncation or a purge over a pending write) cannot be
                // told apart here, and a purged one may have committed: not definite.
                Ok(Err(e)) => Err(BrokerError::Unavailable {
                    message: format!("{}/{}: {e}", self.topic, self.id),
                    definite: false,
                }),
                // The leader stepped down after appending: the batch may still commit.
                Err(_) => Err(BrokerError::Unavailable {
                    message: format!(
                        "{}/{}: leadership changed before the batch was committed; it may or may not be",
                        self.topic, self.id
                    ),
                    definite: false,
                }),
            },
        }
    }

    /// Checks that `offset` can be read: between the log start and the high watermark.
    ///
    /// A replica also accepts offsets up to its log end: after a leader change, the new leader
    /// may not yet have applied everything the old one had committed, and a consumer at the
    /// old high watermark must wait rather than be told its offset is invalid.
    pub fn check_offset(&self, offset: u64) -> Result<u64> {
        let (start, hwm) = (self.log_start_offset(), self.high_watermark());
        let end = if self.raft().is_some() {
            hwm.max(self.log.log_end_offset())
        } else {
            hwm
        };
        if offset < start || offset > end {
            return Err(self.out_of_range(offset));
        }
        Ok(hwm)
    }

    pub fn out_of_range(&self, offset: u64) -> BrokerError {
        BrokerError::OffsetOutOfRange {
            topic: self.topic.to_string(),
            partition: self.id,
            offset,
            log_start: self.log_start_offset(),
            high_watermark: self.high_watermark(),
        }
    }

    /// Reads committed batches from `offset`. Runs on the caller's thread: reads are served
    /// from the mapping and do not block on IO except for page faults of cold data.
    pub fn read(&self, offset: u64, max_bytes: u64) -> Result<ReadSlice> {
        let hwm = self.check_offset(offset)?;
        if offset >= hwm {
            return Ok(ReadSlice {
                bytes: Bytes::new(),
                last: None,
            });
        }
        self.log
            .read_with(
                offset,
                max_bytes,
                ReadLimit {
                    max_offset: Some(hwm),
                    max_raft_index: None,
                },
            )
            .map(|slice| {
                // Control batches alone take no offsets; returning them would let a long poll
                // answer at once without progress, over and over.
                if slice.last.is_some_and(|h| h.next_offset() > offset) {
                    slice
                } else {
                    ReadSlice {
                        bytes: Bytes::new(),
                        last: None,
                    }
                }
            })
            .map_err(|e| match e {
                LogError::OffsetOutOfRange { offset, .. } => self.out_of_range(offset),
                other => BrokerError::Storage {
                    message: format!("reading {}/{}: {other}", self.topic, self.id),
                    definite: true,
                },
            })
    }

    /// Finds the first offset with a timestamp at or after `ts` (`None`: none is).
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(u64, i64)>> {
        let hwm = self.high_watermark();
        self.log
            .offset_for_timestamp(ts)
            .map(|found| found.filter(|(o, _)| *o < hwm))
            .map_err(|e| BrokerError::Storage {
                message: e.to_string(),
                definite: true,
            })
    }
}

fn expiry_ms(cfg: &Resolved) -> i64 {
    i64::try_from(cfg.producer_expiration_ms).unwrap_or(i64::MAX)
}

/// How many of a single-node partition's last batches are read at start-up to rebuild its
/// producer table. A producer whose last batch is further back is forgotten, which is safe:
/// its next batch does not start at 0, is refused, and the client starts a new epoch.
const PRODUCER_SCAN_BATCHES: u64 = 65_536;

/// A single-node partition's producer table, rebuilt from the headers of its last batches
/// (appending is committing there).
fn producers_from_log(log: &Log, topic: &str, partition: u32, expiry_ms: i64) -> ProducerTable {
    let mut table = ProducerTable::new();
    let next = log.next_raft_index();
    let first = log
        .first_raft_index()
        .max(next.saturating_sub(PRODUCER_SCAN_BATCHES));
    for i in first..next {
        match log.entry_header(i) {
            Ok(h) if h.producer_id >= 0 && !h.attributes.control => table.record(
                h.producer_id,
                h.producer_epoch,
                SeqBatch {
                    first_seq: h.base_sequence,
                    last_seq: keel_raft::producers::last_sequence(h.base_sequence, h.record_count),
                    base_offset: h.base_offset,
                    next_offset: h.next_offset(),
                },
                // Seen now: expiry runs on the broker's clock (see PartitionSm).
                SystemClock.now_ms(),
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%topic, partition, index = i, error = %e, "cannot read a batch header while rebuilding producer state");
            }
        }
    }
    table.expire(SystemClock.now_ms(), expiry_ms);
    table
}

/// The background flusher of one partition: after each wake-up, fsyncs everything appended so
/// far and advances the high watermark to the end observed before the fsync.
async fn flusher_task(partition: Weak<Partition>, wanted: Arc<Notify>) {
    loop {
        wanted.notified().await;
        let Some(p) = partition.upgrade() else {
            return;
        };
        let end = p.log.log_end_offset();
        let log = Arc::clone(&p.log);
        match tokio::task::spawn_blocking(move || log.flush()).await {
            Ok(Ok(())) => p.advance_hwm(end),
            Ok(Err(e)) => {
                tracing::error!(topic = %p.topic, partition = p.id, error = %e, "background flush failed");
            }
            Err(e) => tracing::error!(error = %e, "background flush task failed"),
        }
    }
}
