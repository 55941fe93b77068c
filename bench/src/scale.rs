//! `gatehouse-bench scale`: a control plane loaded with many API keys and
//! routes; the time two data planes take to load it as a full snapshot,
//! their memory, and the propagation of single key creates and revocations
//! (each applied by the data planes as a delta). The scenario itself is
//! `gatehouse_e2e::scale`, which an e2e test also runs at a small size.

use std::time::Duration;

use anyhow::Result;
use gatehouse_e2e::scale::{quantile_ms, run, ScaleSpec};

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// API keys loaded before the timed writes.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    keys: u64,
    /// Consumers the keys are spread over.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    consumers: u64,
    /// Routes loaded (all behind one API-key policy).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    routes: u64,
    /// Control-plane nodes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=7))]
    nodes: u64,
    /// Key creates timed, each followed by the key's revocation.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    writes: u64,
    /// Objects per admin write while loading (at most 100,000 and 16 MiB).
    #[arg(long, default_value_t = 25_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
    /// Give up on one write's propagation after this many milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=120_000))]
    timeout_ms: u64,
    /// How long each data plane may take to load the snapshot, seconds.
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=7200))]
    load_timeout: u64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn row(name: &str, v: &[Duration]) -> String {
    let max = v
        .iter()
        .max()
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    format!(
        "| {name} | {} | {:.2} | {:.2} | {max:.2} |",
        v.len(),
        quantile_ms(v, 0.5),
        quantile_ms(v, 0.99)
    )
}

pub async fn scale(args: ScaleArgs) -> Result<()> {
    let spec = ScaleSpec {
        keys: args.keys,
        consumers: args.consumers,
        routes: args.routes,
        nodes: args.nodes,
        writes: args.writes,
        batch: usize::try_from(args.batch)?,
        timeout: Duration::from_millis(args.timeout_ms),
        load_timeout: Duration::from_secs(args.load_timeout),
    };
    eprintln!(
        "scale: {} control-plane node(s), 2 data planes, {} keys over {} consumers, {} routes, {} timed creates + revocations",
        spec.nodes, spec.keys, spec.consumers, spec.routes, spec.writes
    );
    let r = run(&spec, &|line| eprintln!("scale: {line}")).await?;
    println!(
        "{} API keys ({} consumers), {} routes, {} control-plane node(s); loaded through the admin API in batches of {} in {:.1} s (revision {})",
        spec.keys,
        spec.consumers,
        spec.routes,
        spec.nodes,
        spec.batch,
        r.load.as_secs_f64(),
        r.revision
    );
    println!();
    println!("| data plane | full snapshot: start to serving s | of which compile s | RSS loaded MiB | RSS after writes MiB | (RSS loaded - empty) / key, bytes | delta applies | full applies | mean delta apply µs | last-known-good file MiB | its writes | mean write ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for dp in &r.data_planes {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {:.1} | {} | {:.0} |",
            dp.name,
            dp.snapshot_load.as_secs_f64(),
            dp.full_compile.as_secs_f64(),
            mib(dp.rss_loaded),
            mib(dp.rss_end),
            dp.rss_loaded.saturating_sub(r.rss_empty) as f64 / spec.keys as f64,
            dp.delta_applies,
            dp.full_applies,
            dp.mean_delta_apply.as_secs_f64() * 1e6,
            mib(dp.lkg_bytes),
            dp.lkg_writes,
            dp.mean_lkg_write.as_secs_f64() * 1000.0,
        );
    }
    println!();
    println!(
        "A data plane with no configuration: RSS {:.0} MiB.",
        mib(r.rss_empty)
    );
    println!();
    println!("| from the write's acknowledgement | writes | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "{}",
        row("key create: both data planes accept it", &r.create_both)
    );
    println!(
        "{}",
        row("key revoke: both data planes refuse it", &r.revoke_both)
    );
    for dp in &r.data_planes {
        println!(
            "{}",
            row(&format!("key create: {} accepts", dp.name), &dp.create)
        );
        println!(
            "{}",
            row(&format!("key revoke: {} refuses", dp.name), &dp.revoke)
        );
    }
    println!("{}", row("put: send to ack", &r.ack));
    if r.missed > 0 {
        println!();
        println!(
            "{} changes did not reach both data planes within {} ms.",
            r.missed, args.timeout_ms
        );
    }
    Ok(())
}
