//! A control-plane node's ops listener: `/healthz` (the process is up),
//! `/readyz` (a member of a cluster that has a leader) and `/metrics`
//! (Raft, writes, the admin API and the data planes watching this node).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::stream::Registry as DataPlanes;
use crate::types::Raft;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The gRPC method, e.g. `Put`.
    pub method: String,
    /// The gRPC status code name, e.g. `OK` or `PermissionDenied`.
    pub code: String,
}

/// What a node measures.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub term: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub last_log_index: Gauge,
    pub last_applied: Gauge,
    pub apply_lag: Gauge,
    pub config_revision: Gauge,
    pub data_planes: Gauge,
    /// From proposing a write to its result, on the leader.
    pub commit_seconds: Histogram,
    pub admin_requests: Family<RequestLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gatehouse_cp");
        let m = Metrics {
            term: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            last_log_index: Gauge::default(),
            last_applied: Gauge::default(),
            apply_lag: Gauge::default(),
            config_revision: Gauge::default(),
            data_planes: Gauge::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            admin_requests: Family::default(),
            registry: Registry::default(),
        };
        registry.register("raft_term", "The current Raft term", m.term.clone());
        registry.register("raft_is_leader", "1 on the leader", m.is_leader.clone());
        registry.register(
            "raft_leader_changes",
            "Times this node saw the leader change",
            m.leader_changes.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "The last index in this node's log",
            m.last_log_index.clone(),
        );
        registry.register(
            "raft_last_applied",
            "The last index this node applied",
            m.last_applied.clone(),
        );
        registry.register(
            "raft_apply_lag",
            "Log entries this node has not applied yet",
            m.apply_lag.clone(),
        );
        registry.register(
            "config_revision",
            "The configuration revision this node holds",
            m.config_revision.clone(),
        );
        registry.register(
            "data_planes_connected",
            "Data planes watching this node's config stream",
            m.data_planes.clone(),
        );
        registry.register(
            "write_commit_seconds",
            "From proposing a write to its result, on the leader",
            m.commit_seconds.clone(),
        );
        registry.register(
            "admin_requests",
            "Admin API and config-stream calls by method and gRPC code",
            m.admin_requests.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self, data_planes: &DataPlanes) -> String {
        self.data_planes.set(data_planes.len() as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Follows Raft's metrics into the gauges, counting leader changes.
pub async fn follow_raft(raft: Raft, metrics: Arc<Metrics>, mut shutdown: watch::Receiver<bool>) {
    let mut rx = raft.metrics();
    let mut leader = None;
    loop {
        {
            let m = rx.borrow_and_update().clone();
            metrics.term.set(m.current_term as i64);
            metrics
                .is_leader
                .set(i64::from(m.current_leader == Some(m.id)));
            if m.current_leader.is_some() && m.current_leader != leader {
                if leader.is_some() {
                    metrics.leader_changes.inc();
                }
                leader = m.current_leader;
            }
            let last = m.last_log_index.unwrap_or_default();
            let applied = m.last_applied.map(|l| l.index).unwrap_or_default();
            metrics.last_log_index.set(last as i64);
            metrics.last_applied.set(applied as i64);
            metrics.apply_lag.set(last.saturating_sub(applied) as i64);
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Counts admin calls by method and answer code: a tower layer on the gRPC server.
#[derive(Clone)]
pub struct CountLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for CountLayer {
    type Service = Count<S>;
    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Count<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

impl<S, B, RB> tower::Service<Request<B>> for Count<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // An error answer carries its status in the headers (trailers-only);
            // a streamed or successful one says OK here.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from_i32);
            metrics
                .admin_requests
                .get_or_create(&RequestLabels {
                    method,
                    code: code_name(code),
                })
                .inc();
            Ok(resp)
        })
    }
}

/// Times one proposal.
pub struct CommitTimer<'a>(&'a Metrics, Instant);

impl<'a> CommitTimer<'a> {
    pub fn start(metrics: &'a Metrics) -> Self {
        CommitTimer(metrics, Instant::now())
    }
}

impl Drop for CommitTimer<'_> {
    fn drop(&mut self) {
        self.0
            .commit_seconds
            .observe(self.1.elapsed().as_secs_f64());
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// What the ops listener reads.
pub struct Ops {
    pub raft: Raft,
    pub metrics: Arc<Metrics>,
    pub data_planes: Arc<DataPlanes>,
}

fn handle(ops: &Ops, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let plain = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, plain, "ok\n".into()),
        "/readyz" => {
            let m = ops.raft.metrics().borrow().clone();
            let member = m.membership_config.membership().get_node(&m.id).is_some();
            match (&m.running_state, member, m.current_leader) {
                (Err(e), _, _) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    format!("not ready: raft stopped: {e}\n"),
                ),
                (Ok(()), false, _) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    "not ready: not a member of any cluster yet\n".into(),
                ),
                (Ok(()), true, None) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    "not ready: no leader known\n".into(),
                ),
                (Ok(()), true, Some(leader)) => text(
                    StatusCode::OK,
                    plain,
                    format!("ready: term {}, leader {leader}\n", m.current_term),
                ),
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ops.metrics.encode(&ops.data_planes),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            plain,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

/// Serves the ops listener until `shutdown`.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let ops = ops.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&ops, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
