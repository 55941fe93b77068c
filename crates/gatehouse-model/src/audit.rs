//! The audit log: who changed what, at which revision and when.
//!
//! Records are made by [`ConfigState::apply`](crate::ConfigState::apply)
//! from the command's [`Origin`], so every replica holds the same log and a
//! snapshot carries it. A record names the object and holds a SHA-256 of
//! what was written, never the object itself: key material and token hashes
//! stay out of the log.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::object::Object;

/// The most records kept; the oldest are dropped first.
pub const AUDIT_LIMIT: usize = 100_000;

/// Who made a write and when, as the node that proposed it saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `token:<name>` for an admin token, `cert:<common name>` for a client certificate.
    pub actor: String,
    /// Unix milliseconds on the proposing node's clock.
    pub at_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Delete,
    /// Membership: a cluster was initialized, a node added or removed.
    InitCluster,
    AddNode,
    RemoveNode,
}

/// The kind audit records of membership changes name instead of an object kind.
pub const MEMBER_KIND: &str = "member";

/// A membership change, recorded in the audit log by a command of its own
/// (membership itself changes through Raft, outside the configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    pub action: Action,
    /// The node ids concerned.
    pub nodes: Vec<u64>,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::InitCluster => "init_cluster",
            Action::AddNode => "add_node",
            Action::RemoveNode => "remove_node",
        }
    }
}

/// One changed object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub revision: u64,
    pub at_ms: u64,
    pub actor: String,
    pub action: Action,
    /// The object's kind, or [`MEMBER_KIND`] for a membership change.
    pub kind: String,
    /// The object's name, or the node ids of a membership change.
    pub name: String,
    /// Lower-case hex SHA-256 of the object as written; empty for a delete.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
}

/// The digest recorded for a written object.
pub fn digest(object: &Object) -> String {
    let json = serde_json::to_vec(object).expect("objects serialize");
    hex::encode(Sha256::digest(&json))
}

/// Which records a query wants; every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub actor: Option<String>,
    /// An object kind's name, or [`MEMBER_KIND`].
    pub kind: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since_ms: Option<u64>,
    /// Unix milliseconds, exclusive.
    pub until_ms: Option<u64>,
    /// Kinds left out whatever else matches (what the caller may not see).
    pub hidden_kinds: Vec<String>,
}

impl Filter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.actor.as_ref().is_none_or(|a| *a == r.actor)
            && self.kind.as_ref().is_none_or(|k| *k == r.kind)
            && self.since_ms.is_none_or(|s| r.at_ms >= s)
            && self.until_ms.is_none_or(|u| r.at_ms < u)
            && !self.hidden_kinds.contains(&r.kind)
    }
}
