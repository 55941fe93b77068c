//! An HTTP/1.1 load generator over keep-alive connections (one hyper client
//! connection per load connection), and the trivial backend it is measured
//! against.
//!
//! Two modes:
//!
//! - **closed loop** (no rate): every connection sends its next request as
//!   soon as the previous response is read; the result is the maximum
//!   throughput, and latency is from send to the end of the response body.
//! - **open loop** (`rate`): the offered load does not depend on how fast the
//!   server answers. Connection `c` of `C` owns the sends intended at
//!   `start + (c + k·C) / rate` for k = 0, 1, 2…, a fixed schedule of
//!   `rate / C` requests per second each (wrk2-style). One scheduler thread
//!   hands each connection its intended send times when they come due (with
//!   `std::thread::sleep`, which is precise to tens of microseconds, where
//!   tokio's timer rounds up to the next millisecond). A connection that is
//!   still waiting for a response takes the next intended time as soon as it
//!   is free, and latency is measured from the **intended** send time to the
//!   end of the response body: a stall is charged to every request that
//!   should have been sent during it (the coordinated-omission correction).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::{new_histogram, record, KEEP_ERRORS};

/// The backend's answer to every request.
pub const BACKEND_BODY: &str = "hello from gatehouse-bench\n";

/// Pause after a failed connect, so a dead server is not hammered in a tight loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// A loopback HTTP URL, parsed and checked.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub authority: String,
    pub path_and_query: String,
    /// Sent with every request (a credential, for the auth targets).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Target {
    /// Accepts only `http://` URLs whose host is a loopback address (or
    /// `localhost`, taken as 127.0.0.1): this harness never sends load
    /// anywhere else.
    pub fn parse(url: &str) -> Result<Target> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
        ensure!(
            uri.scheme_str() == Some("http"),
            "{url}: only http:// URLs are supported"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("{url}: no host"))?
            .clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let ip: std::net::IpAddr = if host == "localhost" {
            [127, 0, 0, 1].into()
        } else {
            host.parse()
                .with_context(|| format!("{url}: the host must be a loopback IP address"))?
        };
        ensure!(
            ip.is_loopback(),
            "{url}: load is only ever sent to a loopback address"
        );
        let port = authority.port_u16().unwrap_or(80);
        Ok(Target {
            addr: SocketAddr::new(ip, port),
            authority: authority.to_string(),
            path_and_query: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
            headers: Vec::new(),
        })
    }

    /// The same target, with `headers` on every request.
    pub fn with_headers(mut self, headers: &[(String, String)]) -> Result<Target> {
        for (name, value) in headers {
            self.headers.push((
                http::HeaderName::from_bytes(name.as_bytes())
                    .with_context(|| format!("header name {name:?}"))?,
                http::HeaderValue::from_str(value)
                    .with_context(|| format!("value of header {name}"))?,
            ));
        }
        Ok(self)
    }

    pub fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::get(self.path_and_query.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .body(Empty::new())
            .expect("a valid request");
        for (name, value) in &self.headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        req
    }
}

/// One HTTP/1.1 keep-alive client connection.
pub struct Conn {
    sender: SendRequest<Empty<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    /// Whether the server closed the connection (e.g. after `Connection: close`).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends one request and reads the whole response; returns its status.
    pub async fn get(&mut self, req: Request<Empty<Bytes>>) -> Result<StatusCode> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

/// What one load run is asked to do.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: Target,
    pub connections: usize,
    /// Unrecorded load before the measured window.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Total requests per second over all connections; `None` is closed loop.
    pub rate: Option<f64>,
    /// Upper bound on the requests of one connection in one run (warmup included).
    pub max_requests_per_connection: u64,
    /// Per-request limit; a request that takes longer is a transport error.
    pub timeout: Duration,
    /// Worker threads of the load generator's own runtime.
    pub threads: usize,
}

/// What one load run measured, over the measured window only.
pub struct LoadResult {
    /// Latency of every completed request in the window (any status), µs.
    pub hist: Histogram<u64>,
    /// 2xx responses.
    pub ok: u64,
    /// Responses with another status.
    pub non_2xx: u64,
    /// Connect failures, broken connections, timeouts, and (open loop)
    /// intended sends that could not be made before the run's drain deadline.
    pub transport_errors: u64,
    /// From the start of the window to the last measured completion.
    pub seconds: f64,
    pub messages: Vec<String>,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.seconds.max(1e-9)
    }

    pub fn errors(&self) -> u64 {
        self.non_2xx + self.transport_errors
    }

    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.hist.is_empty()).then(|| self.hist.value_at_quantile(q) as f64 / 1000.0)
    }

    pub fn max_ms(&self) -> Option<f64> {
        (!self.hist.is_empty()).then(|| self.hist.max() as f64 / 1000.0)
    }

    fn merge(&mut self, other: ConnResult) -> Result<()> {
        self.hist.add(&other.hist).context("merge histograms")?;
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.transport_errors += other.transport_errors;
        for m in other.messages {
            if self.messages.len() < KEEP_ERRORS {
                self.messages.push(m);
            }
        }
        Ok(())
    }
}

/// Runs the load on a runtime of its own, in a thread of its own, so the
/// generator's thread count is the configured one whatever the caller runs on.
pub fn run(cfg: LoadConfig) -> Result<LoadResult> {
    ensure!(
        (1..=1024).contains(&cfg.connections),
        "connections: use 1 to 1024"
    );
    ensure!((1..=64).contains(&cfg.threads), "threads: use 1 to 64");
    if let Some(rate) = cfg.rate {
        ensure!(
            rate.is_finite() && (1.0..=1_000_000.0).contains(&rate),
            "rate: use 1 to 1,000,000 requests/s"
        );
    }
    on_own_runtime(cfg.threads, move || run_async(cfg))
}

/// Runs the future `make` makes on a multi-thread runtime of `threads`
/// workers, in a thread of its own, and waits for it.
fn on_own_runtime<T, F>(threads: usize, make: impl FnOnce() -> F + Send + 'static) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name("load".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("load-worker")
                .enable_all()
                .build()?;
            rt.block_on(make())
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))?
}

struct ConnResult {
    hist: Histogram<u64>,
    ok: u64,
    non_2xx: u64,
    transport_errors: u64,
    messages: Vec<String>,
    /// The last measured completion.
    finished: Option<Instant>,
}

impl ConnResult {
    fn new() -> ConnResult {
        ConnResult {
            hist: new_histogram(),
            ok: 0,
            non_2xx: 0,
            transport_errors: 0,
            messages: Vec::new(),
            finished: None,
        }
    }

    fn error(&mut self, measured: bool, message: String) {
        if measured {
            self.transport_errors += 1;
        }
        if self.messages.len() < KEEP_ERRORS {
            self.messages.push(message);
        }
    }
}

async fn run_async(cfg: LoadConfig) -> Result<LoadResult> {
    // Open every connection before the clock starts.
    let mut conns = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        conns.push(Conn::open(cfg.target.addr).await?);
    }
    let begin = Instant::now() + Duration::from_millis(20);
    let measure_from = begin + cfg.warmup;
    let end = measure_from + cfg.duration;
    // How long queued open-loop sends may still go out after the end.
    let drain_until = end + cfg.timeout;

    let mut tasks = Vec::with_capacity(cfg.connections);
    let scheduler = match cfg.rate {
        None => {
            for conn in conns {
                tasks.push(tokio::spawn(closed_loop(
                    cfg.clone(),
                    conn,
                    begin,
                    measure_from,
                    end,
                )));
            }
            None
        }
        Some(rate) => {
            let mut senders = Vec::with_capacity(cfg.connections);
            for conn in conns {
                let (tx, rx) = mpsc::unbounded_channel();
                senders.push(tx);
                tasks.push(tokio::spawn(open_loop(
                    cfg.clone(),
                    conn,
                    rx,
                    measure_from,
                    end,
                    drain_until,
                )));
            }
            let max = cfg.max_requests_per_connection;
            Some(
                std::thread::Builder::new()
                    .name("load-schedule".into())
                    .spawn(move || schedule(senders, rate, begin, end, max))?,
            )
        }
    };

    let mut total = LoadResult {
        hist: new_histogram(),
        ok: 0,
        non_2xx: 0,
        transport_errors: 0,
        seconds: 0.0,
        messages: Vec::new(),
    };
    let mut finished = measure_from;
    for task in tasks {
        let r = task.await.context("load task")?;
        if let Some(f) = r.finished {
            finished = finished.max(f);
        }
        total.merge(r)?;
    }
    if let Some(s) = scheduler {
        s.join()
            .map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
    }
    total.seconds = finished
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-3);
    Ok(total)
}

/// Hands out the intended send times: number j is due at `begin + j / rate`
/// and belongs to connection `j mod C`, so each connection has a fixed
/// schedule of `rate / C` per second and together they offer `rate`.
fn schedule(
    senders: Vec<mpsc::UnboundedSender<Instant>>,
    rate: f64,
    begin: Instant,
    end: Instant,
    max_per_connection: u64,
) {
    let n = senders.len() as u64;
    let max_total = max_per_connection.saturating_mul(n);
    let interval = 1.0 / rate;
    for j in 0..max_total {
        let due = begin + Duration::from_secs_f64(j as f64 * interval);
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // A connection that gave up has dropped its receiver: nothing to do.
        let _ = senders[(j % n) as usize].send(due);
    }
}

async fn closed_loop(
    cfg: LoadConfig,
    conn: Conn,
    begin: Instant,
    measure_from: Instant,
    end: Instant,
) -> ConnResult {
    let mut r = ConnResult::new();
    let mut conn = Some(conn);
    tokio::time::sleep_until(begin.into()).await;
    for _ in 0..cfg.max_requests_per_connection {
        let start = Instant::now();
        if start >= end {
            break;
        }
        one_request(
            &cfg.target,
            cfg.timeout,
            &mut conn,
            &mut r,
            start,
            start >= measure_from,
        )
        .await;
    }
    r
}

async fn open_loop(
    cfg: LoadConfig,
    conn: Conn,
    mut due: mpsc::UnboundedReceiver<Instant>,
    measure_from: Instant,
    end: Instant,
    drain_until: Instant,
) -> ConnResult {
    let mut r = ConnResult::new();
    let mut conn = Some(conn);
    while let Some(intended) = due.recv().await {
        let measured = intended >= measure_from && intended < end;
        if Instant::now() >= drain_until {
            // Far behind schedule: what is still queued was never sent.
            r.error(
                measured,
                "intended send not made before the drain deadline".into(),
            );
            continue;
        }
        one_request(
            &cfg.target,
            cfg.timeout,
            &mut conn,
            &mut r,
            intended,
            measured,
        )
        .await;
    }
    r
}

/// One request of `target` on `conn` (reconnecting first when the server
/// closed it), recorded from `from` when `measured`. Returns the status and
/// when the response ended, or `None` on a transport error.
async fn one_request(
    target: &Target,
    timeout: Duration,
    conn: &mut Option<Conn>,
    r: &mut ConnResult,
    from: Instant,
    measured: bool,
) -> Option<(StatusCode, Instant)> {
    if conn.as_ref().is_none_or(Conn::is_closed) {
        match tokio::time::timeout(timeout, Conn::open(target.addr)).await {
            Ok(Ok(c)) => *conn = Some(c),
            Ok(Err(e)) => {
                r.error(measured, format!("{e:#}"));
                *conn = None;
                tokio::time::sleep(RECONNECT_PAUSE).await;
                return None;
            }
            Err(_) => {
                r.error(measured, "connect timed out".into());
                *conn = None;
                return None;
            }
        }
    }
    let c = conn.as_mut().expect("connected above");
    let result = tokio::time::timeout(timeout, c.get(target.request())).await;
    let done = Instant::now();
    match result {
        Ok(Ok(status)) => {
            if measured {
                record(&mut r.hist, done.saturating_duration_since(from));
                r.finished = Some(done);
                if status.is_success() {
                    r.ok += 1;
                } else {
                    r.non_2xx += 1;
                    if r.messages.len() < KEEP_ERRORS {
                        r.messages.push(format!("status {status}"));
                    }
                }
            }
            Some((status, done))
        }
        Ok(Err(e)) => {
            r.error(measured, format!("{e:#}"));
            *conn = None;
            None
        }
        Err(_) => {
            r.error(measured, format!("no response within {timeout:?}"));
            *conn = None;
            None
        }
    }
}

/// Serves `BACKEND_BODY` with 200 to every request on `listener`, HTTP/1.1
/// keep-alive, until the process exits.
pub async fn serve_backend(listener: TcpListener) -> Result<()> {
    let body = Bytes::from_static(BACKEND_BODY.as_bytes());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                eprintln!("backend: accept failed: {e}");
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header(http::header::CONTENT_TYPE, "text/plain")
                            .body(Full::new(body))
                            .expect("a valid response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Checks that an address to listen on or connect to is on loopback.
pub fn loopback_listen(addr: SocketAddr) -> Result<SocketAddr> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address: the benchmark servers stay on loopback");
    }
    Ok(addr)
}

/// Closed-loop load that takes its targets in turn by time: the run is cut
/// into slices of `slice`, from `begin`, and slice `i` sends to target
/// [`target_of_slice`]`(i, N)`. Every connection stays open throughout (the targets are paths
/// of one server), so the targets see the same connections, the same
/// process and, slice after slice, nearly the same machine.
#[derive(Clone, Debug)]
pub struct Alternating {
    pub targets: Vec<Target>,
    pub connections: usize,
    /// When the first slice starts (the connections open before).
    pub begin: Instant,
    pub slice: Duration,
    /// The start of each slice that is not counted: the previous target's
    /// requests still in flight end in it.
    pub guard: Duration,
    pub slices: usize,
    pub timeout: Duration,
    pub threads: usize,
    /// Set to end the run early (its counts are then partial).
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What an [`Alternating`] run counted.
pub struct AlternatingResult {
    /// By slice: 2xx responses that ended in the slice's counted part (after
    /// its guard) to requests sent in the same slice.
    pub ok: Vec<u64>,
    /// Non-2xx responses and transport errors, over the whole run.
    pub errors: u64,
    pub messages: Vec<String>,
}

/// Runs an [`Alternating`] load on a runtime of its own, in a thread of its
/// own (as [`run`]).
pub fn run_alternating(cfg: Alternating) -> Result<AlternatingResult> {
    ensure!(!cfg.targets.is_empty(), "no targets");
    ensure!(
        cfg.targets.iter().all(|t| t.addr == cfg.targets[0].addr),
        "alternating targets must be paths of one server"
    );
    ensure!(
        (1..=1024).contains(&cfg.connections),
        "connections: use 1 to 1024"
    );
    ensure!((1..=64).contains(&cfg.threads), "threads: use 1 to 64");
    ensure!(
        cfg.guard < cfg.slice,
        "the guard must be shorter than the slice"
    );
    on_own_runtime(cfg.threads, move || alternating_async(cfg))
}

async fn alternating_async(cfg: Alternating) -> Result<AlternatingResult> {
    let mut tasks = Vec::with_capacity(cfg.connections);
    let cfg = std::sync::Arc::new(cfg);
    for _ in 0..cfg.connections {
        let conn = Conn::open(cfg.targets[0].addr).await?;
        tasks.push(tokio::spawn(alternating_loop(cfg.clone(), conn)));
    }
    let mut total = AlternatingResult {
        ok: vec![0; cfg.slices],
        errors: 0,
        messages: Vec::new(),
    };
    for task in tasks {
        let (ok, r) = task.await.context("load task")?;
        for (t, n) in total.ok.iter_mut().zip(ok) {
            *t += n;
        }
        total.errors += r.non_2xx + r.transport_errors;
        for m in r.messages {
            if total.messages.len() < KEEP_ERRORS {
                total.messages.push(m);
            }
        }
    }
    Ok(total)
}

/// The target of slice `i` of an [`Alternating`] load over `n` targets.
/// Slices come in rounds of `n`; each round takes every target once, in an
/// order of its own (a shuffle seeded by the round's number, the same in
/// every run), so that no target always follows the same one: whatever a
/// target's slice leaves behind (work still to do, a cold cache) falls on
/// every other target alike.
pub fn target_of_slice(i: usize, n: usize) -> usize {
    let (round, place) = (i / n, i % n);
    // splitmix64 of the round number, then Fisher-Yates over 0..n.
    let mut state = (round as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for j in (1..n).rev() {
        let pick = (next() % (j as u64 + 1)) as usize;
        order.swap(j, pick);
    }
    order[place]
}

/// The slice an instant falls in, if the run has started by then.
fn slice_of(cfg: &Alternating, at: Instant) -> Option<usize> {
    let since = at.checked_duration_since(cfg.begin)?;
    usize::try_from(since.as_nanos() / cfg.slice.as_nanos()).ok()
}

async fn alternating_loop(cfg: std::sync::Arc<Alternating>, conn: Conn) -> (Vec<u64>, ConnResult) {
    let mut ok = vec![0; cfg.slices];
    let mut r = ConnResult::new();
    let mut conn = Some(conn);
    tokio::time::sleep_until(cfg.begin.into()).await;
    // (slice, its target), worked out once a slice.
    let mut current = (usize::MAX, 0);
    while !cfg.stop.load(std::sync::atomic::Ordering::Relaxed) {
        let start = Instant::now();
        let Some(i) = slice_of(&cfg, start).filter(|i| *i < cfg.slices) else {
            break;
        };
        if current.0 != i {
            current = (i, target_of_slice(i, cfg.targets.len()));
        }
        let target = &cfg.targets[current.1];
        let answer = one_request(target, cfg.timeout, &mut conn, &mut r, start, true).await;
        if let Some((status, done)) = answer {
            // Ended in the same slice, past its guard.
            let since = done.saturating_duration_since(cfg.begin).as_nanos();
            let in_slice = since % cfg.slice.as_nanos();
            if status.is_success()
                && slice_of(&cfg, done) == Some(i)
                && in_slice >= cfg.guard.as_nanos()
            {
                ok[i] += 1;
            }
        }
    }
    (ok, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers 200 on `/a` and 404 on anything else.
    async fn only_a(listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let status = if req.uri().path() == "/a" {
                        StatusCode::OK
                    } else {
                        StatusCode::NOT_FOUND
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"x")))
                            .expect("a valid response"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    #[test]
    fn alternating_load_sends_each_slice_to_its_own_target() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(only_a(listener));
        let cfg = Alternating {
            targets: vec![
                Target::parse(&format!("http://{addr}/a")).unwrap(),
                Target::parse(&format!("http://{addr}/b")).unwrap(),
            ],
            connections: 4,
            begin: Instant::now() + Duration::from_millis(200),
            slice: Duration::from_millis(100),
            guard: Duration::from_millis(10),
            slices: 6,
            timeout: Duration::from_secs(5),
            threads: 1,
            stop: Default::default(),
        };
        let r = run_alternating(cfg).unwrap();
        // /a answers 200, /b 404: only /a's slices count.
        for (i, ok) in r.ok.iter().enumerate() {
            if target_of_slice(i, 2) == 0 {
                assert!(*ok > 0, "slice {i} of /a counted nothing: {:?}", r.ok);
            } else {
                assert_eq!(*ok, 0, "slice {i} of /b counted 2xx: {:?}", r.ok);
            }
        }
        assert!(r.errors > 0, "the 404s of /b are errors");
        assert!(
            r.messages.iter().any(|m| m.contains("404")),
            "{:?}",
            r.messages
        );
    }

    #[test]
    fn every_round_takes_each_target_once_and_no_target_has_a_fixed_neighbour() {
        for n in 1..8 {
            for round in 0..50 {
                let mut seen: Vec<usize> =
                    (0..n).map(|p| target_of_slice(round * n + p, n)).collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "round {round} of {n}");
            }
        }
        // Over 1 000 rounds of 5, each target follows each other one about
        // a fifth of the time (what a slice leaves behind falls on all).
        let n = 5;
        let mut after = [[0u32; 5]; 5];
        for i in 1..5000 {
            after[target_of_slice(i - 1, n)][target_of_slice(i, n)] += 1;
        }
        for (a, row) in after.iter().enumerate() {
            for (b, count) in row.iter().enumerate() {
                if a != b {
                    assert!(
                        (150..=350).contains(count),
                        "{b} after {a}: {count} times: {after:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn alternating_targets_must_share_a_server() {
        let cfg = Alternating {
            targets: vec![
                Target::parse("http://127.0.0.1:1/a").unwrap(),
                Target::parse("http://127.0.0.1:2/b").unwrap(),
            ],
            connections: 1,
            begin: Instant::now(),
            slice: Duration::from_millis(100),
            guard: Duration::from_millis(10),
            slices: 2,
            timeout: Duration::from_secs(1),
            threads: 1,
            stop: Default::default(),
        };
        let e = run_alternating(cfg).err().unwrap().to_string();
        assert!(e.contains("paths of one server"), "{e}");
    }
}
