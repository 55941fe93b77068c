//! Raft storage: the log, the state machine, and the engine they sit on.

// openraft's storage traits dictate `StorageError` as the error type.
#![allow(clippy::result_large_err)]

pub mod engine;
pub mod log;
pub mod sm;

pub use engine::{Engine, EngineError, SledEngine};
pub use log::LogStore;
pub use sm::{Shared, SmData, StateMachineStore};

#[cfg(test)]
mod tests;
