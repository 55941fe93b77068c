//! Secrets at rest: key material in configuration objects (the fields in
//! [`crate::secret`]) is sealed with a key the operator supplies before it
//! enters the replicated log, and opened only where it is used (the data
//! plane's compile step; the leader, to validate and compare a write).
//!
//! A sealed value reads `gatehouse:sealed:v1:` followed by the base64 of a
//! 12-byte random nonce and the AES-256-GCM ciphertext with its tag. The
//! object's kind, name and the field's path are the associated data, so a
//! sealed value copied into another object or field does not open.

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::object::Object;

pub const PREFIX: &str = "gatehouse:sealed:v1:";
/// The length of a sealing key in bytes.
pub const KEY_LEN: usize = 32;

/// Why a value could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("{field}: is sealed, and no secrets key is configured here to open it")]
    NoKey { field: String },
    #[error("{field}: does not open with this secrets key (sealed with another key, or altered)")]
    WrongKey { field: String },
    #[error("{field}: sealing failed")]
    Seal { field: String },
}

/// The operator's key. Never printed.
#[derive(Clone)]
pub struct SealKey(std::sync::Arc<LessSafeKey>);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// A key from exactly [`KEY_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<SealKey> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).ok()?;
        Some(SealKey(std::sync::Arc::new(LessSafeKey::new(key))))
    }

    /// A key from its text form: 64 hex digits or the base64 of 32 bytes
    /// (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Option<SealKey> {
        let text = text.trim();
        let bytes = hex::decode(text)
            .ok()
            .or_else(|| base64::engine::general_purpose::STANDARD.decode(text).ok())?;
        SealKey::from_bytes(&bytes)
    }

    /// A new random key in its text form (64 hex digits).
    pub fn generate_text() -> String {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source works");
        hex::encode(bytes)
    }

    fn seal(&self, aad: &str, plaintext: &str) -> Option<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut buf = plaintext.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Some(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    fn open(&self, aad: &str, sealed: &str) -> Option<String> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed.strip_prefix(PREFIX)?)
            .ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

/// Whether a field value is sealed.
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(PREFIX)
}

/// Every secret field of `object`, with its path, for changing in place.
fn secret_fields(object: &mut Object) -> Vec<(String, &mut String)> {
    match object {
        Object::Certificate(c) => vec![("private_key_pem".to_string(), &mut c.private_key_pem)],
        Object::JwtIssuer(j) => j
            .keys
            .iter_mut()
            .enumerate()
            .filter_map(|(i, k)| k.secret.as_mut().map(|s| (format!("keys[{i}].secret"), s)))
            .collect(),
        Object::Policy(p) => p
            .introspection
            .iter_mut()
            .map(|i| {
                (
                    "introspection.client_secret".to_string(),
                    &mut i.client_secret,
                )
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn aad(kind: &str, name: &str, field: &str) -> String {
    format!("{kind}/{name}/{field}")
}

/// Whether any secret field of `object` is sealed.
pub fn has_sealed(object: &Object) -> bool {
    let mut object = object.clone();
    secret_fields(&mut object).iter().any(|(_, v)| is_sealed(v))
}

/// Seals every secret field of `object` that is not sealed yet.
pub fn seal_object(object: &mut Object, key: &SealKey) -> Result<(), SealError> {
    let (kind, name) = (object.kind().to_string(), object.name().to_string());
    for (field, value) in secret_fields(object) {
        if !is_sealed(value) {
            *value = key
                .seal(&aad(&kind, &name, &field), value)
                .ok_or(SealError::Seal { field })?;
        }
    }
    Ok(())
}

/// Opens every sealed secret field of `object` (others stay as they are).
/// Errors name the object and the field.
pub fn open_object(object: &mut Object, key: Option<&SealKey>) -> Result<(), SealError> {
    let (kind, name) = (object.kind().to_string(), object.name().to_string());
    for (field, value) in secret_fields(object) {
        if !is_sealed(value) {
            continue;
        }
        let named = format!("{kind} \"{name}\": {field}");
        let Some(key) = key else {
            return Err(SealError::NoKey { field: named });
        };
        *value = key
            .open(&aad(&kind, &name, &field), value)
            .ok_or(SealError::WrongKey { field: named })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn key() -> SealKey {
        SealKey::parse(&SealKey::generate_text()).unwrap()
    }

    #[test]
    fn sealed_secrets_open_with_the_key_and_only_in_their_place() {
        let k = key();
        let plain: Object = fixtures::certificate("api").into();
        let mut sealed = plain.clone();
        seal_object(&mut sealed, &k).unwrap();
        let Object::Certificate(c) = &sealed else {
            unreachable!()
        };
        assert!(is_sealed(&c.private_key_pem));
        assert!(!c.private_key_pem.contains("PRIVATE KEY"));
        assert!(has_sealed(&sealed));
        // Sealing twice leaves a sealed value alone.
        let mut again = sealed.clone();
        seal_object(&mut again, &k).unwrap();
        assert_eq!(again, sealed);

        let mut opened = sealed.clone();
        open_object(&mut opened, Some(&k)).unwrap();
        assert_eq!(opened, plain);

        // Another key, no key, or the value moved to another object: refused, named.
        let err = open_object(&mut sealed.clone(), Some(&key())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "certificate \"api\": private_key_pem: does not open with this secrets key (sealed with another key, or altered)"
        );
        let err = open_object(&mut sealed.clone(), None).unwrap_err();
        assert!(matches!(err, SealError::NoKey { .. }), "{err}");
        let Object::Certificate(mut moved) = sealed.clone() else {
            unreachable!()
        };
        moved.name = "other".into();
        let err = open_object(&mut Object::Certificate(moved), Some(&k)).unwrap_err();
        assert!(matches!(err, SealError::WrongKey { .. }), "{err}");
    }

    #[test]
    fn hmac_secrets_are_sealed_too_and_public_keys_are_not() {
        let k = key();
        let plain: Object = fixtures::jwt_issuer("corp").into();
        let mut sealed = plain.clone();
        seal_object(&mut sealed, &k).unwrap();
        let Object::JwtIssuer(j) = &sealed else {
            unreachable!()
        };
        for key in &j.keys {
            if let Some(s) = &key.secret {
                assert!(is_sealed(s));
            }
            if let Some(p) = &key.pem {
                assert!(!is_sealed(p));
            }
        }
        open_object(&mut sealed, Some(&k)).unwrap();
        assert_eq!(sealed, plain);
    }

    #[test]
    fn introspection_client_secrets_are_sealed_in_their_policy() {
        let k = key();
        let mut p = fixtures::policy("opaque");
        p.authentication = vec![crate::object::AuthMethod::Introspection];
        p.introspection = Some(crate::object::IntrospectionAuth {
            url: "https://idp.example.com/introspect".into(),
            client_id: "gateway".into(),
            client_secret: "s3cret".into(),
            ca_pem: None,
            consumer_claim: "sub".into(),
            cache_ttl: std::time::Duration::from_secs(60),
            negative_cache_ttl: std::time::Duration::from_secs(5),
            max_cache_entries: 10,
            timeout: std::time::Duration::from_secs(2),
        });
        let plain: Object = p.into();
        let mut sealed = plain.clone();
        seal_object(&mut sealed, &k).unwrap();
        let Object::Policy(p) = &sealed else {
            unreachable!()
        };
        let secret = &p.introspection.as_ref().unwrap().client_secret;
        assert!(is_sealed(secret) && !secret.contains("s3cret"));
        assert!(has_sealed(&sealed));
        assert_eq!(
            open_object(&mut sealed.clone(), None).unwrap_err().to_string(),
            "policy \"opaque\": introspection.client_secret: is sealed, and no secrets key is configured here to open it"
        );
        open_object(&mut sealed, Some(&k)).unwrap();
        assert_eq!(sealed, plain);
    }

    #[test]
    fn keys_parse_from_hex_or_base64_of_32_bytes_only() {
        assert!(SealKey::parse(&"ab".repeat(32)).is_some());
        assert!(
            SealKey::parse(&base64::engine::general_purpose::STANDARD.encode([7u8; 32])).is_some()
        );
        assert!(SealKey::parse(&"ab".repeat(16)).is_none());
        assert!(SealKey::parse("not a key").is_none());
        assert_eq!(format!("{:?}", key()), "SealKey(..)");
    }
}
