//! Security lint of declarative files: valid configuration that is probably
//! a mistake. Each finding has a stable id (GH001...), names the object and
//! field, and says how to fix it. `gatehousectl lint` runs [`lint`] offline.
//!
//! Two labels steer it:
//! - `gatehouse.io/public: "true"` on a route says it is meant to be reachable
//!   without credentials (GH001 is then not reported; GH004 still is).
//! - `gatehouse.io/lint-ignore: "GH002,GH005"` on any object silences those
//!   findings for that object.
//!
//! A route whose policy or upstream is not in the files is not judged on it:
//! lint sees only what it is given.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::object::{Object, ObjectRef, Policy, Route, Upstream};
use crate::secret::{SecretSource, SecretUse};

/// The label that marks a route as deliberately public.
pub const PUBLIC_LABEL: &str = "gatehouse.io/public";
/// The label that lists lint ids to ignore on an object.
pub const IGNORE_LABEL: &str = "gatehouse.io/lint-ignore";

/// Every rule: its id and what it reports.
pub const RULES: &[(&str, &str)] = &[
    (
        "GH001",
        "route without authentication that is not marked public",
    ),
    ("GH002", "route matching any host or a wildcard host"),
    ("GH003", "regex path without ^ and $ anchors"),
    (
        "GH004",
        "public or unauthenticated route without a rate limit",
    ),
    (
        "GH005",
        "route with authentication forwarding to a plaintext upstream",
    ),
    ("GH006", "secret given inline in the file"),
    ("GH007", "API key accepted in a query parameter"),
    ("GH008", "JWT issuer verifying with a shared HMAC secret"),
];

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub id: &'static str,
    pub target: ObjectRef,
    pub field: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: {}\n  fix: {}",
            self.id, self.target, self.field, self.message, self.fix
        )
    }
}

/// The policies and upstreams of the files, by name.
struct Files<'a> {
    policies: HashMap<&'a str, &'a Policy>,
    upstreams: HashMap<&'a str, &'a Upstream>,
}

impl<'a> Files<'a> {
    fn new(objects: &'a [Object]) -> Self {
        let mut files = Files {
            policies: HashMap::new(),
            upstreams: HashMap::new(),
        };
        for o in objects {
            match o {
                Object::Policy(p) => {
                    files.policies.insert(&p.name, p);
                }
                Object::Upstream(u) => {
                    files.upstreams.insert(&u.name, u);
                }
                _ => {}
            }
        }
        files
    }

    fn policy(&self, name: &str) -> Option<&'a Policy> {
        self.policies.get(name).copied()
    }

    fn upstream(&self, name: &str) -> Option<&'a Upstream> {
        self.upstreams.get(name).copied()
    }
}

/// What is known of a route's guard.
enum Guard<'a> {
    /// No policy, or one without authentication.
    Open(Option<&'a Policy>),
    Authenticated(&'a Policy),
    /// The policy is not in the files.
    Unknown,
}

fn guard<'a>(files: &Files<'a>, r: &Route) -> Guard<'a> {
    match &r.policy {
        None => Guard::Open(None),
        Some(name) => match files.policy(name) {
            None => Guard::Unknown,
            Some(p) if p.authentication.is_empty() => Guard::Open(Some(p)),
            Some(p) => Guard::Authenticated(p),
        },
    }
}

/// Whether every target is on the loopback interface: plaintext there
/// crosses no network (a sidecar), so GH005 does not apply.
fn loopback_only(u: &Upstream) -> bool {
    u.targets.iter().all(|t| {
        let host = t
            .address
            .rsplit_once(':')
            .map_or(t.address.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    })
}

/// Every finding over the objects of some files; `secrets` says how the
/// files gave each secret field ([`crate::file::Loaded::secrets`]).
pub fn lint(objects: &[Object], secrets: &[SecretUse]) -> Vec<Finding> {
    let files = Files::new(objects);
    let mut out = Vec::new();
    let mut add =
        |id: &'static str, target: ObjectRef, field: String, message: String, fix: String| {
            out.push(Finding {
                id,
                target,
                field,
                message,
                fix,
            })
        };
    for object in objects {
        let target = object.object_ref();
        match object {
            Object::Route(r) => {
                let public = r.labels.get(PUBLIC_LABEL).is_some_and(|v| v == "true");
                let g = guard(&files, r);
                if let (Guard::Open(p), false) = (&g, public) {
                    add(
                        "GH001",
                        target.clone(),
                        "policy".into(),
                        match p {
                            None => "has no policy, so anyone may call it".into(),
                            Some(p) => format!("policy {:?} requires no authentication", p.name),
                        },
                        format!("attach a policy with authentication (api_key, jwt, mtls or introspection), or label the route {PUBLIC_LABEL}: \"true\" if it is meant to be public"),
                    );
                }
                let limits = match &g {
                    Guard::Open(p) => Some(p.is_some_and(|p| !p.rate_limits.is_empty())),
                    Guard::Authenticated(p) if public => Some(!p.rate_limits.is_empty()),
                    _ => None,
                };
                if limits == Some(false) {
                    add(
                        "GH004",
                        target.clone(),
                        "policy".into(),
                        if public {
                            "is marked public but has no rate limit".into()
                        } else {
                            "is reachable without credentials but has no rate limit".into()
                        },
                        "give it a policy with a rate_limits entry keyed by client_ip".into(),
                    );
                }
                if r.hosts.is_empty() {
                    add(
                        "GH002",
                        target.clone(),
                        "hosts".into(),
                        "is empty, so the route matches every host name".into(),
                        "list the exact host names the route serves".into(),
                    );
                }
                for (i, h) in r.hosts.iter().enumerate() {
                    if h.starts_with("*.") {
                        add(
                            "GH002",
                            target.clone(),
                            format!("hosts[{i}]"),
                            format!("{h:?} matches every subdomain"),
                            "list the exact host names the route serves".into(),
                        );
                    }
                }
                for (i, p) in r.paths.iter().enumerate() {
                    if let Some(re) = &p.regex {
                        if !re.starts_with('^') || !re.ends_with('$') {
                            add(
                                "GH003",
                                target.clone(),
                                format!("paths[{i}].regex"),
                                format!("{re:?} is not anchored, so it matches any path that merely contains a match"),
                                "begin the regex with ^ and end it with $".into(),
                            );
                        }
                    }
                }
                if let (Guard::Authenticated(_), Some(u)) = (&g, files.upstream(&r.upstream)) {
                    if u.tls.is_none() && !loopback_only(u) {
                        add(
                            "GH005",
                            target.clone(),
                            "upstream".into(),
                            format!("authenticated traffic goes to upstream {:?} in plaintext", u.name),
                            format!("set tls on upstream {:?} (or ignore GH005 on the route if the network path is trusted)", u.name),
                        );
                    }
                }
            }
            Object::Policy(p) => {
                if let Some(param) = p.api_key.as_ref().and_then(|a| a.query_param.as_ref()) {
                    add(
                        "GH007",
                        target.clone(),
                        "api_key.query_param".into(),
                        format!("accepts API keys in the query parameter {param:?}, where access logs, proxies and browser history keep them"),
                        "remove query_param and send keys in a header".into(),
                    );
                }
            }
            Object::JwtIssuer(j) => {
                for (i, k) in j.keys.iter().enumerate() {
                    if k.secret.is_some() {
                        add(
                            "GH008",
                            target.clone(),
                            format!("keys[{i}].secret"),
                            "is a shared HMAC secret: whoever can verify tokens can also mint them"
                                .into(),
                            "verify with an asymmetric key (pem or jwks_url) from the issuer"
                                .into(),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    for s in secrets {
        if s.source == SecretSource::Inline {
            add(
                "GH006",
                s.target.clone(),
                s.field.clone(),
                "holds key material inline, where the repository and its history keep it".into(),
                "use { env: VARIABLE } or { file: PATH } and keep the value in the CI secret store"
                    .into(),
            );
        }
    }
    let ignore: HashMap<ObjectRef, &str> = objects
        .iter()
        .filter_map(|o| Some((o.object_ref(), o.labels().get(IGNORE_LABEL)?.as_str())))
        .collect();
    out.retain(|f| {
        !ignore
            .get(&f.target)
            .is_some_and(|ids| ids.split(',').any(|id| id.trim() == f.id))
    });
    out
}

#[cfg(test)]
mod tests;
