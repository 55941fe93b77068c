//! `gatehouse-bench hyper-floor`: the least an HTTP/1.1 reverse proxy built
//! on hyper and tokio can do per request, as a reference point in the
//! `proxies` table. Each client connection gets one upstream connection of
//! its own (no pool to search), every request goes up unchanged and every
//! response comes back unchanged, bodies streamed: hyper's server side,
//! hyper's client side and tokio's scheduling, nothing else. No routing, no
//! header rewriting, no limits, no metrics, no logs: not a proxy anyone
//! should run, only the floor under any proxy that uses the same libraries.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves `listener` until the process ends, forwarding to `upstream`.
pub async fn serve(listener: TcpListener, upstream: SocketAddr) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await.context("accept")?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // One upstream connection per client connection, opened with it.
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let Ok((send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await
            else {
                return;
            };
            tokio::spawn(conn);
            // A client connection's requests come one at a time, so this
            // lock is never contended; it only lets the service own `send`.
            let send = Arc::new(Mutex::new(send));
            let svc = service_fn(move |req: Request<Incoming>| {
                let send = send.clone();
                async move { Ok::<_, Infallible>(forward(&send, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn forward(send: &Mutex<SendRequest<Incoming>>, req: Request<Incoming>) -> Response<Body> {
    let mut send = send.lock().await;
    match send.send_request(req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(_) => {
            let mut resp = Response::new(Empty::new().map_err(|e| match e {}).boxed());
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    /// A client connection to the floor at `addr`.
    async fn client(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    fn get_x() -> Request<Empty<Bytes>> {
        Request::get("/x")
            .header(http::header::HOST, "floor")
            .body(Empty::new())
            .unwrap()
    }

    /// The floor passes requests through to the backend and its answers
    /// back, over one kept-alive connection: it is a proxy, however bare,
    /// not a server answering by itself.
    #[tokio::test]
    async fn the_floor_forwards_requests_and_answers_unchanged() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(crate::load::serve_backend(backend));
        let floor = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let floor_addr = floor.local_addr().unwrap();
        tokio::spawn(serve(floor, backend_addr));

        let mut send = client(floor_addr).await;
        for _ in 0..3 {
            let resp = send.send_request(get_x()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(
                resp.headers()[http::header::CONTENT_TYPE],
                "text/plain",
                "the backend's header comes through"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, crate::load::BACKEND_BODY.as_bytes());
        }
    }

    /// With the backend gone, the floor answers 502 rather than hanging.
    #[tokio::test]
    async fn the_floor_answers_502_when_the_backend_closes() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let floor = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let floor_addr = floor.local_addr().unwrap();
        tokio::spawn(serve(floor, backend_addr));
        // Accept the floor's upstream connection and close it at once.
        let closer = tokio::spawn(async move { drop(backend.accept().await) });

        let mut send = client(floor_addr).await;
        closer.await.unwrap();
        let resp = send.send_request(get_x()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    }
}
