//! Upstream pools: the targets of one Upstream object and how a request
//! picks one (round robin by weight, least requests, or a consistent hash of
//! a header). Everything that can be is computed when the configuration is
//! compiled; picking a target takes no lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use gatehouse_model::object::{Balancer, HealthCheck, Upstream, UpstreamProtocol};
use http::{HeaderMap, HeaderName, Request, Response};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::connpool::{CallError, ConnPool, ConnPools};
use crate::health::{HealthRegistry, TargetHealth, DEFAULT_EJECT_AFTER, DEFAULT_EJECT_FOR};
use crate::proxy::ProxyBody;

/// The HTTP/2 client of a pool, with its connection pool.
pub type UpstreamClient = Client<HttpConnector, ProxyBody>;

/// What outlives a revision on the upstream side: the warm HTTP/1.1
/// connections of each target, and the HTTP/2 clients by (connect timeout,
/// protocol), so a config change does not drop warm connections.
#[derive(Default)]
pub struct ClientCache {
    h2: Mutex<HashMap<Duration, UpstreamClient>>,
    conns: ConnPools,
}

impl std::fmt::Debug for ClientCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCache")
    }
}

impl ClientCache {
    /// The HTTP/2 client of upstreams with this connect timeout.
    fn h2(&self, connect_timeout: Duration) -> UpstreamClient {
        let mut clients = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(connect_timeout)
            .or_insert_with(|| {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(connect_timeout));
                let mut builder = Client::builder(TokioExecutor::new());
                builder.pool_idle_timeout(Duration::from_secs(60));
                builder.http2_only(true);
                builder.build(connector)
            })
            .clone()
    }
}

/// Where one request goes.
pub enum Connection {
    H1(crate::connpool::Conn),
    H2(Box<UpstreamClient>),
}

impl Connection {
    /// Whether a failed send loses the request even when it never reached
    /// the upstream (the HTTP/2 client connects inside its send), so a
    /// request that may be retried must be copied first.
    pub fn send_may_lose_request(&self) -> bool {
        matches!(self, Connection::H2(_))
    }

    /// Sends `req`: for HTTP/1.1 the URI is in origin form and the caller set
    /// `Host`; for HTTP/2 it is absolute.
    pub async fn send(
        self,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, crate::connpool::SendError> {
        match self {
            Connection::H1(conn) => conn.send(req).await,
            Connection::H2(client) => match client.request(req).await {
                Ok(resp) => Ok(resp.map(|b| {
                    http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
                        b,
                        crate::proxy::BoxError::from,
                    ))
                })),
                Err(e) => Err(crate::connpool::SendError {
                    error: CallError::Client(e),
                    request: None,
                }),
            },
        }
    }
}

/// Retries may add at most a fifth to the requests a pool sends (with a
/// small allowance to start), so a failing upstream is not flooded with
/// retries on top of its traffic.
#[derive(Debug)]
struct RetryBudget(AtomicI64);

const RETRY_COST: i64 = 5;
const RETRY_BUDGET_MAX: i64 = 100;

impl RetryBudget {
    fn new() -> Self {
        RetryBudget(AtomicI64::new(RETRY_BUDGET_MAX / 2))
    }

    fn deposit(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < RETRY_BUDGET_MAX).then_some(t + 1)
            });
    }

    fn withdraw(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= RETRY_COST).then_some(t - RETRY_COST)
            })
            .is_ok()
    }
}

/// Points on the hash ring per unit of weight.
const RING_POINTS: usize = 64;

/// One backend address.
#[derive(Debug)]
pub struct Target {
    /// `host:port`, as configured.
    pub address: String,
    /// The same, ready for the request URI and the `Host` header.
    pub authority: http::uri::Authority,
    pub host_header: http::HeaderValue,
    pub weight: u32,
    /// Shared with the same target in other revisions.
    pub health: Arc<TargetHealth>,
    /// Warm HTTP/1.1 connections, shared with the same target in other revisions.
    conns: Arc<ConnPool>,
    inflight: AtomicUsize,
}

/// A compiled upstream.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub targets: Vec<Target>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retries: u32,
    pub retry_non_idempotent: bool,
    pub health_check: Option<HealthCheck>,
    /// HTTP/2 upstreams only; HTTP/1.1 goes through each target's `ConnPool`.
    client: Option<UpstreamClient>,
    pub protocol: UpstreamProtocol,
    retry_budget: RetryBudget,
    /// Passive ejection: failures in a row, and for how long.
    pub eject_after: u32,
    pub eject_for: Duration,
    balancer: Balancer,
    hash_header: Option<HeaderName>,
    /// Target indexes, each repeated by its weight and interleaved.
    schedule: Vec<usize>,
    next: AtomicUsize,
    /// Sorted (point, target) pairs for consistent hashing.
    ring: Vec<(u64, usize)>,
}

/// A picked target; for least-requests balancing it counts as in flight
/// until dropped.
#[derive(Debug)]
pub struct Picked {
    pool: Arc<Pool>,
    index: usize,
}

impl Picked {
    pub fn target(&self) -> &Target {
        &self.pool.targets[self.index]
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.pool.targets[self.index]
            .inflight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// FNV-1a with a finalizer: stable across builds and machines, so every data plane hashes a
/// key to the same target.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV alone spreads keys that differ in their last bytes poorly over
    // the ring; murmur3's finalizer mixes every bit into every other.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Spreads the targets over a cycle so heavier ones come more often but
/// never in long runs (a weight-2 target alternates with a weight-1 one).
fn interleave(weights: &[u32]) -> Vec<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut current: Vec<i64> = vec![0; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    // Smooth weighted round robin (as nginx does it), unrolled once.
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        schedule.push(best);
    }
    schedule
}

impl Pool {
    /// A connection to `target` to send one request on (for HTTP/2, the
    /// upstream's client, which connects as it sends).
    pub async fn connect(&self, target: &Target) -> Result<Connection, CallError> {
        match &self.client {
            Some(h2) => Ok(Connection::H2(Box::new(h2.clone()))),
            None => target
                .conns
                .connection(self.connect_timeout)
                .await
                .map(Connection::H1),
        }
    }

    /// Compiles an upstream that passed validation; target health comes
    /// from `health`, so it carries over from the previous revision.
    pub fn compile(
        u: &Upstream,
        health: &HealthRegistry,
        clients: &ClientCache,
    ) -> Result<Pool, String> {
        let weights: Vec<u32> = u.targets.iter().map(|t| t.weight.max(1)).collect();
        let mut ring = Vec::new();
        for (i, t) in u.targets.iter().enumerate() {
            for point in 0..RING_POINTS * t.weight.max(1) as usize {
                ring.push((fnv1a(format!("{}#{point}", t.address).as_bytes()), i));
            }
        }
        ring.sort_unstable();
        let hash_header = match &u.hash_header {
            Some(h) => Some(
                HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    format!(
                        "upstream \"{}\": hash_header {h:?} is not a header name",
                        u.name
                    )
                })?,
            ),
            None => None,
        };
        Ok(Pool {
            name: u.name.clone(),
            targets: u
                .targets
                .iter()
                .map(|t| {
                    let bad = || {
                        format!(
                            "upstream \"{}\": target {:?} is not an authority",
                            u.name, t.address
                        )
                    };
                    Ok(Target {
                        authority: t.address.parse().map_err(|_| bad())?,
                        host_header: http::HeaderValue::from_str(&t.address).map_err(|_| bad())?,
                        address: t.address.clone(),
                        weight: t.weight,
                        health: health.target(&u.name, &t.address),
                        conns: clients.conns.get(&t.address),
                        inflight: AtomicUsize::new(0),
                    })
                })
                .collect::<Result<_, String>>()?,
            connect_timeout: u.connect_timeout,
            request_timeout: u.request_timeout,
            retries: u.retries.attempts,
            retry_non_idempotent: u.retries.non_idempotent,
            health_check: u.health_check.clone(),
            client: (u.protocol == UpstreamProtocol::Http2).then(|| clients.h2(u.connect_timeout)),
            protocol: u.protocol,
            retry_budget: RetryBudget::new(),
            eject_after: u
                .circuit_breaker
                .as_ref()
                .map_or(DEFAULT_EJECT_AFTER, |c| c.consecutive_failures),
            eject_for: u
                .circuit_breaker
                .as_ref()
                .map_or(DEFAULT_EJECT_FOR, |c| c.open_for),
            balancer: u.balancer,
            hash_header,
            schedule: interleave(&weights),
            next: AtomicUsize::new(0),
            ring,
        })
    }

    /// Picks a target for a request with these headers; `skip` lists targets
    /// already tried by this request (retries go elsewhere when they can).
    pub fn pick(self: &Arc<Self>, headers: &HeaderMap, skip: &[usize]) -> Option<Picked> {
        if self.targets.is_empty() {
            return None;
        }
        // Healthy targets only; one already tried by this request only when
        // every healthy one was.
        let healthy = |i: &usize| self.targets[*i].health.available();
        let untried_left = (0..self.targets.len()).any(|i| healthy(&i) && !skip.contains(&i));
        let allowed = |i: &usize| healthy(i) && (!untried_left || !skip.contains(i));
        let index = match self.balancer {
            Balancer::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..self.schedule.len())
                    .map(|k| self.schedule[(start + k) % self.schedule.len()])
                    .find(allowed)?
            }
            Balancer::LeastRequests => {
                // Ties go to the round-robin order, so idle targets share load.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..self.targets.len())
                    .map(|k| (start + k) % self.targets.len())
                    .filter(allowed)
                    .min_by_key(|i| self.targets[*i].inflight.load(Ordering::Relaxed))?
            }
            Balancer::ConsistentHash => {
                let key = self
                    .hash_header
                    .as_ref()
                    .and_then(|h| headers.get(h))
                    .map(|v| v.as_bytes())
                    .unwrap_or_default();
                let point = fnv1a(key);
                let start = self.ring.partition_point(|(p, _)| *p < point);
                (0..self.ring.len())
                    .map(|k| self.ring[(start + k) % self.ring.len()].1)
                    .find(allowed)?
            }
        };
        self.targets[index].inflight.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            pool: self.clone(),
            index,
        })
    }
}

impl Pool {
    /// Counts a request toward the retry budget.
    pub fn count_request(&self) {
        self.retry_budget.deposit();
    }

    /// Whether the budget allows one more retry; takes it if so.
    pub fn take_retry(&self) -> bool {
        self.retry_budget.withdraw()
    }
}

impl Picked {
    pub fn index(&self) -> usize {
        self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_model::object::{Retries, Target as TargetSpec};

    fn upstream(targets: &[(&str, u32)], balancer: Balancer) -> Arc<Pool> {
        let u = Upstream {
            name: "u".into(),
            labels: Default::default(),
            revision: 1,
            targets: targets
                .iter()
                .map(|(a, w)| TargetSpec {
                    address: a.to_string(),
                    weight: *w,
                })
                .collect(),
            balancer,
            hash_header: (balancer == Balancer::ConsistentHash).then(|| "x-user".to_string()),
            health_check: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            retries: Retries::default(),
            circuit_breaker: None,
            tls: None,
            protocol: Default::default(),
        };
        Arc::new(Pool::compile(&u, &HealthRegistry::default(), &ClientCache::default()).unwrap())
    }

    fn picks(pool: &Arc<Pool>, n: usize, headers: &HeaderMap) -> Vec<String> {
        (0..n)
            .map(|_| pool.pick(headers, &[]).unwrap().target().address.clone())
            .collect()
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let pool = upstream(&[("a:1", 2), ("b:1", 1)], Balancer::RoundRobin);
        let got = picks(&pool, 6, &HeaderMap::new());
        assert_eq!(got.iter().filter(|a| *a == "a:1").count(), 4);
        assert!(
            got.windows(3).all(|w| w.iter().any(|a| a == "b:1")),
            "no long runs: {got:?}"
        );
    }

    #[test]
    fn least_requests_avoids_busy_targets() {
        let pool = upstream(&[("a:1", 1), ("b:1", 1)], Balancer::LeastRequests);
        let busy = pool.pick(&HeaderMap::new(), &[]).unwrap();
        let busy_addr = busy.target().address.clone();
        for _ in 0..5 {
            let p = pool.pick(&HeaderMap::new(), &[]).unwrap();
            assert_ne!(p.target().address, busy_addr);
        }
        drop(busy);
        let spread: std::collections::HashSet<String> =
            picks(&pool, 4, &HeaderMap::new()).into_iter().collect();
        assert_eq!(spread.len(), 2, "idle targets share the load");
    }

    #[test]
    fn consistent_hash_sticks_and_moves_little_when_a_target_is_added() {
        let three = upstream(
            &[("a:1", 1), ("b:1", 1), ("c:1", 1)],
            Balancer::ConsistentHash,
        );
        let four = upstream(
            &[("a:1", 1), ("b:1", 1), ("c:1", 1), ("d:1", 1)],
            Balancer::ConsistentHash,
        );
        let mut moved = 0;
        for user in 0..1000 {
            let mut h = HeaderMap::new();
            h.insert("x-user", format!("user-{user}").parse().unwrap());
            let first = three.pick(&h, &[]).unwrap().target().address.clone();
            assert_eq!(
                three.pick(&h, &[]).unwrap().target().address,
                first,
                "sticky"
            );
            if four.pick(&h, &[]).unwrap().target().address != first {
                moved += 1;
            }
        }
        // Ideal is 1/4 of the keys; allow for the ring's unevenness.
        assert!((150..=350).contains(&moved), "{moved} of 1000 keys moved");
    }

    #[test]
    fn the_retry_budget_allows_a_fifth_of_requests_plus_an_allowance() {
        let budget = RetryBudget::new();
        let mut allowed = 0;
        while budget.withdraw() {
            allowed += 1;
        }
        assert_eq!(
            allowed,
            RETRY_BUDGET_MAX / 2 / RETRY_COST,
            "the starting allowance"
        );
        for _ in 0..100 {
            budget.deposit();
        }
        let mut allowed = 0;
        while budget.withdraw() {
            allowed += 1;
        }
        assert_eq!(allowed, 20, "a fifth of 100 requests");
    }

    #[test]
    fn retries_skip_targets_already_tried() {
        let pool = upstream(&[("a:1", 1), ("b:1", 1)], Balancer::RoundRobin);
        for _ in 0..4 {
            let first = pool.pick(&HeaderMap::new(), &[]).unwrap();
            let second = pool.pick(&HeaderMap::new(), &[first.index()]).unwrap();
            assert_ne!(first.index(), second.index());
        }
        // With every target tried, any may be picked again.
        assert!(pool.pick(&HeaderMap::new(), &[0, 1]).is_some());
    }
}
