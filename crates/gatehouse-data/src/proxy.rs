//! The request path: one compiled revision per request, the stages in order,
//! and the upstream call.
//!
//! ```text
//! take a slot of the in-flight cap    -> 503 overloaded when none is free
//! load the revision (arc-swap)        -> 503 not ready when none was applied yet
//! canonicalise the path, route        -> 400 / 404 / 405 (a CORS preflight
//!   (host, path, method)                  is routed by the method it asks about)
//! firewall: addresses, methods, sizes,
//!   user agents, injection rules       -> 403 / 405 / 413 / 431
//! CORS preflight answered here         -> 204, or 403 for a disallowed origin
//! authenticate, authorise, rate limit  -> 401 / 403 / 429
//! injection rules on the body's start  -> 403 (408 / 413 when reading it fails)
//! pick a target of the upstream       -> 503 when none can take it
//! rewrite: hop-by-hop headers out, X-Forwarded-* and Forwarded rebuilt,
//!          traceparent kept or started, strip_prefix applied
//! rate limits (local, or Redis for cluster) -> 429 / 503 when a closed limit's store fails
//! call the upstream with its timeout  -> 502 (connect, protocol) / 504 (timeout)
//! response: hop-by-hop headers out; WebSocket upgrades spliced through
//! CORS headers on the response of a CORS route
//! metrics: requests by route and status, latency by route
//! access log and spans: see `observe` (one span per stage above)
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use gatehouse_model::object::UpstreamProtocol;
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::auth::CompiledPolicy;
use crate::compile::Compiled;
use crate::headers::{self, ClientInfo, ForwardedCache, HopByHop, Trust};
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::observe::{RequestContext, Stage};
use crate::problem::Reject;
use crate::resources::{caused_by, BodyTimedOut, Limits, TimeoutBody};
use crate::router::Match;
use tokio::sync::Semaphore;

/// The body type of every response the proxy sends, and of the requests it
/// makes (so a retry can send an empty body of the same type).
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Errors of bodies: hyper's, or a body size cap's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every request reads: the revision being served and the metrics.
#[derive(Debug)]
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
    /// The counter store of cluster limits and the data-plane count.
    pub cluster_limits: crate::limits::ClusterEnv,
    /// Connection, request and timing limits.
    pub limits: Limits,
    /// One permit per request being served (`limits.max_requests_in_flight`).
    pub in_flight: Arc<Semaphore>,
    /// Where access-log lines go, when on.
    pub access_log: Option<crate::access_log::AccessLog>,
    /// The key sets of JWKS issuers, across revisions.
    pub jwks: crate::jwks::JwksRegistry,
    /// Token introspection endpoints may be plain http on loopback (tests).
    pub allow_insecure_idp_loopback: bool,
}

impl Shared {
    pub fn new(limits: Limits) -> Shared {
        let metrics = Metrics::default();
        Shared {
            config: ArcSwapOption::default(),
            jwks: crate::jwks::JwksRegistry::with_metrics(metrics.jwks.clone()),
            metrics,
            unready_reason: ArcSwapOption::default(),
            health: Default::default(),
            clients: Default::default(),
            limiters: Default::default(),
            seal: None,
            cluster_limits: Default::default(),
            access_log: None,
            allow_insecure_idp_loopback: false,
            in_flight: Arc::new(Semaphore::new(limits.max_requests_in_flight)),
            limits,
        }
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new(Limits::default())
    }
}

/// The route a request went to, for its metrics, and the CORS rules its
/// response gets (with the request's `Origin`).
struct RouteTag {
    name: Arc<String>,
    latency: prometheus_client::metrics::histogram::Histogram,
    ok: prometheus_client::metrics::counter::Counter,
    cors: Option<(Arc<CompiledPolicy>, HeaderValue)>,
}

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
    /// `forwarded` belongs to the request's connection: the forwarding
    /// headers built for its last request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
        forwarded: &ForwardedCache,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let log = self.shared.access_log.as_ref();
        let mut observed = RequestContext::new(&req, peer.ip(), log.is_some());
        // Shed load rather than queue it: a slot per request, held until the
        // response body is done.
        let (route, mut response) = match self.shared.in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let (route, response) = self.serve(req, peer, tls, forwarded, &mut observed).await;
                let response = response.map(|body| {
                    body.map_frame(move |frame| {
                        let _held = &permit;
                        frame
                    })
                    .boxed()
                });
                (route, response)
            }
            Err(_) => {
                self.shared.metrics.requests_shed.inc();
                (None, reject(&Reject::Overloaded))
            }
        };
        let elapsed = start.elapsed().as_secs_f64();
        let m = &self.shared.metrics;
        let status = response.status();
        let route = match route {
            Some(RouteTag {
                name,
                latency,
                ok,
                cors,
            }) => {
                // Every answer on a CORS route tells the browser whether its
                // origin may read it, refusals included.
                if let Some((policy, origin)) = cors {
                    if let Some(cors) = &policy.firewall.cors {
                        cors.decorate(&origin, response.headers_mut());
                    }
                }
                latency.observe(elapsed);
                if status == StatusCode::OK {
                    ok.inc();
                    return Ok(observed.finish(response, log));
                }
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
                status: status.as_u16(),
            })
            .inc();
        Ok(observed.finish(response, log))
    }

    async fn serve(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
        forwarded: &ForwardedCache,
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
        // Route on the canonical path and forward that same path, so no
        // encoded or dotted variant reaches a route it should not. A path the
        // canonicaliser refuses may only reach a route that opted out of it
        // (`raw_path`), matched on the path as sent.
        observed.stage(Stage::Route);
        // A handle on the target (its bytes are shared, not copied), so the
        // path and query stay borrowed while the headers are rewritten.
        let uri = req.uri().clone();
        let (routed, canonical_ok) = match crate::path::canonicalize(uri.path()) {
            Ok(p) => (p, true),
            Err(_) => (std::borrow::Cow::Borrowed(uri.path()), false),
        };
        observed.path(&routed);
        // A CORS preflight is routed by the method it asks about, and
        // answered here when that route's policy has CORS rules.
        let preflight = crate::cors::preflight_method(req.method(), req.headers()).and_then(
            |asked| match config.router.route(&host, &routed, asked.as_str()) {
                Match::Found(m) => {
                    let route = &config.routes[m.route];
                    let cors = route
                        .policy
                        .as_ref()
                        .is_some_and(|p| p.firewall.cors.is_some());
                    cors.then_some((m, asked))
                }
                _ => None,
            },
        );
        let (found, preflight) = match preflight {
            Some((m, asked)) => (m, Some(asked)),
            None => match config.router.route(&host, &routed, req.method().as_str()) {
                Match::Found(m) => (m, None),
                _ if !canonical_ok => return (None, reject(&Reject::BadRequest)),
                Match::NotFound => return (None, reject(&Reject::NoRoute)),
                Match::MethodNotAllowed { allowed } => {
                    return (None, reject(&Reject::method_not_allowed(allowed)))
                }
            },
        };
        let route = &config.routes[found.route];
        if !canonical_ok && !route.raw_path {
            return (None, reject(&Reject::BadRequest));
        }
        let cors = route
            .policy
            .as_ref()
            .filter(|p| p.firewall.cors.is_some() && preflight.is_none())
            .and_then(|p| {
                let origin = req.headers().get(http::header::ORIGIN)?;
                Some((p.clone(), origin.clone()))
            });
        let name = Some(RouteTag {
            name: route.name.clone(),
            latency: route.latency.clone(),
            ok: route.ok.clone(),
            cors,
        });
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
            let fw = &policy.firewall;
            let method = preflight.as_ref().unwrap_or(req.method());
            if let Err(r) = fw.check_request(
                &policy.name,
                client_ip,
                method,
                req.uri(),
                &routed,
                req.headers(),
                &self.shared.metrics,
            ) {
                return (name, reject(&r));
            }
            // A preflight carries no credentials: it is answered before
            // authentication, and never reaches the upstream.
            if let (Some(asked), Some(cors)) = (&preflight, &fw.cors) {
                return match cors.preflight(asked, req.headers()) {
                    Ok(headers) => {
                        let mut response = Response::new(
                            http_body_util::Empty::new()
                                .map_err(|never| match never {})
                                .boxed(),
                        );
                        *response.status_mut() = StatusCode::NO_CONTENT;
                        *response.headers_mut() = headers;
                        (name, response)
                    }
                    Err(r) => (name, reject(&r)),
                };
            }
        }

        // Authenticate and authorise by the route's policy; the body has
        // not been read, so a refused request costs no upload.
        observed.stage(Stage::Auth);
        if let Some(policy) = &route.policy {
            policy.fetch_token_keys(req.headers()).await;
        }
        let consumer = match &route.policy {
            // A policy that does not authenticate (only limits, say) needs
            // neither the clock nor the connection's certificate.
            Some(policy) if policy.authenticates() => match policy
                .authenticate(
                    &config.credentials,
                    req.headers(),
                    req.uri().query(),
                    // The connection's client certificate chain (TLS listener).
                    req.extensions()
                        .get::<Arc<crate::mtls::PeerChain>>()
                        .map(|c| &**c),
                    std::time::SystemTime::now(),
                )
                .await
            {
                Ok(c) => c,
                Err(r) => return (name, reject(&r)),
            },
            _ => None,
        };

        observed.consumer(consumer.as_ref());

        // Count the request against the policy's limits.
        observed.stage(Stage::RateLimit);
        let mut limited = match &route.policy {
            Some(policy) if !policy.limits.is_empty() => {
                crate::limits::check(
                    &policy.limits,
                    &crate::limits::LimitContext {
                        consumer: consumer.as_deref().map(|c| c.name.as_str()),
                        client_ip,
                        route: &route.name,
                        headers: req.headers(),
                    },
                    &self.shared.cluster_limits,
                )
                .await
            }
            _ => None,
        };
        if let Some(decision) = &limited {
            observed.limit(decision.retry_after.is_none() && !decision.unavailable);
            let refusal = match decision.retry_after {
                Some(wait) => Some(Reject::TooManyRequests {
                    retry_after_secs: wait.as_secs(),
                }),
                None if decision.unavailable => Some(Reject::RateLimitUnavailable),
                None => None,
            };
            if let Some(refusal) = refusal {
                let mut response = reject(&refusal);
                if let Some(decision) = limited.take() {
                    decision.set_headers(response.headers_mut());
                }
                return (name, response);
            }
        }
        // Then the consumer's quotas, so a request a limit refused uses none.
        if let Some(policy) = route.policy.as_ref().filter(|p| !p.quotas.is_empty()) {
            let refused = crate::limits::check_quotas(
                &policy.quotas,
                consumer.as_deref().map(|c| c.name.as_str()),
                &self.shared.cluster_limits,
            )
            .await;
            match refused {
                None => {}
                Some(Some(wait)) => {
                    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    return (
                        name,
                        reject(&Reject::QuotaExceeded {
                            retry_after_secs: secs.max(1),
                        }),
                    );
                }
                Some(None) => return (name, reject(&Reject::RateLimitUnavailable)),
            }
        }

        observed.stage(Stage::Rewrite);
        let path = if route.raw_path {
            uri.path()
        } else if route.strip_prefix {
            found.stripped(&routed)
        } else {
            &routed
        };
        // The credential never travels on to the upstream.
        let original_query = uri.query();
        let query = match &route.policy {
            Some(policy) => policy.strip_credentials(req.headers_mut(), original_query),
            None => original_query.map(Into::into),
        };
        let Some(path_and_query) = forwarded_target(&uri, path, query.as_deref()) else {
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
        headers::set_forwarded_cached(
            &mut parts.headers,
            &client,
            trust.unwrap_or(&no_trust),
            Some(forwarded),
        );
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
        // A client that stops sending its body does not hold the request
        // open (a bodiless request needs no timer).
        let body: ProxyBody = if hyper::body::Body::is_end_stream(&body) {
            body.map_err(BoxError::from).boxed()
        } else {
            TimeoutBody::new(body, self.shared.limits.body_read_timeout).boxed()
        };
        let mut body = Some(match cap {
            Some(cap) => {
                http_body_util::Limited::new(body, usize::try_from(cap).unwrap_or(usize::MAX))
                    .boxed()
            }
            None => body,
        });
        // The injection rules read the first bytes of a textual body, after
        // authentication; what was read is sent on unchanged.
        if let Some(policy) = &route.policy {
            let inspect = (!replayable_body_empty(&body))
                .then(|| policy.firewall.body_inspection(&parts.headers))
                .flatten();
            if let Some(((n, kind), b)) = inspect.and_then(|i| Some((i, body.take()?))) {
                match read_prefix(b, n).await {
                    Ok((prefix, rest)) => {
                        if let Err(r) = policy.firewall.check_body(
                            &policy.name,
                            &prefix,
                            kind,
                            &self.shared.metrics,
                        ) {
                            return (name, reject(&r));
                        }
                        body = Some(rest);
                    }
                    Err(e) => return (name, reject(&body_error(e.as_ref()))),
                }
            }
        }
        let mut last = Reject::UpstreamUnavailable;
        // The head is copied only when a send could lose it and another
        // attempt may follow: connecting is separate from sending, so a
        // connect failure leaves the request in hand.
        let mut head = Some(parts);
        for attempt in 0..attempts {
            if attempt > 0 && !route.upstream.take_retry() {
                break;
            }
            let Some(parts) = head.as_ref() else { break };
            let Some(target) = route.upstream.pick(&parts.headers, &tried) else {
                break;
            };
            tried.push(target.index());
            let health = &target.target().health;
            observed.stage(Stage::Upstream);
            // The request timeout covers connecting and the exchange.
            let deadline = tokio::time::Instant::now() + route.upstream.request_timeout;
            let conn = match tokio::time::timeout_at(
                deadline,
                route.upstream.connect(target.target()),
            )
            .await
            {
                Err(_) => {
                    health.record_failure(route.upstream.eject_after, route.upstream.eject_for);
                    return (name, reject(&Reject::GatewayTimeout));
                }
                Ok(Err(e)) => {
                    health.record_failure(route.upstream.eject_after, route.upstream.eject_for);
                    tracing::debug!(upstream = %route.upstream.name, error = %e, "upstream connect failed");
                    last = Reject::BadGateway;
                    continue;
                }
                Ok(Ok(conn)) => conn,
            };
            let parts = if conn.send_may_lose_request() && attempt + 1 < attempts {
                parts.clone()
            } else {
                head.take().expect("checked above")
            };
            let mut upstream_req = Request::from_parts(parts, ());
            // HTTP/2 carries the authority in the URI; HTTP/1.1 sends the
            // path in origin form and the authority as Host.
            if http2 {
                let mut uri_parts = http::uri::Parts::default();
                uri_parts.scheme = Some(http::uri::Scheme::HTTP);
                uri_parts.authority = Some(target.target().authority.clone());
                uri_parts.path_and_query = Some(path_and_query.clone());
                let Ok(uri) = Uri::from_parts(uri_parts) else {
                    return (name, reject(&Reject::BadRequest));
                };
                *upstream_req.uri_mut() = uri;
                upstream_req.headers_mut().remove(HOST);
            } else {
                *upstream_req.uri_mut() = Uri::from(path_and_query.clone());
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
            observed.propagate(upstream_req.headers_mut());
            let upstream_req = upstream_req.map(|()| attempt_body);
            match tokio::time::timeout_at(deadline, conn.send(upstream_req)).await {
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
                    if let Some(decision) = limited.take() {
                        decision.set_headers(resp.headers_mut());
                    }
                    return (name, resp);
                }
                Ok(Err(crate::connpool::SendError { error: e, request })) => {
                    if caused_by::<http_body_util::LengthLimitError>(&e)
                        || caused_by::<BodyTimedOut>(&e)
                    {
                        return (name, reject(&body_error(&e)));
                    }
                    health.record_failure(route.upstream.eject_after, route.upstream.eject_for);
                    tracing::debug!(upstream = %route.upstream.name, error = %e, "upstream call failed");
                    last = Reject::BadGateway;
                    match request {
                        // It never left: the next attempt sends it as it is.
                        Some(req) => {
                            let (parts, b) = req.into_parts();
                            head = Some(parts);
                            body = Some(b);
                        }
                        // Not sent by an HTTP/2 client that could not connect
                        // (a copy of the head was kept for this).
                        None if e.is_connect() => {}
                        None => return (name, reject(&last)),
                    }
                }
            }
        }
        (name, reject(&last))
    }
}

/// Whether a request body is known to be empty.
/// The request target sent upstream: `path` and `query` as rewritten. When
/// they are the client's own, its `PathAndQuery` is reused (shared bytes,
/// not parsed again). `None` when the rewritten target is not a valid one.
fn forwarded_target(uri: &Uri, path: &str, query: Option<&str>) -> Option<PathAndQuery> {
    if let Some(original) = uri.path_and_query() {
        if original.path() == path && original.query() == query {
            return Some(original.clone());
        }
    }
    let mut target = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    target.push_str(path);
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    PathAndQuery::try_from(target).ok()
}

fn replayable_body_empty(body: &Option<ProxyBody>) -> bool {
    body.as_ref().is_none_or(hyper::body::Body::is_end_stream)
}

/// The refusal for a request body that failed while it was read.
fn body_error(e: &(dyn std::error::Error + 'static)) -> Reject {
    if caused_by::<http_body_util::LengthLimitError>(e) {
        Reject::PayloadTooLarge
    } else if caused_by::<BodyTimedOut>(e) {
        Reject::RequestTimeout
    } else {
        Reject::BadRequest
    }
}

/// Reads `body` until `n` bytes of data (or its end) and returns them, with
/// a body that sends everything read and then the rest.
async fn read_prefix(mut body: ProxyBody, n: usize) -> Result<(Bytes, ProxyBody), BoxError> {
    let mut frames = VecDeque::new();
    let mut prefix = BytesMut::new();
    let mut buffered = 0u64;
    while prefix.len() < n {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let take = data.len().min(n - prefix.len());
                    prefix.extend_from_slice(&data[..take]);
                    buffered += data.len() as u64;
                }
                frames.push_back(frame);
            }
        }
    }
    let replay = Replay {
        frames,
        buffered,
        rest: body,
    };
    Ok((prefix.freeze(), replay.boxed()))
}

/// Frames already read, then the rest of the body.
struct Replay {
    frames: VecDeque<Frame<Bytes>>,
    /// Data bytes in `frames`, for the size hint (which decides framing).
    buffered: u64,
    rest: ProxyBody,
}

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.pop_front() {
            if let Some(data) = frame.data_ref() {
                this.buffered -= data.len() as u64;
            }
            return std::task::Poll::Ready(Some(Ok(frame)));
        }
        std::pin::Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower() + self.buffered);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.buffered);
        }
        hint
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

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str, path: &str, query: Option<&str>) -> Option<String> {
        let uri: Uri = uri.parse().unwrap();
        forwarded_target(&uri, path, query).map(|t| t.as_str().to_string())
    }

    #[test]
    fn the_upstream_gets_the_rewritten_path_and_query() {
        // Unchanged: the client's own target.
        assert_eq!(target("/a/b?x=1", "/a/b", Some("x=1")).unwrap(), "/a/b?x=1");
        assert_eq!(target("/a/b", "/a/b", None).unwrap(), "/a/b");
        // An empty query is kept as sent.
        assert_eq!(target("/a?", "/a", Some("")).unwrap(), "/a?");
        // A stripped prefix or a canonical path, the query kept.
        assert_eq!(
            target("/api/v1/x?y=2", "/v1/x", Some("y=2")).unwrap(),
            "/v1/x?y=2"
        );
        assert_eq!(target("/a/%2e%2e/b", "/b", None).unwrap(), "/b");
        // A credential taken out of the query, or the whole query.
        assert_eq!(
            target("/a?api_key=s3cret&page=2", "/a", Some("page=2")).unwrap(),
            "/a?page=2"
        );
        assert_eq!(target("/a?api_key=s3cret", "/a", None).unwrap(), "/a");
        // Absolute-form: only the path and query go upstream.
        assert_eq!(
            target("http://example.com/a?b=1", "/a", Some("b=1")).unwrap(),
            "/a?b=1"
        );
        // A rewrite that is no valid target is refused, not sent.
        assert_eq!(target("/a", "/a b", None), None);
    }
}
