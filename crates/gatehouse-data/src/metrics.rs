//! The data plane's Prometheus metrics, served on the ops listener.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route name, or `none` when no route matched.
    pub route: Arc<String>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub upstream: String,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<String>,
}

/// One rate limit of one policy, and what it answered (or which fallback).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub policy: String,
    pub limit: String,
    pub outcome: String,
}

/// How a revision was taken into service: `full` (compiled from the whole
/// state) or `delta` (the previous revision patched with what changed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    pub kind: &'static str,
}

fn apply_histogram() -> Histogram {
    // 10 µs to about 80 s.
    Histogram::new(exponential_buckets(0.00001, 2.0, 24))
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every metric of a data plane.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub config_revision: Gauge<u64, AtomicU64>,
    pub config_apply_errors: Counter,
    pub config_stream_connected: Gauge,
    pub config_stream_wrong_cluster: Counter,
    pub config_applies: Family<ApplyLabels, Counter>,
    pub config_apply_duration: Family<ApplyLabels, Histogram, fn() -> Histogram>,
    pub api_keys: Gauge,
    pub lkg_writes: Counter,
    pub lkg_write_duration: Histogram,
    pub target_healthy: Family<TargetLabels, Gauge>,
    pub limit_decisions: Family<LimitLabels, Counter>,
    pub limit_deny_cache_hits: Family<LimitLabels, Counter>,
    pub limit_fallbacks: Family<LimitLabels, Counter>,
    pub limit_lease_waits: Family<LimitLabels, Counter>,
    pub redis_duration: Histogram,
    pub redis_errors: Counter,
    pub data_planes: Gauge,
    /// Requests refused with 503 because the in-flight cap was reached.
    pub requests_shed: Counter,
    /// Connections closed at accept because a listener was at its cap.
    pub connections_refused: Counter,
    /// Connections open, across listeners.
    pub connections_open: Gauge,
    /// Requests an injection rule matched, by rule set (`sql_injection`,
    /// `xss`) and action (`detected`, `blocked`).
    pub firewall_matches: Family<FirewallLabels, Counter>,
    pub access_log_dropped: Counter,
    /// JWKS fetches, key-set times and sizes, by issuer.
    pub jwks: crate::jwks::JwksMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FirewallLabels {
    pub rule: &'static str,
    pub action: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gatehouse");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from the request's arrival to the response headers, by route",
            latency.clone(),
        );
        let config_revision = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "config_revision",
            "The configuration revision being served",
            config_revision.clone(),
        );
        let config_apply_errors = Counter::default();
        registry.register(
            "config_apply_errors",
            "Revisions that could not be compiled and were not served",
            config_apply_errors.clone(),
        );
        let config_stream_connected = Gauge::default();
        registry.register(
            "config_stream_connected",
            "1 while the config stream to a control-plane node is up",
            config_stream_connected.clone(),
        );
        let config_stream_wrong_cluster = Counter::default();
        registry.register(
            "config_stream_wrong_cluster",
            "Control-plane nodes not followed because they belong to another cluster than this data plane (refused by the node, or found by the data plane)",
            config_stream_wrong_cluster.clone(),
        );
        let config_applies = Family::<ApplyLabels, Counter>::default();
        registry.register(
            "config_applies",
            "Revisions taken into service, by kind: full (compiled from the whole configuration) or delta (the previous revision patched with the changed objects)",
            config_applies.clone(),
        );
        let config_apply_duration =
            Family::<ApplyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                apply_histogram as fn() -> Histogram,
            );
        registry.register(
            "config_apply_duration_seconds",
            "Time to compile and swap in one revision, by kind (full or delta)",
            config_apply_duration.clone(),
        );
        let api_keys = Gauge::default();
        registry.register(
            "config_api_keys",
            "API keys in the configuration being served",
            api_keys.clone(),
        );
        let lkg_writes = Counter::default();
        registry.register(
            "last_known_good_writes",
            "Last-known-good files written (each holds the newest applied revision; revisions that arrive during a write are coalesced)",
            lkg_writes.clone(),
        );
        let lkg_write_duration = apply_histogram();
        registry.register(
            "last_known_good_write_duration_seconds",
            "Time to serialize, checksum, write and sync one last-known-good file",
            lkg_write_duration.clone(),
        );
        let target_healthy = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "upstream_target_healthy",
            "1 while a target takes traffic (health checks and passive ejection)",
            target_healthy.clone(),
        );
        let limit_decisions = Family::<LimitLabels, Counter>::default();
        registry.register(
            "ratelimit_decisions",
            "Rate-limit decisions, by policy, limit and outcome (allowed, limited, unavailable)",
            limit_decisions.clone(),
        );
        let limit_deny_cache_hits = Family::<LimitLabels, Counter>::default();
        registry.register(
            "ratelimit_deny_cache_hits",
            "Cluster-limit refusals answered on this node without asking Redis (the key was refused until a known time)",
            limit_deny_cache_hits.clone(),
        );
        let limit_fallbacks = Family::<LimitLabels, Counter>::default();
        registry.register(
            "ratelimit_fallbacks",
            "Cluster-limit decisions Redis did not answer in time, by the failure mode applied (outcome: open, closed, local)",
            limit_fallbacks.clone(),
        );
        let limit_lease_waits = Family::<LimitLabels, Counter>::default();
        registry.register(
            "ratelimit_lease_waits",
            "Cost-mode decisions that found no leased token while this node was fetching a lease, and waited for it (outcome: waited)",
            limit_lease_waits.clone(),
        );
        let redis_duration = redis_duration_histogram();
        registry.register(
            "ratelimit_redis_duration_seconds",
            "Time of one rate-limit script call to Redis (a batch of decisions), answered ones only",
            redis_duration.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "ratelimit_redis_errors",
            "Rate-limit script calls to Redis that failed or timed out, and decisions asked with no connection",
            redis_errors.clone(),
        );
        let data_planes = Gauge::default();
        registry.register(
            "data_planes_reported",
            "Data planes the control plane reports; a cluster limit's local fallback is its limit divided by this",
            data_planes.clone(),
        );
        let requests_shed = Counter::default();
        registry.register(
            "requests_shed",
            "Requests refused with 503 because the data plane was at its cap of requests in flight",
            requests_shed.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept because a listener was at its connection cap",
            connections_refused.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open on the proxy listeners",
            connections_open.clone(),
        );
        let firewall_matches = Family::<FirewallLabels, Counter>::default();
        registry.register(
            "firewall_matches",
            "Requests an injection rule matched, by rule set and action (detected or blocked)",
            firewall_matches.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind or failed",
            access_log_dropped.clone(),
        );
        let jwks = crate::jwks::JwksMetrics::default();
        registry.register(
            "jwks_fetches",
            "JWKS fetches, by issuer and outcome (ok, unreachable, status, too_large, invalid, refused)",
            jwks.fetches.clone(),
        );
        registry.register(
            "jwks_fetched_at_seconds",
            "Unix time at which the key set in use was fetched, by issuer",
            jwks.fetched_at.clone(),
        );
        registry.register(
            "jwks_keys",
            "Usable keys in the key set in use, by issuer",
            jwks.keys.clone(),
        );
        Metrics {
            jwks,
            data_planes,
            limit_decisions,
            limit_deny_cache_hits,
            limit_fallbacks,
            limit_lease_waits,
            redis_duration,
            redis_errors,
            requests_shed,
            connections_refused,
            connections_open,
            firewall_matches,
            access_log_dropped,
            target_healthy,
            registry,
            requests,
            latency,
            config_revision,
            config_apply_errors,
            config_stream_connected,
            config_stream_wrong_cluster,
            config_applies,
            config_apply_duration,
            api_keys,
            lkg_writes,
            lkg_write_duration,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The buckets of `gatehouse_ratelimit_redis_duration_seconds`: 50 µs to
/// about 0.8 s.
pub fn redis_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 15))
}
