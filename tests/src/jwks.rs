//! A small identity provider for JWKS tests: serves a JSON Web Key Set on
//! 127.0.0.1 (plain http, or https with a certificate of its own test CA),
//! counts the fetches, and can swap its keys, answer 503, or stop and start
//! again on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An ES256 signing key with its `kid`.
pub struct SigningKey {
    pub kid: String,
    pair: rcgen::KeyPair,
}

impl SigningKey {
    pub fn new(kid: &str) -> SigningKey {
        SigningKey {
            kid: kid.to_string(),
            pair: rcgen::KeyPair::generate().expect("an ECDSA P-256 key"),
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> serde_json::Value {
        let raw = self.pair.public_key_raw();
        let (x, y) = raw[1..].split_at(32);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "kid": self.kid, "x": b64(x), "y": b64(y),
        })
    }

    /// A token signed with this key, naming `kid` in its header.
    pub fn sign_as(&self, kid: &str, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_string());
        let key = EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes())
            .expect("a PKCS#8 EC key");
        jsonwebtoken::encode(&header, claims, &key).expect("signing works")
    }

    /// A token signed with this key, naming its own `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_as(&self.kid, claims)
    }
}

/// A key set of these keys.
pub fn key_set(keys: &[&SigningKey]) -> serde_json::Value {
    serde_json::json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

#[derive(Default)]
struct State {
    set: Mutex<serde_json::Value>,
    fetches: AtomicU64,
    failing: AtomicBool,
}

/// The test identity provider.
pub struct TestIdp {
    pub addr: SocketAddr,
    /// The key set's URL.
    pub url: String,
    /// With https: the CA (PEM file) its certificate is signed by.
    pub ca_file: Option<PathBuf>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

impl TestIdp {
    /// Serves `set` over plain http.
    pub async fn start(set: serde_json::Value) -> Result<TestIdp> {
        Self::start_with(set, None, None).await
    }

    /// Serves `set` over https with a certificate for 127.0.0.1 signed by a
    /// new CA, written to `dir`/idp-ca.pem.
    pub async fn start_tls(set: serde_json::Value, dir: &Path) -> Result<TestIdp> {
        let cert = crate::certs::LoopbackCert::new()?;
        let ca_file = dir.join("idp-ca.pem");
        std::fs::write(&ca_file, &cert.ca_pem)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert_der], cert.key_der)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_with(set, Some(acceptor), Some(ca_file)).await
    }

    async fn start_with(
        set: serde_json::Value,
        tls: Option<tokio_rustls::TlsAcceptor>,
        ca_file: Option<PathBuf>,
    ) -> Result<TestIdp> {
        let state = Arc::new(State::default());
        *state.set.lock().unwrap() = set;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut idp = TestIdp {
            addr,
            url: format!("{scheme}://{addr}/.well-known/jwks.json"),
            ca_file,
            tls,
            state,
            task: None,
        };
        idp.serve(listener);
        Ok(idp)
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        let tls = self.tls.clone();
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the task closes them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let svc = service_fn(move |_req: http::Request<Incoming>| {
                        state.fetches.fetch_add(1, Ordering::SeqCst);
                        let response = if state.failing.load(Ordering::SeqCst) {
                            http::Response::builder()
                                .status(503)
                                .body(Full::new(Bytes::from_static(b"down")))
                        } else {
                            let body = state.set.lock().unwrap().to_string();
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                        };
                        async move { Ok::<_, Infallible>(response.expect("valid response")) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        }));
    }

    /// Requests answered so far (key sets and failures).
    pub fn fetches(&self) -> u64 {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// Serves `set` from now on.
    pub fn set_keys(&self, set: serde_json::Value) {
        *self.state.set.lock().unwrap() = set;
    }

    /// Answers 503 (`true`) or the key set (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Stops listening and closes every connection: fetches are refused.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn start_again(&mut self) -> Result<()> {
        self.stop();
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        let listener = socket.listen(128)?;
        self.serve(listener);
        Ok(())
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.stop();
    }
}
