//! Starting and stopping a broker: storage recovery, the gRPC port, the HTTP port and the
//! background tasks (retention, interval flushes, gauges).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_proto::v1::admin_service_server::AdminServiceServer;
use keel_proto::v1::cluster_service_server::ClusterServiceServer;
use keel_proto::v1::consume_service_server::ConsumeServiceServer;
use keel_proto::v1::groups_service_server::GroupsServiceServer;
use keel_proto::v1::produce_service_server::ProduceServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use crate::cluster::ClusterNode;
use crate::error::{BrokerError, Result};
use crate::registry::Registry;
use crate::service::{
    admin::Admin, cluster::Cluster, consume::Consume, groups::Groups, produce::Produce,
};
use crate::state::{BrokerState, Limits, Shared};

/// Everything a broker needs to start.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub id: u32,
    pub data_dir: PathBuf,
    /// gRPC address to bind (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Address clients are told to use; defaults to the bound gRPC address.
    pub advertise: Option<String>,
    pub metrics_listen: SocketAddr,
    /// Peers of a multi-broker cluster (used from the [cluster] issue on).
    pub initial_cluster: Vec<(u32, String)>,
    pub join: Option<String>,
    pub retention_check_interval: Duration,
    /// Bytes per second the background scrub of sealed segments reads (0: off; damage a read
    /// finds is still repaired).
    pub scrub_bytes_per_sec: u64,
    pub limits: Limits,
    /// How long the committed offsets of a group without members are kept after its last
    /// commit.
    pub offsets_retention_ms: i64,
    /// Offsets records after which a coordinator writes a compacted image.
    pub offsets_compact_records: u64,
    /// The filesystem a clustered broker keeps its data on: the real one, or the fault
    /// suite's `CrashFs`, which can lose everything not yet synced.
    pub fs: Arc<dyn keel_log::fs::Fs>,
}

impl BrokerConfig {
    pub fn new(id: u32, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 9292)),
            advertise: None,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9392)),
            initial_cluster: Vec::new(),
            join: None,
            retention_check_interval: Duration::from_secs(300),
            scrub_bytes_per_sec: crate::cluster::DEFAULT_SCRUB_BYTES_PER_SEC,
            limits: Limits::default(),
            offsets_retention_ms: crate::coordinator::DEFAULT_OFFSETS_RETENTION_MS,
            offsets_compact_records: crate::coordinator::DEFAULT_COMPACT_RECORDS,
            fs: Arc::new(keel_log::fs::RealFs),
        }
    }
}

/// A running broker.
#[derive(Debug)]
pub struct BrokerHandle {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub advertise: String,
    state: Shared,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grpc: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    ready: Arc<AtomicBool>,
    health: tonic_health::server::HealthReporter,
    http_stop: watch::Sender<bool>,
}

/// Names the health service reports on ("" is the whole server).
const HEALTH_NAMES: [&str; 5] = [
    "keel.v1.AdminService",
    "keel.v1.ClusterService",
    "keel.v1.ProduceService",
    "keel.v1.ConsumeService",
    "",
];

/// How long a shutdown waits for clients to finish their calls and close their streams.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn bind_err(what: &str, addr: SocketAddr, e: std::io::Error) -> BrokerError {
    BrokerError::Internal(format!("cannot listen for {what} on {addr}: {e}"))
}

/// Starts a broker: recovers its partitions, then serves gRPC and HTTP until shut down.
pub async fn start(config: BrokerConfig) -> Result<BrokerHandle> {
    let grpc_listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| bind_err("gRPC", config.listen, e))?;
    let http_listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|e| bind_err("metrics", config.metrics_listen, e))?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|e| BrokerError::Internal(e.to_string()))?;
    let metrics_addr = http_listener
        .local_addr()
        .map_err(|e| BrokerError::Internal(e.to_string()))?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| default_advertise(grpc_addr));
    crate::http::prometheus();

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (http_stop, http_stop_rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    {
        // The HTTP port outlives the gRPC one, so probes see 503 for the whole drain.
        let (ready, rx) = (Arc::clone(&ready), http_stop_rx);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::http::serve(http_listener, ready, rx).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        }));
    }

    // The directory's identity comes first: a directory of another broker is refused before
    // anything in it is touched.
    let storage = {
        let (dir, id, fs) = (config.data_dir.clone(), config.id, Arc::clone(&config.fs));
        tokio::task::spawn_blocking(move || crate::storage_identity::load_or_create(&fs, &dir, id))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??
    };
    // A data directory of a single-node broker from before brokers always formed a cluster
    // is converted first (see `legacy`).
    let legacy = {
        let (dir, id, fs) = (config.data_dir.clone(), config.id, Arc::clone(&config.fs));
        let peer = config
            .initial_cluster
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| advertise.clone(), |(_, a)| a.clone());
        tokio::task::spawn_blocking(move || crate::legacy::convert_partitions(&dir, id, &peer, &fs))
            .await??
    };
    // Without --initial-cluster or --join the broker is a cluster of one: the same metadata
    // group and partition groups, each with one voter.
    let cluster = ClusterNode::start(
        config.id,
        advertise.clone(),
        &config.data_dir,
        &config.initial_cluster,
        config.join.as_deref(),
        // Peers see this broker's own address as the source of its connections.
        Some(grpc_addr.ip()).filter(|ip| !ip.is_unspecified()),
        Arc::clone(&config.fs),
        storage,
    )
    .await?;
    if let Some(meta) = legacy {
        cluster.adopt_legacy(meta, &config.data_dir).await?;
    }
    let state: Shared = Arc::new(BrokerState {
        id: config.id,
        advertise: advertise.clone(),
        registry: Registry::default(),
        limits: config.limits,
        shutdown: shutdown_rx.clone(),
        cluster: Arc::clone(&cluster),
        groups: Arc::new(crate::coordinator::Coordinator::new(
            config.offsets_retention_ms,
            config.offsets_compact_records,
        )),
    });

    let max = config.limits.max_request_bytes;
    let encode_max = (config.limits.max_fetch_bytes as usize) * 2 + (16 << 20);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in [
        "keel.v1.AdminService",
        "keel.v1.ClusterService",
        "keel.v1.ProduceService",
        "keel.v1.ConsumeService",
        "keel.v1.GroupsService",
        "",
    ] {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // A clustered broker serves the Raft traffic at once (its peers need it to elect and
    // catch it up) but answers clients only once it has current metadata: before that it
    // would describe an empty or stale cluster. Clients get UNAVAILABLE and try another broker.
    let serving = Arc::new(AtomicBool::new(false));
    let gate = {
        let serving = Arc::clone(&serving);
        move |req: tonic::Request<()>| -> std::result::Result<tonic::Request<()>, tonic::Status> {
            if serving.load(Ordering::Acquire) {
                Ok(req)
            } else {
                Err(BrokerError::Unavailable {
                    message: "the broker is starting: it is catching up with the cluster metadata"
                        .into(),
                    definite: true,
                }
                .to_status())
            }
        }
    };
    // Every client-facing service gets the same message-size limits and the metadata gate; the
    // generated servers share no trait for those setters, hence a macro.
    macro_rules! client_service {
        ($server:ident, $service:ident) => {
            InterceptedService::new(
                $server::new($service(Arc::clone(&state)))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(encode_max),
                gate.clone(),
            )
        };
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| BrokerError::Internal(e.to_string()))?;
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .concurrency_limit_per_connection(1024)
        .max_concurrent_streams(Some(1024))
        .initial_connection_window_size(Some(8 << 20))
        .initial_stream_window_size(Some(4 << 20))
        // Peers share this port: after a network partition heals, the requests a peer gave up
        // on during it arrive as a burst of stream resets, and h2's default limit (20) would
        // make the broker drop the whole peer connection again. Still bounded against
        // rapid-reset floods.
        .http2_max_pending_accept_reset_streams(Some(256))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(client_service!(AdminServiceServer, Admin))
        .add_service(client_service!(ClusterServiceServer, Cluster))
        .add_service(client_service!(ProduceServiceServer, Produce))
        .add_service(client_service!(ConsumeServiceServer, Consume))
        .add_service(client_service!(GroupsServiceServer, Groups));
    let router = router.add_service(cluster.raft_service());
    let mut rx = shutdown_rx.clone();
    let grpc = tokio::spawn(router.serve_with_incoming_shutdown(
        crate::conn::incoming(grpc_listener),
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
    ));

    tasks.push(spawn_background(
        Arc::clone(&state),
        config.retention_check_interval,
    ));
    tasks.push(spawn_group_sweep(Arc::clone(&state)));
    tasks.push(cluster.spawn_scrub(config.scrub_bytes_per_sec, shutdown_rx.clone()));
    tasks.push(cluster.spawn_loops(
        Arc::clone(&state) as Arc<dyn crate::cluster::RegistryHolder>,
        shutdown_rx.clone(),
    ));
    if let Some(via) = config.join.clone() {
        let c = Arc::clone(&cluster);
        tokio::spawn(async move {
            match c.join(&via).await {
                Ok(()) => tracing::info!(via = %via, "joined the cluster"),
                Err(e) => tracing::error!(via = %via, error = %e, "could not join the cluster"),
            }
        });
    }
    cluster
        .wait_ready(&state.registry, Duration::from_secs(15))
        .await;
    serving.store(true, Ordering::Release);
    ready.store(true, Ordering::Release);
    tracing::info!(broker = config.id, grpc = %grpc_addr, metrics = %metrics_addr, advertise = %advertise, "broker ready");
    Ok(BrokerHandle {
        grpc_addr,
        metrics_addr,
        advertise,
        state,
        shutdown_tx,
        tasks,
        grpc,
        ready,
        health: health_reporter,
        http_stop,
    })
}

/// The address clients are told when `--advertise` is not given: the bound address, unless it
/// is a wildcard (0.0.0.0 / ::), which no client can connect to; then this host's name.
fn default_advertise(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    tracing::warn!(listen = %bound, advertise = %host, "listening on a wildcard address without --advertise; telling clients to use this host's name (set --advertise to the address clients can reach)");
    format!("{host}:{}", bound.port())
}

/// Group sessions expire on time, patterns pick up new topics, and a broker that became the
/// leader of an offsets partition takes its groups over, without waiting for a request.
fn spawn_group_sweep(state: Shared) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = state.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_housekeeping = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let housekeeping = last_housekeeping.elapsed() >= Duration::from_secs(10);
                    if housekeeping {
                        last_housekeeping = tokio::time::Instant::now();
                    }
                    state.groups.sweep(&state, housekeeping).await;
                }
            }
        }
    })
}

fn spawn_background(state: Shared, retention_every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = state.shutdown.clone();
        let mut flush_tick = tokio::time::interval(Duration::from_millis(100));
        let mut retention_tick = tokio::time::interval(retention_every);
        let mut gauge_tick = tokio::time::interval(Duration::from_secs(5));
        let mut retention: Option<JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = flush_tick.tick() => {
                    let parts = state.registry.all_partitions();
                    let _ = tokio::task::spawn_blocking(move || {
                        for p in parts {
                            if let Err(e) = p.log().flush_if_due().and_then(|_| p.log().checkpoint_if_due()) {
                                tracing::error!(topic = %p.topic, partition = p.id, error = %e, "background flush failed");
                            }
                        }
                    }).await;
                }
                _ = retention_tick.tick() => {
                    // Partitions delete through their Raft group (snapshot + purge), in a task
                    // of its own so that a slow round never delays the interval flushes of
                    // this loop; a round still running skips the next tick.
                    if retention.as_ref().is_none_or(|t| t.is_finished()) {
                        let state = Arc::clone(&state);
                        retention = Some(tokio::spawn(async move {
                            for t in state.registry.list() {
                                for p in t.local_partitions() {
                                    match state.cluster.retain(p, &t.config).await {
                                        Ok(n) if n > 0 => metrics::counter!("keel_retention_deleted_bytes_total").increment(n),
                                        Ok(_) => {}
                                        Err(e) => tracing::warn!(topic = %p.topic, partition = p.id, error = %e, "retention failed"),
                                    }
                                }
                            }
                        }));
                    }
                }
                _ = gauge_tick.tick() => {
                    for p in state.registry.all_partitions() {
                        let labels = [("topic", p.topic.to_string()), ("partition", p.id.to_string())];
                        metrics::gauge!("keel_partition_size_bytes", &labels).set(p.log().size_bytes() as f64);
                        metrics::gauge!("keel_partition_log_end_offset", &labels).set(p.log().log_end_offset() as f64);
                        metrics::gauge!("keel_partition_log_start_offset", &labels).set(p.log_start_offset() as f64);
                    }
                }
            }
        }
    })
}

impl BrokerHandle {
    /// Resolves, with the reason, if the broker stops being able to serve (its metadata
    /// group's storage failed). The caller should exit, so that the broker restarts and
    /// recovers from disk.
    pub async fn failed(&self) -> String {
        self.state.cluster.failed().await
    }

    /// Stops accepting requests, lets in-flight ones finish, flushes every partition and writes
    /// its recovery checkpoint.
    pub async fn shutdown(mut self) -> Result<()> {
        tracing::info!("shutting down");
        self.ready.store(false, Ordering::Release);
        for name in HEALTH_NAMES {
            self.health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        // Leaderships go first, while the gRPC port (which carries the Raft traffic) serves.
        self.state.cluster.hand_over().await;
        let _ = self.shutdown_tx.send(true);
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut self.grpc).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
            Err(_) => {
                tracing::warn!(timeout = ?DRAIN_TIMEOUT, "clients did not finish in time; closing their connections");
                self.grpc.abort();
            }
        }
        // The first task is the HTTP server, stopped last.
        let mut tasks = std::mem::take(&mut self.tasks);
        let http = (!tasks.is_empty()).then(|| tasks.remove(0));
        for t in tasks {
            let _ = t.await;
        }
        self.state.cluster.shutdown().await;
        let parts = self.state.registry.all_partitions();
        tokio::task::spawn_blocking(move || {
            let mut first_err = None;
            for p in parts {
                if let Err(e) = p.log().checkpoint() {
                    tracing::error!(topic = %p.topic, partition = p.id, error = %e, "final flush failed");
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), |e| Err(BrokerError::from(e)))
        })
        .await??;
        let _ = self.http_stop.send(true);
        if let Some(h) = http {
            let _ = h.await;
        }
        tracing::info!("shut down cleanly");
        Ok(())
    }

    /// The broker's shared state (for tests and embedding).
    pub fn state(&self) -> &Shared {
        &self.state
    }
}
