//! `gatehousectl export`: the cluster's configuration as declarative files
//! that `diff` reads back with no changes. Secret values are never written
//! into the YAML: each is a reference, either to a file under `secrets/`
//! (written 0600, with a `.gitignore` that keeps it out of the repository)
//! or to an environment variable whose value the operator supplies.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gatehouse_model::file::ConfigFile;
use gatehouse_model::secret::SecretRef;
use gatehouse_model::{Kind, Object};
use gatehouse_proto::pb;

use crate::{call, connect, from_pb, Cli};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecretMode {
    /// Write each secret to DIR/secrets/ and reference it as `{ file: ... }`.
    File,
    /// Reference each secret as `{ env: GATEHOUSE_SECRET_... }`; write no value.
    Env,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The directory to write (created; must be empty unless --force).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// How secrets are referenced.
    #[arg(long, value_enum, default_value_t = SecretMode::File)]
    pub secrets: SecretMode,
    /// Only objects matching this label selector, e.g. `gatehouse.io/owner=payments`.
    #[arg(long, short = 'l', default_value = "")]
    pub selector: String,
    /// Write into a directory that already holds files (same-named files are replaced).
    #[arg(long)]
    pub force: bool,
}

/// `GATEHOUSE_SECRET_CERTIFICATE_API_PRIVATE_KEY_PEM`: a variable name for one secret.
fn env_name(kind: Kind, name: &str, field: &str) -> String {
    let raw = format!("GATEHOUSE_SECRET_{kind}_{name}_{field}");
    let mut out = String::new();
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out.trim_end_matches('_').to_string()
}

/// `certificate.api.private_key_pem`: a file name for one secret.
fn file_name(kind: Kind, name: &str, field: &str) -> String {
    format!("{kind}.{name}.{field}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// The secret value at `field` (as the plan names it) of an object.
fn secret_value(object: &Object, field: &str) -> Option<String> {
    match object {
        Object::Certificate(c) if field == "private_key_pem" => Some(c.private_key_pem.clone()),
        Object::JwtIssuer(j) => {
            let index: usize = field
                .strip_prefix("keys[")?
                .strip_suffix("].secret")?
                .parse()
                .ok()?;
            j.keys.get(index)?.secret.clone()
        }
        _ => None,
    }
}

pub async fn run(cli: &Cli, args: &ExportArgs) -> Result<()> {
    let dir = &args.output;
    if dir.exists() && !args.force && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty; pass --force to write into it",
            dir.display()
        );
    }
    let client = connect(cli).await?;
    let request = pb::ListRequest {
        kind: String::new(),
        selector: args.selector.clone(),
        stale: false,
    };
    let reply = call(cli, true, || {
        let mut c = client.clone();
        let r = request.clone();
        async move { c.list(r).await }
    })
    .await?;
    let objects: Vec<Object> = from_pb(reply.objects)?
        .into_iter()
        .filter(|o| o.kind() != Kind::AdminToken)
        .map(|mut o| {
            o.set_revision(0);
            o
        })
        .collect();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut secrets: Vec<(PathBuf, String)> = Vec::new();
    let mut variables: Vec<String> = Vec::new();
    let mut written = 0;
    for kind in Kind::ALL {
        let of_kind: Vec<&Object> = objects.iter().filter(|o| o.kind() == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        let file = ConfigFile::from_objects(of_kind.iter().copied());
        let yaml = file.to_yaml_with_refs(|target, field| {
            let object = of_kind
                .iter()
                .find(|o| o.object_ref() == *target)
                .expect("the reference is to an object of this file");
            match args.secrets {
                SecretMode::File => {
                    let rel = PathBuf::from("secrets").join(file_name(kind, &target.name, field));
                    if let Some(value) = secret_value(object, field) {
                        secrets.push((dir.join(&rel), value));
                    }
                    SecretRef::File(rel)
                }
                SecretMode::Env => {
                    let name = env_name(kind, &target.name, field);
                    variables.push(name.clone());
                    SecretRef::Env(name)
                }
            }
        });
        let path = dir.join(format!("{}.yaml", kind.plural()));
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        written += of_kind.len();
    }
    if !secrets.is_empty() {
        let secret_dir = dir.join("secrets");
        std::fs::create_dir_all(&secret_dir)?;
        // Secret files sit next to the YAML for the round trip, never in git.
        std::fs::write(secret_dir.join(".gitignore"), "*\n")?;
        for (path, value) in &secrets {
            write_private(path, value)?;
        }
    }
    println!(
        "exported {written} objects at revision {} to {}",
        reply.config_revision,
        dir.display()
    );
    if !secrets.is_empty() {
        eprintln!(
            "{} secret values were written to {} (mode 0600, git-ignored); move them to your secret store",
            secrets.len(),
            dir.join("secrets").display()
        );
    }
    if !variables.is_empty() {
        eprintln!("set these variables before diff or apply:");
        for v in &variables {
            eprintln!("  {v}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_safe_for_env_and_files() {
        assert_eq!(
            env_name(Kind::JwtIssuer, "corp.idp-1", "keys[0].secret"),
            "GATEHOUSE_SECRET_JWT_ISSUER_CORP_IDP_1_KEYS_0_SECRET"
        );
        assert_eq!(
            file_name(Kind::JwtIssuer, "corp", "keys[0].secret"),
            "jwt_issuer.corp.keys_0_.secret"
        );
    }

    #[test]
    fn secret_values_are_found_by_field() {
        let issuer: Object = serde_json::from_value(serde_json::json!({
            "kind": "jwt_issuer", "name": "corp", "issuer": "i", "audiences": ["a"],
            "algorithms": ["HS256"], "keys": [{"pem": "p"}, {"secret": "s"}]
        }))
        .unwrap();
        assert_eq!(
            secret_value(&issuer, "keys[1].secret").as_deref(),
            Some("s")
        );
        assert_eq!(secret_value(&issuer, "keys[0].secret"), None);
        assert_eq!(secret_value(&issuer, "keys[9].secret"), None);
    }
}
