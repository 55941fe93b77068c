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

/// A secret field of an object, for changing in place.
struct SecretField<'a> {
    /// Its path: the associated data it is sealed with.
    path: String,
    /// The path values sealed before keys with a `kid` were bound to it
    /// (`keys[INDEX].secret`); they still open.
    legacy: Option<String>,
    value: &'a mut String,
}

impl<'a> SecretField<'a> {
    fn at(path: impl Into<String>, value: &'a mut String) -> Self {
        SecretField {
            path: path.into(),
            legacy: None,
            value,
        }
    }
}

/// Every secret field of `object`. A JWT issuer's HMAC secret is bound to
/// its key's `kid` when it has one (kids are unique within an issuer), so
/// reordering the keys of an exported issuer keeps its sealed secrets
/// valid; a key without a `kid` is bound to its position.
fn secret_fields(object: &mut Object) -> Vec<SecretField<'_>> {
    match object {
        Object::Certificate(c) => vec![SecretField::at("private_key_pem", &mut c.private_key_pem)],
        Object::JwtIssuer(j) => j
            .keys
            .iter_mut()
            .enumerate()
            .filter_map(|(i, k)| {
                let by_index = format!("keys[{i}].secret");
                let (path, legacy) = match &k.kid {
                    Some(kid) => (format!("keys[kid={kid}].secret"), Some(by_index)),
                    None => (by_index, None),
                };
                k.secret.as_mut().map(|value| SecretField {
                    path,
                    legacy,
                    value,
                })
            })
            .collect(),
        Object::Policy(p) => p
            .introspection
            .iter_mut()
            .map(|i| SecretField::at("introspection.client_secret", &mut i.client_secret))
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
    secret_fields(&mut object)
        .iter()
        .any(|f| is_sealed(f.value))
}

/// Seals every secret field of `object` that is not sealed yet.
pub fn seal_object(object: &mut Object, key: &SealKey) -> Result<(), SealError> {
    let (kind, name) = (object.kind().to_string(), object.name().to_string());
    for f in secret_fields(object) {
        if !is_sealed(f.value) {
            *f.value = key
                .seal(&aad(&kind, &name, &f.path), f.value)
                .ok_or(SealError::Seal { field: f.path })?;
        }
    }
    Ok(())
}

/// Opens every sealed secret field of `object` (others stay as they are).
/// Errors name the object and the field.
pub fn open_object(object: &mut Object, key: Option<&SealKey>) -> Result<(), SealError> {
    let (kind, name) = (object.kind().to_string(), object.name().to_string());
    for f in secret_fields(object) {
        if !is_sealed(f.value) {
            continue;
        }
        let named = format!("{kind} \"{name}\": {}", f.path);
        let Some(key) = key else {
            return Err(SealError::NoKey { field: named });
        };
        let opened = key.open(&aad(&kind, &name, &f.path), f.value).or_else(|| {
            f.legacy
                .as_ref()
                .and_then(|legacy| key.open(&aad(&kind, &name, legacy), f.value))
        });
        *f.value = opened.ok_or(SealError::WrongKey { field: named })?;
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

    fn hmac_issuer() -> crate::object::JwtIssuer {
        let mut j = fixtures::jwt_issuer("corp");
        j.keys.push(crate::object::JwtKey {
            kid: Some("hmac-2".into()),
            pem: None,
            secret: Some("the-second-hmac-secret-32-bytes-long".into()),
        });
        j
    }

    fn secrets_by_kid(o: &Object) -> Vec<(Option<String>, Option<String>)> {
        let Object::JwtIssuer(j) = o else {
            unreachable!()
        };
        let mut v: Vec<_> = j
            .keys
            .iter()
            .map(|k| (k.kid.clone(), k.secret.clone()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_hmac_secret_is_bound_to_its_kid_not_its_place_in_the_list() {
        let k = key();
        let plain: Object = hmac_issuer().into();
        let mut sealed = plain.clone();
        seal_object(&mut sealed, &k).unwrap();
        // An exported issuer with its keys reordered (the new key first).
        let Object::JwtIssuer(mut j) = sealed.clone() else {
            unreachable!()
        };
        j.keys.reverse();
        let mut reordered = Object::JwtIssuer(j);
        open_object(&mut reordered, Some(&k)).unwrap();
        assert_eq!(secrets_by_kid(&reordered), secrets_by_kid(&plain));

        // A sealed secret given to another kid does not open.
        let Object::JwtIssuer(mut j) = sealed.clone() else {
            unreachable!()
        };
        let first = j.keys[0].secret.clone();
        j.keys[2].secret = first;
        let err = open_object(&mut Object::JwtIssuer(j), Some(&k)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "jwt_issuer \"corp\": keys[kid=hmac-2].secret: does not open with this secrets key (sealed with another key, or altered)"
        );
    }

    #[test]
    fn secrets_sealed_by_position_before_kids_were_bound_still_open() {
        let k = key();
        let plain: Object = hmac_issuer().into();
        let Object::JwtIssuer(mut j) = plain.clone() else {
            unreachable!()
        };
        // Sealed as earlier versions did: bound to keys[INDEX].secret.
        for (i, key_) in j.keys.iter_mut().enumerate() {
            if let Some(s) = key_.secret.as_mut() {
                *s = k
                    .seal(&aad("jwt_issuer", "corp", &format!("keys[{i}].secret")), s)
                    .unwrap();
            }
        }
        let mut old = Object::JwtIssuer(j);
        open_object(&mut old, Some(&k)).unwrap();
        assert_eq!(old, plain);
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
