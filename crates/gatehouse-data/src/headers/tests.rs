use super::*;
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, HOST};
use std::net::{Ipv4Addr, Ipv6Addr};

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn names(h: &HeaderMap) -> Vec<&str> {
    let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    names.sort_unstable();
    names
}

fn all(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn trust(list: &[&str]) -> Trust {
    Trust::parse(list).unwrap()
}

fn info(peer: &str, scheme: &'static str, host: Option<&str>) -> ClientInfo {
    ClientInfo {
        peer: ip(peer),
        scheme,
        host: host.map(str::to_string),
    }
}

// ---------------------------------------------------------------------------
// strip_hop_by_hop
// ---------------------------------------------------------------------------

#[test]
fn every_fixed_hop_by_hop_header_is_removed_and_end_to_end_ones_kept() {
    let mut h = map(&[
        ("connection", "close"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("proxy-authenticate", "Basic"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("te", "gzip"),
        ("trailer", "x-checksum"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("authorization", "Bearer t"),
        ("content-type", "text/plain"),
        ("x-custom", "1"),
    ]);
    assert!(!strip_hop_by_hop(&mut h, HopByHop::Strip));
    assert_eq!(names(&h), ["authorization", "content-type", "x-custom"]);
}

#[test]
fn connection_tokens_remove_the_headers_they_name() {
    let mut h = map(&[
        ("connection", "x-secret, Keep-Alive"),
        ("keep-alive", "timeout=5"),
        ("x-secret", "internal"),
        ("cookie", "a=b"),
    ]);
    strip_hop_by_hop(&mut h, HopByHop::Strip);
    assert_eq!(names(&h), ["cookie"]);
}

#[test]
fn connection_naming_x_forwarded_for_does_not_erase_a_trusted_chain() {
    let incoming = map(&[
        (
            "connection",
            "x-forwarded-for, Keep-Alive, Forwarded, X-Forwarded-Host",
        ),
        ("keep-alive", "timeout=5"),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-host", "api.example.com"),
    ]);

    // Left in place for set_forwarded, which owns it...
    let mut h = incoming.clone();
    strip_hop_by_hop(&mut h, HopByHop::Strip);
    assert_eq!(names(&h), ["x-forwarded-for", "x-forwarded-host"]);

    // ...which keeps a trusted proxy's chain and client_ip still finds the client,
    let proxies = trust(&["10.0.0.0/8"]);
    let mut trusted = h.clone();
    set_forwarded(
        &mut trusted,
        &info("10.0.0.1", "https", Some("a")),
        &proxies,
    );
    assert_eq!(trusted[X_FORWARDED_FOR], "203.0.113.9, 10.0.0.1");
    assert_eq!(
        client_ip(&trusted, ip("10.0.0.1"), &proxies),
        ip("203.0.113.9")
    );

    // ...and replaces an untrusted client's.
    set_forwarded(&mut h, &info("198.51.100.4", "https", Some("a")), &proxies);
    assert_eq!(h[X_FORWARDED_FOR], "198.51.100.4");
    assert_eq!(h[X_FORWARDED_HOST], "a");
}

#[test]
fn every_connection_header_counts() {
    let mut h = map(&[
        ("connection", "x-one"),
        ("connection", "x-two"),
        ("connection", "x-three, x-four"),
        ("x-one", "1"),
        ("x-two", "2"),
        ("x-three", "3"),
        ("x-four", "4"),
        ("x-five", "5"),
    ]);
    strip_hop_by_hop(&mut h, HopByHop::Strip);
    assert_eq!(names(&h), ["x-five"]);
}

#[test]
fn tokens_match_case_insensitively_and_tolerate_whitespace_and_empty_elements() {
    let mut h = map(&[
        ("connection", "\tX-Foo ,  x-BAR\t, , ,,close,COOKIE"),
        ("x-foo", "1"),
        ("X-Bar", "2"),
        ("cookie", "a=b"),
        ("x-baz", "3"),
    ]);
    strip_hop_by_hop(&mut h, HopByHop::Strip);
    assert_eq!(names(&h), ["x-baz"]);
}

#[test]
fn tokens_that_are_not_header_names_remove_nothing() {
    let mut h = map(&[
        ("connection", "\"x-foo\", x foo, x-foo;q=1, (x-foo), é"),
        ("x-foo", "kept"),
    ]);
    // A header value may carry obs-text; the parser must not trip on it.
    h.append(
        CONNECTION,
        HeaderValue::from_bytes(b"x-\xff, \x80").unwrap(),
    );
    strip_hop_by_hop(&mut h, HopByHop::Strip);
    assert_eq!(all(&h, "x-foo"), ["kept"]);
}

#[test]
fn connection_naming_a_very_long_header_name_removes_it() {
    let long = format!("x-{}", "a".repeat(200));
    let mut h = map(&[
        ("connection", &long.to_uppercase()),
        (&long, "1"),
        ("x-ok", "1"),
    ]);
    strip_hop_by_hop(&mut h, HopByHop::Strip);
    assert_eq!(names(&h), ["x-ok"]);
}

#[test]
fn te_trailers_survives_and_nothing_else_of_te() {
    let mut h = map(&[("connection", "TE"), ("te", "deflate;q=0.5, Trailers")]);
    strip_hop_by_hop(&mut h, HopByHop::Strip);
    assert_eq!(all(&h, "te"), ["trailers"]);
    assert!(!h.contains_key(CONNECTION));

    let mut h = map(&[("te", "gzip, trailersx")]);
    strip_hop_by_hop(&mut h, HopByHop::Strip);
    assert!(!h.contains_key(TE));
}

#[test]
fn a_websocket_handshake_keeps_exactly_its_upgrade_when_the_caller_says_so() {
    let handshake = map(&[
        ("connection", "keep-alive, Upgrade, x-hop"),
        ("upgrade", "websocket"),
        ("keep-alive", "timeout=5"),
        ("x-hop", "1"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ]);

    let mut h = handshake.clone();
    assert!(strip_hop_by_hop(&mut h, HopByHop::KeepUpgrade));
    assert_eq!(all(&h, "connection"), ["upgrade"]);
    assert_eq!(all(&h, "upgrade"), ["websocket"]);
    assert_eq!(
        names(&h),
        [
            "connection",
            "sec-websocket-key",
            "sec-websocket-version",
            "upgrade"
        ]
    );

    let mut h = handshake;
    assert!(!strip_hop_by_hop(&mut h, HopByHop::Strip));
    assert_eq!(names(&h), ["sec-websocket-key", "sec-websocket-version"]);
}

#[test]
fn keep_upgrade_on_a_message_that_is_no_upgrade_strips_it() {
    // Upgrade without the Connection token: not an upgrade (RFC 9110 7.8).
    let mut h = map(&[("connection", "keep-alive"), ("upgrade", "websocket")]);
    assert!(!strip_hop_by_hop(&mut h, HopByHop::KeepUpgrade));
    assert!(h.is_empty(), "{h:?}");

    // The token without an Upgrade header.
    let mut h = map(&[("connection", "upgrade")]);
    assert!(!strip_hop_by_hop(&mut h, HopByHop::KeepUpgrade));
    assert!(h.is_empty(), "{h:?}");

    // No Connection at all.
    let mut h = map(&[("upgrade", "h2c")]);
    assert!(!strip_hop_by_hop(&mut h, HopByHop::KeepUpgrade));
    assert!(h.is_empty(), "{h:?}");
}

#[test]
fn is_upgrade_needs_both_headers() {
    assert!(is_upgrade(&map(&[
        ("connection", "Upgrade"),
        ("upgrade", "websocket")
    ])));
    assert!(is_upgrade(&map(&[
        ("connection", "keep-alive"),
        ("connection", " UPGRADE "),
        ("upgrade", "websocket")
    ])));
    assert!(!is_upgrade(&map(&[
        ("connection", "upgrades"),
        ("upgrade", "websocket")
    ])));
    assert!(!is_upgrade(&map(&[("upgrade", "websocket")])));
    assert!(!is_upgrade(&map(&[("connection", "upgrade")])));
}

// ---------------------------------------------------------------------------
// Cidr and Trust
// ---------------------------------------------------------------------------

#[test]
fn cidrs_parse_networks_bare_addresses_and_clear_host_bits() {
    let cases = [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("::/0", "::/0"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
    ];
    for (input, shown) in cases {
        let cidr: Cidr = input.parse().unwrap();
        assert_eq!(cidr.to_string(), shown, "{input}");
    }
}

#[test]
fn invalid_cidrs_are_refused_with_a_message_naming_them() {
    for bad in [
        "",
        "10.0.0.0/33",
        "::/129",
        "10.0.0.0/",
        "/8",
        "10.0.0.0/+8",
        "10.0.0.0/-1",
        "10.0.0.0/ 8",
        "10.0.0.0/8/8",
        "1.2.3",
        "010.0.0.1",
        "10.0.0.0/0008",
        "host/8",
        "[::1]/128",
    ] {
        let err = bad.parse::<Cidr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{bad:?} is not an IP address or CIDR network")
        );
    }
    assert_eq!(
        Trust::parse(["10.0.0.0/8", "nope"]).unwrap_err(),
        InvalidCidr("nope".into())
    );
}

#[test]
fn cidr_membership_at_the_edges() {
    let net: Cidr = "10.0.0.0/8".parse().unwrap();
    assert!(net.contains(ip("10.0.0.0")));
    assert!(net.contains(ip("10.255.255.255")));
    assert!(!net.contains(ip("11.0.0.0")));
    assert!(!net.contains(ip("9.255.255.255")));
    assert!(net.contains(ip("::ffff:10.9.8.7")), "IPv4-mapped is IPv4");
    assert!(!net.contains(ip("::a09:807")), "IPv4-compatible is not");

    let host: Cidr = "192.0.2.7".parse().unwrap();
    assert!(host.contains(ip("192.0.2.7")));
    assert!(!host.contains(ip("192.0.2.8")));

    let everything_v4: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(everything_v4.contains(ip("255.255.255.255")));
    assert!(!everything_v4.contains(ip("::1")));

    let v6: Cidr = "2001:db8:1::/48".parse().unwrap();
    assert!(v6.contains(ip("2001:db8:1:ffff::1")));
    assert!(!v6.contains(ip("2001:db8:2::1")));
    assert!(!v6.contains(ip("10.0.0.1")));

    let mapped: Cidr = "::ffff:192.0.2.0/120".parse().unwrap();
    assert!(mapped.contains(ip("192.0.2.200")));
    assert!(mapped.contains(ip("::ffff:192.0.2.200")));
}

#[test]
fn the_default_trust_believes_nobody() {
    let none = Trust::default();
    assert!(!none.contains(ip("127.0.0.1")));
    assert!(!none.contains(ip("::1")));
    let some = Trust::new(["127.0.0.1".parse().unwrap(), "fd00::/8".parse().unwrap()]);
    assert!(some.contains(ip("127.0.0.1")));
    assert!(some.contains(ip("fd12::1")));
    assert!(!some.contains(ip("127.0.0.2")));
}

// ---------------------------------------------------------------------------
// set_forwarded
// ---------------------------------------------------------------------------

#[test]
fn an_untrusted_peer_cannot_spoof_any_forwarding_header() {
    let mut h = map(&[
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-for", "5.6.7.8"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "admin.internal"),
        ("forwarded", "for=1.2.3.4;proto=https"),
    ]);
    set_forwarded(
        &mut h,
        &info("198.51.100.4", "http", Some("api.example.com")),
        &trust(&["10.0.0.0/8"]),
    );
    assert_eq!(all(&h, "x-forwarded-for"), ["198.51.100.4"]);
    assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
    assert_eq!(all(&h, "x-forwarded-host"), ["api.example.com"]);
    assert_eq!(
        all(&h, "forwarded"),
        ["for=198.51.100.4;host=api.example.com;proto=http"]
    );
}

#[test]
fn a_trusted_peer_chain_is_kept_and_the_peer_appended() {
    let mut h = map(&[
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-for", "192.0.2.1, 10.0.0.2"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example.com"),
    ]);
    set_forwarded(
        &mut h,
        &info("10.0.0.1", "http", Some("10.0.0.10:8080")),
        &trust(&["10.0.0.0/8"]),
    );
    assert_eq!(
        all(&h, "x-forwarded-for"),
        ["203.0.113.7, 192.0.2.1, 10.0.0.2, 10.0.0.1"]
    );
    // The proxy in front terminated the client's connection and knows these.
    assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
    assert_eq!(all(&h, "x-forwarded-host"), ["shop.example.com"]);
    // Forwarded lists the same hops as X-Forwarded-For.
    assert_eq!(
        all(&h, "forwarded"),
        [
            r#"for=203.0.113.7, for=192.0.2.1, for=10.0.0.2, for=10.0.0.1;host="10.0.0.10:8080";proto=http"#
        ]
    );
}

#[test]
fn a_trusted_peer_forwarded_is_kept_and_extended() {
    let mut h = map(&[
        ("forwarded", r#"for="[2001:db8::7]";proto=https"#),
        ("forwarded", "for=192.0.2.60"),
        ("x-forwarded-for", "garbage, 192.0.2.60"),
    ]);
    set_forwarded(
        &mut h,
        &info("10.0.0.1", "http", None),
        &trust(&["10.0.0.1"]),
    );
    assert_eq!(
        all(&h, "forwarded"),
        [r#"for="[2001:db8::7]";proto=https, for=192.0.2.60, for=10.0.0.1;proto=http"#]
    );
    assert_eq!(
        all(&h, "x-forwarded-for"),
        ["garbage, 192.0.2.60, 10.0.0.1"]
    );
}

#[test]
fn a_converted_chain_marks_unparseable_entries_unknown() {
    let mut h = map(&[(
        "x-forwarded-for",
        "unknown, 192.0.2.1:4711, [2001:db8::2]:443,",
    )]);
    set_forwarded(
        &mut h,
        &info("10.0.0.1", "https", None),
        &trust(&["10.0.0.1"]),
    );
    assert_eq!(
        all(&h, "forwarded"),
        [r#"for=unknown, for=192.0.2.1, for="[2001:db8::2]", for=10.0.0.1;proto=https"#]
    );
}

#[test]
fn a_trusted_peer_without_forwarding_headers_gets_the_connections() {
    let mut h = map(&[("x-forwarded-for", "  ")]);
    set_forwarded(
        &mut h,
        &info("10.0.0.1", "https", Some("a.example")),
        &trust(&["10.0.0.0/8"]),
    );
    assert_eq!(all(&h, "x-forwarded-for"), ["10.0.0.1"]);
    assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
    assert_eq!(all(&h, "x-forwarded-host"), ["a.example"]);
    assert_eq!(
        all(&h, "forwarded"),
        ["for=10.0.0.1;host=a.example;proto=https"]
    );
}

#[test]
fn ipv6_peers_are_quoted_and_bracketed_in_forwarded_only() {
    let mut h = HeaderMap::new();
    set_forwarded(
        &mut h,
        &info("2001:db8::1", "https", Some("[2001:db8::80]:8443")),
        &Trust::default(),
    );
    assert_eq!(all(&h, "x-forwarded-for"), ["2001:db8::1"]);
    assert_eq!(
        all(&h, "forwarded"),
        [r#"for="[2001:db8::1]";host="[2001:db8::80]:8443";proto=https"#]
    );
    assert_eq!(all(&h, "x-forwarded-host"), ["[2001:db8::80]:8443"]);
}

#[test]
fn an_ipv4_mapped_peer_is_written_as_ipv4() {
    let mut h = HeaderMap::new();
    let peer = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped());
    let client = ClientInfo {
        peer,
        scheme: "http",
        host: None,
    };
    set_forwarded(&mut h, &client, &Trust::default());
    assert_eq!(all(&h, "x-forwarded-for"), ["192.0.2.9"]);
    assert_eq!(all(&h, "forwarded"), ["for=192.0.2.9;proto=http"]);
}

#[test]
fn hosts_are_quoted_escaped_or_left_out_as_their_bytes_require() {
    let untrusted = Trust::default();

    let mut h = HeaderMap::new();
    set_forwarded(
        &mut h,
        &info("192.0.2.1", "http", Some("a\"b\\c")),
        &untrusted,
    );
    assert_eq!(
        all(&h, "forwarded"),
        [r#"for=192.0.2.1;host="a\"b\\c";proto=http"#]
    );

    // A host that cannot be a header value is left out, not mangled.
    for host in ["evil\r\nx-injected: 1", "a\u{7f}b", ""] {
        let mut h = map(&[("x-forwarded-host", "spoof")]);
        set_forwarded(&mut h, &info("192.0.2.1", "http", Some(host)), &untrusted);
        assert!(!h.contains_key(X_FORWARDED_HOST), "{host:?}");
        assert_eq!(
            all(&h, "forwarded"),
            ["for=192.0.2.1;proto=http"],
            "{host:?}"
        );
    }

    // No host at all (HTTP/1.0).
    let mut h = HeaderMap::new();
    set_forwarded(&mut h, &info("192.0.2.1", "http", None), &untrusted);
    assert!(!h.contains_key(X_FORWARDED_HOST));
}

#[test]
fn set_forwarded_leaves_other_headers_alone() {
    let mut h = map(&[
        ("authorization", "Bearer t"),
        ("host", "a"),
        ("content-type", "x/y"),
    ]);
    set_forwarded(
        &mut h,
        &info("192.0.2.1", "http", Some("a")),
        &Trust::default(),
    );
    assert_eq!(h[AUTHORIZATION], "Bearer t");
    assert_eq!(h[HOST], "a");
    assert_eq!(h[CONTENT_TYPE], "x/y");
    assert!(!h.contains_key(COOKIE));
    assert_eq!(h.len(), 7);
}

/// The four headers of a request, as the upstream sees them.
fn forwarding(h: &HeaderMap) -> [Vec<String>; 4] {
    [
        all(h, "x-forwarded-for"),
        all(h, "forwarded"),
        all(h, "x-forwarded-proto"),
        all(h, "x-forwarded-host"),
    ]
}

#[test]
fn a_connection_reuses_its_forwarding_headers_only_while_they_are_the_same() {
    let untrusted = Trust::default();
    let cache = ForwardedCache::default();
    // What the client sends is replaced every time, from the cache too.
    let spoofed = || {
        map(&[
            ("x-forwarded-for", "203.0.113.66"),
            ("forwarded", "for=203.0.113.66"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "spoof"),
        ])
    };
    let requests = [
        info("192.0.2.1", "http", Some("a.example")),
        info("192.0.2.1", "http", Some("a.example")),
        // Another host on the same connection (HTTP/2 coalescing).
        info("192.0.2.1", "http", Some("b.example")),
        info("192.0.2.1", "http", None),
        info("192.0.2.1", "https", None),
        info("192.0.2.2", "https", None),
        info("2001:db8::1", "https", Some("a.example")),
        info("2001:db8::1", "https", Some("a.example")),
    ];
    for client in &requests {
        let mut cached = spoofed();
        set_forwarded_cached(&mut cached, client, &untrusted, Some(&cache));
        let mut fresh = spoofed();
        set_forwarded(&mut fresh, client, &untrusted);
        assert_eq!(forwarding(&cached), forwarding(&fresh), "{client:?}");
        assert_eq!(all(&cached, "x-forwarded-for"), [client.peer.to_string()]);
        let host = client.host.as_deref();
        assert_eq!(
            all(&cached, "x-forwarded-host"),
            host.map(str::to_string).into_iter().collect::<Vec<_>>(),
            "{client:?}"
        );
        assert_eq!(all(&cached, "x-forwarded-proto"), [client.scheme]);
    }
}

#[test]
fn a_trusted_peer_keeps_its_chain_whatever_the_connection_built_before() {
    let proxies = Trust::parse(["10.0.0.0/8"]).unwrap();
    let cache = ForwardedCache::default();
    // First a request from an untrusted peer fills the cache...
    let mut h = HeaderMap::new();
    set_forwarded_cached(
        &mut h,
        &info("192.0.2.1", "http", Some("a")),
        &proxies,
        Some(&cache),
    );
    // ...then one from a trusted proxy with the same host keeps its chain.
    let mut h = map(&[("x-forwarded-for", "198.51.100.7")]);
    set_forwarded_cached(
        &mut h,
        &info("10.1.2.3", "http", Some("a")),
        &proxies,
        Some(&cache),
    );
    assert_eq!(all(&h, "x-forwarded-for"), ["198.51.100.7, 10.1.2.3"]);
    assert_eq!(
        all(&h, "forwarded"),
        ["for=198.51.100.7, for=10.1.2.3;host=a;proto=http"]
    );
}

// ---------------------------------------------------------------------------
// client_ip
// ---------------------------------------------------------------------------

#[test]
fn an_untrusted_peer_is_the_client_whatever_it_claims() {
    let h = map(&[("x-forwarded-for", "1.1.1.1, 10.0.0.5")]);
    let proxies = trust(&["10.0.0.0/8"]);
    assert_eq!(
        client_ip(&h, ip("198.51.100.4"), &proxies),
        ip("198.51.100.4")
    );
    assert_eq!(
        client_ip(&h, ip("198.51.100.4"), &Trust::default()),
        ip("198.51.100.4")
    );
}

#[test]
fn the_client_is_the_right_most_untrusted_entry() {
    let proxies = trust(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
    // The client put 6.6.6.6 there itself; the proxy appended the real one.
    let h = map(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.3")]);
    assert_eq!(client_ip(&h, ip("10.0.0.1"), &proxies), ip("203.0.113.7"));

    // Across several header lines, the last line is the right-most.
    let h = map(&[
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-for", "2001:db8::42 , 2001:db8:ffff::1"),
        ("x-forwarded-for", "10.0.0.3"),
    ]);
    assert_eq!(client_ip(&h, ip("10.0.0.1"), &proxies), ip("2001:db8::42"));
}

#[test]
fn when_every_hop_is_trusted_the_left_most_is_the_client() {
    let proxies = trust(&["10.0.0.0/8"]);
    let h = map(&[("x-forwarded-for", "10.1.1.1, 10.0.0.3")]);
    assert_eq!(client_ip(&h, ip("10.0.0.1"), &proxies), ip("10.1.1.1"));
    assert_eq!(
        client_ip(&HeaderMap::new(), ip("10.0.0.1"), &proxies),
        ip("10.0.0.1")
    );
}

#[test]
fn a_malformed_entry_stops_the_walk_at_the_last_trusted_address() {
    let proxies = trust(&["10.0.0.0/8"]);
    let cases = [
        // Anything left of the bad entry is never believed.
        ("6.6.6.6, not-an-ip, 10.0.0.3", "10.0.0.3"),
        ("6.6.6.6, unknown", "10.0.0.1"),
        ("6.6.6.6,, 10.0.0.3", "10.0.0.3"),
        ("6.6.6.6, 10.0.0.3,", "10.0.0.1"),
        ("6.6.6.6, 1.2.3.4.5", "10.0.0.1"),
        ("6.6.6.6, 1.2.3.4:99999", "10.0.0.1"),
        ("6.6.6.6, [2001:db8::1", "10.0.0.1"),
        ("6.6.6.6, [2001:db8::1]x", "10.0.0.1"),
        ("6.6.6.6, 2001:db8::1:443x", "10.0.0.1"),
        ("6.6.6.6, 01.2.3.4", "10.0.0.1"),
    ];
    for (xff, expected) in cases {
        let h = map(&[("x-forwarded-for", xff)]);
        assert_eq!(
            client_ip(&h, ip("10.0.0.1"), &proxies),
            ip(expected),
            "{xff}"
        );
    }
    // A value that is not visible ASCII is malformed as a whole.
    let mut h = map(&[("x-forwarded-for", "6.6.6.6")]);
    h.append(
        X_FORWARDED_FOR,
        HeaderValue::from_bytes(b"203.0.113.7\xff").unwrap(),
    );
    assert_eq!(client_ip(&h, ip("10.0.0.1"), &proxies), ip("10.0.0.1"));
}

#[test]
fn entries_with_ports_and_brackets_are_understood() {
    let proxies = trust(&["10.0.0.0/8"]);
    for (xff, expected) in [
        ("203.0.113.7:51234", "203.0.113.7"),
        ("[2001:db8::9]:443", "2001:db8::9"),
        ("[2001:db8::9]", "2001:db8::9"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("6.6.6.6, ::ffff:10.0.0.9", "6.6.6.6"),
    ] {
        let h = map(&[("x-forwarded-for", xff)]);
        assert_eq!(
            client_ip(&h, ip("10.0.0.1"), &proxies),
            ip(expected),
            "{xff}"
        );
    }
}

#[test]
fn an_ipv4_mapped_peer_matches_ipv4_trust() {
    let proxies = trust(&["10.0.0.0/8"]);
    let h = map(&[("x-forwarded-for", "203.0.113.7")]);
    let peer = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
    assert_eq!(client_ip(&h, peer, &proxies), ip("203.0.113.7"));
    // And an untrusted mapped peer is reported as IPv4.
    let peer = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
    assert_eq!(client_ip(&h, peer, &proxies), ip("192.0.2.1"));
    assert_eq!(
        client_ip(&h, IpAddr::V6(Ipv6Addr::LOCALHOST), &proxies),
        ip("::1")
    );
}

// ---------------------------------------------------------------------------
// traceparent
// ---------------------------------------------------------------------------

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn assert_well_formed(value: &HeaderValue) -> TraceId {
    parse_traceparent(value.as_bytes())
        .unwrap_or_else(|| panic!("{value:?} is not a valid traceparent"))
}

#[test]
fn a_valid_traceparent_and_its_tracestate_are_kept() {
    let mut h = map(&[("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE")]);
    let id = ensure_traceparent(&mut h);
    assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(all(&h, "traceparent"), [VALID]);
    assert_eq!(all(&h, "tracestate"), ["congo=t61rcWkgMzE"]);

    // Flags other than 01 are kept as they are.
    let other_flags = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-fe";
    let mut h = map(&[("traceparent", other_flags)]);
    ensure_traceparent(&mut h);
    assert_eq!(all(&h, "traceparent"), [other_flags]);
}

#[test]
fn an_invalid_traceparent_is_replaced_and_its_tracestate_dropped() {
    let cases = [
        (
            "all-zero trace id",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ),
        (
            "all-zero parent id",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ),
        (
            "upper-case trace id",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ),
        (
            "upper-case parent id",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
        ),
        (
            "upper-case flags",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
        ),
        (
            "version ff",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        (
            "version 01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        (
            "short trace id",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ),
        (
            "long trace id",
            "00-4bf92f3577b34da6a3ce929d0e0e47360-00f067aa0ba902b7-01",
        ),
        (
            "short parent id",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
        ),
        (
            "long parent id",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b77-01",
        ),
        (
            "short flags",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ),
        (
            "extra field",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
        ),
        (
            "wrong separator",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ),
        (
            "shifted separator",
            "00-4bf92f3577b34da6a3ce929d0e0e47360-0f067aa0ba902b7-01",
        ),
        (
            "not hex",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ),
        (
            "sign in hex",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        (
            "leading space",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        ),
        ("empty", ""),
    ];
    for (why, bad) in cases {
        let mut h = map(&[("traceparent", bad), ("tracestate", "congo=t61rcWkgMzE")]);
        let id = ensure_traceparent(&mut h);
        let values = all(&h, "traceparent");
        assert_eq!(values.len(), 1, "{why}");
        assert_ne!(values[0], bad, "{why}");
        assert_eq!(assert_well_formed(&h[TRACEPARENT]), id, "{why}");
        assert!(!h.contains_key(TRACESTATE), "{why}");
        assert_ne!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736", "{why}");
    }
}

#[test]
fn two_traceparent_headers_are_replaced_by_one() {
    let mut h = map(&[
        ("traceparent", VALID),
        ("traceparent", VALID),
        ("tracestate", "a=b"),
    ]);
    let id = ensure_traceparent(&mut h);
    assert_eq!(h.get_all(TRACEPARENT).iter().count(), 1);
    assert_ne!(h[TRACEPARENT], VALID);
    assert_eq!(assert_well_formed(&h[TRACEPARENT]), id);
    assert!(!h.contains_key(TRACESTATE));
}

#[test]
fn a_new_trace_has_random_ids_and_is_not_sampled() {
    let mut first = HeaderMap::new();
    let a = ensure_traceparent(&mut first);
    let mut second = HeaderMap::new();
    let b = ensure_traceparent(&mut second);
    assert_ne!(a, b);
    assert_ne!(first[TRACEPARENT], second[TRACEPARENT]);
    for h in [&first, &second] {
        let v = h[TRACEPARENT].to_str().unwrap();
        assert_well_formed(&h[TRACEPARENT]);
        assert!(v.starts_with("00-") && v.ends_with("-00"), "{v}");
    }
    assert_eq!(a.to_string(), first[TRACEPARENT].to_str().unwrap()[3..35]);
    assert_eq!(hex::encode(a.to_bytes()), a.to_string());
}

// ---------------------------------------------------------------------------
// request id
// ---------------------------------------------------------------------------

#[test]
fn a_trusted_valid_request_id_is_kept() {
    let mut h = map(&[("x-request-id", "01J9Z3QF-7b2c:lb.1_a")]);
    assert_eq!(ensure_request_id(&mut h, true), "01J9Z3QF-7b2c:lb.1_a");
    assert_eq!(all(&h, "x-request-id"), ["01J9Z3QF-7b2c:lb.1_a"]);
}

#[test]
fn an_untrusted_or_invalid_request_id_is_replaced() {
    let too_long = "a".repeat(129);
    let cases: [(&str, bool); 5] = [
        ("fine-id", false),
        (too_long.as_str(), true),
        ("has space", true),
        ("<script>", true),
        ("", true),
    ];
    for (incoming, trusted) in cases {
        let mut h = map(&[("x-request-id", incoming)]);
        let id = ensure_request_id(&mut h, trusted);
        assert_ne!(id, incoming);
        assert_eq!(h.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), [&id]);
        let id = id.to_str().unwrap();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
    }
    let mut h = map(&[("x-request-id", "a"), ("x-request-id", "b")]);
    let id = ensure_request_id(&mut h, true);
    assert_eq!(id.len(), 32);
    assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);

    let mut h = HeaderMap::new();
    let a = ensure_request_id(&mut h, true);
    let b = ensure_request_id(&mut HeaderMap::new(), true);
    assert_ne!(a, b);
    assert_eq!(h[X_REQUEST_ID], a);
}

#[test]
fn every_ipv4_octet_in_every_place_is_written_as_display_writes_it() {
    for octet in 0..=255u8 {
        for place in 0..4 {
            let mut octets = [1, 20, 3, 199];
            octets[place] = octet;
            let ip = Ipv4Addr::from(octets);
            let text = Ipv4Text::new(ip);
            assert_eq!(text.as_bytes(), ip.to_string().as_bytes());
        }
    }
}

#[test]
fn addresses_are_written_as_display_writes_them() {
    let cases = [
        "0.0.0.0",
        "255.255.255.255",
        "10.0.100.9",
        "1.20.3.40",
        "127.0.0.1",
        "99.100.101.199",
        "::1",
        "2001:db8::8:800:200c:417a",
    ];
    for case in cases {
        let ip: IpAddr = case.parse().unwrap();
        let mut out = Vec::new();
        push_ip(&mut out, ip);
        assert_eq!(String::from_utf8(out).unwrap(), ip.to_string(), "{case}");
    }
}
