//! Real broker processes for tests: the `keel` binary built by this same `cargo test` run,
//! on loopback ports, with readiness awaited by polling `/readyz` (never a fixed sleep).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use keel_proto::v1::admin_service_client::AdminServiceClient;
use keel_proto::v1::cluster_service_client::ClusterServiceClient;
use keel_proto::v1::consume_service_client::ConsumeServiceClient;
use keel_proto::v1::produce_service_client::ProduceServiceClient;
use tonic::transport::Channel;

/// The `keel` executable next to this test's binary (`target/<profile>/keel`).
pub fn keel_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("keel");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p keel-cli` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// Fails at once, saying how to get one, unless [`keel_bin`] was built with the `fault-fs`
/// feature (its version says so): a broker without it refuses `--fault-fs`, which would
/// otherwise only show as a readiness timeout. keel-tests enables the feature on keel-cli, so
/// `cargo test --workspace` builds such a binary; `cargo build` alone does not.
pub fn require_fault_fs() {
    static CHECKED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    CHECKED.get_or_init(|| {
        let bin = keel_bin();
        let out = Command::new(&bin)
            .arg("--version")
            .output()
            .expect("run keel --version");
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            version.contains("(fault-fs)"),
            "{} ({}) was built without the fault-fs feature that --fault-fs needs: run \
             `cargo build -p keel-cli --features fault-fs` (cargo test --workspace builds it so)",
            bin.display(),
            version.trim()
        );
    });
}

/// A free loopback port (bound then released) below the kernel's ephemeral range
/// (32768–60999 by default). A port from `bind(:0)` comes from that range, and between
/// releasing it and the broker binding it, any outgoing connection (brokers open many to each
/// other) can take it as its source port, which made a broker fail to start now and then.
/// Ports are taken in turn from a per-process starting point, so concurrent tests of one
/// process never pick the same one and different processes rarely do; each is checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919).wrapping_add(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    );
    let _ = NEXT.compare_exchange(0, seed % SPAN + 1, Ordering::AcqRel, Ordering::Acquire);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::AcqRel) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sum of a metric's samples on a broker's metrics endpoint (0 when absent or unreachable).
pub fn metric(http: &str, name: &str) -> f64 {
    http_get(http, "/metrics")
        .and_then(|(_, body)| crate::faults::retention::metric_value(&body, name))
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.0 GET; returns (status code, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Some((code, body))
}

/// One `keel broker` process.
pub struct BrokerProc {
    pub id: u32,
    pub data_dir: PathBuf,
    pub grpc: String,
    pub http: String,
    child: Option<Child>,
    extra: Vec<String>,
    /// Environment variables of every start of the process (e.g. libfaketime's).
    env: Vec<(String, String)>,
}

impl BrokerProc {
    /// Starts broker `id` on fresh loopback ports with its data in `data_dir`.
    pub fn start(data_dir: &Path, id: u32) -> Self {
        Self::start_with(data_dir, id, &[])
    }

    pub fn start_with(data_dir: &Path, id: u32, extra: &[&str]) -> Self {
        let grpc = format!("127.0.0.1:{}", free_port());
        Self::start_on(data_dir, id, grpc, extra)
    }

    /// Starts broker `id` on the given gRPC address (a cluster's peers must know it first).
    pub fn start_on(data_dir: &Path, id: u32, grpc: String, extra: &[&str]) -> Self {
        let b = Self::launch_on(data_dir, id, grpc, extra);
        b.wait_ready();
        b
    }

    /// Like [`BrokerProc::start_on`] without waiting for readiness: a clustered broker is
    /// ready once it has current metadata, which needs a majority of its peers running.
    pub fn launch_on(data_dir: &Path, id: u32, grpc: String, extra: &[&str]) -> Self {
        Self::launch_on_env(data_dir, id, grpc, extra, Vec::new())
    }

    /// Like [`BrokerProc::launch_on`], with environment variables for the process (kept for
    /// its restarts).
    pub fn launch_on_env(
        data_dir: &Path,
        id: u32,
        grpc: String,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Self {
        if extra.contains(&"--fault-fs") {
            require_fault_fs();
        }
        let mut b = Self {
            id,
            data_dir: data_dir.to_path_buf(),
            grpc,
            http: format!("127.0.0.1:{}", free_port()),
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            env,
        };
        b.launch();
        b
    }

    /// True while the child process exists (not killed or terminated by the test).
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) {
        self.launch();
        self.wait_ready();
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        let http = self.http.clone();
        wait_until("the broker to be ready", Duration::from_secs(30), || {
            http_get(&http, "/readyz").is_some_and(|(c, _)| c == 200)
        });
    }

    /// Whether `/readyz` answers 200 within `timeout` (polling).
    pub fn ready_within(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if http_get(&self.http, "/readyz").is_some_and(|(c, _)| c == 200) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the stopped process again on the same ports and data, without waiting.
    pub fn relaunch(&mut self) {
        assert!(self.child.is_none(), "stop the broker first");
        self.launch();
    }

    fn launch(&mut self) {
        // Appended to, so that a restarted broker's log follows the previous run's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.data_dir
                    .with_extension(format!("broker-{}.log", self.id)),
            )
            .or_else(|_| std::fs::File::create("/dev/null"))
            .expect("log file");
        let child = Command::new(keel_bin())
            .args([
                "broker",
                "--id",
                &self.id.to_string(),
                "--listen",
                &self.grpc,
                "--metrics-listen",
                &self.http,
            ])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // KEEL_TEST_BROKER_LOG raises the brokers' log level when a failure needs replaying
            // with more detail (e.g. `info,openraft=debug`).
            .env(
                "RUST_LOG",
                std::env::var("KEEL_TEST_BROKER_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel broker");
        self.child = Some(child);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        let mut child = self.child.take().expect("running");
        wait_exit(&mut child, Duration::from_secs(30))
    }

    /// SIGKILL (`kill -9`) and reap.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut child) = self.child.take() {
            let _ = wait_exit(&mut child, Duration::from_secs(30));
        }
    }

    /// A power loss (the broker must run with `--fault-fs`): everything not fsynced is lost
    /// and the process dies. Waits for it to be gone.
    pub fn power_loss(&mut self) {
        self.signal("-USR1");
        if let Some(mut child) = self.child.take() {
            let status = wait_exit(&mut child, Duration::from_secs(30));
            assert!(
                !status.success(),
                "a power loss ended broker {} cleanly",
                self.id
            );
        }
    }

    /// Switches failing fsyncs on or off (the broker must run with `--fault-fs`).
    pub fn toggle_failing_fsyncs(&mut self) {
        if self.is_running() {
            self.signal("-USR2");
        }
    }

    /// Reaps the process if it exited on its own (a broker exits when its metadata storage
    /// fails, for its supervisor to restart it), returning its status.
    pub fn reap_exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Starts the broker again on the same ports and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the broker first");
        self.spawn();
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect")
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    pub async fn cluster(&self) -> ClusterServiceClient<Channel> {
        ClusterServiceClient::new(self.channel().await)
    }

    pub async fn producer(&self) -> ProduceServiceClient<Channel> {
        ProduceServiceClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn consumer(&self) -> ConsumeServiceClient<Channel> {
        ConsumeServiceClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
