//! The one definition of an IP network in configuration (`firewall.allow_ips`,
//! `deny_ips`, `trusted_proxies`): validation calls it, and so does the data
//! plane when it compiles the lists, so a list that validates always compiles.

use std::net::IpAddr;

/// `ADDRESS/PREFIX` or a bare address (a network of one): the address as
/// the standard library reads it (dotted-quad IPv4 without leading zeros,
/// or IPv6), and a prefix of decimal digits only, at most 32 for IPv4 and
/// 128 for IPv6. `None` for anything else.
pub fn parse_network(s: &str) -> Option<(IpAddr, u8)> {
    match s.split_once('/') {
        Some((addr, prefix)) => {
            // u8::from_str accepts a leading '+'; a prefix is digits only.
            if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            let addr: IpAddr = addr.parse().ok()?;
            let prefix: u8 = prefix.parse().ok()?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            (prefix <= max).then_some((addr, prefix))
        }
        None => {
            let addr: IpAddr = s.parse().ok()?;
            Some((addr, if addr.is_ipv4() { 32 } else { 128 }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_addresses_parse_and_lookalikes_do_not() {
        for ok in [
            "10.0.0.0/8",
            "192.0.2.1",
            "0.0.0.0/0",
            "2001:db8::/32",
            "::1",
            "::ffff:10.0.0.0/104",
        ] {
            assert!(parse_network(ok).is_some(), "{ok}");
        }
        for bad in [
            // Leading zeros (octal in some parsers): never.
            "1.00.0.0/8",
            "010.0.0.1",
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "10.0.0.0/0008",
            "10.0.0/8",
            "",
            "/8",
            "example.com/8",
        ] {
            assert!(parse_network(bad).is_none(), "{bad}");
        }
    }
}
