//! Records inside a batch (Kafka record format v2, zigzag varints).
//!
//! ```text
//! length          varint   bytes after this field
//! attributes      int8     0
//! timestamp_delta varlong  from the batch's first_timestamp
//! offset_delta    varint   from the batch's base_offset
//! key_length      varint   -1 for a null key
//! key             bytes
//! value_length    varint   -1 for a null value
//! value           bytes
//! header_count    varint
//!   key_length varint, key (UTF-8), value_length varint (-1 null), value
//! ```

use bytes::Bytes;

use super::BatchError;
use super::varint::{get_varint, get_varlong, put_varint, put_varlong, varlong_len};

/// A decoded record with its absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<RecordHeader>,
}

/// One record header. Keys are UTF-8 as in Kafka; values are arbitrary bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub key: String,
    pub value: Option<Bytes>,
}

/// Borrowed input for one record, used when building a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordRef<'a> {
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

fn opt_len(b: Option<&[u8]>) -> i64 {
    b.map_or(-1, |b| b.len() as i64)
}

fn body_len(rec: &RecordRef<'_>, ts_delta: i64, offset_delta: i32) -> usize {
    let mut n = 1 + varlong_len(ts_delta) + varlong_len(i64::from(offset_delta));
    for field in [rec.key, rec.value] {
        n += varlong_len(opt_len(field)) + field.map_or(0, <[u8]>::len);
    }
    n += varlong_len(rec.headers.len() as i64);
    for (k, v) in rec.headers {
        n += varlong_len(k.len() as i64) + k.len();
        n += varlong_len(opt_len(*v)) + v.map_or(0, <[u8]>::len);
    }
    n
}

fn put_bytes(buf: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_varlong(buf, b.len() as i64);
            buf.extend_from_slice(b);
        }
        None => put_varint(buf, -1),
    }
}

/// Appends one encoded record to `buf`.
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    rec: &RecordRef<'_>,
    ts_delta: i64,
    offset_delta: i32,
) {
    let len = body_len(rec, ts_delta, offset_delta);
    buf.reserve(len + 10);
    put_varlong(buf, len as i64);
    buf.push(0);
    put_varlong(buf, ts_delta);
    put_varint(buf, offset_delta);
    put_bytes(buf, rec.key);
    put_bytes(buf, rec.value);
    put_varlong(buf, rec.headers.len() as i64);
    for (k, v) in rec.headers {
        put_bytes(buf, Some(k.as_bytes()));
        put_bytes(buf, *v);
    }
}

/// Reads a length-prefixed optional byte field as a zero-copy slice of `src` (`cur` must be a
/// view into `src`).
fn get_bytes(src: &Bytes, cur: &mut &[u8]) -> Result<Option<Bytes>, BatchError> {
    Ok(skip_bytes(cur)?.map(|field| src.slice_ref(field)))
}

/// Decodes one record from the front of `cur` (a view into `src`), advancing it.
pub(crate) fn decode_record(
    src: &Bytes,
    cur: &mut &[u8],
    base_offset: u64,
    first_timestamp: i64,
) -> Result<(i32, Record), BatchError> {
    let len = get_varint(cur)?;
    if len < 0 || len as usize > cur.len() {
        return Err(BatchError::MalformedRecord("record length out of bounds"));
    }
    let (body, rest) = cur.split_at(len as usize);
    // Parse within the record's own bounds so a bad length cannot make fields bleed into the next.
    let start = src.len() - cur.len();
    let sub = src.slice(start..start + len as usize);
    let mut b: &[u8] = body;
    let (_attrs, after) = b
        .split_first()
        .ok_or(BatchError::Truncated { what: "record" })?;
    b = after;
    let ts_delta = get_varlong(&mut b)?;
    let offset_delta = get_varint(&mut b)?;
    if offset_delta < 0 {
        return Err(BatchError::MalformedRecord("negative offset delta"));
    }
    let key = get_bytes(&sub, &mut b)?;
    let value = get_bytes(&sub, &mut b)?;
    let header_count = get_varint(&mut b)?;
    if header_count < 0 || header_count as usize > b.len() {
        return Err(BatchError::MalformedRecord("header count out of bounds"));
    }
    let mut headers = Vec::with_capacity(header_count as usize);
    for _ in 0..header_count {
        let k = get_bytes(&sub, &mut b)?.ok_or(BatchError::MalformedRecord("null header key"))?;
        let key = String::from_utf8(k.to_vec())
            .map_err(|_| BatchError::MalformedRecord("header key is not UTF-8"))?;
        let value = get_bytes(&sub, &mut b)?;
        headers.push(RecordHeader { key, value });
    }
    if !b.is_empty() {
        return Err(BatchError::MalformedRecord("trailing bytes in record"));
    }
    *cur = rest;
    let timestamp = first_timestamp
        .checked_add(ts_delta)
        .ok_or(BatchError::MalformedRecord("timestamp overflows"))?;
    Ok((
        offset_delta,
        Record {
            offset: base_offset + offset_delta as u64,
            timestamp,
            key,
            value,
            headers,
        },
    ))
}

/// Checks one record's structure at the front of `cur` without allocating, advancing `cur`.
/// Returns its offset delta.
pub(crate) fn check_record(cur: &mut &[u8]) -> Result<i32, BatchError> {
    let len = get_varint(cur)?;
    if len < 0 || len as usize > cur.len() {
        return Err(BatchError::MalformedRecord("record length out of bounds"));
    }
    let (body, rest) = cur.split_at(len as usize);
    let mut b: &[u8] = body
        .split_first()
        .ok_or(BatchError::Truncated { what: "record" })?
        .1;
    get_varlong(&mut b)?;
    let offset_delta = get_varint(&mut b)?;
    if offset_delta < 0 {
        return Err(BatchError::MalformedRecord("negative offset delta"));
    }
    skip_bytes(&mut b)?;
    skip_bytes(&mut b)?;
    let header_count = get_varint(&mut b)?;
    if header_count < 0 || header_count as usize > b.len() {
        return Err(BatchError::MalformedRecord("header count out of bounds"));
    }
    for _ in 0..header_count {
        let key = skip_bytes(&mut b)?.ok_or(BatchError::MalformedRecord("null header key"))?;
        if std::str::from_utf8(key).is_err() {
            return Err(BatchError::MalformedRecord("header key is not UTF-8"));
        }
        skip_bytes(&mut b)?;
    }
    if !b.is_empty() {
        return Err(BatchError::MalformedRecord("trailing bytes in record"));
    }
    *cur = rest;
    Ok(offset_delta)
}

fn skip_bytes<'a>(cur: &mut &'a [u8]) -> Result<Option<&'a [u8]>, BatchError> {
    let len = get_varint(cur)?;
    if len < 0 {
        if len != -1 {
            return Err(BatchError::MalformedRecord("negative length other than -1"));
        }
        return Ok(None);
    }
    let len = len as usize;
    if len > cur.len() {
        return Err(BatchError::Truncated {
            what: "record field",
        });
    }
    let (field, rest) = cur.split_at(len);
    *cur = rest;
    Ok(Some(field))
}
