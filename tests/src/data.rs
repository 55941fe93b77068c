//! Data planes as real processes, a test upstream, and an HTTP client.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::{bin, spawn_ready, tail};

/// One `gatehouse data-plane` process.
pub struct DataPlaneProc {
    pub name: String,
    /// The proxy address; fixed after the first start on port 0.
    pub proxy: String,
    pub ops: String,
    /// The TLS listener's address, when it has one.
    pub tls: Option<String>,
    pub state_dir: PathBuf,
    control_planes: Vec<String>,
    /// Flags added to the command line, and the token (`None`: no GATEHOUSE_TOKEN).
    extra_args: Vec<String>,
    token: Option<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Drop for DataPlaneProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl DataPlaneProc {
    /// Starts a data plane watching `control_planes`, keeping its files in `dir`.
    pub fn start(
        name: &str,
        control_planes: &[String],
        dir: &std::path::Path,
    ) -> Result<DataPlaneProc> {
        Self::start_with(name, control_planes, dir, false, &[])
    }

    /// Like [`DataPlaneProc::start`], with more flags (e.g. `--redis-url`).
    pub fn start_args(
        name: &str,
        control_planes: &[String],
        dir: &std::path::Path,
        extra: &[String],
    ) -> Result<DataPlaneProc> {
        Self::start_with(name, control_planes, dir, false, extra)
    }

    /// Like [`DataPlaneProc::start`], with extra flags (e.g. resource limits).
    pub fn start_with_args(
        name: &str,
        control_planes: &[String],
        dir: &std::path::Path,
        args: &[&str],
    ) -> Result<DataPlaneProc> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::start_with(name, control_planes, dir, false, &args)
    }

    /// Like [`DataPlaneProc::start`], with a TLS listener as well.
    pub fn start_tls(
        name: &str,
        control_planes: &[String],
        dir: &std::path::Path,
    ) -> Result<DataPlaneProc> {
        Self::start_with(name, control_planes, dir, true, &[])
    }

    /// A data plane with extra flags and `token` instead of the sandbox's
    /// admin token (`None`: no token at all).
    pub fn start_custom(
        name: &str,
        control_planes: &[String],
        dir: &std::path::Path,
        extra_args: &[String],
        token: Option<&str>,
    ) -> Result<DataPlaneProc> {
        Self::build(name, control_planes, dir, false, extra_args, token)
    }

    fn start_with(
        name: &str,
        control_planes: &[String],
        dir: &std::path::Path,
        tls: bool,
        extra: &[String],
    ) -> Result<DataPlaneProc> {
        Self::build(name, control_planes, dir, tls, extra, Some(crate::TOKEN))
    }

    fn build(
        name: &str,
        control_planes: &[String],
        dir: &std::path::Path,
        tls: bool,
        extra_args: &[String],
        token: Option<&str>,
    ) -> Result<DataPlaneProc> {
        let mut dp = DataPlaneProc {
            name: name.to_string(),
            proxy: "127.0.0.1:0".into(),
            ops: "127.0.0.1:0".into(),
            tls: tls.then(|| "127.0.0.1:0".to_string()),
            state_dir: dir.join(name),
            control_planes: control_planes.to_vec(),
            extra_args: extra_args.to_vec(),
            token: token.map(str::to_string),
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        dp.spawn()?;
        Ok(dp)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(bin("gatehouse"));
        cmd.args(["data-plane", "--name", &self.name])
            .args(["--control-plane", &self.control_planes.join(",")])
            .args(["--listen", &self.proxy, "--ops-listen", &self.ops])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--drain-seconds", "5"])
            .env("RUST_LOG", "info")
            .env_remove("GATEHOUSE_TOKEN")
            .args(&self.extra_args);
        if let Some(token) = &self.token {
            cmd.env("GATEHOUSE_TOKEN", token);
        }
        if let Some(tls) = &self.tls {
            cmd.args(["--tls-listen", tls]);
        }
        let (child, ready) = spawn_ready(cmd, &self.log)?;
        self.proxy = ready.field("proxy")?;
        self.ops = ready.field("ops")?;
        if self.tls.is_some() || self.extra_args.iter().any(|a| a == "--tls-listen") {
            self.tls = Some(ready.field("tls")?);
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit;
    /// returns whether it exited successfully in time.
    pub fn terminate(&mut self, timeout: Duration) -> Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Watches other control-plane nodes from the next (re)start on.
    pub fn set_control_planes(&mut self, control_planes: &[String]) {
        self.control_planes = control_planes.to_vec();
    }

    /// Starts it again on the same ports and state directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// The whole log (stderr) so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last-known-good file.
    pub fn lkg_path(&self) -> PathBuf {
        self.state_dir.join("last-known-good.json")
    }

    /// The revision in the last-known-good file, if there is one.
    pub fn lkg_revision(&self) -> Option<u64> {
        let bytes = std::fs::read(self.lkg_path()).ok()?;
        let body = &bytes[bytes.iter().position(|b| *b == b'\n')? + 1..];
        serde_json::from_slice::<serde_json::Value>(body).ok()?["revision"].as_u64()
    }

    /// The cluster id in the last-known-good file, if it names one.
    pub fn lkg_cluster_id(&self) -> Option<String> {
        let bytes = std::fs::read(self.lkg_path()).ok()?;
        let body = &bytes[bytes.iter().position(|b| *b == b'\n')? + 1..];
        serde_json::from_slice::<serde_json::Value>(body).ok()?["cluster_id"]
            .as_str()
            .map(str::to_string)
    }

    /// Waits until the revision being served is also in the last-known-good
    /// file (it is written in the background), so a restart finds it.
    pub async fn wait_persisted(&self) -> Result<()> {
        let url = format!("http://{}/readyz", self.ops);
        crate::eventually(
            Duration::from_secs(10),
            "the last-known-good file",
            || async {
                let reply = get(&url, &[]).await.ok()?;
                let text = String::from_utf8_lossy(&reply.body).into_owned();
                let serving: u64 = text.trim().strip_prefix("ready: revision ")?.parse().ok()?;
                (self.lkg_revision()? >= serving).then_some(())
            },
        )
        .await
    }

    /// The status code of `/readyz`.
    pub async fn ready_status(&self) -> u16 {
        match get(&format!("http://{}/readyz", self.ops), &[]).await {
            Ok(r) => r.status,
            Err(_) => 0,
        }
    }
}

/// What a test upstream saw of one request; it answers with this as JSON.
pub type Echo = serde_json::Value;

/// A test upstream on a free loopback port that answers every request with
/// its own name, the method, path and headers it received, as JSON. A path
/// containing `/slow` is answered after 2 s.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    name: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &str) -> Result<Upstream> {
        Self::start_on(name, "127.0.0.1:0".parse()?, Arc::new(AtomicU64::new(0))).await
    }

    /// Stops listening and closes every open connection, as a crash would.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Starts again on the same address.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        let mut again = Self::start_on(&self.name, self.addr, self.hits.clone()).await?;
        // `again` leaves with the old, stopped task.
        std::mem::swap(&mut self.task, &mut again.task);
        Ok(())
    }

    async fn start_on(name: &str, addr: SocketAddr, hits: Arc<AtomicU64>) -> Result<Upstream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener: TcpListener = socket.listen(128)?;
        let addr = listener.local_addr()?;
        let counter = hits.clone();
        let upstream_name = name.to_string();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the task closes them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let name = name.clone();
                let counter = counter.clone();
                connections.spawn(async move {
                    let svc = service_fn(move |mut req: http::Request<Incoming>| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let headers: BTreeMap<String, String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.to_string(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect();
                        let slow = req.uri().path().contains("/slow");
                        let upgrade = req.headers().contains_key(http::header::UPGRADE);
                        if upgrade {
                            // Echo every byte back once the connection is switched.
                            let on_upgrade = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(upgraded) = on_upgrade.await {
                                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                        }
                        let mut body = serde_json::json!({
                            "upstream": name,
                            "method": req.method().as_str(),
                            "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
                            "headers": headers,
                        });
                        let request_body = req.into_body();
                        async move {
                            // Read the whole request body before answering, as
                            // a real service would: a body the gateway cuts off
                            // then fails the call instead of racing the answer.
                            match request_body.collect().await {
                                Ok(b) => body["body_bytes"] = b.to_bytes().len().into(),
                                Err(_) => body["body_error"] = true.into(),
                            }
                            if slow {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            }
                            if upgrade {
                                return Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(101)
                                        .header("connection", "upgrade")
                                        .header("upgrade", "websocket")
                                        .body(Full::new(Bytes::new()))
                                        .expect("valid response"),
                                );
                            }
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body.to_string())))
                                    .expect("valid response"),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Upstream {
            addr,
            hits,
            name: upstream_name,
            task,
        })
    }
}

/// A response as a test reads it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {:?}", self.body))
    }
}

/// A GET with extra headers, over a fresh connection, with a 10 s limit.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("request timed out")??;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}
