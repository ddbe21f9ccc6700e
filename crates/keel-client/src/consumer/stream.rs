//! `ConsumeService.Subscribe` as a record stream that survives leader changes.
//!
//! The start is always resolved to an offset before subscribing: a `Subscribe` answer does not
//! say which offset a position or timestamp start resolved to, and the first batch may begin
//! below it, so without a known offset the records to skip could not be told apart.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use futures::stream::BoxStream;
use keel_proto::v1::consume_service_client::ConsumeServiceClient;
use keel_proto::v1::{RecordFormat, SubscribeRequest, SubscribeResponse, subscribe_request};
use tonic::Streaming;

use super::decode::decode_batches;
use super::{ConsumerConfig, ConsumerRecord, OffsetReset, SeekTo};
use crate::client::{Client, OffsetSpec, with_timeout};
use crate::error::{ClientError, Result};
use crate::rpc::Stub;
use crate::util::backoff;

/// Records of one partition, from [`Consumer::subscribe_stream`](super::Consumer::subscribe_stream).
pub struct RecordStream {
    inner: BoxStream<'static, Result<ConsumerRecord>>,
}

impl std::fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream").finish_non_exhaustive()
    }
}

impl Stream for RecordStream {
    type Item = Result<ConsumerRecord>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl RecordStream {
    pub(crate) fn new(
        client: Client,
        config: ConsumerConfig,
        topic: &str,
        partition: u32,
        start: SeekTo,
    ) -> Self {
        let state = Subscription {
            client,
            config,
            topic: Arc::from(topic),
            partition,
            start,
            next: None,
            stream: None,
            buffer: VecDeque::new(),
            attempts: 0,
            done: false,
        };
        let inner = futures::stream::unfold(state, |mut s| async move {
            let item = s.next_record().await?;
            Some((item, s))
        });
        Self {
            inner: Box::pin(inner),
        }
    }
}

struct Subscription {
    client: Client,
    config: ConsumerConfig,
    topic: Arc<str>,
    partition: u32,
    start: SeekTo,
    /// The offset of the next record to yield, once resolved.
    next: Option<u64>,
    stream: Option<Streaming<SubscribeResponse>>,
    buffer: VecDeque<ConsumerRecord>,
    attempts: u32,
    done: bool,
}

impl Subscription {
    async fn next_record(&mut self) -> Option<Result<ConsumerRecord>> {
        loop {
            if let Some(r) = self.buffer.pop_front() {
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            let result = match self.stream.as_mut() {
                None => self.open().await.map(|s| {
                    self.stream = Some(s);
                }),
                Some(stream) => match stream.message().await {
                    Ok(Some(resp)) => self.accept(&resp),
                    // The broker ends a subscription when it stops leading the partition or
                    // shuts down; resume elsewhere.
                    Ok(None) => Err(ClientError::Unavailable {
                        message: "subscription ended by the broker".into(),
                        definite: true,
                    }),
                    Err(status) => Err(ClientError::from_status(&status)),
                },
            };
            if let Err(e) = result {
                self.stream = None;
                if let Some(fatal) = self.recover(e).await {
                    self.done = true;
                    return Some(Err(fatal));
                }
            }
        }
    }

    fn accept(&mut self, resp: &SubscribeResponse) -> Result<()> {
        let from = self.next.unwrap_or(0);
        let d = decode_batches(
            &self.topic,
            self.partition,
            &resp.record_batches,
            from,
            self.config.max_decompressed_batch,
        )?;
        self.attempts = 0;
        self.next = Some(d.next_offset);
        self.buffer.extend(d.records);
        Ok(())
    }

    async fn open(&mut self) -> Result<Streaming<SubscribeResponse>> {
        let offset = match self.next {
            Some(o) => o,
            None => {
                let o = match self.start {
                    SeekTo::Offset(o) => o,
                    SeekTo::Beginning => self.lookup(OffsetSpec::Earliest).await?,
                    SeekTo::End => self.lookup(OffsetSpec::Latest).await?,
                    SeekTo::Timestamp(ts) => self.lookup(OffsetSpec::Timestamp(ts)).await?,
                };
                self.next = Some(o);
                o
            }
        };
        let addr = self.client.leader_for(&self.topic, self.partition).await?;
        let channel = self.client.channel(&addr)?;
        let max = self.client.inner.config.max_message_size;
        let req = SubscribeRequest {
            topic: self.topic.to_string(),
            partition: self.partition,
            start: Some(subscribe_request::Start::Offset(offset)),
            max_bytes: self.config.max_partition_bytes,
            format: RecordFormat::Batches as i32,
        };
        // No grpc-timeout on the request: it would end the whole subscription. The timeout
        // only bounds waiting for the stream to open.
        let mut rpc = ConsumeServiceClient::open(channel, max);
        let call = rpc.subscribe(with_timeout(req, std::time::Duration::ZERO));
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(ClientError::from_status_at(&status, &addr)),
            Err(_) => Err(ClientError::timeout(format!(
                "subscribing at {addr} took longer than {} ms",
                self.config.request_timeout.as_millis()
            ))),
        }
    }

    async fn lookup(&self, spec: OffsetSpec) -> Result<u64> {
        Ok(self
            .client
            .list_offsets(&self.topic, self.partition, spec)
            .await?
            .offset)
    }

    /// Decides how to continue after an error: `None` to resume (after a backoff when
    /// appropriate), or the error to end the stream with.
    async fn recover(&mut self, e: ClientError) -> Option<ClientError> {
        self.client
            .note_partition_error(&self.topic, self.partition, &e);
        if let ClientError::OffsetOutOfRange {
            log_start_offset,
            high_watermark,
            ..
        } = &e
        {
            let (to, bound) = match self.config.auto_offset_reset {
                OffsetReset::None => return Some(e),
                OffsetReset::Earliest => (SeekTo::Beginning, *log_start_offset),
                OffsetReset::Latest => (SeekTo::End, *high_watermark),
            };
            tracing::warn!(topic = %self.topic, partition = self.partition, position = ?self.next,
                "subscription out of range; reset per auto_offset_reset");
            self.start = to;
            self.next = bound;
            // Back off only if resets repeat, e.g. retention racing with the lookup.
            self.attempts += 1;
            if self.attempts > 1 {
                let (base, max) = (self.config.retry_backoff, self.config.retry_backoff_max);
                tokio::time::sleep(backoff(base, max, self.attempts - 1)).await;
            }
            return None;
        }
        if !e.is_retriable() {
            return Some(e);
        }
        self.attempts += 1;
        let wait = backoff(
            self.config.retry_backoff,
            self.config.retry_backoff_max,
            self.attempts,
        );
        tracing::debug!(topic = %self.topic, partition = self.partition, error = %e,
            attempt = self.attempts, "subscription interrupted; resuming");
        tokio::time::sleep(wait).await;
        None
    }
}
