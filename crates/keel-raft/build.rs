//! Compiles the internal broker-to-broker Raft service (`proto/keel/raft/v1/raft.proto`) with
//! protox (pure Rust, so no system `protoc` is needed), like keel-proto's build script.

use std::path::PathBuf;

const FILES: &[&str] = &["keel/raft/v1/raft.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for f in FILES {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(FILES, [&root])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
