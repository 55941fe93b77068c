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
    // Over the body cap: by Content-Length up front, and while streaming a chunked body.
    let (status, _) = send(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world"
            .into(),
    )
    .await?;
    assert_eq!(status, 413);
    let (status, _) = send(
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\nhello \r\n6\r\nworld!\r\n0\r\n\r\n".into(),
    )
    .await?;
    assert_eq!(status, 413);
    let (status, _) = send(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".into(),
    )
    .await?;
    assert_eq!(status, 200, "within the cap");
    Ok(())
}
