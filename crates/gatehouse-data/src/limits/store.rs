//! The shared counter store of `scope: cluster` limits: Redis standalone,
//! Sentinel or Redis Cluster, through the `redis` crate.
//!
//! One decision is one `EVALSHA` of [`GCRA`]: the script reads Redis's own
//! clock (`TIME`), so data planes with skewed clocks still share one bucket,
//! and it reads and writes the key in one atomic step. The script is loaded
//! once per server and called by its hash (`redis::Script` falls back to
//! `SCRIPT LOAD` on `NOSCRIPT`, e.g. after a restart of Redis).
//!
//! Connections are multiplexed: every request of a data plane shares one
//! connection per Redis server, so concurrent decisions are pipelined. The
//! connection manager reconnects in the background after Redis comes back.
//! Each decision is bounded by the decision timeout; the caller then applies
//! the limit's `on_store_failure`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};

/// Generic cell rate algorithm over one key holding the theoretical arrival
/// time (TAT) in microseconds of Redis's clock.
///
/// ARGV: emission interval (µs per request), capacity (limit + burst), and
/// how many tokens to take at most (1, or a lease). Takes as many as the
/// bucket holds up to that. Returns `{taken, remaining, wait_us, reset_us}`:
/// `wait_us` is how long until a refused request would be admitted,
/// `reset_us` how long until the bucket is full again. A refused request
/// changes nothing.
pub const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local avail = math.floor((now + interval * capacity - tat) / interval)
if avail < 1 then
  return {0, 0, tat + interval - interval * capacity - now, tat - now}
end
local taken = math.min(want, avail)
local new_tat = tat + interval * taken
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return {taken, avail - taken, 0, new_tat - now}
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

/// Where the counters live, as the data plane's flags give it.
#[derive(Clone)]
pub enum StoreTarget {
    /// One Redis server: `redis://[user:password@]host:port[/db]`.
    Single(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
    /// Sentinels and the name of the master they watch.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl std::fmt::Debug for StoreTarget {
    // Never the URLs: they may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreTarget::Single(_) => f.write_str("Single"),
            StoreTarget::Cluster(n) => write!(f, "Cluster({} seed nodes)", n.len()),
            StoreTarget::Sentinel { sentinels, master } => {
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

/// The connection to the counter store, shared by every request.
pub struct Store {
    conn: Arc<ArcSwapOption<Conn>>,
    script: redis::Script,
    quota: redis::Script,
    timeout: Duration,
    _task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(t) = &self._task {
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

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Config(e.to_string())
}

impl Store {
    /// Sets up the store without waiting for Redis: a data plane starts and
    /// serves while Redis is down, each limit following its failure mode.
    /// Must be called inside a tokio runtime.
    pub fn start(target: &StoreTarget, timeout: Duration) -> Result<Store, StoreError> {
        let conn = Arc::new(ArcSwapOption::empty());
        let task = match target {
            StoreTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(redis_err)?;
                let manager =
                    ConnectionManager::new_lazy_with_config(client, manager_config(timeout))
                        .map_err(redis_err)?;
                conn.store(Some(Arc::new(Conn::Single(manager))));
                None
            }
            StoreTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(timeout.max(Duration::from_millis(200)))
                    .response_timeout(timeout)
                    .retries(1)
                    .build()
                    .map_err(redis_err)?;
                let slot = conn.clone();
                Some(tokio::spawn(async move {
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
                }))
            }
            StoreTarget::Sentinel { sentinels, master } => {
                let client = SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    None,
                    SentinelServerType::Master,
                )
                .map_err(redis_err)?;
                Some(tokio::spawn(follow_master(client, conn.clone(), timeout)))
            }
        };
        Ok(Store {
            conn,
            script: redis::Script::new(GCRA),
            quota: redis::Script::new(QUOTAS),
            timeout,
            _task: task,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Counts one request against quotas (key, limit, Unix expiry), all
    /// or none, bounded by the decision timeout: `Ok(Err(i))` when quota `i`
    /// is used up, `Ok(Ok(used))` with each quota's count otherwise.
    pub async fn count_quotas(
        &self,
        quotas: &[(String, u64, u64)],
    ) -> Result<Result<Vec<u64>, usize>, String> {
        let Some(conn) = self.conn.load_full() else {
            return Err("not connected yet".into());
        };
        let mut invocation = self.quota.prepare_invoke();
        for (key, _, _) in quotas {
            invocation.key(key);
        }
        for (_, limit, _) in quotas {
            invocation.arg(*limit);
        }
        for (_, _, expire_at) in quotas {
            invocation.arg(*expire_at);
        }
        let call = async {
            match (*conn).clone() {
                Conn::Single(mut c) => invocation.invoke_async::<Vec<i64>>(&mut c).await,
                Conn::Cluster(mut c) => invocation.invoke_async::<Vec<i64>>(&mut c).await,
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(reply)) => match reply.split_first() {
                Some((1, used)) => Ok(Ok(used
                    .iter()
                    .map(|u| u64::try_from(*u).unwrap_or(0))
                    .collect())),
                Some((0, [i, ..])) => Ok(Err(usize::try_from(*i - 1).unwrap_or(0))),
                _ => Err(format!("unexpected reply from the quota script: {reply:?}")),
            },
        }
    }

    /// One GCRA decision for `key` taking up to `want` tokens, bounded by
    /// the decision timeout.
    pub async fn decide(
        &self,
        key: &str,
        interval: Duration,
        capacity: u64,
        want: u64,
    ) -> Result<Answer, String> {
        let Some(conn) = self.conn.load_full() else {
            return Err("not connected yet".into());
        };
        let interval_us = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut invocation = self.script.key(key);
        invocation.arg(interval_us).arg(capacity).arg(want);
        let call = async {
            match (*conn).clone() {
                Conn::Single(mut c) => {
                    invocation
                        .invoke_async::<(i64, i64, i64, i64)>(&mut c)
                        .await
                }
                Conn::Cluster(mut c) => {
                    invocation
                        .invoke_async::<(i64, i64, i64, i64)>(&mut c)
                        .await
                }
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok((taken, remaining, wait, reset))) => {
                let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
                Ok(Answer {
                    taken: u64::try_from(taken).unwrap_or(0),
                    remaining: u64::try_from(remaining).unwrap_or(0),
                    wait: us(wait),
                    reset: us(reset),
                })
            }
        }
    }
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
            Err(e) => tracing::warn!(error = %e, "the sentinels did not name a master"),
        }
        tokio::time::sleep(Duration::from_secs(2).saturating_sub(asked.elapsed())).await;
    }
}
