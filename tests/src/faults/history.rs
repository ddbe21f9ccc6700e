//! What a fault run records for the checker: plain data, filled in by `tests/tests/faults.rs`
//! from what its clients and the brokers' files showed.

use std::collections::{BTreeMap, BTreeSet};

/// What one producer's write became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged (`acks=all`) at this partition and offset.
    Acked { partition: u32, offset: u64 },
    /// Failed with an error the broker marked definite: nothing was written.
    Refused,
    /// Failed without a definite answer: it may or may not be in the log.
    Unknown,
}

/// Everything the run observed. Times are microseconds since the run started, all read from one
/// clock, so events of different members can be ordered.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// The test topic: `final_log`, `log_start`, `retention_deleted` and the members' partitions
    /// are its partitions.
    pub topic: String,
    /// Every value written (all distinct) and what became of it. Values are
    /// `{producer}-{sequence}`: a producer's send order is its sequence order.
    pub writes: BTreeMap<String, Outcome>,
    /// The key each keyed write was sent with (writes without a key are not listed).
    pub keys: BTreeMap<String, String>,
    /// The final contents of each partition as read through the cluster: offset to value.
    pub final_log: BTreeMap<u32, BTreeMap<u64, String>>,
    /// Each partition's log start when read.
    pub log_start: BTreeMap<u32, u64>,
    /// Partitions whose oldest records retention may have deleted: the topic's configuration
    /// lets retention delete, and the brokers reported deleting bytes. Only for these are
    /// records below the log start excused.
    pub retention_deleted: BTreeSet<u32>,
    /// Each group member's events, by member name.
    pub members: BTreeMap<String, Member>,
    /// Each group's committed offsets per partition as an observer polling the coordinator saw
    /// them, in the order seen: (when the answer came, offset), each offset once per change.
    pub commits: BTreeMap<(String, u32), Vec<(u64, u64)>>,
    /// The replicas of each partition, by (topic, partition): the test topic's and the consumer
    /// offsets topic's.
    pub replicas: BTreeMap<(String, u32), Replicas>,
    /// Each group's records of the offsets topic, as the final leader of its partition holds
    /// them, in log order. Groups not listed are not checked against it.
    pub offsets_log: BTreeMap<String, Vec<OffsetsEntry>>,
    /// Every broker's copy of the metadata log, when the run read them.
    pub metadata: Option<MetadataCopies>,
}

/// The copies of the metadata log after the run. Its entries carry no partition offsets, so
/// they are compared by Raft index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MetadataCopies {
    /// The metadata leader at the end: its copy is the reference.
    pub leader: u32,
    /// The index every broker had reached and applied (their metrics agreed); `None` when they
    /// never agreed, and then only the entries the copies share are compared.
    pub applied_by_all: Option<u64>,
    /// Every entry of each broker's copy, as read from its files, by broker id: Raft index,
    /// term and the CRC of its records (offsets are each copy's own, and left at 0).
    pub logs: BTreeMap<u32, Vec<Batch>>,
}

/// A record of the offsets topic that concerns the test topic, as written by the coordinator
/// (JSON, `type` `commit`, `reset` or `delete_group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffsetsEntry {
    /// A member's commit of `offset` for `partition`.
    Commit { partition: u32, offset: u64 },
    /// The group's offsets from here on: a compacted image (the coordinator's, before it lets
    /// the log before it go) or an operator's reset.
    Image { offsets: Vec<(u32, u64)> },
    /// The group and its offsets were deleted.
    Deleted,
}

impl OffsetsEntry {
    /// The group and entry of one offsets-topic record value, if it concerns `topic` (a
    /// deletion always does); `None` for records of other topics or that do not parse.
    pub fn parse(value: &[u8], topic: &str) -> Option<(String, Self)> {
        let v: serde_json::Value = serde_json::from_slice(value).ok()?;
        let group = v.get("group")?.as_str()?.to_owned();
        let partition_of = |tp: &serde_json::Value| -> Option<u32> {
            (tp.get("topic")?.as_str()? == topic)
                .then(|| tp.get("partition")?.as_u64())
                .flatten()
                .map(|p| p as u32)
        };
        let entry = match v.get("type")?.as_str()? {
            "commit" => Self::Commit {
                partition: partition_of(v.get("partition")?)?,
                offset: v.get("offset")?.as_u64()?,
            },
            "reset" => {
                let offsets: Vec<(u32, u64)> = v
                    .get("offsets")?
                    .as_array()?
                    .iter()
                    .filter_map(|pair| Some((partition_of(pair.get(0)?)?, pair.get(1)?.as_u64()?)))
                    .collect();
                if offsets.is_empty() {
                    return None;
                }
                Self::Image { offsets }
            }
            "delete_group" => Self::Deleted,
            _ => return None,
        };
        Some((group, entry))
    }
}

/// One member of a consumer group (one task: it may leave and join again).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Member {
    pub group: String,
    /// In the order they happened.
    pub events: Vec<MemberEvent>,
}

/// What a member did, recorded as it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// The rebalance listener's `on_assigned`: the member consumes the partition from now on
    /// (its committed offset was looked up before this).
    Assigned { at: u64, partition: u32 },
    /// `on_revoked` or `on_lost`: the member stopped consuming the partition.
    Released { at: u64, partition: u32 },
    /// A poll that returned records (partition, offset, value), in the order returned: started
    /// at `started`, returned by `returned`.
    Polled {
        started: u64,
        returned: u64,
        records: Vec<(u32, u64, String)>,
    },
    /// A commit of the member's positions (partition, next offset) of every partition it held:
    /// sent at `sent`, answered at `done`.
    Committed {
        sent: u64,
        done: u64,
        offsets: Vec<(u32, u64)>,
        outcome: CommitOutcome,
    },
}

/// What became of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Ok,
    /// A definite refusal: nothing was committed.
    Refused,
    /// No definite answer: it may have been committed.
    Unknown,
}

/// The copies of one partition after the run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replicas {
    /// The broker that led the partition at the end: its copy is the reference.
    pub leader: u32,
    /// The leader's high watermark once every replica was reported in sync.
    pub high_watermark: u64,
    /// Whether retention (for the offsets topic, its compaction) may have deleted the start of
    /// the log, so that copies may start at different places.
    pub retention_deleted: bool,
    /// Every batch of each broker's copy, as read from its files, by broker id.
    pub logs: BTreeMap<u32, Vec<Batch>>,
}

/// One batch of a replica's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub raft_index: u64,
    pub term: u64,
    pub base_offset: u64,
    /// The offset after its last record; equal to `base_offset` for a batch without records
    /// (a Raft entry that carries no data).
    pub next_offset: u64,
    pub crc: u32,
}

impl Batch {
    /// Whether it holds records.
    pub fn has_data(&self) -> bool {
        self.next_offset > self.base_offset
    }
}

impl From<(u64, u64, u64, u64, u32)> for Batch {
    /// From a `cluster::BatchRow`: (raft index, raft term, base offset, next offset, crc).
    fn from((raft_index, term, base_offset, next_offset, crc): (u64, u64, u64, u64, u32)) -> Self {
        Self {
            raft_index,
            term,
            base_offset,
            next_offset,
            crc,
        }
    }
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "raft {}/term {} offsets {}..{} crc {:08x}",
            self.raft_index, self.term, self.base_offset, self.next_offset, self.crc
        )
    }
}
