//! One vocabulary of failure shared by the admin API, the CLI and the proxy.

use serde::{Deserialize, Serialize};

/// What went wrong, independent of the transport that reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request or an object in it breaks a rule.
    InvalidArgument,
    /// The object does not exist.
    NotFound,
    /// An expected revision did not match: re-read and retry.
    Conflict,
    /// The write is valid but the current state forbids it (e.g. still referenced).
    FailedPrecondition,
    /// No leader, or the node cannot serve now: retry, possibly elsewhere.
    Unavailable,
    /// A bug or an I/O failure on the server.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::FailedPrecondition => 409,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}
