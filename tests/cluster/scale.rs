//! Scale: a data plane loads many keys and routes as one snapshot, and a key
//! created or revoked afterwards arrives as a delta applied incrementally.
//! `gatehouse-bench scale` runs the same scenario at a million keys.

use std::time::Duration;

use gatehouse_e2e::scale::{quantile_ms, run, ScaleSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_create_and_revoke_arrive_as_deltas_on_twenty_thousand_keys() -> anyhow::Result<()> {
    let spec = ScaleSpec {
        keys: 20_000,
        consumers: 2_000,
        routes: 200,
        nodes: 1,
        writes: 5,
        batch: 10_000,
        timeout: Duration::from_secs(10),
        load_timeout: Duration::from_secs(60),
    };
    let report = run(&spec, &|line| eprintln!("scale: {line}")).await?;
    eprintln!(
        "scale: create p50 {:.1} ms, revoke p50 {:.1} ms (both data planes)",
        quantile_ms(&report.create_both, 0.5),
        quantile_ms(&report.revoke_both, 0.5)
    );
    assert_eq!(
        report.missed, 0,
        "every key change reached both data planes"
    );
    assert_eq!(report.create_both.len(), 5, "each created key was accepted");
    assert_eq!(report.revoke_both.len(), 5, "each revoked key was refused");
    for dp in &report.data_planes {
        eprintln!("scale: {dp:?}");
        // Ten writes (five creates, five revocations), each its own revision.
        assert_eq!(
            dp.delta_applies, 10,
            "{}: every key change applied as a delta",
            dp.name
        );
        assert_eq!(dp.full_applies, 0, "{}: no full recompile", dp.name);
        assert!(dp.rss_loaded > 0, "{}: memory measured", dp.name);
    }
    Ok(())
}
