//! Valid example objects shared by the tests: each passes `validate_object`,
//! and a test changes one field to break exactly one rule.

use std::time::{Duration, SystemTime};

use crate::object::*;

pub const HASH_A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
pub const HASH_B: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";
pub const HMAC_SECRET: &str = "0123456789abcdef0123456789abcdef";
pub const CERT_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n";
pub const KEY_PEM: &str =
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n";
pub const PUBLIC_KEY_PEM: &str =
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYI\n-----END PUBLIC KEY-----\n";

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The smallest valid upstream: one target, every default.
pub fn upstream(name: &str) -> Upstream {
    Upstream {
        name: name.to_string(),
        labels: Labels::new(),
        revision: 0,
        targets: vec![Target {
            address: "127.0.0.1:9000".to_string(),
            weight: 1,
        }],
        balancer: Balancer::RoundRobin,
        hash_header: None,
        health_check: None,
        connect_timeout: defaults::connect_timeout(),
        request_timeout: defaults::request_timeout(),
        retries: Retries::default(),
        circuit_breaker: None,
        tls: None,
        protocol: Default::default(),
    }
}

/// An upstream that sets every optional field.
pub fn full_upstream(name: &str) -> Upstream {
    Upstream {
        labels: labels(&[
            ("team", "payments"),
            ("app.kubernetes.io/part-of", "billing"),
        ]),
        targets: vec![
            Target {
                address: "10.0.0.1:8080".to_string(),
                weight: 10,
            },
            Target {
                address: "billing-2.internal.example.com:8443".to_string(),
                weight: 1000,
            },
            Target {
                address: "[2001:db8::1]:443".to_string(),
                weight: 1,
            },
        ],
        balancer: Balancer::ConsistentHash,
        hash_header: Some("x-user-id".to_string()),
        health_check: Some(HealthCheck {
            path: "/healthz".to_string(),
            interval: Duration::from_secs(10),
            timeout: Duration::from_millis(1500),
            healthy_threshold: 3,
            unhealthy_threshold: 5,
        }),
        connect_timeout: Duration::from_millis(250),
        request_timeout: Duration::from_secs(120),
        retries: Retries {
            attempts: 3,
            non_idempotent: true,
        },
        circuit_breaker: Some(CircuitBreaker {
            consecutive_failures: 5,
            open_for: Duration::from_secs(30),
        }),
        tls: Some(UpstreamTls {
            server_name: Some("billing.internal.example.com".to_string()),
            ca_pem: Some(CERT_PEM.to_string()),
        }),
        protocol: UpstreamProtocol::Http2,
        ..upstream(name)
    }
}

/// The smallest valid route: one prefix, to `upstream`.
pub fn route(name: &str, upstream: &str) -> Route {
    Route {
        name: name.to_string(),
        labels: Labels::new(),
        revision: 0,
        hosts: Vec::new(),
        paths: vec![PathMatch {
            prefix: Some(format!("/{name}")),
            ..PathMatch::default()
        }],
        methods: Vec::new(),
        upstream: upstream.to_string(),
        strip_prefix: false,
        raw_path: false,
        policy: None,
    }
}

pub fn full_route(name: &str, upstream: &str, policy: &str) -> Route {
    Route {
        labels: labels(&[("team", "payments")]),
        hosts: strings(&["api.example.com", "*.example.org"]),
        paths: vec![
            PathMatch {
                prefix: Some("/billing".to_string()),
                ..PathMatch::default()
            },
            PathMatch {
                prefix: Some("/invoices/".to_string()),
                ..PathMatch::default()
            },
        ],
        methods: strings(&["GET", "POST"]),
        strip_prefix: true,
        policy: Some(policy.to_string()),
        ..route(name, upstream)
    }
}

/// A route whose paths use every kind of match (so it cannot strip a prefix).
pub fn regex_route(name: &str, upstream: &str) -> Route {
    Route {
        paths: vec![
            PathMatch {
                exact: Some("/billing".to_string()),
                ..PathMatch::default()
            },
            PathMatch {
                regex: Some(r"^/v[0-9]+/users/[^/]+$".to_string()),
                ..PathMatch::default()
            },
        ],
        ..route(name, upstream)
    }
}

/// A self-signed P-256 CA certificate (`CN=Fixture Client CA`, valid
/// until 2126), for policies that accept client certificates.
pub const CLIENT_CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBnjCCAUWgAwIBAgIUM8KMSVW2V9F8lvySeMPXxx8ivRswCgYIKoZIzj0EAwIw\nHDEaMBgGA1UEAwwRRml4dHVyZSBDbGllbnQgQ0EwIBcNMjYxMTI4MDQ0OTA3WhgP\nMjEyNjExMDQwNDQ5MDdaMBwxGjAYBgNVBAMMEUZpeHR1cmUgQ2xpZW50IENBMFkw\nEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEx4QOEcFgO10m+CO0YxMqZJFbA2GJr2QT\nT1GSHAZe5iGC0+kqivhnXrvLPdGIFbMOuTv4D4xqfkRLHkx+pab3cKNjMGEwHQYD\nVR0OBBYEFPj45xDM2WyO5Az2IbWlqMiDVG56MB8GA1UdIwQYMBaAFPj45xDM2WyO\n5Az2IbWlqMiDVG56MA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMAoG\nCCqGSM49BAMCA0cAMEQCICV//L0j9o8FncVHB8NP0EljuWlNvppVJq9X9GaFUL+Y\nAiBf9bqd5czzjIhClWgEzb/3JDDVWN2l9NInil9Ru02ekQ==\n-----END CERTIFICATE-----\n";

/// A self-signed certificate that is not a CA (`CN=leaf`).
pub const NOT_A_CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBcjCCARigAwIBAgIUJ4OeYE5Zs9aKQfVofN1AdCvcwO0wCgYIKoZIzj0EAwIw\nDzENMAsGA1UEAwwEbGVhZjAgFw0yNjExMjgwNDQ5MDdaGA8yMTI2MTEwNDA0NDkw\nN1owDzENMAsGA1UEAwwEbGVhZjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABL+B\nPhoSNEKlxNBeVKabuVLLv7rdN6NNMFy+V4P4EMygsw1pJKFzcarwta30mqJa/tDx\n50sdgJR85K8ZsgePdxOjUDBOMB0GA1UdDgQWBBRPgw9CAf1vL7b1e5xnGJwXzG10\nJDAfBgNVHSMEGDAWgBRPgw9CAf1vL7b1e5xnGJwXzG10JDAMBgNVHRMBAf8EAjAA\nMAoGCCqGSM49BAMCA0gAMEUCIBfj3NqW/oWVJXAl2aZvA9QhfpDrHQCQBiTXsjGj\nsjxxAiEAvtDtF5+QzwtPdr4gnZntqSD1C5jrqNXHptQrNRaCEvA=\n-----END CERTIFICATE-----\n";

/// A policy that authenticates no one and limits nothing.
pub fn policy(name: &str) -> Policy {
    Policy {
        name: name.to_string(),
        labels: Labels::new(),
        revision: 0,
        authentication: Vec::new(),
        api_key: None,
        jwt: None,
        mtls: None,
        introspection: None,
        authorization: Authorization::default(),
        rate_limits: Vec::new(),
        rate_limit_headers: true,
        quotas: Vec::new(),
        firewall: Firewall::default(),
    }
}

/// A policy that sets every optional field; its JWTs come from `issuer`.
pub fn full_policy(name: &str, issuer: &str) -> Policy {
    Policy {
        authentication: vec![AuthMethod::ApiKey, AuthMethod::Jwt, AuthMethod::Mtls],
        api_key: Some(ApiKeyAuth {
            header: "x-api-key".to_string(),
            query_param: Some("api_key".to_string()),
        }),
        jwt: Some(JwtAuth {
            issuers: vec![issuer.to_string()],
        }),
        mtls: Some(MtlsAuth {
            ca_pem: CLIENT_CA_PEM.to_string(),
            consumer_from: CertIdentity::SanDns,
        }),
        introspection: None,
        authorization: Authorization {
            groups: strings(&["admins", "billing-team"]),
            scopes: strings(&["billing:read"]),
            claims: vec![
                ClaimMatch {
                    claim: "tenant".to_string(),
                    equals: Some("acme".to_string()),
                    one_of: None,
                    contains: None,
                },
                ClaimMatch {
                    claim: "region".to_string(),
                    equals: None,
                    one_of: Some(strings(&["eu", "us"])),
                    contains: None,
                },
            ],
        },
        rate_limits: vec![
            RateLimit {
                name: "per-consumer".to_string(),
                scope: LimitScope::Cluster,
                key: strings(&["consumer", "route"]),
                limit: 100,
                window: Duration::from_secs(60),
                burst: 20,
                on_store_failure: StoreFailure::Local,
                lease: 5,
            },
            RateLimit {
                name: "per-ip".to_string(),
                scope: LimitScope::Local,
                key: strings(&["client_ip", "header:x-tenant"]),
                limit: 10,
                window: Duration::from_secs(1),
                burst: 0,
                on_store_failure: StoreFailure::Closed,
                lease: 0,
            },
        ],
        rate_limit_headers: false,
        quotas: vec![Quota {
            name: "daily".to_string(),
            period: QuotaPeriod::Day,
            limit: 10_000,
            on_store_failure: StoreFailure::Closed,
        }],
        firewall: Firewall {
            allow_ips: strings(&["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"]),
            deny_ips: strings(&["10.6.6.6"]),
            trusted_proxies: strings(&["127.0.0.1/32"]),
            max_body_bytes: Some(1 << 20),
            max_header_bytes: Some(16 * 1024),
            max_header_count: Some(100),
            max_uri_bytes: Some(8192),
            allowed_methods: strings(&["GET", "POST", "DELETE"]),
            sql_injection: RuleMode::Block,
            xss: RuleMode::Detect,
            inspect_headers: strings(&["referer", "cookie"]),
            inspect_body_bytes: 4096,
            deny_user_agents: strings(&["sqlmap", "^nikto/"]),
            cors: Some(Cors {
                allowed_origins: strings(&[
                    "https://app.example.com",
                    "http://localhost:3000",
                    "https://*.example.org",
                ]),
                allowed_methods: strings(&["GET", "POST"]),
                allowed_headers: strings(&["content-type", "x-api-key"]),
                allow_credentials: true,
                max_age: Duration::from_secs(3600),
            }),
        },
        ..policy(name)
    }
}

pub fn consumer(name: &str) -> Consumer {
    Consumer {
        name: name.to_string(),
        labels: labels(&[("tier", "gold")]),
        revision: 0,
        groups: strings(&["admins", "billing-team"]),
        metadata: [
            ("email", "ops@example.com"),
            ("note", "free text: any value"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    }
}

pub fn api_key(name: &str, consumer: &str) -> ApiKey {
    ApiKey {
        name: name.to_string(),
        labels: Labels::new(),
        revision: 0,
        consumer: consumer.to_string(),
        key_hash: HASH_A.to_string(),
        expires_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)),
        revoked: false,
    }
}

/// An issuer with a static HMAC secret.
pub fn jwt_issuer(name: &str) -> JwtIssuer {
    JwtIssuer {
        name: name.to_string(),
        labels: Labels::new(),
        revision: 0,
        issuer: "https://idp.example.com/".to_string(),
        audiences: strings(&["gatehouse"]),
        algorithms: vec![JwtAlgorithm::HS256, JwtAlgorithm::RS256],
        keys: vec![
            JwtKey {
                kid: Some("hmac-1".to_string()),
                pem: None,
                secret: Some(HMAC_SECRET.to_string()),
            },
            JwtKey {
                kid: Some("rsa-1".to_string()),
                pem: Some(PUBLIC_KEY_PEM.to_string()),
                secret: None,
            },
        ],
        jwks_url: None,
        jwks_refresh: None,
        jwks_cooldown: None,
        jwks_max_stale: None,
        leeway: defaults::jwt_leeway(),
        consumer_claim: defaults::consumer_claim(),
        max_token_bytes: defaults::max_token_bytes(),
    }
}

/// An issuer whose keys are fetched from a JWKS URL.
pub fn jwks_issuer(name: &str) -> JwtIssuer {
    JwtIssuer {
        algorithms: vec![
            JwtAlgorithm::RS256,
            JwtAlgorithm::ES256,
            JwtAlgorithm::EdDSA,
        ],
        keys: Vec::new(),
        jwks_url: Some("https://idp.example.com/.well-known/jwks.json".to_string()),
        leeway: Duration::ZERO,
        consumer_claim: "client_id".to_string(),
        max_token_bytes: 16 * 1024,
        ..jwt_issuer(name)
    }
}

pub fn certificate(name: &str) -> Certificate {
    Certificate {
        name: name.to_string(),
        labels: Labels::new(),
        revision: 0,
        server_names: strings(&["api.example.com", "*.example.org"]),
        certificate_pem: CERT_PEM.to_string(),
        private_key_pem: KEY_PEM.to_string(),
    }
}

pub fn admin_token(name: &str) -> AdminToken {
    AdminToken {
        name: name.to_string(),
        labels: Labels::new(),
        revision: 0,
        role: AdminRole::Editor,
        token_hash: HASH_B.to_string(),
    }
}

/// One valid object of every kind, in an order in which they can be applied
/// one by one to an empty state (everything referenced comes first).
pub fn one_of_each() -> Vec<Object> {
    vec![
        certificate("api-cert").into(),
        full_upstream("billing").into(),
        jwt_issuer("corp").into(),
        full_policy("strict", "corp").into(),
        full_route("billing", "billing", "strict").into(),
        consumer("acme").into(),
        api_key("acme-key-1", "acme").into(),
        admin_token("ci").into(),
    ]
}
