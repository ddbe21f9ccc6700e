//! `keel broker --fault-fs`: the fault-injection run's simulated disk (keel-log's `CrashFs`).
//! SIGUSR1 is a power loss and SIGUSR2 switches failing fsyncs on and off. It only exists in
//! builds with the `fault-fs` feature, so a release broker cannot be started on a disk that
//! forgets writes; without it, `--fault-fs` fails at start and says how to get it.

use keel_broker::BrokerConfig;

/// The broker's storage as a model of the disk, which can lose power or fail fsyncs.
#[cfg(feature = "fault-fs")]
#[derive(Debug, Clone)]
pub struct FaultDisk(keel_log::sim::CrashFs);

#[cfg(feature = "fault-fs")]
impl FaultDisk {
    pub fn open() -> anyhow::Result<Self> {
        Ok(Self(keel_log::sim::CrashFs::new()))
    }

    /// Puts all of the broker's storage on this disk.
    pub fn install(&self, cfg: &mut BrokerConfig) {
        cfg.fs = std::sync::Arc::new(self.0.clone());
    }

    /// The simulated power loss: the disk keeps only what was synced, and the process dies at
    /// once, as the machine would.
    pub fn power_loss(&self) -> ! {
        tracing::warn!("fault injection: power loss");
        if let Err(e) = self.0.power_loss() {
            eprintln!("power loss simulation failed: {e}");
        }
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        std::process::abort()
    }

    pub fn toggle_failing_syncs(&self) {
        let fail = !self.0.syncs_failing();
        self.0.fail_syncs(fail);
        tracing::warn!(
            failing = fail,
            "fault injection: fsyncs {}",
            if fail {
                "fail from now on"
            } else {
                "work again"
            }
        );
    }
}

/// Without the feature no value exists, so the signal handlers that use one never run.
#[cfg(not(feature = "fault-fs"))]
#[derive(Debug, Clone)]
pub enum FaultDisk {}

#[cfg(not(feature = "fault-fs"))]
impl FaultDisk {
    pub fn open() -> anyhow::Result<Self> {
        anyhow::bail!(
            "--fault-fs: this keel was built without the fault-fs feature \
             (build it with `cargo build -p keel-cli --features fault-fs`)"
        )
    }

    pub fn install(&self, _cfg: &mut BrokerConfig) {
        match *self {}
    }

    pub fn power_loss(&self) -> ! {
        match *self {}
    }

    pub fn toggle_failing_syncs(&self) {
        match *self {}
    }
}

#[cfg(all(test, not(feature = "fault-fs")))]
mod tests {
    #[test]
    fn refuses_without_the_feature() {
        let err = super::FaultDisk::open()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--features fault-fs"), "{err}");
    }
}
