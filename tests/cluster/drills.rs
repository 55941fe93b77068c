//! Failure drills: real control-plane processes whose links to each other
//! go through fault-injecting proxies (`gatehouse_e2e::faults`), concurrent
//! clients whose history must be linearizable, and a data plane serving
//! throughout. Each drill prints its figures on lines starting `DRILL`
//! (`cargo test -p gatehouse-e2e --test cluster drills -- --nocapture`);
//! `docs/operations.md` ("Failure drills") has them from a run.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use gatehouse_e2e::data::get;
use gatehouse_e2e::drill::{
    finish, read, register, Edge, Figures, Poller, ReadResult, Traffic, Workload,
};
use gatehouse_e2e::faults::Fault;
use gatehouse_e2e::linearizability::{check, History, Op};
use gatehouse_e2e::{admin, consumer, ctl, eventually, put, Cluster, Options};

const WAIT: Duration = Duration::from_secs(30);

fn faulty() -> Options {
    Options {
        faulty_network: true,
        ..Options::default()
    }
}

/// A put that gives up after 2 s: `Some(revision)` when acknowledged.
async fn try_put(addr: &str, object: gatehouse_proto::pb::Object) -> Option<u64> {
    tokio::time::timeout(Duration::from_secs(2), put(addr, object))
        .await
        .ok()?
        .ok()
}

/// Waits until clients of the nodes in `nodes` had `n` writes acknowledged
/// that were sent after history time `since`.
async fn progress(work: &Workload, nodes: &[u64], since: u64, n: usize) -> Result<()> {
    eventually(WAIT, "writes acknowledged by the majority", || async {
        let acked: usize = nodes
            .iter()
            .map(|node| work.acked_by(*node, since, u64::MAX))
            .sum();
        (acked >= n).then_some(())
    })
    .await
}

/// The drill's common start: a cluster of three on a faulty network (or
/// not), one data plane with traffic, the poller, and two clients per node.
async fn start(options: Options) -> Result<(Cluster, Edge, Traffic, Poller, Workload)> {
    let cluster = Cluster::start(3, options).await?;
    let edge = Edge::start(&cluster, 1, "").await?;
    let traffic = Traffic::start(
        format!("http://{}/drill/x", edge.dps[0].proxy),
        Vec::new(),
        200,
    );
    let poller = Poller::start(&cluster);
    let work = Workload::start(&cluster, &[1, 2, 3], 2, 3);
    // Some history before the fault.
    progress(&work, &[1, 2, 3], 0, 10).await?;
    Ok((cluster, edge, traffic, poller, work))
}

fn others(old: u64) -> Vec<u64> {
    (1..=3).filter(|n| *n != old).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_minority_partition_never_acknowledges_a_write() -> Result<()> {
    let (cluster, _edge, mut traffic, mut poller, mut work) = start(faulty()).await?;
    let mut figures = Figures {
        name: "minority partition".into(),
        ..Figures::default()
    };
    let old = cluster.leader().await?;
    let majority = others(old);
    let before = put(&cluster.node(old).admin, register("probe", "before")).await?;

    // The leader alone on one side: every connection to it is closed.
    let cut = Instant::now();
    let cut_at = work.history.now();
    cluster.net().partition(&[old], &majority, Fault::Drop);
    let (took, new, term) = eventually(WAIT, "a leader in the majority", || async {
        poller.new_leader_after(cut, old)
    })
    .await?;
    figures.time_to_new_leader = Some(took);
    figures
        .notes
        .push(format!("node {old} cut off; node {new} leads term {term}"));
    progress(&work, &majority, cut_at, 10).await?;

    // The minority answers a stale read with what it had, refuses a
    // linearizable one, and the checker rejects a history holding that
    // stale read: the check has teeth on this very cluster's answers.
    let probe = History::default();
    probe.ok(0, "probe", Op::Write("before".into()), 0);
    let call = probe.now();
    let after = put(&cluster.node(new).admin, register("probe", "after")).await?;
    probe.ok(0, "probe", Op::Write("after".into()), call);
    let mut minority = admin(&cluster.node(old).admin).await?;
    let call = probe.now();
    let ReadResult::Value(stale) = read(&mut minority, "probe", true).await else {
        anyhow::bail!("stale read on the minority failed");
    };
    probe.ok(1, "probe", Op::Read(stale.clone()), call);
    ensure!(stale.as_deref() == Some("before"), "{stale:?}");
    ensure!(
        check(&probe.events()).is_err(),
        "a stale read passed the checker"
    );
    if let ReadResult::Value(v) = read(&mut minority, "probe", false).await {
        anyhow::bail!("the minority answered a linearizable read: {v:?}");
    }
    figures.notes.push(format!(
        "probe written at revision {before}, then {after} in the majority; the minority's stale read saw {stale:?} and the checker rejected it; its linearizable read failed"
    ));

    let healed_at = work.history.now();
    let by_minority = work.acked_by(old, cut_at, healed_at);
    cluster.net().heal();
    figures.notes.push(format!(
        "writes acknowledged through the minority node during the partition: {by_minority}; through the majority: {}",
        majority
            .iter()
            .map(|n| work.acked_by(*n, cut_at, healed_at))
            .sum::<usize>()
    ));
    (figures.dp_requests, figures.dp_failed) = traffic.stop().await;
    finish(&cluster, &mut work, &mut poller, &mut figures).await?;
    ensure!(
        by_minority == 0,
        "the minority acknowledged {by_minority} writes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_majority_partition_heal_truncates_uncommitted_entries() -> Result<()> {
    let (cluster, _edge, mut traffic, mut poller, mut work) = start(faulty()).await?;
    let mut figures = Figures {
        name: "majority partition heal".into(),
        ..Figures::default()
    };
    let old = cluster.leader().await?;
    let majority = others(old);
    let at_cut = cluster.local_status(old).await?;

    // Silently: the old leader's messages vanish, and so do the majority's.
    let cut = Instant::now();
    let cut_at = work.history.now();
    cluster.net().partition(&[old], &majority, Fault::Blackhole);
    // Writes only the old leader hears of: appended to its log, never committed.
    let mut orphans_acked = 0;
    for i in 0..5 {
        let name = format!("orphan-{i}");
        if try_put(&cluster.node(old).admin, register(&name, "x"))
            .await
            .is_some()
        {
            orphans_acked += 1;
        }
    }
    let (took, new, term) = eventually(WAIT, "a leader in the majority", || async {
        poller.new_leader_after(cut, old)
    })
    .await?;
    figures.time_to_new_leader = Some(took);
    let stranded = eventually(WAIT, "uncommitted entries on the old leader", || async {
        let s = poller.last_of(old)?;
        (s.last_log_index >= at_cut.last_log_index + 5).then_some(s)
    })
    .await?;
    progress(&work, &majority, cut_at, 10).await?;
    let healed_at = work.history.now();
    let by_minority = work.acked_by(old, cut_at, healed_at);
    cluster.net().heal();

    // The old leader follows the new one, and its entries are gone.
    let old_log = stranded.last_log_index;
    (figures.dp_requests, figures.dp_failed) = traffic.stop().await;
    finish(&cluster, &mut work, &mut poller, &mut figures).await?;
    let mut survived = Vec::new();
    for node in &cluster.nodes {
        let mut c = admin(&node.admin).await?;
        for i in 0..5 {
            if let ReadResult::Value(Some(v)) = read(&mut c, &format!("orphan-{i}"), true).await {
                survived.push((node.id, i, v));
            }
        }
    }
    let after = cluster.local_status(old).await?;
    figures.notes.push(format!(
        "node {old} led term {} with log {}..={old_log} not committed (applied {}); node {new} took over in term {term}; after the heal node {old} is a {} in term {} at log {}; orphan writes acknowledged {orphans_acked}, surviving {}; writes acknowledged through the old leader during the partition {by_minority}",
        at_cut.term,
        at_cut.last_log_index + 1,
        stranded.last_applied,
        after.role,
        after.term,
        after.last_log_index,
        survived.len()
    ));
    if let Some(n) = figures.notes.last() {
        eprintln!("DRILL {}:   {n}", figures.name);
    }
    ensure!(
        orphans_acked == 0 && by_minority == 0 && survived.is_empty(),
        "the minority acknowledged writes ({orphans_acked} orphans, {by_minority} others), or uncommitted writes survived: {survived:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_leader_paused_past_the_election_timeout() -> Result<()> {
    let (cluster, _edge, mut traffic, mut poller, mut work) = start(faulty()).await?;
    let mut figures = Figures {
        name: "leader SIGSTOP/SIGCONT".into(),
        ..Figures::default()
    };
    let old = cluster.leader().await?;
    let old_term = cluster.local_status(old).await?.term;
    let paused = Instant::now();
    cluster.pause(old)?;
    let (took, new, term) = eventually(WAIT, "a new leader", || async {
        poller.new_leader_after(paused, old)
    })
    .await?;
    figures.time_to_new_leader = Some(took);
    progress(&work, &others(old), work.history.now(), 10).await?;
    // Paused for at least 3 s: over twice the largest election timeout (1.4 s).
    let rest = Duration::from_secs(3).saturating_sub(paused.elapsed());
    tokio::time::sleep(rest).await;
    let stopped_for = paused.elapsed();
    let resumed = Instant::now();
    cluster.resume(old)?;
    // It wakes up believing it leads term `old_term`; it must learn otherwise.
    let woke = eventually(WAIT, "the old leader to answer again", || async {
        poller
            .samples()
            .into_iter()
            .find(|s| s.node == old && s.at >= resumed)
    })
    .await?;
    let agreed = cluster.leader().await?;
    figures.notes.push(format!(
        "node {old} led term {old_term}, stopped for {} ms; node {new} led term {term} after {} ms; first status after SIGCONT: {} in term {}; the cluster then agreed on node {agreed}",
        stopped_for.as_millis(),
        took.as_millis(),
        woke.role,
        woke.term
    ));
    (figures.dp_requests, figures.dp_failed) = traffic.stop().await;
    finish(&cluster, &mut work, &mut poller, &mut figures).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_one_way_partitions() -> Result<()> {
    let (cluster, _edge, mut traffic, mut poller, mut work) = start(faulty()).await?;
    let mut figures = Figures {
        name: "one-way partition".into(),
        ..Figures::default()
    };
    for (phase, leader_to_follower) in [("leader -> follower", true), ("follower -> leader", false)]
    {
        let leader = cluster.leader().await?;
        let follower = others(leader)[0];
        let (src, dst) = if leader_to_follower {
            (leader, follower)
        } else {
            (follower, leader)
        };
        let started = Instant::now();
        let since = work.history.now();
        let term_before = cluster.local_status(leader).await?.term;
        let applied_before = cluster.local_status(follower).await?.last_applied;
        cluster.net().set(src, dst, Fault::Blackhole);
        // The cluster keeps taking writes through the nodes that can talk.
        let third: Vec<u64> = (1..=3).filter(|n| *n != follower).collect();
        progress(&work, &third, since, 10).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let terms: Vec<u64> = poller
            .samples()
            .into_iter()
            .filter(|s| s.at >= started)
            .map(|s| s.term)
            .collect();
        let new_leader = poller.new_leader_after(started, leader);
        let applied = |node: u64| poller.last_of(node).map_or(0, |s| s.last_applied);
        let (f_applied, l_applied) = (applied(follower), applied(leader));
        let led: Vec<u64> = poller
            .samples()
            .into_iter()
            .filter(|s| s.at >= started && s.role == "leader")
            .map(|s| s.term)
            .collect();
        cluster.net().heal();
        figures.notes.push(format!(
            "{phase} ({src} -> {dst}) black-holed for {} ms: terms seen {}..={} (node {leader} led term {term_before} before, and terms {:?} during); another node leading: {}; node {follower} applied {applied_before} -> {f_applied} while node {leader} reached {l_applied}",
            started.elapsed().as_millis(),
            terms.iter().min().unwrap_or(&0),
            terms.iter().max().unwrap_or(&0),
            led.iter().collect::<std::collections::BTreeSet<_>>(),
            new_leader.map_or("none".to_string(), |(d, n, t)| format!("node {n} in term {t} after {} ms", d.as_millis()))
        ));
        if figures.time_to_new_leader.is_none() {
            figures.time_to_new_leader = new_leader.map(|(d, _, _)| d);
        }
    }
    (figures.dp_requests, figures.dp_failed) = traffic.stop().await;
    finish(&cluster, &mut work, &mut poller, &mut figures).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_follower_black_holed_until_it_needs_a_snapshot() -> Result<()> {
    let (cluster, _edge, mut traffic, mut poller, mut work) = start(Options {
        snapshot_every: 20,
        keep_logs: 5,
        ..faulty()
    })
    .await?;
    let mut figures = Figures {
        name: "follower needs a snapshot".into(),
        ..Figures::default()
    };
    let leader = cluster.leader().await?;
    let follower = others(leader)[0];
    let rest = others(follower);
    let at_cut = cluster.local_status(follower).await?;
    let installs = || {
        cluster
            .node(follower)
            .log_text()
            .matches("installed a snapshot from the leader")
            .count()
    };
    let installs_before = installs();
    cluster
        .net()
        .partition(&[follower], &rest, Fault::Blackhole);
    // Until the leader purged the log the follower would need next.
    let purged = eventually(WAIT, "the leader to purge past the follower", || async {
        let s = poller.last_of(leader)?;
        (s.purged_index > at_cut.last_log_index + 1).then_some(s.purged_index)
    })
    .await?;
    let target = cluster.local_status(leader).await?.last_applied;
    let healed = Instant::now();
    cluster.net().heal();
    let caught_up = eventually(WAIT, "the follower to catch up", || async {
        let s = poller.last_of(follower)?;
        (s.at > healed && s.last_applied >= target).then_some(s)
    })
    .await?;
    figures.notes.push(format!(
        "node {follower} cut off at log {}; the leader purged up to {purged}; after the heal node {follower} (snapshot at {}) applied {} within {} ms",
        at_cut.last_log_index,
        caught_up.snapshot_index,
        caught_up.last_applied,
        (caught_up.at - healed).as_millis()
    ));
    (figures.dp_requests, figures.dp_failed) = traffic.stop().await;
    finish(&cluster, &mut work, &mut poller, &mut figures).await?;
    // Its own snapshots (every 20 entries) say nothing: its log says whether
    // it was sent the leader's.
    ensure!(
        installs() > installs_before,
        "node {follower} caught up without installing the leader's snapshot"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_all_control_plane_nodes_down() -> Result<()> {
    let mut cluster = Cluster::start(3, Options::default()).await?;
    let mut figures = Figures {
        name: "all control-plane nodes down".into(),
        ..Figures::default()
    };
    let edge = Edge::start(
        &cluster,
        2,
        "  - name: secure
    paths: [{ prefix: /secure }]
    upstream: drill-app
    policy: keyed
  - name: limited
    paths: [{ prefix: /limited }]
    upstream: drill-app
    policy: limited
consumers:
  - name: acme
    groups: [gold]
policies:
  - name: keyed
    authentication: [api_key]
    authorization: { groups: [gold] }
  - name: limited
    rate_limits:
      - name: per-ip
        key: [client_ip]
        limit: 5
        window: 1h
",
    )
    .await?;
    let leader = cluster.leader().await?;
    let out = ctl(
        &cluster.node(leader).admin,
        &["keys", "create", "--consumer", "acme"],
    );
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout)?.trim().to_string();
    let mut traffic = Vec::new();
    for dp in &edge.dps {
        let base = format!("http://{}", dp.proxy);
        eventually(WAIT, "the key to reach the data plane", || async {
            let r = get(&format!("{base}/secure/x"), &[("x-api-key", &key)])
                .await
                .ok()?;
            (r.status == 200).then_some(())
        })
        .await?;
        traffic.push(Traffic::start(format!("{base}/drill/x"), Vec::new(), 200));
        traffic.push(Traffic::start(
            format!("{base}/secure/x"),
            vec![("x-api-key".into(), key.clone())],
            200,
        ));
        traffic.push(Traffic::start(format!("{base}/secure/x"), Vec::new(), 401));
    }
    let mut poller = Poller::start(&cluster);
    let mut work = Workload::start(&cluster, &[1, 2, 3], 2, 3);
    progress(&work, &[1, 2, 3], 0, 10).await?;

    let before: Vec<(u64, u64)> = traffic.iter().map(Traffic::counts).collect();
    let lines_before: Vec<usize> = edge
        .dps
        .iter()
        .map(|dp| dp.log_text().matches("config stream interrupted").count())
        .collect();
    let down = Instant::now();
    for id in 1..=3 {
        cluster.kill(id);
    }
    // Every data plane keeps enforcing its last configuration: keys, and
    // limits (5 an hour per address: the sixth request is refused).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut limited = Vec::new();
    for dp in &edge.dps {
        let mut statuses = Vec::new();
        for _ in 0..7 {
            statuses.push(
                get(&format!("http://{}/limited/x", dp.proxy), &[])
                    .await?
                    .status,
            );
        }
        limited.push(statuses);
    }
    // The rest of the outage: two minutes in all unless
    // GATEHOUSE_DRILL_OUTAGE_SECS says otherwise (at least 10 s).
    let outage = std::env::var("GATEHOUSE_DRILL_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(120)
        .max(10);
    tokio::time::sleep(Duration::from_secs(outage).saturating_sub(down.elapsed())).await;
    let during: Vec<(u64, u64)> = traffic.iter().map(Traffic::counts).collect();
    let down_for = down.elapsed();
    let attempts: Vec<usize> = edge
        .dps
        .iter()
        .zip(&lines_before)
        .map(|(dp, b)| dp.log_text().matches("config stream interrupted").count() - b)
        .collect();

    let up = Instant::now();
    for id in 1..=3 {
        cluster.restart(id)?;
    }
    let leader = cluster.leader().await?;
    let leader_after = up.elapsed();
    // The data planes come back to the stream: a change reaches both.
    let revision = put(&cluster.node(leader).admin, consumer("late")).await?;
    let reconnected = eventually(WAIT, "both data planes on the stream again", || async {
        let mut seen = 0;
        for node in &cluster.nodes {
            let s = cluster.local_status(node.id).await.ok()?;
            seen += s
                .data_planes
                .iter()
                .filter(|d| d.applied_revision >= revision)
                .count();
        }
        (seen >= edge.dps.len()).then(|| up.elapsed())
    })
    .await?;

    let mut sent = 0;
    let mut failed_down = 0;
    let mut failures = Vec::new();
    for ((t, b), d) in traffic.iter_mut().zip(&before).zip(&during) {
        failed_down += d.1 - b.1;
        failures.extend(t.failures.lock().unwrap().clone());
        let (s, f) = t.stop().await;
        sent += s;
        figures.dp_failed += f;
    }
    figures.dp_requests = sent;
    let during_sent: u64 = during.iter().zip(&before).map(|(d, b)| d.0 - b.0).sum();
    figures.notes.push(format!(
        "all three nodes down for {} ms: {during_sent} requests through 2 data planes (open, API key, no key), {failed_down} failed; the limited route answered {limited:?}; config-stream reconnect attempts while down per data plane: {attempts:?}",
        down_for.as_millis()
    ));
    figures.notes.push(format!(
        "restart: a leader after {} ms, both data planes acknowledged revision {revision} after {} ms",
        leader_after.as_millis(),
        reconnected.as_millis()
    ));
    finish(&cluster, &mut work, &mut poller, &mut figures).await?;
    ensure!(
        failed_down == 0,
        "{failed_down} requests failed while the control plane was down: {failures:?}"
    );
    for statuses in &limited {
        ensure!(
            statuses.iter().all(|s| *s == 200 || *s == 429)
                && statuses.contains(&200)
                && statuses.ends_with(&[429]),
            "the rate limit while the control plane was down: {statuses:?}"
        );
    }
    Ok(())
}
