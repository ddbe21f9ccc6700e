//! Empty on purpose: the `keel` binary is `src/main.rs`. Cargo ignores a dependency on a
//! package that has no library, and keel-tests depends on keel-cli only to turn on its
//! `fault-fs` feature, so that `cargo test --workspace` builds the `keel` binary with the
//! simulated disk the fault-injection run needs (see docs/testing.md).
