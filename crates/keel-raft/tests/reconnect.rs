//! A peer that restarts on the same address is reachable again through the transport at once:
//! a connection that failed must not keep failing after the peer is back.

use std::time::{Duration, Instant};

use keel_raft::{RaftRegistry, RaftTransport, TransportConfig};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

mod support;

async fn serve(listener: TcpListener) -> tokio::sync::oneshot::Sender<()> {
    let registry: RaftRegistry<support::MemStateMachine> = RaftRegistry::new(2);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(registry.service())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    stop
}

/// True when the call reached the server (which has no forward handler: UNIMPLEMENTED).
async fn reaches(t: &RaftTransport, addr: &str) -> bool {
    match t
        .forward(addr, 2, 0, bytes::Bytes::new(), Duration::from_millis(500))
        .await
    {
        Ok(_) => true,
        Err(s) => s.code() == tonic::Code::Unimplemented,
    }
}

#[tokio::test]
async fn transport_reconnects_to_a_restarted_peer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = serve(listener).await;
    let t = RaftTransport::new(1, TransportConfig::default());
    assert!(reaches(&t, &addr.to_string()).await);

    let _ = stop.send(());
    let down_since = Instant::now();
    while reaches(&t, &addr.to_string()).await {
        assert!(
            down_since.elapsed() < Duration::from_secs(10),
            "server never went down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Fail a few times while it is down.
    for _ in 0..5 {
        assert!(!reaches(&t, &addr.to_string()).await);
    }
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let _stop = serve(listener).await;
    let back = Instant::now();
    while !reaches(&t, &addr.to_string()).await {
        assert!(
            back.elapsed() < Duration::from_secs(2),
            "the transport still cannot reach the restarted peer after {:?}",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
