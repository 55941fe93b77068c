//! A token introspection endpoint (RFC 7662) for tests: it answers what it
//! was told per token, checks the gateway's client credentials, counts the
//! calls per token, and can be made to fail or stopped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[derive(Default)]
struct State {
    answers: HashMap<String, Value>,
    calls: HashMap<String, u64>,
    /// Calls that did not bring the right client credentials.
    refused: u64,
}

/// A running introspection endpoint on 127.0.0.1.
pub struct Introspection {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    failing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Introspection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decodes one `application/x-www-form-urlencoded` value.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Introspection {
    /// Starts an endpoint that accepts `client_id`/`client_secret` in HTTP
    /// Basic (form-encoded, RFC 6749 section 2.3.1).
    pub async fn start(client_id: &str, client_secret: &str) -> Result<Introspection> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let failing = Arc::new(AtomicBool::new(false));
        let expected = (client_id.to_string(), client_secret.to_string());
        let (st, fail) = (state.clone(), failing.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (st, fail, expected) = (st.clone(), fail.clone(), expected.clone());
                connections.spawn(async move {
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let (st, fail, expected) = (st.clone(), fail.clone(), expected.clone());
                        async move {
                            let reply = |status: u16, body: Value| {
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(body.to_string())))
                                        .expect("valid response"),
                                )
                            };
                            // Both parts form-encoded, then Basic (RFC 6749 2.3.1).
                            let presented = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.strip_prefix("Basic "))
                                .and_then(|b| {
                                    base64::engine::general_purpose::STANDARD.decode(b).ok()
                                })
                                .and_then(|b| String::from_utf8(b).ok())
                                .and_then(|s| {
                                    s.split_once(':')
                                        .map(|(i, p)| (form_decode(i), form_decode(p)))
                                });
                            let authorized = presented.as_ref() == Some(&expected);
                            let form = req.headers().get("content-type").is_some_and(|v| {
                                v.as_bytes() == b"application/x-www-form-urlencoded"
                            });
                            let post = req.method() == http::Method::POST;
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if !(authorized && form && post) {
                                st.lock().unwrap().refused += 1;
                                return reply(401, json!({ "error": "invalid_client" }));
                            }
                            let body = String::from_utf8_lossy(&body).into_owned();
                            let token = body
                                .split('&')
                                .find_map(|pair| pair.strip_prefix("token="))
                                .map(form_decode)
                                .unwrap_or_default();
                            let answer = {
                                let mut s = st.lock().unwrap();
                                *s.calls.entry(token.clone()).or_default() += 1;
                                s.answers.get(&token).cloned()
                            };
                            if fail.load(Ordering::Relaxed) {
                                return reply(500, json!({ "error": "server_error" }));
                            }
                            reply(200, answer.unwrap_or_else(|| json!({ "active": false })))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Introspection {
            addr,
            state,
            failing,
            task,
        })
    }

    /// The endpoint's URL.
    pub fn url(&self) -> String {
        format!("http://{}/oauth2/introspect", self.addr)
    }

    /// Answers `body` for `token` from now on.
    pub fn answer(&self, token: &str, body: Value) {
        self.state
            .lock()
            .unwrap()
            .answers
            .insert(token.to_string(), body);
    }

    /// Calls made for `token` so far.
    pub fn calls(&self, token: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    /// Calls refused for bad client credentials or a malformed request.
    pub fn refused(&self) -> u64 {
        self.state.lock().unwrap().refused
    }

    /// Answers 500 to every call while `on`.
    pub fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::Relaxed);
    }

    /// Stops listening and closes every connection.
    pub fn stop(&self) {
        self.task.abort();
    }
}
