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
//! Calls go through the identity-provider client setup JWKS uses too
//! (`idp_http`), one client per introspector, so connections to the endpoint
//! are reused. The introspector, with its cache and connections, outlives a
//! revision when the policy's `introspection` settings do not change.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::future::{BoxFuture, FutureExt, Shared};
use gatehouse_model::object::IntrospectionAuth;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use sha2::{Digest, Sha256};

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

/// A policy's introspection endpoint, its cache and its calls in flight.
pub struct Introspector {
    /// The settings it was built from (secret opened), to reuse it across
    /// revisions that keep them.
    settings: IntrospectionAuth,
    /// The answer members kept in the cache besides `scope` and `exp`: the
    /// claims the policy's rules read. Nothing else is kept.
    keep: Vec<String>,
    /// Its own client (the policy's CA, no redirects): connections to the
    /// endpoint are kept and reused.
    client: reqwest::Client,
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
        keep: &[String],
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
        if let Some(p) = previous.filter(|p| p.settings == *settings && p.keep == keep) {
            return Ok(p.clone());
        }
        let url = reqwest::Url::parse(&settings.url).map_err(|_| fail("url", "is not a URL"))?;
        if url.host_str().is_none() {
            return Err(fail("url", "has no host"));
        }
        let roots = match &settings.ca_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let der = der.map_err(|e| fail("ca_pem", &e.to_string()))?;
                    roots.add(der).map_err(|e| fail("ca_pem", &e.to_string()))?;
                }
                roots
            }
            None => crate::idp_http::system_roots(),
        };
        let client =
            crate::idp_http::client(roots, reqwest::redirect::Policy::none(), settings.timeout)
                .map_err(|e| fail("url", &e))?;
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
            keep: keep.to_vec(),
            client,
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
        // Only what the policy reads stays in the cache, whatever else the
        // endpoint sent.
        let kept: serde_json::Map<String, Value> = ["scope", "exp"]
            .into_iter()
            .chain(self.keep.iter().map(String::as_str))
            .filter_map(|k| Some((k.to_string(), claims.get(k)?.clone())))
            .collect();
        Some(Answer::Active {
            subject,
            claims: Value::Object(kept),
        })
    }

    async fn exchange(&self, token: &str) -> Result<(StatusCode, Vec<u8>), String> {
        let body = format!("token={}&token_type_hint=access_token", form_encode(token));
        let response = self
            .client
            .post(&self.settings.url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, self.authorization.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| crate::idp_http::error_chain(&e))?;
        let status = response.status();
        let body = crate::idp_http::read_capped(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                crate::idp_http::BodyError::TooLarge => {
                    format!("answer over {MAX_ANSWER_BYTES} bytes")
                }
                crate::idp_http::BodyError::Broken(e) => e,
            })?;
        Ok((status, body))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

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

    /// An endpoint on 127.0.0.1 that answers after `delay`: active for
    /// `tok-*` tokens (consumer after the dash), with `exp` when asked, 500
    /// for `fail`. Returns its URL and its call count.
    async fn endpoint(delay: Duration) -> (String, Arc<std::sync::atomic::AtomicU64>) {
        endpoint_with(delay, None).await
    }

    /// [`endpoint`], over TLS with `tls` when given.
    async fn endpoint_with(
        delay: Duration,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (String, Arc<std::sync::atomic::AtomicU64>) {
        use hyper::service::service_fn;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counted = counted.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let counted = counted.clone();
                        async move {
                            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let basic = req.headers()[AUTHORIZATION].to_str().unwrap().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let body = String::from_utf8_lossy(&body).into_owned();
                            tokio::time::sleep(delay).await;
                            let token = body
                                .split('&')
                                .find_map(|p| p.strip_prefix("token="))
                                .unwrap_or("")
                                .to_string();
                            let now = SystemTime::now()
                                .duration_since(UNIX_EPOCH)
                                .unwrap()
                                .as_secs();
                            let (status, answer) = match token.as_str() {
                                "fail" => (500, serde_json::json!({})),
                                _ if basic != "Basic Z2F0ZXdheTpzJTNBY3JldA==" => {
                                    (401, serde_json::json!({ "error": "invalid_client" }))
                                }
                                "tok-expiring" => (
                                    200,
                                    serde_json::json!({ "active": true, "sub": "acme", "exp": now + 1 }),
                                ),
                                "tok-expired" => (
                                    200,
                                    serde_json::json!({ "active": true, "sub": "acme", "exp": now - 10 }),
                                ),
                                t => match t.strip_prefix("tok-") {
                                    Some(who) => {
                                        (200, serde_json::json!({ "active": true, "sub": who }))
                                    }
                                    None => (200, serde_json::json!({ "active": false })),
                                },
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(answer.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                    }
                });
            }
        });
        (format!("{scheme}://{addr}/introspect"), calls)
    }

    fn settings(url: &str) -> IntrospectionAuth {
        IntrospectionAuth {
            url: url.to_string(),
            client_id: "gateway".into(),
            client_secret: "s:cret".into(),
            ca_pem: None,
            consumer_claim: "sub".into(),
            cache_ttl: Duration::from_secs(60),
            negative_cache_ttl: Duration::from_secs(60),
            max_cache_entries: 100,
            timeout: Duration::from_secs(2),
        }
    }

    fn subject(a: &Answer) -> Option<&str> {
        match a {
            Answer::Active { subject, .. } => subject.as_deref(),
            Answer::Inactive => None,
        }
    }

    #[tokio::test]
    async fn concurrent_checks_of_one_token_make_one_call_and_then_hit_the_cache() {
        let (url, calls) = endpoint(Duration::from_millis(200)).await;
        let i = Introspector::compile("p", &settings(&url), &[], true, None).unwrap();
        let checks = (0..10).map(|_| i.check("tok-acme"));
        for answer in futures::future::join_all(checks).await {
            assert_eq!(subject(&answer.unwrap()), Some("acme"));
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(subject(&i.check("tok-acme").await.unwrap()), Some("acme"));
        assert!(matches!(*i.check("nope").await.unwrap(), Answer::Inactive));
        assert!(matches!(*i.check("nope").await.unwrap(), Answer::Inactive));
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "inactive answers are cached too"
        );
        assert_eq!(i.calls(), 2);
        // The same settings in the next revision keep the cache.
        let again = Introspector::compile("p", &settings(&url), &[], true, Some(&i)).unwrap();
        assert!(Arc::ptr_eq(&again, &i));
        let mut changed = settings(&url);
        changed.cache_ttl = Duration::from_secs(30);
        let fresh = Introspector::compile("p", &changed, &[], true, Some(&i)).unwrap();
        assert!(!Arc::ptr_eq(&fresh, &i));
    }

    #[tokio::test]
    async fn exp_bounds_the_cache_and_failures_are_not_kept() {
        let (url, calls) = endpoint(Duration::ZERO).await;
        let count = || calls.load(std::sync::atomic::Ordering::SeqCst);
        let i = Introspector::compile("p", &settings(&url), &[], true, None).unwrap();
        assert!(matches!(
            *i.check("tok-expired").await.unwrap(),
            Answer::Inactive
        ));
        assert_eq!(
            subject(&i.check("tok-expiring").await.unwrap()),
            Some("acme")
        );
        let before = count();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        // Past its exp the cached answer is gone; the endpoint is asked again.
        let _ = i.check("tok-expiring").await.unwrap();
        assert_eq!(count(), before + 1);
        assert_eq!(i.check("fail").await.unwrap_err(), Unavailable);
        assert_eq!(i.check("fail").await.unwrap_err(), Unavailable);
        assert_eq!(count(), before + 3, "a failure is asked again");
        // Wrong client credentials: the endpoint refuses, 503 for the caller.
        let mut wrong = settings(&url);
        wrong.client_secret = "other".into();
        let w = Introspector::compile("p", &wrong, &[], true, None).unwrap();
        assert_eq!(w.check("tok-acme").await.unwrap_err(), Unavailable);
        // Nothing listening: unavailable, within the timeout.
        let gone =
            Introspector::compile("p", &settings("http://127.0.0.1:1/x"), &[], true, None).unwrap();
        assert_eq!(gone.check("tok-acme").await.unwrap_err(), Unavailable);
    }

    #[tokio::test]
    async fn https_endpoints_are_checked_against_the_configured_ca() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                    .unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (url, calls) = endpoint_with(Duration::ZERO, Some(acceptor)).await;
        let mut trusted = settings(&url);
        trusted.ca_pem = Some(ca_pem);
        let i = Introspector::compile("p", &trusted, &[], false, None).unwrap();
        assert_eq!(subject(&i.check("tok-acme").await.unwrap()), Some("acme"));
        // The web PKI roots do not know this CA: no call gets through.
        let untrusted = Introspector::compile("p", &settings(&url), &[], false, None).unwrap();
        assert_eq!(untrusted.check("tok-acme").await.unwrap_err(), Unavailable);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn plain_http_needs_loopback_and_the_flag() {
        let err = Introspector::compile("p", &settings("http://127.0.0.1:9/x"), &[], false, None)
            .unwrap_err();
        assert_eq!(
            err,
            "policy \"p\": introspection.url: plain http needs --allow-insecure-idp-loopback on this data plane"
        );
        let err = Introspector::compile("p", &settings("http://idp.example/x"), &[], true, None)
            .unwrap_err();
        assert_eq!(err, "policy \"p\": introspection.url: must be an https URL");
        assert!(
            Introspector::compile("p", &settings("https://idp.example/x"), &[], false, None)
                .is_ok()
        );
        // The secret never shows in Debug.
        let i = Introspector::compile("p", &settings("https://idp.example/x"), &[], false, None)
            .unwrap();
        assert!(!format!("{i:?}").contains("s:cret"));
    }

    #[test]
    fn answers_are_read_strictly_and_only_what_the_policy_reads_is_kept() {
        let keep = ["tenant".to_string()];
        let i = Introspector::compile("p", &settings("https://idp.example/x"), &keep, false, None)
            .unwrap();
        let read = |v: serde_json::Value| i.read(v.to_string().as_bytes());
        let Some(Answer::Active { subject, claims }) = read(serde_json::json!({
            "active": true, "sub": "acme", "scope": "a b", "tenant": "t1",
            "exp": 4_000_000_000u64, "huge": "x".repeat(1000),
        })) else {
            panic!("active")
        };
        assert_eq!(subject.as_deref(), Some("acme"));
        assert_eq!(
            claims,
            serde_json::json!({ "scope": "a b", "exp": 4_000_000_000u64, "tenant": "t1" })
        );
        // `username` stands in for a missing `sub`; neither is no subject.
        let Some(Answer::Active { subject, .. }) =
            read(serde_json::json!({ "active": true, "username": "bob" }))
        else {
            panic!("active")
        };
        assert_eq!(subject.as_deref(), Some("bob"));
        let Some(Answer::Active { subject, .. }) = read(serde_json::json!({ "active": true }))
        else {
            panic!("active")
        };
        assert_eq!(subject, None);
        for inactive in [
            serde_json::json!({ "active": false, "sub": "acme" }),
            serde_json::json!({ "active": "true", "sub": "acme" }),
            serde_json::json!({ "sub": "acme" }),
            serde_json::json!({ "active": true, "sub": "acme", "exp": 1 }),
        ] {
            assert!(
                matches!(read(inactive.clone()), Some(Answer::Inactive)),
                "{inactive}"
            );
        }
        assert!(i.read(b"not json").is_none());
        assert!(i.read(b"[true]").is_none());
    }

    #[test]
    fn credentials_and_tokens_are_form_encoded() {
        assert_eq!(form_encode("a b+c/d=é~"), "a%20b%2Bc%2Fd%3D%C3%A9~");
    }
}
