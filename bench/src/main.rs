//! `gatehouse-bench`: benchmarks that run real `gatehouse` processes on
//! loopback through the `gatehouse-e2e` sandbox.
//!
//! - `admin-writes`: closed-loop write throughput and latency through the
//!   admin API of a fresh loopback control-plane cluster for every
//!   (target, concurrency) cell.
//! - `sled-flush`: the latency of one small sled batch plus flush, the
//!   durability cost every node pays for each Raft log append.
//! - `backend`: a trivial HTTP/1.1 server (200, a small fixed body).
//! - `http`: an HTTP/1.1 keep-alive load generator, closed loop or at a fixed
//!   rate with coordinated-omission-corrected latency (`load.rs`).
//! - `proxies`: the backend direct and behind nginx, HAProxy and Gatehouse,
//!   throughput and latency at a fixed rate in one table (`proxies.rs`).
//! - `propagation`: time from a route write's acknowledgement until two data
//!   planes serve it (`propagation.rs`).
//! - `scale`: a million API keys and ten thousand routes: snapshot load time
//!   and memory of two data planes, and key create/revoke propagation as
//!   deltas (`scale.rs`).
//!
//! Build with `--release` (see `bench/run-admin-writes.sh`): the sandbox takes
//! the `gatehouse` binary from the same target directory as this one.

mod auth;
mod firewall_cost;
mod floor;
mod load;
mod policy_cost;
mod propagation;
mod proxies;
mod scale;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use gatehouse_e2e::{admin, Cluster, Options};
use gatehouse_proto::pb;
use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, up to a minute.
const HIST_MAX_US: u64 = 60_000_000;
/// Error messages kept per run, to print.
const KEEP_ERRORS: usize = 5;
/// Pause after a failed write, so a broken cluster is not hammered in a tight loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Largest `--object-bytes`, well under the model's 64 KiB object limit.
const MAX_OBJECT_BYTES: usize = 32 * 1024;

#[derive(Parser)]
#[command(name = "gatehouse-bench", about = "Gatehouse benchmarks on loopback")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write throughput and latency through the admin API of a loopback cluster.
    ///
    /// For every target and every concurrency, starts a fresh cluster, waits
    /// for a leader, runs N closed-loop writers (one gRPC connection each,
    /// each put a new consumer object) for the warmup and then the measured
    /// duration, and prints one table row.
    AdminWrites(AdminWrites),
    /// Latency of one small sled batch + flush on this disk (default sled config,
    /// as the control plane uses), the floor under every Raft log append.
    SledFlush(SledFlush),
    /// A trivial HTTP/1.1 backend on loopback: 200 with a small fixed body to
    /// every request. Prints `ready addr=HOST:PORT` once it listens.
    Backend(BackendArgs),
    /// The floor under a hyper-based proxy: every request forwarded unchanged
    /// over an upstream connection of its client connection's own, nothing
    /// else done (a reference point for `proxies`, not a proxy to run).
    /// Prints `ready addr=HOST:PORT` once it listens.
    HyperFloor(HyperFloorArgs),
    /// HTTP/1.1 load over keep-alive connections: closed loop (maximum
    /// throughput), or with --rate an open loop on a fixed schedule per
    /// connection, latency measured from the intended send time.
    Http(HttpArgs),
    /// The backend direct and behind nginx, HAProxy and Gatehouse (one worker
    /// each): closed-loop throughput, then latency at one fixed rate.
    ///
    /// A flag given twice takes its last value, so arguments after a
    /// script's own (bench/run-*.sh) override them.
    #[command(args_override_self = true)]
    Proxies(proxies::ProxiesArgs),
    /// Time from a route write's acknowledgement by the leader of a 3-node
    /// control plane until both of 2 data planes serve it.
    Propagation(propagation::PropagationArgs),
    /// With many API keys and routes loaded: how long a data plane takes to
    /// load the full snapshot, its memory per key, and the time from a key
    /// create or revoke's acknowledgement until both of 2 data planes
    /// accept or refuse the key (each change applied as a delta).
    Scale(scale::ScaleArgs),
    /// CPU time per request of the firewall's content rules (off, and the
    /// default injection rule set), in process.
    FirewallCost(firewall_cost::FirewallCostArgs),
    /// What a policy on a route costs the proxy, in one Gatehouse process:
    /// a plain route and a route per policy, one closed-loop load taking
    /// them in turn for short slices (100 ms), for minutes; each policy's
    /// throughput as a share of the plain route's around each of its slices.
    ///
    /// A flag given twice takes its last value (as for `proxies`).
    #[command(args_override_self = true)]
    PolicyCost(policy_cost::PolicyCostArgs),
}

#[derive(clap::Args)]
struct BackendArgs {
    /// Listen address; loopback only (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Worker threads of the backend's runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Exit after this many seconds, in case whoever started it does not stop it.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    max_seconds: u64,
}

#[derive(clap::Args)]
struct HyperFloorArgs {
    /// Listen address; loopback only (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The backend every request goes to; loopback only.
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads of the runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Exit after this many seconds, in case whoever started it does not stop it.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    max_seconds: u64,
}

#[derive(clap::Args)]
struct HttpArgs {
    /// The URL to GET (http://, loopback host only).
    #[arg(long)]
    url: String,
    /// Keep-alive connections, each with one request at a time.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    connections: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: u64,
    /// Unmeasured seconds of the same load first.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=120))]
    warmup: u64,
    /// Total requests per second (open loop); without it, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Per-request time limit, milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    timeout_ms: u64,
    /// Upper bound on the requests of one connection (warmup included).
    #[arg(long, default_value_t = 50_000_000)]
    max_requests_per_connection: u64,
}

#[derive(clap::Args)]
struct AdminWrites {
    /// Control-plane nodes in the cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    nodes: u64,
    /// Concurrent writers; a comma-separated list runs one cell per value.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Measured seconds per cell.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: u64,
    /// Unmeasured seconds of the same load before the measured window.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=120))]
    warmup: u64,
    /// Where the writers connect; a comma-separated list runs one cell per value.
    /// `follower`: one follower (which forwards to the leader); `all`: writers
    /// spread round robin over every node.
    #[arg(long, value_delimiter = ',', default_value = "leader")]
    target: Vec<Target>,
    /// Pad each consumer's metadata so its spec JSON is about this many bytes
    /// (0: the smallest consumer, `{"groups":["bench"]}`).
    #[arg(long, default_value_t = 0)]
    object_bytes: usize,
    /// Raft snapshot interval of the nodes, in log entries (the binary's default).
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Upper bound on the writes of one writer in one cell.
    #[arg(long, default_value_t = 1_000_000)]
    max_writes_per_writer: u64,
}

#[derive(clap::Args)]
struct SledFlush {
    /// Flushed batches to time.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: u64,
    /// Bytes of the value in each batch (a small Raft log entry is a few hundred).
    #[arg(long, default_value_t = 400)]
    value_bytes: usize,
    /// Stop after this many seconds even if `count` is not reached.
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Leader,
    Follower,
    All,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Leader => "leader",
            Target::Follower => "follower",
            Target::All => "all",
        })
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::AdminWrites(args) => rt.block_on(admin_writes(args)),
        Cmd::SledFlush(args) => rt.block_on(sled_flush(args)),
        Cmd::Backend(args) => backend(args),
        Cmd::HyperFloor(args) => hyper_floor(args),
        Cmd::Http(args) => http_load(args),
        Cmd::Proxies(args) => rt.block_on(proxies::proxies(args)),
        Cmd::Propagation(args) => rt.block_on(propagation::propagation(args)),
        Cmd::Scale(args) => rt.block_on(scale::scale(args)),
        Cmd::FirewallCost(args) => firewall_cost::firewall_cost(args),
        Cmd::PolicyCost(args) => rt.block_on(policy_cost::policy_cost(args)),
    }
}

fn backend(args: BackendArgs) -> Result<()> {
    let addr = load::loopback_listen(args.listen)?;
    serve_until(
        addr,
        args.threads,
        args.max_seconds,
        "backend",
        load::serve_backend,
    )
}

fn hyper_floor(args: HyperFloorArgs) -> Result<()> {
    let addr = load::loopback_listen(args.listen)?;
    let upstream = load::loopback_listen(args.upstream)?;
    serve_until(
        addr,
        args.threads,
        args.max_seconds,
        "hyper-floor",
        |listener| floor::serve(listener, upstream),
    )
}

/// Listens on `addr` with a runtime of `threads` workers, prints
/// `ready addr=...`, and runs `serve` until it fails or `max_seconds` pass.
fn serve_until<F, Fut>(
    addr: SocketAddr,
    threads: u64,
    max_seconds: u64,
    name: &str,
    serve: F,
) -> Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads as usize)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?;
        println!("ready addr={}", listener.local_addr()?);
        tokio::select! {
            r = serve(listener) => r,
            () = tokio::time::sleep(Duration::from_secs(max_seconds)) => {
                eprintln!("{name}: --max-seconds {max_seconds} reached, exiting");
                Ok(())
            }
        }
    })
}

fn http_load(args: HttpArgs) -> Result<()> {
    let cfg = load::LoadConfig {
        target: load::Target::parse(&args.url)?,
        connections: args.connections as usize,
        warmup: Duration::from_secs(args.warmup),
        duration: Duration::from_secs(args.duration),
        rate: args.rate,
        max_requests_per_connection: args.max_requests_per_connection,
        timeout: Duration::from_millis(args.timeout_ms),
        threads: args.threads as usize,
    };
    let mode = match args.rate {
        Some(r) => format!("open loop at {r} requests/s"),
        None => "closed loop".to_string(),
    };
    eprintln!(
        "http: {} {mode}, {} connections, warmup {}s, duration {}s, {} client thread(s)",
        args.url, args.connections, args.warmup, args.duration, args.threads
    );
    let r = load::run(cfg)?;
    let q = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!("| mode | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | 2xx | non-2xx | transport errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {mode} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
        r.rps(),
        q(r.quantile_ms(0.5)),
        q(r.quantile_ms(0.99)),
        q(r.quantile_ms(0.999)),
        q(r.max_ms()),
        r.ok,
        r.non_2xx,
        r.transport_errors
    );
    for m in &r.messages {
        eprintln!("  error: {m}");
    }
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    hist.saturating_record(us.clamp(1, HIST_MAX_US));
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// The consumer spec every writer puts: minimal, or padded to about `bytes`.
fn consumer_spec(bytes: usize) -> String {
    let base = r#"{"groups":["bench"]}"#;
    if bytes <= base.len() {
        return base.to_string();
    }
    // {"groups":["bench"],"metadata":{"p00":"xxx…",…}}: values of at most 1000
    // characters (the model allows 1024), keys p00..p63.
    let mut spec = String::from(r#"{"groups":["bench"],"metadata":{"#);
    let mut i = 0;
    while spec.len() + 2 < bytes && i < 64 {
        if i > 0 {
            spec.push(',');
        }
        let overhead = r#""p00":"""#.len() + 2;
        let want = bytes.saturating_sub(spec.len() + overhead).clamp(1, 1000);
        spec.push_str(&format!(r#""p{i:02}":"{}""#, "x".repeat(want)));
        i += 1;
    }
    spec.push_str("}}");
    spec
}

/// What one writer measured.
struct WriterResult {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    warmup_ok: u64,
    warmup_errors: u64,
    messages: Vec<String>,
    /// When the writer's last measured write finished.
    finished: Instant,
}

async fn writer(
    addr: String,
    cell: usize,
    id: usize,
    spec: String,
    measure_from: Instant,
    end: Instant,
    max_writes: u64,
) -> Result<WriterResult> {
    let mut client = admin(&addr).await?;
    let mut r = WriterResult {
        hist: new_histogram(),
        ok: 0,
        errors: 0,
        warmup_ok: 0,
        warmup_errors: 0,
        messages: Vec::new(),
        finished: Instant::now(),
    };
    for seq in 0..max_writes {
        let start = Instant::now();
        if start >= end {
            break;
        }
        let object = pb::Object {
            spec_json: spec.clone(),
            ..gatehouse_e2e::consumer(&format!("bench-c{cell}-w{id}-{seq}"))
        };
        let result = client
            .put(pb::PutRequest {
                object: Some(object),
                expected_revision: None,
            })
            .await;
        let elapsed = start.elapsed();
        let measured = start >= measure_from;
        match result {
            Ok(_) if measured => {
                r.ok += 1;
                record(&mut r.hist, elapsed);
            }
            Ok(_) => r.warmup_ok += 1,
            Err(status) => {
                if measured {
                    r.errors += 1;
                } else {
                    r.warmup_errors += 1;
                }
                if r.messages.len() < KEEP_ERRORS {
                    r.messages
                        .push(format!("{:?}: {}", status.code(), status.message()));
                }
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
        if measured {
            r.finished = Instant::now();
        }
    }
    Ok(r)
}

/// One row of the result table.
struct Row {
    target: Target,
    concurrency: usize,
    ok: u64,
    seconds: f64,
    hist: Histogram<u64>,
    errors: u64,
    /// Machine-wide CPU busy share over the measured window, all processes.
    cpu: Option<CpuShare>,
}

impl Row {
    fn header() -> &'static str {
        "| target | concurrency | writes | writes/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | cpu busy | iowait |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    }

    fn line(&self) -> String {
        let h = &self.hist;
        let (p50, p99, p999, max) = if h.is_empty() {
            ("-".into(), "-".into(), "-".into(), "-".into())
        } else {
            (
                ms(h.value_at_quantile(0.50)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max()),
            )
        };
        let (busy, iowait) = match &self.cpu {
            Some(c) => (
                format!("{:.0}%", c.busy * 100.0),
                format!("{:.0}%", c.iowait * 100.0),
            ),
            None => ("-".into(), "-".into()),
        };
        format!(
            "| {} | {} | {} | {:.0} | {p50} | {p99} | {p999} | {max} | {} | {busy} | {iowait} |",
            self.target,
            self.concurrency,
            self.ok,
            self.ok as f64 / self.seconds,
            self.errors
        )
    }
}

async fn admin_writes(args: AdminWrites) -> Result<()> {
    ensure!(!args.concurrency.is_empty(), "--concurrency is empty");
    for &c in &args.concurrency {
        ensure!((1..=1024).contains(&c), "--concurrency {c}: use 1 to 1024");
    }
    ensure!(
        args.object_bytes <= MAX_OBJECT_BYTES,
        "--object-bytes is at most {MAX_OBJECT_BYTES}"
    );
    if args.nodes < 2 && args.target.contains(&Target::Follower) {
        bail!("--target follower needs at least 2 nodes");
    }
    let spec = consumer_spec(args.object_bytes);
    eprintln!(
        "admin-writes: {} nodes, targets {:?}, concurrency {:?}, warmup {}s, duration {}s, spec {} bytes, snapshot every {}, {} cores",
        args.nodes,
        args.target,
        args.concurrency,
        args.warmup,
        args.duration,
        spec.len(),
        args.snapshot_every,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    let mut rows = Vec::new();
    let mut cell = 0;
    for &target in &args.target {
        for &concurrency in &args.concurrency {
            cell += 1;
            let row = run_cell(&args, &spec, cell, target, concurrency).await?;
            eprintln!("{}", row.line());
            rows.push(row);
        }
    }
    println!("{}", Row::header());
    for row in &rows {
        println!("{}", row.line());
    }
    Ok(())
}

/// Node options as the `gatehouse control-plane` defaults, not the faster
/// timers the end-to-end tests use.
fn production_options(snapshot_every: u64) -> Options {
    Options {
        snapshot_every,
        keep_logs: 1_000,
        heartbeat_ms: 150,
        election_timeout_ms: 1_000,
        tls: None,
        secrets_key: None,
        ops: false,
        faulty_network: false,
    }
}

async fn run_cell(
    args: &AdminWrites,
    spec: &str,
    cell: usize,
    target: Target,
    concurrency: usize,
) -> Result<Row> {
    let cluster = Cluster::start(args.nodes, production_options(args.snapshot_every))
        .await
        .context("start the cluster")?;
    let leader = cluster.leader().await?;
    // Every node has the membership entries before the load starts.
    let start_index = cluster.local_status(leader).await?.last_log_index;
    cluster.converge(start_index).await?;
    let before = cluster.local_status(leader).await?.config_revision;

    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let follower = ids.iter().copied().find(|&id| id != leader);
    let addr_of = |writer: usize| -> String {
        let id = match target {
            Target::Leader => leader,
            Target::Follower => follower.expect("checked: at least 2 nodes"),
            Target::All => ids[writer % ids.len()],
        };
        cluster.node(id).admin.clone()
    };

    let begin = Instant::now();
    let measure_from = begin + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.duration);
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        tasks.push(tokio::spawn(writer(
            addr_of(w),
            cell,
            w,
            spec.to_string(),
            measure_from,
            end,
            args.max_writes_per_writer,
        )));
    }

    // Sample the machine's CPU counters around the measured window.
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before = cpu_ticks();
    tokio::time::sleep_until(end.into()).await;
    let cpu = cpu_before.zip(cpu_ticks()).map(|(a, b)| a.share_until(&b));

    let mut hist = new_histogram();
    let (mut ok, mut errors, mut warmup_ok, mut warmup_errors) = (0, 0, 0, 0);
    let mut messages = Vec::new();
    let mut finished = measure_from;
    for task in tasks {
        let r = task.await.context("writer task")??;
        hist.add(&r.hist).context("merge histograms")?;
        ok += r.ok;
        errors += r.errors;
        warmup_ok += r.warmup_ok;
        warmup_errors += r.warmup_errors;
        finished = finished.max(r.finished);
        for m in r.messages {
            if messages.len() < KEEP_ERRORS {
                messages.push(m);
            }
        }
    }
    let seconds = finished
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);

    // Each acknowledged put is one log entry: the revision must have moved by at least that much.
    let after = cluster.local_status(leader).await?.config_revision;
    eprintln!(
        "cell {cell}: leader {leader}, target {target}, concurrency {concurrency}: \
         {ok} measured + {warmup_ok} warmup puts acknowledged, \
         {errors} + {warmup_errors} errors, revision {before} -> {after}"
    );
    if after.saturating_sub(before) < ok + warmup_ok {
        eprintln!("  warning: the revision moved less than the acknowledged puts");
    }
    for m in &messages {
        eprintln!("  error: {m}");
    }
    drop(cluster);
    Ok(Row {
        target,
        concurrency,
        ok,
        seconds,
        hist,
        errors,
        cpu,
    })
}

/// Cumulative CPU ticks of the whole machine, from the `cpu` line of /proc/stat.
struct CpuTicks {
    total: u64,
    idle: u64,
    iowait: u64,
}

/// Shares of all CPU time in a window, 0 to 1.
struct CpuShare {
    busy: f64,
    iowait: f64,
}

impl CpuTicks {
    fn share_until(&self, later: &CpuTicks) -> CpuShare {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let idle = later.idle.saturating_sub(self.idle) as f64;
        let iowait = later.iowait.saturating_sub(self.iowait) as f64;
        CpuShare {
            busy: (total - idle - iowait).max(0.0) / total,
            iowait: iowait / total,
        }
    }
}

/// `None` where /proc/stat is not there (not Linux).
fn cpu_ticks() -> Option<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() == 8).then(|| CpuTicks {
        total: v.iter().sum(),
        idle: v[3],
        iowait: v[4],
    })
}

async fn sled_flush(args: SledFlush) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .open()
        .context("open sled")?;
    let tree = db.open_tree("logs")?;
    let value = vec![b'x'; args.value_bytes];
    let mut hist = new_histogram();
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs(args.max_seconds);
    let mut done = 0u64;
    for i in 0..args.count {
        if Instant::now() >= deadline {
            break;
        }
        let start = Instant::now();
        let mut batch = sled::Batch::default();
        batch.insert(&i.to_be_bytes(), value.as_slice());
        tree.apply_batch(batch)?;
        tree.flush_async().await?;
        record(&mut hist, start.elapsed());
        done += 1;
    }
    let seconds = begin.elapsed().as_secs_f64();
    println!("| value bytes | flushes | flushes/s | p50 ms | p99 ms | p99.9 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {done} | {:.0} | {} | {} | {} | {} |",
        args.value_bytes,
        done as f64 / seconds,
        ms(hist.value_at_quantile(0.50)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.value_at_quantile(0.999)),
        ms(hist.max()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Cmd};

    /// bench/run-ratelimit.sh passes `--duration 10 --warmup 3` and its
    /// targets before the caller's arguments: the caller's win.
    #[test]
    fn a_later_proxies_flag_overrides_a_scripts_earlier_one() {
        let cli = Cli::try_parse_from([
            "gatehouse-bench",
            "proxies",
            "--duration",
            "10",
            "--warmup",
            "3",
            "--rounds",
            "7",
            "--duration",
            "2",
            "--rounds",
            "40",
            "--targets",
            "gatehouse,gatehouse-local",
            "--targets",
            "gatehouse,gatehouse-lease-1000",
            "--connections",
            "32",
            "--connections",
            "32,128",
        ])
        .unwrap();
        let Cmd::Proxies(args) = cli.command else {
            panic!("not the proxies command");
        };
        assert_eq!((args.duration, args.warmup, args.rounds), (2, 3, 40));
        assert_eq!(args.connections, [32, 128]);
        // A list too: the later one replaces the earlier, not adds to it.
        assert_eq!(
            args.targets,
            [
                crate::proxies::Kind::Gatehouse,
                crate::proxies::Kind::GatehouseLease1000
            ]
        );
    }

    /// `--gatehouse-b` and the `gatehouse-b` target need each other, and
    /// the binary must exist; each mistake is named before anything starts.
    #[test]
    fn gatehouse_b_needs_its_binary_and_its_target() {
        let check = |args: &[&str]| {
            let cli =
                Cli::try_parse_from(["gatehouse-bench", "proxies"].iter().chain(args)).unwrap();
            let Cmd::Proxies(args) = cli.command else {
                panic!("not the proxies command");
            };
            crate::proxies::check_gatehouse_b(&args, &args.targets).map_err(|e| e.to_string())
        };
        let me = std::env::current_exe().unwrap();
        let me = me.to_str().unwrap();
        assert_eq!(
            check(&["--targets", "gatehouse,gatehouse-b"]).unwrap_err(),
            "--targets has gatehouse-b: give its binary with --gatehouse-b PATH"
        );
        assert_eq!(
            check(&["--targets", "gatehouse", "--gatehouse-b", me]).unwrap_err(),
            "--gatehouse-b is given but --targets has no gatehouse-b"
        );
        assert_eq!(
            check(&[
                "--targets",
                "gatehouse-b",
                "--gatehouse-b",
                "/nonexistent/gh"
            ])
            .unwrap_err(),
            "--gatehouse-b /nonexistent/gh: no such file"
        );
        check(&["--targets", "gatehouse,gatehouse-b", "--gatehouse-b", me]).unwrap();
        check(&["--targets", "gatehouse"]).unwrap();
    }
}
