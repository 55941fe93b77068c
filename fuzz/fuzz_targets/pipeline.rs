//! Raw request bytes through the whole pipeline: a data plane's connection
//! handling (HTTP/1.1 or HTTP/2 detection, hyper's parser, the limits),
//! framing checks, path canonicalisation, routing, the firewall (address
//! lists, sizes, user agents, injection rules, CORS), API-key and JWT
//! authentication, rate limits and the body reader, over an in-memory
//! stream. The upstream refuses connections, so what gets that far ends
//! in a 502. Nothing may panic, and the connection must end once the client
//! has sent everything.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use gatehouse_data::compile::Compiled;
use gatehouse_data::node::serve_proxy_connection;
use gatehouse_data::proxy::Shared;
use gatehouse_data::resources::Limits;
use gatehouse_model::file::ConfigFile;
use gatehouse_model::ConfigState;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"
version: 1
upstreams:
  - name: nowhere
    targets: [{ address: "127.0.0.1:9" }]
    connect_timeout: 100ms
    request_timeout: 500ms
jwt_issuers:
  - name: partner
    issuer: partner
    audiences: [api]
    algorithms: [HS256]
    keys:
      - kid: k1
        secret: "0123456789abcdef0123456789abcdef"
consumers:
  - name: alice
    groups: [staff]
policies:
  - name: guarded
    firewall:
      deny_ips: [10.6.6.0/24]
      trusted_proxies: [127.0.0.1/32]
      allowed_methods: [GET, POST, PUT, OPTIONS]
      max_header_bytes: 8192
      max_body_bytes: 4096
      sql_injection: block
      xss: detect
      inspect_headers: [referer, cookie]
      inspect_body_bytes: 1024
      deny_user_agents: [sqlmap, "^nikto/"]
      cors:
        allowed_origins: ["https://app.example.com", "https://*.example.org"]
        allowed_methods: [GET, PUT]
        allowed_headers: [content-type, x-api-key]
        allow_credentials: true
    rate_limits:
      - name: per-ip
        key: [client_ip]
        limit: 1000000
        window: 1s
  - name: keys
    authentication: [api_key, jwt]
    api_key: { header: x-api-key, query_param: api_key }
    jwt: { issuers: [partner] }
    authorization:
      groups: [staff]
routes:
  - name: guarded
    paths: [{ prefix: /g }]
    upstream: nowhere
    policy: guarded
  - name: keys
    hosts: [api.example.com]
    paths: [{ prefix: /k }]
    strip_prefix: true
    upstream: nowhere
    policy: keys
  - name: raw
    paths: [{ prefix: /raw }]
    upstream: nowhere
    raw_path: true
  - name: regex
    paths: [{ regex: "^/r/[0-9]+$" }]
    methods: [GET]
    upstream: nowhere
"#;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
});

static SHARED: LazyLock<Arc<Shared>> = LazyLock::new(|| {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(2),
        body_read_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let shared = Arc::new(Shared::new(limits));
    let file = ConfigFile::parse(CONFIG, Path::new("fuzz.yaml")).expect("the fuzz config parses");
    let state = ConfigState::from_objects(1, file.into_objects());
    let compiled = RUNTIME.block_on(async { Compiled::build(&state, &shared) });
    shared
        .config
        .store(Some(Arc::new(compiled.expect("the fuzz config compiles"))));
    shared
});

fuzz_target!(|data: &[u8]| {
    let shared = SHARED.clone();
    RUNTIME.block_on(async move {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("an address");
        let connection = tokio::spawn(serve_proxy_connection(shared, server, peer));
        let (mut read, mut write) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = read.read_to_end(&mut out).await;
            out
        });
        let _ = write.write_all(data).await;
        let _ = write.shutdown().await;
        // Whatever was sent, the connection ends: the client is done.
        match tokio::time::timeout(Duration::from_secs(10), connection).await {
            Ok(result) => result.expect("the connection task does not panic"),
            Err(_) => panic!("the connection outlived its client by 10 s"),
        }
        drop(write);
        let _ = reader.await;
    });
});
