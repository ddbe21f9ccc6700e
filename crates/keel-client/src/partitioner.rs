//! Choosing a partition for records sent without one.
//!
//! Keyed records use Kafka's default partitioner bit for bit (`keel_types::partition_for_key`,
//! shared with the broker), so a key lands on the partition Kafka clients would pick. Keyless
//! records use Kafka's sticky partitioner (KIP-480): all of them go to one partition until its
//! batch is closed, then to another, which makes fuller batches than round robin.

use std::collections::HashMap;

use crate::util::random;

pub use keel_types::{murmur2, partition_for_key};

#[derive(Debug, Clone, Copy)]
struct Sticky {
    partition: u32,
    /// Whether a batch was already opened for `partition` since it was chosen; the next time it
    /// needs a new batch, the partitioner moves on.
    opened_batch: bool,
}

#[derive(Debug, Default)]
pub(crate) struct StickyPartitioner {
    topics: HashMap<String, Sticky>,
}

impl StickyPartitioner {
    /// The partition for a keyless record of `topic`, which has `count` partitions.
    /// `needs_new_batch(p)` says whether appending to `p` would open a batch; `available(p)` whether
    /// `p` has a leader (preferred when switching, so records do not pile up where nothing is
    /// sent).
    pub(crate) fn partition(
        &mut self,
        topic: &str,
        count: u32,
        needs_new_batch: impl Fn(u32) -> bool,
        available: impl Fn(u32) -> bool,
    ) -> u32 {
        let count = count.max(1);
        let sticky = match self.topics.get_mut(topic) {
            Some(s) if s.partition < count => s,
            _ => {
                let partition = pick(count, None, &available);
                self.topics.insert(
                    topic.to_owned(),
                    Sticky {
                        partition,
                        opened_batch: false,
                    },
                );
                match self.topics.get_mut(topic) {
                    Some(s) => s,
                    None => return partition,
                }
            }
        };
        if needs_new_batch(sticky.partition) {
            if sticky.opened_batch {
                sticky.partition = pick(count, Some(sticky.partition), &available);
            }
            sticky.opened_batch = true;
        }
        sticky.partition
    }
}

/// A random partition other than `except`, among available ones when there are any.
fn pick(count: u32, except: Option<u32>, available: &impl Fn(u32) -> bool) -> u32 {
    if count <= 1 {
        return 0;
    }
    let others = || (0..count).filter(move |&p| Some(p) != except);
    let preferred: Vec<u32> = others().filter(|&p| available(p)).collect();
    let pool: Vec<u32> = if preferred.is_empty() {
        others().collect()
    } else {
        preferred
    };
    pool.get((random() % pool.len() as u64) as usize)
        .copied()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashSet;

    use super::*;

    /// `murmur2` and `partition_for_key` are keel-types' own, checked against all of Kafka's
    /// UtilsTest vectors there; here, that the re-exports put keys where Java clients do.
    #[test]
    fn keys_land_where_kafka_puts_them() {
        assert_eq!(murmur2(b"21"), -973_932_308);
        // toPositive(-790332482) = 1357151166; 1357151166 % 50 = 16.
        assert_eq!(partition_for_key(b"foobar", 50), 16);
        assert_eq!(
            partition_for_key(b"21", 7),
            ((-973_932_308_i32 & 0x7fff_ffff) as u32) % 7
        );
    }

    /// Simulates the accumulator: each partition's batch holds `per_batch` records.
    #[test]
    fn sticks_until_the_batch_is_full_then_moves() {
        let mut sp = StickyPartitioner::default();
        let fill = RefCell::new(vec![0usize; 4]);
        let per_batch = 3;
        let mut chosen = Vec::new();
        for _ in 0..30 {
            let p = sp.partition(
                "t",
                4,
                |p| {
                    let f = fill.borrow()[p as usize];
                    f == 0 || f == per_batch
                },
                |_| true,
            );
            let mut f = fill.borrow_mut();
            if f[p as usize] == per_batch {
                f[p as usize] = 0;
            }
            f[p as usize] += 1;
            chosen.push(p);
        }
        // Runs of exactly one batch, and consecutive runs on different partitions.
        for run in chosen.chunks(per_batch) {
            assert!(run.iter().all(|&p| p == run[0]), "{chosen:?}");
        }
        for w in chosen.chunks(per_batch).collect::<Vec<_>>().windows(2) {
            assert_ne!(w[0][0], w[1][0], "{chosen:?}");
        }
        let used: HashSet<u32> = chosen.into_iter().collect();
        assert!(used.len() > 1);
    }

    #[test]
    fn prefers_partitions_with_leaders() {
        let mut sp = StickyPartitioner::default();
        for _ in 0..50 {
            // Every call needs a new batch, so every call after the first switches.
            let p = sp.partition("t", 5, |_| true, |p| p == 1 || p == 3);
            assert!(p == 1 || p == 3, "{p}");
        }
        // No partition has a leader: still pick something in range.
        for _ in 0..20 {
            assert!(sp.partition("u", 3, |_| true, |_| false) < 3);
        }
    }

    #[test]
    fn adapts_to_partition_count_changes() {
        let mut sp = StickyPartitioner::default();
        assert_eq!(sp.partition("t", 1, |_| false, |_| true), 0);
        assert_eq!(sp.partition("t", 0, |_| true, |_| true), 0);
        for _ in 0..20 {
            assert!(sp.partition("t", 2, |_| true, |_| true) < 2);
        }
    }
}
