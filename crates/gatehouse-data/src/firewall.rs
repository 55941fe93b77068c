//! The firewall rules of a policy: which client addresses may pass, which
//! methods, how large the headers and the body may be, which user agents are
//! refused, the injection pattern rules (`inspect.rs`) and CORS (`cors.rs`).
//! Compiled with the revision; checked after routing (the rules belong to
//! the route's policy) and before authentication, so a refused request costs
//! no key lookup. Only the body inspection runs later: after authentication,
//! so that an unauthenticated client cannot make the gateway read a body.

use std::net::IpAddr;

use gatehouse_model::object::{Firewall, RuleMode};
use http::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, Method};
use regex::RegexSet;

use crate::cors::CompiledCors;
use crate::headers::{Cidr, Trust};
use crate::inspect::{decode, Finding, Inspector};
use crate::metrics::{FirewallLabels, Metrics};
use crate::problem::Reject;

/// A policy's firewall, compiled.
#[derive(Debug, Default)]
pub struct CompiledFirewall {
    /// Proxies whose forwarding headers are believed.
    pub trust: Trust,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    methods: Vec<Method>,
    max_header_bytes: Option<u64>,
    max_header_count: Option<usize>,
    max_uri_bytes: Option<u64>,
    /// Enforced from `Content-Length` here, and while streaming by the proxy.
    pub max_body_bytes: Option<u64>,
    /// Refused user agents, case-insensitive.
    user_agents: Option<RegexSet>,
    /// The injection rules, and what they read besides the path and query.
    inspector: Inspector,
    inspect_headers: Vec<HeaderName>,
    inspect_body_bytes: usize,
    /// CORS, answered at the gateway.
    pub cors: Option<CompiledCors>,
    /// No rule reads the request line or headers (see
    /// [`CompiledFirewall::check_request`]); worked out once, when compiled.
    checks_nothing: bool,
}

/// Where an injection rule matched, for the log (never the text itself).
#[derive(Clone, Copy, Debug)]
pub enum Location<'a> {
    Path,
    Query,
    Header(&'a HeaderName),
    Body,
}

/// How a body is decoded before the injection rules read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/x-www-form-urlencoded`: percent-decoded, `+` as space.
    Form,
    /// Other text (JSON, XML, text/*, multipart): percent-decoded.
    Text,
}

fn cidrs(policy: &str, field: &str, list: &[String]) -> Result<Vec<Cidr>, String> {
    list.iter()
        .map(|c| {
            c.parse::<Cidr>()
                .map_err(|e| format!("policy \"{policy}\": firewall.{field}: {e}"))
        })
        .collect()
}

impl CompiledFirewall {
    pub fn compile(policy: &str, f: &Firewall) -> Result<CompiledFirewall, String> {
        let mut fw = CompiledFirewall {
            trust: Trust::new(cidrs(policy, "trusted_proxies", &f.trusted_proxies)?),
            allow: cidrs(policy, "allow_ips", &f.allow_ips)?,
            deny: cidrs(policy, "deny_ips", &f.deny_ips)?,
            methods: f
                .allowed_methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.as_bytes()).map_err(|_| {
                        format!("policy \"{policy}\": firewall.allowed_methods: {m:?}")
                    })
                })
                .collect::<Result<_, _>>()?,
            max_header_bytes: f.max_header_bytes,
            max_header_count: f.max_header_count.map(|n| n as usize),
            max_uri_bytes: f.max_uri_bytes,
            max_body_bytes: f.max_body_bytes,
            user_agents: if f.deny_user_agents.is_empty() {
                None
            } else {
                Some(
                    regex::RegexSetBuilder::new(&f.deny_user_agents)
                        .case_insensitive(true)
                        .size_limit(gatehouse_model::validate::MAX_REGEX_BYTES * 4)
                        .dfa_size_limit(gatehouse_model::validate::MAX_REGEX_BYTES * 4)
                        .build()
                        .map_err(|_| {
                            format!(
                                "policy \"{policy}\": firewall.deny_user_agents: does not compile"
                            )
                        })?,
                )
            },
            inspector: Inspector::new(f.sql_injection, f.xss),
            inspect_headers: f
                .inspect_headers
                .iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                        format!("policy \"{policy}\": firewall.inspect_headers: {h:?}")
                    })
                })
                .collect::<Result<_, _>>()?,
            inspect_body_bytes: usize::try_from(f.inspect_body_bytes).unwrap_or(usize::MAX),
            cors: f
                .cors
                .as_ref()
                .map(|c| CompiledCors::compile(policy, c))
                .transpose()?,
            checks_nothing: false,
        };
        fw.checks_nothing = fw.reads_nothing();
        Ok(fw)
    }

    /// Whether no rule of [`CompiledFirewall::check_request`] is set. Every
    /// field is named, so a new one cannot be left out by mistake.
    fn reads_nothing(&self) -> bool {
        let CompiledFirewall {
            trust: _,
            allow,
            deny,
            methods,
            max_header_bytes,
            max_header_count,
            max_uri_bytes,
            max_body_bytes,
            user_agents,
            inspector,
            // Read only when the inspector is on.
            inspect_headers: _,
            // The body is inspected later, by the proxy.
            inspect_body_bytes: _,
            // Preflights are answered by the proxy, after these rules.
            cors: _,
            checks_nothing: _,
        } = self;
        allow.is_empty()
            && deny.is_empty()
            && methods.is_empty()
            && max_header_bytes.is_none()
            && max_header_count.is_none()
            && max_uri_bytes.is_none()
            && max_body_bytes.is_none()
            && user_agents.is_none()
            && !inspector.is_on()
    }

    /// Every rule that reads the request line and headers, in order: the
    /// address lists, the method, the header and body sizes, the URI's
    /// length, the user agents and the injection rules. A policy with none
    /// of them (one that only limits, say) costs a branch.
    #[allow(clippy::too_many_arguments)]
    pub fn check_request(
        &self,
        policy: &str,
        client: IpAddr,
        method: &Method,
        uri: &http::Uri,
        routed: &str,
        headers: &HeaderMap,
        metrics: &Metrics,
    ) -> Result<(), Reject> {
        if self.checks_nothing {
            return Ok(());
        }
        self.check(client, method, headers)?;
        self.check_uri(uri)?;
        self.check_content(policy, routed, uri.query(), headers, metrics)
    }

    /// The user-agent rules and the injection rules on the path (as routed),
    /// the query and the chosen headers, each percent-decoded first. A
    /// `detect` match is logged and counted and the request goes on.
    pub fn check_content(
        &self,
        policy: &str,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        metrics: &Metrics,
    ) -> Result<(), Reject> {
        if let Some(agents) = &self.user_agents {
            let refused = headers
                .get_all(USER_AGENT)
                .iter()
                .any(|ua| agents.is_match(&String::from_utf8_lossy(ua.as_bytes())));
            if refused {
                tracing::info!(policy, "request refused: user agent denied");
                return Err(Reject::Blocked);
            }
        }
        if !self.inspector.is_on() {
            return Ok(());
        }
        self.scan(policy, Location::Path, &decode(path, false), metrics)?;
        if let Some(q) = query {
            self.scan(policy, Location::Query, &decode(q, true), metrics)?;
        }
        for name in &self.inspect_headers {
            for value in headers.get_all(name) {
                let text = String::from_utf8_lossy(value.as_bytes());
                self.scan(
                    policy,
                    Location::Header(name),
                    &decode(&text, false),
                    metrics,
                )?;
            }
        }
        Ok(())
    }

    /// How many bytes of the body to inspect, and how, for a request with
    /// these headers; `None` when the body is not inspected (the rules are
    /// off, the cap is 0, or the content type is not text).
    pub fn body_inspection(&self, headers: &HeaderMap) -> Option<(usize, BodyKind)> {
        if !self.inspector.is_on() || self.inspect_body_bytes == 0 {
            return None;
        }
        let kind = match headers.get(CONTENT_TYPE) {
            // Without a type, read it as text rather than not at all.
            None => BodyKind::Text,
            Some(v) => {
                let v = v.to_str().ok()?.trim().to_ascii_lowercase();
                let essence = v.split(';').next().unwrap_or("").trim();
                if essence == "application/x-www-form-urlencoded" {
                    BodyKind::Form
                } else if essence.starts_with("text/")
                    || essence == "application/json"
                    || essence.ends_with("+json")
                    || essence == "application/xml"
                    || essence.ends_with("+xml")
                    || essence == "application/graphql"
                    || essence == "multipart/form-data"
                {
                    BodyKind::Text
                } else {
                    return None;
                }
            }
        };
        Some((self.inspect_body_bytes, kind))
    }

    /// The injection rules on the first bytes of a body.
    pub fn check_body(
        &self,
        policy: &str,
        prefix: &[u8],
        kind: BodyKind,
        metrics: &Metrics,
    ) -> Result<(), Reject> {
        let cap = prefix.len().min(self.inspect_body_bytes);
        let text = String::from_utf8_lossy(&prefix[..cap]);
        let decoded = decode(&text, kind == BodyKind::Form);
        self.scan(policy, Location::Body, &decoded, metrics)
    }

    fn scan(
        &self,
        policy: &str,
        location: Location<'_>,
        text: &str,
        metrics: &Metrics,
    ) -> Result<(), Reject> {
        let Some(Finding {
            family,
            pattern,
            mode,
        }) = self.inspector.scan(text)
        else {
            return Ok(());
        };
        let action = if mode == RuleMode::Block {
            "blocked"
        } else {
            "detected"
        };
        metrics
            .firewall_matches
            .get_or_create(&FirewallLabels {
                rule: family.label(),
                action,
            })
            .inc();
        // The matched text stays out of the log: it is attacker-controlled.
        tracing::warn!(
            policy,
            rule = family.label(),
            pattern,
            ?location,
            action,
            "injection rule matched"
        );
        if mode == RuleMode::Block {
            Err(Reject::Blocked)
        } else {
            Ok(())
        }
    }

    /// Checks a request from `client` (the address the trust rules give).
    fn check(&self, client: IpAddr, method: &Method, headers: &HeaderMap) -> Result<(), Reject> {
        if self.deny.iter().any(|c| c.contains(client)) {
            return Err(Reject::Forbidden);
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(client)) {
            return Err(Reject::Forbidden);
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return Err(Reject::method_not_allowed(
                self.methods.iter().map(Method::as_str),
            ));
        }
        if self.max_header_count.is_some_and(|cap| headers.len() > cap) {
            return Err(Reject::HeaderFieldsTooLarge);
        }
        if let Some(cap) = self.max_header_bytes {
            let size: u64 = headers
                .iter()
                .map(|(n, v)| (n.as_str().len() + v.len() + 4) as u64)
                .sum();
            if size > cap {
                return Err(Reject::HeaderFieldsTooLarge);
            }
        }
        if let Some(cap) = self.max_body_bytes {
            let declared = headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|len| len > cap) {
                return Err(Reject::PayloadTooLarge);
            }
        }
        Ok(())
    }

    /// The request target against `max_uri_bytes` (path and query as sent).
    fn check_uri(&self, uri: &http::Uri) -> Result<(), Reject> {
        let len = uri.path_and_query().map_or(0, |pq| pq.as_str().len()) as u64;
        match self.max_uri_bytes {
            Some(cap) if len > cap => Err(Reject::UriTooLong),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw(f: Firewall) -> CompiledFirewall {
        CompiledFirewall::compile("p", &f).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn address_lists_deny_first_then_allow() {
        let f = fw(Firewall {
            allow_ips: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            deny_ips: vec!["10.6.6.6".into()],
            ..Default::default()
        });
        let h = HeaderMap::new();
        assert!(f.check(ip("10.1.2.3"), &Method::GET, &h).is_ok());
        assert!(f.check(ip("2001:db8::1"), &Method::GET, &h).is_ok());
        assert_eq!(
            f.check(ip("10.6.6.6"), &Method::GET, &h),
            Err(Reject::Forbidden)
        );
        assert_eq!(
            f.check(ip("192.168.1.1"), &Method::GET, &h),
            Err(Reject::Forbidden)
        );
    }

    #[test]
    fn methods_and_sizes() {
        let f = fw(Firewall {
            allowed_methods: vec!["GET".into()],
            max_header_bytes: Some(256),
            max_body_bytes: Some(10),
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        assert_eq!(
            f.check(ip("10.0.0.1"), &Method::POST, &h)
                .unwrap_err()
                .status()
                .as_u16(),
            405
        );
        h.insert(CONTENT_LENGTH, "11".parse().unwrap());
        assert_eq!(
            f.check(ip("10.0.0.1"), &Method::GET, &h),
            Err(Reject::PayloadTooLarge)
        );
        h.insert(CONTENT_LENGTH, "10".parse().unwrap());
        assert!(f.check(ip("10.0.0.1"), &Method::GET, &h).is_ok());
        h.insert("x-big", "a".repeat(300).parse().unwrap());
        assert_eq!(
            f.check(ip("10.0.0.1"), &Method::GET, &h),
            Err(Reject::HeaderFieldsTooLarge)
        );
    }

    #[test]
    fn header_count_and_uri_length() {
        let f = fw(Firewall {
            max_header_count: Some(2),
            max_uri_bytes: Some(20),
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("b", "2".parse().unwrap());
        assert!(f.check(ip("10.0.0.1"), &Method::GET, &h).is_ok());
        h.append("b", "3".parse().unwrap());
        assert_eq!(
            f.check(ip("10.0.0.1"), &Method::GET, &h),
            Err(Reject::HeaderFieldsTooLarge)
        );
        let ok: http::Uri = "/twenty-bytes?q=1234".parse().unwrap();
        assert!(f.check_uri(&ok).is_ok());
        let long: http::Uri = "/twenty-bytes?q=12345".parse().unwrap();
        assert_eq!(f.check_uri(&long), Err(Reject::UriTooLong));
        assert_eq!(Reject::UriTooLong.status().as_u16(), 414);
    }

    /// A policy without request rules skips them all at once; each rule on
    /// its own still refuses through the same call the proxy makes.
    #[test]
    fn each_request_rule_alone_refuses_and_none_admits_all() {
        let metrics = Metrics::default();
        let mut headers = HeaderMap::new();
        headers.insert(USER_AGENT, "sqlmap/1.7".parse().unwrap());
        headers.insert(CONTENT_LENGTH, "100".parse().unwrap());
        headers.insert("x-pad", "a".repeat(64).parse().unwrap());
        let uri: http::Uri = "/items?q=1%27%20OR%201=1--".parse().unwrap();
        let ask = |f: &CompiledFirewall| {
            f.check_request(
                "p",
                ip("10.0.0.1"),
                &Method::POST,
                &uri,
                uri.path(),
                &headers,
                &metrics,
            )
        };
        let empty = fw(Firewall::default());
        assert!(empty.checks_nothing);
        assert_eq!(ask(&empty), Ok(()));
        let each = [
            Firewall {
                allow_ips: vec!["192.168.0.0/16".into()],
                ..Default::default()
            },
            Firewall {
                deny_ips: vec!["10.0.0.0/8".into()],
                ..Default::default()
            },
            Firewall {
                allowed_methods: vec!["GET".into()],
                ..Default::default()
            },
            Firewall {
                max_header_bytes: Some(64),
                ..Default::default()
            },
            Firewall {
                max_header_count: Some(2),
                ..Default::default()
            },
            Firewall {
                max_uri_bytes: Some(8),
                ..Default::default()
            },
            Firewall {
                max_body_bytes: Some(99),
                ..Default::default()
            },
            Firewall {
                deny_user_agents: vec!["^sqlmap".into()],
                ..Default::default()
            },
            Firewall {
                sql_injection: RuleMode::Block,
                ..Default::default()
            },
        ];
        for rule in each {
            let f = fw(rule.clone());
            assert!(!f.checks_nothing, "{rule:?}");
            assert!(ask(&f).is_err(), "{rule:?} let the request through");
        }
        // Rules that only come into play later, or with another rule, leave
        // the request rules skipped.
        for rule in [
            Firewall {
                trusted_proxies: vec!["127.0.0.1".into()],
                ..Default::default()
            },
            Firewall {
                inspect_headers: vec!["x-pad".into()],
                ..Default::default()
            },
        ] {
            assert!(fw(rule.clone()).checks_nothing, "{rule:?}");
        }
    }
}
