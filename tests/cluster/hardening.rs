//! Hostile request shapes against a real data plane, spoken as raw bytes so
//! that no client library normalises them first.

use std::time::Duration;

use gatehouse_e2e::data::{DataPlaneProc, Upstream};
use gatehouse_e2e::{ctl, eventually, Cluster, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as is and returns the status and the body.
async fn raw(addr: &str, request: &[u8]) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await??;
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
    Ok((status, body))
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
    let out = ctl(
        &cluster.node(1).admin,
        &["apply", "-f", file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
