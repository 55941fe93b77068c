//! A sandbox that runs real `gatehouse` processes on free loopback ports,
//! for the end-to-end tests and the benchmark harness.
//!
//! The binaries are taken from the cargo target directory this test binary
//! was built into, so run `cargo build --bins` first (`scripts/test.sh` does).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
pub mod certs;
pub mod data;
pub mod drill;
pub mod faults;
pub mod introspection;
pub mod jwks;
pub mod linearizability;
pub mod redis;
pub mod scale;

use gatehouse_model::{Kind, Object};
use gatehouse_proto::pb;
use gatehouse_proto::AdminClient;
use tonic::transport::Endpoint;

/// The path of a workspace binary in the target directory of the running
/// executable: a test binary in `target/<profile>/deps/`, or a binary such as
/// `gatehouse-bench` in `target/<profile>/` itself.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let parent = exe.parent().expect("the executable has a parent directory");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    // target/<profile>/<bench>     -> target/<profile>/<name>
    let dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent.parent().expect("deps/ has a parent directory")
    } else {
        parent
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The bootstrap admin token every sandbox control plane starts with, which
/// `ctl`, `admin` and the data planes use unless a test says otherwise.
pub const TOKEN: &str = "ght_e2eTestBootstrapToken0123456789abcdefghi";

/// Runs `gatehousectl` with `args` against `server`, as the sandbox's admin.
pub fn ctl(server: &str, args: &[&str]) -> Output {
    ctl_as(TOKEN, server, args)
}

/// Runs `gatehousectl` with `args` against `server` with `token` (empty: none).
pub fn ctl_as(token: &str, server: &str, args: &[&str]) -> Output {
    Command::new(bin("gatehousectl"))
        .env("GATEHOUSE_TOKEN", token)
        .env_remove("GATEHOUSE_TOKEN_FILE")
        .arg("--server")
        .arg(server)
        .args(args)
        .output()
        .expect("run gatehousectl")
}

/// The `ready k=v ...` line a gatehouse process prints once it listens.
#[derive(Debug)]
pub struct Ready(String);

impl Ready {
    pub fn field(&self, name: &str) -> Result<String> {
        self.0
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("ready line {:?} lacks {name}", self.0))
    }
}

/// Whether any file under `dir` contains `needle` (for secrets that must not be stored).
pub fn dir_contains(dir: &Path, needle: &[u8]) -> Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let found = if path.is_dir() {
            dir_contains(&path, needle)?
        } else {
            let bytes = std::fs::read(&path)?;
            bytes.windows(needle.len()).any(|w| w == needle)
        };
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The last lines of a log file, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Spawns `cmd` (its stdout piped, stderr to `log`) and waits for its ready line.
pub fn spawn_ready(mut cmd: Command, log: &Path) -> Result<(Child, Ready)> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(file);
    let mut child = cmd.spawn().context("spawn gatehouse")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready ") {
                let _ = tx.send(line);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) => Ok((child, Ready(line))),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not become ready:\n{}", tail(log))
        }
    }
}

/// `gatehousectl apply -f file` against `server`; panics with its error.
pub fn apply(server: &str, file: &str) {
    let out = ctl(server, &["apply", "-f", file]);
    assert!(
        out.status.success(),
        "apply {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Options for the nodes of a sandbox cluster.
#[derive(Clone, Debug)]
pub struct Options {
    pub snapshot_every: u64,
    pub keep_logs: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// A directory made by `gatehouse certs init` (see [`make_certs`]): the
    /// nodes then use TLS with `cp-N.pem`, and the sandbox's clients `ca.pem`.
    pub tls: Option<PathBuf>,
    /// A file with the key that seals key material (`--secrets-key-file`).
    pub secrets_key: Option<PathBuf>,
    /// Start each node's ops listener (`--ops-listen`) on a free port.
    pub ops: bool,
    /// Route the nodes' traffic to each other through fault-injecting
    /// proxies ([`faults`]), reachable as [`Cluster::net`].
    pub faulty_network: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            snapshot_every: 10_000,
            keep_logs: 1_000,
            heartbeat_ms: 100,
            election_timeout_ms: 700,
            tls: None,
            secrets_key: None,
            ops: false,
            faulty_network: false,
        }
    }
}

/// One control-plane process.
pub struct Node {
    pub id: u64,
    /// The admin address; fixed once the node first started on port 0.
    pub admin: String,
    pub raft: String,
    /// The ops listener's address, when the node has one.
    pub ops: Option<String>,
    /// The Raft and admin addresses other nodes use: the proxies in front of
    /// this node on a faulty network, else the addresses above.
    pub peer_raft: String,
    pub peer_admin: String,
    proxies: Option<(faults::Proxy, faults::Proxy)>,
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The node's log (stderr) so far, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// The node's whole log (stderr) so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A cluster of real processes in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub options: Options,
    /// The links between the nodes, with `Options::faulty_network`.
    pub net: Option<std::sync::Arc<faults::FaultNet>>,
    /// The loopback address the nodes listen on (see [`cluster_host`]).
    host: String,
}

/// The loopback address a cluster's nodes listen on. Tests run side by side,
/// and a node restarted on its old port would otherwise find that port taken
/// (port 0 handed it to another test's process in the meantime) or, worse,
/// the test's clients would talk to another test's cluster while the node is
/// down, which accepts the same bootstrap token. So each plain cluster gets
/// its own address in 127.0.0.0/8 (outside 127.0.0.0/16, which other
/// servers and the fault network's source addresses use). TLS clusters keep
/// 127.0.0.1, the address their certificates name; their own CA already
/// keeps clients away from any other test's nodes.
fn cluster_host(tls: bool) -> String {
    use std::hash::{BuildHasher, Hasher};
    if tls {
        return "127.0.0.1".into();
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let r = h.finish().to_le_bytes();
    format!("127.{}.{}.{}", 1 + r[0] % 254, r[1], 1 + r[2] % 254)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(net) = &self.net {
            net.shutdown();
        }
    }
}

/// Connects to an admin API as the sandbox's admin.
pub async fn admin(addr: &str) -> Result<AdminClient> {
    admin_as(Some(TOKEN), addr).await
}

/// Makes a development CA and certificates with `gatehouse certs init` in
/// `dir`: control-plane nodes `cp-1`..`cp-N`, the data planes and admins named.
pub fn make_certs(
    dir: &Path,
    control_planes: u64,
    data_planes: &[&str],
    admins: &[&str],
) -> Result<()> {
    let cps: Vec<String> = (1..=control_planes).map(|i| format!("cp-{i}")).collect();
    let out = Command::new(bin("gatehouse"))
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .args(["--control-plane", &cps.join(",")])
        .args(["--data-plane", &data_planes.join(",")])
        .args(["--admin", &admins.join(",")])
        .output()?;
    if !out.status.success() {
        bail!("certs init: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Connects to a TLS admin API, trusting `certs`/ca.pem, with `token` and,
/// when given, the client certificate `certs`/`NAME`.pem.
pub async fn admin_tls(
    certs: &Path,
    token: Option<&str>,
    client_cert: Option<&str>,
    addr: &str,
) -> Result<AdminClient> {
    let files = gatehouse_proto::tls::ClientTlsFiles {
        ca: certs.join("ca.pem"),
        cert: client_cert.map(|n| certs.join(format!("{n}.pem"))),
        key: client_cert.map(|n| certs.join(format!("{n}-key.pem"))),
    };
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            files
                .load()?
                .domain_name(gatehouse_proto::tls::host_of(addr)),
        )?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connect to {addr} over TLS"))?;
    Ok(pb::admin_client::AdminClient::with_interceptor(
        channel,
        gatehouse_proto::BearerToken::new(token)?,
    ))
}

/// Connects to an admin API with `token` (`None`: no credential).
pub async fn admin_as(token: Option<&str>, addr: &str) -> Result<AdminClient> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connect to {addr}"))?;
    Ok(pb::admin_client::AdminClient::with_interceptor(
        channel,
        gatehouse_proto::BearerToken::new(token)?,
    ))
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    /// Starts `n` nodes: node 1 bootstraps, the others are added through the admin API.
    pub async fn start(n: u64, options: Options) -> Result<Cluster> {
        let net = if options.faulty_network {
            Some(faults::FaultNet::new()?)
        } else {
            None
        };
        let mut cluster = Cluster {
            dir: tempfile::tempdir()?,
            nodes: Vec::new(),
            host: cluster_host(options.tls.is_some()),
            options,
            net,
        };
        for id in 1..=n {
            cluster.spawn_new(id, id == 1)?;
        }
        for id in 2..=n {
            let (raft, admin_addr) = (
                cluster.node(id).peer_raft.clone(),
                cluster.node(id).peer_admin.clone(),
            );
            let mut client = cluster.client(1).await?;
            client
                .add_node(pb::AddNodeRequest {
                    member: Some(pb::Member {
                        id,
                        raft_addr: raft,
                        admin_addr,
                    }),
                    learner_only: false,
                })
                .await
                .map_err(|s| anyhow!("add node {id}: {}", s.message()))?;
        }
        // Ready to take writes: a one-node cluster elects itself a moment after start.
        cluster.leader().await?;
        Ok(cluster)
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|n| n.id == id).expect("node id")
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node id")
    }

    fn spawn_new(&mut self, id: u64, bootstrap: bool) -> Result<()> {
        let data_dir = self.dir.path().join(format!("node-{id}"));
        let proxies = match &self.net {
            Some(net) => Some((net.proxy(id)?, net.proxy(id)?)),
            None => None,
        };
        self.nodes.push(Node {
            id,
            admin: format!("{}:0", self.host),
            raft: format!("{}:0", self.host),
            ops: None,
            peer_raft: String::new(),
            peer_admin: String::new(),
            proxies,
            data_dir,
            log: self.dir.path().join(format!("node-{id}.log")),
            child: None,
        });
        self.spawn(id, bootstrap)
    }

    /// Starts the node's process on its known ports (port 0 the first time)
    /// and waits for its `ready` line.
    fn spawn(&mut self, id: u64, bootstrap: bool) -> Result<()> {
        let o = self.options.clone();
        let host = self.host.clone();
        let node = self.node_mut(id);
        let mut cmd = Command::new(bin("gatehouse"));
        cmd.args(["control-plane", "--node-id", &id.to_string()])
            .args(["--admin-listen", &node.admin, "--raft-listen", &node.raft])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--snapshot-every", &o.snapshot_every.to_string()])
            .args(["--keep-logs", &o.keep_logs.to_string()])
            .args(["--heartbeat-ms", &o.heartbeat_ms.to_string()])
            .args(["--election-timeout-ms", &o.election_timeout_ms.to_string()])
            .env("RUST_LOG", "info,openraft=warn")
            .env("GATEHOUSE_BOOTSTRAP_TOKEN", TOKEN);
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        if o.ops {
            let ops = node.ops.clone().unwrap_or_else(|| format!("{host}:0"));
            cmd.args(["--ops-listen", &ops]);
        }
        if let Some(key) = &o.secrets_key {
            cmd.arg("--secrets-key-file").arg(key);
        }
        if let Some((raft, admin)) = &node.proxies {
            cmd.args(["--advertise-raft", &raft.addr.to_string()])
                .args(["--advertise-admin", &admin.addr.to_string()])
                .args(["--peer-source-ip", &faults::source_ip(id).to_string()]);
        }
        if let Some(certs) = &o.tls {
            cmd.arg("--tls-cert")
                .arg(certs.join(format!("cp-{id}.pem")))
                .arg("--tls-key")
                .arg(certs.join(format!("cp-{id}-key.pem")))
                .arg("--tls-ca")
                .arg(certs.join("ca.pem"));
        }
        let (child, ready) = spawn_ready(cmd, &node.log)?;
        node.admin = ready.field("admin")?;
        node.raft = ready.field("raft")?;
        if o.ops {
            node.ops = Some(ready.field("ops")?);
        }
        match &node.proxies {
            Some((raft, admin)) => {
                raft.set_target(node.raft.parse()?);
                admin.set_target(node.admin.parse()?);
                node.peer_raft = raft.addr.to_string();
                node.peer_admin = admin.addr.to_string();
            }
            None => {
                node.peer_raft = node.raft.clone();
                node.peer_admin = node.admin.clone();
            }
        }
        node.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.node_mut(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the node to shut down cleanly (SIGKILL after 20 s).
    pub fn stop(&mut self, id: u64) -> Result<bool> {
        let Some(mut child) = self.node_mut(id).child.take() else {
            return Ok(false);
        };
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a node stopped with [`Cluster::stop`] or [`Cluster::kill`] again.
    pub fn start_again(&mut self, id: u64) -> Result<()> {
        self.spawn(id, false)
    }

    /// SIGSTOP: the process freezes with its sockets open (a long GC pause,
    /// a VM stall). [`Cluster::resume`] undoes it.
    pub fn pause(&self, id: u64) -> Result<()> {
        self.signal(id, "-STOP")
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&self, id: u64) -> Result<()> {
        self.signal(id, "-CONT")
    }

    fn signal(&self, id: u64, signal: &str) -> Result<()> {
        let pid = self.node(id).pid().context("the node is not running")?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid}: {status}");
        Ok(())
    }

    /// The fault-injecting network (the cluster must have one).
    pub fn net(&self) -> &faults::FaultNet {
        self.net.as_deref().expect("Options::faulty_network")
    }

    /// Starts a stopped node again on the same ports and data directory.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        self.kill(id);
        self.spawn(id, false)
    }

    /// Deletes a stopped node's data directory.
    pub fn wipe(&mut self, id: u64) -> Result<()> {
        assert!(!self.node(id).is_running(), "wipe a stopped node");
        std::fs::remove_dir_all(&self.node(id).data_dir)?;
        Ok(())
    }

    pub async fn client(&self, id: u64) -> Result<AdminClient> {
        match &self.options.tls {
            Some(certs) => admin_tls(certs, Some(TOKEN), None, &self.node(id).admin).await,
            None => admin(&self.node(id).admin).await,
        }
    }

    /// This node's own status.
    pub async fn local_status(&self, id: u64) -> Result<pb::NodeStatus> {
        Ok(self
            .client(id)
            .await?
            .local_status(pb::NodeStatusRequest {})
            .await?
            .into_inner())
    }

    /// Waits until the running nodes agree on one leader, and returns it.
    pub async fn leader(&self) -> Result<u64> {
        eventually(
            Duration::from_secs(20),
            "a leader all running nodes agree on",
            || async {
                let mut leaders = Vec::new();
                for n in self.nodes.iter().filter(|n| n.is_running()) {
                    leaders.push(self.local_status(n.id).await.ok()?.leader_id);
                }
                let first = *leaders.first()?;
                let agreed = first != 0 && leaders.iter().all(|l| *l == first);
                let leader_running = self.nodes.iter().any(|n| n.id == first && n.is_running());
                (agreed && leader_running).then_some(first)
            },
        )
        .await
    }

    /// Waits until every running node has applied at least `index`.
    pub async fn converge(&self, index: u64) -> Result<()> {
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            eventually(
                Duration::from_secs(30),
                &format!("node {} to apply {index}", n.id),
                || async {
                    let s = self.local_status(n.id).await.ok()?;
                    (s.last_applied >= index).then_some(())
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Every object as one node holds it (a stale read of its own state).
    pub async fn objects_on(&self, id: u64) -> Result<Vec<Object>> {
        let reply = self
            .client(id)
            .await?
            .list(pb::ListRequest {
                kind: String::new(),
                selector: String::new(),
                stale: true,
            })
            .await?
            .into_inner();
        reply
            .objects
            .into_iter()
            .map(|o| Object::try_from(o).map_err(|e| anyhow!("{e}")))
            .collect()
    }
}

/// A consumer object, the smallest valid object, for write streams.
pub fn consumer(name: &str) -> pb::Object {
    pb::Object {
        kind: Kind::Consumer.as_str().into(),
        name: name.into(),
        labels: Default::default(),
        revision: 0,
        spec_json: r#"{"groups":["e2e"]}"#.into(),
    }
}

/// Puts one object; `Ok(revision)` when the cluster acknowledged it.
pub async fn put(addr: &str, object: pb::Object) -> Result<u64, tonic::Status> {
    let mut client = admin(addr)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    client
        .put(pb::PutRequest {
            object: Some(object),
            expected_revision: None,
        })
        .await
        .map(|r| r.into_inner().revision)
}
