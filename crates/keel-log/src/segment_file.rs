//! Segment file names and the 64-byte segment header.
//!
//! ```text
//! off len field
//!   0   8 magic "KEELSEG1"
//!   8   4 format version (1)
//!  12   4 reserved (0)
//!  16   8 base_offset
//!  24   8 base_raft_index
//!  32   8 created_at_ms
//!  40  20 reserved (0)
//!  60   4 crc32c of bytes 0..60
//! ```

use std::path::{Path, PathBuf};

use crate::le;

pub(crate) const SEGMENT_HEADER_LEN: u64 = 64;
const MAGIC: &[u8; 8] = b"KEELSEG1";
const VERSION: u32 = 1;

pub(crate) const LOG_SUFFIX: &str = ".log";
pub(crate) const INDEX_SUFFIX: &str = ".index";
pub(crate) const TIME_SUFFIX: &str = ".timeindex";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub base_offset: u64,
    pub base_raft_index: u64,
    pub created_at_ms: i64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut out = [0u8; SEGMENT_HEADER_LEN as usize];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.base_offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.base_raft_index.to_le_bytes());
        out[32..40].copy_from_slice(&self.created_at_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, String> {
        let h = buf
            .get(..SEGMENT_HEADER_LEN as usize)
            .ok_or_else(|| "file shorter than the segment header".to_owned())?;
        if &h[0..8] != MAGIC {
            return Err("bad segment magic".to_owned());
        }
        let u32_at = |i: usize| le::u32_at(h, i);
        let u64_at = |i: usize| le::u64_at(h, i);
        if crc32c::crc32c(&h[0..60]) != u32_at(60) {
            return Err("segment header CRC mismatch".to_owned());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "unsupported segment format version {version}, expected {VERSION}"
            ));
        }
        Ok(Self {
            base_offset: u64_at(16),
            base_raft_index: u64_at(24),
            created_at_ms: u64_at(32) as i64,
        })
    }
}

pub(crate) fn file_stem(base_offset: u64) -> String {
    format!("{base_offset:020}")
}

pub(crate) fn paths(dir: &Path, base_offset: u64) -> [PathBuf; 3] {
    let stem = file_stem(base_offset);
    [LOG_SUFFIX, INDEX_SUFFIX, TIME_SUFFIX].map(|s| dir.join(format!("{stem}{s}")))
}

/// Parses `00000000000000001234.log` into 1234.
pub(crate) fn parse_log_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(LOG_SUFFIX)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_checks() {
        let h = SegmentHeader {
            base_offset: 42,
            base_raft_index: 7,
            created_at_ms: 1_700_000_000_000,
        };
        let enc = h.encode();
        assert_eq!(SegmentHeader::decode(&enc), Ok(h));
        let mut bad = enc;
        bad[20] ^= 1;
        assert!(SegmentHeader::decode(&bad).is_err());
        assert!(SegmentHeader::decode(&enc[..10]).is_err());
        assert!(SegmentHeader::decode(&[0u8; 64]).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(parse_log_name("00000000000000001234.log"), Some(1234));
        assert_eq!(parse_log_name("1234.log"), None);
        assert_eq!(parse_log_name("0000000000000000123x.log"), None);
        assert_eq!(parse_log_name("00000000000000001234.index"), None);
        assert_eq!(file_stem(5), "00000000000000000005");
    }
}
