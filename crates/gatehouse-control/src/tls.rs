//! TLS for a control-plane node: its listeners (Raft with mutual TLS, the
//! admin API and config stream with an optional client certificate), the
//! client side of its links to other nodes, and reloading the files
//! without a restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use gatehouse_proto::tls::{ClientTlsFiles, TlsFileError};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::ClientTlsConfig;

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the files are checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The node's certificate and key, and the cluster CA that signed every
/// node's, data plane's and admin's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn file_error(
    what: &'static str,
    path: &std::path::Path,
    e: impl std::fmt::Display,
) -> TlsFileError {
    TlsFileError {
        what,
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// What the files give, built together so a half-written set is never used.
struct Built {
    admin: Arc<ServerConfig>,
    raft: Arc<ServerConfig>,
    client: ClientTlsConfig,
}

fn build(files: &ServerTlsFiles) -> Result<Built, TlsFileError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| file_error("certificate", &files.cert, e))?;
    if certs.is_empty() {
        return Err(file_error(
            "certificate",
            &files.cert,
            "holds no certificate",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_error("private key", &files.key, e))?;
    let mut roots = RootCertStore::empty();
    for ca in
        CertificateDer::pem_file_iter(&files.ca).map_err(|e| file_error("CA file", &files.ca, e))?
    {
        let ca = ca.map_err(|e| file_error("CA file", &files.ca, e))?;
        roots
            .add(ca)
            .map_err(|e| file_error("CA file", &files.ca, e))?;
    }
    if roots.is_empty() {
        return Err(file_error("CA file", &files.ca, "holds no certificate"));
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = |optional: bool| -> Result<Arc<ServerConfig>, TlsFileError> {
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
        if optional {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier
            .build()
            .map_err(|e| file_error("CA file", &files.ca, e))?;
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| file_error("certificate", &files.cert, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| file_error("certificate", &files.cert, e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    };
    let client = ClientTlsFiles {
        ca: files.ca.clone(),
        cert: Some(files.cert.clone()),
        key: Some(files.key.clone()),
    }
    .load()?;
    Ok(Built {
        admin: server(true)?,
        raft: server(false)?,
        client,
    })
}

/// The files' modification times and sizes, to notice a change.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &ServerTlsFiles) -> Stamp {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// The node's current TLS configurations.
pub struct NodeTls {
    files: ServerTlsFiles,
    /// Admin API and config stream: a client certificate is optional.
    pub admin: Arc<ArcSwap<ServerConfig>>,
    /// Raft: a client certificate from the cluster CA is required.
    pub raft: Arc<ArcSwap<ServerConfig>>,
    client: ArcSwap<ClientTlsConfig>,
    stamp: Mutex<Stamp>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("files", &self.files)
            .finish()
    }
}

impl NodeTls {
    pub fn load(files: ServerTlsFiles) -> Result<NodeTls, TlsFileError> {
        let stamp = stamp(&files);
        let built = build(&files)?;
        Ok(NodeTls {
            files,
            admin: Arc::new(ArcSwap::new(built.admin)),
            raft: Arc::new(ArcSwap::new(built.raft)),
            client: ArcSwap::from_pointee(built.client),
            stamp: Mutex::new(stamp),
        })
    }

    /// The client configuration for links to other nodes.
    pub fn client(&self) -> ClientTlsConfig {
        self.client.load().as_ref().clone()
    }

    /// Loads the files again if they changed; `Ok(true)` when the new ones
    /// are in use. Files that do not load leave the current ones in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsFileError> {
        let now = stamp(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == now {
            return Ok(false);
        }
        // Warn once per change of the files, not on every check.
        *last = now;
        let built = build(&self.files)?;
        self.admin.store(built.admin);
        self.raft.store(built.raft);
        self.client.store(Arc::new(built.client));
        Ok(true)
    }
}

/// Accepted TLS connections of `listener`, each handshake in its own task so
/// a slow client holds up no one. Ends when the receiving side is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<ServerConfig>>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer): (TcpStream, SocketAddr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    /// A CA, and a function that issues a server certificate with `cn`.
    struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pem: String,
    }

    impl Ca {
        fn new() -> Ca {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let pem = params.self_signed(&key).unwrap().pem();
            Ca {
                issuer: rcgen::Issuer::new(params, key),
                pem,
            }
        }

        fn issue(&self, cn: &str) -> (String, String) {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationalUnitName, "control_plane");
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    /// Handshakes with a server on `addr` and returns the CN of the certificate it showed.
    async fn served_cn(addr: SocketAddr, ca_pem: &str) -> String {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        gatehouse_proto::tls::identity_of(cert.as_ref())
            .unwrap()
            .name
    }

    #[tokio::test]
    async fn changed_files_are_served_to_new_connections_and_bad_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let files = ServerTlsFiles {
            cert: dir.path().join("node.pem"),
            key: dir.path().join("node-key.pem"),
            ca: dir.path().join("ca.pem"),
        };
        let write = |(cert, key): (String, String)| {
            std::fs::write(&files.cert, cert).unwrap();
            std::fs::write(&files.key, key).unwrap();
        };
        std::fs::write(&files.ca, &ca.pem).unwrap();
        write(ca.issue("first"));
        let tls = NodeTls::load(files.clone()).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The admin listener's configuration: client certificates optional.
        let mut accepted = incoming(listener, tls.admin.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(conn) = accepted.next().await {
                drop(conn);
            }
        });
        assert_eq!(served_cn(addr, &ca.pem).await, "first");
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed yet");

        write(ca.issue("second-with-a-longer-name"));
        assert!(tls.reload_if_changed().unwrap());
        assert_eq!(served_cn(addr, &ca.pem).await, "second-with-a-longer-name");

        // A broken key is reported, and the previous certificate stays in use.
        std::fs::write(&files.key, "not a key").unwrap();
        let err = tls.reload_if_changed().unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
        assert_eq!(served_cn(addr, &ca.pem).await, "second-with-a-longer-name");
        // Reported once per change, not on every check.
        assert!(!tls.reload_if_changed().unwrap());
    }
}
