//! The gRPC services. Each handler validates its request completely before any side effect, so
//! its errors are definite unless documented otherwise.

pub mod admin;
pub mod cluster;
pub mod consume;
pub mod groups;
pub mod produce;
