//! Every acknowledged write survives kill -9 of the leader, and of everyone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gatehouse_e2e::{consumer, put, Cluster, Options};

/// What happened to each write of a stream.
#[derive(Default, Debug)]
struct Outcomes {
    /// Acknowledged: (name, revision). These must never be lost.
    acked: Vec<(String, u64)>,
    /// Refused or cut off: may or may not have been applied.
    unknown: Vec<String>,
}

/// Writes consumers named `{prefix}-{i}`, cycling through `addrs`, until
/// `goal` of them are acknowledged: a write that fails (no leader yet) is
/// counted as unknown and the next one follows. So how long an election
/// takes changes how many writes are unknown, not whether the goal is
/// reached; the two-minute bound only stops a cluster that never recovers.
async fn write_stream(
    addrs: Vec<String>,
    prefix: &str,
    goal: usize,
    acks: Arc<AtomicUsize>,
) -> Outcomes {
    let mut out = Outcomes::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut i = 0;
    while out.acked.len() < goal && std::time::Instant::now() < deadline {
        i += 1;
        let name = format!("{prefix}-{i}");
        let addr = &addrs[i % addrs.len()];
        match tokio::time::timeout(Duration::from_secs(10), put(addr, consumer(&name))).await {
            Ok(Ok(revision)) => {
                out.acked.push((name, revision));
                acks.fetch_add(1, Ordering::SeqCst);
            }
            _ => {
                out.unknown.push(name);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    out
}

async fn assert_all_present(cluster: &Cluster, acked: &[(String, u64)]) -> anyhow::Result<()> {
    let max = acked.iter().map(|(_, r)| *r).max().unwrap_or(0);
    cluster.converge(max).await?;
    for node in cluster.nodes.iter().filter(|n| n.is_running()) {
        let objects = cluster.objects_on(node.id).await?;
        for (name, revision) in acked {
            let found = objects.iter().find(|o| o.name() == name);
            assert_eq!(
                found.map(|o| o.revision()),
                Some(*revision),
                "acknowledged write {name} at revision {revision} missing on node {}",
                node.id
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_stream_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, Options::default()).await?;
    let old_leader = cluster.leader().await?;
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.admin.clone()).collect();
    let acks = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_stream(addrs, "stream", 160, acks.clone()));

    while acks.load(Ordering::SeqCst) < 60 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.kill(old_leader);
    let acked_at_kill = acks.load(Ordering::SeqCst);
    let outcomes = writer.await?;
    eprintln!(
        "writes: {} acknowledged ({} before the kill), {} unknown",
        outcomes.acked.len(),
        acked_at_kill,
        outcomes.unknown.len()
    );

    let new_leader = cluster.leader().await?;
    assert_ne!(new_leader, old_leader, "a new leader is elected");
    assert!(
        outcomes.acked.len() > acked_at_kill + 50,
        "writes continue after the kill: {} acked in all, {acked_at_kill} before",
        outcomes.acked.len()
    );
    assert_all_present(&cluster, &outcomes.acked).await?;

    // The old leader comes back as a follower with everything.
    cluster.restart(old_leader)?;
    assert_all_present(&cluster, &outcomes.acked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_node_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, Options::default()).await?;
    cluster.leader().await?;
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.admin.clone()).collect();
    let outcomes = write_stream(addrs, "before-crash", 60, Arc::default()).await;
    assert_eq!(
        outcomes.unknown,
        Vec::<String>::new(),
        "a healthy cluster acknowledges every write"
    );

    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.restart(id)?;
    }
    cluster.leader().await?;
    assert_all_present(&cluster, &outcomes.acked).await
}
