//! Sequence arithmetic of idempotent producers, shared by the broker (which checks sequences)
//! and the client (which assigns them): numbers run from 0 to `i32::MAX` and wrap to 0, as in
//! Kafka, so a long-lived producer never runs out.

const SPACE: i64 = i32::MAX as i64 + 1;

/// The sequence number `count` records after `first`.
pub fn next(first: i32, count: u32) -> i32 {
    (i64::from(first) + i64::from(count)).rem_euclid(SPACE) as i32
}

/// The sequence number of the last record of a batch of `count` records starting at `first`
/// (a batch has at least one record).
pub fn last(first: i32, count: u32) -> i32 {
    next(first, count.max(1) - 1)
}

/// Whether `a` is `b` or comes before it: within half the circular space behind `b`, which is
/// far more than any window of unacknowledged batches.
pub fn at_or_before(a: i32, b: i32) -> bool {
    (i64::from(b) - i64::from(a)).rem_euclid(SPACE) < SPACE / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_after_the_largest_sequence() {
        assert_eq!(next(i32::MAX - 1, 3), 1);
        assert_eq!(last(i32::MAX - 1, 4), 1);
        assert_eq!(last(5, 1), 5);
        assert!(at_or_before(i32::MAX, 2));
        assert!(!at_or_before(2, i32::MAX));
        assert!(at_or_before(7, 7));
    }
}
