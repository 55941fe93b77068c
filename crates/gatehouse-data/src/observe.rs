//! What the gateway records about each request while it runs: the fields of
//! its access-log line and its OpenTelemetry spans.
//!
//! The proxy makes one [`RequestContext`] per request, tells it which stage
//! starts ([`RequestContext::stage`]) and what each stage decided (route,
//! consumer, client address, limit decision), and hands it the response at
//! the end ([`RequestContext::finish`]). Spans have the target
//! `gatehouse::trace`: with no trace exporter configured they are disabled
//! and each call here costs a branch. One span covers the request, and one
//! each stage, ended when the next stage starts; the `upstream` span (one
//! per attempt) is the parent named in the `traceparent` sent upstream.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::access_log::{AccessLog, Entry};
use crate::auth::ConsumerInfo;
use crate::headers::{TRACEPARENT, TRACESTATE};
use crate::proxy::{BoxError, ProxyBody};

/// The pipeline stages that get a span, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Canonical path, then route match by host, path and method.
    Route,
    /// The policy's firewall: addresses, methods, sizes.
    Firewall,
    /// Authentication and authorisation by the policy.
    Auth,
    /// The policy's rate limits.
    RateLimit,
    /// Hop-by-hop headers out, forwarding and trace headers, strip_prefix.
    Rewrite,
    /// One call to an upstream target, until its response headers.
    Upstream,
}

/// One request's record; see the module docs.
pub struct RequestContext {
    start: Instant,
    time: SystemTime,
    method: Method,
    bytes_in: Option<u64>,
    /// Whether an access-log line will be written (fields are kept only then).
    logging: bool,
    path: Option<String>,
    route: Option<Arc<String>>,
    consumer: Option<Arc<ConsumerInfo>>,
    client_ip: IpAddr,
    limit: Option<&'static str>,
    trace_id: Option<[u8; 16]>,
    /// Whether `trace_id` is the exported trace's (then it is not replaced).
    traced: bool,
    upstream_start: Option<Instant>,
    request_span: Span,
    stage_span: Span,
}

impl RequestContext {
    /// Starts the record of a request from `peer`; `logging` when an access
    /// log is on. A valid incoming `traceparent` becomes the parent span.
    pub fn new<B>(req: &http::Request<B>, peer: IpAddr, logging: bool) -> RequestContext {
        let request_span = tracing::info_span!(
            target: "gatehouse::trace",
            "request",
            otel.kind = "server",
            http.request.method = %req.method(),
            url.path = Empty,
            http.route = Empty,
            client.address = Empty,
            http.response.status_code = Empty,
        );
        // Nobody reads the incoming context when neither is on.
        let incoming = if logging || !request_span.is_disabled() {
            incoming_parent(req.headers())
        } else {
            None
        };
        let mut trace_id = None;
        let mut traced = false;
        if !request_span.is_disabled() {
            if let Some(parent) = &incoming {
                let _ = request_span.set_parent(
                    opentelemetry::Context::new().with_remote_span_context(parent.clone()),
                );
            }
            let cx = request_span.context();
            let ours = cx.span().span_context().trace_id();
            if ours != TraceId::INVALID {
                trace_id = Some(ours.to_bytes());
                traced = true;
            }
        }
        if trace_id.is_none() {
            trace_id = incoming.map(|p| p.trace_id().to_bytes());
        }
        let bytes_in = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        RequestContext {
            start: Instant::now(),
            time: SystemTime::now(),
            method: req.method().clone(),
            bytes_in,
            logging,
            path: None,
            route: None,
            consumer: None,
            client_ip: peer.to_canonical(),
            limit: None,
            trace_id,
            traced,
            upstream_start: None,
            request_span,
            stage_span: Span::none(),
        }
    }

    /// Ends the stage that was running and starts `stage`.
    pub fn stage(&mut self, stage: Stage) {
        if stage == Stage::Upstream && self.upstream_start.is_none() {
            self.upstream_start = Some(Instant::now());
        }
        // Ends the previous stage's span first, so stages never overlap.
        self.stage_span = Span::none();
        if self.request_span.is_disabled() {
            return;
        }
        let parent = &self.request_span;
        const T: &str = "gatehouse::trace";
        self.stage_span = match stage {
            Stage::Route => tracing::info_span!(target: T, parent: parent, "route"),
            Stage::Firewall => tracing::info_span!(target: T, parent: parent, "firewall"),
            Stage::Auth => tracing::info_span!(target: T, parent: parent, "auth"),
            Stage::RateLimit => tracing::info_span!(target: T, parent: parent, "rate_limit"),
            Stage::Rewrite => tracing::info_span!(target: T, parent: parent, "rewrite"),
            Stage::Upstream => {
                tracing::info_span!(target: T, parent: parent, "upstream", otel.kind = "client")
            }
        };
    }

    /// The canonical path the request was routed on.
    pub fn path(&mut self, canonical: &str) {
        self.request_span.record("url.path", canonical);
        if self.logging {
            self.path = Some(canonical.to_string());
        }
    }

    /// The route that matched.
    pub fn route(&mut self, name: &Arc<String>) {
        self.request_span.record("http.route", name.as_str());
        self.route = Some(name.clone());
    }

    /// The client address the firewall and limits saw.
    pub fn client_ip(&mut self, ip: IpAddr) {
        self.client_ip = ip;
    }

    /// The authenticated consumer.
    pub fn consumer(&mut self, consumer: Option<&Arc<ConsumerInfo>>) {
        self.consumer = consumer.cloned();
    }

    /// The rate-limit decision, when the policy has limits.
    pub fn limit(&mut self, allowed: bool) {
        self.limit = Some(if allowed { "allowed" } else { "limited" });
    }

    /// The trace id of the `traceparent` the rewrite kept or started; the
    /// exported trace's id wins when there is one.
    pub fn trace_id(&mut self, id: crate::headers::TraceId) {
        if !self.traced {
            self.trace_id = Some(id.to_bytes());
        }
    }

    /// Points the upstream request's `traceparent` at the running
    /// `upstream` span, when traces are exported: same trace id, this span
    /// as the parent, the sampling decision in the flags. Without an
    /// exporter the header stays as [`crate::headers::ensure_traceparent`]
    /// left it.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        if self.stage_span.is_disabled() {
            return;
        }
        let cx = self.stage_span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return;
        }
        let value = format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        );
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(TRACEPARENT, value);
        }
    }

    /// Ends the stages, and returns the response, with a body that writes
    /// the access-log line when it ends (or is dropped) when one is on.
    pub fn finish(
        mut self,
        response: Response<ProxyBody>,
        log: Option<&AccessLog>,
    ) -> Response<ProxyBody> {
        let upstream = self.upstream_start.map(|s| s.elapsed());
        self.stage_span = Span::none();
        let status = response.status().as_u16();
        self.request_span
            .record("http.response.status_code", status)
            .record("client.address", tracing::field::display(self.client_ip));
        let log = match log {
            Some(log) if self.logging => Some(log.clone()),
            _ => None,
        };
        if log.is_none() && self.request_span.is_disabled() {
            return response;
        }
        response.map(|inner| {
            LoggedBody {
                inner,
                bytes_out: 0,
                status,
                upstream,
                log,
                cx: Some(self),
            }
            .boxed()
        })
    }
}

/// A response body that counts what it sends, and writes the access-log
/// line and ends the request span when it is done.
struct LoggedBody {
    inner: ProxyBody,
    bytes_out: u64,
    status: u16,
    upstream: Option<Duration>,
    log: Option<AccessLog>,
    cx: Option<RequestContext>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.bytes_out += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let (Some(cx), Some(log)) = (self.cx.take(), self.log.take()) else {
            return;
        };
        log.send(Entry {
            time: cx.time,
            route: cx.route,
            consumer: cx.consumer.map(|c| c.name.clone()),
            client_ip: cx.client_ip,
            method: cx.method,
            path: cx.path,
            status: self.status,
            bytes_out: self.bytes_out,
            bytes_in: cx.bytes_in,
            upstream_ms: self.upstream.map(|d| d.as_secs_f64() * 1e3),
            total_ms: cx.start.elapsed().as_secs_f64() * 1e3,
            limit: cx.limit,
            trace_id: cx.trace_id.map(hex::encode),
        });
    }
}

/// The parent named by a valid incoming `traceparent` (the same strict
/// version-00 form [`crate::headers::ensure_traceparent`] keeps), with the
/// `tracestate` beside it.
fn incoming_parent(headers: &HeaderMap) -> Option<SpanContext> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let b = value.as_bytes();
    if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !(lower_hex(&b[3..35]) && lower_hex(&b[36..52]) && lower_hex(&b[53..55])) {
        return None;
    }
    let s = value.to_str().ok()?;
    let trace = TraceId::from_hex(&s[3..35]).ok()?;
    let span = SpanId::from_hex(&s[36..52]).ok()?;
    let flags = u8::from_str_radix(&s[53..55], 16).ok()?;
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    let state = headers
        .get(TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        state,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_valid_traceparent_is_the_parent() {
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let p = incoming_parent(&h).unwrap();
        assert_eq!(p.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id().to_string(), "00f067aa0ba902b7");
        assert!(p.is_sampled());
        assert!(p.is_remote());
    }

    #[test]
    fn an_invalid_traceparent_is_no_parent() {
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
        ] {
            assert!(
                incoming_parent(&headers(&[("traceparent", bad)])).is_none(),
                "{bad}"
            );
        }
        let two = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]);
        assert!(incoming_parent(&two).is_none());
    }

    #[test]
    fn without_an_exporter_the_trace_id_is_the_incoming_one() {
        let req = http::Request::get("/x")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(())
            .unwrap();
        let cx = RequestContext::new(&req, "::ffff:10.0.0.1".parse().unwrap(), true);
        assert_eq!(
            cx.trace_id.map(hex::encode).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(cx.client_ip.to_string(), "10.0.0.1");
    }
}
