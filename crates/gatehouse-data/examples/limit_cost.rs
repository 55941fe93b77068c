//! What one cluster-limit decision costs this process and Redis, for
//! measuring with `valgrind --tool=callgrind` (instructions) and Redis's
//! `INFO commandstats`: `limit_cost REDIS_URL exact|lease REQUESTS CONCURRENCY`.
//! The limit never refuses (10^9 per second, one key), so every request
//! pays a decision, as in `bench/run-ratelimit.sh`. Run it with 0 requests
//! too: the difference is the cost of the requests alone. With `yield`,
//! each task yields after each decision, as a proxy's requests interleave.

use std::time::{Duration, Instant};

use gatehouse_data::limits::{
    self, store, ClusterEnv, CompiledLimit, LimitContext, LimiterRegistry, PolicyLimits,
};
use gatehouse_data::metrics::Metrics;
use gatehouse_model::object::{LimitScope, RateLimit, StoreFailure};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, mode, requests, concurrency, interleave) = match args.as_slice() {
        [_, url, mode, requests, concurrency] => (url, mode, requests, concurrency, false),
        [_, url, mode, requests, concurrency, y] if y == "yield" => {
            (url, mode, requests, concurrency, true)
        }
        _ => {
            eprintln!("usage: limit_cost REDIS_URL exact|lease REQUESTS CONCURRENCY [yield]");
            std::process::exit(2);
        }
    };
    let requests: u64 = requests.parse().expect("REQUESTS");
    let concurrency: u64 = concurrency.parse().expect("CONCURRENCY");
    let lease = match mode.as_str() {
        "exact" => 0,
        "lease" => 100,
        _ => panic!("mode is exact or lease"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let metrics: &'static Metrics = Box::leak(Box::default());
        let env: &'static ClusterEnv = Box::leak(Box::new(ClusterEnv {
            store: Some(
                store::Store::start(
                    &store::StoreTarget::Single(url.clone()),
                    Duration::from_millis(500),
                )
                .unwrap(),
            ),
            ..ClusterEnv::default()
        }));
        let limit = RateLimit {
            name: "cost".into(),
            scope: LimitScope::Cluster,
            key: vec!["client_ip".into()],
            limit: 1_000_000_000,
            window: Duration::from_secs(1),
            burst: 0,
            on_store_failure: StoreFailure::Open,
            lease,
        };
        let registry = LimiterRegistry::default();
        let compiled: &'static PolicyLimits = Box::leak(Box::new(PolicyLimits::new(
            vec![CompiledLimit::compile("p", &limit, &registry, metrics).unwrap()],
            true,
        )));
        let headers: &'static http::HeaderMap = Box::leak(Box::default());
        // One warm-up decision: the connection and the script load.
        let ctx = LimitContext {
            consumer: None,
            client_ip: "10.0.0.1".parse().unwrap(),
            route: "all",
            headers,
        };
        limits::check(compiled, &ctx, env).await;
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                tokio::spawn(async move {
                    let ctx = LimitContext {
                        consumer: None,
                        client_ip: "10.0.0.1".parse().unwrap(),
                        route: "all",
                        headers,
                    };
                    let mut refused = 0u64;
                    for _ in 0..requests / concurrency {
                        let d = limits::check(compiled, &ctx, env).await.unwrap();
                        refused += u64::from(d.retry_after.is_some() || d.unavailable);
                        if interleave {
                            // As requests of a proxy do between decisions
                            // (a decision from held lease tokens never waits).
                            tokio::task::yield_now().await;
                        }
                    }
                    refused
                })
            })
            .collect();
        let mut refused = 0;
        for t in tasks {
            refused += t.await.unwrap();
        }
        eprintln!(
            "{} decisions in {:?}, {refused} refused",
            requests / concurrency * concurrency,
            started.elapsed()
        );
    });
}
