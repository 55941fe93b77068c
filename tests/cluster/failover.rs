//! What an operator's `gatehousectl` sees while the cluster has no leader.

use std::time::Instant;

use gatehouse_e2e::{consumer, ctl, put, Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_out_an_election_and_fail_clearly_without_a_quorum() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, Options::default()).await?;
    let leader = cluster.leader().await?;
    put(&cluster.node(leader).admin, consumer("survivor")).await?;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();

    // Right after the leader dies, a follower has no leader for a while: the
    // CLI waits for the election instead of failing.
    cluster.kill(leader);
    let out = ctl(&cluster.node(followers[0]).admin, &["get", "consumers"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("survivor"), "{stdout}");

    // Without a quorum it gives up after --timeout with the reason.
    cluster.kill(followers[0]);
    let started = Instant::now();
    let out = ctl(
        &cluster.node(followers[1]).admin,
        &["--timeout", "3", "get", "consumers"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Either no leader is known, or the one it knew cannot be reached.
    assert!(
        stderr.starts_with("waiting for the cluster:") && stderr.contains("leader"),
        "{stderr}"
    );
    eprintln!("gave up after {:?}: {}", started.elapsed(), stderr.trim());

    // A stale read still answers from the node's own state.
    let out = ctl(
        &cluster.node(followers[1]).admin,
        &["get", "consumers", "--stale"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("survivor"));
    Ok(())
}
