//! Path canonicalisation, done once per request before routing: the route
//! is chosen on the canonical path and the upstream receives that same path,
//! so no encoded or dotted variant of a path can reach a route its policy
//! forbids.
//!
//! The canonical form of a path:
//! 1. percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`)
//!    are decoded; every other percent-encoding is kept, with upper-case hex;
//! 2. repeated slashes are merged (`//a///b` is `/a/b`);
//! 3. dot segments are removed as RFC 3986 section 5.2.4 says (`/a/./b/../c`
//!    is `/a/c`; nothing climbs above the root).
//!
//! What stays ambiguous is refused (400), because servers disagree on it:
//! - an encoded `/` (`%2F`) or `\` (`%5C`), an encoded NUL (`%00`);
//! - a `%` not followed by two hex digits;
//! - percent-encoded bytes that are not valid UTF-8, which covers overlong
//!   encodings such as `%C0%AE` (a `.` to some decoders);
//! - a backslash, or a control character or a space;
//! - a `;` anywhere: Java servers read `/a/..;/b` as `/b`, so a path
//!   parameter could walk around a route;
//! - a path that does not start with `/`.
//!
//! Paths stay case-sensitive, as RFC 3986 says: `/ADMIN` is not `/admin`.
//! Upstreams that fold case should get routes for every spelling, or none.

use std::borrow::Cow;

/// The longest path accepted; a longer one is refused before any work.
pub const MAX_PATH_BYTES: usize = 8192;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("'%' must be followed by two hex digits")]
    BadEscape,
    #[error("an encoded '/', '\\' or NUL is ambiguous")]
    AmbiguousEscape,
    #[error("percent-encoded bytes are not valid UTF-8")]
    BadUtf8,
    #[error("backslashes, ';', spaces and control characters are not allowed in paths")]
    ForbiddenCharacter,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether the path needs no change: the common case, answered without
/// allocating.
fn already_canonical(path: &[u8]) -> bool {
    let mut prev_slash = false;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' => return false,
            b'/' if prev_slash => return false,
            b'.' if prev_slash => {
                // A segment that is "." or "..".
                let rest = &path[i..];
                let seg_end = rest.iter().position(|c| *c == b'/').unwrap_or(rest.len());
                if matches!(&rest[..seg_end], b"." | b"..") {
                    return false;
                }
            }
            _ => {}
        }
        prev_slash = b == b'/';
    }
    true
}

/// The canonical form of `path` (without the query), or why it is refused.
pub fn canonicalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if bytes
        .iter()
        .any(|b| *b == b'\\' || *b == b';' || *b <= b' ' || *b == 0x7f)
    {
        return Err(PathError::ForbiddenCharacter);
    }
    if already_canonical(bytes) {
        return Ok(Cow::Borrowed(path));
    }

    // 1. Escapes: decode the unreserved ones, normalise the rest, and check
    //    that every decoded byte sequence is UTF-8.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut raw_run: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let byte = h << 4 | l;
            if matches!(byte, b'/' | b'\\' | 0) {
                return Err(PathError::AmbiguousEscape);
            }
            raw_run.push(byte);
            if unreserved(byte) {
                decoded.push(byte);
            } else {
                decoded.extend_from_slice(format!("%{byte:02X}").as_bytes());
            }
            i += 3;
        } else {
            if std::str::from_utf8(&raw_run).is_err() {
                return Err(PathError::BadUtf8);
            }
            raw_run.clear();
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    if std::str::from_utf8(&raw_run).is_err() {
        return Err(PathError::BadUtf8);
    }

    // 2 and 3. Segments: merge empty ones, then resolve dot segments. The
    //    decoding above may have made new dots (`%2e%2e`), so this comes after.
    let text = String::from_utf8(decoded).map_err(|_| PathError::BadUtf8)?;
    let trailing = text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for segment in text.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut canonical = String::with_capacity(text.len());
    for segment in &out {
        canonical.push('/');
        canonical.push_str(segment);
    }
    if trailing || canonical.is_empty() {
        canonical.push('/');
    }
    Ok(Cow::Owned(canonical))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(p: &str) -> String {
        canonicalize(p)
            .unwrap_or_else(|e| panic!("{p:?} refused: {e}"))
            .into_owned()
    }

    #[test]
    fn dots_slashes_and_unreserved_escapes_resolve() {
        assert_eq!(ok("/a/b"), "/a/b");
        assert_eq!(ok("//admin"), "/admin");
        assert_eq!(ok("/p/../admin"), "/admin");
        assert_eq!(ok("/p/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/p/.%2E/admin"), "/admin");
        assert_eq!(ok("/./admin"), "/admin");
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("/../../x"), "/x");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/admin/"), "/admin/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/.."), "/");
    }

    #[test]
    fn other_escapes_stay_encoded_in_upper_case() {
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/admin%23x"), "/admin%23x");
        assert_eq!(
            ok("/%252e%252e/admin"),
            "/%252e%252e/admin",
            "one decoding only"
        );
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use PathError::*;
        for (path, why) in [
            ("/p%2f..%2fadmin", AmbiguousEscape),
            ("/p%5cadmin", AmbiguousEscape),
            ("/admin%00", AmbiguousEscape),
            ("/admin%2", BadEscape),
            ("/admin%zz", BadEscape),
            ("/%c0%ae%c0%ae/admin", BadUtf8),
            ("/%ff", BadUtf8),
            ("/p\\..\\admin", ForbiddenCharacter),
            ("/admin;x", ForbiddenCharacter),
            ("/admin..;/", ForbiddenCharacter),
            ("/a b", ForbiddenCharacter),
            ("admin", NotAbsolute),
            ("", NotAbsolute),
        ] {
            assert_eq!(canonicalize(path), Err(why), "{path:?}");
        }
        assert_eq!(
            canonicalize(&format!("/{}", "a".repeat(MAX_PATH_BYTES))),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        assert!(matches!(
            canonicalize("/api/v1/users"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(
            canonicalize("/a/.well-known/x"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(canonicalize("/a//b"), Ok(Cow::Owned(_))));
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%2e".to_string()),
            Just("%2E".to_string()),
            Just("%41".to_string()),
            Just("%25".to_string()),
            Just("%c3%a9".to_string()),
            "[a-z]{1,3}",
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|v| format!("/{}", v.concat()))
    }

    proptest! {
        #[test]
        fn canonicalising_twice_equals_once(path in path_strategy()) {
            if let Ok(once) = canonicalize(&path) {
                let twice = canonicalize(&once).expect("a canonical path is accepted");
                prop_assert_eq!(twice.as_ref(), once.as_ref());
            }
        }

        #[test]
        fn a_canonical_path_has_no_dot_segments_or_empty_segments(path in path_strategy()) {
            if let Ok(c) = canonicalize(&path) {
                prop_assert!(c.starts_with('/'));
                let inner = c.trim_end_matches('/');
                prop_assert!(inner.is_empty() || inner[1..].split('/').all(|s| !s.is_empty() && s != "." && s != ".."), "{}", c);
            }
        }
    }
}
