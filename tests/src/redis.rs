//! Real `redis-server` processes on free loopback ports, for the cluster
//! rate-limit tests: one server, or a Redis Cluster of masters.

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
    child: Option<Child>,
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

    /// Starts a server with `--cluster-enabled yes`, not yet in a cluster.
    pub fn start_cluster_node(dir: &std::path::Path) -> Result<RedisServer> {
        Self::start_mode(dir, true)
    }

    fn start_mode(dir: &std::path::Path, cluster: bool) -> Result<RedisServer> {
        let port = free_port()?;
        let mut server = RedisServer {
            port,
            dir: dir.join(format!("redis-{port}")),
            cluster,
            child: None,
        };
        std::fs::create_dir_all(&server.dir)?;
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
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
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
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
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
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
