//! TLS on the cluster's gRPC links (Raft, the admin API, the config stream):
//! client configurations from PEM files, and who a peer certificate names.
//!
//! Certificates made by `gatehouse certs init` carry the holder's name in the
//! subject's common name (CN) and its role in the organizational unit (OU):
//! `control_plane`, `data_plane`, `admin`, `editor` or `viewer`.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct TlsFileError {
    pub what: &'static str,
    pub path: PathBuf,
    pub message: String,
}

/// Reads a PEM file that must hold at least one certificate.
pub fn read_certs(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let err = |message: String| TlsFileError {
        what,
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let count = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not PEM certificates: {e}")))?
        .len();
    if count == 0 {
        return Err(err("holds no certificate".into()));
    }
    Ok(pem)
}

/// Reads a PEM private key file.
pub fn read_key(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let err = |message: String| TlsFileError {
        what: "private key",
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| err("holds no PEM private key".into()))?;
    Ok(pem)
}

/// What a client needs to reach a TLS server of the cluster: the CA that
/// signed the servers' certificates, and optionally its own certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// A tonic client configuration; the server's name is set per connection.
    pub fn load(&self) -> Result<ClientTlsConfig, TlsFileError> {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_certs("CA file", &self.ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read_certs("certificate", cert)?,
                    read_key(key)?,
                ));
            }
            (None, None) => {}
            (Some(path), None) | (None, Some(path)) => {
                return Err(TlsFileError {
                    what: "client certificate",
                    path: path.clone(),
                    message: "a certificate and its key go together: give both".into(),
                })
            }
        }
        Ok(config)
    }
}

/// The host part of `host:port` (IPv6 brackets removed), for SNI and name checks.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The holder a certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common name.
    pub name: String,
    /// The subject's organizational unit: the holder's role.
    pub role: String,
}

/// The name and role in a DER certificate (its first CN and OU).
pub fn identity_of(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let role = subject
        .iter_organizational_unit()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(PeerIdentity { name, role })
}

/// Who the peer of a request is, by the client certificate it presented on
/// a TLS connection (already verified against the cluster CA by rustls).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    let certs = request.peer_certs()?;
    identity_of(certs.first()?.as_ref())
}
