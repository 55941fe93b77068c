//! `validate_object`: one valid example of every kind, then for each kind the
//! cases a user gets wrong, checked down to the message they would read.

use std::time::{Duration, SystemTime};

use super::{
    references, referrer_kinds, validate_object, InvalidObject, MAX_OBJECT_BYTES, MAX_PATH,
    MAX_REGEX_BYTES,
};
use crate::fixtures::*;
use crate::object::*;

/// Validates `object`, which must fail, and checks that the error names the
/// object itself, `field`, and reads exactly `display`.
#[track_caller]
fn assert_invalid(object: impl Into<Object>, field: &str, display: &str) -> InvalidObject {
    let object = object.into();
    let err = validate_object(&object).expect_err("object should be refused");
    assert_eq!(err.kind, object.kind(), "kind of {err}");
    assert_eq!(err.name, object.name(), "name of {err}");
    assert_eq!(err.field, field, "field of {err}");
    assert_eq!(err.to_string(), display);
    err
}

#[track_caller]
fn assert_valid(object: impl Into<Object>) {
    let object = object.into();
    if let Err(e) = validate_object(&object) {
        panic!("{} should be valid, got: {e}", object.object_ref());
    }
}

#[test]
fn a_valid_example_of_every_kind_passes() {
    let all = one_of_each();
    let mut kinds: Vec<Kind> = all.iter().map(Object::kind).collect();
    kinds.sort();
    let mut every = Kind::ALL.to_vec();
    every.sort();
    assert_eq!(kinds, every, "the examples cover every kind");
    for object in all {
        assert_valid(object);
    }
}

#[test]
fn minimal_and_variant_examples_pass() {
    assert_valid(upstream("u"));
    assert_valid(route("r", "u"));
    assert_valid(regex_route("r", "u"));
    assert_valid(policy("p"));
    assert_valid(jwks_issuer("j"));
    assert_valid(Consumer {
        groups: Vec::new(),
        metadata: Default::default(),
        labels: Labels::new(),
        ..consumer("c")
    });
    assert_valid(ApiKey {
        expires_at: None,
        revoked: true,
        ..api_key("k", "c")
    });
    for role in [AdminRole::Admin, AdminRole::Viewer, AdminRole::DataPlane] {
        assert_valid(AdminToken {
            role,
            ..admin_token("t")
        });
    }
    // Names at the edges of the rules.
    for name in ["a", "0", "a.b-c", "x1.y2", &"a".repeat(63)] {
        assert_valid(upstream(name));
    }
    // Plain http is fine for a JWKS on loopback.
    for url in [
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://localhost",
        "http://[::1]:9000/keys",
        "http://localhost:8080?tenant=a",
        "http://127.0.0.1/jwks?from=user@example.com",
    ] {
        assert_valid(JwtIssuer {
            jwks_url: Some(url.to_string()),
            ..jwks_issuer("j")
        });
    }
}

// ---------------------------------------------------------------- names, labels, size

#[test]
fn bad_names_are_refused_with_the_name_field() {
    assert_invalid(
        upstream("Billing"),
        "name",
        r#"upstream "Billing": name: "Billing" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
    let long = "a".repeat(64);
    assert_invalid(
        route(&long, "u"),
        "name",
        &format!(r#"route "{long}": name: "{long}" must be 1 to 63 characters long"#),
    );
    assert_invalid(
        policy("-strict"),
        "name",
        r#"policy "-strict": name: "-strict" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
    assert_invalid(
        consumer("acme."),
        "name",
        r#"consumer "acme.": name: "acme." may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
    assert_invalid(
        certificate("my_cert"),
        "name",
        r#"certificate "my_cert": name: "my_cert" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
    assert_invalid(
        admin_token(""),
        "name",
        r#"admin_token "": name: "" must be 1 to 63 characters long"#,
    );
    // Multi-byte characters count in bytes, and are refused anyway.
    assert_invalid(
        jwt_issuer("café"),
        "name",
        r#"jwt_issuer "café": name: "café" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
}

#[test]
fn bad_labels_are_refused() {
    let mut u = upstream("u");
    u.labels = labels(&[("bad key", "x")]);
    assert_invalid(
        u,
        "labels.bad key",
        r#"upstream "u": labels.bad key: label keys are 1 to 63 characters of a-z, A-Z, 0-9, '.', '_', '/' and '-'"#,
    );
    let mut u = upstream("u");
    u.labels = labels(&[("team", "pay ments")]);
    assert_invalid(
        u,
        "labels.team",
        r#"upstream "u": labels.team: label values are at most 63 characters of a-z, A-Z, 0-9, '.', '_' and '-'"#,
    );
    let mut u = upstream("u");
    u.labels = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
    assert_invalid(
        u,
        "labels",
        r#"upstream "u": labels: has 33 labels, at most 32 allowed"#,
    );
    // 32 labels with empty values are fine.
    let mut u = upstream("u");
    u.labels = (0..32).map(|i| (format!("k{i}"), String::new())).collect();
    assert_valid(u);
}

#[test]
fn an_object_over_the_size_limit_fails_as_a_whole() {
    let mut cert = certificate("huge");
    cert.certificate_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        "A".repeat(70 * 1024)
    );
    let object = Object::from(cert);
    let size = serde_json::to_vec(&object).unwrap().len();
    assert!(size > MAX_OBJECT_BYTES);
    assert_invalid(
        object,
        "(object)",
        &format!(r#"certificate "huge": (object): is {size} bytes, at most 65536 allowed"#),
    );

    // Just under the limit is accepted: the limit is on the encoding, not a guess.
    let mut cert = certificate("big");
    let base = serde_json::to_vec(&Object::from(cert.clone()))
        .unwrap()
        .len();
    cert.private_key_pem
        .push_str(&"B".repeat(MAX_OBJECT_BYTES - base));
    let object = Object::from(cert);
    assert_eq!(serde_json::to_vec(&object).unwrap().len(), MAX_OBJECT_BYTES);
    assert_valid(object.clone());
    let Object::Certificate(mut cert) = object else {
        unreachable!()
    };
    cert.private_key_pem.push('B');
    assert_invalid(
        cert,
        "(object)",
        r#"certificate "big": (object): is 65537 bytes, at most 65536 allowed"#,
    );
}

// ---------------------------------------------------------------- upstream

#[test]
fn upstream_targets_need_host_and_port() {
    let with_address = |address: &str| {
        let mut u = upstream("billing");
        u.targets.push(Target {
            address: address.to_string(),
            weight: 1,
        });
        u
    };
    assert_invalid(
        with_address("backend"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: "backend" is not host:port"#,
    );
    assert_invalid(
        with_address("backend:0"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: "backend:0" has port 0"#,
    );
    assert_invalid(
        with_address("backend:70000"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: "backend:70000" has an invalid port "70000""#,
    );
    assert_invalid(
        with_address("backend:"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: "backend:" has an invalid port """#,
    );
    assert_invalid(
        with_address("bad_host:80"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: "bad_host:80" has an invalid host "bad_host""#,
    );
    assert_invalid(
        with_address(":80"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: ":80" has an invalid host """#,
    );
    // An IPv6 address must be bracketed.
    assert_invalid(
        with_address("2001:db8::1:443"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: "2001:db8::1:443" has an invalid host "2001:db8::1""#,
    );
    assert_invalid(
        with_address("[not-v6]:443"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: "[not-v6]:443" has an invalid host "[not-v6]""#,
    );
    assert_invalid(
        with_address("Backend.example.com:80"),
        "targets[1].address",
        r#"upstream "billing": targets[1].address: "Backend.example.com:80" has an invalid host "Backend.example.com""#,
    );
    for ok in [
        "backend:1",
        "backend:65535",
        "[::1]:80",
        "192.0.2.1:443",
        "a-b.c:8080",
    ] {
        assert_valid(with_address(ok));
    }
}

#[test]
fn upstream_needs_targets_with_sane_weights() {
    let mut u = upstream("billing");
    u.targets.clear();
    assert_invalid(
        u,
        "targets",
        r#"upstream "billing": targets: needs at least an entry (1)"#,
    );
    let mut u = upstream("billing");
    u.targets[0].weight = 0;
    assert_invalid(
        u,
        "targets[0].weight",
        r#"upstream "billing": targets[0].weight: 0 is out of range (1 to 1000)"#,
    );
    let mut u = upstream("billing");
    u.targets = (0..257)
        .map(|i| Target {
            address: format!("10.0.{}.{}:80", i / 256, i % 256),
            weight: 1,
        })
        .collect();
    assert_invalid(
        u,
        "targets",
        r#"upstream "billing": targets: has 257 entries, at most 256 allowed"#,
    );
}

#[test]
fn consistent_hash_and_hash_header_go_together() {
    let mut u = upstream("billing");
    u.balancer = Balancer::ConsistentHash;
    assert_invalid(
        u.clone(),
        "hash_header",
        r#"upstream "billing": hash_header: is required by the consistent_hash balancer"#,
    );
    u.hash_header = Some("x user".to_string());
    assert_invalid(
        u,
        "hash_header",
        r#"upstream "billing": hash_header: "x user" is not a header name"#,
    );
    let mut u = upstream("billing");
    u.balancer = Balancer::LeastRequests;
    u.hash_header = Some("x-user".to_string());
    assert_invalid(
        u,
        "hash_header",
        r#"upstream "billing": hash_header: is only used by the consistent_hash balancer"#,
    );
}

#[test]
fn upstream_timeouts_are_bounded() {
    let mut u = upstream("billing");
    u.connect_timeout = Duration::ZERO;
    assert_invalid(
        u,
        "connect_timeout",
        r#"upstream "billing": connect_timeout: 0s is out of range (1ms to 1m)"#,
    );
    let mut u = upstream("billing");
    u.connect_timeout = Duration::from_secs(61);
    assert_invalid(
        u,
        "connect_timeout",
        r#"upstream "billing": connect_timeout: 1m 1s is out of range (1ms to 1m)"#,
    );
    let mut u = upstream("billing");
    u.request_timeout = Duration::from_secs(2 * 3600);
    assert_invalid(
        u,
        "request_timeout",
        r#"upstream "billing": request_timeout: 2h is out of range (1ms to 1h)"#,
    );
    let mut u = upstream("billing");
    u.retries.attempts = 11;
    assert_invalid(
        u,
        "retries.attempts",
        r#"upstream "billing": retries.attempts: 11 is out of range (0 to 10)"#,
    );
    let mut u = full_upstream("billing");
    u.circuit_breaker.as_mut().unwrap().open_for = Duration::from_millis(99);
    assert_invalid(
        u,
        "circuit_breaker.open_for",
        r#"upstream "billing": circuit_breaker.open_for: 99ms is out of range (100ms to 1h)"#,
    );
    // The bounds themselves are allowed.
    let mut u = upstream("billing");
    u.connect_timeout = Duration::from_millis(1);
    u.request_timeout = Duration::from_secs(3600);
    u.retries.attempts = 0;
    assert_valid(u);
}

#[test]
fn health_check_timeout_must_fit_in_the_interval() {
    let mut u = full_upstream("billing");
    let hc = u.health_check.as_mut().unwrap();
    hc.interval = Duration::from_secs(1);
    hc.timeout = Duration::from_secs(2);
    assert_invalid(
        u,
        "health_check.timeout",
        r#"upstream "billing": health_check.timeout: 2s is out of range (10ms to 1s)"#,
    );
    let mut u = full_upstream("billing");
    u.health_check.as_mut().unwrap().path = "healthz".to_string();
    assert_invalid(
        u,
        "health_check.path",
        r#"upstream "billing": health_check.path: must start with '/'"#,
    );
    let mut u = full_upstream("billing");
    u.health_check.as_mut().unwrap().unhealthy_threshold = 0;
    assert_invalid(
        u,
        "health_check.unhealthy_threshold",
        r#"upstream "billing": health_check.unhealthy_threshold: 0 is out of range (1 to 100)"#,
    );
}

#[test]
fn upstream_tls_is_checked() {
    let mut u = full_upstream("billing");
    u.tls.as_mut().unwrap().server_name = Some("Billing.example.com".to_string());
    assert_invalid(
        u,
        "tls.server_name",
        r#"upstream "billing": tls.server_name: "Billing.example.com" is not a host name"#,
    );
    let mut u = full_upstream("billing");
    u.tls.as_mut().unwrap().ca_pem = Some("not a pem".to_string());
    assert_invalid(
        u,
        "tls.ca_pem",
        r#"upstream "billing": tls.ca_pem: holds no PEM certificate"#,
    );
}

// ---------------------------------------------------------------- route

fn route_with_path(path: PathMatch) -> Route {
    Route {
        paths: vec![path],
        ..route("billing", "billing")
    }
}

fn regex_path(re: &str) -> PathMatch {
    PathMatch {
        regex: Some(re.to_string()),
        ..PathMatch::default()
    }
}

#[test]
fn an_invalid_regex_is_refused_with_the_parser_message_on_one_line() {
    let err = assert_invalid_prefix(
        route_with_path(regex_path("/billing/(")),
        "paths[0].regex",
        r#"route "billing": paths[0].regex: invalid regex: "#,
    );
    assert!(err.message.contains("unclosed group"), "{err}");
    assert!(!err.message.contains('\n'), "one line: {err}");
}

/// Like [`assert_invalid`], for messages that quote a library's text.
#[track_caller]
fn assert_invalid_prefix(object: impl Into<Object>, field: &str, prefix: &str) -> InvalidObject {
    let object = object.into();
    let err = validate_object(&object).expect_err("object should be refused");
    assert_eq!(
        (err.kind, err.name.as_str(), err.field.as_str()),
        (object.kind(), object.name(), field)
    );
    assert!(err.to_string().starts_with(prefix), "{err}");
    err
}

#[test]
fn a_regex_that_compiles_too_big_is_refused() {
    // Short to write, enormous to compile: the size limit must catch it.
    for re in [r"\w{1000}{1000}", r"a{1000}{1000}", r"[a-z]{100}{100}"] {
        assert!(re.len() <= MAX_PATH);
        let err = assert_invalid_prefix(
            route_with_path(regex_path(re)),
            "paths[0].regex",
            r#"route "billing": paths[0].regex: invalid regex: "#,
        );
        // Refused for its size (the message names the limit), not its syntax.
        assert!(
            err.message
                .contains(&format!("exceeds size limit of {MAX_REGEX_BYTES} bytes")),
            "{err}"
        );
    }
    // A modest bounded repetition is fine.
    assert_valid(route_with_path(regex_path(r"^/[a-z]{1,64}/[0-9]{1,20}$")));
}

#[test]
fn an_overlong_regex_is_refused_before_compiling() {
    let re = format!("/{}", "a".repeat(MAX_PATH));
    assert_invalid(
        route_with_path(regex_path(&re)),
        "paths[0].regex",
        r#"route "billing": paths[0].regex: is longer than 1024"#,
    );
}

#[test]
fn a_path_match_needs_exactly_one_kind() {
    let msg = r#"route "billing": paths[0]: needs exactly one of exact, prefix or regex"#;
    assert_invalid(
        route_with_path(PathMatch {
            exact: Some("/a".to_string()),
            prefix: Some("/a".to_string()),
            regex: None,
        }),
        "paths[0]",
        msg,
    );
    assert_invalid(
        route_with_path(PathMatch {
            exact: None,
            prefix: Some("/a".to_string()),
            regex: Some("^/a".to_string()),
        }),
        "paths[0]",
        msg,
    );
    assert_invalid(route_with_path(PathMatch::default()), "paths[0]", msg);
    // The index points at the bad entry.
    let mut r = route("billing", "billing");
    r.paths.push(PathMatch {
        exact: Some("/x".to_string()),
        regex: Some("/x".to_string()),
        prefix: None,
    });
    assert_invalid(
        r,
        "paths[1]",
        r#"route "billing": paths[1]: needs exactly one of exact, prefix or regex"#,
    );
}

#[test]
fn route_paths_must_be_absolute() {
    assert_invalid(
        route_with_path(PathMatch {
            prefix: Some("billing".to_string()),
            ..PathMatch::default()
        }),
        "paths[0]",
        r#"route "billing": paths[0]: "billing" must start with '/', hold no control characters and be at most 1024 long"#,
    );
    assert_invalid(
        route_with_path(PathMatch {
            exact: Some("/bil\nling".to_string()),
            ..PathMatch::default()
        }),
        "paths[0]",
        r#"route "billing": paths[0]: "/bil\nling" must start with '/', hold no control characters and be at most 1024 long"#,
    );
    let mut r = route("billing", "billing");
    r.paths.clear();
    assert_invalid(
        r,
        "paths",
        r#"route "billing": paths: needs at least an entry (1)"#,
    );
}

#[test]
fn strip_prefix_needs_prefix_paths() {
    let mut r = regex_route("billing", "billing");
    r.strip_prefix = true;
    assert_invalid(
        r,
        "strip_prefix",
        r#"route "billing": strip_prefix: needs every path to be a prefix match"#,
    );
    let mut r = full_route("billing", "billing", "strict");
    r.paths.push(PathMatch {
        exact: Some("/exact".to_string()),
        ..PathMatch::default()
    });
    assert_invalid(
        r,
        "strip_prefix",
        r#"route "billing": strip_prefix: needs every path to be a prefix match"#,
    );
}

#[test]
fn route_hosts_methods_and_references_are_checked() {
    let mut r = route("billing", "billing");
    r.hosts = vec!["api.example.com".to_string(), "API.example.com".to_string()];
    assert_invalid(
        r,
        "hosts[1]",
        r#"route "billing": hosts[1]: "API.example.com" is not a lower-case host name or *. wildcard"#,
    );
    let mut r = route("billing", "billing");
    r.hosts = vec!["a.example.com".to_string(), "a.example.com".to_string()];
    assert_invalid(
        r,
        "hosts[1]",
        r#"route "billing": hosts[1]: "a.example.com" is listed twice"#,
    );
    let mut r = route("billing", "billing");
    r.hosts = vec!["*example.com".to_string()];
    assert_invalid(
        r,
        "hosts[0]",
        r#"route "billing": hosts[0]: "*example.com" is not a lower-case host name or *. wildcard"#,
    );
    let mut r = route("billing", "billing");
    r.methods = vec!["get".to_string()];
    assert_invalid(
        r,
        "methods[0]",
        r#"route "billing": methods[0]: "get" is not an upper-case method name"#,
    );
    let mut r = route("billing", "billing");
    r.methods = vec!["GET".to_string(), "GET".to_string()];
    assert_invalid(
        r,
        "methods[1]",
        r#"route "billing": methods[1]: "GET" is listed twice"#,
    );
    assert_invalid(
        route("billing", "Billing"),
        "upstream",
        r#"route "billing": upstream: "Billing" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
    let mut r = route("billing", "billing");
    r.policy = Some(String::new());
    assert_invalid(
        r,
        "policy",
        r#"route "billing": policy: "" must be 1 to 63 characters long"#,
    );
}

// ---------------------------------------------------------------- policy

#[test]
fn bad_cidrs_are_refused() {
    let mut p = full_policy("strict", "corp");
    p.firewall.allow_ips.push("10.0.0.0/33".to_string());
    assert_invalid(
        p,
        "firewall.allow_ips[3]",
        r#"policy "strict": firewall.allow_ips[3]: "10.0.0.0/33" is not an IP address or CIDR network"#,
    );
    // Leading zeros: the data plane's parser refuses them, so validation
    // does too (a fuzz run found the two disagreeing).
    let mut p = policy("strict");
    p.firewall.allow_ips = vec!["1.00.0.0/8".to_string()];
    assert_invalid(
        p,
        "firewall.allow_ips[0]",
        r#"policy "strict": firewall.allow_ips[0]: "1.00.0.0/8" is not an IP address or CIDR network"#,
    );
    let mut p = policy("strict");
    p.firewall.deny_ips = vec!["192.168.1.1".to_string(), "not-an-ip".to_string()];
    assert_invalid(
        p,
        "firewall.deny_ips[1]",
        r#"policy "strict": firewall.deny_ips[1]: "not-an-ip" is not an IP address or CIDR network"#,
    );
    let mut p = policy("strict");
    p.firewall.trusted_proxies = vec!["256.0.0.1/32".to_string()];
    assert_invalid(
        p,
        "firewall.trusted_proxies[0]",
        r#"policy "strict": firewall.trusted_proxies[0]: "256.0.0.1/32" is not an IP address or CIDR network"#,
    );
}

#[test]
fn policy_authentication_settings_must_agree() {
    let mut p = policy("strict");
    p.jwt = Some(JwtAuth {
        issuers: vec!["corp".to_string()],
    });
    assert_invalid(
        p,
        "jwt",
        r#"policy "strict": jwt: is set but authentication does not list jwt"#,
    );
    let mut p = policy("strict");
    p.authentication = vec![AuthMethod::Jwt];
    assert_invalid(
        p,
        "jwt",
        r#"policy "strict": jwt: is required when authentication lists jwt"#,
    );
    let mut p = policy("strict");
    p.api_key = Some(ApiKeyAuth {
        header: "x-api-key".to_string(),
        query_param: None,
    });
    assert_invalid(
        p,
        "api_key",
        r#"policy "strict": api_key: is set but authentication does not list api_key"#,
    );
    let mut p = full_policy("strict", "corp");
    p.authentication.push(AuthMethod::ApiKey);
    assert_invalid(
        p,
        "authentication[3]",
        r#"policy "strict": authentication[3]: ApiKey is listed twice"#,
    );
    let mut p = full_policy("strict", "corp");
    p.jwt.as_mut().unwrap().issuers.clear();
    assert_invalid(
        p,
        "jwt.issuers",
        r#"policy "strict": jwt.issuers: needs at least an entry (1)"#,
    );
    let mut p = full_policy("strict", "corp");
    p.jwt.as_mut().unwrap().issuers.push("Corp".to_string());
    assert_invalid(
        p,
        "jwt.issuers[1]",
        r#"policy "strict": jwt.issuers[1]: "Corp" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
}

#[test]
fn authorization_needs_authentication() {
    let mut p = policy("strict");
    p.authorization.groups = vec!["admins".to_string()];
    assert_invalid(
        p,
        "authorization",
        r#"policy "strict": authorization: needs an authentication method to know who the caller is"#,
    );
    let mut p = full_policy("strict", "corp");
    p.authorization.claims[1].contains = Some("x".to_string());
    assert_invalid(
        p,
        "authorization.claims[1]",
        r#"policy "strict": authorization.claims[1]: needs exactly one of equals, one_of or contains"#,
    );
}

#[test]
fn rate_limits_are_checked() {
    let mut p = full_policy("strict", "corp");
    p.rate_limits[1].key = vec!["client_ip".to_string(), "user".to_string()];
    assert_invalid(
        p,
        "rate_limits[1].key[1]",
        r#"policy "strict": rate_limits[1].key[1]: "user" is not one of consumer, client_ip, route or header:NAME"#,
    );
    let mut p = full_policy("strict", "corp");
    p.rate_limits[1].name = "per-consumer".to_string();
    assert_invalid(
        p,
        "rate_limits[1].name",
        r#"policy "strict": rate_limits[1].name: "per-consumer" is used by another limit"#,
    );
    let mut p = full_policy("strict", "corp");
    p.rate_limits[0].window = Duration::from_millis(10);
    assert_invalid(
        p,
        "rate_limits[0].window",
        r#"policy "strict": rate_limits[0].window: 10ms is out of range (100ms to 1month 13h 26m 24s)"#,
    );
    let mut p = full_policy("strict", "corp");
    p.rate_limits[0].limit = 0;
    assert_invalid(
        p,
        "rate_limits[0].limit",
        r#"policy "strict": rate_limits[0].limit: 0 is out of range (1 to 1000000000)"#,
    );
    let mut p = full_policy("strict", "corp");
    p.rate_limits[1].lease = 2;
    assert_invalid(
        p,
        "rate_limits[1].lease",
        r#"policy "strict": rate_limits[1].lease: applies to scope: cluster only"#,
    );
    let mut p = full_policy("strict", "corp");
    p.rate_limits[0].lease = 121;
    assert_invalid(
        p,
        "rate_limits[0].lease",
        r#"policy "strict": rate_limits[0].lease: 121 is out of range (1 to 120)"#,
    );
    // Keyed by consumer on a policy that authenticates no one.
    let mut p = policy("open");
    p.rate_limits = full_policy("x", "corp").rate_limits;
    assert_invalid(
        p,
        "rate_limits[0].key",
        r#"policy "open": rate_limits[0].key: is keyed by consumer but the policy authenticates no one"#,
    );
}

#[test]
fn quotas_are_checked() {
    let mut p = full_policy("strict", "corp");
    p.quotas[0].on_store_failure = StoreFailure::Local;
    assert_invalid(
        p,
        "quotas[0].on_store_failure",
        r#"policy "strict": quotas[0].on_store_failure: must be open or closed: a quota has no local share"#,
    );
    let mut p = full_policy("strict", "corp");
    p.quotas.push(p.quotas[0].clone());
    assert_invalid(
        p,
        "quotas[1].name",
        r#"policy "strict": quotas[1].name: "daily" is used by another quota"#,
    );
    let mut p = full_policy("strict", "corp");
    p.quotas[0].limit = 0;
    assert_invalid(
        p,
        "quotas[0].limit",
        r#"policy "strict": quotas[0].limit: 0 is out of range (1 to 1000000000000)"#,
    );
    let mut p = policy("open");
    p.quotas = full_policy("x", "corp").quotas;
    assert_invalid(
        p,
        "quotas[0].name",
        r#"policy "open": quotas[0].name: quotas count per consumer but the policy authenticates no one"#,
    );
}

#[test]
fn firewall_limits_and_cors_are_checked() {
    let mut p = full_policy("strict", "corp");
    p.firewall.max_header_bytes = Some(100);
    assert_invalid(
        p,
        "firewall.max_header_bytes",
        r#"policy "strict": firewall.max_header_bytes: 100 is out of range (256 to 1048576)"#,
    );
    let mut p = full_policy("strict", "corp");
    p.firewall.max_header_count = Some(0);
    assert_invalid(
        p,
        "firewall.max_header_count",
        r#"policy "strict": firewall.max_header_count: 0 is out of range (1 to 10000)"#,
    );
    let mut p = full_policy("strict", "corp");
    p.firewall.max_uri_bytes = Some(4);
    assert_invalid(
        p,
        "firewall.max_uri_bytes",
        r#"policy "strict": firewall.max_uri_bytes: 4 is out of range (16 to 1048576)"#,
    );
    let mut p = full_policy("strict", "corp");
    p.firewall.allowed_methods.push("Patch".to_string());
    assert_invalid(
        p,
        "firewall.allowed_methods[3]",
        r#"policy "strict": firewall.allowed_methods[3]: "Patch" is not an upper-case method name"#,
    );
    let mut p = full_policy("strict", "corp");
    p.firewall
        .cors
        .as_mut()
        .unwrap()
        .allowed_origins
        .push("*".to_string());
    assert_invalid(
        p,
        "firewall.cors.allow_credentials",
        r#"policy "strict": firewall.cors.allow_credentials: cannot be combined with the "*" origin"#,
    );
    let mut p = full_policy("strict", "corp");
    p.firewall.cors.as_mut().unwrap().allowed_origins = vec!["ftp://example.com".to_string()];
    assert_invalid(
        p,
        "firewall.cors.allowed_origins[0]",
        r#"policy "strict": firewall.cors.allowed_origins[0]: "ftp://example.com" is not "*" or scheme://host[:port]"#,
    );
    let mut p = full_policy("strict", "corp");
    p.firewall.cors.as_mut().unwrap().allowed_origins = vec!["https://example.com/app".to_string()];
    assert_invalid(
        p,
        "firewall.cors.allowed_origins[0]",
        r#"policy "strict": firewall.cors.allowed_origins[0]: "https://example.com/app" is not "*" or scheme://host[:port]"#,
    );
}

// ---------------------------------------------------------------- consumer, api key, admin token

#[test]
fn consumer_groups_and_metadata_are_checked() {
    let mut c = consumer("acme");
    c.groups.push("Admins".to_string());
    assert_invalid(
        c,
        "groups[2]",
        r#"consumer "acme": groups[2]: "Admins" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
    let mut c = consumer("acme");
    c.groups.push("admins".to_string());
    assert_invalid(
        c,
        "groups[2]",
        r#"consumer "acme": groups[2]: "admins" is listed twice"#,
    );
    let mut c = consumer("acme");
    c.metadata.insert("avatar".to_string(), "x".repeat(1025));
    assert_invalid(
        c,
        "metadata.avatar",
        r#"consumer "acme": metadata.avatar: keys are 1 to 63 characters and values at most 1024"#,
    );
    let mut c = consumer("acme");
    c.metadata.insert(String::new(), "x".to_string());
    assert_invalid(
        c,
        "metadata.",
        r#"consumer "acme": metadata.: keys are 1 to 63 characters and values at most 1024"#,
    );
}

#[test]
fn api_key_and_admin_token_hashes_must_be_sha256_hex() {
    let mut k = api_key("acme-key-1", "acme");
    k.key_hash = HASH_A.to_uppercase();
    assert_invalid(
        k,
        "key_hash",
        r#"api_key "acme-key-1": key_hash: must be 64 lower-case hex digits (a SHA-256)"#,
    );
    let mut k = api_key("acme-key-1", "acme");
    k.key_hash.pop();
    assert_invalid(
        k,
        "key_hash",
        r#"api_key "acme-key-1": key_hash: must be 64 lower-case hex digits (a SHA-256)"#,
    );
    assert_invalid(
        api_key("acme-key-1", "ACME"),
        "consumer",
        r#"api_key "acme-key-1": consumer: "ACME" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
    let mut t = admin_token("ci");
    t.token_hash = "secret".to_string();
    assert_invalid(
        t,
        "token_hash",
        r#"admin_token "ci": token_hash: must be 64 lower-case hex digits (a SHA-256)"#,
    );
}

#[test]
fn api_key_expiry_outside_the_encodable_range_is_refused_not_a_panic() {
    // Before 1970 or after 9999 cannot be written as RFC 3339 by the
    // serializer, so such a key could neither be stored nor sent anywhere.
    let mut k = api_key("acme-key-1", "acme");
    k.expires_at = Some(SystemTime::UNIX_EPOCH - Duration::from_secs(1));
    assert_invalid(
        k,
        "expires_at",
        r#"api_key "acme-key-1": expires_at: must be between 1970-01-01 and 9999-12-31"#,
    );
    let mut k = api_key("acme-key-1", "acme");
    k.expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800));
    assert_invalid(
        k,
        "expires_at",
        r#"api_key "acme-key-1": expires_at: must be between 1970-01-01 and 9999-12-31"#,
    );
    let mut k = api_key("acme-key-1", "acme");
    k.expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799));
    assert_valid(k);
}

// ---------------------------------------------------------------- jwt issuer

#[test]
fn a_jwt_issuer_needs_exactly_one_key_source() {
    let mut j = jwt_issuer("corp");
    j.jwks_url = Some("https://idp.example.com/jwks".to_string());
    assert_invalid(
        j,
        "keys",
        r#"jwt_issuer "corp": keys: needs exactly one of keys or jwks_url"#,
    );
    let mut j = jwks_issuer("corp");
    j.jwks_url = None;
    assert_invalid(
        j,
        "keys",
        r#"jwt_issuer "corp": keys: needs exactly one of keys or jwks_url"#,
    );
}

#[test]
fn a_short_hmac_secret_is_refused() {
    let mut j = jwt_issuer("corp");
    j.keys[0].secret = Some("x".repeat(31));
    assert_invalid(
        j,
        "keys[0].secret",
        r#"jwt_issuer "corp": keys[0].secret: is shorter than 32 bytes, too weak for HMAC"#,
    );
    let mut j = jwt_issuer("corp");
    j.algorithms = vec![JwtAlgorithm::RS256];
    assert_invalid(
        j,
        "keys[0].secret",
        r#"jwt_issuer "corp": keys[0].secret: is an HMAC secret but algorithms lists no HS256/HS384/HS512"#,
    );
    let mut j = jwt_issuer("corp");
    j.algorithms = vec![JwtAlgorithm::HS512];
    assert_invalid(
        j,
        "keys[1].pem",
        r#"jwt_issuer "corp": keys[1].pem: is a public key but algorithms lists only HMAC algorithms"#,
    );
    let mut j = jwt_issuer("corp");
    j.keys[1].pem = Some(CERT_PEM.to_string());
    assert_invalid(
        j,
        "keys[1].pem",
        r#"jwt_issuer "corp": keys[1].pem: holds no PEM public key"#,
    );
    let mut j = jwt_issuer("corp");
    j.keys[1].secret = Some(HMAC_SECRET.to_string());
    assert_invalid(
        j,
        "keys[1]",
        r#"jwt_issuer "corp": keys[1]: needs exactly one of pem or secret"#,
    );
}

#[test]
fn a_plain_http_jwks_url_must_be_loopback() {
    for url in [
        "http://idp.example.com/jwks",
        "http://localhost.example.com/jwks",
        "http://127.0.0.1.nip.io/jwks",
        "http://[::1].example.com/",
        "ftp://idp.example.com/jwks",
        "idp.example.com/jwks",
        // A loopback-looking user name in front of a remote host.
        "http://localhost:8080@idp.example.com/jwks",
        "http://127.0.0.1:@idp.example.com/",
        "http://[::1]:1@idp.example.com",
    ] {
        let mut j = jwks_issuer("corp");
        j.jwks_url = Some(url.to_string());
        assert_invalid(
            j,
            "jwks_url",
            r#"jwt_issuer "corp": jwks_url: must be an https URL (plain http only on loopback)"#,
        );
    }
}

#[test]
fn a_jwks_url_cannot_serve_hmac_keys() {
    let mut j = jwks_issuer("corp");
    j.algorithms.push(JwtAlgorithm::HS256);
    assert_invalid(
        j,
        "algorithms",
        r#"jwt_issuer "corp": algorithms: HMAC algorithms need static secret keys, not a JWKS URL"#,
    );
}

#[test]
fn jwt_issuer_fields_are_bounded() {
    let mut j = jwt_issuer("corp");
    j.leeway = Duration::from_secs(301);
    assert_invalid(
        j,
        "leeway",
        r#"jwt_issuer "corp": leeway: 5m 1s is out of range (0s to 5m)"#,
    );
    let mut j = jwt_issuer("corp");
    j.max_token_bytes = 100;
    assert_invalid(
        j,
        "max_token_bytes",
        r#"jwt_issuer "corp": max_token_bytes: 100 is out of range (256 to 65536)"#,
    );
    let mut j = jwt_issuer("corp");
    j.audiences.clear();
    assert_invalid(
        j,
        "audiences",
        r#"jwt_issuer "corp": audiences: needs at least an entry (1)"#,
    );
    let mut j = jwt_issuer("corp");
    j.algorithms.push(JwtAlgorithm::HS256);
    assert_invalid(
        j,
        "algorithms[2]",
        r#"jwt_issuer "corp": algorithms[2]: HS256 is listed twice"#,
    );
    let mut j = jwt_issuer("corp");
    j.issuer.clear();
    assert_invalid(
        j,
        "issuer",
        r#"jwt_issuer "corp": issuer: must be 1 to 1024 characters"#,
    );
}

// ---------------------------------------------------------------- certificate

#[test]
fn certificates_need_names_and_pem() {
    let mut c = certificate("api-cert");
    c.server_names.clear();
    assert_invalid(
        c,
        "server_names",
        r#"certificate "api-cert": server_names: needs at least an entry (1)"#,
    );
    let mut c = certificate("api-cert");
    c.server_names.push("bad name".to_string());
    assert_invalid(
        c,
        "server_names[2]",
        r#"certificate "api-cert": server_names[2]: "bad name" is not a lower-case host name or *. wildcard"#,
    );
    let mut c = certificate("api-cert");
    c.certificate_pem = KEY_PEM.to_string();
    assert_invalid(
        c,
        "certificate_pem",
        r#"certificate "api-cert": certificate_pem: holds no PEM certificate"#,
    );
    let mut c = certificate("api-cert");
    c.private_key_pem = CERT_PEM.to_string();
    assert_invalid(
        c,
        "private_key_pem",
        r#"certificate "api-cert": private_key_pem: holds no PEM private key"#,
    );
}

// ---------------------------------------------------------------- references

#[test]
fn references_name_the_field_that_refers() {
    let refs = |o: Object| {
        references(&o)
            .into_iter()
            .map(|(f, r)| format!("{f} -> {r}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        refs(full_route("billing", "pool", "strict").into()),
        [
            r#"upstream -> upstream "pool""#,
            r#"policy -> policy "strict""#
        ]
    );
    assert_eq!(
        refs(route("billing", "pool").into()),
        [r#"upstream -> upstream "pool""#]
    );
    let mut p = full_policy("strict", "corp");
    p.jwt.as_mut().unwrap().issuers.push("partner".to_string());
    assert_eq!(
        refs(p.into()),
        [
            r#"jwt.issuers[0] -> jwt_issuer "corp""#,
            r#"jwt.issuers[1] -> jwt_issuer "partner""#
        ]
    );
    assert_eq!(
        refs(api_key("k", "acme").into()),
        [r#"consumer -> consumer "acme""#]
    );
    for o in [
        Object::from(upstream("u")),
        consumer("c").into(),
        certificate("c").into(),
        jwt_issuer("j").into(),
        admin_token("t").into(),
    ] {
        assert!(refs(o).is_empty());
    }
}

#[test]
fn referrer_kinds_agree_with_references() {
    // Every reference an example makes is from a kind listed as a referrer of its target.
    for object in one_of_each() {
        for (_, target) in references(&object) {
            assert!(
                referrer_kinds(target.kind).contains(&object.kind()),
                "{} references {target}",
                object.object_ref()
            );
        }
    }
    assert_eq!(referrer_kinds(Kind::Upstream), [Kind::Route]);
    assert_eq!(referrer_kinds(Kind::Policy), [Kind::Route]);
    assert_eq!(referrer_kinds(Kind::JwtIssuer), [Kind::Policy]);
    assert_eq!(referrer_kinds(Kind::Consumer), [Kind::ApiKey]);
    assert!(referrer_kinds(Kind::Route).is_empty());
}

#[test]
fn policy_groups_follow_consumer_group_syntax_and_lists_are_bounded() {
    let mut p = full_policy("strict", "corp");
    p.authorization.groups = vec!["Gold".to_string()];
    assert_invalid(
        p,
        "authorization.groups[0]",
        r#"policy "strict": authorization.groups[0]: "Gold" may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"#,
    );
    let mut p = full_policy("strict", "corp");
    p.firewall.allowed_methods = vec!["GET".to_string(), "GET".to_string()];
    assert_invalid(
        p,
        "firewall.allowed_methods[1]",
        r#"policy "strict": firewall.allowed_methods[1]: "GET" is listed twice"#,
    );
    let mut p = full_policy("strict", "corp");
    if let Some(cors) = p.firewall.cors.as_mut() {
        cors.max_age = Duration::from_secs(2 * 24 * 3600);
    }
    assert_invalid(
        p,
        "firewall.cors.max_age",
        r#"policy "strict": firewall.cors.max_age: 2days is out of range (0s to 1day)"#,
    );
}

#[test]
fn kids_are_unique_within_an_issuer() {
    let mut j = jwt_issuer("corp");
    let mut twin = j.keys[0].clone();
    twin.secret = Some("another-hmac-secret-of-at-least-32-bytes".into());
    j.keys.push(twin);
    assert_invalid(
        j,
        "keys[2].kid",
        r#"jwt_issuer "corp": keys[2].kid: "hmac-1" is also the kid of keys[0]; kids must be unique"#,
    );
}

#[test]
fn rsa_keys_under_2048_bits_are_refused_at_write_time() {
    let with_pem = |pem: &str| {
        let mut j = jwt_issuer("corp");
        j.algorithms = vec![JwtAlgorithm::RS256];
        j.keys = vec![JwtKey {
            kid: Some("r".into()),
            pem: Some(pem.to_string()),
            secret: None,
        }];
        j
    };
    for weak in [
        include_str!("testdata/rsa-1024.pub.pem"),
        include_str!("testdata/rsa-1024.pkcs1.pub.pem"),
    ] {
        assert_invalid(
            with_pem(weak),
            "keys[0].pem",
            r#"jwt_issuer "corp": keys[0].pem: is a 1024-bit RSA key; at least 2048 bits are required"#,
        );
    }
    assert_valid(with_pem(include_str!("testdata/rsa-2048.pub.pem")));
}

#[test]
fn raw_path_is_explicit_and_not_combined_with_strip_prefix() {
    let mut r = route("files", "files");
    r.raw_path = true;
    assert_valid(r.clone());
    r.paths = vec![PathMatch {
        prefix: Some("/files".to_string()),
        ..PathMatch::default()
    }];
    r.strip_prefix = true;
    assert_invalid(
        r,
        "raw_path",
        r#"route "files": raw_path: cannot be combined with strip_prefix"#,
    );
}

#[test]
fn injection_inspection_and_user_agent_rules_are_checked() {
    let p = full_policy("strict", "issuer");
    assert_valid(p.clone());

    let mut bad = p.clone();
    bad.firewall.deny_user_agents = vec!["(unclosed".to_string()];
    let err = assert_invalid_field(bad, "firewall.deny_user_agents[0]");
    assert!(err.to_string().contains("invalid regex"), "{err}");

    let mut bad = p.clone();
    bad.firewall.deny_user_agents = vec![String::new()];
    assert_invalid(
        bad,
        "firewall.deny_user_agents[0]",
        r#"policy "strict": firewall.deny_user_agents[0]: must be a regular expression of 1 to 256 characters"#,
    );

    let mut bad = p.clone();
    bad.firewall.deny_user_agents = vec!["a".repeat(257)];
    assert_invalid_field(bad, "firewall.deny_user_agents[0]");

    let mut bad = p.clone();
    bad.firewall.inspect_headers = vec!["Referer".to_string()];
    assert_invalid(
        bad,
        "firewall.inspect_headers[0]",
        r#"policy "strict": firewall.inspect_headers[0]: "Referer" is not a lower-case header name"#,
    );

    let mut bad = p.clone();
    bad.firewall.inspect_headers = vec!["cookie".to_string(), "cookie".to_string()];
    assert_invalid_field(bad, "firewall.inspect_headers[1]");

    let mut bad = p;
    bad.firewall.inspect_body_bytes = (1 << 20) + 1;
    assert_invalid_field(bad, "firewall.inspect_body_bytes");
}

/// Like [`assert_invalid`], checking only the object and the field.
#[track_caller]
fn assert_invalid_field(object: impl Into<Object>, field: &str) -> InvalidObject {
    let object = object.into();
    let err = validate_object(&object).expect_err("object should be refused");
    assert_eq!(err.name, object.name(), "name of {err}");
    assert_eq!(err.field, field, "field of {err}");
    err
}

fn introspection_auth() -> IntrospectionAuth {
    IntrospectionAuth {
        url: "https://idp.example.com/oauth2/introspect".to_string(),
        client_id: "gateway".to_string(),
        client_secret: "s3cret".to_string(),
        ca_pem: None,
        consumer_claim: "sub".to_string(),
        cache_ttl: Duration::from_secs(60),
        negative_cache_ttl: Duration::from_secs(5),
        max_cache_entries: 100,
        timeout: Duration::from_secs(2),
    }
}

#[test]
fn mtls_needs_a_ca_certificate_in_pem() {
    assert_valid(full_policy("certs", "corp"));
    let mut p = policy("certs");
    p.authentication = vec![AuthMethod::Mtls];
    assert_invalid(
        p.clone(),
        "mtls",
        r#"policy "certs": mtls: is required when authentication lists mtls"#,
    );
    p.mtls = Some(MtlsAuth {
        ca_pem: NOT_A_CA_PEM.to_string(),
        consumer_from: CertIdentity::SubjectCn,
    });
    assert_invalid(
        p.clone(),
        "mtls.ca_pem",
        r#"policy "certs": mtls.ca_pem: certificate 0 (CN=leaf) is not a CA certificate"#,
    );
    p.mtls.as_mut().unwrap().ca_pem = "not pem".to_string();
    assert_invalid(
        p.clone(),
        "mtls.ca_pem",
        r#"policy "certs": mtls.ca_pem: holds no PEM certificate"#,
    );
    p.mtls.as_mut().unwrap().ca_pem =
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".to_string();
    assert_invalid_prefix(
        p.clone(),
        "mtls.ca_pem",
        r#"policy "certs": mtls.ca_pem: certificate 0 does not parse"#,
    );
    // Two CAs are fine; a CA and a leaf are not.
    p.mtls.as_mut().unwrap().ca_pem = format!("{CLIENT_CA_PEM}{CLIENT_CA_PEM}");
    assert_valid(p.clone());
    p.mtls.as_mut().unwrap().ca_pem = format!("{CLIENT_CA_PEM}{NOT_A_CA_PEM}");
    assert_invalid_prefix(
        p.clone(),
        "mtls.ca_pem",
        r#"policy "certs": mtls.ca_pem: certificate 1 (CN=leaf)"#,
    );
    p.authentication.clear();
    p.mtls.as_mut().unwrap().ca_pem = CLIENT_CA_PEM.to_string();
    assert_invalid(
        p,
        "mtls",
        r#"policy "certs": mtls: is set but authentication does not list mtls"#,
    );
}

#[test]
fn introspection_fields_are_checked() {
    let mut p = policy("opaque");
    p.authentication = vec![AuthMethod::Introspection];
    assert_invalid(
        p.clone(),
        "introspection",
        r#"policy "opaque": introspection: is required when authentication lists introspection"#,
    );
    p.introspection = Some(introspection_auth());
    assert_valid(p.clone());
    let with = |f: &dyn Fn(&mut IntrospectionAuth)| {
        let mut p = p.clone();
        f(p.introspection.as_mut().unwrap());
        p
    };
    assert_valid(with(&|i| i.url = "http://127.0.0.1:8080/introspect".into()));
    assert_valid(with(&|i| i.url = "http://[::1]:8080/introspect".into()));
    assert_valid(with(&|i| i.url = "https://[2001:db8::1]/introspect".into()));
    for url in [
        "http://idp.example.com/introspect",
        "ftp://idp.example.com/",
        "https://",
        "https://user@idp.example.com/",
        "http://127.0.0.1.evil.example/",
        "https://idp.example.com/a b",
        "https://idp.example.com:99999/introspect",
        "https://idp.example.com:/introspect",
    ] {
        assert_invalid(
            with(&|i| i.url = url.into()),
            "introspection.url",
            r#"policy "opaque": introspection.url: must be an https URL (plain http only on loopback)"#,
        );
    }
    assert_invalid_field(with(&|i| i.client_id.clear()), "introspection.client_id");
    assert_invalid_field(
        with(&|i| i.client_secret.clear()),
        "introspection.client_secret",
    );
    assert_invalid_field(
        with(&|i| i.ca_pem = Some(NOT_A_CA_PEM.into())),
        "introspection.ca_pem",
    );
    assert_valid(with(&|i| i.ca_pem = Some(CLIENT_CA_PEM.into())));
    assert_invalid_field(
        with(&|i| i.consumer_claim.clear()),
        "introspection.consumer_claim",
    );
    assert_invalid_field(
        with(&|i| i.cache_ttl = Duration::from_secs(7200)),
        "introspection.cache_ttl",
    );
    assert_invalid_field(
        with(&|i| i.max_cache_entries = 0),
        "introspection.max_cache_entries",
    );
    assert_invalid_field(
        with(&|i| i.timeout = Duration::from_millis(10)),
        "introspection.timeout",
    );
    let mut p = policy("opaque");
    p.introspection = Some(introspection_auth());
    assert_invalid(
        p,
        "introspection",
        r#"policy "opaque": introspection: is set but authentication does not list introspection"#,
    );
}

#[test]
fn jwks_timings_are_bounded_and_need_a_jwks_url() {
    let s = Duration::from_secs;
    assert_valid(JwtIssuer {
        jwks_refresh: Some(s(10)),
        jwks_cooldown: Some(s(1)),
        jwks_max_stale: Some(s(1)),
        ..jwks_issuer("corp")
    });
    assert_valid(JwtIssuer {
        jwks_refresh: Some(s(24 * 3600)),
        jwks_cooldown: Some(s(3600)),
        jwks_max_stale: Some(s(30 * 24 * 3600)),
        ..jwks_issuer("corp")
    });
    for (j, field, message) in [
        (
            JwtIssuer {
                jwks_refresh: Some(s(9)),
                ..jwks_issuer("corp")
            },
            "jwks_refresh",
            r#"jwt_issuer "corp": jwks_refresh: 9s is out of range (10s to 1day)"#,
        ),
        (
            JwtIssuer {
                jwks_cooldown: Some(Duration::from_millis(500)),
                ..jwks_issuer("corp")
            },
            "jwks_cooldown",
            r#"jwt_issuer "corp": jwks_cooldown: 500ms is out of range (1s to 1h)"#,
        ),
        (
            JwtIssuer {
                jwks_max_stale: Some(s(31 * 24 * 3600)),
                ..jwks_issuer("corp")
            },
            "jwks_max_stale",
            r#"jwt_issuer "corp": jwks_max_stale: 1month 13h 26m 24s is out of range (1s to 30days)"#,
        ),
        (
            JwtIssuer {
                jwks_cooldown: Some(s(30)),
                ..jwt_issuer("corp")
            },
            "jwks_cooldown",
            r#"jwt_issuer "corp": jwks_cooldown: applies only with jwks_url"#,
        ),
        (
            JwtIssuer {
                jwks_url: Some(format!("https://idp.example.com/{}", "a".repeat(2048))),
                ..jwks_issuer("corp")
            },
            "jwks_url",
            r#"jwt_issuer "corp": jwks_url: must be at most 2048 characters, without spaces"#,
        ),
    ] {
        assert_invalid(j, field, message);
    }
}

#[test]
fn jwks_timings_read_as_humantime() {
    let yaml = "name: corp\nissuer: https://idp.example.com/\naudiences: [gatehouse]\nalgorithms: [RS256]\njwks_url: https://idp.example.com/jwks\njwks_refresh: 10m\njwks_cooldown: 45s\njwks_max_stale: 2h\n";
    let j: JwtIssuer = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(j.jwks_refresh, Some(Duration::from_secs(600)));
    assert_eq!(j.jwks_cooldown, Some(Duration::from_secs(45)));
    assert_eq!(j.jwks_max_stale, Some(Duration::from_secs(7200)));
    assert_valid(j);
}
