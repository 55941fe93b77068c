//! Warm HTTP/1.1 connections to one upstream target.
//!
//! The proxy's request path drives hyper's HTTP/1 client connections
//! directly: a request takes an idle connection of its target (the most
//! recently used first), sends on it, and the connection goes back to the
//! target's idle list when the response body has been read to its end. A
//! pool belongs to a target address, not to a revision, so a configuration
//! change keeps the warm connections of the targets it keeps.
//!
//! Compared with `hyper_util`'s general-purpose client this does no pool key
//! hashing, spawns no task per request, and sends the request in origin
//! form without rebuilding its URI: the per-request work is one uncontended
//! lock to take a connection and one to give it back.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::{BoxError, ProxyBody};

/// How long an unused connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per target; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection could be made (refused, unreachable, timed out):
    /// the request never left, so it may be retried on another target.
    #[error("connecting to {address}: {reason}")]
    Connect {
        address: String,
        reason: std::io::Error,
    },
    /// The HTTP exchange failed after the request was handed over.
    #[error("upstream request failed")]
    Http(#[source] hyper::Error),
    /// An HTTP/2 upstream's call failed (connecting or after).
    #[error("upstream request failed")]
    Client(#[source] hyper_util::client::legacy::Error),
}

/// A failed send: why, and the request when it never left (it may go to
/// another target then, whatever its method).
#[derive(Debug)]
pub struct SendError {
    pub error: CallError,
    pub request: Option<Request<ProxyBody>>,
}

impl CallError {
    pub fn is_connect(&self) -> bool {
        match self {
            CallError::Connect { .. } => true,
            CallError::Http(_) => false,
            CallError::Client(e) => e.is_connect(),
        }
    }
}

struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
}

/// The idle connections of one target.
pub struct ConnPool {
    address: String,
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl ConnPool {
    fn new(address: &str) -> ConnPool {
        ConnPool {
            address: address.to_string(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection that can take a request.
    fn checkout(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.lock();
        while let Some(conn) = idle.pop() {
            if conn.sender.is_ready() && conn.since.elapsed() < IDLE_TIMEOUT {
                return Some(conn.sender);
            }
            // Closed, or idle too long: dropping the sender ends the connection.
        }
        None
    }

    fn put(&self, sender: http1::SendRequest<ProxyBody>) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Gives a connection back once it can take the next request.
    fn release(self: &Arc<Self>, mut sender: http1::SendRequest<ProxyBody>) {
        if sender.is_ready() {
            self.put(sender);
        } else if !sender.is_closed() {
            // The connection has not yet seen the end of the response it
            // delivered; it will in a moment.
            let pool = self.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(sender);
                }
            });
        }
    }

    async fn connect(
        &self,
        connect_timeout: Duration,
    ) -> Result<http1::SendRequest<ProxyBody>, CallError> {
        let failed = |reason| CallError::Connect {
            address: self.address.clone(),
            reason,
        };
        let stream =
            match tokio::time::timeout(connect_timeout, TcpStream::connect(&self.address)).await {
                Err(_) => {
                    return Err(failed(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    )))
                }
                Ok(Err(e)) => return Err(failed(e)),
                Ok(Ok(s)) => s,
            };
        stream.set_nodelay(true).map_err(failed)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// A warm connection, or a new one. Nothing is sent yet, so a failure
    /// here leaves the request with the caller.
    pub async fn connection(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<Conn, CallError> {
        let (sender, reused) = match self.checkout() {
            Some(s) => (s, true),
            None => (self.connect(connect_timeout).await?, false),
        };
        Ok(Conn {
            sender,
            reused,
            pool: self.clone(),
            connect_timeout,
        })
    }
}

/// One connection of a target's pool, taken for one request.
pub struct Conn {
    sender: http1::SendRequest<ProxyBody>,
    reused: bool,
    pool: Arc<ConnPool>,
    connect_timeout: Duration,
}

impl Conn {
    /// Sends `req` (its URI in origin form, `Host` set). A pooled connection
    /// that turns out to be closed before the request left is replaced by a
    /// new one to the same target. When the request never left, the error
    /// gives it back, so the caller may send it elsewhere.
    pub async fn send(
        mut self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        loop {
            match self.sender.try_send_request(req).await {
                Ok(resp) => {
                    let keep = resp.status() != http::StatusCode::SWITCHING_PROTOCOLS;
                    let mut conn = keep.then_some((self.sender, self.pool));
                    let (parts, incoming) = resp.into_parts();
                    let body = if incoming.is_end_stream() {
                        // Nothing to read: the connection is free now.
                        if let Some((sender, pool)) = conn.take() {
                            pool.release(sender);
                        }
                        incoming.map_err(BoxError::from).boxed()
                    } else {
                        Returning {
                            body: incoming,
                            conn,
                        }
                        .boxed()
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    // The idle connection closed under us; the request is intact.
                    Some(back) if self.reused => {
                        // Boxed: connecting is the rare path, and inline its
                        // state would make every send's future kilobytes
                        // larger.
                        match Box::pin(self.pool.connection(self.connect_timeout)).await {
                            Ok(fresh) => {
                                req = back;
                                self = fresh;
                            }
                            Err(error) => {
                                return Err(SendError {
                                    error,
                                    request: Some(back),
                                })
                            }
                        }
                    }
                    back => {
                        return Err(SendError {
                            error: CallError::Http(e.into_error()),
                            request: back,
                        })
                    }
                },
            }
        }
    }
}

/// A response body that gives its connection back at its end.
struct Returning {
    body: Incoming,
    conn: Option<(http1::SendRequest<ProxyBody>, Arc<ConnPool>)>,
}

impl Returning {
    fn done(&mut self) {
        if let Some((sender, pool)) = self.conn.take() {
            pool.release(sender);
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.done(),
            Some(Ok(_)) if this.body.is_end_stream() => this.done(),
            // A connection whose response failed midway is not reused.
            Some(Err(_)) => this.conn = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // Read to its end without a last poll (the server saw the length):
        // still reusable. Dropped midway: the connection closes with it.
        if self.body.is_end_stream() {
            self.done();
        }
    }
}

/// Target pools by address, shared by every revision that has the target.
#[derive(Default)]
pub struct ConnPools(Mutex<HashMap<String, Weak<ConnPool>>>);

impl std::fmt::Debug for ConnPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnPools")
    }
}

impl ConnPools {
    /// The pool of `address`, the same one while any revision holds it.
    pub fn get(&self, address: &str) -> Arc<ConnPool> {
        let mut pools = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(address).and_then(Weak::upgrade) {
            return pool;
        }
        // Forget the targets no revision has any more.
        pools.retain(|_, p| p.strong_count() > 0);
        let pool = Arc::new(ConnPool::new(address));
        pools.insert(address.to_string(), Arc::downgrade(&pool));
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    const BODY: &str = "hello from upstream";

    /// A keep-alive HTTP/1.1 server on loopback that counts the connections
    /// it accepts and answers every request with [`BODY`]; `close` makes it
    /// close its open connections and stop listening.
    struct Upstream {
        address: String,
        accepted: Arc<AtomicUsize>,
        close: Arc<Notify>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Upstream {
        async fn start() -> Upstream {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap().to_string();
            let accepted = Arc::new(AtomicUsize::new(0));
            let close = Arc::new(Notify::new());
            let (count, stop) = (accepted.clone(), close.clone());
            let task = tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        // Dropping the listener and the connection tasks
                        // closes every socket.
                        _ = stop.notified() => return,
                        accepted = listener.accept() => {
                            let (mut s, _) = accepted.unwrap();
                            count.fetch_add(1, Ordering::SeqCst);
                            conns.spawn(async move {
                                let mut buf = vec![0u8; 4096];
                                let mut have = Vec::new();
                                loop {
                                    let n = match s.read(&mut buf).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(n) => n,
                                    };
                                    have.extend_from_slice(&buf[..n]);
                                    while let Some(end) =
                                        have.windows(4).position(|w| w == b"\r\n\r\n")
                                    {
                                        have.drain(..end + 4);
                                        let resp = format!(
                                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{BODY}",
                                            BODY.len()
                                        );
                                        if s.write_all(resp.as_bytes()).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            });
                        }
                    }
                }
            });
            Upstream {
                address,
                accepted,
                close,
                task,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        async fn shut(self) {
            self.close.notify_one();
            let _ = self.task.await;
        }
    }

    fn get() -> Request<ProxyBody> {
        Request::get("/x")
            .header(http::header::HOST, "upstream")
            .body(Empty::<Bytes>::new().map_err(BoxError::from).boxed())
            .unwrap()
    }

    const CONNECT: Duration = Duration::from_secs(2);

    /// Waits until the pool holds `n` idle connections (a connection goes
    /// back once hyper has seen the end of its response, a moment after
    /// the body was read).
    async fn idle(pool: &ConnPool, n: usize) {
        for _ in 0..200 {
            if pool.lock().len() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the pool never held {n} idle connections");
    }

    async fn body(resp: Response<ProxyBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_read_to_its_end_serves_the_next_request() {
        let upstream = Upstream::start().await;
        let pool = ConnPools::default().get(&upstream.address);
        for _ in 0..3 {
            let conn = pool.connection(CONNECT).await.unwrap();
            let resp = conn.send(get()).await.unwrap();
            assert_eq!(body(resp).await, BODY);
            idle(&pool, 1).await;
        }
        assert_eq!(upstream.accepted(), 1, "one connection for three requests");
        upstream.shut().await;
    }

    #[tokio::test]
    async fn a_response_dropped_midway_closes_its_connection() {
        let upstream = Upstream::start().await;
        let pool = ConnPools::default().get(&upstream.address);
        let resp = pool
            .connection(CONNECT)
            .await
            .unwrap()
            .send(get())
            .await
            .unwrap();
        // The client went away before the body was read.
        drop(resp);
        let conn = pool.connection(CONNECT).await.unwrap();
        assert_eq!(body(conn.send(get()).await.unwrap()).await, BODY);
        assert_eq!(
            upstream.accepted(),
            2,
            "the half-read connection was not reused"
        );
        upstream.shut().await;
    }

    /// The race a full-suite run once lost a request to: a pooled
    /// connection closes under the request, and reconnecting to the
    /// target is refused. The request never left, so it comes back.
    #[tokio::test]
    async fn a_request_that_never_left_comes_back_when_the_target_is_gone() {
        let upstream = Upstream::start().await;
        let address = upstream.address.clone();
        let pool = ConnPools::default().get(&address);
        let warm = pool.connection(CONNECT).await.unwrap();
        assert_eq!(body(warm.send(get()).await.unwrap()).await, BODY);
        idle(&pool, 1).await;
        // Taken from the pool while the target is up...
        let conn = pool.connection(CONNECT).await.unwrap();
        assert!(conn.reused);
        // ...and the target goes away before the request is sent.
        upstream.shut().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut req = get();
        req.headers_mut()
            .insert("x-marker", http::HeaderValue::from_static("mine"));
        let err = conn.send(req).await.expect_err("the target is gone");
        assert!(err.error.is_connect(), "{:?}", err.error);
        let back = err.request.expect("the request comes back");
        assert_eq!(back.headers()["x-marker"], "mine");
    }

    #[tokio::test]
    async fn a_request_body_reaches_the_upstream_and_pools_are_shared_by_address() {
        let pools = ConnPools::default();
        let upstream = Upstream::start().await;
        let a = pools.get(&upstream.address);
        let b = pools.get(&upstream.address);
        assert!(Arc::ptr_eq(&a, &b));
        let req = Request::post("/x")
            .header(http::header::HOST, "upstream")
            .body(
                Full::new(Bytes::from_static(b"payload"))
                    .map_err(BoxError::from)
                    .boxed(),
            )
            .unwrap();
        let resp = a
            .connection(CONNECT)
            .await
            .unwrap()
            .send(req)
            .await
            .unwrap();
        assert_eq!(body(resp).await, BODY);
        idle(&a, 1).await;
        let again = b.connection(CONNECT).await.unwrap();
        assert!(
            again.reused,
            "the other handle sees the same idle connection"
        );
        drop(again);
        upstream.shut().await;
    }
}
