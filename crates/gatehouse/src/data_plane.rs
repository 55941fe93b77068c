//! `gatehouse data-plane` and `gatehouse standalone`: flags and startup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use gatehouse_control::{ControlPlane, NodeConfig, Tuning};
use gatehouse_data::access_log::AccessLogTarget;
use gatehouse_data::limits::store::{StoreTarget, StoreTls};
use gatehouse_data::node::{DataPlane, DataPlaneConfig};
use gatehouse_data::resources::Limits;
use gatehouse_proto::tls::ClientTlsFiles;

/// The data plane's listeners, the same for `data-plane` and `standalone`.
#[derive(Args)]
pub struct Listeners {
    /// Address of the proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080", env = "GATEHOUSE_LISTEN")]
    listen: SocketAddr,
    /// Address of a TLS listener (HTTP/2 and HTTP/1.1 by ALPN; the certificate is
    /// chosen by SNI among Certificate objects). Off unless set.
    #[arg(long, env = "GATEHOUSE_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// Address of the ops listener: /healthz, /readyz, /metrics.
    #[arg(long, default_value = "127.0.0.1:9090", env = "GATEHOUSE_OPS_LISTEN")]
    ops_listen: SocketAddr,
    /// On SIGTERM, how long requests in flight may take to finish.
    #[arg(long, default_value_t = 30, env = "GATEHOUSE_DRAIN_SECONDS")]
    drain_seconds: u64,
    /// Access log, one JSON line per request: `off`, `stdout`, or a file path
    /// (appended to). Never holds credentials or query strings.
    #[arg(long, default_value = "off", env = "GATEHOUSE_ACCESS_LOG")]
    access_log: AccessLogTarget,
    /// Let policies call a token introspection endpoint over plain http on
    /// a loopback address (127.0.0.1, localhost, [::1]). For tests and local
    /// development only: the token and the gateway's client secret then
    /// travel unencrypted.
    #[arg(long, env = "GATEHOUSE_ALLOW_INSECURE_IDP_LOOPBACK")]
    allow_insecure_idp_loopback: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Resource limits of the proxy listeners (`docs/configuration.md`).
#[derive(Args)]
pub struct LimitArgs {
    /// Open connections per proxy listener; a connection past the cap is closed at once.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), env = "GATEHOUSE_MAX_CONNECTIONS")]
    max_connections: u32,
    /// Requests served at once by this data plane; past the cap a request gets
    /// 503 `overloaded` with `Retry-After: 1`.
    #[arg(long, default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(1..), env = "GATEHOUSE_MAX_REQUESTS_IN_FLIGHT")]
    max_requests_in_flight: u32,
    /// Time a connection has to send its first request, and an HTTP/1.1 request
    /// its whole head; the connection is closed after it (slowloris).
    #[arg(long, default_value = "10s", value_parser = duration, env = "GATEHOUSE_HEADER_READ_TIMEOUT")]
    header_read_timeout: Duration,
    /// Longest wait for the next bytes of a request body; after it the request
    /// gets 408 `request-timeout`.
    #[arg(long, default_value = "30s", value_parser = duration, env = "GATEHOUSE_BODY_READ_TIMEOUT")]
    body_read_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..), env = "GATEHOUSE_H2_MAX_CONCURRENT_STREAMS")]
    h2_max_concurrent_streams: u32,
    /// Streams an HTTP/2 client may reset before they are served, per connection,
    /// before the connection is closed (rapid reset).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..), env = "GATEHOUSE_H2_MAX_PENDING_ACCEPT_RESET_STREAMS")]
    h2_max_pending_accept_reset_streams: u32,
    /// Streams the gateway may reset for a client's protocol errors, per
    /// HTTP/2 connection, before the connection is closed.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..), env = "GATEHOUSE_H2_MAX_LOCAL_ERROR_RESET_STREAMS")]
    h2_max_local_error_reset_streams: u32,
}

/// A cluster id as the control plane makes them (`gatehousectl cluster status`).
fn cluster_id(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    gatehouse_proto::check_cluster_id(s)?;
    Ok(s.to_string())
}

/// A duration such as `10s`, `500ms` or `2m`, at least 1 ms and at most a day.
fn duration(s: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 10s or 500ms)"))?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(86_400) {
        return Err("must be between 1ms and 24h".into());
    }
    Ok(d)
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections as usize,
            max_requests_in_flight: self.max_requests_in_flight as usize,
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
            h2_max_pending_accept_reset_streams: self.h2_max_pending_accept_reset_streams as usize,
            h2_max_local_error_reset_streams: self.h2_max_local_error_reset_streams as usize,
        }
    }
}

/// How the data plane fetches the key sets of JwtIssuer objects with a `jwks_url`.
#[derive(Args)]
pub struct JwksArgs {
    /// Also fetch `http://` JWKS URLs whose host is a loopback address
    /// (tests, a local identity provider); https is required otherwise.
    #[arg(long, env = "GATEHOUSE_ALLOW_INSECURE_JWKS_LOOPBACK")]
    allow_insecure_jwks_loopback: bool,
    /// CA certificates (PEM) that JWKS servers are checked against, instead
    /// of the system's roots.
    #[arg(long, env = "GATEHOUSE_JWKS_CA_FILE")]
    jwks_ca_file: Option<PathBuf>,
}

impl JwksArgs {
    fn settings(&self) -> gatehouse_data::jwks::JwksSettings {
        gatehouse_data::jwks::JwksSettings {
            allow_insecure_loopback: self.allow_insecure_jwks_loopback,
            ca_file: self.jwks_ca_file.clone(),
            ..Default::default()
        }
    }
}

/// Flags of `gatehouse data-plane`.
#[derive(Args)]
pub struct DataPlaneArgs {
    /// Admin address of a control-plane node to watch (host:port); repeat or
    /// separate with commas to list several, tried in turn. A node of another
    /// cluster than this data plane's is not followed (see --cluster-id).
    #[arg(
        long = "control-plane",
        required = true,
        value_delimiter = ',',
        env = "GATEHOUSE_CONTROL_PLANES"
    )]
    control_planes: Vec<String>,
    /// The id of the cluster this data plane belongs to (`gatehousectl
    /// cluster status` shows it): it follows no control-plane node of
    /// another cluster, and does not start from a last-known-good file of
    /// another one. Without it, the data plane belongs to the cluster named
    /// in its last-known-good file, or else to that of the first
    /// control-plane node it applies configuration from.
    #[arg(long, env = "GATEHOUSE_CLUSTER_ID", value_parser = cluster_id)]
    cluster_id: Option<String>,
    #[command(flatten)]
    listeners: Listeners,
    /// This data plane's name in `gatehousectl cluster status` [default: dp-<listen address>].
    #[arg(long, env = "GATEHOUSE_NODE_NAME")]
    name: Option<String>,
    /// Where the last-known-good configuration, and the id of the cluster it
    /// came from, are kept.
    #[arg(
        long,
        default_value = "gatehouse-data/data-plane",
        env = "GATEHOUSE_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// Allow non-loopback listen addresses without TLS (logs a warning).
    #[arg(long, env = "GATEHOUSE_INSECURE")]
    insecure: bool,
    /// File holding the admin token (role data_plane) the config stream is
    /// watched with; GATEHOUSE_TOKEN, when set, wins. Make one with
    /// `gatehousectl tokens create NAME --role data_plane`.
    #[arg(long, env = "GATEHOUSE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The cluster CA (PEM): watch the control plane over TLS (https).
    #[arg(long, env = "GATEHOUSE_CONTROL_PLANE_CA")]
    control_plane_ca: Option<PathBuf>,
    /// This data plane's client certificate (PEM, role data_plane), for
    /// mutual TLS; it replaces the token. Needs --control-plane-key.
    #[arg(long, env = "GATEHOUSE_CONTROL_PLANE_CERT")]
    control_plane_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "GATEHOUSE_CONTROL_PLANE_KEY")]
    control_plane_key: Option<PathBuf>,
    /// File with the control plane's secrets key, to open sealed key material
    /// (GATEHOUSE_SECRETS_KEY, the key itself, wins).
    #[arg(long, env = "GATEHOUSE_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    jwks: JwksArgs,
}

/// Where `scope: cluster` rate limits are counted. Without one of these,
/// each data plane counts cluster limits on its own.
#[derive(Args)]
pub struct RedisArgs {
    /// One Redis server for cluster rate limits:
    /// redis://[user:password@]host:port[/db], or rediss://... for TLS.
    #[arg(long, env = "GATEHOUSE_REDIS_URL", hide_env_values = true,
          conflicts_with_all = ["redis_cluster", "redis_sentinel"])]
    redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster for cluster rate limits (redis://host:port,
    /// or rediss:// for TLS); repeat or separate with commas.
    #[arg(
        long,
        value_delimiter = ',',
        env = "GATEHOUSE_REDIS_CLUSTER",
        hide_env_values = true,
        conflicts_with = "redis_sentinel"
    )]
    redis_cluster: Vec<String>,
    /// Redis Sentinels (redis://host:port, or rediss:// for TLS to them and to
    /// the master) that name the master for cluster rate limits; repeat or
    /// separate with commas. Needs --redis-sentinel-master.
    #[arg(
        long,
        value_delimiter = ',',
        env = "GATEHOUSE_REDIS_SENTINEL",
        hide_env_values = true,
        requires = "redis_sentinel_master"
    )]
    redis_sentinel: Vec<String>,
    /// The master name the sentinels watch.
    #[arg(long, env = "GATEHOUSE_REDIS_SENTINEL_MASTER")]
    redis_sentinel_master: Option<String>,
    /// The password of the master the sentinels name (the sentinels' own
    /// goes in their URLs). Prefer the environment variable.
    #[arg(
        long,
        env = "GATEHOUSE_REDIS_SENTINEL_MASTER_PASSWORD",
        hide_env_values = true,
        requires = "redis_sentinel"
    )]
    redis_sentinel_master_password: Option<String>,
    /// PEM file of the CA certificate(s) that Redis's certificate must chain
    /// to, for rediss:// URLs (default: the system's trusted roots).
    #[arg(long, env = "GATEHOUSE_REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,
    /// PEM certificate (chain) this data plane shows Redis, for a Redis that
    /// asks for one (tls-auth-clients yes). Needs --redis-client-key.
    #[arg(
        long,
        env = "GATEHOUSE_REDIS_CLIENT_CERT",
        requires = "redis_client_key"
    )]
    redis_client_cert: Option<PathBuf>,
    /// PEM private key of --redis-client-cert.
    #[arg(
        long,
        env = "GATEHOUSE_REDIS_CLIENT_KEY",
        requires = "redis_client_cert"
    )]
    redis_client_key: Option<PathBuf>,
    /// How long one cluster rate-limit decision may wait for Redis before the
    /// limit's on_store_failure applies, in milliseconds.
    #[arg(long, default_value_t = 50, env = "GATEHOUSE_RATE_LIMIT_TIMEOUT_MS",
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rate_limit_timeout_ms: u64,
}

impl RedisArgs {
    /// The store and its TLS settings (the CA file read and checked here).
    fn store(self) -> Result<(Option<StoreTarget>, StoreTls)> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
        };
        let mut tls = match &self.redis_ca_file {
            None => StoreTls::default(),
            Some(path) => StoreTls::with_ca_pem(read("--redis-ca-file", path)?)
                .with_context(|| format!("--redis-ca-file {}", path.display()))?,
        };
        if let (Some(cert), Some(key)) = (&self.redis_client_cert, &self.redis_client_key) {
            tls = tls
                .with_client_identity(
                    read("--redis-client-cert", cert)?,
                    read("--redis-client-key", key)?,
                )
                .context("--redis-client-cert / --redis-client-key")?;
        }
        let has_tls_files = self.redis_ca_file.is_some() || self.redis_client_cert.is_some();
        let target = self.target()?;
        if has_tls_files && target.is_none() {
            bail!(
                "--redis-ca-file and --redis-client-cert need --redis-url, --redis-cluster or \
                 --redis-sentinel"
            );
        }
        Ok((target, tls))
    }

    fn target(self) -> Result<Option<StoreTarget>> {
        let clean = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        if let Some(url) = self.redis_url {
            return Ok(Some(StoreTarget::Single(url.trim().to_string())));
        }
        let cluster = clean(self.redis_cluster);
        if !cluster.is_empty() {
            return Ok(Some(StoreTarget::Cluster(cluster)));
        }
        let sentinels = clean(self.redis_sentinel);
        match (sentinels.is_empty(), self.redis_sentinel_master) {
            (false, Some(master)) => Ok(Some(StoreTarget::Sentinel {
                sentinels,
                master,
                master_password: self.redis_sentinel_master_password,
            })),
            (false, None) => bail!("--redis-sentinel needs --redis-sentinel-master"),
            (true, Some(_)) => bail!("--redis-sentinel-master needs --redis-sentinel"),
            (true, None) => Ok(None),
        }
    }
}

/// Flags of `gatehouse standalone`.
#[derive(Args)]
pub struct StandaloneArgs {
    /// Where the control plane keeps its state and the data plane its last-known-good file.
    #[arg(long, default_value = "gatehouse-data", env = "GATEHOUSE_DATA_DIR")]
    data_dir: PathBuf,
    /// Address of the admin API, for gatehousectl.
    #[arg(long, default_value = "127.0.0.1:9400", env = "GATEHOUSE_ADMIN_LISTEN")]
    admin_listen: SocketAddr,
    /// Address of the control plane's Raft listener (one node; needed to add more later).
    #[arg(long, default_value = "127.0.0.1:9401", env = "GATEHOUSE_RAFT_LISTEN")]
    raft_listen: SocketAddr,
    #[command(flatten)]
    listeners: Listeners,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    jwks: JwksArgs,
}

/// ` tls=ADDR` for the ready line, when the TLS listener is on.
fn tls_field(dp: &DataPlane) -> String {
    dp.tls_addr.map(|a| format!(" tls={a}")).unwrap_or_default()
}

fn check_loopback(what: &str, addr: SocketAddr, insecure: bool) -> Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !insecure {
        bail!("the {what} address {addr} is not a loopback address: without TLS this needs --insecure");
    }
    tracing::warn!(%addr, "the {what} address is not loopback and traffic is not encrypted (--insecure)");
    Ok(())
}

fn data_plane_config(args: DataPlaneArgs) -> Result<DataPlaneConfig> {
    check_loopback("proxy listen", args.listeners.listen, args.insecure)?;
    check_loopback("ops listen", args.listeners.ops_listen, args.insecure)?;

    let control_planes: Vec<String> = args
        .control_planes
        .into_iter()
        .map(|c| c.trim().trim_start_matches("http://").to_string())
        .filter(|c| !c.is_empty())
        .collect();
    if control_planes.is_empty() {
        bail!("--control-plane needs at least one address");
    }
    let control_plane_tls = match (
        args.control_plane_ca,
        args.control_plane_cert,
        args.control_plane_key,
    ) {
        (None, None, None) => None,
        (Some(ca), cert, key) => {
            if cert.is_some() != key.is_some() {
                bail!("--control-plane-cert and --control-plane-key go together");
            }
            Some(ClientTlsFiles { ca, cert, key })
        }
        (None, _, _) => bail!("--control-plane-cert needs --control-plane-ca (the cluster CA)"),
    };
    let has_cert = control_plane_tls.as_ref().is_some_and(|t| t.cert.is_some());
    let token = crate::tokens::client(args.token_file.as_deref())?;
    if token.is_none() && !has_cert {
        bail!("the data plane needs a credential to watch the control plane: a client certificate (--control-plane-cert with TLS) or a token (GATEHOUSE_TOKEN or --token-file; make one with `gatehousectl tokens create NAME --role data_plane`)");
    }
    let rate_limit_timeout = Duration::from_millis(args.redis.rate_limit_timeout_ms);
    let store = args.redis.store()?;
    Ok(DataPlaneConfig {
        listen: args.listeners.listen,
        tls_listen: args.listeners.tls_listen,
        ops_listen: args.listeners.ops_listen,
        control_planes,
        cluster_id: args.cluster_id,
        node_name: args
            .name
            .unwrap_or_else(|| format!("dp-{}", args.listeners.listen)),
        state_dir: args.state_dir,
        token: gatehouse_proto::BearerToken::new(token.as_deref())?,
        control_plane_tls,
        secrets_key: crate::tokens::secrets_key(args.secrets_key_file.as_deref())?,
        rate_limit_timeout,
        rate_limit_store: store.0,
        rate_limit_store_tls: store.1,
        limits: args.listeners.limits.limits(),
        access_log: args.listeners.access_log,
        jwks: args.jwks.settings(),
        allow_insecure_idp_loopback: args.listeners.allow_insecure_idp_loopback,
    })
}

pub async fn run_data_plane(args: DataPlaneArgs) -> Result<()> {
    let drain = Duration::from_secs(args.listeners.drain_seconds);
    let dp = DataPlane::start(data_plane_config(args)?).await?;
    println!(
        "ready proxy={} ops={}{}",
        dp.proxy_addr,
        dp.ops_addr,
        tls_field(&dp)
    );
    crate::shutdown_signal().await;
    tracing::info!(?drain, "draining");
    dp.shutdown(drain).await;
    Ok(())
}

pub async fn run_standalone(args: StandaloneArgs) -> Result<()> {
    // A first-try mode: loopback only (run the roles separately to expose them).
    for (what, addr) in [
        ("admin listen", args.admin_listen),
        ("raft listen", args.raft_listen),
        ("proxy listen", args.listeners.listen),
        ("ops listen", args.listeners.ops_listen),
    ] {
        if !addr.ip().is_loopback() {
            bail!("the {what} address {addr} is not a loopback address: standalone listens on loopback only; run `gatehouse control-plane` and `gatehouse data-plane` to serve other addresses");
        }
    }
    // The bootstrap token is this one-node cluster's admin credential, and
    // the in-process data plane watches with it too.
    let cp_dir = args.data_dir.join("control-plane");
    let token = crate::tokens::bootstrap(None, &cp_dir)?;
    let secrets_key = crate::tokens::secrets_key_or_new(&args.data_dir.join("secrets.key"))?;
    let cp = ControlPlane::start(NodeConfig {
        node_id: 1,
        admin_listen: args.admin_listen,
        raft_listen: args.raft_listen,
        advertise_admin: None,
        advertise_raft: None,
        peer_source_ip: None,
        data_dir: cp_dir.clone(),
        bootstrap: true,
        bootstrap_token_hash: gatehouse_model::admintoken::hash(&token),
        tls: None,
        secrets_key: Some(secrets_key.clone()),
        ops_listen: None,
        tuning: Tuning::default(),
    })
    .await?;
    let rate_limit_timeout = Duration::from_millis(args.redis.rate_limit_timeout_ms);
    let store = args.redis.store()?;
    let dp = DataPlane::start(DataPlaneConfig {
        listen: args.listeners.listen,
        tls_listen: args.listeners.tls_listen,
        ops_listen: args.listeners.ops_listen,
        control_planes: vec![cp.admin_addr.to_string()],
        // Learnt from the embedded node, and kept in the last-known-good file.
        cluster_id: None,
        node_name: "standalone".into(),
        state_dir: args.data_dir.join("data-plane"),
        token: gatehouse_proto::BearerToken::new(Some(&token))?,
        control_plane_tls: None,
        secrets_key: Some(secrets_key),
        rate_limit_timeout,
        rate_limit_store: store.0,
        rate_limit_store_tls: store.1,
        limits: args.listeners.limits.limits(),
        access_log: args.listeners.access_log,
        jwks: args.jwks.settings(),
        allow_insecure_idp_loopback: args.listeners.allow_insecure_idp_loopback,
    })
    .await?;
    println!(
        "ready admin={} proxy={} ops={}{}",
        cp.admin_addr,
        dp.proxy_addr,
        dp.ops_addr,
        tls_field(&dp)
    );
    let credential = if std::env::var_os(crate::tokens::BOOTSTRAP_ENV).is_some() {
        format!("GATEHOUSE_TOKEN=${} ", crate::tokens::BOOTSTRAP_ENV)
    } else {
        format!(
            "GATEHOUSE_TOKEN_FILE={} ",
            cp_dir.join("bootstrap-token").display()
        )
    };
    eprintln!(
        "gatehouse standalone: apply configuration with `{credential}gatehousectl --server {} apply -f FILE`; the proxy listens on http://{}",
        cp.admin_addr, dp.proxy_addr
    );
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    dp.shutdown(Duration::from_secs(args.listeners.drain_seconds))
        .await;
    cp.shutdown().await;
    Ok(())
}
