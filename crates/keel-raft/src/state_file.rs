//! Small, CRC-checked state files beside the log (vote, committed, last purged log id).
//!
//! ```text
//! off len field
//!   0   8 magic "KEELRST1"
//!   8   4 payload length n
//!  12   n payload (JSON)
//! 12+n  4 crc32c of bytes 0..12+n
//! ```
//!
//! Written to `<name>.tmp`, fsynced, renamed over `<name>`, directory fsynced, so a reader
//! sees either the old or the new content. A file that fails its checks is corrupt, never
//! "absent": the caller decides whether that is fatal.

use std::io;
use std::path::{Path, PathBuf};

use keel_log::fs::Fs;
use serde::Serialize;
use serde::de::DeserializeOwned;

const MAGIC: &[u8; 8] = b"KEELRST1";
const HEAD: usize = 12;

/// One state file in `dir`.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
    name: String,
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
            path: dir.join(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the value; `Ok(None)` if the file does not exist, `InvalidData` if it is corrupt.
    pub fn load<T: DeserializeOwned>(&self, fs: &dyn Fs) -> io::Result<Option<T>> {
        let tmp = self.dir.join(format!("{}.tmp", self.name));
        if fs.exists(&tmp) {
            // An interrupted write; the real file is still the old value.
            fs.remove(&tmp).map_err(|e| ctx(e, "removing", &tmp))?;
        }
        if !fs.exists(&self.path) {
            return Ok(None);
        }
        let bytes = fs
            .open(&self.path)
            .and_then(|f| f.read_all())
            .map_err(|e| ctx(e, "reading", &self.path))?;
        decode(&bytes).map(Some).map_err(|reason| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt state file {}: {reason}", self.path.display()),
            )
        })
    }

    /// Durably replaces the value.
    pub fn store<T: Serialize>(&self, fs: &dyn Fs, value: &T) -> io::Result<()> {
        keel_log::fs::write_atomic(fs, &self.dir, &self.name, &encode(value)?)
    }
}

fn ctx(e: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{action} {}: {e}", path.display()))
}

fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(value).map_err(io::Error::other)?;
    let len =
        u32::try_from(json.len()).map_err(|_| io::Error::other("state value larger than 4 GiB"))?;
    let mut out = Vec::with_capacity(HEAD + json.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&json);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    let (head, rest) = b
        .split_first_chunk::<HEAD>()
        .ok_or_else(|| format!("{} bytes, shorter than the header", b.len()))?;
    if &head[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&head[8..12]);
    let len = u32::from_le_bytes(len) as usize;
    if rest.len() != len + 4 {
        return Err(format!(
            "length {} does not match the file ({} bytes after the header)",
            len,
            rest.len()
        ));
    }
    let (json, crc) = rest.split_at(len);
    let mut stored = [0u8; 4];
    stored.copy_from_slice(crc);
    let stored = u32::from_le_bytes(stored);
    let actual = crc32c::crc32c(&b[..HEAD + len]);
    if stored != actual {
        return Err(format!(
            "CRC32C mismatch: stored {stored:#010x}, data has {actual:#010x}"
        ));
    }
    serde_json::from_slice(json).map_err(|e| format!("bad JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let b = encode(&Some(42u64)).expect("encode");
        assert_eq!(decode::<Option<u64>>(&b), Ok(Some(42)));
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(decode::<Option<u64>>(&c).is_err(), "flip at {i} undetected");
        }
        assert!(decode::<Option<u64>>(&b[..b.len() - 1]).is_err());
        assert!(decode::<Option<u64>>(&[]).is_err());
    }
}
