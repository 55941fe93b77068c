//! What an operator sees of each request: the access log (one line per
//! request, no credential in it) and OpenTelemetry traces sent over OTLP to
//! a collector (here a stand-in that records what it is sent).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::{apply, ctl, eventually, Cluster, Options, TOKEN};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;

const JWT_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!!";

/// A route guarded by API keys (header or `api_key` query parameter) or a
/// JWT, with a rate limit, and a route that needs nothing.
fn write_config(dir: &Path, upstream: SocketAddr) -> anyhow::Result<String> {
    let file = dir.join("telemetry.yaml");
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
    keys: [{{ kid: k1, secret: \"{JWT_SECRET}\" }}]
policies:
  - name: guarded
    authentication: [api_key, jwt]
    api_key: {{ query_param: api_key }}
    jwt: {{ issuers: [corp] }}
    rate_limits:
      - name: per-consumer
        key: [consumer]
        limit: 1000
        window: 1m
upstreams:
  - name: app
    targets: [{{ address: \"{upstream}\" }}]
routes:
  - name: billing
    paths: [{{ prefix: /billing }}]
    upstream: app
    policy: guarded
  - name: open
    paths: [{{ prefix: /open }}]
    upstream: app
"
        ),
    )?;
    Ok(file.to_str().unwrap().to_string())
}

/// Applies the test's configuration. One write goes first: the first write
/// through the not-yet-stored bootstrap token stores it in the same command,
/// which makes a planned `apply` as that first write fail with a revision
/// conflict (seen in `basic::apply_get_and_delete_through_gatehousectl`
/// too; not a telemetry matter).
fn apply_config(server: &str, dir: &Path, upstream: SocketAddr) -> anyhow::Result<()> {
    let out = ctl(
        server,
        &["tokens", "create", "telemetry-test", "--role", "viewer"],
    );
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    apply(server, &write_config(dir, upstream)?);
    Ok(())
}

fn create_key(server: &str) -> anyhow::Result<String> {
    let out = ctl(server, &["keys", "create", "--consumer", "acme"]);
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn jwt() -> anyhow::Result<String> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({"sub": "acme", "iss": "https://id.corp.example", "aud": "gatehouse", "exp": now + 300});
    Ok(encode(
        &header,
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}

/// The trace id in the `traceparent` the upstream received.
fn upstream_trace(reply: &gatehouse_e2e::data::Reply) -> anyhow::Result<(String, String)> {
    let echo = reply.json()?;
    let tp = echo["headers"]["traceparent"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no traceparent upstream: {echo}"))?;
    let parts: Vec<&str> = tp.split('-').collect();
    anyhow::ensure!(parts.len() == 4 && parts[0] == "00", "bad traceparent {tp}");
    Ok((parts[1].to_string(), parts[2].to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_request_and_no_credential() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("access.log");
    let dp = DataPlaneProc::start_custom(
        "dp-1",
        std::slice::from_ref(&server),
        dir.path(),
        &["--access-log".to_string(), log.display().to_string()],
        Some(TOKEN),
    )?;
    apply_config(&server, dir.path(), upstream.addr)?;
    let key = create_key(&server)?;
    let token = jwt()?;
    let bearer = format!("Bearer {token}");
    let base = format!("http://{}", dp.proxy);

    // Wait for the key (and so the configuration) to reach the data plane;
    // these requests are logged too, and counted below.
    let mut sent = 0usize;
    eventually(Duration::from_secs(15), "the key to be accepted", || {
        sent += 1;
        let url = format!("{base}/billing/warmup");
        let key = key.clone();
        async move {
            get(&url, &[("x-api-key", &key)])
                .await
                .ok()
                .filter(|r| r.status == 200)
        }
    })
    .await?;

    let with_key = get(
        &format!("{base}/billing/invoices"),
        &[("x-api-key", &key), ("cookie", "session=cookie-secret-42")],
    )
    .await?;
    assert_eq!(with_key.status, 200);
    let query_key = get(&format!("{base}/billing/q?api_key={key}&page=2"), &[]).await?;
    assert_eq!(query_key.status, 200);
    let with_jwt = get(
        &format!("{base}/billing/%2e%2e/billing/./jwt"),
        &[("authorization", &bearer)],
    )
    .await?;
    assert_eq!(with_jwt.status, 200);
    let refused = get(
        &format!("{base}/billing/refused"),
        &[("authorization", "Bearer not-a-valid-token-secret-77")],
    )
    .await?;
    assert_eq!(refused.status, 401);
    let nowhere = get(&format!("{base}/nowhere"), &[]).await?;
    assert_eq!(nowhere.status, 404);
    sent += 5;

    // One line per request, written off the request path: wait for them.
    let text = eventually(Duration::from_secs(10), "every access-log line", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.lines().count() >= sent).then_some(text)
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", dp.log_tail()))?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), sent, "{text}");
    const FIELDS: [&str; 13] = [
        "time",
        "route",
        "consumer",
        "client_ip",
        "method",
        "path",
        "status",
        "bytes_out",
        "bytes_in",
        "upstream_ms",
        "total_ms",
        "limit",
        "trace_id",
    ];
    for line in &lines {
        for field in FIELDS {
            assert!(line.get(field).is_some(), "no {field} in {line}");
        }
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
        assert_eq!(line["client_ip"], "127.0.0.1");
        assert_eq!(line["method"], "GET");
        assert!(line["total_ms"].as_f64().unwrap() >= 0.0, "{line}");
    }
    let by_path = |path: &str| -> &serde_json::Value {
        let found: Vec<_> = lines.iter().filter(|l| l["path"] == path).collect();
        assert_eq!(found.len(), 1, "one line for {path}: {text}");
        found[0]
    };

    let line = by_path("/billing/invoices");
    assert_eq!(line["route"], "billing");
    assert_eq!(line["consumer"], "acme");
    assert_eq!(line["status"], 200);
    assert_eq!(line["limit"], "allowed");
    assert_eq!(line["bytes_out"].as_u64(), Some(with_key.body.len() as u64));
    assert!(line["upstream_ms"].as_f64().unwrap() >= 0.0, "{line}");
    assert!(
        line["upstream_ms"].as_f64() <= line["total_ms"].as_f64(),
        "{line}"
    );
    // The trace id is the one the upstream was sent.
    assert_eq!(line["trace_id"], upstream_trace(&with_key)?.0);

    // The query string is not logged: it held the key.
    let line = by_path("/billing/q");
    assert_eq!(line["consumer"], "acme");
    assert_eq!(line["trace_id"], upstream_trace(&query_key)?.0);

    // The canonical path, as routed.
    let line = by_path("/billing/jwt");
    assert_eq!(line["consumer"], "acme");
    assert_eq!(line["status"], 200);

    let line = by_path("/billing/refused");
    assert_eq!(line["status"], 401);
    assert_eq!(line["route"], "billing");
    assert!(line["consumer"].is_null(), "{line}");
    assert!(line["upstream_ms"].is_null(), "{line}");
    assert!(line["limit"].is_null(), "refused before the limits: {line}");

    let line = by_path("/nowhere");
    assert_eq!(line["status"], 404);
    assert!(line["route"].is_null(), "{line}");

    // No credential, in whole or in part, anywhere in the log.
    let secret_part = key.rsplit('_').next().unwrap();
    let jwt_signature = token.rsplit('.').next().unwrap();
    for needle in [
        key.as_str(),
        secret_part,
        token.as_str(),
        jwt_signature,
        "not-a-valid-token-secret-77",
        "cookie-secret-42",
        "api_key=",
        "page=2",
    ] {
        assert!(!text.contains(needle), "the access log holds {needle:?}");
    }
    Ok(())
}

/// An OTLP/gRPC collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start() -> anyhow::Result<(Collector, SocketAddr, tokio::task::JoinHandle<()>)> {
        Self::start_with(None).await
    }

    /// A collector that only speaks TLS, with a certificate for 127.0.0.1
    /// from `cert`'s CA.
    async fn start_with(
        tls: Option<&gatehouse_e2e::certs::LoopbackCert>,
    ) -> anyhow::Result<(Collector, SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        let mut server = tonic::transport::Server::builder();
        if let Some(cert) = tls {
            server = server.tls_config(tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&cert.cert_pem, &cert.key_pem),
            ))?;
        }
        let task = tokio::spawn(async move {
            let _ = server
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok((collector, addr, task))
    }

    /// The spans of one trace (hex id) received so far.
    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex::encode(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    }
}

const STAGES: [&str; 6] = [
    "route",
    "firewall",
    "auth",
    "rate_limit",
    "rewrite",
    "upstream",
];

/// Waits for the request span and one span per stage of `trace_id`.
async fn whole_trace(collector: &Collector, trace_id: &str) -> anyhow::Result<Vec<Span>> {
    eventually(
        Duration::from_secs(30),
        "the trace at the collector",
        || {
            let spans = collector.trace(trace_id);
            async move { (spans.len() > STAGES.len()).then_some(spans) }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_request_is_traced_over_otlp_with_a_span_per_stage() -> anyhow::Result<()> {
    let (collector, collector_addr, collector_task) = Collector::start().await?;
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlaneProc::start_custom(
        "dp-1",
        std::slice::from_ref(&server),
        dir.path(),
        &[
            "--otlp-endpoint".to_string(),
            format!("http://{collector_addr}"),
            "--trace-sample-ratio".to_string(),
            "1".to_string(),
        ],
        Some(TOKEN),
    )?;
    apply_config(&server, dir.path(), upstream.addr)?;
    let key = create_key(&server)?;
    let url = format!("http://{}/billing/traced", dp.proxy);
    eventually(
        Duration::from_secs(15),
        "the key to be accepted",
        || async {
            get(&url, &[("x-api-key", &key)])
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await?;

    // A client that says "not sampled": the same trace id goes upstream,
    // and no span is recorded. Sent first, so that its spans, if any were
    // wrongly recorded, would be exported before those awaited below.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = get(
        &url,
        &[
            ("x-api-key", &key),
            (
                "traceparent",
                &format!("00-{unsampled_trace}-b7ad6b7169203331-00"),
            ),
        ],
    )
    .await?;
    let (seen, _) = upstream_trace(&unsampled)?;
    assert_eq!(seen, unsampled_trace);
    assert!(unsampled.json()?["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .ends_with("-00"));

    // A client's sampled traceparent is the parent of the gateway's spans.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let reply = get(
        &url,
        &[
            ("x-api-key", &key),
            (
                "traceparent",
                &format!("00-{client_trace}-{client_span}-01"),
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await?;
    assert_eq!(reply.status, 200);
    let (seen_trace, seen_parent) = upstream_trace(&reply)?;
    assert_eq!(
        seen_trace, client_trace,
        "the upstream is in the client's trace"
    );
    assert_eq!(reply.json()?["headers"]["tracestate"], "congo=t61rcWkgMzE");

    let spans = whole_trace(&collector, client_trace)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", dp.log_tail()))?;
    let named = |name: &str| -> &Span {
        let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span in {spans:#?}");
        found[0]
    };
    let request = named("request");
    assert_eq!(hex::encode(&request.parent_span_id), client_span);
    assert_eq!(request.kind, SpanKind::Server as i32);
    for stage in STAGES {
        let span = named(stage);
        assert_eq!(
            span.parent_span_id, request.span_id,
            "{stage} is a child of the request span"
        );
        assert!(span.start_time_unix_nano >= request.start_time_unix_nano);
        assert!(span.end_time_unix_nano <= request.end_time_unix_nano);
    }
    assert_eq!(spans.len(), 1 + STAGES.len(), "{spans:#?}");
    // The upstream's parent is the gateway's upstream span.
    let upstream_span = named("upstream");
    assert_eq!(upstream_span.kind, SpanKind::Client as i32);
    assert_eq!(hex::encode(&upstream_span.span_id), seen_parent);
    let attribute = |span: &Span, key: &str| {
        span.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .map(|v| format!("{v:?}"))
            .unwrap_or_default()
    };
    assert!(attribute(request, "http.route").contains("billing"));
    assert!(attribute(request, "http.response.status_code").contains("200"));

    // Without a traceparent the gateway starts the trace, and the upstream
    // gets the new trace's id.
    let fresh = get(&url, &[("x-api-key", &key)]).await?;
    let (fresh_trace, _) = upstream_trace(&fresh)?;
    let spans = whole_trace(&collector, &fresh_trace).await?;
    let root: Vec<_> = spans.iter().filter(|s| s.name == "request").collect();
    assert_eq!(root.len(), 1, "{spans:#?}");
    assert!(
        root[0].parent_span_id.is_empty(),
        "a new trace has no parent"
    );

    assert!(
        collector.trace(unsampled_trace).is_empty(),
        "an unsampled request was recorded"
    );
    drop(dp);
    collector_task.abort();
    Ok(())
}

/// Traces to a collector that speaks only TLS (`https://` and
/// `--otlp-ca-file`): the request's spans arrive. A CA file with an
/// `http://` endpoint, or one without a certificate, stops the data plane
/// at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_a_collector_over_tls() -> anyhow::Result<()> {
    let cert = gatehouse_e2e::certs::LoopbackCert::new()?;
    let (collector, collector_addr, collector_task) = Collector::start_with(Some(&cert)).await?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("collector-ca.pem");
    std::fs::write(&ca, &cert.ca_pem)?;
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let upstream = Upstream::start("app").await?;
    let dp = DataPlaneProc::start_custom(
        "dp-1",
        std::slice::from_ref(&server),
        dir.path(),
        &[
            "--otlp-endpoint".to_string(),
            format!("https://{collector_addr}"),
            "--otlp-ca-file".to_string(),
            ca.display().to_string(),
        ],
        Some(TOKEN),
    )?;
    apply_config(&server, dir.path(), upstream.addr)?;
    let key = create_key(&server)?;
    let url = format!("http://{}/billing/traced", dp.proxy);
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    eventually(Duration::from_secs(15), "a traced request", || async {
        get(
            &url,
            &[
                ("x-api-key", &key),
                ("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01")),
            ],
        )
        .await
        .ok()
        .filter(|r| r.status == 200)
    })
    .await?;
    let spans = whole_trace(&collector, trace)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", dp.log_tail()))?;
    assert!(spans.iter().any(|s| s.name == "request"), "{spans:#?}");
    collector_task.abort();

    // Refused at start, saying why.
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello\n")?;
    for (endpoint, file, says) in [
        (
            format!("https://{collector_addr}"),
            &not_pem,
            "--otlp-ca-file: no PEM certificate",
        ),
        (
            format!("http://{collector_addr}"),
            &ca,
            "--otlp-ca-file is for an https:// --otlp-endpoint",
        ),
    ] {
        let out = std::process::Command::new(gatehouse_e2e::bin("gatehouse"))
            .args(["data-plane", "--control-plane", &server])
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .args(["--otlp-endpoint", &endpoint, "--otlp-ca-file"])
            .arg(file)
            .env("GATEHOUSE_TOKEN", TOKEN)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{endpoint}: started");
        assert!(stderr.contains(says), "{endpoint}: {stderr}");
    }
    Ok(())
}
