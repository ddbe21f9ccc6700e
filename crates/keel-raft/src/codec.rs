//! Mapping between Raft entries and keel record batches.
//!
//! * `EntryPayload::Normal(batch)` is the batch itself (a data batch, never a control batch).
//! * `Blank` and `Membership` are keel control batches (they take no offsets) whose payload is
//!   a one-byte tag, followed for a membership by its JSON encoding.
//!
//! The Raft log id of every entry is in the batch header (`raft_term`, `raft_index`), so
//! reading an entry back needs nothing but the batch.

use std::io;

use bytes::Bytes;
use keel_batch::{BatchHeader, HEADER_LEN, VerifiedBatch, control_batch};

use crate::types::{BatchData, Entry, Membership, Payload, log_id};

/// Control payload tag of a blank entry (a new leader's first entry).
pub const TAG_BLANK: u8 = 1;
/// Control payload tag of a membership entry; JSON of `openraft::Membership` follows.
pub const TAG_MEMBERSHIP: u8 = 2;

/// The bytes to append for an entry: borrowed for normal entries (with the check the broker
/// made when it took the batch in, on the leader), encoded for control entries.
pub enum Encoded<'a> {
    Data(&'a [u8]),
    Verified(&'a VerifiedBatch),
    Control(Vec<u8>),
}

impl Encoded<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Encoded::Data(b) => b,
            Encoded::Verified(v) => v.bytes(),
            Encoded::Control(v) => v,
        }
    }
}

/// Encodes an entry's payload as one keel batch. `timestamp` stamps control batches.
pub fn encode(payload: &Payload, timestamp: i64) -> io::Result<Encoded<'_>> {
    let control = |body: &[u8]| {
        control_batch(body, timestamp)
            .map(Encoded::Control)
            .map_err(|e| io::Error::other(format!("encoding control batch: {e}")))
    };
    match payload {
        Payload::Normal(data) => {
            let control = match data.as_verified() {
                Some(v) => v.header().attributes.control,
                None => {
                    BatchHeader::parse(data.bytes())
                        .map_err(|e| {
                            io::Error::new(
                                io::ErrorKind::InvalidInput,
                                format!("normal entry: {e}"),
                            )
                        })?
                        .attributes
                        .control
                }
            };
            if control {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "normal entry holds a control batch",
                ));
            }
            Ok(match data.as_verified() {
                Some(v) => Encoded::Verified(v),
                None => Encoded::Data(data.bytes()),
            })
        }
        Payload::Blank => control(&[TAG_BLANK]),
        Payload::Membership(m) => {
            let mut body = vec![TAG_MEMBERSHIP];
            serde_json::to_writer(&mut body, m)
                .map_err(|e| io::Error::other(format!("encoding membership: {e}")))?;
            control(&body)
        }
    }
}

/// Rebuilds the entry stored as `batch` (one whole, CRC-checked batch with header `h`).
/// `batch` must be a slice of `backing`, which normal entries borrow without copying.
pub fn decode(h: &BatchHeader, batch: &[u8], backing: &Bytes) -> io::Result<Entry> {
    let id = log_id(h.raft_term, h.raft_index);
    let corrupt = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("entry {}-{}: {what}", h.raft_term, h.raft_index),
        )
    };
    if !h.attributes.control {
        return Ok(Entry {
            log_id: id,
            payload: Payload::Normal(BatchData::new(backing.slice_ref(batch))),
        });
    }
    let body = batch
        .get(HEADER_LEN..)
        .ok_or_else(|| corrupt("control batch shorter than its header".into()))?;
    let payload = match body.split_first() {
        Some((&TAG_BLANK, [])) => Payload::Blank,
        Some((&TAG_MEMBERSHIP, json)) => {
            let m: Membership = serde_json::from_slice(json)
                .map_err(|e| corrupt(format!("bad membership payload: {e}")))?;
            Payload::Membership(m)
        }
        Some((tag, _)) => return Err(corrupt(format!("unknown control tag {tag}"))),
        None => return Err(corrupt("empty control payload".into())),
    };
    Ok(Entry {
        log_id: id,
        payload,
    })
}
