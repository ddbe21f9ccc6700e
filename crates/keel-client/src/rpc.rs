//! The gRPC stubs this client calls, all bounded by `ClientConfig::max_message_size`, and the
//! per-attempt closure that the retry loops (`Client::call_any`, `Client::call_routed`) run for
//! a unary request.

use std::future::Future;
use std::time::Duration;

use keel_proto::v1::admin_service_client::AdminServiceClient;
use keel_proto::v1::cluster_service_client::ClusterServiceClient;
use keel_proto::v1::consume_service_client::ConsumeServiceClient;
use keel_proto::v1::groups_service_client::GroupsServiceClient;
use keel_proto::v1::produce_service_client::ProduceServiceClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::client::{Client, with_timeout};

/// The future of one attempt of a unary request: the broker's answer, or its status.
pub(crate) trait Answer<T>:
    Future<Output = std::result::Result<Response<T>, Status>>
{
}

impl<T, F> Answer<T> for F where F: Future<Output = std::result::Result<Response<T>, Status>> {}

/// A service stub on a broker's channel.
pub(crate) trait Stub {
    /// A stub on `ch` that sends and accepts messages of up to `max` bytes. Set explicitly
    /// because tonic's defaults (4 MiB to decode) are below what a 16 MiB fetch needs.
    fn open(ch: Channel, max: usize) -> Self;
}

/// The generated stubs share no trait, so each gets the same `Stub` impl.
macro_rules! stubs {
    ($($stub:ident),* $(,)?) => {$(
        impl Stub for $stub<Channel> {
            fn open(ch: Channel, max: usize) -> Self {
                $stub::new(ch)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max)
            }
        }
    )*};
}

stubs!(
    AdminServiceClient,
    ClusterServiceClient,
    ConsumeServiceClient,
    GroupsServiceClient,
    ProduceServiceClient,
);

impl Client {
    /// The attempt closure of a unary request: every attempt sends a copy of `req`, carrying the
    /// time left as its deadline, through a fresh stub on that attempt's channel; `send` picks
    /// the method (`|mut s, r| async move { s.list_topics(r).await }`).
    pub(crate) fn attempt<S, Req, Fut>(
        &self,
        req: Req,
        send: impl Fn(S, Request<Req>) -> Fut,
    ) -> impl FnMut(Channel, Duration) -> Fut
    where
        S: Stub,
        Req: Clone,
    {
        let max = self.inner.config.max_message_size;
        move |ch, t| send(S::open(ch, max), with_timeout(req.clone(), t))
    }
}
