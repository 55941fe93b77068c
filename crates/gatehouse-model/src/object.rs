//! The configuration objects of DESIGN.md as plain Rust values.
//!
//! Every kind is one struct that carries its own `name`, `labels` and
//! `revision` next to its fields, so the same type reads from a declarative
//! file (with unknown keys refused), travels over the admin API as JSON and
//! sits in the replicated state. Field-level rules live in [`crate::validate`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Labels attached to an object, used by list selectors and ownership.
pub type Labels = BTreeMap<String, String>;

/// The kinds of object the control plane stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Upstream,
    Route,
    Policy,
    Consumer,
    ApiKey,
    JwtIssuer,
    Certificate,
    AdminToken,
}

impl Kind {
    /// Every kind, in the order a configuration is best read and applied.
    pub const ALL: [Kind; 8] = [
        Kind::Certificate,
        Kind::Upstream,
        Kind::JwtIssuer,
        Kind::Policy,
        Kind::Route,
        Kind::Consumer,
        Kind::ApiKey,
        Kind::AdminToken,
    ];

    /// The singular snake_case name used in messages, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Upstream => "upstream",
            Kind::Route => "route",
            Kind::Policy => "policy",
            Kind::Consumer => "consumer",
            Kind::ApiKey => "api_key",
            Kind::JwtIssuer => "jwt_issuer",
            Kind::Certificate => "certificate",
            Kind::AdminToken => "admin_token",
        }
    }

    /// The plural, as used for the lists of a declarative file.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Upstream => "upstreams",
            Kind::Route => "routes",
            Kind::Policy => "policies",
            Kind::Consumer => "consumers",
            Kind::ApiKey => "api_keys",
            Kind::JwtIssuer => "jwt_issuers",
            Kind::Certificate => "certificates",
            Kind::AdminToken => "admin_tokens",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a kind name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind \"{0}\" (expected one of upstream, route, policy, consumer, api_key, jwt_issuer, certificate, admin_token)")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts the singular or plural, with `-` or `_`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.to_ascii_lowercase().replace('-', "_");
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == wanted || k.plural() == wanted)
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// A reference to an object by kind and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: Kind,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} \"{}\"", self.kind, self.name)
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_true(v: &bool) -> bool {
    *v
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// Declares the kind structs' shared `name`/`labels`/`revision` header once.
macro_rules! object_kinds {
    ($($kind:ident),* $(,)?) => {
        /// Any configuration object. On the wire it is JSON with a `kind` tag.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        // A Policy (with its firewall) is the largest kind. Objects live in
        // the state's persistent maps and are compiled off the request path,
        // so the size of a moved Object costs nothing that matters; boxing
        // one kind would make every constructor of it noisier.
        #[allow(clippy::large_enum_variant)]
        pub enum Object {
            $($kind($kind),)*
        }

        impl Object {
            pub fn kind(&self) -> Kind {
                match self { $(Object::$kind(_) => Kind::$kind,)* }
            }
            pub fn name(&self) -> &str {
                match self { $(Object::$kind(o) => &o.name,)* }
            }
            pub fn labels(&self) -> &Labels {
                match self { $(Object::$kind(o) => &o.labels,)* }
            }
            /// The log index of the write that last changed this object; 0 before it is stored.
            pub fn revision(&self) -> u64 {
                match self { $(Object::$kind(o) => o.revision,)* }
            }
            pub fn set_revision(&mut self, revision: u64) {
                match self { $(Object::$kind(o) => o.revision = revision,)* }
            }
            pub fn object_ref(&self) -> ObjectRef {
                ObjectRef { kind: self.kind(), name: self.name().to_string() }
            }
        }

        $(impl From<$kind> for Object {
            fn from(o: $kind) -> Self { Object::$kind(o) }
        })*
    };
}

object_kinds!(
    Upstream,
    Route,
    Policy,
    Consumer,
    ApiKey,
    JwtIssuer,
    Certificate,
    AdminToken
);

/// A pool of backend targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    /// The backends, as `host:port`.
    pub targets: Vec<Target>,
    #[serde(default)]
    pub balancer: Balancer,
    /// The request header hashed by the `consistent_hash` balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// How the gateway speaks to the targets: HTTP/1.1, or HTTP/2 (required
    /// for gRPC, sent with prior knowledge when there is no TLS).
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: UpstreamProtocol,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub address: String,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    #[default]
    RoundRobin,
    LeastRequests,
    ConsistentHash,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// The HTTP path probed on each target.
    pub path: String,
    #[serde(default = "defaults::health_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "defaults::health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "defaults::threshold")]
    pub healthy_threshold: u32,
    #[serde(default = "defaults::threshold")]
    pub unhealthy_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Further attempts after the first one.
    #[serde(default = "defaults::retry_attempts")]
    pub attempts: u32,
    /// Retry non-idempotent methods too (off by default: a POST may have had an effect).
    #[serde(default, skip_serializing_if = "is_false")]
    pub non_idempotent: bool,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: defaults::retry_attempts(),
            non_idempotent: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Consecutive failures that open the circuit.
    pub consecutive_failures: u32,
    /// How long the circuit stays open before a trial request.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name sent as SNI and checked in the backend's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM CA bundle that the backend's certificate must chain to; the system roots when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

/// Which requests go to which upstream, under which policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    /// Exact hosts or `*.` wildcards; empty matches any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub paths: Vec<PathMatch>,
    /// Upper-case method names; empty matches any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    pub upstream: String,
    /// Remove the matched prefix before forwarding.
    #[serde(default, skip_serializing_if = "is_false")]
    pub strip_prefix: bool,
    /// Opt out of path canonicalisation: the upstream receives the path
    /// exactly as the client sent it, and a path the canonicaliser refuses
    /// (an encoded `/`, say) may still reach this route. Off by default.
    #[serde(default, skip_serializing_if = "is_false")]
    pub raw_path: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// One path rule: exactly one of `exact`, `prefix` or `regex`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// What guards a route: who may call it, how often, and what is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    /// Accepted credentials, any of them; empty means no authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authentication: Vec<AuthMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtAuth>,
    /// Client certificates (on the TLS listener), when authentication lists `mtls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsAuth>,
    /// Opaque bearer tokens checked at an RFC 7662 endpoint, when
    /// authentication lists `introspection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introspection: Option<IntrospectionAuth>,
    #[serde(default)]
    pub authorization: Authorization,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
    /// Whether the policy's responses carry `RateLimit-Policy` and
    /// `RateLimit` (the limits and what is left of them). `false` keeps
    /// both from clients; a refusal still carries `Retry-After`.
    #[serde(default = "defaults::yes", skip_serializing_if = "is_true")]
    pub rate_limit_headers: bool,
    /// Per-consumer quotas over calendar days or months, counted in Redis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<Quota>,
    #[serde(default)]
    pub firewall: Firewall,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ApiKey,
    Jwt,
    Mtls,
    Introspection,
}

/// Client certificates: the chain must lead to `ca_pem`; the certificate
/// names a Consumer object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsAuth {
    /// PEM CA certificate(s) a client certificate must chain to.
    pub ca_pem: String,
    /// Which part of the client certificate names the consumer.
    #[serde(default, skip_serializing_if = "is_default")]
    pub consumer_from: CertIdentity,
}

/// The part of a client certificate that names the consumer: the subject's
/// common name, or the first DNS subject alternative name. The value must be
/// a Consumer's name exactly (consumer names are lower-case a-z, 0-9, '-'
/// and '.', so URI and e-mail names could never match and are not offered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertIdentity {
    #[default]
    SubjectCn,
    SanDns,
}

/// OAuth2 token introspection (RFC 7662) of opaque bearer tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionAuth {
    /// The introspection endpoint: https (plain http only on loopback, and
    /// only where the data plane allows it).
    pub url: String,
    /// The gateway's client credentials, sent with HTTP Basic.
    pub client_id: String,
    /// Key material: sealed at rest like other secrets.
    pub client_secret: String,
    /// PEM CA bundle the endpoint's certificate must chain to; the system
    /// roots when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The response member that names the consumer (`sub`, then `username`
    /// when the default is absent).
    #[serde(default = "defaults::consumer_claim")]
    pub consumer_claim: String,
    /// How long an active answer is reused (never past the token's `exp`).
    #[serde(
        default = "defaults::introspection_cache_ttl",
        with = "humantime_serde"
    )]
    pub cache_ttl: Duration,
    /// How long an inactive answer is reused.
    #[serde(
        default = "defaults::introspection_negative_ttl",
        with = "humantime_serde"
    )]
    pub negative_cache_ttl: Duration,
    /// Cached answers kept at most (the oldest go first).
    #[serde(default = "defaults::introspection_cache_entries")]
    pub max_cache_entries: u32,
    /// How long one call to the endpoint may take.
    #[serde(default = "defaults::introspection_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyAuth {
    #[serde(default = "defaults::api_key_header")]
    pub header: String,
    /// A query parameter that may carry the key; off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_param: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtAuth {
    /// Names of the JwtIssuer objects whose tokens are accepted.
    pub issuers: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// The consumer must be in one of these groups (when non-empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The token must carry all of these scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimMatch>,
}

/// A claim rule: exactly one of `equals`, `one_of` or `contains`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimMatch {
    pub claim: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub name: String,
    #[serde(default)]
    pub scope: LimitScope,
    /// What the counter is keyed by: `consumer`, `client_ip`, `route` or `header:NAME`, combined.
    pub key: Vec<String>,
    /// Requests admitted per window.
    pub limit: u64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub burst: u64,
    #[serde(default)]
    pub on_store_failure: StoreFailure,
    /// Cost mode of a cluster limit: each data plane takes up to this many
    /// tokens from Redis at once and spends them locally (0: one Redis call
    /// per request, exact).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lease: u64,
}

/// A number of requests per consumer per calendar period (UTC), for usage
/// plans: counted in the shared counter store, reset when the period ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub name: String,
    pub period: QuotaPeriod,
    /// Requests admitted per consumer per period.
    pub limit: u64,
    /// `open` or `closed`: a quota has no local share.
    #[serde(default)]
    pub on_store_failure: StoreFailure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    /// From 00:00 UTC to the next.
    Day,
    /// From the first day of a month, 00:00 UTC, to the next.
    Month,
}

impl QuotaPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    #[default]
    Local,
    Cluster,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreFailure {
    #[default]
    Open,
    Closed,
    Local,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Firewall {
    /// Only these client networks may pass (when non-empty), as CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_ips: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is believed, as CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<u64>,
    /// At most this many header fields (431 past it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_count: Option<u32>,
    /// At most this many bytes of request target, path and query (414 past it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uri_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_methods: Vec<String>,
    #[serde(default)]
    pub sql_injection: RuleMode,
    #[serde(default)]
    pub xss: RuleMode,
    /// Headers (besides the path and the query) that the injection rules read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inspect_headers: Vec<String>,
    /// How much of a textual request body the injection rules read (0: none).
    #[serde(
        default = "defaults::inspect_body_bytes",
        skip_serializing_if = "defaults::is_inspect_body_bytes"
    )]
    pub inspect_body_bytes: u64,
    /// Requests whose `User-Agent` matches one of these regular expressions
    /// (case-insensitive) are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_user_agents: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
}

impl Default for Firewall {
    fn default() -> Self {
        Firewall {
            allow_ips: Vec::new(),
            deny_ips: Vec::new(),
            trusted_proxies: Vec::new(),
            max_body_bytes: None,
            max_header_bytes: None,
            max_header_count: None,
            max_uri_bytes: None,
            allowed_methods: Vec::new(),
            sql_injection: RuleMode::Off,
            xss: RuleMode::Off,
            inspect_headers: Vec::new(),
            inspect_body_bytes: defaults::inspect_body_bytes(),
            deny_user_agents: Vec::new(),
            cors: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleMode {
    #[default]
    Off,
    Detect,
    Block,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    pub allowed_origins: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_credentials: bool,
    #[serde(default = "defaults::cors_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

/// A caller of the API: the identity that keys and tokens resolve to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    pub name: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// An API key: its name is the key id; only the SHA-256 of the secret is kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    pub consumer: String,
    /// Lower-case hex SHA-256 of the secret.
    pub key_hash: String,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub revoked: bool,
}

/// A trusted token issuer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    pub name: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    /// The expected `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values; the token must name at least one.
    pub audiences: Vec<String>,
    pub algorithms: Vec<JwtAlgorithm>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<JwtKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// How often the data plane fetches `jwks_url` again [default: 5m].
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwks_refresh: Option<Duration>,
    /// After a token names an unknown `kid`, how long before another such
    /// token may make the data plane fetch `jwks_url` again [default: 30s].
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwks_cooldown: Option<Duration>,
    /// How long the last key set fetched keeps checking tokens while
    /// `jwks_url` cannot be fetched; past it, tokens get 503 [default: 24h].
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwks_max_stale: Option<Duration>,
    #[serde(default = "defaults::jwt_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// The claim that names the consumer.
    #[serde(default = "defaults::consumer_claim")]
    pub consumer_claim: String,
    #[serde(default = "defaults::max_token_bytes")]
    pub max_token_bytes: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

/// A static verification key: exactly one of `pem` (public key) or `secret` (HMAC).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// A server certificate chosen by SNI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    pub server_names: Vec<String>,
    pub certificate_pem: String,
    pub private_key_pem: String,
}

/// A credential of the admin API; control plane only, never streamed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    pub name: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    pub role: AdminRole,
    /// Lower-case hex SHA-256 of the token.
    pub token_hash: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    Admin,
    Editor,
    Viewer,
    DataPlane,
}

/// Defaults of optional fields, named so the configuration reference can cite them.
pub mod defaults {
    use std::time::Duration;

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn threshold() -> u32 {
        2
    }
    pub fn retry_attempts() -> u32 {
        1
    }
    pub fn api_key_header() -> String {
        "x-api-key".to_string()
    }
    pub fn inspect_body_bytes() -> u64 {
        8 * 1024
    }
    pub fn is_inspect_body_bytes(v: &u64) -> bool {
        *v == inspect_body_bytes()
    }
    pub fn cors_max_age() -> Duration {
        Duration::from_secs(600)
    }
    pub fn jwks_refresh() -> Duration {
        Duration::from_secs(300)
    }
    pub fn jwks_cooldown() -> Duration {
        Duration::from_secs(30)
    }
    pub fn jwks_max_stale() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn jwt_leeway() -> Duration {
        Duration::from_secs(30)
    }
    pub fn consumer_claim() -> String {
        "sub".to_string()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn max_token_bytes() -> u32 {
        8192
    }
    pub fn introspection_cache_ttl() -> Duration {
        Duration::from_secs(60)
    }
    pub fn introspection_negative_ttl() -> Duration {
        Duration::from_secs(5)
    }
    pub fn introspection_cache_entries() -> u32 {
        10_000
    }
    pub fn introspection_timeout() -> Duration {
        Duration::from_secs(2)
    }
}
