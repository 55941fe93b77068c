//! Catching up through a snapshot, and a wiped node that must not rejoin silently.

use std::time::Duration;

use gatehouse_e2e::{consumer, ctl, eventually, put, Cluster, Options};

fn small_log() -> Options {
    Options {
        snapshot_every: 20,
        keep_logs: 5,
        ..Options::default()
    }
}

async fn write_many(addr: &str, prefix: &str, count: usize) -> anyhow::Result<u64> {
    let mut last = 0;
    for i in 0..count {
        last = put(addr, consumer(&format!("{prefix}-{i}")))
            .await
            .map_err(|s| anyhow::anyhow!("put {prefix}-{i}: {}", s.message()))?;
    }
    Ok(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_purged_entries_catches_up_by_snapshot() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, small_log()).await?;
    let leader = cluster.leader().await?;
    let lagger = if leader == 3 { 2 } else { 3 };
    write_many(&cluster.node(leader).admin, "early", 5).await?;
    let behind_at = cluster.local_status(lagger).await?.last_log_index;
    cluster.kill(lagger);

    let last = write_many(&cluster.node(leader).admin, "late", 100).await?;
    let purged = eventually(
        Duration::from_secs(20),
        "the leader to purge its log",
        || async {
            let s = cluster.local_status(leader).await.ok()?;
            (s.purged_index > behind_at + 1).then_some(s.purged_index)
        },
    )
    .await?;
    eprintln!("lagger stopped at log index {behind_at}; the leader purged up to {purged}, last write {last}");

    cluster.restart(lagger)?;
    cluster.converge(last).await?;
    let theirs = cluster.objects_on(lagger).await?;
    let ours = cluster.objects_on(leader).await?;
    // 105 consumers, and the bootstrap admin token the leader stored.
    assert_eq!(theirs.len(), 106);
    assert_eq!(theirs, ours, "identical state after catching up");
    let status = cluster.local_status(lagger).await?;
    assert!(
        status.snapshot_index >= purged,
        "it installed a snapshot past the purge point: {status:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_does_not_rejoin_silently() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, Options::default()).await?;
    let leader = cluster.leader().await?;
    let victim = if leader == 3 { 2 } else { 3 };
    write_many(&cluster.node(leader).admin, "before", 10).await?;

    cluster.kill(victim);
    cluster.wipe(victim)?;
    cluster.restart(victim)?;
    let last = write_many(&cluster.node(leader).admin, "after", 10).await?;

    // The cluster says what is wrong with the node, and the node holds nothing.
    let leader_admin = cluster.node(leader).admin.clone();
    let error = eventually(
        Duration::from_secs(20),
        "status to report the wiped node",
        || async {
            let out = ctl(&leader_admin, &["cluster", "status", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let node = v["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["id"] == victim)?
                .clone();
            let error = node["error"].as_str()?.to_string();
            error.contains("wiped or replaced").then_some(error)
        },
    )
    .await?;
    eprintln!("status of the wiped node: {error}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        cluster.objects_on(victim).await?.is_empty(),
        "it took no entries"
    );
    let status = cluster.local_status(victim).await?;
    assert!(
        !status.initialized && status.term == 0,
        "it never joined a term: {status:?}"
    );

    // The operator removes and re-adds it; then it catches up.
    let out = ctl(&leader_admin, &["cluster", "remove", &victim.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (raft, admin) = (
        cluster.node(victim).raft.clone(),
        cluster.node(victim).admin.clone(),
    );
    let out = ctl(
        &leader_admin,
        &[
            "cluster",
            "add",
            &victim.to_string(),
            "--raft-addr",
            &raft,
            "--admin-addr",
            &admin,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.converge(last).await?;
    assert_eq!(
        cluster.objects_on(victim).await?,
        cluster.objects_on(leader).await?
    );
    Ok(())
}
