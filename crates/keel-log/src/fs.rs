//! The file-IO seam. Everything the log does to the filesystem goes through [`Fs`] and
//! [`FileHandle`], so tests can substitute `sim::CrashFs` (the `sim` feature), which forgets
//! every byte that was not fsynced when it simulates a power loss, and can inject full disks and
//! failed flushes.
#![allow(unsafe_code)]

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut, MmapOptions};

/// Filesystem operations on directories and file names.
pub trait Fs: Send + Sync + Debug + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>>;
    fn exists(&self, path: &Path) -> bool;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open file.
#[allow(clippy::len_without_is_empty)]
pub trait FileHandle: Send + Sync + Debug {
    fn path(&self) -> &Path;
    fn len(&self) -> io::Result<u64>;
    /// Reserves disk blocks for `[0, len)`, growing the file if needed. A full disk is an
    /// `ENOSPC` error here, never a SIGBUS later when the mapping is written.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Shrinks or grows the file. Callers never shrink below a range a live mapping may read.
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn map_read(&self, len: u64) -> io::Result<Mmap>;
    fn map_write(&self, len: u64) -> io::Result<MmapMut>;
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()>;
    fn read_all(&self) -> io::Result<Vec<u8>>;
    /// Reads exactly `buf.len()` bytes at `pos`.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()>;
    /// Tells the file that `[offset, offset + len)` was written through a writable mapping.
    /// The real filesystem needs nothing; `CrashFs` must know every written range to tell what
    /// a later `sync_data` makes durable.
    fn wrote_mapped(&self, _offset: u64, _len: u64) {}
    /// fdatasync: makes the data (written through `write_all_at` or a mapping) and the file size
    /// durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Starts writing back `[offset, offset + len)` without waiting, so a later `sync_data`
    /// finds little left to do. Promises nothing about durability.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Durably replaces `dir/name` with `bytes`: written to `name.tmp`, fsynced, renamed over the
/// old file, and the directory fsynced, so a crash leaves the old content or the new, never a
/// mix. Errors name the file.
pub fn write_atomic(fs: &dyn Fs, dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let ctx = |action: &str, p: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{action} {}: {e}", p.display()))
    };
    if fs.exists(&tmp) {
        fs.remove(&tmp).map_err(|e| ctx("removing", &tmp, e))?;
    }
    let f = fs.create(&tmp).map_err(|e| ctx("creating", &tmp, e))?;
    f.write_all_at(bytes, 0)
        .and_then(|()| f.sync_data())
        .map_err(|e| ctx("writing", &tmp, e))?;
    drop(f);
    fs.rename(&tmp, &path)
        .map_err(|e| ctx("renaming", &tmp, e))?;
    fs.sync_dir(dir)
        .map_err(|e| ctx("syncing directory", dir, e))
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl Fs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(RealFile {
            file,
            path: path.to_path_buf(),
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(RealFile {
            file,
            path: path.to_path_buf(),
        }))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A file of [`RealFs`].
#[derive(Debug)]
pub struct RealFile {
    file: File,
    path: PathBuf,
}

impl RealFile {
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl FileHandle for RealFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length exceeds off_t"))?;
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), 0, len) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn map_read(&self, len: u64) -> io::Result<Mmap> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length exceeds usize"))?;
        // SAFETY: the log owns its directory. Mapped files are never shrunk below a range a
        // reader can reach (see the module docs of `segment`), so reads never fault; bytes above
        // the published end of a segment may change, and readers never look at them.
        unsafe { MmapOptions::new().len(len).map(&self.file) }
    }

    fn map_write(&self, len: u64) -> io::Result<MmapMut> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length exceeds usize"))?;
        // SAFETY: as for `map_read`; the region was reserved with `allocate` first, so writes
        // cannot raise SIGBUS on a full disk.
        unsafe { MmapOptions::new().len(len).map_mut(&self.file) }
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.file.write_all_at(buf, pos)
    }

    fn read_all(&self) -> io::Result<Vec<u8>> {
        let len = usize::try_from(self.len()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, pos)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(n)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Ok(());
        };
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
