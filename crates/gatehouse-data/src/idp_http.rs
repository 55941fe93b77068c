//! The one HTTP client setup for calls to identity providers (JWKS key sets,
//! token introspection): rustls on ring with the given roots (the system's
//! by default), no proxy from the environment, a time cap, and bodies read
//! with a size cap.

use rustls::RootCertStore;

/// The CA certificates the operating system trusts. A root rustls cannot
/// read is skipped.
pub fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    roots
}

/// A client that trusts `roots`, follows redirects by `redirects`, and gives
/// up on a connection or an exchange after `timeout`.
pub fn client(
    roots: RootCertStore,
    redirects: reqwest::redirect::Policy,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, String> {
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(redirects)
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .user_agent(concat!("gatehouse/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// Why a body was not read whole.
#[derive(Debug)]
pub enum BodyError {
    /// Longer than the cap (announced or seen).
    TooLarge,
    /// The connection failed while reading.
    Broken(String),
}

/// The body of `response`, refused past `cap` bytes without reading further.
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|l| l > cap as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Broken(error_chain(&e)))?
    {
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error with its causes, for logs (reqwest's top-level message alone
/// says little).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
