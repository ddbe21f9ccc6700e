//! The heartbeat task: joins the group, heartbeats, rejoins after a loss and leaves when `poll`
//! is overdue, recording in the shared `Membership` what the coordinator grants and revokes.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use crate::client::Client;
use crate::group::membership::{HeartbeatTemplate, Phase};
use crate::util::{backoff, lock};

/// How often a member asks again while partitions are pending for it.
const PENDING_HEARTBEAT: Duration = Duration::from_millis(100);

/// Keeps the membership alive: joins, heartbeats every `heartbeat_interval_ms` (at once when
/// woken), rejoins after a loss once `poll` has dropped the old partitions, and leaves when
/// `poll` has not been called for `max_poll_interval`. Once `session_timeout` has passed since
/// the last heartbeat that got an answer was sent, it takes the partitions as lost (the
/// coordinator may have removed the member by then), whether or not a heartbeat is out.
pub(super) async fn heartbeat_loop(
    client: Client,
    shared: Arc<Shared>,
    template: HeartbeatTemplate,
    session_timeout: Duration,
    max_poll_interval: Duration,
) {
    let cfg = client.config().clone();
    let group = template.group_id.as_str();
    let mut next = Instant::now();
    let mut failures = 0u32;
    loop {
        let now = Instant::now();
        let (phase, generation, member_id, interval, lease_end) = {
            let s = lock(&shared.state);
            (
                s.phase,
                s.generation,
                s.member_id.clone(),
                s.heartbeat_interval,
                s.lease_expiry(session_timeout),
            )
        };
        if phase == Phase::Stopped {
            return;
        }
        if lease_end.is_some_and(|t| t <= now) {
            lease_expired(&shared, group, generation);
            continue;
        }
        let overdue_at = {
            let c = lock(&shared.clock);
            (!c.active).then_some(c.last + max_poll_interval)
        };
        if matches!(phase, Phase::Active | Phase::Lost) && overdue_at.is_some_and(|t| t <= now) {
            tracing::warn!(
                group,
                max_poll_interval_ms = max_poll_interval.as_millis(),
                "poll was not called within max_poll_interval; leaving the group until the next poll"
            );
            shared.lost(generation, true);
            if !member_id.is_empty() {
                let deadline = now + cfg.request_timeout.min(session_timeout);
                if let Err(e) = client.leave_group(group, &member_id, false, deadline).await {
                    tracing::debug!(group, error = %e, "leaving the group failed");
                }
            }
            continue;
        }
        if phase == Phase::Active && next <= now {
            let (req, generation, lease_end) = {
                let s = lock(&shared.state);
                (
                    s.heartbeat_request(&template),
                    s.generation,
                    s.lease_expiry(session_timeout),
                )
            };
            let deadline = now + cfg.request_timeout.min(session_timeout);
            let sent_at = Instant::now();
            let call = client.group_heartbeat(req, deadline);
            // A heartbeat that is still out when the lease runs out does not keep the
            // partitions: the coordinator may have removed the member before it arrived.
            let result = match lease_end {
                Some(t) => tokio::select! {
                    r = call => Some(r),
                    () = tokio::time::sleep_until(t) => None,
                },
                None => Some(call.await),
            };
            let Some(result) = result else {
                lease_expired(&shared, group, generation);
                failures += 1;
                next = Instant::now() + backoff(cfg.retry_backoff, cfg.retry_backoff_max, failures);
                continue;
            };
            match result {
                Ok(resp) => {
                    failures = 0;
                    let wake = lock(&shared.state).on_heartbeat(generation, sent_at, &resp);
                    if wake {
                        shared.wake_poll.notify_one();
                    }
                    // Partitions waiting for their previous owner to let go come as soon as
                    // it did: ask again soon instead of a whole interval later, so a
                    // rebalance pauses the moved partitions for less.
                    let interval = lock(&shared.state).heartbeat_interval;
                    next = Instant::now()
                        + if resp.pending.is_empty() {
                            interval
                        } else {
                            interval.min(PENDING_HEARTBEAT)
                        };
                }
                Err(e) if e.is_membership_lost() => {
                    tracing::info!(group, error = %e, "group membership lost; rejoining");
                    shared.lost(generation, false);
                    failures += 1;
                    next = Instant::now()
                        + backoff(cfg.retry_backoff, cfg.retry_backoff_max, failures);
                }
                Err(e) if e.is_retriable() => {
                    failures += 1;
                    tracing::debug!(group, error = %e, "heartbeat failed; retrying");
                    // The lease is checked at the top of the loop (and while sleeping).
                    next = Instant::now()
                        + backoff(cfg.retry_backoff, cfg.retry_backoff_max, failures).min(interval);
                }
                Err(e) => {
                    // Not logged above debug: every `poll` returns it from now on.
                    tracing::debug!(group, error = %e, "the coordinator refused this member");
                    {
                        let mut s = lock(&shared.state);
                        s.fatal = Some(e);
                        s.phase = Phase::Stopped;
                    }
                    shared.wake_poll.notify_one();
                    return;
                }
            }
            continue;
        }
        // Sleep until the next heartbeat is due (or, when not heartbeating, until woken), but
        // wake in time to notice a missed poll.
        let mut wake_at = if phase == Phase::Active {
            next
        } else {
            now + Duration::from_secs(3600)
        };
        // Wake when the lease runs out even if no heartbeat is due before (retries backing
        // off), so the partitions are dropped in time.
        if let Some(t) = lease_end {
            wake_at = wake_at.min(t);
        }
        if matches!(phase, Phase::Active | Phase::Lost)
            && let Some(t) = overdue_at
        {
            wake_at = wake_at.min(t);
        }
        tokio::select! {
            () = tokio::time::sleep_until(wake_at) => {}
            () = shared.wake_heartbeat.notified() => next = Instant::now(),
        }
    }
}

/// Past the session timeout the coordinator may have given the partitions away: consuming them
/// on would only duplicate another member's work.
fn lease_expired(shared: &Shared, group: &str, generation: u64) {
    tracing::warn!(
        group,
        "no heartbeat got through within the session timeout; partitions lost, rejoining"
    );
    shared.lost(generation, false);
}
