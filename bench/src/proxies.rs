//! `gatehouse-bench proxies`: the same backend reached directly and through
//! nginx, HAProxy and Gatehouse, each proxy with one worker thread or process,
//! measured with the same load in one run. Gatehouse also with a rate limit
//! on the route: local, cluster (exact) and cluster in cost mode (leases),
//! the cluster ones counted in a real `redis-server` started for the run.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use gatehouse_e2e::{bin, ctl, spawn_ready, tail};

use crate::load::{self, Conn, LoadConfig, LoadResult, Target};
use crate::{cpu_ticks, CpuTicks};

#[derive(clap::Args)]
pub struct ProxiesArgs {
    /// Keep-alive connections of the load generator. A list (e.g.
    /// `32,128`) measures every closed-loop round of a target at each count
    /// (each count is a phase of its own, so a round takes that many times
    /// longer), and each target then stands for its rounds at its best
    /// count: the one that gave it the most throughput in the most rounds.
    /// A target whose requests wait on something else (Redis) may need
    /// more connections than one that does not to keep its proxy busy. The
    /// fixed-rate phase uses the first count (its rate still comes from the
    /// targets' best counts).
    #[arg(
        long,
        value_delimiter = ',',
        action = clap::ArgAction::Set,
        default_value = "32",
        value_parser = clap::value_parser!(u64).range(1..=1024)
    )]
    pub(crate) connections: Vec<u64>,
    /// Measured seconds of each phase (closed loop, then fixed rate) per target.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub(crate) duration: u64,
    /// Unmeasured seconds of the same load before each measured phase.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub(crate) warmup: u64,
    /// The fixed rate of the latency phase as a share of the lowest closed-loop
    /// throughput among the targets, measured in the same run (a moderate
    /// load for every target).
    #[arg(long, default_value_t = 0.5)]
    rate_fraction: f64,
    /// A fixed rate for the latency phase instead (requests/s in total).
    #[arg(long)]
    rate: Option<f64>,
    /// Fixed-rate phases per target, in rounds as the closed loop's are
    /// (each round starts one target later). The tables show each target's
    /// round with the median p99, and a table lists every round's p99. On
    /// a machine that stalls now and then (a virtual machine), one stall of
    /// a few hundred milliseconds sets a whole phase's p99, since every
    /// request scheduled during it is late, and which target gets one is
    /// chance: several rounds tell a stall from a target's own latency.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=99))]
    pub(crate) rate_rounds: u64,
    /// Worker threads (nginx: worker processes) of each proxy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    proxy_threads: u64,
    /// Worker threads of the backend process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    backend_threads: u64,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    client_threads: u64,
    /// The targets, measured in this order: direct, nginx, haproxy,
    /// haproxy-jwt-rs256, haproxy-jwt-es256, hyper-floor (hyper's server
    /// and client with nothing between them: the floor under any proxy
    /// built on them), gatehouse, gatehouse-local,
    /// gatehouse-local-no-headers (the same limit under
    /// `rate_limit_headers: false`), gatehouse-cluster, gatehouse-lease,
    /// gatehouse-lease-1000, gatehouse-lease-1000-no-headers,
    /// gatehouse-firewall (the same
    /// route under a policy with the default firewall rule set:
    /// SQL-injection and XSS patterns, blocking), gatehouse-b (see
    /// --gatehouse-b), gatehouse-api-key, gatehouse-jwt-rs256,
    /// gatehouse-jwt-es256.
    #[arg(
        long,
        value_delimiter = ',',
        action = clap::ArgAction::Set,
        default_value = "direct,nginx,haproxy,hyper-floor,gatehouse,gatehouse-firewall"
    )]
    pub(crate) targets: Vec<Kind>,
    /// Per-request time limit, milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    timeout_ms: u64,
    /// Before each phase, wait up to this many seconds for the machine to be
    /// quiet (other processes, e.g. builds, below --quiet-cores).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=3600))]
    quiet_wait: u64,
    /// Busy cores, without load from the benchmark, that count as quiet.
    #[arg(long, default_value_t = 0.15)]
    quiet_cores: f64,
    /// Closed-loop rounds: every target is measured this many times, in
    /// turn (round 1 of each target, then round 2, ...), so that the
    /// machine's drift over the run hits every target alike; each round
    /// starts one target later, so every target takes every place in a
    /// round. The tables show each target's median round; a table lists
    /// every round. From 6 rounds on it also gives a 95 % interval for each
    /// target's median share of plain Gatehouse; on a noisy machine, many
    /// short rounds (e.g. `--rounds 40 --duration 2 --warmup 1`) narrow it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=99))]
    pub(crate) rounds: u64,
    /// Give each proxy CPUs of its own (with `taskset`): the proxy on CPUs
    /// 0..--proxy-threads, the backend, the load generator and Redis on the
    /// others. Without it, the scheduler shares every CPU among all of
    /// them, and a proxy's throughput also depends on how they are
    /// interleaved. Needs more cores than --proxy-threads.
    #[arg(long)]
    pin: bool,
    /// Another `gatehouse` binary, measured as the `gatehouse-b` target
    /// (the same plain route as `gatehouse`): two builds side by side in
    /// one run, paired round by round like every target, e.g.
    /// `--gatehouse-b target/dist/gatehouse` for the `dist` profile
    /// against the build the harness came with. Only the proxy differs;
    /// `gatehousectl` and the load generator are the harness's.
    #[arg(long, value_name = "PATH")]
    pub(crate) gatehouse_b: Option<PathBuf>,
}

impl ProxiesArgs {
    /// `--connections` as the tables show it.
    fn connections_shown(&self) -> String {
        let counts: Vec<String> = self.connections.iter().map(u64::to_string).collect();
        match &counts[..] {
            [one] => format!("{one} connections"),
            _ => format!(
                "{} connections (closed loop: each target at its best count; fixed rate: {})",
                counts.join(","),
                counts[0]
            ),
        }
    }
}

/// `--gatehouse-b` and the `gatehouse-b` target come together, and the
/// binary is there, before anything starts.
pub(crate) fn check_gatehouse_b(args: &ProxiesArgs, kinds: &[Kind]) -> Result<()> {
    let wanted = kinds.contains(&Kind::GatehouseB);
    match &args.gatehouse_b {
        None => ensure!(
            !wanted,
            "--targets has gatehouse-b: give its binary with --gatehouse-b PATH"
        ),
        Some(path) => {
            ensure!(
                wanted,
                "--gatehouse-b is given but --targets has no gatehouse-b"
            );
            ensure!(
                path.is_file(),
                "--gatehouse-b {}: no such file",
                path.display()
            );
        }
    }
    Ok(())
}

/// The CPUs of `--pin`, as `taskset` lists.
pub(crate) struct Pinning {
    /// The proxy's: 0..proxy_threads.
    pub proxy: String,
    /// The backend's, the load generator's and Redis's: the others.
    pub rest: String,
}

impl Pinning {
    fn of(args: &ProxiesArgs) -> Result<Option<Pinning>> {
        Pinning::new(args.pin, args.proxy_threads)
    }

    /// `None` unless `pin`; an error when the machine has no core left
    /// beside `proxy_threads`.
    pub(crate) fn new(pin: bool, proxy_threads: u64) -> Result<Option<Pinning>> {
        if !pin {
            return Ok(None);
        }
        let cores = machine_cores() as u64;
        ensure!(
            cores > proxy_threads,
            "--pin: {cores} core(s) leave none for the backend and the load generator \
             beside {proxy_threads} proxy CPU(s)"
        );
        Ok(Some(Pinning {
            proxy: format!("0-{}", proxy_threads - 1),
            rest: format!("{proxy_threads}-{}", cores - 1),
        }))
    }
}

/// Sets the CPUs of a process, of all its threads and of its child
/// processes (nginx's workers); threads started later inherit them.
pub(crate) fn pin(pid: u32, cpus: &str) -> Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("taskset (util-linux) is needed for --pin")?;
    ensure!(status.success(), "taskset -a -cp {cpus} {pid} failed");
    for child in child_pids(pid) {
        pin(child, cpus)?;
    }
    Ok(())
}

/// Pins a `redis-server` (its pid from `INFO server`) to `cpus`.
pub(crate) fn pin_redis(r: &gatehouse_e2e::redis::RedisServer, cpus: &str) -> Result<()> {
    let info = r.cli(&["info", "server"])?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:")?.trim().parse::<u32>().ok())
        .context("redis-server's INFO gave no process_id")?;
    pin(pid, cpus)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Kind {
    Direct,
    Nginx,
    Haproxy,
    /// HAProxy checking an RS256 JWT (`jwt_verify`, plus alg, iss, aud, exp).
    HaproxyJwtRs256,
    /// HAProxy checking an ES256 JWT, the same way.
    HaproxyJwtEs256,
    /// `gatehouse-bench hyper-floor`: hyper server and client with nothing
    /// between them, the floor under any proxy built on them.
    HyperFloor,
    Gatehouse,
    /// Gatehouse with a local (governor) rate limit on the route.
    GatehouseLocal,
    /// The same under `rate_limit_headers: false`: the decision without
    /// the `RateLimit-Policy` and `RateLimit` headers.
    GatehouseLocalNoHeaders,
    /// Gatehouse with a cluster rate limit in Redis, exact mode.
    GatehouseCluster,
    /// Gatehouse with a cluster rate limit in Redis, cost mode (lease 100).
    GatehouseLease,
    /// The same with lease 1000: for a busy key, about a tenth of the Redis
    /// calls, for ten times the error bound.
    #[value(name = "gatehouse-lease-1000")]
    GatehouseLease1000,
    /// Lease 1000 under `rate_limit_headers: false`.
    #[value(name = "gatehouse-lease-1000-no-headers")]
    GatehouseLease1000NoHeaders,
    /// Gatehouse with the default firewall rule set on the route.
    GatehouseFirewall,
    /// Plain Gatehouse from the `--gatehouse-b` binary.
    #[value(name = "gatehouse-b")]
    GatehouseB,
    /// Gatehouse with a policy that takes an API key (`x-api-key`).
    GatehouseApiKey,
    /// Gatehouse with a policy that takes an RS256 JWT (static key).
    GatehouseJwtRs256,
    /// Gatehouse with a policy that takes an ES256 JWT (static key).
    GatehouseJwtEs256,
}

impl Kind {
    /// The rate limit on the route, for the Gatehouse targets with one. It
    /// never refuses (10^9 per second), so every request costs a decision.
    fn limit(self) -> Option<String> {
        let base = "key: [client_ip], limit: 1000000000, window: 1s";
        match self {
            Kind::GatehouseLocal | Kind::GatehouseLocalNoHeaders => {
                Some(format!("{{ name: l, {base} }}"))
            }
            Kind::GatehouseCluster => Some(format!("{{ name: l, scope: cluster, {base} }}")),
            Kind::GatehouseLease => {
                Some(format!("{{ name: l, scope: cluster, lease: 100, {base} }}"))
            }
            Kind::GatehouseLease1000 | Kind::GatehouseLease1000NoHeaders => Some(format!(
                "{{ name: l, scope: cluster, lease: 1000, {base} }}"
            )),
            _ => None,
        }
    }

    /// The policy named `name` that the target puts on its route, as an
    /// item of the gateway file's `policies` list: the rate limit, or the
    /// firewall rules of `gatehouse-firewall` (the built-in injection
    /// pattern sets, blocking, on the path, the query and a body prefix).
    /// None for the targets without one or with an authentication policy.
    pub(crate) fn policy(self, name: &str) -> Option<String> {
        if self == Kind::GatehouseFirewall {
            return Some(format!(
                "  - name: {name}\n    firewall:\n      sql_injection: block\n      xss: block\n"
            ));
        }
        let quiet = if self.rate_limit_headers() {
            ""
        } else {
            "    rate_limit_headers: false\n"
        };
        let limit = self.limit()?;
        Some(format!(
            "  - name: {name}\n{quiet}    rate_limits:\n      - {limit}\n"
        ))
    }

    /// What [`Kind::policy`] puts on the route, in the results' notes.
    pub(crate) fn policy_note(self) -> Option<String> {
        if self == Kind::GatehouseFirewall {
            return Some(
                "firewall: sql_injection: block, xss: block (the built-in pattern sets)".into(),
            );
        }
        let quiet = if self.rate_limit_headers() {
            ""
        } else {
            ", rate_limit_headers: false"
        };
        Some(format!("rate limit {}{quiet}", self.limit()?))
    }

    /// Whether the route's limit sends `RateLimit-Policy` and `RateLimit`.
    fn rate_limit_headers(self) -> bool {
        !matches!(
            self,
            Kind::GatehouseLocalNoHeaders | Kind::GatehouseLease1000NoHeaders
        )
    }

    /// The signing algorithm of the JWT targets.
    fn jwt(self) -> Option<crate::auth::Alg> {
        match self {
            Kind::GatehouseJwtRs256 | Kind::HaproxyJwtRs256 => Some(crate::auth::Alg::Rs256),
            Kind::GatehouseJwtEs256 | Kind::HaproxyJwtEs256 => Some(crate::auth::Alg::Es256),
            _ => None,
        }
    }

    pub(crate) fn uses_redis(self) -> bool {
        matches!(
            self,
            Kind::GatehouseCluster
                | Kind::GatehouseLease
                | Kind::GatehouseLease1000
                | Kind::GatehouseLease1000NoHeaders
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "HAProxy",
            Kind::HaproxyJwtRs256 => "HAProxy, JWT RS256",
            Kind::HaproxyJwtEs256 => "HAProxy, JWT ES256",
            Kind::HyperFloor => "hyper floor (no proxy logic)",
            Kind::Gatehouse => "Gatehouse",
            Kind::GatehouseLocal => "Gatehouse, local limit",
            Kind::GatehouseLocalNoHeaders => "Gatehouse, local limit, no headers",
            Kind::GatehouseCluster => "Gatehouse, cluster limit (exact)",
            Kind::GatehouseLease => "Gatehouse, cluster limit (lease 100)",
            Kind::GatehouseLease1000 => "Gatehouse, cluster limit (lease 1000)",
            Kind::GatehouseLease1000NoHeaders => {
                "Gatehouse, cluster limit (lease 1000), no headers"
            }
            Kind::GatehouseFirewall => "Gatehouse + firewall rules",
            Kind::GatehouseB => "Gatehouse, --gatehouse-b build",
            Kind::GatehouseApiKey => "Gatehouse, API key",
            Kind::GatehouseJwtRs256 => "Gatehouse, JWT RS256",
            Kind::GatehouseJwtEs256 => "Gatehouse, JWT ES256",
        })
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, tail(&self.log));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM first: nginx's master then stops its workers, which a
        // SIGKILL of the master would leave running.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port, by binding port 0 and letting it go.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An executable on `PATH` or in the sbin directories where Debian puts servers.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn version_of(program: &Path, flag: &str) -> String {
    Command::new(program)
        .arg(flag)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// Starts the backend: this executable's `backend` subcommand, a process of its own.
pub fn start_backend(dir: &Path, threads: u64) -> Result<(Proc, SocketAddr)> {
    let log = dir.join("backend.log");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["backend", "--listen", "127.0.0.1:0"])
        .args(["--threads", &threads.to_string()])
        .args(["--max-seconds", "3600"]);
    let (child, ready) = spawn_ready(cmd, &log)?;
    let addr: SocketAddr = ready.field("addr")?.parse()?;
    Ok((
        Proc {
            name: "backend".into(),
            child,
            log,
        },
        addr,
    ))
}

/// `gatehouse-bench hyper-floor` in front of `backend`.
fn start_hyper_floor(dir: &Path, backend: SocketAddr, threads: u64) -> Result<Running> {
    let log = dir.join("hyper-floor.log");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["hyper-floor", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &backend.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--max-seconds", "3600"]);
    let (child, ready) = spawn_ready(cmd, &log)?;
    let addr: SocketAddr = ready.field("addr")?.parse()?;
    Ok(Running {
        headers: Vec::new(),
        url: format!("http://{addr}/"),
        ops: None,
        proc: Some(Proc {
            name: "hyper-floor".into(),
            child,
            log,
        }),
        notes: vec![format!(
            "gatehouse-bench hyper-floor, {threads} worker thread(s): hyper's HTTP/1.1 server and client, one upstream connection per client connection, nothing else"
        )],
    })
}

/// Waits until `url` answers 200, for up to 15 s.
pub(crate) async fn wait_serving(
    url: &str,
    headers: &[(String, String)],
    proc: &mut Option<&mut Proc>,
) -> Result<()> {
    let target = Target::parse(url)?.with_headers(headers)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(p) = proc.as_deref_mut() {
            p.check_running()?;
        }
        let attempt = async {
            let mut c = Conn::open(target.addr).await?;
            c.get(target.request()).await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(s)) if s.is_success() => return Ok(()),
            Ok(Ok(s)) => last = format!("status {s}"),
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not answer 200 within 15 s (last: {last})")
}

/// A target that is up: its URL and (for proxies) its process.
struct Running {
    url: String,
    /// Sent with every request: the credential of the auth targets.
    headers: Vec<(String, String)>,
    /// Gatehouse's ops listener, for its request count.
    ops: Option<String>,
    proc: Option<Proc>,
    /// Version and worker facts, for the report.
    notes: Vec<String>,
}

fn start_nginx(dir: &Path, backend: SocketAddr, workers: u64) -> Result<Option<Running>> {
    let Some(nginx) = find_program("nginx") else {
        return Ok(None);
    };
    let root = dir.join("nginx");
    std::fs::create_dir_all(root.join("tmp"))?;
    let port = free_port()?;
    let r = root.display();
    // Paths inside the temporary directory; the worker may run as `nobody`.
    let conf = format!(
        "worker_processes {workers};
pid {r}/nginx.pid;
error_log {r}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {r}/tmp/body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    upstream backend {{
        server {backend};
        keepalive 128;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    );
    let file = root.join("nginx.conf");
    std::fs::write(&file, conf)?;
    open_dirs(dir)?;
    let log = root.join("stderr.log");
    let mut cmd = Command::new(&nginx);
    cmd.arg("-p")
        .arg(&root)
        .arg("-c")
        .arg(&file)
        .args(["-g", "daemon off;"]);
    let proc = spawn_logged("nginx", cmd, &log)?;
    Ok(Some(Running {
        headers: Vec::new(),
        url: format!("http://127.0.0.1:{port}/"),
        ops: None,
        proc: Some(proc),
        notes: vec![
            version_of(&nginx, "-v"),
            format!("worker_processes {workers}, upstream keepalive 128, access_log off"),
        ],
    }))
}

fn start_haproxy(
    dir: &Path,
    backend: SocketAddr,
    threads: u64,
    jwt: Option<(crate::auth::Alg, crate::auth::Material)>,
) -> Result<Option<Running>> {
    let Some(haproxy) = find_program("haproxy") else {
        return Ok(None);
    };
    let root = dir.join(match &jwt {
        None => "haproxy".to_string(),
        Some((alg, _)) => format!("haproxy-{}", alg.name().to_lowercase()),
    });
    std::fs::create_dir_all(&root)?;
    let port = free_port()?;
    // The same checks Gatehouse makes of a token with a static key: the
    // signature with the configured key, the algorithm, issuer, audience and
    // expiry (HAProxy's documented `jwt_verify` recipe).
    let (checks, headers, jwt_note) = match &jwt {
        None => (String::new(), Vec::new(), None),
        Some((alg, material)) => {
            let signed = material.of(*alg);
            let checks = format!(
                "    http-request deny deny_status 401 unless {{ req.hdr_cnt(authorization) eq 1 }}
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.jwt_alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss')
    http-request set-var(txn.aud) var(txn.bearer),jwt_payload_query('$.aud')
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date()
    http-request deny deny_status 401 unless {{ var(txn.jwt_alg) -m str {alg} }}
    http-request deny deny_status 401 unless {{ var(txn.iss) -m str {iss} }}
    http-request deny deny_status 401 unless {{ var(txn.aud) -m str {aud} }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.jwt_alg,\"{key}\") -m int 1 }}
    http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}
",
                alg = alg.name(),
                iss = crate::auth::ISSUER,
                aud = crate::auth::AUDIENCE,
                key = signed.public_file.display(),
            );
            let headers = vec![(
                "authorization".to_string(),
                format!("Bearer {}", signed.token),
            )];
            (
                checks,
                headers,
                Some(format!(
                    "jwt_verify {} with a PEM public key, plus alg, iss, aud and exp checks",
                    alg.name()
                )),
            )
        }
    };
    // No `log` line anywhere: no access log.
    let conf = format!(
        "global
    nbthread {threads}
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    http-reuse always

frontend bench
    bind 127.0.0.1:{port}
{checks}    default_backend backend

backend backend
    server b1 {backend}
"
    );
    let file = root.join("haproxy.cfg");
    std::fs::write(&file, conf)?;
    let check = Command::new(&haproxy)
        .arg("-c")
        .arg("-f")
        .arg(&file)
        .output()?;
    ensure!(
        check.status.success(),
        "haproxy rejects its config:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let mut cmd = Command::new(&haproxy);
    cmd.arg("-f").arg(&file).arg("-db");
    let proc = spawn_logged("haproxy", cmd, &root.join("stderr.log"))?;
    let mut notes = vec![
        version_of(&haproxy, "-v"),
        format!("nbthread {threads}, http-reuse always, no log"),
    ];
    notes.extend(jwt_note);
    Ok(Some(Running {
        headers,
        url: format!("http://127.0.0.1:{port}/"),
        ops: None,
        proc: Some(proc),
        notes,
    }))
}

/// The request target of both Gatehouse targets: a query gives the
/// injection rules something to read.
pub(crate) const GATEHOUSE_TARGET: &str = "items?q=blue+running+shoes&page=2";

async fn start_gatehouse(
    binary: &Path,
    dir: &Path,
    backend: SocketAddr,
    threads: u64,
    kind: Kind,
    redis: Option<&gatehouse_e2e::redis::RedisServer>,
    jwt: Option<crate::auth::Material>,
) -> Result<Running> {
    let firewall = kind == Kind::GatehouseFirewall;
    let root = dir.join(format!("{kind:?}").to_lowercase());
    let redis_url = redis.filter(|_| kind.uses_redis()).map(|r| r.url());
    let Standalone {
        proc,
        admin,
        proxy,
        ops,
    } = spawn_standalone(binary, &root, threads, redis_url)?;
    let (policies, policy) = if let (Some(alg), Some(material)) = (kind.jwt(), &jwt) {
        let pem: String = material
            .of(alg)
            .public_pem
            .lines()
            .map(|l| format!("          {l}\n"))
            .collect();
        (
            format!(
                "consumers:\n  - name: {consumer}\njwt_issuers:\n  - name: bench-idp\n    issuer: \"{iss}\"\n    audiences: [{aud}]\n    algorithms: [{alg}]\n    keys:\n      - pem: |\n{pem}policies:\n  - name: authn\n    authentication: [jwt]\n    jwt: {{ issuers: [bench-idp] }}\n",
                consumer = crate::auth::CONSUMER,
                iss = crate::auth::ISSUER,
                aud = crate::auth::AUDIENCE,
                alg = alg.name(),
            ),
            "    policy: authn\n".to_string(),
        )
    } else if kind == Kind::GatehouseApiKey {
        (
            format!(
                "consumers:\n  - name: {}\npolicies:\n  - name: authn\n    authentication: [api_key]\n",
                crate::auth::CONSUMER
            ),
            "    policy: authn\n".to_string(),
        )
    } else {
        let name = if firewall { "firewall" } else { "limited" };
        match kind.policy(name) {
            Some(p) => (format!("policies:\n{p}"), format!("    policy: {name}\n")),
            None => (String::new(), String::new()),
        }
    };
    let file = root.join("gateway.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\n{policies}upstreams:\n  - name: backend\n    targets:\n      - address: \"{backend}\"\nroutes:\n  - name: all\n    paths:\n      - prefix: /\n    upstream: backend\n{policy}"
        ),
    )?;
    apply_retrying(&admin, &file).await?;
    let mut notes = vec![format!(
        "{} standalone, TOKIO_WORKER_THREADS={threads}, --log-level warn, requests to /{GATEHOUSE_TARGET}",
        binary.display()
    )];
    notes.extend(kind.policy_note());
    let mut headers = Vec::new();
    if kind == Kind::GatehouseApiKey {
        let admin2 = admin.clone();
        let out = tokio::task::spawn_blocking(move || {
            ctl(
                &admin2,
                &["keys", "create", "--consumer", crate::auth::CONSUMER],
            )
        })
        .await?;
        ensure!(
            out.status.success(),
            "gatehousectl keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = String::from_utf8(out.stdout)?.trim().to_string();
        headers.push(("x-api-key".to_string(), key));
        notes.push("policy authn: authentication [api_key], key in x-api-key".into());
    }
    if let (Some(alg), Some(material)) = (kind.jwt(), &jwt) {
        headers.push((
            "authorization".to_string(),
            format!("Bearer {}", material.of(alg).token),
        ));
        notes.push(format!(
            "policy authn: authentication [jwt], issuer with one static {} key (PEM)",
            alg.name()
        ));
    }
    Ok(Running {
        headers,
        url: format!("http://{proxy}/{GATEHOUSE_TARGET}"),
        ops: Some(ops),
        proc: Some(proc),
        notes,
    })
}

/// A `gatehouse standalone` process on loopback, ready to be configured.
pub(crate) struct Standalone {
    pub proc: Proc,
    pub admin: String,
    pub proxy: String,
    pub ops: String,
}

/// Starts `gatehouse standalone` with its data under `root`, every listener
/// on a free loopback port, `threads` worker threads and, given a URL, a
/// rate-limit store.
pub(crate) fn spawn_standalone(
    binary: &Path,
    root: &Path,
    threads: u64,
    redis_url: Option<String>,
) -> Result<Standalone> {
    std::fs::create_dir_all(root)?;
    let log = root.join("stderr.log");
    let mut cmd = Command::new(binary);
    cmd.arg("standalone")
        .arg("--data-dir")
        .arg(root.join("data"))
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--raft-listen", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--ops-listen", "127.0.0.1:0"])
        .args(["--log-level", "warn"])
        .args(
            redis_url
                .map(|url| ["--redis-url".to_string(), url])
                .into_iter()
                .flatten(),
        )
        .env_remove("RUST_LOG")
        .env("GATEHOUSE_BOOTSTRAP_TOKEN", gatehouse_e2e::TOKEN)
        .env("TOKIO_WORKER_THREADS", threads.to_string());
    let (child, ready) = spawn_ready(cmd, &log)?;
    Ok(Standalone {
        proc: Proc {
            name: "gatehouse".into(),
            child,
            log,
        },
        admin: ready.field("admin")?,
        proxy: ready.field("proxy")?,
        ops: ready.field("ops")?,
    })
}

/// `gatehousectl apply -f FILE`, retried for a while: the control plane may
/// still be electing itself.
pub(crate) async fn apply_retrying(admin: &str, file: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let file = file.to_str().context("a UTF-8 temp path")?.to_string();
    loop {
        let (admin2, file2) = (admin.to_string(), file.clone());
        let out =
            tokio::task::spawn_blocking(move || ctl(&admin2, &["apply", "-f", &file2])).await?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "gatehousectl apply failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
    Ok(Proc {
        name: name.into(),
        child,
        log: log.to_path_buf(),
    })
}

/// Lets an unprivileged worker (nginx's `nobody`) reach the temp paths.
fn open_dirs(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.to_path_buf(), dir.join("nginx"), dir.join("nginx/tmp")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// The names of a process's threads, with how many have each name.
pub fn thread_names(pid: u32) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            *names.entry(comm.trim().to_string()).or_insert(0) += 1;
        }
    }
    names
}

pub fn describe_threads(names: &BTreeMap<String, usize>) -> String {
    let total: usize = names.values().sum();
    let parts: Vec<String> = names.iter().map(|(n, c)| format!("{n} x{c}")).collect();
    format!("{total} ({})", parts.join(", "))
}

/// CPU seconds (user + system) used so far by `pid` and, with `children`,
/// its direct children (nginx's workers).
fn cpu_seconds(pid: u32, children: bool) -> f64 {
    let mut ticks = proc_ticks(pid).map_or(0, |(t, _)| t);
    let entries = if children {
        std::fs::read_dir("/proc").ok()
    } else {
        None
    };
    if let Some(entries) = entries {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((t, ppid)) = proc_ticks(child) {
                if ppid == pid {
                    ticks += t;
                }
            }
        }
    }
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// (utime + stime, ppid) of a process, from /proc/PID/stat.
fn proc_ticks(pid: u32) -> Option<(u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime, ppid))
}

/// CPU use over a window, in cores (1.0 = one core busy all the time).
#[derive(Clone, Copy, Default)]
struct Cpu {
    proxy: Option<f64>,
    backend: f64,
    generator: f64,
    /// Every other process on the machine (e.g. someone's build).
    others: f64,
    machine: Option<f64>,
}

struct CpuSample {
    at: Instant,
    proxy: Option<f64>,
    backend: f64,
    generator: f64,
    all: f64,
    machine: Option<CpuTicks>,
}

/// The machine's CPUs (`cpuN` lines of /proc/stat): unlike
/// `available_parallelism`, not narrowed by this process's own CPU set
/// (`--pin`).
pub(crate) fn machine_cores() -> usize {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .map(|stat| {
            stat.lines()
                .filter(|l| {
                    l.strip_prefix("cpu")
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                })
                .count()
        })
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// CPU seconds used so far by every live process on the machine.
fn all_processes_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let ticks: u64 = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| proc_ticks(p).map(|(t, _)| t))
        .sum();
    ticks as f64 / 100.0
}

/// Waits (up to `max_wait`) until the machine is quiet: less than
/// `max_cores` busy over one second while this benchmark sends nothing.
/// Returns the busy cores of the last second checked.
pub(crate) async fn wait_quiet(max_wait: Duration, max_cores: f64) -> f64 {
    let cores = machine_cores() as f64;
    let deadline = Instant::now() + max_wait;
    let mut said = false;
    loop {
        let Some(a) = cpu_ticks() else { return 0.0 };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(b) = cpu_ticks() else { return 0.0 };
        let busy = a.share_until(&b).busy * cores;
        if busy < max_cores || Instant::now() >= deadline {
            if busy >= max_cores {
                eprintln!("  warning: the machine is still busy ({busy:.2} cores) without load from us; measuring anyway");
            }
            return busy;
        }
        if !said {
            eprintln!(
                "  waiting for the machine to be quiet: {busy:.2} cores busy without load from us"
            );
            said = true;
        }
    }
}

fn sample(proxy: Option<u32>, backend: u32) -> CpuSample {
    CpuSample {
        at: Instant::now(),
        proxy: proxy.map(|p| cpu_seconds(p, true)),
        backend: cpu_seconds(backend, false),
        // This process only: the backend and the proxies are its children.
        generator: cpu_seconds(std::process::id(), false),
        all: all_processes_seconds(),
        machine: cpu_ticks(),
    }
}

impl CpuSample {
    fn until(&self, later: &CpuSample) -> Cpu {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let cores = machine_cores() as f64;
        Cpu {
            proxy: self.proxy.zip(later.proxy).map(|(a, b)| (b - a) / secs),
            backend: (later.backend - self.backend) / secs,
            generator: (later.generator - self.generator) / secs,
            others: ((later.all - self.all)
                - (later.backend - self.backend)
                - (later.generator - self.generator)
                - self.proxy.zip(later.proxy).map_or(0.0, |(a, b)| b - a))
            .max(0.0)
                / secs,
            machine: self
                .machine
                .as_ref()
                .zip(later.machine.as_ref())
                .map(|(a, b)| a.share_until(b).busy * cores),
        }
    }
}

impl Phase {
    /// The proxy's CPU time per request, µs (none for the direct target).
    fn cpu_us_per_request(&self) -> Option<f64> {
        let rps = self.result.rps();
        (rps > 0.0).then(|| self.cpu.proxy.map(|cores| cores / rps * 1e6))?
    }
}

/// The load of one phase: the generator's connections, and its fixed rate
/// (requests/s in all), or none for a closed loop.
#[derive(Clone, Copy)]
struct Offered {
    connections: u64,
    rate: Option<f64>,
}

/// One measured phase.
struct Phase {
    /// The load generator's connections.
    connections: u64,
    result: LoadResult,
    cpu: Cpu,
    /// Busy cores just before the phase, with no load from us.
    idle_busy: f64,
    /// Rate-limit script calls in Redis and what Gatehouse counted, over
    /// the whole phase (warmup included).
    redis: Option<Counted>,
}

/// What a phase of a target that uses Redis made Redis and Gatehouse count.
#[derive(Clone, Copy, Default)]
struct Counted {
    /// Rate-limit script calls (`EVALSHA` and `EVAL`).
    calls: u64,
    /// Requests Gatehouse answered.
    requests: u64,
    /// Cost mode's requests that waited for their data plane's lease fetch.
    lease_waits: u64,
}

impl Counted {
    async fn now(redis: &gatehouse_e2e::redis::RedisServer, ops: &str) -> Result<Counted> {
        let reply = gatehouse_e2e::data::get(&format!("http://{ops}/metrics"), &[]).await?;
        let metrics = String::from_utf8_lossy(&reply.body);
        Ok(Counted {
            calls: redis.calls("evalsha")? + redis.calls("eval")?,
            requests: metric_sum(&metrics, "gatehouse_requests_total"),
            lease_waits: metric_sum(&metrics, "gatehouse_ratelimit_lease_waits_total"),
        })
    }

    fn since(self, before: Counted) -> Counted {
        Counted {
            calls: self.calls.saturating_sub(before.calls),
            requests: self.requests.saturating_sub(before.requests),
            lease_waits: self.lease_waits.saturating_sub(before.lease_waits),
        }
    }
}

/// The sum of a counter's series in Prometheus text (every label set).
pub(crate) fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Runs the load against `url` and samples CPU use inside the measured window.
async fn measure(
    args: &ProxiesArgs,
    Offered { connections, rate }: Offered,
    url: &str,
    headers: &[(String, String)],
    proxy_pid: Option<u32>,
    backend_pid: u32,
    counted: Option<(&gatehouse_e2e::redis::RedisServer, &str)>,
) -> Result<Phase> {
    let cfg = LoadConfig {
        target: Target::parse(url)?.with_headers(headers)?,
        connections: usize::try_from(connections)?,
        warmup: Duration::from_secs(args.warmup),
        duration: Duration::from_secs(args.duration),
        rate,
        max_requests_per_connection: 50_000_000,
        timeout: Duration::from_millis(args.timeout_ms),
        threads: args.client_threads as usize,
    };
    let warmup = cfg.warmup;
    let duration = cfg.duration;
    let idle_busy = wait_quiet(Duration::from_secs(args.quiet_wait), args.quiet_cores).await;
    let before_counts = match counted {
        Some((redis, ops)) => Some(Counted::now(redis, ops).await?),
        None => None,
    };
    let load = tokio::task::spawn_blocking(move || load::run(cfg));
    // A window a little inside the measured one (connections open first).
    let margin = Duration::from_millis(200).min(duration / 4);
    tokio::time::sleep(warmup + margin).await;
    let before = sample(proxy_pid, backend_pid);
    tokio::time::sleep(duration - 2 * margin).await;
    let after = sample(proxy_pid, backend_pid);
    let result = load.await??;
    let redis = match (counted, before_counts) {
        (Some((redis, ops)), Some(before)) => Some(Counted::now(redis, ops).await?.since(before)),
        _ => None,
    };
    Ok(Phase {
        connections,
        result,
        cpu: before.until(&after),
        idle_busy,
        redis,
    })
}

struct Row {
    kind: Kind,
    outcome: Result<(Phase, Phase), String>,
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

fn cores(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

fn install_hint(kind: Kind) -> String {
    let pkg = match kind {
        Kind::Nginx => "nginx",
        Kind::Haproxy | Kind::HaproxyJwtRs256 | Kind::HaproxyJwtEs256 => "haproxy",
        _ => "",
    };
    format!(
        "skipped: `{pkg}` not found on PATH or in /usr/sbin; install it with `apt-get update && apt-get install -y {pkg}` (bench/run-proxies.sh does)"
    )
}

/// One target through the run.
struct Slot {
    kind: Kind,
    running: Option<Running>,
    /// Every closed-loop round, in order, at each connection count (in the
    /// order of `--connections`).
    by_count: Vec<Vec<Phase>>,
    /// Every closed-loop round, in order, at the target's best count.
    rounds: Vec<Phase>,
    closed: Option<Phase>,
    /// Every fixed-rate round, in order.
    open_rounds: Vec<Phase>,
    open: Option<Phase>,
    failure: Option<String>,
}

impl Slot {
    fn fail(&mut self, e: &anyhow::Error) {
        let msg = format!("failed: {e:#}");
        eprintln!("{}: {msg}", self.kind);
        self.failure = Some(msg);
    }

    fn pid(&self) -> Option<u32> {
        self.running
            .as_ref()
            .and_then(|r| r.proc.as_ref())
            .map(Proc::pid)
    }

    fn url(&self) -> String {
        self.running
            .as_ref()
            .map_or(String::new(), |r| r.url.clone())
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.running
            .as_ref()
            .map_or(Vec::new(), |r| r.headers.clone())
    }

    fn ops(&self) -> Option<String> {
        self.running.as_ref().and_then(|r| r.ops.clone())
    }
}

async fn start(
    kind: Kind,
    args: &ProxiesArgs,
    dir: &Path,
    backend: SocketAddr,
    redis: Option<&gatehouse_e2e::redis::RedisServer>,
    auth: &mut crate::auth::Lazy,
) -> Result<Option<Running>> {
    let mut running = match kind {
        Kind::Direct => Some(Running {
            headers: Vec::new(),
            url: format!("http://{backend}/"),
            ops: None,
            proc: None,
            notes: vec![format!(
                "gatehouse-bench backend, {} worker thread(s)",
                args.backend_threads
            )],
        }),
        Kind::Nginx => start_nginx(dir, backend, args.proxy_threads)?,
        Kind::HyperFloor => Some(start_hyper_floor(dir, backend, args.proxy_threads)?),
        Kind::Haproxy => start_haproxy(dir, backend, args.proxy_threads, None)?,
        Kind::HaproxyJwtRs256 | Kind::HaproxyJwtEs256 => {
            let jwt = kind.jwt().map(|alg| (alg, auth.get(dir)));
            match jwt {
                Some((alg, Ok(material))) => {
                    start_haproxy(dir, backend, args.proxy_threads, Some((alg, material)))?
                }
                Some((_, Err(e))) => return Err(e),
                None => None,
            }
        }
        Kind::Gatehouse
        | Kind::GatehouseLocal
        | Kind::GatehouseLocalNoHeaders
        | Kind::GatehouseCluster
        | Kind::GatehouseLease
        | Kind::GatehouseLease1000
        | Kind::GatehouseLease1000NoHeaders
        | Kind::GatehouseFirewall
        | Kind::GatehouseB
        | Kind::GatehouseApiKey
        | Kind::GatehouseJwtRs256
        | Kind::GatehouseJwtEs256 => {
            let material = match kind.jwt() {
                Some(_) => Some(auth.get(dir)?),
                None => None,
            };
            let binary = match (kind, &args.gatehouse_b) {
                (Kind::GatehouseB, Some(b)) => b.clone(),
                (Kind::GatehouseB, None) => bail!("the gatehouse-b target needs --gatehouse-b"),
                _ => bin("gatehouse"),
            };
            let threads = args.proxy_threads;
            Some(start_gatehouse(&binary, dir, backend, threads, kind, redis, material).await?)
        }
    };
    if let Some(r) = running.as_mut() {
        wait_serving(&r.url, &r.headers, &mut r.proc.as_mut()).await?;
        if let (Some(p), Some(pinning)) = (&r.proc, Pinning::of(args)?) {
            pin(p.pid(), &pinning.proxy)?;
            r.notes.push(format!("pinned to CPU(s) {}", pinning.proxy));
        }
        if let Some(p) = &r.proc {
            r.notes.push(format!(
                "threads of pid {}: {}",
                p.pid(),
                describe_threads(&thread_names(p.pid()))
            ));
            if kind == Kind::Nginx {
                r.notes
                    .push(format!("nginx worker processes: {}", children(p.pid())));
            }
        }
    }
    Ok(running)
}

pub async fn proxies(mut args: ProxiesArgs) -> Result<()> {
    ensure!(
        args.rate_fraction > 0.0 && args.rate_fraction <= 1.0,
        "--rate-fraction: use a value in (0, 1]"
    );
    let mut kinds = args.targets.clone();
    kinds.sort();
    kinds.dedup();
    ensure!(!kinds.is_empty(), "--targets is empty");
    check_gatehouse_b(&args, &kinds)?;
    args.connections = distinct(&args.connections);
    let dir = tempfile::tempdir()?;
    let pinning = Pinning::of(&args)?;
    let (mut backend, backend_addr) = start_backend(dir.path(), args.backend_threads)?;
    let backend_pid = backend.pid();
    if let Some(pinning) = &pinning {
        pin(backend_pid, &pinning.rest)?;
        pin(std::process::id(), &pinning.rest)?;
        eprintln!(
            "pinned: proxies on CPU(s) {}, the backend, this load generator and Redis on CPU(s) {}",
            pinning.proxy, pinning.rest
        );
    }
    eprintln!(
        "proxies: backend {backend_addr} (pid {backend_pid}, {} threads), {}, warmup {}s, duration {}s per phase, client threads {}, proxy threads {}, {} cores",
        args.backend_threads,
        args.connections_shown(),
        args.warmup,
        args.duration,
        args.client_threads,
        args.proxy_threads,
        machine_cores(),
    );

    // One Redis for the cluster limits, as a real deployment would have.
    let redis = if kinds.iter().any(|k| k.uses_redis()) {
        let r = gatehouse_e2e::redis::RedisServer::start(dir.path())?;
        eprintln!("redis-server on port {}", r.port);
        if let Some(pinning) = &pinning {
            pin_redis(&r, &pinning.rest)?;
        }
        Some(r)
    } else {
        None
    };

    // Signing keys and tokens, made once for every JWT target.
    let mut auth = crate::auth::Lazy::default();
    // Every target is started (and left idle) before the first measurement.
    let mut slots = Vec::new();
    for kind in kinds {
        let mut slot = Slot {
            kind,
            running: None,
            by_count: Vec::new(),
            rounds: Vec::new(),
            closed: None,
            open_rounds: Vec::new(),
            open: None,
            failure: None,
        };
        match start(
            kind,
            &args,
            dir.path(),
            backend_addr,
            redis.as_ref(),
            &mut auth,
        )
        .await
        {
            Ok(Some(r)) => slot.running = Some(r),
            Ok(None) => {
                let hint = install_hint(kind);
                eprintln!("{kind}: {hint}");
                slot.failure = Some(hint);
            }
            Err(e) => slot.fail(&e),
        }
        slots.push(slot);
    }

    let mut notes = Vec::new();
    // Phase 1: closed-loop throughput, one target at a time, in rounds;
    // each round starts one target later than the one before, so every
    // target takes every place in a round (first after the quiet wait,
    // last, ...) as often as the others.
    for round in 1..=args.rounds {
        for i in round_order(slots.len(), round) {
            let slot = &mut slots[i];
            if slot.failure.is_some() {
                continue;
            }
            // The target at every connection count in turn.
            let mut phases: Vec<Option<Phase>> = args.connections.iter().map(|_| None).collect();
            for c in count_order(args.connections.len(), round) {
                let connections = args.connections[c];
                eprintln!(
                    "{}: closed loop at {} with {connections} connections (round {round} of {})",
                    slot.kind,
                    slot.url(),
                    args.rounds
                );
                let offered = Offered {
                    connections,
                    rate: None,
                };
                let Some(p) = measure_slot(&args, slot, offered, redis.as_ref(), backend_pid).await
                else {
                    break;
                };
                report_phase(slot.kind, "closed loop", &p);
                phases[c] = Some(p);
            }
            // A round counts only with every count measured.
            if let Some(phases) = phases.into_iter().collect::<Option<Vec<Phase>>>() {
                slot.by_count.push(phases);
            }
        }
    }
    // Each target's rounds at its best connection count: the one that gave
    // it the most throughput in the most rounds.
    for slot in &mut slots {
        let rps: Vec<Vec<f64>> = slot
            .by_count
            .iter()
            .map(|r| r.iter().map(|p| p.result.rps()).collect())
            .collect();
        let (best, wins) = best_count(&rps, args.connections.len());
        if args.connections.len() > 1 && !rps.is_empty() {
            let by_count: Vec<String> = args
                .connections
                .iter()
                .zip(&wins)
                .map(|(c, w)| format!("{c}: {w}"))
                .collect();
            notes.push(format!(
                "{}: closed loop at {} connections, its best count (the most throughput in {} of {} rounds; by count: {})",
                slot.kind,
                args.connections[best],
                wins[best],
                rps.len(),
                by_count.join(", ")
            ));
        }
        slot.rounds = std::mem::take(&mut slot.by_count)
            .into_iter()
            .map(|mut r| r.swap_remove(best))
            .collect();
    }
    // Each target's median round stands for it. A target that failed in a
    // later round keeps the rounds it ran in the round tables (its rounds
    // are still the first ones, in order, so each pairs with plain
    // Gatehouse's round of the same number).
    let mut by_round = Vec::new();
    for slot in &mut slots {
        if !slot.rounds.is_empty() {
            by_round.push((
                slot.kind,
                slot.rounds
                    .iter()
                    .map(|p| (p.result.rps(), p.cpu_us_per_request()))
                    .collect::<Vec<_>>(),
            ));
        }
        if slot.failure.is_some() {
            continue;
        }
        slot.closed = median_by(std::mem::take(&mut slot.rounds), |p| p.result.rps());
    }

    // The fixed rate: a share of the slowest target's throughput, so that it
    // is a moderate load for every target, or the rate given.
    let slowest = slots
        .iter()
        .filter_map(|s| Some((s.kind, s.closed.as_ref()?.result.rps())))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let rate = match (args.rate, slowest) {
        (Some(r), _) => r,
        (None, Some((kind, rps))) => {
            let r = (rps * args.rate_fraction).round().max(1.0);
            eprintln!(
                "fixed rate: {r} requests/s ({} x {rps:.0}/s, the closed-loop throughput of {kind}, the slowest target)",
                args.rate_fraction
            );
            r
        }
        (None, None) => bail!("no target was measured"),
    };

    // Phase 2: latency at the fixed rate, one target at a time, in rounds
    // taken in turn as the closed loop's are.
    let offered = Offered {
        connections: args.connections[0],
        rate: Some(rate),
    };
    for round in 1..=args.rate_rounds {
        for i in round_order(slots.len(), round) {
            let slot = &mut slots[i];
            if slot.failure.is_some() {
                continue;
            }
            eprintln!(
                "{}: open loop at {rate:.0} requests/s (round {round} of {})",
                slot.kind, args.rate_rounds
            );
            if let Some(p) = measure_slot(&args, slot, offered, redis.as_ref(), backend_pid).await {
                report_phase(slot.kind, "fixed rate", &p);
                slot.open_rounds.push(p);
            }
        }
    }
    // Each target's round with the median p99 stands for it.
    let mut p99_by_round = Vec::new();
    for slot in &mut slots {
        let p99 = |p: &Phase| p.result.quantile_ms(0.99).unwrap_or(f64::INFINITY);
        if !slot.open_rounds.is_empty() {
            p99_by_round.push((slot.kind, slot.open_rounds.iter().map(p99).collect()));
        }
        if slot.failure.is_some() {
            continue;
        }
        slot.open = median_by(std::mem::take(&mut slot.open_rounds), p99);
    }

    let mut rows = Vec::new();
    for mut slot in slots {
        if let Some(mut running) = slot.running.take() {
            if let Some(p) = running.proc.as_mut() {
                if let Err(e) = p.check_running() {
                    slot.failure.get_or_insert(format!("failed: {e:#}"));
                }
            }
            if let Some(p) = &running.proc {
                running.notes.push(format!(
                    "threads of pid {} after the load: {}",
                    p.pid(),
                    describe_threads(&thread_names(p.pid()))
                ));
            }
            for n in running.notes.drain(..) {
                notes.push(format!("{}: {n}", slot.kind));
            }
            if let Some(mut p) = running.proc.take() {
                p.stop();
                let log = tail(&p.log);
                let gatehouse = matches!(
                    slot.kind,
                    Kind::Gatehouse
                        | Kind::GatehouseB
                        | Kind::GatehouseFirewall
                        | Kind::GatehouseApiKey
                        | Kind::GatehouseJwtRs256
                        | Kind::GatehouseJwtEs256
                );
                if !gatehouse && !log.trim().is_empty() {
                    notes.push(format!("{}: its log ends with: {}", slot.kind, log.trim()));
                }
            }
        }
        let outcome = match (slot.failure, slot.closed, slot.open) {
            (None, Some(c), Some(o)) => Ok((c, o)),
            (Some(f), _, _) => Err(f),
            _ => Err("not measured".into()),
        };
        rows.push(Row {
            kind: slot.kind,
            outcome,
        });
    }
    backend.check_running()?;
    drop(backend);
    if let Some(r) = &redis {
        notes.push(format!(
            "redis: {} on 127.0.0.1:{}, no persistence; its CPU is in \"cpu others\"",
            version_of(Path::new("redis-server"), "--version"),
            r.port
        ));
    }

    print_tables(&args, Some(rate), &rows, &notes);
    if args.rounds > 1 {
        print_rounds(&by_round);
    }
    if args.rate_rounds > 1 {
        print_round_table(
            &format!(
                "Fixed rate by round, p99 ms at {rate:.0} requests/s (and its ratio to plain \
                 Gatehouse's in the same round):"
            ),
            &p99_by_round,
            2,
        );
    }
    Ok(())
}

/// One closed-loop round of a target: requests/s, and the proxy's CPU µs
/// per request.
type Round = (f64, Option<f64>);

/// The median of `items` by `key` (of an even count, the upper one).
fn median_by<T>(mut items: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    items.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let median = items.len() / 2;
    items.into_iter().nth(median)
}

/// `--connections` without repeats, in the order given.
fn distinct(counts: &[u64]) -> Vec<u64> {
    let mut once = Vec::with_capacity(counts.len());
    for c in counts {
        if !once.contains(c) {
            once.push(*c);
        }
    }
    once
}

/// The order in which round `round` (from 1) measures a target at `n`
/// connection counts: as given in odd rounds, reversed in even ones, so
/// that no count always runs first after another target's load.
fn count_order(n: usize, round: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if round.is_multiple_of(2) {
        order.reverse();
    }
    order
}

/// A target's best connection count, from its throughput at each of
/// `counts` counts in every round: the count that gave the most throughput
/// in the most rounds (the first on a tie, in a round as among counts),
/// and how many rounds each count won. Whole rounds, not each round's
/// higher value: the higher of two noisy measurements is biased up, the
/// more so the closer the two are, which would favour a target that
/// does alike at both counts.
fn best_count(rounds: &[Vec<f64>], counts: usize) -> (usize, Vec<usize>) {
    let mut wins = vec![0; counts];
    for round in rounds {
        let mut top = 0;
        for (c, rps) in round.iter().enumerate() {
            if *rps > round[top] {
                top = c;
            }
        }
        if let Some(w) = wins.get_mut(top) {
            *w += 1;
        }
    }
    let mut best = 0;
    for (c, w) in wins.iter().enumerate() {
        if *w > wins[best] {
            best = c;
        }
    }
    (best, wins)
}

/// The order of `n` targets in round `round` (from 1): round 1 in their
/// order, each later round starting one target later.
fn round_order(n: usize, round: u64) -> impl Iterator<Item = usize> {
    let start = usize::try_from(round.saturating_sub(1)).unwrap_or(0) % n.max(1);
    (0..n).map(move |i| (start + i) % n)
}

/// Every closed-loop round, and each target's throughput as a share of
/// plain Gatehouse's in the same round (the two measured minutes apart at
/// most), when plain Gatehouse was measured; then the same for the proxy's
/// CPU time per request.
fn print_rounds(by_round: &[(Kind, Vec<Round>)]) {
    let rps: Vec<(Kind, Vec<f64>)> = by_round
        .iter()
        .map(|(k, r)| (*k, r.iter().map(|(rps, _)| *rps).collect()))
        .collect();
    print_round_table(
        "Closed loop by round, requests/s (and the share of plain Gatehouse's in the same round):",
        &rps,
        0,
    );
    let cpu: Vec<(Kind, Vec<f64>)> = by_round
        .iter()
        .filter_map(|(k, r)| Some((*k, r.iter().map(|(_, c)| *c).collect::<Option<Vec<f64>>>()?)))
        .collect();
    if !cpu.is_empty() {
        print_round_table(
            "The proxy's CPU time per request in the same rounds, µs (user and kernel, from \
             /proc; and its ratio to plain Gatehouse's in the same round). Less sensitive than \
             throughput to how the scheduler interleaves the processes sharing the cores:",
            &cpu,
            2,
        );
    }
}

fn print_round_table(title: &str, by_round: &[(Kind, Vec<f64>)], decimals: usize) {
    let plain = by_round
        .iter()
        .find(|(k, _)| *k == Kind::Gatehouse)
        .map(|(_, r)| r.clone());
    let n = by_round.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    // Beyond this many rounds a column per round is unreadable: the rounds
    // go into a list under the table instead.
    let wide = n > 9;
    println!();
    println!("{title}");
    println!();
    let heads: Vec<String> = if wide {
        vec!["rounds".into(), "lowest".into(), "highest".into()]
    } else {
        (1..=n).map(|i| format!("round {i}")).collect()
    };
    println!(
        "| target | {} | median | median share of plain Gatehouse | 95 % interval of that median |",
        heads.join(" | ")
    );
    println!("|---|{}---:|---:|---:|", "---:|".repeat(heads.len()));
    let mut lists = Vec::new();
    for (kind, rounds) in by_round {
        let mut cells = Vec::new();
        let mut shares = Vec::new();
        for (i, rps) in rounds.iter().enumerate() {
            match plain.as_ref().and_then(|p| p.get(i)) {
                Some(base) if *base > 0.0 => {
                    shares.push(rps / base);
                    cells.push(format!("{rps:.decimals$} ({:.3})", rps / base));
                }
                _ => cells.push(format!("{rps:.decimals$}")),
            }
        }
        let interval = match median_interval(&shares) {
            Some((low, high)) if *kind != Kind::Gatehouse => format!("{low:.3}-{high:.3}"),
            _ => "-".into(),
        };
        let shown = if wide {
            lists.push(format!("- {kind}: {}", cells.join(", ")));
            let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.decimals$}"));
            vec![
                rounds.len().to_string(),
                cell(rounds.iter().copied().reduce(f64::min)),
                cell(rounds.iter().copied().reduce(f64::max)),
            ]
        } else {
            cells.resize(n, "-".into());
            cells
        };
        println!(
            "| {kind} | {} | {} | {} | {interval} |",
            shown.join(" | "),
            median(rounds).map_or("-".into(), |m| format!("{m:.decimals$}")),
            median_share(&shares, rounds.len()),
        );
    }
    if !lists.is_empty() {
        println!();
        println!("Every round, in order (and the share of plain Gatehouse's in the same round):");
        println!();
        for line in lists {
            println!("{line}");
        }
    }
}

/// The median share of plain Gatehouse's, and how many of the target's
/// `rounds` it covers when plain Gatehouse has no round to pair some of
/// them with (it failed during the run).
fn median_share(shares: &[f64], rounds: usize) -> String {
    match median(shares) {
        None => "-".into(),
        Some(m) if shares.len() < rounds => format!("{m:.3} ({} of {rounds} rounds)", shares.len()),
        Some(m) => format!("{m:.3}"),
    }
}

/// A 95 % confidence interval for the median of `values`, from their order
/// statistics (distribution-free: the median lies below the k-th smallest
/// value with the probability that a fair coin shows heads fewer than k
/// times in n throws). `None` for fewer than 6 values, which cannot give
/// one.
pub(crate) fn median_interval(values: &[f64]) -> Option<(f64, f64)> {
    let n = values.len();
    // P(Bin(n, 1/2) < k), for k = 1, 2, ...: the largest k with it at most
    // 2.5 % on each side. The terms are summed from their logarithms: 2^-n
    // itself is below the smallest f64 from n = 1075 on.
    let mut below = 0.0;
    let mut log_term = -(n as f64) * std::f64::consts::LN_2;
    let mut k = 0;
    for i in 0..n {
        let term = log_term.exp();
        if below + term > 0.025 {
            break;
        }
        below += term;
        log_term += ((n - i) as f64 / (i + 1) as f64).ln();
        k = i + 1;
    }
    if k == 0 {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some((v[k - 1], v[n - k]))
}

/// The middle value (the upper one of the two middle values for an even count).
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    median_by(values.to_vec(), |v| *v)
}

/// One phase of `slot` (closed loop, or open loop at `rate`), counting its
/// Redis script calls when it uses Redis; on failure the slot is marked
/// failed and `None` comes back.
async fn measure_slot(
    args: &ProxiesArgs,
    slot: &mut Slot,
    offered: Offered,
    redis: Option<&gatehouse_e2e::redis::RedisServer>,
    backend_pid: u32,
) -> Option<Phase> {
    let ops = slot.ops();
    let counted = match (redis, &ops) {
        (Some(r), Some(o)) if slot.kind.uses_redis() => Some((r, o.as_str())),
        _ => None,
    };
    let measured = measure(
        args,
        offered,
        &slot.url(),
        &slot.headers(),
        slot.pid(),
        backend_pid,
        counted,
    )
    .await;
    measured.map_err(|e| slot.fail(&e)).ok()
}

/// How many direct children a process has (nginx's workers).
fn children(pid: u32) -> usize {
    child_pids(pid).len()
}

fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| proc_ticks(p).is_some_and(|(_, ppid)| ppid == pid))
        .collect()
}

fn report_phase(kind: Kind, what: &str, p: &Phase) {
    let r = &p.result;
    eprintln!(
        "  {kind} {what}: {:.0} req/s, p50 {} p99 {} p99.9 {} max {} ms, {} non-2xx, {} transport errors; cpu cores: proxy {} backend {:.2} generator {:.2} others {:.2} machine {} (idle before: {:.2})",
        r.rps(),
        opt_ms(r.quantile_ms(0.5)),
        opt_ms(r.quantile_ms(0.99)),
        opt_ms(r.quantile_ms(0.999)),
        opt_ms(r.max_ms()),
        r.non_2xx,
        r.transport_errors,
        cores(p.cpu.proxy),
        p.cpu.backend,
        p.cpu.generator,
        p.cpu.others,
        cores(p.cpu.machine),
        p.idle_busy,
    );
    if let Some(c) = p.redis {
        eprintln!(
            "    counted: {} script calls, {} requests, {} lease waits",
            c.calls, c.requests, c.lease_waits
        );
    }
    for m in &r.messages {
        eprintln!("    error: {m}");
    }
}

/// A phase's name in the tables, with its connection count when the run
/// had several.
fn phase_label(args: &ProxiesArgs, what: &str, p: &Phase) -> String {
    if args.connections.len() > 1 {
        format!("{what}, {} connections", p.connections)
    } else {
        what.to_string()
    }
}

fn print_tables(args: &ProxiesArgs, rate: Option<f64>, rows: &[Row], notes: &[String]) {
    let direct = rows.iter().find_map(|r| match (&r.kind, &r.outcome) {
        (Kind::Direct, Ok(p)) => Some(p),
        _ => None,
    });
    let direct_rps = direct.map(|(c, _)| c.result.rps());
    let direct_p99 = direct.and_then(|(_, o)| o.result.quantile_ms(0.99));
    println!(
        "{}, {} s measured per phase after {} s warmup; fixed rate {} requests/s{}; \
         proxies with {} worker thread(s)/process(es); backend {} thread(s); load generator {} thread(s){}",
        args.connections_shown(),
        args.duration,
        args.warmup,
        rate.map_or("-".into(), |r| format!("{r:.0}")),
        if args.rate_rounds > 1 {
            format!(
                " in {} rounds (each target's round with the median p99 is shown)",
                args.rate_rounds
            )
        } else {
            String::new()
        },
        args.proxy_threads,
        args.backend_threads,
        args.client_threads,
        match Pinning::of(args) {
            Ok(Some(p)) => format!(
                "; pinned: each proxy on CPU(s) {}, backend, load generator and Redis on CPU(s) {}",
                p.proxy, p.rest
            ),
            _ => String::new(),
        },
    );
    println!();
    println!("| target | requests/s (closed loop) | vs direct | p50 ms @ rate | p99 ms @ rate | p99.9 ms @ rate | added p99 ms vs direct | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        match &row.outcome {
            Ok((closed, open)) => {
                let rps = closed.result.rps();
                let ratio = direct_rps.map_or("-".into(), |d| format!("{:.2}", rps / d));
                let p99 = open.result.quantile_ms(0.99);
                let added = match (row.kind, p99, direct_p99) {
                    (Kind::Direct, _, _) => "-".to_string(),
                    (_, Some(p), Some(d)) => format!("{:+.2}", p - d),
                    _ => "-".into(),
                };
                println!(
                    "| {} | {rps:.0} | {ratio} | {} | {} | {} | {added} | {} |",
                    row.kind,
                    opt_ms(open.result.quantile_ms(0.5)),
                    opt_ms(p99),
                    opt_ms(open.result.quantile_ms(0.999)),
                    closed.result.errors() + open.result.errors(),
                );
            }
            Err(why) => println!("| {} | {why} | | | | | | |", row.kind),
        }
    }
    println!();
    println!("Details. cpu in cores, sampled inside the measured window: proxy (nginx: master and worker), backend, generator (this gatehouse-bench process), others (every other process), machine (all CPU time from /proc/stat, kernel included); busy before: the machine's busy cores in the second before the phase, without our load.");
    println!();
    println!("| target | phase | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | non-2xx | transport errors | cpu proxy | cpu backend | cpu generator | cpu others | cpu machine | busy before |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        if let Ok((closed, open)) = &row.outcome {
            for (what, p) in [("closed loop", closed), ("fixed rate", open)] {
                let what = phase_label(args, what, p);
                let r = &p.result;
                println!(
                    "| {} | {what} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} |",
                    row.kind,
                    r.rps(),
                    opt_ms(r.quantile_ms(0.5)),
                    opt_ms(r.quantile_ms(0.99)),
                    opt_ms(r.quantile_ms(0.999)),
                    opt_ms(r.max_ms()),
                    r.non_2xx,
                    r.transport_errors,
                    cores(p.cpu.proxy),
                    p.cpu.backend,
                    p.cpu.generator,
                    p.cpu.others,
                    cores(p.cpu.machine),
                    p.idle_busy,
                );
            }
        }
    }
    let counted: Vec<_> = rows
        .iter()
        .filter_map(|r| {
            let (c, o) = r.outcome.as_ref().ok()?;
            Some((r.kind, (c, c.redis?), (o, o.redis?)))
        })
        .collect();
    if !counted.is_empty() {
        println!();
        println!("Redis commands per request: rate-limit script calls (`EVALSHA` + `EVAL` from `INFO commandstats`) over requests Gatehouse answered (`gatehouse_requests_total`), each whole phase including its warmup; and requests that waited for a lease fetch (`gatehouse_ratelimit_lease_waits_total`, cost mode).");
        println!();
        println!("| target | phase | script calls | requests | calls per request | lease waits |");
        println!("|---|---|---:|---:|---:|---:|");
        for (kind, closed, open) in counted {
            for (what, (p, c)) in [("closed loop", closed), ("fixed rate", open)] {
                let what = phase_label(args, what, p);
                println!(
                    "| {kind} | {what} | {} | {} | {:.3} | {} |",
                    c.calls,
                    c.requests,
                    c.calls as f64 / c.requests.max(1) as f64,
                    c.lease_waits
                );
            }
        }
    }
    println!();
    for n in notes {
        println!("- {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::{
        best_count, count_order, distinct, median_by, median_interval, median_share, metric_sum,
        round_order,
    };

    /// A counter's series are summed over their labels; a metric whose name
    /// only starts with the counter's is not.
    #[test]
    fn a_counter_sums_its_series_and_nothing_else() {
        let text = "# HELP gatehouse_ratelimit_lease_waits Requests that waited.\n\
            # TYPE gatehouse_ratelimit_lease_waits counter\n\
            gatehouse_ratelimit_lease_waits_total{policy=\"p\",limit=\"a\"} 28\n\
            gatehouse_ratelimit_lease_waits_total{policy=\"p\",limit=\"b\"} 9\n\
            gatehouse_ratelimit_lease_waits_total_extra 1000\n\
            gatehouse_requests_total 5\n";
        assert_eq!(
            metric_sum(text, "gatehouse_ratelimit_lease_waits_total"),
            37
        );
        assert_eq!(metric_sum(text, "gatehouse_requests_total"), 5);
        assert_eq!(metric_sum(text, "gatehouse_absent_total"), 0);
    }

    /// A target's median round, by throughput or by p99: the middle one
    /// whatever the order, the upper middle of an even count.
    #[test]
    fn the_median_round_is_the_middle_one_by_its_key() {
        let p99s = |v: &[f64]| median_by(v.to_vec(), |x| *x);
        assert_eq!(p99s(&[310.0, 4.7, 5.1]), Some(5.1));
        assert_eq!(p99s(&[4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(p99s(&[]), None);
        // By a key: the element comes back whole.
        let rounds = vec![("b", 2.0), ("c", 3.0), ("a", 1.0)];
        assert_eq!(median_by(rounds, |r| r.1), Some(("b", 2.0)));
    }

    /// The ranks match the published tables of the sign test's interval
    /// for a median (n = 6: 1st and 6th, 96.9 %; n = 50: 18th and 33rd;
    /// n = 60: 22nd and 39th), whatever order the values come in, and the
    /// binomial's for thousands of values (`policy-cost`'s rounds).
    #[test]
    fn the_median_interval_takes_the_sign_tests_order_statistics() {
        let ranks = |n: usize| {
            let values: Vec<f64> = (1..=n).rev().map(|i| i as f64).collect();
            median_interval(&values).map(|(lo, hi)| (lo as usize, hi as usize))
        };
        assert_eq!(ranks(5), None, "five values give no 95 % interval");
        assert_eq!(ranks(6), Some((1, 6)));
        assert_eq!(ranks(9), Some((2, 8)));
        assert_eq!(ranks(20), Some((6, 15)));
        assert_eq!(ranks(50), Some((18, 33)));
        assert_eq!(ranks(60), Some((22, 39)));
        // Past 1074 values 2^-n underflows; the ranks still match the
        // binomial's (computed exactly with Python's integers).
        assert_eq!(ranks(1100), Some((518, 583)));
        assert_eq!(ranks(2000), Some((956, 1045)));
        assert_eq!(median_interval(&[]), None);
    }

    /// A target whose later rounds have no plain Gatehouse round to pair
    /// with (plain failed) says how many rounds its median share covers.
    #[test]
    fn a_median_share_of_fewer_rounds_says_how_many() {
        assert_eq!(median_share(&[0.9, 1.0, 0.95], 3), "0.950");
        assert_eq!(median_share(&[0.9, 1.0, 0.95], 7), "0.950 (3 of 7 rounds)");
        assert_eq!(median_share(&[], 4), "-");
    }

    #[test]
    fn the_best_count_wins_the_most_rounds_not_the_highest_one() {
        // Count 1 has the single highest round, count 0 wins two of three.
        let rounds = [vec![100.0, 90.0], vec![100.0, 99.0], vec![80.0, 200.0]];
        assert_eq!(best_count(&rounds, 2), (0, vec![2, 1]));
        // A tie, in a round or in wins, goes to the count listed first.
        let tied = [vec![100.0, 100.0], vec![90.0, 95.0], vec![95.0, 90.0]];
        assert_eq!(best_count(&tied, 2), (0, vec![2, 1]));
        assert_eq!(best_count(&[vec![1.0, 2.0]], 2), (1, vec![0, 1]));
        // One count, or no round at all.
        assert_eq!(best_count(&[vec![5.0], vec![6.0]], 1), (0, vec![2]));
        assert_eq!(best_count(&[], 2), (0, vec![0, 0]));
    }

    #[test]
    fn connection_counts_are_measured_once_each_in_alternating_order() {
        assert_eq!(distinct(&[32, 128, 32, 64, 128]), [32, 128, 64]);
        assert_eq!(count_order(2, 1), [0, 1]);
        assert_eq!(count_order(2, 2), [1, 0]);
        assert_eq!(count_order(3, 3), [0, 1, 2]);
        assert_eq!(count_order(1, 2), [0]);
    }

    #[test]
    fn each_round_starts_one_target_later_and_runs_every_target_once() {
        let order = |round| round_order(3, round).collect::<Vec<_>>();
        assert_eq!(order(1), [0, 1, 2]);
        assert_eq!(order(2), [1, 2, 0]);
        assert_eq!(order(3), [2, 0, 1]);
        assert_eq!(order(4), [0, 1, 2]);
        // Over n rounds, each target runs once in each place of a round.
        for target in 0..3 {
            let mut places: Vec<usize> = (1..=3)
                .map(|r| order(r).iter().position(|t| *t == target).unwrap())
                .collect();
            places.sort_unstable();
            assert_eq!(places, [0, 1, 2], "target {target}");
        }
        assert_eq!(round_order(0, 2).count(), 0);
    }
}
