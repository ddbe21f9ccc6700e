//! Validating scans of a segment's bytes for recovery: checking CRCs and contiguity, and
//! finding where the data of a sealed file ends.

use keel_batch::{BatchHeader, verify_crc};

use super::{Segment, Tail};
use crate::segment_file::SEGMENT_HEADER_LEN;

impl Segment {
    /// Scans batches from `pos` checking CRCs and contiguity with `tail`, returning the new
    /// tail at the last valid batch and the batches found (position, header) and the reason the
    /// scan stopped, if it hit invalid bytes rather than the zero fill or end of file.
    pub fn scan(
        &self,
        log: &[u8],
        mut tail: Tail,
    ) -> (Tail, Vec<(u64, BatchHeader)>, Option<String>) {
        let mut found = Vec::new();
        let file_end = log.len() as u64;
        loop {
            let pos = tail.data_len;
            let rest = log.get(pos as usize..).unwrap_or(&[]);
            // The preallocated tail is zero: a zero length marks the end of the data.
            if rest.len() < 4 || rest[..4].iter().all(|b| *b == 0) {
                return (tail, found, None);
            }
            let header = match BatchHeader::parse(rest) {
                Ok(h) => h,
                Err(e) => return (tail, found, Some(e.to_string())),
            };
            let Some(batch) = rest.get(..header.total_len()) else {
                return (
                    tail,
                    found,
                    Some(format!("batch extends past end of file ({file_end})")),
                );
            };
            if let Err(e) = verify_crc(&header, batch) {
                return (tail, found, Some(e.to_string()));
            }
            if header.base_offset != tail.next_offset
                || header.raft_index != tail.next_raft_index
                || header.raft_term < tail.last_term
            {
                return (
                    tail,
                    found,
                    Some(format!(
                        "batch (offset {}, index {}, term {}) does not continue the log (offset {}, index {}, term {})",
                        header.base_offset,
                        header.raft_index,
                        header.raft_term,
                        tail.next_offset,
                        tail.next_raft_index,
                        tail.last_term
                    )),
                );
            }
            found.push((pos, header));
            tail = Tail {
                data_len: pos + header.total_len() as u64,
                next_offset: header.next_offset(),
                next_raft_index: header.raft_index + 1,
                last_term: header.raft_term,
                max_timestamp: if header.attributes.control {
                    tail.max_timestamp
                } else {
                    tail.max_timestamp.max(header.max_timestamp)
                },
            };
        }
    }

    /// Where the batches of a sealed file end: a sealed file can carry a zero-filled tail after
    /// a truncation (files are never shrunk below what readers may hold), so the end is found
    /// by walking headers from the last index entry to the first zero length (O(interval)).
    pub fn end_of_data(&self, file_len: u64) -> u64 {
        let map = self.map(0);
        let limit = file_len.min(map.len() as u64);
        let mut pos = self
            .last_index_entry()
            .map_or(SEGMENT_HEADER_LEN, |e| u64::from(e.position))
            .min(limit);
        while pos + 4 <= limit {
            let Some(rest) = map.get(pos as usize..limit as usize) else {
                break;
            };
            let Ok(h) = BatchHeader::parse(rest) else {
                break;
            };
            let end = pos + h.total_len() as u64;
            if end > limit {
                break;
            }
            pos = end;
        }
        // Anything else past the last whole batch other than zeros is left for the read path's
        // CRC checks to report.
        if map
            .get(pos as usize..limit as usize)
            .is_some_and(|r| r.iter().all(|b| *b == 0))
        {
            pos
        } else {
            limit
        }
    }
}
