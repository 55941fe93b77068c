//! The Gatehouse control plane: Raft (openraft) over gRPC with sled storage,
//! the state machine that holds the configuration, and the admin API.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod identity;
pub mod network;
pub mod node;
pub mod ops;
pub mod store;
pub mod stream;
pub mod tls;
pub mod types;

pub use node::{ControlPlane, NodeConfig, StartError, Tuning};
