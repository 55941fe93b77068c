//! The replicated configuration and the one function that changes it.
//!
//! [`ConfigState::apply`] is deterministic: the same commands applied at the
//! same log indexes give the same state on every node, so it can run inside
//! the Raft state machine. It is also what `gatehousectl validate` runs over
//! an empty state, so the offline check and the cluster agree by construction.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use imbl::{OrdMap, Vector};

use serde::{Deserialize, Serialize};

use crate::audit::{self, Action, AuditRecord, Origin, AUDIT_LIMIT};
use crate::error::ErrorCode;
use crate::object::{AdminRole, Kind, Object, ObjectRef};
use crate::validate::{self, InvalidObject};

/// How many changes are kept for subscribers that are a little behind.
pub const DEFAULT_HISTORY: usize = 10_000;
/// The most operations one command may carry.
pub const MAX_BATCH_OPS: usize = 100_000;

/// One write: a set of operations applied all together or not at all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub ops: Vec<Op>,
    /// When set, the whole command fails unless the configuration is at exactly this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_config_revision: Option<u64>,
    /// Who proposed the write, for the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// A membership change to record in the audit log (with no operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<audit::MembershipChange>,
}

/// One operation of a command.
// Ops are built and matched by value across the crates; boxing the object
// would change that API for a size that does not matter here.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Create or replace an object. `expected_revision`: `Some(0)` means it
    /// must not exist yet, `Some(r)` that it must be at revision `r`.
    Put {
        object: Object,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_revision: Option<u64>,
    },
    /// Remove an object, which must exist.
    Delete {
        target: ObjectRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_revision: Option<u64>,
    },
}

impl Op {
    pub fn target(&self) -> ObjectRef {
        match self {
            Op::Put { object, .. } => object.object_ref(),
            Op::Delete { target, .. } => target.clone(),
        }
    }
}

impl From<Op> for Command {
    /// A command of one operation.
    fn from(op: Op) -> Self {
        Command {
            ops: vec![op],
            ..Command::default()
        }
    }
}

impl Command {
    pub fn put(object: Object, expected_revision: Option<u64>) -> Self {
        Command {
            ops: vec![Op::Put {
                object,
                expected_revision,
            }],
            ..Command::default()
        }
    }

    pub fn delete(target: ObjectRef, expected_revision: Option<u64>) -> Self {
        Command {
            ops: vec![Op::Delete {
                target,
                expected_revision,
            }],
            ..Command::default()
        }
    }

    /// The checks that need no state: sizes and every object's own rules.
    /// The API runs this before proposing, so an invalid object never takes a
    /// log slot; `apply` runs it again because it must not trust its input.
    pub fn validate_standalone(&self) -> Result<(), WriteError> {
        if self.ops.len() > MAX_BATCH_OPS {
            return Err(WriteError::TooLarge {
                ops: self.ops.len(),
                max: MAX_BATCH_OPS,
            });
        }
        let mut seen = BTreeSet::new();
        for op in &self.ops {
            let target = op.target();
            if let Op::Put { object, .. } = op {
                validate::validate_object(object)?;
            }
            if !seen.insert(target.clone()) {
                return Err(WriteError::Duplicate { target });
            }
        }
        Ok(())
    }
}

/// Why a write was refused. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum WriteError {
    #[error(transparent)]
    Invalid(#[from] InvalidObject),
    #[error("{kind} \"{name}\": {field}: references unknown {target}")]
    DanglingReference {
        kind: Kind,
        name: String,
        field: String,
        target: ObjectRef,
    },
    #[error("{target} cannot be deleted: {by} references it")]
    StillReferenced { target: ObjectRef, by: ObjectRef },
    #[error("{}", conflict_message(target, *expected, *actual))]
    Conflict {
        target: ObjectRef,
        expected: u64,
        actual: u64,
    },
    #[error("the configuration is at revision {actual}, the write expected {expected}")]
    ConfigConflict { expected: u64, actual: u64 },
    #[error("{target} not found")]
    NotFound { target: ObjectRef },
    #[error("{target} appears more than once in one write")]
    Duplicate { target: ObjectRef },
    #[error("a write holds {ops} operations, at most {max} allowed")]
    TooLarge { ops: usize, max: usize },
    #[error("{target} holds the last admin role: create another admin token before deleting or demoting it")]
    LastAdminToken { target: ObjectRef },
}

fn conflict_message(target: &ObjectRef, expected: u64, actual: u64) -> String {
    match (expected, actual) {
        (0, _) => format!(
            "{target} already exists (at revision {actual}); the write expected to create it"
        ),
        (_, 0) => format!("{target} does not exist; the write expected it at revision {expected}"),
        _ => format!("{target} is at revision {actual}, the write expected {expected}"),
    }
}

impl WriteError {
    pub fn code(&self) -> ErrorCode {
        match self {
            WriteError::Invalid(_)
            | WriteError::DanglingReference { .. }
            | WriteError::Duplicate { .. }
            | WriteError::TooLarge { .. } => ErrorCode::InvalidArgument,
            WriteError::StillReferenced { .. } | WriteError::LastAdminToken { .. } => {
                ErrorCode::FailedPrecondition
            }
            WriteError::Conflict { .. } | WriteError::ConfigConflict { .. } => ErrorCode::Conflict,
            WriteError::NotFound { .. } => ErrorCode::NotFound,
        }
    }
}

/// What a successful write did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOk {
    /// The configuration revision after the write: the write's log index, or
    /// the unchanged revision when the command held no operation.
    pub revision: u64,
    pub changed: usize,
}

/// One object changed at one revision; `object` is `None` for a delete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub revision: u64,
    pub target: ObjectRef,
    pub object: Option<Object>,
}

/// Every stored object, the revision of the last change, and a bounded history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigState {
    revision: u64,
    /// Persistent maps: a copy shares structure, so readers and snapshots
    /// take one in O(1) and work on it without holding up writes.
    objects: OrdMap<Kind, OrdMap<String, Arc<Object>>>,
    /// Changes with revisions above `history_floor`, oldest first.
    #[serde(skip)]
    history: VecDeque<Change>,
    #[serde(skip)]
    history_floor: u64,
    #[serde(skip, default = "default_history")]
    history_limit: usize,
    /// The audit log, oldest first, at most [`AUDIT_LIMIT`] records.
    #[serde(default)]
    audit: Vector<AuditRecord>,
}

fn default_history() -> usize {
    DEFAULT_HISTORY
}

impl Default for ConfigState {
    fn default() -> Self {
        ConfigState::with_history_limit(DEFAULT_HISTORY)
    }
}

impl ConfigState {
    pub fn with_history_limit(history_limit: usize) -> Self {
        ConfigState {
            revision: 0,
            objects: OrdMap::new(),
            history: VecDeque::new(),
            history_floor: 0,
            history_limit,
            audit: Vector::new(),
        }
    }

    /// Restores a state from its serialized form (a snapshot). History starts
    /// empty there, so deltas are only offered from this revision on.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let mut state: ConfigState = serde_json::from_slice(bytes)?;
        state.history_floor = state.revision;
        Ok(state)
    }

    pub fn to_snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("configuration state serializes")
    }

    pub fn history_limit(&self) -> usize {
        self.history_limit
    }

    /// Changes how many changes are kept (a restored snapshot starts with the default).
    pub fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit;
    }

    /// A copy of the objects and revision without the history, in O(1): for
    /// snapshots and large reads, taken under the lock and used outside it.
    pub fn frozen(&self) -> ConfigState {
        ConfigState {
            revision: self.revision,
            objects: self.objects.clone(),
            history: VecDeque::new(),
            history_floor: self.revision,
            history_limit: self.history_limit,
            audit: self.audit.clone(),
        }
    }

    /// The revision of the last change; 0 for an empty, never written state.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&Object> {
        self.objects
            .get(&kind)
            .and_then(|m| m.get(name))
            .map(Arc::as_ref)
    }

    pub fn list(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        self.objects
            .get(&kind)
            .into_iter()
            .flat_map(|m| m.values())
            .map(Arc::as_ref)
    }

    /// Every object, by kind then name.
    pub fn list_all(&self) -> impl Iterator<Item = Object> + '_ {
        self.objects
            .values()
            .flat_map(|m| m.values())
            .map(|o| o.as_ref().clone())
    }

    /// Every object, by kind then name, borrowed: for encoding a large
    /// state without copying it.
    pub fn objects(&self) -> impl Iterator<Item = &Object> + '_ {
        self.objects
            .values()
            .flat_map(|m| m.values())
            .map(Arc::as_ref)
    }

    pub fn len(&self) -> usize {
        self.objects.values().map(OrdMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A replica's copy (a data plane's): `objects` as the control plane
    /// sent them at `revision`, with no history of its own.
    pub fn from_objects(revision: u64, objects: impl IntoIterator<Item = Object>) -> ConfigState {
        let mut state = ConfigState::with_history_limit(0);
        for object in objects {
            state.put_object(object);
        }
        state.revision = revision;
        state.history_floor = revision;
        state
    }

    /// Follows changes the control plane already validated and committed.
    /// A replica applies the cluster's decisions; it does not decide again.
    pub fn apply_changes(
        &mut self,
        revision: u64,
        changes: impl IntoIterator<Item = (ObjectRef, Option<Object>)>,
    ) {
        for (target, object) in changes {
            match object {
                Some(object) => self.put_object(object),
                None => self.remove_object(&target),
            }
        }
        self.revision = revision;
        self.history_floor = revision;
    }

    // Changed in place through `get_mut`: the map of one kind is not shared
    // while it changes, so an insert copies no node that a reader or a
    // snapshot does not also hold.
    fn put_object(&mut self, object: Object) {
        let kind = object.kind();
        let name = object.name().to_string();
        match self.objects.get_mut(&kind) {
            Some(of_kind) => {
                of_kind.insert(name, Arc::new(object));
            }
            None => {
                self.objects
                    .insert(kind, OrdMap::unit(name, Arc::new(object)));
            }
        }
    }

    fn remove_object(&mut self, target: &ObjectRef) {
        if let Some(of_kind) = self.objects.get_mut(&target.kind) {
            of_kind.remove(&target.name);
            if of_kind.is_empty() {
                self.objects.remove(&target.kind);
            }
        }
    }

    /// Audit records matching `filter`, oldest first, at most `limit` of the newest.
    pub fn audit(&self, filter: &audit::Filter, limit: usize) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = self
            .audit
            .iter()
            .rev()
            .filter(|r| filter.matches(r))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Every change after `revision`, or `None` when the history no longer
    /// reaches back that far (the caller then needs a full snapshot).
    pub fn changes_since(&self, revision: u64) -> Option<Vec<Change>> {
        if revision < self.history_floor {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|c| c.revision > revision)
                .cloned()
                .collect(),
        )
    }

    /// Applies `cmd` as the log entry at `index`: all of it, or nothing when
    /// any operation is refused.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Result<WriteOk, WriteError> {
        if let Some(expected) = cmd.expected_config_revision {
            if expected != self.revision {
                return Err(WriteError::ConfigConflict {
                    expected,
                    actual: self.revision,
                });
            }
        }
        cmd.validate_standalone()?;

        // What the state would look like after the command, without touching it.
        let mut puts: BTreeMap<ObjectRef, &Object> = BTreeMap::new();
        let mut deletes: BTreeSet<ObjectRef> = BTreeSet::new();
        for op in &cmd.ops {
            let (target, expected) = match op {
                Op::Put {
                    object,
                    expected_revision,
                } => {
                    puts.insert(object.object_ref(), object);
                    (object.object_ref(), *expected_revision)
                }
                Op::Delete {
                    target,
                    expected_revision,
                } => {
                    if self.get(target.kind, &target.name).is_none() {
                        return Err(WriteError::NotFound {
                            target: target.clone(),
                        });
                    }
                    deletes.insert(target.clone());
                    (target.clone(), *expected_revision)
                }
            };
            if let Some(expected) = expected {
                let actual = self
                    .get(target.kind, &target.name)
                    .map_or(0, Object::revision);
                if actual != expected {
                    return Err(WriteError::Conflict {
                        target,
                        expected,
                        actual,
                    });
                }
            }
        }
        let exists = |r: &ObjectRef| {
            !deletes.contains(r) && (puts.contains_key(r) || self.get(r.kind, &r.name).is_some())
        };

        for object in puts.values() {
            for (field, target) in validate::references(object) {
                if !exists(&target) {
                    return Err(WriteError::DanglingReference {
                        kind: object.kind(),
                        name: object.name().to_string(),
                        field,
                        target,
                    });
                }
            }
        }
        for target in &deletes {
            for &kind in validate::referrer_kinds(target.kind) {
                // Referrers as they will be: stored ones not rewritten or deleted, plus new puts.
                let stored = self
                    .list(kind)
                    .filter(|o| !puts.contains_key(&o.object_ref()));
                let put = puts.values().copied().filter(|o| o.kind() == kind);
                for referrer in stored.chain(put) {
                    if deletes.contains(&referrer.object_ref()) {
                        continue;
                    }
                    if validate::references(referrer)
                        .iter()
                        .any(|(_, r)| r == target)
                    {
                        return Err(WriteError::StillReferenced {
                            target: target.clone(),
                            by: referrer.object_ref(),
                        });
                    }
                }
            }
        }

        let is_admin =
            |o: &Object| matches!(o, Object::AdminToken(t) if t.role == AdminRole::Admin);
        let admins_before = self.list(Kind::AdminToken).filter(|o| is_admin(o)).count();
        if admins_before > 0 {
            let kept = self
                .list(Kind::AdminToken)
                .filter(|o| {
                    !deletes.contains(&o.object_ref()) && !puts.contains_key(&o.object_ref())
                })
                .filter(|o| is_admin(o))
                .count();
            let added = puts.values().filter(|o| is_admin(o)).count();
            if kept + added == 0 {
                let target = cmd
                    .ops
                    .iter()
                    .map(Op::target)
                    .find(|t| t.kind == Kind::AdminToken)
                    .expect("only an admin token op can remove the last admin");
                return Err(WriteError::LastAdminToken { target });
            }
        }

        if cmd.ops.is_empty() {
            if let Some(change) = &cmd.membership {
                let origin = cmd.origin.clone().unwrap_or_default();
                self.audit.push_back(AuditRecord {
                    revision: self.revision,
                    at_ms: origin.at_ms,
                    actor: origin.actor,
                    action: change.action,
                    kind: audit::MEMBER_KIND.to_string(),
                    name: change
                        .nodes
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    digest: String::new(),
                });
                while self.audit.len() > AUDIT_LIMIT {
                    self.audit.pop_front();
                }
            }
            return Ok(WriteOk {
                revision: self.revision,
                changed: 0,
            });
        }
        let origin = cmd.origin.clone().unwrap_or_default();
        for op in &cmd.ops {
            let target = op.target();
            let (action, digest) = match op {
                Op::Put { object, .. } if self.get(target.kind, &target.name).is_some() => {
                    (Action::Update, audit::digest(object))
                }
                Op::Put { object, .. } => (Action::Create, audit::digest(object)),
                Op::Delete { .. } => (Action::Delete, String::new()),
            };
            self.audit.push_back(AuditRecord {
                revision: index,
                at_ms: origin.at_ms,
                actor: if origin.actor.is_empty() {
                    "unknown".to_string()
                } else {
                    origin.actor.clone()
                },
                action,
                kind: target.kind.to_string(),
                name: target.name,
                digest,
            });
            let change = match op {
                Op::Put { object, .. } => {
                    let mut object = object.clone();
                    object.set_revision(index);
                    self.put_object(object.clone());
                    Change {
                        revision: index,
                        target: object.object_ref(),
                        object: Some(object),
                    }
                }
                Op::Delete { target, .. } => {
                    self.remove_object(target);
                    Change {
                        revision: index,
                        target: target.clone(),
                        object: None,
                    }
                }
            };
            self.history.push_back(change);
        }
        self.revision = index;
        while self.audit.len() > AUDIT_LIMIT {
            self.audit.pop_front();
        }
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.revision;
            }
        }
        // A command's changes share one revision: never keep half of them.
        while self
            .history
            .front()
            .is_some_and(|c| c.revision <= self.history_floor)
        {
            self.history.pop_front();
        }
        Ok(WriteOk {
            revision: index,
            changed: cmd.ops.len(),
        })
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
