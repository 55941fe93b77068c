//! `gatehouse`: the server binary. Parses flags and a config file, then
//! runs the control plane from `gatehouse-control`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod certs;
mod data_plane;
mod tokens;

/// mimalloc: the proxy allocates a little per request on many threads, where
/// glibc's allocator showed up at about a tenth of all CPU samples
/// (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use gatehouse_control::tls::ServerTlsFiles;
use gatehouse_control::{ControlPlane, NodeConfig, Tuning};
use gatehouse_telemetry::LogFormat;
use serde::Deserialize;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Gatehouse: a distributed API gateway whose first job is security"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "GATEHOUSE_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `gatehouse_control=debug,info` (RUST_LOG wins when set).
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "GATEHOUSE_LOG_LEVEL"
    )]
    log_level: String,
    /// Export OpenTelemetry traces of proxied requests over OTLP/gRPC to this
    /// collector, e.g. `http://127.0.0.1:4317`, or `https://...` for TLS. Off
    /// unless set.
    #[arg(long, global = true, env = "GATEHOUSE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// PEM file of the CA certificate(s) an https:// collector's certificate
    /// must chain to (default: the system's trusted roots).
    #[arg(long, global = true, env = "GATEHOUSE_OTLP_CA_FILE")]
    otlp_ca_file: Option<std::path::PathBuf>,
    /// Share of new traces recorded (0 to 1); a request whose `traceparent`
    /// carries a sampling decision follows it.
    #[arg(
        long,
        global = true,
        default_value_t = 1.0,
        env = "GATEHOUSE_TRACE_SAMPLE_RATIO"
    )]
    trace_sample_ratio: f64,
}

#[derive(Subcommand)]
enum Command {
    /// Run a control-plane node: Raft replication of the configuration and the admin API.
    ControlPlane(ControlPlaneArgs),
    /// Run a data-plane node: follows a control plane's configuration and proxies requests.
    DataPlane(data_plane::DataPlaneArgs),
    /// Run a one-node control plane and a data plane in one process, for a first try.
    Standalone(data_plane::StandaloneArgs),
    /// Admin tokens made offline.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Certificates for TLS between the cluster's parts.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The key that seals key material at rest.
    #[command(subcommand)]
    Secrets(SecretsCommand),
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Print a new random secrets key (64 hex digits), for --secrets-key-file
    /// on every control-plane node and data plane.
    GenerateKey,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a development CA and certificates for control-plane nodes, data
    /// planes and admins (private keys with mode 0600).
    Init(certs::InitArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random admin token, e.g. for GATEHOUSE_BOOTSTRAP_TOKEN.
    Generate,
}

/// Flags of `gatehouse control-plane`. Each may also come from the config
/// file (same names with `_`) or the environment; a flag wins over both.
#[derive(Args, Default)]
struct ControlPlaneArgs {
    /// YAML config file with any of the settings below (unknown keys are errors).
    #[arg(long, short = 'c', env = "GATEHOUSE_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id, unique in the cluster and never reused for another data dir.
    #[arg(long, env = "GATEHOUSE_NODE_ID")]
    node_id: Option<u64>,
    /// Address of the admin API (gRPC) [default: 127.0.0.1:9400].
    #[arg(long, env = "GATEHOUSE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Address of Raft traffic between control-plane nodes [default: 127.0.0.1:9401].
    #[arg(long, env = "GATEHOUSE_RAFT_LISTEN")]
    raft_listen: Option<SocketAddr>,
    /// Address of the ops listener: /healthz, /readyz (a member with a known
    /// leader) and /metrics (Raft, writes, admin calls). Off unless set.
    #[arg(long, env = "GATEHOUSE_OPS_LISTEN")]
    ops_listen: Option<SocketAddr>,
    /// Admin address other nodes and clients use, when not the listen address.
    #[arg(long, env = "GATEHOUSE_ADVERTISE_ADMIN")]
    advertise_admin: Option<String>,
    /// Raft address other nodes use, when not the listen address.
    #[arg(long, env = "GATEHOUSE_ADVERTISE_RAFT")]
    advertise_raft: Option<String>,
    /// Local IP address to open connections to other nodes from (Raft,
    /// forwarded admin calls), on a host with several [default: the system's choice].
    #[arg(long, env = "GATEHOUSE_PEER_SOURCE_IP")]
    peer_source_ip: Option<std::net::IpAddr>,
    /// Where the node keeps its Raft log and snapshots [default: ./gatehouse-data/node-<id>].
    #[arg(long, env = "GATEHOUSE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// On first start, initialize a new one-node cluster with this node (ignored once initialized).
    #[arg(long, env = "GATEHOUSE_BOOTSTRAP")]
    bootstrap: bool,
    /// File holding the bootstrap admin token of a cluster this node founds
    /// (GATEHOUSE_BOOTSTRAP_TOKEN wins) [default: <data-dir>/bootstrap-token,
    /// generated with mode 0600 when missing]. It is accepted only until the
    /// cluster holds admin tokens; the leader then stores it as admin token
    /// `bootstrap`.
    #[arg(long, env = "GATEHOUSE_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// Allow listening on non-loopback addresses without TLS (logs a warning).
    #[arg(long, env = "GATEHOUSE_INSECURE")]
    insecure: bool,
    /// This node's certificate (PEM): turns on TLS for Raft (mutual), the
    /// admin API and the config stream. Needs --tls-key and --tls-ca.
    /// The files are reloaded when they change.
    #[arg(long, env = "GATEHOUSE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "GATEHOUSE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) that signed every node's, data plane's and admin's certificate.
    #[arg(long, env = "GATEHOUSE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// File with the key that seals Certificate private keys and HMAC
    /// secrets before they enter the replicated log (GATEHOUSE_SECRETS_KEY,
    /// the key itself, wins). Every node and data plane needs the same key.
    /// Without one, key material is stored as given.
    #[arg(long, env = "GATEHOUSE_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Build a Raft snapshot after this many log entries [default: 10000].
    #[arg(long, env = "GATEHOUSE_SNAPSHOT_EVERY")]
    snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot for slightly lagging followers [default: 1000].
    #[arg(long, env = "GATEHOUSE_KEEP_LOGS")]
    keep_logs: Option<u64>,
    /// Raft heartbeat interval in milliseconds [default: 150].
    #[arg(long, env = "GATEHOUSE_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Minimum Raft election timeout in milliseconds; the maximum is twice it [default: 1000].
    #[arg(long, env = "GATEHOUSE_ELECTION_TIMEOUT_MS")]
    election_timeout_ms: Option<u64>,
}

/// The config file of `gatehouse control-plane`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ControlPlaneFile {
    node_id: Option<u64>,
    admin_listen: Option<SocketAddr>,
    raft_listen: Option<SocketAddr>,
    ops_listen: Option<SocketAddr>,
    advertise_admin: Option<String>,
    advertise_raft: Option<String>,
    peer_source_ip: Option<std::net::IpAddr>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    bootstrap: bool,
    bootstrap_token_file: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    secrets_key_file: Option<PathBuf>,
    snapshot_every: Option<u64>,
    keep_logs: Option<u64>,
    heartbeat_ms: Option<u64>,
    election_timeout_ms: Option<u64>,
}

fn read_config_file(path: &Path) -> Result<ControlPlaneFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

fn node_config(args: ControlPlaneArgs) -> Result<(NodeConfig, Option<PathBuf>)> {
    let file = match &args.config {
        Some(path) => read_config_file(path)?,
        None => ControlPlaneFile::default(),
    };
    let Some(node_id) = args.node_id.or(file.node_id) else {
        bail!("--node-id is required (or node_id in the config file)");
    };
    if node_id == 0 {
        bail!("node id 0 is reserved (it means \"no node\" in status output): use 1 or more");
    }
    let admin_listen = args
        .admin_listen
        .or(file.admin_listen)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9400)));
    let raft_listen = args
        .raft_listen
        .or(file.raft_listen)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9401)));
    let insecure = args.insecure || file.insecure;
    let tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        args.tls_ca.or(file.tls_ca),
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(ServerTlsFiles { cert, key, ca }),
        (None, None, None) => None,
        _ => bail!("--tls-cert, --tls-key and --tls-ca go together: give all three or none"),
    };
    let ops_listen = args.ops_listen.or(file.ops_listen);
    if let Some(addr) = ops_listen {
        if !addr.ip().is_loopback() && !insecure {
            bail!("the ops listen address {addr} is not a loopback address: it serves plaintext HTTP, which needs --insecure");
        }
    }
    for (what, addr) in [("admin listen", admin_listen), ("raft listen", raft_listen)] {
        if !addr.ip().is_loopback() && tls.is_none() {
            if !insecure {
                bail!("the {what} address {addr} is not a loopback address: without TLS (--tls-cert, --tls-key, --tls-ca) this needs --insecure");
            }
            tracing::warn!(%addr, "{what} is not loopback and traffic is not encrypted (--insecure)");
        }
    }
    let defaults = Tuning::default();
    let election = args
        .election_timeout_ms
        .or(file.election_timeout_ms)
        .unwrap_or(defaults.election_timeout_min_ms);
    let heartbeat = args
        .heartbeat_ms
        .or(file.heartbeat_ms)
        .unwrap_or(defaults.heartbeat_ms);
    if heartbeat == 0 || election <= heartbeat || election > 60_000 {
        bail!("--election-timeout-ms ({election}) must be greater than --heartbeat-ms ({heartbeat}) and at most 60000, and both above 0");
    }
    let snapshot_every = args
        .snapshot_every
        .or(file.snapshot_every)
        .unwrap_or(defaults.snapshot_every);
    if snapshot_every == 0 {
        bail!("--snapshot-every must be at least 1");
    }
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(format!("gatehouse-data/node-{node_id}")));
    let bootstrap_token_file = args.bootstrap_token_file.or(file.bootstrap_token_file);
    let secrets_key =
        tokens::secrets_key(args.secrets_key_file.or(file.secrets_key_file).as_deref())?;
    if secrets_key.is_none() {
        tracing::warn!("no secrets key (--secrets-key-file): certificate private keys and HMAC secrets are stored as given");
    }
    Ok((
        NodeConfig {
            node_id,
            admin_listen,
            raft_listen,
            advertise_admin: args.advertise_admin.or(file.advertise_admin),
            advertise_raft: args.advertise_raft.or(file.advertise_raft),
            peer_source_ip: args.peer_source_ip.or(file.peer_source_ip),
            data_dir,
            bootstrap: args.bootstrap || file.bootstrap,
            // Filled in by `with_bootstrap_token`, which may write a file.
            bootstrap_token_hash: String::new(),
            tls,
            secrets_key,
            ops_listen,
            tuning: Tuning {
                heartbeat_ms: heartbeat,
                election_timeout_min_ms: election,
                election_timeout_max_ms: election * 2,
                snapshot_every,
                keep_logs: args
                    .keep_logs
                    .or(file.keep_logs)
                    .unwrap_or(defaults.keep_logs),
                history: defaults.history,
            },
        },
        bootstrap_token_file,
    ))
}

/// Reads (or makes) the node's bootstrap token; only its hash is kept.
fn with_bootstrap_token(mut cfg: NodeConfig, file: Option<PathBuf>) -> Result<NodeConfig> {
    let token = tokens::bootstrap(file.as_deref(), &cfg.data_dir)?;
    cfg.bootstrap_token_hash = gatehouse_model::admintoken::hash(&token);
    Ok(cfg)
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run_control_plane(args: ControlPlaneArgs) -> Result<()> {
    let (cfg, token_file) = node_config(args)?;
    let cfg = with_bootstrap_token(cfg, token_file)?;
    let node = ControlPlane::start(cfg).await?;
    // One line on stdout that scripts and tests can wait for.
    println!(
        "ready node_id={} admin={} raft={}{}",
        node.node_id,
        node.admin_addr,
        node.raft_addr,
        node.ops_addr
            .map(|a| format!(" ops={a}"))
            .unwrap_or_default()
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let ca_pem = match &cli.otlp_ca_file {
        None => None,
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                eprintln!("error: --otlp-ca-file {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    if ca_pem.is_some() && cli.otlp_endpoint.is_none() {
        eprintln!("error: --otlp-ca-file needs --otlp-endpoint");
        return std::process::ExitCode::FAILURE;
    }
    let otlp = cli
        .otlp_endpoint
        .as_ref()
        .map(|endpoint| gatehouse_telemetry::OtlpConfig {
            endpoint: endpoint.clone(),
            sample_ratio: cli.trace_sample_ratio,
            ca_pem,
        });
    let traces = match gatehouse_telemetry::init_with_traces(
        cli.log_format,
        &cli.log_level,
        otlp.as_ref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::ControlPlane(args) => run_control_plane(args).await,
        Command::DataPlane(args) => data_plane::run_data_plane(args).await,
        Command::Standalone(args) => data_plane::run_standalone(args).await,
        Command::Certs(CertsCommand::Init(args)) => certs::init(&args),
        Command::Secrets(SecretsCommand::GenerateKey) => {
            println!("{}", gatehouse_model::seal::SealKey::generate_text());
            Ok(())
        }
        Command::Token(TokenCommand::Generate) => {
            println!("{}", tokens::generate());
            Ok(())
        }
    };
    // The spans of the last requests are still queued.
    traces.shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cli: &[&str]) -> ControlPlaneArgs {
        let mut all = vec!["gatehouse", "control-plane"];
        all.extend_from_slice(cli);
        match Cli::try_parse_from(all).expect("flags parse").command {
            Command::ControlPlane(a) => a,
            _ => unreachable!("parsed as control-plane"),
        }
    }

    fn config_file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path.to_str().unwrap().to_string())
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let (_dir, path) =
            config_file("node_id: 4\nraft_listen: 127.0.0.1:7001\nsnapshot_every: 50\n");
        let cfg = node_config(args(&["-c", &path, "--snapshot-every", "60"]))
            .unwrap()
            .0;
        assert_eq!(cfg.node_id, 4);
        assert_eq!(cfg.raft_listen.to_string(), "127.0.0.1:7001");
        assert_eq!(cfg.admin_listen.to_string(), "127.0.0.1:9400");
        assert_eq!(cfg.tuning.snapshot_every, 60);
        assert_eq!(cfg.data_dir, PathBuf::from("gatehouse-data/node-4"));
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let (_dir, path) = config_file("node_id: 1\nraft_lisen: 127.0.0.1:7001\n");
        let err = format!("{:#}", node_config(args(&["-c", &path])).err().unwrap());
        assert!(
            err.contains("unknown field `raft_lisen`") && err.contains("line 2"),
            "{err}"
        );
        assert!(err.contains(&path), "names the file: {err}");

        let err = node_config(args(&[])).err().unwrap().to_string();
        assert_eq!(err, "--node-id is required (or node_id in the config file)");

        let err = node_config(args(&["--node-id", "1", "--admin-listen", "0.0.0.0:9400"]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("the admin listen address 0.0.0.0:9400 is not a loopback address"),
            "{err}"
        );
        assert!(err.contains("--insecure"), "{err}");

        let err = node_config(args(&["--node-id", "0"]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("node id 0 is reserved"), "{err}");
        assert!(node_config(args(&[
            "--node-id",
            "1",
            "--admin-listen",
            "0.0.0.0:9400",
            "--insecure"
        ]))
        .is_ok());

        let err = node_config(args(&[
            "--node-id",
            "1",
            "--heartbeat-ms",
            "500",
            "--election-timeout-ms",
            "400",
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("must be greater than --heartbeat-ms"), "{err}");
    }
}
