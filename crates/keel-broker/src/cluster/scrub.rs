//! The scrub: every sealed segment of every replica on this broker (partitions and the
//! metadata group) is read through at a steady rate and checked batch by batch; damage found
//! by it, or by a read that failed a CRC, is repaired from another replica of the group
//! (`keel_raft::segment_repair`). Until then the damaged batches are refused, never served.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_log::{Damage, Log};
use keel_raft::Replica;
use keel_raft::segment_repair::SegmentRepair;
use tokio::sync::watch;

use super::ClusterNode;
use super::meta::META_GROUP;

/// Bytes per second the background scrub reads by default. At 4 MiB/s a broker holding
/// 1 TiB is read through about every three days, and the reads stay a small share of a
/// disk's bandwidth.
pub const DEFAULT_SCRUB_BYTES_PER_SEC: u64 = 4 << 20;
/// How often the scrub looks for damage that reads reported.
const TICK: Duration = Duration::from_secs(1);
/// How long damage that could not be repaired waits before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One replica's log, as the scrub sees it.
struct Target {
    group: u64,
    /// Names the log in metrics and log lines: `topic/partition`, or `metadata`.
    name: String,
    replica: Replica,
    log: Arc<Log>,
}

/// Where the background pass is: the last segment it checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Position {
    group: u64,
    /// The base offset of the last segment checked in `group` (`None`: none yet).
    segment: Option<u64>,
}

/// The segment the background pass checks after `at`: the next sealed segment of the same
/// group, else the first of the next group (by id), wrapping around; `None` if there is no
/// sealed segment at all.
pub(crate) fn next_segment(at: Position, sealed: &BTreeMap<u64, Vec<u64>>) -> Option<(u64, u64)> {
    let later_in_group = sealed.get(&at.group).and_then(|segs| {
        segs.iter()
            .find(|b| at.segment.is_none_or(|s| **b > s))
            .map(|b| (at.group, *b))
    });
    later_in_group.or_else(|| {
        let after = sealed.range(at.group.saturating_add(1)..);
        let before = sealed.range(..=at.group);
        after
            .chain(before)
            .find_map(|(g, segs)| segs.first().map(|b| (*g, *b)))
    })
}

impl ClusterNode {
    /// The replicas on this broker, with their logs.
    async fn scrub_targets(&self) -> Vec<Target> {
        let mut out = vec![Target {
            group: META_GROUP,
            name: "metadata".to_owned(),
            replica: self.meta_raft.clone(),
            log: self.meta_store.log_arc(),
        }];
        for h in self.hosted.lock().await.values() {
            let p = &h.partition;
            let r = p.raft();
            out.push(Target {
                group: r.group,
                name: format!("{}/{}", p.topic, p.id),
                replica: r.raft.clone(),
                log: r.store.log_arc(),
            });
        }
        out
    }

    /// Runs the scrub until `shutdown`: damage reported by reads every second, and the
    /// background pass at `bytes_per_sec` (0: off).
    pub fn spawn_scrub(
        self: &Arc<Self>,
        bytes_per_sec: u64,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut at = Position::default();
            // Bytes the background pass may read now: earned at `bytes_per_sec`, at most one
            // second's worth banked; a segment larger than that drives it negative, and the
            // pass waits until it is earned back.
            let mut credit = 0f64;
            // Damage not repaired yet: (group, segment) to when to try again.
            let mut pending: BTreeMap<(u64, u64), Instant> = BTreeMap::new();
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tick.tick() => {}
                }
                let targets = node.scrub_targets().await;
                let now = Instant::now();
                let mut due: Vec<(u64, u64)> = pending
                    .iter()
                    .filter(|(_, when)| **when <= now)
                    .map(|(k, _)| *k)
                    .collect();
                for t in &targets {
                    due.extend(t.log.take_damaged().into_iter().map(|b| (t.group, b)));
                }
                let rate = bytes_per_sec as f64 * TICK.as_secs_f64();
                credit = (credit + rate).min(rate);
                if bytes_per_sec > 0 {
                    let sealed: BTreeMap<u64, Vec<u64>> = targets
                        .iter()
                        .map(|t| (t.group, t.log.sealed_segments()))
                        .collect();
                    let total: usize = sealed.values().map(Vec::len).sum();
                    // Each segment at most once per tick, however small they are.
                    for _ in 0..total {
                        if credit <= 0.0 {
                            break;
                        }
                        let Some((group, segment)) = next_segment(at, &sealed) else {
                            break;
                        };
                        at = Position {
                            group,
                            segment: Some(segment),
                        };
                        let bytes = targets
                            .iter()
                            .find(|t| t.group == group)
                            .map_or(0, |t| t.log.segment_bytes(segment));
                        credit -= bytes as f64;
                        metrics::counter!("keel_scrub_bytes_total").increment(bytes);
                        due.push((group, segment));
                    }
                }
                due.sort_unstable();
                due.dedup();
                for (group, segment) in due {
                    let Some(t) = targets.iter().find(|t| t.group == group) else {
                        pending.remove(&(group, segment));
                        continue;
                    };
                    let retry = pending.contains_key(&(group, segment));
                    if node.check_segment(t, segment, retry).await {
                        pending.remove(&(group, segment));
                    } else {
                        pending.insert((group, segment), Instant::now() + RETRY_AFTER);
                    }
                }
                metrics::gauge!("keel_log_damaged_segments").set(pending.len() as f64);
            }
        })
    }

    /// Checks one sealed segment and repairs what it finds; false while damage remains.
    /// Damage already known (`retry`) is counted and reported once, not on every try.
    async fn check_segment(&self, t: &Target, segment: u64, retry: bool) -> bool {
        let log = Arc::clone(&t.log);
        let found = tokio::task::spawn_blocking(move || log.scrub_segment(segment)).await;
        let Ok(Some(damage)) = found else {
            return true;
        };
        if retry {
            return self.repair(t, damage).await;
        }
        metrics::counter!("keel_log_damage_found_total").increment(1);
        tracing::error!(log = %t.name, path = %damage.path.display(), position = damage.at.position, raft_index = damage.at.raft_index, reason = %damage.reason, "found damaged bytes in a sealed segment; they are not served until a replica supplies them again");
        self.repair(t, damage).await
    }

    async fn repair(&self, t: &Target, damage: Damage) -> bool {
        let (path, position) = (damage.path.clone(), damage.at.position);
        match t
            .replica
            .repair_segment(t.group, &self.transport, damage)
            .await
        {
            SegmentRepair::Repaired {
                entries,
                bytes,
                from,
            } => {
                metrics::counter!("keel_log_damage_repaired_total").increment(1);
                metrics::counter!("keel_log_repaired_bytes_total").increment(bytes);
                tracing::info!(log = %t.name, path = %path.display(), position, entries, bytes, from_broker = from, "repaired a damaged sealed segment with a replica's copies");
                true
            }
            SegmentRepair::Gone => true,
            SegmentRepair::Deferred { why } => {
                tracing::warn!(log = %t.name, path = %path.display(), position, why = %why, "could not repair a damaged sealed segment yet; retrying");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(groups: &[(u64, &[u64])]) -> BTreeMap<u64, Vec<u64>> {
        groups.iter().map(|(g, s)| (*g, s.to_vec())).collect()
    }

    fn at(group: u64, segment: Option<u64>) -> Position {
        Position { group, segment }
    }

    #[test]
    fn the_pass_walks_every_segment_of_every_group_and_wraps_around() {
        let s = sealed(&[(1, &[0, 100]), (3, &[]), (7, &[50])]);
        let mut pos = Position::default();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (g, b) = next_segment(pos, &s).expect("a segment");
            seen.push((g, b));
            pos = at(g, Some(b));
        }
        assert_eq!(seen, vec![(1, 0), (1, 100), (7, 50), (1, 0)]);
    }

    #[test]
    fn a_group_that_went_away_moves_the_pass_on() {
        let s = sealed(&[(2, &[10]), (9, &[5])]);
        assert_eq!(next_segment(at(4, Some(77)), &s), Some((9, 5)));
        assert_eq!(next_segment(at(2, Some(10)), &s), Some((9, 5)));
        assert_eq!(next_segment(at(9, Some(5)), &s), Some((2, 10)));
        assert_eq!(
            next_segment(Position::default(), &sealed(&[(1, &[])])),
            None
        );
    }
}
