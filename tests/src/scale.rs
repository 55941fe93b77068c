//! The scale run: a control plane loaded with many API keys and routes, two
//! data planes that load it as a full snapshot, then single key creates and
//! revocations timed until every data plane accepts or refuses the key.
//! `gatehouse-bench scale` runs it at full size; an e2e test runs it small.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use bytes::Bytes;
use gatehouse_model::{apikey, Kind};
use gatehouse_proto::pb;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::transport::Endpoint;

use crate::data::{DataPlaneProc, Upstream};
use crate::{Cluster, Options};

/// The sizes of one run.
#[derive(Clone, Debug)]
pub struct ScaleSpec {
    pub keys: u64,
    /// Consumers the keys are spread over.
    pub consumers: u64,
    pub routes: u64,
    /// Control-plane nodes (1: a single-node cluster).
    pub nodes: u64,
    /// Key creates (and as many revocations) timed one at a time.
    pub writes: u64,
    /// Objects per admin `Apply` while loading (a write holds at most 100,000).
    pub batch: usize,
    /// Give up on one write's propagation after this long.
    pub timeout: Duration,
    /// How long the data planes may take to load the snapshot.
    pub load_timeout: Duration,
}

/// What one data plane showed.
#[derive(Clone, Debug, Default)]
pub struct DataPlaneReport {
    pub name: String,
    /// From the process start until it serves the loaded revision.
    pub snapshot_load: Duration,
    /// Its own time to compile the full snapshot (from its metrics).
    pub full_compile: Duration,
    /// Resident memory once it serves the loaded revision.
    pub rss_loaded: u64,
    pub rss_end: u64,
    /// Revisions applied as a delta / in full during the timed writes.
    pub delta_applies: u64,
    pub full_applies: u64,
    /// Mean time to patch and swap in one delta.
    pub mean_delta_apply: Duration,
    /// Last-known-good files written, and their mean write time.
    pub lkg_writes: u64,
    pub mean_lkg_write: Duration,
    pub lkg_bytes: u64,
    /// Time from acknowledgement until this data plane accepted a created
    /// key / refused a revoked one.
    pub create: Vec<Duration>,
    pub revoke: Vec<Duration>,
}

/// What the run measured.
#[derive(Clone, Debug, Default)]
pub struct ScaleReport {
    pub load: Duration,
    pub revision: u64,
    /// A data plane with no configuration (it watches nothing that answers).
    pub rss_empty: u64,
    pub data_planes: Vec<DataPlaneReport>,
    /// Acknowledgement until both data planes accepted / refused the key.
    pub create_both: Vec<Duration>,
    pub revoke_both: Vec<Duration>,
    /// Write sent until acknowledged.
    pub ack: Vec<Duration>,
    pub missed: u64,
}

/// Key `i`'s id: 12 characters of the id alphabet.
fn key_id(i: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = i;
    let mut out = [b'0'; apikey::ID_LEN];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out.to_vec()).expect("ASCII")
}

fn key_secret(i: u64) -> String {
    format!("{:0>width$}", i, width = apikey::SECRET_LEN)
}

/// Key `i` as a client presents it.
pub fn presented_key(i: u64) -> String {
    apikey::format_key(&key_id(i), &key_secret(i))
}

fn object(kind: Kind, name: String, spec: String) -> pb::Object {
    pb::Object {
        kind: kind.as_str().into(),
        name,
        labels: Default::default(),
        revision: 0,
        spec_json: spec,
    }
}

fn api_key(i: u64, consumer: u64, revoked: bool) -> pb::Object {
    let spec = format!(
        r#"{{"consumer":"c-{consumer}","key_hash":"{}","revoked":{revoked}}}"#,
        apikey::hash_secret(&key_secret(i))
    );
    object(Kind::ApiKey, key_id(i), spec)
}

fn put(o: pb::Object) -> pb::Operation {
    pb::Operation {
        op: Some(pb::operation::Op::Put(pb::PutRequest {
            object: Some(o),
            expected_revision: None,
        })),
    }
}

type AdminClient = gatehouse_proto::AdminClient;

async fn admin_slow(addr: &str) -> Result<AdminClient> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(300))
        .connect()
        .await
        .with_context(|| format!("connect to {addr}"))?;
    Ok(pb::admin_client::AdminClient::with_interceptor(
        channel,
        gatehouse_proto::BearerToken::new(Some(crate::TOKEN))?,
    )
    .max_encoding_message_size(gatehouse_proto::MAX_ADMIN_REQUEST_BYTES))
}

/// Writes `objects` in batches of `batch`, returning the last revision.
async fn load(
    client: &mut AdminClient,
    objects: impl Iterator<Item = pb::Object>,
    batch: usize,
) -> Result<u64> {
    let mut revision = 0;
    let mut ops = Vec::with_capacity(batch);
    let mut objects = objects.peekable();
    while objects.peek().is_some() {
        ops.extend(objects.by_ref().take(batch).map(put));
        let n = ops.len();
        revision = client
            .apply(pb::ApplyRequest {
                ops: std::mem::take(&mut ops),
                expected_config_revision: None,
            })
            .await
            .map_err(|s| anyhow!("apply a batch of {n}: {}", s.message()))?
            .into_inner()
            .revision;
    }
    Ok(revision)
}

/// Resident memory of a process, in bytes (Linux `/proc`).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// One sample (`name{labels} value`) of the Prometheus text, 0 when absent.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn status(client: &Http, url: &str, key: &str) -> Option<u16> {
    let req = http::Request::get(url)
        .header("x-api-key", key)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Some(status)
}

async fn metrics_text(client: &Http, ops: &str) -> String {
    let Ok(req) = http::Request::get(format!("http://{ops}/metrics")).body(Full::new(Bytes::new()))
    else {
        return String::new();
    };
    match client.request(req).await {
        Ok(resp) => match resp.into_body().collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    }
}

/// Polls until the data plane answers `want` (200: accepted, 401: refused).
async fn until_status(
    client: &Http,
    url: &str,
    key: &str,
    want: u16,
    ack: Instant,
    deadline: Instant,
) -> Option<Duration> {
    loop {
        if status(client, url, key).await == Some(want) {
            return Some(ack.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The p-quantile of `v`, in milliseconds.
pub fn quantile_ms(v: &[Duration], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort();
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i].as_secs_f64() * 1000.0
}

struct Counters {
    delta: f64,
    full: f64,
    delta_sum: f64,
    lkg: f64,
    lkg_sum: f64,
}

fn counters(text: &str) -> Counters {
    Counters {
        delta: metric(text, r#"gatehouse_config_applies_total{kind="delta"}"#),
        full: metric(text, r#"gatehouse_config_applies_total{kind="full"}"#),
        delta_sum: metric(
            text,
            r#"gatehouse_config_apply_duration_seconds_sum{kind="delta"}"#,
        ),
        lkg: metric(text, "gatehouse_last_known_good_writes_total"),
        lkg_sum: metric(text, "gatehouse_last_known_good_write_duration_seconds_sum"),
    }
}

/// Runs the scale scenario; `progress` gets a line per phase.
pub async fn run(spec: &ScaleSpec, progress: &dyn Fn(&str)) -> Result<ScaleReport> {
    ensure!(
        spec.consumers >= 1 && spec.routes >= 1,
        "at least one consumer and one route"
    );
    ensure!(spec.keys >= 1, "at least one key");
    let options = Options {
        // No Raft snapshot during the run unless it is long.
        snapshot_every: 10_000,
        ..Options::default()
    };
    let cluster = Cluster::start(spec.nodes, options)
        .await
        .context("start the control plane")?;
    let leader = cluster.leader().await?;
    let addr = cluster.node(leader).admin.clone();
    let mut client = admin_slow(&addr).await?;
    let upstream = Upstream::start("scale").await?;
    let mut report = ScaleReport::default();

    let began = Instant::now();
    let base = vec![
        object(
            Kind::Upstream,
            "scale".into(),
            format!(r#"{{"targets":[{{"address":"{}"}}]}}"#, upstream.addr),
        ),
        object(
            Kind::Policy,
            "keys".into(),
            r#"{"authentication":["api_key"],"api_key":{"header":"X-Api-Key"}}"#.into(),
        ),
    ];
    load(&mut client, base.into_iter(), spec.batch).await?;
    let routes = (0..spec.routes).map(|i| {
        object(
            Kind::Route,
            format!("r-{i}"),
            format!(r#"{{"paths":[{{"prefix":"/r-{i}/"}}],"upstream":"scale","policy":"keys"}}"#),
        )
    });
    load(&mut client, routes, spec.batch).await?;
    let consumers = (0..spec.consumers).map(|i| {
        object(
            Kind::Consumer,
            format!("c-{i}"),
            r#"{"groups":["scale"]}"#.into(),
        )
    });
    load(&mut client, consumers, spec.batch).await?;
    progress(&format!(
        "{} routes and {} consumers loaded in {:.1} s; loading {} keys in batches of {}",
        spec.routes,
        spec.consumers,
        began.elapsed().as_secs_f64(),
        spec.keys,
        spec.batch
    ));
    let keys = (0..spec.keys).map(|i| api_key(i, i % spec.consumers, false));
    report.revision = load(&mut client, keys, spec.batch).await?;
    report.load = began.elapsed();
    progress(&format!(
        "loaded at revision {} in {:.1} s",
        report.revision,
        report.load.as_secs_f64()
    ));

    let dir = tempfile::tempdir()?;
    // A data plane that never gets a configuration: the baseline memory.
    let empty = DataPlaneProc::start("dp-empty", &["127.0.0.1:1".to_string()], dir.path())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.rss_empty = empty.pid().map_or(0, rss_bytes);
    drop(empty);

    let order = |first: usize| -> Vec<String> {
        let mut v: Vec<String> = cluster.nodes.iter().map(|n| n.admin.clone()).collect();
        let n = v.len();
        v.rotate_left(first % n);
        v
    };
    let http: Http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut dps = Vec::new();
    for k in 0..2usize {
        let name = format!("dp-{}", k + 1);
        let started = Instant::now();
        let dp = DataPlaneProc::start(&name, &order(k), dir.path())?;
        let ready = format!("ready: revision {}", report.revision);
        let deadline = started + spec.load_timeout;
        loop {
            let reply = crate::data::get(&format!("http://{}/readyz", dp.ops), &[]).await;
            if reply.is_ok_and(|r| String::from_utf8_lossy(&r.body).trim() == ready) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{name} did not serve revision {} within {:?}:\n{}",
                report.revision,
                spec.load_timeout,
                dp.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let snapshot_load = started.elapsed();
        let text = metrics_text(&http, &dp.ops).await;
        let full_compile = metric(
            &text,
            r#"gatehouse_config_apply_duration_seconds_sum{kind="full"}"#,
        );
        let rss = dp.pid().map_or(0, rss_bytes);
        progress(&format!(
            "{name} serves revision {} after {:.2} s (compile {:.2} s), RSS {} MiB",
            report.revision,
            snapshot_load.as_secs_f64(),
            full_compile,
            rss >> 20
        ));
        report.data_planes.push(DataPlaneReport {
            name,
            snapshot_load,
            full_compile: Duration::from_secs_f64(full_compile),
            rss_loaded: rss,
            ..DataPlaneReport::default()
        });
        dps.push(dp);
    }
    let before: Vec<Counters> = {
        let mut v = Vec::new();
        for dp in &dps {
            v.push(counters(&metrics_text(&http, &dp.ops).await));
        }
        v
    };

    let urls: Vec<String> = dps
        .iter()
        .map(|dp| format!("http://{}/r-0/scale", dp.proxy))
        .collect();
    for w in 0..spec.writes {
        let i = spec.keys + w;
        let presented = presented_key(i);
        for (revoked, want) in [(false, 200u16), (true, 401u16)] {
            let sent = Instant::now();
            client
                .put(pb::PutRequest {
                    object: Some(api_key(i, i % spec.consumers, revoked)),
                    expected_revision: None,
                })
                .await
                .map_err(|s| anyhow!("put key {i}: {}", s.message()))?;
            let ack = Instant::now();
            report.ack.push(ack - sent);
            let deadline = ack + spec.timeout;
            let (a, b) = tokio::join!(
                until_status(&http, &urls[0], &presented, want, ack, deadline),
                until_status(&http, &urls[1], &presented, want, ack, deadline),
            );
            let both = match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            for (k, seen) in [a, b].into_iter().enumerate() {
                if let Some(d) = seen {
                    let dp = &mut report.data_planes[k];
                    if revoked {
                        dp.revoke.push(d);
                    } else {
                        dp.create.push(d);
                    }
                }
            }
            match both {
                Some(d) if revoked => report.revoke_both.push(d),
                Some(d) => report.create_both.push(d),
                None => report.missed += 1,
            }
        }
    }
    // Let the last-known-good writer catch up before reading its counters.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (k, dp) in dps.iter().enumerate() {
        let after = counters(&metrics_text(&http, &dp.ops).await);
        let r = &mut report.data_planes[k];
        r.delta_applies = (after.delta - before[k].delta) as u64;
        r.full_applies = (after.full - before[k].full) as u64;
        if r.delta_applies > 0 {
            r.mean_delta_apply = Duration::from_secs_f64(
                (after.delta_sum - before[k].delta_sum) / r.delta_applies as f64,
            );
        }
        r.lkg_writes = after.lkg as u64;
        if after.lkg > 0.0 {
            r.mean_lkg_write = Duration::from_secs_f64(after.lkg_sum / after.lkg);
        }
        r.lkg_bytes = std::fs::metadata(dp.lkg_path()).map_or(0, |m| m.len());
        r.rss_end = dp.pid().map_or(0, rss_bytes);
    }
    drop(dps);
    drop(upstream);
    drop(cluster);
    Ok(report)
}
