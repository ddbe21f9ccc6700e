//! The one retry loop for requests that must reach a particular broker (a partition's leader,
//! a group's coordinator): what differs is only how the broker is found and how a failure
//! corrects the routing; which errors are retried and how long to wait between attempts come
//! from the error's reason (`ErrorReason::is_retriable`, `ErrorReason::awaits_election`).

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::rpc::Answer;
use crate::util::{backoff, backoff_cap};

/// The broker a request must reach, found again before every attempt.
pub(crate) trait Target: fmt::Display {
    /// The address to send the next attempt to (from a cache, or asked of the cluster).
    fn find(&self, client: &Client, deadline: Instant) -> impl Future<Output = Result<String>>;

    /// Corrects the routing after an attempt failed with `err`, so the next one goes where the
    /// broker said (a hint) or asks again.
    fn failed(&self, client: &Client, err: &ClientError);
}

impl Client {
    /// Runs a request on `target` until `deadline`, following its hints and retrying retriable
    /// errors with backoff. A request that may have had an effect is retried only when
    /// `idempotent`. The error returned is definite only if every attempt's was: a later
    /// attempt's refusal says nothing of an earlier one that may have taken effect (the fault
    /// run saw an offset commit reported refused that had been applied).
    pub(crate) async fn call_routed<T, F, Fut>(
        &self,
        target: &impl Target,
        deadline: Instant,
        idempotent: bool,
        mut call: F,
    ) -> Result<T>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Answer<T>,
    {
        let cfg = &self.inner.config;
        let mut attempt = 0u32;
        let mut maybe_applied = false;
        let settle = |err: ClientError, maybe_applied: bool| {
            if maybe_applied { err.indefinite() } else { err }
        };
        loop {
            let result = match target.find(self, deadline).await {
                Ok(addr) => self.call_at(&addr, deadline, &mut call).await,
                Err(e) => Err(e),
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            target.failed(self, &err);
            attempt += 1;
            if !err.is_retriable() || !(idempotent || err.is_definite()) {
                return Err(settle(err, maybe_applied));
            }
            maybe_applied |= !err.is_definite();
            let wait = backoff(
                cfg.retry_backoff,
                backoff_cap(&err, cfg.retry_backoff_max),
                attempt,
            );
            if Instant::now() + wait >= deadline {
                return Err(settle(err, maybe_applied));
            }
            tracing::debug!(%target, error = %err, "retrying");
            tokio::time::sleep(wait).await;
        }
    }
}
