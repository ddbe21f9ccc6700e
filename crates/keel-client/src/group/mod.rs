//! Consumer groups: the [`GroupConsumer`], its configuration and rebalance callbacks, and the
//! group administration calls on [`Admin`](crate::Admin).
//!
//! Every group call goes to the group's coordinator (see `coordinator.rs`); membership is kept by
//! a background heartbeat task (see `consumer/heartbeat.rs`) following the bookkeeping in
//! `membership.rs`.

mod admin;
mod consumer;
mod coordinator;
mod membership;

use std::time::Duration;

pub use admin::ResetTo;
pub use consumer::{CommitFuture, GroupConsumer};
pub(crate) use coordinator::Coordinators;

use crate::consumer::{ConsumerConfig, OffsetReset};
use crate::error::{ClientError, Result};

/// Called by [`GroupConsumer::poll`] when partitions come and go, before it fetches. The
/// methods run on the polling task, so they may block it but should not take long.
pub trait RebalanceListener: Send {
    /// These partitions are now this consumer's; `poll` will return their records from their
    /// committed offsets (or per `auto_offset_reset`).
    fn on_assigned(&mut self, partitions: &[(String, u32)]) {
        let _ = partitions;
    }

    /// These partitions go to another member. Called after their positions were committed
    /// (with `auto_commit`) and before the coordinator is told they are released, so
    /// whatever is still to be done for their records can be done here.
    fn on_revoked(&mut self, partitions: &[(String, u32)]) {
        let _ = partitions;
    }

    /// These partitions were taken away without a handover (the session expired, a commit was
    /// fenced, or `poll` was not called within `max_poll_interval`): another member may already
    /// be consuming them, so nothing was committed for them.
    fn on_lost(&mut self, partitions: &[(String, u32)]) {
        let _ = partitions;
    }
}

/// Settings of a [`GroupConsumer`], from [`GroupConfig::new`] and its setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GroupConfig {
    /// 1 to 255 of ASCII letters, digits, `.`, `_`, `-`.
    pub group_id: String,
    /// Topics subscribed to by name.
    pub topics: Vec<String>,
    /// Patterns over dot-separated topic names: `*` one word, `#` zero or more words
    /// (`orders.*`, `audit.#`). Topics created later that match are assigned as they appear.
    pub patterns: Vec<String>,
    /// Static membership: a member that comes back with the same instance id within its
    /// session timeout gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// Without a heartbeat for this long the coordinator removes the member (500 ms to 300 s).
    ///
    /// The member counts it too, from when it sent its last heartbeat that got an answer: once
    /// it has passed, `poll` drops every partition (as lost, without committing) and the member
    /// joins again, so it stops consuming no later than the coordinator removes it.
    ///
    /// It also bounds how long a *ghost* member can hold partitions. Joining is a heartbeat
    /// without a member id, and the coordinator makes up the id. If the answer to a join is lost
    /// (the connection drops, the request times out) and the join is sent again, the first
    /// attempt may have created a member that this consumer never learns the id of, so it
    /// can neither heartbeat for it nor make it leave. That member gets a share of the
    /// partitions, and nobody consumes them until it expires, at most one session timeout
    /// later. A static member (`instance_id`) has no ghost: joining again with the same
    /// instance id takes the first attempt's place.
    pub session_timeout: Duration,
    /// If `poll` is not called for this long the member leaves the group (its partitions go to
    /// the others) and the next `poll` joins again.
    pub max_poll_interval: Duration,
    /// Commit the positions of what `poll` returned: every `auto_commit_interval` (from
    /// `poll`), before partitions are revoked, and on `close`.
    pub auto_commit: bool,
    pub auto_commit_interval: Duration,
    /// Where partitions without a committed offset start (`None`: `poll` fails with
    /// [`ClientError::NoOffset`]). A position that falls out of the log later (retention
    /// deleted it) moves to the oldest retained record, or fails `poll` with `None`.
    pub auto_offset_reset: OffsetReset,
    /// `range`, `roundrobin` or `sticky`; `None` takes the group's (sticky for a new group).
    pub strategy: Option<String>,
    /// Fetch tuning. Its `auto_offset_reset` is ignored: see the one above.
    pub consumer: ConsumerConfig,
}

setters!(GroupConfig {
    session_timeout: Duration,
    max_poll_interval: Duration,
    auto_commit: bool,
    auto_commit_interval: Duration,
    auto_offset_reset: OffsetReset,
    consumer: ConsumerConfig,
});

impl GroupConfig {
    pub fn new(group_id: impl Into<String>) -> Self {
        Self {
            group_id: group_id.into(),
            topics: Vec::new(),
            patterns: Vec::new(),
            instance_id: None,
            session_timeout: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(300),
            auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            auto_offset_reset: OffsetReset::Latest,
            strategy: None,
            consumer: ConsumerConfig::default(),
        }
    }

    /// Adds topics and patterns: an entry containing `*` or `#` is a pattern, anything else a
    /// topic name.
    pub fn subscribe<I, S>(mut self, entries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for e in entries {
            let e = e.into();
            let list = if is_pattern(&e) {
                &mut self.patterns
            } else {
                &mut self.topics
            };
            if !list.contains(&e) {
                list.push(e);
            }
        }
        self
    }

    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    pub fn strategy(mut self, s: impl Into<String>) -> Self {
        self.strategy = Some(s.into());
        self
    }

    /// Rejects what is certainly wrong before anything is sent; the coordinator checks the
    /// rest (the group id's alphabet, the strategy's name).
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ClientError::InvalidInput(m));
        if self.group_id.is_empty() {
            return bad("the group id is empty".into());
        }
        if self.topics.is_empty() && self.patterns.is_empty() {
            return bad(format!(
                "group {:?}: subscribe to at least one topic or pattern",
                self.group_id
            ));
        }
        for p in &self.patterns {
            if let Err(e) = keel_types::TopicPattern::parse(p) {
                return bad(format!("{p:?}: {e}"));
            }
        }
        if self.topics.iter().any(String::is_empty) {
            return bad("an empty topic name in the subscription".into());
        }
        if self.session_timeout < Duration::from_millis(500) {
            return bad(format!(
                "session timeout of {} ms is below the minimum of 500 ms",
                self.session_timeout.as_millis()
            ));
        }
        if self.max_poll_interval.is_zero() || self.auto_commit_interval.is_zero() {
            return bad("max_poll_interval and auto_commit_interval must be above zero".into());
        }
        Ok(())
    }
}

/// Whether a subscription entry is a pattern rather than a topic name.
pub fn is_pattern(entry: &str) -> bool {
    entry.contains(['*', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_splits_topics_from_patterns() {
        let c = GroupConfig::new("g").subscribe(["orders", "order.#", "a.*.b", "orders", "x"]);
        assert_eq!(c.topics, vec!["orders".to_owned(), "x".to_owned()]);
        assert_eq!(c.patterns, vec!["order.#".to_owned(), "a.*.b".to_owned()]);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validation() {
        assert!(GroupConfig::new("g").validate().is_err());
        assert!(GroupConfig::new("").subscribe(["t"]).validate().is_err());
        assert!(
            GroupConfig::new("g")
                .subscribe(["or*der"])
                .validate()
                .is_err()
        );
        assert!(
            GroupConfig::new("g")
                .subscribe(["t"])
                .session_timeout(Duration::from_millis(100))
                .validate()
                .is_err()
        );
        let c = GroupConfig::new("g").subscribe(["t"]);
        assert_eq!(c.session_timeout, Duration::from_secs(10));
        assert_eq!(c.max_poll_interval, Duration::from_secs(300));
        assert!(c.auto_commit);
        assert_eq!(c.auto_commit_interval, Duration::from_secs(5));
        assert_eq!(c.auto_offset_reset, OffsetReset::Latest);
    }
}
