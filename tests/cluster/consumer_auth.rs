//! API consumers known by a client certificate (mTLS, checked against each
//! policy's own CA) or by an opaque token an introspection endpoint vouches
//! for, through a real data plane.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::introspection::Introspection;
use gatehouse_e2e::{apply, bin, ctl, dir_contains, eventually, Cluster, Options};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// A client CA: its PEM and what signs with it.
struct ClientCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn client_ca(name: &str) -> ClientCa {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let pem = p.self_signed(&key).unwrap().pem();
    ClientCa {
        pem,
        issuer: Issuer::new(p, key),
    }
}

/// A client certificate (CN `cn`, client-auth usage) valid from `from` to
/// `to` days from now, with its key, as PEM.
fn client_cert(ca: &ClientCa, cn: &str, from: i64, to: i64) -> (String, String) {
    let at = |days: i64| {
        let step = Duration::from_secs(days.unsigned_abs() * 86_400);
        let t = if days < 0 {
            SystemTime::now() - step
        } else {
            SystemTime::now() + step
        };
        rcgen::date_time_ymd(1970, 1, 1) + t.duration_since(UNIX_EPOCH).unwrap()
    };
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names.push(SanType::DnsName(
        format!("{cn}.partners.test").try_into().unwrap(),
    ));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = at(from);
    p.not_after = at(to);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A YAML block scalar of `pem`, indented by `n` spaces.
fn block(pem: &str, n: usize) -> String {
    pem.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(n)))
        .collect()
}

/// An HTTP/1.1 connection to the TLS listener, with a client certificate
/// when given one.
async fn connect(
    addr: &str,
    server_ca: &CertificateDer<'static>,
    client: Option<&(String, String)>,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.clone())?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(key.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("api.example")?, tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A GET on `conn` with a forged identity header: status, headers, JSON body.
async fn call(
    conn: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
) -> anyhow::Result<(u16, http::HeaderMap, Value)> {
    conn.ready().await?;
    let req = http::Request::get(path)
        .header("host", "api.example")
        .header("x-consumer-name", "admin")
        .header("x-consumer-groups", "root")
        .body(Full::new(Bytes::new()))?;
    let resp = conn.send_request(req).await?;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, headers, serde_json::from_slice(&body)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_name_consumers_only_under_their_policy_ca() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start_tls("dp-1", std::slice::from_ref(&server), dir.path())?;
    let tls_addr = dp.tls.clone().expect("a TLS listener");
    let site = crate::protocols::pki(&["api.example"]);
    let (_, site_cert, site_key, _) = &site.leaves[0];
    let (ca_a, ca_b) = (client_ca("Partners A"), client_ca("Partners B"));
    let acme_a = client_cert(&ca_a, "acme", -1, 30);
    let acme_b = client_cert(&ca_b, "acme", -1, 30);
    let expired = client_cert(&ca_a, "acme", -30, -1);
    let stranger = client_cert(&ca_a, "stranger", -1, 30);
    std::fs::write(
        dir.path().join("mtls.yaml"),
        format!(
            "version: 1
consumers:
  - name: acme
    groups: [gold]
  - name: acme.partners.test
    groups: [mesh]
policies:
  - name: partners-a
    authentication: [mtls]
    mtls:
      ca_pem: |
{a}  - name: partners-b
    authentication: [mtls]
    mtls:
      consumer_from: san_dns
      ca_pem: |
{b}  - name: silver-only
    authentication: [mtls]
    mtls:
      ca_pem: |
{a}    authorization: {{ groups: [silver] }}
upstreams:
  - name: app
    targets: [{{ address: \"{upstream}\" }}]
routes:
  - name: a
    paths: [{{ prefix: /a }}]
    upstream: app
    policy: partners-a
  - name: b
    paths: [{{ prefix: /b }}]
    upstream: app
    policy: partners-b
  - name: silver
    paths: [{{ prefix: /silver }}]
    upstream: app
    policy: silver-only
certificates:
  - name: api
    server_names: [api.example]
    certificate_pem: |
{cert}    private_key_pem: |
{key}",
            a = block(&ca_a.pem, 8),
            b = block(&ca_b.pem, 8),
            upstream = upstream.addr,
            cert = block(site_cert, 6),
            key = block(site_key, 6),
        ),
    )?;
    apply(
        &server,
        dir.path().join("mtls.yaml").to_str().expect("a UTF-8 path"),
    );

    // A certificate of A's CA: its CN names the consumer; the forged
    // identity headers never reach the upstream.
    let mut conn = eventually(
        Duration::from_secs(10),
        "the TLS listener to serve api.example",
        || async { connect(&tls_addr, &site.ca, Some(&acme_a)).await.ok() },
    )
    .await?;
    let (status, _, echo) = eventually(Duration::from_secs(10), "route a", || async {
        let mut c = connect(&tls_addr, &site.ca, Some(&acme_a)).await.ok()?;
        call(&mut c, "/a/x").await.ok().filter(|r| r.0 != 404)
    })
    .await?;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "acme");
    assert_eq!(echo["headers"]["x-consumer-groups"], "gold");
    // On one connection: the same chain does not pass B's policy, and A's
    // outcome kept for the connection still holds for A.
    let (status, headers, problem) = call(&mut conn, "/b/x").await?;
    assert_eq!(status, 401, "{problem}");
    assert_eq!(
        headers["www-authenticate"],
        "ClientCertificate realm=\"gatehouse\""
    );
    assert_eq!(
        problem["type"],
        "https://gatehouse.dev/problems/unauthorized"
    );
    assert_eq!(call(&mut conn, "/a/y").await?.0, 200);
    // Authenticated, but not in the policy's groups.
    assert_eq!(call(&mut conn, "/silver/x").await?.0, 403);

    // B's certificate: refused by A, accepted by B (named by its DNS SAN).
    let mut conn = connect(&tls_addr, &site.ca, Some(&acme_b)).await?;
    assert_eq!(call(&mut conn, "/a/x").await?.0, 401, "another CA");
    let (status, _, echo) = call(&mut conn, "/b/x").await?;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "acme.partners.test");
    assert_eq!(echo["headers"]["x-consumer-groups"], "mesh");

    // No certificate, an expired one, one naming no consumer: 401.
    for (what, cert) in [
        ("no certificate", None),
        ("expired", Some(&expired)),
        ("unknown consumer", Some(&stranger)),
    ] {
        let mut conn = connect(&tls_addr, &site.ca, cert).await?;
        let (status, _, body) = call(&mut conn, "/a/x").await?;
        assert_eq!(status, 401, "{what}: {body}");
    }
    // Plain HTTP cannot carry a certificate at all.
    let plain = get(
        &format!("http://{}/a/x", dp.proxy),
        &[("x-consumer-name", "acme")],
    )
    .await?;
    assert_eq!(plain.status, 401);
    assert_eq!(upstream.hits.load(std::sync::atomic::Ordering::Relaxed), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_are_introspected_cached_and_refused_when_the_endpoint_fails(
) -> anyhow::Result<()> {
    let secret = "gateway-secret/with:odd&chars";
    let idp = Introspection::start("gatehouse", secret).await?;
    // With a secrets key, so the client secret is sealed at rest.
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("secrets.key");
    let key = std::process::Command::new(bin("gatehouse"))
        .args(["secrets", "generate-key"])
        .output()?;
    anyhow::ensure!(key.status.success(), "generate-key failed");
    std::fs::write(&key_file, &key.stdout)?;
    let cluster = Cluster::start(
        1,
        Options {
            secrets_key: Some(key_file.clone()),
            ..Options::default()
        },
    )
    .await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dp = DataPlaneProc::start_with_args(
        "dp-1",
        std::slice::from_ref(&server),
        dir.path(),
        &[
            "--allow-insecure-idp-loopback",
            "--secrets-key-file",
            key_file.to_str().expect("a UTF-8 path"),
        ],
    )?;
    let in_an_hour = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    idp.answer(
        "tok-acme",
        json!({ "active": true, "sub": "acme", "scope": "billing:read", "exp": in_an_hour }),
    );
    idp.answer(
        "tok-writer",
        json!({ "active": true, "username": "acme", "scope": "billing:read billing:write" }),
    );
    idp.answer("tok-revoked", json!({ "active": false, "sub": "acme" }));
    idp.answer("tok-later", json!({ "active": true, "sub": "acme" }));
    let introspection = format!(
        "{{ url: \"{}\", client_id: gatehouse, client_secret: \"{secret}\", cache_ttl: 60s, negative_cache_ttl: 1s, timeout: 1s }}",
        idp.url()
    );
    std::fs::write(
        dir.path().join("introspection.yaml"),
        format!(
            "version: 1
consumers:
  - name: acme
    groups: [gold]
policies:
  - name: opaque
    authentication: [introspection]
    introspection: {introspection}
  - name: writers
    authentication: [introspection]
    introspection: {introspection}
    authorization: {{ scopes: [billing:write] }}
upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: read
    paths: [{{ prefix: /read }}]
    upstream: app
    policy: opaque
  - name: write
    paths: [{{ prefix: /write }}]
    upstream: app
    policy: writers
",
            upstream.addr
        ),
    )?;
    apply(
        &server,
        dir.path()
            .join("introspection.yaml")
            .to_str()
            .expect("a UTF-8 path"),
    );
    let read = format!("http://{}/read/x", dp.proxy);
    let write = format!("http://{}/write/x", dp.proxy);

    // An active token names its consumer; forged identity headers are replaced.
    let reply = eventually(Duration::from_secs(10), "route read", || async {
        get(
            &read,
            &[
                ("authorization", "Bearer tok-acme"),
                ("x-consumer-name", "admin"),
            ],
        )
        .await
        .ok()
        .filter(|r| r.status != 404)
    })
    .await?;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let seen = &reply.json()?["headers"];
    assert_eq!(seen["x-consumer-name"], "acme");
    assert_eq!(seen["x-consumer-groups"], "gold");
    assert_eq!(idp.refused(), 0, "the client credentials were accepted");

    // Served from the cache: no further calls for the same token.
    let before = idp.calls("tok-acme");
    for _ in 0..5 {
        let r = get(&read, &[("authorization", "Bearer tok-acme")]).await?;
        assert_eq!(r.status, 200);
    }
    assert_eq!(idp.calls("tok-acme"), before, "answered from the cache");

    // Inactive, unknown or missing: 401 with a Bearer challenge.
    for (what, headers) in [
        ("inactive", vec![("authorization", "Bearer tok-revoked")]),
        ("unknown", vec![("authorization", "Bearer tok-nobody")]),
        ("none", vec![]),
    ] {
        let r = get(&read, &headers).await?;
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"gatehouse\"");
    }

    // Scopes: `tok-acme` lacks billing:write (403); `tok-writer` has it,
    // and names its consumer by `username`.
    assert_eq!(
        get(&write, &[("authorization", "Bearer tok-acme")])
            .await?
            .status,
        403
    );
    let r = get(&write, &[("authorization", "Bearer tok-writer")]).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?["headers"]["x-consumer-name"], "acme");

    // The endpoint fails (500), then is gone: 503, and nothing of it shows.
    idp.fail(true);
    let r = get(&read, &[("authorization", "Bearer tok-later")]).await?;
    assert_eq!(r.status, 503);
    let problem = r.json()?;
    assert_eq!(
        problem["type"],
        "https://gatehouse.dev/problems/auth-unavailable"
    );
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        !text.contains("127.0.0.1") && !text.contains("introspect"),
        "{text}"
    );
    // A failure is not cached: the endpoint back, the token passes.
    idp.fail(false);
    assert_eq!(
        get(&read, &[("authorization", "Bearer tok-later")])
            .await?
            .status,
        200
    );
    idp.stop();
    let r = get(&read, &[("authorization", "Bearer tok-writer")]).await?;
    assert_eq!(r.status, 503, "unreachable, and not cached for this policy");
    assert_eq!(
        get(&read, &[("authorization", "Bearer tok-acme")])
            .await?
            .status,
        200,
        "a cached answer still serves"
    );

    // The client secret is sealed at rest and never logged.
    let shown = ctl(&server, &["get", "policy", "opaque", "-o", "yaml"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("client_secret: gatehouse:sealed:v1:") && !shown.contains(secret),
        "{shown}"
    );
    assert!(!dir_contains(&cluster.node(1).data_dir, secret.as_bytes())?);
    assert!(!dir_contains(&dp.state_dir, secret.as_bytes())?);
    assert!(!cluster.node(1).log_text().contains(secret));
    assert!(!dp.log_text().contains(secret));
    Ok(())
}
