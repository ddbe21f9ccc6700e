//! Wall-clock steps of one running broker for the fault run's `ClockJump` (libfaketime).

use std::path::{Path, PathBuf};

/// libfaketime, for the fault run's `ClockJump`: brokers started with [`FakeClock::env`] read
/// their wall-clock offset from a file on every call, so [`FakeClock::set`] steps the clock of
/// a running broker.
pub struct FakeClock {
    lib: PathBuf,
}

impl FakeClock {
    /// libfaketime, if installed (`.ci/install-deps` installs it) and usable with the `keel`
    /// binary: `Err` says why not.
    pub fn find() -> Result<Self, String> {
        let candidates = std::env::var_os("KEEL_FAKETIME_LIB")
            .map(PathBuf::from)
            .into_iter()
            .chain(
                [
                    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                    "/usr/lib/faketime/libfaketime.so.1",
                    "/usr/lib64/faketime/libfaketime.so.1",
                    "/usr/local/lib/faketime/libfaketime.so.1",
                ]
                .map(PathBuf::from),
            );
        let Some(lib) = candidates.into_iter().find(|p| p.exists()) else {
            return Err("libfaketime is not installed (.ci/install-deps installs it)".to_owned());
        };
        let clock = Self { lib };
        // A preloaded library does nothing to a static binary: check the broker's is dynamic.
        let bin = crate::broker::keel_bin();
        let dynamic = std::process::Command::new("ldd")
            .arg(&bin)
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("libc")
            });
        if !dynamic {
            return Err(format!(
                "{} is not linked dynamically with the C library, so libfaketime cannot reach it",
                bin.display()
            ));
        }
        // And that the library moves the clock of a program started with it.
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = dir.path().join("faketime");
        let env = clock.env(&file);
        Self::set(&file, 86_400);
        let faked = std::process::Command::new("date")
            .arg("+%s")
            .envs(env)
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match faked {
            Some(t) if t.abs_diff(now + 86_400) < 60 => Ok(clock),
            _ => Err(format!(
                "{} did not move the clock of `date` ({faked:?})",
                clock.lib.display()
            )),
        }
    }

    /// The environment of a process whose wall clock follows `file` (created with no offset).
    pub fn env(&self, file: &Path) -> Vec<(String, String)> {
        Self::set(file, 0);
        [
            ("LD_PRELOAD", self.lib.to_string_lossy().into_owned()),
            (
                "FAKETIME_TIMESTAMP_FILE",
                file.to_string_lossy().into_owned(),
            ),
            // Read the file on every call, so a step takes effect at once.
            ("FAKETIME_NO_CACHE", "1".to_owned()),
            // A real clock step (NTP, an operator's `date -s`) moves CLOCK_REALTIME only; by
            // default libfaketime would move CLOCK_MONOTONIC (and BOOTTIME) by the same offset,
            // stepping every timer and timeout of the broker's runtime (tokio and openraft
            // measure with the monotonic clock), which no real machine does.
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
            // Files' times are what the kernel's clock wrote: a real step does not shift the
            // times of files written before it, while libfaketime would shift them all.
            ("NO_FAKE_STAT", "1".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec()
    }

    /// Steps the clock of the processes that follow `file` to `offset_s` seconds from the real
    /// time (replaced whole, so that a process never reads a half-written file).
    pub fn set(file: &Path, offset_s: i64) {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_s:+}\n")).expect("write the faketime file");
        std::fs::rename(&tmp, file).expect("replace the faketime file");
    }
}

/// A broker's wall clock stepped by [`FakeClock`] until healed or dropped.
pub struct ClockStep {
    file: PathBuf,
}

impl ClockStep {
    pub fn step(file: &Path, offset_s: i64) -> Self {
        FakeClock::set(file, offset_s);
        Self {
            file: file.to_path_buf(),
        }
    }

    pub fn heal(self) {}
}

impl Drop for ClockStep {
    fn drop(&mut self) {
        FakeClock::set(&self.file, 0);
    }
}
