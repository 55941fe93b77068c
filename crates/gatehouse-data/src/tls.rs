//! TLS termination: the Certificate objects of a revision, keyed by server
//! name, and a rustls resolver that reads the revision being served, so a
//! certificate change takes effect on the next handshake without restarting
//! the listener.

use std::collections::HashMap;
use std::sync::Arc;

use gatehouse_model::object::Certificate;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::proxy::Shared;

/// The crypto provider of every TLS connection the data plane makes or takes.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of one revision.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`: a wildcard covers one label.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertStore {
    /// Parses and checks every certificate: the chain, the key, and that the
    /// key belongs to the chain's first certificate. Objects are taken in
    /// name order, and the first to claim a server name keeps it.
    pub fn compile<'a>(
        certs: impl IntoIterator<Item = &'a Certificate>,
    ) -> Result<CertStore, String> {
        let provider = provider();
        let mut store = CertStore::default();
        for cert in certs {
            let fail = |what: &str| format!("certificate \"{}\": {what}", cert.name);
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert.certificate_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|e| fail(&format!("certificate_pem: {e}")))?;
            if chain.is_empty() {
                return Err(fail("certificate_pem: holds no certificate"));
            }
            let key = PrivateKeyDer::from_pem_slice(cert.private_key_pem.as_bytes())
                .map_err(|e| fail(&format!("private_key_pem: {e}")))?;
            let certified = CertifiedKey::from_der(chain, key, &provider)
                .map_err(|e| fail(&format!("private_key_pem: {e}")))?;
            let certified = Arc::new(certified);
            for name in &cert.server_names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(suffix) => (&mut store.wildcard, suffix),
                    None => (&mut store.exact, name.as_str()),
                };
                map.entry(key.to_ascii_lowercase())
                    .or_insert_with(|| certified.clone());
            }
        }
        Ok(store)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The certificate for a server name: an exact name first, then a
    /// wildcard over its parent domain.
    pub fn lookup(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return Some(c.clone());
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }
}

/// Picks the certificate by SNI from the revision being served. Without SNI,
/// or for an unknown name, the handshake fails: there is no default certificate
/// to leak names of other tenants.
#[derive(Debug)]
struct Resolver {
    shared: Arc<Shared>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        self.shared.config.load().as_ref()?.tls.lookup(name)
    }
}

/// The server configuration of the TLS listener: HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(shared: Arc<Shared>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        // A client certificate is asked for (never required) while some
        // policy accepts them; each request's policy checks it.
        .with_client_cert_verifier(Arc::new(crate::mtls::AnyClientCert {
            shared: shared.clone(),
            provider: provider(),
        }))
        .with_cert_resolver(Arc::new(Resolver { shared }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str, server_names: &[&str]) -> Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            server_names
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let c = params.self_signed(&key).unwrap();
        Certificate {
            name: name.into(),
            labels: Default::default(),
            revision: 1,
            server_names: server_names.iter().map(|s| s.to_string()).collect(),
            certificate_pem: c.pem(),
            private_key_pem: key.serialize_pem(),
        }
    }

    #[test]
    fn names_pick_certificates_exact_first_then_one_label_wildcards() {
        let a = cert("a", &["a.example.com"]);
        let w = cert("w", &["*.example.com"]);
        let store = CertStore::compile([&a, &w]).unwrap();
        let der = |k: Arc<CertifiedKey>| k.cert[0].clone();
        let a_der = der(store.lookup("a.example.com").unwrap());
        assert_eq!(der(store.lookup("A.Example.COM.").unwrap()), a_der);
        let w_der = der(store.lookup("b.example.com").unwrap());
        assert_ne!(a_der, w_der);
        assert!(
            store.lookup("x.b.example.com").is_none(),
            "a wildcard covers one label"
        );
        assert!(store.lookup("example.com").is_none());
    }

    #[test]
    fn a_key_of_another_certificate_or_bad_pem_is_refused() {
        let mut a = cert("a", &["a.example.com"]);
        let b = cert("b", &["b.example.com"]);
        a.private_key_pem = b.private_key_pem.clone();
        let err = CertStore::compile([&a]).unwrap_err();
        assert!(
            err.starts_with("certificate \"a\": private_key_pem:"),
            "{err}"
        );
        let mut broken = cert("c", &["c.example.com"]);
        broken.certificate_pem =
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into();
        let err = CertStore::compile([&broken]).unwrap_err();
        assert!(
            err.starts_with("certificate \"c\": certificate_pem:"),
            "{err}"
        );
    }
}
