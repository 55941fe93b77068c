//! Rate limits of policies: GCRA buckets, counted in this data plane with
//! governor (`scope: local`) or in Redis for the whole cluster
//! (`scope: cluster`, see [`store`]).
//!
//! A limit of `limit` requests per `window` replenishes one request every
//! `window / limit` and lets up to `limit + burst` through at once after a
//! quiet spell: a token bucket, so a client that keeps to the rate is never
//! refused and one that bursts gets at most the bucket.
//!
//! Local counters outlive revisions: they are kept in a [`LimiterRegistry`]
//! keyed by policy, limit and quota, so a config change that leaves a limit
//! alone does not hand every client a fresh bucket. Cost mode's leased
//! tokens are kept there the same way, and given back to Redis when the
//! data plane stops. Idle keys are evicted in
//! the background, which bounds memory by the clients active in one window.
//!
//! Cluster limits ask Redis once per request, except for a key this node
//! already saw refused: until the time Redis said it may retry, it is refused
//! here without asking (a refusal changes nothing in Redis, so the answer
//! would be the same). When Redis fails or is slower than the decision
//! timeout, the limit's `on_store_failure` decides: `open` admits, `closed`
//! refuses with 503, `local` counts this node's share of the limit (the
//! limit divided by the number of data planes the control plane reports).
//! Without a configured store, cluster limits are counted on each node with
//! the full limit, as local ones.

pub mod store;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_model::object::{LimitScope, RateLimit, StoreFailure};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use smallvec::SmallVec;

use crate::metrics::{LimitLabels, Metrics};

type Limiter = RateLimiter<
    LimitKey,
    DefaultKeyedStateStore<LimitKey>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// The bucket of a request within one limit: the values of the limit's key
/// parts, normalised (see [`CompiledLimit::key`]), joined by U+001F. An
/// address is a tag byte (4 or 6) and its bytes. Up to 32 bytes (an
/// address, a consumer name, a short header value) are kept inline, so
/// making a key allocates nothing in the common case.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LimitKey(SmallVec<[u8; 32]>);

/// The bytes alone, without the length that hashing a slice adds: a key is
/// never hashed as part of a larger value, and one write saves the keyed
/// hash a round.
impl std::hash::Hash for LimitKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

/// A copy of the bytes (`SmallVec`'s own `clone` goes byte by byte).
impl Clone for LimitKey {
    fn clone(&self) -> LimitKey {
        LimitKey(SmallVec::from_slice(&self.0))
    }
}

impl LimitKey {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn push_ip(&mut self, ip: IpAddr) {
        let (bytes, len) = tagged_ip(ip);
        self.0.extend_from_slice(&bytes[..len]);
    }
}

/// An address as a key part: its tag byte (4 or 6) and its bytes, in a
/// buffer of the inline size, and how many of its bytes are used.
fn tagged_ip(ip: IpAddr) -> ([u8; 32], usize) {
    let mut bytes = [0; 32];
    match ip {
        IpAddr::V4(v4) => {
            bytes[0] = 4;
            bytes[1..5].copy_from_slice(&v4.octets());
            (bytes, 5)
        }
        IpAddr::V6(v6) => {
            bytes[0] = 6;
            bytes[1..17].copy_from_slice(&v6.octets());
            (bytes, 17)
        }
    }
}

/// The key of a limit that counts by client address alone, the most
/// common key: made in place, without pushing part by part.
impl From<IpAddr> for LimitKey {
    fn from(ip: IpAddr) -> LimitKey {
        let (bytes, len) = tagged_ip(ip.to_canonical());
        LimitKey(SmallVec::from_buf_and_len(bytes, len))
    }
}

impl From<&str> for LimitKey {
    fn from(s: &str) -> LimitKey {
        LimitKey(SmallVec::from_slice(s.as_bytes()))
    }
}

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

type RegistryKey = (String, String, u64, Duration, u64);

/// Counters by (policy, limit, quota), across revisions.
#[derive(Default)]
pub struct LimiterRegistry {
    limiters: Mutex<HashMap<RegistryKey, Arc<Limiter>>>,
    /// Cost mode's leased tokens by limit and lease size, so a revision
    /// that leaves a limit alone keeps them instead of stranding them.
    leases: Mutex<HashMap<(RegistryKey, u64), LeaseBook>>,
}

/// Calls giving leased tokens back that may be out at once.
pub const GIVE_BACK_IN_FLIGHT: usize = 64;

/// The leased tokens of one cluster limit, and what giving them back to
/// Redis needs.
struct LeaseBook {
    leases: Leases,
    redis_prefix: Arc<str>,
    period: Duration,
}

impl std::fmt::Debug for LimiterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LimiterRegistry")
    }
}

impl LimiterRegistry {
    fn get(&self, key: RegistryKey, quota: Quota) -> Arc<Limiter> {
        let mut map = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>())
            })
            .clone()
    }

    /// The leased tokens of a cost-mode limit: the same ones for as long as
    /// a revision has this limit with this rate and lease size.
    fn leases(
        &self,
        key: RegistryKey,
        lease: u64,
        redis_prefix: &Arc<str>,
        period: Duration,
    ) -> Leases {
        let mut map = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((key, lease))
            .or_insert_with(|| LeaseBook {
                leases: Leases::default(),
                redis_prefix: redis_prefix.clone(),
                period,
            })
            .leases
            .clone()
    }

    /// Forgets counters of limits no revision uses any more, and keys idle
    /// long enough to have a full bucket again.
    pub fn evict_idle(&self) {
        let mut map = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, limiter| Arc::strong_count(limiter) > 1);
        for limiter in map.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        drop(map);
        let mut books = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        books.retain(|_, book| Arc::strong_count(&book.leases) > 1);
    }

    /// Gives every leased token this node holds and may still spend back to
    /// Redis, for a data plane that stops: otherwise they are lost to every
    /// data plane until their bucket refills. One call per key, at most
    /// [`GIVE_BACK_IN_FLIGHT`] at a time, all within `deadline` (what is not
    /// given back by then is lost, as before). Returns the keys and tokens
    /// Redis took back. Tokens are taken out of the leases first, so a
    /// request served meanwhile asks Redis instead of spending them; fetches
    /// still out are waited for first (within the same deadline), or their
    /// tokens would arrive after the others went back, and be lost.
    pub async fn give_back_leases(&self, store: &store::Store, deadline: Duration) -> (usize, u64) {
        use futures::StreamExt;
        let end = tokio::time::Instant::now() + deadline;
        let out: Vec<tokio::sync::watch::Receiver<u64>> = {
            let books = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            books
                .values()
                .flat_map(|book| {
                    let leases = book.leases.lock().unwrap_or_else(|p| p.into_inner());
                    leases
                        .values()
                        .filter(|l| l.fetching)
                        .map(|l| l.arrived.subscribe())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        if !out.is_empty() {
            let fetched = futures::future::join_all(out.into_iter().map(fetch_ended));
            let _ = tokio::time::timeout_at(end, fetched).await;
        }
        let now = Instant::now();
        let mut back = Vec::new();
        {
            let books = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            for book in books.values() {
                let mut leases = book.leases.lock().unwrap_or_else(|p| p.into_inner());
                for (key, lease) in leases.iter_mut() {
                    let held: u64 = lease
                        .held
                        .iter()
                        .filter(|(_, until)| *until > now)
                        .map(|(n, _)| n)
                        .sum();
                    lease.held.clear();
                    if held > 0 {
                        let bucket = store::Bucket::new(book.redis_prefix.clone(), key.clone());
                        back.push((bucket, book.period, held));
                    }
                }
            }
        }
        let (mut keys, mut tokens) = (0, 0);
        let mut calls = futures::stream::iter(back.iter().map(|(bucket, period, n)| async move {
            store.give_back(bucket, *period, *n).await.map(|()| *n)
        }))
        .buffer_unordered(GIVE_BACK_IN_FLIGHT);
        let all = async {
            while let Some(given) = calls.next().await {
                match given {
                    Ok(n) => {
                        keys += 1;
                        tokens += n;
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "could not give leased tokens back to the rate-limit store"
                    ),
                }
            }
        };
        if tokio::time::timeout_at(end, all).await.is_err() {
            tracing::warn!(
                ?deadline,
                "not every leased token was given back to the rate-limit store in time"
            );
        }
        (keys, tokens)
    }
}

/// Until a lease fetch ends, however it ends (its `arrived` is bumped).
async fn fetch_ended(mut arrived: tokio::sync::watch::Receiver<u64>) {
    let _ = arrived.changed().await;
}

/// What cluster limits need at request time besides the compiled revision.
#[derive(Debug, Default)]
pub struct ClusterEnv {
    /// The counter store; `None` when no Redis is configured.
    pub store: Option<store::Store>,
    /// Data planes the control plane reports (0 until it said).
    pub data_planes: AtomicU64,
}

impl ClusterEnv {
    fn share_divisor(&self) -> u64 {
        self.data_planes.load(Ordering::Relaxed).max(1)
    }
}

#[derive(Debug)]
enum KeyPart {
    Consumer,
    ClientIp,
    Route,
    Header(HeaderName),
}

/// Keys with a deadline: refused keys until they may retry, or local GCRA
/// buckets until they are full again. Expired entries are dropped when the
/// map grows, so it holds at most the keys active within their deadline.
#[derive(Default)]
struct TimedKeys<K = LimitKey>(Mutex<HashMap<K, Instant>>);

/// Entries past which a [`TimedKeys`] sweeps out expired keys.
const SWEEP_AT: usize = 4096;

impl<K: std::hash::Hash + Eq + Clone> TimedKeys<K> {
    fn get(&self, key: &K, now: Instant) -> Option<Instant> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).copied().filter(|t| *t > now)
    }

    fn set(&self, key: K, until: Instant, now: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SWEEP_AT && !map.contains_key(&key) {
            map.retain(|_, t| *t > now);
        }
        map.insert(key, until);
    }

    /// One GCRA step on a bucket kept here (the `local` fallback).
    fn take(&self, key: &K, interval: Duration, capacity: u64, now: Instant) -> Count {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ahead = map
            .get(key)
            .map_or(Duration::ZERO, |tat| tat.saturating_duration_since(now));
        let new_ahead = ahead + interval;
        let bucket = interval.saturating_mul(u32::try_from(capacity).unwrap_or(u32::MAX));
        if new_ahead > bucket {
            return Count {
                remaining: 0,
                reset: ahead,
                wait: Some(new_ahead - bucket),
            };
        }
        if map.len() >= SWEEP_AT && !map.contains_key(key) {
            map.retain(|_, t| *t > now);
        }
        map.insert(key.clone(), now + new_ahead);
        Count {
            remaining: ((bucket - new_ahead).as_nanos() / interval.as_nanos().max(1)) as u64,
            reset: new_ahead,
            wait: None,
        }
    }
}

/// The metrics of one limit, looked up once per revision.
struct LimitCounters {
    allowed: Counter,
    limited: Counter,
    unavailable: Counter,
    deny_cache_hits: Counter,
    fallback: Counter,
}

/// The counter of one limit and outcome. A function, not an expression in a
/// struct literal: the family's read guard must be gone before the next
/// lookup, which may need its write lock.
fn counter(
    family: &prometheus_client::metrics::family::Family<LimitLabels, Counter>,
    policy: &str,
    limit: &str,
    outcome: &str,
) -> Counter {
    family
        .get_or_create(&LimitLabels {
            policy: policy.to_string(),
            limit: limit.to_string(),
            outcome: outcome.to_string(),
        })
        .clone()
}

/// One limit, compiled.
pub struct CompiledLimit {
    name: String,
    parts: Vec<KeyPart>,
    limiter: Arc<Limiter>,
    capacity: u64,
    period: Duration,
    scope: LimitScope,
    on_store_failure: StoreFailure,
    /// `gatehouse:rl:{policy/limit/`: the hash tag covers the whole bucket
    /// name, so whatever keys one bucket uses land in one cluster slot.
    redis_prefix: Arc<str>,
    /// Keys Redis refused, until they may retry.
    refused: TimedKeys,
    /// This node's share while Redis is unavailable (`on_store_failure: local`).
    fallback: TimedKeys,
    /// Cost mode: tokens to take from Redis at once (0: exact mode).
    lease: u64,
    /// Cost mode: tokens this node took and has not spent, by bucket key,
    /// and until when they may be spent.
    leases: Leases,
    /// `"NAME";q=LIMIT;w=SECONDS`, this limit's item of `RateLimit-Policy`.
    policy_part: String,
    /// `"NAME";r=`, how this limit's `RateLimit` item starts.
    state_prefix: Arc<str>,
    counters: LimitCounters,
    /// Cost mode: requests that waited for this node's fetch of a lease.
    lease_waits: Counter,
}

impl std::fmt::Debug for CompiledLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledLimit")
            .field("name", &self.name)
            .finish()
    }
}

/// One limit's answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Count {
    remaining: u64,
    /// Until the bucket is full again.
    reset: Duration,
    /// When refused, how long until a retry would be admitted.
    wait: Option<Duration>,
}

enum Verdict {
    Counted(Count),
    /// The store failed and the limit is `open`: no answer, admitted.
    Admitted,
    /// The store failed and the limit is `closed`.
    Unavailable,
}

impl CompiledLimit {
    pub fn compile(
        policy: &str,
        l: &RateLimit,
        registry: &LimiterRegistry,
        metrics: &Metrics,
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
        let registry_key = (
            policy.to_string(),
            l.name.clone(),
            l.limit,
            l.window,
            l.burst,
        );
        let limiter = registry.get(registry_key.clone(), quota);
        let redis_prefix: Arc<str> = format!("gatehouse:rl:{{{policy}/{}/", l.name).into();
        let leases_on = l.lease > 0 && l.scope == LimitScope::Cluster;
        let leases = if leases_on {
            registry.leases(registry_key, l.lease, &redis_prefix, period)
        } else {
            Leases::default()
        };
        let fallback = match l.on_store_failure {
            StoreFailure::Open => "open",
            StoreFailure::Closed => "closed",
            StoreFailure::Local => "local",
        };
        let counters = LimitCounters {
            allowed: counter(&metrics.limit_decisions, policy, &l.name, "allowed"),
            limited: counter(&metrics.limit_decisions, policy, &l.name, "limited"),
            unavailable: counter(&metrics.limit_decisions, policy, &l.name, "unavailable"),
            deny_cache_hits: counter(&metrics.limit_deny_cache_hits, policy, &l.name, "limited"),
            fallback: counter(&metrics.limit_fallbacks, policy, &l.name, fallback),
        };
        // Exported for cost-mode limits only; other limits never wait.
        let lease_waits = if leases_on {
            counter(&metrics.limit_lease_waits, policy, &l.name, "waited")
        } else {
            Counter::default()
        };
        // Items of the IETF draft's structured-field lists: the limit's name
        // as a string (object names need no escaping), then parameters.
        let policy_part = format!(
            "\"{}\";q={};w={}",
            l.name,
            l.limit,
            l.window.as_secs().max(1)
        );
        Ok(CompiledLimit {
            name: l.name.clone(),
            parts,
            limiter,
            capacity,
            period,
            scope: l.scope,
            on_store_failure: l.on_store_failure,
            redis_prefix,
            refused: TimedKeys::default(),
            fallback: TimedKeys::default(),
            lease: l.lease,
            leases,
            policy_part,
            state_prefix: format!("\"{}\";r=", l.name).into(),
            counters,
            lease_waits,
        })
    }

    /// The bucket a request counts against. Values are normalised so that
    /// spelling a header value differently (case, surrounding blanks) or an
    /// IPv4 address as IPv4-mapped IPv6 does not give a fresh bucket.
    fn key(&self, ctx: &LimitContext<'_>) -> LimitKey {
        if let [KeyPart::ClientIp] = self.parts[..] {
            return LimitKey::from(ctx.client_ip);
        }
        let mut key = LimitKey::default();
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                key.0.push(0x1f);
            }
            match part {
                KeyPart::Consumer => key
                    .0
                    .extend_from_slice(ctx.consumer.unwrap_or("").as_bytes()),
                KeyPart::ClientIp => key.push_ip(ctx.client_ip.to_canonical()),
                KeyPart::Route => key.0.extend_from_slice(ctx.route.as_bytes()),
                KeyPart::Header(h) => {
                    if let Some(v) = ctx.headers.get(h) {
                        let v = String::from_utf8_lossy(v.as_bytes());
                        for (i, word) in v.split_ascii_whitespace().enumerate() {
                            if i > 0 {
                                key.0.push(b' ');
                            }
                            if word.is_ascii() {
                                key.0.extend(word.bytes().map(|c| c.to_ascii_lowercase()));
                            } else {
                                key.0.extend_from_slice(word.to_lowercase().as_bytes());
                            }
                        }
                    }
                }
            }
        }
        key
    }

    /// The bucket of a key in the store (its Redis key is made there).
    fn bucket(&self, key: &LimitKey) -> store::Bucket {
        store::Bucket::new(self.redis_prefix.clone(), key.clone())
    }

    fn local(&self, key: LimitKey) -> Count {
        match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = u64::from(snapshot.remaining_burst_capacity());
                Count {
                    remaining,
                    reset: self.fill_time(remaining),
                    wait: None,
                }
            }
            Err(not_until) => Count {
                remaining: 0,
                reset: self.period.saturating_mul(self.capacity as u32),
                wait: Some(not_until.wait_time_from(DefaultClock::default().now())),
            },
        }
    }

    async fn verdict(&self, ctx: &LimitContext<'_>, env: &ClusterEnv) -> Verdict {
        let key = self.key(ctx);
        let verdict = match (self.scope, &env.store) {
            (LimitScope::Local, _) | (LimitScope::Cluster, None) => {
                Verdict::Counted(self.local(key))
            }
            (LimitScope::Cluster, Some(store)) => {
                let sent = Instant::now();
                // Tokens this node holds come first: Redis may have refused
                // a concurrent request of the same key after this node
                // leased them. Cost mode's usual case, a held token, stays
                // here, small; a fetch, a wait or a question to Redis (and
                // exact mode) goes on in `cluster`, which cost mode runs
                // boxed, out of this function's code.
                match (self.lease > 0).then(|| self.spend_lease(&key, sent, true)) {
                    Some(Spend::Spent(count, refill)) => {
                        if let Some(want) = refill {
                            self.refill_in_background(key, want, store);
                        }
                        Verdict::Counted(count)
                    }
                    None => self.cluster(key, store, env, sent, None).await,
                    first => Box::pin(self.cluster(key, store, env, sent, first)).await,
                }
            }
        };
        match &verdict {
            Verdict::Counted(c) if c.wait.is_some() => self.counters.limited.inc(),
            Verdict::Counted(_) | Verdict::Admitted => self.counters.allowed.inc(),
            Verdict::Unavailable => self.counters.unavailable.inc(),
        };
        verdict
    }

    /// A cluster limit's decision past a held token: cost mode's fetch or
    /// wait (`spend`, what `spend_lease` said first), or exact mode's
    /// question to Redis (`spend` none), from `sent`.
    async fn cluster(
        &self,
        key: LimitKey,
        store: &store::Store,
        env: &ClusterEnv,
        sent: Instant,
        mut spend: Option<Spend>,
    ) -> Verdict {
        let mut leasing = None;
        let mut want = 1;
        // First a fetch or a wait (`verdict` handled a spent token); after
        // a wait, any of a spent token, a fetch or one token from Redis.
        while let Some(step) = spend.take() {
            match step {
                Spend::Spent(count, refill) => {
                    if let Some(want) = refill {
                        self.refill_in_background(key, want, store);
                    }
                    return Verdict::Counted(count);
                }
                // This request fetches the next lease.
                Spend::Fetch(size) => {
                    want = size;
                    leasing = Some(LeaseInFlight {
                        leases: self.leases.clone(),
                        key: key.clone(),
                        lease_time: self.lease_time(),
                        done: false,
                    });
                }
                // None held, and a lease is on its way: it is as close as
                // Redis. Once it came (or failed), try again, then ask
                // Redis for one token rather than wait a second time.
                Spend::Wait(mut arrived) => {
                    self.lease_waits.inc();
                    let _ = tokio::time::timeout(store.timeout(), arrived.changed()).await;
                    spend = Some(self.spend_lease(&key, sent, false));
                }
                Spend::One => {}
            }
        }
        if let Some(until) = self.refused.get(&key, sent) {
            self.counters.deny_cache_hits.inc();
            return Verdict::Counted(Count {
                remaining: 0,
                reset: until - sent,
                wait: Some(until - sent),
            });
        }
        match store
            .decide(self.bucket(&key), self.period, self.capacity, want)
            .await
        {
            Ok(a) => {
                let wait = (a.taken == 0).then_some(a.wait);
                let (mut remaining, mut reset) = (a.remaining, a.reset);
                let now = Instant::now();
                if let Some(lease) = leasing.take().filter(|_| wait.is_none()) {
                    // Told as the spends after it will be: the bucket and
                    // what this node now holds.
                    let held = a.taken - 1;
                    lease.done(held, a.remaining, sent, now);
                    remaining = self.leased_remaining(a.remaining, Duration::ZERO, held);
                    reset = self.fill_time(remaining);
                }
                if let Some(w) = wait {
                    // From when the question was sent, so never later than
                    // Redis's own answer.
                    self.refused.set(key, sent + w, now);
                }
                Verdict::Counted(Count {
                    remaining,
                    reset,
                    wait,
                })
            }
            Err(e) => {
                self.counters.fallback.inc();
                warn_store_failure(&e);
                match self.on_store_failure {
                    StoreFailure::Open => Verdict::Admitted,
                    StoreFailure::Closed => Verdict::Unavailable,
                    StoreFailure::Local => {
                        let n = env.share_divisor();
                        let interval = self
                            .period
                            .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
                        let capacity = self.capacity.div_ceil(n).max(1);
                        Verdict::Counted(self.fallback.take(
                            &key,
                            interval,
                            capacity,
                            Instant::now(),
                        ))
                    }
                }
            }
        }
    }
}

impl CompiledLimit {
    /// How long leased tokens may be spent: the time the whole cluster
    /// needs to earn a lease, and at least a second. A data plane holds at
    /// most `lease` tokens of a key, counting the ones being fetched, which
    /// bounds the excess over exact mode by `lease` per data plane; when the
    /// lease time is `lease × interval`, also by `lease` in all
    /// (docs/rate-limiting.md).
    fn lease_time(&self) -> Duration {
        self.period
            .saturating_mul(u32::try_from(self.lease).unwrap_or(u32::MAX))
            .max(Duration::from_secs(1))
    }

    /// The size of the next lease of a key: twice what this node's requests
    /// of it would spend in one lease time at the rate seen since the last
    /// fetch, within 1..=`lease` (the first one a quarter of `lease`).
    /// Tokens a data plane leases and does not spend in time are lost to
    /// every data plane; sizing by the rate keeps that loss small for keys
    /// a data plane sees rarely. It changes no bound: those hold for any
    /// lease size up to `lease`.
    fn next_size(&self, lease: &mut Lease, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(lease.since).as_secs_f64();
        let size = if elapsed <= 0.0 {
            lease.size
        } else {
            let per_lease = lease.demand as f64 * self.lease_time().as_secs_f64() / elapsed;
            (2.0 * per_lease).ceil().min(self.lease as f64) as u64
        }
        .clamp(1, self.lease);
        lease.size = size;
        lease.demand = 0;
        lease.since = now;
        size
    }

    /// Spends one leased token of `key` if this node holds one (and says
    /// how many to fetch in the background when it now holds few);
    /// otherwise says whether this request fetches the next lease.
    fn spend_lease(&self, key: &LimitKey, now: Instant, may_wait: bool) -> Spend {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lease) = leases.get_mut(key) else {
            if leases.len() >= SWEEP_AT {
                // Kept a while after their tokens went, for the rate.
                let keep = self.lease_time() * 4;
                leases.retain(|_, l| l.fetching || now.saturating_duration_since(l.since) < keep);
            }
            let size = (self.lease / 4).max(1);
            leases.insert(
                key.clone(),
                Lease {
                    held: Vec::new(),
                    fetching: true,
                    no_refill_until: now,
                    arrived: tokio::sync::watch::Sender::new(0),
                    size,
                    demand: 1,
                    since: now,
                    fetch_time: Duration::ZERO,
                    bucket_left: 0,
                    bucket_at: now,
                },
            );
            return Spend::Fetch(size);
        };
        if may_wait {
            lease.demand += 1;
        }
        lease.held.retain(|(n, until)| *n > 0 && *until > now);
        if let Some(oldest) = lease.held.first_mut() {
            oldest.0 -= 1;
            let left: u64 = lease.held.iter().map(|(n, _)| n).sum();
            // Fetched in the background while what is held still lasts
            // the fetch (see `refill_at`; half a lease, its upper bound, is
            // checked first as the cheap test for most requests); held and
            // fetched together stay within one lease.
            let refill = (!lease.fetching
                && left <= (lease.size / 2).max(1)
                && left <= refill_at(lease, now)
                && now >= lease.no_refill_until)
                .then(|| self.next_size(lease, now))
                .filter(|size| *size > left)
                .map(|size| {
                    lease.fetching = true;
                    size - left
                });
            let remaining = self.leased_remaining(
                lease.bucket_left,
                now.saturating_duration_since(lease.bucket_at),
                left,
            );
            return Spend::Spent(
                Count {
                    remaining,
                    reset: self.fill_time(remaining),
                    wait: None,
                },
                refill,
            );
        }
        if lease.fetching {
            return if may_wait {
                Spend::Wait(lease.arrived.subscribe())
            } else {
                Spend::One
            };
        }
        lease.fetching = true;
        Spend::Fetch(self.next_size(lease, now))
    }

    /// What cost mode tells a request remains: what the bucket held in Redis
    /// after this node's last answer, what it has earned back since (one
    /// token per interval, as the script counts), and what the node holds, at
    /// most the capacity. Other data planes' spending since shows at the
    /// next fetch.
    fn leased_remaining(&self, bucket_left: u64, since: Duration, held: u64) -> u64 {
        let told = bucket_left.saturating_add(held);
        if told >= self.capacity {
            return self.capacity;
        }
        // Whole intervals of the script's (whole microseconds, rounded
        // down): never more than it would say.
        let earned =
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX) / store::interval_us(self.period);
        told.saturating_add(earned).min(self.capacity)
    }

    /// How long a bucket with `remaining` tokens takes to fill up again.
    fn fill_time(&self, remaining: u64) -> Duration {
        let missing = self.capacity - remaining.min(self.capacity);
        self.period
            .saturating_mul(u32::try_from(missing).unwrap_or(u32::MAX))
    }

    /// Fetches up to `want` more tokens of `key` without holding up the
    /// request that noticed the lease running low.
    fn refill_in_background(&self, key: LimitKey, want: u64, store: &store::Store) {
        let inflight = LeaseInFlight {
            leases: self.leases.clone(),
            key: key.clone(),
            lease_time: self.lease_time(),
            done: false,
        };
        let sent = Instant::now();
        store.decide_in_background(
            self.bucket(&key),
            self.period,
            self.capacity,
            want,
            move |answer| match answer {
                Ok(a) if a.taken > 0 => inflight.done(a.taken, a.remaining, sent, Instant::now()),
                // The bucket is empty: spend what is held, and ask again
                // when Redis says a token is back.
                Ok(a) => inflight.refused_until(sent + a.wait, a.remaining, Instant::now()),
                // Dropping the fetch lets the next request fetch.
                Err(e) => warn_store_failure(&e),
            },
        );
    }
}

/// How few held tokens of a key start the next fetch in the background:
/// what its requests would spend in two fetch times (as [`Lease::took`]
/// estimates one) at the rate seen since the last fetch began, so the
/// tokens last until the next lease is back,
/// but at least a quarter of a lease and at most half. A key seen now and
/// then refills at a quarter (fewer calls); a busy one, or a slow Redis,
/// at half (at a quarter, 4 % of the requests of a key at 45 000 requests/s
/// waited for the fetch).
fn refill_at(lease: &Lease, now: Instant) -> u64 {
    let elapsed = now.saturating_duration_since(lease.since).as_secs_f64();
    let during_fetches = if elapsed > 0.0 {
        2.0 * lease.demand as f64 / elapsed * lease.fetch_time.as_secs_f64()
    } else {
        f64::INFINITY
    };
    let (least, most) = ((lease.size / 4).max(1), (lease.size / 2).max(1));
    (during_fetches.ceil().min(most as f64) as u64).max(least)
}

/// A data plane's tokens in cost mode, by bucket key.
type Leases = Arc<Mutex<HashMap<LimitKey, Lease>>>;

/// A data plane's tokens of one key in cost mode.
struct Lease {
    /// Tokens by the lease they came with, oldest first, and until when
    /// they may be spent.
    held: Vec<(u64, Instant)>,
    /// A request is fetching the next lease.
    fetching: bool,
    /// Redis refused the last background fetch: not before then again.
    no_refill_until: Instant,
    /// Bumped when a fetch ends, for the requests waiting for it.
    arrived: tokio::sync::watch::Sender<u64>,
    /// The size of the last lease asked for.
    size: u64,
    /// Requests of this key since `since`, when the last fetch began.
    demand: u64,
    since: Instant,
    /// How long fetches took lately, from asking Redis to the tokens held:
    /// the last one, or more if an earlier one took longer (see
    /// [`Lease::took`]).
    fetch_time: Duration,
    /// What the bucket held in Redis after the last fetch took its tokens
    /// (or was refused), and when that answer arrived.
    bucket_left: u64,
    bucket_at: Instant,
}

impl Lease {
    /// Notes that a fetch took `fetch`. The refill plans for the slow
    /// fetches seen lately, not the last one alone: the estimate is the
    /// longest recent fetch, giving up an eighth of itself per fetch, so
    /// one slow fetch (Redis, or this node, not scheduled for a while)
    /// keeps the next few refills early. On a key at 50 000 requests/s
    /// with `lease: 100` and Redis on the same two busy cores, requests
    /// that waited for a fetch fell by about half, for about a tenth more
    /// script calls (docs/benchmarks.md).
    fn took(&mut self, fetch: Duration) {
        self.fetch_time = fetch.max(self.fetch_time.saturating_sub(self.fetch_time / 8));
    }

    fn fetched(&mut self) {
        self.fetching = false;
        self.arrived.send_modify(|n| *n += 1);
    }

    /// What Redis said the bucket holds, in an answer that arrived at `now`.
    fn note_bucket(&mut self, left: u64, now: Instant) {
        self.bucket_left = left;
        self.bucket_at = now;
    }
}

enum Spend {
    /// A held token was spent; `Some(n)`: fetch `n` more in the background.
    Spent(Count, Option<u64>),
    /// Fetch a lease of this many tokens for this request and the next ones.
    Fetch(u64),
    /// None held, and a lease is being fetched: wait for it.
    Wait(tokio::sync::watch::Receiver<u64>),
    /// A lease is being fetched and this request waited once already: ask
    /// Redis for one token.
    One,
}

/// The lease a request (or a background fetch) is fetching; if it ends
/// without one (Redis failed or refused, or the client went away), the
/// next request fetches.
struct LeaseInFlight {
    leases: Leases,
    key: LimitKey,
    lease_time: Duration,
    done: bool,
}

impl LeaseInFlight {
    /// Keeps `tokens` asked of Redis at `taken_at` for later requests;
    /// `bucket_left` is what Redis said the bucket holds after them, an
    /// answer that arrived at `now` (the bucket's refill is counted from
    /// then, so never early).
    fn done(mut self, tokens: u64, bucket_left: u64, taken_at: Instant, now: Instant) {
        let until = taken_at + self.lease_time;
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lease) = leases.get_mut(&self.key) {
            if tokens > 0 {
                lease.held.push((tokens, until));
            }
            lease.took(now.saturating_duration_since(taken_at));
            lease.note_bucket(bucket_left, now);
            lease.fetched();
        }
        self.done = true;
    }

    /// Redis refused the fetch until `until`, saying the bucket holds
    /// `bucket_left` (an answer that arrived at `now`).
    fn refused_until(self, until: Instant, bucket_left: u64, now: Instant) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lease) = leases.get_mut(&self.key) {
            lease.no_refill_until = until;
            lease.note_bucket(bucket_left, now);
        }
    }
}

impl Drop for LeaseInFlight {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lease) = leases.get_mut(&self.key) {
            lease.fetched();
        }
    }
}

/// Logs a failed decision at most once a second: Redis being down would
/// otherwise write a line per request.
fn warn_store_failure(error: &str) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(%error, "rate-limit store unavailable; limits follow on_store_failure");
    }
}

/// One quota of a policy, compiled.
pub struct CompiledQuota {
    policy: String,
    name: String,
    period: gatehouse_model::object::QuotaPeriod,
    limit: u64,
    on_store_failure: StoreFailure,
    /// Consumers over the quota, until the period ends.
    exhausted: TimedKeys<String>,
    counters: LimitCounters,
}

impl std::fmt::Debug for CompiledQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledQuota")
            .field("name", &self.name)
            .finish()
    }
}

impl CompiledQuota {
    pub fn compile(policy: &str, q: &gatehouse_model::object::Quota, metrics: &Metrics) -> Self {
        let name = format!("quota:{}", q.name);
        let fallback = match q.on_store_failure {
            StoreFailure::Closed => "closed",
            StoreFailure::Open | StoreFailure::Local => "open",
        };
        let counters = LimitCounters {
            allowed: counter(&metrics.limit_decisions, policy, &name, "allowed"),
            limited: counter(&metrics.limit_decisions, policy, &name, "limited"),
            unavailable: counter(&metrics.limit_decisions, policy, &name, "unavailable"),
            deny_cache_hits: counter(&metrics.limit_deny_cache_hits, policy, &name, "limited"),
            fallback: counter(&metrics.limit_fallbacks, policy, &name, fallback),
        };
        CompiledQuota {
            policy: policy.to_string(),
            name: q.name.clone(),
            period: q.period,
            limit: q.limit,
            on_store_failure: q.on_store_failure,
            exhausted: TimedKeys::default(),
            counters,
        }
    }
}

/// Counts the request against the policy's quotas (after its rate limits
/// admitted it), all of them or none, in one Redis call. `Some` when
/// refused: the wait until the used-up period ends (429), or `None` inside
/// when a `closed` quota cannot reach its store (503).
pub async fn check_quotas(
    quotas: &[CompiledQuota],
    consumer: Option<&str>,
    env: &ClusterEnv,
) -> Option<Option<Duration>> {
    // Validation makes a policy with quotas authenticate; no consumer, no quota.
    let consumer = consumer?;
    if quotas.is_empty() {
        return None;
    }
    let now = std::time::SystemTime::now();
    let instant = Instant::now();
    let mut asks = Vec::with_capacity(quotas.len());
    let mut until_end = Vec::with_capacity(quotas.len());
    for q in quotas {
        let period = gatehouse_model::quota::period_of(q.period, now);
        let key = gatehouse_model::quota::redis_key(consumer, &q.policy, &q.name, &period);
        let left = period.end.duration_since(now).unwrap_or_default();
        if let Some(until) = q.exhausted.get(&key, instant) {
            q.counters.deny_cache_hits.inc();
            q.counters.limited.inc();
            return Some(Some(until - instant));
        }
        // Kept one more period after it ends, for `gatehousectl usage`.
        let keep = period.end + period.end.duration_since(period.start).unwrap_or_default();
        let expire_at = keep
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        asks.push((key, q.limit, expire_at));
        until_end.push(left);
    }
    let answer = match &env.store {
        None => Err("no rate-limit store is configured".to_string()),
        Some(store) => store.count_quotas(&asks).await,
    };
    match answer {
        Ok(Ok(_)) => {
            for q in quotas {
                q.counters.allowed.inc();
            }
            None
        }
        Ok(Err(i)) => {
            let i = i.min(quotas.len() - 1);
            quotas[i].counters.limited.inc();
            let (key, _, _) = asks.swap_remove(i);
            quotas[i]
                .exhausted
                .set(key, instant + until_end[i], instant);
            Some(Some(until_end[i]))
        }
        Err(e) => {
            warn_store_failure(&e);
            let mut refused = None;
            for q in quotas {
                q.counters.fallback.inc();
                if q.on_store_failure == StoreFailure::Closed {
                    q.counters.unavailable.inc();
                    refused = Some(None);
                } else {
                    q.counters.allowed.inc();
                }
            }
            refused
        }
    }
}

/// A policy's rate limits, compiled, and the `RateLimit-Policy` header
/// they make together (joined once here, not per request).
#[derive(Debug)]
pub struct PolicyLimits {
    limits: Vec<CompiledLimit>,
    /// `None` when the policy sends no headers (`rate_limit_headers:
    /// false`): then neither is `RateLimit` made.
    policy_header: Option<HeaderValue>,
}

impl PolicyLimits {
    pub fn new(limits: Vec<CompiledLimit>, headers: bool) -> PolicyLimits {
        // Names and numbers only (names are validated): always a valid value.
        let policy_header = headers
            .then(|| {
                let joined = limits
                    .iter()
                    .map(|l| l.policy_part.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                HeaderValue::from_str(&joined).ok()
            })
            .flatten();
        PolicyLimits {
            limits,
            policy_header,
        }
    }
}

impl std::ops::Deref for PolicyLimits {
    type Target = [CompiledLimit];

    fn deref(&self) -> &[CompiledLimit] {
        &self.limits
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
    /// `RateLimit-Policy`: the policy's limits.
    pub policy: Option<HeaderValue>,
    /// `RateLimit`: the state of the tightest limit.
    pub state: Option<HeaderValue>,
    pub retry_after: Option<Duration>,
    /// A `closed` limit could not reach its store: refuse with 503 (unless a
    /// limit refused with 429, which says more).
    pub unavailable: bool,
}

impl Decision {
    /// Sets `RateLimit-Policy` and `RateLimit` on a response.
    pub fn set_headers(self, headers: &mut HeaderMap) {
        if let Some(v) = self.policy {
            headers.insert(RATELIMIT_POLICY, v);
        }
        if let Some(v) = self.state {
            headers.insert(RATELIMIT, v);
        }
    }
}

/// Counts the request against every limit; the most restrictive answer wins.
/// Cluster limits of one request are asked concurrently (and pipelined on
/// the one connection).
pub async fn check<'a>(
    limits: &'a PolicyLimits,
    ctx: &LimitContext<'_>,
    env: &ClusterEnv,
) -> Option<Decision> {
    if limits.is_empty() {
        return None;
    }
    let policy = limits.policy_header.clone();
    // (limit, the count) of the tightest limit.
    let mut tightest: Option<(&CompiledLimit, Count)> = None;
    let mut unavailable = false;
    let mut fold = |limit: &'a CompiledLimit, verdict: Verdict| {
        let count = match verdict {
            Verdict::Counted(c) => c,
            Verdict::Admitted => return,
            Verdict::Unavailable => {
                unavailable = true;
                return;
            }
        };
        let tighter = match &tightest {
            None => true,
            Some((_, t)) => match (count.wait, t.wait) {
                (Some(a), Some(b)) => a > b,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => count.remaining < t.remaining,
            },
        };
        if tighter {
            tightest = Some((limit, count));
        }
    };
    if let [limit] = &limits[..] {
        fold(limit, limit.verdict(ctx, env).await);
    } else {
        let verdicts = futures::future::join_all(
            limits
                .iter()
                .map(|l| async move { (l, l.verdict(ctx, env).await) }),
        )
        .await;
        for (limit, verdict) in verdicts {
            fold(limit, verdict);
        }
    }
    let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let retry_after = tightest
        .as_ref()
        .and_then(|(_, c)| c.wait)
        .map(|w| secs(w).max(1));
    // `t`: when more quota comes. Refused, that is when a retry is admitted
    // (the draft asks that `Retry-After` not be earlier than `t`); admitted,
    // when the bucket is full again.
    let state = tightest
        .as_ref()
        .filter(|_| limits.policy_header.is_some())
        .and_then(|(limit, c)| {
            let t = retry_after.unwrap_or_else(|| secs(c.reset));
            rate_limit_state(&limit.state_prefix, c.remaining, t)
        });
    Some(Decision {
        policy,
        state,
        retry_after: retry_after.map(Duration::from_secs),
        unavailable,
    })
}

/// `RateLimit: "NAME";r=REMAINING;t=SECONDS`, the prefix made when the
/// limit was compiled. A limit's values often repeat (a bucket that is
/// seldom empty answers the same `remaining` and `reset` for many
/// requests, and a per-second limit has few of either), so values seen
/// lately on this thread are kept: a copy of one costs a reference count,
/// against formatting, allocating and checking a new one. A value is kept
/// the second time it is made: one seen once (a `remaining` that counts
/// down, as in cost mode) is not worth the shared copy and the eviction
/// that keeping it costs.
fn rate_limit_state(prefix: &Arc<str>, remaining: u64, reset_secs: u64) -> Option<HeaderValue> {
    // The prefix's address tells limits apart (an entry keeps its prefix
    // alive, so the address is not reused while the entry is there).
    let limit = Arc::as_ptr(prefix) as *const u8 as usize as u64;
    let slot = ((remaining ^ reset_secs.rotate_left(20) ^ (limit >> 4)) % STATES as u64) as usize;
    STATE_VALUES.with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            return make_state(prefix, remaining, reset_secs);
        };
        let seen = match &cache[slot] {
            Some(made)
                if made.remaining == remaining
                    && made.reset_secs == reset_secs
                    && Arc::ptr_eq(&made.prefix, prefix) =>
            {
                if let Some(value) = &made.value {
                    return Some(value.clone());
                }
                true
            }
            _ => false,
        };
        let value = make_state(prefix, remaining, reset_secs)?;
        cache[slot] = Some(MadeState {
            prefix: prefix.clone(),
            remaining,
            reset_secs,
            value: seen.then(|| value.clone()),
        });
        Some(value)
    })
}

/// `RateLimit` values kept per thread (see [`rate_limit_state`]).
const STATES: usize = 64;

/// A `RateLimit` state seen lately, and its value once it was seen twice.
struct MadeState {
    prefix: Arc<str>,
    remaining: u64,
    reset_secs: u64,
    value: Option<HeaderValue>,
}

thread_local! {
    static STATE_VALUES: std::cell::RefCell<[Option<MadeState>; STATES]> =
        const { std::cell::RefCell::new([const { None }; STATES]) };
}

/// A new `RateLimit` value, in one allocation of the exact size.
fn make_state(prefix: &str, remaining: u64, reset_secs: u64) -> Option<HeaderValue> {
    let (mut r, mut s) = (itoa::Buffer::new(), itoa::Buffer::new());
    let parts = [prefix, r.format(remaining), ";t=", s.format(reset_secs)];
    let mut value = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        value.extend_from_slice(part.as_bytes());
    }
    HeaderValue::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket of client 10.0.0.1 in a limit by `client_ip`.
    fn ten() -> LimitKey {
        LimitKey::from(IpAddr::from([10, 0, 0, 1]))
    }

    fn run(limits: &PolicyLimits, ctx: &LimitContext<'_>) -> Option<Decision> {
        futures::executor::block_on(check(limits, ctx, &ClusterEnv::default()))
    }

    /// `limits`, compiled as the rate limits of policy `p`.
    fn policy(limits: &[&RateLimit], reg: &LimiterRegistry, metrics: &Metrics) -> PolicyLimits {
        policy_with_headers(limits, reg, metrics, true)
    }

    fn policy_with_headers(
        limits: &[&RateLimit],
        reg: &LimiterRegistry,
        metrics: &Metrics,
        headers: bool,
    ) -> PolicyLimits {
        let compiled = limits
            .iter()
            .map(|l| CompiledLimit::compile("p", l, reg, metrics).unwrap())
            .collect();
        PolicyLimits::new(compiled, headers)
    }

    fn limit(name: &str, key: &[&str], limit: u64, window: Duration, burst: u64) -> RateLimit {
        RateLimit {
            name: name.into(),
            scope: LimitScope::Local,
            key: key.iter().map(|k| k.to_string()).collect(),
            limit,
            window,
            burst,
            on_store_failure: StoreFailure::Open,
            lease: 0,
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
        let l = limit("ip", &["client_ip"], 3, Duration::from_secs(60), 0);
        let h = HeaderMap::new();
        let limits = policy(&[&l], &reg, &Metrics::default());
        for expected_remaining in [2, 1, 0] {
            let d = run(&limits, &ctx(&h, "10.0.0.1")).unwrap();
            assert!(d.retry_after.is_none());
            let state = d.state.unwrap().to_str().unwrap().to_string();
            assert!(
                state.starts_with(&format!("\"ip\";r={expected_remaining};t=")),
                "{state}"
            );
        }
        let d = run(&limits, &ctx(&h, "10.0.0.1")).unwrap();
        let wait = d.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
            "one request per 20 s: {wait:?}"
        );
        // Refused, `t` is when a retry is admitted, as `Retry-After` says.
        assert_eq!(
            d.state.unwrap(),
            format!("\"ip\";r=0;t={}", wait.as_secs()).as_str()
        );
        assert_eq!(d.policy.unwrap(), "\"ip\";q=3;w=60");
        // Another client has its own bucket.
        assert!(run(&limits, &ctx(&h, "10.0.0.2"))
            .unwrap()
            .retry_after
            .is_none());
    }

    /// `rate_limit_headers: false`: no `RateLimit-Policy` or `RateLimit`,
    /// but the same counting, and a refusal still says how long to wait.
    #[test]
    fn without_headers_a_limit_counts_the_same_and_still_gives_a_wait() {
        let reg = LimiterRegistry::default();
        let l = limit("ip", &["client_ip"], 2, Duration::from_secs(60), 0);
        let h = HeaderMap::new();
        let quiet = policy_with_headers(&[&l], &reg, &Metrics::default(), false);
        for _ in 0..2 {
            let d = run(&quiet, &ctx(&h, "10.0.0.1")).unwrap();
            assert!(d.retry_after.is_none());
            assert!(d.policy.is_none() && d.state.is_none(), "{d:?}");
            let mut response = HeaderMap::new();
            d.set_headers(&mut response);
            assert!(response.is_empty(), "{response:?}");
        }
        let refused = run(&quiet, &ctx(&h, "10.0.0.1")).unwrap();
        assert!(refused.retry_after.is_some());
        assert!(refused.policy.is_none() && refused.state.is_none());
        // The same bucket with headers on: the limit's state, as exhausted
        // as the quiet policy left it.
        let loud = policy(&[&l], &reg, &Metrics::default());
        let d = run(&loud, &ctx(&h, "10.0.0.1")).unwrap();
        assert!(d.retry_after.is_some());
        assert_eq!(d.policy.unwrap(), "\"ip\";q=2;w=60");
        assert!(d
            .state
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("\"ip\";r=0;t="));
    }

    #[test]
    fn the_most_restrictive_limit_wins_and_counters_survive_a_recompile() {
        let reg = LimiterRegistry::default();
        let small = limit("small", &["consumer"], 1, Duration::from_secs(60), 0);
        let big = limit("big", &["consumer"], 100, Duration::from_secs(60), 0);
        let h = HeaderMap::new();
        let limits = policy(&[&big, &small], &reg, &Metrics::default());
        let d = run(&limits, &ctx(&h, "10.0.0.1")).unwrap();
        assert!(d.retry_after.is_none());
        assert_eq!(d.policy.unwrap(), "\"big\";q=100;w=60, \"small\";q=1;w=60");
        assert_eq!(d.state.unwrap(), "\"small\";r=0;t=60");
        let only_small = || policy(&[&small], &reg, &Metrics::default());
        let again = only_small();
        assert!(
            run(&again, &ctx(&h, "10.0.0.1"))
                .unwrap()
                .retry_after
                .is_some(),
            "the same bucket after a recompile"
        );
        drop(limits);
        drop(again);
        reg.evict_idle();
        let fresh = only_small();
        assert!(
            run(&fresh, &ctx(&h, "10.0.0.1"))
                .unwrap()
                .retry_after
                .is_none(),
            "unused limits are forgotten"
        );
    }

    /// Kept values are only handed out for their own limit and state:
    /// two limits with the same state, and more states than the thread
    /// keeps, each get their own text.
    #[test]
    fn rate_limit_values_kept_per_thread_are_those_of_their_limit_and_state() {
        let five: Arc<str> = "\"five\";r=".into();
        let seven: Arc<str> = "\"seven\";r=".into();
        for _ in 0..2 {
            for remaining in 0..200 {
                for (prefix, limit) in [(&five, "five"), (&seven, "seven")] {
                    let reset = remaining % 3;
                    let value = rate_limit_state(prefix, remaining, reset).unwrap();
                    assert_eq!(
                        value,
                        format!("\"{limit}\";r={remaining};t={reset}").as_str()
                    );
                }
            }
        }
        // A state seen again and again: made the first time, kept the
        // second, copied after; the same text every time, also with another
        // limit's value kept in between.
        for _ in 0..3 {
            for (prefix, limit) in [(&five, "five"), (&seven, "seven"), (&five, "five")] {
                for _ in 0..3 {
                    assert_eq!(
                        rate_limit_state(prefix, 42, 2).unwrap(),
                        format!("\"{limit}\";r=42;t=2").as_str()
                    );
                }
            }
        }
        // More limits than the thread keeps values, all in the same state:
        // some share a slot, and none gets another's text.
        let limits: Vec<Arc<str>> = (0..200).map(|l| format!("\"l{l}\";r=").into()).collect();
        for _ in 0..2 {
            for (l, prefix) in limits.iter().enumerate() {
                assert_eq!(
                    rate_limit_state(prefix, 1, 1).unwrap(),
                    format!("\"l{l}\";r=1;t=1").as_str()
                );
            }
        }
    }

    #[test]
    fn header_keys_separate_buckets() {
        let reg = LimiterRegistry::default();
        let tenant = limit(
            "tenant",
            &["header:X-Tenant"],
            1,
            Duration::from_secs(60),
            0,
        );
        let l = policy(&[&tenant], &reg, &Metrics::default());
        let mut a = HeaderMap::new();
        a.insert("x-tenant", "a".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert("x-tenant", "b".parse().unwrap());
        assert!(run(&l, &ctx(&a, "10.0.0.1")).unwrap().retry_after.is_none());
        assert!(run(&l, &ctx(&a, "10.0.0.1")).unwrap().retry_after.is_some());
        assert!(run(&l, &ctx(&b, "10.0.0.1")).unwrap().retry_after.is_none());
    }

    #[test]
    fn casing_and_padding_of_a_header_value_do_not_give_a_fresh_bucket() {
        let reg = LimiterRegistry::default();
        let tenant = limit(
            "tenant",
            &["header:X-Tenant", "client_ip"],
            1,
            Duration::from_secs(60),
            0,
        );
        let l = policy(&[&tenant], &reg, &Metrics::default());
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-tenant", HeaderValue::from_str(v).unwrap());
            h
        };
        let first = with("Acme Corp");
        assert_eq!(run(&l, &ctx(&first, "10.0.0.1")).unwrap().retry_after, None);
        for spelling in ["acme corp", "ACME CORP", "  Acme   Corp\t", "acme\tcorp"] {
            let h = with(spelling);
            assert!(
                run(&l, &ctx(&h, "10.0.0.1")).unwrap().retry_after.is_some(),
                "{spelling:?} is the same tenant"
            );
        }
        // The same address written as IPv4-mapped IPv6 is the same client.
        assert!(run(&l, &ctx(&first, "::ffff:10.0.0.1"))
            .unwrap()
            .retry_after
            .is_some());
        assert_eq!(
            l[0].bucket(&l[0].key(&ctx(&with(" ACME corp "), "10.0.0.1")))
                .redis_key(),
            l[0].bucket(&l[0].key(&ctx(&first, "10.0.0.1"))).redis_key()
        );
    }

    /// Addresses are kept as their bytes: different clients, and values
    /// of different parts, must still never meet in one bucket.
    #[test]
    fn different_clients_never_share_a_bucket() {
        let reg = LimiterRegistry::default();
        let compile = |key: &[&str]| {
            let l = limit("k", key, 1, Duration::from_secs(60), 0);
            CompiledLimit::compile("p", &l, &reg, &Metrics::default()).unwrap()
        };
        let (by_ip, by_ip_and_route) = (compile(&["client_ip"]), compile(&["client_ip", "route"]));
        let h = HeaderMap::new();
        let clients = [
            "10.0.0.1",
            "10.0.0.2",
            "1.0.0.10",
            "31.31.31.31",
            "0.0.0.0",
            "::",
            "::a00:1",
            "::1",
            "2001:db8::1",
            "2001:db8::100",
        ];
        let mut seen = HashMap::new();
        for client in clients {
            for (route, limit) in [
                ("", &by_ip),
                ("r", &by_ip_and_route),
                ("s", &by_ip_and_route),
            ] {
                let c = LimitContext {
                    route,
                    ..ctx(&h, client)
                };
                let key = limit.bucket(&limit.key(&c)).redis_key();
                let before = seen.insert(key, (client, route));
                assert!(
                    before.is_none(),
                    "{client} {route:?} shares {before:?}'s bucket"
                );
            }
        }
        // An IPv4-mapped IPv6 address is the IPv4 client.
        assert_eq!(
            by_ip.key(&ctx(&h, "::ffff:10.0.0.1")),
            by_ip.key(&ctx(&h, "10.0.0.1"))
        );
        assert_eq!(by_ip.key(&ctx(&h, "10.0.0.1")), ten());
        // An address is its tag byte and its bytes, alone (made in place)
        // or as one part of several (pushed): the same bytes either way.
        assert_eq!(ten().as_bytes(), [4, 10, 0, 0, 1]);
        let mut v6 = vec![6];
        v6.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(by_ip.key(&ctx(&h, "2001:db8::1")).as_bytes(), v6);
        for (client, address) in [("10.0.0.1", ten().as_bytes()), ("2001:db8::1", &v6)] {
            let c = LimitContext {
                route: "r",
                ..ctx(&h, client)
            };
            let both = [address, &[0x1f, b'r']].concat();
            assert_eq!(by_ip_and_route.key(&c).as_bytes(), both);
        }
    }

    #[test]
    fn redis_keys_carry_one_hash_tag_and_no_header_value() {
        let reg = LimiterRegistry::default();
        let l = CompiledLimit::compile(
            "billing",
            &limit(
                "per-key",
                &["header:X-Api-Key"],
                1,
                Duration::from_secs(1),
                0,
            ),
            &reg,
            &Metrics::default(),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "secret-value".parse().unwrap());
        let key = l.bucket(&l.key(&ctx(&h, "10.0.0.1"))).redis_key();
        assert!(key.starts_with("gatehouse:rl:{billing/per-key/"), "{key}");
        assert!(key.ends_with('}'));
        assert_eq!(key.matches('{').count(), 1);
        assert!(!key.contains("secret"));
    }

    #[test]
    fn the_local_fallback_is_a_gcra_bucket_of_the_given_share() {
        let keys: TimedKeys = TimedKeys::default();
        let now = Instant::now();
        // A limit of 10 per second shared by 2 nodes: 5 at once, then one per 200 ms.
        let interval = Duration::from_millis(200);
        for left in (0..5).rev() {
            let c = keys.take(&"k".into(), interval, 5, now);
            assert_eq!((c.remaining, c.wait), (left, None));
        }
        let refused = keys.take(&"k".into(), interval, 5, now);
        assert_eq!(refused.wait, Some(interval));
        assert!(keys
            .take(&"k".into(), interval, 5, now + interval)
            .wait
            .is_none());
        assert!(keys
            .take(&"k".into(), interval, 5, now + interval)
            .wait
            .is_some());
        assert!(keys.take(&"other".into(), interval, 5, now).wait.is_none());
    }

    /// A cluster limit of `per_second` on the route in cost mode with
    /// leases of 8 (lease time 1 s at 8 a second or more).
    fn leasing_8(reg: &LimiterRegistry, per_second: u64) -> CompiledLimit {
        let mut l = limit("leased", &["route"], per_second, Duration::from_secs(1), 0);
        l.scope = LimitScope::Cluster;
        l.lease = 8;
        CompiledLimit::compile("p", &l, reg, &Metrics::default()).unwrap()
    }

    /// A fetch of key `k` of `c`, for a test to end by hand.
    fn fetch_of_k(c: &CompiledLimit) -> LeaseInFlight {
        LeaseInFlight {
            leases: c.leases.clone(),
            key: "k".into(),
            lease_time: c.lease_time(),
            done: false,
        }
    }

    #[test]
    fn one_lease_per_key_is_fetched_at_a_time_and_refilled_before_it_runs_out() {
        let reg = LimiterRegistry::default();
        let c = leasing_8(&reg, 100);
        let fetch = || fetch_of_k(&c);
        let t0 = Instant::now();
        // The first lease of a key is a quarter of `lease`.
        assert!(matches!(
            c.spend_lease(&"k".into(), t0, true),
            Spend::Fetch(2)
        ));
        // While it is out, others wait for it (once), then ask for one
        // token each.
        let Spend::Wait(arrived) = c.spend_lease(&"k".into(), t0, true) else {
            panic!("no wait for the lease on its way");
        };
        assert!(!arrived.has_changed().unwrap());
        assert!(matches!(c.spend_lease(&"k".into(), t0, false), Spend::One));
        fetch().done(1, 0, t0, t0);
        assert!(arrived.has_changed().unwrap(), "waiters are woken");
        // Three requests in 10 ms: at that rate a lease time (1 s) spends
        // far more than 8, so the next lease is the whole 8, fetched in the
        // background as the last held token goes.
        let t1 = t0 + Duration::from_millis(10);
        assert!(matches!(
            c.spend_lease(&"k".into(), t1, true),
            Spend::Spent(_, Some(8))
        ));
        fetch().done(8, 50, t1, t1);
        // 8 held: spent locally; the next lease is fetched in the
        // background, topping up to 8 in all, at half left (4): no time has
        // passed since the fetch began, so the rate is taken as high. What
        // a request is told remains is what the bucket held after the
        // fetch (50) and what the node still holds.
        for left in (0..8).rev() {
            match c.spend_lease(&"k".into(), t1, false) {
                Spend::Spent(count, refill) => {
                    assert_eq!(count.remaining, 50 + left);
                    assert_eq!(count.reset, c.period * (100 - 50 - left) as u32);
                    assert_eq!(refill, (left == 4).then_some(4), "{left} left");
                }
                _ => panic!("a leased token was not spent"),
            }
        }
        // That fetch is still out: one token each.
        assert!(matches!(c.spend_lease(&"k".into(), t1, false), Spend::One));
        // It ends without a lease (Redis failed, client gone): the next
        // request fetches. One request in 100 s: a lease of 1.
        drop(fetch());
        let later = t1 + Duration::from_secs(100);
        assert!(matches!(
            c.spend_lease(&"k".into(), later, true),
            Spend::Fetch(1)
        ));
        // Tokens are not spent after the lease time (1 s here).
        fetch().done(3, 0, t1, t1);
        assert!(matches!(
            c.spend_lease(&"k".into(), later, false),
            Spend::Fetch(_)
        ));
        // Tokens of an older lease are spent first.
        fetch().done(1, 100, later, later);
        {
            let mut leases = c.leases.lock().unwrap();
            leases
                .get_mut(&LimitKey::from("k"))
                .unwrap()
                .held
                .push((1, later + Duration::from_secs(5)));
        }
        let held = |c: &CompiledLimit| c.leases.lock().unwrap()[&LimitKey::from("k")].held.clone();
        // A full bucket (100) and one token still held: never more than the
        // capacity remains.
        let Spend::Spent(count, _) = c.spend_lease(&"k".into(), later, false) else {
            panic!("a leased token was not spent");
        };
        assert_eq!((count.remaining, count.reset), (100, Duration::ZERO));
        assert_eq!(
            held(&c),
            [
                (0, later + Duration::from_secs(1)),
                (1, later + Duration::from_secs(5))
            ]
        );
    }

    /// Cost mode's `remaining` counts what the bucket earned back since the
    /// fetch, as exact mode's would: a key spent slower than its limit
    /// does not look like it is running out.
    #[test]
    fn cost_modes_remaining_counts_the_buckets_refill_since_the_fetch() {
        let reg = LimiterRegistry::default();
        // 100 a second: a token every 10 ms; lease time 1 s.
        let c = leasing_8(&reg, 100);
        let t0 = Instant::now();
        assert!(matches!(
            c.spend_lease(&"k".into(), t0, true),
            Spend::Fetch(_)
        ));
        // The answer arrives 5 ms after the question: 50 left in Redis.
        fetch_of_k(&c).done(8, 50, t0, t0 + Duration::from_millis(5));
        let told = |at: Duration| match c.spend_lease(&"k".into(), t0 + at, false) {
            Spend::Spent(count, _) => (count.remaining, count.reset),
            _ => panic!("a leased token was not spent"),
        };
        let reset = |remaining: u64| c.period * (100 - remaining) as u32;
        // Counted from the answer, whole tokens only: none earned yet.
        assert_eq!(told(Duration::from_millis(14)), (57, reset(57)));
        // 25 ms after the answer: two earned, two spent in all.
        assert_eq!(told(Duration::from_millis(30)), (58, reset(58)));
        // 0.9 s: the bucket is full again; never more than the capacity.
        assert_eq!(told(Duration::from_millis(905)), (100, Duration::ZERO));
        // Redis refuses a background fetch (other data planes emptied the
        // bucket): what is told counts from that answer, not the fetch's.
        fetch_of_k(&c).refused_until(
            t0 + Duration::from_secs(2),
            0,
            t0 + Duration::from_millis(950),
        );
        assert_eq!(told(Duration::from_millis(975)), (2 + 4, reset(6)));

        // Under a microsecond per token (10^9 a second), the script counts
        // whole microseconds, so the refill does too.
        let fast = leasing_8(&reg, 1_000_000_000);
        assert!(matches!(
            fast.spend_lease(&"k".into(), t0, true),
            Spend::Fetch(_)
        ));
        fetch_of_k(&fast).done(8, 50, t0, t0);
        let Spend::Spent(count, _) =
            fast.spend_lease(&"k".into(), t0 + Duration::from_micros(10), false)
        else {
            panic!("a leased token was not spent");
        };
        assert_eq!(count.remaining, 50 + 10 + 7);
    }

    #[test]
    fn a_lease_refills_while_what_is_held_lasts_two_fetches_at_the_rate_seen() {
        let t0 = Instant::now();
        let lease = |size: u64, per_second: u64, fetch_us: u64| Lease {
            held: Vec::new(),
            fetching: false,
            no_refill_until: t0,
            arrived: tokio::sync::watch::Sender::new(0),
            size,
            demand: per_second,
            since: t0,
            fetch_time: Duration::from_micros(fetch_us),
            bucket_left: 0,
            bucket_at: t0,
        };
        let at = |l: &Lease| refill_at(l, t0 + Duration::from_secs(1));
        // Ten requests a second: a fetch of 1 ms spends nothing; a quarter.
        assert_eq!(at(&lease(100, 10, 1000)), 25);
        // 45 000 a second and 0.4 ms fetches: 2 x 18 tokens.
        assert_eq!(at(&lease(100, 45_000, 400)), 36);
        // 1 ms fetches would need 90: at most half a lease.
        assert_eq!(at(&lease(100, 45_000, 1000)), 50);
        // No time seen since the fetch began: half, to be safe.
        assert_eq!(refill_at(&lease(100, 1, 0), t0), 50);
        // The smallest leases still refill before they are gone.
        assert_eq!(at(&lease(1, 10, 1000)), 1);
        assert_eq!(at(&lease(3, 45_000, 1000)), 1);

        // One slow fetch among fast ones: the estimate keeps it, giving up
        // an eighth per fetch, and never falls below the latest fetch.
        let mut l = lease(100, 45_000, 100);
        l.took(Duration::from_micros(800));
        assert_eq!(l.fetch_time, Duration::from_micros(800));
        assert_eq!(at(&l), 50, "two slow fetches' worth, at most half");
        l.took(Duration::from_micros(100));
        assert_eq!(l.fetch_time, Duration::from_micros(700));
        for _ in 0..30 {
            l.took(Duration::from_micros(100));
        }
        assert_eq!(l.fetch_time, Duration::from_micros(100));
        assert_eq!(at(&l), 25, "a quarter once fetches stay fast");
    }

    /// A cluster limit `name` in cost mode: 100 per `window` on the
    /// client's address, leases of 40.
    fn leased(name: &str, window: Duration) -> RateLimit {
        let mut l = limit(name, &["client_ip"], 100, window, 0);
        l.scope = LimitScope::Cluster;
        l.lease = 40;
        l
    }

    /// A store on `redis`, its cluster settings (one data plane), and the
    /// limit `leased` with 100 an hour.
    fn leased_on(
        redis: &gatehouse_e2e::redis::RedisServer,
        timeout: Duration,
    ) -> (store::Store, ClusterEnv, RateLimit) {
        let store = store::Store::start(&store::StoreTarget::Single(redis.url()), timeout).unwrap();
        let env = ClusterEnv {
            store: Some(store.clone()),
            data_planes: AtomicU64::new(1),
        };
        (store, env, leased("leased", Duration::from_secs(3600)))
    }

    /// Cost mode's lease books are kept while a revision has their limit,
    /// and forgotten (with whatever they held) once none has, so a config
    /// that keeps adding and removing cost-mode limits does not grow them.
    #[test]
    fn lease_books_of_limits_no_revision_has_are_evicted() {
        let reg = LimiterRegistry::default();
        let books = || reg.leases.lock().unwrap().len();
        let window = Duration::from_secs(60);
        let (kept, other) = (leased("leased", window), leased("other", window));
        let metrics = Metrics::default();
        let first = CompiledLimit::compile("p", &kept, &reg, &metrics).unwrap();
        let gone = CompiledLimit::compile("p", &other, &reg, &metrics).unwrap();
        assert_eq!(books(), 2);

        // A new revision without "other", and the old one dropped.
        let second = CompiledLimit::compile("p", &kept, &reg, &metrics).unwrap();
        drop((first, gone));
        reg.evict_idle();
        assert_eq!(books(), 1, "the book of the limit still in use is kept");
        let only_leased = reg
            .leases
            .lock()
            .unwrap()
            .keys()
            .all(|(k, _)| k.1 == "leased");
        assert!(only_leased, "the book kept is the limit's still in use");

        drop(second);
        reg.evict_idle();
        assert_eq!(books(), 0);
    }

    /// A lease fetch still out when the data plane stops (here: Redis
    /// paused while it is asked) is waited for, and its tokens go back to
    /// Redis with the others: Redis ends up with all but the spent ones.
    #[tokio::test]
    async fn a_fetch_still_out_when_the_node_stops_goes_back_too() {
        let dir = tempfile::tempdir().unwrap();
        let redis = gatehouse_e2e::redis::RedisServer::start(dir.path()).unwrap();
        let (store, env, l) = leased_on(&redis, Duration::from_secs(3));
        let (reg, metrics) = (LimiterRegistry::default(), Metrics::default());
        let limits = policy(&[&l], &reg, &metrics);
        let h = HeaderMap::new();
        let admit = || async {
            let d = check(&limits, &ctx(&h, "10.0.0.1"), &env).await.unwrap();
            assert!(d.retry_after.is_none() && !d.unavailable, "{d:?}");
        };
        // A first lease of 10; spend from it with Redis paused until one
        // request starts the next fetch in the background.
        admit().await;
        redis.stop();
        let fetching = || {
            let leases = limits[0].leases.lock().unwrap();
            leases[&ten()].fetching
        };
        let mut spent = 1;
        while !fetching() {
            admit().await;
            spent += 1;
        }
        let ((keys, tokens), ()) = tokio::join!(
            reg.give_back_leases(&store, Duration::from_secs(10)),
            async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                redis.cont();
            }
        );
        assert_eq!(keys, 1);
        let rest = store
            .decide(
                store::Bucket::new("gatehouse:rl:{p/leased/", ten()),
                Duration::from_secs(36),
                100,
                1000,
            )
            .await
            .unwrap();
        assert_eq!(
            rest.taken,
            100 - spent,
            "{spent} spent, {tokens} given back: the fetched ones too"
        );
    }

    /// A request that finds nothing held while this node fetches the next
    /// lease waits for that fetch, and `gatehouse_ratelimit_lease_waits_total`
    /// counts it; requests spending held tokens do not count.
    #[tokio::test]
    async fn a_request_that_waits_for_a_lease_fetch_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let redis = gatehouse_e2e::redis::RedisServer::start(dir.path()).unwrap();
        let (_store, env, l) = leased_on(&redis, Duration::from_millis(300));
        let (reg, metrics) = (LimiterRegistry::default(), Metrics::default());
        // A local limit of the same policy has no such series.
        let local = limit("local", &["client_ip"], 1000, Duration::from_secs(60), 0);
        let limits = policy(&[&l, &local], &reg, &metrics);
        let h = HeaderMap::new();
        let admit = || async {
            let d = check(&limits, &ctx(&h, "10.0.0.1"), &env).await.unwrap();
            assert!(d.retry_after.is_none() && !d.unavailable, "{d:?}");
        };
        let waits = || {
            let text = metrics.encode();
            let series: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("gatehouse_ratelimit_lease_waits_total{"))
                .collect();
            assert_eq!(series.len(), 1, "{series:?}");
            assert!(series[0].contains(r#"limit="leased""#), "{}", series[0]);
            series[0]
                .rsplit(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        let held = || {
            let leases = limits[0].leases.lock().unwrap();
            leases[&ten()].held.iter().map(|(n, _)| n).sum::<u64>()
        };
        // The first lease (10 tokens), fetched by the first request.
        admit().await;
        assert_eq!(waits(), 0);
        // With Redis paused, spend what is held: the refill it starts in
        // the background hangs, and nobody waits for it yet.
        redis.stop();
        while held() > 0 {
            admit().await;
        }
        assert_eq!(waits(), 0, "spending held tokens never waits");
        // Nothing held, a fetch out: this one waits for it (then asks
        // Redis itself, which times out, and `open` admits it).
        admit().await;
        redis.cont();
        assert_eq!(waits(), 1);
    }

    /// Cost mode against a real Redis: leased tokens survive a revision
    /// that leaves the limit alone, and a stopping data plane gives the
    /// ones it still holds back to Redis.
    #[tokio::test]
    async fn leases_outlive_an_unchanged_revision_and_go_back_to_redis_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let redis = gatehouse_e2e::redis::RedisServer::start(dir.path()).unwrap();
        let (store, env, l) = leased_on(&redis, Duration::from_secs(2));
        let (reg, metrics) = (LimiterRegistry::default(), Metrics::default());
        let h = HeaderMap::new();
        let calls = || redis.calls("evalsha").unwrap() + redis.calls("eval").unwrap();

        // What `RateLimit` says remains: as in exact mode on one data plane,
        // the bucket (90 after the first lease) and the tokens held; and
        // the time until that is full again (36 s a token), the same for
        // the request that fetched the lease as for those after it.
        let told = |d: &Decision| {
            let state = d.state.as_ref().unwrap().to_str().unwrap().to_string();
            state.split_once(';').unwrap().1.to_string()
        };

        // The first request leases a quarter of 40: one spent, nine held.
        let first = policy(&[&l], &reg, &metrics);
        let d = check(&first, &ctx(&h, "10.0.0.1"), &env).await.unwrap();
        assert!(d.retry_after.is_none());
        assert_eq!(told(&d), "r=99;t=36");
        let after_first = calls();
        assert!(after_first >= 1);

        // A new revision with the same limit spends the held tokens without
        // asking Redis.
        let second = policy(&[&l], &reg, &metrics);
        drop(first);
        for left in [98, 97] {
            let d = check(&second, &ctx(&h, "10.0.0.1"), &env).await.unwrap();
            assert!(d.retry_after.is_none());
            let reset = 36 * (100 - left);
            assert_eq!(told(&d), format!("r={left};t={reset}"));
        }
        assert_eq!(calls(), after_first, "the held tokens were spent locally");

        // Stopping: the seven still held go back; Redis then has 100 - 3.
        assert_eq!(
            reg.give_back_leases(&store, Duration::from_secs(5)).await,
            (1, 7)
        );
        let bucket = store::Bucket::new("gatehouse:rl:{p/leased/", ten());
        let rest = store
            .decide(bucket, Duration::from_secs(36), 100, 1000)
            .await
            .unwrap();
        assert_eq!(rest.taken, 97);
        // Nothing is held any more, so nothing goes back twice.
        assert_eq!(
            reg.give_back_leases(&store, Duration::from_secs(5)).await,
            (0, 0)
        );
    }
}
