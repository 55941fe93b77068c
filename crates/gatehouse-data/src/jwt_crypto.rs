//! Signature checks of RSA and ECDSA tokens with `ring`.
//!
//! jsonwebtoken verifies through a process-wide `CryptoProvider`; the one its
//! `rust_crypto` feature brings parses the key again for every token and does
//! its big-number work in portable Rust, which made an RS256 or ES256 token
//! cost several times a whole proxied request. `ring` (already the TLS
//! stack's crypto) does the same checks with assembly-optimised code. HMAC and
//! EdDSA stay with the RustCrypto implementations, which are fast already, as
//! does everything else the provider does (signing, JWK helpers).
//!
//! What a signature is checked against does not change: the algorithm comes
//! from the configured key (jwt.rs), and `ring` accepts RSA moduli of 2048 to
//! 8192 bits, as validation does.

use std::sync::{Once, OnceLock};

use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use ring::signature::{self as sig, RsaPublicKeyComponents, UnparsedPublicKey};

/// Makes the ring-backed provider the process's default; the first call
/// wins, later ones do nothing. Called before the first token is checked.
pub fn install() {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let rust_crypto = &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER;
        let provider = PROVIDER.get_or_init(|| CryptoProvider {
            signer_factory: rust_crypto.signer_factory,
            verifier_factory: new_verifier,
            key_utils: rust_crypto.key_utils.clone(),
        });
        if CryptoProvider::install_default(provider).is_err() {
            tracing::debug!("a JWT crypto provider was installed earlier; keeping it");
        }
    });
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    let rsa = |params| Scheme::Rsa(params);
    let ecdsa = |params| Scheme::Ecdsa(params);
    let scheme = match alg {
        Algorithm::RS256 => rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::PS256 => rsa(&sig::RSA_PSS_2048_8192_SHA256),
        Algorithm::PS384 => rsa(&sig::RSA_PSS_2048_8192_SHA384),
        Algorithm::PS512 => rsa(&sig::RSA_PSS_2048_8192_SHA512),
        Algorithm::ES256 => ecdsa(&sig::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => ecdsa(&sig::ECDSA_P384_SHA384_FIXED),
        _ => {
            return (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key)
        }
    };
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        scheme,
        key: key.clone(),
    }))
}

#[derive(Clone, Copy)]
enum Scheme {
    Rsa(&'static sig::RsaParameters),
    Ecdsa(&'static sig::EcdsaVerificationAlgorithm),
}

struct RingVerifier {
    alg: Algorithm,
    scheme: Scheme,
    key: DecodingKey,
}

impl jsonwebtoken::signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(
        &self,
        msg: &[u8],
        signature: &Vec<u8>,
    ) -> std::result::Result<(), jsonwebtoken::signature::Error> {
        let checked = match (self.scheme, self.key.kind()) {
            // An RSA key is PKCS#1 `RSAPublicKey` DER (from PEM), an EC key
            // the SEC1 point.
            (Scheme::Rsa(params), DecodingKeyKind::SecretOrDer(der)) => {
                UnparsedPublicKey::new(params, der).verify(msg, signature)
            }
            (Scheme::Rsa(params), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
            (Scheme::Ecdsa(params), DecodingKeyKind::SecretOrDer(point)) => {
                UnparsedPublicKey::new(params, point).verify(msg, signature)
            }
            (Scheme::Ecdsa(_), DecodingKeyKind::RsaModulusExponent { .. }) => {
                return Err(jsonwebtoken::signature::Error::new())
            }
        };
        checked.map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    /// Signs with the RustCrypto provider, checks with ring: a good
    /// signature passes, a changed message or signature does not.
    fn round_trip(alg: Algorithm, encoding: EncodingKey, decoding: DecodingKey) {
        let token = jsonwebtoken::encode(
            &Header::new(alg),
            &serde_json::json!({"sub": "x"}),
            &encoding,
        )
        .unwrap();
        let (message, signature) = token.rsplit_once('.').unwrap();
        let signature =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signature)
                .unwrap();
        let verifier = new_verifier(&alg, &decoding).unwrap();
        assert!(
            verifier.verify(message.as_bytes(), &signature).is_ok(),
            "{alg:?}"
        );
        let mut tampered = message.as_bytes().to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(verifier.verify(&tampered, &signature).is_err(), "{alg:?}");
        let mut bad = signature.clone();
        bad[0] ^= 1;
        assert!(
            verifier.verify(message.as_bytes(), &bad).is_err(),
            "{alg:?}"
        );
    }

    #[test]
    fn ecdsa_tokens_are_checked_with_ring() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let decoding = DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap();
        round_trip(Algorithm::ES256, encoding, decoding);
    }

    /// A 2048-bit RSA key pair made with `openssl genpkey` for tests only
    /// (shared with the end-to-end RS256 tests).
    const RSA_PRIVATE: &str = include_str!("../testdata/jwt-rsa-2048.pem");
    const RSA_PUBLIC: &str = include_str!("../testdata/jwt-rsa-2048.pub.pem");

    #[test]
    fn rsa_tokens_are_checked_with_ring() {
        for alg in [Algorithm::RS256, Algorithm::PS256, Algorithm::RS512] {
            let encoding = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
            let decoding = DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).unwrap();
            round_trip(alg, encoding, decoding);
        }
    }

    #[test]
    fn a_key_of_another_family_is_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let decoding = DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap();
        assert!(new_verifier(&Algorithm::RS256, &decoding).is_err());
    }
}
