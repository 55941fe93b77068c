//! `gatehouse-bench firewall-cost`: the CPU time the firewall's content
//! rules (user agents, the injection pattern sets) add to one request, with
//! the rules off and with the default rule set, on requests shaped like the
//! proxy benchmark's and larger ones. Single-threaded, in process: the best
//! of several rounds, which on a shared machine is the figure least
//! disturbed by other processes.

use std::time::Instant;

use anyhow::Result;
use gatehouse_data::firewall::CompiledFirewall;
use gatehouse_data::metrics::Metrics;
use gatehouse_model::object::{Firewall, RuleMode};
use http::HeaderMap;

#[derive(clap::Args)]
pub struct FirewallCostArgs {
    /// Requests checked per round.
    #[arg(long, default_value_t = 200_000)]
    iterations: u64,
    /// Rounds; the fastest is reported.
    #[arg(long, default_value_t = 7)]
    rounds: u32,
}

pub fn firewall_cost(args: FirewallCostArgs) -> Result<()> {
    let metrics = Metrics::default();
    let mut headers = HeaderMap::new();
    headers.insert(http::header::USER_AGENT, "gatehouse-bench/0.1".parse()?);
    headers.insert(
        http::header::REFERER,
        "https://shop.example.com/search?q=shoes".parse()?,
    );
    let requests = [
        ("the proxy benchmark's: /items?q=blue+running+shoes&page=2", "/items", "q=blue+running+shoes&page=2"),
        (
            "a long query (118 bytes, escapes)",
            "/api/v2/catalog/items",
            "q=the+quick+brown+fox+jumps+over+the+lazy+dog+and+runs+away&sort=price%20asc&page=12&filter=color%3Dblue%2Csize%3D42",
        ),
    ];
    let rule_sets = [
        ("off", Firewall::default()),
        (
            "sql_injection + xss: block",
            Firewall {
                sql_injection: RuleMode::Block,
                xss: RuleMode::Block,
                ..Firewall::default()
            },
        ),
        (
            "sql_injection + xss: block, referer inspected, 2 user-agent rules",
            Firewall {
                sql_injection: RuleMode::Block,
                xss: RuleMode::Block,
                inspect_headers: vec!["referer".into()],
                deny_user_agents: vec!["sqlmap".into(), "^nikto/".into()],
                ..Firewall::default()
            },
        ),
    ];
    println!(
        "| request | rules | ns per request (best of {}) |",
        args.rounds
    );
    println!("|---|---|---:|");
    for (request, path, query) in requests {
        for (rules, fw) in &rule_sets {
            let compiled = CompiledFirewall::compile("bench", fw).map_err(anyhow::Error::msg)?;
            let mut best = f64::MAX;
            for _ in 0..args.rounds {
                let start = Instant::now();
                for _ in 0..args.iterations {
                    let verdict = compiled.check_content(
                        "bench",
                        std::hint::black_box(path),
                        Some(std::hint::black_box(query)),
                        &headers,
                        &metrics,
                    );
                    anyhow::ensure!(verdict.is_ok(), "{request} was refused by {rules}");
                }
                best = best.min(start.elapsed().as_nanos() as f64 / args.iterations as f64);
            }
            println!("| {request} | {rules} | {best:.0} |");
        }
    }
    Ok(())
}
