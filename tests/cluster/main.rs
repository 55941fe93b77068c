//! End-to-end tests of the control plane with real `gatehouse` processes.

mod access;
mod auth;
mod bad_input;
mod basic;
mod ci_workflow;
mod data_plane;
mod drills;
mod durability;
mod failover;
mod hardening;
mod membership;
mod protocols;
mod secrets;
mod tls;
