//! The wire format of the broker-to-broker Raft transport (`proto/keel/raft/v1/raft.proto`).
//!
//! The gRPC envelope ([`pb::RaftRequest`]) carries the group id, the target node id and the
//! openraft message as CBOR (`ciborium`). CBOR is binary: a normal entry's [`BatchData`]
//! (`Bytes`) is one length-prefixed byte string, so a batch costs its size plus a few bytes,
//! where JSON would spell every byte as a decimal number (about 3.5×).
//!
//! [`BatchData`]: crate::BatchData

use std::io;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::types::{SnapshotMeta, Vote};

/// Generated types and tonic client/server of `keel.raft.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("keel.raft.v1");
}

/// Default largest gRPC message either side encodes or accepts (64 MiB): far above
/// [`DEFAULT_MAX_APPEND_BYTES`], so a maximal append always fits.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Default byte budget of the entries in one AppendEntries message (8 MiB). A larger request is
/// cut and reported to openraft as a partial success, which then sends the rest.
pub const DEFAULT_MAX_APPEND_BYTES: usize = 8 << 20;

/// The payload of `InstallSnapshot`: the leader's vote and the whole snapshot.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "SD: Serialize", deserialize = "SD: DeserializeOwned"))]
pub struct InstallSnapshot<SD> {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub data: SD,
}

/// The payload of `ReadEntries`: committed entries from Raft index `from`, at most
/// `max_bytes` of them (at least one).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ReadEntries {
    pub from: u64,
    pub max_bytes: u64,
}

/// Encodes an openraft message as CBOR.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Bytes> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("cbor encode: {e}")))?;
    Ok(Bytes::from(out))
}

/// Decodes an openraft message from CBOR.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    ciborium::from_reader(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("cbor decode: {e}")))
}
