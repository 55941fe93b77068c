//! End-to-end tests of the control plane with real `gatehouse` processes.

mod access;
mod auth;
mod backup;
mod bad_input;
mod basic;
mod ci_workflow;
mod cluster_id;
mod consumer_auth;
mod data_plane;
mod drills;
mod durability;
mod failover;
mod hardening;
mod jwks;
mod limits;
mod membership;
mod protocols;
mod ratelimit;
mod scale;
mod secrets;
mod telemetry;
mod tls;
