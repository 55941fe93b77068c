//! Data planes following the control plane: routes served by every data
//! plane, changes following, serving without the control plane, the
//! last-known-good file, and config updates under load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::{apply, ctl, eventually, Cluster, Options};

/// A config with one upstream `target` and a route `/echo` to it.
fn config(dir: &std::path::Path, target: std::net::SocketAddr) -> String {
    let path = dir.join("gateway.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1\nupstreams:\n  - name: echo\n    targets: [{{ address: \"{target}\" }}]\nroutes:\n  - name: echo\n    paths: [{{ prefix: /echo }}]\n    upstream: echo\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// Waits until `dp` answers GET /echo/... from the upstream named `want`.
async fn serves(dp: &DataPlaneProc, want: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("http://{}/echo/x?q=1", dp.proxy);
    eventually(
        Duration::from_secs(15),
        &format!("{} to route to {want}", dp.name),
        || async {
            let reply = get(&url, &[]).await.ok()?;
            let body = reply.json().ok()?;
            (reply.status == 200 && body["upstream"] == want).then_some(body)
        },
    )
    .await
}

fn addrs(cluster: &Cluster) -> Vec<String> {
    cluster.nodes.iter().map(|n| n.admin.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reach_every_data_plane_and_changes_follow() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, Options::default()).await?;
    let leader = cluster.leader().await?;
    let follower = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .unwrap()
        .admin
        .clone();
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let dir = tempfile::tempdir()?;
    let dp1 = DataPlaneProc::start("dp-1", &addrs(&cluster), dir.path())?;
    let dp2 = DataPlaneProc::start("dp-2", &addrs(&cluster), dir.path())?;

    apply(&follower, &config(dir.path(), a.addr));
    for dp in [&dp1, &dp2] {
        let echo = serves(dp, "a").await?;
        // The upstream sees the path and query, and headers no client could forge.
        assert_eq!(echo["path"], "/echo/x?q=1");
        assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
        assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
        assert!(echo["headers"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-")));
    }

    // Hop-by-hop headers, and those Connection names, never reach the
    // upstream; a client's forwarding headers are replaced; a valid
    // traceparent is kept.
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = get(
        &format!("http://{}/echo/h", dp1.proxy),
        &[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("traceparent", trace),
        ],
    )
    .await?;
    let seen = &reply.json()?["headers"];
    assert!(
        seen.get("x-secret").is_none() && seen.get("proxy-authorization").is_none(),
        "{seen}"
    );
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "a spoofed client address is replaced"
    );
    assert_eq!(
        seen["forwarded"],
        format!("for=127.0.0.1;host=\"{}\";proto=http", dp1.proxy)
    );
    assert_eq!(seen["traceparent"], trace);

    // A change reaches both, and status shows both at the new revision.
    apply(&follower, &config(dir.path(), b.addr));
    serves(&dp1, "b").await?;
    serves(&dp2, "b").await?;
    let status = eventually(
        Duration::from_secs(10),
        "both data planes to report the revision",
        || async {
            let out = ctl(&follower, &["cluster", "status", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let revision = v["config_revision"].as_u64()?;
            let dps = v["data_planes"].as_array()?;
            let at_head = dps
                .iter()
                .filter(|d| d["applied_revision"] == revision && d["lag"] == 0)
                .count();
            (dps.len() == 2 && at_head == 2).then_some(v)
        },
    )
    .await?;
    eprintln!("data planes: {}", status["data_planes"]);

    // Deleting the route takes effect on both: a problem+json 404.
    let out = ctl(&follower, &["delete", "route", "echo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for dp in [&dp1, &dp2] {
        let url = format!("http://{}/echo/x", dp.proxy);
        let reply = eventually(
            Duration::from_secs(10),
            "the route to disappear",
            || async { get(&url, &[]).await.ok().filter(|r| r.status == 404) },
        )
        .await?;
        assert_eq!(reply.headers["content-type"], "application/problem+json");
        assert_eq!(reply.json()?["status"], 404);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_planes_serve_without_the_control_plane_and_restart_from_last_known_good(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, Options::default()).await?;
    cluster.leader().await?;
    let a = Upstream::start("a").await?;
    let dir = tempfile::tempdir()?;
    let mut dp1 = DataPlaneProc::start("dp-1", &addrs(&cluster), dir.path())?;
    let mut dp2 = DataPlaneProc::start("dp-2", &addrs(&cluster), dir.path())?;
    apply(&cluster.node(1).admin, &config(dir.path(), a.addr));
    serves(&dp1, "a").await?;
    serves(&dp2, "a").await?;

    for id in 1..=3 {
        cluster.kill(id);
    }
    // Both keep serving the revision they have.
    serves(&dp1, "a").await?;
    serves(&dp2, "a").await?;

    // Restarted with no control plane: it serves its last-known-good file.
    dp1.wait_persisted().await?;
    dp1.restart()?;
    serves(&dp1, "a").await?;
    assert_eq!(dp1.ready_status().await, 200);

    // A corrupt last-known-good file leaves it unready, never serving an empty config.
    dp2.wait_persisted().await?;
    dp2.kill();
    let lkg = dp2.lkg_path();
    let mut bytes = std::fs::read(&lkg)?;
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    std::fs::write(&lkg, &bytes)?;
    dp2.restart()?;
    assert_eq!(dp2.ready_status().await, 503);
    let readyz = get(&format!("http://{}/readyz", dp2.ops), &[]).await?;
    assert!(
        String::from_utf8_lossy(&readyz.body).contains("checksum mismatch"),
        "{readyz:?}"
    );
    let reply = get(&format!("http://{}/echo/x", dp2.proxy), &[]).await?;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.json()?["type"],
        "https://gatehouse.dev/problems/not-ready"
    );

    // When the control plane returns, it catches up and serves again.
    for id in 1..=3 {
        cluster.restart(id)?;
    }
    serves(&dp2, "a").await?;
    assert_eq!(dp2.ready_status().await, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_updates_under_load_fail_no_request() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", &addrs(&cluster), dir.path())?;
    let (file_a, file_b) = {
        let fa = config(dir.path(), a.addr);
        let fb_dir = dir.path().join("b");
        std::fs::create_dir_all(&fb_dir)?;
        (fa, config(&fb_dir, b.addr))
    };
    apply(&server, &file_a);
    serves(&dp, "a").await?;

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut load = Vec::new();
    for _ in 0..4 {
        let (ok, failed, url) = (
            ok.clone(),
            failed.clone(),
            format!("http://{}/echo/load", dp.proxy),
        );
        load.push(tokio::spawn(async move {
            // Bounded in time and count.
            for _ in 0..5_000 {
                if Instant::now() > deadline {
                    break;
                }
                match get(&url, &[]).await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let mut updates = 0;
    while Instant::now() < deadline {
        let file = if updates % 2 == 0 { &file_b } else { &file_a };
        let server = server.clone();
        let file = file.clone();
        tokio::task::spawn_blocking(move || apply(&server, &file)).await?;
        updates += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for task in load {
        task.await?;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{updates} config updates under load: {ok} requests succeeded, {failed} failed");
    assert!(
        updates >= 5 && ok > 100,
        "the test did what it says: {updates} updates, {ok} requests"
    );
    assert_eq!(failed, 0, "no request failed during config updates");
    assert!(a.hits.load(Ordering::Relaxed) > 0 && b.hits.load(Ordering::Relaxed) > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_is_ejected_and_returns_and_timeouts_give_504() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let (mut a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", &addrs(&cluster), dir.path())?;
    let file = dir.path().join("pool.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1
upstreams:
  - name: pool
    targets: [{{ address: \"{}\" }}, {{ address: \"{}\" }}]
    health_check: {{ path: /health, interval: 200ms, timeout: 150ms, healthy_threshold: 1, unhealthy_threshold: 1 }}
    request_timeout: 500ms
routes:
  - name: pool
    paths: [{{ prefix: /pool }}]
    upstream: pool
",
            a.addr, b.addr
        ),
    )?;
    apply(&server, file.to_str().unwrap());
    let url = format!("http://{}/pool/x", dp.proxy);
    let who = |reply: &gatehouse_e2e::data::Reply| {
        reply
            .json()
            .ok()
            .and_then(|v| v["upstream"].as_str().map(str::to_string))
    };

    // Both targets take traffic.
    let seen: std::collections::BTreeSet<String> = eventually(
        Duration::from_secs(10),
        "both targets to answer",
        || async {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..10 {
                seen.insert(who(&get(&url, &[]).await.ok()?)?);
            }
            (seen.len() == 2).then_some(seen)
        },
    )
    .await?;
    assert_eq!(seen.len(), 2);

    // Target a dies: no request fails (a connect failure is retried on b),
    // and once the probe marks it down every request goes to b.
    a.stop();
    let started = Instant::now();
    let mut failed = 0;
    for _ in 0..40 {
        let reply = get(&url, &[]).await?;
        if reply.status != 200 {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(failed, 0, "requests failed while a target died");
    let hits_before = a.hits.load(Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(who(&get(&url, &[]).await?).as_deref(), Some("b"));
    }
    assert_eq!(a.hits.load(Ordering::Relaxed), hits_before);
    eprintln!(
        "traffic moved off the dead target within {:?}",
        started.elapsed()
    );

    // It comes back when its health check passes again.
    a.restart().await?;
    eventually(
        Duration::from_secs(10),
        "the target to take traffic again",
        || async {
            for _ in 0..10 {
                if who(&get(&url, &[]).await.ok()?)? == "a" {
                    return Some(());
                }
            }
            None
        },
    )
    .await?;

    // A target slower than request_timeout: 504 as problem+json.
    let reply = get(&format!("http://{}/pool/slow", dp.proxy), &[]).await?;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.json()?["type"],
        "https://gatehouse.dev/problems/gateway-timeout"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_on_a_lagging_node_never_goes_back() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, Options::default()).await?;
    let leader = cluster.leader().await?;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let (lagging, other) = (others[0], others[1]);
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let dir = tempfile::tempdir()?;
    let (file_a, file_b) = {
        let fb_dir = dir.path().join("b");
        std::fs::create_dir_all(&fb_dir)?;
        (config(dir.path(), a.addr), config(&fb_dir, b.addr))
    };
    let at = |id: u64, cluster: &Cluster| vec![cluster.node(id).admin.clone()];

    // Revision 1 (to a) through the node that will lag.
    let mut dp = DataPlaneProc::start("dp-1", &at(lagging, &cluster), dir.path())?;
    apply(&cluster.node(leader).admin, &file_a);
    serves(&dp, "a").await?;

    // The node stops; the cluster moves on (to b) and the data plane follows it elsewhere.
    cluster.kill(lagging);
    apply(&cluster.node(leader).admin, &file_b);
    dp.set_control_planes(&at(leader, &cluster));
    dp.restart()?;
    serves(&dp, "b").await?;
    dp.wait_persisted().await?;
    let newer = get(&format!("http://{}/readyz", dp.ops), &[]).await?;

    // Only the lagging node is left (no quorum, so it cannot catch up), and
    // the data plane restarts against it alone.
    cluster.kill(leader);
    cluster.kill(other);
    cluster.restart(lagging)?;
    dp.set_control_planes(&at(lagging, &cluster));
    dp.restart()?;
    for _ in 0..10 {
        serves(&dp, "b").await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let still = get(&format!("http://{}/readyz", dp.ops), &[]).await?;
    assert_eq!(still.body, newer.body, "it kept the newer revision");
    let stale = cluster.local_status(lagging).await?;
    eprintln!(
        "lagging node at revision {}; data plane: {}",
        stale.config_revision,
        String::from_utf8_lossy(&still.body).trim()
    );
    assert!(!String::from_utf8_lossy(&still.body)
        .contains(&format!("revision {}\n", stale.config_revision)));

    // Once the node catches up, the data plane follows it again.
    cluster.restart(leader)?;
    cluster.restart(other)?;
    cluster.leader().await?;
    apply(&cluster.node(lagging).admin, &file_a);
    serves(&dp, "a").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let a = Upstream::start("a").await?;
    let dir = tempfile::tempdir()?;
    let mut dp = DataPlaneProc::start("dp-1", &addrs(&cluster), dir.path())?;
    apply(&cluster.node(1).admin, &config(dir.path(), a.addr));
    serves(&dp, "a").await?;

    // A request the upstream answers after 2 s is in flight when SIGTERM arrives.
    let slow = tokio::spawn({
        let url = format!("http://{}/echo/slow", dp.proxy);
        async move { get(&url, &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proxy = dp.proxy.clone();
    let exited =
        tokio::task::spawn_blocking(move || dp.terminate(Duration::from_secs(10))).await??;
    let reply = slow.await??;
    assert_eq!(reply.status, 200, "the request in flight completed");
    assert_eq!(reply.json()?["path"], "/echo/slow");
    assert!(exited, "the data plane exited cleanly after draining");
    assert!(
        tokio::net::TcpStream::connect(&proxy).await.is_err(),
        "nothing listens after shutdown"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_that_does_not_compile_keeps_the_old_one_serving_and_is_reported(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", &addrs(&cluster), dir.path())?;
    apply(&server, &config(dir.path(), a.addr));
    serves(&dp, "a").await?;

    // The control plane only checks PEM markers; the data plane parses the
    // certificate and refuses the revision, together with the route change in it.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken)?;
    config(&broken, b.addr);
    std::fs::write(
        broken.join("cert.yaml"),
        "version: 1\ncertificates:\n  - name: bad\n    server_names: [a.example]\n    certificate_pem: \"-----BEGIN CERTIFICATE-----\\nnot base64\\n-----END CERTIFICATE-----\\n\"\n    private_key_pem: \"-----BEGIN PRIVATE KEY-----\\nx\\n-----END PRIVATE KEY-----\\n\"\n",
    )?;
    apply(&server, broken.to_str().unwrap());
    let error = eventually(
        Duration::from_secs(10),
        "the data plane to report the error",
        || async {
            let out = ctl(&server, &["cluster", "status", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let e = v["data_planes"][0]["last_error"].as_str()?.to_string();
            (!e.is_empty()).then_some(e)
        },
    )
    .await?;
    assert!(
        error.contains("certificate \"bad\": certificate_pem"),
        "{error}"
    );
    // Still the old revision: traffic still goes to a.
    for _ in 0..5 {
        serves(&dp, "a").await?;
    }
    let metrics = get(&format!("http://{}/metrics", dp.ops), &[]).await?;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(metrics.contains("gatehouse_config_apply_errors_total 1"));
    // One answer from `serves` before the bad revision, five after.
    assert!(
        metrics.contains("gatehouse_requests_total{route=\"echo\",status=\"200\"} 6\n"),
        "{metrics}"
    );

    // The fix is applied, and the data plane moves on.
    let out = ctl(&server, &["delete", "certificate", "bad"]);
    assert!(out.status.success());
    serves(&dp, "b").await?;
    Ok(())
}
