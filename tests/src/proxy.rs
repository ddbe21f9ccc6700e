//! A fault-injecting TCP proxy for gRPC (cleartext HTTP/2) connections.
//!
//! Sitting between a client and a broker, it can lose exactly one response after the server
//! has processed the request, which is the case that retries and idempotent produce must
//! survive and that no amount of killing processes reproduces deterministically.
//! Only h2c is understood: a TLS stream would be opaque to the frame parser.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// HTTP/2 frame header: 24-bit length, 8-bit type, 8-bit flags, 32-bit stream id.
const FRAME_HEADER_LEN: usize = 9;
const FRAME_TYPE_DATA: u8 = 0;

/// A loopback TCP proxy to one upstream that can drop a response or cut every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

struct Shared {
    armed: AtomicBool,
    dropped: AtomicU64,
    /// Bumped by `cut_all`; every connection task watches it.
    cut: watch::Sender<u64>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to `upstream`.
    pub async fn start(upstream: String) -> io::Result<FaultProxy> {
        Self::start_on("127.0.0.1:0", upstream).await
    }

    /// Like [`FaultProxy::start`], listening on `listen` (e.g. a port a config already names).
    pub async fn start_on(listen: &str, upstream: String) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            armed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            cut: watch::Sender::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, upstream, Arc::clone(&shared)));
        Ok(FaultProxy {
            addr,
            shared,
            accept_task,
        })
    }

    /// The address clients should dial: "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Arms a one-shot fault: the next non-empty HTTP/2 DATA frame the upstream sends, on any
    /// connection, is not forwarded; that connection is closed on both sides instead, so the
    /// client's request fails although the server processed it. Arming twice before the fault
    /// fires still drops only one response.
    pub fn drop_next_response(&self) {
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// How many responses were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// Closes all current connections (both sides); the proxy keeps accepting new ones.
    ///
    /// A connection the kernel completed but the proxy has not accepted yet is not "current"
    /// and survives.
    pub fn cut_all(&self) {
        // send_modify, unlike send, succeeds with no connection (receiver) alive.
        self.shared.cut.send_modify(|generation| *generation += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connections: cancelling it aborts them all.
        self.accept_task.abort();
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("armed", &self.shared.armed.load(Ordering::SeqCst))
            .field("dropped", &self.dropped())
            .finish()
    }
}

async fn accept_loop(listener: TcpListener, upstream: String, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    // Subscribe before spawning so a cut_all right after accept is not missed.
                    let cut = shared.cut.subscribe();
                    conns.spawn(relay(client, upstream.clone(), Arc::clone(&shared), cut));
                }
                // EMFILE or ECONNABORTED are transient; backing off avoids a hot loop on them.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reaps finished connections so the set does not grow for the proxy's lifetime.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn relay(
    client: TcpStream,
    upstream: String,
    shared: Arc<Shared>,
    mut cut: watch::Receiver<u64>,
) {
    // Returning from either branch drops both sockets, closing the connection on both sides.
    tokio::select! {
        _ = cut.changed() => {}
        _ = pump(client, &upstream, &shared) => {}
    }
}

async fn pump(client: TcpStream, upstream: &str, shared: &Shared) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    // gRPC is many small frames; Nagle would add latency the real connection does not have.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let requests = async {
        tokio::io::copy(&mut client_rd, &mut server_wr).await?;
        server_wr.shutdown().await
    };
    let responses = forward_frames(&mut server_rd, &mut client_wr, shared);
    // try_join: a dropped response (an error) must end the request direction too.
    tokio::try_join!(requests, responses).map(|_| ())
}

/// Forwards whole HTTP/2 frames from the server, so a dropped frame never leaves the client
/// with half of one (which would be a protocol error, not a lost response).
async fn forward_frames(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    shared: &Shared,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        buf.reserve(16 * 1024);
        if from.read_buf(&mut buf).await? == 0 {
            // A truncated tail is passed on as is: the proxy must not hide a misbehaving server.
            to.write_all(&buf).await?;
            return to.shutdown().await;
        }
        let (whole, drop_next) = scan_frames(&buf, &shared.armed);
        to.write_all(&buf[..whole]).await?;
        if drop_next {
            // Counted before the sockets close, so a client seeing the failure sees the count.
            shared.dropped.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other("response dropped by FaultProxy"));
        }
        buf.advance(whole);
    }
}

/// Returns how many leading bytes of `buf` are whole frames to forward, and whether the frame
/// right after them is the response to drop (which consumes `armed`). The drop is decided on
/// the header alone, so the payload need not have arrived.
fn scan_frames(buf: &[u8], armed: &AtomicBool) -> (usize, bool) {
    let mut pos = 0;
    while let Some(header) = buf.get(pos..pos + FRAME_HEADER_LEN) {
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        if header[3] == FRAME_TYPE_DATA
            && len > 0
            && armed
                .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            return (pos, true);
        }
        let end = pos + FRAME_HEADER_LEN + len;
        if end > buf.len() {
            break;
        }
        pos = end;
    }
    (pos, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len())
            .expect("small payload")
            .to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn settings() -> Vec<u8> {
        frame(4, 0, 0, b"")
    }

    fn server_reply() -> Vec<u8> {
        let mut r = settings();
        r.extend(frame(FRAME_TYPE_DATA, 0, 1, b"hello"));
        r.extend(frame(FRAME_TYPE_DATA, 1, 1, b"world"));
        r
    }

    /// Answers the first bytes of each connection with `server_reply()`, then holds the
    /// connection open until the peer closes, so any EOF the client sees comes from the proxy.
    async fn fake_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    if matches!(s.read(&mut b).await, Ok(n) if n > 0) {
                        let _ = s.write_all(&server_reply()).await;
                        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    }
                });
            }
        });
        addr
    }

    /// Everything the client receives until EOF or an error (a reset counts as the end).
    async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut b = [0u8; 256];
        loop {
            match tokio::time::timeout(TIMEOUT, s.read(&mut b)).await {
                Err(_) => panic!("connection still open after {TIMEOUT:?}; got {got:?}"),
                Ok(Ok(0) | Err(_)) => return got,
                Ok(Ok(n)) => got.extend_from_slice(&b[..n]),
            }
        }
    }

    #[tokio::test]
    async fn drops_first_data_frame_then_forwards_intact() {
        let proxy = FaultProxy::start(fake_server().await)
            .await
            .expect("start proxy");

        proxy.drop_next_response();
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        c.write_all(b"PRI * HTTP/2.0").await.expect("write");
        assert_eq!(read_until_closed(&mut c).await, settings());
        assert_eq!(proxy.dropped(), 1);

        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        c.write_all(b"PRI * HTTP/2.0").await.expect("write");
        let mut got = vec![0u8; server_reply().len()];
        tokio::time::timeout(TIMEOUT, c.read_exact(&mut got))
            .await
            .expect("reply in time")
            .expect("read reply");
        assert_eq!(got, server_reply());
        assert_eq!(proxy.dropped(), 1);
    }

    #[tokio::test]
    async fn cut_all_and_drop_close_connections() {
        let proxy = FaultProxy::start(fake_server().await)
            .await
            .expect("start proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        c.write_all(b"x").await.expect("write");
        let mut got = vec![0u8; server_reply().len()];
        c.read_exact(&mut got).await.expect("read reply");
        proxy.cut_all();
        assert_eq!(read_until_closed(&mut c).await, b"");

        let mut c = TcpStream::connect(proxy.addr())
            .await
            .expect("connect after cut");
        c.write_all(b"x").await.expect("write");
        c.read_exact(&mut got).await.expect("read reply after cut");
        drop(proxy);
        assert_eq!(read_until_closed(&mut c).await, b"");
    }

    #[test]
    fn scan_keeps_partial_frames_and_drops_once() {
        let armed = AtomicBool::new(false);
        let mut buf = settings();
        buf.extend(frame(FRAME_TYPE_DATA, 0, 1, b"hello"));
        // A partial header or payload is held back.
        assert_eq!(scan_frames(&buf[..13], &armed), (9, false));
        assert_eq!(scan_frames(&buf[..20], &armed), (9, false));
        assert_eq!(scan_frames(&buf, &armed), (buf.len(), false));

        // An empty DATA frame (e.g. a bare END_STREAM) is not a response worth dropping.
        armed.store(true, Ordering::SeqCst);
        let empty = frame(FRAME_TYPE_DATA, 1, 1, b"");
        assert_eq!(scan_frames(&empty, &armed), (9, false));
        assert!(armed.load(Ordering::SeqCst));

        // The header alone decides, and only one frame is dropped per arming.
        assert_eq!(scan_frames(&buf[..18], &armed), (9, true));
        assert!(!armed.load(Ordering::SeqCst));
        assert_eq!(scan_frames(&buf, &armed), (buf.len(), false));
    }
}
