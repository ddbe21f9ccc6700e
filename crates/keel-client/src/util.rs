//! Small helpers shared by the producer, consumer and admin paths.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Locks that are only held for short, non-panicking critical sections: a poisoned lock still
/// holds consistent data, so recover it rather than propagate a panic into every caller.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

/// Milliseconds since the epoch; 0 if the clock is before 1970.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The longest wait before retrying after a leader change (`NOT_LEADER`, or the leader's broker
/// unreachable): elections take about a second, and a client that backed off to its full
/// `retry_backoff_max` would add most of that again after the new leader is up.
pub(crate) const LEADER_CHANGE_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// The backoff cap for `err`: short while it waits for an election (see
/// `ErrorReason::awaits_election`), `max` otherwise.
pub(crate) fn backoff_cap(err: &crate::ClientError, max: Duration) -> Duration {
    if err.awaits_election() {
        max.min(LEADER_CHANGE_BACKOFF_MAX)
    } else {
        max
    }
}

/// Exponential backoff `base * 2^(attempt-1)` capped at `max`, with ±20% jitter so that clients
/// that failed together do not retry in lockstep.
pub(crate) fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let d = exp.min(max);
    let jitter = 0.8 + 0.4 * (random() % 1000) as f64 / 1000.0;
    d.mul_f64(jitter)
}

/// A fast, non-cryptographic random number (xorshift64*), seeded per thread from the std
/// hasher's random keys. Good enough for jitter and partition choice; avoids a `rand` dependency.
pub(crate) fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0x6b65_656c_u64) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let b1 = backoff(base, max, 1);
        assert!(b1 >= Duration::from_millis(80) && b1 <= Duration::from_millis(120));
        let b3 = backoff(base, max, 3);
        assert!(b3 >= Duration::from_millis(320) && b3 <= Duration::from_millis(480));
        for attempt in [5, 10, 64, u32::MAX] {
            assert!(backoff(base, max, attempt) <= Duration::from_millis(1200));
        }
    }

    #[test]
    fn random_varies() {
        let a: Vec<u64> = (0..8).map(|_| random()).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
}
