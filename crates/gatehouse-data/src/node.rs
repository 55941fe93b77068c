//! One data-plane node: the config stream, the proxy listener and the ops
//! listener, started and stopped together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_model::ConfigState;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{self, Apply, WatchConfig};
use crate::compile::Compiled;
use crate::lkg;
use crate::proxy::{Proxy, Shared};

/// What a data plane needs to start.
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    pub listen: SocketAddr,
    /// The TLS listener (certificates chosen by SNI from Certificate objects).
    pub tls_listen: Option<SocketAddr>,
    pub ops_listen: SocketAddr,
    /// Admin addresses of control-plane nodes to watch, tried in turn.
    pub control_planes: Vec<String>,
    pub node_name: String,
    /// Where the last-known-good configuration is kept.
    pub state_dir: PathBuf,
    /// The token the config stream is watched with (role `data_plane`);
    /// with mutual TLS the certificate is the credential instead.
    pub token: gatehouse_proto::BearerToken,
    /// Mutual TLS to the control plane.
    pub control_plane_tls: Option<gatehouse_proto::tls::ClientTlsFiles>,
    /// Opens sealed key material (Certificate private keys, HMAC secrets).
    pub secrets_key: Option<gatehouse_model::seal::SealKey>,
    /// Where access-log lines go (`Off` by default).
    pub access_log: crate::access_log::AccessLogTarget,
}

/// Why a data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::OpenError),
}

/// Compiles each revision, swaps it in, and keeps it as last-known-good.
struct Applier {
    shared: Arc<Shared>,
    /// The newest applied state, for the last-known-good writer.
    lkg: watch::Sender<Option<ConfigState>>,
}

/// Writes the newest applied state to the last-known-good file, off the
/// apply path: a large configuration takes a while to write, and only the
/// newest one matters.
async fn write_last_known_good(path: PathBuf, mut newest: watch::Receiver<Option<ConfigState>>) {
    while newest.changed().await.is_ok() {
        let Some(state) = newest.borrow_and_update().clone() else {
            continue;
        };
        let path = path.clone();
        match tokio::task::spawn_blocking(move || lkg::write(&path, &state)).await {
            Ok(Ok(())) => {}
            // Serving goes on; only a restart without a control plane would miss it.
            Ok(Err(e)) => tracing::warn!(error = %e, "could not write the last-known-good file"),
            Err(e) => tracing::warn!(error = %e, "the last-known-good writer failed"),
        }
    }
}

impl Apply for Applier {
    fn apply(&self, state: &ConfigState) -> Result<(), String> {
        let compiled = match Compiled::build(state, &self.shared) {
            Ok(c) => c,
            Err(e) => {
                self.shared.metrics.config_apply_errors.inc();
                return Err(e);
            }
        };
        self.shared.health.reconcile(compiled.health_targets());
        self.shared.config.store(Some(Arc::new(compiled)));
        self.shared.unready_reason.store(None);
        self.shared.metrics.config_revision.set(state.revision());
        tracing::info!(revision = state.revision(), "configuration applied");
        // O(1): the state is made of persistent maps.
        self.lkg.send_replace(Some(state.clone()));
        Ok(())
    }

    fn stream_state(&self, connected: bool) {
        self.shared
            .metrics
            .config_stream_connected
            .set(i64::from(connected));
    }
}

/// A running data plane.
pub struct DataPlane {
    pub proxy_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub ops_addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl DataPlane {
    pub async fn start(cfg: DataPlaneConfig) -> Result<DataPlane, StartError> {
        let metrics = crate::metrics::Metrics::default();
        let access_log = crate::access_log::AccessLog::start(
            &cfg.access_log,
            metrics.access_log_dropped.clone(),
        )?;
        let shared = Arc::new(Shared {
            seal: cfg.secrets_key.clone(),
            metrics,
            access_log,
            ..Shared::default()
        });
        let lkg_path = cfg.state_dir.join("last-known-good.json");
        let (lkg_tx, lkg_rx) = watch::channel(None);
        let lkg_writer = tokio::spawn(write_last_known_good(lkg_path.clone(), lkg_rx));
        let applier = Arc::new(Applier {
            shared: shared.clone(),
            lkg: lkg_tx,
        });
        // Serve what we had until a control plane answers.
        let held = match lkg::read(&lkg_path) {
            Ok(Some(state)) => {
                match applier.apply(&state) {
                    Ok(()) => tracing::info!(
                        revision = state.revision(),
                        "serving the last-known-good configuration"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "the last-known-good configuration does not compile")
                    }
                }
                Some(state)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "not serving until a control plane sends a configuration");
                shared.unready_reason.store(Some(Arc::new(e.to_string())));
                None
            }
        };

        let bind = |addr, what| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, what, source })
        };
        let proxy_listener = bind(cfg.listen, "proxy").await?;
        let ops_listener = bind(cfg.ops_listen, "ops").await?;
        let tls_listener = match cfg.tls_listen {
            Some(addr) => Some(bind(addr, "tls").await?),
            None => None,
        };
        let local = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| StartError::Config(e.to_string()))
        };
        let proxy_addr = local(&proxy_listener)?;
        let ops_addr = local(&ops_listener)?;
        let tls_addr = tls_listener.as_ref().map(local).transpose()?;

        let (shutdown, _) = watch::channel(false);
        let proxy = Proxy::new(shared.clone());
        let proxy_service = move |peer: SocketAddr, tls: bool| {
            let proxy = proxy.clone();
            service_fn(move |req| {
                let proxy = proxy.clone();
                async move { proxy.handle(req, peer, tls).await }
            })
        };
        let mut tasks = vec![lkg_writer];
        // Idle rate-limit keys are forgotten, bounding their memory.
        let evict_shared = shared.clone();
        let mut evict_stop = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(30)) => evict_shared.limiters.evict_idle(),
                    () = stopped(&mut evict_stop) => return,
                }
            }
        }));
        if let Some(listener) = tls_listener {
            let config = crate::tls::server_config(shared.clone()).map_err(StartError::Config)?;
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let make = proxy_service.clone();
            tasks.push(tokio::spawn(serve(
                listener,
                Some(acceptor),
                shutdown.subscribe(),
                move |peer| make(peer, true),
            )));
        }
        tasks.push(tokio::spawn(serve(
            proxy_listener,
            None,
            shutdown.subscribe(),
            move |peer| proxy_service(peer, false),
        )));
        let ops_shared = shared.clone();
        tasks.push(tokio::spawn(serve(
            ops_listener,
            None,
            shutdown.subscribe(),
            move |_peer| {
                let shared = ops_shared.clone();
                service_fn(move |req| crate::ops::handle(shared.clone(), req))
            },
        )));
        let watch_cfg = WatchConfig {
            endpoints: cfg.control_planes.clone(),
            node_name: cfg.node_name.clone(),
            token: cfg.token.clone(),
            tls: cfg
                .control_plane_tls
                .as_ref()
                .map(|files| files.load())
                .transpose()
                .map_err(|e| StartError::Config(format!("control-plane TLS: {e}")))?,
            idle_timeout: Duration::from_secs(15),
            max_backoff: Duration::from_secs(5),
        };
        tasks.push(tokio::spawn(client::watch(
            watch_cfg,
            held,
            applier,
            shutdown.subscribe(),
        )));
        tracing::info!(%proxy_addr, ?tls_addr, %ops_addr, node_name = %cfg.node_name, "data plane started");
        Ok(DataPlane {
            proxy_addr,
            tls_addr,
            ops_addr,
            shared,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, lets requests in flight finish for up to `drain`
    /// (HTTP/2 connections get a GOAWAY), then stops.
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.shutdown.send(true);
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(drain, all).await.is_err() {
            tracing::warn!(?drain, "requests still in flight after the drain deadline");
        }
        // The drained requests' access-log lines are written before exit.
        if let Some(log) = &self.shared.access_log {
            log.drain(Duration::from_secs(5)).await;
        }
    }
}

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections (through TLS when given an acceptor) until shutdown,
/// then drains them gracefully.
async fn serve<F, S, B>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    make: F,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = make(peer);
                let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
                tokio::spawn(async move {
                    let result = match tls {
                        None => {
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Some(acceptor) => {
                            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
