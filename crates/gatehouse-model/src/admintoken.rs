//! Admin API tokens: `ght_` and 40 base62 characters from a CSPRNG (about
//! 238 bits). The cluster stores only the lower-case hex SHA-256 of the whole
//! token, in an AdminToken object; the token itself is shown once.

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "ght_";
pub const SECRET_LEN: usize = 40;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Makes a new token from `rng` (a CSPRNG in production).
pub fn generate(rng: &mut impl FnMut() -> u8) -> String {
    let mut token = String::from(PREFIX);
    while token.len() < PREFIX.len() + SECRET_LEN {
        let b = rng();
        // Rejection sampling keeps every character equally likely.
        if (b as usize) < 256 - 256 % BASE62.len() {
            token.push(BASE62[b as usize % BASE62.len()] as char);
        }
    }
    token
}

/// The stored form of a token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Whether `token` has the shape of an admin token (checked before any lookup).
pub fn well_formed(token: &str) -> bool {
    token.len() == PREFIX.len() + SECRET_LEN
        && token.starts_with(PREFIX)
        && token[PREFIX.len()..].bytes().all(|b| BASE62.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let mut n = 3u8;
        let mut rng = || {
            n = n.wrapping_mul(29).wrapping_add(11);
            n
        };
        let a = generate(&mut rng);
        let b = generate(&mut rng);
        assert!(well_formed(&a), "{a}");
        assert!(well_formed(&b), "{b}");
        assert_ne!(a, b);
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), hash(&b));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for t in [
            "",
            "ght_",
            "ghk_0123456789012345678901234567890123456789",
            &format!("ght_{}", "!".repeat(40)),
        ] {
            assert!(!well_formed(t), "{t}");
        }
    }
}
