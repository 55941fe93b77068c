//! The request path: one compiled revision per request, the stages in order,
//! and the upstream call.
//!
//! ```text
//! load the revision (arc-swap)        -> 503 not ready when none was applied yet
//! route (host, path, method)          -> 404 / 405
//! pick a target of the upstream       -> 503 when none can take it
//! rewrite: hop-by-hop headers out, X-Forwarded-* and Forwarded rebuilt,
//!          traceparent kept or started, strip_prefix applied
//! call the upstream with its timeout  -> 502 (connect, protocol) / 504 (timeout)
//! response: hop-by-hop headers out; WebSocket upgrades spliced through
//! metrics: requests by route and status, latency by route
//! access log and spans: see `observe` (one span per stage above)
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use gatehouse_model::object::UpstreamProtocol;
use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::compile::Compiled;
use crate::headers::{self, ClientInfo, HopByHop, Trust};
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::observe::{RequestContext, Stage};
use crate::problem::Reject;
use crate::router::Match;

/// The body type of every response the proxy sends, and of the requests it
/// makes (so a retry can send an empty body of the same type).
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Errors of bodies: hyper's, or a body size cap's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether an upstream call failed because the request body broke its cap.
fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// What every request reads: the revision being served and the metrics.
#[derive(Debug, Default)]
pub struct Shared {
    pub config: ArcSwapOption<Compiled>,
    pub metrics: Metrics,
    /// Why the data plane cannot serve yet (e.g. a corrupt last-known-good file).
    pub unready_reason: ArcSwapOption<String>,
    /// Target health, across revisions.
    pub health: crate::health::HealthRegistry,
    /// Upstream clients (and their warm connections), across revisions.
    pub clients: crate::upstream::ClientCache,
    /// Rate-limit counters, across revisions.
    pub limiters: crate::limits::LimiterRegistry,
    /// Opens sealed key material when a revision is compiled.
    pub seal: Option<gatehouse_model::seal::SealKey>,
    /// Where access-log lines go, when on.
    pub access_log: Option<crate::access_log::AccessLog>,
}

/// The route a request went to, for its metrics.
type RouteTag = (
    Arc<String>,
    prometheus_client::metrics::histogram::Histogram,
);

/// The proxy: its shared state, and the label of requests no route matched.
#[derive(Clone, Debug)]
pub struct Proxy {
    pub shared: Arc<Shared>,
    none: Arc<String>,
}

fn reject(r: &Reject) -> Response<ProxyBody> {
    r.response(None, None)
        .map(|b| b.map_err(|never| match never {}).boxed())
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Proxy {
        Proxy {
            shared,
            none: Arc::new("none".to_string()),
        }
    }

    /// Serves one request from a client at `peer`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let log = self.shared.access_log.as_ref();
        let mut observed = RequestContext::new(&req, peer.ip(), log.is_some());
        let (route, response) = self.serve(req, peer, tls, &mut observed).await;
        let elapsed = start.elapsed().as_secs_f64();
        let m = &self.shared.metrics;
        let route = match route {
            Some((name, latency)) => {
                latency.observe(elapsed);
                name
            }
            None => {
                let name = self.none.clone();
                m.latency
                    .get_or_create(&RouteLabels {
                        route: name.clone(),
                    })
                    .observe(elapsed);
                name
            }
        };
        m.requests
            .get_or_create(&RequestLabels {
                route,
                status: response.status().as_u16(),
            })
            .inc();
        Ok(observed.finish(response, log))
    }

    async fn serve(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
        observed: &mut RequestContext,
    ) -> (Option<RouteTag>, Response<ProxyBody>) {
        // Nothing reads a request whose framing two servers could disagree on.
        if crate::framing::check(&req).is_err() {
            // Close the connection too: what follows an ambiguous frame
            // cannot be trusted as the start of a next request.
            let mut response = reject(&Reject::BadRequest);
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return (None, response);
        }
        // One revision from start to end of the request.
        let Some(config) = self.shared.config.load_full() else {
            return (None, reject(&Reject::NotReady));
        };
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host())
            .unwrap_or("")
            .to_string();
        observed.stage(Stage::Route);
        // Route on the canonical path and forward that same path, so no
        // encoded or dotted variant reaches a route it should not.
        let canonical = match crate::path::canonicalize(req.uri().path()) {
            Ok(p) => p.into_owned(),
            Err(_) => return (None, reject(&Reject::BadRequest)),
        };
        observed.path(&canonical);
        let found = match config
            .router
            .route(&host, &canonical, req.method().as_str())
        {
            Match::Found(m) => m,
            Match::NotFound => return (None, reject(&Reject::NoRoute)),
            Match::MethodNotAllowed { allowed } => {
                return (None, reject(&Reject::method_not_allowed(allowed)))
            }
        };
        let route = &config.routes[found.route];
        let name = Some((route.name.clone(), route.latency.clone()));
        observed.route(&route.name);
        // The client's protocol version, whatever the upstream spoke.
        let version = req.version();

        // The policy's firewall, with the client address its trusted proxies give.
        observed.stage(Stage::Firewall);
        let trust = route.policy.as_ref().map(|p| &p.firewall.trust);
        let client_ip = match trust {
            Some(t) => headers::client_ip(req.headers(), peer.ip(), t),
            None => peer.ip().to_canonical(),
        };
        observed.client_ip(client_ip);
        if let Some(policy) = &route.policy {
            if let Err(r) = policy
                .firewall
                .check(client_ip, req.method(), req.headers())
            {
                return (name, reject(&r));
            }
        }

        // Authenticate and authorise by the route's policy; the body has
        // not been read, so a refused request costs no upload.
        observed.stage(Stage::Auth);
        let consumer = match &route.policy {
            None => None,
            Some(policy) => match policy.authenticate(
                &config.credentials,
                req.headers(),
                req.uri().query(),
                std::time::SystemTime::now(),
            ) {
                Ok(c) => c,
                Err(r) => return (name, reject(&r)),
            },
        };

        observed.consumer(consumer.as_ref());

        // Count the request against the policy's limits.
        observed.stage(Stage::RateLimit);
        let limited = route.policy.as_ref().and_then(|policy| {
            crate::limits::check(
                &policy.limits,
                &crate::limits::LimitContext {
                    consumer: consumer.as_deref().map(|c| c.name.as_str()),
                    client_ip,
                    route: &route.name,
                    headers: req.headers(),
                },
            )
        });
        if let Some(decision) = &limited {
            observed.limit(decision.retry_after.is_none());
            if let Some(wait) = decision.retry_after {
                let mut response = reject(&Reject::TooManyRequests {
                    retry_after_secs: wait.as_secs(),
                });
                for (name, value) in &decision.headers {
                    response.headers_mut().insert(name.clone(), value.clone());
                }
                return (name, response);
            }
        }

        observed.stage(Stage::Rewrite);
        let path = if route.strip_prefix {
            found.stripped(&canonical)
        } else {
            &canonical
        };
        // The credential never travels on to the upstream.
        let original_query = req.uri().query().map(str::to_string);
        let query = match &route.policy {
            Some(policy) => policy
                .strip_credentials(req.headers_mut(), original_query.as_deref())
                .map(|q| q.into_owned()),
            None => original_query,
        };
        let path_and_query = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let Ok(path_and_query) = http::uri::PathAndQuery::try_from(path_and_query) else {
            return (name, reject(&Reject::BadRequest));
        };
        let downstream_upgrade =
            headers::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, HopByHop::KeepUpgrade);
        let client = ClientInfo {
            peer: peer.ip(),
            scheme: if tls { "https" } else { "http" },
            host: (!host.is_empty()).then_some(host),
        };
        let no_trust = Trust::default();
        headers::set_forwarded(&mut parts.headers, &client, trust.unwrap_or(&no_trust));
        crate::auth::identity_headers(&mut parts.headers, consumer.as_deref());
        observed.trace_id(headers::ensure_traceparent(&mut parts.headers));
        let http2 = route.upstream.protocol == UpstreamProtocol::Http2;
        parts.version = if http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        route.upstream.count_request();

        // Retry only what cannot have reached an upstream twice: requests
        // without a body, idempotent ones, and only after a connect failure.
        let replayable = hyper::body::Body::is_end_stream(&body)
            && (is_idempotent(&parts.method) || route.upstream.retry_non_idempotent);
        let attempts = if replayable {
            1 + route.upstream.retries
        } else {
            1
        };
        let mut tried = Vec::new();
        // A body cap is enforced while streaming too, not only from Content-Length.
        let cap = route
            .policy
            .as_ref()
            .and_then(|p| p.firewall.max_body_bytes);
        let mut body = Some(match cap {
            Some(cap) => {
                http_body_util::Limited::new(body, usize::try_from(cap).unwrap_or(usize::MAX))
                    .boxed()
            }
            None => body.map_err(BoxError::from).boxed(),
        });
        let mut last = Reject::UpstreamUnavailable;
        for attempt in 0..attempts {
            if attempt > 0 && !route.upstream.take_retry() {
                break;
            }
            let Some(target) = route.upstream.pick(&parts.headers, &tried) else {
                break;
            };
            tried.push(target.index());
            let mut uri_parts = http::uri::Parts::default();
            uri_parts.scheme = Some(http::uri::Scheme::HTTP);
            uri_parts.authority = Some(target.target().authority.clone());
            uri_parts.path_and_query = Some(path_and_query.clone());
            let Ok(uri) = Uri::from_parts(uri_parts) else {
                return (name, reject(&Reject::BadRequest));
            };
            let mut upstream_req = Request::from_parts(parts.clone(), ());
            *upstream_req.uri_mut() = uri;
            // HTTP/2 carries the authority in the URI; HTTP/1.1 needs Host.
            if http2 {
                upstream_req.headers_mut().remove(HOST);
            } else {
                upstream_req
                    .headers_mut()
                    .insert(HOST, target.target().host_header.clone());
            }
            // A replay has an empty body: only bodiless requests are replayed.
            let attempt_body = body.take().unwrap_or_else(|| {
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed()
            });
            observed.stage(Stage::Upstream);
            observed.propagate(upstream_req.headers_mut());
            let upstream_req = upstream_req.map(|()| attempt_body);
            let call = route.upstream.client.request(upstream_req);
            let health = &target.target().health;
            match tokio::time::timeout(route.upstream.request_timeout, call).await {
                Err(_) => {
                    health.record_failure(route.upstream.eject_after, route.upstream.eject_for);
                    return (name, reject(&Reject::GatewayTimeout));
                }
                Ok(Ok(mut resp)) => {
                    health.record_success();
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        let upgraded =
                            headers::strip_hop_by_hop(resp.headers_mut(), HopByHop::KeepUpgrade);
                        match downstream_upgrade {
                            Some(downstream) if upgraded => {
                                let upstream = hyper::upgrade::on(&mut resp);
                                tokio::spawn(splice(downstream, upstream));
                            }
                            // A 101 nobody asked for cannot be relayed.
                            _ => return (name, reject(&Reject::BadGateway)),
                        }
                    } else {
                        headers::strip_hop_by_hop(resp.headers_mut(), HopByHop::Strip);
                    }
                    drop(target);
                    *resp.version_mut() = version;
                    if let Some(decision) = &limited {
                        for (name, value) in &decision.headers {
                            resp.headers_mut().insert(name.clone(), value.clone());
                        }
                    }
                    return (name, resp.map(|b| b.map_err(BoxError::from).boxed()));
                }
                Ok(Err(e)) => {
                    if body_too_large(&e) {
                        return (name, reject(&Reject::PayloadTooLarge));
                    }
                    let connect = e.is_connect();
                    health.record_failure(route.upstream.eject_after, route.upstream.eject_for);
                    tracing::debug!(upstream = %route.upstream.name, error = %e, "upstream call failed");
                    last = Reject::BadGateway;
                    if !connect {
                        return (name, reject(&last));
                    }
                }
            }
        }
        (name, reject(&last))
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection.
async fn splice(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
        tracing::debug!("upgrade did not complete on both sides");
        return;
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection closed with an error");
    }
}
