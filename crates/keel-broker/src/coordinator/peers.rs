//! Asking partition leaders (this broker or a peer) for offsets, for groups whose partitions
//! other brokers lead.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_proto::v1::consume_service_client::ConsumeServiceClient;
use keel_proto::v1::{ListOffsetsRequest, StartPosition, list_offsets_request};

use super::{Coordinator, OffsetsHost, lock};
use crate::error::{BrokerError, Result};
use crate::groups::TopicPartition;

/// How long a peer is given to answer a high-watermark or offset lookup.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

impl Coordinator {
    /// A channel to another broker (at its peer address), kept for reuse.
    pub fn peer(&self, address: &str) -> Result<tonic::transport::Channel> {
        let mut peers = lock(&self.peers);
        if let Some(c) = peers.get(address) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| BrokerError::Internal(format!("peer address {address:?}: {e}")))?
            .connect_timeout(PEER_TIMEOUT)
            .timeout(PEER_TIMEOUT)
            .connect_lazy();
        peers.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Looks up an offset of a partition at its leader (this broker or a peer).
    pub async fn list_offset(
        &self,
        host: &impl OffsetsHost,
        tp: &TopicPartition,
        spec: list_offsets_request::Spec,
    ) -> Result<(u64, u64, u64)> {
        let topic = host.registry().lookup("topic", &tp.topic)?;
        match topic.partition(tp.partition) {
            Ok(p) => {
                let (start, hwm) = (p.log_start_offset(), p.high_watermark());
                let offset = match spec {
                    list_offsets_request::Spec::Position(pos)
                        if pos == StartPosition::Earliest as i32 =>
                    {
                        start
                    }
                    list_offsets_request::Spec::Position(_) => hwm,
                    list_offsets_request::Spec::TimestampMs(ts) => {
                        p.offset_for_timestamp(ts)?.map_or(hwm, |(o, _)| o)
                    }
                };
                Ok((offset, start, hwm))
            }
            Err(BrokerError::NotLeader {
                leader: Some((id, address)),
                ..
            }) => {
                // The hint is the leader's client address; a broker talks to its peer address.
                let address = host.peer_address(id).unwrap_or(address);
                let mut client = ConsumeServiceClient::new(self.peer(&address)?);
                let r = tokio::time::timeout(
                    PEER_TIMEOUT,
                    client.list_offsets(ListOffsetsRequest {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        spec: Some(spec),
                    }),
                )
                .await
                .map_err(|_| BrokerError::Unavailable {
                    message: format!("the leader of {tp} at {address} did not answer in time"),
                    definite: true,
                })?
                .map_err(|s| {
                    BrokerError::from_peer_read(
                        &s,
                        &format!("asking the leader of {tp} at {address}"),
                    )
                })?
                .into_inner();
                Ok((r.offset, r.log_start_offset, r.high_watermark))
            }
            Err(e) => Err(e),
        }
    }

    /// High watermarks of partitions, asked of their leaders concurrently; partitions whose
    /// leader could not be asked are left out.
    pub async fn high_watermarks(
        &self,
        host: &impl OffsetsHost,
        tps: &[TopicPartition],
    ) -> BTreeMap<TopicPartition, u64> {
        let asks = tps.iter().map(|tp| async move {
            let r = self
                .list_offset(
                    host,
                    tp,
                    list_offsets_request::Spec::Position(StartPosition::Latest as i32),
                )
                .await;
            (tp.clone(), r.ok().map(|(_, _, hwm)| hwm))
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(tp, h)| h.map(|h| (tp, h)))
            .collect()
    }
}
