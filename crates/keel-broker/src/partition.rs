//! One partition replica on this broker: a member of the partition's Raft group (a group of
//! one voter on a broker started alone), its log, and a watch of its high watermark, which long
//! polls and subscriptions wait on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use keel_batch::VerifiedBatch;
use keel_log::{Log, LogError, ReadLimit, ReadSlice};
use keel_raft::producers::Verdict;
use keel_raft::{BatchData, KeelLogStore, PartitionSm, Replica, ReplicaError, Submitted};
use tokio::sync::{Mutex as AsyncMutex, watch};

use crate::cluster::quiet::{Activity, Liveness};

use crate::error::{BrokerError, Result};
use crate::topic_config::Resolved;

#[derive(Debug)]
pub struct Partition {
    pub topic: Arc<str>,
    pub id: u32,
    log: Arc<Log>,
    /// The high watermark: the end of what is committed, advanced by the state machine as
    /// the Raft group applies committed batches.
    hwm_tx: watch::Sender<u64>,
    replica: RaftReplica,
    /// Serialises idempotent appends: the sequence check and the append must happen in the
    /// same order for a producer, and what is appended but not committed must be visible to
    /// the next check.
    admission: AsyncMutex<Admission>,
    /// How many voters are in sync, as the leader pass last found on this replica as leader
    /// (`u32::MAX`: not known, e.g. not leading).
    in_sync: AtomicU32,
    /// The term in which this replica, as leader, last applied its whole log (0: never):
    /// until then its high watermark can lag what earlier leaders (or it, before a restart)
    /// acknowledged, and reads would see the end of the log move backwards.
    read_ready_term: AtomicU64,
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
    /// Set when its write came back refused ("not the leader" from the Raft core): never appended.
    refused: Arc<AtomicBool>,
}

/// The leader's view of idempotent producers beyond the applied state.
#[derive(Debug, Default)]
struct Admission {
    /// The term these pending batches were appended in.
    term: u64,
    /// Whether everything earlier terms left in the log is applied (then the applied state
    /// plus `pending` is the whole log).
    caught_up: bool,
    /// Batches this broker appended as leader that are not applied yet, oldest first, with
    /// the term they were checked in.
    pending: Vec<PendingBatch>,
    /// After a term change, the log end when this leader caught up; once applied past it,
    /// pending batches of earlier terms that are still not applied were never appended.
    old_until: Option<u64>,
}
/// How long an idempotent append waits for a new leader to apply what earlier terms left in
/// its log, or for the duplicate it found in flight to commit.
const ADMISSION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A partition's member of its Raft group.
#[derive(Debug, Clone)]
pub struct RaftReplica {
    pub raft: Replica,
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
    /// enough: a leader restarted without losing its term (the Raft core restores leadership from
    /// the stored vote) already has such entries applied, while its commit index, restored
    /// from a hint written at most once a second, lags its log until the followers answer.
    pub async fn wait_log_applied(&self) -> Option<u64> {
        let now = self.raft.status();
        let (term, last) = (now.term, now.last_log_index);
        let applied = self
            .raft
            .wait_for(ADMISSION_WAIT, "the leader's log applied", move |s| {
                s.term != term
                    || (s.last_applied.is_some_and(|l| l.term == term)
                        && s.last_applied.map(|l| l.index) >= last)
            })
            .await;
        match applied {
            Ok(s) if s.term == term => Some(term),
            _ => None,
        }
    }

    /// Readies this leader's group for a write, a batch or a membership change: records the
    /// write (a quiet group wakes, and stays awake for `QUIET_AFTER`), runs its ticker and
    /// renews its lease. A membership change is a log entry like any other, refused by the
    /// Raft core on a leader whose lease expired: without this, a replaced broker was never
    /// taken out of the groups that were asleep when it was wiped (docs/testing.md, seed 6),
    /// and a decommission's moves of idle `__consumer_offsets` partitions failed for good.
    pub async fn ready_to_write(&self) {
        self.wake();
        self.fresh_lease().await;
    }

    /// Counts as activity: a quiet group wakes up (its ticker runs again, and its followers
    /// wake once this broker's beats stop declaring it quiet).
    pub fn wake(&self) {
        self.activity.wrote();
        if self.activity.set_ticking(true) {
            self.raft.set_ticking(true);
        }
    }

    /// Makes sure the leader holds a fresh quorum acknowledgement before a write: the Raft core
    /// refuses writes on a leader whose lease expired, which is every leader of a quiet group
    /// (no heartbeats while idle). One heartbeat round renews it; bounded, and a failure is
    /// left to the write itself to report.
    async fn fresh_lease(&self) {
        const FRESH: std::time::Duration = std::time::Duration::from_millis(300);
        let (_, acked, voters) = self.raft.lease();
        if acked.is_some_and(|age| age <= FRESH) || voters.len() < 2 {
            return;
        }
        self.raft.heartbeat().await;
        let _ = self
            .raft
            .wait_for(
                std::time::Duration::from_millis(1500),
                "a fresh quorum acknowledgement",
                |s| s.quorum_acked.is_some_and(|age| age <= FRESH),
            )
            .await;
    }
}

/// A leader whose last quorum acknowledgement is older than this (more than an election
/// timeout) refuses produce and fetch requests as not the leader.
const QUORUM_ACK_TIMEOUT_MS: u64 = 1500;

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

/// An append in progress: submitted to the Raft group, or found already written.
#[derive(Debug)]
pub enum Pending {
    /// With, for an idempotent batch, the flag that tells the leader's admission the write was
    /// refused (so a retry of it is new, not a duplicate in flight).
    Raft(Submitted, Option<Arc<AtomicBool>>, std::time::Instant),
    /// A retried idempotent batch that is already written (and as durable as `acks` asks).
    Duplicate(Appended),
}

impl Partition {
    /// A partition over a running Raft replica; `hwm_tx` is the watch its state machine
    /// advances.
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
            replica,
            admission: AsyncMutex::new(Admission::default()),
            in_sync: AtomicU32::new(u32::MAX),
            read_ready_term: AtomicU64::new(0),
        }
    }

    /// Records how many voters the leader pass found in sync (`None`: not leading).
    pub fn set_in_sync(&self, count: Option<usize>) {
        let n = count.map_or(u32::MAX, |c| u32::try_from(c).unwrap_or(u32::MAX));
        self.in_sync.store(n, Ordering::Release);
    }

    /// Refuses an `acks=all` write while fewer than `required` replicas are in sync
    /// (`min.insync.replicas`). Until the first leader pass after gaining leadership the count
    /// is not known and nothing is refused: the Raft majority still guards the commit.
    pub fn check_min_insync(&self, required: u32) -> Result<()> {
        let in_sync = self.in_sync.load(Ordering::Acquire);
        if in_sync >= required {
            return Ok(());
        }
        Err(BrokerError::NotEnoughReplicas {
            topic: self.topic.to_string(),
            partition: self.id,
            in_sync,
            required,
        })
    }

    pub fn raft(&self) -> &RaftReplica {
        &self.replica
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
        let r = &self.replica;
        r.store.set_sync_appends(cfg.flush_every_batch());
        r.sm.set_producer_expiry_ms(expiry_ms(cfg));
        let mut log_cfg = cfg.log_config();
        // The Raft group owns deletion: retention goes through a snapshot and a purge.
        log_cfg.retention_ms = None;
        log_cfg.retention_bytes = None;
        self.log
            .set_config(log_cfg)
            .map_err(|e| BrokerError::Internal(e.to_string()))
    }

    /// The leader this replica knows of (id and address), when it is not itself the leader.
    pub fn leader_hint(&self) -> Option<(u32, String)> {
        let r = &self.replica;
        let (leader, peer) = r.raft.leader()?;
        let address = (r.clients.0)(leader as u32).or(peer)?;
        Some((leader as u32, address))
    }

    /// Fails with NOT_LEADER unless this replica may serve produce and fetch requests.
    pub fn ensure_leader(&self, fallback: Option<(u32, String)>) -> Result<()> {
        let r = &self.replica;
        let (leading, acked, voters) = r.raft.lease();
        let stale =
            acked.is_none_or(|age| age > std::time::Duration::from_millis(QUORUM_ACK_TIMEOUT_MS));
        let voters: Vec<u32> = voters.into_iter().map(|v| v as u32).collect();
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

    /// The Raft term this replica is in.
    pub fn current_term(&self) -> u64 {
        self.replica.raft.term()
    }

    /// Waits (bounded) until this leader's high watermark covers everything acknowledged
    /// before it took over, then lets reads through; once per term, after that a load and a
    /// compare. Without it a broker restarted with its term (a sole voter) or a new leader
    /// answered fetches and offset lookups with the commit hint it recovered, up to a second
    /// behind: a consumer saw acknowledged records missing and the end of the log move back,
    /// and an offset it had already read could be refused as out of range.
    pub async fn ready_to_read(&self) -> Result<()> {
        let term = self.current_term();
        if term != 0 && self.read_ready_term.load(Ordering::Acquire) == term {
            return Ok(());
        }
        let term = self.wait_leader_caught_up().await?;
        self.read_ready_term.store(term, Ordering::Release);
        Ok(())
    }

    /// On a leader, waits until it has applied an entry of its own term, so that everything
    /// earlier leaders committed is applied here too; returns the term. Readers that rebuild
    /// state from the log (the group coordinator) need this before they answer.
    pub async fn wait_leader_caught_up(&self) -> Result<u64> {
        self.replica
            .wait_log_applied()
            .await
            .ok_or_else(|| BrokerError::Unavailable {
                message: format!(
                    "{}/{}: the new leader has not applied its log yet",
                    self.topic, self.id
                ),
                definite: true,
            })
    }

    /// Appends a validated batch and waits until it is committed.
    pub async fn append(self: &Arc<Self>, batch: VerifiedBatch) -> Result<Appended> {
        let pending = self.append_only(batch, None).await?;
        self.complete(pending).await
    }

    /// Appends an idempotent producer's batch unless it is already in the log (then answers
    /// with its original offsets) or does not continue the producer's sequence.
    ///
    /// Once the check passed, the append and the bookkeeping that makes a retry recognisable
    /// must both happen: callers must not drop this future midway (the produce handlers run
    /// appends in tasks of their own, which a cancelled request does not stop).
    async fn append_idempotent(
        self: &Arc<Self>,
        batch: VerifiedBatch,
        p: Idempotent,
    ) -> Result<Pending> {
        match self.admit(batch, p).await? {
            Admitted::Written(pending) => Ok(pending),
            Admitted::InFlight(term) => self.await_duplicate(&self.replica, p, term).await,
        }
    }

    /// The leader's admission of an idempotent batch: the applied producer state plus what
    /// this leader appended and is not applied yet.
    async fn admit(self: &Arc<Self>, batch: VerifiedBatch, p: Idempotent) -> Result<Admitted> {
        let r = &self.replica;
        let mut adm = self.admission.lock().await;
        // Before reading the term: renewing the lease may take a heartbeat round, during
        // which leadership can move.
        r.ready_to_write().await;
        let term = r.raft.term();
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
                let submitted = self.submit(r, batch).await?;
                let refused = Arc::new(AtomicBool::new(false));
                adm.pending.push(PendingBatch {
                    p,
                    term,
                    refused: Arc::clone(&refused),
                });
                if r.raft.term() != term {
                    // Leadership moved while submitting: where the batch went is unknown, so
                    // the next check waits for this leader's log to be applied again.
                    adm.caught_up = false;
                    adm.term = 0;
                }
                Ok(Admitted::Written(Pending::Raft(
                    submitted,
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
            if r.raft.term() != term {
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

    /// Submits a validated batch to the partition's Raft group (in call order); an idempotent
    /// producer's batch is admitted first.
    pub async fn append_only(
        self: &Arc<Self>,
        batch: VerifiedBatch,
        producer: Option<Idempotent>,
    ) -> Result<Pending> {
        match producer {
            Some(p) => self.append_idempotent(batch, p).await,
            None => self.append_plain(batch).await,
        }
    }

    async fn append_plain(self: &Arc<Self>, batch: VerifiedBatch) -> Result<Pending> {
        let r = &self.replica;
        r.ready_to_write().await;
        let submitted = self.submit(r, batch).await?;
        Ok(Pending::Raft(submitted, None, std::time::Instant::now()))
    }

    async fn submit(&self, r: &RaftReplica, batch: VerifiedBatch) -> Result<Submitted> {
        r.raft
            .submit(BatchData::verified(batch))
            .await
            .map_err(|e| {
                let stopped = BrokerError::Unavailable {
                    message: format!("{}/{}: {e}", self.topic, self.id),
                    definite: true,
                };
                self.stopped(&e, stopped)
            })
    }

    /// The error for a write this replica's stopped Raft core refused or dropped (see
    /// [`BrokerError::replica_stopped`]).
    fn stopped(&self, cause: &dyn std::fmt::Display, otherwise: BrokerError) -> BrokerError {
        let (_, _, voters) = self.replica.raft.lease();
        BrokerError::replica_stopped(cause, otherwise, voters.len())
    }

    /// Waits until the batch is committed and applied (whatever `acks` says: the offsets are
    /// only known then).
    pub async fn complete(&self, pending: Pending) -> Result<Appended> {
        match pending {
            Pending::Duplicate(a) => Ok(a),
            Pending::Raft(submitted, refused, at) => match submitted.applied().await {
                Ok(ack) => {
                    // Submission to applied: replication, the majority's fsyncs, the apply.
                    metrics::histogram!("keel_raft_commit_seconds")
                        .record(at.elapsed().as_secs_f64());
                    Ok(Appended {
                        base_offset: ack.base_offset,
                        next_offset: ack.next_offset,
                    })
                }
                Err(ReplicaError::NotLeader {
                    leader, address, ..
                }) => {
                    if let Some(r) = &refused {
                        r.store(true, Ordering::Release);
                    }
                    Err(BrokerError::NotLeader {
                        topic: self.topic.to_string(),
                        partition: self.id,
                        leader: leader.zip(address).map(|(id, a)| (id as u32, a)),
                    })
                }
                // The leader stepped down after appending, or its Raft core stopped (then it
                // says why, e.g. a full disk): the batch may still commit.
                Err(ReplicaError::Abandoned) => {
                    let dropped = BrokerError::Unavailable {
                        message: format!(
                            "{}/{}: leadership changed before the batch was committed; it may or may not be",
                            self.topic, self.id
                        ),
                        definite: false,
                    };
                    Err(match self.replica.raft.failure() {
                        Some(why) => self.stopped(&why, dropped),
                        None => dropped,
                    })
                }
                // Discarded entries (a truncation or a purge over a pending write) cannot be
                // told apart here, and a purged one may have committed: not definite.
                Err(e) => Err(BrokerError::Unavailable {
                    message: format!("{}/{}: {e}", self.topic, self.id),
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
        let end = hwm.max(self.log.log_end_offset());
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
                other => self.read_failed(other),
            })
    }

    /// A read that failed, named: the log's own mapping (`BrokerError::from`: damaged bytes
    /// are refused for a retry), other storage errors definite (a read changes nothing).
    fn read_failed(&self, e: LogError) -> BrokerError {
        let what = format!("reading {}/{}", self.topic, self.id);
        match BrokerError::from(e) {
            BrokerError::Unavailable { message, definite } => BrokerError::Unavailable {
                message: format!("{what}: {message}"),
                definite,
            },
            BrokerError::Storage { message, .. } => BrokerError::Storage {
                message: format!("{what}: {message}"),
                definite: true,
            },
            other => other,
        }
    }

    /// Finds the first offset with a timestamp at or after `ts` (`None`: none is).
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(u64, i64)>> {
        let hwm = self.high_watermark();
        self.log
            .offset_for_timestamp(ts)
            .map(|found| found.filter(|(o, _)| *o < hwm))
            .map_err(|e| self.read_failed(e))
    }
}

fn expiry_ms(cfg: &Resolved) -> i64 {
    i64::try_from(cfg.producer_expiration_ms).unwrap_or(i64::MAX)
}
