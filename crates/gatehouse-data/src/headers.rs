//! Header hygiene for proxied messages: which headers may cross the gateway,
//! which the gateway rewrites, and which it adds.
//!
//! Every function here is pure over a `HeaderMap` and does one job. On the
//! request path the proxy calls them in this order:
//!
//! 1. [`client_ip`] when a stage needs the client's address (firewall, rate
//!    limit key). It only reads.
//! 2. [`strip_hop_by_hop`], before the gateway adds any header of its own,
//!    so that a client cannot name one of ours in `Connection` and have it
//!    removed (the hop-by-hop abuse of CVE-2022-31813).
//! 3. [`set_forwarded`], [`ensure_traceparent`], [`ensure_request_id`].
//!
//! On the response path, [`strip_hop_by_hop`] runs on the upstream's headers
//! before the gateway adds its own (rate-limit headers and the like).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack listener
//! reports for an IPv4 client) are treated as the IPv4 address everywhere.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use bytes::Bytes;
use http::header::{
    self, HeaderMap, HeaderName, HeaderValue, CONNECTION, FORWARDED, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The RFC 9110 hop-by-hop fields, plus the non-standard ones that are still
/// sent (`Keep-Alive`, `Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// The headers [`set_forwarded`] owns. A `Connection` token naming one of
/// them does not remove it: `set_forwarded` discards them from an untrusted
/// peer anyway, and from a trusted proxy they are that proxy's record of the
/// client, which a client must not be able to erase by passing
/// `Connection: x-forwarded-for` through a proxy that forwards `Connection`.
const OWNED_BY_SET_FORWARDED: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

// ---------------------------------------------------------------------------
// Hop-by-hop headers
// ---------------------------------------------------------------------------

/// What [`strip_hop_by_hop`] does with a protocol upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopByHop {
    /// Remove every hop-by-hop header, `Upgrade` included.
    Strip,
    /// The caller forwards this message as a protocol upgrade (a WebSocket
    /// handshake, or the upstream's `101` answer to one) over HTTP/1.1. If the
    /// message really is one (an `Upgrade` header and an `upgrade` token in
    /// `Connection`), the result carries exactly `Connection: upgrade` and
    /// the original `Upgrade` values; otherwise it is stripped as with
    /// `Strip`.
    KeepUpgrade,
}

/// Removes the hop-by-hop headers: the RFC 9110 ones, `Keep-Alive`,
/// `Proxy-Connection`, and every header named by a token of any `Connection`
/// header (case-insensitive, whitespace-tolerant).
///
/// Call it before adding any header of the gateway's own: a `Connection`
/// token could otherwise name and remove it. The forwarding headers are not
/// removed when named (see [`set_forwarded`], which owns them).
///
/// Two exceptions keep a message working across the gateway:
/// - `TE: trailers` survives as exactly `te: trailers` when the incoming `TE`
///   held that token: gRPC servers refuse requests without it, and the gateway
///   relays trailers. Every other `TE` token is dropped.
/// - with [`HopByHop::KeepUpgrade`], see there.
///
/// Returns whether the message still carries an upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, mode: HopByHop) -> bool {
    // Most messages carry none of them: one pass over the names (no
    // hashing) settles that. Without `Connection` no other header is named,
    // and without `Upgrade` there is no upgrade to keep.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return false;
    }
    // Set aside what survives before anything named in Connection is removed.
    let upgrade = match mode {
        HopByHop::KeepUpgrade if is_upgrade(headers) => take_all(headers, &UPGRADE),
        _ => Taken::default(),
    };
    let te_trailers = headers.get_all(TE).iter().any(|value| {
        tokens(value).any(|t| {
            let name = t.split(|&b| b == b';').next().unwrap_or(t).trim_ascii();
            name.eq_ignore_ascii_case(b"trailers")
        })
    });

    let connection = take_all(headers, &CONNECTION);
    for value in connection.values() {
        for token in tokens(value) {
            let owned = OWNED_BY_SET_FORWARDED
                .iter()
                .any(|h| token.eq_ignore_ascii_case(h.as_bytes()));
            if owned {
                continue;
            }
            // Removing by &str is case-insensitive and does not allocate; a
            // token that is not a header name removes nothing.
            if let Ok(name) = std::str::from_utf8(token) {
                headers.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }

    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade.is_empty() {
        return false;
    }
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    for value in upgrade.into_values() {
        headers.append(UPGRADE, value);
    }
    true
}

/// Whether the message asks for a protocol upgrade: an `Upgrade` header and
/// an `upgrade` token in a `Connection` header.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(b"upgrade")))
}

/// The non-empty comma-separated elements of a header value, trimmed.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// All values of one header, moved out of the map. The usual single value
/// needs no allocation.
#[derive(Default)]
struct Taken {
    first: Option<HeaderValue>,
    rest: Vec<HeaderValue>,
}

impl Taken {
    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn values(&self) -> impl Iterator<Item = &HeaderValue> {
        self.first.iter().chain(self.rest.iter())
    }

    fn into_values(self) -> impl Iterator<Item = HeaderValue> {
        self.first.into_iter().chain(self.rest)
    }
}

fn take_all(headers: &mut HeaderMap, name: &HeaderName) -> Taken {
    match headers.entry(name) {
        header::Entry::Occupied(entry) => {
            let (_, mut values) = entry.remove_entry_mult();
            let first = values.next();
            Taken {
                first,
                rest: values.collect(),
            }
        }
        header::Entry::Vacant(_) => Taken::default(),
    }
}

// ---------------------------------------------------------------------------
// Trusted proxies
// ---------------------------------------------------------------------------

/// The value of an invalid trusted-proxy entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR network")]
pub struct InvalidCidr(pub String);

/// One IP network: an address and a prefix length. Host bits are cleared
/// (`10.1.2.3/8` is `10.0.0.0/8`); a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network of `addr` with `prefix` bits, or `None` if the prefix is
    /// longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let (net, prefix) = match addr {
            IpAddr::V4(v4) => {
                if prefix > 32 {
                    return None;
                }
                (IpAddr::V4((u32::from(v4) & mask32(prefix)).into()), prefix)
            }
            IpAddr::V6(v6) => {
                if prefix > 128 {
                    return None;
                }
                // An IPv4-mapped network is the IPv4 network it maps.
                match v6.to_ipv4_mapped() {
                    Some(v4) if prefix >= 96 => {
                        let prefix = prefix - 96;
                        (IpAddr::V4((u32::from(v4) & mask32(prefix)).into()), prefix)
                    }
                    _ => (
                        IpAddr::V6((u128::from(v6) & mask128(prefix)).into()),
                        prefix,
                    ),
                }
            }
        };
        Some(Cidr { net, prefix })
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Cidr, InvalidCidr> {
        // The same definition validation uses.
        let invalid = || InvalidCidr(s.to_string());
        let (addr, prefix) = gatehouse_model::net::parse_network(s).ok_or_else(invalid)?;
        Cidr::new(addr, prefix).ok_or_else(invalid)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// The proxies whose forwarding headers the gateway believes. The default
/// trusts nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    nets: Vec<Cidr>,
}

impl Trust {
    pub fn new(nets: impl IntoIterator<Item = Cidr>) -> Trust {
        Trust {
            nets: nets.into_iter().collect(),
        }
    }

    /// Parses a list of CIDRs or bare addresses, the form of a policy's
    /// `firewall.trusted_proxies`.
    pub fn parse<I, S>(list: I) -> Result<Trust, InvalidCidr>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nets = list
            .into_iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<Vec<Cidr>, _>>()?;
        Ok(Trust { nets })
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(ip))
    }
}

// ---------------------------------------------------------------------------
// Forwarding headers
// ---------------------------------------------------------------------------

/// What the gateway knows about the connection a request came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The address of the direct peer.
    pub peer: IpAddr,
    /// `"http"` or `"https"`: how the request reached the gateway.
    pub scheme: &'static str,
    /// The host the client asked for (`Host` or the `:authority`), if any.
    pub host: Option<String>,
}

/// Rebuilds `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
/// `Forwarded` (RFC 7239) for the upstream.
///
/// - Direct peer not trusted: whatever the client sent in these four is
///   discarded; they describe the connection only.
/// - Direct peer trusted: its `X-Forwarded-For` chain is kept and the peer
///   appended; its `Forwarded` elements are kept and one for the peer
///   appended (when it sent only `X-Forwarded-For`, the chain is converted to
///   `Forwarded` elements so both list the same hops, unparseable entries as
///   `for=unknown`); its `X-Forwarded-Proto` and `X-Forwarded-Host` are kept
///   when present, since the proxy in front terminated the client's
///   connection and knows them, and set from the connection otherwise.
///
/// A host that cannot be carried in a header (control characters) is left
/// out rather than mangled.
pub fn set_forwarded(headers: &mut HeaderMap, client: &ClientInfo, trust: &Trust) {
    set_forwarded_cached(headers, client, trust, None);
}

/// The forwarding headers last built on one client connection for a peer
/// that is not a trusted proxy. They depend only on the peer, the scheme
/// and the host, which stay the same from one request to the next on a
/// connection, so the proxy builds them once per connection and copies a
/// reference after that.
#[derive(Debug, Default)]
pub struct ForwardedCache(std::sync::Mutex<Option<Untrusted>>);

/// The four headers for a peer that is not trusted (`None`: left out).
#[derive(Debug)]
struct Untrusted {
    peer: IpAddr,
    scheme: &'static str,
    host: Option<String>,
    xff: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
    xfh: Option<HeaderValue>,
}

impl Untrusted {
    fn build(peer: IpAddr, scheme: &'static str, host: Option<&str>) -> Untrusted {
        let mut xff = Vec::with_capacity(40);
        push_ip(&mut xff, peer);
        let mut forwarded = Vec::with_capacity(96);
        push_own_element(&mut forwarded, peer, host, scheme);
        Untrusted {
            peer,
            scheme,
            host: host.map(str::to_string),
            xff: header_value(xff),
            forwarded: header_value(forwarded),
            xfh: host.and_then(|h| HeaderValue::from_str(h).ok()),
        }
    }

    fn is_for(&self, peer: IpAddr, scheme: &str, host: Option<&str>) -> bool {
        self.peer == peer && self.scheme == scheme && self.host.as_deref() == host
    }

    /// Replaces whatever the client sent in the four headers.
    fn apply(&self, headers: &mut HeaderMap) {
        set_or_remove(headers, X_FORWARDED_FOR, self.xff.clone());
        set_or_remove(headers, FORWARDED, self.forwarded.clone());
        headers.insert(X_FORWARDED_PROTO, proto_value(self.scheme));
        set_or_remove(headers, X_FORWARDED_HOST, self.xfh.clone());
    }
}

/// [`set_forwarded`], reusing the headers built for the last request of the
/// same connection (`cache`) when the peer is not trusted.
pub fn set_forwarded_cached(
    headers: &mut HeaderMap,
    client: &ClientInfo,
    trust: &Trust,
    cache: Option<&ForwardedCache>,
) {
    let peer = client.peer.to_canonical();
    let host = client
        .host
        .as_deref()
        .filter(|h| !h.is_empty() && is_field_text(h));
    if !trust.contains(peer) {
        // Nothing the client sent is kept: the headers describe the
        // connection only, so they are the same for the same connection.
        let Some(cache) = cache else {
            return Untrusted::build(peer, client.scheme, host).apply(headers);
        };
        let mut last = cache.0.lock().unwrap_or_else(|p| p.into_inner());
        match last
            .as_ref()
            .filter(|u| u.is_for(peer, client.scheme, host))
        {
            Some(built) => built.apply(headers),
            None => {
                let built = Untrusted::build(peer, client.scheme, host);
                built.apply(headers);
                *last = Some(built);
            }
        }
        return;
    }

    let prior_xff = take_all(headers, &X_FORWARDED_FOR);
    let prior_forwarded = take_all(headers, &FORWARDED);

    // X-Forwarded-For: the kept chain, then the peer.
    let mut xff = Vec::with_capacity(64);
    for value in prior_xff.values() {
        let value = value.as_bytes().trim_ascii();
        if !value.is_empty() {
            xff.extend_from_slice(value);
            xff.extend_from_slice(b", ");
        }
    }
    push_ip(&mut xff, peer);
    set_or_remove(headers, X_FORWARDED_FOR, header_value(xff));

    // Forwarded: the kept elements (or the converted chain), then ours.
    let mut forwarded = Vec::with_capacity(96);
    if prior_forwarded.is_empty() {
        for value in prior_xff.values() {
            for entry in value.as_bytes().split(|&b| b == b',') {
                let entry = entry.trim_ascii();
                if entry.is_empty() {
                    continue;
                }
                forwarded.extend_from_slice(b"for=");
                match std::str::from_utf8(entry).ok().and_then(parse_xff_entry) {
                    Some(ip) => push_node(&mut forwarded, ip),
                    None => forwarded.extend_from_slice(b"unknown"),
                }
                forwarded.extend_from_slice(b", ");
            }
        }
    } else {
        for value in prior_forwarded.values() {
            let value = value.as_bytes().trim_ascii();
            if !value.is_empty() {
                forwarded.extend_from_slice(value);
                forwarded.extend_from_slice(b", ");
            }
        }
    }
    push_own_element(&mut forwarded, peer, host, client.scheme);
    set_or_remove(headers, FORWARDED, header_value(forwarded));

    // X-Forwarded-Proto and -Host: the trusted proxy's, else the connection's.
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, proto_value(client.scheme));
    }
    if !headers.contains_key(X_FORWARDED_HOST) {
        if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
            headers.insert(X_FORWARDED_HOST, v);
        }
    }
}

/// This gateway's `Forwarded` element: `for=PEER[;host=HOST];proto=SCHEME`.
fn push_own_element(out: &mut Vec<u8>, peer: IpAddr, host: Option<&str>, scheme: &str) {
    out.extend_from_slice(b"for=");
    push_node(out, peer);
    if let Some(host) = host {
        out.extend_from_slice(b";host=");
        push_param_value(out, host);
    }
    out.extend_from_slice(b";proto=");
    push_param_value(out, scheme);
}

fn proto_value(scheme: &str) -> HeaderValue {
    match scheme {
        "https" => HeaderValue::from_static("https"),
        _ => HeaderValue::from_static("http"),
    }
}

fn set_or_remove(headers: &mut HeaderMap, name: HeaderName, value: Option<HeaderValue>) {
    match value {
        Some(v) => {
            headers.insert(name, v);
        }
        None => {
            headers.remove(name);
        }
    }
}

/// The client's address: the right-most `X-Forwarded-For` entry that is not
/// a trusted proxy, walking right to left from the direct peer.
///
/// - A peer that is not trusted is the client; its headers are not read.
/// - A trusted hop's entry is believed, so the walk goes on to the left.
/// - An entry that is not an address (garbage, an empty element, `unknown`)
///   stops the walk and the last address believed is the answer: the trusted
///   proxy that wrote the bad entry. That may attribute a client to its proxy,
///   but never lets anyone choose an address: every address returned is the
///   peer or was written by a trusted proxy.
/// - If every hop is trusted, the left-most one is the answer.
///
/// Entries may be an address, `[v6]`, `v4:port` or `[v6]:port`.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trust: &Trust) -> IpAddr {
    let mut last = peer.to_canonical();
    if !trust.contains(last) {
        return last;
    }
    for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(value) = value.to_str() else {
            return last;
        };
        for entry in value.rsplit(',') {
            let Some(ip) = parse_xff_entry(entry.trim()) else {
                return last;
            };
            let ip = ip.to_canonical();
            if !trust.contains(ip) {
                return ip;
            }
            last = ip;
        }
    }
    last
}

/// An `X-Forwarded-For` element: `ip`, `[v6]`, `v4:port` or `[v6]:port`.
fn parse_xff_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    // u16::from_str accepts a leading '+'; a port is digits only.
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok();
    if let Some(rest) = entry.strip_prefix('[') {
        let (v6, tail) = rest.split_once(']')?;
        let valid_tail = tail.is_empty() || tail.strip_prefix(':').is_some_and(port_ok);
        return if valid_tail {
            v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
        } else {
            None
        };
    }
    let (v4, port) = entry.split_once(':')?;
    if !port_ok(port) {
        return None;
    }
    v4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// An address as `Display` writes it, without the formatting machinery for
/// the usual IPv4 case (this runs for every proxied request).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => push_ipv4(out, v4),
        IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

fn push_ipv4(out: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    out.extend_from_slice(Ipv4Text::new(ip).as_bytes());
}

/// An IPv4 address as `Display` writes it, made without the formatting
/// machinery, for the forwarding headers of every proxied request.
struct Ipv4Text {
    /// Room for three more bytes than the longest address: every octet is
    /// copied as three bytes, of which the length counts its digits.
    buf: [u8; 18],
    len: usize,
}

/// Each octet's decimal digits, padded to three, and how many there are.
const OCTET_DIGITS: [[u8; 4]; 256] = {
    let mut table = [[0u8; 4]; 256];
    let mut i = 0;
    while i < 256 {
        let o = i as u8;
        table[i] = if o >= 100 {
            [b'0' + o / 100, b'0' + o / 10 % 10, b'0' + o % 10, 3]
        } else if o >= 10 {
            [b'0' + o / 10, b'0' + o % 10, 0, 2]
        } else {
            [b'0' + o, 0, 0, 1]
        };
        i += 1;
    }
    table
};

impl Ipv4Text {
    fn new(ip: std::net::Ipv4Addr) -> Ipv4Text {
        let mut buf = [0u8; 18];
        let mut len = 0;
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            let [a, b, c, n] = OCTET_DIGITS[usize::from(octet)];
            buf[len..len + 3].copy_from_slice(&[a, b, c]);
            len += usize::from(n);
        }
        Ipv4Text { buf, len }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// An RFC 7239 node: IPv4 bare, IPv6 quoted and bracketed.
fn push_node(out: &mut Vec<u8>, ip: IpAddr) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => push_ipv4(out, v4),
        IpAddr::V6(v6) => {
            out.extend_from_slice(b"\"[");
            out.extend_from_slice(v6.to_string().as_bytes());
            out.extend_from_slice(b"]\"");
        }
    }
}

/// An RFC 7239 parameter value: a token as is, anything else as a
/// quoted-string with `"` and `\` escaped. The caller checked for control
/// characters.
fn push_param_value(out: &mut Vec<u8>, value: &str) {
    if !value.is_empty() && value.bytes().all(is_tchar) {
        out.extend_from_slice(value.as_bytes());
        return;
    }
    out.push(b'"');
    for &b in value.as_bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// Whether `s` can be a header value: no control characters but tab.
fn is_field_text(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A header value from bytes built here. They are made of header values and
/// checked text, so this only fails on a bug, and then the header is left
/// out rather than the request failed.
fn header_value(value: Vec<u8>) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
}

/// RFC 9110 `tchar`: the bytes a token may hold.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

// ---------------------------------------------------------------------------
// Trace context and request id
// ---------------------------------------------------------------------------

/// A W3C trace id: 16 bytes, never all zero. Displays as 32 lower-case hex
/// digits, the form in `traceparent` and in the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

impl TraceId {
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        // 16 bytes always fit 32 hex digits.
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

/// Keeps a valid incoming `traceparent`, or replaces it with a new one, and
/// returns the trace id for logging.
///
/// Valid means exactly one `traceparent` header of the version-00 form,
/// checked strictly: `00-<32 hex>-<16 hex>-<2 hex>`, 55 bytes, lower-case hex
/// only, trace id and parent id not all zero. Other versions (including the
/// invalid `ff`) are replaced too rather than parsed as 00: the gateway
/// starts a trace it can vouch for. When the incoming one is replaced,
/// `tracestate` goes with it, since it belongs to the discarded trace.
///
/// A new trace has random ids and flags `00` (not sampled): the sampling
/// decision is the tracer's, and without one nothing is recorded.
pub fn ensure_traceparent(headers: &mut HeaderMap) -> TraceId {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let kept = match (values.next(), values.next()) {
        (Some(only), None) => parse_traceparent(only.as_bytes()),
        _ => None,
    };
    if let Some(id) = kept {
        return id;
    }
    headers.remove(TRACESTATE);
    let (trace, parent) = new_trace_ids();
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    // The slices are exactly twice the byte lengths.
    let _ = hex::encode_to_slice(trace, &mut buf[3..35]);
    let _ = hex::encode_to_slice(parent, &mut buf[36..52]);
    let value = HeaderValue::from_bytes(&buf).expect("hex digits and dashes are a header value");
    headers.insert(TRACEPARENT, value);
    TraceId(trace)
}

fn parse_traceparent(b: &[u8]) -> Option<TraceId> {
    if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let (trace, parent, flags) = (&b[3..35], &b[36..52], &b[53..55]);
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let all_zero = |s: &[u8]| s.iter().all(|&c| c == b'0');
    if !(lower_hex(trace) && lower_hex(parent) && lower_hex(flags)) {
        return None;
    }
    if all_zero(trace) || all_zero(parent) {
        return None;
    }
    let mut id = [0u8; 16];
    hex::decode_to_slice(trace, &mut id).ok()?;
    Some(TraceId(id))
}

/// A new trace id and parent id, neither all zero, from one draw.
fn new_trace_ids() -> ([u8; 16], [u8; 8]) {
    loop {
        let bytes: [u8; 24] = rand::random();
        let (trace, parent) = bytes.split_at(16);
        if trace.iter().any(|&b| b != 0) && parent.iter().any(|&b| b != 0) {
            let mut t = [0u8; 16];
            let mut p = [0u8; 8];
            t.copy_from_slice(trace);
            p.copy_from_slice(parent);
            return (t, p);
        }
    }
}

/// Keeps the incoming `X-Request-Id` when `keep_incoming` (pass whether the
/// direct peer is a trusted proxy) and it is one value of 1 to 128 bytes of
/// letters, digits, `-`, `_`, `.` and `:`; otherwise sets a new one, 32
/// random hex digits. Returns the id, for the log and problem bodies.
///
/// An untrusted client's id is replaced so that it cannot forge or collide
/// with the ids in the gateway's logs.
pub fn ensure_request_id(headers: &mut HeaderMap, keep_incoming: bool) -> HeaderValue {
    if keep_incoming {
        let mut values = headers.get_all(X_REQUEST_ID).iter();
        if let (Some(only), None) = (values.next(), values.next()) {
            let b = only.as_bytes();
            let valid = (1..=128).contains(&b.len())
                && b.iter()
                    .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'));
            if valid {
                return only.clone();
            }
        }
    }
    let id = HeaderValue::from_maybe_shared(Bytes::from(hex::encode(rand::random::<[u8; 16]>())))
        .expect("hex digits are a header value");
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

#[cfg(test)]
mod tests;
