//! Target health: active probes, passive ejection (a per-target circuit
//! breaker), and the state they share with the balancers.
//!
//! Health belongs to a target of an upstream, not to a revision: the state
//! lives in a [`HealthRegistry`] keyed by (upstream, address) and is carried
//! over when a new revision is compiled, so a config change neither forgets
//! that a target is down nor resets a probe.
//!
//! - **Active**: when the Upstream has `health_check`, each target is probed
//!   with `GET path` every `interval`; `unhealthy_threshold` failures in a row
//!   (an error, a timeout, or a status of 500 and up) take it out of rotation,
//!   `healthy_threshold` successes bring it back. Targets start healthy.
//! - **Passive**: every proxied request that fails to connect or times out
//!   counts against its target; `circuit_breaker.consecutive_failures` in a row
//!   (default 5) eject it for `circuit_breaker.open_for` (default 10 s), after
//!   which requests may try it again (half-open: one more failure ejects it
//!   again at once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_model::object::HealthCheck;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Passive ejection defaults when an upstream sets no circuit breaker.
pub const DEFAULT_EJECT_AFTER: u32 = 5;
pub const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The health of one target, shared by every revision that has it.
#[derive(Debug)]
pub struct TargetHealth {
    probe_ok: AtomicBool,
    probe_streak: AtomicU32,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
}

impl Default for TargetHealth {
    fn default() -> Self {
        TargetHealth {
            probe_ok: AtomicBool::new(true),
            probe_streak: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }
}

impl TargetHealth {
    /// Whether requests may go to this target now.
    pub fn available(&self) -> bool {
        self.probe_ok.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    pub fn probe_healthy(&self) -> bool {
        self.probe_ok.load(Ordering::Relaxed)
    }

    /// A proxied request reached the target and got an answer.
    pub fn record_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// A proxied request could not connect or timed out.
    pub fn record_failure(&self, eject_after: u32, eject_for: Duration) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= eject_after {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms
                .store(now_ms() + eject_for.as_millis() as u64, Ordering::Relaxed);
            tracing::warn!(
                ?eject_for,
                "target ejected after {failures} failures in a row"
            );
        }
    }

    /// One active probe's outcome; positive streaks count successes, negative failures.
    fn record_probe(&self, ok: bool, check: &HealthCheck) -> bool {
        let streak = self.probe_streak.load(Ordering::Relaxed) as i32;
        let streak = match (ok, streak) {
            (true, s) if s > 0 => s + 1,
            (true, _) => 1,
            (false, s) if s < 0 => s - 1,
            (false, _) => -1,
        };
        self.probe_streak.store(streak as u32, Ordering::Relaxed);
        let was = self.probe_ok.load(Ordering::Relaxed);
        if !was && streak >= check.healthy_threshold as i32 {
            self.probe_ok.store(true, Ordering::Relaxed);
        } else if was && -streak >= check.unhealthy_threshold as i32 {
            self.probe_ok.store(false, Ordering::Relaxed);
        }
        self.probe_ok.load(Ordering::Relaxed)
    }
}

type Key = (String, String);

struct Probe {
    check: HealthCheck,
    task: tokio::task::JoinHandle<()>,
}

/// Every target's health, and the probes running for them.
#[derive(Default)]
pub struct HealthRegistry {
    targets: Mutex<HashMap<Key, Arc<TargetHealth>>>,
    probes: Mutex<HashMap<Key, Probe>>,
}

impl std::fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HealthRegistry")
    }
}

impl Drop for HealthRegistry {
    fn drop(&mut self) {
        let probes = self.probes.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, p) in probes.drain() {
            p.task.abort();
        }
    }
}

impl HealthRegistry {
    /// The health of a target, created healthy on first sight.
    pub fn target(&self, upstream: &str, address: &str) -> Arc<TargetHealth> {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets
            .entry((upstream.to_string(), address.to_string()))
            .or_default()
            .clone()
    }

    /// (upstream, target, available now) for every known target.
    pub fn snapshot(&self) -> Vec<(String, String, bool)> {
        let targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets
            .iter()
            .map(|((u, a), h)| (u.clone(), a.clone(), h.available()))
            .collect()
    }

    /// Makes the probes match a new revision: starts missing ones, restarts
    /// changed ones, stops those whose target or check is gone, and forgets
    /// the health of targets no longer configured. `wanted` lists
    /// (upstream, address, check) for every target of the revision.
    pub fn reconcile(&self, wanted: Vec<(String, String, Option<HealthCheck>)>) {
        let keys: std::collections::HashSet<Key> = wanted
            .iter()
            .map(|(u, a, _)| (u.clone(), a.clone()))
            .collect();
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keys.contains(k));
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        let mut keep = std::collections::HashSet::new();
        for (upstream, address, check) in wanted {
            let Some(check) = check else { continue };
            let key = (upstream.clone(), address.clone());
            keep.insert(key.clone());
            if probes.get(&key).is_some_and(|p| p.check == check) {
                continue;
            }
            if let Some(old) = probes.remove(&key) {
                old.task.abort();
            }
            let health = self.target(&upstream, &address);
            let task = tokio::spawn(probe_loop(upstream, address, check.clone(), health));
            probes.insert(key, Probe { check, task });
        }
        probes.retain(|k, p| {
            let keep = keep.contains(k);
            if !keep {
                p.task.abort();
            }
            keep
        });
    }
}

async fn probe_loop(
    upstream: String,
    address: String,
    check: HealthCheck,
    health: Arc<TargetHealth>,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(check.timeout));
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let url = format!("http://{address}{}", check.path);
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let request = http::Request::get(&url)
            .header(http::header::USER_AGENT, "gatehouse-health-check")
            .body(Empty::new());
        let ok = match request {
            Ok(req) => matches!(
                tokio::time::timeout(check.timeout, client.request(req)).await,
                Ok(Ok(resp)) if resp.status().as_u16() < 500
            ),
            Err(_) => false,
        };
        let was = health.probe_healthy();
        let now = health.record_probe(ok, &check);
        if was != now {
            tracing::warn!(%upstream, target = %address, healthy = now, "target health changed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(healthy: u32, unhealthy: u32) -> HealthCheck {
        HealthCheck {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
        }
    }

    #[test]
    fn probes_need_a_streak_to_flip_health() {
        let h = TargetHealth::default();
        let c = check(2, 3);
        assert!(
            h.record_probe(false, &c) && h.record_probe(false, &c),
            "two failures are not enough"
        );
        assert!(!h.record_probe(false, &c), "the third takes it out");
        assert!(!h.available());
        assert!(!h.record_probe(true, &c), "one success is not enough");
        assert!(
            !h.record_probe(false, &c) && !h.record_probe(true, &c),
            "the streak restarts"
        );
        assert!(h.record_probe(true, &c), "two in a row bring it back");
        assert!(h.available());
    }

    #[test]
    fn passive_failures_eject_for_a_while() {
        let h = TargetHealth::default();
        h.record_failure(2, Duration::from_secs(60));
        assert!(h.available());
        h.record_success();
        h.record_failure(2, Duration::from_secs(60));
        assert!(h.available(), "a success resets the count");
        h.record_failure(2, Duration::from_secs(60));
        assert!(!h.available(), "two in a row eject it");
        let brief = TargetHealth::default();
        brief.record_failure(1, Duration::ZERO);
        assert!(brief.available(), "back once open_for has passed");
    }

    #[test]
    fn health_survives_a_new_revision_and_is_forgotten_with_its_target() {
        let reg = HealthRegistry::default();
        let first = reg.target("u", "a:1");
        first.record_failure(1, Duration::from_secs(60));
        assert!(
            !reg.target("u", "a:1").available(),
            "the same state for the same target"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            reg.reconcile(vec![("u".into(), "b:1".into(), None)]);
        });
        assert!(
            reg.target("u", "a:1").available(),
            "a removed target starts afresh if it returns"
        );
    }
}
