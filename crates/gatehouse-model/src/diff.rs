//! The declarative plan: what it takes to turn the stored configuration into
//! the objects of some files, object by object and field by field.
//!
//! The control plane computes a [`Plan`] against one revision of its state
//! (the `Plan` admin call); `gatehousectl diff` prints it and `apply` commits
//! it as one command that only succeeds at that same revision. Secret values
//! never appear in a plan: a change to one reads `(secret changed)`.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::file;
use crate::object::{Kind, Object, ObjectRef};
use crate::secret::{self, Seg};
use crate::state::{Command, ConfigState, Op, WriteError};
use crate::validate::InvalidObject;

/// The label that says which team owns an object; `apply --prune` only
/// deletes objects that carry the same owner as the files.
pub const OWNER_LABEL: &str = "gatehouse.io/owner";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }

    fn sign(self) -> char {
        match self {
            Action::Create => '+',
            Action::Update => '~',
            Action::Delete => '-',
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "create" => Ok(Action::Create),
            "update" => Ok(Action::Update),
            "delete" => Ok(Action::Delete),
            _ => Err(format!("unknown plan action {s:?}")),
        }
    }
}

/// One field that differs, its values already rendered (as JSON) and redacted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// As in validation errors: `paths[0].prefix`.
    pub path: String,
    /// `None` when the field is absent on that side.
    pub before: Option<String>,
    pub after: Option<String>,
    /// The field holds key material: neither value is shown.
    pub secret: bool,
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secret {
            let what = match (&self.before, &self.after) {
                (None, _) => "(secret added)",
                (_, None) => "(secret removed)",
                _ => "(secret changed)",
            };
            return write!(f, "{}: {what}", self.path);
        }
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        write!(
            f,
            "{}: {} -> {}",
            self.path,
            show(&self.before),
            show(&self.after)
        )
    }
}

/// What happens to one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub action: Action,
    pub target: ObjectRef,
    /// For an update, every field that differs; empty otherwise.
    pub fields: Vec<FieldChange>,
}

impl fmt::Display for Change {
    /// One line per changed field: `~ route "orders": upstream: "a" -> "b"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = self.action.sign();
        if self.fields.is_empty() {
            return write!(f, "{sign} {}", self.target);
        }
        for (i, field) in self.fields.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{sign} {}: {field}", self.target)?;
        }
        Ok(())
    }
}

/// Every change, made against the configuration at `revision`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub revision: u64,
    pub changes: Vec<Change>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The command that carries the plan out: the desired objects that are
    /// created or updated, the deletes, all guarded by the plan's revision so
    /// that it fails as a whole if anything changed since.
    pub fn command(&self, desired: &[Object]) -> Command {
        let by_ref: std::collections::BTreeMap<ObjectRef, &Object> =
            desired.iter().map(|o| (o.object_ref(), o)).collect();
        let ops = self
            .changes
            .iter()
            .filter_map(|c| match c.action {
                Action::Create | Action::Update => by_ref.get(&c.target).map(|o| {
                    let mut object = (*o).clone();
                    object.set_revision(0);
                    Op::Put {
                        object,
                        expected_revision: None,
                    }
                }),
                Action::Delete => Some(Op::Delete {
                    target: c.target.clone(),
                    expected_revision: None,
                }),
            })
            .collect();
        Command {
            ops,
            expected_config_revision: Some(self.revision),
            origin: None,
            membership: None,
        }
    }

    /// A one-line count: `2 to create, 1 to update, 0 to delete`.
    pub fn summary(&self) -> String {
        let n = |a| self.changes.iter().filter(|c| c.action == a).count();
        format!(
            "{} to create, {} to update, {} to delete",
            n(Action::Create),
            n(Action::Update),
            n(Action::Delete)
        )
    }
}

/// Checks that every object carries `gatehouse.io/owner=<owner>`, as
/// `--prune` for that owner needs.
pub fn check_owner(objects: &[Object], owner: &str) -> Result<(), InvalidObject> {
    for o in objects {
        let have = o.labels().get(OWNER_LABEL);
        if have.map(String::as_str) != Some(owner) {
            return Err(InvalidObject {
                kind: o.kind(),
                name: o.name().to_string(),
                field: "labels".into(),
                message: format!(
                    "pruning for owner {owner:?} needs the label {OWNER_LABEL}={owner} on every object (found {})",
                    have.map_or("none".to_string(), |h| format!("{OWNER_LABEL}={h}"))
                ),
            });
        }
    }
    Ok(())
}

/// The plan that makes `state` hold `desired`, validated against `state` as
/// the cluster would (references, deletes still referenced), without
/// changing it. With `prune_owner`, objects labelled with that owner but
/// absent from `desired` are deleted, every desired object must carry that
/// owner, and none may take over an object another owner holds.
pub fn plan(
    state: &ConfigState,
    desired: &[Object],
    prune_owner: Option<&str>,
) -> Result<Plan, WriteError> {
    if desired.iter().any(|o| o.kind() == Kind::AdminToken) {
        let o = desired
            .iter()
            .find(|o| o.kind() == Kind::AdminToken)
            .expect("found above");
        return Err(InvalidObject {
            kind: o.kind(),
            name: o.name().to_string(),
            field: "(object)".into(),
            message: "admin tokens are managed through the admin API, not declared".into(),
        }
        .into());
    }
    if let Some(owner) = prune_owner {
        check_owner(desired, owner)?;
        for want in desired {
            if let Some(have) = state.get(want.kind(), want.name()) {
                if let Some(other) = have.labels().get(OWNER_LABEL).filter(|h| *h != owner) {
                    return Err(InvalidObject {
                        kind: want.kind(),
                        name: want.name().to_string(),
                        field: "labels".into(),
                        message: format!(
                            "is owned by {other:?} in the cluster ({OWNER_LABEL}); owner {owner:?} cannot take it over"
                        ),
                    }
                    .into());
                }
            }
        }
    }
    let mut changes = Vec::new();
    let puts = file::plan(desired, |r| state.get(r.kind, &r.name));
    for op in &puts {
        let Op::Put { object, .. } = op else { continue };
        match state.get(object.kind(), object.name()) {
            None => changes.push(Change {
                action: Action::Create,
                target: object.object_ref(),
                fields: Vec::new(),
            }),
            Some(have) => changes.push(Change {
                action: Action::Update,
                target: object.object_ref(),
                fields: field_changes(have, object),
            }),
        }
    }
    if let Some(owner) = prune_owner {
        let wanted: BTreeSet<ObjectRef> = desired.iter().map(Object::object_ref).collect();
        for kind in Kind::ALL {
            if kind == Kind::AdminToken {
                continue;
            }
            for have in state.list(kind) {
                if have.labels().get(OWNER_LABEL).map(String::as_str) == Some(owner)
                    && !wanted.contains(&have.object_ref())
                {
                    changes.push(Change {
                        action: Action::Delete,
                        target: have.object_ref(),
                        fields: Vec::new(),
                    });
                }
            }
        }
    }
    let plan = Plan {
        revision: state.revision(),
        changes,
    };
    // The same function the state machine runs, on a copy: what would fail
    // there fails here, before anything is proposed.
    state
        .frozen()
        .apply(state.revision() + 1, &plan.command(desired))?;
    Ok(plan)
}

/// Every field that differs between two versions of one object (revisions
/// ignored), with secret values replaced by markers.
pub fn field_changes(before: &Object, after: &Object) -> Vec<FieldChange> {
    let json = |o: &Object| {
        let mut v = serde_json::to_value(o).expect("objects serialize to JSON");
        if let Some(map) = v.as_object_mut() {
            for key in ["kind", "name", "revision"] {
                map.remove(key);
            }
        }
        v
    };
    let mut out = Vec::new();
    diff_values(
        after.kind(),
        &mut Vec::new(),
        Some(&json(before)),
        Some(&json(after)),
        &mut out,
    );
    out
}

fn diff_values(
    kind: Kind,
    path: &mut Vec<Seg>,
    before: Option<&serde_json::Value>,
    after: Option<&serde_json::Value>,
    out: &mut Vec<FieldChange>,
) {
    use serde_json::Value;
    if before == after {
        return;
    }
    match (before, after) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                path.push(Seg::Key(k.clone()));
                diff_values(kind, path, a.get(k), b.get(k), out);
                path.pop();
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) => {
            for i in 0..a.len().max(b.len()) {
                path.push(Seg::Index(i));
                diff_values(kind, path, a.get(i), b.get(i), out);
                path.pop();
            }
        }
        _ => {
            let secret = secret::is_secret(kind, path);
            let render = |v: Option<&Value>| {
                v.map(|v| {
                    if secret {
                        return "(secret)".to_string();
                    }
                    let mut v = v.clone();
                    secret::redact_json(kind, &mut path.clone(), &mut v);
                    v.to_string()
                })
            };
            out.push(FieldChange {
                path: secret::path_string(path),
                before: render(before),
                after: render(after),
                secret,
            });
        }
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
