//! The path canonicaliser on any string: it never panics, what it accepts is
//! canonical (canonicalising it again changes nothing), and it never lets
//! out a dot segment, a doubled slash or an ambiguous escape.
#![no_main]

use gatehouse_data::path::canonicalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(once) = canonicalize(path) else {
        return;
    };
    let twice = canonicalize(&once).expect("a canonical path is accepted again");
    assert_eq!(once, twice, "canonicalising twice equals once");
    assert!(once.starts_with('/'), "{once:?}");
    assert!(!once.contains("//"), "{once:?}");
    for segment in once.split('/') {
        assert!(segment != "." && segment != "..", "{once:?}");
    }
    let lower = once.to_ascii_lowercase();
    for escape in ["%2f", "%5c", "%00", "%2e"] {
        assert!(!lower.contains(escape), "{once:?}");
    }
});
