//! Backups and upgrades: `gatehousectl snapshot save/restore`, and a rolling
//! restart of the control plane that fails no write and no request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::{apply, consumer, ctl, eventually, Cluster, Options};
use gatehouse_proto::pb;

fn gateway(upstream: &str) -> String {
    format!(
        "version: 1
upstreams:
  - name: app
    targets: [{{ address: \"{upstream}\" }}]
consumers:
  - name: acme
policies:
  - name: keys
    authentication: [api_key]
routes:
  - name: open
    paths: [{{ prefix: /open }}]
    upstream: app
  - name: guarded
    paths: [{{ prefix: /guarded }}]
    upstream: app
    policy: keys
"
    )
}

/// Every object of a node as JSON, without revisions (they differ after a restore).
fn objects(server: &str) -> serde_json::Value {
    let out = ctl(server, &["get", "all", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("revision");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut all);
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_onto_a_new_cluster_and_a_damaged_one_changes_nothing(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let old = Cluster::start(1, Options::default()).await?;
    let at_old = old.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, gateway(&upstream.addr.to_string()))?;
    apply(&at_old, file.to_str().unwrap());
    let key = ctl(&at_old, &["keys", "create", "--consumer", "acme"]);
    assert!(key.status.success());
    let key = String::from_utf8(key.stdout)?.trim().to_string();
    let viewer = ctl(
        &at_old,
        &["tokens", "create", "grafana", "--role", "viewer"],
    );
    assert!(viewer.status.success());

    let backup = dir.path().join("backup.json");
    let backup_arg = backup.to_str().unwrap();
    let saved = ctl(&at_old, &["snapshot", "save", backup_arg]);
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&backup)?.permissions().mode() & 0o777,
            0o600
        );
    }

    let new = Cluster::start(1, Options::default()).await?;
    let at_new = new.node(1).admin.clone();
    let before = new.local_status(1).await?.config_revision;

    // A damaged file is refused before anything is sent.
    let text = std::fs::read_to_string(&backup)?;
    let damaged = dir.path().join("damaged.json");
    std::fs::write(&damaged, text.replacen("\"acme\"", "\"acmf\"", 1))?;
    let out = ctl(&at_new, &["snapshot", "restore", damaged.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum does not match"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(new.local_status(1).await?.config_revision, before);

    let out = ctl(&at_new, &["snapshot", "restore", backup_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(objects(&at_new), objects(&at_old));
    // Restoring twice is refused: the cluster is no longer empty.
    let out = ctl(&at_new, &["snapshot", "restore", backup_arg]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds"));

    // The restored cluster serves: the old cluster's API key gets in.
    let dp = DataPlaneProc::start("dp-1", std::slice::from_ref(&at_new), dir.path())?;
    let url = format!("http://{}/guarded/x", dp.proxy);
    eventually(
        Duration::from_secs(10),
        "the restored key accepted",
        || async {
            let r = get(&url, &[("x-api-key", &key)]).await.ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await?;
    assert_eq!(get(&url, &[]).await?.status, 401);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_fails_no_write_and_no_request() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(3, Options::default()).await?;
    let servers: Vec<String> = (1..=3).map(|i| cluster.node(i).admin.clone()).collect();
    let upstream = Upstream::start("app").await?;
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, gateway(&upstream.addr.to_string()))?;
    apply(&servers[0], file.to_str().unwrap());
    let dp = DataPlaneProc::start("dp-1", &servers, dir.path())?;
    let url = format!("http://{}/open/x", dp.proxy);
    eventually(Duration::from_secs(10), "the route served", || async {
        (get(&url, &[]).await.ok()?.status == 200).then_some(())
    })
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    // A writer that retries each write, on any node, until it is acknowledged.
    let writer = {
        let (stop, servers) = (stop.clone(), servers.clone());
        tokio::spawn(async move {
            let (mut acked, mut retries, mut i) = (0u64, 0u64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let name = format!("c-{acked}");
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    let server = &servers[i % servers.len()];
                    let done = match gatehouse_e2e::admin(server).await {
                        Ok(mut c) => c
                            .put(pb::PutRequest {
                                object: Some(consumer(&name)),
                                expected_revision: None,
                            })
                            .await
                            .is_ok(),
                        Err(_) => false,
                    };
                    if done {
                        acked += 1;
                        break;
                    }
                    retries += 1;
                    i += 1;
                    if std::time::Instant::now() > deadline {
                        return (acked, retries, Some(name));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            (acked, retries, None)
        })
    };
    // A client of the data plane, counting failed requests.
    let failed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let client = {
        let (stop, failed, sent, url) = (stop.clone(), failed.clone(), sent.clone(), url.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                if !matches!(get(&url, &[]).await, Ok(r) if r.status == 200) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let started = std::time::Instant::now();
    for id in 1..=3 {
        assert!(cluster.stop(id)?, "node {id} shut down cleanly on SIGTERM");
        cluster.start_again(id)?;
        cluster.leader().await?;
        let revision = cluster
            .local_status(cluster.leader().await?)
            .await?
            .last_applied;
        cluster.converge(revision).await?;
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, retries, stuck) = writer.await?;
    client.await?;
    eprintln!(
        "rolling restart of 3 nodes in {:?}: {acked} writes acknowledged ({retries} retries), {} of {} data-plane requests failed",
        started.elapsed(),
        failed.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed)
    );
    assert_eq!(stuck, None, "a write was never acknowledged");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "data-plane requests failed"
    );
    assert!(acked > 0);
    // Every acknowledged write is there.
    let leader = cluster.leader().await?;
    let names: Vec<String> = cluster
        .objects_on(leader)
        .await?
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    for i in 0..acked {
        assert!(names.contains(&format!("c-{i}")), "write c-{i} was lost");
    }
    Ok(())
}
