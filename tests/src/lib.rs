//! Shared helpers for Keel's integration tests (the tests themselves live in `tests/tests/`).

pub mod bit_rot;
pub mod broker;
pub mod cluster;
pub mod consumer;
pub mod fake_clock;
pub mod faults;
pub mod link_degrade;
pub mod log_util;
pub mod proxy;
pub mod raw;
pub mod records;
