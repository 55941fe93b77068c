//! `gatehousectl tokens` and `gatehousectl audit`: who may use the admin
//! API, and what they did with it.

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use gatehouse_model::Object;
use gatehouse_proto::pb;

use crate::{call, connect, from_pb, print_table, Cli};

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Make a new admin token. It is printed once, on stdout: the cluster
    /// keeps only its SHA-256. Needs the admin role.
    Create {
        name: String,
        /// admin (everything), editor (configuration objects), viewer (read
        /// only) or data_plane (the config stream only).
        #[arg(long, value_enum)]
        role: Role,
        /// A label as KEY=VALUE; repeat for more.
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
    },
    /// Revoke a token: it is refused as soon as each node has the revision.
    Revoke { name: String },
    /// List tokens with their roles (never the tokens).
    List,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Role {
    Admin,
    Editor,
    Viewer,
    #[value(name = "data_plane", alias = "data-plane")]
    DataPlane,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Editor => "editor",
            Role::Viewer => "viewer",
            Role::DataPlane => "data_plane",
        }
    }
}

/// Flags of `gatehousectl audit`.
#[derive(Args)]
pub struct AuditArgs {
    /// Only writes by this actor, e.g. `token:ci` or `cert:dp-1`.
    #[arg(long)]
    actor: Option<String>,
    /// Only writes of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// Only writes at or after this time: RFC 3339 (`2026-11-28T10:00:00Z`)
    /// or an age such as `2h` or `7d`.
    #[arg(long)]
    since: Option<String>,
    /// Only writes before this time (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// The newest N matching records.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// `table`, or `json` for one JSON object per line (for export).
    #[arg(long, short = 'o', value_enum, default_value_t = AuditOutput::Table)]
    output: AuditOutput,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuditOutput {
    Table,
    Json,
}

fn labels(list: &[String]) -> Result<std::collections::HashMap<String, String>> {
    list.iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("--label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

pub async fn tokens(cli: &Cli, cmd: &TokensCommand) -> Result<()> {
    let client = connect(cli).await?;
    match cmd {
        TokensCommand::Create {
            name,
            role,
            labels: l,
        } => {
            let request = pb::CreateAdminTokenRequest {
                name: name.clone(),
                role: role.as_str().to_string(),
                labels: labels(l)?,
            };
            let reply = call(cli, false, || {
                let mut c = client.clone();
                let r = request.clone();
                async move { c.create_admin_token(r).await }
            })
            .await?;
            eprintln!(
                "admin token \"{}\" (role {}) created at revision {}; it is shown only now:",
                reply.name,
                role.as_str(),
                reply.revision
            );
            println!("{}", reply.token);
        }
        TokensCommand::Revoke { name } => {
            let request = pb::DeleteRequest {
                target: Some(pb::ObjectRef {
                    kind: "admin_token".into(),
                    name: name.clone(),
                }),
                expected_revision: None,
            };
            let reply = call(cli, false, || {
                let mut c = client.clone();
                let r = request.clone();
                async move { c.delete(r).await }
            })
            .await?;
            println!(
                "admin token \"{name}\" revoked at revision {}",
                reply.revision
            );
        }
        TokensCommand::List => {
            let request = pb::ListRequest {
                kind: "admin_token".into(),
                selector: String::new(),
                stale: false,
            };
            let list = call(cli, true, || {
                let mut c = client.clone();
                let r = request.clone();
                async move { c.list(r).await }
            })
            .await?;
            let rows: Vec<Vec<String>> = from_pb(list.objects)?
                .iter()
                .filter_map(|o| match o {
                    Object::AdminToken(t) => Some(vec![
                        t.name.clone(),
                        serde_json::to_value(t.role)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        t.revision.to_string(),
                    ]),
                    _ => None,
                })
                .collect();
            print_table(&["NAME", "ROLE", "REVISION"], &rows);
        }
    }
    Ok(())
}

/// Unix milliseconds of an RFC 3339 time or of `now - age`.
fn parse_time(flag: &str, text: &str) -> Result<u64> {
    let now = std::time::SystemTime::now();
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(t) => t,
        Err(_) => match humantime::parse_duration(text) {
            Ok(age) => now
                .checked_sub(age)
                .ok_or_else(|| anyhow!("{flag} {text:?}: too far back"))?,
            Err(_) => bail!(
                "{flag} {text:?}: expected an RFC 3339 time (2026-11-28T10:00:00Z) or an age (2h, 7d)"
            ),
        },
    };
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow!("{flag} {text:?}: before 1970"))?
        .as_millis() as u64)
}

fn format_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

pub async fn audit(cli: &Cli, args: &AuditArgs) -> Result<()> {
    let request = pb::AuditRequest {
        actor: args.actor.clone().unwrap_or_default(),
        kind: match &args.kind {
            Some(k) => k.parse::<gatehouse_model::Kind>()?.to_string(),
            None => String::new(),
        },
        since_ms: args
            .since
            .as_deref()
            .map(|t| parse_time("--since", t))
            .transpose()?,
        until_ms: args
            .until
            .as_deref()
            .map(|t| parse_time("--until", t))
            .transpose()?,
        limit: args.limit,
        stale: false,
    };
    let client = connect(cli).await?;
    let reply = call(cli, true, || {
        let mut c = client.clone();
        let r = request.clone();
        async move { c.audit(r).await }
    })
    .await?;
    match args.output {
        AuditOutput::Json => {
            for r in &reply.records {
                let line = serde_json::json!({
                    "time": format_ms(r.at_ms),
                    "revision": r.revision,
                    "actor": r.actor,
                    "action": r.action,
                    "kind": r.kind,
                    "name": r.name,
                    "digest": r.digest,
                });
                println!("{line}");
            }
        }
        AuditOutput::Table => {
            let rows: Vec<Vec<String>> = reply
                .records
                .iter()
                .map(|r| {
                    vec![
                        format_ms(r.at_ms),
                        r.revision.to_string(),
                        r.actor.clone(),
                        r.action.clone(),
                        format!("{}/{}", r.kind, r.name),
                        r.digest.get(..12).unwrap_or("").to_string(),
                    ]
                })
                .collect();
            print_table(
                &["TIME", "REVISION", "ACTOR", "ACTION", "OBJECT", "DIGEST"],
                &rows,
            );
        }
    }
    Ok(())
}
