//! A low-level ordered pipeline of pre-encoded batches to one partition (benchmarks and tools
//! that build batches themselves): one `ProduceStream` to the leader, answers in order, no
//! retries. With idempotence, each batch is stamped with the producer id, epoch and the next
//! sequence numbers, exactly as the batching producer does.

use bytes::Bytes;
use keel_batch::{BatchHeader, ProducerInfo, sequence, set_producer};
use keel_proto::v1::produce_service_client::ProduceServiceClient;
use keel_proto::v1::{BatchAck, ProduceBatch, ProduceRequest, ProduceResponse, produce_batch};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::Acks;
use crate::client::Client;
use crate::error::{ClientError, Result, Tp};
use crate::rpc::Stub;
use crate::util::millis_u32;

/// See the module docs. From [`Client::batch_pipeline`].
#[derive(Debug)]
pub struct BatchPipeline {
    tx: mpsc::UnboundedSender<ProduceRequest>,
    answers: tonic::Streaming<ProduceResponse>,
    addr: String,
    topic: String,
    partition: u32,
    acks: Acks,
    timeout_ms: u32,
    producer: Option<(i64, i16)>,
    next_seq: i32,
    next_correlation: u64,
}

impl Client {
    /// Opens a [`BatchPipeline`] to the current leader of `topic`/`partition`. With
    /// `idempotent`, it first obtains a fresh producer id.
    pub async fn batch_pipeline(
        &self,
        topic: &str,
        partition: u32,
        acks: Acks,
        idempotent: bool,
    ) -> Result<BatchPipeline> {
        let producer = if idempotent {
            Some(
                self.init_producer(None, None, crate::util::random() | 1)
                    .await?,
            )
        } else {
            None
        };
        let addr = self.leader_for(topic, partition).await?;
        let max = self.inner.config.max_message_size;
        let (tx, rx) = mpsc::unbounded_channel();
        let answers = ProduceServiceClient::open(self.channel(&addr)?, max)
            .produce_stream(UnboundedReceiverStream::new(rx))
            .await
            .map_err(|s| ClientError::from_status_at(&s, &addr))?
            .into_inner();
        Ok(BatchPipeline {
            tx,
            answers,
            addr,
            topic: topic.to_owned(),
            partition,
            acks,
            timeout_ms: millis_u32(self.inner.config.request_timeout),
            producer,
            next_seq: 0,
            next_correlation: 0,
        })
    }
}

impl BatchPipeline {
    /// Queues one encoded batch (see `keel_batch::BatchBuilder`). It is copied and its
    /// producer fields and CRC are rewritten: the producer's when idempotent, none otherwise,
    /// so both cost the client the same. The broker reads at most 256 unanswered requests
    /// ahead; call [`BatchPipeline::next_ack`] to take answers.
    pub fn send(&mut self, batch: &[u8]) -> Result<()> {
        let header = BatchHeader::parse(batch)
            .map_err(|e| ClientError::InvalidInput(format!("not a record batch: {e}")))?;
        let info = match self.producer {
            Some((producer_id, producer_epoch)) => {
                let first = self.next_seq;
                self.next_seq = sequence::next(first, header.record_count);
                ProducerInfo {
                    producer_id,
                    producer_epoch,
                    base_sequence: first,
                }
            }
            None => ProducerInfo::default(),
        };
        let mut bytes = batch.to_vec();
        set_producer(&mut bytes, info)
            .map_err(|e| ClientError::InvalidInput(format!("cannot stamp the batch: {e}")))?;
        let req = ProduceRequest {
            correlation_id: self.next_correlation,
            topic: self.topic.clone(),
            acks: self.acks.to_proto() as i32,
            timeout_ms: self.timeout_ms,
            batches: vec![ProduceBatch {
                partition: Some(self.partition),
                data: Some(produce_batch::Data::RecordBatch(Bytes::from(bytes))),
                producer: None,
            }],
        };
        self.next_correlation += 1;
        self.tx.send(req).map_err(|_| ClientError::Unavailable {
            message: format!("produce stream to {} closed", self.addr),
            definite: true,
        })
    }

    /// The answer to the oldest unanswered batch.
    pub async fn next_ack(&mut self) -> Result<BatchAck> {
        match self.answers.message().await {
            Ok(Some(resp)) => {
                if let Some(e) = &resp.error {
                    return Err(ClientError::from_proto(e));
                }
                resp.batches.into_iter().next().ok_or_else(|| {
                    ClientError::Protocol(format!(
                        "produce answer for {} has no batch ack",
                        Tp(&self.topic, self.partition)
                    ))
                })
            }
            Ok(None) => Err(ClientError::Unavailable {
                message: format!("produce stream to {} ended", self.addr),
                definite: false,
            }),
            Err(s) => Err(ClientError::from_status_at(&s, &self.addr)),
        }
    }
}
