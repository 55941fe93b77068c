//! JWKS end to end: a data plane process fetches an identity provider's key
//! set (plain http on loopback with the flag, or https with a test CA),
//! follows a key rotation, keeps working from its cache while the identity
//! provider is down (up to `jwks_max_stale`, then 503), and refetches at
//! most once per cooldown however many unknown `kid`s arrive.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gatehouse_e2e::data::{get, DataPlaneProc, Reply, Upstream};
use gatehouse_e2e::jwks::{key_set, SigningKey, TestIdp};
use gatehouse_e2e::{apply, eventually, Cluster, Options};

const LOOPBACK_FLAG: &str = "--allow-insecure-jwks-loopback";

fn claims() -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    serde_json::json!({"sub": "acme", "iss": "https://id.corp.example", "aud": "gatehouse", "exp": now + 600})
}

/// One issuer `corp` whose keys come from `url`, with the extra issuer
/// fields `timings` (YAML, one per line), guarding the route `/t`.
fn write_config(
    dir: &std::path::Path,
    upstream: &Upstream,
    url: &str,
    timings: &[&str],
) -> std::path::PathBuf {
    let timings: String = timings.iter().map(|t| format!("    {t}\n")).collect();
    let file = dir.join("jwks.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1
consumers:
  - name: acme
jwt_issuers:
  - name: corp
    issuer: https://id.corp.example
    audiences: [gatehouse]
    algorithms: [ES256]
    jwks_url: \"{url}\"
{timings}policies:
  - name: tokens
    authentication: [jwt]
    jwt: {{ issuers: [corp] }}
upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: t
    paths: [{{ prefix: /t }}]
    upstream: app
    policy: tokens
",
            upstream.addr
        ),
    )
    .unwrap();
    file
}

async fn with_token(dp: &DataPlaneProc, token: &str) -> anyhow::Result<Reply> {
    get(
        &format!("http://{}/t/x", dp.proxy),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

async fn accepted(dp: &DataPlaneProc, token: &str, what: &str) -> anyhow::Result<Reply> {
    eventually(Duration::from_secs(15), what, || async {
        with_token(dp, token).await.ok().filter(|r| r.status == 200)
    })
    .await
}

fn problem_type(r: &Reply) -> String {
    r.json()
        .ok()
        .and_then(|j| j["type"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_accepts_the_new_key_and_refuses_the_removed_one() -> anyhow::Result<()> {
    let (k1, k2) = (SigningKey::new("k1"), SigningKey::new("k2"));
    let idp = TestIdp::start(key_set(&[&k1])).await?;
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start_with_args(
        "dp-1",
        std::slice::from_ref(&server),
        dir.path(),
        &[LOOPBACK_FLAG],
    )?;
    // The same configuration on a data plane without the flag.
    let strict_dir = tempfile::tempdir()?;
    let strict = DataPlaneProc::start("dp-2", std::slice::from_ref(&server), strict_dir.path())?;
    apply(
        &server,
        write_config(dir.path(), &upstream, &idp.url, &[])
            .to_str()
            .unwrap(),
    );

    let reply = accepted(&dp, &k1.sign(&claims()), "the k1 token to be accepted").await?;
    assert_eq!(reply.json()?["headers"]["x-consumer-name"], "acme");

    // The identity provider rotates: k2 in, k1 out. The first k2 token
    // makes the data plane fetch again, and is accepted.
    let before = idp.fetches();
    idp.set_keys(key_set(&[&k2]));
    let k2_reply = with_token(&dp, &k2.sign(&claims())).await?;
    assert_eq!(k2_reply.status, 200, "the new key is accepted at once");
    assert_eq!(idp.fetches(), before + 1, "one fetch for the unknown kid");
    // k1 is gone from the set: its tokens are refused, with 401.
    let k1_reply = with_token(&dp, &k1.sign(&claims())).await?;
    assert_eq!(k1_reply.status, 401, "the removed key is refused");
    assert_eq!(
        problem_type(&k1_reply),
        "https://gatehouse.dev/problems/unauthorized"
    );
    // A k2 kid on a k1 signature is a forgery, not a reason to fetch.
    assert_eq!(
        with_token(&dp, &k1.sign_as("k2", &claims())).await?.status,
        401
    );

    // Without the flag the data plane does not fetch plain http: 503, and
    // its log says why.
    let refused = eventually(Duration::from_secs(15), "dp-2 to answer", || async {
        with_token(&strict, &k2.sign(&claims()))
            .await
            .ok()
            .filter(|r| r.status != 404 && !problem_type(r).ends_with("/not-ready"))
    })
    .await?;
    assert_eq!(refused.status, 503);
    assert_eq!(
        problem_type(&refused),
        "https://gatehouse.dev/problems/keys-unavailable"
    );
    assert!(
        strict.log_text().contains(LOOPBACK_FLAG),
        "the log names the flag: {}",
        strict.log_tail()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_over_https_is_checked_against_the_given_ca() -> anyhow::Result<()> {
    let k1 = SigningKey::new("k1");
    let dir = tempfile::tempdir()?;
    let idp = TestIdp::start_tls(key_set(&[&k1]), dir.path()).await?;
    let ca = idp.ca_file.clone().unwrap();
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dp = DataPlaneProc::start_with_args(
        "dp-1",
        std::slice::from_ref(&server),
        dir.path(),
        &["--jwks-ca-file", ca.to_str().unwrap()],
    )?;
    // With the system's roots, the test CA is not trusted.
    let untrusting_dir = tempfile::tempdir()?;
    let untrusting =
        DataPlaneProc::start("dp-2", std::slice::from_ref(&server), untrusting_dir.path())?;
    assert!(idp.url.starts_with("https://"), "{}", idp.url);
    apply(
        &server,
        write_config(dir.path(), &upstream, &idp.url, &[])
            .to_str()
            .unwrap(),
    );
    accepted(
        &dp,
        &k1.sign(&claims()),
        "the token to be accepted over https",
    )
    .await?;
    let refused = eventually(Duration::from_secs(15), "dp-2 to answer", || async {
        with_token(&untrusting, &k1.sign(&claims()))
            .await
            .ok()
            .filter(|r| r.status != 404 && !problem_type(r).ends_with("/not-ready"))
    })
    .await?;
    assert_eq!(refused.status, 503, "no trusted key set, no verdict");
    assert_eq!(
        problem_type(&refused),
        "https://gatehouse.dev/problems/keys-unavailable"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_cache_outlives_an_identity_provider_outage_up_to_max_stale() -> anyhow::Result<()> {
    let k1 = SigningKey::new("k1");
    let mut idp = TestIdp::start(key_set(&[&k1])).await?;
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start_with_args(
        "dp-1",
        std::slice::from_ref(&server),
        dir.path(),
        &[LOOPBACK_FLAG],
    )?;
    apply(
        &server,
        write_config(
            dir.path(),
            &upstream,
            &idp.url,
            &["jwks_cooldown: 1s", "jwks_max_stale: 4s"],
        )
        .to_str()
        .unwrap(),
    );
    let token = k1.sign(&claims());
    accepted(&dp, &token, "the token to be accepted").await?;
    let fetched = Instant::now();

    // The identity provider goes away: the cached keys still check tokens.
    idp.stop();
    let cached = with_token(&dp, &token).await?;
    println!(
        "identity provider down: {} after the key set was seen",
        humanize(fetched.elapsed())
    );
    assert_eq!(cached.status, 200, "cached keys still work");
    // An unknown kid makes it try (and fail) to fetch; still a plain 401.
    let unknown = with_token(&dp, &k1.sign_as("k9", &claims())).await?;
    assert_eq!(unknown.status, 401);

    // Past jwks_max_stale the keys are not used: 503, not 401.
    let stale = eventually(Duration::from_secs(30), "503 past max stale", || async {
        with_token(&dp, &token)
            .await
            .ok()
            .filter(|r| r.status == 503)
    })
    .await?;
    println!("503 after {}", humanize(fetched.elapsed()));
    assert_eq!(
        problem_type(&stale),
        "https://gatehouse.dev/problems/keys-unavailable"
    );
    assert_eq!(
        stale.headers["content-type"], "application/problem+json",
        "a problem body"
    );
    // A forged token is not told apart from a good one while keys are out.
    let forged = SigningKey::new("k1").sign(&claims());
    assert_eq!(with_token(&dp, &forged).await?.status, 503);

    // Back up: the next token after the cooldown fetches again and gets in.
    idp.start_again().await?;
    accepted(&dp, &token, "the token to be accepted again").await?;
    assert_eq!(with_token(&dp, &forged).await?.status, 401);
    let metrics = get(&format!("http://{}/metrics", dp.ops), &[]).await?;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("gatehouse_jwks_fetches_total"))
        .collect();
    println!("{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l.contains("outcome=\"unreachable\"")),
        "failed fetches are counted: {lines:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_unknown_kids_fetches_at_most_once_per_cooldown() -> anyhow::Result<()> {
    let k1 = SigningKey::new("k1");
    let idp = TestIdp::start(key_set(&[&k1])).await?;
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start_with_args(
        "dp-1",
        std::slice::from_ref(&server),
        dir.path(),
        &[LOOPBACK_FLAG],
    )?;
    apply(
        &server,
        write_config(
            dir.path(),
            &upstream,
            &idp.url,
            &["jwks_refresh: 1h", "jwks_cooldown: 1h"],
        )
        .to_str()
        .unwrap(),
    );
    accepted(&dp, &k1.sign(&claims()), "the token to be accepted").await?;
    let before = idp.fetches();

    let started = Instant::now();
    let mut storm = tokio::task::JoinSet::new();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    for i in 0..200 {
        let token = k1.sign_as(&format!("kid-{nanos:x}-{i}"), &claims());
        let proxy = dp.proxy.clone();
        storm.spawn(async move {
            get(
                &format!("http://{proxy}/t/x"),
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await
            .map(|r| r.status)
        });
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(status) = storm.join_next().await {
        *statuses.entry(status??).or_insert(0) += 1;
    }
    let fetches = idp.fetches() - before;
    println!(
        "200 tokens with unknown kids in {}: statuses {statuses:?}, {fetches} fetch(es) of the key set",
        humanize(started.elapsed())
    );
    assert_eq!(statuses.get(&401), Some(&200), "{statuses:?}");
    assert!(
        fetches <= 1,
        "at most one fetch per cooldown, saw {fetches}"
    );
    // The known key still works, without a fetch.
    assert_eq!(with_token(&dp, &k1.sign(&claims())).await?.status, 200);
    assert_eq!(idp.fetches() - before, fetches);
    Ok(())
}

fn humanize(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}
