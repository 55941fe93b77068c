//! Gatehouse's domain: the configuration objects, the rules they obey, the
//! declarative file format, and the deterministic state they are stored in.
#![forbid(unsafe_code)]

pub mod admintoken;
pub mod apikey;
pub mod audit;
pub mod diff;
pub mod error;
pub mod file;
pub mod lint;
pub mod net;
pub mod object;
pub mod quota;
pub mod seal;
pub mod secret;
pub mod selector;
pub mod state;
pub mod validate;

#[cfg(test)]
mod fixtures;

pub use error::ErrorCode;
pub use object::{Kind, Object, ObjectRef};
pub use state::{Command, ConfigState, Op, WriteError, WriteOk};
