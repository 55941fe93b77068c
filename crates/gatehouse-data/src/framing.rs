//! Request framing checks, before anything else reads the request: shapes
//! that two HTTP implementations could frame differently are refused, so
//! no request can be smuggled past the gateway inside another.
//!
//! hyper (1.11 and later) frames a message with both `Content-Length` and
//! `Transfer-Encoding` by the chunked encoding, drops the length and closes
//! the connection after it, as RFC 9112 says; it refuses malformed lengths,
//! conflicting ones, bad chunk sizes, obs-fold and control bytes in header
//! values, and keeps one of two equal `Content-Length`s. On top of that the
//! gateway refuses, and closes the connection after the 400:
//! - any `Transfer-Encoding` other than exactly one `chunked`;
//! - more than one `Content-Length` header;
//! - an HTTP/1.1 request without `Host`, or with more than one;
//! - a `Host` that disagrees with the authority of an absolute-form target
//!   (HTTP/1.1) or with `:authority` (HTTP/2);
//! - control characters (other than tab) in any header value;
//! - connection-specific headers in an HTTP/2 request (`Connection`,
//!   `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, and
//!   `TE` other than `trailers`).

use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Version};

/// Why a request's framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("Transfer-Encoding must be exactly \"chunked\"")]
    TransferEncoding,
    #[error("more than one Content-Length")]
    ContentLength,
    #[error("HTTP/1.1 needs exactly one Host header")]
    Host,
    #[error("Host disagrees with the request target's authority")]
    HostMismatch,
    #[error("a header value holds a control character")]
    ControlCharacter,
    #[error("a connection-specific header in an HTTP/2 request")]
    Http2ConnectionHeader,
}

/// The http crate already refuses such values when a header is built, and
/// hyper's parser when one is read; checked again because a smuggled byte
/// here would reach the upstream.
fn has_control(headers: &HeaderMap) -> bool {
    headers.values().any(|v| {
        v.as_bytes()
            .iter()
            .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
    })
}

/// Checks a request's framing; `Ok` means it may go on.
pub fn check<B>(req: &Request<B>) -> Result<(), FramingError> {
    let headers = req.headers();
    if has_control(headers) {
        return Err(FramingError::ControlCharacter);
    }
    let mut te = headers.get_all(TRANSFER_ENCODING).iter();
    match (te.next(), te.next()) {
        (None, _) => {}
        (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"chunked") => {}
        _ => return Err(FramingError::TransferEncoding),
    }
    if headers.get_all(CONTENT_LENGTH).iter().count() > 1 {
        return Err(FramingError::ContentLength);
    }
    let mut hosts = headers.get_all(HOST).iter();
    let first_host = hosts.next().map(HeaderValue::as_bytes);
    let more_hosts = hosts.next().is_some();
    match req.version() {
        Version::HTTP_2 | Version::HTTP_3 => {
            let te_ok = headers
                .get_all(TE)
                .iter()
                .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
            let connection_specific = headers.contains_key(CONNECTION)
                || headers.contains_key("keep-alive")
                || headers.contains_key("proxy-connection")
                || headers.contains_key(TRANSFER_ENCODING)
                || headers.contains_key(UPGRADE)
                || !te_ok;
            if connection_specific {
                return Err(FramingError::Http2ConnectionHeader);
            }
            if more_hosts {
                return Err(FramingError::Host);
            }
        }
        Version::HTTP_11 if first_host.is_none() || more_hosts => return Err(FramingError::Host),
        _ if more_hosts => return Err(FramingError::Host),
        _ => {}
    }
    if let (Some(authority), Some(host)) = (req.uri().authority(), first_host) {
        if !authority.as_str().as_bytes().eq_ignore_ascii_case(host) {
            return Err(FramingError::HostMismatch);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, headers: &[(&str, &[u8])]) -> Request<()> {
        let mut r = Request::builder().uri(uri).version(version);
        for (k, v) in headers {
            r = r.header(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        r.body(()).unwrap()
    }

    #[test]
    fn ordinary_requests_pass() {
        assert_eq!(
            check(&req(Version::HTTP_11, "/a", &[("host", b"x")])),
            Ok(())
        );
        assert_eq!(check(&req(Version::HTTP_10, "/a", &[])), Ok(()));
        assert_eq!(
            check(&req(
                Version::HTTP_11,
                "/a",
                &[("host", b"x"), ("transfer-encoding", b"Chunked")]
            )),
            Ok(())
        );
        assert_eq!(
            check(&req(Version::HTTP_2, "https://x/a", &[("te", b"trailers")])),
            Ok(())
        );
        assert_eq!(
            check(&req(
                Version::HTTP_11,
                "http://X:80/a",
                &[("host", b"x:80")]
            )),
            Ok(())
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        use FramingError::*;
        type Case<'a> = (Version, &'a str, &'a [(&'a str, &'a [u8])], FramingError);
        let cases: &[Case] = &[
            (
                Version::HTTP_11,
                "/a",
                &[("host", b"x"), ("transfer-encoding", b"chunked, chunked")],
                TransferEncoding,
            ),
            (
                Version::HTTP_11,
                "/a",
                &[("host", b"x"), ("transfer-encoding", b"xchunked")],
                TransferEncoding,
            ),
            (
                Version::HTTP_11,
                "/a",
                &[("host", b"x"), ("transfer-encoding", b"gzip")],
                TransferEncoding,
            ),
            (
                Version::HTTP_11,
                "/a",
                &[
                    ("host", b"x"),
                    ("transfer-encoding", b"chunked"),
                    ("transfer-encoding", b"chunked"),
                ],
                TransferEncoding,
            ),
            (
                Version::HTTP_11,
                "/a",
                &[
                    ("host", b"x"),
                    ("content-length", b"5"),
                    ("content-length", b"5"),
                ],
                ContentLength,
            ),
            (Version::HTTP_11, "/a", &[], Host),
            (
                Version::HTTP_11,
                "/a",
                &[("host", b"x"), ("host", b"y")],
                Host,
            ),
            (
                Version::HTTP_11,
                "http://evil/a",
                &[("host", b"x")],
                HostMismatch,
            ),
            (
                Version::HTTP_2,
                "https://evil/a",
                &[("host", b"x")],
                HostMismatch,
            ),
            (
                Version::HTTP_2,
                "https://x/a",
                &[("connection", b"keep-alive")],
                Http2ConnectionHeader,
            ),
            (
                Version::HTTP_2,
                "https://x/a",
                &[("te", b"gzip")],
                Http2ConnectionHeader,
            ),
        ];
        for (version, uri, headers, want) in cases {
            assert_eq!(
                check(&req(*version, uri, headers)),
                Err(*want),
                "{uri} {headers:?}"
            );
        }
    }
}
