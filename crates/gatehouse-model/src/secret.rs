//! Key material in configuration objects: which fields hold it, how a
//! declarative file refers to it instead of holding it inline, and how it is
//! kept out of anything printed.
//!
//! A secret field of a file may hold the value inline (accepted, but `lint`
//! reports it as GH006) or a reference that `gatehousectl` resolves when it
//! reads the file:
//!
//! ```yaml
//! certificates:
//!   - name: api
//!     private_key_pem: { env: API_TLS_KEY }        # an environment variable
//! jwt_issuers:
//!   - name: corp
//!     keys:
//!       - secret: { file: secrets/corp-hmac }      # a file, relative to this YAML file
//! ```
//!
//! The value is taken verbatim (a trailing newline is part of it).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};

use crate::object::{Kind, ObjectRef};

/// One step of a field path: a key of a mapping or an index of a list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a path as the validation errors do: `keys[0].secret`.
pub fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// A secret field: its kind and its path in the object, `*` standing for any list index.
pub(crate) struct SecretField {
    pub(crate) kind: Kind,
    path: &'static [&'static str],
    /// What stands in for an unresolved reference: a value of the right shape,
    /// so the rest of the object can be validated without the secret.
    placeholder: &'static str,
}

/// Every field that holds key material. The one list used to resolve file
/// references, to redact plans, to export references and to lint.
const SECRET_FIELDS: &[SecretField] = &[
    SecretField {
        kind: Kind::Certificate,
        path: &["private_key_pem"],
        placeholder:
            "-----BEGIN PRIVATE KEY-----\n(unresolved reference)\n-----END PRIVATE KEY-----\n",
    },
    SecretField {
        kind: Kind::JwtIssuer,
        path: &["keys", "*", "secret"],
        placeholder: "(unresolved reference, a placeholder of 64 bytes for validation)",
    },
    SecretField {
        kind: Kind::Policy,
        path: &["introspection", "client_secret"],
        placeholder: "(unresolved reference)",
    },
];

fn matches(pattern: &[&str], path: &[Seg]) -> bool {
    pattern.len() == path.len()
        && pattern.iter().zip(path).all(|(p, s)| match s {
            Seg::Key(k) => p == k,
            Seg::Index(_) => *p == "*",
        })
}

/// Whether `path` of an object of `kind` holds key material.
pub fn is_secret(kind: Kind, path: &[Seg]) -> bool {
    SECRET_FIELDS
        .iter()
        .any(|f| f.kind == kind && matches(f.path, path))
}

/// Whether some secret field lies at or below `path`.
pub fn holds_secret(kind: Kind, path: &[Seg]) -> bool {
    SECRET_FIELDS.iter().any(|f| {
        f.kind == kind && f.path.len() >= path.len() && matches(&f.path[..path.len()], path)
    })
}

/// Where a file takes a secret from instead of holding it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretRef {
    /// An environment variable of the `gatehousectl` process.
    Env(String),
    /// A file, relative to the YAML file that names it.
    File(PathBuf),
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(v) => write!(f, "env {v}"),
            SecretRef::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

impl SecretRef {
    /// The YAML form: `{ env: NAME }` or `{ file: PATH }`.
    pub fn to_yaml(&self) -> Value {
        let mut map = Mapping::new();
        match self {
            SecretRef::Env(v) => map.insert("env".into(), v.clone().into()),
            SecretRef::File(p) => map.insert("file".into(), p.display().to_string().into()),
        };
        Value::Mapping(map)
    }

    fn from_yaml(value: &Value) -> Result<SecretRef, String> {
        let Value::Mapping(map) = value else {
            return Err("must be a string or { env: NAME } or { file: PATH }".into());
        };
        let mut entries = map.iter();
        let (Some((key, val)), None) = (entries.next(), entries.next()) else {
            return Err("a secret reference holds exactly one of env or file".into());
        };
        let val = val
            .as_str()
            .filter(|v| !v.is_empty())
            .ok_or("a secret reference's env or file must be a non-empty string")?;
        match key.as_str() {
            Some("env") => Ok(SecretRef::Env(val.to_string())),
            Some("file") => Ok(SecretRef::File(PathBuf::from(val))),
            _ => Err(format!(
                "unknown secret reference {:?} (expected env or file)",
                key.as_str().unwrap_or("?")
            )),
        }
    }

    /// The secret's value; `base` is the directory of the file that names it.
    pub fn resolve(&self, base: &Path) -> Result<String, String> {
        match self {
            SecretRef::Env(name) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(v),
                Ok(_) => Err(format!("environment variable {name} is empty")),
                Err(std::env::VarError::NotPresent) => {
                    Err(format!("environment variable {name} is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(format!("environment variable {name} is not valid UTF-8"))
                }
            },
            SecretRef::File(p) => {
                let full = base.join(p);
                std::fs::read_to_string(&full)
                    .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))
                    .and_then(|v| {
                        if v.is_empty() {
                            Err(format!("secret file {} is empty", full.display()))
                        } else {
                            Ok(v)
                        }
                    })
            }
        }
    }
}

/// How a file gave one secret field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    Inline,
    Ref(SecretRef),
}

/// One secret field of one object as a file gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    pub target: ObjectRef,
    /// The field, as in validation errors: `keys[0].secret`.
    pub field: String,
    pub source: SecretSource,
}

/// What to do with a reference found in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    /// Read the variable or file; a missing one is an error.
    Values,
    /// Leave a placeholder of the right shape in its place: for checks that
    /// never look at a secret's value (lint, `validate --no-secrets`).
    Placeholders,
}

/// A secret field that cannot be read; names the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{target}: {field}: {message}")]
pub struct SecretError {
    pub target: String,
    pub field: String,
    pub message: String,
}

/// Calls `f` on every secret field present in a file's YAML tree, with the
/// object it belongs to and its path inside that object.
pub(crate) fn walk_file(
    file: &mut Value,
    mut f: impl FnMut(&SecretField, &str, &[Seg], &mut Value) -> Result<(), SecretError>,
) -> Result<(), SecretError> {
    for field in SECRET_FIELDS {
        let Some(Value::Sequence(items)) = file.get_mut(field.kind.plural()) else {
            continue;
        };
        for (i, item) in items.iter_mut().enumerate() {
            let name = item
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("#{i}"));
            let mut path = Vec::new();
            walk_pattern(item, field.path, &mut path, &mut |p, v| {
                f(field, &name, p, v)
            })?;
        }
    }
    Ok(())
}

/// A visitor of one secret field: its path in the object and its value.
type Visit<'a> = dyn FnMut(&[Seg], &mut Value) -> Result<(), SecretError> + 'a;

fn walk_pattern(
    value: &mut Value,
    pattern: &[&str],
    path: &mut Vec<Seg>,
    f: &mut Visit<'_>,
) -> Result<(), SecretError> {
    let Some((first, rest)) = pattern.split_first() else {
        return f(path, value);
    };
    if *first == "*" {
        if let Value::Sequence(items) = value {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(Seg::Index(i));
                walk_pattern(item, rest, path, f)?;
                path.pop();
            }
        }
    } else if let Some(child) = value.get_mut(*first) {
        path.push(Seg::Key(first.to_string()));
        walk_pattern(child, rest, path, f)?;
        path.pop();
    }
    Ok(())
}

/// Replaces every secret reference in a file's YAML tree by its value (or
/// a placeholder), and reports how each secret field was given.
pub(crate) fn resolve_file(
    file: &mut Value,
    base: &Path,
    mode: Resolve,
) -> Result<Vec<SecretUse>, SecretError> {
    let mut uses = Vec::new();
    walk_file(file, |field, name, path, value| {
        let target = ObjectRef {
            kind: field.kind,
            name: name.to_string(),
        };
        let fail = |message: String| SecretError {
            target: target.to_string(),
            field: path_string(path),
            message,
        };
        let source = match &*value {
            Value::String(_) => SecretSource::Inline,
            Value::Null => return Ok(()),
            other => {
                let r = SecretRef::from_yaml(other).map_err(fail)?;
                *value = Value::String(match mode {
                    Resolve::Values => r.resolve(base).map_err(fail)?,
                    Resolve::Placeholders => field.placeholder.to_string(),
                });
                SecretSource::Ref(r)
            }
        };
        uses.push(SecretUse {
            target: target.clone(),
            field: path_string(path),
            source,
        });
        Ok(())
    })?;
    Ok(uses)
}

/// Replaces every secret value in `value` (a whole object as JSON) by a marker.
pub fn redact_json(kind: Kind, path: &mut Vec<Seg>, value: &mut serde_json::Value) {
    if is_secret(kind, path) {
        *value = serde_json::Value::String("(secret)".into());
        return;
    }
    if !holds_secret(kind, path) {
        return;
    }
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                path.push(Seg::Key(k.clone()));
                redact_json(kind, path, v);
                path.pop();
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                path.push(Seg::Index(i));
                redact_json(kind, path, v);
                path.pop();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Seg {
        Seg::Key(k.into())
    }

    #[test]
    fn the_secret_fields_are_known_by_path() {
        assert!(is_secret(Kind::Certificate, &[key("private_key_pem")]));
        assert!(!is_secret(Kind::Certificate, &[key("certificate_pem")]));
        assert!(!is_secret(Kind::Route, &[key("private_key_pem")]));
        let hmac = [key("keys"), Seg::Index(3), key("secret")];
        assert!(is_secret(Kind::JwtIssuer, &hmac));
        assert!(!is_secret(
            Kind::JwtIssuer,
            &[key("keys"), Seg::Index(3), key("pem")]
        ));
        assert!(holds_secret(Kind::JwtIssuer, &[key("keys")]));
        assert!(holds_secret(Kind::JwtIssuer, &[]));
        assert!(!holds_secret(Kind::JwtIssuer, &[key("audiences")]));
        assert_eq!(path_string(&hmac), "keys[3].secret");
    }

    fn yaml(text: &str) -> Value {
        serde_yaml_ng::from_str(text).unwrap()
    }

    #[test]
    fn references_resolve_from_env_and_files_relative_to_the_yaml() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("s")).unwrap();
        std::fs::write(dir.path().join("s/hmac"), "file-secret").unwrap();
        std::env::set_var("GH_TEST_SECRET_RESOLVE", "env-secret");
        let mut file = yaml(
            "certificates:\n  - name: api\n    private_key_pem: { env: GH_TEST_SECRET_RESOLVE }\n\
             jwt_issuers:\n  - name: corp\n    keys:\n      - pem: x\n      - secret: { file: s/hmac }\n      - secret: inline\n",
        );
        let uses = resolve_file(&mut file, dir.path(), Resolve::Values).unwrap();
        assert_eq!(
            file["certificates"][0]["private_key_pem"].as_str(),
            Some("env-secret")
        );
        assert_eq!(
            file["jwt_issuers"][0]["keys"][1]["secret"].as_str(),
            Some("file-secret")
        );
        let fields: Vec<(String, String, bool)> = uses
            .iter()
            .map(|u| {
                (
                    u.target.to_string(),
                    u.field.clone(),
                    u.source == SecretSource::Inline,
                )
            })
            .collect();
        assert_eq!(
            fields,
            [
                (
                    "certificate \"api\"".into(),
                    "private_key_pem".into(),
                    false
                ),
                ("jwt_issuer \"corp\"".into(), "keys[1].secret".into(), false),
                ("jwt_issuer \"corp\"".into(), "keys[2].secret".into(), true),
            ]
        );
    }

    #[test]
    fn a_missing_variable_or_file_names_object_field_and_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = yaml(
            "certificates:\n  - name: api\n    private_key_pem: { env: GH_TEST_UNSET_VAR_X }\n",
        );
        let e = resolve_file(&mut file, dir.path(), Resolve::Values).unwrap_err();
        assert_eq!(
            e.to_string(),
            "certificate \"api\": private_key_pem: environment variable GH_TEST_UNSET_VAR_X is not set"
        );
        let mut file =
            yaml("jwt_issuers:\n  - name: corp\n    keys: [{ secret: { file: nope } }]\n");
        let e = resolve_file(&mut file, dir.path(), Resolve::Values).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("jwt_issuer \"corp\": keys[0].secret: cannot read secret file"),
            "{e}"
        );
        assert!(e.to_string().contains("nope"), "{e}");
        let mut file = yaml("certificates:\n  - name: api\n    private_key_pem: { vault: x }\n");
        let e = resolve_file(&mut file, dir.path(), Resolve::Values).unwrap_err();
        assert!(
            e.to_string().contains("unknown secret reference \"vault\""),
            "{e}"
        );
        // Placeholders need neither the variable nor the file.
        let mut file = yaml(
            "certificates:\n  - name: api\n    private_key_pem: { env: GH_TEST_UNSET_VAR_X }\n",
        );
        let uses = resolve_file(&mut file, dir.path(), Resolve::Placeholders).unwrap();
        assert_eq!(uses.len(), 1);
        let placeholder = file["certificates"][0]["private_key_pem"].as_str().unwrap();
        assert!(placeholder.contains("PRIVATE KEY-----"), "{placeholder}");
    }

    #[test]
    fn redaction_replaces_only_secret_values() {
        let mut v = serde_json::json!({
            "issuer": "https://idp",
            "keys": [{"kid": "a", "secret": "s3cr3t-value"}, {"pem": "PUBLIC"}]
        });
        redact_json(Kind::JwtIssuer, &mut Vec::new(), &mut v);
        let text = v.to_string();
        assert!(!text.contains("s3cr3t-value"), "{text}");
        assert!(
            text.contains("PUBLIC") && text.contains("(secret)"),
            "{text}"
        );
    }
}
