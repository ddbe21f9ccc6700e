//! Zigzag varints as in Kafka's record format (protobuf-style base-128, least significant group first).
//!
//! Kept bit-for-bit compatible with Kafka's `ByteUtils.writeVarint/writeVarlong` so a future Kafka
//! protocol gateway can translate record sections without re-encoding them.

use super::BatchError;

/// The longest encoding of a zigzag `i64` (10 groups of 7 bits).
pub(crate) const MAX_VARLONG_LEN: usize = 10;

pub(crate) fn put_varlong(buf: &mut Vec<u8>, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

pub(crate) fn put_varint(buf: &mut Vec<u8>, value: i32) {
    put_varlong(buf, i64::from(value));
}

pub(crate) fn varlong_len(value: i64) -> usize {
    let v = ((value << 1) ^ (value >> 63)) as u64;
    let bits = 64 - v.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Reads a zigzag varlong from the front of `buf`, advancing it.
pub(crate) fn get_varlong(buf: &mut &[u8]) -> Result<i64, BatchError> {
    let mut raw: u64 = 0;
    for i in 0..MAX_VARLONG_LEN {
        let Some((&b, rest)) = buf.split_first() else {
            return Err(BatchError::Truncated { what: "varint" });
        };
        *buf = rest;
        // The tenth group may only carry the single remaining bit.
        if i == MAX_VARLONG_LEN - 1 && b > 1 {
            return Err(BatchError::MalformedRecord("varint longer than 64 bits"));
        }
        raw |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    Err(BatchError::MalformedRecord("varint longer than 64 bits"))
}

/// Reads a zigzag varint that must fit an `i32`.
pub(crate) fn get_varint(buf: &mut &[u8]) -> Result<i32, BatchError> {
    let v = get_varlong(buf)?;
    i32::try_from(v).map_err(|_| BatchError::MalformedRecord("varint out of i32 range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings_match_kafka() {
        let cases: &[(i64, &[u8])] = &[
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (63, &[0x7e]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (300, &[0xd8, 0x04]),
        ];
        for (v, enc) in cases {
            let mut buf = Vec::new();
            put_varlong(&mut buf, *v);
            assert_eq!(&buf[..], *enc, "encoding of {v}");
            assert_eq!(varlong_len(*v), enc.len());
        }
    }

    #[test]
    fn rejects_overlong_and_truncated() {
        let mut over: &[u8] = &[0xff; 11];
        assert!(get_varlong(&mut over).is_err());
        let mut trunc: &[u8] = &[0x80, 0x80];
        assert!(matches!(
            get_varlong(&mut trunc),
            Err(BatchError::Truncated { .. })
        ));
        let mut big = Vec::new();
        put_varlong(&mut big, i64::from(i32::MAX) + 1);
        assert!(get_varint(&mut &big[..]).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip(v in any::<i64>()) {
            let mut buf = Vec::new();
            put_varlong(&mut buf, v);
            prop_assert_eq!(buf.len(), varlong_len(v));
            let mut s = &buf[..];
            prop_assert_eq!(get_varlong(&mut s)?, v);
            prop_assert!(s.is_empty());
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut s = &bytes[..];
            let _ = get_varlong(&mut s);
        }
    }
}
