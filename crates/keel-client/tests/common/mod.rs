//! A real in-process broker on 127.0.0.1 with ephemeral ports, shared by the client's
//! integration tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use keel_broker::{BrokerConfig, BrokerHandle};
use keel_client::Client;

pub struct TestBroker {
    handle: Option<BrokerHandle>,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let handle = keel_broker::start(config(dir.path(), any_port()))
            .await
            .expect("broker starts");
        let addr = handle.grpc_addr.to_string();
        Self {
            handle: Some(handle),
            addr,
            _dir: dir,
        }
    }

    /// A broker, a client of it, and a topic of `partitions` partitions with default configs.
    pub async fn with_topic(topic: &str, partitions: u32) -> (Self, Client) {
        let broker = Self::start().await;
        let client = broker.client().await;
        client
            .admin()
            .create_topic(topic, partitions, 0, BTreeMap::new())
            .await
            .expect("create");
        (broker, client)
    }

    pub async fn client(&self) -> Client {
        Client::connect(&[self.addr.as_str()])
            .await
            .expect("client connects")
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            shutdown(h).await;
        }
    }
}

/// Broker 1 with its data in `dir`, serving gRPC at `listen` and metrics on any free port of
/// 127.0.0.1.
pub fn config(dir: &Path, listen: SocketAddr) -> BrokerConfig {
    let mut config = BrokerConfig::new(1, dir);
    config.listen = listen;
    config.metrics_listen = any_port();
    config
}

/// 127.0.0.1 with port 0: the OS picks a free port.
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Bounded, so a broker that cannot stop fails the test instead of hanging it.
pub async fn shutdown(broker: BrokerHandle) {
    tokio::time::timeout(Duration::from_secs(20), broker.shutdown())
        .await
        .expect("broker shut down in time")
        .expect("clean shutdown");
}

/// Calls `poll` until it has returned `n` items in all, or `limit` passed.
#[allow(dead_code, reason = "not every test binary polls")]
pub async fn collect<T>(
    n: usize,
    limit: Duration,
    mut poll: impl AsyncFnMut() -> Vec<T>,
) -> Vec<T> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && start.elapsed() < limit {
        out.extend(poll().await);
    }
    out
}
