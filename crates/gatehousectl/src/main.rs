//! `gatehousectl`: the operator's and CI's client of the admin API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use gatehouse_model::file::{ConfigFile, Loaded};
use gatehouse_model::secret::Resolve;
use gatehouse_model::{ConfigState, Kind, Object, ObjectRef};
use gatehouse_proto::pb;
use gatehouse_proto::AdminClient;
use tonic::transport::Endpoint;

mod export;
mod lint;
mod plan;

#[derive(Parser)]
#[command(
    name = "gatehousectl",
    version,
    about = "Manage a Gatehouse cluster through its admin API"
)]
struct Cli {
    /// Admin API address of any control-plane node (host:port or http://host:port).
    #[arg(
        long,
        short = 's',
        global = true,
        env = "GATEHOUSE_SERVER",
        default_value = "127.0.0.1:9400"
    )]
    server: String,
    /// How long to wait for an answer, in seconds.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    /// File holding the admin token to call with (GATEHOUSE_TOKEN, when set, wins).
    #[arg(long, global = true, env = "GATEHOUSE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The cluster CA (PEM): talk to the admin API over TLS.
    #[arg(long, global = true, env = "GATEHOUSE_CA")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM) whose role (admin, editor, viewer) stands
    /// in for a token. Needs --key and --ca.
    #[arg(long, global = true, env = "GATEHOUSE_CERT")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "GATEHOUSE_KEY")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Make the cluster match the files, as one atomic change.
    ///
    /// The server computes the plan (as `diff` shows it) at its current
    /// revision; the plan is then written as one batch that only succeeds at
    /// that revision, so a concurrent change makes the whole apply fail
    /// (exit 3) instead of being overwritten.
    Apply(plan::ApplyArgs),
    /// Show what `apply` would change, per object and field, as the server
    /// computes it. Exit 0: no differences; 2: differences; 1: error.
    Diff(plan::DiffArgs),
    /// Security lint of files, offline. Exit 0: clean; 2: findings; 1: error.
    Lint {
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
    /// Write the cluster's configuration as files that `diff` reads back unchanged.
    Export(export::ExportArgs),
    /// Show objects of one kind, or one object.
    Get {
        /// upstream, route, policy, consumer, api_key, jwt_issuer, certificate, admin_token
        /// (singular or plural), or `all` for every kind.
        kind: String,
        name: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Label selector, e.g. `team=payments,tier!=dev`.
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
        /// Answer from the node asked, without checking with the leader that it is current.
        #[arg(long)]
        stale: bool,
    },
    /// Delete one object. Refused while other objects reference it.
    Delete {
        kind: String,
        name: String,
        /// Only delete if the object is still at this revision.
        #[arg(long)]
        expected_revision: Option<u64>,
    },
    /// Check files offline, with the same rules the cluster applies. Needs no server.
    ///
    /// The files must be self-contained: a reference to an object that is not
    /// in them is reported as unknown.
    Validate {
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Do not resolve secret references (`{ env: ... }`, `{ file: ... }`):
        /// check everything else, for CI jobs that have no secrets.
        #[arg(long)]
        no_secrets: bool,
    },
    /// Inspect and change the control-plane cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Create, revoke and list API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Create, revoke and list admin tokens (admin role).
    #[command(subcommand)]
    Tokens(access::TokensCommand),
    /// Who changed what, and when: the cluster's audit log of writes.
    Audit(access::AuditArgs),
    /// Back up every object and the audit log to a file, and restore it.
    #[command(subcommand)]
    Snapshot(backup::SnapshotCommand),
    /// Show a consumer's use of its quotas in the current periods.
    ///
    /// Reads the policies from the cluster and the counts straight from the
    /// Redis the data planes count in (give it the data planes' --redis-url or
    /// --redis-cluster). Every policy with quotas is listed: a consumer that
    /// never called a route of a policy has used 0 of it.
    Usage {
        consumer: String,
        /// The Redis server the data planes count in.
        #[arg(
            long,
            env = "GATEHOUSE_REDIS_URL",
            hide_env_values = true,
            conflicts_with = "redis_cluster",
            required_unless_present = "redis_cluster"
        )]
        redis_url: Option<String>,
        /// Seed nodes of the Redis Cluster the data planes count in.
        #[arg(
            long,
            value_delimiter = ',',
            env = "GATEHOUSE_REDIS_CLUSTER",
            hide_env_values = true
        )]
        redis_cluster: Vec<String>,
        /// PEM file of the CA certificate(s) Redis's certificate must chain
        /// to, for rediss:// URLs (default: the system's trusted roots).
        #[arg(long, env = "GATEHOUSE_REDIS_CA_FILE")]
        redis_ca_file: Option<std::path::PathBuf>,
        /// PEM certificate (chain) shown to a Redis that asks clients for one.
        #[arg(
            long,
            env = "GATEHOUSE_REDIS_CLIENT_CERT",
            requires = "redis_client_key"
        )]
        redis_client_cert: Option<std::path::PathBuf>,
        /// PEM private key of --redis-client-cert.
        #[arg(
            long,
            env = "GATEHOUSE_REDIS_CLIENT_KEY",
            requires = "redis_client_cert"
        )]
        redis_client_key: Option<std::path::PathBuf>,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new key for a consumer. The key is printed once, on stdout:
    /// the cluster keeps only a hash of it.
    Create {
        #[arg(long)]
        consumer: String,
        /// Lifetime, e.g. `90d` or `12h`; none by default.
        #[arg(long)]
        expires: Option<String>,
        /// A label as KEY=VALUE; repeat for more.
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
    },
    /// Revoke a key by its id: every data plane refuses it once it has the revision.
    Revoke { id: String },
    /// List keys (never their secrets), optionally of one consumer.
    List {
        #[arg(long)]
        consumer: Option<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every member with its role, term, log and applied index, as each node reports it.
    Status {
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Initialize a new cluster on the node given by --server.
    Init {
        /// A member as ID=RAFT_ADDR,ADMIN_ADDR; repeat for each. None: the server alone.
        #[arg(long = "member")]
        members: Vec<String>,
    },
    /// Add a node: it joins as a learner, catches up, then becomes a voter.
    Add {
        id: u64,
        #[arg(long)]
        raft_addr: String,
        #[arg(long)]
        admin_addr: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the cluster.
    Remove { id: u64 },
}

/// The token to call with: GATEHOUSE_TOKEN, else --token-file.
fn token(cli: &Cli) -> Result<Option<String>> {
    if let Ok(t) = std::env::var("GATEHOUSE_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(Some(t.trim().to_string()));
        }
    }
    match &cli.token_file {
        None => Ok(None),
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --token-file {}", path.display()))?;
            Ok(Some(t.trim().to_string()))
        }
    }
}

async fn connect(cli: &Cli) -> Result<AdminClient> {
    let scheme = if cli.ca.is_some() { "https" } else { "http" };
    let url = if cli.server.contains("://") {
        cli.server.clone()
    } else {
        format!("{scheme}://{}", cli.server)
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--server {:?} is not a valid address", cli.server))?;
    match &cli.ca {
        Some(ca) => {
            let files = gatehouse_proto::tls::ClientTlsFiles {
                ca: ca.clone(),
                cert: cli.cert.clone(),
                key: cli.key.clone(),
            };
            let host = url
                .split_once("://")
                .map_or(url.as_str(), |(_, rest)| rest)
                .trim_end_matches('/');
            let tls = files
                .load()?
                .domain_name(gatehouse_proto::tls::host_of(host));
            endpoint = endpoint.tls_config(tls)?;
        }
        None if cli.cert.is_some() || cli.key.is_some() => {
            bail!("--cert and --key need --ca (the cluster CA)")
        }
        None => {}
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(cli.timeout))
        .connect()
        .await
        .map_err(|e| anyhow!("cannot connect to {url}: {e}"))?;
    let token = gatehouse_proto::BearerToken::new(token(cli)?.as_deref())
        .map_err(|e| anyhow!("the admin token: {e}"))?;
    Ok(
        pb::admin_client::AdminClient::with_interceptor(channel, token)
            .max_decoding_message_size(gatehouse_proto::MAX_ADMIN_RESPONSE_BYTES)
            .max_encoding_message_size(gatehouse_proto::MAX_ADMIN_REQUEST_BYTES),
    )
}

/// Sends a call, and again while the cluster is between leaders, until
/// `--timeout` runs out. A read is retried on any UNAVAILABLE answer; a write
/// only when the cluster says it did not act on it, so it is never applied twice.
async fn call<T, F, Fut>(cli: &Cli, read: bool, mut send: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(cli.timeout);
    let mut delay = Duration::from_millis(100);
    let mut told = false;
    loop {
        match send().await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(s)
                if (s.metadata().contains_key(gatehouse_proto::NOT_APPLIED)
                    || (read && s.code() == tonic::Code::Unavailable))
                    && Instant::now() + delay < deadline =>
            {
                if !told {
                    eprintln!("waiting for the cluster: {}", s.message());
                    told = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(s) => return Err(status_error(s)),
        }
    }
}

/// `rpc!(cli, client.method(request))`: the call through [`call`], with retries.
macro_rules! rpc {
    ($cli:expr, $client:ident . $method:ident ($req:expr)) => {{
        let req = $req;
        let read = matches!(stringify!($method), "get" | "list" | "cluster_status");
        call($cli, read, || {
            let mut c = $client.clone();
            let r = req.clone();
            async move { c.$method(r).await }
        })
        .await
    }};
}

mod access;
mod backup;

/// An error answer of the server, kept typed so that a caller can tell a
/// conflict from other failures; it displays as its message.
#[derive(Debug)]
struct ServerError {
    code: tonic::Code,
    message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServerError {}

/// The server's error as the user should read it, with the leader hint.
fn status_error(status: tonic::Status) -> anyhow::Error {
    let mut msg = status.message().to_string();
    if let Some(leader) = status
        .metadata()
        .get(gatehouse_proto::LEADER_HINT)
        .and_then(|v| v.to_str().ok())
    {
        msg.push_str(&format!(" (leader: {leader})"));
    }
    anyhow::Error::new(ServerError {
        code: status.code(),
        message: msg,
    })
}

fn from_pb(objects: Vec<pb::Object>) -> Result<Vec<Object>> {
    objects
        .into_iter()
        .map(|o| Object::try_from(o).map_err(|e| anyhow!("server sent an invalid object: {e}")))
        .collect()
}

fn summary(o: &Object) -> String {
    match o {
        Object::Upstream(u) => u
            .targets
            .iter()
            .map(|t| t.address.as_str())
            .collect::<Vec<_>>()
            .join(","),
        Object::Route(r) => {
            let hosts = if r.hosts.is_empty() {
                "*".to_string()
            } else {
                r.hosts.join(",")
            };
            let paths: Vec<String> = r
                .paths
                .iter()
                .map(|p| match (&p.exact, &p.prefix, &p.regex) {
                    (Some(e), _, _) => e.clone(),
                    (_, Some(p), _) => format!("{p}*"),
                    (_, _, Some(r)) => format!("~{r}"),
                    _ => String::new(),
                })
                .collect();
            format!("{hosts}{} -> {}", paths.join(","), r.upstream)
        }
        Object::Policy(p) => format!("auth={:?} limits={}", p.authentication, p.rate_limits.len()),
        Object::Consumer(c) => format!("groups={}", c.groups.join(",")),
        Object::ApiKey(k) => format!(
            "consumer={}{}",
            k.consumer,
            if k.revoked { " revoked" } else { "" }
        ),
        Object::JwtIssuer(j) => j.issuer.clone(),
        Object::Certificate(c) => c.server_names.join(","),
        Object::AdminToken(t) => format!("{:?}", t.role),
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_objects(objects: &[Object], output: Output) -> Result<()> {
    match output {
        Output::Yaml => print!("{}", ConfigFile::from_objects(objects).to_yaml()),
        Output::Json => println!("{}", serde_json::to_string_pretty(objects)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .map(|o| {
                    vec![
                        o.kind().to_string(),
                        o.name().to_string(),
                        o.revision().to_string(),
                        summary(o),
                    ]
                })
                .collect();
            print_table(&["KIND", "NAME", "REVISION", "SUMMARY"], &rows);
        }
    }
    Ok(())
}

/// Appends the file an object came from to a server error that names it.
fn with_source(err: anyhow::Error, loaded: &Loaded) -> anyhow::Error {
    let msg = err.to_string();
    for o in &loaded.objects {
        let target = o.object_ref();
        if msg.starts_with(&target.to_string()) {
            if let Some(path) = loaded.source_of(&target) {
                return anyhow!("{msg} (in {})", path.display());
            }
        }
    }
    err
}

fn validate(path: &Path, no_secrets: bool) -> Result<()> {
    let mode = if no_secrets {
        Resolve::Placeholders
    } else {
        Resolve::Values
    };
    let loaded = Loaded::read_with(path, mode)?;
    // The very function the state machine runs, over an empty configuration.
    ConfigState::default()
        .apply(1, &loaded.to_command())
        .map_err(|e| with_source(e.into(), &loaded))?;
    println!(
        "ok: {} objects in {} are valid",
        loaded.objects.len(),
        path.display()
    );
    Ok(())
}

fn parse_member(s: &str) -> Result<pb::Member> {
    let (id, addrs) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--member {s:?}: expected ID=RAFT_ADDR,ADMIN_ADDR"))?;
    let (raft, admin) = addrs
        .split_once(',')
        .ok_or_else(|| anyhow!("--member {s:?}: expected ID=RAFT_ADDR,ADMIN_ADDR"))?;
    Ok(pb::Member {
        id: id
            .parse()
            .map_err(|_| anyhow!("--member {s:?}: {id:?} is not a node id"))?,
        raft_addr: raft.to_string(),
        admin_addr: admin.to_string(),
    })
}

fn print_membership(m: &pb::MembershipResponse) {
    let list = |ms: &[pb::Member]| {
        ms.iter()
            .map(|m| m.id.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "membership at log index {}: voters [{}] learners [{}]",
        m.log_index,
        list(&m.voters),
        list(&m.learners)
    );
}

async fn cluster(cli: &Cli, cmd: &ClusterCommand) -> Result<()> {
    let client = connect(cli).await?;
    match cmd {
        ClusterCommand::Status { output } => {
            let s = rpc!(cli, client.cluster_status(pb::ClusterStatusRequest {}))?;
            match output {
                Output::Json | Output::Yaml => {
                    let nodes: Vec<serde_json::Value> = s
                        .nodes
                        .iter()
                        .map(|n| {
                            serde_json::json!({
                                "id": n.id, "role": n.role, "voter": n.voter, "raft_addr": n.raft_addr,
                                "admin_addr": n.admin_addr, "term": n.term, "leader_id": n.leader_id,
                                "last_log_index": n.last_log_index, "last_applied": n.last_applied,
                                "snapshot_index": n.snapshot_index, "config_revision": n.config_revision,
                                "initialized": n.initialized, "error": n.error,
                                "cluster_id": n.cluster_id,
                            })
                        })
                        .collect();
                    let data_planes: Vec<serde_json::Value> = s
                        .data_planes
                        .iter()
                        .map(|d| {
                            serde_json::json!({
                                "node_name": d.node_name, "connected_to": d.connected_to,
                                "applied_revision": d.applied_revision, "lag": d.lag,
                                "last_error": d.last_error, "idle_seconds": d.idle_seconds,
                            })
                        })
                        .collect();
                    let v = serde_json::json!({
                        "cluster_id": s.cluster_id,
                        "leader_id": s.leader_id, "term": s.term,
                        "config_revision": s.config_revision, "nodes": nodes,
                        "data_planes": data_planes,
                    });
                    if *output == Output::Json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        print!("{}", serde_yaml_ng::to_string(&v)?);
                    }
                }
                Output::Table => {
                    let leader = if s.leader_id == 0 {
                        "none".to_string()
                    } else {
                        s.leader_id.to_string()
                    };
                    let cluster = if s.cluster_id.is_empty() {
                        "none"
                    } else {
                        &s.cluster_id
                    };
                    println!(
                        "cluster: {cluster}  leader: {leader}  term: {}  config revision: {}",
                        s.term, s.config_revision
                    );
                    let rows: Vec<Vec<String>> = s
                        .nodes
                        .iter()
                        .map(|n| {
                            vec![
                                n.id.to_string(),
                                n.role.clone(),
                                if n.voter { "yes" } else { "no" }.to_string(),
                                n.admin_addr.clone(),
                                n.raft_addr.clone(),
                                n.term.to_string(),
                                n.last_log_index.to_string(),
                                n.last_applied.to_string(),
                                n.error.clone(),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "ID", "ROLE", "VOTER", "ADMIN", "RAFT", "TERM", "LOG", "APPLIED",
                            "ERROR",
                        ],
                        &rows,
                    );
                    if !s.data_planes.is_empty() {
                        println!();
                        let rows: Vec<Vec<String>> = s
                            .data_planes
                            .iter()
                            .map(|d| {
                                vec![
                                    d.node_name.clone(),
                                    d.connected_to.to_string(),
                                    d.applied_revision.to_string(),
                                    d.lag.to_string(),
                                    d.last_error.clone(),
                                ]
                            })
                            .collect();
                        print_table(
                            &["DATA PLANE", "CONNECTED TO", "APPLIED", "LAG", "LAST ERROR"],
                            &rows,
                        );
                    }
                }
            }
        }
        ClusterCommand::Init { members } => {
            let members = members
                .iter()
                .map(|m| parse_member(m))
                .collect::<Result<_>>()?;
            let m = rpc!(cli, client.cluster_init(pb::ClusterInitRequest { members }))?;
            print_membership(&m);
        }
        ClusterCommand::Add {
            id,
            raft_addr,
            admin_addr,
            learner,
        } => {
            eprintln!("adding node {id}: joining as a learner and waiting for it to catch up...");
            let m = rpc!(
                cli,
                client.add_node(pb::AddNodeRequest {
                    member: Some(pb::Member {
                        id: *id,
                        raft_addr: raft_addr.clone(),
                        admin_addr: admin_addr.clone(),
                    }),
                    learner_only: *learner,
                })
            )?;
            print_membership(&m);
        }
        ClusterCommand::Remove { id } => {
            let m = rpc!(cli, client.remove_node(pb::RemoveNodeRequest { id: *id }))?;
            print_membership(&m);
        }
    }
    Ok(())
}

async fn keys(cli: &Cli, cmd: &KeysCommand) -> Result<()> {
    let client = connect(cli).await?;
    match cmd {
        KeysCommand::Create {
            consumer,
            expires,
            labels,
        } => {
            let expires_at = match expires {
                None => None,
                Some(e) => {
                    let d = humantime::parse_duration(e)
                        .map_err(|err| anyhow!("--expires {e:?}: {err} (try 90d or 12h)"))?;
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
                    Some(now.saturating_add(d).as_secs())
                }
            };
            let labels = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow!("--label {l:?}: expected KEY=VALUE"))
                })
                .collect::<Result<_>>()?;
            let reply = rpc!(
                cli,
                client.create_api_key(pb::CreateApiKeyRequest {
                    consumer: consumer.clone(),
                    expires_at,
                    labels,
                })
            )?;
            eprintln!(
                "api key {} for consumer \"{consumer}\" created at revision {}; it is shown only now:",
                reply.id, reply.revision
            );
            println!("{}", reply.key);
        }
        KeysCommand::Revoke { id } => {
            let got = rpc!(
                cli,
                client.get(pb::GetRequest {
                    kind: "api_key".into(),
                    name: id.clone(),
                    stale: false,
                })
            )?;
            let mut object = Object::try_from(
                got.object
                    .ok_or_else(|| anyhow!("no object in the answer"))?,
            )
            .map_err(|e| anyhow!("server sent an invalid object: {e}"))?;
            let revision = object.revision();
            let Object::ApiKey(key) = &mut object else {
                bail!("api_key \"{id}\" is not an API key");
            };
            if key.revoked {
                println!("api key {id} was already revoked");
                return Ok(());
            }
            key.revoked = true;
            object.set_revision(0);
            let reply = rpc!(
                cli,
                client.put(pb::PutRequest {
                    object: Some(pb::Object::from(&object)),
                    expected_revision: Some(revision),
                })
            )?;
            println!("api key {id} revoked at revision {}", reply.revision);
        }
        KeysCommand::List { consumer } => {
            let list = rpc!(
                cli,
                client.list(pb::ListRequest {
                    kind: "api_key".into(),
                    selector: String::new(),
                    stale: false,
                })
            )?;
            let rows: Vec<Vec<String>> = from_pb(list.objects)?
                .iter()
                .filter_map(|o| match o {
                    Object::ApiKey(k) if consumer.as_ref().is_none_or(|c| *c == k.consumer) => {
                        Some(vec![
                            k.name.clone(),
                            k.consumer.clone(),
                            k.expires_at
                                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                                .unwrap_or_else(|| "never".into()),
                            if k.revoked { "revoked" } else { "active" }.to_string(),
                            k.revision.to_string(),
                        ])
                    }
                    _ => None,
                })
                .collect();
            print_table(&["ID", "CONSUMER", "EXPIRES", "STATE", "REVISION"], &rows);
        }
    }
    Ok(())
}

async fn run(cli: &Cli) -> Result<ExitCode> {
    let done: Result<()> = match &cli.command {
        Command::Apply(args) => return plan::apply(cli, args).await,
        Command::Diff(args) => return plan::diff(cli, args).await,
        Command::Lint { file } => return lint::run(file),
        Command::Export(args) => export::run(cli, args).await,
        Command::Validate { file, no_secrets } => validate(file, *no_secrets),
        Command::Get {
            kind,
            name,
            output,
            selector,
            stale,
        } => {
            // `all` lists every kind: an empty kind in the request.
            let kind: Option<Kind> = match kind.as_str() {
                "all" => None,
                k => Some(k.parse()?),
            };
            let kind_str = kind.map(|k| k.as_str().to_string()).unwrap_or_default();
            let client = connect(cli).await?;
            let objects = match name {
                Some(name) => {
                    if !selector.is_empty() {
                        bail!("--selector applies to lists, not to one named object");
                    }
                    if kind.is_none() {
                        bail!("`get all` lists objects; name a kind to get one object");
                    }
                    let reply = rpc!(
                        cli,
                        client.get(pb::GetRequest {
                            kind: kind_str,
                            name: name.clone(),
                            stale: *stale,
                        })
                    )?;
                    from_pb(reply.object.into_iter().collect())?
                }
                None => from_pb(
                    rpc!(
                        cli,
                        client.list(pb::ListRequest {
                            kind: kind_str,
                            selector: selector.clone(),
                            stale: *stale,
                        })
                    )?
                    .objects,
                )?,
            };
            print_objects(&objects, *output)
        }
        Command::Delete {
            kind,
            name,
            expected_revision,
        } => {
            let target = ObjectRef {
                kind: kind.parse()?,
                name: name.clone(),
            };
            let client = connect(cli).await?;
            let reply = rpc!(
                cli,
                client.delete(pb::DeleteRequest {
                    target: Some(pb::ObjectRef::from(&target)),
                    expected_revision: *expected_revision,
                })
            )?;
            println!("{target} deleted at revision {}", reply.revision);
            Ok(())
        }
        Command::Cluster(cmd) => cluster(cli, cmd).await,
        Command::Keys(cmd) => keys(cli, cmd).await,
        Command::Tokens(cmd) => access::tokens(cli, cmd).await,
        Command::Audit(args) => access::audit(cli, args).await,
        Command::Snapshot(cmd) => backup::snapshot(cli, cmd).await,
        Command::Usage {
            consumer,
            redis_url,
            redis_cluster,
            redis_ca_file,
            redis_client_cert,
            redis_client_key,
            output,
        } => {
            let redis = RedisTarget {
                url: redis_url.as_deref(),
                cluster: redis_cluster,
                ca_file: redis_ca_file.as_deref(),
                client: redis_client_cert
                    .as_deref()
                    .zip(redis_client_key.as_deref()),
            };
            usage(cli, consumer, redis, *output).await
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// One row of `gatehousectl usage`.
#[derive(serde::Serialize)]
struct QuotaUse {
    policy: String,
    quota: String,
    period: String,
    used: u64,
    limit: u64,
    resets: String,
}

/// Where `usage` reads the counts: the Redis the data planes count in.
struct RedisTarget<'a> {
    url: Option<&'a str>,
    cluster: &'a [String],
    ca_file: Option<&'a std::path::Path>,
    /// A client certificate and its key.
    client: Option<(&'a std::path::Path, &'a std::path::Path)>,
}

impl RedisTarget<'_> {
    /// The CA of `--redis-ca-file` and the client certificate, for
    /// `rediss://` URLs only.
    fn certificates(&self) -> Result<Option<redis::TlsCertificates>> {
        if self.ca_file.is_none() && self.client.is_none() {
            return Ok(None);
        }
        let all_tls = self
            .url
            .into_iter()
            .chain(self.cluster.iter().map(String::as_str))
            .all(|u| u.trim().to_ascii_lowercase().starts_with("rediss://"));
        if !all_tls {
            bail!(
                "--redis-ca-file and --redis-client-cert are for rediss:// (TLS) URLs; \
                 the Redis URL is redis://"
            );
        }
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
        };
        let root_cert = match self.ca_file {
            Some(path) => Some(read("--redis-ca-file", path)?),
            None => None,
        };
        let client_tls = match self.client {
            Some((cert, key)) => Some(redis::ClientTlsConfig {
                client_cert: read("--redis-client-cert", cert)?,
                client_key: read("--redis-client-key", key)?,
            }),
            None => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

async fn usage(cli: &Cli, consumer: &str, redis: RedisTarget<'_>, output: Output) -> Result<()> {
    let certs = redis.certificates()?;
    let client = connect(cli).await?;
    let found = rpc!(
        cli,
        client.get(pb::GetRequest {
            kind: Kind::Consumer.as_str().into(),
            name: consumer.to_string(),
            stale: false,
        })
    )
    .with_context(|| format!("consumer {consumer:?}"))?;
    if found.object.is_none() {
        bail!("consumer {consumer:?} does not exist");
    }
    let policies = from_pb(
        rpc!(
            cli,
            client.list(pb::ListRequest {
                kind: Kind::Policy.as_str().into(),
                selector: String::new(),
                stale: false,
            })
        )?
        .objects,
    )?;
    let now = std::time::SystemTime::now();
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    for o in &policies {
        let Object::Policy(p) = o else { continue };
        for q in &p.quotas {
            let period = gatehouse_model::quota::period_of(q.period, now);
            keys.push(gatehouse_model::quota::redis_key(
                consumer, &p.name, &q.name, &period,
            ));
            rows.push(QuotaUse {
                policy: p.name.clone(),
                quota: q.name.clone(),
                period: period.label.clone(),
                used: 0,
                limit: q.limit,
                resets: humantime::format_rfc3339_seconds(period.end).to_string(),
            });
        }
    }
    if !keys.is_empty() {
        // A password in the URL is never printed: errors are the redis crate's own text.
        let timeout = Duration::from_secs(cli.timeout);
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&keys);
        // The consumer is the hash tag of every key: one slot, so one MGET.
        let counts: Vec<Option<u64>> = match redis.url {
            Some(url) => {
                let client = match certs {
                    Some(certs) => redis::Client::build_with_tls(url, certs),
                    None => redis::Client::open(url),
                }
                .map_err(|e| anyhow!("--redis-url: {e}"))?;
                let mut conn =
                    tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
                        .await
                        .map_err(|_| anyhow!("redis did not answer within {timeout:?}"))?
                        .map_err(|e| anyhow!("cannot connect to redis: {e}"))?;
                cmd.query_async(&mut conn)
                    .await
                    .map_err(|e| anyhow!("redis: {e}"))?
            }
            None => {
                let mut builder = redis::cluster::ClusterClient::builder(redis.cluster.to_vec());
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                let client = builder
                    .build()
                    .map_err(|e| anyhow!("--redis-cluster: {e}"))?;
                let mut conn = tokio::time::timeout(timeout, client.get_async_connection())
                    .await
                    .map_err(|_| anyhow!("redis did not answer within {timeout:?}"))?
                    .map_err(|e| anyhow!("cannot connect to the redis cluster: {e}"))?;
                cmd.query_async(&mut conn)
                    .await
                    .map_err(|e| anyhow!("redis: {e}"))?
            }
        };
        for (row, used) in rows.iter_mut().zip(counts) {
            row.used = used.unwrap_or(0);
        }
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(&rows)?),
        Output::Table => {
            if rows.is_empty() {
                println!("no policy has quotas");
                return Ok(());
            }
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.policy.clone(),
                        r.quota.clone(),
                        r.period.clone(),
                        r.used.to_string(),
                        r.limit.to_string(),
                        r.limit.saturating_sub(r.used).to_string(),
                        r.resets.clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "POLICY",
                    "QUOTA",
                    "PERIOD",
                    "USED",
                    "LIMIT",
                    "REMAINING",
                    "RESETS",
                ],
                &table,
            );
        }
    }
    Ok(())
}

/// A reader that stops early (`gatehousectl get all | head`) closes the pipe;
/// printing then fails, which Rust reports as a panic. Exit quietly instead,
/// as other command-line tools do.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors exit 1 like any error: 2 means "differences" to `diff`.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(&cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
