//! A real in-process broker on 127.0.0.1 with ephemeral ports, shared by the client's
//! integration tests.

use std::net::SocketAddr;
use std::time::Duration;

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
        let mut config = BrokerConfig::new(1, dir.path());
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let handle = keel_broker::start(config).await.expect("broker starts");
        let addr = handle.grpc_addr.to_string();
        Self {
            handle: Some(handle),
            addr,
            _dir: dir,
        }
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

/// Bounded, so a broker that cannot stop fails the test instead of hanging it.
pub async fn shutdown(broker: BrokerHandle) {
    tokio::time::timeout(Duration::from_secs(20), broker.shutdown())
        .await
        .expect("broker shut down in time")
        .expect("clean shutdown");
}
