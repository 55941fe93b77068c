//! `gatehousectl snapshot save FILE` and `gatehousectl snapshot restore FILE`:
//! a backup of every object (admin tokens and sealed key material as
//! stored) with the audit log, and its restore onto a new cluster.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use gatehouse_proto::pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{call, connect, Cli};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Write every object (read at one revision) and the audit log to FILE
    /// (mode 0600: it holds token hashes and sealed key material). Needs the
    /// admin role, to read admin tokens.
    Save { file: PathBuf },
    /// Recreate every object of FILE on a new cluster, in one atomic write.
    /// The cluster must hold nothing but admin tokens (a freshly initialized
    /// one), unless --force, which overwrites objects of the same names.
    /// Needs the admin role, and the same secrets key for sealed material.
    Restore {
        file: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

const FORMAT: &str = "gatehouse-backup";
const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct StoredObject {
    kind: String,
    name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    revision: u64,
    spec: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Body {
    /// The configuration revision the objects were read at.
    revision: u64,
    /// Unix milliseconds.
    saved_at_ms: u64,
    objects: Vec<StoredObject>,
    /// The audit log as it was (restore does not replay it).
    audit: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Backup {
    format: String,
    version: u32,
    /// Lower-case hex SHA-256 of the body's JSON.
    sha256: String,
    body: Body,
}

fn digest(body: &Body) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(body).expect("a backup body serializes"),
    ))
}

/// Writes `bytes` to `path` through a temporary file, with mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    // A new file of our own (never one someone left or linked there).
    let tmp = path.with_extension(format!("tmp-{:016x}", rand_suffix()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn read(path: &Path) -> Result<Body> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let backup: Backup = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a Gatehouse backup", path.display()))?;
    if backup.format != FORMAT || backup.version != VERSION {
        bail!(
            "{}: format {:?} version {} (this gatehousectl reads {FORMAT:?} version {VERSION})",
            path.display(),
            backup.format,
            backup.version
        );
    }
    if digest(&backup.body) != backup.sha256 {
        bail!(
            "{}: the checksum does not match its contents (the file is damaged or was edited; the checksum guards against damage, not against a deliberate edit)",
            path.display()
        );
    }
    Ok(backup.body)
}

pub async fn snapshot(cli: &Cli, cmd: &SnapshotCommand) -> Result<()> {
    let client = connect(cli).await?;
    match cmd {
        SnapshotCommand::Save { file } => {
            let list = pb::ListRequest::default();
            let listed = call(cli, true, || {
                let mut c = client.clone();
                let r = list.clone();
                async move { c.list(r).await }
            })
            .await?;
            if !listed.objects.iter().any(|o| o.kind == "admin_token") {
                bail!("the answer holds no admin token: saving a backup needs the admin role");
            }
            let audit_req = pb::AuditRequest {
                limit: u32::MAX,
                ..Default::default()
            };
            let audit = call(cli, true, || {
                let mut c = client.clone();
                let r = audit_req.clone();
                async move { c.audit(r).await }
            })
            .await?;
            let objects = listed
                .objects
                .into_iter()
                .map(|o| {
                    Ok(StoredObject {
                        spec: serde_json::from_str(&o.spec_json)
                            .map_err(|e| anyhow!("server sent an invalid object: {e}"))?,
                        kind: o.kind,
                        name: o.name,
                        labels: o.labels.into_iter().collect(),
                        revision: o.revision,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let body = Body {
                revision: listed.config_revision,
                saved_at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis() as u64,
                audit: audit
                    .records
                    .into_iter()
                    .map(|r| {
                        serde_json::json!({
                            "revision": r.revision, "at_ms": r.at_ms, "actor": r.actor,
                            "action": r.action, "kind": r.kind, "name": r.name, "digest": r.digest,
                        })
                    })
                    .collect(),
                objects,
            };
            let backup = Backup {
                format: FORMAT.into(),
                version: VERSION,
                sha256: digest(&body),
                body,
            };
            write_private(file, &serde_json::to_vec_pretty(&backup)?)?;
            eprintln!(
                "saved {} objects and {} audit records at revision {} to {}",
                backup.body.objects.len(),
                backup.body.audit.len(),
                backup.body.revision,
                file.display()
            );
        }
        SnapshotCommand::Restore { file, force } => {
            let body = read(file)?;
            let list = pb::ListRequest::default();
            let current = call(cli, true, || {
                let mut c = client.clone();
                let r = list.clone();
                async move { c.list(r).await }
            })
            .await?;
            let present: Vec<String> = current
                .objects
                .iter()
                .filter(|o| o.kind != "admin_token")
                .map(|o| format!("{} \"{}\"", o.kind, o.name))
                .collect();
            if !present.is_empty() && !force {
                bail!(
                    "the cluster already holds {} objects ({}{}): restore onto a new cluster, or pass --force to overwrite objects of the same names",
                    present.len(),
                    present.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                    if present.len() > 3 { ", ..." } else { "" }
                );
            }
            let ops = body
                .objects
                .iter()
                .map(|o| pb::Operation {
                    op: Some(pb::operation::Op::Put(pb::PutRequest {
                        object: Some(pb::Object {
                            kind: o.kind.clone(),
                            name: o.name.clone(),
                            labels: o.labels.clone().into_iter().collect(),
                            revision: 0,
                            spec_json: o.spec.to_string(),
                        }),
                        expected_revision: None,
                    })),
                })
                .collect();
            let request = pb::ApplyRequest {
                ops,
                // Nothing may change between the check above and the write.
                expected_config_revision: Some(current.config_revision),
            };
            let reply = call(cli, false, || {
                let mut c = client.clone();
                let r = request.clone();
                async move { c.apply(r).await }
            })
            .await
            .map_err(|e| anyhow!("restore refused, nothing was written: {e:#}"))?;
            eprintln!(
                "restored {} objects from {} (saved at revision {}) at revision {}",
                body.objects.len(),
                file.display(),
                body.revision,
                reply.revision
            );
        }
    }
    Ok(())
}
