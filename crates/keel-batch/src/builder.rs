//! Building encoded batches (used by clients and tests; the log itself never re-encodes).

use super::header::{CRC_START, HEADER_LEN, LENGTH_PREFIX, MAGIC_V1, NO_PRODUCER_ID};
use super::record::{RecordRef, encode_record};
use super::{Attributes, BatchError, BatchHeader, Compression, TimestampType, compression};

/// Idempotent-producer fields of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerInfo {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl Default for ProducerInfo {
    fn default() -> Self {
        Self {
            producer_id: NO_PRODUCER_ID,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }
}

/// Accumulates records and encodes them as one batch.
#[derive(Debug)]
pub struct BatchBuilder {
    compression: Compression,
    timestamp_type: TimestampType,
    producer: ProducerInfo,
    /// Uncompressed batches are encoded in place after a reserved header, so `build` copies
    /// nothing.
    buf: Vec<u8>,
    count: u32,
    first_timestamp: Option<i64>,
    max_timestamp: i64,
}

impl BatchBuilder {
    pub fn new(compression: Compression) -> Self {
        Self::with_capacity(compression, 0)
    }

    pub fn with_capacity(compression: Compression, bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + bytes);
        buf.resize(HEADER_LEN, 0);
        Self {
            compression,
            timestamp_type: TimestampType::CreateTime,
            producer: ProducerInfo::default(),
            buf,
            count: 0,
            first_timestamp: None,
            max_timestamp: i64::MIN,
        }
    }

    pub fn producer(mut self, producer: ProducerInfo) -> Self {
        self.producer = producer;
        self
    }

    /// Sets the producer fields of a builder already in use (before `build`).
    pub fn set_producer(&mut self, producer: ProducerInfo) {
        self.producer = producer;
    }

    pub fn timestamp_type(mut self, t: TimestampType) -> Self {
        self.timestamp_type = t;
        self
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Uncompressed size so far, header included.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Adds a record. Fails only when the batch already holds `i32::MAX` records.
    pub fn push(&mut self, rec: &RecordRef<'_>) -> Result<(), BatchError> {
        let delta = i32::try_from(self.count).map_err(|_| BatchError::TooLarge {
            size: u64::from(self.count),
            limit: i32::MAX as u64,
        })?;
        let first = *self.first_timestamp.get_or_insert(rec.timestamp);
        let ts_delta = rec.timestamp.wrapping_sub(first);
        encode_record(&mut self.buf, rec, ts_delta, delta);
        self.max_timestamp = self.max_timestamp.max(rec.timestamp);
        self.count += 1;
        Ok(())
    }

    /// Encodes the batch with base offset, term and index 0 (the log stamps them on append).
    pub fn build(self) -> Result<Vec<u8>, BatchError> {
        if self.count == 0 {
            return Err(BatchError::Empty);
        }
        let first = self.first_timestamp.unwrap_or(0);
        let mut out = match self.compression {
            Compression::None => self.buf,
            codec => {
                let mut out = Vec::with_capacity(HEADER_LEN + self.buf.len() / 2);
                out.resize(HEADER_LEN, 0);
                compression::compress(codec, &self.buf[HEADER_LEN..], &mut out)?;
                out
            }
        };
        let attributes = Attributes {
            compression: self.compression,
            timestamp_type: self.timestamp_type,
            control: false,
        };
        let header = unstamped_header(
            attributes,
            self.count - 1,
            self.count,
            first,
            self.max_timestamp.max(first),
            self.producer,
        );
        finish(header, &mut out)?;
        Ok(out)
    }
}

/// Rewrites the producer fields of an encoded batch and its CRC (a producer that restarts its
/// sequences re-stamps batches it had already encoded). Checks the header first.
pub fn set_producer(batch: &mut [u8], producer: ProducerInfo) -> Result<(), BatchError> {
    let mut header = BatchHeader::parse(batch)?;
    if header.total_len() != batch.len() {
        return Err(BatchError::Truncated { what: "batch" });
    }
    header.producer_id = producer.producer_id;
    header.producer_epoch = producer.producer_epoch;
    header.base_sequence = producer.base_sequence;
    finish(header, batch)
}

/// Encodes a control batch: an opaque payload (e.g. a Raft membership change) that takes no
/// offsets.
pub fn control_batch(payload: &[u8], timestamp: i64) -> Result<Vec<u8>, BatchError> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(payload);
    let attributes = Attributes {
        compression: Compression::None,
        timestamp_type: TimestampType::CreateTime,
        control: true,
    };
    let header = unstamped_header(
        attributes,
        0,
        0,
        timestamp,
        timestamp,
        ProducerInfo::default(),
    );
    finish(header, &mut out)?;
    Ok(out)
}

/// The header of a freshly encoded batch: base offset, term and index stay 0 because the log
/// stamps them on append, and `finish` fills in the length and CRC once the body is known.
fn unstamped_header(
    attributes: Attributes,
    last_offset_delta: u32,
    record_count: u32,
    first_timestamp: i64,
    max_timestamp: i64,
    producer: ProducerInfo,
) -> BatchHeader {
    BatchHeader {
        base_offset: 0,
        batch_length: 0,
        raft_term: 0,
        raft_index: 0,
        magic: MAGIC_V1,
        crc: 0,
        attributes,
        last_offset_delta,
        first_timestamp,
        max_timestamp,
        producer_id: producer.producer_id,
        producer_epoch: producer.producer_epoch,
        base_sequence: producer.base_sequence,
        record_count,
    }
}

fn finish(mut header: BatchHeader, out: &mut [u8]) -> Result<(), BatchError> {
    header.batch_length =
        u32::try_from(out.len() - LENGTH_PREFIX).map_err(|_| BatchError::TooLarge {
            size: out.len() as u64,
            limit: u64::from(u32::MAX),
        })?;
    let (head, _) = out
        .split_first_chunk_mut::<HEADER_LEN>()
        .ok_or(BatchError::Truncated { what: "batch" })?;
    header.write_to(head);
    header.crc = crc32c::crc32c(&out[CRC_START..]);
    let (head, _) = out
        .split_first_chunk_mut::<HEADER_LEN>()
        .ok_or(BatchError::Truncated { what: "batch" })?;
    header.write_to(head);
    Ok(())
}
