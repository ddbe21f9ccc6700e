//! The fixed 73-byte record batch header. Layout (all integers little-endian):
//!
//! ```text
//! off len field                 covered by CRC
//!   0   4 batch_length          no  (bytes after this field; total = 4 + batch_length)
//!   4   1 magic (format version) no
//!   5   4 crc32c                -   (CRC32C of bytes 9..end)
//!   9   8 base_offset           yes (stamped by the log on append)
//!  17   8 raft_term             yes (stamped by the log on append)
//!  25   8 raft_index            yes (stamped by the log on append)
//!  33   2 attributes            yes
//!  35   4 last_offset_delta     yes
//!  39   8 first_timestamp       yes
//!  47   8 max_timestamp         yes
//!  55   8 producer_id           yes
//!  63   2 producer_epoch        yes
//!  65   4 base_sequence         yes
//!  69   4 record_count          yes
//!  73   … records (or a control payload), possibly compressed
//! ```
//!
//! Unlike Kafka, the fields the log assigns are inside the CRC, so a flipped bit anywhere in a
//! stored batch is detected (the length and magic are checked structurally). Stamping them does
//! not cost a second pass over the payload: the log keeps the payload's CRC from verification
//! and combines it with the CRC of the 24 stamped bytes (`crc::combine`, O(log n)).

use super::{BatchError, Compression};

pub const HEADER_LEN: usize = 73;
pub const MAGIC_V1: u8 = 1;
/// Bytes before `batch_length`'s coverage starts (base_offset + batch_length).
pub const LENGTH_PREFIX: usize = 4;
pub(crate) const CRC_START: usize = 9;
/// The stamped fields end here; the rest of the batch is the payload whose CRC is reused.
pub const STAMP_END: usize = 33;

pub(crate) const OFF_LENGTH: usize = 0;
pub(crate) const OFF_MAGIC: usize = 4;
pub(crate) const OFF_CRC: usize = 5;
pub(crate) const OFF_BASE_OFFSET: usize = 9;
pub(crate) const OFF_TERM: usize = 17;
pub(crate) const OFF_INDEX: usize = 25;
const OFF_ATTRIBUTES: usize = 33;
const OFF_LAST_DELTA: usize = 35;
const OFF_FIRST_TS: usize = 39;
const OFF_MAX_TS: usize = 47;
const OFF_PRODUCER_ID: usize = 55;
const OFF_PRODUCER_EPOCH: usize = 63;
const OFF_BASE_SEQUENCE: usize = 65;
const OFF_RECORD_COUNT: usize = 69;

const ATTR_COMPRESSION_MASK: u16 = 0b111;
const ATTR_LOG_APPEND_TIME: u16 = 1 << 3;
const ATTR_CONTROL: u16 = 1 << 5;
const ATTR_KNOWN: u16 = ATTR_COMPRESSION_MASK | ATTR_LOG_APPEND_TIME | ATTR_CONTROL;

/// Producer id meaning "not an idempotent producer".
pub const NO_PRODUCER_ID: i64 = -1;

/// Which clock the batch timestamps come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    CreateTime,
    LogAppendTime,
}

/// Decoded batch attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributes {
    pub compression: Compression,
    pub timestamp_type: TimestampType,
    /// A control batch carries an opaque payload (Raft membership or blank entries) and takes no
    /// offsets.
    pub control: bool,
}

impl Attributes {
    pub fn to_bits(self) -> u16 {
        let mut bits = self.compression as u16;
        if self.timestamp_type == TimestampType::LogAppendTime {
            bits |= ATTR_LOG_APPEND_TIME;
        }
        if self.control {
            bits |= ATTR_CONTROL;
        }
        bits
    }

    pub fn from_bits(bits: u16) -> Result<Self, BatchError> {
        if bits & !ATTR_KNOWN != 0 {
            return Err(BatchError::UnknownAttributes(bits));
        }
        Ok(Self {
            compression: Compression::from_id((bits & ATTR_COMPRESSION_MASK) as u8)?,
            timestamp_type: if bits & ATTR_LOG_APPEND_TIME != 0 {
                TimestampType::LogAppendTime
            } else {
                TimestampType::CreateTime
            },
            control: bits & ATTR_CONTROL != 0,
        })
    }
}

/// The decoded fixed header of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    pub batch_length: u32,
    pub raft_term: u64,
    pub raft_index: u64,
    pub magic: u8,
    pub crc: u32,
    pub attributes: Attributes,
    pub last_offset_delta: u32,
    pub first_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: u32,
}

impl BatchHeader {
    /// Total encoded size of the batch, header included.
    pub fn total_len(&self) -> usize {
        LENGTH_PREFIX + self.batch_length as usize
    }

    /// How many offsets this batch occupies: zero for control batches.
    pub fn offset_count(&self) -> u64 {
        if self.attributes.control {
            0
        } else {
            u64::from(self.last_offset_delta) + 1
        }
    }

    /// The offset after this batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + self.offset_count()
    }

    /// The last offset in the batch. For a control batch (no offsets) this is `base_offset - 1`,
    /// saturating, so that "batch ends before X" comparisons work uniformly.
    pub fn last_offset(&self) -> u64 {
        (self.base_offset + self.offset_count()).saturating_sub(1)
    }

    /// Parses and checks the header at the front of `buf`: magic, attributes, length bounds
    /// and field consistency. Does not verify the CRC (see [`verify_crc`]).
    pub fn parse(buf: &[u8]) -> Result<Self, BatchError> {
        let h: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(BatchError::Truncated {
                what: "batch header",
            })?;
        let magic = h[OFF_MAGIC];
        if magic != MAGIC_V1 {
            return Err(BatchError::UnsupportedMagic(magic));
        }
        let batch_length = u32_at(h, OFF_LENGTH);
        if (batch_length as usize) < HEADER_LEN - LENGTH_PREFIX {
            return Err(BatchError::BadLength {
                length: batch_length,
                reason: "shorter than the batch header",
            });
        }
        let header = Self {
            base_offset: u64_at(h, OFF_BASE_OFFSET),
            batch_length,
            raft_term: u64_at(h, OFF_TERM),
            raft_index: u64_at(h, OFF_INDEX),
            magic,
            crc: u32_at(h, OFF_CRC),
            attributes: Attributes::from_bits(u16::from_le_bytes([
                h[OFF_ATTRIBUTES],
                h[OFF_ATTRIBUTES + 1],
            ]))?,
            last_offset_delta: u32_at(h, OFF_LAST_DELTA),
            first_timestamp: u64_at(h, OFF_FIRST_TS) as i64,
            max_timestamp: u64_at(h, OFF_MAX_TS) as i64,
            producer_id: u64_at(h, OFF_PRODUCER_ID) as i64,
            producer_epoch: i16::from_le_bytes([h[OFF_PRODUCER_EPOCH], h[OFF_PRODUCER_EPOCH + 1]]),
            base_sequence: u32_at(h, OFF_BASE_SEQUENCE) as i32,
            record_count: u32_at(h, OFF_RECORD_COUNT),
        };
        header.check_fields()?;
        Ok(header)
    }

    fn check_fields(&self) -> Result<(), BatchError> {
        if self.attributes.control {
            if self.record_count != 0 || self.last_offset_delta != 0 {
                return Err(BatchError::Inconsistent(
                    "control batch must have record_count 0 and last_offset_delta 0",
                ));
            }
            return Ok(());
        }
        if self.record_count == 0 {
            return Err(BatchError::Inconsistent("record_count is 0"));
        }
        if u64::from(self.last_offset_delta) + 1 < u64::from(self.record_count) {
            return Err(BatchError::Inconsistent(
                "last_offset_delta + 1 is smaller than record_count",
            ));
        }
        if self.max_timestamp < self.first_timestamp {
            return Err(BatchError::Inconsistent(
                "max_timestamp is before first_timestamp",
            ));
        }
        if self.base_offset.checked_add(self.offset_count()).is_none() {
            return Err(BatchError::Inconsistent("offsets overflow u64"));
        }
        Ok(())
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out` (CRC included as stored
    /// in `self.crc`).
    pub fn write_to(&self, out: &mut [u8; HEADER_LEN]) {
        out[OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8].copy_from_slice(&self.base_offset.to_le_bytes());
        out[OFF_LENGTH..OFF_LENGTH + 4].copy_from_slice(&self.batch_length.to_le_bytes());
        out[OFF_TERM..OFF_TERM + 8].copy_from_slice(&self.raft_term.to_le_bytes());
        out[OFF_INDEX..OFF_INDEX + 8].copy_from_slice(&self.raft_index.to_le_bytes());
        out[OFF_MAGIC] = self.magic;
        out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&self.crc.to_le_bytes());
        out[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2]
            .copy_from_slice(&self.attributes.to_bits().to_le_bytes());
        out[OFF_LAST_DELTA..OFF_LAST_DELTA + 4]
            .copy_from_slice(&self.last_offset_delta.to_le_bytes());
        out[OFF_FIRST_TS..OFF_FIRST_TS + 8].copy_from_slice(&self.first_timestamp.to_le_bytes());
        out[OFF_MAX_TS..OFF_MAX_TS + 8].copy_from_slice(&self.max_timestamp.to_le_bytes());
        out[OFF_PRODUCER_ID..OFF_PRODUCER_ID + 8].copy_from_slice(&self.producer_id.to_le_bytes());
        out[OFF_PRODUCER_EPOCH..OFF_PRODUCER_EPOCH + 2]
            .copy_from_slice(&self.producer_epoch.to_le_bytes());
        out[OFF_BASE_SEQUENCE..OFF_BASE_SEQUENCE + 4]
            .copy_from_slice(&self.base_sequence.to_le_bytes());
        out[OFF_RECORD_COUNT..OFF_RECORD_COUNT + 4]
            .copy_from_slice(&self.record_count.to_le_bytes());
    }
}

/// Checks the CRC32C of a complete batch (`batch.len()` must equal the header's total length).
/// Returns the CRC of the payload after the stamped fields, for [`stamp`].
pub fn verify_crc(header: &BatchHeader, batch: &[u8]) -> Result<u32, BatchError> {
    let stamped = batch
        .get(CRC_START..STAMP_END)
        .ok_or(BatchError::Truncated {
            what: "batch header",
        })?;
    let payload = batch
        .get(STAMP_END..header.total_len())
        .ok_or(BatchError::Truncated { what: "batch body" })?;
    let payload_crc = crc32c::crc32c(payload);
    let actual = super::crc::combine(crc32c::crc32c(stamped), payload_crc, payload.len());
    if actual != header.crc {
        return Err(BatchError::CrcMismatch {
            expected: header.crc,
            actual,
        });
    }
    Ok(payload_crc)
}

/// Overwrites the log-assigned fields of a verified batch in place and updates its CRC, given
/// the payload CRC returned by [`verify_crc`].
pub fn stamp(
    batch: &mut [u8],
    base_offset: u64,
    raft_term: u64,
    raft_index: u64,
    payload_crc: u32,
) {
    let total = batch.len();
    stamp_prefix(
        batch,
        total,
        base_offset,
        raft_term,
        raft_index,
        payload_crc,
    );
}

/// [`stamp`] on a copy of the first [`STAMP_END`] bytes of a batch of `total_len` bytes, so a
/// writer can stamp the header without copying the whole batch.
pub fn stamp_prefix(
    prefix: &mut [u8],
    total_len: usize,
    base_offset: u64,
    raft_term: u64,
    raft_index: u64,
    payload_crc: u32,
) {
    let Some(stamped) = prefix.get_mut(CRC_START..STAMP_END) else {
        return;
    };
    stamped[0..8].copy_from_slice(&base_offset.to_le_bytes());
    stamped[8..16].copy_from_slice(&raft_term.to_le_bytes());
    stamped[16..24].copy_from_slice(&raft_index.to_le_bytes());
    let stamped_crc = crc32c::crc32c(stamped);
    let payload_len = total_len.saturating_sub(STAMP_END);
    let crc = super::crc::combine(stamped_crc, payload_crc, payload_len);
    if let Some(c) = prefix.get_mut(OFF_CRC..OFF_CRC + 4) {
        c.copy_from_slice(&crc.to_le_bytes());
    }
}

fn u32_at(h: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(h: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_le_bytes(b)
}
