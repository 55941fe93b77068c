//! A throwaway CA and a certificate for 127.0.0.1 signed by it, for the
//! test servers that speak TLS (identity providers, Redis).

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A new CA and a server certificate for 127.0.0.1 that it signed.
pub struct LoopbackCert {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The server certificate, PEM and DER.
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// The server key, PEM (PKCS#8) and DER.
    pub key_pem: String,
    pub key_der: PrivateKeyDer<'static>,
    /// A client certificate from the same CA, and its key, PEM.
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl LoopbackCert {
    pub fn new() -> Result<LoopbackCert> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Names of their own: OpenSSL (redis-server, redis-cli) takes a
        // certificate whose subject is its issuer's for a self-signed one.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "gatehouse test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let cert = params.signed_by(&key, &issuer)?;
        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, "gatehouse test client");
        let client_cert = client.signed_by(&client_key, &issuer)?;
        Ok(LoopbackCert {
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }
}
