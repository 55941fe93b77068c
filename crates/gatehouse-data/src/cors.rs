//! CORS at the gateway: a policy's allowed origins, methods and headers,
//! compiled once per revision. Preflights (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`) are answered here and never reach the
//! upstream; a preflight from an origin, for a method or with headers the
//! policy does not allow is refused with 403. Other responses to an allowed
//! origin get `Access-Control-Allow-Origin` (and `-Credentials`); the
//! gateway's answer replaces any the upstream gave.

use gatehouse_model::object::Cors;
use http::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::Method;

use crate::problem::Reject;

/// A policy's CORS rules, compiled.
#[derive(Debug)]
pub struct CompiledCors {
    any_origin: bool,
    /// `scheme://host[:port]`, lower case.
    exact: Vec<String>,
    /// (`scheme://`, `.suffix`) of `scheme://*.suffix` patterns.
    wildcard: Vec<(String, String)>,
    methods: Vec<Method>,
    allow_methods: HeaderValue,
    /// Lower-case header names; `None` when `*` allows any.
    headers: Option<Vec<String>>,
    allow_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

/// Whether a request is a CORS preflight, and for which method.
pub fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
    if method != Method::OPTIONS || !headers.contains_key(ORIGIN) {
        return None;
    }
    let requested = headers.get(ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(requested.as_bytes()).ok()
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

impl CompiledCors {
    pub fn compile(policy: &str, c: &Cors) -> Result<CompiledCors, String> {
        let mut exact = Vec::new();
        let mut wildcard = Vec::new();
        let mut any_origin = false;
        for o in &c.allowed_origins {
            let o = o.to_ascii_lowercase();
            if o == "*" {
                any_origin = true;
            } else if let Some((scheme, host)) = o.split_once("://") {
                match host.strip_prefix("*.") {
                    Some(suffix) => wildcard.push((format!("{scheme}://"), format!(".{suffix}"))),
                    None => exact.push(o.clone()),
                }
            } else {
                return Err(format!(
                    "policy \"{policy}\": firewall.cors.allowed_origins: {o:?}"
                ));
            }
        }
        // Without a list, the methods a simple request may use.
        let methods: Vec<Method> = if c.allowed_methods.is_empty() {
            vec![Method::GET, Method::HEAD, Method::POST]
        } else {
            c.allowed_methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.as_bytes()).map_err(|_| {
                        format!("policy \"{policy}\": firewall.cors.allowed_methods: {m:?}")
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let bad = |what: &str| format!("policy \"{policy}\": firewall.cors.{what}");
        let allow_methods =
            HeaderValue::from_str(&join(methods.iter().map(|m| m.as_str().to_string())))
                .map_err(|_| bad("allowed_methods"))?;
        let any_header = c.allowed_headers.iter().any(|h| h == "*");
        let headers: Option<Vec<String>> = (!any_header).then(|| {
            c.allowed_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect()
        });
        let allow_headers = match &headers {
            Some(list) if list.is_empty() => None,
            Some(list) => Some(
                HeaderValue::from_str(&join(list.iter().cloned()))
                    .map_err(|_| bad("allowed_headers"))?,
            ),
            None => None,
        };
        Ok(CompiledCors {
            any_origin,
            exact,
            wildcard,
            methods,
            allow_methods,
            headers,
            allow_headers,
            credentials: c.allow_credentials,
            max_age: HeaderValue::from(c.max_age.as_secs()),
        })
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        if self.any_origin {
            return true;
        }
        let origin = origin.to_ascii_lowercase();
        if self.exact.contains(&origin) {
            return true;
        }
        self.wildcard.iter().any(|(scheme, suffix)| {
            origin.strip_prefix(scheme.as_str()).is_some_and(|host| {
                // A wildcard names hosts below the suffix, on the default port.
                host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && !host.contains(':')
                    && !host.contains('/')
            })
        })
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, if allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        let text = origin.to_str().ok()?;
        if !self.origin_allowed(text) {
            return None;
        }
        if self.any_origin && !self.credentials {
            Some(HeaderValue::from_static("*"))
        } else {
            Some(origin.clone())
        }
    }

    /// Answers a preflight: the headers of a 204, or 403 when the origin,
    /// the method or a requested header is not allowed.
    pub fn preflight(&self, method: &Method, request: &HeaderMap) -> Result<HeaderMap, Reject> {
        let origin = request.get(ORIGIN).ok_or(Reject::Blocked)?;
        let allow_origin = self.allow_origin(origin).ok_or(Reject::Blocked)?;
        if !self.methods.contains(method) {
            return Err(Reject::Blocked);
        }
        if let Some(allowed) = &self.headers {
            for value in request.get_all(ACCESS_CONTROL_REQUEST_HEADERS) {
                let value = value.to_str().map_err(|_| Reject::Blocked)?;
                for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    if !allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                        return Err(Reject::Blocked);
                    }
                }
            }
        }
        let mut h = HeaderMap::new();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        match &self.allow_headers {
            Some(v) => {
                h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
            None if self.headers.is_none() => {
                // `*`: echo what was asked for (a literal `*` is not a
                // wildcard for credentialed requests).
                if let Some(asked) = request.get(ACCESS_CONTROL_REQUEST_HEADERS) {
                    h.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
                }
            }
            None => {}
        }
        if self.credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        h.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        h.insert(
            VARY,
            HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Ok(h)
    }

    /// Sets the CORS headers of a response to a request from `origin`
    /// (none when the origin is not allowed), replacing the upstream's.
    pub fn decorate(&self, origin: &HeaderValue, response: &mut HeaderMap) {
        for name in [
            ACCESS_CONTROL_ALLOW_ORIGIN,
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            ACCESS_CONTROL_ALLOW_METHODS,
            ACCESS_CONTROL_ALLOW_HEADERS,
            ACCESS_CONTROL_MAX_AGE,
        ] {
            response.remove(name);
        }
        let allow = self.allow_origin(origin);
        let wildcard = allow.as_ref().is_some_and(|v| v == "*");
        if let Some(v) = allow {
            response.insert(ACCESS_CONTROL_ALLOW_ORIGIN, v);
            if self.credentials {
                response.insert(
                    ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        }
        // The answer depends on the origin unless it is `*` for everyone.
        if !wildcard {
            response.append(VARY, HeaderValue::from_static("Origin"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cors(origins: &[&str], credentials: bool) -> CompiledCors {
        CompiledCors::compile(
            "p",
            &Cors {
                allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
                allowed_methods: vec!["GET".into(), "PUT".into()],
                allowed_headers: vec!["content-type".into(), "x-api-key".into()],
                allow_credentials: credentials,
                max_age: Duration::from_secs(600),
            },
        )
        .unwrap()
    }

    fn request(origin: &str, method: &str, headers: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ORIGIN, origin.parse().unwrap());
        h.insert(ACCESS_CONTROL_REQUEST_METHOD, method.parse().unwrap());
        if let Some(v) = headers {
            h.insert(ACCESS_CONTROL_REQUEST_HEADERS, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins_exact_and_wildcard() {
        let c = cors(
            &[
                "https://app.example.com",
                "https://*.example.org",
                "http://localhost:3000",
            ],
            false,
        );
        for ok in [
            "https://app.example.com",
            "HTTPS://APP.EXAMPLE.COM",
            "https://a.example.org",
            "https://a.b.example.org",
            "http://localhost:3000",
        ] {
            assert!(c.origin_allowed(ok), "{ok}");
        }
        for no in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://example.org",
            "https://evilexample.org",
            "https://a.example.org:444",
            "https://a.example.org.evil.com",
            "http://localhost:3001",
            "null",
        ] {
            assert!(!c.origin_allowed(no), "{no}");
        }
    }

    #[test]
    fn preflight_allows_listed_methods_and_headers_only() {
        let c = cors(&["https://app.example.com"], true);
        let h = c
            .preflight(
                &Method::PUT,
                &request(
                    "https://app.example.com",
                    "PUT",
                    Some("Content-Type, X-API-Key"),
                ),
            )
            .unwrap();
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example.com");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET, PUT");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_HEADERS], "content-type, x-api-key");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[ACCESS_CONTROL_MAX_AGE], "600");
        let refused = |origin: &str, method: Method, headers: Option<&str>| {
            c.preflight(&method, &request(origin, method.as_str(), headers))
                .unwrap_err()
        };
        assert_eq!(
            refused("https://evil.com", Method::GET, None),
            Reject::Blocked
        );
        assert_eq!(
            refused("https://app.example.com", Method::DELETE, None),
            Reject::Blocked
        );
        assert_eq!(
            refused("https://app.example.com", Method::GET, Some("x-other")),
            Reject::Blocked
        );
    }

    #[test]
    fn responses_get_the_origin_only_when_allowed_and_replace_the_upstreams() {
        let c = cors(&["https://app.example.com"], false);
        let mut h = HeaderMap::new();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, "*".parse().unwrap());
        c.decorate(&"https://evil.com".parse().unwrap(), &mut h);
        assert!(!h.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN));
        assert_eq!(h[VARY], "Origin");
        let mut h = HeaderMap::new();
        c.decorate(&"https://app.example.com".parse().unwrap(), &mut h);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example.com");
        assert!(!h.contains_key(ACCESS_CONTROL_ALLOW_CREDENTIALS));

        let any = cors(&["*"], false);
        let mut h = HeaderMap::new();
        any.decorate(&"https://anyone.net".parse().unwrap(), &mut h);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(!h.contains_key(VARY));
    }

    #[test]
    fn only_options_with_origin_and_a_requested_method_is_a_preflight() {
        let h = request("https://a.com", "PUT", None);
        assert_eq!(preflight_method(&Method::OPTIONS, &h), Some(Method::PUT));
        assert_eq!(preflight_method(&Method::GET, &h), None);
        let mut no_origin = h.clone();
        no_origin.remove(ORIGIN);
        assert_eq!(preflight_method(&Method::OPTIONS, &no_origin), None);
    }
}
