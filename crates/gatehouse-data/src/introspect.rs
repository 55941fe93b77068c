//! OAuth2 token introspection (RFC 7662): an opaque bearer token is sent to
//! the policy's endpoint, and the answer is kept in a bounded cache keyed by
//! the token's SHA-256 (the token itself is never kept), so a busy token
//! costs one call per `cache_ttl`, and never outlives its `exp`.
//!
//! Calls are POSTs of `token=...` (form encoded) with the gateway's client
//! credentials in HTTP Basic, over https (plain http only to loopback, and
//! only with the data plane's `--allow-insecure-idp-loopback`). Redirects
//! are not followed, the answer is capped at [`MAX_ANSWER_BYTES`], and the
//! whole call at the policy's `timeout`. Concurrent requests with the same
//! token wait for one call. An endpoint that cannot answer (unreachable,
//! timeout, non-200, unreadable JSON) makes the request fail with 503; that
//! is never cached.
//!
//! The introspector, with its cache, outlives a revision when the policy's
//! `introspection` settings do not change.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use gatehouse_model::object::IntrospectionAuth;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

/// The largest introspection answer read.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The largest token sent for introspection; a longer one is refused unread.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// What the endpoint said of a token.
#[derive(Debug)]
pub enum Answer {
    /// The token is active; `subject` is the consumer it names, if any.
    Active {
        subject: Option<String>,
        claims: Value,
    },
    Inactive,
}

/// The endpoint could not give an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

type Call = Shared<BoxFuture<'static, Result<Arc<Answer>, Unavailable>>>;

struct Entry {
    answer: Arc<Answer>,
    until: Instant,
    seq: u64,
}

/// Answers by token hash, at most `max` of them; the oldest go first.
#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], Entry>,
    order: VecDeque<([u8; 32], u64)>,
    seq: u64,
}

impl Cache {
    fn get(&self, key: &[u8; 32], now: Instant) -> Option<Arc<Answer>> {
        self.entries
            .get(key)
            .filter(|e| now < e.until)
            .map(|e| e.answer.clone())
    }

    fn insert(&mut self, key: [u8; 32], answer: Arc<Answer>, until: Instant, max: usize) {
        self.seq += 1;
        let seq = self.seq;
        self.entries.insert(key, Entry { answer, until, seq });
        self.order.push_back((key, seq));
        while self.entries.len() > max {
            let Some((old, old_seq)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&old).is_some_and(|e| e.seq == old_seq) {
                self.entries.remove(&old);
            }
        }
        // Replaced entries leave stale places in the order: drop them
        // before they outnumber the entries.
        if self.order.len() > 2 * max.max(16) {
            let entries = &self.entries;
            self.order
                .retain(|(k, s)| entries.get(k).is_some_and(|e| e.seq == *s));
        }
    }
}

/// Where the endpoint is and how to speak to it.
struct Endpoint {
    host: String,
    port: u16,
    authority: HeaderValue,
    path: http::uri::PathAndQuery,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

/// A policy's introspection endpoint, its cache and its calls in flight.
pub struct Introspector {
    /// The settings it was built from (secret opened), to reuse it across
    /// revisions that keep them.
    settings: IntrospectionAuth,
    endpoint: Endpoint,
    authorization: HeaderValue,
    cache: Mutex<Cache>,
    in_flight: Mutex<HashMap<[u8; 32], Call>>,
    /// Calls made to the endpoint, for tests and metrics.
    calls: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the client secret.
        f.debug_struct("Introspector")
            .field("url", &self.settings.url)
            .finish_non_exhaustive()
    }
}

/// The RFC 3986 unreserved characters pass; everything else is %-encoded
/// (form encoding, and client credentials per RFC 6749 section 2.3.1).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Introspector {
    /// Builds the introspector of `policy`, or takes `previous` when it was
    /// built from the same settings (keeping its cache).
    pub fn compile(
        policy: &str,
        settings: &IntrospectionAuth,
        allow_loopback_http: bool,
        previous: Option<&Arc<Introspector>>,
    ) -> Result<Arc<Introspector>, String> {
        let fail =
            |field: &str, what: &str| format!("policy \"{policy}\": introspection.{field}: {what}");
        let https = settings.url.starts_with("https://");
        if !https {
            if !gatehouse_model::validate::is_loopback_http(&settings.url) {
                return Err(fail("url", "must be an https URL"));
            }
            if !allow_loopback_http {
                return Err(fail(
                    "url",
                    "plain http needs --allow-insecure-idp-loopback on this data plane",
                ));
            }
        }
        if let Some(p) = previous.filter(|p| p.settings == *settings) {
            return Ok(p.clone());
        }
        let uri: http::Uri = settings
            .url
            .parse()
            .map_err(|_| fail("url", "is not a URL"))?;
        let host = uri
            .host()
            .ok_or_else(|| fail("url", "has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = HeaderValue::from_str(
            uri.authority()
                .map(|a| a.as_str())
                .ok_or_else(|| fail("url", "has no host"))?,
        )
        .map_err(|_| fail("url", "has no valid host"))?;
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let tls = if https {
            let mut roots = rustls::RootCertStore::empty();
            match &settings.ca_pem {
                Some(pem) => {
                    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                        let der = der.map_err(|e| fail("ca_pem", &e.to_string()))?;
                        roots.add(der).map_err(|e| fail("ca_pem", &e.to_string()))?;
                    }
                }
                None => {
                    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                }
            }
            let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| fail("url", &e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|_| fail("url", "has no valid server name"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            form_encode(&settings.client_id),
            form_encode(&settings.client_secret)
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| fail("client_id", "cannot be sent"))?;
        authorization.set_sensitive(true);
        Ok(Arc::new(Introspector {
            settings: settings.clone(),
            endpoint: Endpoint {
                host,
                port,
                authority,
                path,
                tls,
            },
            authorization,
            cache: Mutex::default(),
            in_flight: Mutex::default(),
            calls: Default::default(),
        }))
    }

    /// Calls made to the endpoint so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the endpoint says of `token`, from the cache when it can.
    pub async fn check(self: &Arc<Self>, token: &str) -> Result<Arc<Answer>, Unavailable> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Ok(Arc::new(Answer::Inactive));
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(a) = lock(&self.cache).get(&key, Instant::now()) {
            return Ok(a);
        }
        let call = {
            let mut in_flight = lock(&self.in_flight);
            match in_flight.get(&key) {
                Some(call) => call.clone(),
                None => {
                    let me = self.clone();
                    let token = token.to_string();
                    let call = async move {
                        let answer = me.call(&token).await.map(Arc::new);
                        if let Ok(a) = &answer {
                            me.keep(key, a.clone());
                        }
                        lock(&me.in_flight).remove(&key);
                        answer
                    }
                    .boxed()
                    .shared();
                    in_flight.insert(key, call.clone());
                    call
                }
            }
        };
        call.await
    }

    /// Caches an answer: an active one for `cache_ttl` but never past its
    /// `exp`, an inactive one for `negative_cache_ttl`.
    fn keep(&self, key: [u8; 32], answer: Arc<Answer>) {
        let ttl = match &*answer {
            Answer::Inactive => self.settings.negative_cache_ttl,
            Answer::Active { claims, .. } => {
                let left = claims
                    .get("exp")
                    .and_then(Value::as_u64)
                    .map(|exp| {
                        (UNIX_EPOCH + Duration::from_secs(exp))
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                    })
                    .unwrap_or(Duration::MAX);
                self.settings.cache_ttl.min(left)
            }
        };
        if ttl.is_zero() {
            return;
        }
        let until = Instant::now() + ttl;
        let max = usize::try_from(self.settings.max_cache_entries).unwrap_or(usize::MAX);
        lock(&self.cache).insert(key, answer, until, max);
    }

    async fn call(&self, token: &str) -> Result<Answer, Unavailable> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match tokio::time::timeout(self.settings.timeout, self.exchange(token)).await {
            Ok(Ok((StatusCode::OK, body))) => self.read(&body).ok_or_else(|| {
                tracing::warn!(url = %self.settings.url, "token introspection: unreadable answer");
                Unavailable
            }),
            Ok(Ok((status, _))) => {
                tracing::warn!(url = %self.settings.url, %status, "token introspection: endpoint refused the call");
                Err(Unavailable)
            }
            Ok(Err(e)) => {
                tracing::warn!(url = %self.settings.url, error = %e, "token introspection: call failed");
                Err(Unavailable)
            }
            Err(_) => {
                tracing::warn!(url = %self.settings.url, "token introspection: timed out");
                Err(Unavailable)
            }
        }
    }

    /// Reads an answer: `active: true`, an `exp` not passed yet, and the
    /// consumer from the configured member (`sub`, else `username`).
    fn read(&self, body: &[u8]) -> Option<Answer> {
        let claims: Value = serde_json::from_slice(body).ok()?;
        if !claims.is_object() {
            return None;
        }
        if claims.get("active").and_then(Value::as_bool) != Some(true) {
            return Some(Answer::Inactive);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if claims
            .get("exp")
            .and_then(Value::as_u64)
            .is_some_and(|exp| exp <= now)
        {
            return Some(Answer::Inactive);
        }
        let named = |member: &str| {
            claims
                .get(member)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let claim = &self.settings.consumer_claim;
        let subject =
            named(claim).or_else(|| (claim == "sub").then(|| named("username")).flatten());
        Some(Answer::Active { subject, claims })
    }

    async fn exchange(&self, token: &str) -> Result<(StatusCode, Bytes), CallError> {
        let ep = &self.endpoint;
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port)).await?;
        let _ = tcp.set_nodelay(true);
        let body = format!("token={}&token_type_hint=access_token", form_encode(token));
        let req = Request::post(ep.path.as_str())
            .header(HOST, ep.authority.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, self.authorization.clone())
            .body(Full::new(Bytes::from(body)))?;
        match &ep.tls {
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await?;
                send(TokioIo::new(tls), req).await
            }
            None => send(TokioIo::new(tcp), req).await,
        }
    }
}

type CallError = Box<dyn std::error::Error + Send + Sync>;

/// One request on a fresh HTTP/1.1 connection; the answer's body, capped.
async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), CallError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await?
        .to_bytes();
    drop(sender);
    conn.abort();
    Ok((status, body))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_at_most_max_entries_oldest_out_first() {
        let mut c = Cache::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let a = Arc::new(Answer::Inactive);
        for i in 0..10u8 {
            c.insert([i; 32], a.clone(), later, 4);
        }
        assert_eq!(c.entries.len(), 4);
        assert!(c.get(&[0; 32], now).is_none());
        assert!(c.get(&[9; 32], now).is_some());
        assert!(c.get(&[9; 32], later).is_none(), "expired");
        // Refreshing one key over and over keeps the order bounded.
        for _ in 0..1000 {
            c.insert([9; 32], a.clone(), later, 4);
        }
        assert!(c.order.len() <= 2 * 16 + 1, "{}", c.order.len());
        assert_eq!(c.entries.len(), 4);
    }

    #[test]
    fn credentials_and_tokens_are_form_encoded() {
        assert_eq!(form_encode("a b+c/d=é~"), "a%20b%2Bc%2Fd%3D%C3%A9~");
    }
}
