//! Batch-level compression of the record section.

use super::BatchError;

/// Compression codec of a batch's record section (attribute bits 0-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Compression {
    #[default]
    None = 0,
    /// LZ4 block format, prefixed with the uncompressed length as a little-endian `u32`.
    Lz4 = 1,
    /// A single zstd frame (level 3).
    Zstd = 2,
}

impl Compression {
    pub fn from_id(id: u8) -> Result<Self, BatchError> {
        match id {
            0 => Ok(Self::None),
            1 => Ok(Self::Lz4),
            2 => Ok(Self::Zstd),
            other => Err(BatchError::UnknownCompression(other)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = BatchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd),
            _ => Err(BatchError::UnknownCompressionName(s.to_owned())),
        }
    }
}

const ZSTD_LEVEL: i32 = 3;

/// Appends the compressed form of `input` to `out`.
pub(crate) fn compress(
    codec: Compression,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), BatchError> {
    match codec {
        Compression::None => out.extend_from_slice(input),
        Compression::Lz4 => {
            let len = u32::try_from(input.len()).map_err(|_| BatchError::TooLarge {
                size: input.len() as u64,
                limit: u64::from(u32::MAX),
            })?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&lz4_flex::block::compress(input));
        }
        Compression::Zstd => {
            let compressed = zstd::bulk::compress(input, ZSTD_LEVEL)
                .map_err(|e| BatchError::Compress(e.to_string()))?;
            out.extend_from_slice(&compressed);
        }
    }
    Ok(())
}

/// Decompresses `input`, refusing to produce more than `limit` bytes (a compression bomb is an
/// error, not an allocation).
pub(crate) fn decompress(
    codec: Compression,
    input: &[u8],
    limit: usize,
) -> Result<Vec<u8>, BatchError> {
    match codec {
        Compression::None => Ok(input.to_vec()),
        Compression::Lz4 => {
            let (len, body) = input
                .split_first_chunk::<4>()
                .ok_or(BatchError::Truncated {
                    what: "lz4 length prefix",
                })?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > limit {
                return Err(BatchError::TooLarge {
                    size: len as u64,
                    limit: limit as u64,
                });
            }
            let out = lz4_flex::block::decompress(body, len)
                .map_err(|e| BatchError::Decompress(e.to_string()))?;
            if out.len() != len {
                return Err(BatchError::Decompress(
                    "lz4 output shorter than its length prefix".into(),
                ));
            }
            Ok(out)
        }
        Compression::Zstd => {
            // A frame that declares a larger size is refused by its header, without work.
            if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(input)
                && declared > limit as u64
            {
                return Err(BatchError::TooLarge {
                    size: declared,
                    limit: limit as u64,
                });
            }
            zstd::bulk::decompress(input, limit).map_err(|e| BatchError::Decompress(e.to_string()))
        }
    }
}
