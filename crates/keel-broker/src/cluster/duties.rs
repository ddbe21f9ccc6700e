//! The broker's periodic duties: the reconcile loop, the beats, the leader pass (carrying
//! out what [`leader_pass::decide`] decided), putting idle groups to sleep, reassignments and
//! the metadata leader's controller pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_raft::Status;
use tokio::sync::watch;

use super::forward::ForwardRequest;
use super::leader_pass::{self, Action};
use super::meta::{Command, META_GROUP, partition_group};
use super::quiet::{self, BEAT};
use super::{ClusterNode, RegistryHolder};
use crate::error::Result;
use crate::partition::RaftReplica;

/// How often leaders report and the controller checks its duties.
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// How long a reassignment waits for a new replica to catch up before it retries.
const LEARNER_CATCH_UP: Duration = Duration::from_secs(60);

impl ClusterNode {
    /// Runs the reconciler, the self-registration and the leader/controller loops until
    /// `shutdown`.
    pub fn spawn_loops(
        self: &Arc<Self>,
        registry: Arc<dyn RegistryHolder>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        {
            let node = Arc::clone(self);
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(BEAT);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => {
                            if *shutdown.borrow() {
                                return;
                            }
                        }
                        _ = tick.tick() => node.beat().await,
                    }
                }
            });
        }
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let mut state_rx = node.metadata.subscribe();
            let mut tick = tokio::time::interval(REPORT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut registered = false;
            let mut register_task: Option<tokio::task::JoinHandle<Result<()>>> = None;
            if let Err(e) = node.reconcile(registry.registry()).await {
                tracing::error!(error = %e, "reconcile failed");
            }
            loop {
                tokio::select! {
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() {
                            return;
                        }
                    }
                    changed = state_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if let Err(e) = node.reconcile(registry.registry()).await {
                            tracing::error!(error = %e, "reconcile failed");
                        }
                    }
                    _ = tick.tick() => {
                        if !registered {
                            let me = node.state().brokers.get(&node.id).map(|b| (b.address.clone(), b.peer().to_owned()));
                            if me == Some((node.advertise.clone(), node.peer_address.clone())) {
                                registered = true;
                            } else if register_task.as_ref().is_none_or(|t| t.is_finished()) {
                                let n = Arc::clone(&node);
                                register_task = Some(tokio::spawn(async move {
                                    n.propose(Command::RegisterBroker { id: n.id, address: n.advertise.clone(), peer_address: n.peer_address.clone() }).await
                                }));
                            }
                        }
                        node.identity_pass().await;
                        node.controller_pass().await;
                        node.metadata_identity_pass().await;
                        node.leader_pass().await;
                        if node.has_stopped_replica().await
                            && let Err(e) = node.reconcile(registry.registry()).await
                        {
                            tracing::error!(error = %e, "reconcile failed");
                        }
                    }
                }
            }
        })
    }

    /// One pass of the leader duties over every hosted replica: report leadership and
    /// in-sync replicas, carry out reassignments, hand leadership to the preferred replica.
    async fn leader_pass(self: &Arc<Self>) {
        let state = self.state();
        let replacing: BTreeSet<u32> = state
            .brokers
            .values()
            .filter(|b| b.replacing)
            .map(|b| b.id)
            .collect();
        let silent: BTreeSet<u32> = state
            .brokers
            .keys()
            .copied()
            .filter(|b| {
                *b != self.id && !self.liveness.heard_within(*b, leader_pass::IN_SYNC_CONTACT)
            })
            .collect();
        let now = Instant::now();
        let mut reports = Vec::new();
        let mut under_replicated = 0u64;
        let mut hosted = self.hosted.lock().await;
        for (group, h) in hosted.iter_mut() {
            let r = h.partition.raft();
            let status = r.raft.status();
            let labels = [
                ("topic", h.partition.topic.to_string()),
                ("partition", h.partition.id.to_string()),
            ];
            metrics::gauge!("keel_partition_is_leader", &labels).set(if status.is_leader() {
                1.0
            } else {
                0.0
            });
            self.quiet_pass(r, &status, h.memory.changing);
            let sent = self
                .reported
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(group)
                .cloned();
            let placement = state
                .topic_by_id(h.topic_id)
                .and_then(|t| t.partitions.get(h.partition.id as usize));
            let decision = leader_pass::decide(&leader_pass::Input {
                me: self.id,
                now,
                topic_id: h.topic_id,
                partition: h.partition.id,
                status: &status,
                memory: h.memory,
                placement,
                sent: sent.as_ref(),
                replacing: &replacing,
                silent: &silent,
            });
            h.memory = decision.memory;
            h.partition
                .set_in_sync(decision.in_sync.as_ref().map(|(in_sync, _)| in_sync.len()));
            if let Some((in_sync, voters)) = &decision.in_sync {
                metrics::gauge!("keel_partition_in_sync_replicas", &labels)
                    .set(in_sync.len() as f64);
                metrics::gauge!("keel_partition_replicas", &labels).set(*voters as f64);
                if in_sync.len() < *voters {
                    under_replicated += 1;
                }
            }
            for action in decision.actions {
                match action {
                    Action::Report(report) => reports.push(report),
                    Action::ChangeVoters(target) => {
                        let nodes: BTreeMap<u64, String> = target
                            .iter()
                            .filter_map(|b| {
                                state
                                    .brokers
                                    .get(b)
                                    .map(|x| (u64::from(*b), x.peer().to_owned()))
                            })
                            .collect();
                        let (node, replica, g) = (Arc::clone(self), r.clone(), *group);
                        tokio::spawn(async move {
                            node.change_replicas(g, replica, nodes).await;
                        });
                    }
                    Action::TransferLeader(to) => {
                        tracing::info!(topic = %h.partition.topic, partition = h.partition.id, to, "handing leadership to the preferred replica");
                        // Awake, so that the group elects again if the transfer goes nowhere.
                        r.wake();
                        if let Err(e) = r.raft.transfer_leader(u64::from(to)).await {
                            tracing::warn!(error = %e, "leader transfer failed");
                        }
                    }
                }
            }
        }
        let quiet = hosted
            .values()
            .filter(|h| h.partition.raft().activity.is_quiet())
            .count();
        drop(hosted);
        metrics::gauge!("keel_under_replicated_partitions").set(under_replicated as f64);
        metrics::gauge!("keel_quiet_partitions").set(quiet as f64);
        if !reports.is_empty() {
            self.send_reports(reports);
        }
    }

    /// Proposes leader reports, one batch in flight at a time so that they apply in the order
    /// they were made; a failed one is sent again by a later pass.
    fn send_reports(self: &Arc<Self>, reports: Vec<super::meta::LeaderReport>) {
        {
            let mut sent = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
            for r in &reports {
                sent.insert(partition_group(r.topic_id, r.partition), r.clone());
            }
        }
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let _in_order = node.reporting.lock().await;
            if let Err(e) = node
                .propose(Command::Leaders {
                    reports: reports.clone(),
                })
                .await
            {
                tracing::debug!(error = %e, "leader report failed; retrying");
                let mut sent = node.reported.lock().unwrap_or_else(PoisonError::into_inner);
                for r in &reports {
                    sent.remove(&partition_group(r.topic_id, r.partition));
                }
            }
        });
    }

    /// Puts an idle group to sleep or wakes it (see [`quiet`]).
    fn quiet_pass(&self, r: &RaftReplica, m: &Status, changing: bool) {
        let leading = m.is_leader();
        let a = &r.activity;
        let tick = |on: bool| {
            if a.set_ticking(on) {
                r.raft.set_ticking(on);
            }
        };
        if leading {
            a.resolve_pending();
            let last = m.last_log_index;
            // Learners (a reassignment) keep the group awake until they are voters.
            let all_caught_up = m.committed == last
                && m.learners.is_empty()
                && m.voters
                    .iter()
                    .all(|v| *v == r.node_id || m.matched.get(v).copied().flatten() == last);
            match quiet::leader_step(quiet::Leading {
                quiet: a.is_quiet(),
                quiet_under_other: a.quiet_leader().is_some(),
                quiet_for: a.quiet_for(),
                idle_for: a.idle_for(),
                changing,
                all_caught_up,
            }) {
                quiet::LeaderStep::Wake => {
                    a.wake();
                    tick(true);
                }
                quiet::LeaderStep::Tick => tick(true),
                // Listed in the beats since `quiet_for`: the followers have had time to hear
                // it and stop their own election timers.
                quiet::LeaderStep::Sleep => tick(false),
                quiet::LeaderStep::GoQuiet => {
                    a.set_quiet(None);
                }
                quiet::LeaderStep::Hold => {}
            }
            return;
        }
        // A follower sleeps only under the leader it follows (or has not heard of yet since a
        // restart), while that leader's broker keeps declaring the group quiet in a term at
        // least this replica's own.
        let under = |l: u32| {
            u64::from(l) != r.node_id
                && m.leader.is_none_or(|cl| cl == u64::from(l))
                && self.liveness.still_quiet(l, r.group, m.term)
        };
        if a.is_quiet() {
            if !a.quiet_leader().is_some_and(under) {
                a.wake();
                tick(true);
            }
            return;
        }
        if let Some(l) = self.liveness.quiet_leader(r.group, m.term)
            && under(l)
        {
            a.resolve_pending();
            a.set_quiet(Some(l));
            tick(false);
            return;
        }
        // A restarted replica that no beat claims wakes once the beats had time to arrive.
        if !a.pending(quiet::BEAT_TIMEOUT) {
            tick(true);
        }
    }

    /// Sends this broker's beat to every peer: it is alive, and these groups it leads are quiet.
    async fn beat(&self) {
        let mut quiet = Vec::new();
        for h in self.hosted.lock().await.values() {
            let r = h.partition.raft();
            if r.activity.is_quiet()
                && r.activity.quiet_leader().is_none()
                && let (true, _, _) = r.raft.lease()
            {
                quiet.push((r.group, r.raft.term()));
            }
        }
        let Ok(payload) = serde_json::to_vec(&ForwardRequest::Beat {
            from: self.id,
            quiet,
        }) else {
            return;
        };
        let payload = Bytes::from(payload);
        let peers: Vec<(u32, String)> = self
            .state()
            .brokers
            .values()
            .filter(|b| b.id != self.id)
            .map(|b| (b.id, b.peer().to_owned()))
            .collect();
        let sends = peers.into_iter().map(|(id, addr)| {
            let payload = payload.clone();
            async move {
                let r = self
                    .transport
                    .forward(&addr, u64::from(id), META_GROUP, payload, BEAT * 3)
                    .await;
                if r.is_ok() {
                    self.liveness.heard_from(id);
                }
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Moves a partition group to `nodes` (id to peer address) as voters: adds the new ones as
    /// learners (waiting until they caught up), then switches the voter set (joint consensus).
    /// A failed step is retried by the next leader pass of whichever replica leads then.
    async fn change_replicas(
        &self,
        group: u64,
        replica: RaftReplica,
        nodes: BTreeMap<u64, String>,
    ) {
        let raft = &replica.raft;
        let voters = raft.status().voters;
        let mut ok = true;
        for (id, addr) in &nodes {
            if voters.contains(id) {
                continue;
            }
            tracing::info!(group, learner = id, "adding a replica");
            // Every membership change is a log entry: the group may be asleep (idle partitions
            // stop heartbeating) with the lease the Raft core asks of a writing leader expired.
            replica.ready_to_write().await;
            // Bounded: a target broker that is down must not wedge the partition's
            // reassignments; the next leader pass retries.
            match tokio::time::timeout(LEARNER_CATCH_UP, raft.add_learner(*id, addr.clone(), true))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(group, learner = id, error = %e, "adding a learner failed");
                    ok = false;
                    break;
                }
                Err(_) => {
                    tracing::warn!(group, learner = id, timeout = ?LEARNER_CATCH_UP, "a new replica did not catch up in time; retrying later");
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            let ids: BTreeSet<u64> = nodes.keys().copied().collect();
            // Again: catching a learner up can take longer than a lease.
            replica.ready_to_write().await;
            match raft.change_voters(ids).await {
                Ok(()) => {
                    tracing::info!(group, voters = ?nodes.keys().collect::<Vec<_>>(), "replicas changed")
                }
                Err(e) => tracing::warn!(group, error = %e, "membership change failed"),
            }
        }
        if let Some(h) = self.hosted.lock().await.get_mut(&group) {
            h.memory.changing = false;
        }
    }

    /// The metadata leader's duty: every registered broker is in the metadata group (new
    /// brokers join as learners, so they receive the metadata without weakening the quorum).
    async fn controller_pass(&self) {
        let s = self.meta_raft.status();
        if !s.is_leader() {
            return;
        }
        // A broker being replaced rejoins once its new directory is registered.
        for b in self.state().brokers.values().filter(|b| !b.replacing) {
            if !s.addresses.contains_key(&u64::from(b.id)) {
                tracing::info!(
                    broker = b.id,
                    "adding a broker to the metadata group as a learner"
                );
                if let Err(e) = self
                    .meta_raft
                    .add_learner(u64::from(b.id), b.peer().to_owned(), false)
                    .await
                {
                    tracing::warn!(broker = b.id, error = %e, "adding a metadata learner failed");
                }
            }
        }
    }
}
