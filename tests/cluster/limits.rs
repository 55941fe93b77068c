//! Resource limits against a real data plane: slow clients (slowloris),
//! HTTP/2 rapid reset, the connection cap and load shedding. Each attack
//! runs while another client is served, and the attacking connections must
//! be closed by the gateway.

use std::sync::atomic::Ordering;
use std::time::Duration;

use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::{apply, eventually, Cluster, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A one-node cluster, an echo upstream and a data plane started with
/// `args`, serving one catch-all route.
async fn setup(
    args: &[&str],
) -> anyhow::Result<(Cluster, Upstream, DataPlaneProc, tempfile::TempDir)> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let upstream = Upstream::start("echo").await?;
    let dir = tempfile::tempdir()?;
    let dp =
        DataPlaneProc::start_with_args("dp-1", &[cluster.node(1).admin.clone()], dir.path(), args)?;
    let file = dir.path().join("routes.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\nupstreams:\n  - name: echo\n    targets: [{{ address: \"{}\" }}]\nroutes:\n  - name: echo\n    paths: [{{ prefix: / }}]\n    upstream: echo\n",
            upstream.addr
        ),
    )?;
    apply(&cluster.node(1).admin, file.to_str().unwrap());
    let url = format!("http://{}/", dp.proxy);
    eventually(
        Duration::from_secs(10),
        "the route to be served",
        || async { (get(&url, &[]).await.ok()?.status == 200).then_some(()) },
    )
    .await?;
    Ok((cluster, upstream, dp, dir))
}

/// Waits until the server closes `stream` (EOF or reset), reading and
/// discarding what it sends; false if it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Waits until the data plane counts `n` open client connections.
async fn open_connections(dp: &DataPlaneProc, n: u64) -> anyhow::Result<()> {
    let url = format!("http://{}/metrics", dp.ops);
    let line = format!("gatehouse_connections_open {n}\n");
    eventually(
        Duration::from_secs(10),
        &format!("{n} open connections"),
        || async {
            let reply = get(&url, &[]).await.ok()?;
            String::from_utf8_lossy(&reply.body)
                .contains(&line)
                .then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_after_the_header_read_timeout_and_others_are_served(
) -> anyhow::Result<()> {
    let (_cluster, _upstream, dp, _dir) = setup(&["--header-read-timeout", "2s"]).await?;
    let url = format!("http://{}/", dp.proxy);

    // Slowloris: many connections that start a request head and trickle
    // one header line at a time, never finishing; and some that say nothing.
    const TRICKLING: usize = 100;
    const SILENT: usize = 50;
    let mut trickling = Vec::new();
    for _ in 0..TRICKLING {
        let mut s = TcpStream::connect(&dp.proxy).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
        trickling.push(s);
    }
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(&dp.proxy).await?);
    }
    let attack = tokio::spawn(async move {
        // Keep trickling until every connection is closed by the gateway
        // (a write fails) or for at most 60 s.
        let mut open = trickling;
        for _ in 0..120 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut still = Vec::new();
            for mut s in open {
                if s.write_all(b"X-Slow: 1\r\n").await.is_ok() {
                    still.push(s);
                } else {
                    continue;
                }
            }
            open = still;
            if open.is_empty() {
                break;
            }
        }
        open
    });

    // Meanwhile another client is served, throughout.
    for _ in 0..10 {
        let reply = get(&url, &[]).await?;
        assert_eq!(reply.status, 200, "the gateway keeps serving others");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The silent connections are closed after the timeout, not held forever.
    for s in &mut silent {
        assert!(
            closed_within(s, Duration::from_secs(20)).await,
            "a silent connection must be closed after the header read timeout"
        );
    }
    // The trickling ones too, though they kept sending bytes.
    let left = attack.await?;
    assert!(
        left.is_empty(),
        "{} trickling connections were still open after 60 s",
        left.len()
    );
    assert_eq!(get(&url, &[]).await?.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_closes_the_attacking_connection_and_others_are_served(
) -> anyhow::Result<()> {
    let (_cluster, upstream, dp, _dir) = setup(&[]).await?;
    let url = format!("http://{}/", dp.proxy);

    // An HTTP/2 client that opens streams and cancels them at once, over and over.
    let tcp = TcpStream::connect(&dp.proxy).await?;
    let (mut client, connection) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(connection);
    let mut sent = 0u32;
    let mut refused = None;
    for _ in 0..20_000 {
        let ready = tokio::time::timeout(Duration::from_secs(10), client.ready()).await;
        client = match ready {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                refused = Some(e);
                break;
            }
            Err(_) => anyhow::bail!("the HTTP/2 connection stalled"),
        };
        let request = http::Request::get(format!("http://{}/", dp.proxy)).body(())?;
        match client.send_request(request, true) {
            Ok((_response, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let Some(e) = refused else {
        anyhow::bail!("20000 reset streams and the connection is still open");
    };
    // The gateway ended the connection, telling the client to calm down.
    assert!(
        e.is_go_away() || e.is_io() || e.reason().is_some(),
        "unexpected error after {sent} streams: {e}"
    );
    if let Some(reason) = e.reason() {
        assert_eq!(
            reason,
            h2::Reason::ENHANCE_YOUR_CALM,
            "after {sent} streams: {e}"
        );
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(ended.is_ok(), "the attacking connection must be closed");

    // The upstream was spared most of the attack, and others are served.
    let hits = upstream.hits.load(Ordering::Relaxed);
    assert!(
        hits < u64::from(sent),
        "{hits} of {sent} cancelled streams reached the upstream"
    );
    for _ in 0..5 {
        assert_eq!(get(&url, &[]).await?.status, 200);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_cap_is_closed_at_once() -> anyhow::Result<()> {
    let (_cluster, _upstream, dp, _dir) =
        setup(&["--max-connections", "20", "--header-read-timeout", "60s"]).await?;
    // Start from no open client connection (the setup's have ended).
    open_connections(&dp, 0).await?;
    // Connections past the cap are closed at once, those within it stay open.
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(TcpStream::connect(&dp.proxy).await?);
    }
    open_connections(&dp, 20).await?;
    let mut extra = TcpStream::connect(&dp.proxy).await?;
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)).await,
        "the 21st connection must be closed"
    );
    let mut first = conns.remove(0);
    assert!(
        !closed_within(&mut first, Duration::from_millis(500)).await,
        "a connection within the cap stays open"
    );
    // Within the cap, a request is served; once slots free up, new clients are too.
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    first.read_to_end(&mut response).await?;
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&response)
    );
    drop(conns);
    let url = format!("http://{}/", dp.proxy);
    eventually(Duration::from_secs(10), "a new client served", || async {
        (get(&url, &[]).await.ok()?.status == 200).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_cap_requests_are_shed_with_503() -> anyhow::Result<()> {
    let (_cluster, upstream, dp, _dir) = setup(&["--max-requests-in-flight", "2"]).await?;
    let before = upstream.hits.load(Ordering::Relaxed);
    // Two requests the upstream holds for 2 s fill the cap.
    let slow = format!("http://{}/slow", dp.proxy);
    let a = tokio::spawn({
        let slow = slow.clone();
        async move { get(&slow, &[]).await }
    });
    let b = tokio::spawn(async move { get(&slow, &[]).await });
    eventually(
        Duration::from_secs(5),
        "both slow requests upstream",
        || async { (upstream.hits.load(Ordering::Relaxed) >= before + 2).then_some(()) },
    )
    .await?;
    let url = format!("http://{}/", dp.proxy);
    let shed = get(&url, &[]).await?;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.headers["content-type"], "application/problem+json");
    assert_eq!(shed.headers["retry-after"], "1");
    assert_eq!(
        shed.json()?["type"],
        "https://gatehouse.dev/problems/overloaded"
    );
    assert_eq!(a.await??.status, 200);
    assert_eq!(b.await??.status, 200);
    // With the slots back, requests are served again.
    assert_eq!(get(&url, &[]).await?.status, 200);
    let metrics = get(&format!("http://{}/metrics", dp.ops), &[]).await?;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("gatehouse_requests_shed_total 1"),
        "the shed request is counted: {text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408() -> anyhow::Result<()> {
    let (_cluster, _upstream, dp, _dir) = setup(&["--body-read-timeout", "1s"]).await?;
    let mut s = TcpStream::connect(&dp.proxy).await?;
    // Ten bytes promised, three sent, then nothing.
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await?;
    let mut response = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut response))
        .await
        .map_err(|_| anyhow::anyhow!("no answer 20 s after the body stopped"))??;
    let text = String::from_utf8_lossy(&response[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("https://gatehouse.dev/problems/request-timeout"),
        "{text}"
    );
    Ok(())
}
