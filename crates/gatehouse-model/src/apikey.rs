//! The API key format, shared by the control plane (which makes keys) and
//! the data plane (which checks them).
//!
//! A key reads `ghk_<id>_<secret><checksum>`: `id` names the ApiKey object
//! (12 characters of `a-z0-9`), `secret` is 32 base62 characters from a
//! CSPRNG (about 190 bits), and `checksum` is the CRC-32 of everything
//! before it, in 6 base62 characters, so a mistyped or made-up key is
//! refused before any lookup. Only the SHA-256 of the secret is stored.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "ghk_";
pub const ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// The length of every key.
pub const KEY_LEN: usize = PREFIX.len() + ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ID_CHARS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Why a string is not a well-formed key. Deliberately vague toward clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("not a Gatehouse API key")]
    Malformed,
    #[error("the key's checksum does not match")]
    Checksum,
}

/// A key that passed the format and checksum checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

fn checksum(body: &str) -> String {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("base62 is ASCII")
}

/// Builds the key string for an id and a secret.
pub fn format_key(id: &str, secret: &str) -> String {
    let body = format!("{PREFIX}{id}_{secret}");
    let sum = checksum(&body);
    body + &sum
}

/// Makes a new id and secret from `rng` (a CSPRNG in production).
pub fn generate(rng: &mut impl FnMut() -> u8) -> (String, String) {
    // Rejection sampling keeps every character equally likely.
    let mut pick = |alphabet: &[u8]| loop {
        let b = rng();
        let limit = 256 - 256 % alphabet.len();
        if (b as usize) < limit {
            return alphabet[b as usize % alphabet.len()] as char;
        }
    };
    let id: String = (0..ID_LEN).map(|_| pick(ID_CHARS)).collect();
    let secret: String = (0..SECRET_LEN).map(|_| pick(BASE62)).collect();
    (id, secret)
}

/// Checks the format and checksum without any lookup.
pub fn parse_key(key: &str) -> Result<ParsedKey<'_>, KeyFormatError> {
    if key.len() != KEY_LEN || !key.is_ascii() {
        return Err(KeyFormatError::Malformed);
    }
    let rest = key.strip_prefix(PREFIX).ok_or(KeyFormatError::Malformed)?;
    let (id, rest) = rest.split_at(ID_LEN);
    let rest = rest.strip_prefix('_').ok_or(KeyFormatError::Malformed)?;
    let (secret, sum) = rest.split_at(SECRET_LEN);
    let id_ok = id.bytes().all(|b| ID_CHARS.contains(&b));
    let secret_ok = secret
        .bytes()
        .chain(sum.bytes())
        .all(|b| BASE62.contains(&b));
    if !id_ok || !secret_ok {
        return Err(KeyFormatError::Malformed);
    }
    if checksum(&key[..key.len() - CHECKSUM_LEN]) != sum {
        return Err(KeyFormatError::Checksum);
    }
    Ok(ParsedKey { id, secret })
}

/// The stored form of a secret: lower-case hex SHA-256.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares a presented secret with a stored hash in constant time.
pub fn secret_matches(secret: &str, stored_hash: &[u8; 32]) -> bool {
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    digest.ct_eq(stored_hash).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (String, String, String) {
        let mut n = 7u8;
        let (id, secret) = generate(&mut || {
            n = n.wrapping_mul(31).wrapping_add(17);
            n
        });
        let key = format_key(&id, &secret);
        (id, secret, key)
    }

    #[test]
    fn a_made_key_parses_back_and_matches_its_hash() {
        let (id, secret, key) = key();
        assert_eq!(key.len(), KEY_LEN);
        assert!(key.starts_with("ghk_"));
        let parsed = parse_key(&key).unwrap();
        assert_eq!((parsed.id, parsed.secret), (id.as_str(), secret.as_str()));
        let stored: [u8; 32] = hex::decode(hash_secret(&secret))
            .unwrap()
            .try_into()
            .unwrap();
        assert!(secret_matches(parsed.secret, &stored));
        assert!(!secret_matches("x", &stored));
        assert!(
            crate::validate::check_name(&id).is_ok(),
            "the id is a valid object name"
        );
    }

    #[test]
    fn altered_keys_are_refused_before_lookup() {
        let (_, _, key) = key();
        let mut flipped = key.clone().into_bytes();
        flipped[20] = if flipped[20] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            parse_key(std::str::from_utf8(&flipped).unwrap()),
            Err(KeyFormatError::Checksum)
        );
        assert_eq!(
            parse_key(&format!("{key}x")),
            Err(KeyFormatError::Malformed),
            "a suffix"
        );
        assert_eq!(
            parse_key(&key.to_uppercase()),
            Err(KeyFormatError::Malformed),
            "other casing"
        );
        assert_eq!(
            parse_key(&key.replace('_', "%5F")),
            Err(KeyFormatError::Malformed),
            "URL-encoded"
        );
        assert_eq!(parse_key(""), Err(KeyFormatError::Malformed));
        assert_eq!(parse_key("abc"), Err(KeyFormatError::Malformed));
    }
}
