//! The Raft type configuration: what a log entry carries and what a node is.

use std::io::Cursor;

use gatehouse_model::{Command, WriteError, WriteOk};
use serde::{Deserialize, Serialize};

pub type NodeId = u64;

/// What the cluster knows of a member: where to reach it and which
/// incarnation of its data directory joined.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub raft_addr: String,
    pub admin_addr: String,
    /// Random id made when the node's data directory was created. A node
    /// whose directory was wiped has a new one, and the cluster refuses it
    /// until an operator re-adds it.
    pub incarnation: String,
}

/// The answer of the state machine to one log entry.
pub type Response = Result<WriteOk, WriteError>;

openraft::declare_raft_types!(
    /// Gatehouse's Raft types: commands of the model, sled storage, tokio.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
