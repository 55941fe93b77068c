//! JWT bearer tokens, checked against the static keys of JwtIssuer objects,
//! by the rules of RFC 8725:
//!
//! - the token's size is capped before anything is decoded;
//! - the algorithm must be one the issuer allows, and the key that checks
//!   the signature is chosen by the issuer's configuration: an algorithm of
//!   the key's own family only (an HMAC token is never checked with an RSA
//!   public key), never `none`;
//! - a `kid` is looked up among the keys of the policy's issuers only, and
//!   the `jku`, `x5u`, `jwk` and `x5c` headers are never used;
//! - a `crit` header is refused: this gateway understands no extension;
//! - `exp`, `iss` and `aud` are required and checked, `nbf` is checked, all
//!   with the issuer's bounded leeway; `exp`, `nbf` and `iat` must be whole
//!   seconds: a string, a fraction or an out-of-range number is refused.
//!
//! Issuers with a `jwks_url` take their keys from a key set the data plane
//! fetches (see `jwks`); the same rules apply to those keys. When such an
//! issuer has no usable key set, its tokens cannot be checked: 503, not 401.

use std::sync::Arc;

use base64::Engine;
use gatehouse_model::object::{JwtAlgorithm, JwtIssuer};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

struct IssuerKey {
    kid: Option<String>,
    family: jsonwebtoken::AlgorithmFamily,
    key: DecodingKey,
}

/// Where an issuer's keys come from.
enum Keys {
    Static(Vec<IssuerKey>),
    Jwks(Arc<crate::jwks::JwksSource>),
}

/// An issuer, compiled.
pub struct CompiledIssuer {
    pub name: String,
    keys: Keys,
    pub max_token_bytes: usize,
    consumer_claim: String,
    validations: Vec<(Algorithm, Validation)>,
    leeway: u64,
    /// Tokens this issuer's keys verified, until they expire.
    cache: TokenCache,
}

impl std::fmt::Debug for CompiledIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledIssuer")
            .field("name", &self.name)
            .finish()
    }
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::HS384 => Algorithm::HS384,
        JwtAlgorithm::HS512 => Algorithm::HS512,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

impl CompiledIssuer {
    /// Compiles `j`; a JWKS issuer's key source comes from `jwks`, which
    /// keeps it across revisions.
    pub fn compile(
        j: &JwtIssuer,
        jwks: &crate::jwks::JwksRegistry,
    ) -> Result<CompiledIssuer, String> {
        crate::jwt_crypto::install();
        use jsonwebtoken::AlgorithmFamily::*;
        let fail = |what: String| format!("jwt_issuer \"{}\": {what}", j.name);
        let mut keys = Vec::new();
        for (i, k) in j.keys.iter().enumerate() {
            let (family, key) = match (&k.secret, &k.pem) {
                (Some(secret), _) => (Hmac, DecodingKey::from_secret(secret.as_bytes())),
                (None, Some(pem)) => {
                    let pem = pem.as_bytes();
                    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
                        (Rsa, key)
                    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
                        (Ec, key)
                    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
                        (Ed, key)
                    } else {
                        return Err(fail(format!(
                            "keys[{i}].pem: not an RSA, EC or Ed25519 public key"
                        )));
                    }
                }
                (None, None) => return Err(fail(format!("keys[{i}]: no key"))),
            };
            keys.push(IssuerKey {
                kid: k.kid.clone(),
                family,
                key,
            });
        }
        let validations = j
            .algorithms
            .iter()
            .map(|a| {
                let alg = algorithm(*a);
                let mut v = Validation::new(alg);
                v.leeway = j.leeway.as_secs();
                v.validate_nbf = true;
                v.set_issuer(&[&j.issuer]);
                v.set_audience(&j.audiences);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                (alg, v)
            })
            .collect();
        let keys = match &j.jwks_url {
            Some(url) => Keys::Jwks(jwks.source(j, url)),
            None => Keys::Static(keys),
        };
        Ok(CompiledIssuer {
            name: j.name.clone(),
            keys,
            max_token_bytes: j.max_token_bytes as usize,
            consumer_claim: j.consumer_claim.clone(),
            validations,
            leeway: j.leeway.as_secs(),
            cache: TokenCache::default(),
        })
    }
}

/// What a verified token says about its bearer.
pub struct Verified {
    /// The value of the issuer's consumer claim.
    pub subject: String,
    pub claims: Value,
    /// `exp` and `nbf`, seconds since the epoch, for checks on a cache hit.
    exp: u64,
    nbf: Option<u64>,
    /// The JWKS key set that verified it: a cache hit counts only while
    /// that set is still the issuer's usable one.
    set: Option<Arc<crate::jwks::KeySet>>,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("subject", &self.subject)
            .field("exp", &self.exp)
            .finish_non_exhaustive()
    }
}

/// Verified tokens by the SHA-256 of their text, so that a client presenting
/// the same token again (the usual case: a token is used until it expires)
/// costs a digest and a lookup instead of a signature check. An entry is used
/// only while the token's `exp` and `nbf` still hold, with the issuer's
/// leeway; it is never refreshed. The cache belongs to the compiled issuer, so
/// a configuration change to the issuer (its keys) starts it empty, and a
/// token a JWKS key verified counts only while that fetched key set is still
/// the issuer's usable one. Bounded: a shard that fills up is emptied.
struct TokenCache {
    shards: Vec<std::sync::Mutex<HashMap<[u8; 32], Arc<Verified>>>>,
}

const CACHE_SHARDS: usize = 16;
/// Entries per shard: 16 x 1024 tokens per issuer.
const CACHE_SHARD_ENTRIES: usize = 1024;

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            shards: (0..CACHE_SHARDS).map(|_| Default::default()).collect(),
        }
    }
}

impl TokenCache {
    fn shard(
        &self,
        digest: &[u8; 32],
    ) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<Verified>>> {
        self.shards[usize::from(digest[0]) % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, digest: &[u8; 32], now: u64, leeway: u64) -> Option<Arc<Verified>> {
        let hit = self.shard(digest).get(digest).cloned()?;
        let live = now < hit.exp.saturating_add(leeway)
            && hit.nbf.is_none_or(|nbf| now.saturating_add(leeway) >= nbf);
        live.then_some(hit)
    }

    fn put(&self, digest: [u8; 32], verified: Arc<Verified>) {
        let mut shard = self.shard(&digest);
        if shard.len() >= CACHE_SHARD_ENTRIES {
            shard.clear();
        }
        shard.insert(digest, verified);
    }
}

/// Why a token was not accepted. Never shown to the client in detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    TooLarge,
    Malformed,
    Unverified,
    /// A JWKS issuer that could have checked the token has no usable key
    /// set (never fetched, or older than its `jwks_max_stale`).
    KeysUnavailable,
}

/// The token's header as far as choosing a key needs it, or `None` for a
/// token `verify` refuses anyway.
fn alg_and_kid(
    token: &str,
    issuers: &[Arc<CompiledIssuer>],
) -> Option<(Algorithm, Option<String>)> {
    let cap = issuers.iter().map(|i| i.max_token_bytes).max().unwrap_or(0);
    if token.len() > cap {
        return None;
    }
    let header = jsonwebtoken::decode_header(token).ok()?;
    Some((header.alg, header.kid))
}

/// Before [`verify`]: when a JWKS issuer that allows the token's algorithm
/// has no usable key set, or does not know the token's `kid`, waits for one
/// fetch of its keys (joining a running one; starting one at most once per
/// `jwks_cooldown`). Returns at once in every other case.
pub async fn fetch_keys_for(token: &str, issuers: &[Arc<CompiledIssuer>]) {
    let Some((alg, kid)) = alg_and_kid(token, issuers) else {
        return;
    };
    for issuer in issuers {
        let Keys::Jwks(source) = &issuer.keys else {
            continue;
        };
        if issuer.validations.iter().any(|(a, _)| *a == alg) && source.wants_fetch(kid.as_deref()) {
            source.fetch_on_demand().await;
        }
    }
}

/// Whether any of `issuers` takes its keys from a JWKS URL.
pub fn any_jwks(issuers: &[Arc<CompiledIssuer>]) -> bool {
    issuers.iter().any(|i| matches!(i.keys, Keys::Jwks(_)))
}

/// Checks a bearer token against `issuers` (a policy's).
pub fn verify(token: &str, issuers: &[Arc<CompiledIssuer>]) -> Result<Arc<Verified>, TokenError> {
    let cap = issuers.iter().map(|i| i.max_token_bytes).max().unwrap_or(0);
    if token.len() > cap {
        return Err(TokenError::TooLarge);
    }
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let now = jsonwebtoken::get_current_timestamp();
    for issuer in issuers {
        if token.len() > issuer.max_token_bytes {
            continue;
        }
        if let Some(hit) = issuer.cache.get(&digest, now, issuer.leeway) {
            let current = match &issuer.keys {
                Keys::Static(_) => true,
                // A refetched or stale key set checks the token afresh.
                Keys::Jwks(source) => source
                    .usable()
                    .zip(hit.set.as_ref())
                    .is_some_and(|(now, then)| Arc::ptr_eq(&now, then)),
            };
            if current {
                return Ok(hit);
            }
        }
    }
    // Our own look at the header first: refuse `crit` and any spelling of `none`.
    let mut parts = token.split('.');
    let (Some(head), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let head = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| TokenError::Malformed)?;
    let head: Value = serde_json::from_slice(&head).map_err(|_| TokenError::Malformed)?;
    if head.get("crit").is_some() {
        return Err(TokenError::Unverified);
    }
    let alg_name = head
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(TokenError::Malformed)?;
    if alg_name.eq_ignore_ascii_case("none") {
        return Err(TokenError::Unverified);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
    let mut unavailable = false;
    for issuer in issuers {
        let Some((_, validation)) = issuer.validations.iter().find(|(a, _)| *a == header.alg)
        else {
            continue;
        };
        match &issuer.keys {
            Keys::Static(keys) => {
                for k in keys
                    .iter()
                    .filter(|k| k.family == header.alg.family() && kid_fits(&header.kid, &k.kid))
                {
                    if let Some(done) = check_with(token, &k.key, validation, issuer, None) {
                        return done.map(|v| issuer.remember(token, digest, v));
                    }
                }
            }
            Keys::Jwks(source) => {
                let Some(set) = source.usable() else {
                    unavailable = true;
                    continue;
                };
                for k in set
                    .keys
                    .iter()
                    .filter(|k| k.algorithms.contains(&header.alg) && kid_fits(&header.kid, &k.kid))
                {
                    if let Some(done) = check_with(token, &k.key, validation, issuer, Some(&set)) {
                        return done.map(|v| issuer.remember(token, digest, v));
                    }
                }
            }
        }
    }
    if unavailable {
        return Err(TokenError::KeysUnavailable);
    }
    Err(TokenError::Unverified)
}

/// The answer for a token whose signature `key` checks, or `None` when it
/// does not (the next key may).
fn check_with(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
    issuer: &CompiledIssuer,
    set: Option<&Arc<crate::jwks::KeySet>>,
) -> Option<Result<Verified, TokenError>> {
    let data = jsonwebtoken::decode::<Value>(token, key, validation).ok()?;
    // RFC 7519 allows fractional dates; we accept whole seconds only, so no
    // two parsers can read a different instant.
    let whole = |name: &str| data.claims.get(name).is_none_or(|v| v.as_u64().is_some());
    if !whole("exp") || !whole("nbf") || !whole("iat") {
        return Some(Err(TokenError::Unverified));
    }
    let Some(subject) = data
        .claims
        .get(&issuer.consumer_claim)
        .and_then(Value::as_str)
    else {
        return Some(Err(TokenError::Unverified));
    };
    // `exp` is required (the validation) and whole (above).
    let Some(exp) = data.claims.get("exp").and_then(Value::as_u64) else {
        return Some(Err(TokenError::Unverified));
    };
    Some(Ok(Verified {
        subject: subject.to_string(),
        exp,
        nbf: data.claims.get("nbf").and_then(Value::as_u64),
        set: set.cloned(),
        claims: data.claims,
    }))
}

impl CompiledIssuer {
    /// Keeps a token this issuer verified, for its next use.
    fn remember(&self, token: &str, digest: [u8; 32], verified: Verified) -> Arc<Verified> {
        let verified = Arc::new(verified);
        if token.len() <= self.max_token_bytes {
            self.cache.put(digest, verified.clone());
        }
        verified
    }
}

/// A token's `kid` picks among keys with that `kid`; a token without one
/// may be checked with any key of the issuer.
fn kid_fits(want: &Option<String>, have: &Option<String>) -> bool {
    match (want, have) {
        (Some(want), Some(have)) => want == have,
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// The values of a claim, as strings: a string is one value, an array of
/// strings its elements; `scope` is split on spaces.
pub fn claim_values(claims: &Value, name: &str) -> Vec<String> {
    match claims.get(name) {
        Some(Value::String(s)) if name == "scope" => s.split(' ').map(str::to_string).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_model::object::JwtKey;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    const SECRET: &str = "0123456789abcdef0123456789abcdef-long-enough";

    fn issuer(name: &str, keys: Vec<JwtKey>, algorithms: Vec<JwtAlgorithm>) -> Arc<CompiledIssuer> {
        Arc::new(
            CompiledIssuer::compile(
                &JwtIssuer {
                    name: name.into(),
                    labels: Default::default(),
                    revision: 1,
                    issuer: format!("https://{name}.example"),
                    audiences: vec!["gatehouse".into()],
                    algorithms,
                    keys,
                    jwks_url: None,
                    jwks_refresh: None,
                    jwks_cooldown: None,
                    jwks_max_stale: None,
                    leeway: Duration::from_secs(5),
                    consumer_claim: "sub".into(),
                    max_token_bytes: 4096,
                },
                &Default::default(),
            )
            .unwrap(),
        )
    }

    fn hmac_issuer(name: &str, kid: &str) -> Arc<CompiledIssuer> {
        let key = JwtKey {
            kid: Some(kid.into()),
            pem: None,
            secret: Some(SECRET.into()),
        };
        issuer(name, vec![key], vec![JwtAlgorithm::HS256])
    }

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn claims(exp: Value) -> Value {
        json!({"sub": "acme", "iss": "https://corp.example", "aud": "gatehouse", "exp": exp, "scope": "read write"})
    }

    fn token(kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.into());
        encode(
            &header,
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn a_cached_token_counts_only_until_it_expires() {
        let cache = TokenCache::default();
        let t = now() as u64;
        let entry = |exp: u64, nbf: Option<u64>| {
            Arc::new(Verified {
                subject: "acme".into(),
                claims: json!({}),
                exp,
                nbf,
                set: None,
            })
        };
        cache.put([1; 32], entry(t + 60, None));
        cache.put([2; 32], entry(t - 10, None));
        cache.put([3; 32], entry(t + 60, Some(t + 30)));
        assert!(cache.get(&[1; 32], t, 0).is_some());
        // Past exp, and past exp plus the leeway: gone.
        assert!(cache.get(&[2; 32], t, 0).is_none());
        assert!(cache.get(&[2; 32], t, 5).is_none());
        assert!(cache.get(&[2; 32], t, 11).is_some());
        // Not yet valid.
        assert!(cache.get(&[3; 32], t, 0).is_none());
        assert!(cache.get(&[9; 32], t, 0).is_none());
    }

    #[test]
    fn a_repeated_token_is_answered_from_the_cache() {
        let issuers = [hmac_issuer("corp", "k1")];
        let t = token("k1", &claims(json!(now() + 60)));
        let first = verify(&t, &issuers).unwrap();
        let second = verify(&t, &issuers).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        // A different token is checked on its own.
        let other = token("k1", &claims(json!(now() + 61)));
        assert!(!Arc::ptr_eq(&first, &verify(&other, &issuers).unwrap()));
    }

    #[test]
    fn a_good_token_names_its_subject() {
        let issuers = [hmac_issuer("corp", "k1")];
        let ok = verify(&token("k1", &claims(json!(now() + 60))), &issuers).unwrap();
        assert_eq!(ok.subject, "acme");
        assert_eq!(claim_values(&ok.claims, "scope"), vec!["read", "write"]);
    }

    #[test]
    fn rfc_8725_shapes_are_refused() {
        let issuers = [hmac_issuer("corp", "k1")];
        let good = claims(json!(now() + 60));
        let refused = |t: &str| verify(t, &issuers).is_err();
        // Expired past the leeway, not yet valid, dates of the wrong type.
        assert!(refused(&token("k1", &claims(json!(now() - 6)))));
        let mut early = good.clone();
        early["nbf"] = json!(now() + 60);
        assert!(refused(&token("k1", &early)));
        for exp in [
            json!("9999999999"),
            json!(9999999999.5),
            json!(u64::MAX as f64 * 10.0),
        ] {
            assert!(refused(&token("k1", &claims(exp.clone()))), "exp {exp}");
        }
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(refused(&token("k1", &no_exp)));
        // Wrong issuer or audience, or an audience list without ours.
        for (k, v) in [
            ("iss", json!("https://evil.example")),
            ("aud", json!("other")),
            ("aud", json!(["a", "b"])),
        ] {
            let mut c = good.clone();
            c[k] = v;
            assert!(refused(&token("k1", &c)), "{k}");
        }
        // A kid of another issuer, or odd kids.
        let other = [hmac_issuer("corp", "k1"), hmac_issuer("other", "k2")];
        assert!(verify(&token("k2", &good), &other[..1]).is_err());
        for kid in ["../../etc/passwd", "' OR 1=1 --", &"x".repeat(10_000)] {
            assert!(refused(&token(kid, &good)));
        }
        // `alg: none` in any casing, and unknown critical extensions.
        for alg in ["none", "None", "NONE", "nOnE"] {
            let t = format!(
                "{}.{}.",
                b64(&json!({"alg": alg, "typ": "JWT"})),
                b64(&good)
            );
            assert!(refused(&t), "{alg}");
        }
        let signed = token("k1", &good);
        let (_, rest) = signed.split_once('.').unwrap();
        let crit = format!(
            "{}.{rest}",
            b64(&json!({"alg": "HS256", "kid": "k1", "crit": ["exp"]}))
        );
        assert!(refused(&crit));
        // Too large before any decoding.
        assert_eq!(
            verify(&"a".repeat(5000), &issuers).unwrap_err(),
            TokenError::TooLarge
        );
    }

    #[test]
    fn an_hmac_token_is_never_checked_with_a_public_key() {
        // The classic confusion: sign HS256 with the bytes of the issuer's public key.
        let key = rcgen::KeyPair::generate().unwrap();
        let public_pem = key.public_key_pem();
        let es = issuer(
            "corp",
            vec![JwtKey {
                kid: Some("ec".into()),
                pem: Some(public_pem.clone()),
                secret: None,
            }],
            vec![JwtAlgorithm::ES256],
        );
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("ec".into());
        let forged = encode(
            &header,
            &claims(json!(now() + 60)),
            &EncodingKey::from_secret(public_pem.as_bytes()),
        )
        .unwrap();
        assert!(verify(&forged, std::slice::from_ref(&es)).is_err());
        // The real ES256 token is accepted.
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("ec".into());
        let real = encode(
            &header,
            &claims(json!(now() + 60)),
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(verify(&real, &[es]).unwrap().subject, "acme");
    }
}
