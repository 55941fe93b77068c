//! Real `redis-server` processes on free loopback ports, for the cluster
//! rate-limit tests: one server, a Redis Cluster of masters, or a master
//! with a replica watched by Sentinels.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One `redis-server`, without persistence, bound to 127.0.0.1.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
    /// More arguments: `--replicaof`, or a sentinel's config file first.
    extra: Vec<String>,
    child: Option<Child>,
    /// The TLS port of [`RedisServer::start_tls`] (`port` stays plain, for
    /// `redis-cli`).
    pub tls_port: Option<u16>,
    /// `requirepass`, which `redis-cli` then sends.
    password: Option<String>,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.cont();
        self.kill();
    }
}

impl RedisServer {
    /// Starts a server on a free port in `dir`.
    pub fn start(dir: &std::path::Path) -> Result<RedisServer> {
        Self::start_mode(dir, false)
    }

    /// Starts a server that also takes TLS connections, on `tls_port`, with
    /// a certificate for 127.0.0.1 from a new CA written to [`Self::ca_file`].
    pub fn start_tls(dir: &std::path::Path) -> Result<RedisServer> {
        Self::start_tls_with(dir, &crate::certs::LoopbackCert::new()?, TlsRole::Plain)
    }

    /// [`RedisServer::start_tls`] that also asks every TLS client for a
    /// certificate from its CA (`tls-auth-clients yes`); one is written to
    /// `client.crt` and `client.key` beside [`Self::ca_file`].
    pub fn start_tls_mutual(dir: &std::path::Path) -> Result<RedisServer> {
        Self::start_tls_with(dir, &crate::certs::LoopbackCert::new()?, TlsRole::Mutual)
    }

    /// The client certificate and key files of [`RedisServer::start_tls_mutual`].
    pub fn client_files(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("client.crt"), self.dir.join("client.key"))
    }

    /// A TLS server with the certificate of `cert`, in `role`.
    fn start_tls_with(
        dir: &std::path::Path,
        cert: &crate::certs::LoopbackCert,
        role: TlsRole,
    ) -> Result<RedisServer> {
        let tls_port = free_port()?;
        let cluster = role == TlsRole::ClusterNode;
        let mut server = Self::start_with(dir, cluster, |_, dir| {
            let mut args: Vec<String> = tls_directives(tls_port, &tls_files(dir, cert)?, role)
                .into_iter()
                .flat_map(|(k, v)| [format!("--{k}"), v])
                .collect();
            if let TlsRole::Replicated {
                replica_of: Some(master),
            } = role
            {
                args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
            }
            Ok(args)
        })?;
        server.tls_port = Some(tls_port);
        Ok(server)
    }

    /// A Sentinel that speaks TLS to clients, to the master (on its TLS
    /// port `master_tls_port`) and to other sentinels.
    fn start_sentinel_tls(
        dir: &std::path::Path,
        cert: &crate::certs::LoopbackCert,
        name: &str,
        master_tls_port: u16,
        quorum: usize,
    ) -> Result<RedisServer> {
        let tls_port = free_port()?;
        let mut server = Self::start_with(dir, false, |port, dir| {
            let conf = dir.join("sentinel.conf");
            let mut text = format!("port {port}\nbind 127.0.0.1\ndir {}\n", dir.display());
            for (k, v) in tls_directives(tls_port, &tls_files(dir, cert)?, TlsRole::Sentinel) {
                text.push_str(&format!("{k} {v}\n"));
            }
            text.push_str(&sentinel_monitor(name, master_tls_port, quorum));
            std::fs::write(&conf, text)?;
            Ok(vec![conf.display().to_string(), "--sentinel".into()])
        })?;
        server.tls_port = Some(tls_port);
        Ok(server)
    }

    /// The CA file of a [`RedisServer::start_tls`] server.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `rediss://` to the TLS port of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}"))
    }

    /// Starts a server with `--cluster-enabled yes`, not yet in a cluster.
    pub fn start_cluster_node(dir: &std::path::Path) -> Result<RedisServer> {
        Self::start_mode(dir, true)
    }

    fn start_mode(dir: &std::path::Path, cluster: bool) -> Result<RedisServer> {
        Self::start_with(dir, cluster, |_, _| Ok(Vec::new()))
    }

    /// Starts a replica of the server on `master_port`.
    pub fn start_replica(dir: &std::path::Path, master_port: u16) -> Result<RedisServer> {
        Self::start_with(dir, false, |_, _| {
            Ok(vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master_port.to_string(),
            ])
        })
    }

    /// Starts a Sentinel (`redis-server sentinel.conf --sentinel`) watching
    /// the master on `master_port` as `name`, with a quorum of `quorum`.
    pub fn start_sentinel(
        dir: &std::path::Path,
        name: &str,
        master_port: u16,
        quorum: usize,
    ) -> Result<RedisServer> {
        Self::start_with(dir, false, |port, dir| {
            // Sentinel rewrites its config file, so it lives in its own dir.
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n{}",
                    dir.display(),
                    sentinel_monitor(name, master_port, quorum)
                ),
            )?;
            Ok(vec![conf.display().to_string(), "--sentinel".into()])
        })
    }

    fn start_with(
        dir: &std::path::Path,
        cluster: bool,
        extra: impl FnOnce(u16, &std::path::Path) -> Result<Vec<String>>,
    ) -> Result<RedisServer> {
        Self::start_with_password(dir, cluster, None, extra)
    }

    /// [`RedisServer::start_with`] a server that asks for `password`
    /// (`requirepass`, and `masterauth` for a replica's master).
    fn start_with_password(
        dir: &std::path::Path,
        cluster: bool,
        password: Option<&str>,
        extra: impl FnOnce(u16, &std::path::Path) -> Result<Vec<String>>,
    ) -> Result<RedisServer> {
        let port = free_port()?;
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let mut extra = extra(port, &dir)?;
        if let Some(p) = password {
            extra.extend(["--requirepass", p, "--masterauth", p].map(String::from));
        }
        let mut server = RedisServer {
            port,
            dir,
            cluster,
            extra,
            child: None,
            tls_port: None,
            password: password.map(str::to_string),
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new("redis-server");
        if self.extra.last().map(String::as_str) == Some("--sentinel") {
            // A sentinel: its config file and --sentinel say everything.
            cmd.args(&self.extra);
        } else {
            cmd.args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .args(&self.extra);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "2000"]);
        }
        let child = cmd
            .spawn()
            .context("start redis-server (scripts/test.sh installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .cli(&["ping"])
            .map(|o| o.trim() != "PONG")
            .unwrap_or(true)
        {
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not answer PING", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli -p PORT args...`, its standard output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(p) = &self.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run redis-cli")?;
        if !out.status.success() {
            bail!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL: the data is gone (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status();
        }
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::stop`].
    pub fn cont(&self) {
        self.signal("-CONT");
    }

    /// A field of `INFO`, e.g. `cmdstat_evalsha` of `INFO commandstats`.
    pub fn info_field(&self, section: &str, field: &str) -> Result<Option<String>> {
        let info = self.cli(&["info", section])?;
        Ok(info.lines().find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        }))
    }

    /// Calls of one command since start (from `INFO commandstats`).
    pub fn calls(&self, command: &str) -> Result<u64> {
        let Some(stat) = self.info_field("commandstats", &format!("cmdstat_{command}"))? else {
            return Ok(0);
        };
        Ok(stat
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }
}

/// A Redis Cluster of `masters` masters and no replicas, made with
/// `redis-cli --cluster create`.
/// A sentinel's lines that watch the master `name` on `master_port`.
fn sentinel_monitor(name: &str, master_port: u16, quorum: usize) -> String {
    format!(
        "sentinel monitor {name} 127.0.0.1 {master_port} {quorum}
sentinel down-after-milliseconds {name} 1000
sentinel failover-timeout {name} 10000
sentinel parallel-syncs {name} 1
"
    )
}

/// What a TLS server is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TlsRole {
    /// Clients connect without a certificate.
    Plain,
    /// Clients must show a certificate from the CA.
    Mutual,
    /// A cluster node: the bus and the announced ports are TLS too.
    ClusterNode,
    /// A master (or, with `replica_of`, a replica of the master on that TLS
    /// port) that replicates over TLS.
    Replicated { replica_of: Option<u16> },
    /// A sentinel: TLS to the servers it watches and to other sentinels.
    Sentinel,
}

/// The certificate files of a TLS server, in its directory (with a client
/// certificate from the same CA beside them).
struct TlsFiles {
    cert: String,
    key: String,
    ca: String,
}

fn tls_files(dir: &std::path::Path, cert: &crate::certs::LoopbackCert) -> Result<TlsFiles> {
    let file = |name: &str, text: &str| -> Result<String> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    };
    file("client.crt", &cert.client_cert_pem)?;
    file("client.key", &cert.client_key_pem)?;
    Ok(TlsFiles {
        cert: file("redis.crt", &cert.cert_pem)?,
        key: file("redis.key", &cert.key_pem)?,
        ca: file("ca.crt", &cert.ca_pem)?,
    })
}

/// The TLS directives (name, value) of a server or sentinel in `role`.
fn tls_directives(tls_port: u16, files: &TlsFiles, role: TlsRole) -> Vec<(String, String)> {
    let auth_clients = if role == TlsRole::Mutual { "yes" } else { "no" };
    let mut d = vec![
        ("tls-port", tls_port.to_string()),
        ("tls-cert-file", files.cert.clone()),
        ("tls-key-file", files.key.clone()),
        ("tls-ca-cert-file", files.ca.clone()),
        ("tls-auth-clients", auth_clients.to_string()),
    ];
    match role {
        TlsRole::ClusterNode => {
            d.push(("tls-cluster", "yes".into()));
            d.push(("tls-replication", "yes".into()));
        }
        TlsRole::Replicated { .. } | TlsRole::Sentinel => {
            d.push(("tls-replication", "yes".into()));
        }
        TlsRole::Plain | TlsRole::Mutual => {}
    }
    d.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(dir: &std::path::Path, masters: usize) -> Result<RedisCluster> {
        let nodes = (0..masters)
            .map(|_| RedisServer::start_cluster_node(dir))
            .collect::<Result<Vec<_>>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create").args(&addrs).args([
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]);
        Self::created(nodes, &mut create)
    }

    /// Runs `redis-cli --cluster create` and waits for `cluster_state:ok`.
    fn created(nodes: Vec<RedisServer>, create: &mut Command) -> Result<RedisCluster> {
        let out = create
            .stdin(Stdio::null())
            .output()
            .context("run redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes.iter().all(|n| {
                n.info_field_cluster()
                    .is_ok_and(|s| s.as_deref() == Some("ok"))
            });
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("the redis cluster did not reach cluster_state:ok");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(RedisCluster { nodes })
    }

    /// Seed URLs for `--redis-cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `rediss://` seed URLs of a [`RedisCluster::start_tls`] cluster.
    pub fn tls_urls(&self) -> Vec<String> {
        self.nodes.iter().filter_map(RedisServer::tls_url).collect()
    }

    /// A cluster that speaks only TLS to clients and between its nodes
    /// (plain ports stay open for `redis-cli` checks), with one CA, whose
    /// file is any node's [`RedisServer::ca_file`].
    pub fn start_tls(dir: &std::path::Path, masters: usize) -> Result<RedisCluster> {
        let cert = crate::certs::LoopbackCert::new()?;
        let nodes = (0..masters)
            .map(|_| RedisServer::start_tls_with(dir, &cert, TlsRole::ClusterNode))
            .collect::<Result<Vec<_>>>()?;
        let ca = nodes[0].ca_file();
        let addrs: Vec<String> = nodes
            .iter()
            .filter_map(|n| n.tls_port.map(|p| format!("127.0.0.1:{p}")))
            .collect();
        let mut create = Command::new("redis-cli");
        create
            .arg("--tls")
            .arg("--cacert")
            .arg(&ca)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"]);
        Self::created(nodes, &mut create)
    }
}

impl RedisServer {
    fn info_field_cluster(&self) -> Result<Option<String>> {
        let info = self.cli(&["cluster", "info"])?;
        Ok(info.lines().find_map(|l| {
            l.strip_prefix("cluster_state:")
                .map(|v| v.trim().to_string())
        }))
    }
}

/// A master, one replica and three Sentinels watching them (quorum 2), all
/// on loopback.
pub struct RedisSentinels {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
    pub name: String,
}

impl RedisSentinels {
    pub fn start(dir: &std::path::Path, name: &str) -> Result<RedisSentinels> {
        let master = RedisServer::start(dir)?;
        let replica = RedisServer::start_replica(dir, master.port)?;
        let sentinels = (0..3)
            .map(|_| RedisServer::start_sentinel(dir, name, master.port, 2))
            .collect::<Result<Vec<_>>>()?;
        Self::watching(master, replica, sentinels, name)
    }

    /// The same, speaking only TLS between them and to clients (plain ports
    /// stay open for `redis-cli` checks), with one CA, whose file is any
    /// server's [`RedisServer::ca_file`].
    pub fn start_tls(dir: &std::path::Path, name: &str) -> Result<RedisSentinels> {
        let cert = crate::certs::LoopbackCert::new()?;
        let master =
            RedisServer::start_tls_with(dir, &cert, TlsRole::Replicated { replica_of: None })?;
        let master_tls = master.tls_port.context("the master's TLS port")?;
        let replica = RedisServer::start_tls_with(
            dir,
            &cert,
            TlsRole::Replicated {
                replica_of: Some(master_tls),
            },
        )?;
        let sentinels = (0..3)
            .map(|_| RedisServer::start_sentinel_tls(dir, &cert, name, master_tls, 2))
            .collect::<Result<Vec<_>>>()?;
        Self::watching(master, replica, sentinels, name)
    }

    /// The same with a master and replica that ask for `password`; the
    /// sentinels know it (`sentinel auth-pass`) and ask for none themselves.
    pub fn start_with_password(
        dir: &std::path::Path,
        name: &str,
        password: &str,
    ) -> Result<RedisSentinels> {
        let master =
            RedisServer::start_with_password(dir, false, Some(password), |_, _| Ok(Vec::new()))?;
        let master_port = master.port;
        let replica = RedisServer::start_with_password(dir, false, Some(password), |_, _| {
            Ok(vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master_port.to_string(),
            ])
        })?;
        let sentinels = (0..3)
            .map(|_| {
                RedisServer::start_with(dir, false, |port, dir| {
                    let conf = dir.join("sentinel.conf");
                    std::fs::write(
                        &conf,
                        format!(
                            "port {port}\nbind 127.0.0.1\ndir {}\n{}sentinel auth-pass {name} {password}\n",
                            dir.display(),
                            sentinel_monitor(name, master_port, 2)
                        ),
                    )?;
                    Ok(vec![conf.display().to_string(), "--sentinel".into()])
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::watching(master, replica, sentinels, name)
    }

    /// `rediss://` URLs of [`RedisSentinels::start_tls`] sentinels.
    pub fn tls_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .filter_map(RedisServer::tls_url)
            .collect()
    }

    /// Waits until the sentinels see the replica and each other.
    fn watching(
        master: RedisServer,
        replica: RedisServer,
        sentinels: Vec<RedisServer>,
        name: &str,
    ) -> Result<RedisSentinels> {
        let set = RedisSentinels {
            master,
            replica,
            sentinels,
            name: name.to_string(),
        };
        // Sentinels find the replica and each other through the master
        // (hello messages every 2 s); a failover needs both.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = set.sentinels.iter().all(|s| {
                let fields = set.master_fields(s).unwrap_or_default();
                let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
                field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2")
            });
            let synced = set
                .replica
                .info_field("replication", "master_link_status")
                .ok()
                .flatten()
                .as_deref()
                == Some("up");
            if ready && synced {
                return Ok(set);
            }
            if Instant::now() > deadline {
                bail!("the sentinels did not see the replica and each other in 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `SENTINEL MASTER name` of one sentinel, as (field, value) pairs.
    fn master_fields(&self, sentinel: &RedisServer) -> Result<Vec<(String, String)>> {
        let out = sentinel.cli(&["sentinel", "master", &self.name])?;
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        Ok(lines
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => Some((k.to_string(), v.to_string())),
                _ => None,
            })
            .collect())
    }

    /// The master's port as the first sentinel names it.
    pub fn master_port(&self) -> Result<u16> {
        let out = self.sentinels[0].cli(&["sentinel", "get-master-addr-by-name", &self.name])?;
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .context("sentinel get-master-addr-by-name")
    }

    /// URLs for `--redis-sentinel`.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }
}
