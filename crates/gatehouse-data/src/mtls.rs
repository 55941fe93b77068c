//! Client certificates (mutual TLS) as an API credential.
//!
//! The TLS listener asks for a client certificate when some policy of the
//! revision accepts them, takes whatever chain the client sends (checking
//! only that the client holds its key: the handshake signature), and keeps
//! the chain with the connection. Which CA a chain must lead to is a
//! question of the route, so each policy decides per request: the chain is
//! verified against the policy's own CA (validity period and the
//! client-auth extended key usage included), and the outcome is kept with
//! the connection, so a connection's later requests pay one lock and a
//! comparison.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gatehouse_model::object::{CertIdentity, MtlsAuth};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use sha2::{Digest, Sha256};

use crate::proxy::Shared;

/// Outcomes kept per connection; a connection meets few policies.
const MAX_OUTCOMES: usize = 16;

/// The client certificate chain of one TLS connection, leaf first, and
/// what it was found to be under each policy CA it met.
#[derive(Debug)]
pub struct PeerChain {
    certs: Vec<CertificateDer<'static>>,
    outcomes: Mutex<Vec<([u8; 32], Outcome)>>,
}

#[derive(Clone, Debug)]
enum Outcome {
    /// The chain leads to the CA and names this consumer, until `until`.
    Valid { name: Arc<str>, until: SystemTime },
    /// It does not (or names no one): refused for the connection's life.
    Invalid,
}

impl PeerChain {
    /// The chain a client presented on `conn`, if it presented one.
    pub fn of(conn: &rustls::ServerConnection) -> Option<Arc<PeerChain>> {
        let certs = conn.peer_certificates()?;
        if certs.is_empty() {
            return None;
        }
        Some(Arc::new(PeerChain {
            certs: certs.iter().map(|c| c.clone().into_owned()).collect(),
            outcomes: Mutex::new(Vec::new()),
        }))
    }

    #[cfg(test)]
    pub fn from_ders(certs: Vec<CertificateDer<'static>>) -> PeerChain {
        PeerChain {
            certs,
            outcomes: Mutex::new(Vec::new()),
        }
    }
}

/// A policy's client-certificate rule, compiled.
#[derive(Debug)]
pub struct CompiledMtls {
    /// SHA-256 of the CA PEM and the naming rule: the key of a connection's
    /// kept outcome, equal across revisions that keep the rule.
    id: [u8; 32],
    anchors: Vec<TrustAnchor<'static>>,
    consumer_from: CertIdentity,
    provider: Arc<CryptoProvider>,
}

impl CompiledMtls {
    pub fn compile(policy: &str, m: &MtlsAuth) -> Result<CompiledMtls, String> {
        let fail = |what: String| format!("policy \"{policy}\": mtls.ca_pem: {what}");
        let anchors = CertificateDer::pem_slice_iter(m.ca_pem.as_bytes())
            .map(|der| {
                let der = der.map_err(|e| fail(e.to_string()))?;
                webpki::anchor_from_trusted_cert(&der)
                    .map(|a| a.to_owned())
                    .map_err(|e| fail(format!("{e:?}")))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if anchors.is_empty() {
            return Err(fail("holds no PEM certificate".into()));
        }
        let mut id = Sha256::new();
        id.update(m.ca_pem.as_bytes());
        id.update([m.consumer_from as u8]);
        Ok(CompiledMtls {
            id: id.finalize().into(),
            anchors,
            consumer_from: m.consumer_from,
            provider: crate::tls::provider(),
        })
    }

    /// The consumer name the chain gives under this rule, if the chain
    /// leads to this rule's CA and is valid at `now`.
    pub fn identify(&self, chain: &PeerChain, now: SystemTime) -> Option<Arc<str>> {
        let kept = {
            let outcomes = chain.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            outcomes
                .iter()
                .find(|(id, _)| *id == self.id)
                .map(|(_, o)| o.clone())
        };
        let outcome = match kept {
            Some(o) => o,
            None => {
                let o = self.verify(&chain.certs, now);
                let mut outcomes = chain.outcomes.lock().unwrap_or_else(|e| e.into_inner());
                if outcomes.len() < MAX_OUTCOMES {
                    outcomes.push((self.id, o.clone()));
                }
                o
            }
        };
        match outcome {
            // A kept outcome holds until the leaf expires; then it is
            // refused like any expired certificate.
            Outcome::Valid { name, until } if now < until => Some(name),
            _ => None,
        }
    }

    fn verify(&self, certs: &[CertificateDer<'static>], now: SystemTime) -> Outcome {
        let Some((leaf, intermediates)) = certs.split_first() else {
            return Outcome::Invalid;
        };
        let Ok(ee) = webpki::EndEntityCert::try_from(leaf) else {
            return Outcome::Invalid;
        };
        let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        let verified = ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        );
        if verified.is_err() {
            return Outcome::Invalid;
        }
        match name_and_expiry(leaf, self.consumer_from) {
            Some((name, until)) => Outcome::Valid {
                name: name.into(),
                until,
            },
            None => Outcome::Invalid,
        }
    }
}

/// The consumer name of a certificate by `from`, and its `notAfter`.
fn name_and_expiry(der: &[u8], from: CertIdentity) -> Option<(String, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = match from {
        CertIdentity::SubjectCn => cert
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_string(),
        CertIdentity::SanDns => {
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(s) => Some(s.to_string()),
                _ => None,
            })?
        }
    };
    let not_after = cert.validity().not_after.timestamp();
    let until = UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).ok()?);
    (!name.is_empty()).then_some((name, until))
}

/// The handshake side: asks for a client certificate while some policy of
/// the revision being served accepts them, accepts any chain whose key the
/// client proves it holds, and leaves the CA to the policy of each request.
#[derive(Debug)]
pub struct AnyClientCert {
    pub shared: Arc<Shared>,
    pub provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        self.shared
            .config
            .load()
            .as_ref()
            .is_some_and(|c| c.client_certs)
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client then sends the certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Which CA it must lead to depends on the route: checked per request.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Client CAs and certificates for tests.
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };

    pub(crate) struct Ca {
        pub(crate) pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    pub(crate) fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    pub(crate) fn leaf(
        ca: &Ca,
        cn: &str,
        eku: Vec<ExtendedKeyUsagePurpose>,
        days: (i64, i64),
    ) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["svc.example.com".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.com/billing".try_into().unwrap(),
        ));
        p.subject_alt_names
            .push(SanType::Rfc822Name("ops@example.com".try_into().unwrap()));
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = eku;
        p.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(days.0);
        p.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(days.1);
        p.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    /// `days` from now, as time since the epoch.
    fn since_epoch(days: i64) -> Duration {
        let step = Duration::from_secs(days.unsigned_abs() * 86_400);
        let t = if days < 0 {
            SystemTime::now() - step
        } else {
            SystemTime::now() + step
        };
        t.duration_since(UNIX_EPOCH).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use rcgen::ExtendedKeyUsagePurpose;

    fn rule(ca: &Ca, from: CertIdentity) -> CompiledMtls {
        CompiledMtls::compile(
            "p",
            &MtlsAuth {
                ca_pem: ca.pem.clone(),
                consumer_from: from,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_chain_names_its_consumer_only_under_its_own_ca() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let chain = PeerChain::from_ders(vec![leaf(
            &a,
            "acme",
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            (-1, 30),
        )]);
        let now = SystemTime::now();
        assert_eq!(
            rule(&a, CertIdentity::SubjectCn)
                .identify(&chain, now)
                .as_deref(),
            Some("acme")
        );
        assert_eq!(
            rule(&a, CertIdentity::SanDns)
                .identify(&chain, now)
                .as_deref(),
            Some("svc.example.com")
        );
        // The same connection's chain, another policy's CA: refused, and
        // the outcome under A is not reused for B.
        assert_eq!(
            rule(&b, CertIdentity::SubjectCn).identify(&chain, now),
            None
        );
        // Kept outcomes stop at the leaf's expiry.
        let later = now + Duration::from_secs(31 * 86_400);
        assert_eq!(
            rule(&a, CertIdentity::SubjectCn).identify(&chain, later),
            None
        );
    }

    #[test]
    fn expired_not_yet_valid_and_server_only_certificates_are_refused() {
        let a = ca("CA A");
        let now = SystemTime::now();
        let r = rule(&a, CertIdentity::SubjectCn);
        for (what, eku, days) in [
            ("expired", vec![], (-30, -1)),
            ("not yet valid", vec![], (1, 30)),
            (
                "server auth only",
                vec![ExtendedKeyUsagePurpose::ServerAuth],
                (-1, 30),
            ),
        ] {
            let chain = PeerChain::from_ders(vec![leaf(&a, "acme", eku, days)]);
            assert_eq!(r.identify(&chain, now), None, "{what}");
        }
        // No EKU at all is any usage, client auth included.
        let chain = PeerChain::from_ders(vec![leaf(&a, "acme", vec![], (-1, 30))]);
        assert_eq!(r.identify(&chain, now).as_deref(), Some("acme"));
        assert_eq!(r.identify(&PeerChain::from_ders(vec![]), now), None);
        assert_eq!(
            r.identify(
                &PeerChain::from_ders(vec![CertificateDer::from(vec![1u8, 2, 3])]),
                now
            ),
            None
        );
    }
}
