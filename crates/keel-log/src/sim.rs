//! [`CrashFs`]: a filesystem for tests that models what survives a power loss.
//!
//! It runs on real files (so the log's real mmap code paths are exercised) and keeps, beside
//! them, the durable state a disk would hold: the content of each file as of its last
//! `sync_data`, and each directory's entries as of its last `sync_dir`. [`CrashFs::crash`]
//! rewrites the directory tree to exactly that state, losing every byte, creation, rename and
//! removal that was not synced. It can also make the disk full and make flushes fail.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use memmap2::{Mmap, MmapMut};

use crate::fs::{FileHandle, Fs, RealFs};

type InodeId = u64;

#[derive(Default)]
struct State {
    next_inode: InodeId,
    /// Synced content of each inode (`None`: never synced, so empty after a crash).
    synced: HashMap<InodeId, Option<Vec<u8>>>,
    live: HashMap<PathBuf, InodeId>,
    durable: HashMap<PathBuf, InodeId>,
    allocated: HashMap<InodeId, u64>,
}

/// See the module docs.
#[derive(Clone, Default)]
pub struct CrashFs {
    state: Arc<Mutex<State>>,
    faults: Arc<Faults>,
}

#[derive(Default)]
struct Faults {
    fail_syncs: AtomicBool,
    /// Total bytes that may be allocated across all files; `u64::MAX` for no limit.
    space_limit: AtomicU64,
    syncs: AtomicU64,
}

impl fmt::Debug for CrashFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashFs").finish_non_exhaustive()
    }
}

impl CrashFs {
    pub fn new() -> Self {
        let fs = Self::default();
        fs.faults.space_limit.store(u64::MAX, Ordering::Relaxed);
        fs
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes every later `sync_data` fail with EIO until cleared.
    pub fn fail_syncs(&self, fail: bool) {
        self.faults.fail_syncs.store(fail, Ordering::SeqCst);
    }

    /// Limits the total allocated bytes, so that `allocate` fails with ENOSPC beyond it.
    pub fn set_space_limit(&self, bytes: Option<u64>) {
        self.faults
            .space_limit
            .store(bytes.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Number of successful `sync_data` calls so far.
    pub fn sync_count(&self) -> u64 {
        self.faults.syncs.load(Ordering::SeqCst)
    }

    /// Simulates a power loss: every file this `CrashFs` knows is rewritten to its durable
    /// state. All handles and logs using it must have been dropped first.
    pub fn crash(&self) -> io::Result<()> {
        let mut st = self.lock();
        for path in st.live.keys() {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        for (path, inode) in &st.durable {
            let content = st.synced.get(inode).cloned().flatten().unwrap_or_default();
            std::fs::write(path, &content)?;
        }
        // After the crash the disk holds exactly the durable state, each path its own inode.
        let durable: Vec<(PathBuf, InodeId)> = st.durable.drain().collect();
        st.live.clear();
        st.allocated.clear();
        let mut synced = HashMap::new();
        for (path, old) in durable {
            let content = st.synced.get(&old).cloned().flatten();
            let id = st.next_inode;
            st.next_inode += 1;
            st.allocated
                .insert(id, content.as_ref().map_or(0, |c| c.len() as u64));
            synced.insert(id, Some(content.unwrap_or_default()));
            st.live.insert(path.clone(), id);
            st.durable.insert(path, id);
        }
        st.synced = synced;
        Ok(())
    }

    fn handle(
        &self,
        path: &Path,
        inode: InodeId,
        inner: Arc<dyn FileHandle>,
    ) -> Arc<dyn FileHandle> {
        Arc::new(CrashFile {
            fs: self.clone(),
            inode,
            path: path.to_path_buf(),
            inner,
        })
    }
}

impl Fs for CrashFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        RealFs.create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealFs.list(dir)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>> {
        let inner = RealFs.create(path)?;
        let mut st = self.lock();
        let id = st.next_inode;
        st.next_inode += 1;
        st.synced.insert(id, None);
        st.live.insert(path.to_path_buf(), id);
        drop(st);
        Ok(self.handle(path, id, inner))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>> {
        let inner = RealFs.open(path)?;
        let mut st = self.lock();
        let id = match st.live.get(path) {
            Some(id) => *id,
            None => {
                // A file that existed before this CrashFs: treat its content as durable.
                let id = st.next_inode;
                st.next_inode += 1;
                st.synced.insert(id, Some(inner.read_all()?));
                st.live.insert(path.to_path_buf(), id);
                st.durable.insert(path.to_path_buf(), id);
                id
            }
        };
        drop(st);
        Ok(self.handle(path, id, inner))
    }

    fn exists(&self, path: &Path) -> bool {
        RealFs.exists(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        RealFs.remove(path)?;
        self.lock().live.remove(path);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealFs.rename(from, to)?;
        let mut st = self.lock();
        if let Some(id) = st.live.remove(from) {
            st.live.insert(to.to_path_buf(), id);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        RealFs.sync_dir(dir)?;
        let mut st = self.lock();
        st.durable.retain(|p, _| p.parent() != Some(dir));
        let entries: Vec<(PathBuf, InodeId)> = st
            .live
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        st.durable.extend(entries);
        Ok(())
    }
}

#[derive(Debug)]
struct CrashFile {
    fs: CrashFs,
    inode: InodeId,
    path: PathBuf,
    inner: Arc<dyn FileHandle>,
}

impl FileHandle for CrashFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let limit = self.fs.faults.space_limit.load(Ordering::SeqCst);
        {
            let st = self.fs.lock();
            let others: u64 = st
                .allocated
                .iter()
                .filter(|(id, _)| **id != self.inode && st.live.values().any(|l| l == *id))
                .map(|(_, n)| *n)
                .sum();
            if others.saturating_add(len) > limit {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        self.inner.allocate(len)?;
        let mut st = self.fs.lock();
        let e = st.allocated.entry(self.inode).or_insert(0);
        *e = (*e).max(len);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)?;
        self.fs.lock().allocated.insert(self.inode, len);
        Ok(())
    }

    fn map_read(&self, len: u64) -> io::Result<Mmap> {
        self.inner.map_read(len)
    }

    fn map_write(&self, len: u64) -> io::Result<MmapMut> {
        self.inner.map_write(len)
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, pos)
    }

    fn read_all(&self) -> io::Result<Vec<u8>> {
        self.inner.read_all()
    }

    fn sync_data(&self) -> io::Result<()> {
        if self.fs.faults.fail_syncs.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync_data()?;
        let content = self.inner.read_all()?;
        self.fs.lock().synced.insert(self.inode, Some(content));
        self.fs.faults.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
