//! API keys at the edge: made by the control plane and shown once, checked
//! by every data plane, revoked everywhere.

use std::time::{Duration, Instant};

use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::{apply, ctl, eventually, Cluster, Options};

fn create_key(server: &str, consumer: &str) -> anyhow::Result<(String, String)> {
    let out = ctl(server, &["keys", "create", "--consumer", consumer]);
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout)?.trim().to_string();
    let id = key.split('_').nth(1).unwrap_or_default().to_string();
    Ok((id, key))
}

/// Every file below `dir`, searched for `needle`.
fn found_in_files(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                hits.push(path);
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_let_their_consumer_in_and_nobody_else() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", std::slice::from_ref(&server), dir.path())?;
    let file = dir.path().join("auth.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1
consumers:
  - name: acme
    groups: [gold]
  - name: bronze
    groups: [basic]
policies:
  - name: gold-only
    authentication: [api_key]
    authorization: {{ groups: [gold] }}
upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: secure
    paths: [{{ prefix: /secure }}]
    upstream: app
    policy: gold-only
  - name: open
    paths: [{{ prefix: /open }}]
    upstream: app
",
            upstream.addr
        ),
    )?;
    apply(&server, file.to_str().unwrap());
    let (id, key) = create_key(&server, "acme")?;
    let (_, bronze_key) = create_key(&server, "bronze")?;
    assert!(
        key.starts_with("ghk_") && key.len() == gatehouse_model::apikey::KEY_LEN,
        "{key}"
    );

    let secure = format!("http://{}/secure/x", dp.proxy);
    let reply = eventually(
        Duration::from_secs(10),
        "the key to be accepted",
        || async {
            get(&secure, &[("x-api-key", &key)])
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await?;
    let seen = &reply.json()?["headers"];
    assert_eq!(seen["x-consumer-name"], "acme");
    assert_eq!(seen["x-consumer-groups"], "gold");
    assert!(
        seen.get("x-api-key").is_none(),
        "the key is not passed on: {seen}"
    );

    // Refused: no key, two keys, altered keys, another group.
    let none = get(&secure, &[]).await?;
    assert_eq!(none.status, 401);
    assert_eq!(
        none.headers["www-authenticate"],
        "ApiKey realm=\"gatehouse\", header=\"x-api-key\""
    );
    assert_eq!(
        none.json()?["type"],
        "https://gatehouse.dev/problems/unauthorized"
    );
    let suffixed = format!("{key}x");
    let upper = key.to_uppercase();
    let encoded = key.replace('_', "%5F");
    for (what, headers) in [
        (
            "two keys",
            vec![("x-api-key", key.as_str()), ("x-api-key", key.as_str())],
        ),
        ("a suffix", vec![("x-api-key", suffixed.as_str())]),
        ("other casing", vec![("x-api-key", upper.as_str())]),
        ("URL-encoded", vec![("x-api-key", encoded.as_str())]),
        ("empty", vec![("x-api-key", "")]),
        ("three characters", vec![("x-api-key", "abc")]),
    ] {
        assert_eq!(get(&secure, &headers).await?.status, 401, "{what}");
    }
    assert_eq!(
        get(&secure, &[("x-api-key", &bronze_key)]).await?.status,
        403,
        "not in the group"
    );

    // A forged identity never reaches the upstream, authenticated or not.
    let open = get(
        &format!("http://{}/open/x", dp.proxy),
        &[("x-consumer-name", "admin")],
    )
    .await?;
    assert!(open.json()?["headers"].get("x-consumer-name").is_none());
    let forged = get(
        &secure,
        &[("x-api-key", &key), ("x-consumer-name", "admin")],
    )
    .await?;
    assert_eq!(forged.json()?["headers"]["x-consumer-name"], "acme");

    // Revoked: refused within moments; the time is measured.
    let out = ctl(&server, &["keys", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the revoked key to be refused",
        || async {
            get(&secure, &[("x-api-key", &key)])
                .await
                .ok()
                .filter(|r| r.status == 401)
        },
    )
    .await?;
    eprintln!(
        "revocation took effect within {:?} of the acknowledgement",
        revoked_at.elapsed()
    );

    // The secret is nowhere on disk: not in the control plane's data, not in
    // the data plane's last-known-good file, not in any log.
    let secret = key.rsplit('_').next().unwrap()[..gatehouse_model::apikey::SECRET_LEN].to_string();
    for root in [cluster.dir.path(), dir.path()] {
        assert_eq!(
            found_in_files(root, secret.as_bytes()),
            Vec::<std::path::PathBuf>::new()
        );
    }
    let listed = ctl(&server, &["keys", "list", "--consumer", "acme"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&id) && listed.contains("revoked") && !listed.contains(&secret),
        "{listed}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_rate_limit_answers_429_with_its_headers_unless_told_not_to() -> anyhow::Result<()>
{
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", std::slice::from_ref(&server), dir.path())?;
    let file = dir.path().join("limits.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1
policies:
  - name: three-a-minute
    rate_limits:
      - {{ name: per-ip, key: [client_ip], limit: 3, window: 60s }}
  - name: quiet
    rate_limit_headers: false
    rate_limits:
      - {{ name: per-ip, key: [client_ip], limit: 1, window: 60s }}
upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: limited
    paths: [{{ prefix: /limited }}]
    upstream: app
    policy: three-a-minute
  - name: quiet
    paths: [{{ prefix: /quiet }}]
    upstream: app
    policy: quiet
",
            upstream.addr
        ),
    )?;
    gatehouse_e2e::apply(&server, file.to_str().unwrap());
    let url = format!("http://{}/limited/x", dp.proxy);
    let first = eventually(Duration::from_secs(10), "the limited route", || async {
        get(&url, &[]).await.ok().filter(|r| r.status == 200)
    })
    .await?;
    assert_eq!(first.headers["ratelimit-policy"], "\"per-ip\";q=3;w=60");
    assert!(first.headers["ratelimit"]
        .to_str()?
        .starts_with("\"per-ip\";r=2;t="));
    for remaining in [1, 0] {
        let r = get(&url, &[]).await?;
        assert_eq!(r.status, 200);
        assert!(r.headers["ratelimit"]
            .to_str()?
            .starts_with(&format!("\"per-ip\";r={remaining};t=")));
    }
    let hits = upstream.hits.load(std::sync::atomic::Ordering::Relaxed);
    let refused = get(&url, &[]).await?;
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.json()?["type"],
        "https://gatehouse.dev/problems/too-many-requests"
    );
    let wait: u64 = refused.headers["retry-after"].to_str()?.parse()?;
    assert!(
        (1..=20).contains(&wait),
        "one request per 20 s: retry after {wait}"
    );
    // More quota comes when a retry is admitted: `t` is `Retry-After`.
    assert_eq!(
        refused.headers["ratelimit"].to_str()?,
        format!("\"per-ip\";r=0;t={wait}")
    );
    assert_eq!(
        upstream.hits.load(std::sync::atomic::Ordering::Relaxed),
        hits,
        "a refused request never reaches the upstream"
    );

    // `rate_limit_headers: false`: the same limit, told to no one until it
    // refuses, and then only with Retry-After.
    let quiet = format!("http://{}/quiet/x", dp.proxy);
    let admitted = get(&quiet, &[]).await?;
    assert_eq!(admitted.status, 200);
    let refused = get(&quiet, &[]).await?;
    assert_eq!(refused.status, 429);
    let wait: u64 = refused.headers["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&wait), "retry after {wait}");
    for r in [&admitted, &refused] {
        for name in ["ratelimit-policy", "ratelimit"] {
            assert!(!r.headers.contains_key(name), "{name}: {:?}", r.headers);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_from_a_configured_issuer_get_in_and_forgeries_do_not() -> anyhow::Result<()> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let secret = "a-shared-secret-of-at-least-32-bytes!!";
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", std::slice::from_ref(&server), dir.path())?;
    let file = dir.path().join("jwt.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1
consumers:
  - name: acme
    groups: [gold]
jwt_issuers:
  - name: corp
    issuer: https://id.corp.example
    audiences: [gatehouse]
    algorithms: [HS256]
    keys: [{{ kid: k1, secret: \"{secret}\" }}]
    leeway: 5s
policies:
  - name: tokens
    authentication: [jwt, api_key]
    jwt: {{ issuers: [corp] }}
  - name: readers
    authentication: [jwt]
    jwt: {{ issuers: [corp] }}
    authorization: {{ scopes: [read] }}
upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: tokens
    paths: [{{ prefix: /tokens }}]
    upstream: app
    policy: tokens
  - name: readers
    paths: [{{ prefix: /readers }}]
    upstream: app
    policy: readers
",
            upstream.addr
        ),
    )?;
    gatehouse_e2e::apply(&server, file.to_str().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let sign = |claims: serde_json::Value| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let claims = |exp: u64, scope: &str| serde_json::json!({"sub": "acme", "iss": "https://id.corp.example", "aud": "gatehouse", "exp": exp, "scope": scope});
    let good = sign(claims(now + 60, "write"));
    let url = format!("http://{}/tokens/x", dp.proxy);
    let bearer = format!("Bearer {good}");
    let reply = eventually(
        Duration::from_secs(10),
        "the token to be accepted",
        || async {
            get(&url, &[("authorization", &bearer)])
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await?;
    assert_eq!(reply.json()?["headers"]["x-consumer-name"], "acme");

    let expired = format!("Bearer {}", sign(claims(now - 10, "write")));
    let none = {
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "Bearer {}.{}.",
            b64(serde_json::json!({"alg": "none"})),
            b64(claims(now + 60, "write"))
        )
    };
    let (_, key) = create_key(&server, "acme")?;
    for (what, headers) in [
        ("no credential", vec![]),
        ("expired", vec![("authorization", expired.as_str())]),
        ("alg none", vec![("authorization", none.as_str())]),
        (
            "two Authorization headers",
            vec![
                ("authorization", bearer.as_str()),
                ("authorization", bearer.as_str()),
            ],
        ),
        (
            "a token and a key",
            vec![
                ("authorization", bearer.as_str()),
                ("x-api-key", key.as_str()),
            ],
        ),
    ] {
        let r = get(&url, &headers).await?;
        assert_eq!(r.status, 401, "{what}");
        assert!(
            r.headers["www-authenticate"]
                .to_str()?
                .starts_with("Bearer realm=\"gatehouse\""),
            "{what}"
        );
    }
    assert_eq!(
        get(&url, &[("x-api-key", &key)]).await?.status,
        200,
        "either method of the policy"
    );

    // Scopes: required ones must be in the token; an API key has none.
    let readers = format!("http://{}/readers/x", dp.proxy);
    assert_eq!(
        get(&readers, &[("authorization", &bearer)]).await?.status,
        403
    );
    let reader = format!("Bearer {}", sign(claims(now + 60, "read write")));
    assert_eq!(
        get(&readers, &[("authorization", &reader)]).await?.status,
        200
    );

    // A megabyte of Authorization is refused before any decoding.
    let huge = format!("Bearer {}", "a".repeat(1 << 20));
    let r = get(&url, &[("authorization", &huge)]).await;
    assert!(
        r.map(|r| r.status == 431).unwrap_or(true),
        "refused as too large or cut off"
    );
    Ok(())
}

/// A 2048-bit RSA key pair made with `openssl genpkey` for tests only
/// (shared with the `jwt_crypto` unit tests).
const RSA_PRIVATE: &str = include_str!("../../crates/gatehouse-data/testdata/jwt-rsa-2048.pem");
const RSA_PUBLIC: &str = include_str!("../../crates/gatehouse-data/testdata/jwt-rsa-2048.pub.pem");

/// The negative suite, end to end through a real data plane, against
/// an RS256 issuer and a second issuer: every token below is refused (401),
/// a good one gets in, and the `jku`/`x5u` servers are never contacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_rs256_tokens_are_refused_end_to_end() -> anyhow::Result<()> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    // A server a `jku` or `x5u` header points at; it must never be contacted.
    let lure = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let lure_addr = lure.local_addr()?;
    let contacted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = contacted.clone();
    tokio::spawn(async move {
        while let Ok((_, _)) = lure.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", std::slice::from_ref(&server), dir.path())?;
    let indented: String = RSA_PUBLIC
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    let file = dir.path().join("rs.yaml");
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
    algorithms: [RS256]
    keys:
      - kid: rsa-1
        pem: |
{indented}    leeway: 5s
  - name: partner
    issuer: https://partner.example
    audiences: [gatehouse]
    algorithms: [HS256]
    keys: [{{ kid: partner-1, secret: \"another-shared-secret-of-32-bytes!!\" }}]
policies:
  - name: tokens
    authentication: [jwt]
    jwt: {{ issuers: [corp] }}
upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: tokens
    paths: [{{ prefix: /tokens }}]
    upstream: app
    policy: tokens
",
            upstream.addr
        ),
    )?;
    apply(&server, file.to_str().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes())?;
    let claims = |exp: serde_json::Value| serde_json::json!({"sub": "acme", "iss": "https://id.corp.example", "aud": "gatehouse", "exp": exp});
    let rs256 = |header: Header, claims: &serde_json::Value| encode(&header, claims, &rsa).unwrap();
    let with_kid = |kid: &str| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        h
    };
    let url = format!("http://{}/tokens/x", dp.proxy);
    let good = format!(
        "Bearer {}",
        rs256(with_kid("rsa-1"), &claims(serde_json::json!(now + 60)))
    );
    eventually(
        Duration::from_secs(10),
        "the RS256 token to be accepted",
        || async {
            get(&url, &[("authorization", &good)])
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await?;

    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    // HS256 signed with the issuer's RSA public key as the HMAC secret.
    let confused = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        encode(
            &h,
            &claims(serde_json::json!(now + 60)),
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
        )?
    };
    // A header of our own making, signed with the right key: what the
    // jsonwebtoken Header type cannot express (a kid that is not a string).
    let raw = |header: serde_json::Value, claims: &serde_json::Value| {
        let message = format!("{}.{}", b64(&header), b64(claims));
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &rsa, Algorithm::RS256).unwrap();
        format!("{message}.{signature}")
    };
    let good_claims = claims(serde_json::json!(now + 60));
    let mut early = good_claims.clone();
    early["nbf"] = serde_json::json!(now + 3600);
    let field = |k: &str, v: serde_json::Value| {
        let mut c = good_claims.clone();
        c[k] = v;
        c
    };
    let mut jku = with_kid("rsa-1");
    jku.jku = Some(format!("http://{lure_addr}/jwks.json"));
    let mut x5u = with_kid("rsa-1");
    x5u.x5u = Some(format!("http://{lure_addr}/cert.pem"));
    let partner = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("partner-1".into());
        encode(
            &h,
            &good_claims,
            &EncodingKey::from_secret(b"another-shared-secret-of-32-bytes!!"),
        )?
    };
    let long_kid = "k".repeat(10 * 1024);
    // A signature no configured key makes (as if by the key the jku/x5u URL
    // would serve): a gateway that followed those headers would fetch them.
    let not_ours = |token: String| {
        let (message, signature) = token.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { "B" } else { "A" };
        format!("{message}.{flipped}{}", &signature[1..])
    };
    let cases: Vec<(&str, String)> = vec![
        ("HS256 signed with the RSA public key", confused),
        (
            "expired by one second past leeway",
            rs256(with_kid("rsa-1"), &claims(serde_json::json!(now - 6))),
        ),
        ("nbf in the future", rs256(with_kid("rsa-1"), &early)),
        (
            "exp as a string",
            rs256(
                with_kid("rsa-1"),
                &claims(serde_json::json!((now + 60).to_string())),
            ),
        ),
        (
            "exp as a float",
            rs256(
                with_kid("rsa-1"),
                &claims(serde_json::json!(now as f64 + 60.5)),
            ),
        ),
        (
            "exp as a huge number",
            rs256(with_kid("rsa-1"), &claims(serde_json::json!(1e300))),
        ),
        (
            "wrong iss",
            rs256(
                with_kid("rsa-1"),
                &field("iss", serde_json::json!("https://evil.example")),
            ),
        ),
        (
            "wrong aud",
            rs256(with_kid("rsa-1"), &field("aud", serde_json::json!("other"))),
        ),
        (
            "aud array without ours",
            rs256(
                with_kid("rsa-1"),
                &field("aud", serde_json::json!(["a", "b"])),
            ),
        ),
        ("a kid of another issuer", partner),
        (
            "kid as a path",
            rs256(with_kid("../../etc/passwd"), &good_claims),
        ),
        ("kid as SQL", rs256(with_kid("' OR 1=1 --"), &good_claims)),
        ("kid 10 KB long", rs256(with_kid(&long_kid), &good_claims)),
        (
            "kid not a string",
            raw(serde_json::json!({"alg": "RS256", "kid": 7}), &good_claims),
        ),
        (
            "unknown crit",
            raw(
                serde_json::json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
                &good_claims,
            ),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&serde_json::json!({"alg": "none"})),
                b64(&good_claims)
            ),
        ),
        (
            "alg NoNe",
            format!(
                "{}.{}.",
                b64(&serde_json::json!({"alg": "NoNe"})),
                b64(&good_claims)
            ),
        ),
        ("jku at a local server", not_ours(rs256(jku, &good_claims))),
        ("x5u at a local server", not_ours(rs256(x5u, &good_claims))),
    ];
    for (what, token) in &cases {
        let reply = get(&url, &[("authorization", &format!("Bearer {token}"))]).await?;
        assert_eq!(reply.status, 401, "{what}");
    }
    // Still in with the good token; the lure was never contacted.
    assert_eq!(get(&url, &[("authorization", &good)]).await?.status, 200);
    assert_eq!(
        contacted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a jku or x5u URL was fetched"
    );
    Ok(())
}
