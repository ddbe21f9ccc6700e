//! A store directory on a simulated disk that can lose power (`CrashFs`).

use std::io;
use std::sync::Arc;

use keel_log::SystemClock;
use keel_log::fs::Fs;
use keel_log::sim::CrashFs;
use keel_raft::KeelLogStore;

use super::small_config;

pub struct CrashDisk {
    pub fs: CrashFs,
    dir: tempfile::TempDir,
}

impl CrashDisk {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            fs: CrashFs::new(),
            dir: tempfile::tempdir()?,
        })
    }

    /// Opens the store in the directory, through the simulated disk.
    pub fn open(&self) -> io::Result<KeelLogStore> {
        let fs: Arc<dyn Fs> = Arc::new(self.fs.clone());
        KeelLogStore::open_with(self.dir.path(), small_config(), fs, Arc::new(SystemClock))
    }
}
