//! TLS with certificates chosen by SNI, HTTP/2 (ALPN and cleartext), and
//! WebSocket upgrades through a real data plane.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gatehouse_e2e::data::{DataPlaneProc, Upstream};
use gatehouse_e2e::{apply, eventually, Cluster, Options};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A development CA and a leaf certificate per name.
pub(crate) struct Pki {
    pub(crate) ca: CertificateDer<'static>,
    pub(crate) leaves: Vec<(String, String, String, CertificateDer<'static>)>,
}

pub(crate) fn pki(names: &[&str]) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaves = names
        .iter()
        .map(|name| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (
                name.to_string(),
                cert.pem(),
                key.serialize_pem(),
                cert.der().clone(),
            )
        })
        .collect();
    Pki {
        ca: ca_cert.der().clone(),
        leaves,
    }
}

/// Connects with TLS, offering `alpn`, and returns the stream.
pub(crate) async fn connect(
    addr: &str,
    sni: &str,
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

async fn h2_get<S>(
    io: S,
    authority: &str,
    path: &str,
) -> anyhow::Result<(http::Response<()>, serde_json::Value)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(io),
    )
    .await?;
    tokio::spawn(conn);
    let req =
        http::Request::get(format!("https://{authority}{path}")).body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((
        http::Response::from_parts(parts, ()),
        serde_json::from_slice(&body)?,
    ))
}

async fn h1_get<S>(io: S, host: &str, path: &str) -> anyhow::Result<(u16, serde_json::Value)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_by_sni_http2_and_websocket_through_the_proxy() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let upstream = Upstream::start("echo").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start_tls("dp-1", &[cluster.node(1).admin.clone()], dir.path())?;
    // The third is a replacement for the first, with a new key.
    let pki = pki(&["a.example", "b.example", "a.example"]);

    let mut yaml = format!(
        "version: 1\nupstreams:\n  - name: echo\n    targets: [{{ address: \"{}\" }}]\nroutes:\n  - name: echo\n    paths: [{{ prefix: /echo }}]\n    upstream: echo\ncertificates:\n",
        upstream.addr
    );
    let certificate = |(name, cert, key, _): &(String, String, String, CertificateDer<'static>)| {
        let indent = |pem: &str| {
            pem.lines()
                .map(|l| format!("      {l}\n"))
                .collect::<String>()
        };
        format!(
            "  - name: {}\n    server_names: [{name}]\n    certificate_pem: |\n{}    private_key_pem: |\n{}",
            name.replace('.', "-"),
            indent(cert),
            indent(key)
        )
    };
    for leaf in &pki.leaves[..2] {
        yaml.push_str(&certificate(leaf));
    }
    let file = dir.path().join("tls.yaml");
    std::fs::write(&file, yaml)?;
    apply(&cluster.node(1).admin, file.to_str().unwrap());
    let tls_addr = dp.tls.clone().expect("tls listener");

    // SNI picks the certificate; ALPN picks HTTP/2.
    let stream = eventually(
        Duration::from_secs(10),
        "the certificate to be served",
        || async {
            connect(&tls_addr, "a.example", &pki.ca, &[b"h2", b"http/1.1"])
                .await
                .ok()
        },
    )
    .await?;
    let (_, session) = stream.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        session.peer_certificates().unwrap()[0],
        pki.leaves[0].3,
        "a.example's certificate"
    );
    let (resp, echo) = h2_get(stream, "a.example", "/echo/h2").await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(echo["path"], "/echo/h2");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");

    // Another name, another certificate; HTTP/1.1 when that is all the client offers.
    let stream = connect(&tls_addr, "b.example", &pki.ca, &[b"http/1.1"]).await?;
    assert_eq!(
        stream.get_ref().1.peer_certificates().unwrap()[0],
        pki.leaves[1].3
    );
    let (status, echo) = h1_get(stream, "b.example", "/echo/h1").await?;
    assert_eq!((status, echo["path"].as_str()), (200, Some("/echo/h1")));

    // A changed certificate is served on the next handshake, no restart.
    let swap = dir.path().join("swap.yaml");
    std::fs::write(
        &swap,
        format!("version: 1\ncertificates:\n{}", certificate(&pki.leaves[2])),
    )?;
    apply(&cluster.node(1).admin, swap.to_str().unwrap());
    eventually(
        Duration::from_secs(10),
        "the new certificate to be served",
        || async {
            let stream = connect(&tls_addr, "a.example", &pki.ca, &[b"h2"])
                .await
                .ok()?;
            (stream.get_ref().1.peer_certificates()?[0] == pki.leaves[2].3).then_some(())
        },
    )
    .await?;

    // An unknown name gets no certificate at all.
    assert!(connect(&tls_addr, "c.example", &pki.ca, &[b"h2"])
        .await
        .is_err());

    // HTTP/2 without TLS (prior knowledge) on the plain listener.
    let (resp, echo) = h2_get(
        TcpStream::connect(&dp.proxy).await?,
        "localhost",
        "/echo/h2c",
    )
    .await?;
    assert_eq!(
        (resp.status(), resp.version()),
        (http::StatusCode::OK, http::Version::HTTP_2)
    );
    assert_eq!(echo["path"], "/echo/h2c");

    // A WebSocket handshake is relayed and the connection spliced both ways.
    let mut ws = TcpStream::connect(&dp.proxy).await?;
    ws.write_all(
        b"GET /echo/ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if ws.read(&mut byte).await? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    ws.write_all(b"ping through the gateway").await?;
    let mut echoed = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut echoed)).await??;
    assert_eq!(&echoed, b"ping through the gateway");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_passes_through_to_an_http2_upstream_with_its_status() -> anyhow::Result<()> {
    // The upstream is a real gRPC server: a control-plane node's admin API.
    let cluster = Cluster::start(1, Options::default()).await?;
    let admin = cluster.node(1).admin.clone();
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start("dp-1", std::slice::from_ref(&admin), dir.path())?;
    let file = dir.path().join("grpc.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\nupstreams:\n  - name: admin\n    protocol: http2\n    targets: [{{ address: \"{admin}\" }}]\nroutes:\n  - name: grpc\n    paths: [{{ prefix: /gatehouse.v1.Admin }}]\n    methods: [POST]\n    upstream: admin\n"
        ),
    )?;
    apply(&admin, file.to_str().unwrap());

    // A unary call through the gateway answers like the server itself.
    let status = eventually(
        Duration::from_secs(10),
        "a gRPC answer through the gateway",
        || async {
            let mut client = gatehouse_e2e::admin(&dp.proxy).await.ok()?;
            client
                .cluster_status(gatehouse_proto::pb::ClusterStatusRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        },
    )
    .await?;
    assert_eq!(status.leader_id, 1);
    assert_eq!(status.nodes.len(), 1);

    // An error status travels in the trailers and arrives intact.
    let mut client = gatehouse_e2e::admin(&dp.proxy).await?;
    let err = client
        .get(gatehouse_proto::pb::GetRequest {
            kind: "route".into(),
            name: "ghost".into(),
            stale: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "route \"ghost\" not found");
    Ok(())
}
