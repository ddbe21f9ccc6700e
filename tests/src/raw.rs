//! A gRPC codec that sends and receives raw bytes, to put arbitrary (malformed) messages on the
//! wire of any RPC.

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

#[derive(Debug, Default, Clone, Copy)]
pub struct Raw;

#[derive(Debug)]
pub struct RawEnc;

#[derive(Debug)]
pub struct RawDec;

impl Encoder for RawEnc {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEnc;
    type Decoder = RawDec;

    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }

    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

/// Sends `body` as the request message of the unary RPC at `path` (e.g.
/// `/keel.v1.ProduceService/Produce`) and returns the raw answer or the status.
pub async fn unary(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Bytes,
) -> Result<Bytes, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(tonic::Response::into_inner)
}
