//! The openraft type configuration of a partition group.

use std::fmt;

use bytes::Bytes;
use keel_batch::VerifiedBatch;
use serde::{Deserialize, Serialize};

/// One encoded keel record batch: the application data of a normal Raft entry.
///
/// On the way in (client write, replication) it is the batch as produced or as read from the
/// leader's log; the log stamps base offset, term and Raft index on append. On the way out
/// (read back from the log) the bytes are a zero-copy slice of the segment mapping, stamped.
///
/// A batch the broker verified when it took it from a client ([`BatchData::verified`]) is
/// appended by the leader's log without a second CRC pass. That proof never travels: on the
/// wire a batch is its bytes alone, and a follower's log checks what it receives.
#[derive(Clone)]
pub struct BatchData(Repr);

#[derive(Clone)]
enum Repr {
    Raw(Bytes),
    Verified(VerifiedBatch),
}

impl BatchData {
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Self(Repr::Raw(bytes.into()))
    }

    /// A batch whose header, length and CRC were checked (see [`VerifiedBatch`]).
    pub fn verified(batch: VerifiedBatch) -> Self {
        Self(Repr::Verified(batch))
    }

    pub fn bytes(&self) -> &Bytes {
        match &self.0 {
            Repr::Raw(b) => b,
            Repr::Verified(v) => v.bytes(),
        }
    }

    /// The check made when the batch was taken in, if this process made it.
    pub fn as_verified(&self) -> Option<&VerifiedBatch> {
        match &self.0 {
            Repr::Raw(_) => None,
            Repr::Verified(v) => Some(v),
        }
    }
}

impl PartialEq for BatchData {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for BatchData {}

impl Serialize for BatchData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for BatchData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Bytes::deserialize(d).map(Self::new)
    }
}

impl fmt::Debug for BatchData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BatchData({} bytes)", self.bytes().len())
    }
}

impl fmt::Display for BatchData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch({}B)", self.bytes().len())
    }
}

/// The response to a client write once its entry is applied: where the batch landed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendAck {
    /// Offset of the batch's first record (for a control entry: the next offset).
    pub base_offset: u64,
    /// The offset after the batch's last record.
    pub next_offset: u64,
}

openraft::declare_raft_types!(
    /// Type configuration of a partition's Raft group. The committed leader id is only the
    /// term (`leader_id_std`), which is what a keel batch header stores as `raft_term`.
    pub KeelRaft:
        D = BatchData,
        R = AppendAck,
        NodeId = u64,
        Node = openraft::BasicNode,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

pub type CommittedLeaderId = openraft::vote::leader_id_std::CommittedLeaderId<u64>;
pub type LogId = openraft::LogId<CommittedLeaderId>;
pub type Vote = openraft::impls::Vote<openraft::impls::leader_id_std::LeaderId<u64, u64>>;
pub type Payload = openraft::EntryPayload<BatchData, u64, openraft::BasicNode>;
pub type Entry = openraft::Entry<CommittedLeaderId, Payload>;
pub type Membership = openraft::Membership<u64, openraft::BasicNode>;
pub type StoredMembership = openraft::StoredMembership<CommittedLeaderId, u64, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<CommittedLeaderId, u64, openraft::BasicNode>;

/// Builds a log id from a term and an index.
pub fn log_id(term: u64, index: u64) -> LogId {
    LogId::new_term_index(term, index)
}
pub type Snapshot<SD> = openraft::Snapshot<CommittedLeaderId, u64, openraft::BasicNode, SD>;
