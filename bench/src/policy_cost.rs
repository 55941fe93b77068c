//! `gatehouse-bench policy-cost`: what a policy on a route costs the proxy,
//! measured inside one Gatehouse process. The process serves a plain route
//! and one route per policy under test, all to the same backend; one
//! closed-loop load over one set of keep-alive connections takes the routes
//! in turn, a short slice each (100 ms by default), for minutes; each
//! policy's slice is compared with the plain route's slices just before
//! and after it.
//!
//! `proxies` measures every target in a process of its own, phases seconds
//! apart, and on a shared virtual machine whose speed drifts by a quarter
//! within seconds that hides a cost of a few percent, even over many
//! rounds. Here the routes differ only in their policy (the same process,
//! connections, memory layout and route table) and are measured a tenth of
//! a second apart, thousands of times.

use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::ValueEnum;
use gatehouse_e2e::bin;

use crate::load::{self, target_of_slice, Alternating, Target};
use crate::proxies::{
    apply_retrying, median, median_interval, metric_sum, pin, pin_redis, spawn_standalone,
    start_backend, wait_quiet, wait_serving, Kind, Pinning, Standalone, GATEHOUSE_TARGET,
};

#[derive(clap::Args)]
pub struct PolicyCostArgs {
    /// The policies to measure, each on a route of its own beside the
    /// plain route, named as `proxies --targets` names them:
    /// gatehouse-local, gatehouse-local-no-headers, gatehouse-cluster,
    /// gatehouse-lease, gatehouse-lease-1000,
    /// gatehouse-lease-1000-no-headers, gatehouse-firewall.
    #[arg(
        long,
        value_delimiter = ',',
        action = clap::ArgAction::Set,
        default_value = "gatehouse-local,gatehouse-lease-1000"
    )]
    policies: Vec<Kind>,
    /// Measured seconds (after the warmup).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=3600))]
    duration: u64,
    /// Seconds of the same load before the measured part.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=300))]
    warmup: u64,
    /// Milliseconds of one route's slice. A round is one slice of every
    /// route, in an order of its own.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(20..=10_000))]
    slice_ms: u64,
    /// Milliseconds at the start of each slice that are not counted: the
    /// previous route's requests still in flight end in them.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=5_000))]
    guard_ms: u64,
    /// Keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    connections: u64,
    /// Worker threads of the Gatehouse process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    proxy_threads: u64,
    /// Worker threads of the backend process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    backend_threads: u64,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    client_threads: u64,
    /// Before the load, wait up to this many seconds for the machine to be
    /// quiet (other processes below --quiet-cores); 0 skips the check.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=3600))]
    quiet_wait: u64,
    /// Busy cores, without load from the benchmark, that count as quiet.
    #[arg(long, default_value_t = 0.15)]
    quiet_cores: f64,
    /// Gatehouse on CPUs 0..--proxy-threads, the backend, the load
    /// generator and Redis on the others (`taskset`).
    #[arg(long)]
    pin: bool,
    /// Per-request time limit, milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    timeout_ms: u64,
}

/// Checks the arguments before anything starts: every policy is one this
/// harness can put on a route, named once, and the guard leaves part of
/// each slice to count.
fn check(args: &PolicyCostArgs) -> Result<Vec<Kind>> {
    let mut kinds = args.policies.clone();
    kinds.sort();
    kinds.dedup();
    ensure!(!kinds.is_empty(), "--policies is empty");
    ensure!(
        kinds.len() <= 9,
        "--policies: at most 9 (the route prefixes /r0/../r9/ have one length)"
    );
    for k in &kinds {
        ensure!(
            k.policy("p").is_some(),
            "--policies: {} has no policy of its own to measure (use gatehouse-local, \
             gatehouse-local-no-headers, gatehouse-cluster, gatehouse-lease, \
             gatehouse-lease-1000, gatehouse-lease-1000-no-headers or gatehouse-firewall)",
            k.to_possible_value()
                .map_or_else(|| format!("{k:?}"), |v| v.get_name().to_string())
        );
    }
    ensure!(
        args.guard_ms * 2 <= args.slice_ms,
        "--guard-ms {} leaves less than half of a {} ms slice to count",
        args.guard_ms,
        args.slice_ms
    );
    Ok(kinds)
}

/// The gateway file: one upstream, the plain route `r0` at `/r0/`, and
/// route `rN` at `/rN/` under policy `pN` for the N-th policy. The prefixes
/// have one length, so every route's requests are the same size.
fn gateway_file(kinds: &[Kind], backend: std::net::SocketAddr) -> String {
    let policies: String = kinds
        .iter()
        .enumerate()
        .filter_map(|(i, k)| k.policy(&format!("p{}", i + 1)))
        .collect();
    let mut routes =
        "routes:\n  - name: r0\n    paths:\n      - prefix: /r0/\n    upstream: backend\n"
            .to_string();
    for i in 1..=kinds.len() {
        routes.push_str(&format!(
            "  - name: r{i}\n    paths:\n      - prefix: /r{i}/\n    upstream: backend\n    policy: p{i}\n"
        ));
    }
    format!(
        "version: 1\npolicies:\n{policies}upstreams:\n  - name: backend\n    targets:\n      - address: \"{backend}\"\n{routes}"
    )
}

pub async fn policy_cost(args: PolicyCostArgs) -> Result<()> {
    let kinds = check(&args)?;
    let pinning = Pinning::new(args.pin, args.proxy_threads)?;
    let dir = tempfile::tempdir()?;
    let (backend, backend_addr) = start_backend(dir.path(), args.backend_threads)?;
    if let Some(p) = &pinning {
        pin(backend.pid(), &p.rest)?;
        pin(std::process::id(), &p.rest)?;
    }
    let redis = if kinds.iter().any(|k| k.uses_redis()) {
        let r = gatehouse_e2e::redis::RedisServer::start(dir.path())?;
        if let Some(p) = &pinning {
            pin_redis(&r, &p.rest)?;
        }
        Some(r)
    } else {
        None
    };
    let binary = bin("gatehouse");
    let Standalone {
        mut proc,
        admin,
        proxy,
        ops,
    } = spawn_standalone(
        &binary,
        &dir.path().join("gatehouse"),
        args.proxy_threads,
        redis.as_ref().map(|r| r.url()),
    )?;
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, gateway_file(&kinds, backend_addr))?;
    apply_retrying(&admin, &file).await?;
    let routes: Vec<Option<Kind>> = std::iter::once(None)
        .chain(kinds.iter().copied().map(Some))
        .collect();
    let urls: Vec<String> = (0..routes.len())
        .map(|i| format!("http://{proxy}/r{i}/{GATEHOUSE_TARGET}"))
        .collect();
    for url in &urls {
        wait_serving(url, &[], &mut Some(&mut proc)).await?;
    }
    if let Some(p) = &pinning {
        pin(proc.pid(), &p.proxy)?;
    }

    println!(
        "One `{}` standalone process (TOKIO_WORKER_THREADS={}, --log-level warn){}; \
         backend `gatehouse-bench backend` ({} thread(s)); load generator {} thread(s), \
         {} keep-alive connections, closed loop, taking the routes in turn for {} ms \
         each (the first {} ms of a slice not counted), {} s measured after {} s of \
         the same load.",
        binary.display(),
        args.proxy_threads,
        pinning.as_ref().map_or(String::new(), |p| format!(
            ", pinned to CPU(s) {} (the rest on {})",
            p.proxy, p.rest
        )),
        args.backend_threads,
        args.client_threads,
        args.connections,
        args.slice_ms,
        args.guard_ms,
        args.duration,
        args.warmup,
    );
    println!();
    for (i, kind) in routes.iter().enumerate() {
        let policy = kind
            .and_then(Kind::policy_note)
            .unwrap_or_else(|| "no policy".into());
        println!("- route r{i} (`/r{i}/{GATEHOUSE_TARGET}`): {policy}");
    }
    println!();

    if args.quiet_wait > 0 {
        wait_quiet(Duration::from_secs(args.quiet_wait), args.quiet_cores).await;
    }
    let slice = Duration::from_millis(args.slice_ms);
    let k = routes.len();
    // Whole rounds of warmup and of measurement, and one more round, so
    // that the last measured slices have a plain slice after them.
    let warmup_rounds = (args.warmup * 1000).div_ceil(args.slice_ms * k as u64) as usize;
    let rounds = (args.duration * 1000).div_ceil(args.slice_ms * k as u64) as usize;
    let slices = (warmup_rounds + rounds + 1) * k;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cfg = Alternating {
        targets: urls
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<_>>()?,
        connections: usize::try_from(args.connections)?,
        begin: Instant::now() + Duration::from_millis(500),
        slice,
        guard: Duration::from_millis(args.guard_ms),
        slices,
        timeout: Duration::from_millis(args.timeout_ms),
        threads: args.client_threads as usize,
        stop: stop.clone(),
    };
    let begin = cfg.begin;
    let total = slice * u32::try_from(slices)?;
    let load = tokio::task::spawn_blocking(move || load::run_alternating(cfg));
    let mut next_report = begin + Duration::from_secs(30);
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Err(e) = proc.check_running() {
            // The load would go on against nothing until its end.
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = load.await;
            return Err(e);
        }
        if Instant::now() >= next_report {
            eprintln!(
                "policy-cost: {} s of {} s",
                begin.elapsed().as_secs(),
                total.as_secs()
            );
            next_report += Duration::from_secs(30);
        }
    }
    let result = load.await??;
    proc.check_running()?;
    drop(backend);
    let counted = (slice - Duration::from_millis(args.guard_ms)).as_secs_f64();
    let measured = warmup_rounds * k..(warmup_rounds + rounds) * k;
    report(&routes, &result.ok, measured, slice, counted, result.errors);
    if let Some(r) = &redis {
        // Over the whole run, warmup included: what cost mode asked of
        // Redis. Best effort: the results above stand without it.
        match redis_work(&ops, r).await {
            Ok((requests, calls, waits)) => println!(
                "Over the whole run (warmup included, every route): {requests} requests, \
                 {calls} rate-limit script calls in Redis, {waits} cost-mode requests that \
                 waited for a lease fetch."
            ),
            Err(e) => eprintln!("policy-cost: no Redis figures: {e:#}"),
        }
    }
    Ok(())
}

/// Requests Gatehouse answered, script calls Redis ran, and cost-mode
/// requests that waited for a lease fetch, so far.
async fn redis_work(
    ops: &str,
    redis: &gatehouse_e2e::redis::RedisServer,
) -> Result<(u64, u64, u64)> {
    let metrics = gatehouse_e2e::data::get(&format!("http://{ops}/metrics"), &[]).await?;
    let metrics = String::from_utf8_lossy(&metrics.body);
    Ok((
        metric_sum(&metrics, "gatehouse_requests_total"),
        redis.calls("evalsha")? + redis.calls("eval")?,
        metric_sum(&metrics, "gatehouse_ratelimit_lease_waits_total"),
    ))
}

/// Each policy's slices against the plain route's ([`shares`]), and every
/// route's throughput by block of rounds: `ok` has every slice of the run
/// (in [`target_of_slice`]'s order), `measured` the whole rounds measured.
fn report(
    routes: &[Option<Kind>],
    ok: &[u64],
    measured: Range<usize>,
    slice: Duration,
    counted_secs: f64,
    errors: u64,
) {
    let k = routes.len();
    let of = |r: usize, slices: std::ops::Range<usize>| -> Vec<f64> {
        slices
            .filter(|&i| target_of_slice(i, k) == r)
            .map(|i| ok[i] as f64)
            .collect()
    };
    let label =
        |kind: &Option<Kind>| kind.map_or("Gatehouse (no policy)".into(), |k| k.to_string());
    println!(
        "| route | requests/s (median slice) | throughput vs plain, median share (95 % interval) | total vs plain | slices compared |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (r, kind) in routes.iter().enumerate() {
        let own = of(r, measured.clone());
        let rps = median(&own).map_or("-".into(), |c| format!("{:.0}", c / counted_secs));
        if r == 0 {
            println!("| {} | {rps} | - | - | {} |", label(kind), own.len());
            continue;
        }
        let (shares, total) = shares(ok, measured.clone(), k, r);
        println!(
            "| {} | {rps} | {} | {total:.3} | {} |",
            label(kind),
            with_interval(&shares),
            shares.len()
        );
    }
    println!();
    println!("Errors (non-2xx and transport) over the whole run: {errors}.");
    println!();
    // By minute (or less, for a short run): drift, and whether a share held.
    let per_block = (60_000 / slice.as_millis().max(1) as usize / k).max(1) * k;
    println!(
        "By block of {} rounds: each route's requests/s, and its total over plain's total in the block (no interpolation).",
        per_block / k
    );
    println!();
    let header: Vec<String> = routes.iter().map(label).collect();
    println!("| rounds | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(k));
    for start in measured.clone().step_by(per_block) {
        let end = (start + per_block).min(measured.end);
        let plain = of(0, start..end);
        let cells: Vec<String> = (0..k)
            .map(|r| {
                let own = of(r, start..end);
                let rps = own.iter().sum::<f64>() / own.len().max(1) as f64 / counted_secs;
                if r == 0 {
                    format!("{rps:.0}")
                } else {
                    let share = own.iter().sum::<f64>()
                        / own.len().max(1) as f64
                        / (plain.iter().sum::<f64>() / plain.len().max(1) as f64).max(1.0);
                    format!("{rps:.0} ({share:.3})")
                }
            })
            .collect();
        println!(
            "| {}-{} | {} |",
            (start - measured.start) / k + 1,
            (end - measured.start) / k,
            cells.join(" | ")
        );
    }
}

/// Route `r`'s share of the plain route's throughput, slice by slice: each
/// of its slices in `measured` (`ok` has every slice of a load over `k`
/// routes, plain the first, in [`target_of_slice`]'s order) over the plain
/// count expected at its place, on the line between the plain slices just
/// before and after it (which may lie outside `measured`; a slice without
/// both is left out). Also the share over the whole run (its total over
/// the expected total).
fn shares(ok: &[u64], measured: Range<usize>, k: usize, r: usize) -> (Vec<f64>, f64) {
    let plain: Vec<usize> = (0..ok.len())
        .filter(|&i| target_of_slice(i, k) == 0)
        .collect();
    let mut own_total = 0.0;
    let mut expected_total = 0.0;
    let mut shares = Vec::new();
    for pair in plain.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let (before, after) = (ok[a] as f64, ok[b] as f64);
        for i in (a + 1..b).filter(|&i| measured.contains(&i) && target_of_slice(i, k) == r) {
            let expected = before + (after - before) * (i - a) as f64 / (b - a) as f64;
            own_total += ok[i] as f64;
            expected_total += expected;
            if expected > 0.0 {
                shares.push(ok[i] as f64 / expected);
            }
        }
    }
    (shares, own_total / expected_total.max(1.0))
}

/// `median (low-high)`, or the median alone when there are too few values
/// for an interval.
fn with_interval(values: &[f64]) -> String {
    let Some(m) = median(values) else {
        return "-".into();
    };
    match median_interval(values) {
        Some((lo, hi)) => format!("{m:.3} ({lo:.3}-{hi:.3})"),
        None => format!("{m:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The command line as `gatehouse-bench` parses it.
    fn parse(args: &[&str]) -> Result<PolicyCostArgs, clap::Error> {
        let cli =
            crate::Cli::try_parse_from(["gatehouse-bench", "policy-cost"].iter().chain(args))?;
        match cli.command {
            crate::Cmd::PolicyCost(args) => Ok(args),
            _ => panic!("not the policy-cost command"),
        }
    }

    #[test]
    fn only_policies_the_harness_can_put_on_a_route_are_taken() {
        let args = parse(&["--policies", "gatehouse-lease-1000,gatehouse-local"]).unwrap();
        assert_eq!(
            check(&args).unwrap(),
            [Kind::GatehouseLocal, Kind::GatehouseLease1000]
        );
        let args = parse(&["--policies", "gatehouse-local,nginx"]).unwrap();
        let e = check(&args).unwrap_err().to_string();
        assert!(e.contains("--policies: nginx has no policy"), "{e}");
        assert!(parse(&["--slice-ms", "10"]).is_err());
        let args = parse(&["--slice-ms", "50", "--guard-ms", "30"]).unwrap();
        let e = check(&args).unwrap_err().to_string();
        assert!(e.contains("--guard-ms 30 leaves less than half"), "{e}");
    }

    #[test]
    fn a_later_flag_overrides_the_scripts_earlier_one() {
        let args = parse(&[
            "--duration",
            "300",
            "--slice-ms",
            "100",
            "--policies",
            "gatehouse-local",
            "--duration",
            "20",
            "--policies",
            "gatehouse-lease-1000",
        ])
        .unwrap();
        assert_eq!((args.duration, args.slice_ms), (20, 100));
        assert_eq!(args.policies, [Kind::GatehouseLease1000]);
    }

    /// A machine that speeds up steadily through the run: each policy's
    /// share comes out exact, whatever its distance from the plain slices.
    #[test]
    fn a_share_is_taken_against_the_plain_throughput_at_its_place() {
        // Three routes; plain would serve 1000 + 100 i in slice i; route 1
        // serves 90 % of that, route 2 all of it.
        let k = 3;
        let ok: Vec<u64> = (0..33u64)
            .map(|i| {
                let plain = 1000 + 100 * i;
                match target_of_slice(i as usize, k) {
                    1 => plain * 9 / 10,
                    _ => plain,
                }
            })
            .collect();
        // Rounds 1..9 measured: round 0 and round 10 give the plain slices
        // around them; a slice of round 9 after its plain one compares
        // with round 10's.
        let (s1, total1) = shares(&ok, 3..30, k, 1);
        let (s2, total2) = shares(&ok, 3..30, k, 2);
        assert_eq!((s1.len(), s2.len()), (9, 9), "{s1:?} {s2:?}");
        assert!(s1.iter().all(|s| (s - 0.9).abs() < 1e-3), "{s1:?}");
        assert!(s2.iter().all(|s| (s - 1.0).abs() < 1e-9), "{s2:?}");
        assert!((total1 - 0.9).abs() < 1e-3 && (total2 - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_gateway_file_puts_each_policy_on_a_route_of_its_own() {
        let backend = "127.0.0.1:9".parse().unwrap();
        let file = gateway_file(
            &[Kind::GatehouseLocal, Kind::GatehouseLease1000NoHeaders],
            backend,
        );
        // What `gatehousectl validate` runs: the state machine's own checks.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, &file).unwrap();
        let loaded = gatehouse_model::file::Loaded::read(&path).unwrap();
        gatehouse_model::ConfigState::default()
            .apply(1, &loaded.to_command())
            .unwrap();
        assert!(
            file.contains("prefix: /r0/\n    upstream: backend\n  - name: r1"),
            "{file}"
        );
        assert!(
            file.contains("prefix: /r2/\n    upstream: backend\n    policy: p2\n"),
            "{file}"
        );
        assert!(
            file.contains("  - name: p2\n    rate_limit_headers: false\n"),
            "{file}"
        );
    }
}
