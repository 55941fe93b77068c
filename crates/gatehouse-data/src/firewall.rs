//! The firewall rules of a policy: which client addresses may pass, which
//! methods, and how large the headers and the body may be. Compiled with the
//! revision; checked after routing (the rules belong to the route's policy)
//! and before authentication, so a refused request costs no key lookup.

use std::net::IpAddr;

use gatehouse_model::object::Firewall;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, Method};

use crate::headers::{Cidr, Trust};
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
    /// Enforced from `Content-Length` here, and while streaming by the proxy.
    pub max_body_bytes: Option<u64>,
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
        Ok(CompiledFirewall {
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
            max_body_bytes: f.max_body_bytes,
        })
    }

    /// Checks a request from `client` (the address the trust rules give).
    pub fn check(
        &self,
        client: IpAddr,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<(), Reject> {
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
}
