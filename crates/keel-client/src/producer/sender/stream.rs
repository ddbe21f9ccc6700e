//! Sending batches: building a `Produce` request for a batch and writing it to the leader's
//! `ProduceStream` (opened on first use), and the reader task of each stream.

use keel_proto::v1::produce_service_client::ProduceServiceClient;
use keel_proto::v1::{ProduceBatch, ProduceRequest, produce_batch};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{Conn, Event, InFlight, RESPONSE_GRACE, Sender};
use crate::error::ClientError;
use crate::producer::accumulator::ProducerBatch;
use crate::rpc::Stub;
use crate::util::millis_u32;

impl Sender {
    pub(super) fn dispatch(&mut self, addr: String, mut batch: ProducerBatch, now: Instant) {
        if let Some(err) = self.idem.as_ref().and_then(|i| i.fenced.clone()) {
            return self.fail(batch, err, true);
        }
        if let Err(e) = self.sequence(&mut batch) {
            return self.fail(batch, e, true);
        }
        let bytes = match batch.encoded() {
            Ok(b) => b,
            Err(e) => return self.fail(batch, e, true),
        };
        let (conn_id, tx) = match self.conn(&addr) {
            Ok(c) => (c.id, c.tx.clone()),
            Err(e) => return self.on_failure(batch, e),
        };
        let correlation_id = self.next_correlation;
        self.next_correlation += 1;
        let req = ProduceRequest {
            correlation_id,
            topic: batch.topic.to_string(),
            acks: self.config.acks.to_proto() as i32,
            timeout_ms: millis_u32(self.config.request_timeout),
            batches: vec![ProduceBatch {
                partition: Some(batch.partition),
                data: Some(produce_batch::Data::RecordBatch(bytes)),
                producer: None,
            }],
        };
        if tx.send(req).is_err() {
            // The stream task ended before we noticed; nothing was sent on it.
            self.drop_conn(&addr, conn_id);
            let err = ClientError::Unavailable {
                message: format!("produce stream to {addr} closed"),
                definite: true,
            };
            return self.on_failure(batch, err);
        }
        self.in_flight.insert(
            correlation_id,
            InFlight {
                batch,
                conn: conn_id,
                addr,
                deadline: now + self.config.request_timeout + RESPONSE_GRACE,
            },
        );
    }

    /// The produce stream to `addr`, opened on first use.
    fn conn(&mut self, addr: &str) -> Result<&Conn, ClientError> {
        if !self.conns.contains_key(addr) {
            let channel = self.client.channel(addr)?;
            let (tx, rx) = mpsc::unbounded_channel();
            let id = self.next_conn;
            self.next_conn += 1;
            let max = self.client.inner.config.max_message_size;
            let events = self.events_tx.clone();
            let addr_owned = addr.to_owned();
            tokio::spawn(async move {
                let error = run_stream(
                    ProduceServiceClient::open(channel, max),
                    rx,
                    &events,
                    &addr_owned,
                )
                .await;
                let _ = events.send(Event::Closed {
                    conn: id,
                    addr: addr_owned,
                    error,
                });
            });
            self.conns.insert(addr.to_owned(), Conn { id, tx });
        }
        self.conns
            .get(addr)
            .ok_or_else(|| ClientError::InvalidInput(format!("no connection to {addr}")))
    }

    /// Forgets a stream so that the next batch for `addr` opens a new one. Dropping the request
    /// sender half-closes the old stream; answers already owed still arrive on it.
    pub(super) fn drop_conn(&mut self, addr: &str, id: u64) {
        if self.conns.get(addr).is_some_and(|c| c.id == id) {
            self.conns.remove(addr);
        }
    }
}

/// Runs one `ProduceStream`: requests flow in from `rx`, answers go out as events. Returns why
/// the stream ended.
async fn run_stream(
    mut rpc: keel_proto::v1::produce_service_client::ProduceServiceClient<
        tonic::transport::Channel,
    >,
    rx: mpsc::UnboundedReceiver<ProduceRequest>,
    events: &mpsc::UnboundedSender<Event>,
    addr: &str,
) -> ClientError {
    let mut answers = match rpc.produce_stream(UnboundedReceiverStream::new(rx)).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => return ClientError::from_status_at(&status, addr),
    };
    loop {
        match answers.message().await {
            Ok(Some(resp)) => {
                if events.send(Event::Response { resp }).is_err() {
                    return ClientError::ProducerClosed;
                }
            }
            // The broker ends the stream after the client half-closes it, or when it shuts
            // down; either way, whatever is still unanswered is in doubt.
            Ok(None) => {
                return ClientError::Unavailable {
                    message: format!("produce stream to {addr} ended"),
                    definite: false,
                };
            }
            Err(status) => return ClientError::from_status_at(&status, addr),
        }
    }
}
