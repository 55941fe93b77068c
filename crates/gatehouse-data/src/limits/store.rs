//! The shared counter store of `scope: cluster` limits: Redis standalone,
//! Sentinel or Redis Cluster, through the `redis` crate.
//!
//! One decision is one key of an `EVALSHA` of [`GCRA`]: the script reads Redis's own
//! clock (`TIME`), so data planes with skewed clocks still share one bucket,
//! and it reads and writes the key in one atomic step. The script is loaded
//! once per server and called by its hash (on `NOSCRIPT`, e.g. after a
//! restart of Redis, the call loads it with `SCRIPT LOAD` and is sent once
//! more).
//!
//! Connections are multiplexed: every request of a data plane shares one
//! connection per Redis server, so concurrent decisions are pipelined. The
//! connection manager reconnects in the background after Redis comes back.
//! Each decision is bounded by the decision timeout; the caller then applies
//! the limit's `on_store_failure`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::LimitKey;

/// Generic cell rate algorithm over one or more keys, each holding the
/// theoretical arrival time (TAT) in microseconds of Redis's clock.
///
/// ARGV, three per key: emission interval (µs per request), capacity
/// (limit + burst), and how many tokens to take at most (1, or a lease).
/// Takes as many as the bucket holds up to that. Returns one string, for
/// each key in order `taken remaining wait_us reset_us;` (one string is
/// cheaper to parse than nested arrays): `wait_us` is how long until a
/// refused request would be admitted, `reset_us` how long until the bucket
/// is full again. A refused request changes nothing. Keys are decided one
/// after another, so a key named twice is counted twice; the one `TIME`
/// serves every key of the call (the data plane batches the decisions of
/// concurrent requests into one call).
pub const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local tats = {}
local changed = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local interval = tonumber(ARGV[3 * i - 2])
  local capacity = tonumber(ARGV[3 * i - 1])
  local want = tonumber(ARGV[3 * i])
  local tat = tats[key]
  if tat == nil then
    tat = tonumber(redis.call('GET', key))
    if tat == nil or tat < now then tat = now end
  end
  local avail = math.floor((now + interval * capacity - tat) / interval)
  if avail < 1 then
    out[i] = string.format('0 0 %d %d;', tat + interval - interval * capacity - now, tat - now)
  else
    local taken = math.min(want, avail)
    tat = tat + interval * taken
    if not changed[key] then
      changed[key] = true
      changed[#changed + 1] = key
    end
    out[i] = string.format('%d %d 0 %d;', taken, avail - taken, tat - now)
  end
  tats[key] = tat
end
for j = 1, #changed do
  local key = changed[j]
  local tat = tats[key]
  redis.call('SET', key, string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
end
return table.concat(out)
";

/// The quotas of one policy for one consumer, in one step: the request is
/// counted against every quota unless one of them is used up, and then
/// against none. The keys share the consumer's hash tag (one cluster slot).
/// KEYS: the counts; ARGV: their limits, then the Unix times they expire at.
/// Returns `{0, i}` when quota `i` (from 1) is used up, or `{1, used...}`.
pub const QUOTAS: &str = r"
local n = #KEYS
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used >= tonumber(ARGV[i]) then return {0, i} end
end
local out = {1}
for i = 1, n do
  local used = redis.call('INCR', KEYS[i])
  if used == 1 then redis.call('EXPIREAT', KEYS[i], ARGV[n + i]) end
  out[i + 1] = used
end
return out
";

/// Gives tokens a data plane took and will not spend back to a GCRA bucket:
/// KEYS[1] the bucket, ARGV[1] its interval (µs), ARGV[2] the tokens. The
/// bucket's TAT moves back by that many intervals, but never before now: a
/// bucket never holds more than its capacity, so giving back cannot admit
/// more than if the tokens had never been taken. Returns 1 when the bucket
/// changed, 0 when it was already full (nothing to give back to).
pub const GIVE_BACK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat <= now then return 0 end
tat = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
end
return 1
";

/// Where the counters live, as the data plane's flags give it.
#[derive(Clone)]
pub enum StoreTarget {
    /// One Redis server: `redis://[user:password@]host:port[/db]`.
    Single(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
    /// Sentinels and the name of the master they watch, and the master's
    /// password (the sentinels' own is in their URLs).
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        master_password: Option<String>,
    },
}

impl std::fmt::Debug for StoreTarget {
    // Never the URLs: they may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreTarget::Single(_) => f.write_str("Single"),
            StoreTarget::Cluster(n) => write!(f, "Cluster({} seed nodes)", n.len()),
            StoreTarget::Sentinel {
                sentinels, master, ..
            } => {
                write!(
                    f,
                    "Sentinel({} sentinels, master {master:?})",
                    sentinels.len()
                )
            }
        }
    }
}

/// Why the store could not be set up (a URL that does not parse).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The redis error's text, which never contains the password.
    #[error("the rate-limit store (--redis-*): {0}")]
    Config(String),
}

/// What one decision in Redis answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Tokens taken: 0 when refused.
    pub taken: u64,
    pub remaining: u64,
    pub wait: Duration,
    pub reset: Duration,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The connection to the counter store, shared by every request. Cheap to
/// clone (a lease refill in the background holds one).
#[derive(Clone)]
pub struct Store(Arc<Inner>);

struct Inner {
    conn: Arc<ArcSwapOption<Conn>>,
    script: redis::Script,
    quota: redis::Script,
    give_back: redis::Script,
    timeout: Duration,
    calls: CallMetrics,
    /// Decisions waiting to go out in one call (one server or Sentinel).
    batch: mpsc::UnboundedSender<Ask>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One bucket of a limit: the limit's key prefix (`gatehouse:rl:{policy/limit/`)
/// and the request's key. Its Redis key ([`redis_key`]) is made when it
/// goes out, once per script call for all the asks of one bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub prefix: Arc<str>,
    pub key: LimitKey,
}

impl Bucket {
    pub fn new(prefix: impl Into<Arc<str>>, key: impl Into<LimitKey>) -> Bucket {
        Bucket {
            prefix: prefix.into(),
            key: key.into(),
        }
    }

    pub fn redis_key(&self) -> String {
        redis_key(&self.prefix, self.key.as_bytes())
    }
}

/// The Redis key of the bucket `key` of the limit whose keys start with
/// `prefix`: a hash of the key, so neither a header value (which may be a
/// credential) nor its length reaches Redis; the prefix opens the hash tag
/// and this closes it, so a limit's buckets share a cluster slot.
pub fn redis_key(prefix: &str, key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    let mut hex = [0u8; 32];
    // 16 bytes always fit 32 hex digits.
    let _ = hex::encode_to_slice(&digest[..16], &mut hex);
    let mut k = String::with_capacity(prefix.len() + 33);
    k.push_str(prefix);
    k.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    k.push('}');
    k
}

/// What the store counts of its script calls (a batch of decisions is one
/// call): the time of each answered call, from sending it to its answer,
/// which the decision timeout bounds; and the calls that failed or timed
/// out, with the decisions asked while no connection to Redis exists.
#[derive(Clone, Debug)]
pub struct CallMetrics {
    pub duration: Histogram,
    pub errors: Counter,
}

impl Default for CallMetrics {
    fn default() -> Self {
        CallMetrics {
            duration: crate::metrics::redis_duration_histogram(),
            errors: Counter::default(),
        }
    }
}

impl CallMetrics {
    /// Runs one call within `timeout` and counts it; `answer` reads the reply.
    async fn call<R, T>(
        &self,
        timeout: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<R>>,
        answer: impl FnOnce(R) -> Result<T, String>,
    ) -> Result<T, String> {
        let sent = Instant::now();
        let outcome = match tokio::time::timeout(timeout, call).await {
            Err(_) => Err("timed out".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(reply)) => answer(reply),
        };
        match outcome {
            Ok(_) => self.duration.observe(sent.elapsed().as_secs_f64()),
            Err(_) => {
                self.errors.inc();
            }
        }
        outcome
    }

    fn not_connected<T>(&self) -> Result<T, String> {
        self.errors.inc();
        Err("not connected yet".into())
    }
}

/// One decision waiting for the batcher.
struct Ask {
    bucket: Bucket,
    interval_us: u64,
    capacity: u64,
    want: u64,
    reply: Reply,
}

/// Where an ask's answer goes: to the request waiting for it, or to what
/// a background ask (a lease refill) does with it, run by the batcher.
enum Reply {
    Waiting(oneshot::Sender<Result<Answer, String>>),
    Then(Box<dyn FnOnce(Result<Answer, String>) + Send>),
}

impl Reply {
    fn send(self, answer: Result<Answer, String>) {
        match self {
            // The request may have gone (client closed): nobody to tell.
            Reply::Waiting(tx) => {
                let _ = tx.send(answer);
            }
            Reply::Then(then) => then(answer),
        }
    }
}

/// Decisions sent in one script call at most.
const MAX_BATCH: usize = 64;

/// Turns the batcher lets the other tasks run for more asks before a call
/// goes out (see [`batcher`]). Measured in the harness (exact mode, one
/// worker, 32 connections): one turn gave 0.15 script calls per request,
/// three 0.07 and the proxy's CPU per request 2-3 % lower; six 0.06 and no
/// lower CPU (docs/benchmarks.md).
const BATCH_TURNS: usize = 3;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.0.timeout)
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
        .set_response_timeout(Some(timeout))
        // Reconnect attempts go on in the background; a decision never waits
        // for more than its timeout.
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(1))
}

/// Every connection to Redis sends at once (`TCP_NODELAY`; the `redis`
/// crate leaves Nagle's algorithm on). With Nagle, a call written while an
/// earlier one is still unanswered waits for that answer's ACK, so calls
/// in flight together would go out one round trip apart.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Config(e.to_string())
}

/// TLS to Redis beyond what `rediss://` URLs give by themselves (the
/// system's trusted roots).
#[derive(Clone, Default)]
pub struct StoreTls {
    /// PEM certificates of the CA(s) that Redis's certificate must chain to,
    /// instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// This data plane's certificate chain and key (PEM), for a Redis that
    /// asks clients for one (`tls-auth-clients yes`).
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for StoreTls {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "set"))
            .field("client", &self.client.as_ref().map(|_| "set"))
            .finish()
    }
}

impl StoreTls {
    /// Settings that trust the CA certificate(s) of a PEM file's contents;
    /// fails when it holds none, or one that does not parse.
    pub fn with_ca_pem(pem: Vec<u8>) -> Result<StoreTls, StoreError> {
        check_certificates(&pem, "the Redis CA file")?;
        Ok(StoreTls {
            ca_pem: Some(pem),
            client: None,
        })
    }

    /// Adds a client certificate chain and its key (PEM); fails when either
    /// does not parse.
    pub fn with_client_identity(
        self,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Result<StoreTls, StoreError> {
        use rustls_pki_types::pem::PemObject;
        check_certificates(&cert_pem, "the Redis client certificate file")?;
        // The parse error names no key material.
        rustls_pki_types::PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            StoreError::Config(format!(
                "the Redis client key file holds no usable key: {e}"
            ))
        })?;
        Ok(StoreTls {
            client: Some((cert_pem, key_pem)),
            ..self
        })
    }

    fn is_set(&self) -> bool {
        self.ca_pem.is_some() || self.client.is_some()
    }

    fn certificates(&self) -> Option<redis::TlsCertificates> {
        if !self.is_set() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self.client.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: self.ca_pem.clone(),
        })
    }
}

/// Checks that `pem` holds at least one certificate and that each parses;
/// errors start with `what`.
fn check_certificates(pem: &[u8], what: &str) -> Result<(), StoreError> {
    use rustls_pki_types::pem::PemObject;
    let mut count = 0;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| StoreError::Config(format!("{what}: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(StoreError::Config(format!(
            "{what} holds no PEM certificate"
        )));
    }
    Ok(())
}

/// Whether a Redis URL asks for TLS.
fn is_tls_url(url: &str) -> bool {
    url.trim()
        .get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"))
}

/// Refuses settings that would send in clear what the operator meant to
/// encrypt, or mix encrypted and clear connections.
fn check_tls(target: &StoreTarget, tls: &StoreTls) -> Result<(), StoreError> {
    let urls: Vec<&String> = match target {
        StoreTarget::Single(url) => vec![url],
        StoreTarget::Cluster(nodes) => nodes.iter().collect(),
        StoreTarget::Sentinel { sentinels, .. } => sentinels.iter().collect(),
    };
    let encrypted = urls.iter().filter(|u| is_tls_url(u)).count();
    if encrypted != 0 && encrypted != urls.len() {
        return Err(StoreError::Config(
            "some Redis URLs are rediss:// (TLS) and some redis://: use one scheme for all".into(),
        ));
    }
    if tls.is_set() && encrypted == 0 {
        return Err(StoreError::Config(
            "TLS files for Redis are set, but the Redis URLs are redis:// (no TLS): use rediss://"
                .into(),
        ));
    }
    Ok(())
}

/// A Sentinel client that speaks TLS both to the sentinels (`rediss://`
/// URLs) and to the master they name, with the same certificates. The
/// sentinels' password, if their URLs carry one, is the first URL's.
fn sentinel_over_tls(
    sentinels: &[String],
    master: &str,
    master_password: Option<&str>,
    tls: &StoreTls,
) -> Result<SentinelClient, StoreError> {
    let infos = sentinels
        .iter()
        .map(|u| redis::IntoConnectionInfo::into_connection_info(u.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(redis_err)?;
    let mut builder = redis::sentinel::SentinelClientBuilder::new(
        infos.iter().map(|i| i.addr().clone()),
        master,
        SentinelServerType::Master,
    )
    .map_err(redis_err)?
    .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
    .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
    .set_client_to_sentinel_tcp_settings(tcp_settings())
    .set_client_to_redis_tcp_settings(tcp_settings());
    if let Some(first) = infos.first().map(|i| i.redis_settings()) {
        if let Some(user) = first.username() {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = first.password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    if let Some(password) = master_password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(certs) = tls.certificates() {
        builder = builder
            .set_client_to_sentinel_certificates(certs.clone())
            .set_client_to_redis_certificates(certs);
    }
    builder.build().map_err(redis_err)
}

impl Store {
    /// Sets up the store without waiting for Redis: a data plane starts and
    /// serves while Redis is down, each limit following its failure mode.
    /// Must be called inside a tokio runtime.
    pub fn start(target: &StoreTarget, timeout: Duration) -> Result<Store, StoreError> {
        Store::start_tls(
            target,
            &StoreTls::default(),
            timeout,
            CallMetrics::default(),
        )
    }

    /// [`Store::start`], with TLS settings for `rediss://` URLs, counting
    /// its calls in `calls`.
    pub fn start_tls(
        target: &StoreTarget,
        tls: &StoreTls,
        timeout: Duration,
        calls: CallMetrics,
    ) -> Result<Store, StoreError> {
        check_tls(target, tls)?;
        let conn = Arc::new(ArcSwapOption::empty());
        let mut tasks = Vec::new();
        match target {
            StoreTarget::Single(url) => {
                let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .map_err(redis_err)?
                    .set_tcp_settings(tcp_settings());
                let client = match tls.certificates() {
                    Some(certs) => redis::Client::build_with_tls(info, certs),
                    None => redis::Client::open(info),
                }
                .map_err(redis_err)?;
                let manager =
                    ConnectionManager::new_lazy_with_config(client, manager_config(timeout))
                        .map_err(redis_err)?;
                conn.store(Some(Arc::new(Conn::Single(manager))));
            }
            StoreTarget::Cluster(nodes) => {
                let mut builder = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(timeout.max(Duration::from_millis(200)))
                    .response_timeout(timeout)
                    .retries(1)
                    .tcp_settings(tcp_settings());
                if let Some(certs) = tls.certificates() {
                    builder = builder.certs(certs);
                }
                let client = builder.build().map_err(redis_err)?;
                let slot = conn.clone();
                tasks.push(tokio::spawn(async move {
                    // Until the first connection, decisions fail over.
                    loop {
                        match client.get_async_connection().await {
                            Ok(c) => {
                                slot.store(Some(Arc::new(Conn::Cluster(c))));
                                tracing::info!("connected to the redis cluster");
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot reach the redis cluster yet");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                }));
            }
            StoreTarget::Sentinel {
                sentinels,
                master,
                master_password,
            } => {
                let client = if sentinels.iter().any(|u| is_tls_url(u)) {
                    sentinel_over_tls(sentinels, master, master_password.as_deref(), tls)?
                } else {
                    let mut node =
                        SentinelNodeConnectionInfo::default().set_tcp_settings(tcp_settings());
                    if let Some(password) = master_password {
                        node = node.set_redis_connection_info(
                            redis::RedisConnectionInfo::default().set_password(password),
                        );
                    }
                    SentinelClient::build(
                        sentinels.clone(),
                        master.clone(),
                        Some(node),
                        SentinelServerType::Master,
                    )
                    .map_err(redis_err)?
                };
                tasks.push(tokio::spawn(follow_master(client, conn.clone(), timeout)));
            }
        };
        let script = redis::Script::new(GCRA);
        let (batch, asks) = mpsc::unbounded_channel();
        tasks.push(tokio::spawn(batcher(
            asks,
            conn.clone(),
            script.clone(),
            timeout,
            calls.clone(),
        )));
        Ok(Store(Arc::new(Inner {
            conn,
            script,
            quota: redis::Script::new(QUOTAS),
            give_back: redis::Script::new(GIVE_BACK),
            timeout,
            calls,
            batch,
            tasks,
        })))
    }

    pub fn timeout(&self) -> Duration {
        self.0.timeout
    }

    /// Counts one request against quotas (key, limit, Unix expiry), all
    /// or none, bounded by the decision timeout: `Ok(Err(i))` when quota `i`
    /// is used up, `Ok(Ok(used))` with each quota's count otherwise.
    pub async fn count_quotas(
        &self,
        quotas: &[(String, u64, u64)],
    ) -> Result<Result<Vec<u64>, usize>, String> {
        let Some(conn) = self.0.conn.load_full() else {
            return self.0.calls.not_connected();
        };
        let script = &self.0.quota;
        let mut cmd = evalsha(script, quotas.len(), 2 * quotas.len());
        for (key, _, _) in quotas {
            cmd.arg(key);
        }
        for (_, limit, _) in quotas {
            cmd.arg(*limit);
        }
        for (_, _, expire_at) in quotas {
            cmd.arg(*expire_at);
        }
        let call = async {
            match (*conn).clone() {
                Conn::Single(mut c) => invoke::<Vec<i64>>(script, &cmd, &mut c).await,
                Conn::Cluster(mut c) => invoke::<Vec<i64>>(script, &cmd, &mut c).await,
            }
        };
        let answer = |reply: Vec<i64>| match reply.split_first() {
            Some((1, used)) => Ok(Ok(used
                .iter()
                .map(|u| u64::try_from(*u).unwrap_or(0))
                .collect())),
            Some((0, [i, ..])) => Ok(Err(usize::try_from(*i - 1).unwrap_or(0))),
            _ => Err(format!("unexpected reply from the quota script: {reply:?}")),
        };
        self.0.calls.call(self.0.timeout, call, answer).await
    }

    /// Gives `tokens` of `bucket` (interval `interval`) back, bounded by
    /// the decision timeout (see [`GIVE_BACK`]).
    pub async fn give_back(
        &self,
        bucket: &Bucket,
        interval: Duration,
        tokens: u64,
    ) -> Result<(), String> {
        let Some(conn) = self.0.conn.load_full() else {
            return self.0.calls.not_connected();
        };
        let interval_us = interval_us(interval);
        let script = &self.0.give_back;
        let mut cmd = evalsha(script, 1, 2);
        cmd.arg(bucket.redis_key()).arg(interval_us).arg(tokens);
        let call = async {
            match (*conn).clone() {
                Conn::Single(mut c) => invoke::<i64>(script, &cmd, &mut c).await,
                Conn::Cluster(mut c) => invoke::<i64>(script, &cmd, &mut c).await,
            }
        };
        self.0
            .calls
            .call(self.0.timeout, call, |_: i64| Ok(()))
            .await
    }

    /// One GCRA decision for `bucket` taking up to `want` tokens, bounded
    /// by the decision timeout. On one server (or Sentinel's master) the
    /// decisions of concurrent requests go out together, in one script call.
    pub async fn decide(
        &self,
        bucket: Bucket,
        interval: Duration,
        capacity: u64,
        want: u64,
    ) -> Result<Answer, String> {
        let Some(conn) = self.0.conn.load_full() else {
            return self.0.calls.not_connected();
        };
        let interval_us = interval_us(interval);
        match &*conn {
            Conn::Single(_) => {
                // The batcher bounds the call by the timeout and answers
                // every ask; a dropped sender means it is gone.
                let (reply, answer) = oneshot::channel();
                let ask = Ask {
                    bucket,
                    interval_us,
                    capacity,
                    want,
                    reply: Reply::Waiting(reply),
                };
                if self.0.batch.send(ask).is_err() {
                    return Err("the rate-limit store is shut down".into());
                }
                answer
                    .await
                    .unwrap_or_else(|_| Err("the rate-limit store is shut down".into()))
            }
            Conn::Cluster(c) => {
                // Keys of different buckets live in different slots: one
                // call per decision.
                let script = &self.0.script;
                let mut cmd = evalsha(script, 1, 3);
                cmd.arg(bucket.redis_key())
                    .arg(interval_us)
                    .arg(capacity)
                    .arg(want);
                let mut c = c.clone();
                let call = async move { invoke::<Vec<u8>>(script, &cmd, &mut c).await };
                let answer = |reply: Vec<u8>| parse_answers(&reply, 1).map(|a| a[0]);
                self.0.calls.call(self.0.timeout, call, answer).await
            }
        }
    }

    /// [`Store::decide`] for nobody waiting: `then` gets the answer (on
    /// the batcher's task, so it must be quick). Sent straight to the
    /// batcher, so it goes out in the next call without a task of its own
    /// being scheduled first; a lease refill is that much sooner back.
    pub fn decide_in_background(
        &self,
        bucket: Bucket,
        interval: Duration,
        capacity: u64,
        want: u64,
        then: impl FnOnce(Result<Answer, String>) + Send + 'static,
    ) {
        let Some(conn) = self.0.conn.load_full() else {
            return then(self.0.calls.not_connected());
        };
        if let Conn::Cluster(_) = &*conn {
            // One call per decision there: a task of its own.
            let store = self.clone();
            tokio::spawn(async move { then(store.decide(bucket, interval, capacity, want).await) });
            return;
        }
        let ask = Ask {
            bucket,
            interval_us: interval_us(interval),
            capacity,
            want,
            reply: Reply::Then(Box::new(then)),
        };
        if let Err(mpsc::error::SendError(ask)) = self.0.batch.send(ask) {
            ask.reply
                .send(Err("the rate-limit store is shut down".into()));
        }
    }
}

/// A GCRA interval in the scripts' unit: whole microseconds, at least one.
pub(super) fn interval_us(interval: Duration) -> u64 {
    u64::try_from(interval.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Sends the asks that are waiting together in one script call, and the
/// next batch while that one is out (the connection pipelines them). The
/// calls out are driven here rather than as tasks of their own, and
/// borrow the script rather than copy it.
async fn batcher(
    mut asks: mpsc::UnboundedReceiver<Ask>,
    conn: Arc<ArcSwapOption<Conn>>,
    script: redis::Script,
    timeout: Duration,
    calls: CallMetrics,
) {
    use futures::StreamExt;
    let mut out = futures::stream::FuturesUnordered::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            Some(()) = out.next(), if !out.is_empty() => continue,
            ask = asks.recv() => match ask {
                Some(ask) => ask,
                None => break,
            },
        };
        // Let the requests that are ready run up to their decision, so that
        // theirs join this call rather than each waking this task: a turn
        // (a yield) runs them, and the connections that became readable
        // meanwhile, and more turns follow while each brings more asks, up
        // to BATCH_TURNS. A lone ask on an idle node goes after one turn; a
        // background ask (a lease refill) goes at once with what is here.
        let waiting = matches!(first.reply, Reply::Waiting(_));
        batch.push(first);
        for _ in 0..BATCH_TURNS {
            let before = batch.len();
            if waiting {
                tokio::task::yield_now().await;
            }
            while batch.len() < MAX_BATCH {
                match asks.try_recv() {
                    Ok(ask) => batch.push(ask),
                    Err(_) => break,
                }
            }
            if !waiting || batch.len() == before || batch.len() == MAX_BATCH {
                break;
            }
        }
        // Its own exact-size allocation; `batch` keeps room for the next.
        let mut asks_of_call = Vec::with_capacity(batch.len());
        asks_of_call.append(&mut batch);
        match conn.load_full() {
            Some(conn) => out.push(call(asks_of_call, conn, &script, timeout, &calls)),
            None => {
                for ask in asks_of_call {
                    ask.reply.send(calls.not_connected());
                }
            }
        }
    }
    // The store is gone: answer what is out before leaving.
    while out.next().await.is_some() {}
}

/// One script call for the asks of a batch, answering each of them.
async fn call(
    asks: Vec<Ask>,
    conn: Arc<Conn>,
    script: &redis::Script,
    timeout: Duration,
    calls: &CallMetrics,
) {
    let takes = Takes::of(&asks);
    let n = takes.first.len();
    let mut cmd = evalsha(script, n, 3 * n);
    for &first in &takes.first {
        cmd.arg(asks[first].bucket.redis_key());
    }
    for (&first, &want) in takes.first.iter().zip(&takes.want) {
        let ask = &asks[first];
        cmd.arg(ask.interval_us).arg(ask.capacity).arg(want);
    }
    let reply = async {
        match (*conn).clone() {
            Conn::Single(mut c) => invoke::<Vec<u8>>(script, &cmd, &mut c).await,
            Conn::Cluster(mut c) => invoke::<Vec<u8>>(script, &cmd, &mut c).await,
        }
    };
    let answers = calls
        .call(timeout, reply, |reply: Vec<u8>| parse_answers(&reply, n))
        .await;
    match answers {
        Ok(answers) => {
            let mut given = vec![0u64; answers.len()];
            for (ask, &t) in asks.into_iter().zip(&takes.of_ask) {
                let answer = share(
                    &answers[t],
                    ask.interval_us,
                    ask.capacity,
                    given[t],
                    ask.want,
                );
                given[t] += answer.taken;
                ask.reply.send(Ok(answer));
            }
        }
        Err(e) => {
            for ask in asks {
                ask.reply.send(Err(e.clone()));
            }
        }
    }
}

/// The start of an `EVALSHA` of `script` with `keys` keys and `args`
/// arguments, which the caller adds. Made here rather than through
/// `redis::ScriptInvocation`, which first copies every key and argument
/// into a buffer of its own and then into the command: a few allocations
/// less per call.
fn evalsha(script: &redis::Script, keys: usize, args: usize) -> redis::Cmd {
    // A key is a prefix and 32 hex digits; a number at most 20 digits.
    let mut cmd = redis::Cmd::with_capacity(3 + keys + args, 64 + keys * 96 + args * 20);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    cmd
}

/// Runs an `EVALSHA` made by [`evalsha`]. When Redis does not know the
/// script (`NOSCRIPT`: it restarted, or a replica that never saw it took
/// over), loads it and sends the call once more, as
/// `redis::ScriptInvocation` does.
async fn invoke<T: redis::FromRedisValue>(
    script: &redis::Script,
    cmd: &redis::Cmd,
    conn: &mut impl redis::aio::ConnectionLike,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        reply => reply,
    }
}

/// The asks of one call merged by bucket: asks of one key (and the same
/// limit) become one take of their sum, which the script decides in one
/// step, and [`share`] gives it out in the order they arrived. A hot key
/// (one consumer, one route) thus costs Redis one read and one write per
/// call however many of its requests the call carries.
struct Takes {
    /// The take each ask belongs to.
    of_ask: Vec<usize>,
    /// The first ask of each take (its key and limit).
    first: Vec<usize>,
    /// Tokens each take wants: the sum of its asks'.
    want: Vec<u64>,
}

impl Takes {
    fn of(asks: &[Ask]) -> Takes {
        let mut takes = Takes {
            of_ask: Vec::with_capacity(asks.len()),
            first: Vec::new(),
            want: Vec::new(),
        };
        for (i, ask) in asks.iter().enumerate() {
            // Calls are small (at most MAX_BATCH asks): a scan beats a map.
            let same = takes.first.iter().position(|&f| {
                let other = &asks[f];
                other.interval_us == ask.interval_us
                    && other.capacity == ask.capacity
                    && other.bucket == ask.bucket
            });
            match same {
                Some(t) => {
                    takes.want[t] = takes.want[t].saturating_add(ask.want);
                    takes.of_ask.push(t);
                }
                None => {
                    takes.of_ask.push(takes.first.len());
                    takes.first.push(i);
                    takes.want.push(ask.want);
                }
            }
        }
        takes
    }
}

/// One ask's share of its take's answer, when asks of the take before it
/// got `given` tokens: exactly what the script would have answered had the
/// asks come one after another (the GCRA takes `min(want, available)` each
/// time, so the take's tokens go to the asks in order).
fn share(take: &Answer, interval_us: u64, capacity: u64, given: u64, want: u64) -> Answer {
    let taken = want.min(take.taken.saturating_sub(given));
    // Tokens of the take that asks after this one get.
    let later = take.taken.saturating_sub(given + taken);
    let interval = |n: u64| Duration::from_micros(interval_us.saturating_mul(n));
    if taken > 0 {
        Answer {
            taken,
            remaining: take.remaining + later,
            wait: Duration::ZERO,
            reset: take.reset.saturating_sub(interval(later)),
        }
    } else if take.taken == 0 {
        *take
    } else {
        // The take emptied the bucket before this ask: it is refused, and
        // waits until one token is back.
        Answer {
            taken: 0,
            remaining: 0,
            wait: (take.reset + interval(1)).saturating_sub(interval(capacity)),
            reset: take.reset,
        }
    }
}

/// The script's reply: `n` answers of `taken remaining wait_us reset_us;`.
fn parse_answers(reply: &[u8], n: usize) -> Result<Vec<Answer>, String> {
    let bad = || {
        format!(
            "unexpected reply from the rate-limit script: {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(100)])
        )
    };
    let mut answers = Vec::with_capacity(n);
    for one in reply.split(|b| *b == b';').take(n) {
        let mut fields = [0u64; 4];
        let mut parts = one.split(|b| *b == b' ');
        for f in &mut fields {
            let part = parts.next().ok_or_else(bad)?;
            *f = parse_u64(part).ok_or_else(bad)?;
        }
        answers.push(Answer {
            taken: fields[0],
            remaining: fields[1],
            wait: Duration::from_micros(fields[2]),
            reset: Duration::from_micros(fields[3]),
        });
    }
    if answers.len() != n {
        return Err(bad());
    }
    Ok(answers)
}

/// A decimal integer; a negative one (a clock step in Redis) counts as 0.
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if let Some(rest) = digits.strip_prefix(b"-") {
        return parse_u64(rest).map(|_| 0);
    }
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Whether Redis refused a client for its credentials (none, or wrong ones).
fn refused_credentials(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// Asks the sentinels for the master every two seconds and moves the
/// connection when it changed (a failover).
async fn follow_master(
    mut client: SentinelClient,
    slot: Arc<ArcSwapOption<Conn>>,
    timeout: Duration,
) {
    let mut current: Option<String> = None;
    loop {
        let asked = Instant::now();
        match client.async_get_client().await {
            Ok(master) => {
                let addr = master.get_connection_info().addr().to_string();
                if current.as_deref() != Some(addr.as_str()) {
                    match ConnectionManager::new_lazy_with_config(master, manager_config(timeout)) {
                        Ok(m) => {
                            tracing::info!(master = %addr, "redis master from the sentinels");
                            slot.store(Some(Arc::new(Conn::Single(m))));
                            current = Some(addr);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot connect to the redis master"),
                    }
                }
            }
            // The crate asks the master it was told of for its role, so a
            // master that wants other credentials fails the whole question.
            Err(e) if refused_credentials(&e) => tracing::warn!(
                error = %e,
                "the redis master the sentinels named refused our credentials: check --redis-sentinel-master-password"
            ),
            Err(e) => tracing::warn!(error = %e, "the sentinels did not name a master"),
        }
        tokio::time::sleep(Duration::from_secs(2).saturating_sub(asked.elapsed())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script's arithmetic for one key, in exact integers: the state is
    /// the key's TAT (`None`: absent).
    fn script_model(
        tat: &mut Option<u64>,
        now: u64,
        interval: u64,
        capacity: u64,
        want: u64,
    ) -> Answer {
        let t = tat.unwrap_or(now).max(now);
        let (t, now_i, iv, cap) = (t as i128, now as i128, interval as i128, capacity as i128);
        let avail = (now_i + iv * cap - t).div_euclid(iv);
        let us = |v: i128| Duration::from_micros(v.max(0) as u64);
        if avail < 1 {
            return Answer {
                taken: 0,
                remaining: 0,
                wait: us(t + iv - iv * cap - now_i),
                reset: us(t - now_i),
            };
        }
        let taken = (want as i128).min(avail);
        let new_tat = t + iv * taken;
        *tat = Some(new_tat as u64);
        Answer {
            taken: taken as u64,
            remaining: (avail - taken) as u64,
            wait: Duration::ZERO,
            reset: us(new_tat - now_i),
        }
    }

    proptest::proptest! {
        /// Asks of one bucket merged into one take and shared out answer
        /// exactly what the script answers them one after another.
        #[test]
        fn a_merged_take_shared_out_equals_asks_one_by_one(
            interval in 1u64..2_000_000,
            capacity in 1u64..40,
            ahead in proptest::option::of(0u64..100),
            wants in proptest::collection::vec(1u64..5, 1..40),
        ) {
            let now = 1_764_000_000_000_000u64;
            // Some of the bucket already used (ahead intervals), or empty.
            let start = ahead.map(|a| now + a * interval);
            let mut seq_tat = start;
            let one_by_one: Vec<Answer> = wants
                .iter()
                .map(|&w| script_model(&mut seq_tat, now, interval, capacity, w))
                .collect();
            let mut merged_tat = start;
            let take = script_model(&mut merged_tat, now, interval, capacity, wants.iter().sum());
            let mut given = 0;
            let shared: Vec<Answer> = wants
                .iter()
                .map(|&w| {
                    let a = share(&take, interval, capacity, given, w);
                    given += a.taken;
                    a
                })
                .collect();
            proptest::prop_assert_eq!(shared, one_by_one);
            proptest::prop_assert_eq!(merged_tat, seq_tat);
        }
    }

    #[test]
    fn script_replies_parse_and_bad_ones_are_errors() {
        let a = parse_answers(b"1 99 0 10;0 0 2500 1000000;", 2).unwrap();
        assert_eq!(a[0].taken, 1);
        assert_eq!(a[0].remaining, 99);
        assert_eq!(a[0].reset, Duration::from_micros(10));
        assert_eq!(a[1].taken, 0);
        assert_eq!(a[1].wait, Duration::from_micros(2500));
        assert_eq!(
            parse_answers(b"1 2 0 -5;", 1).unwrap()[0].reset,
            Duration::ZERO
        );
        assert!(parse_answers(b"1 99 0 10;", 2).is_err());
        assert!(parse_answers(b"1 x 0 10;", 1).is_err());
        assert!(parse_answers(b"", 1).is_err());
    }
}
