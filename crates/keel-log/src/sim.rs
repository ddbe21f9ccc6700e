//! [`CrashFs`]: a filesystem that models what survives a power loss.
//!
//! It runs on real files (so the log's real mmap code paths are exercised) and keeps, beside
//! them, the durable state a disk would hold: the content of each file as of its last
//! `sync_data`, and each directory's entries as of its last `sync_dir`. [`CrashFs::crash`]
//! rewrites the directory tree to exactly that state, losing every byte, creation, rename and
//! removal that was not synced. It can also make the disk full and make flushes fail.
//!
//! A sync copies only the ranges written since the previous one (`write_all_at` and
//! [`FileHandle::wrote_mapped`] record them), so a broker can run on it under load: the fault
//! suite uses it for power losses of running brokers ([`CrashFs::power_loss`]).
//!
//! A failed flush behaves as Linux does since 4.13: the pages it could not write are marked
//! clean, so their content stays readable from the page cache but never reaches the disk, and a
//! later successful flush does not write them either.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use memmap2::{Mmap, MmapMut};

use crate::fs::{FileHandle, Fs, RealFs};

type InodeId = u64;

/// The durable content of a file: `len` bytes, of which those past `data` are zero (space
/// reserved ahead is not held in memory).
#[derive(Clone, Default)]
struct Image {
    len: u64,
    data: Vec<u8>,
}

impl Image {
    fn from_content(mut data: Vec<u8>) -> Self {
        let len = data.len() as u64;
        let used = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        data.truncate(used);
        data.shrink_to_fit();
        Self { len, data }
    }

    fn truncate(&mut self, len: u64) {
        self.len = self.len.min(len);
        if self.data.len() as u64 > len {
            self.data.truncate(len as usize);
        }
    }

    fn write(&mut self, pos: u64, bytes: &[u8]) {
        let (start, end) = (pos as usize, pos as usize + bytes.len());
        if self.data.len() < end {
            if bytes.iter().all(|b| *b == 0) && self.data.len() <= start {
                return;
            }
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(bytes);
    }

    fn content(&self) -> Vec<u8> {
        let mut out = self.data.clone();
        out.resize(self.len as usize, 0);
        out
    }
}

#[derive(Default)]
struct State {
    next_inode: InodeId,
    /// Synced content of each inode (`None`: never synced, so empty after a crash).
    synced: HashMap<InodeId, Option<Image>>,
    live: HashMap<PathBuf, InodeId>,
    durable: HashMap<PathBuf, InodeId>,
    allocated: HashMap<InodeId, u64>,
    /// Range written since the inode's last sync.
    dirty: HashMap<InodeId, (u64, u64)>,
    /// Smallest length the inode was cut to since its last sync.
    shrunk: HashMap<InodeId, u64>,
}

impl State {
    fn mark_dirty(&mut self, inode: InodeId, pos: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = pos.saturating_add(len);
        self.dirty
            .entry(inode)
            .and_modify(|r| *r = (r.0.min(pos), r.1.max(end)))
            .or_insert((pos, end));
    }
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
    /// Set by [`CrashFs::power_loss`]: every later operation blocks forever.
    frozen: AtomicBool,
    /// Total bytes that may be allocated across all files; `u64::MAX` for no limit.
    space_limit: AtomicU64,
    syncs: AtomicU64,
    /// Of `syncs`, those of segment data files (`.log`).
    segment_syncs: AtomicU64,
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

    /// The state, for recording that a sync completed: blocks for good once the power is gone.
    /// [`CrashFs::power_loss`] sets `frozen` before it takes the lock to write the durable
    /// state out, so a sync that got past [`CrashFs::gate`] before the power went, but records
    /// its result after, never returns: on a real machine a sync the power cut short does not
    /// report success. (Returning `Ok` there let a replica acknowledge entries as durable that
    /// the power loss had just dropped: the fault run saw a new leader without them.)
    fn lock_live(&self) -> MutexGuard<'_, State> {
        loop {
            let st = self.lock();
            if !self.faults.frozen.load(Ordering::SeqCst) {
                return st;
            }
            drop(st);
            self.gate();
        }
    }

    /// Blocks the calling thread for good once the power is gone: nothing may reach the disk
    /// after the durable state was written out.
    fn gate(&self) {
        while self.faults.frozen.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }

    /// Makes every later `sync_data` fail with EIO until cleared.
    pub fn fail_syncs(&self, fail: bool) {
        self.faults.fail_syncs.store(fail, Ordering::SeqCst);
    }

    pub fn syncs_failing(&self) -> bool {
        self.faults.fail_syncs.load(Ordering::SeqCst)
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

    /// Number of successful `sync_data` calls of segment data files (`.log`) so far: one per
    /// group commit, where [`CrashFs::sync_count`] also counts the promise file's.
    pub fn segment_sync_count(&self) -> u64 {
        self.faults.segment_syncs.load(Ordering::SeqCst)
    }

    /// A power loss in a running process: every later filesystem call through this `CrashFs`
    /// blocks forever, and the files are rewritten to their durable state. Open handles and
    /// mappings still point at the old (now unlinked) files, so whatever the process writes
    /// through them is lost, as it would be. The caller must end the process right after.
    pub fn power_loss(&self) -> io::Result<()> {
        self.faults.frozen.store(true, Ordering::SeqCst);
        self.crash()
    }

    /// Simulates a power loss: every file this `CrashFs` knows is rewritten to its durable
    /// state. All handles and logs using it must have been dropped first (or see
    /// [`CrashFs::power_loss`]).
    pub fn crash(&self) -> io::Result<()> {
        let mut st = self.lock();
        for path in st.live.keys() {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        for (path, inode) in &st.durable {
            let content = st
                .synced
                .get(inode)
                .cloned()
                .flatten()
                .unwrap_or_default()
                .content();
            if let Some(parent) = path.parent() {
                // A directory removed without a sync comes back with its files.
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, &content)?;
        }
        // After the crash the disk holds exactly the durable state, each path its own inode.
        let durable: Vec<(PathBuf, InodeId)> = st.durable.drain().collect();
        st.live.clear();
        st.allocated.clear();
        st.dirty.clear();
        st.shrunk.clear();
        let mut synced = HashMap::new();
        for (path, old) in durable {
            let image = st.synced.get(&old).cloned().flatten().unwrap_or_default();
            let id = st.next_inode;
            st.next_inode += 1;
            st.allocated.insert(id, image.len);
            synced.insert(id, Some(image));
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
        self.gate();
        RealFs.create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealFs.list(dir)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FileHandle>> {
        self.gate();
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
        self.gate();
        let inner = RealFs.open(path)?;
        let mut st = self.lock();
        let id = match st.live.get(path) {
            Some(id) => *id,
            None => {
                // A file that existed before this CrashFs: treat its content as durable.
                let id = st.next_inode;
                st.next_inode += 1;
                st.synced
                    .insert(id, Some(Image::from_content(inner.read_all()?)));
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
        self.gate();
        RealFs.remove(path)?;
        self.lock().live.remove(path);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.gate();
        RealFs.rename(from, to)?;
        let mut st = self.lock();
        if let Some(id) = st.live.remove(from) {
            st.live.insert(to.to_path_buf(), id);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.gate();
        RealFs.sync_dir(dir)?;
        let mut st = self.lock_live();
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
        self.fs.gate();
        let limit = self.fs.faults.space_limit.load(Ordering::SeqCst);
        if limit != u64::MAX {
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
        self.fs.gate();
        self.inner.set_len(len)?;
        let mut st = self.fs.lock();
        st.allocated.insert(self.inode, len);
        st.shrunk
            .entry(self.inode)
            .and_modify(|s| *s = (*s).min(len))
            .or_insert(len);
        Ok(())
    }

    fn map_read(&self, len: u64) -> io::Result<Mmap> {
        self.inner.map_read(len)
    }

    fn map_write(&self, len: u64) -> io::Result<MmapMut> {
        self.inner.map_write(len)
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.fs.gate();
        self.inner.write_all_at(buf, pos)?;
        self.fs.lock().mark_dirty(self.inode, pos, buf.len() as u64);
        Ok(())
    }

    fn wrote_mapped(&self, offset: u64, len: u64) {
        self.fs.lock().mark_dirty(self.inode, offset, len);
    }

    fn read_all(&self) -> io::Result<Vec<u8>> {
        self.inner.read_all()
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, pos)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.gate();
        if self.fs.faults.fail_syncs.load(Ordering::SeqCst) {
            // As Linux does: the pages that failed are marked clean, so no later sync writes
            // them, though reads still see them in the page cache.
            let mut st = self.fs.lock();
            st.dirty.remove(&self.inode);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync_data()?;
        let len = self.inner.len()?;
        // Take the range first: a write landing after this is recorded again and goes with
        // the next sync (its bytes may also be copied now, as a real disk might).
        let (dirty, shrunk) = {
            let mut st = self.fs.lock_live();
            (st.dirty.remove(&self.inode), st.shrunk.remove(&self.inode))
        };
        let copied = match dirty {
            Some((lo, hi)) if lo < len => {
                let hi = hi.min(len);
                let mut buf = vec![0u8; (hi - lo) as usize];
                self.inner.read_exact_at(&mut buf, lo)?;
                Some((lo, buf))
            }
            _ => None,
        };
        let mut st = self.fs.lock_live();
        let image = st
            .synced
            .entry(self.inode)
            .or_insert(None)
            .get_or_insert_with(Image::default);
        if let Some(s) = shrunk {
            image.truncate(s);
        }
        if let Some((lo, buf)) = copied {
            image.write(lo, &buf);
        }
        image.truncate(len);
        image.len = len;
        drop(st);
        self.fs.faults.syncs.fetch_add(1, Ordering::SeqCst);
        if self.inner.path().extension().is_some_and(|e| e == "log") {
            self.fs.faults.segment_syncs.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// A sync that was under way when the power went must not report success once the durable
    /// state has been written out without its data.
    #[test]
    fn a_sync_cut_short_by_a_power_loss_never_returns() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("keel-sim-cut-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let fs = CrashFs::new();
        let f = fs.create(&dir.join("f"))?;
        f.allocate(4096)?;
        f.write_all_at(b"acknowledged?", 0)?;
        // The power loss is writing the durable state out (it holds the state lock) while the
        // sync gets past the gate and waits to record its result.
        let writing_out = fs.lock();
        let (done, finished) = mpsc::channel();
        let file = Arc::clone(&f);
        std::thread::spawn(move || {
            let _ = done.send(file.sync_data());
        });
        std::thread::sleep(Duration::from_millis(100));
        fs.faults.frozen.store(true, Ordering::SeqCst);
        drop(writing_out);
        assert!(
            finished.recv_timeout(Duration::from_millis(300)).is_err(),
            "the sync returned after the power loss"
        );
        // The blocked thread keeps its handle; the file goes with the directory.
        std::fs::remove_dir_all(&dir)
    }
}
