//! JWKS: the key sets of JwtIssuer objects with a `jwks_url`, fetched by
//! each data plane.
//!
//! - A key set is kept per (issuer name, URL) in a [`JwksRegistry`] that
//!   outlives revisions: a new revision with the same issuer and URL keeps
//!   the keys already fetched. The hot path reads the set through an
//!   arc-swap; no fetch holds a lock a request waits on.
//! - A background task per issuer fetches the set when it first appears,
//!   then every `jwks_refresh` (with a little jitter so data planes do not
//!   fetch in step); after a failed fetch it tries again sooner.
//! - A token naming a `kid` the set does not hold, or arriving when the set
//!   is unusable, may start one fetch ("on demand") per `jwks_cooldown`;
//!   requests arriving while a fetch runs wait for that same fetch (single
//!   flight), others are answered from the set as it is.
//! - The last good set keeps checking tokens while the URL cannot be
//!   fetched, up to `jwks_max_stale` after it was fetched; past that (or
//!   before any fetch succeeded) its tokens get 503, not 401.
//! - Fetches: https only; plain http to a loopback address only with
//!   `--allow-insecure-jwks-loopback`; redirects only to the same scheme,
//!   host and port (at most 3); a time cap for the whole exchange and a size
//!   cap on the body, read in chunks.
//! - Keys from a set follow the rules of static keys: a key's type and curve
//!   (and its `alg`, when given) decide the algorithms it may check; RSA keys
//!   have at least 2048 bits; keys whose `use` is not `sig`, symmetric keys
//!   and keys of unknown types are skipped. A set with no usable key is a
//!   failed fetch: the previous set stays.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use base64::Engine;
use futures::future::{BoxFuture, FutureExt, Shared};
use gatehouse_model::object::{defaults, JwtIssuer};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// RSA keys shorter than this are skipped (as static keys are refused).
const MIN_RSA_BITS: usize = 2048;
/// Keys read from one set; the rest are skipped.
const MAX_KEYS: usize = 64;
/// After a failed fetch, the background task tries again after at most this.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// How this data plane fetches key sets (flags of `gatehouse data-plane`).
#[derive(Clone, Debug)]
pub struct JwksSettings {
    /// Allow `http://` URLs to loopback addresses (tests, local IdPs).
    pub allow_insecure_loopback: bool,
    /// Trust these CAs (PEM) instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The cap on one fetch: connect, request, redirects and body.
    pub timeout: Duration,
    /// The cap on the body of one key set.
    pub max_bytes: usize,
}

impl Default for JwksSettings {
    fn default() -> Self {
        JwksSettings {
            allow_insecure_loopback: false,
            ca_file: None,
            timeout: Duration::from_secs(5),
            max_bytes: 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub issuer: String,
    /// `ok`, `unreachable`, `status`, `too_large`, `invalid`, `refused`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
}

/// The metrics of JWKS fetches, registered with the data plane's.
#[derive(Clone, Debug, Default)]
pub struct JwksMetrics {
    pub fetches: Family<FetchLabels, Counter>,
    /// Unix time of the key set in use, by issuer.
    pub fetched_at: Family<IssuerLabels, Gauge>,
    /// Usable keys in the key set in use, by issuer.
    pub keys: Family<IssuerLabels, Gauge>,
}

/// One usable key of a fetched set.
pub(crate) struct SetKey {
    pub kid: Option<String>,
    /// The algorithms this key may check, from its type, curve and `alg`.
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

/// A fetched key set.
pub(crate) struct KeySet {
    pub keys: Vec<SetKey>,
    fetched: Instant,
}

impl KeySet {
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// Why a fetch failed; logged, never shown to a client.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("plain http needs --allow-insecure-jwks-loopback (and a loopback host)")]
    Refused,
    #[error("{0}")]
    Unreachable(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("the key set is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Invalid(String),
}

impl FetchError {
    fn outcome(&self) -> &'static str {
        match self {
            FetchError::Refused => "refused",
            FetchError::Unreachable(_) => "unreachable",
            FetchError::Status(_) => "status",
            FetchError::TooLarge(_) => "too_large",
            FetchError::Invalid(_) => "invalid",
        }
    }
}

/// The HTTP side, shared by every source of a registry.
struct Fetcher {
    settings: JwksSettings,
    client: OnceLock<Result<reqwest::Client, String>>,
    metrics: JwksMetrics,
}

fn build_client(settings: &JwksSettings) -> Result<reqwest::Client, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let roots = match &settings.ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("--jwks-ca-file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--jwks-ca-file {}: holds no certificate",
                    path.display()
                ));
            }
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("--jwks-ca-file {}: {e}", path.display()))?;
            }
            roots
        }
        None => {
            let roots = crate::idp_http::system_roots();
            if roots.is_empty() {
                tracing::warn!("no system CA certificates found: JWKS over https will fail (give --jwks-ca-file)");
            }
            roots
        }
    };
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        let first = &attempt.previous()[0];
        let to = attempt.url();
        let same = to.scheme() == first.scheme()
            && to.host_str() == first.host_str()
            && to.port_or_known_default() == first.port_or_known_default();
        if !same {
            attempt.error("a redirect to another host")
        } else if attempt.previous().len() > 3 {
            attempt.error("more than 3 redirects")
        } else {
            attempt.follow()
        }
    });
    crate::idp_http::client(roots, redirects, settings.timeout)
}

fn is_loopback_host(url: &reqwest::Url) -> bool {
    url.host_str().is_some_and(|h| {
        h.eq_ignore_ascii_case("localhost")
            || h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

impl Fetcher {
    fn client(&self) -> Result<&reqwest::Client, FetchError> {
        self.client
            .get_or_init(|| build_client(&self.settings))
            .as_ref()
            .map_err(|e| FetchError::Unreachable(e.clone()))
    }

    /// The body of `url`, within the caps.
    async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| FetchError::Invalid(e.to_string()))?;
        match parsed.scheme() {
            "https" => {}
            "http" if self.settings.allow_insecure_loopback && is_loopback_host(&parsed) => {}
            _ => return Err(FetchError::Refused),
        }
        let client = self.client()?;
        let cap = self.settings.max_bytes;
        let exchange = async {
            let response = client
                .get(parsed)
                .header(http::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| FetchError::Unreachable(error_chain(&e)))?;
            if response.status() != http::StatusCode::OK {
                return Err(FetchError::Status(response.status().as_u16()));
            }
            crate::idp_http::read_capped(response, cap)
                .await
                .map_err(|e| match e {
                    crate::idp_http::BodyError::TooLarge => FetchError::TooLarge(cap),
                    crate::idp_http::BodyError::Broken(e) => FetchError::Unreachable(e),
                })
        };
        // The client's timeout covers the exchange too; this one is the
        // last word, whatever the client does.
        tokio::time::timeout(self.settings.timeout + Duration::from_millis(100), exchange)
            .await
            .unwrap_or_else(|_| Err(FetchError::Unreachable("timed out".into())))
    }
}

use crate::idp_http::error_chain;

/// Reads a JWK Set, keeping the keys this gateway may use.
pub(crate) fn parse_key_set(body: &[u8]) -> Result<Vec<SetKey>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    let total = set.keys.len();
    let keys: Vec<SetKey> = set
        .keys
        .into_iter()
        .take(MAX_KEYS)
        .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
        .filter_map(|jwk| usable_key(&jwk))
        .collect();
    if keys.is_empty() {
        return Err(format!("none of its {total} keys is usable"));
    }
    if keys.len() < total {
        tracing::debug!(total, usable = keys.len(), "JWKS keys skipped");
    }
    Ok(keys)
}

fn key_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn rsa_bits(n: &str) -> usize {
    let Ok(n) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(n.trim_end_matches('='))
    else {
        return 0;
    };
    let n: &[u8] = {
        let start = n.iter().position(|b| *b != 0).unwrap_or(n.len());
        &n[start..]
    };
    match n.first() {
        Some(first) => n.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

fn usable_key(jwk: &Jwk) -> Option<SetKey> {
    use Algorithm::*;
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let kid = jwk.common.key_id.clone();
    if kid.as_ref().is_some_and(|k| k.is_empty() || k.len() > 256) {
        return None;
    }
    let fits: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) if rsa_bits(&p.n) >= MIN_RSA_BITS => {
            vec![RS256, RS384, RS512, PS256, PS384, PS512]
        }
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => vec![EdDSA],
        // Short RSA keys, symmetric keys, other curves and types.
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        None => fits,
        Some(a) => {
            let a = key_algorithm(a)?;
            if !fits.contains(&a) {
                return None;
            }
            vec![a]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(SetKey {
        kid,
        algorithms,
        key,
    })
}

/// The timings of one issuer, from its latest revision.
#[derive(Debug, Default)]
struct Timings {
    refresh_ms: AtomicU64,
    cooldown_ms: AtomicU64,
    max_stale_ms: AtomicU64,
}

impl Timings {
    fn set(&self, j: &JwtIssuer) {
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        let set = |a: &AtomicU64, d: Option<Duration>, default: fn() -> Duration| {
            a.store(ms(d.unwrap_or_else(default)), Ordering::Relaxed)
        };
        set(&self.refresh_ms, j.jwks_refresh, defaults::jwks_refresh);
        set(&self.cooldown_ms, j.jwks_cooldown, defaults::jwks_cooldown);
        set(
            &self.max_stale_ms,
            j.jwks_max_stale,
            defaults::jwks_max_stale,
        );
    }
    fn get(a: &AtomicU64) -> Duration {
        Duration::from_millis(a.load(Ordering::Relaxed))
    }
}

type SharedFetch = Shared<BoxFuture<'static, bool>>;

#[derive(Default)]
struct Demand {
    /// When the last on-demand fetch started.
    last: Option<Instant>,
    /// The fetch running now, if any; every caller waits for this one.
    running: Option<SharedFetch>,
}

/// The key set of one issuer and URL.
pub struct JwksSource {
    issuer: String,
    url: String,
    timings: Timings,
    keys: ArcSwapOption<KeySet>,
    demand: Mutex<Demand>,
    fetcher: Arc<Fetcher>,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl JwksSource {
    /// The key set, if one was fetched and is not older than `jwks_max_stale`.
    pub(crate) fn usable(&self) -> Option<Arc<KeySet>> {
        self.keys
            .load_full()
            .filter(|s| s.fetched.elapsed() <= Timings::get(&self.timings.max_stale_ms))
    }

    /// Whether a token naming `kid` (if any) should wait for a fetch: the
    /// set is unusable, or does not hold the kid.
    pub(crate) fn wants_fetch(&self, kid: Option<&str>) -> bool {
        match self.usable() {
            None => true,
            Some(set) => kid.is_some_and(|k| !set.has_kid(k)),
        }
    }

    /// Joins the fetch running now, or starts one: always for the
    /// background task, for a request only once per cooldown. `None` when
    /// a request may not start one.
    fn fetch_shared(self: &Arc<Self>, on_demand: bool) -> Option<SharedFetch> {
        let mut d = self.demand.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = &d.running {
            // Not finished: neither seen finished by a waiter, nor found
            // finished now (its waiters may all have gone away).
            if running.peek().is_none() && running.clone().now_or_never().is_none() {
                return Some(running.clone());
            }
        }
        if on_demand {
            let cooldown = Timings::get(&self.timings.cooldown_ms);
            if d.last.is_some_and(|t| t.elapsed() < cooldown) {
                return None;
            }
            d.last = Some(Instant::now());
        }
        // Spawned, so that the fetch ends even if the request that started
        // it goes away.
        let me = self.clone();
        let task = tokio::spawn(async move { me.fetch(on_demand).await });
        let fetch = async move { task.await.unwrap_or(false) }.boxed().shared();
        d.running = Some(fetch.clone());
        Some(fetch)
    }

    /// Waits for a fetch a request may start (see [`Self::fetch_shared`]).
    pub(crate) async fn fetch_on_demand(self: &Arc<Self>) {
        if let Some(f) = self.fetch_shared(true) {
            f.await;
        }
    }

    async fn fetch(&self, on_demand: bool) -> bool {
        let fetcher = &self.fetcher;
        let result = fetcher
            .get(&self.url)
            .await
            .and_then(|body| parse_key_set(&body).map_err(FetchError::Invalid));
        let (outcome, ok) = match result {
            Ok(keys) => {
                let labels = IssuerLabels {
                    issuer: self.issuer.clone(),
                };
                fetcher
                    .metrics
                    .keys
                    .get_or_create(&labels)
                    .set(keys.len() as i64);
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                fetcher.metrics.fetched_at.get_or_create(&labels).set(unix);
                tracing::debug!(issuer = %self.issuer, keys = keys.len(), on_demand, "JWKS fetched");
                self.keys.store(Some(Arc::new(KeySet {
                    keys,
                    fetched: Instant::now(),
                })));
                ("ok", true)
            }
            Err(e) => {
                let age = self.keys.load().as_ref().map(|s| s.fetched.elapsed());
                tracing::warn!(
                    issuer = %self.issuer,
                    url = %self.url,
                    error = %e,
                    on_demand,
                    key_set_age = ?age,
                    "JWKS fetch failed; the last good key set (if any) stays in use up to jwks_max_stale"
                );
                (e.outcome(), false)
            }
        };
        fetcher
            .metrics
            .fetches
            .get_or_create(&FetchLabels {
                issuer: self.issuer.clone(),
                outcome,
            })
            .inc();
        ok
    }
}

/// Waits for the first fetch (started with the source, so that requests
/// arriving at once join it), then fetches every `jwks_refresh`, until the
/// source is dropped (no revision uses the issuer and URL any more).
async fn refresh_loop(source: Weak<JwksSource>, first: SharedFetch) {
    let mut fetch = first;
    loop {
        let ok = fetch.await;
        let Some(s) = source.upgrade() else { return };
        let refresh = Timings::get(&s.timings.refresh_ms);
        drop(s);
        let wait = if ok {
            // Up to a tenth more, so that data planes drift apart.
            let jitter = rand::random::<u64>() % (refresh.as_millis() as u64 / 10 + 1);
            refresh + Duration::from_millis(jitter)
        } else {
            refresh.min(RETRY_AFTER_FAILURE)
        };
        tokio::time::sleep(wait).await;
        let Some(next) = source.upgrade().and_then(|s| s.fetch_shared(false)) else {
            return;
        };
        fetch = next;
    }
}

/// The key sources of a data plane, across revisions.
pub struct JwksRegistry {
    fetcher: Arc<Fetcher>,
    sources: Mutex<HashMap<(String, String), Weak<JwksSource>>>,
}

impl std::fmt::Debug for JwksRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwksRegistry")
    }
}

impl Default for JwksRegistry {
    fn default() -> Self {
        JwksRegistry::with(JwksSettings::default(), JwksMetrics::default())
    }
}

impl JwksRegistry {
    fn with(settings: JwksSettings, metrics: JwksMetrics) -> JwksRegistry {
        JwksRegistry {
            fetcher: Arc::new(Fetcher {
                settings,
                client: OnceLock::new(),
                metrics,
            }),
            sources: Mutex::default(),
        }
    }

    /// A registry with the default settings, counting into `metrics`.
    pub fn with_metrics(metrics: JwksMetrics) -> JwksRegistry {
        JwksRegistry::with(JwksSettings::default(), metrics)
    }

    /// A registry; with a CA file its HTTP client is built now, so a bad
    /// file stops the data plane at start (otherwise at the first fetch,
    /// so a data plane without JWKS issuers never reads the system's roots).
    pub fn new(settings: JwksSettings, metrics: JwksMetrics) -> Result<JwksRegistry, String> {
        let registry = JwksRegistry::with(settings, metrics);
        if registry.fetcher.settings.ca_file.is_none() {
            return Ok(registry);
        }
        registry
            .fetcher
            .client
            .get_or_init(|| build_client(&registry.fetcher.settings))
            .as_ref()
            .map_err(Clone::clone)?;
        Ok(registry)
    }

    /// The source of `j` (which has a `jwks_url`): the one already kept for
    /// its name and URL, with the timings of this revision, or a new one
    /// whose background task starts fetching at once.
    pub fn source(&self, j: &JwtIssuer, url: &str) -> Arc<JwksSource> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.retain(|_, s| s.strong_count() > 0);
        let key = (j.name.clone(), url.to_string());
        if let Some(s) = sources.get(&key).and_then(Weak::upgrade) {
            s.timings.set(j);
            return s;
        }
        let source = Arc::new(JwksSource {
            issuer: j.name.clone(),
            url: url.to_string(),
            timings: Timings::default(),
            keys: ArcSwapOption::empty(),
            demand: Mutex::default(),
            fetcher: self.fetcher.clone(),
        });
        source.timings.set(j);
        if url.starts_with("http://") && !self.fetcher.settings.allow_insecure_loopback {
            tracing::error!(issuer = %j.name, %url, "jwks_url is plain http: this data plane fetches it only with --allow-insecure-jwks-loopback; its tokens get 503");
        }
        sources.insert(key, Arc::downgrade(&source));
        // Outside a runtime (unit tests) there is no background task: keys
        // are fetched on demand only.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let _in_runtime = rt.enter();
            if let Some(first) = source.fetch_shared(false) {
                rt.spawn(refresh_loop(Arc::downgrade(&source), first));
            }
        }
        source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn rsa_jwk(bits: usize) -> serde_json::Value {
        let mut n = vec![0u8; bits / 8];
        n[0] = 0xc3;
        n[bits / 8 - 1] = 1;
        json!({"kty": "RSA", "kid": format!("rsa{bits}"), "n": b64(&n), "e": "AQAB"})
    }

    #[test]
    fn only_signature_keys_of_known_shapes_are_kept() {
        let ec = rcgen::KeyPair::generate().unwrap();
        let raw = ec.public_key_raw();
        let (x, y) = raw[1..].split_at(32);
        let set = json!({"keys": [
            rsa_jwk(2048),
            rsa_jwk(1024),
            {"kty": "EC", "crv": "P-256", "kid": "ec", "x": b64(x), "y": b64(y)},
            {"kty": "EC", "crv": "P-256", "kid": "ec-enc", "use": "enc", "x": b64(x), "y": b64(y)},
            {"kty": "EC", "crv": "P-256", "kid": "ec-384", "alg": "ES384", "x": b64(x), "y": b64(y)},
            {"kty": "oct", "kid": "hmac", "k": b64(b"0123456789abcdef0123456789abcdef")},
            {"kty": "XYZ", "kid": "odd"},
            {"kty": "RSA", "kid": "rsa-alg", "alg": "PS256", "n": rsa_jwk(2048)["n"], "e": "AQAB"},
        ]});
        let keys = parse_key_set(set.to_string().as_bytes()).unwrap();
        let kept: Vec<(&str, &Vec<Algorithm>)> = keys
            .iter()
            .map(|k| (k.kid.as_deref().unwrap(), &k.algorithms))
            .collect();
        assert_eq!(
            kept.len(),
            3,
            "{:?}",
            kept.iter().map(|k| k.0).collect::<Vec<_>>()
        );
        assert_eq!(kept[0].0, "rsa2048");
        assert_eq!(kept[0].1.len(), 6);
        assert_eq!(kept[1], ("ec", &vec![Algorithm::ES256]));
        assert_eq!(kept[2], ("rsa-alg", &vec![Algorithm::PS256]));
    }

    #[test]
    fn a_set_without_usable_keys_is_an_error() {
        for body in [
            "not json",
            "{}",
            r#"{"keys": []}"#,
            r#"{"keys": [{"kty": "oct", "k": "AAAA"}]}"#,
        ] {
            assert!(parse_key_set(body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn rsa_bits_count_the_modulus() {
        assert_eq!(rsa_bits(&b64(&[0, 0, 1])), 1);
        assert_eq!(rsa_bits(&b64(&[0x80, 0])), 16);
        assert_eq!(rsa_bits("!!"), 0);
    }

    /// A one-connection-at-a-time HTTP server on 127.0.0.1 that answers
    /// every request with `answer(port)`.
    async fn serve(answer: fn(u16) -> String) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(answer(port).as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        port
    }

    fn loopback_fetcher() -> Fetcher {
        Fetcher {
            settings: JwksSettings {
                allow_insecure_loopback: true,
                max_bytes: 1000,
                ..JwksSettings::default()
            },
            client: OnceLock::new(),
            metrics: JwksMetrics::default(),
        }
    }

    #[tokio::test]
    async fn redirects_stay_on_the_host_and_bodies_are_capped() {
        let fetcher = loopback_fetcher();
        let small = serve(|_| {
            let body = r#"{"keys":[]}"#;
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        })
        .await;
        let got = fetcher.get(&format!("http://127.0.0.1:{small}/")).await;
        assert_eq!(got.unwrap(), br#"{"keys":[]}"#);
        // To another host (localhost is not 127.0.0.1), refused.
        let away = serve(|port| {
            format!("HTTP/1.1 302 Found\r\nlocation: http://localhost:{port}/jwks\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        })
        .await;
        let got = fetcher.get(&format!("http://127.0.0.1:{away}/")).await;
        assert!(
            matches!(got, Err(FetchError::Unreachable(ref e)) if e.contains("another host")),
            "{got:?}"
        );
        // On the same host, followed (here in a loop, so until the cap).
        let same = serve(|port| {
            format!("HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{port}/again\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        })
        .await;
        let got = fetcher.get(&format!("http://127.0.0.1:{same}/")).await;
        assert!(
            matches!(got, Err(FetchError::Unreachable(ref e)) if e.contains("more than 3 redirects")),
            "{got:?}"
        );
        // Too large, announced or not.
        let announced = serve(|_| {
            "HTTP/1.1 200 OK\r\ncontent-length: 5000\r\nconnection: close\r\n\r\n".to_string()
        })
        .await;
        let got = fetcher.get(&format!("http://127.0.0.1:{announced}/")).await;
        assert!(matches!(got, Err(FetchError::TooLarge(1000))), "{got:?}");
        let streamed = serve(|_| {
            format!(
                "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{}",
                "x".repeat(3000)
            )
        })
        .await;
        let got = fetcher.get(&format!("http://127.0.0.1:{streamed}/")).await;
        assert!(matches!(got, Err(FetchError::TooLarge(1000))), "{got:?}");
        // Only 200 is a key set.
        let missing = serve(|_| {
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
        })
        .await;
        let got = fetcher.get(&format!("http://127.0.0.1:{missing}/")).await;
        assert!(matches!(got, Err(FetchError::Status(404))), "{got:?}");
    }

    /// An HTTP server on 127.0.0.1 that answers every request with `body`
    /// and counts the requests.
    async fn serve_counting(body: String) -> (u16, Arc<AtomicU64>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicU64::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (body, counted) = (body.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    counted.fetch_add(1, Ordering::SeqCst);
                    // Slow enough that concurrent callers overlap.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        (port, hits)
    }

    fn jwks_issuer(url: &str) -> JwtIssuer {
        JwtIssuer {
            name: "corp".into(),
            labels: Default::default(),
            revision: 1,
            issuer: "https://corp.example".into(),
            audiences: vec!["gatehouse".into()],
            algorithms: vec![gatehouse_model::object::JwtAlgorithm::ES256],
            keys: vec![],
            jwks_url: Some(url.into()),
            jwks_refresh: Some(Duration::from_secs(3600)),
            jwks_cooldown: Some(Duration::from_secs(3600)),
            jwks_max_stale: None,
            leeway: Duration::from_secs(5),
            consumer_claim: "sub".into(),
            max_token_bytes: 4096,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_kids_share_one_fetch_per_cooldown_and_revisions_share_the_set() {
        let ec = rcgen::KeyPair::generate().unwrap();
        let raw = ec.public_key_raw();
        let (x, y) = raw[1..].split_at(32);
        let set =
            json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": b64(x), "y": b64(y)}]});
        let (port, hits) = serve_counting(set.to_string()).await;
        let registry = JwksRegistry::with(
            JwksSettings {
                allow_insecure_loopback: true,
                ..JwksSettings::default()
            },
            JwksMetrics::default(),
        );
        let url = format!("http://127.0.0.1:{port}/jwks");
        let j = jwks_issuer(&url);
        let source = registry.source(&j, &url);
        // A token arriving before the first fetch ended waits for it, and
        // does not use up the cooldown.
        if source.wants_fetch(Some("k1")) {
            source.fetch_on_demand().await;
        }
        assert!(source.usable().is_some_and(|s| s.has_kid("k1")));
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "the background task's first fetch"
        );
        assert!(!source.wants_fetch(Some("k1")));
        assert!(source.wants_fetch(Some("k2")));

        // 50 unknown kids at once: one fetch, all waiting for it.
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let s = source.clone();
                tokio::spawn(async move { s.fetch_on_demand().await })
            })
            .collect();
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // Within the cooldown, no more.
        source.fetch_on_demand().await;
        assert_eq!(hits.load(Ordering::SeqCst), 2);

        // A new revision of the same issuer and URL keeps the source and
        // takes its timings; another URL is another source.
        let again = registry.source(
            &JwtIssuer {
                jwks_cooldown: Some(Duration::from_secs(1)),
                ..j.clone()
            },
            &url,
        );
        assert!(Arc::ptr_eq(&source, &again));
        assert_eq!(
            Timings::get(&source.timings.cooldown_ms),
            Duration::from_secs(1)
        );
        let other_url = format!("http://127.0.0.1:{port}/other");
        assert!(!Arc::ptr_eq(&source, &registry.source(&j, &other_url)));
    }

    #[tokio::test]
    async fn plain_http_is_refused_without_the_flag() {
        let fetcher = Fetcher {
            settings: JwksSettings::default(),
            client: OnceLock::new(),
            metrics: JwksMetrics::default(),
        };
        for url in [
            "http://127.0.0.1:1/jwks",
            "http://idp.example.com/jwks",
            "ftp://idp.example.com/",
        ] {
            assert!(
                matches!(fetcher.get(url).await, Err(FetchError::Refused)),
                "{url}"
            );
        }
        let fetcher = Fetcher {
            settings: JwksSettings {
                allow_insecure_loopback: true,
                ..JwksSettings::default()
            },
            ..fetcher
        };
        assert!(matches!(
            fetcher.get("http://idp.example.com/jwks").await,
            Err(FetchError::Refused)
        ));
    }
}
