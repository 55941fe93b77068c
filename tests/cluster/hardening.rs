//! Hostile request shapes against a real data plane, spoken as raw bytes so
//! that no client library normalises them first.

use std::time::Duration;

use gatehouse_e2e::data::{DataPlaneProc, Upstream};
use gatehouse_e2e::{apply, eventually, Cluster, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as is and returns the status and the body.
async fn raw(addr: &str, request: &[u8]) -> anyhow::Result<(u16, String)> {
    raw_closed(addr, request).await.map(|(s, b, _)| (s, b))
}

/// Like [`raw`], and whether the server closed the connection by itself.
async fn raw_closed(addr: &str, request: &[u8]) -> anyhow::Result<(u16, String, bool)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    // Read until the server closes, or until nothing more comes for a while
    // (a connection left open after the response).
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    let mut closed = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0)) => {
                closed = true;
                break;
            }
            Err(_) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e.into()),
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body, closed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_trick_reaches_a_route_other_than_its_canonical_one() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let (admin, public) = (
        Upstream::start("admin").await?,
        Upstream::start("public").await?,
    );
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", &[cluster.node(1).admin.clone()], dir.path())?;
    let file = dir.path().join("routes.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\nupstreams:\n  - name: admin\n    targets: [{{ address: \"{}\" }}]\n  - name: public\n    targets: [{{ address: \"{}\" }}]\nroutes:\n  - name: admin\n    paths: [{{ prefix: /admin }}]\n    upstream: admin\n  - name: public\n    paths: [{{ prefix: / }}]\n    upstream: public\n",
            admin.addr, public.addr
        ),
    )?;
    apply(&cluster.node(1).admin, file.to_str().unwrap());
    eventually(
        Duration::from_secs(10),
        "the routes to be served",
        || async {
            let (status, _) = raw(
                &dp.proxy,
                b"GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
            .ok()?;
            (status == 200).then_some(())
        },
    )
    .await?;

    // (request path, expected: None = refused with 400, or Some((route, path the upstream sees)))
    let cases: &[(&str, Option<(&str, &str)>)] = &[
        ("/p/../admin", Some(("admin", "/admin"))),
        ("/p/%2e%2e/admin", Some(("admin", "/admin"))),
        ("/p/.%2E/admin", Some(("admin", "/admin"))),
        ("/./admin", Some(("admin", "/admin"))),
        (
            "/p/%252e%252e/admin",
            Some(("public", "/p/%252e%252e/admin")),
        ),
        ("/%61dmin", Some(("admin", "/admin"))),
        ("/p/%c0%ae%c0%ae/admin", None),
        ("//admin", Some(("admin", "/admin"))),
        ("/p%2f..%2fadmin", None),
        ("/p\\..\\admin", None),
        ("/admin;x", None),
        ("/admin..;/", None),
        ("/public/..;/admin", None),
        ("/ADMIN", Some(("public", "/ADMIN"))),
        ("/admin/", Some(("admin", "/admin/"))),
        ("/admin%00", None),
        ("/admin%23x", Some(("public", "/admin%23x"))),
    ];
    for (path, expected) in cases {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, body) = raw(&dp.proxy, request.as_bytes()).await?;
        match expected {
            None => assert_eq!(status, 400, "{path} must be refused, got {status} {body}"),
            Some((route, seen)) => {
                assert_eq!(status, 200, "{path}: {body}");
                let echo: serde_json::Value = serde_json::from_str(&body)?;
                assert_eq!(echo["upstream"], *route, "{path} went to the wrong route");
                assert_eq!(
                    echo["path"], *seen,
                    "{path}: the upstream must see the canonical path"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_never_reach_the_upstream() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let upstream = Upstream::start("echo").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", &[cluster.node(1).admin.clone()], dir.path())?;
    let file = dir.path().join("routes.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\nupstreams:\n  - name: echo\n    targets: [{{ address: \"{}\" }}]\nroutes:\n  - name: echo\n    paths: [{{ prefix: / }}]\n    upstream: echo\n",
            upstream.addr
        ),
    )?;
    apply(&cluster.node(1).admin, file.to_str().unwrap());
    eventually(
        Duration::from_secs(10),
        "the route to be served",
        || async {
            let (status, _) = raw(
                &dp.proxy,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
            .ok()?;
            (status == 200).then_some(())
        },
    )
    .await?;

    let refused: &[(&str, &[u8])] = &[
        ("TE chunked, chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("TE xchunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ("two TE lines", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("TE by obs-fold", b"POST / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("conflicting CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nAB"),
        ("CL +5", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nAAAAA"),
        ("CL -1", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
        ("CL 2^64", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
        ("NUL in a value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
        ("bare CR in a value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n"),
        ("no Host", b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n"),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        ("absolute-form, other host", b"GET http://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    ];
    for (name, request) in refused {
        let before = upstream.hits.load(std::sync::atomic::Ordering::Relaxed);
        let (status, body, closed) = raw_closed(&dp.proxy, request).await?;
        let after = upstream.hits.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(after, before, "{name} reached the upstream");
        // What follows an ambiguous frame cannot be trusted as a next request.
        assert!(
            closed,
            "{name}: the connection must be closed after the refusal"
        );
    }

    // Well-framed oddities reach the upstream exactly as many times as sent.
    // With both Content-Length and Transfer-Encoding, hyper (1.11 and later)
    // frames by the chunked encoding and drops the length, as RFC 9112 says:
    // one well-framed request goes on, and the smuggled "G" after it never
    // becomes a second one.
    let accepted: &[(&str, &[u8], u64)] = &[
        (
            "CL.TE",
            b"POST /clte HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            1,
        ),
        (
            "TE.CL",
            b"POST /tecl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nG",
            1,
        ),
        ("bare LF line endings", b"GET /lf HTTP/1.1\nHost: x\nConnection: close\n\n", 1),
        (
            "trailers that try to set headers",
            b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\nA\r\n0\r\nContent-Length: 0\r\nAuthorization: Bearer x\r\n\r\n",
            1,
        ),
        // Two equal lengths frame the same way everywhere: hyper keeps one.
        (
            "duplicate CL",
            b"POST /dup HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nA",
            1,
        ),
        (
            "pipelined requests",
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            2,
        ),
    ];
    for (name, request, count) in accepted {
        let before = upstream.hits.load(std::sync::atomic::Ordering::Relaxed);
        let (status, body) = raw(&dp.proxy, request).await?;
        let after = upstream.hits.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(after - before, *count, "{name}: upstream requests");
        // The trailers arrive as trailers, never as request headers.
        assert!(!body.contains("\"authorization\""), "{name}: {body}");
        assert!(!body.contains("\"content-length\":\"6\""), "{name}: {body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firewall_rules_of_a_policy_refuse_at_the_door() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let upstream = Upstream::start("echo").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", &[cluster.node(1).admin.clone()], dir.path())?;
    let file = dir.path().join("firewall.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1
policies:
  - name: guarded
    firewall:
      trusted_proxies: [127.0.0.1/32]
      deny_ips: [203.0.113.0/24]
      allowed_methods: [GET, POST]
      max_header_bytes: 1024
      max_header_count: 8
      max_uri_bytes: 64
      max_body_bytes: 10
upstreams:
  - name: echo
    targets: [{{ address: \"{}\" }}]
routes:
  - name: guarded
    paths: [{{ prefix: / }}]
    upstream: echo
    policy: guarded
",
            upstream.addr
        ),
    )?;
    apply(&cluster.node(1).admin, file.to_str().unwrap());
    let send = |req: String| {
        let proxy = dp.proxy.clone();
        async move { raw(&proxy, req.as_bytes()).await }
    };
    eventually(
        Duration::from_secs(10),
        "the policy to be served",
        || async {
            let (status, _) = send("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into())
                .await
                .ok()?;
            (status == 200).then_some(())
        },
    )
    .await?;

    // The client address comes through the trusted proxy (our loopback peer).
    let (status, _) = send(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n"
            .into(),
    )
    .await?;
    assert_eq!(status, 403, "a denied network behind a trusted proxy");
    let (status, body) = send(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7\r\nConnection: close\r\n\r\n"
            .into(),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        echo["headers"]["x-forwarded-for"], "198.51.100.7, 127.0.0.1",
        "the chain is kept and extended"
    );

    let (status, _) =
        send("DELETE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()).await?;
    assert_eq!(status, 405);
    let big = "a".repeat(2000);
    let (status, _) = send(format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
    ))
    .await?;
    assert_eq!(status, 431);
    let many: String = (0..10).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (status, _) = send(format!(
        "GET / HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n"
    ))
    .await?;
    assert_eq!(status, 431, "too many header fields");
    let long = "q".repeat(80);
    let (status, _) = send(format!(
        "GET /?{long} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ))
    .await?;
    assert_eq!(status, 414, "a request target over max_uri_bytes");
    // Over the body cap: by Content-Length up front, and while streaming a chunked body.
    let (status, _) = send(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world"
            .into(),
    )
    .await?;
    assert_eq!(status, 413);
    let (status, body) = send(
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\nhello \r\n6\r\nworld!\r\n0\r\n\r\n".into(),
    )
    .await?;
    assert_eq!(status, 413, "{body}");
    let (status, _) = send(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".into(),
    )
    .await?;
    assert_eq!(status, 200, "within the cap");
    Ok(())
}

/// A one-node cluster, an echo upstream and a data plane serving `yaml`
/// (with `{upstream}` replaced by the upstream's address), ready once
/// `ready_request` gets `ready_status`.
async fn serve_config(
    yaml: &str,
    ready_request: &str,
    ready_status: u16,
) -> anyhow::Result<(Cluster, Upstream, DataPlaneProc, tempfile::TempDir)> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let upstream = Upstream::start("echo").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", &[cluster.node(1).admin.clone()], dir.path())?;
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        yaml.replace("{upstream}", &upstream.addr.to_string()),
    )?;
    apply(&cluster.node(1).admin, file.to_str().unwrap());
    eventually(
        Duration::from_secs(10),
        "the config to be served",
        || async {
            let (status, _) = raw(&dp.proxy, ready_request.as_bytes()).await.ok()?;
            (status == ready_status).then_some(())
        },
    )
    .await?;
    Ok((cluster, upstream, dp, dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_and_user_agent_rules_block_or_detect_without_echoing_the_payload(
) -> anyhow::Result<()> {
    let yaml = "version: 1
policies:
  - name: strict
    firewall:
      sql_injection: block
      xss: block
      inspect_headers: [referer]
      deny_user_agents: [sqlmap, '^nikto/']
  - name: watch
    firewall:
      sql_injection: detect
      xss: detect
upstreams:
  - name: echo
    targets: [{ address: \"{upstream}\" }]
routes:
  - name: strict
    paths: [{ prefix: /strict }]
    upstream: echo
    policy: strict
  - name: watch
    paths: [{ prefix: /watch }]
    upstream: echo
    policy: watch
";
    let (_cluster, upstream, dp, _dir) = serve_config(
        yaml,
        "GET /strict/?q=%27%20or%20%271%27%3D%271 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        403,
    )
    .await?;
    let get = |target: &str, extra: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n")
    };
    let before = upstream.hits.load(std::sync::atomic::Ordering::Relaxed);
    for (request, what) in [
        (get("/strict/search?q=1%20UNION%20SELECT%20password%20FROM%20users", ""), "union select in the query"),
        (get("/strict/search?q=%253Cscript%253Ealert(1)", ""), "double-encoded script tag"),
        (get("/strict/search?next=javascript:alert(1)", ""), "script URL"),
        (get("/strict/%3Cscript%3E", ""), "script tag in the path"),
        (get("/strict/", "Referer: http://x/?id=1' or 1=1--\r\n"), "injection in an inspected header"),
        (get("/strict/", "User-Agent: sqlmap/1.7\r\n"), "denied user agent"),
        (get("/strict/", "User-Agent: Nikto/2.5\r\n"), "denied user agent, any case"),
        (
            "POST /strict/form HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 32\r\nConnection: close\r\n\r\nname=x%27+or+%271%27%3D%271&ok=1".to_string(),
            "injection in a form body",
        ),
        (
            "POST /strict/api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 38\r\nConnection: close\r\n\r\n{\"bio\":\"<img src=x onerror=alert(1)>\"}".to_string(),
            "XSS in a JSON body",
        ),
    ] {
        let (status, body) = raw(&dp.proxy, request.as_bytes()).await?;
        assert_eq!(status, 403, "{what}: {body}");
        assert!(body.contains("https://gatehouse.dev/problems/blocked"), "{what}: {body}");
        for echo in ["script", "UNION", "alert", "sqlmap", "or 1=1"] {
            assert!(!body.contains(echo), "{what}: the refusal echoes the payload: {body}");
        }
    }
    assert_eq!(
        upstream.hits.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "no blocked request reached the upstream"
    );

    // Ordinary requests pass, bodies arrive whole.
    for request in [
        get("/strict/search?q=select%20from%20the%20menu&name=O%27Reilly", "User-Agent: curl/8.5\r\n"),
        get("/strict/", "Referer: https://example.com/?q=union+station\r\n"),
        "POST /strict/form HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 25\r\nConnection: close\r\n\r\nname=D%27Angelo&city=Rome".to_string(),
    ] {
        let (status, body) = raw(&dp.proxy, request.as_bytes()).await?;
        assert_eq!(status, 200, "{request}: {body}");
    }
    let (_, body) = raw(
        &dp.proxy,
        b"POST /strict/form HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world",
    )
    .await?;
    let echo: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        echo["body_bytes"], 11,
        "the inspected body is forwarded whole"
    );

    // Detect mode logs and counts, and lets the request through.
    let (status, _) = raw(
        &dp.proxy,
        get("/watch/?q=%27%20or%201%3D1--", "").as_bytes(),
    )
    .await?;
    assert_eq!(status, 200);
    let metrics = gatehouse_e2e::data::get(&format!("http://{}/metrics", dp.ops), &[]).await?;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(
            r#"gatehouse_firewall_matches_total{rule="sql_injection",action="detected"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"gatehouse_firewall_matches_total{rule="sql_injection",action="blocked"}"#),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_at_the_gateway() -> anyhow::Result<()> {
    let yaml = "version: 1
policies:
  - name: web
    authentication: [api_key]
    firewall:
      cors:
        allowed_origins: ['https://app.example.com', 'https://*.example.org']
        allowed_methods: [GET]
        allowed_headers: [content-type, x-api-key]
        allow_credentials: true
        max_age: 5m
upstreams:
  - name: echo
    targets: [{ address: \"{upstream}\" }]
routes:
  - name: web
    paths: [{ prefix: /api }]
    methods: [GET, PUT]
    upstream: echo
    policy: web
";
    let preflight = |origin: &str, method: &str, headers: &str| {
        format!("OPTIONS /api/items HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: {method}\r\nAccess-Control-Request-Headers: {headers}\r\nConnection: close\r\n\r\n")
    };
    let ok = preflight("https://app.example.com", "GET", "content-type, x-api-key");
    let (_cluster, upstream, dp, _dir) = serve_config(yaml, &ok, 204).await?;
    let before = upstream.hits.load(std::sync::atomic::Ordering::Relaxed);
    let response = raw_response(&dp.proxy, ok.as_bytes()).await?;
    assert!(response.starts_with("HTTP/1.1 204"), "{response}");
    let lower = response.to_ascii_lowercase();
    for expected in [
        "access-control-allow-origin: https://app.example.com",
        "access-control-allow-methods: get",
        "access-control-allow-headers: content-type, x-api-key",
        "access-control-allow-credentials: true",
        "access-control-max-age: 300",
    ] {
        assert!(
            lower.contains(expected),
            "missing {expected:?} in {response}"
        );
    }
    let (status, _) = raw(
        &dp.proxy,
        preflight("https://a.example.org", "GET", "x-api-key").as_bytes(),
    )
    .await?;
    assert_eq!(status, 204, "a wildcard origin");

    // A disallowed origin, method or header is refused; a method no route
    // allows gets the route's 405.
    for (origin, method, headers, status) in [
        ("https://evil.example.com", "GET", "content-type", 403),
        ("https://example.org", "GET", "content-type", 403),
        ("https://app.example.com", "PUT", "content-type", 403),
        ("https://app.example.com", "GET", "x-secret", 403),
        ("https://app.example.com", "DELETE", "content-type", 405),
    ] {
        let response =
            raw_response(&dp.proxy, preflight(origin, method, headers).as_bytes()).await?;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{origin} {method} {headers}: {response}"
        );
        assert!(
            !response
                .to_ascii_lowercase()
                .contains("access-control-allow-origin"),
            "{response}"
        );
    }
    assert_eq!(
        upstream.hits.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "preflights never reach the upstream"
    );

    // An actual request from an allowed origin: the refusal (no key) and any
    // answer carry the CORS headers, so the browser can read them.
    let response = raw_response(
        &dp.proxy,
        b"GET /api/items HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example.com\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(
        lower.contains("access-control-allow-origin: https://app.example.com"),
        "{response}"
    );
    assert!(
        lower.contains("access-control-allow-credentials: true"),
        "{response}"
    );
    assert!(lower.contains("vary: origin"), "{response}");
    // From another origin: no CORS headers, so the browser keeps it from the page.
    let response = raw_response(
        &dp.proxy,
        b"GET /api/items HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.com\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(
        !response
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{response}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_path_route_gets_the_path_as_sent_and_others_stay_canonical() -> anyhow::Result<()> {
    let yaml = "version: 1
upstreams:
  - name: echo
    targets: [{ address: \"{upstream}\" }]
routes:
  - name: blobs
    paths: [{ prefix: /blobs }]
    upstream: echo
    raw_path: true
  - name: other
    paths: [{ prefix: / }]
    upstream: echo
";
    let (_cluster, _upstream, dp, _dir) = serve_config(
        yaml,
        "GET /blobs/a%2Fb HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        200,
    )
    .await?;
    let seen = |target: &str| {
        let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let proxy = dp.proxy.clone();
        async move {
            let (status, body) = raw(&proxy, request.as_bytes()).await?;
            let path = if status == 200 {
                serde_json::from_str::<serde_json::Value>(&body)?["path"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            } else {
                String::new()
            };
            anyhow::Ok((status, path))
        }
    };
    // The opted-out route gets the bytes as sent, encoded slash and all.
    assert_eq!(seen("/blobs/a%2Fb").await?, (200, "/blobs/a%2Fb".into()));
    assert_eq!(
        seen("/blobs/x/../%7Ey").await?,
        (200, "/blobs/x/../%7Ey".into())
    );
    // Every other route stays canonical, and refuses what is ambiguous.
    assert_eq!(seen("/files/a%2Fb").await?.0, 400);
    assert_eq!(seen("/files/x/../%7Ey").await?, (200, "/files/~y".into()));
    // A dotted path is routed by its canonical form: it cannot leave the
    // raw route's prefix to reach another route, nor enter it by a trick
    // that only the upstream would undo.
    assert_eq!(seen("/blobs/../files").await?, (200, "/files".into()));
    Ok(())
}

/// The whole response as text.
async fn raw_response(addr: &str, request: &[u8]) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await??;
    Ok(String::from_utf8_lossy(&response).into_owned())
}
