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
    pub target_healthy: Family<TargetLabels, Gauge>,
    pub access_log_dropped: Counter,
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
        let target_healthy = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "upstream_target_healthy",
            "1 while a target takes traffic (health checks and passive ejection)",
            target_healthy.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind or failed",
            access_log_dropped.clone(),
        );
        Metrics {
            access_log_dropped,
            target_healthy,
            registry,
            requests,
            latency,
            config_revision,
            config_apply_errors,
            config_stream_connected,
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
