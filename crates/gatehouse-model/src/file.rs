//! The declarative file format: a whole configuration (or part of one) in YAML.
//!
//! ```yaml
//! version: 1
//! upstreams:
//!   - name: billing
//!     targets: [{ address: "127.0.0.1:9000" }]
//! routes:
//!   - name: billing
//!     paths: [{ prefix: /billing }]
//!     upstream: billing
//! ```
//!
//! Unknown keys are errors that name the key, the file and the line. Admin
//! tokens are not declared in files; they are managed through the admin API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::object::*;
use crate::secret::{self, Resolve, SecretError, SecretRef, SecretUse};
use crate::state::{Command, Op};

/// The file format version this build reads and writes.
pub const FILE_VERSION: u32 = 1;
/// The largest file read, so a stray huge file fails fast.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// One declarative file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub version: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Certificate>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<Upstream>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_issuers: Vec<JwtIssuer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<Consumer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKey>,
}

/// A file that cannot be read as configuration.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    // The cause is in the message, not a `source`: `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{path}: version {found} is not supported (this build reads version {FILE_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: is {size} bytes, at most {MAX_FILE_BYTES} allowed")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{target} is defined twice: in {first} and in {second}")]
    Duplicate {
        target: ObjectRef,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path}: no .yaml or .yml files found")]
    Empty { path: PathBuf },
    #[error("{path}: {error}")]
    Secret { path: PathBuf, error: SecretError },
}

impl ConfigFile {
    /// Parses one file's text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, FileError> {
        let file: ConfigFile = serde_yaml_ng::from_str(text).map_err(|e| FileError::Syntax {
            path: path.to_path_buf(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        if file.version != FILE_VERSION {
            return Err(FileError::Version {
                path: path.to_path_buf(),
                found: file.version,
            });
        }
        Ok(file)
    }

    /// Parses one file whose secret fields may hold references (see
    /// [`crate::secret`]), resolved relative to the file's directory.
    /// Also reports how each secret field was given.
    pub fn parse_with_secrets(
        text: &str,
        path: &Path,
        mode: Resolve,
    ) -> Result<(ConfigFile, Vec<SecretUse>), FileError> {
        let syntax = |e: serde_yaml_ng::Error| FileError::Syntax {
            path: path.to_path_buf(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        };
        let mut tree: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(syntax)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let uses =
            secret::resolve_file(&mut tree, base, mode).map_err(|error| FileError::Secret {
                path: path.to_path_buf(),
                error,
            })?;
        if uses
            .iter()
            .all(|u| u.source == secret::SecretSource::Inline)
        {
            // Parsed from the text, so that any error carries its line.
            return Ok((ConfigFile::parse(text, path)?, uses));
        }
        let file: ConfigFile = serde_yaml_ng::from_value(tree).map_err(syntax)?;
        if file.version != FILE_VERSION {
            return Err(FileError::Version {
                path: path.to_path_buf(),
                found: file.version,
            });
        }
        Ok((file, uses))
    }

    /// The file as YAML with every secret field replaced by the reference
    /// `reference` gives for it (object, field path).
    pub fn to_yaml_with_refs(
        &self,
        mut reference: impl FnMut(&ObjectRef, &str) -> SecretRef,
    ) -> String {
        let mut tree = serde_yaml_ng::to_value(self).expect("configuration serializes to YAML");
        secret::walk_file(&mut tree, |field, name, path, value| {
            if value.is_string() {
                let target = ObjectRef {
                    kind: field.kind,
                    name: name.to_string(),
                };
                *value = reference(&target, &secret::path_string(path)).to_yaml();
            }
            Ok(())
        })
        .expect("rewriting references cannot fail");
        serde_yaml_ng::to_string(&tree).expect("configuration serializes to YAML")
    }

    /// Groups objects into a file, sorted by kind then name; revisions are kept.
    pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Object>) -> ConfigFile {
        let mut file = ConfigFile {
            version: FILE_VERSION,
            ..ConfigFile::default()
        };
        for object in objects {
            match object.clone() {
                Object::Certificate(o) => file.certificates.push(o),
                Object::Upstream(o) => file.upstreams.push(o),
                Object::JwtIssuer(o) => file.jwt_issuers.push(o),
                Object::Policy(o) => file.policies.push(o),
                Object::Route(o) => file.routes.push(o),
                Object::Consumer(o) => file.consumers.push(o),
                Object::ApiKey(o) => file.api_keys.push(o),
                // Admin tokens never leave the control plane in a file.
                Object::AdminToken(_) => {}
            }
        }
        fn by_name<T>(items: &mut [T], name: impl Fn(&T) -> &str) {
            items.sort_by(|a, b| name(a).cmp(name(b)));
        }
        by_name(&mut file.certificates, |o| &o.name);
        by_name(&mut file.upstreams, |o| &o.name);
        by_name(&mut file.jwt_issuers, |o| &o.name);
        by_name(&mut file.policies, |o| &o.name);
        by_name(&mut file.routes, |o| &o.name);
        by_name(&mut file.consumers, |o| &o.name);
        by_name(&mut file.api_keys, |o| &o.name);
        file
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("configuration serializes to YAML")
    }

    /// The objects of the file, revisions cleared: a file states what should
    /// be, the revision is the cluster's to assign.
    pub fn into_objects(self) -> Vec<Object> {
        let all = (self.certificates.into_iter().map(Object::from))
            .chain(self.upstreams.into_iter().map(Object::from))
            .chain(self.jwt_issuers.into_iter().map(Object::from))
            .chain(self.policies.into_iter().map(Object::from))
            .chain(self.routes.into_iter().map(Object::from))
            .chain(self.consumers.into_iter().map(Object::from))
            .chain(self.api_keys.into_iter().map(Object::from));
        all.map(|mut o| {
            o.set_revision(0);
            o
        })
        .collect()
    }
}

/// Objects read from one or more files, each with the file it came from.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    sources: BTreeMap<ObjectRef, PathBuf>,
    /// How each secret field was given: inline or by reference.
    pub secrets: Vec<SecretUse>,
}

impl Loaded {
    /// Reads a file, or every `.yaml`/`.yml` file below a directory (sorted).
    /// Defining one object twice, in one file or two, is an error.
    /// Secret references are resolved; a missing variable or file is an error.
    pub fn read(path: &Path) -> Result<Loaded, FileError> {
        Loaded::read_with(path, Resolve::Values)
    }

    /// [`Loaded::read`], choosing what happens to secret references.
    pub fn read_with(path: &Path, mode: Resolve) -> Result<Loaded, FileError> {
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        if files.is_empty() {
            return Err(FileError::Empty {
                path: path.to_path_buf(),
            });
        }
        let mut loaded = Loaded::default();
        for file in files {
            let io = |error| FileError::Io {
                path: file.clone(),
                error,
            };
            let size = std::fs::metadata(&file).map_err(io)?.len();
            if size > MAX_FILE_BYTES {
                return Err(FileError::TooLarge { path: file, size });
            }
            let text = std::fs::read_to_string(&file).map_err(io)?;
            let (parsed, uses) = ConfigFile::parse_with_secrets(&text, &file, mode)?;
            loaded.add(parsed, &file)?;
            loaded.secrets.extend(uses);
        }
        Ok(loaded)
    }

    /// Adds a parsed file's objects, refusing an object already defined.
    pub fn add(&mut self, file: ConfigFile, path: &Path) -> Result<(), FileError> {
        for object in file.into_objects() {
            let target = object.object_ref();
            if let Some(first) = self.sources.get(&target) {
                return Err(FileError::Duplicate {
                    target,
                    first: first.clone(),
                    second: path.to_path_buf(),
                });
            }
            self.sources.insert(target, path.to_path_buf());
            self.objects.push(object);
        }
        Ok(())
    }

    /// The file an object was read from.
    pub fn source_of(&self, target: &ObjectRef) -> Option<&Path> {
        self.sources.get(target).map(PathBuf::as_path)
    }

    /// A command that creates or replaces every loaded object at once.
    pub fn to_command(&self) -> Command {
        Command {
            ops: self
                .objects
                .iter()
                .map(|o| Op::Put {
                    object: o.clone(),
                    expected_revision: None,
                })
                .collect(),
            expected_config_revision: None,
            origin: None,
            membership: None,
        }
    }
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), FileError> {
    let io = |error| FileError::Io {
        path: path.to_path_buf(),
        error,
    };
    if !std::fs::metadata(path).map_err(io)?.is_dir() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, out)?;
        } else if entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(entry);
        }
    }
    Ok(())
}

/// The operations that turn `current` into `desired` for the objects in
/// `desired`: new objects are created (`expected_revision: 0`), changed ones
/// replaced at the revision they were read at, identical ones left alone. The
/// expected revisions make the whole plan fail if anything changed meanwhile.
pub fn plan<'a>(desired: &[Object], current: impl Fn(&ObjectRef) -> Option<&'a Object>) -> Vec<Op> {
    desired
        .iter()
        .filter_map(|want| {
            let mut want = want.clone();
            want.set_revision(0);
            match current(&want.object_ref()) {
                None => Some(Op::Put {
                    object: want,
                    expected_revision: Some(0),
                }),
                Some(have) => {
                    let mut have_plain = have.clone();
                    have_plain.set_revision(0);
                    (have_plain != want).then(|| Op::Put {
                        object: want,
                        expected_revision: Some(have.revision()),
                    })
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
