//! Rate limits of policies, counted in this data plane with governor (GCRA).
//!
//! A limit of `limit` requests per `window` replenishes one request every
//! `window / limit` and lets up to `limit + burst` through at once after a
//! quiet spell: a token bucket, so a client that keeps to the rate is never
//! refused and one that bursts gets at most the bucket.
//!
//! Counters outlive revisions: they are kept in a [`LimiterRegistry`] keyed
//! by policy, limit and quota, so a config change that leaves a limit alone
//! does not hand every client a fresh bucket. Idle keys are evicted in the
//! background, which bounds memory by the clients active in one window.
//!
//! Limits with `scope: cluster` are counted here too, per data plane, until
//! the shared counter store is built: N data planes then admit up to N times
//! the limit. `docs/configuration.md` says so.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_model::object::RateLimit;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName, HeaderValue};

type Limiter =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

type RegistryKey = (String, String, u64, Duration, u64);

/// Counters by (policy, limit, quota), across revisions.
#[derive(Default)]
pub struct LimiterRegistry(Mutex<HashMap<RegistryKey, Arc<Limiter>>>);

impl std::fmt::Debug for LimiterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LimiterRegistry")
    }
}

impl LimiterRegistry {
    fn get(&self, key: RegistryKey, quota: Quota) -> Arc<Limiter> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>())
            })
            .clone()
    }

    /// Forgets counters of limits no revision uses any more, and keys idle
    /// long enough to have a full bucket again.
    pub fn evict_idle(&self) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, limiter| Arc::strong_count(limiter) > 1);
        for limiter in map.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[derive(Debug)]
enum KeyPart {
    Consumer,
    ClientIp,
    Route,
    Header(HeaderName),
}

/// One limit, compiled.
pub struct CompiledLimit {
    name: String,
    parts: Vec<KeyPart>,
    limiter: Arc<Limiter>,
    limit: u64,
    window: Duration,
    capacity: u64,
    period: Duration,
}

impl std::fmt::Debug for CompiledLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledLimit")
            .field("name", &self.name)
            .finish()
    }
}

impl CompiledLimit {
    pub fn compile(
        policy: &str,
        l: &RateLimit,
        registry: &LimiterRegistry,
    ) -> Result<CompiledLimit, String> {
        let fail = |what: &str| format!("policy \"{policy}\": rate limit \"{}\": {what}", l.name);
        let parts = l
            .key
            .iter()
            .map(|k| match k.as_str() {
                "consumer" => Ok(KeyPart::Consumer),
                "client_ip" => Ok(KeyPart::ClientIp),
                "route" => Ok(KeyPart::Route),
                other => other
                    .strip_prefix("header:")
                    .and_then(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                    .map(KeyPart::Header)
                    .ok_or_else(|| fail(&format!("key {other:?} is not understood"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let period = (l.window / u32::try_from(l.limit).map_err(|_| fail("limit is too large"))?)
            .max(Duration::from_nanos(1));
        let capacity = l.limit.saturating_add(l.burst).min(u64::from(u32::MAX));
        let burst =
            NonZeroU32::new(capacity as u32).ok_or_else(|| fail("limit must be at least 1"))?;
        let quota = Quota::with_period(period)
            .ok_or_else(|| fail("window is too short"))?
            .allow_burst(burst);
        let limiter = registry.get(
            (
                policy.to_string(),
                l.name.clone(),
                l.limit,
                l.window,
                l.burst,
            ),
            quota,
        );
        Ok(CompiledLimit {
            name: l.name.clone(),
            parts,
            limiter,
            limit: l.limit,
            window: l.window,
            capacity,
            period,
        })
    }

    fn key(&self, ctx: &LimitContext<'_>) -> String {
        let mut key = String::new();
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                key.push('\u{1f}');
            }
            match part {
                KeyPart::Consumer => key.push_str(ctx.consumer.unwrap_or("")),
                KeyPart::ClientIp => key.push_str(&ctx.client_ip.to_string()),
                KeyPart::Route => key.push_str(ctx.route),
                KeyPart::Header(h) => key.push_str(
                    ctx.headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(""),
                ),
            }
        }
        key
    }
}

/// What a request is counted by.
#[derive(Debug)]
pub struct LimitContext<'a> {
    pub consumer: Option<&'a str>,
    pub client_ip: IpAddr,
    pub route: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome of a request's limits: the headers to send either way, and
/// when refused, how long to wait.
#[derive(Debug)]
pub struct Decision {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub retry_after: Option<Duration>,
}

/// Counts the request against every limit; the most restrictive answer wins.
pub fn check(limits: &[CompiledLimit], ctx: &LimitContext<'_>) -> Option<Decision> {
    if limits.is_empty() {
        return None;
    }
    let clock = DefaultClock::default();
    // (limit, remaining, reset, wait when refused) of the tightest limit.
    let mut tightest: Option<(u64, u64, Duration, Option<Duration>)> = None;
    for limit in limits {
        let key = limit.key(ctx);
        let (remaining, wait) = match limit.limiter.check_key(&key) {
            Ok(snapshot) => (u64::from(snapshot.remaining_burst_capacity()), None),
            Err(not_until) => (0, Some(not_until.wait_time_from(clock.now()))),
        };
        // Time until the bucket is full again.
        let reset = limit
            .period
            .saturating_mul((limit.capacity - remaining.min(limit.capacity)) as u32);
        let tighter = match &tightest {
            None => true,
            Some((_, r, _, w)) => match (wait, w) {
                (Some(a), Some(b)) => a > *b,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => remaining < *r,
            },
        };
        if tighter {
            tightest = Some((limit.limit, remaining, reset, wait));
        }
    }
    let (limit, remaining, reset, wait) = tightest?;
    let policy = limits
        .iter()
        .map(|l| format!("{};w={}", l.limit, l.window.as_secs().max(1)))
        .collect::<Vec<_>>()
        .join(", ");
    let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let state = format!(
        "limit={limit}, remaining={remaining}, reset={}",
        secs(reset)
    );
    let mut headers = Vec::new();
    if let Ok(v) = HeaderValue::from_str(&policy) {
        headers.push((RATELIMIT_POLICY, v));
    }
    if let Ok(v) = HeaderValue::from_str(&state) {
        headers.push((RATELIMIT, v));
    }
    Some(Decision {
        headers,
        retry_after: wait.map(|w| Duration::from_secs(secs(w).max(1))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_model::object::{LimitScope, StoreFailure};

    fn limit(name: &str, key: &[&str], limit: u64, window: Duration, burst: u64) -> RateLimit {
        RateLimit {
            name: name.into(),
            scope: LimitScope::Local,
            key: key.iter().map(|k| k.to_string()).collect(),
            limit,
            window,
            burst,
            on_store_failure: StoreFailure::Open,
        }
    }

    fn ctx<'a>(headers: &'a HeaderMap, ip: &str) -> LimitContext<'a> {
        LimitContext {
            consumer: Some("acme"),
            client_ip: ip.parse().unwrap(),
            route: "r",
            headers,
        }
    }

    #[test]
    fn a_bucket_admits_its_capacity_then_refuses_with_a_wait() {
        let reg = LimiterRegistry::default();
        let l = CompiledLimit::compile(
            "p",
            &limit("ip", &["client_ip"], 3, Duration::from_secs(60), 0),
            &reg,
        )
        .unwrap();
        let h = HeaderMap::new();
        let limits = [l];
        for expected_remaining in [2, 1, 0] {
            let d = check(&limits, &ctx(&h, "10.0.0.1")).unwrap();
            assert!(d.retry_after.is_none());
            let state = d
                .headers
                .iter()
                .find(|(n, _)| *n == RATELIMIT)
                .unwrap()
                .1
                .to_str()
                .unwrap()
                .to_string();
            assert!(
                state.starts_with(&format!("limit=3, remaining={expected_remaining}, ")),
                "{state}"
            );
        }
        let d = check(&limits, &ctx(&h, "10.0.0.1")).unwrap();
        let wait = d.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
            "one request per 20 s: {wait:?}"
        );
        assert_eq!(
            d.headers
                .iter()
                .find(|(n, _)| *n == RATELIMIT_POLICY)
                .unwrap()
                .1,
            "3;w=60"
        );
        // Another client has its own bucket.
        assert!(check(&limits, &ctx(&h, "10.0.0.2"))
            .unwrap()
            .retry_after
            .is_none());
    }

    #[test]
    fn the_most_restrictive_limit_wins_and_counters_survive_a_recompile() {
        let reg = LimiterRegistry::default();
        let small = limit("small", &["consumer"], 1, Duration::from_secs(60), 0);
        let big = limit("big", &["consumer"], 100, Duration::from_secs(60), 0);
        let h = HeaderMap::new();
        let limits = [
            CompiledLimit::compile("p", &big, &reg).unwrap(),
            CompiledLimit::compile("p", &small, &reg).unwrap(),
        ];
        assert!(check(&limits, &ctx(&h, "10.0.0.1"))
            .unwrap()
            .retry_after
            .is_none());
        let again = [CompiledLimit::compile("p", &small, &reg).unwrap()];
        assert!(
            check(&again, &ctx(&h, "10.0.0.1"))
                .unwrap()
                .retry_after
                .is_some(),
            "the same bucket after a recompile"
        );
        drop(limits);
        drop(again);
        reg.evict_idle();
        let fresh = [CompiledLimit::compile("p", &small, &reg).unwrap()];
        assert!(
            check(&fresh, &ctx(&h, "10.0.0.1"))
                .unwrap()
                .retry_after
                .is_none(),
            "unused limits are forgotten"
        );
    }

    #[test]
    fn header_keys_separate_buckets() {
        let reg = LimiterRegistry::default();
        let l = [CompiledLimit::compile(
            "p",
            &limit(
                "tenant",
                &["header:X-Tenant"],
                1,
                Duration::from_secs(60),
                0,
            ),
            &reg,
        )
        .unwrap()];
        let mut a = HeaderMap::new();
        a.insert("x-tenant", "a".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert("x-tenant", "b".parse().unwrap());
        assert!(check(&l, &ctx(&a, "10.0.0.1"))
            .unwrap()
            .retry_after
            .is_none());
        assert!(check(&l, &ctx(&a, "10.0.0.1"))
            .unwrap()
            .retry_after
            .is_some());
        assert!(check(&l, &ctx(&b, "10.0.0.1"))
            .unwrap()
            .retry_after
            .is_none());
    }
}
