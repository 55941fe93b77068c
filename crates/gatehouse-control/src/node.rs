//! One control-plane node: storage, Raft, and the two gRPC listeners (raft
//! and admin), started together and stopped together.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt;
use gatehouse_proto::pb::admin_server::AdminServer;
use gatehouse_proto::pb::config_stream_server::ConfigStreamServer;
use gatehouse_proto::pb::raft_server::RaftServer;
use gatehouse_proto::{MAX_ADMIN_REQUEST_BYTES, MAX_ADMIN_RESPONSE_BYTES, MAX_RAFT_MESSAGE_BYTES};
use openraft::{Config as RaftConfig, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::admin::AdminService;
use crate::auth::Auth;
use crate::identity::{FlushFn, Identity};
use crate::network::{Channels, Network, RaftService};
use crate::store::engine::{Engine, SledEngine, Tree};
use crate::store::{LogStore, Shared, StateMachineStore};
use crate::stream::{ConfigStreamService, Registry};
use crate::tls::{NodeTls, ServerTlsFiles};
use crate::types::{NodeId, NodeInfo, Raft};

/// Raft timing and log retention.
#[derive(Clone, Debug)]
pub struct Tuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries.
    pub snapshot_every: u64,
    /// Entries kept behind a snapshot for followers that are only a little behind.
    pub keep_logs: u64,
    /// Configuration changes kept for config-stream deltas.
    pub history: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            heartbeat_ms: 150,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_every: 10_000,
            keep_logs: 1_000,
            history: gatehouse_model::state::DEFAULT_HISTORY,
        }
    }
}

/// What a node needs to start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub admin_listen: SocketAddr,
    pub raft_listen: SocketAddr,
    /// The addresses other nodes use; the bound addresses when not set.
    pub advertise_admin: Option<String>,
    pub advertise_raft: Option<String>,
    /// The local address this node opens connections to other nodes from
    /// (Raft, forwarded admin calls, joins); the system's choice when `None`.
    pub peer_source_ip: Option<std::net::IpAddr>,
    pub data_dir: PathBuf,
    /// Initialize a one-node cluster on first start.
    pub bootstrap: bool,
    /// SHA-256 (lower-case hex) of this node's bootstrap admin token: the
    /// admin credential of a cluster this node founds, until the cluster
    /// holds admin tokens of its own (see `auth`).
    pub bootstrap_token_hash: String,
    /// TLS for Raft (mutual), the admin API and the config stream; plaintext when `None`.
    pub tls: Option<ServerTlsFiles>,
    /// Seals key material in the replicated state; stored as given when `None`.
    pub secrets_key: Option<gatehouse_model::seal::SealKey>,
    /// The ops listener (`/healthz`, `/readyz`, `/metrics`); off when `None`.
    pub ops_listen: Option<SocketAddr>,
    pub tuning: Tuning,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {message}")]
    Storage { path: PathBuf, message: String },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("TLS: {0}")]
    Tls(#[from] gatehouse_proto::tls::TlsFileError),
}

/// Accepted connections with Nagle's algorithm off: small gRPC messages
/// otherwise wait for delayed ACKs (about 40 ms each; see docs/benchmarks.md).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A running node.
pub struct ControlPlane {
    pub node_id: NodeId,
    pub admin_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    /// The ops listener's address, when it has one.
    pub ops_addr: Option<SocketAddr>,
    pub raft: Raft,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl ControlPlane {
    pub async fn start(cfg: NodeConfig) -> Result<ControlPlane, StartError> {
        let storage = |message: String| StartError::Storage {
            path: cfg.data_dir.clone(),
            message,
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| storage(e.to_string()))?;
        let engine =
            SledEngine::open(&cfg.data_dir.join("store")).map_err(|e| storage(e.to_string()))?;
        let identity = Arc::new(
            Identity::open(&engine, cfg.node_id)
                .await
                .map_err(|e| storage(e.0))?,
        );
        let log = LogStore::open(&engine).map_err(|e| storage(e.to_string()))?;
        let sm = StateMachineStore::open(&engine, cfg.tuning.history)
            .map_err(|e| storage(e.to_string()))?;
        let shared = sm.shared();

        let bind = |addr, what| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, what, source })
        };
        let raft_listener = bind(cfg.raft_listen, "raft").await?;
        let admin_listener = bind(cfg.admin_listen, "admin").await?;
        let ops_listener = match cfg.ops_listen {
            Some(addr) => Some(bind(addr, "ops").await?),
            None => None,
        };
        let ops_addr = ops_listener.as_ref().and_then(|l| l.local_addr().ok());
        let raft_addr = raft_listener
            .local_addr()
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let info = NodeInfo {
            raft_addr: cfg
                .advertise_raft
                .clone()
                .unwrap_or_else(|| raft_addr.to_string()),
            admin_addr: cfg
                .advertise_admin
                .clone()
                .unwrap_or_else(|| admin_addr.to_string()),
            incarnation: identity.incarnation.clone(),
        };

        let t = &cfg.tuning;
        let config = RaftConfig {
            cluster_name: "gatehouse".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            // openraft bounds each append RPC by the heartbeat interval; chunks get longer.
            install_snapshot_timeout: 5_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_every),
            max_in_snapshot_log_to_keep: t.keep_logs,
            snapshot_max_chunk_size: 1024 * 1024,
            max_payload_entries: 64,
            ..RaftConfig::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let tls = cfg
            .tls
            .clone()
            .map(NodeTls::load)
            .transpose()?
            .map(Arc::new);
        let channels = Channels::with_source_ip(cfg.peer_source_ip);
        if let Some(tls) = &tls {
            channels.set_tls(tls.client());
        }
        let network = Network {
            identity: identity.clone(),
            channels: channels.clone(),
        };
        let raft = Raft::new(cfg.node_id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let flush_tree = engine
            .tree("identity")
            .map_err(|e| storage(e.to_string()))?;
        let flush: FlushFn = Arc::new(move || {
            let tree = flush_tree.clone();
            async move { tree.flush().await.map_err(|e| e.to_string()) }.boxed()
        });

        if cfg.bootstrap
            && !raft
                .is_initialized()
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?
        {
            identity
                .found_cluster(&cfg.bootstrap_token_hash)
                .map_err(|e| StartError::Bootstrap(e.to_string()))?;
            flush().await.map_err(StartError::Bootstrap)?;
            raft.initialize(BTreeMap::from([(cfg.node_id, info.clone())]))
                .await
                .map_err(|e| StartError::Bootstrap(e.to_string()))?;
            tracing::info!(node_id = cfg.node_id, "initialized a new one-node cluster");
            if !await_bootstrap_stored(
                &raft,
                &shared,
                &identity,
                std::time::Duration::from_secs(10),
            )
            .await
            {
                tracing::warn!(
                    "the bootstrap admin token is not stored yet; it is accepted until it is"
                );
            }
        }

        let (shutdown, _) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let data_planes = Arc::new(Registry::default());
        let raft_service = RaftServer::new(RaftService {
            raft: raft.clone(),
            identity: identity.clone(),
            flush: flush.clone(),
            tls: tls.is_some(),
            data_planes: data_planes.clone(),
        })
        .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        let auth = Arc::new(Auth::new(
            shared.clone(),
            identity.clone(),
            cfg.bootstrap_token_hash.clone(),
            tls.is_some(),
        ));
        tokio::spawn(crate::network::count_cluster_data_planes(
            raft.clone(),
            identity.clone(),
            channels.clone(),
            data_planes.clone(),
            shutdown.subscribe(),
        ));
        let data_planes_for_ops = data_planes.clone();
        let metrics = Arc::new(crate::ops::Metrics::default());
        let stream_service = ConfigStreamServer::new(ConfigStreamService {
            node_id: cfg.node_id,
            sm: shared.clone(),
            registry: data_planes.clone(),
            heartbeat: std::time::Duration::from_secs(5),
            auth: auth.clone(),
            identity: identity.clone(),
            shutdown: shutdown.subscribe(),
        })
        .max_encoding_message_size(MAX_ADMIN_RESPONSE_BYTES);
        let admin_service = AdminServer::new(AdminService {
            data_planes,
            raft: raft.clone(),
            sm: shared.clone(),
            identity: identity.clone(),
            info: info.clone(),
            channels: channels.clone(),
            flush,
            auth,
            seal: cfg.secrets_key.clone(),
            metrics: metrics.clone(),
        })
        .max_decoding_message_size(MAX_ADMIN_REQUEST_BYTES)
        .max_encoding_message_size(MAX_ADMIN_RESPONSE_BYTES);
        let raft_server = tonic::transport::Server::builder().add_service(raft_service);
        let admin_server = tonic::transport::Server::builder()
            .layer(crate::ops::CountLayer(metrics.clone()))
            .add_service(admin_service)
            .add_service(stream_service);
        let servers = match &tls {
            None => vec![
                tokio::spawn(raft_server.serve_with_incoming_shutdown(
                    incoming(raft_listener),
                    stopped(shutdown.subscribe()),
                )),
                tokio::spawn(admin_server.serve_with_incoming_shutdown(
                    incoming(admin_listener),
                    stopped(shutdown.subscribe()),
                )),
            ],
            Some(tls) => vec![
                tokio::spawn(raft_server.serve_with_incoming_shutdown(
                    crate::tls::incoming(raft_listener, tls.raft.clone()),
                    stopped(shutdown.subscribe()),
                )),
                tokio::spawn(admin_server.serve_with_incoming_shutdown(
                    crate::tls::incoming(admin_listener, tls.admin.clone()),
                    stopped(shutdown.subscribe()),
                )),
                tokio::spawn(reload_tls(tls.clone(), channels, shutdown.subscribe())),
            ],
        };
        let servers = {
            let mut servers = servers;
            let shutdown_rx = shutdown.subscribe();
            let (raft2, metrics2) = (raft.clone(), metrics.clone());
            servers.push(tokio::spawn(async move {
                crate::ops::follow_raft(raft2, metrics2, shutdown_rx).await;
                Ok(())
            }));
            if let Some(listener) = ops_listener {
                let ops = Arc::new(crate::ops::Ops {
                    raft: raft.clone(),
                    metrics: metrics.clone(),
                    data_planes: data_planes_for_ops.clone(),
                });
                let shutdown_rx = shutdown.subscribe();
                servers.push(tokio::spawn(async move {
                    crate::ops::serve(listener, ops, shutdown_rx).await;
                    Ok(())
                }));
            }
            servers.push(tokio::spawn(store_bootstrap_token(
                raft.clone(),
                shared.clone(),
                identity.clone(),
                shutdown.subscribe(),
            )));
            servers
        };
        tracing::info!(node_id = cfg.node_id, %admin_addr, %raft_addr, "control plane node started");
        Ok(ControlPlane {
            node_id: cfg.node_id,
            admin_addr,
            raft_addr,
            ops_addr,
            raft,
            shared,
            shutdown,
            servers,
        })
    }

    /// Stops serving and shuts Raft down.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for server in self.servers {
            let _ = server.await;
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    }
}

/// On the leader of a cluster that holds no admin token yet, stores the
/// cluster's bootstrap token as admin token `bootstrap`, so that it can be
/// listed and revoked like any other. Ends once the cluster has a token.
async fn store_bootstrap_token(
    raft: Raft,
    shared: Arc<Shared>,
    identity: Arc<Identity>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    while !try_store_bootstrap(&raft, &shared, &identity).await {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
    Ok(())
}

/// One attempt: `true` once the cluster holds an admin token.
pub(crate) async fn try_store_bootstrap(raft: &Raft, shared: &Shared, identity: &Identity) -> bool {
    use gatehouse_model::object::{AdminRole, AdminToken};
    use gatehouse_model::{Command, Kind};
    if shared.read(|d| d.config.list(Kind::AdminToken).next().is_some()) {
        return true;
    }
    let leader = raft.metrics().borrow().current_leader == Some(identity.node_id);
    let Some(hash) = identity.bootstrap_hash().filter(|h| !h.is_empty()) else {
        return false;
    };
    if !leader {
        return false;
    }
    let token = AdminToken {
        name: crate::auth::BOOTSTRAP_TOKEN_NAME.to_string(),
        labels: Default::default(),
        revision: 0,
        role: AdminRole::Admin,
        token_hash: hash,
    };
    let mut cmd = Command::put(token.into(), Some(0));
    cmd.origin = Some(gatehouse_model::audit::Origin {
        actor: "system:bootstrap".to_string(),
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    });
    match raft.client_write(cmd).await {
        Ok(r) if r.data.is_ok() => {
            tracing::info!("stored the bootstrap admin token as admin_token \"bootstrap\"");
            true
        }
        Ok(r) => {
            tracing::debug!(result = ?r.data, "bootstrap token not stored");
            false
        }
        Err(e) => {
            tracing::debug!(error = %e, "bootstrap token not stored yet");
            false
        }
    }
}

/// Waits (up to `timeout`) until the cluster holds an admin token, storing the
/// bootstrap token when this node leads: a new cluster is then ready for the
/// first client, whose write cannot race the bootstrap token's.
pub(crate) async fn await_bootstrap_stored(
    raft: &Raft,
    shared: &Shared,
    identity: &Identity,
    timeout: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if try_store_bootstrap(raft, shared, identity).await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Loads the certificate files again when they change; new connections use
/// them, connections already open keep theirs.
async fn reload_tls(
    tls: Arc<NodeTls>,
    channels: Channels,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(crate::tls::RELOAD_EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
        match tls.reload_if_changed() {
            Ok(true) => {
                channels.set_tls(tls.client());
                tracing::info!("reloaded the TLS certificate files");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the TLS files changed but do not load; still using the previous ones")
            }
        }
    }
}
