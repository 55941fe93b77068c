//! The responses the gateway writes itself when it refuses or fails a request:
//! RFC 9457 `application/problem+json` bodies with a stable type per reason.
//!
//! A pipeline stage that stops a request returns a [`Reject`]; the proxy turns
//! it into a response with [`Reject::response`] (or [`Reject::parts`]) at one
//! place. What a client sees is the status, the problem type, a fixed title, an
//! optional fixed detail sentence and the request id: never an upstream
//! address, a configuration value or an error chain. Those belong in the log.
//!
//! Problem types are `https://gatehouse.dev/problems/<slug>`. The slugs are a
//! public contract: clients may branch on them, so a slug is never renamed or
//! reused for another meaning.
//!
//! | slug | status | when |
//! |---|---|---|
//! | `bad-request` | 400 | the request is malformed (bad framing, bad target, bad header syntax) |
//! | `unauthorized` | 401 | no or invalid credentials; carries `WWW-Authenticate` |
//! | `forbidden` | 403 | the caller is known but not allowed, or its address is denied |
//! | `blocked` | 403 | a firewall rule (injection patterns, user agent, CORS origin) refused the request |
//! | `no-route` | 404 | no route matches the host and path |
//! | `method-not-allowed` | 405 | a route matches the path but not the method; carries `Allow` |
//! | `request-timeout` | 408 | the client sent the request body too slowly |
//! | `payload-too-large` | 413 | the body exceeds the limit |
//! | `too-many-requests` | 429 | a rate limit refused the request; carries `Retry-After` |
//! | `quota-exceeded` | 429 | the consumer used its quota for the period; carries `Retry-After` (the period's end) |
//! | `uri-too-long` | 414 | the request target exceeds the limit |
//! | `header-fields-too-large` | 431 | the headers exceed the limit |
//! | `bad-gateway` | 502 | the upstream could not be reached or answered with a broken response |
//! | `upstream-unavailable` | 503 | no healthy target, or the circuit breaker is open |
//! | `rate-limit-unavailable` | 503 | a cluster rate limit with `on_store_failure: closed` could not reach its counter store |
//! | `keys-unavailable` | 503 | a JWT issuer's key set could not be fetched, or is older than its `jwks_max_stale` |
//! | `auth-unavailable` | 503 | the policy's token introspection endpoint could not answer |
//! | `not-ready` | 503 | this data plane has not applied a configuration yet |
//! | `overloaded` | 503 | the data plane is at its cap of requests in flight; carries `Retry-After` |
//! | `gateway-timeout` | 504 | the upstream did not answer in time |
//!
//! A new reason is one variant plus one arm in `Reject::spec` and, if it
//! carries a header, one arm in [`Reject::write_headers`]; nothing else moves.

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
    X_CONTENT_TYPE_OPTIONS,
};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::headers::is_tchar;

/// Every problem type URI starts with this.
pub const TYPE_BASE: &str = "https://gatehouse.dev/problems/";

/// The media type of every body built here.
pub const CONTENT_TYPE_PROBLEM: &str = "application/problem+json";

/// Builds a problem type URI from its slug at compile time, so the URI and
/// [`TYPE_BASE`] cannot drift apart (checked by a test).
macro_rules! problem_type {
    ($slug:literal) => {
        concat!("https://gatehouse.dev/problems/", $slug)
    };
}

/// Why the gateway refused or failed a request.
///
/// Not `Copy`: the variants that answer with a header carry its value, which
/// the stage that rejects computes (the methods a path allows come from the
/// routes, a challenge from the policy). Cloning one is cheap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// 400: the request is malformed.
    BadRequest,
    /// 401: missing or invalid credentials. `challenge` is the
    /// `WWW-Authenticate` value, e.g. `Bearer realm="gatehouse"`.
    Unauthorized { challenge: HeaderValue },
    /// 403: authenticated but not allowed, or the client address is denied.
    Forbidden,
    /// 403: a firewall rule (injection patterns, user agent, CORS origin)
    /// refused the request. Never says which rule or what matched.
    Blocked,
    /// 408: the request body did not arrive in time.
    RequestTimeout,
    /// 404: no route matches.
    NoRoute,
    /// 405: the path matches but the method does not. `allow` is the `Allow`
    /// value; build it with [`Reject::method_not_allowed`].
    MethodNotAllowed { allow: HeaderValue },
    /// 413: the request body is larger than allowed.
    PayloadTooLarge,
    /// 429: a rate limit refused the request; retry after this many seconds.
    TooManyRequests { retry_after_secs: u64 },
    /// 429: the consumer's quota for the period is used up; retry after
    /// this many seconds (when the period ends).
    QuotaExceeded { retry_after_secs: u64 },
    /// 414: the request target is longer than allowed.
    UriTooLong,
    /// 431: the request headers are larger than allowed.
    HeaderFieldsTooLarge,
    /// 502: the upstream connection failed or the upstream broke the protocol.
    BadGateway,
    /// 503: no healthy target, or the circuit breaker is open.
    UpstreamUnavailable,
    /// 503: a cluster rate limit with `on_store_failure: closed` could not
    /// reach its counter store in time.
    RateLimitUnavailable,
    /// 503: a bearer token cannot be checked: its issuer's key set was
    /// never fetched, or is older than the issuer's `jwks_max_stale`.
    KeysUnavailable,
    /// 503: the service that checks the credential (a token introspection
    /// endpoint) could not answer in time.
    AuthUnavailable,
    /// 503: no configuration has been applied yet.
    NotReady,
    /// 503: the data plane is at its cap of requests in flight (load shedding).
    Overloaded,
    /// 504: the upstream did not answer within the timeout.
    GatewayTimeout,
}

/// The fixed, public description of one reason.
struct Spec {
    status: StatusCode,
    type_uri: &'static str,
    title: &'static str,
}

/// The JSON members of a problem body, in the order RFC 9457 lists them.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    type_uri: &'static str,
    title: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
}

impl Reject {
    /// A 405 whose `Allow` lists `methods`, comma separated, in the order
    /// given. Names that are not HTTP tokens are skipped rather than trusted
    /// into a header.
    pub fn method_not_allowed<I, S>(methods: I) -> Reject
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut allow = String::new();
        for method in methods {
            let method = method.as_ref();
            if method.is_empty() || !method.bytes().all(is_tchar) {
                continue;
            }
            if !allow.is_empty() {
                allow.push_str(", ");
            }
            allow.push_str(method);
        }
        // Only tchars and ", " were written, so the value is always valid.
        let allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
        Reject::MethodNotAllowed { allow }
    }

    fn spec(&self) -> Spec {
        let (status, type_uri, title) = match self {
            Reject::BadRequest => (
                StatusCode::BAD_REQUEST,
                problem_type!("bad-request"),
                "Bad request",
            ),
            Reject::Unauthorized { .. } => (
                StatusCode::UNAUTHORIZED,
                problem_type!("unauthorized"),
                "Authentication required",
            ),
            Reject::Forbidden => (
                StatusCode::FORBIDDEN,
                problem_type!("forbidden"),
                "Forbidden",
            ),
            Reject::Blocked => (
                StatusCode::FORBIDDEN,
                problem_type!("blocked"),
                "Request blocked by a firewall rule",
            ),
            Reject::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                problem_type!("request-timeout"),
                "Request body not received in time",
            ),
            Reject::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                problem_type!("overloaded"),
                "Gateway overloaded",
            ),
            Reject::NoRoute => (
                StatusCode::NOT_FOUND,
                problem_type!("no-route"),
                "No route matches the request",
            ),
            Reject::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                problem_type!("method-not-allowed"),
                "Method not allowed",
            ),
            Reject::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                problem_type!("payload-too-large"),
                "Request body too large",
            ),
            Reject::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                problem_type!("too-many-requests"),
                "Too many requests",
            ),
            Reject::QuotaExceeded { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                problem_type!("quota-exceeded"),
                "Quota exceeded",
            ),
            Reject::UriTooLong => (
                StatusCode::URI_TOO_LONG,
                problem_type!("uri-too-long"),
                "URI too long",
            ),
            Reject::HeaderFieldsTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                problem_type!("header-fields-too-large"),
                "Request header fields too large",
            ),
            Reject::BadGateway => (
                StatusCode::BAD_GATEWAY,
                problem_type!("bad-gateway"),
                "Bad gateway",
            ),
            Reject::UpstreamUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                problem_type!("upstream-unavailable"),
                "Upstream unavailable",
            ),
            Reject::RateLimitUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                problem_type!("rate-limit-unavailable"),
                "Rate limit store unavailable",
            ),
            Reject::KeysUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                problem_type!("keys-unavailable"),
                "Token keys unavailable",
            ),
            Reject::AuthUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                problem_type!("auth-unavailable"),
                "Authentication service unavailable",
            ),
            Reject::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                problem_type!("not-ready"),
                "Gateway not ready",
            ),
            Reject::GatewayTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                problem_type!("gateway-timeout"),
                "Upstream timed out",
            ),
        };
        Spec {
            status,
            type_uri,
            title,
        }
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.spec().status
    }

    /// The problem type URI, `https://gatehouse.dev/problems/<slug>`.
    pub fn type_uri(&self) -> &'static str {
        self.spec().type_uri
    }

    /// The stable short name of the reason, for logs and metrics labels.
    pub fn slug(&self) -> &'static str {
        let uri = self.type_uri();
        uri.strip_prefix(TYPE_BASE).unwrap_or(uri)
    }

    /// The short, fixed, human-readable summary.
    pub fn title(&self) -> &'static str {
        self.spec().title
    }

    /// Sets the headers of the problem response: the media type, `no-store`
    /// (a refusal is about this request, no cache may replay it), `nosniff`
    /// (the body echoes the request id), and the reason's own header.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_PROBLEM));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        match self {
            Reject::Unauthorized { challenge } => {
                headers.insert(WWW_AUTHENTICATE, challenge.clone());
            }
            Reject::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, allow.clone());
            }
            Reject::TooManyRequests { retry_after_secs }
            | Reject::QuotaExceeded { retry_after_secs } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Reject::Overloaded => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Reject::BadRequest
            | Reject::Forbidden
            | Reject::Blocked
            | Reject::RequestTimeout
            | Reject::NoRoute
            | Reject::PayloadTooLarge
            | Reject::HeaderFieldsTooLarge
            | Reject::UriTooLong
            | Reject::BadGateway
            | Reject::UpstreamUnavailable
            | Reject::RateLimitUnavailable
            | Reject::KeysUnavailable
            | Reject::AuthUnavailable
            | Reject::NotReady
            | Reject::GatewayTimeout => {}
        }
    }

    /// The JSON body. `detail` is `&'static str` on purpose: only a sentence
    /// written into the code can be shown, so an upstream address, a config
    /// value or an error's `Display` cannot reach a client by accident.
    /// `request_id` becomes `instance` as `urn:gatehouse:request:<id>`, with
    /// every byte outside the URI unreserved set percent-encoded.
    pub fn body(&self, detail: Option<&'static str>, request_id: Option<&str>) -> Bytes {
        let spec = self.spec();
        let instance = request_id.map(request_urn);
        let body = Body {
            type_uri: spec.type_uri,
            title: spec.title,
            status: spec.status.as_u16(),
            detail,
            instance: instance.as_deref(),
        };
        // A struct of strings and an integer cannot fail to serialize.
        let json = serde_json::to_vec(&body).expect("a problem body serializes");
        Bytes::from(json)
    }

    /// Status, headers and body, for a proxy whose response body type is not
    /// `Full<Bytes>`: build it with `Response::new(your_body(bytes))`, set
    /// the status, and `extend` the headers.
    pub fn parts(
        &self,
        detail: Option<&'static str>,
        request_id: Option<&str>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        self.write_headers(&mut headers);
        (self.status(), headers, self.body(detail, request_id))
    }

    /// The complete response. Its body cannot fail (`Full<Bytes>` has
    /// `Infallible` as its error), so a hyper 1.x proxy that answers with a
    /// boxed body converts it with one `map`:
    ///
    /// ```
    /// use bytes::Bytes;
    /// use gatehouse_data::problem::Reject;
    /// use http_body_util::{combinators::BoxBody, BodyExt};
    ///
    /// type Error = Box<dyn std::error::Error + Send + Sync>;
    /// let response: http::Response<BoxBody<Bytes, Error>> = Reject::NoRoute
    ///     .response(None, Some("4bf92f3577b34da6"))
    ///     .map(|body| body.map_err(|never| match never {}).boxed());
    /// assert_eq!(response.status(), 404);
    /// ```
    ///
    /// A detail built at run time does not compile:
    ///
    /// ```compile_fail,E0597
    /// use gatehouse_data::problem::Reject;
    /// let upstream = String::from("connect to 10.0.0.7:8080 failed");
    /// let _ = Reject::BadGateway.response(Some(upstream.as_str()), None);
    /// ```
    ///
    /// Hyper omits the body itself when answering a `HEAD` request.
    pub fn response(
        &self,
        detail: Option<&'static str>,
        request_id: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let (status, headers, body) = self.parts(detail, request_id);
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }
}

/// `urn:gatehouse:request:<id>` with the id percent-encoded, so that any
/// request id, even one a client chose, makes a valid URI.
fn request_urn(id: &str) -> String {
    const PREFIX: &str = "urn:gatehouse:request:";
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut urn = String::with_capacity(PREFIX.len() + id.len());
    urn.push_str(PREFIX);
    for &b in id.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            urn.push(char::from(b));
        } else {
            urn.push('%');
            urn.push(char::from(HEX[usize::from(b >> 4)]));
            urn.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    urn
}

#[cfg(test)]
mod tests;
