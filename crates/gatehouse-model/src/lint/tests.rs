//! One test per rule: a clean configuration, then one change that trips the rule.

use super::*;
use crate::fixtures::{self, labels};
use crate::object::*;
use crate::secret::SecretRef;

/// Authenticated, limited, exact host, anchored regex, loopback upstream.
fn clean() -> (Route, Policy, Upstream) {
    let mut route = fixtures::regex_route("orders", "orders");
    route.hosts = vec!["api.example.com".into()];
    route.policy = Some("auth".into());
    let mut policy = fixtures::policy("auth");
    policy.authentication = vec![AuthMethod::ApiKey];
    policy.rate_limits = vec![RateLimit {
        name: "per-ip".into(),
        scope: LimitScope::Local,
        key: vec!["client_ip".into()],
        limit: 10,
        window: std::time::Duration::from_secs(1),
        burst: 0,
        on_store_failure: StoreFailure::Open,
        lease: 0,
    }];
    (route, policy, fixtures::upstream("orders"))
}

fn ids(route: Route, policy: Policy, upstream: Upstream) -> Vec<&'static str> {
    let objects: Vec<Object> = vec![route.into(), policy.into(), upstream.into()];
    lint(&objects, &[]).iter().map(|f| f.id).collect()
}

#[test]
fn a_clean_configuration_has_no_findings() {
    let (r, p, u) = clean();
    assert_eq!(ids(r, p, u), Vec::<&str>::new());
}

#[test]
fn gh001_route_without_authentication() {
    let (mut r, mut p, u) = clean();
    r.policy = None;
    assert_eq!(ids(r.clone(), p.clone(), u.clone()), ["GH001", "GH004"]);
    p.authentication.clear();
    r.policy = Some("auth".into());
    let objects: Vec<Object> = vec![r.clone().into(), p.clone().into(), u.clone().into()];
    let found = lint(&objects, &[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].to_string(),
        "GH001 route \"orders\": policy: policy \"auth\" requires no authentication\n  fix: attach a policy with authentication (api_key, jwt, mtls or introspection), or label the route gatehouse.io/public: \"true\" if it is meant to be public"
    );
    // Marked public: no GH001; it still has its rate limit, so nothing at all.
    r.labels = labels(&[(PUBLIC_LABEL, "true")]);
    assert_eq!(ids(r, p, u), Vec::<&str>::new());
}

#[test]
fn gh002_any_host_or_wildcard_host() {
    let (mut r, p, u) = clean();
    r.hosts.clear();
    assert_eq!(ids(r.clone(), p.clone(), u.clone()), ["GH002"]);
    r.hosts = vec!["api.example.com".into(), "*.example.com".into()];
    let objects: Vec<Object> = vec![r.into(), p.into(), u.into()];
    let found = lint(&objects, &[]);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].field, "hosts[1]");
}

#[test]
fn gh003_unanchored_regex() {
    let (mut r, p, u) = clean();
    r.paths[1].regex = Some("/v[0-9]+/users".into());
    let objects: Vec<Object> = vec![r.into(), p.into(), u.into()];
    let found = lint(&objects, &[]);
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id, found[0].field.as_str()),
        ("GH003", "paths[1].regex")
    );
}

#[test]
fn gh004_public_route_without_limits() {
    let (mut r, mut p, u) = clean();
    r.labels = labels(&[(PUBLIC_LABEL, "true")]);
    p.rate_limits.clear();
    assert_eq!(ids(r, p, u), ["GH004"]);
}

#[test]
fn gh005_plaintext_upstream_behind_authentication() {
    let (r, p, mut u) = clean();
    u.targets[0].address = "10.0.0.7:8080".into();
    assert_eq!(ids(r.clone(), p.clone(), u.clone()), ["GH005"]);
    u.tls = Some(UpstreamTls {
        server_name: None,
        ca_pem: None,
    });
    assert_eq!(ids(r.clone(), p.clone(), u.clone()), Vec::<&str>::new());
    // Ignored on the route by label.
    u.tls = None;
    let mut r = r;
    r.labels = labels(&[(IGNORE_LABEL, "GH002, GH005")]);
    assert_eq!(ids(r, p, u), Vec::<&str>::new());
}

#[test]
fn gh006_inline_secrets_but_not_references() {
    let cert = ObjectRef {
        kind: Kind::Certificate,
        name: "api".into(),
    };
    let uses = [
        SecretUse {
            target: cert.clone(),
            field: "private_key_pem".into(),
            source: SecretSource::Inline,
        },
        SecretUse {
            target: cert,
            field: "other".into(),
            source: SecretSource::Ref(SecretRef::Env("X".into())),
        },
    ];
    let objects: Vec<Object> = vec![fixtures::certificate("api").into()];
    let found = lint(&objects, &uses);
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id, found[0].field.as_str()),
        ("GH006", "private_key_pem")
    );
}

#[test]
fn gh007_api_key_in_query() {
    let (r, mut p, u) = clean();
    p.api_key = Some(ApiKeyAuth {
        header: "x-api-key".into(),
        query_param: Some("key".into()),
    });
    assert_eq!(ids(r, p, u), ["GH007"]);
}

#[test]
fn gh008_hmac_issuer() {
    let objects: Vec<Object> = vec![fixtures::jwt_issuer("corp").into()];
    let found = lint(&objects, &[]);
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id, found[0].field.as_str()),
        ("GH008", "keys[0].secret")
    );
    let objects: Vec<Object> = vec![fixtures::jwks_issuer("corp").into()];
    assert!(lint(&objects, &[]).is_empty());
}

#[test]
fn a_policy_outside_the_files_is_not_judged() {
    let (mut r, _, u) = clean();
    r.policy = Some("elsewhere".into());
    let objects: Vec<Object> = vec![r.into(), u.into()];
    assert!(lint(&objects, &[]).is_empty());
}
