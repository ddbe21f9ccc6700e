//! Keel's gRPC API types, generated from `proto/keel/v1`. No logic lives here.

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("keel.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keel_descriptor.bin"));
