//! Where groups' committed offsets live: the internal topic, its partition count, and which of
//! its partitions holds a group (whose leader is the group's coordinator).

/// The internal topic holding every group's committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Its partition count (fixed once created): each is a Raft group, and their leaders spread
/// the coordinators over the brokers.
pub const OFFSETS_PARTITIONS: u32 = 8;

/// FNV-1a (32 bit) of the group id: simple enough for any client to compute the partition.
pub fn shard_of(group: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in group.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn shard_is_fnv1a_of_the_group() {
        // FNV-1a 32 of "" is the offset basis; of "a" a published test vector.
        assert_eq!(shard_of("", u32::MAX), 0x811c_9dc5);
        assert_eq!(shard_of("a", u32::MAX), 0xe40c_292c);
        let spread: BTreeSet<u32> = (0..100).map(|i| shard_of(&format!("g{i}"), 8)).collect();
        assert_eq!(spread.len(), 8);
        assert_eq!(shard_of("x", 0), 0);
    }
}
