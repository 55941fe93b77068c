//! `gatehouse-bench propagation`: how long a route written through the admin
//! API takes to be served by every data plane.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use gatehouse_e2e::data::{DataPlaneProc, Upstream};
use gatehouse_e2e::{admin, Cluster};
use gatehouse_model::Kind;
use gatehouse_proto::pb;
use hdrhistogram::Histogram;

use crate::load::{Conn, Target};
use crate::{new_histogram, production_options, record};

#[derive(clap::Args)]
pub struct PropagationArgs {
    /// Routes to write, one at a time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    writes: u64,
    /// After both data planes serve a route, wait a pseudo-random 0 to this
    /// many milliseconds before the next write, so the writes do not fall
    /// into step with the control plane's timers.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pause_ms: u64,
    /// Give up on one write's propagation after this many milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=120_000))]
    timeout_ms: u64,
    /// Poll interval of each data plane, milliseconds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    poll_ms: u64,
}

/// The first answer other than 404 from one data plane, measured from the ack.
struct Seen {
    after: Duration,
    status: u16,
}

/// Polls GET `path` on `dp` every `every` until it answers anything but 404,
/// or `deadline` passes; keeps one keep-alive connection, reconnecting if it breaks.
async fn until_served(
    conn: &mut Option<Conn>,
    target: &Target,
    path: &str,
    ack: Instant,
    every: Duration,
    deadline: Instant,
) -> Option<Seen> {
    loop {
        if conn.as_ref().is_none_or(Conn::is_closed) {
            *conn = Conn::open(target.addr).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            let req = http::Request::get(path)
                .header(http::header::HOST, target.authority.as_str())
                .body(http_body_util::Empty::new())
                .expect("a valid request");
            match tokio::time::timeout(Duration::from_secs(2), c.get(req)).await {
                Ok(Ok(status)) if status != http::StatusCode::NOT_FOUND => {
                    return Some(Seen {
                        after: ack.elapsed(),
                        status: status.as_u16(),
                    })
                }
                Ok(Ok(_)) => {}
                _ => *conn = None,
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// A small xorshift generator for the pauses: no need for a crate.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            self.0 % n
        }
    }
}

struct Series {
    name: String,
    hist: Histogram<u64>,
    missed: u64,
}

impl Series {
    fn new(name: String) -> Series {
        Series {
            name,
            hist: new_histogram(),
            missed: 0,
        }
    }

    fn line(&self) -> String {
        let h = &self.hist;
        let q = |q: f64| {
            if h.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", h.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        let max = if h.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", h.max() as f64 / 1000.0)
        };
        format!(
            "| {} | {} | {} | {} | {} | {max} | {} |",
            self.name,
            h.len(),
            q(0.5),
            q(0.99),
            q(0.999),
            self.missed
        )
    }
}

fn route(i: u64) -> pb::Object {
    pb::Object {
        kind: Kind::Route.as_str().into(),
        name: format!("p-{i}"),
        labels: Default::default(),
        revision: 0,
        spec_json: format!(r#"{{"paths":[{{"exact":"/p-{i}"}}],"upstream":"bench"}}"#),
    }
}

pub async fn propagation(args: PropagationArgs) -> Result<()> {
    let options = production_options(10_000);
    eprintln!(
        "propagation: 3 control-plane nodes (heartbeat {} ms, election timeout {} ms), 2 data planes, {} writes, poll every {} ms",
        options.heartbeat_ms, options.election_timeout_ms, args.writes, args.poll_ms
    );
    let cluster = Cluster::start(3, options)
        .await
        .context("start the cluster")?;
    let leader = cluster.leader().await?;
    let follower = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|&id| id != leader)
        .context("a follower")?;
    // dp-1 watches the leader first, dp-2 a follower first; both list every node.
    let order = |first: u64| -> Vec<String> {
        let mut v = vec![cluster.node(first).admin.clone()];
        v.extend(
            cluster
                .nodes
                .iter()
                .filter(|n| n.id != first)
                .map(|n| n.admin.clone()),
        );
        v
    };
    let dir = tempfile::tempdir()?;
    let dps = [
        DataPlaneProc::start("dp-1", &order(leader), dir.path())?,
        DataPlaneProc::start("dp-2", &order(follower), dir.path())?,
    ];
    let upstream = Upstream::start("bench").await?;
    let mut client = admin(&cluster.node(leader).admin).await?;
    let spec = format!(r#"{{"targets":[{{"address":"{}"}}]}}"#, upstream.addr);
    client
        .put(pb::PutRequest {
            object: Some(pb::Object {
                kind: Kind::Upstream.as_str().into(),
                name: "bench".into(),
                labels: Default::default(),
                revision: 0,
                spec_json: spec,
            }),
            expected_revision: None,
        })
        .await
        .map_err(|s| anyhow!("put the upstream: {}", s.message()))?;
    // Both data planes have a configuration before the first timed write.
    for dp in &dps {
        let deadline = Instant::now() + Duration::from_secs(30);
        while dp.ready_status().await != 200 {
            ensure!(
                Instant::now() < deadline,
                "{} never became ready:\n{}",
                dp.name,
                dp.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let targets: Vec<Target> = dps
        .iter()
        .map(|dp| Target::parse(&format!("http://{}/", dp.proxy)))
        .collect::<Result<_>>()?;
    let mut conns: Vec<Option<Conn>> = vec![None, None];
    let mut both = Series::new("both data planes (ack to both serving)".into());
    let mut per_dp = [
        Series::new(format!("dp-1 (watches node {leader}, the leader)")),
        Series::new(format!("dp-2 (watches node {follower}, a follower)")),
    ];
    let mut ack_series = Series::new("put: send to ack (leader)".into());
    let mut odd_status = Vec::new();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()));
    let every = Duration::from_millis(args.poll_ms);
    let begin = Instant::now();
    for i in 0..args.writes {
        let path = format!("/p-{i}");
        let sent = Instant::now();
        client
            .put(pb::PutRequest {
                object: Some(route(i)),
                expected_revision: None,
            })
            .await
            .map_err(|s| anyhow!("put route p-{i}: {}", s.message()))?;
        let ack = Instant::now();
        record(&mut ack_series.hist, ack - sent);
        let deadline = ack + Duration::from_millis(args.timeout_ms);
        let [c1, c2] = &mut conns[..] else {
            unreachable!("two connections")
        };
        let (a, b) = tokio::join!(
            until_served(c1, &targets[0], &path, ack, every, deadline),
            until_served(c2, &targets[1], &path, ack, every, deadline),
        );
        let mut slowest = Some(Duration::ZERO);
        for (k, seen) in [a, b].into_iter().enumerate() {
            match seen {
                Some(s) => {
                    record(&mut per_dp[k].hist, s.after);
                    if s.status != 200 && odd_status.len() < 5 {
                        odd_status.push(format!("dp-{} answered {} for {path}", k + 1, s.status));
                    }
                    slowest = slowest.map(|d| d.max(s.after));
                }
                None => {
                    per_dp[k].missed += 1;
                    slowest = None;
                }
            }
        }
        match slowest {
            Some(d) => record(&mut both.hist, d),
            None => both.missed += 1,
        }
        if args.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(args.pause_ms + 1))).await;
        }
    }
    let elapsed = begin.elapsed();
    eprintln!(
        "propagation: {} writes in {:.1} s",
        args.writes,
        elapsed.as_secs_f64()
    );
    for m in &odd_status {
        eprintln!("  note: {m}");
    }
    println!(
        "{} route writes to the leader; each data plane polled with GET every {} ms on a keep-alive connection",
        args.writes, args.poll_ms
    );
    println!();
    println!("| from the write's acknowledgement | writes | p50 ms | p99 ms | p99.9 ms | max ms | not served within {} ms |", args.timeout_ms);
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("{}", both.line());
    for s in &per_dp {
        println!("{}", s.line());
    }
    println!("{}", ack_series.line());
    drop(upstream);
    drop(dps);
    drop(cluster);
    Ok(())
}
