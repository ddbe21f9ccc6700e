//! The shared connection state: one lazily connected channel per broker, the metadata cache,
//! and the retry loops that route requests to any broker or to a partition's leader.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keel_proto::v1::cluster_service_client::ClusterServiceClient;
use keel_proto::v1::consume_service_client::ConsumeServiceClient;
use keel_proto::v1::produce_service_client::ProduceServiceClient;
use keel_proto::v1::{
    InitProducerRequest, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, StartPosition,
    list_offsets_request,
};
use tokio::time::Instant;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use crate::admin::Admin;
use crate::consumer::{Consumer, ConsumerConfig};
use crate::error::{ClientError, Result, Tp};
use crate::group::Coordinators;
use crate::metadata::{MetadataCache, Route};
use crate::producer::{Producer, ProducerConfig};
use crate::retry::Target;
use crate::rpc::Answer;
use crate::util::{backoff, lock, read, write};

/// Connection settings shared by everything created from one [`Client`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Time allowed to establish a TCP + HTTP/2 connection to one broker.
    pub connect_timeout: Duration,
    /// Time allowed for one admin, metadata or offset request, retries included.
    pub request_timeout: Duration,
    /// Largest gRPC message sent or accepted. Set explicitly because tonic's defaults (4 MiB to
    /// decode) are below what a 16 MiB fetch needs.
    pub max_message_size: usize,
    /// Metadata older than this is refreshed before it is used to count partitions.
    pub metadata_max_age: Duration,
    /// First delay before retrying a retriable error; doubles up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_message_size: 64 * 1024 * 1024,
            metadata_max_age: Duration::from_secs(300),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
        }
    }
}

setters!(ClientConfig {
    connect_timeout: Duration,
    request_timeout: Duration,
    max_message_size: usize,
});

/// Which offset [`Client::list_offsets`] looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset (the oldest retained record).
    Earliest,
    /// The high watermark: the offset the next committed record will get.
    Latest,
    /// The first record with a timestamp at or after this (ms since the epoch); the high
    /// watermark when there is none.
    Timestamp(i64),
}

/// A handle to a Keel cluster. Cheap to clone: clones share connections and metadata.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    bootstrap: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    pub(crate) metadata: RwLock<MetadataCache>,
    /// Serialises refreshes so that a burst of errors costs one metadata request, not one each.
    refresh: tokio::sync::Mutex<()>,
    /// Index of the broker that answered last, so "any broker" calls reuse a warm connection.
    preferred: AtomicUsize,
    pub(crate) coordinators: Coordinators,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("bootstrap", &self.inner.bootstrap)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to a cluster through `brokers` ("HOST:PORT") with default settings, and fetches
    /// the cluster metadata once so that an unreachable cluster is reported here, by address.
    pub async fn connect(brokers: &[impl AsRef<str>]) -> Result<Self> {
        Self::connect_with(brokers, ClientConfig::default()).await
    }

    pub async fn connect_with(brokers: &[impl AsRef<str>], config: ClientConfig) -> Result<Self> {
        let client = Self::connect_lazy(brokers, config)?;
        client.refresh_metadata().await?;
        Ok(client)
    }

    /// Like [`connect_with`](Self::connect_with) but contacts no broker until the first
    /// request.
    pub fn connect_lazy(brokers: &[impl AsRef<str>], config: ClientConfig) -> Result<Self> {
        let mut bootstrap = Vec::new();
        for b in brokers {
            for addr in b.as_ref().split(',') {
                let addr = normalize_address(addr)?;
                if !addr.is_empty() && !bootstrap.contains(&addr) {
                    bootstrap.push(addr);
                }
            }
        }
        if bootstrap.is_empty() {
            return Err(ClientError::InvalidInput(
                "no broker addresses given".to_owned(),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                bootstrap,
                channels: Mutex::new(HashMap::new()),
                metadata: RwLock::new(MetadataCache::default()),
                refresh: tokio::sync::Mutex::new(()),
                preferred: AtomicUsize::new(0),
                coordinators: Coordinators::default(),
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Topic administration and cluster description.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }

    /// A batching producer. Starts its background sender task, so it must be called inside a
    /// tokio runtime.
    pub fn producer(&self, config: ProducerConfig) -> Result<Producer> {
        Producer::new(self.clone(), config)
    }

    pub fn consumer(&self, config: ConsumerConfig) -> Consumer {
        Consumer::new(self.clone(), config)
    }

    /// Fetches fresh metadata for every topic from any broker.
    pub async fn refresh_metadata(&self) -> Result<()> {
        let generation = read(&self.inner.metadata).generation;
        self.refresh(generation).await
    }

    /// The number of partitions of `topic`, from the cache when it is fresh.
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        let (count, generation, stale) = {
            let m = read(&self.inner.metadata);
            let stale = m
                .refreshed_at
                .is_none_or(|t| t.elapsed() > self.inner.config.metadata_max_age);
            (m.partition_count(topic), m.generation, stale)
        };
        match (count, stale) {
            (Some(n), false) => return Ok(n),
            (Some(n), true) => {
                // A failed background refresh should not fail a send that the cache can serve.
                if self.refresh(generation).await.is_err() {
                    return Ok(n);
                }
            }
            (None, _) => self.refresh(generation).await?,
        }
        read(&self.inner.metadata)
            .partition_count(topic)
            .ok_or_else(|| unknown_topic(topic))
    }

    /// Earliest, latest or by-timestamp offset of a partition, asked of its leader.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<ListOffsetsResponse> {
        let spec = match spec {
            OffsetSpec::Earliest => {
                list_offsets_request::Spec::Position(StartPosition::Earliest as i32)
            }
            OffsetSpec::Latest => {
                list_offsets_request::Spec::Position(StartPosition::Latest as i32)
            }
            OffsetSpec::Timestamp(ts) => list_offsets_request::Spec::TimestampMs(ts),
        };
        let deadline = Instant::now() + self.inner.config.request_timeout;
        let req = ListOffsetsRequest {
            topic: topic.to_owned(),
            partition,
            spec: Some(spec),
        };
        let attempt = self.attempt(req, |mut s: ConsumeServiceClient<Channel>, r| async move {
            s.list_offsets(r).await
        });
        self.call_routed(&PartitionLeader(topic, partition), deadline, true, attempt)
            .await
    }

    /// The channel to `addr`, created on first use. Channels multiplex every request to a broker
    /// over one HTTP/2 connection and reconnect by themselves after it breaks.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel> {
        let mut channels = lock(&self.inner.channels);
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let cfg = &self.inner.config;
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ClientError::InvalidInput(format!("bad broker address {addr:?}: {e}")))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            // Detects a broker that vanished without closing the connection (power loss, network
            // partition) well before a request timeout would.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            // HTTP/2's 64 KiB default windows cap a single stream at one window per round trip,
            // far below what megabyte fetches and produce batches need.
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024);
        let ch = endpoint.connect_lazy();
        channels.insert(addr.to_owned(), ch.clone());
        Ok(ch)
    }

    pub(crate) fn generation(&self) -> u64 {
        read(&self.inner.metadata).generation
    }

    /// Refreshes the metadata unless another task already did since the caller looked at
    /// `seen_generation`.
    pub(crate) async fn refresh(&self, seen_generation: u64) -> Result<()> {
        let _guard = self.inner.refresh.lock().await;
        if read(&self.inner.metadata).generation != seen_generation {
            return Ok(());
        }
        let req = MetadataRequest { topics: Vec::new() };
        let attempt = self.attempt(req, |mut s: ClusterServiceClient<Channel>, r| async move {
            s.metadata(r).await
        });
        let resp = self.call_any(true, attempt).await?;
        write(&self.inner.metadata).apply(&resp, std::time::Instant::now());
        Ok(())
    }

    /// Brokers to try for requests any broker can answer: the known cluster first, then the
    /// bootstrap list (which may name brokers that are not in the metadata yet).
    fn candidates(&self) -> Vec<String> {
        let mut addrs = read(&self.inner.metadata).broker_addresses();
        for b in &self.inner.bootstrap {
            if !addrs.contains(b) {
                addrs.push(b.clone());
            }
        }
        addrs
    }

    /// Runs a request that any broker can answer, moving to another broker on retriable
    /// errors. A request that may have had an effect is retried only when `idempotent`.
    pub(crate) async fn call_any<T, F, Fut>(&self, idempotent: bool, mut call: F) -> Result<T>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Answer<T>,
    {
        let cfg = &self.inner.config;
        let deadline = Instant::now() + cfg.request_timeout;
        let mut attempt = 0u32;
        let mut next_addr: Option<String> = None;
        loop {
            let candidates = self.candidates();
            let idx = self.inner.preferred.load(Ordering::Relaxed) % candidates.len().max(1);
            let addr = match next_addr.take() {
                Some(a) => a,
                None => candidates
                    .get(idx)
                    .cloned()
                    .ok_or_else(|| ClientError::InvalidInput("no broker addresses".to_owned()))?,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = match self.channel(&addr) {
                Ok(ch) => unary(&addr, remaining, call(ch, remaining)).await,
                Err(e) => Err(e),
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            attempt += 1;
            if !err.is_retriable() || !(idempotent || err.is_definite()) {
                return Err(err);
            }
            // Bootstrapping against brokers that are all down should fail fast, not spend the
            // whole request timeout: three rounds over the candidates are enough.
            if matches!(err, ClientError::Unavailable { .. })
                && attempt as usize >= 3 * candidates.len()
            {
                return Err(err);
            }
            match err.leader_hint().and_then(|h| h.address.clone()) {
                Some(a) => next_addr = Some(a),
                None => {
                    self.inner
                        .preferred
                        .store(idx.wrapping_add(1), Ordering::Relaxed);
                }
            }
            let wait = backoff(cfg.retry_backoff, cfg.retry_backoff_max, attempt);
            if Instant::now() + wait >= deadline {
                return Err(err);
            }
            tracing::debug!(%addr, error = %err, "retrying on another broker");
            tokio::time::sleep(wait).await;
        }
    }

    /// Asks the cluster for an idempotent producer id and epoch: for `instance`, its id with the
    /// next epoch; with `bump` (the current id and epoch), the same id with the next epoch;
    /// otherwise a fresh id. Retried safely: the broker answers a repeated `request_id` (keep it
    /// across retries) with the same grant.
    pub(crate) async fn init_producer(
        &self,
        instance: Option<&str>,
        bump: Option<(i64, i16)>,
        request_id: u64,
    ) -> Result<(i64, i16)> {
        let req = InitProducerRequest {
            instance_id: instance.unwrap_or_default().to_owned(),
            producer_id: bump.map(|b| b.0),
            producer_epoch: bump.map_or(0, |b| i32::from(b.1)),
            request_id,
        };
        let attempt = self.attempt(req, |mut s: ProduceServiceClient<Channel>, r| async move {
            s.init_producer(r).await
        });
        let resp = self.call_any(true, attempt).await?;
        let epoch = i16::try_from(resp.producer_epoch).map_err(|_| {
            ClientError::Protocol(format!(
                "InitProducer answered epoch {}, outside the i16 range",
                resp.producer_epoch
            ))
        })?;
        Ok((resp.producer_id, epoch))
    }

    /// Address of the leader of a partition, refreshing the metadata if the cache has no usable
    /// leader. A leaderless partition is `Unavailable` (retriable: an election is running).
    pub(crate) async fn leader_for(&self, topic: &str, partition: u32) -> Result<String> {
        let (route, generation) = {
            let m = read(&self.inner.metadata);
            (m.route(topic, partition), m.generation)
        };
        if let Route::Leader { address, .. } = route {
            return Ok(address);
        }
        self.refresh(generation).await?;
        let route = read(&self.inner.metadata).route(topic, partition);
        route_to_result(topic, partition, route)
    }

    /// Updates the cache after a partition request failed, so the next attempt goes elsewhere.
    pub(crate) fn note_partition_error(&self, topic: &str, partition: u32, err: &ClientError) {
        if let Some(hint) = err.leader_hint() {
            write(&self.inner.metadata).apply_hint(topic, partition, hint);
        } else if err.invalidates_metadata() {
            write(&self.inner.metadata).forget_leader(topic, partition);
        }
    }

    /// One attempt of a unary call at `addr`, bounded by what is left until `deadline`.
    pub(crate) async fn call_at<T, F, Fut>(
        &self,
        addr: &str,
        deadline: Instant,
        call: &mut F,
    ) -> Result<T>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Answer<T>,
    {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let ch = self.channel(addr)?;
        unary(addr, remaining, call(ch, remaining)).await
    }
}

/// A partition's leader (topic, partition), as the metadata cache knows it: a request to it
/// follows leader hints and retries until its deadline (see [`Client::call_routed`]).
pub(crate) struct PartitionLeader<'a>(pub &'a str, pub u32);

impl fmt::Display for PartitionLeader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the leader of {}", Tp(self.0, self.1))
    }
}

impl Target for PartitionLeader<'_> {
    async fn find(&self, client: &Client, _deadline: Instant) -> Result<String> {
        client.leader_for(self.0, self.1).await
    }

    fn failed(&self, client: &Client, err: &ClientError) {
        client.note_partition_error(self.0, self.1, err);
    }
}

pub(crate) fn route_to_result(topic: &str, partition: u32, route: Route) -> Result<String> {
    match route {
        Route::Leader { address, .. } => Ok(address),
        Route::NoLeader => Err(ClientError::Unavailable {
            message: format!("{} has no leader right now", Tp(topic, partition)),
            definite: true,
        }),
        Route::UnknownPartition { count } => Err(ClientError::UnknownPartition {
            message: format!(
                "unknown partition {partition} of topic {topic:?}, which has {count} partitions"
            ),
            definite: true,
        }),
        Route::UnknownTopic => Err(unknown_topic(topic)),
    }
}

pub(crate) fn unknown_topic(topic: &str) -> ClientError {
    ClientError::UnknownTopic {
        message: format!("unknown topic {topic:?}"),
        definite: true,
    }
}

/// Accepts "HOST:PORT", optionally prefixed with `http://`, and rejects anything tonic could
/// not dial, so that typos fail at `connect` instead of at the first request.
fn normalize_address(addr: &str) -> Result<String> {
    let a = addr.trim();
    let a = a.strip_prefix("http://").unwrap_or(a).trim_end_matches('/');
    if a.is_empty() {
        return Ok(String::new());
    }
    let uri: tonic::transport::Uri = format!("http://{a}")
        .parse()
        .map_err(|e| ClientError::InvalidInput(format!("bad broker address {addr:?}: {e}")))?;
    if uri.port_u16().is_none() || uri.host().is_none_or(str::is_empty) || uri.path() != "/" {
        return Err(ClientError::InvalidInput(format!(
            "bad broker address {addr:?}: expected HOST:PORT"
        )));
    }
    Ok(a.to_owned())
}

/// A request that carries its deadline to the broker (`grpc-timeout`), so the broker can stop
/// working on it when the client has given up.
pub(crate) fn with_timeout<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    if !timeout.is_zero() {
        req.set_timeout(timeout);
    }
    req
}

/// Awaits a unary call with a client-side deadline (tonic enforces none by itself) and maps its
/// status.
pub(crate) async fn unary<T>(addr: &str, timeout: Duration, fut: impl Answer<T>) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(ClientError::from_status_at(&status, addr)),
        Err(_) => Err(ClientError::timeout(format!(
            "no answer from broker {addr} within {} ms",
            timeout.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            normalize_address(" 127.0.0.1:9292 ").ok(),
            Some("127.0.0.1:9292".into())
        );
        assert_eq!(normalize_address("http://h:1/").ok(), Some("h:1".into()));
        assert_eq!(
            normalize_address("[::1]:9292").ok(),
            Some("[::1]:9292".into())
        );
        assert_eq!(normalize_address("").ok(), Some(String::new()));
        for bad in ["localhost", "h:99999", "h:1/x", ":9292", "a b:1"] {
            assert!(normalize_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connect_lazy_splits_and_dedups() {
        let c = Client::connect_lazy(&["a:1,b:2", "a:1"], ClientConfig::default());
        let c = c.map(|c| c.inner.bootstrap.clone()).ok();
        assert_eq!(c, Some(vec!["a:1".to_owned(), "b:2".to_owned()]));
        assert!(Client::connect_lazy(&[" , "], ClientConfig::default()).is_err());
        assert!(Client::connect_lazy(&[] as &[&str], ClientConfig::default()).is_err());
    }

    #[tokio::test]
    async fn unreachable_cluster_fails_fast_naming_the_broker() {
        // Port 1 on localhost refuses connections.
        let cfg = ClientConfig::default().connect_timeout(Duration::from_secs(2));
        let started = Instant::now();
        let err = Client::connect_with(&["127.0.0.1:1"], cfg).await;
        let err = match err {
            Ok(_) => panic!("connected to port 1"),
            Err(e) => e,
        };
        assert!(
            matches!(err, ClientError::Unavailable { definite: true, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
