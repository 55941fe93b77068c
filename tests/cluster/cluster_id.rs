//! A data plane follows one cluster: it never applies the configuration of
//! a control-plane node of another cluster found at one of its addresses
//! (an address reused by another cluster), whether the node refuses it or
//! joins the other cluster while the data plane watches it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::{apply, bin, consumer, eventually, put, spawn_ready, Cluster, Options, TOKEN};
use gatehouse_proto::pb;
use gatehouse_proto::pb::config_stream_client::ConfigStreamClient;

/// Writes a config with one upstream `target` and a route `/echo` to it,
/// named after `cluster`; the file's path.
fn config(dir: &Path, cluster: &str, target: std::net::SocketAddr) -> String {
    let path = dir.join(format!("gateway-{cluster}.yaml"));
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
async fn serves(dp: &DataPlaneProc, want: &str) -> anyhow::Result<()> {
    let url = format!("http://{}/echo/x", dp.proxy);
    eventually(
        Duration::from_secs(15),
        &format!("{} to route to {want}", dp.name),
        || async {
            let reply = get(&url, &[]).await.ok()?;
            let body = reply.json().ok()?;
            (reply.status == 200 && body["upstream"] == want).then_some(())
        },
    )
    .await
}

/// The upstream `dp` routes /echo to right now (`None`: no 200 answer).
async fn routed_to(dp: &DataPlaneProc) -> Option<String> {
    let reply = get(&format!("http://{}/echo/x", dp.proxy), &[])
        .await
        .ok()?;
    let body = reply.json().ok()?;
    (reply.status == 200).then(|| body["upstream"].as_str().unwrap_or_default().to_string())
}

/// A counter of `dp`'s metrics (0 when absent).
async fn counter(dp: &DataPlaneProc, name: &str) -> anyhow::Result<u64> {
    let metrics = get(&format!("http://{}/metrics", dp.ops), &[]).await?;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0))
}

const WRONG_CLUSTER: &str = "gatehouse_config_stream_wrong_cluster_total";

/// A one-node cluster with the route /echo to `upstream`, at a configuration
/// revision above `above` (consumers are written first to get there); its
/// cluster id and revision.
async fn one_node_cluster(
    dir: &Path,
    name: &str,
    upstream: &Upstream,
    above: u64,
) -> anyhow::Result<(Cluster, String, u64)> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let admin = cluster.node(1).admin.clone();
    let mut revision = cluster.local_status(1).await?.config_revision;
    let mut i = 0;
    while revision <= above {
        revision = put(&admin, consumer(&format!("{name}-filler-{i}"))).await?;
        i += 1;
    }
    apply(&admin, &config(dir, name, upstream.addr));
    let status = cluster.local_status(1).await?;
    assert!(!status.cluster_id.is_empty(), "cluster {name} has an id");
    Ok((cluster, status.cluster_id, status.config_revision))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_restarted_against_another_cluster_keeps_serving_its_own() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let (cluster_a, id_a, rev_a) = one_node_cluster(dir.path(), "a", &a, 0).await?;
    // B is ahead of A: a data plane that followed B would take its revision
    // (it never goes back, so a B behind A would prove nothing).
    let (cluster_b, id_b, rev_b) = one_node_cluster(dir.path(), "b", &b, rev_a + 3).await?;
    assert_ne!(id_a, id_b);
    assert!(rev_b > rev_a, "B at {rev_b}, A at {rev_a}");
    let addr_a = cluster_a.node(1).admin.clone();
    let addr_b = cluster_b.node(1).admin.clone();

    // dp-1 follows A and keeps A's id with its last-known-good file.
    let mut dp = DataPlaneProc::start("dp-1", std::slice::from_ref(&addr_a), dir.path())?;
    serves(&dp, "a").await?;
    dp.wait_persisted().await?;
    assert_eq!(dp.lkg_cluster_id().as_deref(), Some(id_a.as_str()));
    let lkg_revision = dp.lkg_revision();

    // Restarted with B's address only (A's address given to B, say).
    dp.set_control_planes(std::slice::from_ref(&addr_b));
    dp.restart()?;
    let mismatch = format!(
        "control-plane node {addr_b} belongs to cluster {id_b}; this data plane belongs to cluster {id_a}: not following it"
    );
    eventually(
        Duration::from_secs(15),
        "the data plane to log the mismatch",
        || async { dp.log_text().contains(&mismatch).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", dp.log_tail()))?;
    // B refused it, naming both clusters.
    let refusal = format!(
        "this control-plane node belongs to cluster {id_b}; the data plane belongs to cluster {id_a}"
    );
    assert!(
        cluster_b.node(1).log_text().contains(&refusal),
        "{}",
        cluster_b.node(1).log_tail()
    );
    // Through several retries it keeps serving A's routes from its
    // last-known-good file, and never takes B's.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            routed_to(&dp).await.as_deref(),
            Some("a"),
            "{}",
            dp.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(dp.ready_status().await, 200);
    let readyz = get(&format!("http://{}/readyz", dp.ops), &[]).await?;
    assert_eq!(
        String::from_utf8_lossy(&readyz.body).trim(),
        format!("ready: revision {rev_a}")
    );
    eventually(Duration::from_secs(10), "a retry, counted", || async {
        (counter(&dp, WRONG_CLUSTER).await.ok()? >= 2).then_some(())
    })
    .await?;
    assert_eq!(routed_to(&dp).await.as_deref(), Some("a"));
    assert_eq!(dp.lkg_revision(), lkg_revision);
    assert_eq!(dp.lkg_cluster_id().as_deref(), Some(id_a.as_str()));
    let status = cluster_b
        .client(1)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    assert!(status.data_planes.is_empty(), "{:?}", status.data_planes);
    assert_eq!(status.cluster_id, id_b);

    // A fresh data plane (new state directory) pointed at B serves B, and belongs to B.
    let fresh = DataPlaneProc::start("dp-fresh", std::slice::from_ref(&addr_b), dir.path())?;
    serves(&fresh, "b").await?;
    fresh.wait_persisted().await?;
    assert_eq!(fresh.lkg_cluster_id().as_deref(), Some(id_b.as_str()));
    assert_eq!(counter(&fresh, WRONG_CLUSTER).await?, 0);

    // Given A's address again, dp-1 follows A.
    dp.set_control_planes(&[addr_b.clone(), addr_a.clone()]);
    dp.restart()?;
    put(&addr_a, consumer("after-the-restart")).await?;
    let rev = cluster_a.local_status(1).await?.config_revision;
    eventually(
        Duration::from_secs(15),
        "dp-1 to follow A again",
        || async {
            let readyz = get(&format!("http://{}/readyz", dp.ops), &[]).await.ok()?;
            (String::from_utf8_lossy(&readyz.body).trim() == format!("ready: revision {rev}"))
                .then_some(())
        },
    )
    .await?;
    assert_eq!(routed_to(&dp).await.as_deref(), Some("a"));
    Ok(())
}

/// Opens a config stream to `addr` saying it belongs to `cluster_id`; the
/// first answer's cluster, or the refusal.
async fn hello(addr: &str, cluster_id: &str) -> Result<String, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = ConfigStreamClient::with_interceptor(
        channel,
        gatehouse_proto::BearerToken::new(Some(TOKEN)).unwrap(),
    );
    let hello = pb::WatchRequest {
        msg: Some(pb::watch_request::Msg::Hello(pb::Hello {
            node_name: "probe".into(),
            revision: 0,
            cluster_id: cluster_id.into(),
        })),
    };
    // The request stream stays open: the node would end the stream otherwise.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello).await.unwrap();
    let mut inbound = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await?.and_then(|m| m.msg) {
        Some(pb::watch_response::Msg::Cluster(info)) => Ok(info.cluster_id),
        other => Err(tonic::Status::internal(format!(
            "first message is not the cluster: {other:?}"
        ))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_data_plane_follows_only_its_cluster() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let (cluster_a, id_a, rev_a) = one_node_cluster(dir.path(), "a", &a, 0).await?;
    let (cluster_b, id_b, _) = one_node_cluster(dir.path(), "b", &b, rev_a).await?;
    let addr_a = cluster_a.node(1).admin.clone();
    let addr_b = cluster_b.node(1).admin.clone();

    // The control plane's side: the first message names the node's cluster;
    // a hello of another cluster is refused, naming both.
    assert_eq!(hello(&addr_b, "").await?, id_b);
    assert_eq!(hello(&addr_b, &id_b).await?, id_b);
    let refusal = hello(&addr_b, &id_a).await.unwrap_err();
    assert_eq!(
        refusal.code(),
        tonic::Code::FailedPrecondition,
        "{refusal:?}"
    );
    assert_eq!(
        refusal.message(),
        format!("this control-plane node belongs to cluster {id_b}; the data plane belongs to cluster {id_a}")
    );

    // A fresh data plane pinned to A and given only B's address serves
    // nothing, and says why.
    let pin = ["--cluster-id".to_string(), id_a.clone()];
    let only_b =
        DataPlaneProc::start_args("dp-only-b", std::slice::from_ref(&addr_b), dir.path(), &pin)?;
    let reason = eventually(
        Duration::from_secs(15),
        "/readyz to name the mismatch",
        || async {
            let readyz = get(&format!("http://{}/readyz", only_b.ops), &[])
                .await
                .ok()?;
            let text = String::from_utf8_lossy(&readyz.body).into_owned();
            (readyz.status == 503 && text.contains(&id_b)).then_some(text)
        },
    )
    .await?;
    assert!(
        reason.contains(&format!("control-plane node {addr_b} belongs to cluster {id_b}; this data plane belongs to cluster {id_a}")),
        "{reason}"
    );
    let reply = get(&format!("http://{}/echo/x", only_b.proxy), &[]).await?;
    assert_eq!(reply.status, 503);
    assert!(only_b.lkg_revision().is_none(), "nothing from B was kept");

    // Pinned to A and given B then A, it moves on to A and serves A.
    let mut dp = DataPlaneProc::start_args(
        "dp-pinned",
        &[addr_b.clone(), addr_a.clone()],
        dir.path(),
        &pin,
    )?;
    serves(&dp, "a").await?;
    dp.wait_persisted().await?;
    assert_eq!(dp.lkg_cluster_id().as_deref(), Some(id_a.as_str()));

    // Its last-known-good file is A's: pinned to B instead, it does not start.
    dp.kill();
    let mut child = Command::new(bin("gatehouse"))
        .args([
            "data-plane",
            "--name",
            "dp-pinned",
            "--control-plane",
            &addr_b,
        ])
        .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(&dp.state_dir)
        .args(["--cluster-id", &id_b])
        .env("GATEHOUSE_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!(
                "a data plane pinned to another cluster than its last-known-good file started"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap())?;
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "{}: the last-known-good configuration came from cluster {id_a}, but this data plane is pinned to cluster {id_b} (--cluster-id)",
            dp.lkg_path().display()
        )),
        "{stderr}"
    );
    // A malformed id is refused by the flag's parser.
    let out = Command::new(bin("gatehouse"))
        .args([
            "data-plane",
            "--control-plane",
            &addr_a,
            "--cluster-id",
            "not an id",
        ])
        .env("GATEHOUSE_TOKEN", TOKEN)
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--cluster-id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_another_cluster_while_watched_is_dropped() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let (cluster_a, id_a, rev_a) = one_node_cluster(dir.path(), "a", &a, 0).await?;
    let (cluster_b, id_b, rev_b) = one_node_cluster(dir.path(), "b", &b, rev_a + 3).await?;
    assert!(rev_b > rev_a);
    let mut dp = DataPlaneProc::start("dp-1", &[cluster_a.node(1).admin.clone()], dir.path())?;
    serves(&dp, "a").await?;
    dp.wait_persisted().await?;

    // A node of no cluster yet, at the address the data plane now watches.
    let (mut spare, ready) = uninitialized_node(
        dir.path(),
        2,
        "spare",
        &["--heartbeat-ms", "100", "--election-timeout-ms", "700"],
    )?;
    let spare_admin = ready.field("admin")?;
    let spare_raft = ready.field("raft")?;
    dp.set_control_planes(std::slice::from_ref(&spare_admin));
    dp.restart()?;
    let connected = format!("control_plane={spare_admin}");
    eventually(
        Duration::from_secs(15),
        "the data plane to watch the spare node",
        || async {
            dp.log_text()
                .lines()
                .any(|l| l.contains("config stream connected") && l.contains(&connected))
                .then_some(())
        },
    )
    .await?;

    // The spare node joins B (whose revision is ahead): the data plane is
    // dropped, watches again, and is refused.
    cluster_b
        .client(1)
        .await?
        .add_node(pb::AddNodeRequest {
            member: Some(pb::Member {
                id: 2,
                raft_addr: spare_raft,
                admin_addr: spare_admin.clone(),
            }),
            learner_only: true,
        })
        .await?;
    let mismatch = format!(
        "control-plane node {spare_admin} belongs to cluster {id_b}; this data plane belongs to cluster {id_a}"
    );
    let seen = eventually(
        Duration::from_secs(20),
        "the data plane to refuse the spare node",
        || async { dp.log_text().contains(&mismatch).then_some(()) },
    )
    .await;
    let _ = spare.kill();
    let _ = spare.wait();
    seen.map_err(|e| anyhow::anyhow!("{e}\n{}", dp.log_tail()))?;
    assert!(
        dp.log_text().contains(&format!(
            "this control-plane node joined cluster {id_b} after the stream began"
        )),
        "{}",
        dp.log_tail()
    );
    assert_eq!(routed_to(&dp).await.as_deref(), Some("a"));
    assert_eq!(dp.lkg_cluster_id().as_deref(), Some(id_a.as_str()));
    Ok(())
}

/// A control-plane node `id` that is in no cluster yet (data in `dir/name`,
/// log in `dir/name.log`, `more` flags), started and ready.
fn uninitialized_node(
    dir: &std::path::Path,
    id: u64,
    name: &str,
    more: &[&str],
) -> anyhow::Result<(std::process::Child, gatehouse_e2e::Ready)> {
    let mut cmd = Command::new(bin("gatehouse"));
    cmd.args(["control-plane", "--node-id", &id.to_string()])
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--raft-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.join(name))
        .args(more)
        .env("RUST_LOG", "info,openraft=warn")
        .env("GATEHOUSE_BOOTSTRAP_TOKEN", TOKEN);
    spawn_ready(cmd, &dir.join(format!("{name}.log")))
}

/// A data plane started before `cluster init` gets revision 0 (nothing)
/// from the node it watches: it is not ready until the cluster exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_is_not_ready_before_the_cluster_is_initialized() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut node, ready) = uninitialized_node(dir.path(), 1, "node", &[])?;
    let admin = ready.field("admin")?;
    let dp = DataPlaneProc::start("dp-early", std::slice::from_ref(&admin), dir.path())?;
    let connected = format!("control_plane={admin}");
    eventually(
        Duration::from_secs(15),
        "the data plane to watch the node",
        || async {
            dp.log_text()
                .lines()
                .any(|l| l.contains("configuration applied") && l.contains("revision=0"))
                .then_some(())
                .filter(|()| dp.log_text().contains(&connected))
        },
    )
    .await?;
    let readyz = get(&format!("http://{}/readyz", dp.ops), &[]).await?;
    assert_eq!(readyz.status, 503);
    assert_eq!(
        String::from_utf8_lossy(&readyz.body).trim(),
        "not ready: the control plane holds no configuration yet (revision 0: initialize the cluster with `gatehousectl cluster init`)"
    );

    gatehouse_e2e::admin(&admin)
        .await?
        .cluster_init(pb::ClusterInitRequest::default())
        .await?;
    let text = eventually(
        Duration::from_secs(15),
        "the data plane to be ready",
        || async {
            let r = get(&format!("http://{}/readyz", dp.ops), &[]).await.ok()?;
            (r.status == 200).then(|| String::from_utf8_lossy(&r.body).into_owned())
        },
    )
    .await?;
    assert!(text.starts_with("ready: revision "), "{text}");
    let _ = node.kill();
    let _ = node.wait();
    Ok(())
}
