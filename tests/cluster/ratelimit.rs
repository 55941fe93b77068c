//! Cluster rate limits counted in a real `redis-server` (and a real Redis
//! Cluster) by several data planes, and what each limit does when Redis dies
//! or stops answering.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::redis::{RedisCluster, RedisSentinels, RedisServer};
use gatehouse_e2e::{apply, eventually, Cluster, Options};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// One request on a kept-alive connection: its status and how long it took.
async fn send(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, Duration)> {
    let start = Instant::now();
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Full::new(Bytes::new()))?),
    )
    .await??;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok((status, start.elapsed()))
}

/// A config with one upstream, a route `/free` without policy, and one
/// route `/<name>` per policy, each with the given rate limit.
fn config(upstream: &Upstream, limits: &[(&str, &str)]) -> String {
    let mut policies = String::new();
    let mut routes = String::from(
        "  - name: free
    paths: [{ prefix: /free }]
    upstream: app
",
    );
    for (name, limit) in limits {
        policies.push_str(&format!(
            "  - name: {name}
    rate_limits:
      - {{ name: {name}, scope: cluster, {limit} }}
"
        ));
        routes.push_str(&format!(
            "  - name: {name}
    paths: [{{ prefix: /{name} }}]
    upstream: app
    policy: {name}
"
        ));
    }
    format!(
        "version: 1
policies:
{policies}upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
{routes}",
        upstream.addr
    )
}

/// Route `/users` with a limit of 3 per `x-user` an hour, `closed`.
const PER_USER_LIMIT: (&str, &str) = (
    "users",
    "key: [\"header:x-user\"], limit: 3, window: 1h, on_store_failure: closed",
);

/// A control plane, an upstream, a Redis and `n` data planes with `flags`.
struct Setup {
    cluster: Cluster,
    upstream: Upstream,
    dir: tempfile::TempDir,
    dps: Vec<DataPlaneProc>,
}

impl Setup {
    async fn start(n: usize, flags: &[String]) -> anyhow::Result<Setup> {
        let cluster = Cluster::start(1, Options::default()).await?;
        let upstream = Upstream::start("app").await?;
        let dir = tempfile::tempdir()?;
        let server = cluster.node(1).admin.clone();
        let dps = (1..=n)
            .map(|i| {
                DataPlaneProc::start_args(
                    &format!("dp-{i}"),
                    std::slice::from_ref(&server),
                    dir.path(),
                    flags,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Setup {
            cluster,
            upstream,
            dir,
            dps,
        })
    }

    /// Applies the config and waits until every data plane serves it and
    /// knows how many data planes there are.
    async fn apply(&self, limits: &[(&str, &str)]) -> anyhow::Result<()> {
        let file = self.dir.path().join("limits.yaml");
        std::fs::write(&file, config(&self.upstream, limits))?;
        apply(&self.cluster.node(1).admin, file.to_str().unwrap());
        let want = format!("gatehouse_data_planes_reported {}", self.dps.len());
        for dp in &self.dps {
            let url = format!("http://{}/free", dp.proxy);
            eventually(Duration::from_secs(15), "the config", || async {
                get(&url, &[]).await.ok().filter(|r| r.status == 200)
            })
            .await?;
            eventually(Duration::from_secs(15), "the data-plane count", || async {
                let m = get(&format!("http://{}/metrics", dp.ops), &[]).await.ok()?;
                String::from_utf8_lossy(&m.body)
                    .contains(&want)
                    .then_some(())
            })
            .await?;
        }
        Ok(())
    }

    fn url(&self, dp: usize, path: &str) -> String {
        format!("http://{}{path}", self.dps[dp].proxy)
    }

    async fn metrics(&self, dp: usize) -> anyhow::Result<String> {
        let m = get(&format!("http://{}/metrics", self.dps[dp].ops), &[]).await?;
        Ok(String::from_utf8_lossy(&m.body).into_owned())
    }
}

/// Which data plane the `i`-th request goes to: 60 %, 30 % and 10 %.
fn uneven(i: u64) -> usize {
    match i % 10 {
        0..=5 => 0,
        6..=8 => 1,
        _ => 2,
    }
}

/// Sends requests from `workers` concurrent clients, spread unevenly over
/// the data planes, until `total` were sent or `run_for` passed. Returns,
/// per response, (data plane, status, time since the start).
async fn load(
    setup: &Setup,
    path: &str,
    workers: u64,
    total: u64,
    run_for: Duration,
) -> Vec<(usize, u16, Duration)> {
    let urls: Arc<Vec<String>> = Arc::new((0..3).map(|i| setup.url(i, path)).collect());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (urls, next) = (urls.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut seen = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || start.elapsed() >= run_for {
                    return seen;
                }
                let dp = uneven(i);
                let status = send(&client, &urls[dp], &[]).await.map_or(0, |(s, _)| s);
                seen.push((dp, status, start.elapsed()));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load worker"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_limit_holds_across_three_data_planes_under_uneven_load() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisServer::start(dir.path())?;
    // A generous timeout: this test measures accuracy, not failure modes,
    // and `closed` makes any timeout visible as a 503 rather than an admission.
    let flags = vec![
        "--redis-url".to_string(),
        redis.url(),
        "--rate-limit-timeout-ms".into(),
        "2000".into(),
    ];
    let setup = Setup::start(3, &flags).await?;
    const L: u64 = 1000;
    setup
        .apply(&[
            (
                "exact",
                "key: [route], limit: 1000, window: 1h, on_store_failure: closed",
            ),
            (
                "steady",
                "key: [route], limit: 100, window: 1s, on_store_failure: closed",
            ),
        ])
        .await?;

    // One window of an hour: the bucket of L, and a refill of under one
    // request over the few seconds of the run.
    let seen = load(&setup, "/exact", 16, 1600, Duration::from_secs(120)).await;
    let admitted = seen.iter().filter(|(_, s, _)| *s == 200).count() as u64;
    let refused = seen.iter().filter(|(_, s, _)| *s == 429).count();
    let unavailable = seen.iter().filter(|(_, s, _)| *s == 503).count() as u64;
    let per_dp: Vec<usize> = (0..3)
        .map(|d| {
            seen.iter()
                .filter(|(dp, s, _)| *dp == d && *s == 200)
                .count()
        })
        .collect();
    let took = seen.iter().map(|(_, _, t)| *t).max().unwrap_or_default();
    eprintln!(
        "exact (L={L} per 1h, 3 data planes, 60/30/10 % of {} requests in {took:?}): \
         admitted {admitted} ({:.4} L; per data plane {per_dp:?}), refused {refused}, unavailable {unavailable}",
        seen.len(),
        admitted as f64 / L as f64
    );
    assert_eq!(
        seen.len() as u64,
        admitted + refused as u64 + unavailable,
        "only 200, 429 and 503"
    );
    assert!(
        admitted + unavailable >= L && admitted <= L + L / 100,
        "admitted {admitted} of a limit of {L} ({unavailable} timed out)"
    );
    assert!(
        per_dp.iter().all(|n| *n > 0),
        "every data plane admitted some"
    );

    // A sustained run against 100 per second: one bucket of 100, then 100
    // per second, whichever data plane a request reaches.
    let run = Duration::from_secs(5);
    let seen = load(&setup, "/steady", 16, u64::MAX, run).await;
    let ok: Vec<Duration> = seen
        .iter()
        .filter(|(_, s, _)| *s == 200)
        .map(|(_, _, t)| *t)
        .collect();
    let unavailable = seen.iter().filter(|(_, s, _)| *s == 503).count();
    let span = seen.iter().map(|(_, _, t)| *t).max().unwrap_or_default();
    let n = ok.len() as f64;
    // GCRA never admits more than capacity + elapsed / interval.
    let bound = 100.0 + span.as_secs_f64() * 100.0;
    let per_second: Vec<usize> = (0..span.as_secs() + 1)
        .map(|s| ok.iter().filter(|t| t.as_secs() == s).count())
        .collect();
    eprintln!(
        "steady (100 per 1s, 3 data planes, 60/30/10 % of {} requests over {span:?}): admitted {n} \
         of at most {bound:.1} ({:.4}), per second {per_second:?}, unavailable {unavailable}",
        seen.len(),
        n / bound
    );
    assert!(
        n <= bound * 1.01 + 1.0,
        "admitted {n} over {span:?}: more than 100 + 100/s"
    );
    assert!(n >= 100.0, "at least the bucket was admitted: {n}");
    let calls = redis.calls("evalsha")?;
    eprintln!("redis: {calls} EVALSHA calls in all");
    assert!(calls > 0, "decisions were made in redis");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_follows_its_failure_mode_when_redis_dies_or_stops() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = RedisServer::start(dir.path())?;
    let timeout = Duration::from_millis(200);
    let flags = vec![
        "--redis-url".to_string(),
        redis.url(),
        "--rate-limit-timeout-ms".into(),
        timeout.as_millis().to_string(),
    ];
    let setup = Setup::start(3, &flags).await?;
    setup
        .apply(&[
            (
                "open",
                "key: [\"header:x-user\"], limit: 2, window: 1h, on_store_failure: open",
            ),
            (
                "closed",
                "key: [\"header:x-user\"], limit: 1000, window: 1h, on_store_failure: closed",
            ),
            (
                "local",
                "key: [\"header:x-user\"], limit: 30, window: 1h, on_store_failure: local",
            ),
        ])
        .await?;
    let client = http_client();
    let slowest = std::sync::Mutex::new(Duration::ZERO);
    // Sends to data plane `dp` as `user`, noting the slowest answer.
    let hit = |dp: usize, path: &'static str, user: String| {
        let (client, url, slowest) = (&client, setup.url(dp, path), &slowest);
        async move {
            let (status, took) = send(client, &url, &[("x-user", &user)]).await?;
            let mut s = slowest.lock().unwrap();
            *s = (*s).max(took);
            anyhow::Ok(status)
        }
    };
    // `open`, limit 2 across the cluster: two of three data planes admit.
    let statuses_of = |path: &'static str, user: &str, n: usize| {
        let user = user.to_string();
        let hit = &hit;
        async move {
            let mut out = Vec::new();
            for i in 0..n {
                out.push(hit(i % 3, path, user.clone()).await?);
            }
            anyhow::Ok(out)
        }
    };
    assert_eq!(statuses_of("/open", "u1", 3).await?, [200, 200, 429]);
    assert_eq!(statuses_of("/closed", "u1", 3).await?, [200, 200, 200]);

    for outage in ["killed", "stopped"] {
        if outage == "killed" {
            redis.kill();
        } else {
            redis.stop();
        }
        *slowest.lock().unwrap() = Duration::ZERO;
        let u = |n: &str| format!("{outage}-{n}");
        // open: admits past the limit.
        assert_eq!(
            statuses_of("/open", &u("open"), 4).await?,
            [200; 4],
            "{outage}: open admits"
        );
        // closed: 503 with its problem type.
        let r = get(&setup.url(1, "/closed"), &[("x-user", &u("closed"))]).await?;
        assert_eq!(r.status, 503, "{outage}: closed refuses");
        assert_eq!(
            r.json()?["type"],
            "https://gatehouse.dev/problems/rate-limit-unavailable"
        );
        // local: this node's share, 30 / 3 data planes.
        let mut local = Vec::new();
        for _ in 0..12 {
            local.push(hit(0, "/local", u("local")).await?);
        }
        let admitted = local.iter().filter(|s| **s == 200).count();
        assert_eq!(
            admitted, 10,
            "{outage}: local share of 30 over 3: {local:?}"
        );
        assert!(local[10..].iter().all(|s| *s == 429), "{local:?}");
        let slow = *slowest.lock().unwrap();
        eprintln!("redis {outage}: slowest answer {slow:?} (decision timeout {timeout:?})");
        assert!(
            slow < Duration::from_secs(5),
            "{outage}: requests finished rather than hung ({slow:?})"
        );
        let m = setup.metrics(0).await?;
        assert!(
            m.contains(
                "gatehouse_ratelimit_fallbacks_total{policy=\"local\",limit=\"local\",outcome=\"local\"}"
            ),
            "{m}"
        );

        // Back: limits resume, counted across the cluster again.
        if outage == "killed" {
            redis.restart()?;
        } else {
            redis.cont();
        }
        let again = Instant::now();
        eventually(Duration::from_secs(30), "redis to answer again", || async {
            let r = get(&setup.url(2, "/closed"), &[("x-user", &u("back"))])
                .await
                .ok()?;
            (r.status == 200).then_some(())
        })
        .await?;
        for dp in 0..3 {
            eventually(
                Duration::from_secs(30),
                "every data plane reconnected",
                || async {
                    let r = get(&setup.url(dp, "/closed"), &[("x-user", &u("back"))])
                        .await
                        .ok()?;
                    (r.status == 200).then_some(())
                },
            )
            .await?;
        }
        eprintln!(
            "redis {outage}: limits answered again {:?} after it came back",
            again.elapsed()
        );
        assert_eq!(
            statuses_of("/open", &u("after"), 3).await?,
            [200, 200, 429],
            "{outage}: the cluster limit holds again"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_keys_cannot_be_dodged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisServer::start(dir.path())?;
    let setup = Setup::start(
        3,
        &[
            "--redis-url".to_string(),
            redis.url(),
            "--rate-limit-timeout-ms".into(),
            "2000".into(),
        ],
    )
    .await?;
    setup
        .apply(&[
            (
                "ip",
                "key: [client_ip], limit: 3, window: 1h, on_store_failure: closed",
            ),
            (
                "tenant",
                "key: [\"header:x-tenant\"], limit: 2, window: 1h, on_store_failure: closed",
            ),
        ])
        .await?;
    // No trusted proxies: X-Forwarded-For is the client's own word.
    let mut statuses = Vec::new();
    for i in 0..6 {
        let xff = format!("198.51.100.{i}, 203.0.113.{i}");
        let r = get(
            &setup.url(i % 3, "/ip"),
            &[("x-forwarded-for", xff.as_str())],
        )
        .await?;
        statuses.push(r.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    let mut statuses = Vec::new();
    for (i, tenant) in ["Acme", "  acme ", "ACME", "acme\t"].iter().enumerate() {
        statuses.push(
            get(&setup.url(i % 3, "/tenant"), &[("x-tenant", tenant)])
                .await?
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    assert_eq!(
        get(&setup.url(0, "/tenant"), &[("x-tenant", "globex")])
            .await?
            .status,
        200,
        "another tenant has its own bucket"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_of_three_masters_holds_the_limits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisCluster::start(dir.path(), 3)?;
    cluster_holds_the_limits(&redis, redis.urls(), &[]).await
}

/// The same over TLS: a cluster whose nodes speak only TLS to clients and
/// to each other, reached with `rediss://` seeds and the cluster's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_over_tls_holds_the_limits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisCluster::start_tls(dir.path(), 3)?;
    let ca = redis.nodes[0].ca_file().display().to_string();
    cluster_holds_the_limits(&redis, redis.tls_urls(), &["--redis-ca-file".into(), ca]).await
}

/// Three data planes count per-user limits of 3 in `redis` (reached through
/// `seeds`, with `more` flags): each user gets 3 of 5 requests spread over
/// the data planes, and the keys spread over the masters.
async fn cluster_holds_the_limits(
    redis: &RedisCluster,
    seeds: Vec<String>,
    more: &[String],
) -> anyhow::Result<()> {
    let mut flags = vec![
        "--redis-cluster".to_string(),
        seeds.join(","),
        "--rate-limit-timeout-ms".into(),
        "2000".into(),
    ];
    flags.extend_from_slice(more);
    let setup = Setup::start(3, &flags).await?;
    setup.apply(&[PER_USER_LIMIT]).await?;
    let client = http_client();
    // Wait until the data planes have their cluster connection.
    eventually(Duration::from_secs(20), "the redis cluster", || async {
        let mut all = true;
        for dp in 0..3 {
            let ok = send(&client, &setup.url(dp, "/users"), &[("x-user", "probe")])
                .await
                .is_ok_and(|(s, _)| s != 503);
            all &= ok;
        }
        all.then_some(())
    })
    .await?;
    for u in 0..12 {
        let user = format!("user-{u}");
        let mut statuses = Vec::new();
        for i in 0..5 {
            statuses.push(
                send(
                    &client,
                    &setup.url((u + i) % 3, "/users"),
                    &[("x-user", &user)],
                )
                .await?
                .0,
            );
        }
        assert_eq!(statuses, [200, 200, 200, 429, 429], "{user}");
    }
    let sizes: Vec<u64> = redis
        .nodes
        .iter()
        .map(|n| n.cli(&["dbsize"]).map(|s| s.trim().parse().unwrap_or(0)))
        .collect::<anyhow::Result<_>>()?;
    eprintln!("redis cluster: keys per master {sizes:?}");
    assert_eq!(sizes.iter().sum::<u64>(), 13, "12 users and the probe");
    assert!(
        sizes.iter().filter(|n| **n > 0).count() >= 2,
        "keys spread over the masters: {sizes:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_fail_over_and_limits_resume_against_the_new_master() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = RedisSentinels::start(dir.path(), "limits")?;
    let timeout = Duration::from_millis(200);
    let setup = Setup::start(
        3,
        &[
            "--redis-sentinel".to_string(),
            redis.urls().join(","),
            "--redis-sentinel-master".into(),
            "limits".into(),
            "--rate-limit-timeout-ms".into(),
            timeout.as_millis().to_string(),
        ],
    )
    .await?;
    setup.apply(&[PER_USER_LIMIT]).await?;
    let client = http_client();
    let status = |dp: usize, user: String| {
        let (client, url) = (&client, setup.url(dp, "/users"));
        async move {
            send(client, &url, &[("x-user", &user)])
                .await
                .map_or(0, |(s, _)| s)
        }
    };
    // Until every data plane asked the sentinels for the master.
    for dp in 0..3 {
        eventually(
            Duration::from_secs(20),
            "the master from the sentinels",
            || {
                let probe = status(dp, format!("probe-{dp}"));
                async move { (probe.await == 200).then_some(()) }
            },
        )
        .await?;
    }
    // The limit holds across the data planes, counted in the master.
    let mut before = Vec::new();
    for i in 0..5 {
        before.push(status(i % 3, "before".into()).await);
    }
    assert_eq!(before, [200, 200, 200, 429, 429], "before the failover");
    // The replica has every write before the master dies.
    redis.master.cli(&["wait", "1", "2000"])?;
    let old_master = redis.master.port;
    redis.master.kill();
    let killed = Instant::now();

    // Requests of fresh users to each data plane in turn until every data
    // plane admitted again after the outage; `closed` answers 503 between.
    let mut seen: Vec<(usize, u16, Duration)> = Vec::new();
    let mut back = [false; 3];
    let mut i = 0usize;
    while !back.iter().all(|b| *b) {
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "limits did not resume within 60 s of the master's death: {seen:?}"
        );
        let dp = i % 3;
        let s = status(dp, format!("gap-{i}")).await;
        seen.push((dp, s, killed.elapsed()));
        if s == 200 && seen.iter().any(|(d, s, _)| *d == dp && *s == 503) {
            back[dp] = true;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused: Vec<_> = seen.iter().filter(|(_, s, _)| *s == 503).collect();
    let first = refused.first().map(|(_, _, t)| *t);
    let last = refused.last().map(|(_, _, t)| *t);
    eprintln!(
        "sentinel failover: {} requests after the kill, {} answered 503 (from {first:?} to {last:?}), every data plane admitted again {:?} after the kill; statuses other than 200/503: {:?}",
        seen.len(),
        refused.len(),
        killed.elapsed(),
        seen.iter().filter(|(_, s, _)| *s != 200 && *s != 503).collect::<Vec<_>>()
    );
    assert!(
        !refused.is_empty(),
        "the master's death was seen (closed answers 503 until the failover)"
    );
    let new_master = redis.master_port()?;
    assert_ne!(
        new_master, old_master,
        "the sentinels promoted another server"
    );
    assert_eq!(
        new_master, redis.replica.port,
        "the replica is the master now"
    );

    // Limits resume against the new master, with the buckets it replicated.
    let mut after = Vec::new();
    for i in 0..3 {
        after.push(status(i % 3, "before".into()).await);
    }
    assert_eq!(after, [429, 429, 429], "the bucket survived the failover");
    let mut fresh = Vec::new();
    for i in 0..5 {
        fresh.push(status(i % 3, "after".into()).await);
    }
    assert_eq!(fresh, [200, 200, 200, 429, 429], "after the failover");
    let keys: u64 = redis.replica.cli(&["dbsize"])?.trim().parse()?;
    eprintln!("sentinel failover: {keys} keys in the new master");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_share_divides_by_the_data_planes_of_the_whole_cluster() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, Options::default()).await?;
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let mut redis = RedisServer::start(dir.path())?;
    let flags = [
        "--redis-url".to_string(),
        redis.url(),
        "--rate-limit-timeout-ms".into(),
        "200".into(),
    ];
    // Four data planes over three control-plane nodes: two on node 1, one
    // on each of the others. Each node alone sees 2, 1 and 1.
    let dps = [1, 1, 2, 3]
        .iter()
        .enumerate()
        .map(|(i, node)| {
            DataPlaneProc::start_args(
                &format!("dp-{}", i + 1),
                std::slice::from_ref(&cluster.node(*node).admin),
                dir.path(),
                &flags,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let file = dir.path().join("limits.yaml");
    std::fs::write(
        &file,
        config(
            &upstream,
            &[(
                "local",
                "key: [\"header:x-user\"], limit: 40, window: 1h, on_store_failure: local",
            )],
        ),
    )?;
    apply(&cluster.node(1).admin, file.to_str().unwrap());
    let started = Instant::now();
    for dp in &dps {
        eventually(
            Duration::from_secs(30),
            "the cluster-wide count",
            || async {
                let m = get(&format!("http://{}/metrics", dp.ops), &[]).await.ok()?;
                String::from_utf8_lossy(&m.body)
                    .contains("gatehouse_data_planes_reported 4")
                    .then_some(())
            },
        )
        .await?;
    }
    eprintln!(
        "every data plane reported 4 data planes {:?} after the config was applied",
        started.elapsed()
    );
    // Without Redis, the data plane alone on node 3 counts a quarter of the
    // limit, not all of it.
    redis.kill();
    let url = format!("http://{}/local", dps[3].proxy);
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(get(&url, &[("x-user", "u")]).await?.status);
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    eprintln!("local share on the data plane alone on its node: {admitted} of 12 admitted");
    assert_eq!(admitted, 10, "40 shared by 4 data planes: {statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 429), "{statuses:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_count_per_consumer_across_data_planes_and_usage_reads_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The data planes count over plain TCP; `usage` also reads over TLS (the
    // same server's TLS port, which asks for a client certificate).
    let redis = RedisServer::start_tls_mutual(dir.path())?;
    let setup = Setup::start(
        2,
        &[
            "--redis-url".to_string(),
            redis.url(),
            "--rate-limit-timeout-ms".into(),
            "2000".into(),
        ],
    )
    .await?;
    let server = setup.cluster.node(1).admin.clone();
    let file = setup.dir.path().join("quotas.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1
consumers:
  - name: acme
  - name: globex
policies:
  - name: plan
    authentication: [api_key]
    quotas:
      - {{ name: daily, period: day, limit: 3, on_store_failure: closed }}
      - {{ name: monthly, period: month, limit: 100 }}
upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: plan
    paths: [{{ prefix: /plan }}]
    upstream: app
    policy: plan
",
            setup.upstream.addr
        ),
    )?;
    apply(&server, file.to_str().unwrap());
    let key_of = |consumer: &str| {
        let out = gatehouse_e2e::ctl(&server, &["keys", "create", "--consumer", consumer]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (acme, globex) = (key_of("acme"), key_of("globex"));
    for dp in 0..2 {
        let url = setup.url(dp, "/plan");
        let probe = key_of("globex");
        eventually(Duration::from_secs(15), "the plan and its keys", || async {
            let r = get(&url, &[("x-api-key", &probe)]).await.ok()?;
            (r.status == 200).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", setup.dps[dp].log_tail()))?;
    }
    let mut statuses = Vec::new();
    let mut last = None;
    for i in 0..5 {
        let r = get(&setup.url(i % 2, "/plan"), &[("x-api-key", &acme)]).await?;
        statuses.push(r.status);
        last = Some(r);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let refused = last.unwrap();
    assert_eq!(
        refused.json()?["type"],
        "https://gatehouse.dev/problems/quota-exceeded"
    );
    let wait: u64 = refused.headers["retry-after"].to_str()?.parse()?;
    assert!((1..=86_400).contains(&wait), "until the day ends: {wait}");
    assert_eq!(
        get(&setup.url(1, "/plan"), &[("x-api-key", &globex)])
            .await?
            .status,
        200,
        "another consumer has its own quota"
    );

    let out = gatehouse_e2e::ctl(
        &server,
        &["usage", "acme", "--redis-url", &redis.url(), "-o", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let used = |quota: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["quota"] == quota)
            .map(|r| (r["used"].as_u64().unwrap(), r["limit"].as_u64().unwrap()))
    };
    assert_eq!(used("daily"), Some((3, 3)), "{rows}");
    assert_eq!(used("monthly"), Some((3, 100)), "{rows}");
    let (tls_url, ca) = (
        redis.tls_url().expect("a TLS port"),
        redis.ca_file().display().to_string(),
    );
    let (cert, key) = redis.client_files();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let usage = |flags: &[&str]| gatehouse_e2e::ctl(&server, &[&["usage", "acme"], flags].concat());
    let over_tls = usage(&[
        "--redis-url",
        &tls_url,
        "--redis-ca-file",
        &ca,
        "--redis-client-cert",
        &cert,
        "--redis-client-key",
        &key,
        "-o",
        "json",
    ]);
    assert!(
        over_tls.status.success(),
        "{}",
        String::from_utf8_lossy(&over_tls.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&over_tls.stdout)?,
        rows
    );
    let no_client_cert = usage(&["--redis-url", &tls_url, "--redis-ca-file", &ca]);
    assert!(
        !no_client_cert.status.success(),
        "read without a client certificate"
    );
    let clear_with_ca = usage(&["--redis-url", &redis.url(), "--redis-ca-file", &ca]);
    assert!(!clear_with_ca.status.success());
    assert!(
        String::from_utf8_lossy(&clear_with_ca.stderr)
            .contains("--redis-ca-file and --redis-client-cert are for rediss://"),
        "{}",
        String::from_utf8_lossy(&clear_with_ca.stderr)
    );
    let table = gatehouse_e2e::ctl(&server, &["usage", "acme", "--redis-url", &redis.url()]);
    let table = String::from_utf8_lossy(&table.stdout);
    eprintln!("gatehousectl usage acme:\n{table}");
    assert!(table.starts_with("POLICY"), "{table}");
    let missing = gatehouse_e2e::ctl(&server, &["usage", "nobody", "--redis-url", &redis.url()]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("\"nobody\""),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_mode_admits_at_most_a_lease_more_per_data_plane_with_fewer_redis_calls(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisServer::start(dir.path())?;
    let flags = vec![
        "--redis-url".to_string(),
        redis.url(),
        "--rate-limit-timeout-ms".into(),
        "2000".into(),
    ];
    let setup = Setup::start(3, &flags).await?;
    setup
        .apply(&[
            (
                "leased",
                "key: [route], limit: 1000, window: 1h, lease: 10, on_store_failure: closed",
            ),
            (
                "steady",
                "key: [route], limit: 100, window: 1s, lease: 5, on_store_failure: closed",
            ),
        ])
        .await?;

    let before = redis.calls("evalsha")?;
    let seen = load(&setup, "/leased", 16, 1600, Duration::from_secs(120)).await;
    let calls = redis.calls("evalsha")? - before;
    let admitted = seen.iter().filter(|(_, s, _)| *s == 200).count() as u64;
    let unavailable = seen.iter().filter(|(_, s, _)| *s == 503).count();
    eprintln!(
        "cost mode (L=1000 per 1h, lease 10, 3 data planes, 60/30/10 % of {} requests): \
         admitted {admitted} ({:.4} L), {calls} EVALSHA ({:.3} per request), unavailable {unavailable}",
        seen.len(),
        admitted as f64 / 1000.0,
        calls as f64 / seen.len() as f64
    );
    // The lease time is 10 x 3.6 s: at most one lease over in all.
    assert!(admitted <= 1000 + 10, "at most one lease over: {admitted}");
    assert!(
        admitted >= 1000 - 3 * 16 * 10,
        "leases left unspent: {admitted}"
    );

    let run = Duration::from_secs(5);
    let before = redis.calls("evalsha")?;
    let seen = load(&setup, "/steady", 16, u64::MAX, run).await;
    let calls = redis.calls("evalsha")? - before;
    let n = seen.iter().filter(|(_, s, _)| *s == 200).count() as f64;
    let span = seen.iter().map(|(_, _, t)| *t).max().unwrap_or_default();
    let exact_bound = 100.0 + span.as_secs_f64() * 100.0;
    eprintln!(
        "cost mode (100 per 1s, lease 5, {} requests over {span:?}): admitted {n} against an exact \
         bound of {exact_bound:.1} ({:.4}), {calls} EVALSHA",
        seen.len(),
        n / exact_bound
    );
    // The lease time is a second here (5 x 10 ms is shorter), so the bound
    // is one lease per data plane.
    assert!(
        n <= exact_bound + 3.0 * 5.0 + 1.0,
        "admitted {n}: more than a lease per data plane over the exact bound {exact_bound:.1}"
    );
    Ok(())
}

/// Cost mode: a data plane that stops (SIGTERM) gives the tokens it leased
/// and did not spend back to Redis, so the other data planes can admit
/// them; without that they would be lost until the bucket refills (here,
/// an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_data_plane_gives_its_leased_tokens_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisServer::start(dir.path())?;
    let flags = vec!["--redis-url".to_string(), redis.url()];
    let mut setup = Setup::start(2, &flags).await?;
    setup
        .apply(&[(
            "leased",
            "key: [route], limit: 100, window: 1h, lease: 40, on_store_failure: closed",
        )])
        .await?;

    // Three requests on the first data plane: its first lease is a quarter
    // of 40, so it spends three of ten and holds seven.
    let client = http_client();
    for _ in 0..3 {
        assert_eq!(send(&client, &setup.url(0, "/leased"), &[]).await?.0, 200);
    }
    assert!(
        setup.dps[0].terminate(Duration::from_secs(20))?,
        "the data plane stops cleanly"
    );

    // The second data plane admits everything else in the bucket: 97.
    let url = setup.url(1, "/leased");
    let mut admitted = 0;
    let refused = loop {
        let (status, _) = send(&client, &url, &[]).await?;
        if status != 200 {
            break status;
        }
        admitted += 1;
        anyhow::ensure!(admitted <= 100, "more than the limit admitted");
    };
    eprintln!("after the first data plane stopped, the second admitted {admitted}, then {refused}");
    assert_eq!(refused, 429);
    assert_eq!(admitted, 97, "the seven leased tokens came back");
    Ok(())
}

/// Cluster limits over TLS to a real redis-server (`rediss://` and
/// `--redis-ca-file`): counted exactly as over plain TCP. A data plane that
/// does not trust the server's certificate gets no decision, and a limit
/// with `on_store_failure: closed` answers 503 there rather than counting
/// in clear or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_limits_are_counted_over_tls_with_the_servers_ca() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisServer::start_tls(dir.path())?;
    let url = redis.tls_url().expect("a TLS port");
    let limit = [(
        "tls",
        "key: [route], limit: 3, window: 1m, on_store_failure: closed",
    )];

    let trusted = Setup::start(
        1,
        &[
            "--redis-url".to_string(),
            url.clone(),
            "--redis-ca-file".into(),
            redis.ca_file().display().to_string(),
            // The first decision also connects (TLS handshake, debug build).
            "--rate-limit-timeout-ms".into(),
            "2000".into(),
        ],
    )
    .await?;
    trusted.apply(&limit).await?;
    let client = http_client();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(send(&client, &trusted.url(0, "/tls"), &[]).await?.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Counted in that Redis (read on its plain port).
    let keys = redis.cli(&["keys", "gatehouse:rl:*"])?;
    assert!(keys.contains("{tls/tls/"), "the bucket is in Redis: {keys}");

    // Another CA: no decision can be made, the closed limit says 503.
    let other = gatehouse_e2e::certs::LoopbackCert::new()?;
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.ca_pem)?;
    let untrusted = Setup::start(
        1,
        &[
            "--redis-url".to_string(),
            url,
            "--redis-ca-file".into(),
            other_ca.display().to_string(),
        ],
    )
    .await?;
    untrusted.apply(&limit).await?;
    assert_eq!(send(&client, &untrusted.url(0, "/tls"), &[]).await?.0, 503);
    assert_eq!(send(&client, &untrusted.url(0, "/free"), &[]).await?.0, 200);
    let metrics = untrusted.metrics(0).await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gatehouse_ratelimit_redis_errors_total") && !l.ends_with(" 0")),
        "the failed decisions are counted:\n{metrics}"
    );

    // Flags that cannot work stop the data plane at start, saying why.
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello\n")?;
    let redis_url = redis.url();
    let not_pem_arg = not_pem.display().to_string();
    let ca_arg = redis.ca_file().display().to_string();
    for (flags, says) in [
        (
            vec!["--redis-url", &redis_url, "--redis-ca-file", &not_pem_arg],
            "no PEM certificate",
        ),
        (
            vec!["--redis-url", &redis_url, "--redis-ca-file", &ca_arg],
            "the Redis URLs are redis:// (no TLS): use rediss://",
        ),
        (
            vec!["--redis-ca-file", &ca_arg],
            "--redis-ca-file and --redis-client-cert need --redis-url, --redis-cluster or --redis-sentinel",
        ),
    ] {
        let out = std::process::Command::new(gatehouse_e2e::bin("gatehouse"))
            .args(["data-plane", "--control-plane", "127.0.0.1:1"])
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .args(&flags)
            .env("GATEHOUSE_TOKEN", gatehouse_e2e::TOKEN)
            .env_remove("GATEHOUSE_REDIS_URL")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} started");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
    }
    Ok(())
}

/// A Redis that asks TLS clients for a certificate: a data plane with
/// `--redis-client-cert` and `--redis-client-key` counts in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_shows_its_client_certificate_to_redis() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisServer::start_tls_mutual(dir.path())?;
    let (cert, key) = redis.client_files();
    let setup = Setup::start(
        1,
        &[
            "--redis-url".to_string(),
            redis.tls_url().expect("a TLS port"),
            "--redis-ca-file".into(),
            redis.ca_file().display().to_string(),
            "--redis-client-cert".into(),
            cert.display().to_string(),
            "--redis-client-key".into(),
            key.display().to_string(),
            // The first decision also connects (TLS handshake, debug build).
            "--rate-limit-timeout-ms".into(),
            "2000".into(),
        ],
    )
    .await?;
    setup
        .apply(&[(
            "mtls",
            "key: [route], limit: 3, window: 1m, on_store_failure: closed",
        )])
        .await?;
    let client = http_client();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(send(&client, &setup.url(0, "/mtls"), &[]).await?.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    Ok(())
}

/// Sentinel over TLS: the data plane asks TLS-only sentinels for the master
/// and counts in it over TLS (master, replica and sentinels speak only TLS
/// to each other and to clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_over_tls_name_the_master_the_limits_count_in() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisSentinels::start_tls(dir.path(), "gh-tls")?;
    let ca = redis.master.ca_file().display().to_string();
    counts_in_the_master(&redis, redis.tls_urls(), &["--redis-ca-file", &ca]).await
}

/// Through Sentinel to a master that asks for a password
/// (`--redis-sentinel-master-password`): the limits count in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_name_a_master_with_a_password_the_limits_count_in() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let password = "s3ntinel-master-pass";
    let redis = RedisSentinels::start_with_password(dir.path(), "gh-auth", password)?;
    // The master refuses a client without the password.
    let port = redis.master.port.to_string();
    let anonymous = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port, "dbsize"])
        .output()?;
    let said = String::from_utf8_lossy(&anonymous.stdout);
    assert!(said.contains("NOAUTH"), "{said}");
    // A data plane without the password says which flag is missing, rather
    // than that the sentinels named no master.
    {
        let flags = [
            "--redis-sentinel".to_string(),
            redis.urls().join(","),
            "--redis-sentinel-master".into(),
            redis.name.clone(),
        ];
        let setup = Setup::start(1, &flags).await?;
        eventually(
            Duration::from_secs(20),
            "the credentials warning",
            || async {
                setup.dps[0]
                    .log_text()
                    .contains("refused our credentials: check --redis-sentinel-master-password")
                    .then_some(())
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", setup.dps[0].log_tail()))?;
    }
    counts_in_the_master(
        &redis,
        redis.urls(),
        &["--redis-sentinel-master-password", password],
    )
    .await
}

/// One data plane that finds the master through `sentinels` (with `more`
/// flags) counts a per-user limit of 3 in it: 3 of 5 requests admitted, the
/// keys in the master the sentinels name (read on its plain port).
async fn counts_in_the_master(
    redis: &RedisSentinels,
    sentinels: Vec<String>,
    more: &[&str],
) -> anyhow::Result<()> {
    let mut flags = vec![
        "--redis-sentinel".to_string(),
        sentinels.join(","),
        "--redis-sentinel-master".into(),
        redis.name.clone(),
        "--rate-limit-timeout-ms".into(),
        "2000".into(),
    ];
    flags.extend(more.iter().map(|f| f.to_string()));
    let setup = Setup::start(1, &flags).await?;
    setup.apply(&[PER_USER_LIMIT]).await?;
    let client = http_client();
    eventually(
        Duration::from_secs(20),
        "the master from the sentinels",
        || async {
            send(&client, &setup.url(0, "/users"), &[("x-user", "probe")])
                .await
                .is_ok_and(|(s, _)| s != 503)
                .then_some(())
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {}", setup.dps[0].log_tail()))?;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            send(&client, &setup.url(0, "/users"), &[("x-user", "alice")])
                .await?
                .0,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(
        redis.master.cli(&["dbsize"])?.trim(),
        "2",
        "the probe and alice"
    );
    Ok(())
}
