//! End-to-end tests of the control plane with real `gatehouse` processes.

mod auth;
mod bad_input;
mod basic;
mod data_plane;
mod durability;
mod failover;
mod hardening;
mod limits;
mod membership;
mod protocols;
