//! Every rule an object must satisfy on its own, and the references it makes.
//!
//! This is the one definition of validity: the control plane's state machine
//! and `gatehousectl validate` both call [`validate_object`] and
//! [`references`] (through [`crate::state::ConfigState::apply`]).

use std::time::Duration;

use crate::object::*;

/// The largest object accepted, measured as its JSON encoding.
pub const MAX_OBJECT_BYTES: usize = 64 * 1024;
/// Compiled-size limit of a route's path regex, so a regex cannot exhaust memory.
pub const MAX_REGEX_BYTES: usize = 256 * 1024;
const MAX_NAME: usize = 63;
const MAX_LABELS: usize = 32;
const MAX_PATH: usize = 1024;

/// An object that breaks a rule; names the object, the field and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{kind} \"{name}\": {field}: {message}")]
pub struct InvalidObject {
    pub kind: Kind,
    pub name: String,
    pub field: String,
    pub message: String,
}

struct Check<'a> {
    kind: Kind,
    name: &'a str,
}

type Result<T = ()> = std::result::Result<T, InvalidObject>;

impl Check<'_> {
    fn fail(&self, field: impl Into<String>, message: impl Into<String>) -> InvalidObject {
        InvalidObject {
            kind: self.kind,
            name: self.name.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn ensure(&self, ok: bool, field: impl Into<String>, message: impl Into<String>) -> Result {
        if ok {
            Ok(())
        } else {
            Err(self.fail(field, message))
        }
    }

    fn name_ref(&self, field: &str, value: &str) -> Result {
        check_name(value).map_err(|m| self.fail(field, m))
    }

    fn range<T: PartialOrd + std::fmt::Display>(
        &self,
        field: &str,
        v: T,
        min: T,
        max: T,
    ) -> Result {
        self.ensure(
            v >= min && v <= max,
            field,
            format!("{v} is out of range ({min} to {max})"),
        )
    }

    fn duration(&self, field: &str, v: Duration, min: Duration, max: Duration) -> Result {
        self.ensure(
            v >= min && v <= max,
            field,
            format!(
                "{} is out of range ({} to {})",
                humantime::format_duration(v),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        )
    }

    fn count<T>(&self, field: &str, items: &[T], min: usize, max: usize) -> Result {
        if items.len() < min {
            let what = if min == 1 { "an entry" } else { "more entries" };
            return Err(self.fail(field, format!("needs at least {what} ({min})")));
        }
        self.ensure(
            items.len() <= max,
            field,
            format!("has {} entries, at most {max} allowed", items.len()),
        )
    }

    fn no_duplicates<T: PartialEq + std::fmt::Debug>(&self, field: &str, items: &[T]) -> Result {
        for (i, a) in items.iter().enumerate() {
            if items[..i].contains(a) {
                return Err(self.fail(format!("{field}[{i}]"), format!("{a:?} is listed twice")));
            }
        }
        Ok(())
    }
}

/// The syntax of object names: lower-case letters, digits, `-` and `.`, 1 to 63 long,
/// starting and ending with a letter or digit.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("{name:?} must be 1 to {MAX_NAME} characters long"));
    }
    if !name.chars().all(ok_char) || !edge(name.chars().next()) || !edge(name.chars().last()) {
        return Err(format!(
            "{name:?} may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit"
        ));
    }
    Ok(())
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// An exact host name or a `*.` wildcard over one, lower case.
fn is_host_pattern(s: &str) -> bool {
    is_hostname(s.strip_prefix("*.").unwrap_or(s))
}

fn is_method(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_uppercase())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `host:port`, where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
fn check_address(s: &str) -> std::result::Result<(), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?} has an invalid port {port:?}"))?;
    if port == 0 {
        return Err(format!("{s:?} has port 0"));
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.parse::<std::net::Ipv4Addr>().is_ok() || is_hostname(host)
    };
    if host_ok {
        Ok(())
    } else {
        Err(format!("{s:?} has an invalid host {host:?}"))
    }
}

fn check_cidr(s: &str) -> std::result::Result<(), String> {
    if crate::net::parse_network(s).is_some() {
        Ok(())
    } else {
        Err(format!("{s:?} is not an IP address or CIDR network"))
    }
}

fn check_labels(c: &Check<'_>, labels: &Labels) -> Result {
    c.ensure(
        labels.len() <= MAX_LABELS,
        "labels",
        format!("has {} labels, at most {MAX_LABELS} allowed", labels.len()),
    )?;
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_NAME
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
        c.ensure(
            key_ok,
            format!("labels.{k}"),
            "label keys are 1 to 63 characters of a-z, A-Z, 0-9, '.', '_', '/' and '-'",
        )?;
        let value_ok = v.len() <= MAX_NAME
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        c.ensure(
            value_ok,
            format!("labels.{k}"),
            "label values are at most 63 characters of a-z, A-Z, 0-9, '.', '_' and '-'",
        )?;
    }
    Ok(())
}

/// Checks one object on its own: syntax, ranges, regexes, size. References
/// to other objects are checked by the state, which knows what exists.
pub fn validate_object(object: &Object) -> Result {
    let c = Check {
        kind: object.kind(),
        name: object.name(),
    };
    check_name(object.name()).map_err(|m| c.fail("name", m))?;
    check_labels(&c, object.labels())?;
    // Measuring the size serializes the object, and the RFC 3339 encoder of
    // `expires_at` panics before 1970 and fails after 9999: refuse those first.
    if let Object::ApiKey(ApiKey {
        expires_at: Some(t),
        ..
    }) = object
    {
        let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs());
        c.ensure(
            secs.is_ok_and(|s| s < 253_402_300_800),
            "expires_at",
            "must be between 1970-01-01 and 9999-12-31",
        )?;
    }
    let size = serde_json::to_vec(object)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    c.ensure(
        size <= MAX_OBJECT_BYTES,
        "(object)",
        format!("is {size} bytes, at most {MAX_OBJECT_BYTES} allowed"),
    )?;
    match object {
        Object::Upstream(u) => upstream(&c, u),
        Object::Route(r) => route(&c, r),
        Object::Policy(p) => policy(&c, p),
        Object::Consumer(o) => consumer(&c, o),
        Object::ApiKey(k) => {
            c.name_ref("consumer", &k.consumer)?;
            c.ensure(
                is_sha256_hex(&k.key_hash),
                "key_hash",
                "must be 64 lower-case hex digits (a SHA-256)",
            )
        }
        Object::JwtIssuer(j) => jwt_issuer(&c, j),
        Object::Certificate(cert) => certificate(&c, cert),
        Object::AdminToken(t) => c.ensure(
            is_sha256_hex(&t.token_hash),
            "token_hash",
            "must be 64 lower-case hex digits (a SHA-256)",
        ),
    }
}

fn upstream(c: &Check<'_>, u: &Upstream) -> Result {
    c.count("targets", &u.targets, 1, 256)?;
    for (i, t) in u.targets.iter().enumerate() {
        check_address(&t.address).map_err(|m| c.fail(format!("targets[{i}].address"), m))?;
        c.range(&format!("targets[{i}].weight"), t.weight, 1, 1000)?;
    }
    match (&u.balancer, &u.hash_header) {
        (Balancer::ConsistentHash, None) => {
            return Err(c.fail("hash_header", "is required by the consistent_hash balancer"))
        }
        (Balancer::ConsistentHash, Some(h)) => c.ensure(
            is_token(h),
            "hash_header",
            format!("{h:?} is not a header name"),
        )?,
        (_, Some(_)) => {
            return Err(c.fail(
                "hash_header",
                "is only used by the consistent_hash balancer",
            ))
        }
        (_, None) => {}
    }
    if let Some(h) = &u.health_check {
        c.ensure(
            h.path.starts_with('/') && h.path.len() <= MAX_PATH,
            "health_check.path",
            "must start with '/'",
        )?;
        let ms = Duration::from_millis;
        c.duration("health_check.interval", h.interval, ms(100), ms(3_600_000))?;
        c.duration("health_check.timeout", h.timeout, ms(10), h.interval)?;
        c.range(
            "health_check.healthy_threshold",
            h.healthy_threshold,
            1,
            100,
        )?;
        c.range(
            "health_check.unhealthy_threshold",
            h.unhealthy_threshold,
            1,
            100,
        )?;
    }
    c.duration(
        "connect_timeout",
        u.connect_timeout,
        Duration::from_millis(1),
        Duration::from_secs(60),
    )?;
    c.duration(
        "request_timeout",
        u.request_timeout,
        Duration::from_millis(1),
        Duration::from_secs(3600),
    )?;
    c.range("retries.attempts", u.retries.attempts, 0, 10)?;
    if let Some(cb) = &u.circuit_breaker {
        c.range(
            "circuit_breaker.consecutive_failures",
            cb.consecutive_failures,
            1,
            10_000,
        )?;
        c.duration(
            "circuit_breaker.open_for",
            cb.open_for,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
    }
    if let Some(tls) = &u.tls {
        if let Some(sn) = &tls.server_name {
            c.ensure(
                is_hostname(sn),
                "tls.server_name",
                format!("{sn:?} is not a host name"),
            )?;
        }
        if let Some(pem) = &tls.ca_pem {
            c.ensure(
                pem.contains("-----BEGIN CERTIFICATE-----"),
                "tls.ca_pem",
                "holds no PEM certificate",
            )?;
        }
    }
    Ok(())
}

fn route(c: &Check<'_>, r: &Route) -> Result {
    c.count("hosts", &r.hosts, 0, 64)?;
    for (i, h) in r.hosts.iter().enumerate() {
        c.ensure(
            is_host_pattern(h),
            format!("hosts[{i}]"),
            format!("{h:?} is not a lower-case host name or *. wildcard"),
        )?;
    }
    c.no_duplicates("hosts", &r.hosts)?;
    c.count("paths", &r.paths, 1, 64)?;
    for (i, p) in r.paths.iter().enumerate() {
        let field = format!("paths[{i}]");
        match (&p.exact, &p.prefix, &p.regex) {
            (Some(v), None, None) | (None, Some(v), None) => c.ensure(
                v.starts_with('/') && v.len() <= MAX_PATH && !v.chars().any(char::is_control),
                field,
                format!("{v:?} must start with '/', hold no control characters and be at most {MAX_PATH} long"),
            )?,
            (None, None, Some(re)) => {
                c.ensure(re.len() <= MAX_PATH, format!("{field}.regex"), format!("is longer than {MAX_PATH}"))?;
                regex::RegexBuilder::new(re)
                    .size_limit(MAX_REGEX_BYTES)
                    .dfa_size_limit(MAX_REGEX_BYTES)
                    .build()
                    .map_err(|e| c.fail(format!("{field}.regex"), format!("invalid regex: {}", one_line(&e.to_string()))))?;
            }
            _ => return Err(c.fail(field, "needs exactly one of exact, prefix or regex")),
        }
    }
    if r.strip_prefix && !r.paths.iter().all(|p| p.prefix.is_some()) {
        return Err(c.fail("strip_prefix", "needs every path to be a prefix match"));
    }
    // A raw path is forwarded byte for byte; removing a prefix matched on
    // the canonical form from it would cut at the wrong place.
    if r.raw_path && r.strip_prefix {
        return Err(c.fail("raw_path", "cannot be combined with strip_prefix"));
    }
    for (i, m) in r.methods.iter().enumerate() {
        c.ensure(
            is_method(m),
            format!("methods[{i}]"),
            format!("{m:?} is not an upper-case method name"),
        )?;
    }
    c.no_duplicates("methods", &r.methods)?;
    c.name_ref("upstream", &r.upstream)?;
    if let Some(p) = &r.policy {
        c.name_ref("policy", p)?;
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn policy(c: &Check<'_>, p: &Policy) -> Result {
    c.no_duplicates("authentication", &p.authentication)?;
    let uses = |m| p.authentication.contains(&m);
    if let Some(k) = &p.api_key {
        c.ensure(
            uses(AuthMethod::ApiKey),
            "api_key",
            "is set but authentication does not list api_key",
        )?;
        c.ensure(
            is_token(&k.header),
            "api_key.header",
            format!("{:?} is not a header name", k.header),
        )?;
        if let Some(q) = &k.query_param {
            c.ensure(
                is_token(q),
                "api_key.query_param",
                format!("{q:?} is not a parameter name"),
            )?;
        }
    }
    match &p.jwt {
        Some(j) => {
            c.ensure(
                uses(AuthMethod::Jwt),
                "jwt",
                "is set but authentication does not list jwt",
            )?;
            c.count("jwt.issuers", &j.issuers, 1, 16)?;
            for (i, iss) in j.issuers.iter().enumerate() {
                c.name_ref(&format!("jwt.issuers[{i}]"), iss)?;
            }
        }
        None => c.ensure(
            !uses(AuthMethod::Jwt),
            "jwt",
            "is required when authentication lists jwt",
        )?,
    }
    match &p.mtls {
        Some(m) => {
            c.ensure(
                uses(AuthMethod::Mtls),
                "mtls",
                "is set but authentication does not list mtls",
            )?;
            ca_certificates(&m.ca_pem).map_err(|e| c.fail("mtls.ca_pem", e))?;
        }
        None => c.ensure(
            !uses(AuthMethod::Mtls),
            "mtls",
            "is required when authentication lists mtls",
        )?,
    }
    match &p.introspection {
        Some(i) => {
            c.ensure(
                uses(AuthMethod::Introspection),
                "introspection",
                "is set but authentication does not list introspection",
            )?;
            introspection(c, i)?;
        }
        None => c.ensure(
            !uses(AuthMethod::Introspection),
            "introspection",
            "is required when authentication lists introspection",
        )?,
    }
    let a = &p.authorization;
    // Groups are matched against consumers' groups, so they follow the same syntax.
    c.count("authorization.groups", &a.groups, 0, 64)?;
    for (i, g) in a.groups.iter().enumerate() {
        check_name(g).map_err(|m| c.fail(format!("authorization.groups[{i}]"), m))?;
    }
    c.no_duplicates("authorization.groups", &a.groups)?;
    c.count("authorization.scopes", &a.scopes, 0, 64)?;
    for (i, g) in a.scopes.iter().enumerate() {
        c.ensure(
            !g.is_empty() && g.len() <= 256,
            format!("authorization.scopes[{i}]"),
            "must be 1 to 256 characters",
        )?;
    }
    c.count("authorization.claims", &a.claims, 0, 32)?;
    for (i, m) in a.claims.iter().enumerate() {
        let field = format!("authorization.claims[{i}]");
        c.ensure(
            !m.claim.is_empty(),
            format!("{field}.claim"),
            "must not be empty",
        )?;
        let set = [m.equals.is_some(), m.one_of.is_some(), m.contains.is_some()];
        c.ensure(
            set.iter().filter(|s| **s).count() == 1,
            field,
            "needs exactly one of equals, one_of or contains",
        )?;
    }
    if !(a.groups.is_empty() && a.scopes.is_empty() && a.claims.is_empty()) {
        c.ensure(
            !p.authentication.is_empty(),
            "authorization",
            "needs an authentication method to know who the caller is",
        )?;
    }
    c.count("rate_limits", &p.rate_limits, 0, 16)?;
    for (i, l) in p.rate_limits.iter().enumerate() {
        let f = |s: &str| format!("rate_limits[{i}].{s}");
        check_name(&l.name).map_err(|m| c.fail(f("name"), m))?;
        if p.rate_limits[..i].iter().any(|o| o.name == l.name) {
            return Err(c.fail(f("name"), format!("{:?} is used by another limit", l.name)));
        }
        c.count(&f("key"), &l.key, 1, 4)?;
        for (j, k) in l.key.iter().enumerate() {
            let ok = match k.as_str() {
                "consumer" | "client_ip" | "route" => true,
                other => other.strip_prefix("header:").is_some_and(is_token),
            };
            c.ensure(
                ok,
                format!("rate_limits[{i}].key[{j}]"),
                format!("{k:?} is not one of consumer, client_ip, route or header:NAME"),
            )?;
        }
        if l.key.iter().any(|k| k == "consumer") {
            c.ensure(
                !p.authentication.is_empty(),
                f("key"),
                "is keyed by consumer but the policy authenticates no one",
            )?;
        }
        c.range(&f("limit"), l.limit, 1, 1_000_000_000)?;
        c.range(&f("burst"), l.burst, 0, 1_000_000_000)?;
        c.duration(
            &f("window"),
            l.window,
            Duration::from_millis(100),
            Duration::from_secs(31 * 24 * 3600),
        )?;
        if l.lease > 0 {
            c.ensure(
                l.scope == LimitScope::Cluster,
                f("lease"),
                "applies to scope: cluster only",
            )?;
            c.range(&f("lease"), l.lease, 1, 10_000.min(l.limit + l.burst))?;
        }
    }
    c.count("quotas", &p.quotas, 0, 8)?;
    for (i, q) in p.quotas.iter().enumerate() {
        let f = |s: &str| format!("quotas[{i}].{s}");
        check_name(&q.name).map_err(|m| c.fail(f("name"), m))?;
        if p.quotas[..i].iter().any(|o| o.name == q.name) {
            return Err(c.fail(f("name"), format!("{:?} is used by another quota", q.name)));
        }
        c.range(&f("limit"), q.limit, 1, 1_000_000_000_000)?;
        c.ensure(
            q.on_store_failure != StoreFailure::Local,
            f("on_store_failure"),
            "must be open or closed: a quota has no local share",
        )?;
        c.ensure(
            !p.authentication.is_empty(),
            f("name"),
            "quotas count per consumer but the policy authenticates no one",
        )?;
    }
    let fw = &p.firewall;
    for (field, list) in [
        ("firewall.allow_ips", &fw.allow_ips),
        ("firewall.deny_ips", &fw.deny_ips),
        ("firewall.trusted_proxies", &fw.trusted_proxies),
    ] {
        c.count(field, list, 0, 4096)?;
        for (i, cidr) in list.iter().enumerate() {
            check_cidr(cidr).map_err(|m| c.fail(format!("{field}[{i}]"), m))?;
        }
    }
    if let Some(b) = fw.max_body_bytes {
        c.range("firewall.max_body_bytes", b, 1, 1 << 40)?;
    }
    if let Some(h) = fw.max_header_bytes {
        c.range("firewall.max_header_bytes", h, 256, 1 << 20)?;
    }
    if let Some(n) = fw.max_header_count {
        c.range("firewall.max_header_count", u64::from(n), 1, 10_000)?;
    }
    if let Some(u) = fw.max_uri_bytes {
        c.range("firewall.max_uri_bytes", u, 16, 1 << 20)?;
    }
    c.count("firewall.allowed_methods", &fw.allowed_methods, 0, 32)?;
    for (i, m) in fw.allowed_methods.iter().enumerate() {
        c.ensure(
            is_method(m),
            format!("firewall.allowed_methods[{i}]"),
            format!("{m:?} is not an upper-case method name"),
        )?;
    }
    c.no_duplicates("firewall.allowed_methods", &fw.allowed_methods)?;
    c.count("firewall.inspect_headers", &fw.inspect_headers, 0, 32)?;
    for (i, h) in fw.inspect_headers.iter().enumerate() {
        c.ensure(
            is_token(h) && h.bytes().all(|b| !b.is_ascii_uppercase()),
            format!("firewall.inspect_headers[{i}]"),
            format!("{h:?} is not a lower-case header name"),
        )?;
    }
    c.no_duplicates("firewall.inspect_headers", &fw.inspect_headers)?;
    c.range(
        "firewall.inspect_body_bytes",
        fw.inspect_body_bytes,
        0,
        1 << 20,
    )?;
    c.count("firewall.deny_user_agents", &fw.deny_user_agents, 0, 64)?;
    for (i, re) in fw.deny_user_agents.iter().enumerate() {
        let field = format!("firewall.deny_user_agents[{i}]");
        c.ensure(
            !re.is_empty() && re.len() <= 256,
            field.clone(),
            "must be a regular expression of 1 to 256 characters",
        )?;
        user_agent_regex(re).map_err(|e| {
            c.fail(
                field,
                format!("invalid regex: {}", one_line(&e.to_string())),
            )
        })?;
    }
    if let Some(cors) = &fw.cors {
        c.count(
            "firewall.cors.allowed_origins",
            &cors.allowed_origins,
            1,
            256,
        )?;
        for (i, o) in cors.allowed_origins.iter().enumerate() {
            let ok = o == "*"
                || o.split_once("://").is_some_and(|(scheme, rest)| {
                    (scheme == "https" || scheme == "http")
                        && check_address(rest).is_ok() | is_host_pattern(rest)
                });
            c.ensure(
                ok,
                format!("firewall.cors.allowed_origins[{i}]"),
                format!("{o:?} is not \"*\" or scheme://host[:port]"),
            )?;
        }
        if cors.allow_credentials {
            c.ensure(
                !cors.allowed_origins.iter().any(|o| o == "*"),
                "firewall.cors.allow_credentials",
                "cannot be combined with the \"*\" origin",
            )?;
        }
        c.duration(
            "firewall.cors.max_age",
            cors.max_age,
            Duration::ZERO,
            Duration::from_secs(24 * 3600),
        )?;
        for (i, m) in cors.allowed_methods.iter().enumerate() {
            c.ensure(
                is_method(m),
                format!("firewall.cors.allowed_methods[{i}]"),
                format!("{m:?} is not an upper-case method name"),
            )?;
        }
        for (i, h) in cors.allowed_headers.iter().enumerate() {
            c.ensure(
                is_token(h),
                format!("firewall.cors.allowed_headers[{i}]"),
                format!("{h:?} is not a header name"),
            )?;
        }
    }
    Ok(())
}

/// Compiles one `deny_user_agents` pattern the way the data plane does:
/// case-insensitive, within the size limits of route regexes.
pub fn user_agent_regex(re: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(re)
        .case_insensitive(true)
        .size_limit(MAX_REGEX_BYTES / 4)
        .dfa_size_limit(MAX_REGEX_BYTES / 4)
        .build()
}

fn consumer(c: &Check<'_>, o: &Consumer) -> Result {
    c.count("groups", &o.groups, 0, 64)?;
    for (i, g) in o.groups.iter().enumerate() {
        check_name(g).map_err(|m| c.fail(format!("groups[{i}]"), m))?;
    }
    c.no_duplicates("groups", &o.groups)?;
    c.ensure(
        o.metadata.len() <= 64,
        "metadata",
        "has more than 64 entries",
    )?;
    for (k, v) in &o.metadata {
        c.ensure(
            !k.is_empty() && k.len() <= MAX_NAME && v.len() <= 1024,
            format!("metadata.{k}"),
            "keys are 1 to 63 characters and values at most 1024",
        )?;
    }
    Ok(())
}

fn jwt_issuer(c: &Check<'_>, j: &JwtIssuer) -> Result {
    c.ensure(
        !j.issuer.is_empty() && j.issuer.len() <= 1024,
        "issuer",
        "must be 1 to 1024 characters",
    )?;
    c.count("audiences", &j.audiences, 1, 32)?;
    for (i, a) in j.audiences.iter().enumerate() {
        c.ensure(
            !a.is_empty() && a.len() <= 1024,
            format!("audiences[{i}]"),
            "must be 1 to 1024 characters",
        )?;
    }
    c.count("algorithms", &j.algorithms, 1, 12)?;
    c.no_duplicates("algorithms", &j.algorithms)?;
    let hmac = |a: &JwtAlgorithm| {
        matches!(
            a,
            JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512
        )
    };
    match (&j.jwks_url, j.keys.is_empty()) {
        (Some(_), false) | (None, true) => {
            return Err(c.fail("keys", "needs exactly one of keys or jwks_url"))
        }
        (Some(url), true) => {
            let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| {
                    // After the host only a port, then a path, query or fragment,
                    // may follow: with `@` the loopback name would be user info in
                    // front of another host.
                    url.strip_prefix(p).is_some_and(|r| {
                        let r = r
                            .strip_prefix(':')
                            .map_or(r, |r| r.trim_start_matches(|c: char| c.is_ascii_digit()));
                        r.is_empty() || r.starts_with(['/', '?', '#'])
                    })
                });
            c.ensure(
                url.starts_with("https://") || loopback,
                "jwks_url",
                "must be an https URL (plain http only on loopback)",
            )?;
            c.ensure(
                url.len() <= 2048
                    && !url.contains(|ch: char| ch.is_whitespace() || ch.is_control()),
                "jwks_url",
                "must be at most 2048 characters, without spaces",
            )?;
            c.ensure(
                !j.algorithms.iter().any(hmac),
                "algorithms",
                "HMAC algorithms need static secret keys, not a JWKS URL",
            )?;
            let s = Duration::from_secs;
            if let Some(d) = j.jwks_refresh {
                c.duration("jwks_refresh", d, s(10), s(24 * 3600))?;
            }
            if let Some(d) = j.jwks_cooldown {
                c.duration("jwks_cooldown", d, s(1), s(3600))?;
            }
            if let Some(d) = j.jwks_max_stale {
                c.duration("jwks_max_stale", d, s(1), s(30 * 24 * 3600))?;
            }
        }
        (None, false) => {
            for (field, set) in [
                ("jwks_refresh", j.jwks_refresh.is_some()),
                ("jwks_cooldown", j.jwks_cooldown.is_some()),
                ("jwks_max_stale", j.jwks_max_stale.is_some()),
            ] {
                c.ensure(!set, field, "applies only with jwks_url")?;
            }
        }
    }
    c.count("keys", &j.keys, 0, 64)?;
    for (i, k) in j.keys.iter().enumerate() {
        let f = |s: &str| format!("keys[{i}]{s}");
        if let Some(kid) = &k.kid {
            c.ensure(
                !kid.is_empty() && kid.len() <= 256,
                f(".kid"),
                "must be 1 to 256 characters",
            )?;
            // A token's kid picks one key; a sealed HMAC secret is bound to it.
            if let Some(other) = j.keys[..i]
                .iter()
                .position(|o| o.kid.as_deref() == Some(kid.as_str()))
            {
                return Err(c.fail(
                    f(".kid"),
                    format!("\"{kid}\" is also the kid of keys[{other}]; kids must be unique"),
                ));
            }
        }
        match (&k.pem, &k.secret) {
            (Some(pem), None) => {
                c.ensure(
                    pem.contains("-----BEGIN PUBLIC KEY-----")
                        || pem.contains("-----BEGIN RSA PUBLIC KEY-----"),
                    f(".pem"),
                    "holds no PEM public key",
                )?;
                c.ensure(
                    j.algorithms.iter().any(|a| !hmac(a)),
                    f(".pem"),
                    "is a public key but algorithms lists only HMAC algorithms",
                )?;
                if let Some(bits) = rsa_bits(pem) {
                    c.ensure(
                        bits >= MIN_RSA_BITS,
                        f(".pem"),
                        format!(
                            "is a {bits}-bit RSA key; at least {MIN_RSA_BITS} bits are required"
                        ),
                    )?;
                }
            }
            (None, Some(secret)) => {
                c.ensure(
                    secret.len() >= 32,
                    f(".secret"),
                    "is shorter than 32 bytes, too weak for HMAC",
                )?;
                c.ensure(
                    j.algorithms.iter().any(hmac),
                    f(".secret"),
                    "is an HMAC secret but algorithms lists no HS256/HS384/HS512",
                )?;
            }
            _ => return Err(c.fail(f(""), "needs exactly one of pem or secret")),
        }
    }
    c.duration("leeway", j.leeway, Duration::ZERO, Duration::from_secs(300))?;
    c.ensure(
        !j.consumer_claim.is_empty(),
        "consumer_claim",
        "must not be empty",
    )?;
    c.range("max_token_bytes", j.max_token_bytes, 256, 65_536)
}

fn introspection(c: &Check<'_>, i: &IntrospectionAuth) -> Result {
    c.ensure(
        i.url.len() <= 2048
            && has_host(&i.url)
            && (i.url.starts_with("https://") || is_loopback_http(&i.url)),
        "introspection.url",
        "must be an https URL (plain http only on loopback)",
    )?;
    c.ensure(
        !i.client_id.is_empty()
            && i.client_id.len() <= 256
            && !i.client_id.contains(char::is_control),
        "introspection.client_id",
        "must be 1 to 256 characters, none of them control characters",
    )?;
    c.ensure(
        !i.client_secret.is_empty()
            && (i.client_secret.len() <= 1024 || crate::seal::is_sealed(&i.client_secret)),
        "introspection.client_secret",
        "must be 1 to 1024 characters",
    )?;
    if let Some(pem) = &i.ca_pem {
        ca_certificates(pem).map_err(|e| c.fail("introspection.ca_pem", e))?;
    }
    c.ensure(
        !i.consumer_claim.is_empty() && i.consumer_claim.len() <= 256,
        "introspection.consumer_claim",
        "must be 1 to 256 characters",
    )?;
    c.duration(
        "introspection.cache_ttl",
        i.cache_ttl,
        Duration::ZERO,
        Duration::from_secs(3600),
    )?;
    c.duration(
        "introspection.negative_cache_ttl",
        i.negative_cache_ttl,
        Duration::ZERO,
        Duration::from_secs(300),
    )?;
    c.range(
        "introspection.max_cache_entries",
        i.max_cache_entries,
        1,
        1_000_000,
    )?;
    c.duration(
        "introspection.timeout",
        i.timeout,
        Duration::from_millis(100),
        Duration::from_secs(30),
    )
}

/// Whether `url` is http(s) with a host, no user info and no blanks.
fn has_host(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // A port, when there is one, is a number that fits.
    let port_ok = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            !host.is_empty() && port.parse::<u16>().is_ok()
        }
        _ => true,
    };
    !authority.is_empty()
        && port_ok
        && !authority.contains('@')
        && !url.contains(|c: char| c.is_whitespace() || c.is_control())
}

/// Whether `url` is plain http to a loopback host (127.0.0.1, localhost or
/// [::1]), with nothing but a port between the host and the path.
pub fn is_loopback_http(url: &str) -> bool {
    ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|p| {
            url.strip_prefix(p).is_some_and(|r| {
                let r = r
                    .strip_prefix(':')
                    .map_or(r, |r| r.trim_start_matches(|c: char| c.is_ascii_digit()));
                r.is_empty() || r.starts_with(['/', '?', '#'])
            })
        })
}

/// Checks that `pem` holds one or more CA certificates (basic constraints
/// `CA:TRUE`) and nothing else; returns how many.
pub fn ca_certificates(pem: &str) -> std::result::Result<usize, String> {
    let mut n = 0;
    for item in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let item = item.map_err(|e| format!("is not valid PEM: {e}"))?;
        if item.label != "CERTIFICATE" {
            return Err(format!(
                "holds a {} where only CERTIFICATE blocks belong",
                item.label
            ));
        }
        let cert = item
            .parse_x509()
            .map_err(|e| format!("certificate {n} does not parse: {e}"))?;
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca);
        if !is_ca {
            return Err(format!(
                "certificate {n} ({}) is not a CA certificate",
                cert.subject()
            ));
        }
        n += 1;
    }
    if n == 0 {
        return Err("holds no PEM certificate".to_string());
    }
    Ok(n)
}

/// The smallest RSA key accepted for token signatures (RFC 8725, NIST).
pub const MIN_RSA_BITS: usize = 2048;

/// The size of an RSA public key in PEM (PKCS#8 or PKCS#1), or `None`
/// when the PEM holds another kind of key.
fn rsa_bits(pem: &str) -> Option<usize> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPublicKey::from_public_key_pem(pem.trim())
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem.trim()))
        .ok()?;
    Some(key.size() * 8)
}

fn certificate(c: &Check<'_>, cert: &Certificate) -> Result {
    c.count("server_names", &cert.server_names, 1, 100)?;
    for (i, n) in cert.server_names.iter().enumerate() {
        c.ensure(
            is_host_pattern(n),
            format!("server_names[{i}]"),
            format!("{n:?} is not a lower-case host name or *. wildcard"),
        )?;
    }
    c.ensure(
        cert.certificate_pem.contains("-----BEGIN CERTIFICATE-----"),
        "certificate_pem",
        "holds no PEM certificate",
    )?;
    // A sealed key was checked in the clear by the leader before it sealed it.
    c.ensure(
        cert.private_key_pem.contains("PRIVATE KEY-----")
            || crate::seal::is_sealed(&cert.private_key_pem),
        "private_key_pem",
        "holds no PEM private key",
    )
}

/// The objects this one names, with the field that names each.
pub fn references(object: &Object) -> Vec<(String, ObjectRef)> {
    let r = |field: &str, kind, name: &str| {
        (
            field.to_string(),
            ObjectRef {
                kind,
                name: name.to_string(),
            },
        )
    };
    match object {
        Object::Route(route) => {
            let mut refs = vec![r("upstream", Kind::Upstream, &route.upstream)];
            if let Some(p) = &route.policy {
                refs.push(r("policy", Kind::Policy, p));
            }
            refs
        }
        Object::Policy(p) => p
            .jwt
            .iter()
            .flat_map(|j| j.issuers.iter().enumerate())
            .map(|(i, iss)| r(&format!("jwt.issuers[{i}]"), Kind::JwtIssuer, iss))
            .collect(),
        Object::ApiKey(k) => vec![r("consumer", Kind::Consumer, &k.consumer)],
        _ => Vec::new(),
    }
}

/// The kinds whose objects may reference an object of `kind`.
pub fn referrer_kinds(kind: Kind) -> &'static [Kind] {
    match kind {
        Kind::Upstream | Kind::Policy => &[Kind::Route],
        Kind::JwtIssuer => &[Kind::Policy],
        Kind::Consumer => &[Kind::ApiKey],
        _ => &[],
    }
}

#[cfg(test)]
mod tests;
