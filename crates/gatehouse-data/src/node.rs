//! One data-plane node: the config stream, the proxy listener and the ops
//! listener, started and stopped together.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use gatehouse_model::ConfigState;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::client::{self, Apply, Update, WatchConfig};
use crate::compile::Compiled;
use crate::headers::ForwardedCache;
use crate::lkg;
use crate::mtls::PeerChain;
use crate::proxy::{Proxy, Shared};
use crate::resources::Limits;

/// What a data plane needs to start.
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    pub listen: SocketAddr,
    /// The TLS listener (certificates chosen by SNI from Certificate objects).
    pub tls_listen: Option<SocketAddr>,
    pub ops_listen: SocketAddr,
    /// Admin addresses of control-plane nodes to watch, tried in turn.
    pub control_planes: Vec<String>,
    /// The cluster this data plane must belong to (`--cluster-id`): it
    /// follows no control-plane node of another one, and refuses to start
    /// from a last-known-good file of another one. `None`: the cluster in
    /// the last-known-good file, or else the one of the first control-plane
    /// node it applies configuration from.
    pub cluster_id: Option<String>,
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
    /// The counter store of `scope: cluster` rate limits (none: counted per node).
    pub rate_limit_store: Option<crate::limits::store::StoreTarget>,
    /// TLS settings for a store reached through `rediss://` URLs.
    pub rate_limit_store_tls: crate::limits::store::StoreTls,
    /// How long one cluster rate-limit decision may take before the limit's
    /// `on_store_failure` applies.
    pub rate_limit_timeout: Duration,
    /// Connection, request and timing limits of the proxy listeners.
    pub limits: Limits,
    /// Where access-log lines go (`Off` by default).
    pub access_log: crate::access_log::AccessLogTarget,
    /// How JWKS key sets are fetched.
    pub jwks: crate::jwks::JwksSettings,
    /// Token introspection may use plain http to loopback (tests only).
    pub allow_insecure_idp_loopback: bool,
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
    #[error("{path}: the last-known-good configuration came from cluster {file}, but this data plane is pinned to cluster {pinned} (--cluster-id): correct the flag, or remove the file to start afresh from cluster {pinned}")]
    WrongCluster {
        path: PathBuf,
        file: String,
        pinned: String,
    },
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::OpenError),
}

/// Compiles each revision, swaps it in, and keeps it as last-known-good.
struct Applier {
    shared: Arc<Shared>,
    /// The newest applied state and its cluster, for the last-known-good writer.
    lkg: watch::Sender<Option<lkg::Saved>>,
    /// The cluster the configuration comes from, once known.
    cluster_id: std::sync::Mutex<Option<String>>,
}

/// After a last-known-good write that took `t`, the writer rests for
/// `LKG_REST_FACTOR * t` (at least [`LKG_MIN_REST`]) before the next: with a
/// large configuration and a steady trickle of changes it spends at most
/// about a fifth of its time (and of the disk) rewriting the file, and the
/// revisions that arrive meanwhile are coalesced into the next write.
const LKG_REST_FACTOR: u32 = 4;
const LKG_MIN_REST: Duration = Duration::from_millis(100);

/// Writes the newest applied state to the last-known-good file, off the
/// apply path: a large configuration takes a while to write, and only the
/// newest one matters. The watch channel keeps only the newest state, so
/// revisions applied during a write (or the rest after it) make one write.
async fn write_last_known_good(
    path: PathBuf,
    mut newest: watch::Receiver<Option<lkg::Saved>>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        // A revision that arrived during the rest is written even when
        // shutting down; otherwise wait for the next one.
        if !newest.has_changed().unwrap_or(false) {
            tokio::select! {
                changed = newest.changed() => if changed.is_err() { return },
                () = stopped(&mut shutdown) => return,
            }
        }
        let Some(saved) = newest.borrow_and_update().clone() else {
            continue;
        };
        let path = path.clone();
        let began = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || {
            lkg::write(&path, &saved.state, saved.cluster_id.as_deref())
        })
        .await
        {
            Ok(Ok(())) => {
                shared.metrics.lkg_writes.inc();
                shared
                    .metrics
                    .lkg_write_duration
                    .observe(began.elapsed().as_secs_f64());
            }
            // Serving goes on; only a restart without a control plane would miss it.
            Ok(Err(e)) => tracing::warn!(error = %e, "could not write the last-known-good file"),
            Err(e) => tracing::warn!(error = %e, "the last-known-good writer failed"),
        }
        let rest = (began.elapsed() * LKG_REST_FACTOR).max(LKG_MIN_REST);
        tokio::select! {
            () = tokio::time::sleep(rest) => {}
            () = stopped(&mut shutdown) => {}
        }
    }
}

impl Apply for Applier {
    fn apply(&self, state: &ConfigState, update: Update<'_>) -> Result<(), String> {
        let began = std::time::Instant::now();
        let current = self.shared.config.load_full();
        // A delta patches the revision being served only when that is the
        // one the delta starts from (it is not when that one failed to compile).
        let (compiled, kind) = match (update, current) {
            (
                Update::Delta {
                    from_revision,
                    changed,
                },
                Some(current),
            ) if current.revision == from_revision => (
                current.patch(state, changed, &self.shared).map(|c| {
                    let pools_changed = !Arc::ptr_eq(&c.pools, &current.pools);
                    (c, pools_changed)
                }),
                "delta",
            ),
            _ => (
                Compiled::build(state, &self.shared).map(|c| (c, true)),
                "full",
            ),
        };
        let (compiled, pools_changed) = match compiled {
            Ok(c) => c,
            Err(e) => {
                self.shared.metrics.config_apply_errors.inc();
                return Err(e);
            }
        };
        if pools_changed {
            self.shared.health.reconcile(compiled.health_targets());
        }
        let keys = compiled.credentials.key_count();
        self.shared.config.store(Some(Arc::new(compiled)));
        self.shared.unready_reason.store(None);
        let labels = crate::metrics::ApplyLabels { kind };
        self.shared
            .metrics
            .config_applies
            .get_or_create(&labels)
            .inc();
        self.shared
            .metrics
            .config_apply_duration
            .get_or_create(&labels)
            .observe(began.elapsed().as_secs_f64());
        self.shared
            .metrics
            .api_keys
            .set(i64::try_from(keys).unwrap_or(i64::MAX));
        self.shared.metrics.config_revision.set(state.revision());
        tracing::info!(revision = state.revision(), kind, took = ?began.elapsed(), "configuration applied");
        // O(1): the state is made of persistent maps.
        let cluster_id = self
            .cluster_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.lkg.send_replace(Some(lkg::Saved {
            state: state.clone(),
            cluster_id,
        }));
        Ok(())
    }

    fn cluster_learnt(&self, cluster_id: &str) {
        *self.cluster_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(cluster_id.to_string());
    }

    fn wrong_cluster(&self, message: &str) {
        self.shared.metrics.config_stream_wrong_cluster.inc();
        // /readyz says why when nothing is served yet (revision 0 is nothing).
        if self
            .shared
            .config
            .load()
            .as_ref()
            .is_none_or(|c| c.revision == 0)
        {
            self.shared
                .unready_reason
                .store(Some(Arc::new(message.to_string())));
        }
    }

    fn data_planes(&self, count: u64) {
        self.shared
            .cluster_limits
            .data_planes
            .store(count, std::sync::atomic::Ordering::Relaxed);
        self.shared
            .metrics
            .data_planes
            .set(i64::try_from(count).unwrap_or(i64::MAX));
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
        // The provider of TLS connections that take the process default
        // (the Redis client's); set once, the same as everywhere else.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = crate::metrics::Metrics::default();
        let store = match &cfg.rate_limit_store {
            Some(target) => Some(
                crate::limits::store::Store::start_tls(
                    target,
                    &cfg.rate_limit_store_tls,
                    cfg.rate_limit_timeout,
                    crate::limits::store::CallMetrics {
                        duration: metrics.redis_duration.clone(),
                        errors: metrics.redis_errors.clone(),
                    },
                )
                .map_err(|e| StartError::Config(format!("rate-limit store: {e}")))?,
            ),
            None => None,
        };
        let access_log = crate::access_log::AccessLog::start(
            &cfg.access_log,
            metrics.access_log_dropped.clone(),
        )?;
        let jwks = crate::jwks::JwksRegistry::new(cfg.jwks.clone(), metrics.jwks.clone())
            .map_err(StartError::Config)?;
        let shared = Arc::new(Shared {
            jwks,
            seal: cfg.secrets_key.clone(),
            cluster_limits: crate::limits::ClusterEnv {
                store,
                data_planes: Default::default(),
            },
            metrics,
            access_log,
            allow_insecure_idp_loopback: cfg.allow_insecure_idp_loopback,
            ..Shared::new(cfg.limits.clone())
        });
        let lkg_path = cfg.state_dir.join("last-known-good.json");
        let saved = lkg::read(&lkg_path);
        let file_cluster = saved
            .as_ref()
            .ok()
            .and_then(|s| s.as_ref())
            .and_then(|s| s.cluster_id.clone());
        let cluster_id = match (&cfg.cluster_id, file_cluster.clone()) {
            (Some(pinned), Some(file)) if *pinned != file => {
                return Err(StartError::WrongCluster {
                    path: lkg_path,
                    file,
                    pinned: pinned.clone(),
                })
            }
            (Some(pinned), _) => Some(pinned.clone()),
            (None, file) => file,
        };
        let (lkg_tx, lkg_rx) = watch::channel(None);
        let (shutdown, _) = watch::channel(false);
        let lkg_writer = tokio::spawn(write_last_known_good(
            lkg_path.clone(),
            lkg_rx,
            shared.clone(),
            shutdown.subscribe(),
        ));
        let applier = Arc::new(Applier {
            shared: shared.clone(),
            lkg: lkg_tx,
            // What the file says until a node of the cluster confirms it:
            // a pinned id is not written into a file no node has confirmed.
            cluster_id: std::sync::Mutex::new(file_cluster.clone()),
        });
        // Serve what we had until a control plane answers.
        let held = match saved {
            Ok(Some(lkg::Saved { state, .. })) => {
                match applier.apply(&state, Update::Full) {
                    Ok(()) => tracing::info!(
                        revision = state.revision(),
                        cluster_id = cluster_id.as_deref().unwrap_or("unknown"),
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

        let proxy = Proxy::new(shared.clone());
        let proxy_service = move |peer: SocketAddr, tls: bool, chain: Option<Arc<PeerChain>>| {
            let proxy = proxy.clone();
            let forwarded = Arc::new(ForwardedCache::default());
            service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                let proxy = proxy.clone();
                let forwarded = forwarded.clone();
                // The client certificate chain travels with each request of
                // its connection, for the policy to check.
                if let Some(chain) = &chain {
                    req.extensions_mut().insert(chain.clone());
                }
                async move { proxy.handle(req, peer, tls, &forwarded).await }
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
                Guard::proxy(&cfg.limits, &shared),
                shutdown.subscribe(),
                move |peer, chain| make(peer, true, chain),
            )));
        }
        tasks.push(tokio::spawn(serve(
            proxy_listener,
            None,
            Guard::proxy(&cfg.limits, &shared),
            shutdown.subscribe(),
            move |peer, _| proxy_service(peer, false, None),
        )));
        let ops_shared = shared.clone();
        tasks.push(tokio::spawn(serve(
            ops_listener,
            None,
            Guard::ops(&cfg.limits),
            shutdown.subscribe(),
            move |_peer, _| {
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
            cluster_id,
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
        // Leased tokens this node will not spend go back to the other data
        // planes (cost mode), each call bounded by the decision timeout and
        // all of them by a few seconds.
        if let Some(store) = &self.shared.cluster_limits.store {
            let (keys, tokens) = self
                .shared
                .limiters
                .give_back_leases(store, Duration::from_secs(5))
                .await;
            if tokens > 0 {
                tracing::info!(
                    keys,
                    tokens,
                    "gave leased rate-limit tokens back to the store"
                );
            }
        }
        // The drained requests' access-log lines are written before exit.
        if let Some(log) = &self.shared.access_log {
            log.drain(Duration::from_secs(5)).await;
        }
    }
}

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener enforces on its connections.
struct Guard {
    /// Its connection slots.
    slots: Arc<Semaphore>,
    max_connections: usize,
    refused: Option<Counter>,
    open: Option<Gauge>,
    builder: auto::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

impl Guard {
    fn new(limits: &Limits, max_connections: usize) -> Guard {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Slowloris: a request head must be complete within the timeout.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        // Per-connection concurrency, and rapid reset (CVE-2023-44487):
        // too many streams reset before they were served close the connection.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams);
        Guard {
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            refused: None,
            open: None,
            builder,
            header_read_timeout: limits.header_read_timeout,
        }
    }

    fn proxy(limits: &Limits, shared: &Shared) -> Guard {
        Guard {
            refused: Some(shared.metrics.connections_refused.clone()),
            open: Some(shared.metrics.connections_open.clone()),
            ..Guard::new(limits, limits.max_connections)
        }
    }

    /// The ops listener is for probes and scrapes: a few connections.
    fn ops(limits: &Limits) -> Guard {
        Guard::new(limits, 64)
    }
}

/// Signals `first` on a connection's first request.
#[derive(Clone)]
struct FirstRequest<S> {
    inner: S,
    first: Arc<Notify>,
}

impl<S, R> hyper::service::Service<R> for FirstRequest<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.first.notify_one();
        self.inner.call(req)
    }
}

/// Serves one connection: closes it when no request starts within the
/// header read timeout, and shuts it down gracefully (a GOAWAY for HTTP/2)
/// when the listener stops.
async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    builder: auto::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    stop: Arc<Stop>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let first = Arc::new(Notify::new());
    let service = FirstRequest {
        inner: service,
        first: first.clone(),
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let idle_at_start = tokio::time::timeout(header_read_timeout, first.notified());
    let mut stopping = stop.wait();
    let result = tokio::select! {
        result = conn.as_mut() => Some(result),
        () = &mut stopping => None,
        waited = idle_at_start => match waited {
            Ok(()) => tokio::select! {
                result = conn.as_mut() => Some(result),
                () = &mut stopping => None,
            },
            Err(_) => {
                // Nothing arrived that makes a request (a slow or silent
                // client, any protocol): let it go, with a GOAWAY for HTTP/2.
                tracing::debug!("no request within the header read timeout");
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(header_read_timeout, conn.as_mut()).await;
                return;
            }
        },
    };
    let result = match result {
        Some(result) => result,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Serves one client connection on `io` exactly as the plaintext proxy
/// listener does (its HTTP settings, limits and pipeline), with `shared`'s
/// revision, until the client is done. For in-memory tests and the fuzz
/// target that sends raw bytes through the whole pipeline.
pub async fn serve_proxy_connection<I>(shared: Arc<Shared>, io: I, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let guard = Guard::proxy(&shared.limits, &shared);
    let proxy = Proxy::new(shared.clone());
    let forwarded = Arc::new(ForwardedCache::default());
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        let forwarded = forwarded.clone();
        async move { proxy.handle(req, peer, false, &forwarded).await }
    });
    // Never stopped: the connection runs until the client is done.
    serve_connection(
        TokioIo::new(io),
        service,
        guard.builder.clone(),
        guard.header_read_timeout,
        Arc::new(Stop::default()),
    )
    .await;
}

/// Accepts connections (through TLS when given an acceptor) until shutdown,
/// within the guard's connection cap, then drains them gracefully.
async fn serve<F, S, B>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    guard: Guard,
    mut shutdown: watch::Receiver<bool>,
    make: F,
) where
    F: Fn(SocketAddr, Option<Arc<PeerChain>>) -> S + Send + Sync + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let make = Arc::new(make);
    let stop = Arc::new(Stop::default());
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
                // At the cap, close at once: a queue of waiting connections
                // would only grow under the load that filled it.
                let Ok(slot) = guard.slots.clone().try_acquire_owned() else {
                    if let Some(refused) = &guard.refused {
                        refused.inc();
                    }
                    tracing::debug!(%peer, "connection refused: at the connection cap");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let make = make.clone();
                let (builder, tls, stop) = (guard.builder.clone(), tls.clone(), stop.clone());
                let (timeout, open) = (guard.header_read_timeout, guard.open.clone());
                tokio::spawn(async move {
                    if let Some(open) = &open {
                        open.inc();
                    }
                    match tls {
                        None => serve_connection(TokioIo::new(stream), make(peer, None), builder, timeout, stop).await,
                        Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                let service = make(peer, PeerChain::of(s.get_ref().1));
                                serve_connection(TokioIo::new(s), service, builder, timeout, stop).await
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        },
                    }
                    if let Some(open) = &open {
                        open.dec();
                    }
                    drop(slot);
                });
            }
            () = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    stop.trigger();
    // Every connection holds a slot until it ends: having them all back
    // means every connection has drained.
    let all = u32::try_from(guard.max_connections).unwrap_or(u32::MAX);
    let _ = guard.slots.acquire_many(all).await;
}

/// Tells a listener's connections to finish, once, when the listener
/// stops. A connection looks at it on every wake-up, so looking is one
/// atomic load (a `watch` receiver takes a lock each time).
#[derive(Debug, Default)]
struct Stop {
    stopped: AtomicBool,
    notify: Arc<Notify>,
}

impl Stop {
    fn trigger(&self) {
        self.stopped.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn wait(self: &Arc<Self>) -> Stopping {
        Stopping {
            stop: self.clone(),
            notified: Box::pin(self.notify.clone().notified_owned()),
            registered: None,
        }
    }
}

/// Resolves once its [`Stop`] is triggered.
struct Stopping {
    stop: Arc<Stop>,
    notified: Pin<Box<OwnedNotified>>,
    /// The waker the notification will wake, once registered.
    registered: Option<Waker>,
}

impl Future for Stopping {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.stop.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        // Already registered with this task's waker: nothing to renew.
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        if this.notified.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.registered = Some(cx.waker().clone());
        // Triggered between the first look and the registration.
        if this.stop.stopped.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection waiting on its listener's stop wakes when the listener
    /// stops, however often it was polled before; one accepted after the
    /// stop sees it at once.
    #[tokio::test]
    async fn a_stop_reaches_connections_waiting_before_and_after_it() {
        let stop = Arc::new(Stop::default());
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let mut stopping = stop.wait();
                tokio::spawn(async move {
                    // Woken for other reasons first, as a connection is.
                    for _ in 0..5 {
                        tokio::select! {
                            biased;
                            () = &mut stopping => return true,
                            () = tokio::task::yield_now() => {}
                        }
                    }
                    (&mut stopping).await;
                    true
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            waiting.iter().all(|w| !w.is_finished()),
            "nothing stopped yet"
        );
        stop.trigger();
        for w in waiting {
            let done = tokio::time::timeout(Duration::from_secs(5), w).await;
            assert!(
                matches!(done, Ok(Ok(true))),
                "a waiting connection saw the stop"
            );
        }
        let late = tokio::time::timeout(Duration::from_secs(5), stop.wait()).await;
        assert!(late.is_ok(), "a connection accepted after the stop sees it");
    }
}
