//! Compiles `proto/keel/v1/*.proto` with protox (pure Rust, so no system `protoc` is needed) and
//! generates tonic clients and servers. The encoded descriptor set is kept for server reflection.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &[
    "keel/v1/common.proto",
    "keel/v1/admin.proto",
    "keel/v1/cluster.proto",
    "keel/v1/produce.proto",
    "keel/v1/consume.proto",
    "keel/v1/groups.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for f in FILES {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(FILES, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("keel_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
